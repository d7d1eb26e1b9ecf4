#!/bin/sh
# doppel failover script: start a virtual machine from its replicated disk images.
#
#   failover = ["VM_NAME=web1 /etc/doppel/failover/start-vm.sh"]
#
# What runs is this machine's decision, never the source's: the replica is written by the
# source, and a source that is compromised (or another customer's) must not choose what this
# host attaches to a VM. So the domain's definition is a libvirt domain XML kept on this
# machine (VM_XML, e.g. `virsh dumpxml web1` on the source, copied here once and reviewed),
# and the name is VM_NAME from the failover command line, not the job's name. Only the disk
# images come from the replica, as data:
#   - every disk of VM_XML must be a file under SOURCE_DIR (where the images live on the
#     source); it is pointed at the same file in the replica;
#   - block devices, directories, network and volume disks, disks outside SOURCE_DIR, and
#     <filesystem> and <hostdev> elements are refused (a domain XML that attaches this host's
#     devices or directories is not one a failover defines);
#   - an image is refused unless it is a regular file inside the replica once every symlink
#     is resolved (the source can plant a symlink to /dev/sda or /etc/shadow), and the
#     resolved path is what libvirt or QEMU gets;
#   - a qcow2 image that names a backing file or an external data file is refused (the file
#     it names, chosen by the source, would be opened outside the replica); formats other
#     than raw and qcow2 (vmdk extents, vhdx parents, ...) are refused for the same reason.
# Nothing is run before every check has passed.
# Without libvirt (VM_BACKEND=qemu), QEMU is started directly, daemonized, on one image.
#
# Settings (in the failover command line of the target's config, or edit here):
#   VM_NAME      the VM's name on this machine (required)
#   VM_XML       its domain XML on this machine, whose <name> is VM_NAME
#                [default: /etc/doppel/vms/VM_NAME.xml]
#   SOURCE_DIR   where the images live on the source [default: /var/lib/libvirt/images]
#   VM_BACKEND   libvirt or qemu [default: libvirt if virsh exists]
#   VM_IMAGE     qemu backend: the image, relative to the replica [default: the only *.qcow2,
#                *.img or *.raw at the replica's top]
#   QEMU_ARGS    extra QEMU arguments for the qemu backend [default: -m 2048 -smp 2]
#   QEMU_ACCEL   qemu backend: kvm or tcg (QEMU's emulator: slow, but it runs anywhere)
#                [default: kvm if /dev/kvm opens for reading and writing, tcg otherwise; a
#                host whose /dev/kvm opens but runs no guest (a nested setup without
#                virtualization extensions) needs QEMU_ACCEL=tcg]
#   ONLY_JOB     start the VM for this job only, for a source with several jobs [default: any]
#   RUN_DIR      root-only directory for the pid file and the rewritten XML [default: /run]
# Paths and names are limited to letters, digits and . _ / + @ : - (no spaces, quotes or
# commas: they end up in XML, in QEMU's comma-separated options and in command lines).
set -eu
set -f

me=${0##*/}
die() {
    echo "$me: $*" >&2
    exit 1
}
safe_name() { # WHAT VALUE
    case $2 in
    '' | -* | .* | *[!A-Za-z0-9._-]*)
        die "$1 \"$2\" is not a plain name (letters, digits, '.', '_', '-'; not starting with '-' or '.')" ;;
    esac
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
[ -n "${VM_NAME:-}" ] ||
    die "set VM_NAME, the VM's name on this machine, in the failover command (failover = [\"VM_NAME=web1 $0\"]); it is never taken from the job's name, which the source chooses"
safe_name VM_NAME "$VM_NAME"
safe_path DOPPEL_REPLICA "$DOPPEL_REPLICA"
SOURCE_DIR=${SOURCE_DIR:-/var/lib/libvirt/images}
safe_path SOURCE_DIR "$SOURCE_DIR"
SOURCE_DIR=${SOURCE_DIR%/}
RUN_DIR=${RUN_DIR:-/run}
safe_path RUN_DIR "$RUN_DIR"
if [ -z "${VM_BACKEND:-}" ]; then
    if command -v virsh >/dev/null 2>&1; then VM_BACKEND=libvirt; else VM_BACKEND=qemu; fi
fi
if [ -L "$DOPPEL_REPLICA" ] || [ ! -d "$DOPPEL_REPLICA" ]; then die "no replica directory at $DOPPEL_REPLICA"; fi
root=$(readlink -f -- "$DOPPEL_REPLICA")

# Prints the resolved path of disk image $1 (a path in the replica) if it is a regular file
# inside the replica that opens no other file; refuses it otherwise.
image() {
    r=$(readlink -f -- "$1") || die "refused: disk image $1 does not exist"
    case $r in
    "$root"/*) ;;
    *) die "refused: disk image $1 resolves to $r, outside the replica $root" ;;
    esac
    [ -f "$r" ] || die "refused: disk image $1 is not a regular file (missing, a device or a directory)"
    safe_path "refused: disk image" "$r"
    # qcow2 (magic QFI\xfb): the backing file offset (bytes 8-15) must be 0, and from version
    # 3 on, incompatible feature bit 2 (external data file, byte 79) must be clear.
    if [ "$(od -An -tx1 -N4 "$r" | tr -d ' \n')" = 514649fb ]; then
        [ "$(od -An -tx1 -j8 -N8 "$r" | tr -d ' \n')" = 0000000000000000 ] ||
            die "refused: disk image $1 is a qcow2 image with a backing file, which would be opened outside the replica"
        if [ "$(od -An -tx1 -j4 -N4 "$r" | tr -d ' \n')" != 00000002 ]; then
            b=$(od -An -tu1 -j79 -N1 "$r" | tr -d ' \n')
            [ $((${b:-0} & 4)) -eq 0 ] ||
                die "refused: disk image $1 is a qcow2 image with an external data file, which would be opened outside the replica"
        fi
    fi
    printf '%s\n' "$r"
}

# The disks of the domain XML $VM_XML. `list` prints each disk's source file; `rewrite`
# prints the XML with each source file replaced as the file $map says ("FROM TO" lines).
# Refuses disks that are not files, <filesystem> and <hostdev>, and checks the <name>.
# (virsh dumpxml puts each element's start tag on one line.)
disks() {
    awk -v me="$me" -v mode="$1" -v map="${map:-}" -v name="$VM_NAME" '
    function val(s, a,   re) {
        re = "[ \t]" a "=" q "[^" q "]*" q
        if (match(s, re)) return substr(s, RSTART + length(a) + 3, RLENGTH - length(a) - 4)
        re = "[ \t]" a "=\"[^\"]*\""
        if (match(s, re)) return substr(s, RSTART + length(a) + 3, RLENGTH - length(a) - 4)
        return ""
    }
    function bad(m) { print me ": " m > "/dev/stderr"; err = 1; exit 1 }
    function line() { s = $0; gsub(/^[ \t]+|[ \t]+$/, "", s); return s }
    BEGIN {
        q = "\047"
        if (mode == "rewrite") while ((getline l < map) > 0) { split(l, kv, " "); to[kv[1]] = kv[2] }
    }
    !named && /<name>/ {
        n = $0; sub(/.*<name>/, "", n); sub(/<\/name>.*/, "", n); named = 1
        if (n != name) bad("refused: the domain XML names the domain \"" n "\", not VM_NAME " name)
    }
    /<(filesystem|hostdev)[ \t>]/ { bad("refused: the domain XML attaches a host directory or device: " line()) }
    /<disk[ \t>]/ {
        indisk = 1
        if (val($0, "type") != "file") bad("refused: a disk that is not a file in the replica: " line())
    }
    indisk && /<driver[ \t\/>]/ && val($0, "type") != "" && val($0, "type") != "raw" && val($0, "type") != "qcow2" {
        bad("refused: a disk format other than raw or qcow2 (its image could name other files): " line())
    }
    indisk && /<backingStore[ \t\/>]/ && val($0, "type") != "" && val($0, "type") != "file" {
        bad("refused: a disk backed by something other than a file: " line())
    }
    indisk && /<source[ \t\/>]/ {
        f = val($0, "file")
        if (f == "" || val($0, "dev") != "" || val($0, "dir") != "" || val($0, "protocol") != "" || val($0, "volume") != "")
            bad("refused: a disk source that is not a file: " line())
        if (mode == "list") print f
        else {
            if (!(f in to)) bad("internal error: no replica path for " f)
            i = index($0, q f q); if (i == 0) i = index($0, "\"" f "\"")
            $0 = substr($0, 1, i) to[f] substr($0, i + 1 + length(f))
        }
    }
    /<\/disk>/ { indisk = 0 }
    mode == "rewrite" { print }
    END {
        if (err) exit 1
        if (!named) { print me ": refused: the domain XML has no <name>" > "/dev/stderr"; exit 1 }
    }' "$VM_XML"
}

case "$VM_BACKEND" in
libvirt)
    VM_XML=${VM_XML:-/etc/doppel/vms/$VM_NAME.xml}
    safe_path VM_XML "$VM_XML"
    [ -f "$VM_XML" ] ||
        die "no domain XML at $VM_XML: keep the VM's definition on this machine (set VM_XML); the replica's is not used"
    xml="$RUN_DIR/doppel-failover-$VM_NAME.xml"
    map="$xml.map"
    trap 'rm -f "$xml" "$map"' EXIT
    : >"$map"
    list=$(disks list) || exit 1
    for p in $list; do
        safe_path "disk" "$p"
        case $p in
        "$SOURCE_DIR"/*) ;;
        *) die "refused: disk $p is not under SOURCE_DIR ($SOURCE_DIR): only images of the replica are attached" ;;
        esac
        r=$(image "$DOPPEL_REPLICA/${p#"$SOURCE_DIR"/}") || exit 1
        echo "$p $r" >>"$map"
    done
    disks rewrite >"$xml" || exit 1
    if virsh domstate "$VM_NAME" 2>/dev/null | grep -q running; then
        echo "VM $VM_NAME is already running" # a rerun of the failover: nothing to do
        exit 0
    fi
    virsh define "$xml"
    virsh start "$VM_NAME"
    ;;
qemu)
    pidfile="$RUN_DIR/doppel-vm-$VM_NAME.pid"
    if [ -n "${VM_IMAGE:-}" ]; then
        case $VM_IMAGE in
        /* | ../* | */../* | */..) die "VM_IMAGE \"$VM_IMAGE\" must be a path inside the replica, relative to it" ;;
        esac
        img="$DOPPEL_REPLICA/$VM_IMAGE"
    else
        # Not only regular files: a symlink named like an image is refused below, not skipped.
        found=$(find "$DOPPEL_REPLICA" -mindepth 1 -maxdepth 1 ! -type d \( -name '*.qcow2' -o -name '*.img' -o -name '*.raw' \) | sort)
        [ -n "$found" ] || die "no disk image (*.qcow2, *.img, *.raw) in $DOPPEL_REPLICA"
        [ "$(printf '%s\n' "$found" | wc -l)" -eq 1 ] ||
            die "several disk images in $DOPPEL_REPLICA: set VM_IMAGE to the one to boot"
        img=$found
    fi
    r=$(image "$img") || exit 1
    case "$img" in *.qcow2) fmt=qcow2 ;; *) fmt=raw ;; esac
    # The pid file outlives a QEMU that was killed or a host that rebooted: the VM runs only
    # if that process is this VM's QEMU.
    if [ -f "$pidfile" ] && pid=$(cat "$pidfile") && kill -0 "$pid" 2>/dev/null &&
        tr '\000' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "-name $VM_NAME "; then
        echo "VM $VM_NAME is already running"
        exit 0
    fi
    case ${QEMU_ACCEL:-auto} in
    kvm) accel=-enable-kvm ;;
    tcg) accel="-accel tcg" ;;
    auto)
        # KVM where this host has it (the device exists, and permissions and the container's
        # device rules let this process open it), TCG elsewhere.
        if (: <>/dev/kvm) 2>/dev/null; then accel=-enable-kvm; else accel="-accel tcg"; fi
        ;;
    *) die "QEMU_ACCEL must be kvm or tcg" ;;
    esac
    # shellcheck disable=SC2086
    qemu-system-x86_64 -name "$VM_NAME" $accel ${QEMU_ARGS:--m 2048 -smp 2} \
        -drive "file=$r,format=$fmt,if=virtio,cache=none" \
        -display none -daemonize -pidfile "$pidfile"
    ;;
*)
    die "VM_BACKEND must be libvirt or qemu"
    ;;
esac
echo "VM $VM_NAME started from $DOPPEL_REPLICA (epoch ${DOPPEL_EPOCH:-?})"
