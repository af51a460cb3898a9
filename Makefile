# CipherHorizon: make run | up | down | test | chart | bench | bench-modes | lint | clean-run
# Honours CH_NATS_URL (no nats-server is started then), CH_DATABASE_URL, CH_SUBJECT_PREFIX.
SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

# Where cargo puts it, as cargo finds its target directory (scripts/target-dir.sh).
CHCTL = $(shell scripts/target-dir.sh)/debug/chctl

.PHONY: help run up down test chart bench bench-modes lint clean-run venv pg

help:
	@echo "make run        start NATS (pinned), PostgreSQL if needed, every worker, load the demo; Ctrl-C stops"
	@echo "make up         the same, detached: returns once every service answers"
	@echo "make down       stop what 'make up' started"
	@echo "make test       unit and end-to-end tests against a nats-server of their own, and make chart"
	@echo "make chart      lint, render and validate the Helm chart (helm/cipherhorizon), offline"
	@echo "make bench      the trade-flow benchmark on a stack of its own (BENCH_ARGS=--quick for a smoke run)"
	@echo "make bench-modes  CH_SYNC eventual, batch and adaptive side by side at three loads (about 8 min after the release build)"
	@echo "make lint       rustfmt check and clippy (warnings are errors)"
	@echo "make clean-run  stop what make up started and the dev nats-server, then remove .run (logs, pid files, its store)"

venv:
	@scripts/venv.sh

pg:
	@scripts/pg.sh

run:
	@scripts/run.sh

up:
	@scripts/run.sh --detach

down:
	@cargo build -q -p chctl
	@$(CHCTL) down
	@if [[ -e .run/nats-started-by-up ]]; then \
		scripts/nats.sh stop && rm -f .run/nats-started-by-up; \
	elif scripts/nats.sh status >/dev/null 2>&1; then \
		echo "make down: the nats-server on 14222 was not started by make up; left running"; \
	fi

# The Postgres checked (and started if local) is the tests' own, CH_TEST_DATABASE_URL's.
test: chart
	@CH_DATABASE_URL="$${CH_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/ch_test}" scripts/pg.sh
	@scripts/test.sh

# The Helm chart's checks (tests/helm/check_chart.py): helm lint --strict, the values schema,
# every rendered manifest against Kubernetes' API schemas. Needs no cluster.
chart:
	@scripts/venv.sh --chart
	@.venv/bin/python tests/helm/check_chart.py

# BENCH_ARGS: extra arguments of `chctl bench trade-flow` (e.g. --quick); BENCH_SYNC_MODES:
# CH_SYNC modes to run (default eventual); BENCH_FSYNC: JetStream fsync settings (default
# "default always"); BENCH_RATES: signal rates, commands/s or max (default max: closed loop);
# BENCH_REPEAT: runs of each (default 1). See scripts/bench.sh.
bench: venv pg
	@BENCH_ARGS="$(BENCH_ARGS)" BENCH_SYNC_MODES="$(BENCH_SYNC_MODES)" BENCH_FSYNC="$(BENCH_FSYNC)" \
		BENCH_RATES="$(BENCH_RATES)" BENCH_REPEAT="$(BENCH_REPEAT)" scripts/bench.sh

# Is adaptive close to the best fixed batching at every load? The three batching modes in
# turn, three times, at a light, a medium and a saturating load (default fsync, 30,000 signals,
# no monolith), then `chctl bench compare` of the 27 runs (medians of each mode's three).
bench-modes: venv pg
	@BENCH_ARGS="--baseline none --signals 30000 $(BENCH_ARGS)" \
		BENCH_SYNC_MODES="eventual batch adaptive" BENCH_FSYNC=default \
		BENCH_RATES="$(or $(BENCH_RATES),1000 3000 max)" BENCH_REPEAT="$(or $(BENCH_REPEAT),3)" \
		scripts/bench.sh

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

# Stops what runs first: its pid files and the dev server's store are in .run (a server
# using that store is stopped, whoever started it).
clean-run:
	@# The local cluster's nodes (nats/cluster/) keep their stores under .run/nats-cluster:
	@# removed under a running node, its stream would be gone at the node's next start.
	@for port in 14231 14232 14233; do \
		if (exec 3<>/dev/tcp/127.0.0.1/$$port) 2>/dev/null; then \
			echo "make clean-run: a nats-server answers on $$port (nats/cluster/), its store under .run/nats-cluster; stop the cluster's nodes first" >&2; \
			exit 1; \
		fi; \
	done
	@cargo build -q -p chctl
	@$(CHCTL) down
	@scripts/nats.sh stop || true
	rm -rf .run
