#!/usr/bin/env bash
# Makes sure a PostgreSQL answers at the host and port of CH_DATABASE_URL (default
# postgres://postgres@127.0.0.1:5432/cipherhorizon). If none does and it is this machine, start
# the local Debian cluster (pg_ctlcluster) and wait for it.
set -euo pipefail

url=${CH_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/cipherhorizon}

if [[ $url == *://* ]]; then
    # postgres://user:pass@host:port/db?opts -> host, port
    rest=${url#*://}
    rest=${rest%%/*}
    rest=${rest%%\?*}
    rest=${rest##*@}
    if [[ $rest == \[* ]]; then            # [::1]:5432
        host=${rest%%]*}; host=${host#[}
        port=${rest##*]}; port=${port#:}
    else
        host=${rest%%:*}
        port=${rest#"$host"}; port=${port#:}
    fi
else
    # A key/value string, as libpq takes: host=... port=... (spaces around `=` and single
    # quotes allowed; hostaddr before host; a host may be a socket directory)
    kv=$(sed -e "s/[[:space:]]*=[[:space:]]*/=/g" <<<"$url")
    kv() { sed -n "s/^\(.*[[:space:]]\)\{0,1\}$1='\{0,1\}\([^[:space:]']*\).*/\2/p" <<<"$kv"; }
    host=$(kv hostaddr)
    host=${host:-$(kv host)}
    port=$(kv port)
fi
host=${host:-127.0.0.1}
port=${port:-5432}

ready() { pg_isready -q -h "$host" -p "$port" -t 2 >/dev/null 2>&1; }

fail() {
    echo "pg.sh: no PostgreSQL answers at $host:$port." >&2
    echo "  Start one there, or set CH_DATABASE_URL to a reachable server," >&2
    echo "  e.g. CH_DATABASE_URL=postgres://postgres@127.0.0.1:5432/cipherhorizon" >&2
    exit 1
}

command -v pg_isready >/dev/null || { echo "pg.sh: pg_isready not found (install postgresql-client)" >&2; fail; }

if ready; then
    echo "PostgreSQL is up at $host:$port"
    exit 0
fi

case $host in
    127.0.0.1|localhost|::1|/*) ;;
    *) fail ;;
esac

if command -v pg_ctlcluster >/dev/null && [[ -d /etc/postgresql ]]; then
    for version in $(ls /etc/postgresql); do
        echo "starting the local PostgreSQL $version cluster 'main'"
        pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    done
    for _ in $(seq 60); do
        if ready; then
            echo "PostgreSQL is up at $host:$port"
            exit 0
        fi
        sleep 0.25
    done
fi
fail
