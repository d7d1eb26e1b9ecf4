#!/bin/sh
# doppel failover script: start a systemd service on the replica.
#
#   failover = ["SERVICE=myapp.service /etc/doppel/failover/start-service.sh"]
#
# The unit is installed on this machine beforehand (disabled), and SERVICE, in the failover
# command line of this machine's config, names it: it is required, never taken from the job's
# name, which the source chooses (a job named `emergency` must not start emergency.service).
# This script gives the unit the replica's location through a runtime drop-in (gone at
# reboot, like the failover itself is not permanent): the unit reads $DOPPEL_REPLICA, e.g.
#   ExecStart=/usr/bin/myapp --data ${DOPPEL_REPLICA}
# or uses it in a BindPaths= line to put the replica where the application expects its data:
#   BindPaths=${DOPPEL_REPLICA}:/var/lib/myapp   (in the drop-in: set BIND_TO=/var/lib/myapp)
# A service running as another user (User=) reaches the replica only through such a
# BindPaths= mount: the target's data directory stays root's alone (mode 0700).
#
# Settings:
#   SERVICE    the unit, NAME.service (required)
#   BIND_TO    bind the replica there in the unit's namespace [default: no binding]
#   ONLY_JOB   start the service for this job only, for a source with several jobs [default: any]
#   RUN_DIR    runtime directory; the drop-in goes in RUN_DIR/systemd/system [default: /run]
# Names and paths are limited to letters, digits and . _ / + @ : - (they go into a unit file).
set -eu

me=${0##*/}
die() {
    echo "$me: $*" >&2
    exit 1
}
safe_path() { # WHAT VALUE
    case $2 in
    /*) ;;
    *) die "$1 \"$2\" is not an absolute path" ;;
    esac
    case $2 in
    *[!A-Za-z0-9._/+@:-]*) die "$1 \"$2\" has characters other than letters, digits and . _ / + @ : -" ;;
    esac
}

: "${DOPPEL_REPLICA:?run by doppel failover (DOPPEL_REPLICA is not set)}"
: "${DOPPEL_JOB:?run by doppel failover (DOPPEL_JOB is not set)}"
if [ -n "${ONLY_JOB:-}" ] && [ "$ONLY_JOB" != "$DOPPEL_JOB" ]; then
    echo "job $DOPPEL_JOB: not $ONLY_JOB, nothing to do"
    exit 0
fi
[ -n "${SERVICE:-}" ] ||
    die "set SERVICE, the unit to start, in the failover command (failover = [\"SERVICE=myapp.service $0\"]); it is never taken from the job's name, which the source chooses"
case $SERVICE in
-* | .* | *[!A-Za-z0-9:_.@-]*) die "SERVICE \"$SERVICE\" is not a unit name" ;;
?*.service) ;;
*) die "SERVICE \"$SERVICE\" must name a service unit (NAME.service)" ;;
esac
safe_path DOPPEL_REPLICA "$DOPPEL_REPLICA"
case ${DOPPEL_EPOCH:-} in '' | *[!0-9]*) die "DOPPEL_EPOCH \"${DOPPEL_EPOCH:-}\" is not a number" ;; esac
if [ -n "${BIND_TO:-}" ]; then safe_path BIND_TO "$BIND_TO"; fi
RUN_DIR=${RUN_DIR:-/run}
safe_path RUN_DIR "$RUN_DIR"

dropin="$RUN_DIR/systemd/system/$SERVICE.d"
mkdir -p "$dropin"
{
    echo "[Service]"
    echo "Environment=DOPPEL_REPLICA=$DOPPEL_REPLICA DOPPEL_EPOCH=$DOPPEL_EPOCH"
    if [ -n "${BIND_TO:-}" ]; then echo "BindPaths=$DOPPEL_REPLICA:$BIND_TO"; fi
} >"$dropin/doppel-failover.conf"
systemctl daemon-reload
systemctl start "$SERVICE"
systemctl is-active --quiet "$SERVICE"
echo "$SERVICE started on $DOPPEL_REPLICA"
