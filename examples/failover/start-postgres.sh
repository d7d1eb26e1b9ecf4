#!/bin/sh
# doppel failover script: start PostgreSQL on its replicated data directory.
#
#   failover = ["PG_DATA=/srv/pg-failover/main /etc/doppel/failover/start-postgres.sh"]
#
# Protect the cluster's data directory as a job (on Debian: /var/lib/postgresql/VERSION/main,
# with `capture = "fuse"` and `sync = true` for zero data loss), and keep a copy of the
# server's configuration on this machine (Debian keeps it in /etc/postgresql/VERSION/main).
# PostgreSQL replays its write-ahead log at start, as after a power cut: with fuse capture the
# replica is always a state the source passed through, so the replay finds what it expects.
#
# How the server, running as PG_USER, reaches its replica and nothing else: the target's data
# directory and everything in it stay root's alone (mode 0700). The replica is bind-mounted on
# PG_DATA, a directory of this machine (nosuid, nodev, noexec: the source's set-id programs
# and device nodes mean nothing there), and the server runs on PG_DATA. Least privilege:
#   - a traverse permission (chmod o+x or an ACL) on the data directory's path would let the
#     user reach every replica of every source whose own mode allows it, modes the sources
#     choose; the target also tightens its directories back to 0700 at start;
#   - a chown of the replica to PG_USER would rewrite the owners the source sent, which the
#     failback then sends home;
#   - the mount exposes this replica alone, adds no permission to anything of the target's,
#     and is undone by stop-postgres.sh (and by a reboot).
# Inside the replica the files keep the owners the source gave them: the cluster belongs to
# the source's postgres uid, which must be PG_USER's uid here (as Debian's postgres user
# normally has: compare `id postgres` on both machines), with the source's owners policy
# "allow" (the default). PostgreSQL refuses a data directory that PG_USER does not own.
# PG_DATA's parent and every directory above it must be root's and writable by root alone
# (or sticky, like /tmp): a user who could swap one for a symlink would have root mount the
# replica elsewhere. PG_DATA is made (mode 0755) when missing.
# Paths go into the server's command line, which pg_ctl runs through /bin/sh: they are paths
# of this machine's configuration, limited to letters, digits and . _ / + @ : -. Nothing from
# the replica (no name, no file's content) decides what this script runs or where. The server
# itself reads what its data directory holds (postgresql.auto.conf can set archive_command,
# for one): that is the source's workload running as PG_USER, which the mount confines to
# this replica.
#
# Settings:
#   PG_DATA    where the replica is mounted and the server runs from (required)
#   PG_BIN     directory of pg_ctl [default: the newest /usr/lib/postgresql/*/bin]
#   PG_CONF    config directory to use (config_file=...) [default: none, use the data dir's]
#   PG_USER    the cluster's owner [default: postgres]
#   PG_PORT    port to listen on and check readiness on [default: 5432]
#   PG_LOG     server log, opened by PG_USER [default: /var/log/postgresql/doppel-failover-JOB.log]
#   ONLY_JOB   start the server for this job only, for a source with several jobs [default: any]
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
    */../* | */..) die "$1 \"$2\" has a .. component" ;;
    esac
}
# Refuses unless directory $1 and every directory above it are root's and writable by root
# alone (or sticky) and none is a symlink.
root_only() {
    d=$1
    while :; do
        if [ -L "$d" ] || [ ! -d "$d" ]; then die "refused: $d (above PG_DATA) is a symlink or not a directory"; fi
        [ "$(stat -c %u "$d")" = 0 ] || die "refused: $d (above PG_DATA) is not owned by root"
        m=$((0$(stat -c %a "$d")))
        [ $((m & 022)) -eq 0 ] || [ $((m & 01000)) -ne 0 ] ||
            die "refused: $d (above PG_DATA) is writable by others than root"
        [ "$d" = / ] && break
        d=$(dirname "$d")
    done
}

: "${DOPPEL_REPLICA:?run by doppel failover (DOPPEL_REPLICA is not set)}"
: "${DOPPEL_JOB:?run by doppel failover (DOPPEL_JOB is not set)}"
if [ -n "${ONLY_JOB:-}" ] && [ "$ONLY_JOB" != "$DOPPEL_JOB" ]; then
    echo "job $DOPPEL_JOB: not $ONLY_JOB, nothing to do"
    exit 0
fi
[ -n "${PG_DATA:-}" ] ||
    die "set PG_DATA, the directory of this machine the replica is mounted on for PostgreSQL, in the failover command (failover = [\"PG_DATA=/srv/pg-failover/main $0\"])"
safe_path PG_DATA "$PG_DATA"
PG_DATA=${PG_DATA%/}
[ -n "$PG_DATA" ] || die "PG_DATA must not be /"
case $DOPPEL_JOB in
'' | -* | .* | *[!A-Za-z0-9._-]*) die "DOPPEL_JOB \"$DOPPEL_JOB\" is not a plain name" ;;
esac
PG_USER=${PG_USER:-postgres}
case $PG_USER in
'' | -* | *[!A-Za-z0-9._-]*) die "PG_USER \"$PG_USER\" is not a user name" ;;
esac
uid=$(id -u "$PG_USER") || die "no user $PG_USER"
[ "$uid" != 0 ] || die "PG_USER must not be root"
PG_PORT=${PG_PORT:-5432}
case $PG_PORT in '' | *[!0-9]*) die "PG_PORT \"$PG_PORT\" is not a port number" ;; esac
if [ -z "${PG_BIN:-}" ]; then
    PG_BIN=$(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
fi
safe_path PG_BIN "$PG_BIN"
[ -x "$PG_BIN/pg_ctl" ] || die "pg_ctl not found in $PG_BIN (set PG_BIN)"
if [ -n "${PG_CONF:-}" ]; then safe_path PG_CONF "$PG_CONF"; fi
PG_LOG=${PG_LOG:-/var/log/postgresql/doppel-failover-$DOPPEL_JOB.log}
safe_path PG_LOG "$PG_LOG"
if [ -L "$DOPPEL_REPLICA" ] || [ ! -d "$DOPPEL_REPLICA" ]; then die "no replica directory at $DOPPEL_REPLICA"; fi
root_only "$(dirname "$PG_DATA")"

# The mount (a rerun of the failover finds it done).
if [ -L "$PG_DATA" ]; then die "refused: PG_DATA $PG_DATA is a symlink"; fi
if [ ! -e "$PG_DATA" ]; then mkdir -m 0755 "$PG_DATA"; fi
[ -d "$PG_DATA" ] || die "refused: PG_DATA $PG_DATA is not a directory"
if mountpoint -q "$PG_DATA"; then
    [ "$(stat -c %d:%i "$PG_DATA")" = "$(stat -c %d:%i "$DOPPEL_REPLICA")" ] ||
        die "refused: something other than the replica is mounted on PG_DATA $PG_DATA"
else
    [ "$(stat -c %u "$PG_DATA")" = 0 ] || die "refused: PG_DATA $PG_DATA is not owned by root"
    mount --bind "$DOPPEL_REPLICA" "$PG_DATA"
    mount -o remount,bind,nosuid,nodev,noexec "$PG_DATA"
fi

if runuser -u "$PG_USER" -- "$PG_BIN/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1; then
    echo "PostgreSQL is already running on $PG_DATA" # a rerun of the failover
    exit 0
fi
# The replica carries the source's lock file; no server runs on it here (the job is fenced).
rm -f "$PG_DATA/postmaster.pid"
opts="-p $PG_PORT"
# A config file of this machine may name a data_directory (Debian's does): the mount wins.
if [ -n "${PG_CONF:-}" ]; then opts="$opts -c config_file=$PG_CONF/postgresql.conf -c data_directory=$PG_DATA"; fi
# The server (as PG_USER) opens its log itself: root neither creates nor chowns a file in a
# directory PG_USER may write to (a symlink planted there would be followed).
logdir=$(dirname "$PG_LOG")
if [ ! -d "$logdir" ]; then
    mkdir -p "$logdir"
    chown -h "$PG_USER" "$logdir"
fi
runuser -u "$PG_USER" -- "$PG_BIN/pg_ctl" -D "$PG_DATA" -o "$opts" -l "$PG_LOG" -w -t 300 start
"$PG_BIN/pg_isready" -p "$PG_PORT" -t 60
echo "PostgreSQL serving from $PG_DATA (the replica $DOPPEL_REPLICA, epoch ${DOPPEL_EPOCH:-?})"
