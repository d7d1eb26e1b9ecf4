#!/bin/sh
# doppel stop_workload script: stop the systemd service started by start-service.sh.
#
#   stop_workload = ["SERVICE=myapp.service /etc/doppel/failover/stop-service.sh"]
#
# Settings as for start-service.sh: SERVICE (required), ONLY_JOB, RUN_DIR.
set -eu

me=${0##*/}
die() {
    echo "$me: $*" >&2
    exit 1
}

: "${DOPPEL_JOB:?run by doppel failback (DOPPEL_JOB is not set)}"
if [ -n "${ONLY_JOB:-}" ] && [ "$ONLY_JOB" != "$DOPPEL_JOB" ]; then
    echo "job $DOPPEL_JOB: not $ONLY_JOB, nothing to do"
    exit 0
fi
[ -n "${SERVICE:-}" ] ||
    die "set SERVICE, the unit to stop, in the stop_workload command; it is never taken from the job's name, which the source chooses"
case $SERVICE in
-* | .* | *[!A-Za-z0-9:_.@-]*) die "SERVICE \"$SERVICE\" is not a unit name" ;;
?*.service) ;;
*) die "SERVICE \"$SERVICE\" must name a service unit (NAME.service)" ;;
esac
RUN_DIR=${RUN_DIR:-/run}
case $RUN_DIR in /*) ;; *) die "RUN_DIR must be an absolute path" ;; esac

systemctl stop "$SERVICE"
rm -f "$RUN_DIR/systemd/system/$SERVICE.d/doppel-failover.conf"
systemctl daemon-reload
echo "$SERVICE stopped"
