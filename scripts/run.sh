#!/usr/bin/env bash
# `make run` / `make up`: everything it takes to run CipherHorizon locally, then `chctl up`.
#
#   scripts/run.sh            foreground: Ctrl-C stops the workers and the nats-server it started
#   scripts/run.sh --detach   returns once every service answers (`make down` stops it all)
#
# Honours CH_NATS_URL (then no nats-server is started), CH_DATABASE_URL, CH_SUBJECT_PREFIX
# (with its own read-model schema, CH_DB_SCHEMA, named after it unless set).
set -euo pipefail
cd "$(dirname "$0")/.."

detach=
[[ ${1:-} == --detach ]] && detach=--detach

# One read-model schema per subject prefix (two prefixes must not share checkpoints).
if [[ -n ${CH_SUBJECT_PREFIX:-} && ${CH_SUBJECT_PREFIX} != ch && -z ${CH_DB_SCHEMA:-} ]]; then
    # Lower case: the schema goes into search_path unquoted, where Postgres folds it.
    schema=${CH_SUBJECT_PREFIX//-/_}
    export CH_DB_SCHEMA=${schema,,}
    echo "CH_SUBJECT_PREFIX=$CH_SUBJECT_PREFIX: read models in schema CH_DB_SCHEMA=$CH_DB_SCHEMA"
fi

scripts/venv.sh
scripts/pg.sh
cargo build --workspace --bins
chctl=$(scripts/target-dir.sh)/debug/chctl

# Empty is unset (the workers refuse an empty CH_NATS_URL).
[[ ${CH_NATS_URL:-} =~ [^[:space:]] ]] || unset CH_NATS_URL

started_nats=
stop_nats() {
    if [[ -n $started_nats ]]; then
        scripts/nats.sh stop || true
    fi
}

if [[ -z ${CH_NATS_URL:-} ]]; then
    if ! scripts/nats.sh status >/dev/null 2>&1; then
        started_nats=1
    fi
    trap stop_nats EXIT
    scripts/nats.sh start
else
    # Without its credentials (a user's, or a token).
    echo "using the NATS server at CH_NATS_URL=$(sed -E 's#(^|,)( *)([A-Za-z]+://)?[^,]*@#\1\2\3***@#g' <<<"$CH_NATS_URL")"
fi

if [[ -n $detach ]]; then
    # Keep the server if the workers came up and the demo loaded: `make down` stops both (the
    # server only if started here: a marker says so). Otherwise chctl has stopped the workers
    # it started (not those of an earlier `make up` still running: it refuses to start then).
    rc=0
    "$chctl" up --detach --demo || rc=$?
    if [[ $rc == 0 ]]; then
        [[ -z $started_nats ]] || : >.run/nats-started-by-up
        started_nats=
    else
        exit "$rc"
    fi
else
    # The foreground job gets the terminal's Ctrl-C; chctl drains its workers and returns,
    # then the trap stops the nats-server started here.
    rc=0
    "$chctl" up --demo || rc=$?
    exit "$rc"
fi
