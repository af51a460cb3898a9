#!/usr/bin/env bash
# Starts every worker binary with `chctl up --detach` on a prefix of its own, runs the nats-py
# API smoke test (tests/python/api_smoke.py) against them, then `chctl rebuild all` with the
# projectors running, and stops them again.
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

# `chctl rebuild` while the projectors run: each replays the stream, and chctl follows it to
# the head it saw before the reset.
out=$(target/debug/chctl rebuild all --stall-timeout 30)
for p in portfolio strategy; do
    head=$(sed -n "s/^$p: rebuilding from \([0-9]*\) events$/\1/p" <<<"$out")
    reached=$(sed -n "s/^$p: rebuilt up to seq \([0-9]*\): .*/\1/p" <<<"$out")
    if ! grep -q "^$p: a running projector holds the lock" <<<"$out" \
        || [[ -z $head || -z $reached || $reached -lt $head ]]; then
        printf 'smoke: chctl rebuild %s did not follow its projector to the head:\n%s\n' "$p" "$out" >&2
        exit 1
    fi
done
echo "smoke: chctl rebuild all: both running projectors replayed to the head"
