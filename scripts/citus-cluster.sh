#!/usr/bin/env bash
# Starts or stops a throwaway Citus cluster on this machine: a coordinator on PORT and worker nodes
# on PORT+1 and PORT+2 (CITUS_WORKERS=1: PORT+1 only), each a scripts/cluster.sh cluster with Citus and pg_email
# preloaded and pg_email.database = DB. The coordinator gets the Citus extension and its
# worker nodes; pg_email itself is left to the caller (CREATE EXTENSION on the coordinator, then
# SELECT email.distribute()).
#   scripts/citus-cluster.sh start DIR PORT DB [extra postgresql.conf lines...]
#   scripts/citus-cluster.sh stop DIR
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cmd=$1; dir=$2
psql_at() { runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$1" -d "$2" -c "$3" >/dev/null; }
case "$cmd" in
start)
    port=$3; db=$4; shift 4
    workers=${CITUS_WORKERS:-2}
    mkdir -p "$dir"
    for i in $(seq 0 "$workers"); do
        bash "$here/cluster.sh" start "$dir/n$i" $((port + i)) "$db" \
            "shared_preload_libraries = 'citus,pg_email'" "max_prepared_transactions = 100" \
            "citus.log_remote_commands = off" "$@"
        psql_at $((port + i)) "$db" "CREATE EXTENSION citus"
    done
    psql_at "$port" "$db" "SELECT citus_set_coordinator_host('127.0.0.1', $port)"
    for i in $(seq 1 "$workers"); do
        psql_at "$port" "$db" "SELECT citus_add_node('127.0.0.1', $((port + i)))"
    done
    ;;
stop)
    for n in "$dir"/n*; do
        if [ -d "$n" ]; then bash "$here/cluster.sh" stop "$n"; fi
    done
    ;;
*) echo "usage: $0 start DIR PORT DB [conf...] | stop DIR" >&2; exit 2 ;;
esac
