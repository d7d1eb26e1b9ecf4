#!/bin/sh
# doppel failover script: start a virtual machine from its replicated disk images.
#
#   failover = ["/etc/doppel/failover/start-vm.sh"]
#
# The job's replica ($DOPPEL_REPLICA) holds the VM's disk images and its libvirt domain XML
# (dumped on the source with `virsh dumpxml NAME > /var/lib/libvirt/images/NAME.xml`, so it
# is replicated with the images). Disk paths in the XML that point under the source's image
# directory are rewritten to the replica. Without libvirt (VM_BACKEND=qemu), QEMU is started
# directly, daemonized, on the first image.
#
# Settings (environment, or edit here):
#   VM_NAME      domain name [default: the job name]
#   SOURCE_DIR   where the images live on the source [default: /var/lib/libvirt/images]
#   VM_BACKEND   libvirt or qemu [default: libvirt if virsh exists]
#   QEMU_ARGS    extra QEMU arguments for the qemu backend [default: -m 2048 -smp 2]
set -eu

: "${DOPPEL_REPLICA:?run by doppel failover (DOPPEL_REPLICA is not set)}"
VM_NAME=${VM_NAME:-$DOPPEL_JOB}
SOURCE_DIR=${SOURCE_DIR:-/var/lib/libvirt/images}
if [ -z "${VM_BACKEND:-}" ]; then
    if command -v virsh >/dev/null 2>&1; then VM_BACKEND=libvirt; else VM_BACKEND=qemu; fi
fi

case "$VM_BACKEND" in
libvirt)
    if virsh domstate "$VM_NAME" 2>/dev/null | grep -q running; then
        echo "VM $VM_NAME is already running"   # a rerun of the failover: nothing to do
        exit 0
    fi
    xml="$DOPPEL_REPLICA/$VM_NAME.xml"
    [ -f "$xml" ] || { echo "no domain XML at $xml" >&2; exit 1; }
    tmp=$(mktemp)
    trap 'rm -f "$tmp"' EXIT
    # Point the disks at the replica.
    sed "s#$SOURCE_DIR#$DOPPEL_REPLICA#g" "$xml" > "$tmp"
    virsh define "$tmp"
    virsh start "$VM_NAME"
    ;;
qemu)
    pidfile="/run/doppel-vm-$VM_NAME.pid"
    if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        echo "VM $VM_NAME is already running"
        exit 0
    fi
    image=$(find "$DOPPEL_REPLICA" -maxdepth 1 -type f \( -name '*.qcow2' -o -name '*.img' -o -name '*.raw' \) | sort | head -n 1)
    [ -n "$image" ] || { echo "no disk image in $DOPPEL_REPLICA" >&2; exit 1; }
    case "$image" in *.qcow2) fmt=qcow2 ;; *) fmt=raw ;; esac
    # shellcheck disable=SC2086
    qemu-system-x86_64 -name "$VM_NAME" -enable-kvm ${QEMU_ARGS:--m 2048 -smp 2} \
        -drive "file=$image,format=$fmt,if=virtio,cache=none" \
        -display none -daemonize -pidfile "$pidfile"
    ;;
*)
    echo "VM_BACKEND must be libvirt or qemu" >&2
    exit 2
    ;;
esac
echo "VM $VM_NAME started from $DOPPEL_REPLICA (epoch $DOPPEL_EPOCH)"
