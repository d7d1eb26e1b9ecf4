#!/bin/sh
# doppel failover script: start a systemd service on the replica.
#
#   failover = ["SERVICE=myapp.service /etc/doppel/failover/start-service.sh"]
#
# The unit is installed on this machine beforehand (disabled). This script gives it the
# replica's location through a runtime drop-in (gone at reboot, like the failover itself is
# not permanent): the unit reads $DOPPEL_REPLICA, e.g.
#   ExecStart=/usr/bin/myapp --data ${DOPPEL_REPLICA}
# or uses it in a BindPaths= line to put the replica where the application expects its data:
#   BindPaths=${DOPPEL_REPLICA}:/var/lib/myapp   (in the drop-in: set BIND_TO=/var/lib/myapp)
set -eu

: "${DOPPEL_REPLICA:?run by doppel failover (DOPPEL_REPLICA is not set)}"
SERVICE=${SERVICE:-$DOPPEL_JOB.service}
dropin="/run/systemd/system/$SERVICE.d"
mkdir -p "$dropin"
{
    echo "[Service]"
    echo "Environment=DOPPEL_REPLICA=$DOPPEL_REPLICA DOPPEL_EPOCH=$DOPPEL_EPOCH"
    if [ -n "${BIND_TO:-}" ]; then echo "BindPaths=$DOPPEL_REPLICA:$BIND_TO"; fi
} > "$dropin/doppel-failover.conf"
systemctl daemon-reload
systemctl start "$SERVICE"
systemctl is-active --quiet "$SERVICE"
echo "$SERVICE started on $DOPPEL_REPLICA"
