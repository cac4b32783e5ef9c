#!/usr/bin/env bash
# Starts, restarts or stops a throwaway PostgreSQL 15 cluster, run as user postgres, with pg_email preloaded.
#   scripts/cluster.sh start DIR PORT DB [extra postgresql.conf lines...]
#   scripts/cluster.sh restart DIR [fast|immediate]   (immediate: a crash, then crash recovery)
#   scripts/cluster.sh stop DIR
set -euo pipefail
PGBIN=/usr/lib/postgresql/15/bin
cmd=$1; dir=$2
as_pg() { runuser -u postgres -- "$@"; }
case "$cmd" in
start)
    port=$3; db=$4; shift 4
    if [ -f "$dir/data/postmaster.pid" ]; then as_pg $PGBIN/pg_ctl -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true; fi
    rm -rf "$dir"; mkdir -p "$dir"; chown postgres:postgres "$dir"
    as_pg $PGBIN/initdb -D "$dir/data" -U postgres -A trust -E UTF8 --locale=C.UTF-8 >"$dir/initdb.log"
    {
        echo "port = $port"
        echo "listen_addresses = '127.0.0.1'"
        echo "unix_socket_directories = '$dir'"
        echo "shared_preload_libraries = 'pg_email'"
        echo "pg_email.database = '$db'"
        echo "max_connections = 200"
        echo "fsync = off"
        echo "log_line_prefix = '%m [%p] %q%u@%d '"
        for line in "$@"; do echo "$line"; done
    } >> "$dir/data/postgresql.conf"
    as_pg $PGBIN/pg_ctl -D "$dir/data" -l "$dir/server.log" -w -t 60 start >/dev/null
    as_pg $PGBIN/createdb -h 127.0.0.1 -p "$port" -U postgres "$db"
    ;;
restart)
    mode=${3:-fast}
    case "$mode" in fast|immediate) ;; *) echo "restart mode must be fast or immediate, not $mode" >&2; exit 2 ;; esac
    as_pg $PGBIN/pg_ctl -D "$dir/data" -m "$mode" -w -t 120 stop >/dev/null
    as_pg $PGBIN/pg_ctl -D "$dir/data" -l "$dir/server.log" -w -t 120 start >/dev/null
    ;;
stop)
    [ -f "$dir/data/postmaster.pid" ] && as_pg $PGBIN/pg_ctl -D "$dir/data" -m fast -w stop >/dev/null || true
    ;;
*) echo "usage: $0 start DIR PORT DB [conf...] | restart DIR [fast|immediate] | stop DIR" >&2; exit 2 ;;
esac
