//! `vm`: what protection costs a virtual machine's disk, measured at QEMU's block layer.
//!
//! Three `qemu-storage-daemon`s (the part of QEMU that holds a guest's disks), each with block
//! node `disk0` on a raw 1 GiB image opened as QEMU opens a disk with `cache=none,io=native`
//! (`cache.direct=on,aio=native`), and a writable NBD export of the node on a Unix socket, the
//! "guest":
//!
//! - **unprotected**: the image is a plain file of `--dir`;
//! - **fuse**: the image lives in a job root protected by `doppel protect --capture fuse`, and
//!   the daemon opens it through the capture mount;
//! - **vm**: the image is a plain file, and `doppel protect --vm QMP --vm-disk disk0` captures
//!   the node at the hypervisor (an active, write-blocking mirror to doppel's NBD server).
//!
//! Two references without doppel run on the unprotected daemon: QEMU's same active mirror to
//! a `null-co` node, and to another daemon's NBD export of a `null-co` node (what the mirror,
//! and the mirror plus an NBD round trip, cost by themselves). With `--remote`, a fourth daemon
//! is captured by an agent replicating to a `doppel target` on 127.0.0.1.
//!
//! Both agents replicate to a local directory and stay up for the whole run. fio drives the
//! guest's workloads through its `nbd` engine (libnbd, asynchronous: 16 requests really in
//! flight in QEMU's block layer, as a virtio disk with a queue depth of 16 has), for each
//! workload in turn on each configuration (the same order in every run), each from the same
//! state: replication drained, nothing dirty, the machine quiet, the page cache dropped. During
//! every run the agent's status is polled and probes measure the lag end to end: a stamped
//! 4 KiB block written through the same NBD export every `--probe-ms` into the last MiB of the
//! disk (which fio leaves alone), and seen in the replica image by polling its slot. At the end
//! every replica image must equal its disk, live and after a clean stop.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, sleep};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rustix::process::{Pid, Signal, kill_process};

use crate::VmArgs;
use crate::agent::{self, Agent};
use crate::cpu::{self, Meter};
use crate::fuse::wait_drained;
use crate::machine::{self, Machine};
use crate::probe::{self, StatusPoint};
use crate::scratch::{Scratch, remove_if_present};
use crate::stats::Sample;

/// How long to wait for other users of the machine to go quiet before a timed run.
const QUIET_WAIT: Duration = Duration::from_secs(60);
/// How long replication may take to drain after a workload (or the initial mirror).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(900);
/// How long the last probes may take to appear once the agent has drained.
const PROBE_GRACE: Duration = Duration::from_secs(10);
/// The tail of the disk the probes write to (fio's jobs stop short of it).
const PROBE_AREA: u64 = 1 << 20;
/// Size of a probe (one block of the guest's file system).
const PROBE_SIZE: usize = 4096;
/// The image's file name (in the fuse job root and the plain directories).
const IMAGE: &str = "disk.raw";
/// The NBD export name of the guest's disk.
const EXPORT: &str = "guest";

/// A protection configuration of the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Config {
    /// No protection.
    None,
    /// Reference, no doppel: the unprotected disk with QEMU's active mirror (write-blocking) to
    /// a `null-co` node in the same daemon: what the mirror itself costs.
    MirrorNull,
    /// Reference, no doppel: the same mirror to another `qemu-storage-daemon`'s NBD export of a
    /// `null-co` node over a Unix socket: the mirror plus an NBD round trip per write, to a
    /// server that does nothing with the data.
    MirrorNbd,
    /// The image in a `--capture fuse` job root, opened through the mount.
    Fuse,
    /// `doppel protect --vm`: the node captured at the hypervisor.
    Vm,
    /// The same, replicating to a `doppel target` on 127.0.0.1 (`--remote`).
    VmRemote,
}

impl Config {
    /// All of them, in the order every run uses.
    pub const ALL: [Config; 6] =
        [Config::None, Config::MirrorNull, Config::MirrorNbd, Config::Fuse, Config::Vm, Config::VmRemote];

    /// Short name.
    pub fn name(self) -> &'static str {
        match self {
            Config::None => "unprotected",
            Config::MirrorNull => "mirror to null-co",
            Config::MirrorNbd => "mirror to NBD null",
            Config::Fuse => "fuse",
            Config::Vm => "vm",
            Config::VmRemote => "vm, remote target",
        }
    }

    /// The disk (daemon) it runs on: the references run on the unprotected one.
    fn disk(self) -> usize {
        match self {
            Config::None | Config::MirrorNull | Config::MirrorNbd => 0,
            Config::Fuse => 1,
            Config::Vm => 2,
            Config::VmRemote => 3,
        }
    }
}

/// One of the O_DIRECT workloads of the fuse benchmark.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    /// Short name.
    pub key: &'static str,
    /// fio's `--rw`.
    pub rw: &'static str,
    /// fio's `--bs`.
    pub bs: &'static str,
    /// IOPS (random) or MiB/s (sequential) is the headline.
    pub iops: bool,
}

/// The workloads, in the order every run uses.
pub const WORKLOADS: [Workload; 2] = [
    Workload { key: "randwrite-4k-qd16", rw: "randwrite", bs: "4k", iops: true },
    Workload { key: "seqwrite-64k-qd16", rw: "write", bs: "64k", iops: false },
];

impl Workload {
    /// fio's arguments for a time-based run against the NBD export behind `socket`.
    pub fn args(&self, args: &VmArgs, socket: &Path) -> Vec<String> {
        vec![
            format!("--name={}", self.key),
            "--ioengine=nbd".into(),
            format!("--uri=nbd+unix:///{EXPORT}?socket={}", socket.display()),
            format!("--rw={}", self.rw),
            format!("--bs={}", self.bs),
            "--iodepth=16".into(),
            format!("--size={}", args.size - PROBE_AREA),
            format!("--runtime={}", args.runtime),
            "--time_based".into(),
            "--output-format=json".into(),
            "--eta=never".into(),
        ]
    }

    /// The command line, as the report quotes it.
    pub fn command_line(&self, args: &VmArgs) -> String {
        let a: Vec<String> = self
            .args(args, Path::new("SOCKET"))
            .into_iter()
            .filter(|a| !a.starts_with("--output-format") && !a.starts_with("--eta"))
            .collect();
        format!("fio {}", a.join(" "))
    }
}

/// One timed run of one workload on one configuration.
#[derive(Debug, Clone, Default)]
pub struct Cell {
    /// IOPS.
    pub iops: f64,
    /// MiB/s.
    pub mibs: f64,
    /// Completion latency of fio's writes, p50 and p99.
    pub clat: (Duration, Duration),
    /// CPU time of fio.
    pub fio_cpu: Duration,
    /// CPU time of the configuration's qemu-storage-daemon during the run.
    pub qsd_cpu: Duration,
    /// CPU time of the configuration's agent from the start of the run until drained.
    pub agent_cpu: Duration,
    /// CPU of everything else meanwhile.
    pub others: Duration,
    /// From the end of the run until the agent had acknowledged everything.
    pub drain: Duration,
    /// Per thread kind of the daemons and the agent during the run (until drained): CPU
    /// seconds, and seconds runnable but waiting for a CPU (`/proc/PID/task/TID/schedstat`).
    pub threads: Vec<(String, f64, f64)>,
    /// `doppel status --json` polls.
    pub status: Vec<StatusPoint>,
    /// Probes written.
    pub probes: u64,
    /// Lag of every probe seen in the replica.
    pub probe_lags: Sample,
    /// How long each probe's write took for the guest.
    pub probe_writes: Sample,
}

impl Cell {
    /// The headline value of `w`.
    pub fn value(&self, w: &Workload) -> f64 {
        if w.iops { self.iops } else { self.mibs }
    }
}

/// Everything the `vm` mode measured.
#[derive(Debug, Clone)]
pub struct VmResults {
    /// `cells[workload][config]`: one per run.
    pub cells: Vec<Vec<Vec<Cell>>>,
    /// Bytes compared per replica (equal, live and after a clean stop).
    pub verified: Vec<(Config, u64)>,
    /// The agents' capture back-ends, as their status names them.
    pub captures: Vec<(Config, String)>,
    /// Warning and error lines in each agent's log.
    pub log_warnings: Vec<(Config, usize)>,
    /// Profiles recorded (`--perf`).
    pub profiles: Vec<PathBuf>,
    /// `qemu-storage-daemon --version`, first line.
    pub qemu: String,
}

/// Runs the `vm` mode: checks, measurements, report.
pub fn main(args: &VmArgs) -> Result<()> {
    let doppel = agent::doppel_binary()?;
    machine::require_fio()?;
    machine::require_root()?;
    if !Path::new("/dev/fuse").exists() {
        bail!("/dev/fuse is missing: the fuse capture and QEMU's raw views need it (modprobe fuse)");
    }
    let qemu = first_line("qemu-storage-daemon", &["--version"]).context(
        "qemu-storage-daemon does not run: install it (Debian: apt-get install -y qemu-system-x86 or qemu-utils)",
    )?;
    let engines = Command::new("fio").arg("--enghelp").output().context("fio --enghelp")?;
    if !String::from_utf8_lossy(&engines.stdout).lines().any(|l| l.trim() == "nbd") {
        bail!("this fio has no nbd engine (fio --enghelp); Debian's fio has it (libnbd)");
    }
    if args.runs == 0 || args.runtime == 0 || args.size < 16 * PROBE_AREA {
        bail!("--runs and --runtime must be positive and --size at least 16M");
    }
    detach_stale(&args.dir.join("fuse-vm-src"))?;
    let scratch = Scratch::open(&args.dir)?;
    let m = Machine::describe(&args.dir, &doppel)?;
    eprintln!("[bench] {}", m.one_line());
    let results = run(args, &scratch, &doppel, qemu)?;
    let report = crate::vm_report::markdown(args, &m, &results);
    crate::report::publish(&report, args.out.as_deref())?;
    if !args.keep {
        scratch.remove_outputs()?;
    }
    Ok(())
}

/// A protected disk: its daemon, the agent, where the replica image lands, the probes.
struct Disk {
    config: Config,
    qsd: Qsd,
    agent: Option<Agent>,
    /// The image as the daemon opened it (through the mount for `Fuse`).
    image: PathBuf,
    replica: Option<PathBuf>,
    probe_client: Nbd,
    next_probe: u64,
}

/// Starts the three disks, runs every workload `--runs` times on each, verifies the replicas.
fn run(args: &VmArgs, scratch: &Scratch, doppel: &Path, qemu: String) -> Result<VmResults> {
    let dir = |n: &str| scratch.fuse(&format!("vm-{n}"));
    // Images first, laid out with data (a disk in use is not a sparse file), untimed.
    let (plain, src, vm_dir) = (dir("plain"), dir("src"), dir("vmdisk"));
    for d in [&plain, &src, &vm_dir] {
        fs::create_dir_all(d)?;
        eprintln!("[bench] laying out {}", d.join(IMAGE).display());
        lay_out(&d.join(IMAGE), args.size)?;
    }
    machine::sync();

    let mut disks = Vec::new();
    // Unprotected.
    let qsd = Qsd::start(&dir("qsd-none"), &plain.join(IMAGE))?;
    disks.push(Disk::new(Config::None, qsd, None, plain.join(IMAGE), None)?);
    // The image in a fuse job root: the agent first, then the daemon opens it through the mount.
    let history: Vec<&str> = args.history.iter().flat_map(|h| ["--history", h.as_str()]).collect();
    let fuse_flags = [&["--capture", "fuse"][..], &history].concat();
    let mut fuse_agent = Agent::start_with(doppel, &dir("home-fuse"), &src, &dir("dst-fuse"), &fuse_flags)?;
    let (_, st) = wait_drained(&mut fuse_agent, DRAIN_TIMEOUT)?;
    if !st.capture.starts_with("fuse") {
        bail!("the fuse agent captures with {:?}; end of its log:\n{}", st.capture, fuse_agent.log_tail(20));
    }
    let qsd = Qsd::start(&dir("qsd-fuse"), &src.join(IMAGE))?;
    disks.push(Disk::new(
        Config::Fuse,
        qsd,
        Some(fuse_agent),
        src.join(IMAGE),
        Some(dir("dst-fuse").join(IMAGE)),
    )?);
    // Hypervisor capture: the daemon first, then the agent attaches to it over QMP. `--vm` takes
    // the place of the source directory (`protect --vm=QMP --name bench --to DST --vm-disk disk0`).
    let qsd = Qsd::start(&dir("qsd-vm"), &vm_dir.join(IMAGE))?;
    let vm_flag = PathBuf::from(format!("--vm={}", qsd.qmp().display()));
    let vm_flags = [&["--vm-disk", "disk0"][..], &history].concat();
    let vm_agent = Agent::start_with(doppel, &dir("home-vm"), &vm_flag, &dir("dst-vm"), &vm_flags)?;
    disks.push(Disk::new(
        Config::Vm,
        qsd,
        Some(vm_agent),
        vm_dir.join(IMAGE),
        Some(dir("dst-vm").join("disk0.raw")),
    )?);

    // `--remote`: the same capture of a fourth daemon, to a `doppel target` on 127.0.0.1.
    let _target = if args.remote {
        let (src_home, data) = (dir("home-remote"), dir("target-data"));
        let source_id = crate::target::identity(doppel, &src_home)?;
        let target = LocalTarget::start(doppel, &dir("target-home"), &data, &source_id)?;
        let remote_dir = dir("remotedisk");
        fs::create_dir_all(&remote_dir)?;
        lay_out(&remote_dir.join(IMAGE), args.size)?;
        let qsd = Qsd::start(&dir("qsd-remote"), &remote_dir.join(IMAGE))?;
        let flag = PathBuf::from(format!("--vm={}", qsd.qmp().display()));
        let agent = Agent::start_with(
            doppel,
            &src_home,
            &flag,
            Path::new(&target.addr),
            &["--vm-disk", "disk0", "--target-id", &target.id],
        )?;
        let replica = data.join("replicas").join(REMOTE_SOURCE).join(agent::JOB).join("disk0.raw");
        disks.push(Disk::new(Config::VmRemote, qsd, Some(agent), remote_dir.join(IMAGE), Some(replica))?);
        Some(target)
    } else {
        None
    };

    // The reference NBD server: a daemon exporting a null-co node (it drops every write).
    let null_dir = dir("qsd-null");
    let null = NullServer::start(&null_dir, args.size)?;

    let mut captures = Vec::new();
    for d in &mut disks {
        if let Some(a) = d.agent.as_mut() {
            eprintln!("[bench] waiting for the initial mirror of the {} disk", d.config.name());
            let (t, st) = wait_drained(a, DRAIN_TIMEOUT)?;
            eprintln!(
                "[bench]   {} agent replicating ({}) after {:.1} s",
                d.config.name(),
                st.capture,
                t.as_secs_f64()
            );
            captures.push((d.config, st.capture));
        }
    }
    if !cpu::wait_quiet(Duration::from_secs(600))? {
        eprintln!("[bench] warning: the machine stayed busy for 10 minutes; starting anyway");
    }

    let mut cells = vec![vec![Vec::new(); Config::ALL.len()]; WORKLOADS.len()];
    for run in 0..args.runs {
        eprintln!("[bench] run {}/{}", run + 1, args.runs);
        for (wi, w) in WORKLOADS.iter().enumerate() {
            for cfg in configs(args) {
                let target = match cfg {
                    Config::MirrorNull => Some(MirrorTarget::Null(args.size)),
                    Config::MirrorNbd => Some(MirrorTarget::Nbd(null.socket())),
                    _ => None,
                };
                if let Some(t) = &target {
                    reference_mirror(&disks[0].qsd.qmp(), Some(t))?;
                }
                let extra = match (cfg, &_target) {
                    (Config::MirrorNbd, _) => vec![("null-nbd", null.pid())],
                    (Config::VmRemote, Some(t)) => vec![("target", t.pid())],
                    _ => vec![],
                };
                let c = timed(args, &mut disks, cfg, w, &extra);
                if target.is_some() {
                    reference_mirror(&disks[0].qsd.qmp(), None)?;
                }
                cells[wi][cfg as usize].push(c?);
            }
        }
    }

    let mut profiles = Vec::new();
    if let Some(pdir) = &args.perf {
        fs::create_dir_all(pdir)?;
        for w in &WORKLOADS {
            for ci in [Config::Fuse.disk(), Config::Vm.disk()] {
                profiles.push(profile(args, &mut disks, ci, w, pdir)?);
            }
        }
    }

    // Every replica must equal its disk: live, then after a clean stop of the agent (the
    // daemon first for fuse: it holds the image open through the mount).
    let mut verified = Vec::new();
    let mut log_warnings = Vec::new();
    for d in &mut disks {
        let (Some(mut a), Some(replica)) = (d.agent.take(), d.replica.clone()) else { continue };
        wait_drained(&mut a, DRAIN_TIMEOUT)?;
        let bytes = compare_images(&d.image, &replica)
            .with_context(|| format!("the {} replica, live", d.config.name()))?;
        log_warnings.push((
            d.config,
            fs::read_to_string(a.log())
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
                .count(),
        ));
        let image = match d.config {
            Config::Fuse => {
                d.qsd.stop()?;
                a.stop()?;
                // Unmounted now: the image as it is on disk.
                d.image.clone()
            }
            _ => {
                a.stop()?;
                d.image.clone()
            }
        };
        compare_images(&image, &replica)
            .with_context(|| format!("the {} replica, after the agent stopped", d.config.name()))?;
        eprintln!("[bench] the {} replica equals its disk ({} MiB)", d.config.name(), bytes >> 20);
        verified.push((d.config, bytes));
    }
    for d in &mut disks {
        d.qsd.stop()?;
    }
    drop(null);
    Ok(VmResults { cells, verified, captures, log_warnings, profiles, qemu })
}

impl Disk {
    fn new(
        config: Config,
        qsd: Qsd,
        agent: Option<Agent>,
        image: PathBuf,
        replica: Option<PathBuf>,
    ) -> Result<Disk> {
        let probe_client = Nbd::connect(&qsd.nbd(), EXPORT)?;
        Ok(Disk { config, qsd, agent, image, replica, probe_client, next_probe: 0 })
    }
}

/// The configurations of this run, in order.
pub fn configs(args: &VmArgs) -> Vec<Config> {
    Config::ALL.into_iter().filter(|c| args.remote || *c != Config::VmRemote).collect()
}

/// The source name the local target knows the remote agent by.
const REMOTE_SOURCE: &str = "src";

/// A `doppel target` on 127.0.0.1 that allows one source. Killed on drop.
struct LocalTarget {
    addr: String,
    id: String,
    child: Child,
}

impl LocalTarget {
    fn start(bin: &Path, home: &Path, data: &Path, source_id: &str) -> Result<LocalTarget> {
        let id = crate::target::identity(bin, home)?;
        let cfg = home.with_extension("toml");
        fs::write(&cfg, format!("[[target.allow]]\nname = \"{REMOTE_SOURCE}\"\nid = \"{source_id}\"\n"))?;
        let addr_file = home.join("run/target.addr");
        let _ = fs::remove_file(&addr_file);
        let log = File::create(home.with_extension("log"))?;
        let mut child = Command::new(bin)
            .arg("--home")
            .arg(home)
            .arg("--config")
            .arg(&cfg)
            .args(["target", "--listen", "127.0.0.1:0", "--data"])
            .arg(data)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting doppel target")?;
        let t = Instant::now();
        loop {
            if let Ok(a) = fs::read_to_string(&addr_file) {
                return Ok(LocalTarget { addr: a.trim().to_string(), id, child });
            }
            if child.try_wait()?.is_some() || t.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                bail!(
                    "doppel target did not start: {}",
                    fs::read_to_string(home.with_extension("log")).unwrap_or_default().trim()
                );
            }
            sleep(Duration::from_millis(20));
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for LocalTarget {
    fn drop(&mut self) {
        let _ = kill_process(Pid::from_child(&self.child), Signal::TERM);
        let t = Instant::now();
        while matches!(self.child.try_wait(), Ok(None)) && t.elapsed() < Duration::from_secs(10) {
            sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Puts the machine in the same state before every timed run.
fn prepare(disks: &mut [Disk]) -> Result<()> {
    for d in disks.iter_mut() {
        if let Some(a) = d.agent.as_mut() {
            wait_drained(a, DRAIN_TIMEOUT)?;
        }
    }
    machine::sync();
    if !cpu::wait_quiet(QUIET_WAIT)? {
        eprintln!("[bench] warning: the machine stayed busy for {QUIET_WAIT:?}; timing anyway");
    }
    machine::drop_caches()
}

/// One timed run of `w` on configuration `cfg`, with status polls and probes; `extra`: more
/// processes whose threads to account (label, pid).
fn timed(
    args: &VmArgs,
    disks: &mut [Disk],
    cfg: Config,
    w: &Workload,
    extra: &[(&'static str, u32)],
) -> Result<Cell> {
    prepare(disks)?;
    let d = &mut disks[cfg.disk()];
    let qsd_pid = d.qsd.pid();
    let agent_pid = d.agent.as_ref().map(|a| a.pid()).transpose()?;
    let mut pids: Vec<(&'static str, u32)> = vec![("qsd", qsd_pid)];
    pids.extend(agent_pid.map(|p| ("doppel", p)));
    pids.extend_from_slice(extra);
    let threads_before = threads_of(&pids);
    let (meter, children) = (Meter::start()?, cpu::of_waited_children()?);
    let (qsd_before, agent_before) = (cpu::of_process(qsd_pid)?, agent_cpu(d)?);

    let stop_load = AtomicBool::new(false);
    let stop_watch = AtomicBool::new(false);
    let started = AtomicU64::new(d.next_probe);
    let first = d.next_probe;
    let every = Duration::from_millis(args.probe_ms);
    let socket = d.qsd.nbd();
    let replica = d.replica.clone();
    let agent_ref = d.agent.as_ref();
    let client = &mut d.probe_client;
    let size = args.size;
    let seen_n = AtomicU64::new(0);
    let (fio, status, written, seen) = thread::scope(|s| {
        let polling =
            agent_ref.map(|a| s.spawn(|| probe::poll_status(a, Duration::from_millis(50), &stop_load)));
        let writing = s.spawn(|| write_probes(client, size, first, every, &started, &stop_load));
        let watching = replica
            .as_ref()
            .map(|r| s.spawn(|| watch_probes(r, size, first, &started, &seen_n, &stop_watch)));
        let fio = run_fio(w, args, &socket);
        let fio_end = Instant::now();
        stop_load.store(true, Ordering::Relaxed);
        let status = polling.map(|p| p.join().expect("status thread")).unwrap_or_default();
        let written = writing.join().expect("probe thread");
        // Let the last probes arrive: until the agent has drained (the backlog of a run may
        // take seconds), then PROBE_GRACE more at most, so a lost probe is reported, not waited
        // for forever.
        let mut drained_at = None::<Instant>;
        if let (Some(_), Ok(w)) = (&watching, &written) {
            let (t, mut asked) = (Instant::now(), Instant::now());
            while seen_n.load(Ordering::Relaxed) < w.count && t.elapsed() < DRAIN_TIMEOUT {
                if drained_at.is_some_and(|d| d.elapsed() > PROBE_GRACE) {
                    break;
                }
                if drained_at.is_none() && asked.elapsed() > Duration::from_millis(100) {
                    asked = Instant::now();
                    let drained =
                        agent_ref.and_then(|a| a.status().ok().flatten()).is_none_or(|s| s.drained());
                    drained_at = drained.then(Instant::now);
                }
                sleep(Duration::from_millis(5));
            }
        }
        stop_watch.store(true, Ordering::Relaxed);
        let seen = watching.map(|h| h.join().expect("watcher thread"));
        (fio.map(|f| (f, fio_end, drained_at)), status, written, seen)
    });
    let ((fio, fio_end, drained_at), written) = (fio?, written?);
    d.next_probe = first + written.count;
    let fio_cpu = cpu::of_waited_children()? - children;
    let qsd_cpu = cpu::of_process(qsd_pid)? - qsd_before;
    let drain = match d.agent.as_mut() {
        Some(a) => {
            wait_drained(a, DRAIN_TIMEOUT)?;
            drained_at.map_or_else(|| fio_end.elapsed(), |d| d - fio_end)
        }
        None => Duration::ZERO,
    };
    let agent_cpu = agent_cpu(d)? - agent_before;
    let others = meter.others(agent_cpu + qsd_cpu)?;
    let threads = thread_delta(&threads_before, &threads_of(&pids));
    let probe_lags = match seen {
        Some(r) => Sample::new(r?),
        None => Sample::default(),
    };
    if d.replica.is_some() && (probe_lags.len() as u64) < written.count {
        eprintln!(
            "[bench] warning: {} of {} probes never appeared in the {} replica",
            written.count - probe_lags.len() as u64,
            written.count,
            d.config.name()
        );
    }
    let c = Cell {
        iops: fio.iops,
        mibs: fio.bw / (1u64 << 20) as f64,
        clat: fio.clat,
        fio_cpu,
        qsd_cpu,
        agent_cpu,
        others,
        drain,
        threads,
        status,
        probes: written.count,
        probe_lags,
        probe_writes: written.times,
    };
    let lag = Sample::new(c.status.iter().map(|p| Duration::from_secs_f64(p.lag)).collect());
    eprintln!(
        "[bench]   {} {}: {:.0} IOPS, {:.1} MiB/s, clat p99 {:.2} ms (fio {:.1} s CPU, qsd {:.1} s, doppel {:.1} s, others {:.1} s; drained {:.2} s later; lag_seconds p99 {:.1} ms, probe lag p50/p99 {:.1}/{:.1} ms, {}/{} probes)",
        cfg.name(),
        w.key,
        c.iops,
        c.mibs,
        c.clat.1.as_secs_f64() * 1e3,
        c.fio_cpu.as_secs_f64(),
        c.qsd_cpu.as_secs_f64(),
        c.agent_cpu.as_secs_f64(),
        c.others.as_secs_f64(),
        c.drain.as_secs_f64(),
        lag.percentile(99.0).as_secs_f64() * 1e3,
        c.probe_lags.percentile(50.0).as_secs_f64() * 1e3,
        c.probe_lags.percentile(99.0).as_secs_f64() * 1e3,
        c.probe_lags.len(),
        c.probes,
    );
    Ok(c)
}

fn agent_cpu(d: &Disk) -> Result<Duration> {
    d.agent.as_ref().map_or(Ok(Duration::ZERO), |a| a.cpu())
}

// ---- probes ----

/// Offset of probe `k`'s slot: the last MiB of the disk, round-robin.
fn slot(size: u64, k: u64) -> u64 {
    size - PROBE_AREA + (k % (PROBE_AREA / PROBE_SIZE as u64)) * PROBE_SIZE as u64
}

struct Written {
    count: u64,
    times: Sample,
}

/// Writes probe `first + i` every `every` (absolute deadlines) until `stop`, through the guest's
/// NBD export; each holds its number and the time its write began. `started` counts the probes
/// whose write has begun.
fn write_probes(
    client: &mut Nbd,
    size: u64,
    first: u64,
    every: Duration,
    started: &AtomicU64,
    stop: &AtomicBool,
) -> Result<Written> {
    let t0 = Instant::now();
    let mut times = Vec::new();
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let due = t0 + every * i as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            sleep(wait.min(Duration::from_millis(20)));
            continue;
        }
        let k = first + i;
        let t = Instant::now();
        let data = crate::lag::stamped("probe", k, crate::lag::epoch_ns(), PROBE_SIZE);
        started.store(k + 1, Ordering::Release);
        client.write(slot(size, k), &data)?;
        times.push(t.elapsed());
        i += 1;
    }
    Ok(Written { count: i, times: Sample::new(times) })
}

/// Polls the slots of the probes whose write has begun, every millisecond, in the replica image,
/// until `stop`; returns the lag of each probe seen (its stamp to the first read that found it).
fn watch_probes(
    replica: &Path,
    size: u64,
    first: u64,
    started: &AtomicU64,
    seen: &AtomicU64,
    stop: &AtomicBool,
) -> Result<Vec<Duration>> {
    let f = File::open(replica).with_context(|| format!("opening {}", replica.display()))?;
    let mut pending: Vec<u64> = Vec::new();
    let mut next = first;
    let mut lags = Vec::new();
    let mut buf = vec![0u8; PROBE_SIZE];
    while !stop.load(Ordering::Relaxed) {
        let upto = started.load(Ordering::Acquire);
        while next < upto {
            pending.push(next);
            next += 1;
        }
        let mut i = 0;
        while i < pending.len() {
            let k = pending[i];
            if f.read_exact_at(&mut buf, slot(size, k)).is_ok() {
                let now = crate::lag::epoch_ns();
                if let Some((n, t)) = crate::lag::read_stamp("probe", &buf)
                    && n == k
                {
                    lags.push(Duration::from_nanos(now.saturating_sub(t)));
                    seen.fetch_add(1, Ordering::Relaxed);
                    pending.swap_remove(i);
                    continue;
                }
            }
            i += 1;
        }
        sleep(Duration::from_millis(1));
    }
    Ok(lags)
}

/// A minimal NBD client (fixed newstyle, `NBD_OPT_EXPORT_NAME`, simple replies): enough to
/// write probes through the daemon's export as the guest's fio does.
struct Nbd {
    s: UnixStream,
    handle: u64,
}

impl Nbd {
    fn connect(socket: &Path, name: &str) -> Result<Nbd> {
        let mut s =
            UnixStream::connect(socket).with_context(|| format!("connecting to {}", socket.display()))?;
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello)?;
        if hello[..8] != 0x4e42_444d_4147_4943u64.to_be_bytes()
            || hello[8..16] != 0x4948_4156_454f_5054u64.to_be_bytes()
        {
            bail!("{} does not speak newstyle NBD", socket.display());
        }
        let flags = u16::from_be_bytes([hello[16], hello[17]]) & 3; // fixed newstyle, no zeroes
        s.write_all(&u32::from(flags).to_be_bytes())?;
        let mut opt = Vec::new();
        opt.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
        opt.extend_from_slice(&1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME
        opt.extend_from_slice(&(name.len() as u32).to_be_bytes());
        opt.extend_from_slice(name.as_bytes());
        s.write_all(&opt)?;
        let mut info = vec![0u8; if flags & 2 != 0 { 10 } else { 134 }];
        s.read_exact(&mut info).context("the export's size and flags")?;
        Ok(Nbd { s, handle: 0 })
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.handle += 1;
        let mut req = Vec::with_capacity(28 + data.len());
        req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        req.extend_from_slice(&0u16.to_be_bytes());
        req.extend_from_slice(&1u16.to_be_bytes()); // NBD_CMD_WRITE
        req.extend_from_slice(&self.handle.to_be_bytes());
        req.extend_from_slice(&offset.to_be_bytes());
        req.extend_from_slice(&(data.len() as u32).to_be_bytes());
        req.extend_from_slice(data);
        self.s.write_all(&req)?;
        let mut reply = [0u8; 16];
        self.s.read_exact(&mut reply)?;
        let (magic, error) = (
            u32::from_be_bytes(reply[0..4].try_into().unwrap()),
            u32::from_be_bytes(reply[4..8].try_into().unwrap()),
        );
        if magic != 0x6744_6698 || reply[8..16] != self.handle.to_be_bytes() {
            bail!("unexpected NBD reply {reply:02x?}");
        }
        if error != 0 {
            bail!("NBD write of a probe failed with error {error}");
        }
        Ok(())
    }
}

// ---- fio ----

/// What one fio run did.
#[derive(Debug, Clone, Copy, Default)]
struct FioResult {
    bw: f64,
    iops: f64,
    clat: (Duration, Duration),
}

fn run_fio(w: &Workload, args: &VmArgs, socket: &Path) -> Result<FioResult> {
    let out = Command::new("fio").args(w.args(args, socket)).output().context("running fio")?;
    if !out.status.success() {
        bail!(
            "{} failed ({}): {}{}",
            w.command_line(args),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    parse_fio(&out.stdout).with_context(|| format!("parsing the JSON report of {}", w.command_line(args)))
}

fn parse_fio(stdout: &[u8]) -> Result<FioResult> {
    let v = crate::fio::report(stdout)?;
    let job = &v["jobs"][0];
    let wr = &job["write"];
    let pct = |p: &str| Duration::from_nanos(wr["clat_ns"]["percentile"][p].as_u64().unwrap_or(0));
    Ok(FioResult {
        bw: wr["bw_bytes"].as_f64().unwrap_or(0.0),
        iops: wr["iops"].as_f64().unwrap_or(0.0),
        clat: (pct("50.000000"), pct("99.000000")),
    })
}

/// Writes `size` bytes of fio's buffer pattern into a new image `path`, 1 MiB at a time.
fn lay_out(path: &Path, size: u64) -> Result<()> {
    if fs::metadata(path).is_ok_and(|m| m.len() == size) {
        return Ok(());
    }
    let out = Command::new("fio")
        .args(["--name=layout", "--rw=write", "--bs=1M", "--ioengine=psync", "--end_fsync=1"])
        .arg(format!("--filename={}", path.display()))
        .arg(format!("--size={size}"))
        .args(["--output-format=json", "--eta=never"])
        .output()
        .context("running fio")?;
    if !out.status.success() {
        bail!("laying out {} failed: {}", path.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

// ---- qemu-storage-daemon ----

/// A `qemu-storage-daemon` with node `disk0` on a raw image opened as `cache=none,io=native`
/// does, a writable NBD export `guest` of it and a QMP socket, all in `dir`. Killed on drop.
struct Qsd {
    dir: PathBuf,
    child: Option<Child>,
    pid: u32,
}

impl Qsd {
    fn start(dir: &Path, image: &Path) -> Result<Qsd> {
        fs::create_dir_all(dir)?;
        let (nbd, qmp) = (dir.join("nbd.sock"), dir.join("qmp.sock"));
        remove_if_present(&nbd)?;
        remove_if_present(&qmp)?;
        let file = format!(
            "driver=file,node-name=file0,filename={},cache.direct=on,aio=native,discard=unmap",
            image.display()
        );
        let log = File::create(dir.join("qsd.log"))?;
        let child = Command::new("qemu-storage-daemon")
            .args(["--blockdev", &file, "--blockdev", "driver=raw,node-name=disk0,file=file0,discard=unmap"])
            .arg("--nbd-server")
            .arg(format!("addr.type=unix,addr.path={}", nbd.display()))
            .args(["--export", &format!("type=nbd,id=guest,node-name=disk0,name={EXPORT},writable=on")])
            .arg("--chardev")
            .arg(format!("socket,path={},server=on,wait=off,id=m", qmp.display()))
            .args(["--monitor", "chardev=m,mode=control"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting qemu-storage-daemon")?;
        let pid = child.id();
        let mut q = Qsd { dir: dir.to_path_buf(), child: Some(child), pid };
        let t = Instant::now();
        while !(nbd.exists() && qmp.exists()) {
            if let Some(st) = q.child.as_mut().expect("running").try_wait()? {
                q.child = None;
                bail!(
                    "qemu-storage-daemon on {} exited ({st}): {}",
                    image.display(),
                    fs::read_to_string(dir.join("qsd.log")).unwrap_or_default().trim()
                );
            }
            if t.elapsed() > Duration::from_secs(30) {
                bail!("qemu-storage-daemon's sockets did not appear in {}", dir.display());
            }
            sleep(Duration::from_millis(20));
        }
        Ok(q)
    }

    fn nbd(&self) -> PathBuf {
        self.dir.join("nbd.sock")
    }

    fn qmp(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }

    fn pid(&self) -> u32 {
        self.pid
    }

    /// SIGTERM (the daemon flushes and closes the image), then waits.
    fn stop(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            kill_process(Pid::from_child(&c), Signal::TERM).context("stopping qemu-storage-daemon")?;
            let t = Instant::now();
            while c.try_wait()?.is_none() {
                if t.elapsed() > Duration::from_secs(30) {
                    c.kill()?;
                    c.wait()?;
                    break;
                }
                sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Where a reference mirror writes.
enum MirrorTarget {
    /// A `null-co` node of this size in the same daemon.
    Null(u64),
    /// The NBD export `null` behind this socket.
    Nbd(PathBuf),
}

const REF_JOB: &str = "bench-ref-mirror";
const REF_NODE: &str = "bench-ref-target";

/// Starts (`Some`) or removes (`None`) the reference mirror of `disk0` in the daemon behind
/// `qmp`, as doppel starts its own: `sync: none`, `copy-mode: write-blocking`.
fn reference_mirror(qmp: &Path, target: Option<&MirrorTarget>) -> Result<()> {
    use doppel_capture::vm::Qmp;
    use serde_json::json;
    let mut q = Qmp::connect(qmp, Duration::from_secs(10)).context("connecting to QMP")?;
    let Some(target) = target else {
        q.execute("block-job-cancel", json!({ "device": REF_JOB, "force": true }))?;
        let t = Instant::now();
        while q.execute("query-block-jobs", json!({}))?.as_array().is_some_and(|a| !a.is_empty()) {
            if t.elapsed() > Duration::from_secs(30) {
                bail!("the reference mirror job did not end");
            }
            sleep(Duration::from_millis(20));
        }
        q.execute("blockdev-del", json!({ "node-name": REF_NODE }))?;
        return Ok(());
    };
    let node = match target {
        MirrorTarget::Null(size) => json!({ "driver": "null-co", "node-name": REF_NODE, "size": size }),
        MirrorTarget::Nbd(socket) => json!({
            "driver": "nbd", "node-name": REF_NODE, "discard": "unmap",
            "server": { "type": "unix", "path": socket }, "export": "null",
        }),
    };
    q.execute("blockdev-add", node)?;
    q.execute(
        "blockdev-mirror",
        json!({
            "job-id": REF_JOB, "device": "disk0", "target": REF_NODE,
            "sync": "none", "copy-mode": "write-blocking", "auto-dismiss": true,
        }),
    )?;
    Ok(())
}

/// A `qemu-storage-daemon` exporting a `null-co` node (writes vanish) over NBD. Killed on drop.
struct NullServer {
    dir: PathBuf,
    child: Child,
}

impl NullServer {
    fn start(dir: &Path, size: u64) -> Result<NullServer> {
        fs::create_dir_all(dir)?;
        let sock = dir.join("nbd.sock");
        remove_if_present(&sock)?;
        let log = File::create(dir.join("qsd.log"))?;
        let mut child = Command::new("qemu-storage-daemon")
            .args(["--blockdev", &format!("driver=null-co,node-name=null0,size={size}")])
            .arg("--nbd-server")
            .arg(format!("addr.type=unix,addr.path={}", sock.display()))
            .args(["--export", "type=nbd,id=null,node-name=null0,name=null,writable=on"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting qemu-storage-daemon")?;
        let t = Instant::now();
        while !sock.exists() {
            if child.try_wait()?.is_some() || t.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                bail!(
                    "the null NBD server did not start: {}",
                    fs::read_to_string(dir.join("qsd.log"))?.trim()
                );
            }
            sleep(Duration::from_millis(20));
        }
        Ok(NullServer { dir: dir.to_path_buf(), child })
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("nbd.sock")
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for NullServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---- CPU per thread ----

/// Per (pid, tid): the thread's kind (`LABEL: NAME`), its CPU time and its time runnable but
/// waiting for a CPU, from `/proc/PID/task/TID/{comm,schedstat}`.
type Threads = HashMap<(u32, u32), (String, Duration, Duration)>;

fn threads_of(pids: &[(&str, u32)]) -> Threads {
    let mut out = HashMap::new();
    for &(label, pid) in pids {
        let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else { continue };
        for t in tasks.flatten() {
            let (Ok(comm), Ok(sched)) =
                (fs::read_to_string(t.path().join("comm")), fs::read_to_string(t.path().join("schedstat")))
            else {
                continue;
            };
            let v: Vec<u64> = sched.split_whitespace().filter_map(|x| x.parse().ok()).collect();
            let (run, wait) = (v.first().copied().unwrap_or(0), v.get(1).copied().unwrap_or(0));
            let tid = t.file_name().to_string_lossy().parse().unwrap_or(0);
            out.insert(
                (pid, tid),
                (
                    format!("{label}: {}", group(comm.trim())),
                    Duration::from_nanos(run),
                    Duration::from_nanos(wait),
                ),
            );
        }
    }
    out
}

/// Thread names with their numbers dropped (`worker-3` and `worker-7` are one kind).
fn group(name: &str) -> String {
    name.trim_end_matches(|c: char| c.is_ascii_digit() || c == '-' || c == '_').to_string()
}

/// CPU and run-queue seconds per thread kind between two snapshots (threads born meanwhile
/// count whole), most CPU first.
fn thread_delta(before: &Threads, after: &Threads) -> Vec<(String, f64, f64)> {
    let mut by: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for (k, (name, run, wait)) in after {
        let (r0, w0) = before.get(k).map_or((Duration::ZERO, Duration::ZERO), |x| (x.1, x.2));
        let e = by.entry(name.clone()).or_default();
        e.0 += run.saturating_sub(r0).as_secs_f64();
        e.1 += wait.saturating_sub(w0).as_secs_f64();
    }
    let mut v: Vec<(String, f64, f64)> =
        by.into_iter().filter(|(_, (r, _))| *r > 0.0).map(|(n, (r, w))| (n, r, w)).collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v
}

// ---- verification, profiles ----

/// Compares two images byte for byte; returns the size.
fn compare_images(a: &Path, b: &Path) -> Result<u64> {
    let (fa, fb) = (File::open(a)?, File::open(b).with_context(|| format!("opening {}", b.display()))?);
    let (la, lb) = (fa.metadata()?.len(), fb.metadata()?.len());
    if la != lb {
        bail!("{} has {la} bytes, {} has {lb}", a.display(), b.display());
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut off = 0;
    while off < la {
        let n = (la - off).min(1 << 20) as usize;
        fa.read_exact_at(&mut ba[..n], off)?;
        fb.read_exact_at(&mut bb[..n], off)?;
        if ba[..n] != bb[..n] {
            let i = ba[..n].iter().zip(&bb[..n]).position(|(x, y)| x != y).unwrap_or(0);
            bail!("{} and {} differ at byte {}", a.display(), b.display(), off + i as u64);
        }
        off += n as u64;
    }
    Ok(la)
}

/// One more, untimed, run of `w` on disk `ci` under `perf record -g` attached to the daemon and
/// the agent; returns the profile's path.
fn profile(args: &VmArgs, disks: &mut [Disk], ci: usize, w: &Workload, pdir: &Path) -> Result<PathBuf> {
    prepare(disks)?;
    let d = &mut disks[ci];
    let out = pdir.join(format!("vm-{}-{}.perf.data", d.config.name(), w.key));
    let log = File::create(out.with_extension("log"))?;
    let pids = format!("{},{}", d.qsd.pid(), d.agent.as_ref().context("a protected disk")?.pid()?);
    let mut perf = Command::new("perf")
        .args(["record", "-F", "999", "-g", "-p", &pids, "-o"])
        .arg(&out)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting perf record (apt-get install -y linux-perf)")?;
    sleep(Duration::from_secs(1));
    let r = run_fio(w, args, &d.qsd.nbd());
    let drained = wait_drained(d.agent.as_mut().expect("agent"), DRAIN_TIMEOUT);
    kill_process(Pid::from_child(&perf), Signal::INT).context("stopping perf")?;
    perf.wait()?;
    let (r, _) = (r?, drained?);
    eprintln!(
        "[bench] profiled {} {}: {:.0} IOPS, {:.0} MiB/s -> {}",
        d.config.name(),
        w.key,
        r.iops,
        r.bw / (1u64 << 20) as f64,
        out.display()
    );
    Ok(out)
}

/// Detaches a capture mount left on `path` by a run that was killed (its agent with it), so
/// the scratch directory can be cleared.
fn detach_stale(path: &Path) -> Result<()> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else { return Ok(()) };
    let Ok(parent) = fs::canonicalize(parent) else { return Ok(()) };
    let path = parent.join(name);
    if doppel_capture::fuse::mounts::doppel_mounts().contains(&path) {
        eprintln!("[bench] detaching a mount left on {} by an earlier run", path.display());
        rustix::mount::unmount(&path, rustix::mount::UnmountFlags::DETACH)
            .with_context(|| format!("detaching {}", path.display()))?;
    }
    Ok(())
}

/// The first line of a command's output.
fn first_line(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd).args(args).output()?;
    if !out.status.success() {
        bail!("{cmd} failed");
    }
    Ok(String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or_default().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_slots_stay_in_the_last_mib() {
        let size = 1u64 << 30;
        assert_eq!(slot(size, 0), size - PROBE_AREA);
        assert_eq!(slot(size, 255), size - PROBE_SIZE as u64);
        assert_eq!(slot(size, 256), size - PROBE_AREA);
    }

    #[test]
    fn parses_fio_write_results() {
        let out = br#"fio: note
{"jobs": [{"error": 0, "write": {"bw_bytes": 2097152, "iops": 512.0,
  "clat_ns": {"percentile": {"50.000000": 1000, "99.000000": 5000}}}}]}"#;
        let r = parse_fio(out).unwrap();
        assert_eq!(r.iops, 512.0);
        assert_eq!(r.clat, (Duration::from_micros(1), Duration::from_micros(5)));
    }

    #[test]
    fn thread_kinds() {
        assert_eq!(group("worker-12"), "worker");
        assert_eq!(group("nbd-disk"), "nbd-disk");
    }
}
