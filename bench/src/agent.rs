//! The doppel agent under test: the real binary, run as a user would run it, observed through
//! `doppel status --json`.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use rustix::process::{Pid, Signal, kill_process};
use serde_json::Value;

/// The job name every benchmark agent uses.
pub const JOB: &str = "bench";

/// The `doppel` binary next to this one: built by the same `cargo build`, so both come from
/// the same sources and profile.
pub fn doppel_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().ok_or_else(|| anyhow!("{} has no parent directory", exe.display()))?;
    let doppel = dir.join("doppel");
    if !doppel.is_file() {
        bail!(
            "the doppel binary is not at {}: build it first with `cargo build --release --workspace` \
             (or `cargo build --release -p doppel -p doppel-bench`)",
            doppel.display()
        );
    }
    Ok(doppel)
}

/// The fields of one job in `doppel status --json` that the benchmark uses.
#[derive(Debug, Clone, Default)]
pub struct JobStatus {
    /// `starting`, `mirroring`, `replicating`...
    pub state: String,
    /// Connected to its target (the embedded one, for a local destination).
    pub connected: bool,
    /// Watch back-end (`fanotify` or `inotify`).
    pub capture: String,
    /// Last sequence number captured.
    pub captured: u64,
    /// Last sequence number acknowledged (durable on the target).
    pub acked: u64,
    /// Age of the oldest unacknowledged op.
    pub lag_seconds: f64,
    /// Bytes of ops waiting for an ack.
    pub pending_bytes: u64,
    /// Bytes of pending ops spilled to (or, in `fuse` mode, written through to) spool segments.
    pub spooled_bytes: u64,
    /// Hot regions of the activity log (`fuse` mode).
    pub dirty_regions: u64,
    /// Bytes the agent has sent on its link since it started.
    pub bytes_sent: u64,
    /// Files and bytes the reconciler hashed.
    pub files_hashed: u64,
    /// See `files_hashed`.
    pub bytes_hashed: u64,
}

impl JobStatus {
    fn from_json(j: &Value) -> JobStatus {
        let n = |k: &str| j[k].as_u64().unwrap_or(0);
        JobStatus {
            state: j["state"].as_str().unwrap_or_default().to_string(),
            connected: j["connected"].as_bool().unwrap_or(false),
            capture: j["capture"].as_str().unwrap_or_default().to_string(),
            captured: n("last_captured_seq"),
            acked: n("last_acked_seq"),
            lag_seconds: j["lag_seconds"].as_f64().unwrap_or(0.0),
            pending_bytes: n("pending_bytes"),
            spooled_bytes: n("spooled_bytes"),
            dirty_regions: n("dirty_regions"),
            bytes_sent: n("bytes_sent"),
            files_hashed: n("files_hashed"),
            bytes_hashed: n("bytes_hashed"),
        }
    }

    /// Replicating, connected, and everything captured so far acknowledged.
    pub fn caught_up(&self) -> bool {
        self.drained() && self.captured > 0
    }

    /// Replicating, connected, and nothing waiting for an acknowledgement (possibly nothing
    /// captured yet, as for an empty tree).
    pub fn drained(&self) -> bool {
        self.state == "replicating" && self.connected && self.acked == self.captured
    }
}

/// A running `doppel protect SRC --to DST`. Stopped (SIGTERM, then SIGKILL) when dropped, so a
/// failing benchmark leaves no agent behind.
pub struct Agent {
    bin: PathBuf,
    home: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    /// When the process was spawned.
    pub started: Instant,
}

impl Agent {
    /// Starts protecting `src` into the local directory `dst`, with state in `home` and more
    /// arguments for `doppel protect` (`--capture fuse`, say); its log (stdout and stderr)
    /// goes to `HOME.log`, next to `home` rather than inside it.
    pub fn start_with(bin: &Path, home: &Path, src: &Path, dst: &Path, extra: &[&str]) -> Result<Agent> {
        let mut args = vec![OsString::from("--to"), dst.as_os_str().to_owned()];
        args.extend(extra.iter().map(OsString::from));
        Agent::spawn(Command::new(bin), bin, home, src, &args)
    }

    /// Protects `src` to the remote target at `addr` (identity `target_id`), the agent
    /// running inside network namespace `ns` (see [`crate::ns::command`]).
    pub fn start_remote(
        bin: &Path,
        ns: &str,
        home: &Path,
        src: &Path,
        (addr, target_id): (&str, &str),
        extra: &[&str],
    ) -> Result<Agent> {
        let mut args: Vec<OsString> = ["--to", addr, "--target-id", target_id].map(OsString::from).into();
        args.extend(extra.iter().map(OsString::from));
        Agent::spawn(crate::ns::command(ns, bin), bin, home, src, &args)
    }

    /// Runs `CMD --home H protect SRC --name bench ARGS`, its log in `HOME.log`.
    fn spawn(mut cmd: Command, bin: &Path, home: &Path, src: &Path, args: &[OsString]) -> Result<Agent> {
        fs::create_dir_all(home)?;
        let log = home.with_extension("log");
        let log_file = fs::OpenOptions::new().create(true).append(true).open(&log)?;
        let started = Instant::now();
        let child = cmd
            .arg("--home")
            .arg(home)
            .arg("protect")
            .arg(src)
            .args(["--name", JOB])
            .args(args)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Agent { bin: bin.to_path_buf(), home: home.to_path_buf(), log, child: Some(child), started })
    }

    /// Kills the agent with SIGKILL (a crash: no chance to clean up) and reaps it.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().context("killing doppel")?;
            child.wait()?;
        }
        Ok(())
    }

    /// Waits up to `timeout` for the agent to exit by itself (a fenced agent does).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let t = Instant::now();
        let child = self.child.as_mut().context("doppel has exited already")?;
        while t.elapsed() < timeout {
            if let Some(st) = child.try_wait()? {
                self.child = None;
                return Ok(st);
            }
            sleep(Duration::from_millis(20));
        }
        bail!("doppel did not exit within {timeout:?}; end of its log:\n{}", self.log_tail(20))
    }

    /// CPU time (user + system) the agent has used since it started.
    pub fn cpu(&self) -> Result<Duration> {
        crate::cpu::of_process(self.child.as_ref().context("doppel has exited")?.id())
    }

    /// Sets the agent's limit of open files (soft and hard) to `n`, as an operator would with
    /// `ulimit -n` or systemd's `LimitNOFILE=`; where raising the hard limit is not permitted
    /// (no `CAP_SYS_RESOURCE`, as in some containers), raises the soft limit to the hard one.
    /// Returns the limit the agent got.
    pub fn set_nofile(&self, n: u64) -> Result<u64> {
        use rustix::process::{Resource, Rlimit, getrlimit, prlimit};
        let pid = Pid::from_raw(self.pid()? as i32).context("no pid")?;
        let set = |n| prlimit(Some(pid), Resource::Nofile, Rlimit { current: Some(n), maximum: Some(n) });
        match set(n) {
            Ok(_) => Ok(n),
            Err(rustix::io::Errno::PERM) => {
                // The agent inherited this process's limits.
                let hard = getrlimit(Resource::Nofile).maximum.unwrap_or(u64::MAX).min(n);
                set(hard).with_context(|| format!("setting doppel's limit of open files to {hard}"))?;
                Ok(hard)
            }
            Err(e) => Err(e).with_context(|| format!("setting doppel's limit of open files to {n}")),
        }
    }

    /// The agent's process id (to profile it).
    pub fn pid(&self) -> Result<u32> {
        Ok(self.child.as_ref().context("doppel has exited")?.id())
    }

    /// The agent's log file.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// The job's status from `doppel --home H status --json`, or `None` while it has none.
    pub fn status(&self) -> Result<Option<JobStatus>> {
        let out = Command::new(&self.bin)
            .arg("--home")
            .arg(&self.home)
            .args(["status", "--json"])
            .stderr(Stdio::inherit())
            .output()
            .context("running doppel status --json")?;
        if !out.status.success() {
            bail!("doppel status --json failed ({})", out.status);
        }
        let v: Value = serde_json::from_slice(&out.stdout).context("parsing doppel status --json")?;
        let job = v["jobs"].as_array().and_then(|jobs| jobs.iter().find(|j| j["job"] == JOB));
        Ok(job.map(JobStatus::from_json))
    }

    /// Fails, quoting the end of the log, if the agent has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        let child = self.child.as_mut().expect("running");
        if let Some(st) = child.try_wait()? {
            self.child = None;
            bail!("doppel exited ({st}); end of its log {}:\n{}", self.log.display(), self.log_tail(20));
        }
        Ok(())
    }

    /// Polls the status every `every` (on absolute deadlines) until [`JobStatus::caught_up`];
    /// returns the time since the process started and the last status.
    pub fn wait_caught_up(&mut self, every: Duration, timeout: Duration) -> Result<(Duration, JobStatus)> {
        self.wait_status(every, timeout, JobStatus::caught_up)
    }

    /// Like [`Agent::wait_caught_up`], until `done` holds for the status.
    pub fn wait_status(
        &mut self,
        every: Duration,
        timeout: Duration,
        done: impl Fn(&JobStatus) -> bool,
    ) -> Result<(Duration, JobStatus)> {
        let mut next = Instant::now();
        loop {
            self.check_alive()?;
            if let Some(s) = self.status()?.filter(&done) {
                return Ok((self.started.elapsed(), s));
            }
            if self.started.elapsed() > timeout {
                bail!(
                    "doppel did not get there within {timeout:?} (last status: {:?}); end of its log {}:\n{}",
                    self.status().ok().flatten(),
                    self.log.display(),
                    self.log_tail(20)
                );
            }
            next += every;
            sleep(next.saturating_duration_since(Instant::now()));
        }
    }

    /// Stops the agent as an operator would (SIGTERM) and waits for it to exit cleanly.
    pub fn stop(mut self) -> Result<()> {
        let log_tail = self.log_tail(20);
        let Some(mut child) = self.child.take() else { return Ok(()) };
        let st = terminate(&mut child)?;
        if !st.success() {
            bail!("doppel exited with {st} when stopped; end of its log:\n{log_tail}");
        }
        Ok(())
    }

    /// The last `lines` lines of the agent's log, to quote in errors.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = terminate(&mut child);
        }
    }
}

/// SIGTERM, up to 30 s to exit, then SIGKILL.
fn terminate(child: &mut Child) -> Result<std::process::ExitStatus> {
    let pid = Pid::from_child(child);
    kill_process(pid, Signal::TERM).context("sending SIGTERM to doppel")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Some(st) = child.try_wait()? {
            return Ok(st);
        }
        sleep(Duration::from_millis(20));
    }
    eprintln!("[bench] doppel did not exit within 30 s of SIGTERM; killing it");
    child.kill()?;
    Ok(child.wait()?)
}
