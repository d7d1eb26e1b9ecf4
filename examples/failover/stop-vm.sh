#!/bin/sh
# doppel stop_workload script: shut the failed-over VM down before failback hands it back.
#
#   stop_workload = ["VM_NAME=web1 /etc/doppel/failover/stop-vm.sh"]
#
# libvirt: asks the guest to shut down (ACPI), waits up to SHUTDOWN_SECS, then pulls the plug.
# qemu (started by start-vm.sh): stops QEMU with SIGTERM, which writes out what QEMU holds and
# exits without asking the guest, as a power cut would (the guest's journaling file systems
# and its applications' fsyncs carry it, as they did at the failover); SIGKILL after
# SHUTDOWN_SECS. The disk images are final once this returns: the failback's last sync sends
# them home.
# Settings as for start-vm.sh: VM_NAME (required: the job's name, which the source chooses,
# could name another VM of this host), VM_BACKEND, ONLY_JOB, RUN_DIR; and SHUTDOWN_SECS
# [default: 120].
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
[ -n "${VM_NAME:-}" ] ||
    die "set VM_NAME, the VM's name on this machine, in the stop_workload command; it is never taken from the job's name, which the source chooses"
case $VM_NAME in
'' | -* | .* | *[!A-Za-z0-9._-]*)
    die "VM_NAME \"$VM_NAME\" is not a plain name (letters, digits, '.', '_', '-'; not starting with '-' or '.')" ;;
esac
SHUTDOWN_SECS=${SHUTDOWN_SECS:-120}
case $SHUTDOWN_SECS in '' | *[!0-9]*) die "SHUTDOWN_SECS must be a number of seconds" ;; esac
RUN_DIR=${RUN_DIR:-/run}
if [ -z "${VM_BACKEND:-}" ]; then
    if command -v virsh >/dev/null 2>&1; then VM_BACKEND=libvirt; else VM_BACKEND=qemu; fi
fi

case "$VM_BACKEND" in
libvirt)
    if virsh domstate "$VM_NAME" 2>/dev/null | grep -q running; then
        virsh shutdown "$VM_NAME"
        i=0
        while virsh domstate "$VM_NAME" 2>/dev/null | grep -q running; do
            i=$((i + 1))
            if [ "$i" -ge "$SHUTDOWN_SECS" ]; then virsh destroy "$VM_NAME"; break; fi
            sleep 1
        done
    fi
    # start-vm.sh defines it again from VM_XML at the next failover.
    virsh undefine "$VM_NAME" >/dev/null 2>&1 || true
    ;;
qemu)
    pidfile="$RUN_DIR/doppel-vm-$VM_NAME.pid"
    # Only this VM's QEMU: a pid file left by a killed QEMU or before a reboot may name
    # another process by now.
    if [ -f "$pidfile" ] && pid=$(cat "$pidfile") && kill -0 "$pid" 2>/dev/null &&
        tr '\000' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "-name $VM_NAME "; then
        kill -TERM "$pid"
        i=0
        while kill -0 "$pid" 2>/dev/null; do
            i=$((i + 1))
            if [ "$i" -ge "$SHUTDOWN_SECS" ]; then kill -KILL "$pid"; break; fi
            sleep 1
        done
    fi
    rm -f "$pidfile"
    ;;
*)
    die "VM_BACKEND must be libvirt or qemu"
    ;;
esac
echo "VM $VM_NAME stopped"
