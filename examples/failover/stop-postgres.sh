#!/bin/sh
# doppel stop_workload script: stop the failed-over PostgreSQL cleanly before failback.
#
#   stop_workload = ["PG_DATA=/srv/pg-failover/main /etc/doppel/failover/stop-postgres.sh"]
#
# A fast shutdown checkpoints, so the data directory sent home needs no recovery there. Then
# the replica's mount on PG_DATA (see start-postgres.sh) is taken away: PG_USER no longer
# reaches the replica. Settings as for start-postgres.sh: PG_DATA (required), PG_USER,
# PG_BIN, ONLY_JOB.
set -eu

me=${0##*/}
die() {
    echo "$me: $*" >&2
    exit 1
}

: "${DOPPEL_REPLICA:?run by doppel failback (DOPPEL_REPLICA is not set)}"
: "${DOPPEL_JOB:?run by doppel failback (DOPPEL_JOB is not set)}"
if [ -n "${ONLY_JOB:-}" ] && [ "$ONLY_JOB" != "$DOPPEL_JOB" ]; then
    echo "job $DOPPEL_JOB: not $ONLY_JOB, nothing to do"
    exit 0
fi
[ -n "${PG_DATA:-}" ] || die "set PG_DATA as for start-postgres.sh in the stop_workload command"
case $PG_DATA in
/*) ;;
*) die "PG_DATA \"$PG_DATA\" is not an absolute path" ;;
esac
case $PG_DATA in
*[!A-Za-z0-9._/+@:-]*) die "PG_DATA \"$PG_DATA\" has characters other than letters, digits and . _ / + @ : -" ;;
esac
PG_DATA=${PG_DATA%/}
PG_USER=${PG_USER:-postgres}
case $PG_USER in
'' | -* | *[!A-Za-z0-9._-]*) die "PG_USER \"$PG_USER\" is not a user name" ;;
esac
if [ -z "${PG_BIN:-}" ]; then
    PG_BIN=$(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
fi
[ -x "$PG_BIN/pg_ctl" ] || die "pg_ctl not found in $PG_BIN (set PG_BIN)"
if runuser -u "$PG_USER" -- "$PG_BIN/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1; then
    runuser -u "$PG_USER" -- "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w -t 300 stop
fi
if mountpoint -q "$PG_DATA" && [ "$(stat -c %d:%i "$PG_DATA")" = "$(stat -c %d:%i "$DOPPEL_REPLICA")" ]; then
    umount "$PG_DATA"
fi
echo "PostgreSQL on $PG_DATA stopped"
