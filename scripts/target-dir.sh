#!/usr/bin/env bash
# Prints the directory cargo builds into, as cargo itself finds it (CARGO_TARGET_DIR,
# CARGO_BUILD_TARGET_DIR or build.target-dir in a cargo config; else ./target), so that the
# scripts run the binaries cargo just built rather than a stale or missing target/debug.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=$(cargo metadata --no-deps --format-version 1 | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
[[ -n $dir ]] || { echo "target-dir.sh: cargo metadata named no target directory" >&2; exit 1; }
echo "$dir"
