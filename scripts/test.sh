#!/usr/bin/env bash
# Runs `cargo test --workspace [ARGS...]` against a nats-server of its own (port 14322 or
# CH_TEST_NATS_PORT, monitor 4000 above it, a fresh temporary store, the server's default fsync for speed) and a clean
# `ch_test` database (`ch_test_<port>` with another CH_TEST_NATS_PORT, so that two checkouts can
# test at once), exported as CH_TEST_NATS_URL and CH_TEST_DATABASE_URL; then, when the tests passed
# (ARGS narrowing them or not), builds the binaries and runs scripts/smoke.sh (the workers as
# processes under `chctl up`, the nats-py client, `chctl rebuild`, a small benchmark, `chctl status`).
set -euo pipefail
cd "$(dirname "$0")/.."

port=${CH_TEST_NATS_PORT:-14322}
http=$((port + 4000))
store=$(mktemp -d "${TMPDIR:-/tmp}/ch-test-nats.XXXXXX")

cleanup() {
    scripts/nats.sh stop "$port" >/dev/null || true
    rm -rf "$store"
}
trap cleanup EXIT

# A server left over from an interrupted run would keep its old store: start fresh.
scripts/nats.sh stop "$port" >/dev/null || true
CH_NATS_CONF=none CH_NATS_NAME=ch-test scripts/nats.sh start "$port" "$store" "$http"
export CH_TEST_NATS_URL=nats://127.0.0.1:$port

default_db=ch_test
[[ $port == 14322 ]] || default_db=ch_test_$port
export CH_TEST_DATABASE_URL=${CH_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/$default_db}
base=${CH_TEST_DATABASE_URL%%\?*}
db=${base##*/}
admin=${base%/*}/postgres
[[ $base == "$CH_TEST_DATABASE_URL" ]] || admin=$admin?${CH_TEST_DATABASE_URL#*\?}
quoted=\"${db//\"/\"\"}\"
psql -q -v ON_ERROR_STOP=1 "$admin" -c "DROP DATABASE IF EXISTS $quoted WITH (FORCE)" \
    || psql -q -v ON_ERROR_STOP=1 "$admin" -c "DROP DATABASE IF EXISTS $quoted"
psql -q -v ON_ERROR_STOP=1 "$admin" -c "CREATE DATABASE $quoted"
echo "test database $db recreated; NATS for tests at $CH_TEST_NATS_URL"

set +e
cargo test --workspace "$@"
rc=$?
set -e
[[ $rc == 0 ]] || exit "$rc"

# The worker binaries as processes, driven by a client the project did not write.
cargo build --workspace --bins
scripts/smoke.sh "$CH_TEST_NATS_URL" "$CH_TEST_DATABASE_URL"
