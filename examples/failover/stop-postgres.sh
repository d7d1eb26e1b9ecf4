#!/bin/sh
# doppel stop_workload script: stop the failed-over PostgreSQL cleanly before failback.
#
#   stop_workload = ["/etc/doppel/failover/stop-postgres.sh"]
#
# A fast shutdown checkpoints, so the data directory sent home needs no recovery there.
set -eu

: "${DOPPEL_REPLICA:?run by doppel failback (DOPPEL_REPLICA is not set)}"
PG_USER=${PG_USER:-postgres}
if [ -z "${PG_BIN:-}" ]; then
    PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
fi
if runuser -u "$PG_USER" -- "$PG_BIN/pg_ctl" -D "$DOPPEL_REPLICA" status >/dev/null 2>&1; then
    runuser -u "$PG_USER" -- "$PG_BIN/pg_ctl" -D "$DOPPEL_REPLICA" -m fast -w -t 300 stop
fi
echo "PostgreSQL on $DOPPEL_REPLICA stopped"
