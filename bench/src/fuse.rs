//! `fuse`: the cost of `--capture fuse` to the applications writing through the mount.
//!
//! One agent protects an empty tree `SRC` into a local destination `DST` (both on the file
//! system of `--dir`) with `--capture fuse`, and stays up for the whole benchmark. The same
//! workloads then run on a plain directory `NATIVE` of the same file system and inside `SRC`
//! (through the mount), alternately (native, fuse, for each workload in turn; the same order
//! in every run), each from the same state: the previous workload's replication drained,
//! nothing dirty, the machine quiet, and (except for the warm read) the page cache dropped.
//! While the fuse side runs 4 KiB random writes, the agent's status is polled and probe files
//! measure the lag end to end. At the end the replica must equal the source.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, sleep};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use doppel_testkit::{Compare, compare_trees};
use rustix::process::{Pid, Signal, kill_process};

use crate::FuseArgs;
use crate::agent::{self, Agent};
use crate::cpu::{self, Meter};
use crate::fio::{self, FioJob};
use crate::machine::{self, Machine};
use crate::meta;
use crate::probe::{self, StatusPoint};
use crate::scratch::{Scratch, remove_if_present};
use crate::stats::Sample;

/// How long to wait for other users of the machine to go quiet before a timed run.
const QUIET_WAIT: Duration = Duration::from_secs(120);
/// How long replication may take to drain after a workload.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(900);
/// How long the last probes may take to appear once the agent has drained.
const PROBE_GRACE: Duration = Duration::from_secs(10);
/// The file of the sequential-write job (recreated by every run).
const SEQ_FILE: &str = "seqwrite.dat";
/// The file the random writes go to (laid out once).
const RAND_FILE: &str = "randwrite.dat";
/// The file the read jobs read (laid out once).
const READ_FILE: &str = "read.dat";

/// Where a workload runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// A plain directory of the same file system.
    Native,
    /// Inside the protected tree, through the mount.
    Fuse,
}

impl Side {
    /// Both, in the order every run uses.
    pub const BOTH: [Side; 2] = [Side::Native, Side::Fuse];

    /// `native` or `fuse`.
    pub fn name(self) -> &'static str {
        match self {
            Side::Native => "native",
            Side::Fuse => "fuse",
        }
    }
}

/// What a metric counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// MiB per second.
    MibPerSec,
    /// I/O operations per second.
    Iops,
    /// Files per second.
    FilesPerSec,
}

impl Unit {
    /// As the report writes it.
    pub fn name(self) -> &'static str {
        match self {
            Unit::MibPerSec => "MiB/s",
            Unit::Iops => "IOPS",
            Unit::FilesPerSec => "files/s",
        }
    }
}

/// One timed run of one workload on one side.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cell {
    /// Throughput, in the metric's unit (higher is better).
    pub value: f64,
    /// Wall time of the workload (fio's process, or the phase).
    pub wall: Duration,
    /// CPU time (user + system) of the workload's processes (fio's, or this program's for the
    /// metadata phases).
    pub tool_cpu: Duration,
    /// CPU time of the doppel agent from the start of the workload until its replication had
    /// drained.
    pub agent_cpu: Duration,
    /// CPU time of everything else meanwhile (kernel writeback threads, other users).
    pub others: Duration,
    /// From the end of the workload until the agent had acknowledged everything (fuse side).
    pub drain: Duration,
}

/// One workload's measurements, every run, both sides.
#[derive(Debug, Clone)]
pub struct Metric {
    /// Short name (`seqwrite`...).
    pub key: &'static str,
    /// What it is, for the report.
    pub label: String,
    /// Its unit.
    pub unit: Unit,
    /// The project's goal for fuse / native, if it has one.
    pub goal: Option<f64>,
    /// The fio command (or a description of the workload).
    pub command: String,
    /// Runs on the native directory.
    pub native: Vec<Cell>,
    /// Runs through the mount.
    pub fuse: Vec<Cell>,
}

impl Metric {
    fn new(
        key: &'static str,
        label: impl Into<String>,
        unit: Unit,
        goal: Option<f64>,
        command: String,
    ) -> Metric {
        Metric { key, label: label.into(), unit, goal, command, native: Vec::new(), fuse: Vec::new() }
    }

    fn push(&mut self, side: Side, c: Cell) {
        match side {
            Side::Native => self.native.push(c),
            Side::Fuse => self.fuse.push(c),
        }
    }

    /// The median of a side's values.
    pub fn median(&self, side: Side) -> f64 {
        median(match side {
            Side::Native => self.native.iter().map(|c| c.value).collect(),
            Side::Fuse => self.fuse.iter().map(|c| c.value).collect(),
        })
    }

    /// fuse / native, of the medians (higher is better; 1 is parity).
    pub fn ratio(&self) -> f64 {
        self.median(Side::Fuse) / self.median(Side::Native)
    }

    /// fuse / native of each run, paired in order.
    pub fn run_ratios(&self) -> Vec<f64> {
        self.native.iter().zip(&self.fuse).map(|(n, f)| f.value / n.value).collect()
    }
}

/// The median (the lower one of an even count); NaN for none.
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[(v.len() - 1) / 2]
}

/// Lag measured during one fuse random-write run.
#[derive(Debug, Clone, Default)]
pub struct LagRun {
    /// `doppel status --json` polls.
    pub status: Vec<StatusPoint>,
    /// Probes written through the mount.
    pub probes: u64,
    /// How long writing each probe took on the source.
    pub probe_writes: Sample,
    /// Lag of every probe that appeared in the replica.
    pub probe_lags: Sample,
    /// inotify overflows on the replica side.
    pub overflows: u64,
}

/// Everything the `fuse` mode measured.
#[derive(Debug, Clone)]
pub struct FuseResults {
    /// Per workload, in run order.
    pub metrics: Vec<Metric>,
    /// One per run.
    pub lag: Vec<LagRun>,
    /// The agent's capture back-end, as its status names it.
    pub capture: String,
    /// Ops the agent had acknowledged at the end.
    pub ops: u64,
    /// Bytes of the protected tree compared at the end.
    pub verified_bytes: u64,
    /// Warnings and errors in the agent's log.
    pub log_warnings: usize,
    /// Profiles recorded (`--perf`).
    pub profiles: Vec<PathBuf>,
    /// The agent's limit of open files.
    pub nofile: u64,
}

/// The paths of the benchmark.
struct Paths {
    native: PathBuf,
    src: PathBuf,
    dst: PathBuf,
    home: PathBuf,
}

impl Paths {
    fn dir(&self, side: Side) -> &Path {
        match side {
            Side::Native => &self.native,
            Side::Fuse => &self.src,
        }
    }
}

/// Runs the `fuse` mode: checks, measurements, report.
pub fn main(args: &FuseArgs) -> Result<()> {
    let doppel = agent::doppel_binary()?;
    machine::require_fio()?;
    machine::require_root()?;
    if !Path::new("/dev/fuse").exists() {
        bail!("/dev/fuse is missing: the fuse capture needs the fuse module (modprobe fuse)");
    }
    if args.runs == 0 || args.runtime == 0 || args.size < (1 << 20) || args.files == 0 {
        bail!("--runs, --runtime and --files must be positive and --size at least 1M");
    }
    detach_stale(&args.dir.join("fuse-src"))?;
    let scratch = Scratch::open(&args.dir)?;
    let m = Machine::describe(&args.dir, &doppel)?;
    eprintln!("[bench] {}", m.one_line());
    let results = run(args, &scratch, &doppel)?;
    let report = crate::fuse_report::markdown(args, &m, &results);
    crate::report::publish(&report, args.out.as_deref())?;
    if !args.keep {
        scratch.remove_outputs()?;
    }
    Ok(())
}

/// Detaches a mount left on `path` by a benchmark that was killed (its agent with it), so the
/// scratch directory can be cleared.
fn detach_stale(path: &Path) -> Result<()> {
    let Ok(path) = fs::canonicalize(path).or_else(|_| {
        // A dead FUSE mount fails canonicalize with ENOTCONN: canonicalize the parent.
        let parent = fs::canonicalize(path.parent().context("no parent")?)?;
        Ok::<_, anyhow::Error>(parent.join(path.file_name().context("no name")?))
    }) else {
        return Ok(());
    };
    if mounted(&path)? {
        eprintln!("[bench] detaching a mount left on {} by an earlier run", path.display());
        rustix::mount::unmount(&path, rustix::mount::UnmountFlags::DETACH)
            .with_context(|| format!("detaching {}", path.display()))?;
    }
    Ok(())
}

/// Whether a doppel capture mount (an agent's, live or left by a killed one) is on `path`:
/// the agent's own reading of the mount table.
fn mounted(path: &Path) -> Result<bool> {
    Ok(doppel_capture::fuse::mounts::doppel_mounts().iter().any(|m| m == path))
}

/// A read job over the laid-out read file (the same file for every read workload).
fn read_job(
    args: &FuseArgs,
    name: &'static str,
    rw: &'static str,
    bs: &'static str,
    runtime: Option<u64>,
) -> FioJob {
    FioJob {
        name,
        rw,
        bs,
        size: args.size,
        runtime,
        numjobs: 1,
        end_fsync: false,
        new_file: false,
        file: READ_FILE,
        direct_depth: None,
    }
}

/// The workloads, in the order every run uses.
fn workloads(args: &FuseArgs) -> Vec<Metric> {
    let seq = seq_write(args);
    let rand = |jobs| rand_write(args, jobs);
    let read = |name, rw, bs, runtime| read_job(args, name, rw, bs, runtime);
    let size = format!("{} MiB", args.size >> 20);
    let mut v = vec![
        Metric::new(
            "seqwrite",
            format!("sequential write, 1 MiB blocks, new {size} file, end_fsync"),
            Unit::MibPerSec,
            Some(0.70),
            seq.command_line(),
        ),
        Metric::new(
            "randwrite",
            format!("random write 4 KiB, 1 job, {} s, {size} file", args.runtime),
            Unit::Iops,
            Some(0.40),
            rand(1).command_line(),
        ),
    ];
    if args.rand_jobs > 1 {
        v.push(Metric::new(
            "randwrite-n",
            format!("random write 4 KiB, {} jobs sharing the file, {} s", args.rand_jobs, args.runtime),
            Unit::Iops,
            None,
            rand(args.rand_jobs).command_line(),
        ));
    }
    v.extend([
        Metric::new(
            "vm-randwrite-4k-qd16",
            format!("VM-like: O_DIRECT random write 4 KiB, 16 in flight (libaio), {} s", args.runtime),
            Unit::Iops,
            Some(0.50),
            vm_like(args, "randwrite", "4k").command_line(),
        ),
        Metric::new(
            "vm-seqwrite-64k-qd16",
            format!("VM-like: O_DIRECT sequential write 64 KiB, 16 in flight (libaio), {} s", args.runtime),
            Unit::MibPerSec,
            Some(0.50),
            vm_like(args, "write", "64k").command_line(),
        ),
        Metric::new(
            "randread-cold",
            format!("random read 4 KiB, 1 job, {} s, cold cache", args.runtime),
            Unit::Iops,
            Some(0.90),
            read("randread", "randread", "4k", Some(args.runtime)).command_line(),
        ),
        Metric::new(
            "randread-warm",
            format!("random read 4 KiB, 1 job, {} s, file in the page cache", args.runtime),
            Unit::Iops,
            Some(0.90),
            read("randread", "randread", "4k", Some(args.runtime)).command_line(),
        ),
        Metric::new(
            "seqread-cold",
            format!("sequential read, 1 MiB blocks, {size} file, cold cache"),
            Unit::MibPerSec,
            Some(0.90),
            read("seqread", "read", "1M", None).command_line(),
        ),
    ]);
    let meta = format!("{} files of 4 KiB in {} directories", args.files, args.dirs);
    for (key, what) in [("create", "create + write + close"), ("stat", "lstat"), ("unlink", "unlink")] {
        v.push(Metric::new(
            match key {
                "create" => "meta-create",
                "stat" => "meta-stat",
                _ => "meta-unlink",
            },
            format!("metadata: {what}, {meta}"),
            Unit::FilesPerSec,
            None,
            "in-process (bench/src/meta.rs)".into(),
        ));
    }
    v
}

fn seq_write(args: &FuseArgs) -> FioJob {
    FioJob {
        name: "seqwrite",
        rw: "write",
        bs: "1M",
        size: args.size,
        runtime: None,
        numjobs: 1,
        end_fsync: true,
        new_file: true,
        file: SEQ_FILE,
        direct_depth: None,
    }
}

/// What a hypervisor with `cache=none` does to an image file: `O_DIRECT` writes, 16 in flight,
/// on the laid-out file, in place (the same workloads as mode `vm` measures at QEMU's layer).
fn vm_like(args: &FuseArgs, rw: &'static str, bs: &'static str) -> FioJob {
    FioJob {
        name: if rw == "randwrite" { "vm-randwrite" } else { "vm-seqwrite" },
        rw,
        bs,
        size: args.size,
        runtime: Some(args.runtime),
        numjobs: 1,
        end_fsync: false,
        new_file: false,
        file: RAND_FILE,
        direct_depth: Some(16),
    }
}

fn rand_write(args: &FuseArgs, jobs: u32) -> FioJob {
    FioJob {
        name: "randwrite",
        rw: "randwrite",
        bs: "4k",
        size: args.size,
        runtime: Some(args.runtime),
        numjobs: jobs,
        end_fsync: false,
        new_file: false,
        file: RAND_FILE,
        direct_depth: None,
    }
}

/// Starts the agent, runs every workload `--runs` times on both sides, verifies the replica.
fn run(args: &FuseArgs, scratch: &Scratch, doppel: &Path) -> Result<FuseResults> {
    let p = Paths {
        native: scratch.fuse("native"),
        src: scratch.fuse("src"),
        dst: scratch.fuse("dst"),
        home: scratch.fuse("home"),
    };
    fs::create_dir_all(&p.native)?;
    fs::create_dir_all(&p.src)?;
    let mut flags = vec!["--capture", "fuse"];
    if args.writeback {
        flags.push("--fuse-writeback");
    }
    let mut agent = Agent::start_with(doppel, &p.home, &p.src, &p.dst, &flags)?;
    let nofile = match args.agent_nofile {
        0 => rustix::process::getrlimit(rustix::process::Resource::Nofile).current.unwrap_or(u64::MAX),
        n => agent.set_nofile(n)?,
    };
    eprintln!("[bench] the agent may open {nofile} files");
    if (args.files as u64) + 500 > nofile {
        eprintln!(
            "[bench] warning: the metadata workload ({} files) will likely fail with EMFILE: the fuse \
             daemon holds a descriptor per inode the kernel knows, and it may open {nofile}",
            args.files
        );
    }
    let status = wait_drained(&mut agent, Duration::from_secs(120))?.1;
    if !mounted(&p.src)? || !status.capture.starts_with("fuse") {
        bail!(
            "doppel is replicating but {} is not a fuse mount (capture {:?}); end of its log:\n{}",
            p.src.display(),
            status.capture,
            agent.log_tail(20)
        );
    }
    eprintln!("[bench] doppel protects {} with capture {:?}", p.src.display(), status.capture);

    // Setup, untimed: the files the random-write and read jobs use, the probe directories.
    for side in Side::BOTH {
        let dir = p.dir(side);
        fs::create_dir_all(dir.join("probes"))?;
        for file in [RAND_FILE, READ_FILE] {
            eprintln!("[bench] laying out {}", dir.join(file).display());
            fio::lay_out(dir, file, args.size)?;
        }
    }
    wait_drained(&mut agent, DRAIN_TIMEOUT)?;

    // Someone else's build or test would be timed along with every workload: give it time to
    // end before the first one (each timed run also waits, for up to QUIET_WAIT).
    if !cpu::wait_quiet(Duration::from_secs(600))? {
        eprintln!("[bench] warning: the machine stayed busy for 10 minutes; starting anyway");
    }
    let mut metrics = workloads(args);
    let mut lag = Vec::new();
    for run in 0..args.runs {
        eprintln!("[bench] run {}/{}", run + 1, args.runs);
        let mut lag_run = LagRun::default();
        for side in Side::BOTH {
            let c = fio_run(&mut agent, &p, side, &seq_write(args), Cache::Cold, None)?;
            metrics[0].push(side, c);
        }
        for side in Side::BOTH {
            let probes = Probes { dst: &p.dst, prefix: format!("r{run}-"), every: ms(args.probe_ms) };
            let c = fio_run(
                &mut agent,
                &p,
                side,
                &rand_write(args, 1),
                Cache::Cold,
                Some((&probes, &mut lag_run)),
            )?;
            metrics[1].push(side, c);
        }
        lag.push(lag_run);
        let mut i = 2;
        if args.rand_jobs > 1 {
            for side in Side::BOTH {
                let c = fio_run(&mut agent, &p, side, &rand_write(args, args.rand_jobs), Cache::Cold, None)?;
                metrics[i].push(side, c);
            }
            i += 1;
        }
        for job in [vm_like(args, "randwrite", "4k"), vm_like(args, "write", "64k")] {
            for side in Side::BOTH {
                let c = fio_run(&mut agent, &p, side, &job, Cache::Cold, None)?;
                metrics[i].push(side, c);
            }
            i += 1;
        }
        let read = |name, rw, bs, runtime| read_job(args, name, rw, bs, runtime);
        let randread = read("randread", "randread", "4k", Some(args.runtime));
        for (job, cache) in [
            (&randread, Cache::Cold),
            (&randread, Cache::Warm),
            (&read("seqread", "read", "1M", None), Cache::Cold),
        ] {
            for side in Side::BOTH {
                let c = fio_run(&mut agent, &p, side, job, cache, None)?;
                metrics[i].push(side, c);
            }
            i += 1;
        }
        for side in Side::BOTH {
            let [create, stat, unlink] = meta_run(&mut agent, &p, side, args)?;
            metrics[i].push(side, create);
            metrics[i + 1].push(side, stat);
            metrics[i + 2].push(side, unlink);
        }
    }

    let mut profiles = Vec::new();
    if let Some(dir) = &args.perf {
        fs::create_dir_all(dir)?;
        for job in [seq_write(args), rand_write(args, 1)] {
            profiles.push(profile(&mut agent, &p, &job, dir)?);
        }
    }

    // The replica must equal the source: live (through the mount), then after a clean stop.
    let (_, last) = wait_drained(&mut agent, DRAIN_TIMEOUT)?;
    eprintln!("[bench] comparing {} with {}", p.src.display(), p.dst.display());
    if let Err(diffs) = compare_trees(&p.src, &p.dst, Compare::default()) {
        bail!("the replica {} differs from the source:\n{diffs}", p.dst.display());
    }
    let verified_bytes = tree_bytes(&p.src);
    let log_warnings = fs::read_to_string(agent.log())
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .count();
    agent.stop()?;
    if let Err(diffs) = compare_trees(&p.src, &p.dst, Compare::default()) {
        bail!("after the agent stopped, the replica {} differs from the source:\n{diffs}", p.dst.display());
    }
    eprintln!(
        "[bench] the replica equals the source ({:.2} GiB)",
        verified_bytes as f64 / (1u64 << 30) as f64
    );
    Ok(FuseResults {
        metrics,
        lag,
        capture: status.capture,
        ops: last.acked,
        verified_bytes,
        log_warnings,
        profiles,
        nofile,
    })
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Bytes of the regular files under `root`.
fn tree_bytes(root: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

/// The page cache a timed run starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cache {
    /// Dropped (`echo 3 > drop_caches`) just before.
    Cold,
    /// The job's file read whole just before, so it is cached.
    Warm,
}

/// The probes of one random-write run.
struct Probes<'a> {
    dst: &'a Path,
    prefix: String,
    every: Duration,
}

/// Waits until the agent has acknowledged everything it captured; returns how long that took
/// and the last status.
pub(crate) fn wait_drained(agent: &mut Agent, timeout: Duration) -> Result<(Duration, agent::JobStatus)> {
    let t = Instant::now();
    loop {
        agent.check_alive()?;
        let status = agent.status()?;
        if let Some(s) = status.filter(|s| s.drained()) {
            return Ok((t.elapsed(), s));
        }
        if t.elapsed() > timeout {
            bail!(
                "doppel did not drain within {timeout:?} (last status: {:?}); end of its log {}:\n{}",
                agent.status().ok().flatten(),
                agent.log().display(),
                agent.log_tail(20)
            );
        }
        sleep(Duration::from_millis(20));
    }
}

/// Puts the machine in the same state before every timed run: replication drained, nothing
/// dirty, nobody else busy (as far as waiting helps), and the page cache as `cache` asks.
fn prepare(agent: &mut Agent, cache: Cache, file: Option<&Path>) -> Result<()> {
    wait_drained(agent, DRAIN_TIMEOUT)?;
    machine::sync();
    if !cpu::wait_quiet(QUIET_WAIT)? {
        eprintln!("[bench] warning: the machine stayed busy for {QUIET_WAIT:?}; timing anyway");
    }
    match cache {
        Cache::Cold => machine::drop_caches(),
        Cache::Warm => {
            if let Some(f) = file {
                warm(f)?;
            }
            Ok(())
        }
    }
}

/// Reads `file` whole, 1 MiB at a time, so it is in the page cache.
fn warm(file: &Path) -> Result<()> {
    use std::io::Read;
    let mut f = fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    while f.read(&mut buf)? > 0 {}
    Ok(())
}

/// One timed fio run on `side`, with the probes and status polls of `lag` if given (on both
/// sides, so both carry the same extra load; only the fuse side's are recorded).
fn fio_run(
    agent: &mut Agent,
    p: &Paths,
    side: Side,
    job: &FioJob,
    cache: Cache,
    lag: Option<(&Probes<'_>, &mut LagRun)>,
) -> Result<Cell> {
    let dir = p.dir(side);
    if job.name == "seqwrite" {
        remove_if_present(&dir.join(job.file))?;
    }
    prepare(agent, cache, Some(&dir.join(job.file)))?;
    let (meter, children, agent_before) = (Meter::start()?, cpu::of_waited_children()?, agent.cpu()?);
    let r = match lag {
        None => fio::run(job, dir)?,
        Some((probes, out)) => {
            let (r, l) = with_lag(agent, dir, side, job, probes)?;
            if side == Side::Fuse {
                *out = l;
            }
            r
        }
    };
    let tool_cpu = cpu::of_waited_children()? - children;
    let drain = if side == Side::Fuse { wait_drained(agent, DRAIN_TIMEOUT)?.0 } else { Duration::ZERO };
    let agent_cpu = agent.cpu()? - agent_before;
    let others = meter.others(agent_cpu)?;
    let value = match job.rw {
        "randwrite" | "randread" => r.iops,
        _ => r.bw / (1u64 << 20) as f64,
    };
    let c = Cell { value, wall: r.wall, tool_cpu, agent_cpu, others, drain };
    eprintln!(
        "[bench]   {} {} x{} ({:?}): {:.0} {} in {:.1} s (fio {:.1} s CPU, doppel {:.1} s, others {:.1} s, drained {:.2} s later)",
        side.name(),
        job.name,
        job.numjobs,
        cache,
        value,
        if job.rw.starts_with("rand") { "IOPS" } else { "MiB/s" },
        r.runtime.as_secs_f64(),
        tool_cpu.as_secs_f64(),
        agent_cpu.as_secs_f64(),
        others.as_secs_f64(),
        drain.as_secs_f64()
    );
    Ok(c)
}

/// Runs `job` while polling the agent's status and writing probes into `dir/probes`; on the
/// fuse side also watches the replica's probe directory. Waits for the probes to reach the
/// replica.
fn with_lag(
    agent: &mut Agent,
    dir: &Path,
    side: Side,
    job: &FioJob,
    probes: &Probes<'_>,
) -> Result<(fio::FioResult, LagRun)> {
    let watcher = match side {
        Side::Fuse => Some(probe::Watcher::new(&probes.dst.join("probes"), &probes.prefix)?),
        Side::Native => None,
    };
    let (stop_load, stop_watch, seen) = (AtomicBool::new(false), AtomicBool::new(false), AtomicU64::new(0));
    let probe_dir = dir.join("probes");
    let agent_ref: &Agent = agent;
    let (r, status, written, watched) = thread::scope(|s| {
        let watching = watcher.map(|w| s.spawn(|| w.run(&stop_watch, &seen)));
        let polling = s.spawn(|| probe::poll_status(agent_ref, Duration::from_millis(50), &stop_load));
        let writing = s.spawn(|| probe::write_probes(&probe_dir, &probes.prefix, probes.every, &stop_load));
        let r = fio::run(job, dir);
        stop_load.store(true, Ordering::Relaxed);
        let status = polling.join().expect("status thread");
        let written = writing.join().expect("probe thread");
        // Let the last probes arrive (the agent drains the random writes before them).
        if let (Some(_), Ok(w)) = (&watching, &written) {
            let t = Instant::now();
            while seen.load(Ordering::Relaxed) < w.count && t.elapsed() < DRAIN_TIMEOUT + PROBE_GRACE {
                sleep(Duration::from_millis(20));
            }
        }
        stop_watch.store(true, Ordering::Relaxed);
        let watched = watching.map(|w| w.join().expect("watcher thread"));
        (r, status, written, watched)
    });
    let (r, written) = (r?, written?);
    let mut lag =
        LagRun { status, probes: written.count, probe_writes: written.write_times, ..LagRun::default() };
    if let Some(w) = watched {
        let (seen, overflows) = w?;
        lag.probe_lags = Sample::new(seen.into_values().collect());
        lag.overflows = overflows;
        if (lag.probe_lags.len() as u64) < lag.probes {
            eprintln!(
                "[bench] warning: {} of {} probes never appeared in the replica",
                lag.probes - lag.probe_lags.len() as u64,
                lag.probes
            );
        }
    }
    Ok((r, lag))
}

/// The metadata workload on `side`: create, stat, unlink, timed phase by phase.
fn meta_run(agent: &mut Agent, p: &Paths, side: Side, args: &FuseArgs) -> Result<[Cell; 3]> {
    let root = p.dir(side).join("meta");
    fs::create_dir_all(&root)?;
    meta::prepare(&root, args.dirs)?;
    prepare(agent, Cache::Cold, None)?;
    let me = std::process::id();
    let (meter, self_before, agent_before) = (Meter::start()?, cpu::of_process(me)?, agent.cpu()?);
    let t = meta::run(&root, args.dirs, args.files)?;
    let tool_cpu = cpu::of_process(me)? - self_before;
    let drain = if side == Side::Fuse { wait_drained(agent, DRAIN_TIMEOUT)?.0 } else { Duration::ZERO };
    let agent_cpu = agent.cpu()? - agent_before;
    let others = meter.others(agent_cpu)?;
    meta::clean(&root, args.dirs)?;
    let files = args.files as f64;
    // The CPU and drain columns are for the whole workload; they are given on the create row.
    let cell = |d: Duration, whole: bool| Cell {
        value: files / d.as_secs_f64(),
        wall: d,
        tool_cpu: if whole { tool_cpu } else { Duration::ZERO },
        agent_cpu: if whole { agent_cpu } else { Duration::ZERO },
        others: if whole { others } else { Duration::ZERO },
        drain: if whole { drain } else { Duration::ZERO },
    };
    eprintln!(
        "[bench]   {} metadata: create {:.0}/s, stat {:.0}/s, unlink {:.0}/s (CPU: bench {:.1} s, doppel {:.1} s, others {:.1} s; drained {:.2} s later)",
        side.name(),
        files / t.create.as_secs_f64(),
        files / t.stat.as_secs_f64(),
        files / t.unlink.as_secs_f64(),
        tool_cpu.as_secs_f64(),
        agent_cpu.as_secs_f64(),
        others.as_secs_f64(),
        drain.as_secs_f64()
    );
    Ok([cell(t.create, true), cell(t.stat, false), cell(t.unlink, false)])
}

/// One more, untimed, fuse run of `job` under `perf record` attached to the agent; returns the
/// profile's path.
fn profile(agent: &mut Agent, p: &Paths, job: &FioJob, dir: &Path) -> Result<PathBuf> {
    if job.name == "seqwrite" {
        remove_if_present(&p.src.join(job.file))?;
    }
    prepare(agent, Cache::Cold, None)?;
    let out = dir.join(format!("fuse-{}.perf.data", job.name));
    let log = fs::File::create(out.with_extension("log"))?;
    let mut perf = Command::new("perf")
        .args(["record", "-F", "499", "--call-graph", "dwarf,16384", "-p"])
        .arg(agent.pid()?.to_string())
        .arg("-o")
        .arg(&out)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting perf record (apt-get install -y linux-perf)")?;
    sleep(Duration::from_secs(1));
    let r = fio::run(job, &p.src);
    let drained = wait_drained(agent, DRAIN_TIMEOUT);
    stop_perf(&mut perf)?;
    let (r, (drain, _)) = (r?, drained?);
    eprintln!(
        "[bench] profiled fuse {}: {:.0} IOPS, {:.0} MiB/s, drained {:.2} s later -> {}",
        job.name,
        r.iops,
        r.bw / (1u64 << 20) as f64,
        drain.as_secs_f64(),
        out.display()
    );
    Ok(out)
}

fn stop_perf(perf: &mut Child) -> Result<()> {
    kill_process(Pid::from_child(perf), Signal::INT).context("stopping perf")?;
    let st = perf.wait()?;
    // perf record exits on SIGINT by re-raising it once the profile is written.
    if !st.success() && std::os::unix::process::ExitStatusExt::signal(&st) != Some(Signal::INT.as_raw()) {
        eprintln!("[bench] warning: perf record exited with {st}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.0);
        assert!(median(vec![]).is_nan());
    }
}
