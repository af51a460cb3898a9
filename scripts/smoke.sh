#!/usr/bin/env bash
# Starts every worker binary with `chctl up --detach` on a prefix of its own, runs the nats-py
# API smoke test (tests/python/api_smoke.py) against them, and stops them again.
#   scripts/smoke.sh NATS_URL DATABASE_URL
set -euo pipefail
cd "$(dirname "$0")/.."

export CH_NATS_URL=$1 CH_DATABASE_URL=$2
export CH_SUBJECT_PREFIX=smoke CH_DB_SCHEMA=smoke
export CH_RUN_DIR=$(mktemp -d "${TMPDIR:-/tmp}/ch-smoke.XXXXXX")
stop() {
    target/debug/chctl down >/dev/null 2>&1 || true
    rm -rf "$CH_RUN_DIR"
}
trap stop EXIT

target/debug/chctl up --detach --bin-dir target/debug >/dev/null
.venv/bin/python tests/python/api_smoke.py
