#!/bin/sh
# doppel stop_workload script: shut the failed-over VM down before failback hands it back.
#
#   stop_workload = ["/etc/doppel/failover/stop-vm.sh"]
#
# Asks the guest to shut down (ACPI), waits up to SHUTDOWN_SECS, then pulls the plug. The
# disk images are final once this returns: the failback's last sync sends them home.
set -eu

: "${DOPPEL_JOB:?run by doppel failback (DOPPEL_JOB is not set)}"
VM_NAME=${VM_NAME:-$DOPPEL_JOB}
SHUTDOWN_SECS=${SHUTDOWN_SECS:-120}
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
    # The domain is defined again from the replicated XML at the next failover.
    virsh undefine "$VM_NAME" >/dev/null 2>&1 || true
    ;;
qemu)
    pidfile="/run/doppel-vm-$VM_NAME.pid"
    if [ -f "$pidfile" ] && pid=$(cat "$pidfile") && kill -0 "$pid" 2>/dev/null; then
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
esac
echo "VM $VM_NAME stopped"
