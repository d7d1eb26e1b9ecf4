#!/bin/bash
# FUSE over io_uring weighed against /dev/fuse, on this kernel (issue 12): the same workloads
# natively, through doppel's fuse capture (write-through, local destination), and through
# libfuse's reference passthrough daemon (`passthrough_hp --nopassthrough --nocache`: every
# write and attribute request goes to the daemon) over /dev/fuse and over io_uring.
#
# Needs: fio, python3, a libfuse >= 3.18 build with io_uring (see bench/README.md, "FUSE over
# io_uring"), root, and `echo 1 > /sys/module/fuse/parameters/enable_uring`.
#
# usage: bench/scripts/fuse-transport.sh MODE [daemon args...]
#   MODE: native | doppel | devfuse | uring
# env: LIBFUSE (libfuse build tree, default /var/tmp/libfuse), DOPPEL (binary,
#   default target/release/doppel), DIR (scratch, default /var/tmp/doppel-fuse-transport)
set -eu
mode=$1; shift
LIBFUSE=${LIBFUSE:-/var/tmp/libfuse}
DOPPEL=${DOPPEL:-$(dirname "$0")/../../target/release/doppel}
DIR=${DIR:-/var/tmp/doppel-fuse-transport}
PH=$LIBFUSE/build/example/passthrough_hp
S=$DIR/src; M=$DIR/mnt
umount "$M" 2>/dev/null || true; umount "$S" 2>/dev/null || true
rm -rf "$S" "$DIR/home" "$DIR/dst"; mkdir -p "$S" "$M"
mounted() { for _ in $(seq 100); do mount | grep -q " $1 type fuse" && return 0; sleep 0.1; done; echo "no mount at $1" >&2; exit 1; }
case $mode in
  native) D=$S ;;
  doppel) "$DOPPEL" --home "$DIR/home" protect "$S" --to "$DIR/dst" --capture fuse "$@" > "$DIR/agent.log" 2>&1 &
          AP=$!; mounted "$S"; D=$S ;;
  devfuse) "$PH" --nopassthrough --nocache "$@" "$S" "$M"; mounted "$M"; D=$M ;;
  uring) [ "$(cat /sys/module/fuse/parameters/enable_uring)" = Y ] || { echo "enable_uring is off" >&2; exit 1; }
         "$PH" --nopassthrough --nocache -o io_uring "$@" "$S" "$M"; mounted "$M"; D=$M ;;
  *) echo "unknown mode $mode" >&2; exit 2 ;;
esac
json() { python3 -c "import json,sys; j=json.load(sys.stdin)['jobs'][0]['write']; print(round($1))"; }
fio --name=lay --filename="$D/f" --size=256M --rw=write --bs=1M --ioengine=psync --output-format=terse > /dev/null
rw=$(fio --name=rw --filename="$D/f" --size=256M --rw=randwrite --bs=4k --ioengine=psync --runtime=8 \
  --time_based --invalidate=0 --output-format=json | json "j['iops']")
seq=$(fio --name=od --filename="$D/f" --size=256M --rw=write --bs=64k --direct=1 --ioengine=libaio \
  --iodepth=16 --runtime=8 --time_based --output-format=json | json "j['bw']/1024")
rnd=$(fio --name=od4 --filename="$D/f" --size=256M --rw=randwrite --bs=4k --direct=1 --ioengine=libaio \
  --iodepth=16 --runtime=8 --time_based --output-format=json | json "j['iops']")
meta=$(python3 - "$D/m" 5000 <<'PY'
import os, sys, time
d, n = sys.argv[1], int(sys.argv[2])
os.makedirs(d, exist_ok=True)
buf = b'x' * 4096
def rate(f):
    t = time.time()
    for i in range(n):
        f(f'{d}/f{i}')
    return n / (time.time() - t)
def create(p):
    fd = os.open(p, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644)
    os.write(fd, buf)
    os.close(fd)
c, s, u = rate(create), rate(os.lstat), rate(os.unlink)
print(f'creates/s {c:.0f} | lstat/s {s:.0f} | unlinks/s {u:.0f}')
PY
)
echo "$mode: 4k randwrite IOPS $rw | O_DIRECT 64k seq q16 MiB/s $seq | O_DIRECT 4k rand q16 IOPS $rnd | $meta"
case $mode in native) ;; doppel) kill "$AP"; wait "$AP" || true ;; *) umount "$M" ;; esac
