//! A `doppel target` process under test, inside a network namespace, and the commands an
//! operator runs against it on its host (`status`, `events`, `failover`, `failback`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::ns;

/// `doppel --home HOME init`: creates the node's identity if needed; returns it.
pub fn identity(bin: &Path, home: &Path) -> Result<String> {
    fs::create_dir_all(home)?;
    let out = Command::new(bin).arg("--home").arg(home).arg("init").output().context("doppel init")?;
    if !out.status.success() {
        bail!("doppel init failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A running target. Killed when dropped.
pub struct TargetProc {
    bin: PathBuf,
    /// Its home (identity, control socket).
    pub home: PathBuf,
    /// `HOST:PORT` it listens on.
    pub addr: String,
    /// Its identity.
    pub id: String,
    log: PathBuf,
    child: Option<Child>,
}

impl TargetProc {
    /// Starts `doppel target --listen LISTEN --data DATA` in namespace `ns`, with `config`
    /// written to `HOME.toml` (the `[[target.allow]]` sections) and more arguments `extra`
    /// (`--allow NAME=ID`); waits until it listens.
    pub fn start(
        bin: &Path,
        ns: &str,
        home: &Path,
        data: &Path,
        listen: &str,
        config: &str,
        extra: &[String],
    ) -> Result<TargetProc> {
        let id = identity(bin, home)?;
        let addr_file = home.join("run/target.addr");
        let _ = fs::remove_file(&addr_file);
        let cfg = home.with_extension("toml");
        fs::write(&cfg, config)?;
        let log = home.with_extension("log");
        let f = fs::File::create(&log)?;
        let child = ns::command(ns, bin)
            .arg("--home")
            .arg(home)
            .arg("--config")
            .arg(&cfg)
            .args(["target", "--listen", listen, "--data"])
            .arg(data)
            .args(extra)
            .env("DOPPEL_LOG", "info")
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .context("starting doppel target")?;
        let mut t = TargetProc {
            bin: bin.to_path_buf(),
            home: home.to_path_buf(),
            addr: String::new(),
            id,
            log,
            child: Some(child),
        };
        let started = Instant::now();
        loop {
            if let Ok(a) = fs::read_to_string(&addr_file) {
                t.addr = a.trim().to_string();
                return Ok(t);
            }
            if let Some(st) = t.child.as_mut().expect("running").try_wait()? {
                bail!("doppel target exited ({st}):\n{}", t.log_tail(20));
            }
            if started.elapsed() > Duration::from_secs(30) {
                bail!("doppel target did not listen within 30 s:\n{}", t.log_tail(20));
            }
            sleep(Duration::from_millis(20));
        }
    }

    /// Runs `doppel --home HOME ARGS` here; returns (success, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> Result<(bool, String, String)> {
        let out = Command::new(&self.bin)
            .arg("--home")
            .arg(&self.home)
            .args(args)
            .env("DOPPEL_LOG", "warn")
            .output()
            .with_context(|| format!("running doppel {}", args.join(" ")))?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// `doppel status --json`, the entry of `source` under `sources` (null if none).
    pub fn source_status(&self, source: &str) -> Result<Value> {
        let (ok, out, err) = self.cli(&["status", "--json"])?;
        if !ok {
            bail!("doppel status on the target failed: {err}");
        }
        let v: Value = serde_json::from_str(&out).context("parsing the target's status")?;
        let found = v["sources"].as_array().into_iter().flatten().find(|s| s["source"] == source);
        Ok(found.cloned().unwrap_or(Value::Null))
    }

    /// Every event of the log (`doppel events --json`), oldest first.
    pub fn events(&self) -> Result<Vec<Value>> {
        let (ok, out, err) = self.cli(&["events", "--json"])?;
        if !ok {
            bail!("doppel events failed: {err}");
        }
        out.lines().map(|l| serde_json::from_str(l).context("parsing an event")).collect()
    }

    /// `doppel failover SOURCE --json` (`back` false) or `doppel failback SOURCE --json`;
    /// returns the report and how long the command took.
    pub fn fail(&self, source: &str, back: bool) -> Result<(Value, Duration)> {
        let t = Instant::now();
        let cmd = if back { "failback" } else { "failover" };
        let (ok, out, err) = self.cli(&[cmd, source, "--json"])?;
        let took = t.elapsed();
        if !ok {
            bail!("doppel {cmd} {source} failed: {err}\n{out}\ntarget log:\n{}", self.log_tail(30));
        }
        Ok((serde_json::from_str(&out).with_context(|| format!("parsing the {cmd} report: {out}"))?, took))
    }

    /// Fails, quoting the log, if the target has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(st) = self.child.as_mut().expect("running").try_wait()? {
            bail!("doppel target exited ({st}):\n{}", self.log_tail(30));
        }
        Ok(())
    }

    /// The process id (to measure its CPU time).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// SIGTERM, then SIGKILL after 20 s.
    pub fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            crate::ns::terminate(child, Duration::from_secs(20));
        }
    }
}

impl Drop for TargetProc {
    fn drop(&mut self) {
        self.stop();
    }
}
