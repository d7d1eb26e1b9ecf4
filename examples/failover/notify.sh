#!/bin/sh
# doppel notify command: tell people. Runs on source-failed, failover-done, failover-failed,
# failback-done and failback-failed, with DOPPEL_EVENT, DOPPEL_SOURCE and DOPPEL_DETAIL set.
#
#   notify = "MAILTO=ops@example.com /etc/doppel/failover/notify.sh"
#
# Logs to the journal (priority crit for failures) and mails MAILTO when a mailer exists.
# DOPPEL_DETAIL can carry text the source influenced (a failed script's last lines, which
# may quote file names of the replica): it is made one line of printable characters, at most
# 2000 bytes, so it can neither forge extra log lines nor put a line starting with `~` (a
# command escape for some mailers) into the mail. MAILTO comes from this machine's config.
set -u

me=${0##*/}
event=${DOPPEL_EVENT:-unknown}
source=${DOPPEL_SOURCE:-?}
detail=$(printf '%s' "${DOPPEL_DETAIL:-}" | tr '\n\r\t' '   ' | tr -d '\000-\037\177' | cut -c 1-2000)
msg="doppel: $event on $source: $detail"
case "$event" in
*failed*) prio=crit ;;
*) prio=notice ;;
esac
logger -t doppel -p "daemon.$prio" -- "$msg"
if [ -n "${MAILTO:-}" ]; then
    case $MAILTO in
    -* | *[!A-Za-z0-9._%+@,-]*)
        echo "$me: MAILTO \"$MAILTO\" is not a list of mail addresses; no mail sent" >&2
        exit 1
        ;;
    esac
    if command -v mail >/dev/null 2>&1; then
        printf '%s\n' "$msg" | mail -s "doppel: $event on $source" "$MAILTO"
    fi
fi
