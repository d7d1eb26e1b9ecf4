#!/bin/sh
# doppel notify command: tell people. Runs on source-failed, failover-done, failover-failed,
# failback-done and failback-failed, with DOPPEL_EVENT, DOPPEL_SOURCE and DOPPEL_DETAIL set.
#
#   notify = "/etc/doppel/failover/notify.sh"
#
# Logs to the journal (priority crit for failures) and mails MAILTO when a mailer exists.
set -u

event=${DOPPEL_EVENT:-unknown}
msg="doppel: $event on ${DOPPEL_SOURCE:-?}: ${DOPPEL_DETAIL:-}"
case "$event" in
*failed*) prio=crit ;;
*) prio=notice ;;
esac
logger -t doppel -p "daemon.$prio" "$msg"
if [ -n "${MAILTO:-}" ] && command -v mail >/dev/null 2>&1; then
    echo "$msg" | mail -s "doppel: $event on ${DOPPEL_SOURCE:-?}" "$MAILTO"
fi
