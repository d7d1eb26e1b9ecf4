//! # doppel-bench: measurements of doppel on this machine
//!
//! A program, not a test: it builds a tree, runs the real `doppel` binary (the sibling of this
//! executable) and `rsync`, and prints what it measured as a markdown table. See
//! `bench/README.md` for what is measured, how, and the results of a run.
//!
//! - `core`: the initial mirror of a mixed tree against `rsync -a` of the same tree, then the
//!   replication lag of a steady stream of small in-place updates.
//! - `fuse`: fio workloads and a metadata-heavy run on a plain directory against the same
//!   through a `--capture fuse` mount while it replicates, and the replication lag under
//!   random writes.
//! - `wan`: doppel against `rsync -az` and lsyncd over an emulated 100 Mbit/s, 50 ms link.
//! - `failover`: the recovery time of an automatic failover, step by step from doppel's event
//!   log until the workload answers on the DR side; then a failback of a 2 GiB tree of which
//!   the workload changed 1 % on the DR side, against rsync (a full copy, and its delta
//!   transfer over the stale tree).
//! - `history`: the point-in-time history: apply throughput with it on and off, history
//!   bytes per byte overwritten, restore against `cp -a`, test-failover start time.
//! - `many`: many sources, each its own identity, tree and agent, to one target: the initial
//!   mirror of all, then per-source lag under a steady load, without and beside a noisy source.
//! - `vm`: a VM's disk at QEMU's block layer (fio through a `qemu-storage-daemon`'s NBD export)
//!   unprotected, with its image in a `--capture fuse` job root, and with hypervisor capture
//!   (`protect --vm`): throughput side by side, replication lag, the replicas verified.
//! - `files`: a file server's many small files: the initial mirror of a million files of 0-99
//!   bytes by doppel (to a target on 127.0.0.1 and to a directory) against rsync (local and to
//!   its daemon), doppel's peak memory, and a pass rewriting 1 % of the files.

mod agent;
mod changes;
mod client;
mod cpu;
mod delay;
mod failback;
mod failover;
mod failover_report;
mod files;
mod files_report;
mod files_tree;
mod fio;
mod fuse;
mod fuse_report;
mod history;
mod lag;
mod linkcheck;
mod lsyncd;
mod machine;
mod many;
mod meta;
mod mirror;
mod ns;
mod probe;
mod remote;
mod report;
mod rsyncd;
mod rto;
mod scratch;
mod serve;
mod stats;
mod target;
mod tree;
mod vm;
mod vm_report;
mod wan;
mod wan_lag;
mod wan_mirror;
mod wan_overwrite;
mod wan_report;
mod wirelog;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

/// Benchmarks for doppel.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Initial mirror vs `rsync -a`, then replication lag of a steady stream of small updates.
    Core(CoreArgs),
    /// fio and metadata workloads natively and through a `--capture fuse` mount, side by side.
    Fuse(FuseArgs),
    /// doppel against `rsync -az` and lsyncd over an emulated 100 Mbit/s, 50 ms link.
    Wan(WanArgs),
    /// Recovery time of an automatic failover, step by step; failback of a changed tree vs rsync.
    Failover(FailoverArgs),
    /// Many sources (each its own identity, tree and agent) replicating to one target.
    Many(ManyArgs),
    /// Point-in-time history: apply with it on and off, bytes kept, restore vs `cp -a`,
    /// test-failover start for a small and a large replica.
    History(HistoryArgs),
    /// A VM's disk at QEMU's block layer: unprotected, image in a fuse job root, hypervisor
    /// capture (`protect --vm`), side by side.
    Vm(VmArgs),
    /// Many small files: initial mirror (remote, local) vs rsync (local, daemon), peak memory,
    /// a change pass over 1 % of the files.
    Files(files::FilesArgs),
    /// Serve a file over HTTP/1.0 (the workload the `failover` mode starts on the replica).
    #[command(hide = true)]
    ServeFile(ServeArgs),
}

/// Options of `history`.
#[derive(Args, Debug, Clone)]
pub struct HistoryArgs {
    /// Scratch directory (replicas, restores, views). Only what the benchmark created in it
    /// is removed at the end.
    #[arg(long, default_value = "/var/tmp/doppel-bench")]
    pub dir: PathBuf,
    /// Runs of each measurement (medians reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Size of the file the overwrites go to.
    #[arg(long, default_value = "512M", value_parser = parse_size)]
    pub file: u64,
    /// Bytes overwritten per run.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub overwrite: u64,
    /// New files per run of the create-heavy workload.
    #[arg(long, default_value_t = 20_000)]
    pub files: u64,
    /// Threads of the create workload's run on several threads (`[target] apply_threads`)
    /// [default: the CPUs].
    #[arg(long)]
    pub apply_threads: Option<usize>,
    /// Size of the restored tree.
    #[arg(long, default_value = "2G", value_parser = parse_size)]
    pub tree: u64,
    /// Size of the small replica of the test-failover start.
    #[arg(long, default_value = "40M", value_parser = parse_size)]
    pub small_view: u64,
    /// Size of the large replica of the test-failover start.
    #[arg(long, default_value = "4G", value_parser = parse_size)]
    pub large_view: u64,
    /// Keep the scratch directory.
    #[arg(long)]
    pub keep: bool,
    /// Also write the markdown report to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Options of `vm`.
#[derive(Args, Debug, Clone)]
pub struct VmArgs {
    /// Scratch directory (images, job root, replicas, homes, the daemons' sockets). Only what
    /// the benchmark created in it is removed at the end.
    #[arg(long, default_value = "/var/tmp/doppel-bench-vm")]
    pub dir: PathBuf,
    /// Alternating runs of every workload on each configuration (medians reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Size of each disk image (the last MiB is the probes').
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub size: u64,
    /// Seconds of each time-based fio run.
    #[arg(long, default_value_t = 20)]
    pub runtime: u64,
    /// Milliseconds between two lag probes.
    #[arg(long, default_value_t = 100)]
    pub probe_ms: u64,
    /// Also measure hypervisor capture to a `doppel target` on 127.0.0.1 (a fourth daemon).
    #[arg(long)]
    pub remote: bool,
    /// `--history` of both agents' local destinations (`off`, `24h`...) [default: doppel's].
    #[arg(long, value_name = "DURATION")]
    pub history: Option<String>,
    /// After the timed runs, profile the daemon and the agent (`perf record -g`) during one more
    /// run of each workload on the fuse and vm configurations; the profiles go here.
    #[arg(long)]
    pub perf: Option<PathBuf>,
    /// Keep the scratch directory.
    #[arg(long)]
    pub keep: bool,
    /// Also write the markdown report to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Options of `serve-file`.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long)]
    pub listen: String,
    /// The file every request is answered with (read again for each request).
    #[arg(long)]
    pub file: PathBuf,
    /// Write the process id here once listening.
    #[arg(long)]
    pub pidfile: Option<PathBuf>,
}

/// Options of `failover`.
#[derive(Args, Debug, Clone)]
pub struct FailoverArgs {
    /// Scratch directory (trees, homes, replicas). Only what the benchmark created in it is
    /// removed at the end.
    #[arg(long, default_value = "/var/tmp/doppel-bench-failover")]
    pub dir: PathBuf,
    /// Runs of each measurement (min and median reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Only one measurement: `rto` or `failback`.
    #[arg(long, value_parser = ["rto", "failback"])]
    pub only: Option<String>,
    /// The target's check interval for the source, in seconds (`interval_secs`).
    #[arg(long, default_value_t = 1)]
    pub interval: u64,
    /// Checks in a row the source must miss to count as failed (`missed`).
    #[arg(long, default_value_t = 3)]
    pub missed: u32,
    /// Rows of the database the RTO workload serves (about 1 KiB each).
    #[arg(long, default_value_t = 5000)]
    pub rows: u64,
    /// Size of the tree of the failback (suffixes K, M, G are powers of 1024).
    #[arg(long, default_value = "2G", value_parser = parse_size)]
    pub size: u64,
    /// Share of the tree's bytes the workload changes on the DR side, in percent.
    #[arg(long, default_value_t = 1.0)]
    pub change_percent: f64,
    /// The capture of the source's job in the failback measurement. A `fuse` job's index holds
    /// no block hashes, so nothing is vouched for and the failback hashes both whole trees.
    #[arg(long, default_value = "watch", value_parser = ["watch", "fuse"])]
    pub capture: String,
    /// Keep the scratch directory: the generated tree (reused by the next run) and every run's
    /// trees, homes and logs (until the next run starts).
    #[arg(long)]
    pub keep: bool,
    /// Also write the markdown report to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Options of `fuse`.
#[derive(Args, Debug, Clone)]
pub struct FuseArgs {
    /// Scratch directory (native directory, protected tree, replica, doppel home): the
    /// native side and the mount are on its file system. Only what the benchmark created in
    /// it is removed at the end.
    #[arg(long, default_value = "/var/tmp/doppel-bench")]
    pub dir: PathBuf,
    /// Timed runs of every workload on each side (medians reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Size of the file of each fio job (suffixes K, M, G are powers of 1024).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub size: u64,
    /// Seconds of each time-based fio job (random writes and reads).
    #[arg(long, default_value_t = 20)]
    pub runtime: u64,
    /// fio processes of the parallel random-write job (sharing one file); 0 or 1 skips it.
    #[arg(long, default_value_t = 4)]
    pub rand_jobs: u32,
    /// Files of the metadata workload (all live at once: the agent needs more open files than
    /// this, see `--agent-nofile`).
    #[arg(long, default_value_t = 15_000)]
    pub files: usize,
    /// Directories the metadata workload spreads its files over.
    #[arg(long, default_value_t = 20)]
    pub dirs: usize,
    /// Limit of open files (soft and hard) given to the agent right after it starts (0: keep
    /// the inherited one; where the hard limit cannot be raised, it is the most the agent
    /// gets). The fuse daemon holds one descriptor per inode the kernel knows, so the
    /// metadata workload needs more than `--files`.
    #[arg(long, default_value_t = 65536)]
    pub agent_nofile: u64,
    /// Milliseconds between two lag probes during the random writes.
    #[arg(long, default_value_t = 100)]
    pub probe_ms: u64,
    /// Run the agent with the kernel's write-back cache (`--fuse-writeback`): the faster mode,
    /// which keeps the order only at fsync boundaries.
    #[arg(long)]
    pub writeback: bool,
    /// After the timed runs, profile the agent (`perf record`) during one more fuse run of the
    /// sequential and of the random writes; the profiles go to this directory.
    #[arg(long)]
    pub perf: Option<PathBuf>,
    /// Keep the scratch directory.
    #[arg(long)]
    pub keep: bool,
    /// Also write the markdown report to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Options of `wan`.
#[derive(Args, Debug, Clone)]
pub struct WanArgs {
    /// Scratch directory (trees, destinations, homes). Only what the benchmark created in it
    /// is removed at the end.
    #[arg(long, default_value = "/var/tmp/doppel-bench-wan")]
    pub dir: PathBuf,
    /// Total size of the tree of the initial mirror (suffixes K, M, G are powers of 1024).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub size: u64,
    /// Size of the file the random overwrites go to.
    #[arg(long, default_value = "2G", value_parser = parse_size)]
    pub big_size: u64,
    /// Timed runs of each tool's initial mirror (min and median reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Rate limit of each direction of the link, in Mbit/s.
    #[arg(long, default_value_t = 100)]
    pub mbit: u32,
    /// Round-trip time of the link, in milliseconds (half of it each way).
    #[arg(long, default_value_t = 50)]
    pub rtt_ms: u64,
    /// Duration of the small-update stream, in seconds.
    #[arg(long, default_value_t = 30)]
    pub lag_secs: u64,
    /// Small updates per second.
    #[arg(long, default_value_t = 50)]
    pub rate: u64,
    /// Small files the updates go round-robin over.
    #[arg(long, default_value_t = 2000)]
    pub pool: usize,
    /// 4 KiB random overwrites made in the large file.
    #[arg(long, default_value_t = 1000)]
    pub overwrites: u64,
    /// Keep the scratch directory (the generated tree and file are then reused).
    #[arg(long)]
    pub keep: bool,
    /// Also write the markdown report to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Options of `many`.
#[derive(Args, Debug, Clone)]
pub struct ManyArgs {
    /// Scratch directory (trees, homes, the target's data); removed first, and at the end
    /// unless `--keep`.
    #[arg(long, default_value = "/var/tmp/doppel-bench-many")]
    pub dir: PathBuf,
    /// Sources, each with its own identity, tree and agent process.
    #[arg(long, default_value_t = 100)]
    pub sources: usize,
    /// Small files (4 KiB) per source, updated by the steady load.
    #[arg(long, default_value_t = 50)]
    pub files: usize,
    /// One more file of this size per source, for the initial mirror's volume.
    #[arg(long, default_value = "8M", value_parser = parse_size)]
    pub big: u64,
    /// Updates per second per source during the steady load.
    #[arg(long, default_value_t = 20)]
    pub rate: u64,
    /// Seconds of each steady-load phase.
    #[arg(long, default_value_t = 20)]
    pub secs: u64,
    /// Keep the scratch directory.
    #[arg(long)]
    pub keep: bool,
    /// Also write the markdown report to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Options of `core`.
#[derive(Args, Debug, Clone)]
pub struct CoreArgs {
    /// Scratch directory (source tree, destinations, doppel homes). Only what the benchmark
    /// created in it is removed at the end.
    #[arg(long, default_value = "/var/tmp/doppel-bench")]
    pub dir: PathBuf,
    /// Total size of the generated tree (suffixes K, M, G are powers of 1024).
    #[arg(long, default_value = "2G", value_parser = parse_size)]
    pub size: u64,
    /// Timed runs of each tool (the minimum and the median are reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Duration of the steady update stream, in seconds.
    #[arg(long, default_value_t = 30)]
    pub lag_secs: u64,
    /// Updates per second during the lag measurement.
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    /// Number of small files the updates go round-robin over.
    #[arg(long, default_value_t = 5000)]
    pub pool: usize,
    /// `--history` of the agent's embedded target (`off` measures without history).
    #[arg(long, value_name = "DURATION")]
    pub history: Option<String>,
    /// Keep the scratch directory (the generated tree is then reused by the next run).
    #[arg(long)]
    pub keep: bool,
    /// Also write the markdown report to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

impl CoreArgs {
    /// The length of the update stream.
    pub fn lag_duration(&self) -> Duration {
        Duration::from_secs(self.lag_secs)
    }
}

/// Parses `2G`, `512M`, `64K` or a plain number of bytes.
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last() {
        Some((i, c)) if c.eq_ignore_ascii_case(&'k') => (&s[..i], 10),
        Some((i, c)) if c.eq_ignore_ascii_case(&'m') => (&s[..i], 20),
        Some((i, c)) if c.eq_ignore_ascii_case(&'g') => (&s[..i], 30),
        _ => (s, 0),
    };
    let n: u64 = digits.parse().map_err(|_| format!("{s:?} is not a size like 2G, 512M or 4096"))?;
    n.checked_mul(1 << shift).ok_or_else(|| format!("{s:?} is too large"))
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Core(args) => core(&args),
        Command::Fuse(args) => fuse::main(&args),
        Command::Wan(args) => wan::main(&args),
        Command::Failover(args) => failover::main(&args),
        Command::Many(args) => many::main(&args),
        Command::History(args) => history::main(&args),
        Command::Vm(args) => vm::main(&args),
        Command::Files(args) => files::main(&args),
        Command::ServeFile(args) => serve::main(&args),
    };
    if let Err(e) = result {
        eprintln!("doppel-bench: error: {e:#}");
        std::process::exit(1);
    }
}

/// `core`: both measurements, one report.
fn core(args: &CoreArgs) -> Result<()> {
    let doppel = agent::doppel_binary()?;
    machine::require_rsync()?;
    machine::require_root()?;
    let scratch = scratch::Scratch::open(&args.dir)?;
    let machine = machine::Machine::describe(&args.dir, &doppel)?;
    eprintln!("[bench] {}", machine.one_line());
    let tree = tree::ensure(&scratch, args.size)?;
    let (mirror, running) = mirror::run(args, &scratch, &doppel, &tree)?;
    let lag = lag::run(args, running)?;
    let report = report::markdown(args, &machine, &tree, &mirror, &lag);
    crate::report::publish(&report, args.out.as_deref())?;
    if !args.keep {
        scratch.remove()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("lots").is_err());
    }
}
