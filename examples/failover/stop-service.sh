#!/bin/sh
# doppel stop_workload script: stop the systemd service started by start-service.sh.
#
#   stop_workload = ["SERVICE=myapp.service /etc/doppel/failover/stop-service.sh"]
set -eu

: "${DOPPEL_JOB:?run by doppel failback (DOPPEL_JOB is not set)}"
SERVICE=${SERVICE:-$DOPPEL_JOB.service}
systemctl stop "$SERVICE"
rm -f "/run/systemd/system/$SERVICE.d/doppel-failover.conf"
systemctl daemon-reload
echo "$SERVICE stopped"
