#!/usr/bin/env bash
# Makes sure a PostgreSQL answers at CH_DATABASE_URL (default
# postgres://postgres@127.0.0.1:5432/cipherhorizon). If none does and it is this machine, start
# the local Debian cluster (pg_ctlcluster) and wait for it. Whether one answers, libpq itself
# tells (pg_isready reads the URL or key/value string as the workers' driver does); the host
# and port read below only decide whether the server is this machine's, and name it.
set -euo pipefail

url=${CH_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/cipherhorizon}

if [[ $url == *://* ]]; then
    # postgres://user:pass@host:port,host2:port2/db?host=...&port=... -> the first host, port
    rest=${url#*://}
    query=
    [[ $rest == *\?* ]] && query="&${rest#*\?}"
    rest=${rest%%/*}
    rest=${rest%%\?*}
    rest=${rest##*@}
    [[ $rest == *,* ]] && several=yes
    rest=${rest%%,*}
    if [[ $rest == \[* ]]; then            # [::1]:5432
        at_host=${rest%%]*}; at_host=${at_host#[}
        at_port=${rest##*]}; at_port=${at_port#:}
    else
        at_host=${rest%%:*}
        at_port=${rest#"$at_host"}; at_port=${at_port#:}
    fi
    # Query parameters win, as in libpq (hostaddr before host); a socket directory may be
    # percent-encoded.
    param() { sed -n "s/.*&$1=\([^&,]*\).*/\1/p" <<<"$query"; }
    host=$(param hostaddr)
    host=${host:-$(param host)}
    host=${host:-$at_host}
    host=${host//%2[Ff]//}
    port=$(param port)
    port=${port:-$at_port}
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
where="$host:$port"
[[ ${several:-} ]] && where="$where or another host of CH_DATABASE_URL's list"

ready() { pg_isready -q -d "$url" -t 2 >/dev/null 2>&1; }

fail() {
    echo "pg.sh: no PostgreSQL answers at $where." >&2
    echo "  Start one there, or set CH_DATABASE_URL to a reachable server," >&2
    echo "  e.g. CH_DATABASE_URL=postgres://postgres@127.0.0.1:5432/cipherhorizon" >&2
    exit 1
}

command -v pg_isready >/dev/null || { echo "pg.sh: pg_isready not found (install postgresql-client)" >&2; fail; }

if ready; then
    echo "PostgreSQL is up at $where"
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
            echo "PostgreSQL is up at $where"
            exit 0
        fi
        sleep 0.25
    done
fi
fail
