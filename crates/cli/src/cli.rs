//! The command line.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Continuous, byte-level replication of live directory trees to a disaster-recovery target.
#[derive(Parser, Debug)]
#[command(name = "doppel", version, about, long_about = None)]
pub struct Cli {
    /// Directory for this node's identity and state [default: $DOPPEL_HOME, else the config
    /// file's `home`, else /var/lib/doppel for root, else $XDG_STATE_HOME/doppel].
    #[arg(long, global = true, value_name = "DIR")]
    pub home: Option<PathBuf>,
    /// Configuration file [default: $DOPPEL_CONFIG, else /etc/doppel/doppel.toml if present].
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Log warnings and errors only (DOPPEL_LOG overrides, e.g. DOPPEL_LOG=debug).
    #[arg(long, short, global = true)]
    pub quiet: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
// Parsed once per run: the size of its largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create this node's identity (key pair and certificate) if it has none.
    Init,
    /// Print this node's identity, as other nodes must be told it.
    Id,
    /// Run a target: receive replicas from the allowed sources.
    Target(TargetArgs),
    /// Protect a directory: mirror it to its destination, then replicate every change.
    Protect(ProtectArgs),
    /// Show the state of jobs (and of replicas, on a target).
    Status(StatusArgs),
    /// Compare a job's replica with its source block by block and report differences.
    Verify(VerifyArgs),
    /// Change a running job's bandwidth limit (kept across restarts until set back).
    Limit(LimitArgs),
    /// On the target: fail a source over to its replicas (fence it, take over its addresses,
    /// start its workload); continues a failover that stopped half way.
    Failover(FailoverArgs),
    /// On the target: hand a failed-over source its workload back (the source must run
    /// `doppel protect --failback` and hold the replica first).
    Failback(FailoverArgs),
    /// On the target: show the failover event log.
    Events(EventsArgs),
    /// On the target: re-read the configuration (allowed sources, their limits and policies)
    /// without dropping other sources; an invalid file keeps the running configuration. SIGHUP
    /// does the same.
    Reload,
    /// On the target: rehearse a failover: each job's replica at a point, as a writable view
    /// started in seconds, with the source's test scripts run against it, while replication
    /// goes on; `--end` ends it and discards the views.
    TestFailover(TestFailoverArgs),
    /// A replica's point-in-time history: list the window and its points, restore any point.
    #[command(subcommand)]
    History(HistoryCommand),
    /// Write manual pages or shell completions (for packagers).
    #[command(subcommand, hide = true)]
    Generate(crate::commands::generate::GenerateCommand),
}

impl Command {
    /// Whether the command's whole work is printing (or asking a daemon and printing its
    /// answer), so that it may end when the reader of its output goes away. Not the daemons,
    /// nor a restore, which writes files.
    pub fn only_prints(&self) -> bool {
        !matches!(
            self,
            Command::Target(_) | Command::Protect(_) | Command::History(HistoryCommand::Restore(_))
        )
    }
}

/// `doppel test-failover`.
#[derive(Args, Debug)]
pub struct TestFailoverArgs {
    /// The source.
    #[arg(value_name = "SOURCE")]
    pub source: String,
    /// Only this job (repeatable) [default: every job of the source].
    #[arg(long = "job", value_name = "JOB")]
    pub jobs: Vec<String>,
    /// The point (`now`, an RFC 3339 time, `-15m`, `seq:N` or a bookmark with one `--job`)
    /// [default: each job's latest consistent point].
    #[arg(long, value_name = "WHEN", allow_hyphen_values = true)]
    pub at: Option<String>,
    /// End the running test: its end scripts run, then its views and everything written in
    /// them go.
    #[arg(long, conflicts_with_all = ["jobs", "at"])]
    pub end: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `doppel history ...`.
#[derive(Subcommand, Debug)]
pub enum HistoryCommand {
    /// Show the window of points a replica's history holds, its named points and disk use.
    List(HistoryListArgs),
    /// Write a replica as it was at a point into a directory (all of it, or some paths).
    Restore(HistoryRestoreArgs),
    /// On the source: put a named bookmark into a running job's op stream (before an upgrade,
    /// after a batch job), to restore or fail over to by name.
    Bookmark(HistoryBookmarkArgs),
}

/// `doppel history bookmark`.
#[derive(Args, Debug)]
pub struct HistoryBookmarkArgs {
    /// The job (it must be running and replicating).
    #[arg(value_name = "JOB")]
    pub job: String,
    /// The name: letters, digits, `.`, `_`, `-`; not starting with `-` or a digit; not `now`.
    #[arg(value_name = "NAME")]
    pub name: String,
}

/// Which replica: `SOURCE/JOB` on a target, `JOB` for this home's embedded target.
#[derive(Args, Debug, Clone)]
pub struct ReplicaArg {
    /// `SOURCE/JOB` (a replica of a target: its data directory is `--data`, else the config's
    /// `[target] data`, else the one the target of this home last ran with), or `JOB` (the
    /// replica of a job protected with `--to DIR` from this home).
    #[arg(value_name = "REPLICA")]
    pub replica: String,
    /// The target's data directory.
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
}

/// `doppel history list`.
#[derive(Args, Debug)]
pub struct HistoryListArgs {
    /// The replica.
    #[command(flatten)]
    pub replica: ReplicaArg,
    /// Only points at or after WHEN.
    #[arg(long, value_name = "WHEN", allow_hyphen_values = true)]
    pub since: Option<String>,
    /// Only points at or before WHEN.
    #[arg(long, value_name = "WHEN", allow_hyphen_values = true)]
    pub until: Option<String>,
    /// Only the newest N points.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Print JSON: an object with `window` and `points`.
    #[arg(long)]
    pub json: bool,
}

/// `doppel history restore`.
#[derive(Args, Debug)]
pub struct HistoryRestoreArgs {
    /// The replica.
    #[command(flatten)]
    pub replica: ReplicaArg,
    /// The point: `now`, an RFC 3339 time (`2026-12-04T17:05:00Z`), a time ago (`-15m`,
    /// `-2h`, `-30s`, `-1d`), `seq:N`, or a bookmark; the latest point at or before it.
    #[arg(long, value_name = "WHEN", allow_hyphen_values = true)]
    pub at: String,
    /// Where to write it: a new or empty directory.
    #[arg(long, value_name = "DIR")]
    pub to: PathBuf,
    /// Only this path of the replica (repeatable): a single file restore.
    #[arg(long = "path", value_name = "SUBPATH")]
    pub paths: Vec<String>,
}

/// `doppel failover` and `doppel failback`.
#[derive(Args, Debug)]
pub struct FailoverArgs {
    /// The source.
    #[arg(value_name = "SOURCE")]
    pub source: String,
    /// Only this job (repeatable) [default: every job of the source].
    #[arg(long = "job", value_name = "JOB")]
    pub jobs: Vec<String>,
    /// Failover: take the replicas back to this point first (`now`, an RFC 3339 time, `-15m`,
    /// `seq:N` or a bookmark with one `--job`) [default: the latest consistent point: the one
    /// before a resync that has not ended, else now].
    #[arg(long, value_name = "WHEN", allow_hyphen_values = true)]
    pub at: Option<String>,
    /// Failover: go ahead even when no consistent point exists yet (the first mirror has not
    /// finished: the replica is partial).
    #[arg(long)]
    pub force: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `doppel events`.
#[derive(Args, Debug)]
pub struct EventsArgs {
    /// Only events of this source.
    #[arg(long, value_name = "SOURCE")]
    pub source: Option<String>,
    /// Only the last N events.
    #[arg(long, value_name = "N")]
    pub last: Option<usize>,
    /// Print JSON lines.
    #[arg(long)]
    pub json: bool,
}

/// `doppel limit`.
#[derive(Args, Debug)]
pub struct LimitArgs {
    /// The job.
    #[arg(value_name = "JOB")]
    pub job: String,
    /// A rate (`20Mbit`, `5MB`, `unlimited`), or `schedule` to go back to the configured one.
    #[arg(value_name = "RATE")]
    pub rate: String,
}

/// `doppel target`.
#[derive(Args, Debug)]
pub struct TargetArgs {
    /// Address to listen on, e.g. 0.0.0.0:7340.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Directory holding the replicas (DIR/replicas/SOURCE/JOB) and their state.
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Allow a source: NAME=ID (repeatable; adds to the config's list).
    #[arg(long = "allow", value_name = "NAME=ID")]
    pub allow: Vec<String>,
    /// Heartbeat interval in seconds; a source silent for three intervals is presumed dead.
    #[arg(long, value_name = "SECS")]
    pub heartbeat: Option<u64>,
    #[command(flatten)]
    pub http: HttpArgs,
}

/// The HTTP endpoint of `target` and `protect`.
#[derive(Args, Debug, Clone, Default)]
pub struct HttpArgs {
    /// Serve Prometheus metrics (/metrics), the status API (/api/status, /api/events) and the
    /// dashboard (/) on ADDR, e.g. 127.0.0.1:9740 (`http` in the config).
    #[arg(long, value_name = "ADDR")]
    pub http: Option<String>,
    /// A file whose first line is the token every HTTP request must carry (`Authorization:
    /// Bearer TOKEN`); required for an address other than loopback (`http_token_file`).
    #[arg(long, value_name = "FILE")]
    pub http_token_file: Option<PathBuf>,
}

/// Capture modes.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaptureMode {
    /// fanotify where possible, inotify otherwise.
    Watch,
    /// fanotify only.
    Fanotify,
    /// inotify only.
    Inotify,
    /// An in-place pass-through mount: every write captured with its bytes, in order.
    Fuse,
}

/// `doppel protect`.
#[derive(Args, Debug)]
pub struct ProtectArgs {
    /// The directory to protect (omit to run every job of the config file).
    #[arg(value_name = "SRC")]
    pub src: Option<PathBuf>,
    /// Destination: HOST:PORT of a target, or a local directory.
    #[arg(long, value_name = "DEST")]
    pub to: Option<String>,
    /// The target's identity (as `doppel id` prints it there), for HOST:PORT destinations.
    #[arg(long, value_name = "ID")]
    pub target_id: Option<String>,
    /// Job name [default: the base name of SRC].
    #[arg(long, value_name = "JOB")]
    pub name: Option<String>,
    /// Protect only files matching this gitignore-style rule (repeatable; not with the fuse
    /// capture, which replicates every write through its mount).
    #[arg(long, value_name = "GLOB")]
    pub include: Vec<String>,
    /// Leave out paths matching this gitignore-style rule (repeatable; not with the fuse
    /// capture).
    #[arg(long, value_name = "GLOB")]
    pub exclude: Vec<String>,
    /// How changes are captured.
    #[arg(long, value_enum, conflicts_with = "vm")]
    pub capture: Option<CaptureMode>,
    /// Protect a QEMU guest's disks, captured at the hypervisor, instead of a directory: the
    /// guest's QMP socket (`-qmp unix:PATH,server=on,wait=off`). The replica holds one raw
    /// image per disk, `DISK.raw` (`vm` in the config).
    #[arg(long, value_name = "QMP_SOCKET", conflicts_with = "src")]
    pub vm: Option<PathBuf>,
    /// With --vm: protect only this drive or block node (repeatable) [default: every writable
    /// drive] (`vm_disks`).
    #[arg(long, value_name = "NAME")]
    pub vm_disk: Vec<String>,
    /// fsync on the source waits until the target has everything before it (fuse capture);
    /// with --vm, every guest write waits until the target has it.
    #[arg(long)]
    pub sync: bool,
    /// Seconds an fsync may wait for the target in sync mode before the job degrades to async.
    #[arg(long, value_name = "SECS")]
    pub sync_timeout: Option<u64>,
    /// With `--to DIR`: history the replica keeps (`24h`, `30d`, `off`) [default: 24h].
    #[arg(long, value_name = "DURATION")]
    pub history: Option<String>,
    /// With `--to DIR`: size limit of the history (`5GiB`, `10%` of the replica, `unlimited`).
    #[arg(long, value_name = "SIZE")]
    pub history_size: Option<String>,
    /// With `--to DIR`: a window of history no size limit cuts [default: 1h].
    #[arg(long, value_name = "DURATION")]
    pub history_min: Option<String>,
    /// Fuse capture with the kernel's write-back cache: much faster writes, but ops keep only
    /// the order a local disk keeps (everything an fsync covered comes before it), not the
    /// order of every write (`fuse_writeback` in the config).
    #[arg(long)]
    pub fuse_writeback: bool,
    /// The `--to DIR` destination already holds a copy of the source (a seed: copied
    /// beforehand, restored from a backup): compare it and send only what differs. Without it
    /// a destination new to the job must be empty, since the mirror makes it equal to the
    /// source, deleting what the source lacks (`seeded` in the config).
    #[arg(long)]
    pub seeded: bool,
    /// Bandwidth limit for this job: every byte it sends counts (`20Mbit`, `5MB`, `unlimited`).
    #[arg(long, value_name = "RATE")]
    pub limit: Option<String>,
    /// Batch compression: off, fast, balanced, max, auto, or a zstd level 1-19.
    #[arg(long, value_name = "LEVEL")]
    pub compression: Option<String>,
    /// Largest spool on disk before the job records dirty names instead of queueing ops
    /// (`4GiB`, `500MB`). One acknowledged 64 MiB segment file is kept besides, to be written
    /// over by the next (faster than a new file).
    #[arg(long, value_name = "SIZE")]
    pub spool_limit: Option<String>,
    /// Memory the job's index may use as a cache (`16MiB` by default): the index of every
    /// file's block hashes lives on disk, so the agent's memory does not grow with the tree.
    #[arg(long, value_name = "SIZE")]
    pub index_cache: Option<String>,
    /// Heartbeat interval in seconds; a target silent for three intervals is presumed dead.
    #[arg(long, value_name = "SECS")]
    pub heartbeat: Option<u64>,
    /// After a failover: take the job back from the target (its replica is streamed back,
    /// only what differs), wait for `doppel failback` there, then protect as usual.
    #[arg(long)]
    pub failback: bool,
    /// Run this command (through /bin/sh -c, with DOPPEL_JOB, DOPPEL_EVENT and DOPPEL_DETAIL)
    /// when a job's lag passes --rpo, its link stays down, or sync mode degrades; again when
    /// each ends (`notify` in the config).
    #[arg(long, value_name = "COMMAND")]
    pub notify: Option<String>,
    /// The recovery point objective for --notify: a lag above it is news (`30s`, `5m`; `rpo`).
    #[arg(long, value_name = "DURATION")]
    pub rpo: Option<String>,
    #[command(flatten)]
    pub http: HttpArgs,
}

/// `doppel status`.
#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Print JSON for machines instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `doppel verify`.
#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// The job to verify (it must be running).
    #[arg(value_name = "JOB")]
    pub job: String,
    /// Repair the differences found (a difference mirror of just those names).
    #[arg(long)]
    pub repair: bool,
    /// Print JSON for machines.
    #[arg(long)]
    pub json: bool,
}
