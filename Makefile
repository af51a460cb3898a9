# CipherHorizon: make run | up | down | test | bench | lint | clean-run
# Honours CH_NATS_URL (no nats-server is started then), CH_DATABASE_URL, CH_SUBJECT_PREFIX.
SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

CHCTL := target/debug/chctl

.PHONY: help run up down test bench lint clean-run venv pg

help:
	@echo "make run        start NATS (pinned), PostgreSQL if needed, every worker, load the demo; Ctrl-C stops"
	@echo "make up         the same, detached: returns once every service answers"
	@echo "make down       stop what 'make up' started"
	@echo "make test       unit and end-to-end tests against a nats-server of their own"
	@echo "make bench      the trade-flow benchmark on a stack of its own (BENCH_ARGS=--quick for a smoke run)"
	@echo "make lint       rustfmt check and clippy (warnings are errors)"
	@echo "make clean-run  remove .run (logs, pid files, the dev server's store)"

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
	@scripts/nats.sh stop

test: venv pg
	@scripts/test.sh

# BENCH_ARGS: extra arguments of `chctl bench trade-flow` (e.g. --quick); BENCH_SYNC_MODES:
# CH_SYNC modes to run (default eventual); BENCH_FSYNC: JetStream fsync settings (default
# "default always"). See scripts/bench.sh.
bench: venv pg
	@BENCH_ARGS="$(BENCH_ARGS)" BENCH_SYNC_MODES="$(BENCH_SYNC_MODES)" BENCH_FSYNC="$(BENCH_FSYNC)" scripts/bench.sh

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

clean-run:
	rm -rf .run
