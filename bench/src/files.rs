//! `files`: a file server's tree of many small files (issue 15). The initial mirror of N files
//! of 0-99 bytes by doppel to a target on 127.0.0.1 (TCP and TLS, the agent and the target two
//! processes), by doppel to a local directory (the embedded target), by `rsync -a` and by rsync
//! to its daemon on 127.0.0.1, each from a cold cache into an empty destination; the peak
//! memory of doppel's processes; then a pass rewriting 1 % of the files, and the time until
//! each tool's copy has every change.
//!
//! Everything runs on this machine, without network namespaces: the point is the per-file
//! cost (walking, metadata, ops, round trips) and the memory, not a link.

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use doppel_testkit::{Compare, diff_snapshots, snapshot};

use crate::agent::{Agent, JOB, JobStatus};
use crate::files_tree::{self, Changes, FilesTree, Shape};
use crate::machine::{self, Machine};
use crate::scratch::{Scratch, remove_if_present};
use crate::{cpu, target};

/// How often doppel's status is polled while timing it.
const POLL: Duration = Duration::from_millis(20);
/// The source's name on the target.
const SOURCE: &str = "src";

/// Options of `files`.
#[derive(Args, Debug, Clone)]
pub struct FilesArgs {
    /// Scratch directory (tree, copies, homes). Only what the benchmark created in it is
    /// removed at the end.
    #[arg(long, default_value = "/var/tmp/doppel-bench-files")]
    pub dir: PathBuf,
    /// Files of the tree (0-99 bytes each).
    #[arg(long, default_value_t = 1_000_000)]
    pub files: u64,
    /// Directories the files are spread over.
    #[arg(long, default_value_t = 1000)]
    pub dirs: u64,
    /// Runs of each tool (min and median reported).
    #[arg(long, default_value_t = 1)]
    pub runs: usize,
    /// Share of the files the change pass rewrites, in percent.
    #[arg(long, default_value_t = 1.0)]
    pub change_percent: f64,
    /// `--index-cache` of both doppel agents (the bounded index of issue 15) [default:
    /// doppel's].
    #[arg(long, value_name = "SIZE")]
    pub index_cache: Option<String>,
    /// Seconds to wait, before each timed step, for the machine to go quiet (other users'
    /// builds); it is timed anyway after that.
    #[arg(long, default_value_t = 120)]
    pub quiet_wait: u64,
    /// Where the copies go (rsync's destinations, doppel's replicas and the remote target's
    /// state), on another file system than the tree as on a second machine; the agents' own
    /// state stays beside the tree [default: the scratch directory]. With both on one file
    /// system, the agent's file-system-wide watch gets an event for every write the target
    /// makes, which a real remote target does not cost it.
    #[arg(long)]
    pub copies: Option<PathBuf>,
    /// Keep the scratch directory (the generated tree is then reused by the next run).
    #[arg(long)]
    pub keep: bool,
    /// Also write the markdown report to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// The tools, in the order each run times them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    /// `rsync -a SRC/ DST/`.
    Rsync,
    /// `rsync -a SRC/ rsync://127.0.0.1:PORT/dst/`.
    RsyncDaemon,
    /// `doppel protect SRC --to DIR`.
    DoppelLocal,
    /// `doppel protect SRC --to 127.0.0.1:PORT`.
    DoppelRemote,
}

impl Tool {
    /// Every tool, in the order of a run.
    pub const ALL: [Tool; 4] = [Tool::Rsync, Tool::RsyncDaemon, Tool::DoppelLocal, Tool::DoppelRemote];

    pub fn name(self) -> &'static str {
        match self {
            Tool::Rsync => "rsync -a",
            Tool::RsyncDaemon => "rsync -a to its daemon",
            Tool::DoppelLocal => "doppel to a local directory",
            Tool::DoppelRemote => "doppel to a target on 127.0.0.1",
        }
    }
}

/// One tool's run: its initial mirror, then its change pass.
#[derive(Debug, Clone, Default)]
pub struct ToolRun {
    /// Initial mirror, wall time (rsync: until it exits).
    pub mirror: Duration,
    /// Initial mirror until durable: rsync followed by `sync`; doppel until caught up (an
    /// acknowledgement means durable on the target).
    pub mirror_synced: Duration,
    /// CPU (user + system) of the tool's processes during the initial mirror.
    pub mirror_cpu: Duration,
    /// Change pass: from the last rewrite until the copy has every change, durably (rsync:
    /// a run over the previous copy, then `sync`; doppel: until every change is acknowledged
    /// and visible in the replica).
    pub change: Duration,
    /// CPU of the tool's processes during the change pass.
    pub change_cpu: Duration,
    /// How long rewriting the files took (before `change` starts).
    pub change_writes: Duration,
    /// Files the change pass rewrote.
    pub changed_files: usize,
    /// doppel: the agent's peak resident set (`VmHWM`) through both.
    pub agent_rss: u64,
    /// doppel to 127.0.0.1: the target's.
    pub target_rss: u64,
    /// doppel: its status when the initial mirror had caught up.
    pub status: Option<JobStatus>,
}

/// Every run: `runs[i][t]` is run `i` of tool [`Tool::ALL`]`[t]`.
#[derive(Debug, Clone, Default)]
pub struct FilesResults {
    /// The runs.
    pub runs: Vec<Vec<ToolRun>>,
}

impl FilesResults {
    /// Every run of `tool`.
    pub fn of(&self, tool: Tool) -> Vec<ToolRun> {
        let t = Tool::ALL.iter().position(|&x| x == tool).expect("a tool");
        self.runs.iter().map(|r| r[t].clone()).collect()
    }
}

/// The mode.
pub fn main(args: &FilesArgs) -> Result<()> {
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let doppel = crate::agent::doppel_binary()?;
    machine::require_rsync()?;
    machine::require_root()?;
    let scratch = Scratch::open(&args.dir)?;
    let machine = Machine::describe(&args.dir, &doppel)?;
    eprintln!("[bench] {}", machine.one_line());
    let tree = files_tree::ensure(&scratch, Shape { files: args.files, dirs: args.dirs })?;
    let env = Env { args, doppel, scratch, tree };
    let mut results = FilesResults::default();
    for i in 0..args.runs {
        let mut run = Vec::new();
        for (t, tool) in Tool::ALL.into_iter().enumerate() {
            let pass = (i * Tool::ALL.len() + t + 1) as u64;
            let r = env.run(tool, pass).with_context(|| format!("run {} of {}", i + 1, tool.name()))?;
            eprintln!("[bench] run {}/{}: {} {}", i + 1, args.runs, tool.name(), describe(&r));
            run.push(r);
        }
        results.runs.push(run);
    }
    let report = crate::files_report::markdown(args, &machine, &env.tree, &results);
    crate::report::publish(&report, args.out.as_deref())?;
    if !args.keep {
        env.scratch.remove()?;
    }
    Ok(())
}

fn describe(r: &ToolRun) -> String {
    let mut s = format!(
        "mirror {:.2} s ({:.2} s durable, {:.2} s CPU); {} files changed in {:.2} s, copied in {:.2} s ({:.2} s CPU)",
        r.mirror.as_secs_f64(),
        r.mirror_synced.as_secs_f64(),
        r.mirror_cpu.as_secs_f64(),
        r.changed_files,
        r.change_writes.as_secs_f64(),
        r.change.as_secs_f64(),
        r.change_cpu.as_secs_f64()
    );
    if r.agent_rss > 0 {
        s += &format!("; peak RSS agent {:.1} MiB", r.agent_rss as f64 / (1u64 << 20) as f64);
    }
    if r.target_rss > 0 {
        s += &format!(", target {:.1} MiB", r.target_rss as f64 / (1u64 << 20) as f64);
    }
    s
}

/// What every run needs.
struct Env<'a> {
    args: &'a FilesArgs,
    doppel: PathBuf,
    scratch: Scratch,
    tree: FilesTree,
}

impl Env<'_> {
    fn src(&self) -> PathBuf {
        self.scratch.src()
    }

    /// A per-run output in the scratch directory, under a name it removes (`doppel-dst-*`,
    /// `doppel-home-*`, `rsync-dst*`).
    fn out(&self, name: &str) -> PathBuf {
        match &self.args.copies {
            Some(dir) => dir.join(name),
            None => self.scratch.src().with_file_name(name),
        }
    }

    /// A doppel agent's home: beside the tree, whatever `--copies` says.
    fn agent_home(&self, name: &str) -> PathBuf {
        self.scratch.src().with_file_name(name)
    }

    /// Longest an initial mirror may take.
    fn mirror_timeout(&self) -> Duration {
        Duration::from_secs(600 + self.args.files / 100)
    }

    /// Syncs, waits for a quiet machine (up to `--quiet-wait`), drops the page cache.
    fn prepare_cold(&self) -> Result<()> {
        machine::sync();
        if !cpu::wait_quiet(Duration::from_secs(self.args.quiet_wait))? {
            eprintln!(
                "[bench] warning: the machine stayed busy for {} s; timing anyway",
                self.args.quiet_wait
            );
        }
        machine::drop_caches()
    }

    /// One tool's initial mirror and change pass (`pass` numbers the change pass); its copy is
    /// removed afterwards, so that at most two trees of a million files exist at a time.
    fn run(&self, tool: Tool, pass: u64) -> Result<ToolRun> {
        let run = self.run_kept(tool, pass)?;
        let outputs: &[&str] = match tool {
            Tool::Rsync => &["rsync-dst"],
            Tool::RsyncDaemon => &["rsync-dst-daemon", "rsync-dst-daemon-work"],
            Tool::DoppelLocal => &["doppel-dst-local"],
            Tool::DoppelRemote => &["doppel-home-remote"],
        };
        for name in outputs {
            remove_if_present(&self.out(name))?;
        }
        for name in
            ["doppel-home-local", "doppel-home-local.log", "doppel-source-home", "doppel-source-home.log"]
        {
            remove_if_present(&self.agent_home(name))?;
        }
        Ok(run)
    }

    fn run_kept(&self, tool: Tool, pass: u64) -> Result<ToolRun> {
        match tool {
            Tool::Rsync => self.rsync(&self.out("rsync-dst"), None, pass),
            Tool::RsyncDaemon => {
                let dst = self.out("rsync-dst-daemon");
                remove_if_present(&dst)?;
                let daemon = RsyncDaemon::start(&dst, &self.out("rsync-dst-daemon-work"))?;
                self.rsync(&dst, Some(&daemon), pass)
            }
            Tool::DoppelLocal => self.doppel_local(pass),
            Tool::DoppelRemote => self.doppel_remote(pass),
        }
    }

    /// rsync into an empty `dst` (directly, or through `daemon`, which writes to `dst`), then
    /// again after a change pass; both verified.
    fn rsync(&self, dst: &Path, daemon: Option<&RsyncDaemon>, pass: u64) -> Result<ToolRun> {
        let to = daemon.map_or_else(|| format!("{}/", dst.display()), |d| d.url.clone());
        let daemon_cpu = || daemon.map_or(Ok(Duration::ZERO), RsyncDaemon::cpu);
        if daemon.is_none() {
            remove_if_present(dst)?;
        }
        self.prepare_cold()?;
        let before = cpu::of_waited_children()? + daemon_cpu()?;
        let (mirror, mirror_synced) = rsync(&self.src(), &to)?;
        let mirror_cpu = cpu::of_waited_children()? + daemon_cpu()? - before;
        verify(&self.src(), dst)?;
        self.prepare_cold()?;
        let changes = files_tree::change(&self.src(), self.tree.shape, self.args.change_percent, pass)?;
        let before = cpu::of_waited_children()? + daemon_cpu()?;
        let (_, change) = rsync(&self.src(), &to)?;
        let change_cpu = cpu::of_waited_children()? + daemon_cpu()? - before;
        verify(&self.src(), dst)?;
        Ok(ToolRun {
            mirror,
            mirror_synced,
            mirror_cpu,
            change,
            change_cpu,
            change_writes: changes.took,
            changed_files: changes.files.len(),
            ..ToolRun::default()
        })
    }

    /// doppel into an empty local directory, with a fresh home; then the change pass.
    fn doppel_local(&self, pass: u64) -> Result<ToolRun> {
        let (dst, home) = (self.out("doppel-dst-local"), self.agent_home("doppel-home-local"));
        remove_if_present(&dst)?;
        remove_if_present(&home)?;
        let extra = self.extra(&[]);
        self.prepare_cold()?;
        let mut agent = Agent::start_with(&self.doppel, &home, &self.src(), &dst, &extra)?;
        let run = self.doppel_runs(&mut agent, None, &dst, pass)?;
        agent.stop()?;
        Ok(run)
    }

    /// doppel to a fresh `doppel target` on 127.0.0.1; then the change pass.
    fn doppel_remote(&self, pass: u64) -> Result<ToolRun> {
        let work = self.out("doppel-home-remote");
        remove_if_present(&work)?;
        let home = self.agent_home("doppel-source-home");
        remove_if_present(&home)?;
        let source_id = target::identity(&self.doppel, &home)?;
        let mut t = LocalTarget::start(&self.doppel, &work, &source_id)?;
        let replica = work.join("target-data/replicas").join(SOURCE).join(JOB);
        let to = PathBuf::from(&t.addr);
        let extra = self.extra(&["--target-id", &t.id]);
        self.prepare_cold()?;
        let mut agent = Agent::start_with(&self.doppel, &home, &self.src(), &to, &extra)?;
        let run = self.doppel_runs(&mut agent, Some(&mut t), &replica, pass)?;
        agent.stop()?;
        t.stop();
        Ok(run)
    }

    /// The agent's arguments: `base`, then `--index-cache` if asked for.
    fn extra<'a>(&'a self, base: &[&'a str]) -> Vec<&'a str> {
        let mut v = base.to_vec();
        if let Some(c) = &self.args.index_cache {
            v.extend(["--index-cache", c.as_str()]);
        }
        v
    }

    /// Times a just-started agent until caught up, then a change pass; verifies the replica
    /// after each; measures the peak memory at the end.
    fn doppel_runs(
        &self,
        agent: &mut Agent,
        mut target: Option<&mut LocalTarget>,
        replica: &Path,
        pass: u64,
    ) -> Result<ToolRun> {
        let target_cpu = |t: &Option<&mut LocalTarget>| t.as_ref().map_or(Ok(Duration::ZERO), |t| t.cpu());
        let t0 = target_cpu(&target)?;
        let (mirror, status) = agent.wait_caught_up(POLL, self.mirror_timeout())?;
        let mirror_cpu = agent.cpu()? + target_cpu(&target)? - t0;
        verify(&self.src(), replica)?;
        self.prepare_cold()?;
        let (a0, t0) = (agent.cpu()?, target_cpu(&target)?);
        let before = agent.status()?.map_or(0, |s| s.captured);
        let changes = files_tree::change(&self.src(), self.tree.shape, self.args.change_percent, pass)?;
        let change = wait_arrived(agent, before, &self.src(), replica, &changes)?;
        let change_cpu = agent.cpu()? - a0 + target_cpu(&target)? - t0;
        if let Some(t) = target.as_mut() {
            t.check_alive()?;
        }
        let run = ToolRun {
            mirror,
            mirror_synced: mirror,
            mirror_cpu,
            change,
            change_cpu,
            change_writes: changes.took,
            changed_files: changes.files.len(),
            agent_rss: peak_rss(agent.pid()?)?,
            target_rss: target.as_ref().map_or(Ok(0), |t| t.pid().and_then(peak_rss))?,
            status: Some(status),
        };
        verify(&self.src(), replica)?;
        Ok(run)
    }
}

/// Runs `rsync -a SRC/ TO`, then `sync`; returns (rsync's wall time, until synced).
fn rsync(src: &Path, to: &str) -> Result<(Duration, Duration)> {
    let t = Instant::now();
    let st = Command::new("rsync").arg("-a").arg(format!("{}/", src.display())).arg(to).status()?;
    let wall = t.elapsed();
    if !st.success() {
        bail!("rsync -a {}/ {to} failed: {st}", src.display());
    }
    machine::sync();
    Ok((wall, t.elapsed()))
}

/// Polls until the agent has acknowledged everything it captured (more than `before`) and
/// every changed file is in the replica; returns the time that took.
fn wait_arrived(
    agent: &mut Agent,
    before: u64,
    src: &Path,
    replica: &Path,
    changes: &Changes,
) -> Result<Duration> {
    let t = Instant::now();
    let timeout = Duration::from_secs(600) + Duration::from_millis(changes.files.len() as u64 * 10);
    loop {
        agent.check_alive()?;
        let drained = agent.status()?.is_some_and(|s| s.drained() && s.captured > before);
        if drained && files_tree::arrived(src, replica, changes).is_ok() {
            return Ok(t.elapsed());
        }
        if t.elapsed() > timeout {
            let why = files_tree::arrived(src, replica, changes).err().unwrap_or_default();
            bail!("the changes did not arrive within {timeout:?}: {why}\n{}", agent.log_tail(20));
        }
        sleep(POLL);
    }
}

/// The copy must equal the source exactly ([`doppel_testkit::compare_trees`]'s definition),
/// both trees described at once: a million files take a while each.
fn verify(src: &Path, dst: &Path) -> Result<()> {
    let opts = Compare::default();
    let (want, got) = std::thread::scope(|s| {
        let want = s.spawn(|| snapshot(src, opts));
        let got = snapshot(dst, opts);
        (want.join().expect("describing the source"), got)
    });
    let diff = diff_snapshots(&want, &got);
    if !diff.is_empty() {
        let lines: Vec<&str> = diff.lines().collect();
        bail!(
            "the copy {} differs from the source in {} names:\n{}",
            dst.display(),
            lines.len(),
            lines[..lines.len().min(20)].join("\n")
        );
    }
    Ok(())
}

/// A process's peak resident set (`VmHWM`), in bytes.
pub fn peak_rss(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no VmHWM in {path}"))?;
    Ok(kib * 1024)
}

/// A `doppel target` on 127.0.0.1 (no namespace), its home, data and log under one work
/// directory, allowing one source as [`SOURCE`]. Stopped when dropped.
struct LocalTarget {
    child: Option<Child>,
    addr: String,
    id: String,
    log: PathBuf,
}

impl LocalTarget {
    fn start(bin: &Path, work: &Path, source_id: &str) -> Result<LocalTarget> {
        let home = work.join("target-home");
        let id = target::identity(bin, &home)?;
        let config = work.join("target.toml");
        fs::write(&config, format!("[[target.allow]]\nname = \"{SOURCE}\"\nid = \"{source_id}\"\n"))?;
        let log = work.join("target.log");
        let f = fs::File::create(&log)?;
        let child = Command::new(bin)
            .arg("--home")
            .arg(&home)
            .arg("--config")
            .arg(&config)
            .args(["target", "--listen", "127.0.0.1:0", "--data"])
            .arg(work.join("target-data"))
            .env("DOPPEL_LOG", "info")
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .context("starting doppel target")?;
        let mut t = LocalTarget { child: Some(child), addr: String::new(), id, log };
        let started = Instant::now();
        loop {
            if let Ok(a) = fs::read_to_string(home.join("run/target.addr")) {
                t.addr = a.trim().to_string();
                return Ok(t);
            }
            t.check_alive()?;
            if started.elapsed() > Duration::from_secs(30) {
                bail!("doppel target did not listen within 30 s; its log is {}", t.log.display());
            }
            sleep(Duration::from_millis(20));
        }
    }

    fn pid(&self) -> Result<u32> {
        Ok(self.child.as_ref().context("doppel target has stopped")?.id())
    }

    fn check_alive(&mut self) -> Result<()> {
        if let Some(st) = self.child.as_mut().context("doppel target has stopped")?.try_wait()? {
            bail!("doppel target exited ({st}); its log is {}", self.log.display());
        }
        Ok(())
    }

    fn cpu(&self) -> Result<Duration> {
        cpu::of_process(self.pid()?)
    }

    /// SIGTERM, then SIGKILL after 20 s.
    fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            crate::ns::terminate(child, Duration::from_secs(20));
        }
    }
}

impl Drop for LocalTarget {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `rsync --daemon` on 127.0.0.1 exporting one writable module `dst` (as root, so owners and
/// modes are kept as with a local `rsync -a`). Killed when dropped.
struct RsyncDaemon {
    url: String,
    child: Child,
}

impl RsyncDaemon {
    fn start(path: &Path, work: &Path) -> Result<RsyncDaemon> {
        fs::create_dir_all(path)?;
        fs::create_dir_all(work)?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let conf = work.join("rsyncd.conf");
        fs::write(
            &conf,
            format!(
                "pid file = {pid}\nuse chroot = false\nuid = root\ngid = root\nnumeric ids = yes\n\
                 [dst]\n    path = {path}\n    read only = false\n",
                pid = work.join("rsyncd.pid").display(),
                path = path.display()
            ),
        )?;
        let log = fs::File::create(work.join("rsyncd.log"))?;
        let child = Command::new("rsync")
            .args(["--daemon", "--no-detach"])
            .arg(format!("--config={}", conf.display()))
            .args(["--address", "127.0.0.1", "--port", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting rsync --daemon")?;
        let mut d = RsyncDaemon { url: format!("rsync://127.0.0.1:{port}/dst/"), child };
        let t = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(st) = d.child.try_wait()? {
                bail!("rsync --daemon exited ({st})");
            }
            if t.elapsed() > Duration::from_secs(10) {
                bail!("rsync --daemon did not listen on 127.0.0.1:{port} within 10 s");
            }
            sleep(Duration::from_millis(20));
        }
        Ok(d)
    }

    /// CPU time of the daemon and of the processes it forked and reaped (one per connection).
    fn cpu(&self) -> Result<Duration> {
        cpu::of_process_tree(self.child.id())
    }
}

impl Drop for RsyncDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
