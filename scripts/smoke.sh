#!/usr/bin/env bash
# Starts every worker binary with `chctl up --detach` on a prefix of its own, runs the nats-py
# API smoke test (tests/python/api_smoke.py) against them, then `chctl status`, `chctl rebuild
# all` with the projectors running (and refused when set for another schema than theirs), the benchmark at its smoke size, `chctl status` with a
# projector failing and with a worker stopped (and skipped), and stops them again.
#   scripts/smoke.sh NATS_URL DATABASE_URL
set -euo pipefail
cd "$(dirname "$0")/.."

export CH_NATS_URL=$1 CH_DATABASE_URL=$2
export CH_SUBJECT_PREFIX=smoke CH_DB_SCHEMA=smoke
export CH_RUN_DIR=$(mktemp -d "${TMPDIR:-/tmp}/ch-smoke.XXXXXX")
# Where cargo put the debug binaries (test.sh built them).
bin=$(scripts/target-dir.sh)/debug
chctl=$bin/chctl
stop() {
    # A run that failed while the portfolios table was renamed away (below) puts it back.
    psql -q "$CH_DATABASE_URL" -c 'ALTER TABLE IF EXISTS smoke.portfolios_away RENAME TO portfolios' \
        >/dev/null 2>&1 || true
    "$chctl" down >/dev/null 2>&1 || true
    rm -rf "$CH_RUN_DIR"
}
trap stop EXIT

"$chctl" up --detach --bin-dir "$bin" >/dev/null
.venv/bin/python tests/python/api_smoke.py

# `chctl status`: every service up, and the projectors' Postgres sessions by their names.
status=$("$chctl" status) \
    || { printf 'smoke: chctl status reports a problem:\n%s\n' "$status" >&2; exit 1; }
for w in proj-portfolio proj-strategy; do
    grep -Eq "^  smoke-$w +[1-9][0-9]* open," <<<"$status" \
        || { printf 'smoke: chctl status shows no session of %s:\n%s\n' "$w" "$status" >&2; exit 1; }
done
echo "smoke: chctl status: every service up, the projectors' database sessions by name"

# `chctl setup` again, with a pool the workers would refuse: the setting is theirs, and set-up
# (idempotent) does not fail on it after doing its work.
CH_DB_POOL=1 "$chctl" setup >"$CH_RUN_DIR/setup-pool-1.log" 2>&1 \
    || { echo "smoke: chctl setup failed with CH_DB_POOL=1:" >&2; cat "$CH_RUN_DIR/setup-pool-1.log" >&2; exit 1; }
echo "smoke: chctl setup passes with CH_DB_POOL=1, the workers' setting"
# A value chctl refuses that came from the environment names the variable, not only the flag.
if out=$(CH_STREAM_REPLICAS=0 "$chctl" setup 2>&1) || ! grep -q 'CH_STREAM_REPLICAS="0"' <<<"$out"; then
    printf 'smoke: CH_STREAM_REPLICAS=0 was taken, or not named:\n%s\n' "$out" >&2; exit 1
fi
rc=0; "$chctl" --run-dir $'/tmp/x\xff' nosuchcmd >/dev/null 2>&1 || rc=$?
[[ $rc == 2 ]] || { echo "smoke: a usage error with a non-UTF-8 argument ended $rc, not 2" >&2; exit 1; }
echo "smoke: a chctl option refused from the environment names its variable"

# A second `make up` while this one runs is refused, and leaves the running workers alone.
if scripts/run.sh --detach >"$CH_RUN_DIR/up-again.log" 2>&1; then
    echo "smoke: a second make up started while workers were running" >&2; exit 1
fi
grep -q "workers of an earlier \`up\` are still running" "$CH_RUN_DIR/up-again.log" \
    || { cat "$CH_RUN_DIR/up-again.log" >&2; echo "smoke: a second make up failed otherwise" >&2; exit 1; }
status=$("$chctl" status) \
    || { printf 'smoke: a second make up stopped the running workers:\n%s\n' "$status" >&2; exit 1; }
echo "smoke: a second make up is refused and leaves the running workers up"

# `chctl rebuild` while the projectors run: each replays the stream, and chctl follows it to
# the head it saw before the reset. The strategy projection counts its own events only.
out=$("$chctl" rebuild all --stall-timeout 30)
strategy_events=$(sed -n "s/^strategy: rebuilding from \([0-9]*\) events (.* of the stream's [0-9]*)$/\1/p" <<<"$out")
for p in portfolio strategy; do
    head=$(sed -n -e "s/^$p: rebuilding from [0-9]* events (.* of the stream's \([0-9]*\))$/\1/p" \
        -e "s/^$p: rebuilding from \([0-9]*\) events$/\1/p" <<<"$out")
    reached=$(sed -n "s/^$p: rebuilt up to seq \([0-9]*\): .*/\1/p" <<<"$out")
    if ! grep -q "^$p: a running projector holds the lock" <<<"$out" \
        || [[ -z $head || -z $reached || $reached -lt $head ]]; then
        printf 'smoke: chctl rebuild %s did not follow its projector to the head:\n%s\n' "$p" "$out" >&2
        exit 1
    fi
done
if [[ -z $strategy_events || $strategy_events -ge $head ]]; then
    printf 'smoke: chctl rebuild strategy did not count the strategy events alone:\n%s\n' "$out" >&2
    exit 1
fi
echo "smoke: chctl rebuild all: both running projectors replayed to the head"

# `chctl rebuild` set for another schema than the running projectors' (a shell without the
# workers' settings): refused, naming both, and nothing created or reset there.
if out=$(CH_DB_SCHEMA=smoke_elsewhere "$chctl" rebuild portfolio 2>&1); then
    printf 'smoke: chctl rebuild on another schema than the projector'"'"'s went ahead:\n%s\n' "$out" >&2
    exit 1
fi
grep -Eq "the running projector's read model is in database [^,]+, schema smoke, .*; this chctl is set for database [^,]+, schema smoke_elsewhere, .* \(no such schema there\)" <<<"$out" \
    || { printf 'smoke: chctl rebuild on another schema failed otherwise:\n%s\n' "$out" >&2; exit 1; }
elsewhere=$(psql -Atq "$CH_DATABASE_URL" -c "SELECT count(*) FROM pg_namespace WHERE nspname = 'smoke_elsewhere'")
[[ $elsewhere == 0 ]] \
    || { echo "smoke: chctl rebuild created the schema it refused to rebuild" >&2; exit 1; }
echo "smoke: chctl rebuild set for another schema than the running projector's is refused, creating nothing"

# The benchmark at its smoke size, paced, beside the monolith: it must find every read-model
# row equal to the state folded from the stream (it exits 1 otherwise), see no errors, keep
# to the rate it was given (a closed loop here runs at thousands per second), and report the
# workers' own latencies and Postgres' CPU by the worker each backend serves. Its own
# environment says batch (the workers run eventual): its JSON must say what the workers report.
rate=200
CH_SYNC=batch CH_BATCH_MAX=7 "$chctl" bench trade-flow --quick --signals 400 --rate "$rate" --query-rate 50 \
    --out "$CH_RUN_DIR/bench" --tag smoke >"$CH_RUN_DIR/bench.log" 2>&1 \
    || { cat "$CH_RUN_DIR/bench.log" >&2; echo "smoke: chctl bench trade-flow failed" >&2; exit 1; }
result=$(ls "$CH_RUN_DIR"/bench/*-smoke.json)
.venv/bin/python - "$result" "$rate" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); rate = int(sys.argv[2])
problems = []
for side, fig in (("ours", r), ("monolith", r["baseline"])):
    if fig["errors"]["total"] != 0:
        problems.append(f"{side}: errors {fig['errors']}")
    if fig["consistency"]["rows_differing"] != 0:
        problems.append(f"{side}: rows differing {fig['consistency']}")
    if not 0 < fig["commands_per_sec"] <= rate * 1.05:
        problems.append(f"{side}: {fig['commands_per_sec']} commands/s, paced to {rate}/s")
c = r["config"]
if (c["ch_sync"], c["ch_batch_max"], c["ch_from_environment"]) != ("eventual", 500, []) \
        or len(c["deployment"]["proj-portfolio"]) != 1:
    problems.append(f"config from the deployment: {c}")
if r["config"]["rate"] != rate or r["projection_lag_ms"] is None:
    problems.append(f"config {r['config']}, lag {r['projection_lag_ms']}")
# The workers' own latency figures, read from $SRV.STATS: at least every request sent; the
# percentiles moved to since_start exactly when over 1 % of the requests came before the run
# (the query worker answered the API smoke test's queries before it).
for key, sent in (("command", r["signals"]["sent"]), ("query", r["queries"])):
    served = r["service_latency_ms"][key]
    if not served or served["requests"] < sent:
        problems.append(f"service latency of {key}: {served}, {sent} requests sent")
        continue
    earlier = served["requests_before"] * 100 > served["requests"]
    figures = served["since_start"] if earlier else served
    if earlier != ("since_start" in served) or not (figures["p99"] or 0) > 0:
        problems.append(f"service latency of {key}: {served}, {sent} requests sent")
# Postgres' CPU split by the session each backend serves: the workers' own and the monolith's.
prefix = r["config"]["ch_subject_prefix"]
for side, fig, names in (("ours", r, (f"{prefix}-proj-portfolio", f"{prefix}-query-portfolio")),
                         ("monolith", r["baseline"], ("chctl-bench-monolith",))):
    split = fig["postgres_cpu_seconds_by_application"]
    if any(n not in split for n in names):
        problems.append(f"{side}: Postgres CPU by session {split}, expected {names}")
# Only this run's nats-server is counted (the machine may run others), and the file says what
# each side's acknowledgement means.
if "nats-server" not in r["cpu_seconds"] or "durability" not in r["ratio"]:
    problems.append(f"cpu_seconds {r['cpu_seconds']}, ratio {r['ratio']}")
if problems:
    sys.exit("smoke: chctl bench trade-flow: " + "; ".join(problems))
PY
"$chctl" bench compare "$result" | grep -q "400 signals from 8 clients at $rate/s" \
    || { echo "smoke: chctl bench compare did not describe the run" >&2; exit 1; }
echo "smoke: chctl bench trade-flow --quick at $rate/s: 0 rows differing, 0 errors, beside the monolith"

# `chctl status` fails while a projector keeps failing its batches, though it still answers
# its status endpoint (here its table renamed away under it; a missing grant does the same),
# and passes again once the projector is through. Each status takes its own round trips; the
# loops are bounded.
psql -q -v ON_ERROR_STOP=1 "$CH_DATABASE_URL" -c 'ALTER TABLE smoke.portfolios RENAME TO portfolios_away'
"$chctl" req portfolio.update \
    '{"portfolio_id":"smoke-failing","op":"open","user_id":"u1","name":"n","quote_currency":"USDT"}' >/dev/null
failing=
for _ in $(seq 100); do
    if ! status=$("$chctl" status) && grep -q "portfolio .*failing, [0-9]* failures in a row" <<<"$status"; then
        failing=1
        break
    fi
done
psql -q -v ON_ERROR_STOP=1 "$CH_DATABASE_URL" -c 'ALTER TABLE smoke.portfolios_away RENAME TO portfolios'
[[ -n $failing ]] || { printf 'smoke: chctl status did not report the failing projector:\n%s\n' "$status" >&2; exit 1; }
recovered=
for _ in $(seq 100); do
    if status=$("$chctl" status); then
        recovered=1
        break
    fi
done
[[ -n $recovered ]] || { printf 'smoke: chctl status still fails after the projector recovered:\n%s\n' "$status" >&2; exit 1; }
echo "smoke: chctl status fails while a projector keeps failing, and passes once it is through"

# `chctl status --skip` (what the Helm chart's `helm test` runs when the chart leaves workers
# out): a worker that is gone fails the status, unless it is skipped.
pid=$(awk '$1 == "exit-triggers" {print $2}' "$CH_RUN_DIR/workers.pids")
[[ -n $pid ]] || { echo "smoke: no exit-triggers in $CH_RUN_DIR/workers.pids" >&2; exit 1; }
kill -TERM "$pid"
timeout 60 tail --pid="$pid" -f /dev/null \
    || { echo "smoke: exit-triggers did not stop within 60 s of SIGTERM" >&2; exit 1; }
if status=$("$chctl" status); then
    printf 'smoke: chctl status passed with exit-triggers stopped:\n%s\n' "$status" >&2
    exit 1
fi
grep -q "^  down  smoke-exit-triggers$" <<<"$status" \
    || { printf 'smoke: chctl status did not name the stopped worker:\n%s\n' "$status" >&2; exit 1; }
status=$("$chctl" status --skip exit-triggers,cmd-market) \
    || { printf 'smoke: chctl status --skip failed:\n%s\n' "$status" >&2; exit 1; }
grep -q "^  skip  smoke-cmd-market$" <<<"$status" \
    || { printf 'smoke: chctl status --skip did not say what it skipped:\n%s\n' "$status" >&2; exit 1; }
echo "smoke: chctl status fails on a stopped worker, and passes with it skipped"

# A worker stopped while it still waits for NATS (a pod deleted during its start) ends at once
# and cleanly: its SIGTERM handler is there before it logs `starting`. Its text log, into a
# pipe, has no colour codes (NO_COLOR unset, as under systemd or in a container).
CH_SMOKE_BIN=$bin .venv/bin/python - <<'PY'
import os, signal, subprocess, sys
env = dict(os.environ, CH_NATS_URL="nats://127.0.0.1:1", RUST_LOG="info", CH_LOG_FORMAT="text")
env.pop("NO_COLOR", None)
p = subprocess.Popen([os.environ["CH_SMOKE_BIN"] + "/cmd-market"], env=env, stdout=subprocess.PIPE, text=True)
for line in p.stdout:
    if "\x1b" in line:
        p.kill()
        sys.exit(f"smoke: a worker's text log into a pipe has colour codes: {line!r}")
    if "starting" in line:
        break
p.send_signal(signal.SIGTERM)
try:
    rest, _ = p.communicate(timeout=30)
except subprocess.TimeoutExpired:
    p.kill()
    sys.exit("smoke: cmd-market did not stop within 30 s of SIGTERM during its start")
code = p.returncode
if code != 0 or "stopped before it had started" not in rest:
    sys.exit(f"smoke: cmd-market stopped during its start exited {code}:\n{rest}")
PY
echo "smoke: a worker stopped while it waits for NATS exits 0 at once"

# `chctl down` reads no configuration: a `CH_*` variable set wrong since `up` does not keep
# the workers running.
out=$(CH_SYNC=Batch "$chctl" down) \
    || { printf 'smoke: chctl down with CH_SYNC=Batch failed:\n%s\n' "$out" >&2; exit 1; }
grep -q "^stopping [0-9]* worker(s)" <<<"$out" && [[ ! -e $CH_RUN_DIR/workers.pids ]] \
    || { printf 'smoke: chctl down with CH_SYNC=Batch stopped nothing:\n%s\n' "$out" >&2; exit 1; }
echo "smoke: chctl down stops the workers whatever the other CH_* variables say"
