#!/usr/bin/env bash
# `make bench`: the trade-flow benchmark (issue 3) on a stack this script starts itself.
#
# Builds the release binaries once, then for each JetStream fsync setting (BENCH_FSYNC,
# default "default always": the server's default sync_interval, and `sync_interval: always` as
# in nats/nats-server.conf), each signal rate (BENCH_RATES, default "max": closed-loop clients
# as fast as the replies come; a number paces the signal clients to that many commands/s in
# all and the query clients to a quarter of it), BENCH_REPEAT times (default 1), each read-side
# mode (BENCH_SYNC_MODES, default "eventual") in turn:
#   a fresh pinned nats-server (port 14422, monitor 18422, a fresh store), fresh Postgres
#   schemas (bench, bench_mono), the release workers (`chctl up --detach`, CH_SUBJECT_PREFIX=bench,
#   own CH_RUN_DIR), `chctl bench trade-flow $BENCH_ARGS`, then everything stopped again.
# Results: bench/results/<UTC timestamp>-<fsync>[-<rate>]-<mode>[-<repetition>].json and
# bench/results/latest.json; with more than one run per fsync setting, `chctl bench compare` of
# them at the end.
#
#   make bench                                   default size (100,000 signals)
#   make bench BENCH_ARGS=--quick                smoke size
#   make bench BENCH_SYNC_MODES="eventual batch adaptive immediate"   (the monolithic baseline
#                                                runs with the first mode of the first fsync
#                                                setting of each rate; the first mode of the
#                                                other settings reports it with --baseline-from)
#   make bench-modes                             eventual, batch, adaptive at three loads
#   BENCH_FSYNC=always make bench                only one fsync setting
#
# Honours CH_DATABASE_URL (default postgres://postgres@127.0.0.1:5432/cipherhorizon) and
# BENCH_NATS_PORT (default 14422; its monitoring port is 4000 above it). To run
# against your own deployment instead, call `chctl bench trade-flow` directly with CH_NATS_URL
# and CH_SUBJECT_PREFIX set.
set -euo pipefail
cd "$(dirname "$0")/.."

port=${BENCH_NATS_PORT:-14422}
http=$((port + 4000))
modes=${BENCH_SYNC_MODES:-eventual}
rates=${BENCH_RATES:-max}
repeat=${BENCH_REPEAT:-1}
fsyncs=${BENCH_FSYNC:-default always}
read -r -a bench_args <<<"${BENCH_ARGS:-}"

export CH_DATABASE_URL=${CH_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/cipherhorizon}
export CH_NATS_URL=nats://127.0.0.1:$port
export CH_SUBJECT_PREFIX=bench CH_DB_SCHEMA=bench
unset CH_BATCH_MAX CH_BATCH_WAIT_MS CH_REPLAY_BATCH_MAX

scripts/venv.sh
scripts/pg.sh
echo "building the release binaries"
cargo build --release --workspace --bins
bin=$(scripts/target-dir.sh)/release

store= run_dir= keep_logs=
cleanup() {
    if [[ -n $run_dir ]]; then
        CH_RUN_DIR=$run_dir "$bin/chctl" down >/dev/null 2>&1 || true
        # A failed run keeps its worker logs for a look.
        if [[ -n $keep_logs ]]; then
            echo "bench.sh: the workers' logs are kept in $run_dir/logs" >&2
        else
            rm -rf "$run_dir"
        fi
    fi
    scripts/nats.sh stop "$port" >/dev/null 2>&1 || true
    [[ -z $store ]] || rm -rf "$store"
    store= run_dir=
}
trap cleanup EXIT

# The fsync setting as the running server reports it on its monitoring port (clients are not
# told), so that the report's `jetstream_sync_interval` is read, not assumed: `always`,
# `default` (the 2-minute interval) or the interval, e.g. `10s`.
server_fsync() {
    .venv/bin/python - "$http" <<'PY'
import json, sys, urllib.request
with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/varz", timeout=5) as r:
    js = json.load(r)["jetstream"]["config"]
interval = js.get("sync_interval", 0) / 1e9
print("always" if js.get("sync_always") else "default" if interval == 120 else f"{interval:g}s")
PY
}

fresh_schemas() {
    # The database may not exist yet (`chctl up` creates it): then there is nothing to drop.
    if psql -q "$CH_DATABASE_URL" -c 'SELECT 1' >/dev/null 2>&1; then
        PGOPTIONS='-c client_min_messages=warning' psql -q -v ON_ERROR_STOP=1 "$CH_DATABASE_URL" \
            -c "DROP SCHEMA IF EXISTS $CH_DB_SCHEMA CASCADE" \
            -c "DROP SCHEMA IF EXISTS ${CH_DB_SCHEMA}_mono CASCADE" >/dev/null
    fi
}

if [[ ! $repeat =~ ^[1-9][0-9]*$ ]]; then
    echo "bench.sh: BENCH_REPEAT: '$repeat' is not a positive number" >&2
    exit 2
fi
for rate in $rates; do
    if [[ $rate != max && ! $rate =~ ^[1-9][0-9]*$ ]]; then
        echo "bench.sh: BENCH_RATES: '$rate' is neither a positive number nor max" >&2
        exit 2
    fi
done

started=$(date +%s)
written=()
# Per signal rate: the result file of the run that ran the monolith.
declare -A monolith_file=()
for fsync in $fsyncs; do
    case $fsync in
        default) conf=none label="default" ;;
        always) conf=nats/nats-server.conf label="always" ;;
        *) echo "bench.sh: BENCH_FSYNC: unknown setting '$fsync' (default, always)" >&2; exit 2 ;;
    esac
    for rate in $rates; do
        case $rate in
            max) rate_args=() rate_tag= rate_label="closed loop" ;;
            *) rate_args=(--rate "$rate" --query-rate $(( (rate + 3) / 4 )))
               rate_tag=-$rate rate_label="$rate/s" ;;
        esac
        first=1
        for ((rep = 1; rep <= repeat; rep++)); do
            for mode in $modes; do
                # The monolith depends neither on CH_SYNC nor on JetStream's fsync: it runs
                # beside the first mode of the first fsync setting of each rate, once; that
                # run's file gives its figures to the first mode of the other fsync settings
                # (unless BENCH_ARGS says otherwise).
                extra=()
                if [[ " ${bench_args[*]} " != *" --baseline"* ]]; then
                    if [[ -z $first ]]; then
                        extra=(--baseline none)
                    elif [[ -n ${monolith_file[$rate]:-} ]]; then
                        extra=(--baseline-from "${monolith_file[$rate]}")
                    fi
                fi
                first=
                tag=$label$rate_tag-$mode
                (( repeat == 1 )) || tag+=-$rep
                echo
                echo "=== JetStream sync_interval: $label; CH_SYNC=$mode; signals: $rate_label; run $rep of $repeat"
                cleanup
                store=$(mktemp -d "${TMPDIR:-/tmp}/ch-bench-nats.XXXXXX")
                run_dir=$(mktemp -d "${TMPDIR:-/tmp}/ch-bench-run.XXXXXX")
                scripts/nats.sh stop "$port" >/dev/null 2>&1 || true
                CH_NATS_CONF=$conf CH_NATS_NAME=ch-bench scripts/nats.sh start "$port" "$store" "$http"
                served=$(server_fsync)
                if [[ $served != "$label" ]]; then
                    echo "bench.sh: nats-server reports sync_interval '$served', not '$label'" >&2
                    exit 1
                fi
                fresh_schemas
                export CH_SYNC=$mode CH_RUN_DIR=$run_dir
                "$bin/chctl" up --detach --bin-dir "$bin" >"$run_dir/up.log" 2>&1 \
                    || { cat "$run_dir/up.log" >&2; keep_logs=1; exit 1; }
                echo "workers up (logs in $run_dir/logs)"
                rc=0
                "$bin/chctl" bench trade-flow --sync-interval-label "$served" --tag "$tag" \
                    "${extra[@]}" "${rate_args[@]}" "${bench_args[@]}" || rc=$?
                if [[ $rc != 0 ]]; then
                    echo "bench.sh: the benchmark failed (exit $rc); worker logs:" >&2
                    tail -n 5 "$run_dir"/logs/*.log >&2 || true
                    keep_logs=1
                    exit "$rc"
                fi
                written+=("$(ls -t bench/results/*-"$tag".json | head -n 1)")
                if [[ -z ${monolith_file[$rate]:-} && ${#extra[@]} == 0 ]]; then
                    monolith_file[$rate]=${written[-1]}
                fi
            done
        done
    done
done
cleanup
echo
echo "bench.sh: $(( $(date +%s) - started )) s after the build; results:"
printf '  %s\n' "${written[@]}"
# Side by side when a setting ran more than once (several modes, rates or repetitions).
read -r -a fsync_list <<<"$fsyncs"
if (( ${#written[@]} > ${#fsync_list[@]} )); then
    "$bin/chctl" bench compare "${written[@]}"
fi
