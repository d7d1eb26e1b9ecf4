#!/bin/sh
# doppel failover script: start PostgreSQL on its replicated data directory.
#
#   failover = ["/etc/doppel/failover/start-postgres.sh"]
#
# Protect the cluster's data directory as a job (on Debian: /var/lib/postgresql/VERSION/main,
# with `capture = "fuse"` and `sync = true` for zero data loss), and keep a copy of the
# server's configuration on this machine (Debian keeps it in /etc/postgresql/VERSION/main).
# PostgreSQL replays its write-ahead log at start, as after a power cut: with fuse capture the
# replica is always a state the source passed through, so the replay finds what it expects.
#
# Settings:
#   PG_BIN     directory of pg_ctl [default: the newest /usr/lib/postgresql/*/bin]
#   PG_CONF    config directory to use (config_file=...) [default: none, use the data dir's]
#   PG_USER    the cluster's owner [default: postgres]
#   PG_PORT    port to check readiness on [default: 5432]
#   PG_LOG     server log [default: /var/log/postgresql/doppel-failover-JOB.log]
# The data directory keeps its owner and mode through replication (same uid for the owner on
# both machines, as Debian's postgres user normally has).
set -eu

: "${DOPPEL_REPLICA:?run by doppel failover (DOPPEL_REPLICA is not set)}"
PG_USER=${PG_USER:-postgres}
PG_PORT=${PG_PORT:-5432}
if [ -z "${PG_BIN:-}" ]; then
    PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
fi
[ -x "$PG_BIN/pg_ctl" ] || { echo "pg_ctl not found (set PG_BIN)" >&2; exit 1; }
data="$DOPPEL_REPLICA"

if runuser -u "$PG_USER" -- "$PG_BIN/pg_ctl" -D "$data" status >/dev/null 2>&1; then
    echo "PostgreSQL is already running on $data"   # a rerun of the failover
    exit 0
fi
# The replica carries the source's lock file; no server runs on it here (the job is fenced).
rm -f "$data/postmaster.pid"
opts="-p $PG_PORT"
if [ -n "${PG_CONF:-}" ]; then opts="$opts -c config_file=$PG_CONF/postgresql.conf"; fi
PG_LOG=${PG_LOG:-/var/log/postgresql/doppel-failover-$DOPPEL_JOB.log}
mkdir -p "$(dirname "$PG_LOG")"
touch "$PG_LOG" && chown "$PG_USER" "$PG_LOG"
runuser -u "$PG_USER" -- "$PG_BIN/pg_ctl" -D "$data" -o "$opts" -l "$PG_LOG" -w -t 300 start
"$PG_BIN/pg_isready" -p "$PG_PORT" -t 60
echo "PostgreSQL serving from $data (epoch $DOPPEL_EPOCH)"
