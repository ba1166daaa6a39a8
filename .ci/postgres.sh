#!/usr/bin/env bash
# Start a throw-away PostgreSQL server for the run-store tests and print its admin URL.
#
#   export BCD_TEST_POSTGRES_URL=$(bash .ci/postgres.sh)
#
# Idempotent: installs Debian's postgresql if it is missing (needs root), creates a cluster under
# $BCD_PG_DIR (default /tmp/bcd-postgres) on 127.0.0.1:$BCD_PG_PORT (default 55432) unless it
# exists, starts it unless it runs, and makes sure the superuser role $BCD_PG_USER (password
# $BCD_PG_PASSWORD, both default "bcd") exists. The server runs as the "postgres" OS user when
# this script runs as root. Everything is logged to stderr; stdout gets exactly one line: the URL.
set -euo pipefail

PORT="${BCD_PG_PORT:-55432}"
BASE="${BCD_PG_DIR:-/tmp/bcd-postgres}"
ROLE="${BCD_PG_USER:-bcd}"
PASSWORD="${BCD_PG_PASSWORD:-bcd}"
DATA="$BASE/data"
SOCKETS="$BASE/sockets"

log() { echo "postgres.sh: $*" >&2; }

find_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

BIN="$(find_bin)"
if [[ -z "$BIN" || ! -x "$BIN/initdb" ]]; then
    if [[ "$(id -u)" != 0 ]]; then
        log "PostgreSQL is not installed and installing it needs root"
        exit 1
    fi
    log "installing postgresql with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq postgresql >&2
    BIN="$(find_bin)"
fi
log "using $BIN"

if [[ "$(id -u)" == 0 ]]; then
    as_pg() { runuser -u postgres -- "$@"; }
    mkdir -p "$BASE"
    chown postgres:postgres "$BASE"
else
    as_pg() { "$@"; }
    mkdir -p "$BASE"
fi
as_pg mkdir -p "$SOCKETS"
as_pg chmod 700 "$SOCKETS"

if [[ ! -f "$DATA/PG_VERSION" ]]; then
    log "creating a cluster in $DATA"
    as_pg "$BIN/initdb" -D "$DATA" -U postgres --auth-local=peer --auth-host=scram-sha-256 \
        --encoding=UTF8 --locale=C.UTF-8 >&2
fi

if as_pg "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
    log "server already running"
else
    log "starting the server on 127.0.0.1:$PORT"
    as_pg "$BIN/pg_ctl" -D "$DATA" -l "$BASE/server.log" -w -t 60 start \
        -o "-p $PORT -k $SOCKETS -c listen_addresses=127.0.0.1 -c max_connections=200" >&2 || {
        log "the server did not start; its log:"
        cat "$BASE/server.log" >&2 || true
        exit 1
    }
fi

log "ensuring superuser role $ROLE"
as_pg "$BIN/psql" -h "$SOCKETS" -p "$PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -qAt \
    -v role="$ROLE" -v password="$PASSWORD" >&2 <<'SQL'
SELECT format('CREATE ROLE %I', :'role')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'role') \gexec
SELECT format('ALTER ROLE %I LOGIN SUPERUSER PASSWORD %L', :'role', :'password') \gexec
SQL

echo "postgresql://$ROLE:$PASSWORD@127.0.0.1:$PORT/postgres"
