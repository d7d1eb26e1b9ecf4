//! lsyncd, the usual "continuous rsync": inotify on the source, and batches of changed names
//! handed to `rsync` (here to the same rsync daemon as the plain rsync baseline). Its
//! startup is a full `rsync` of the tree, whose end it logs.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::ns;

/// Whether lsyncd is installed.
pub fn available() -> bool {
    Command::new("lsyncd").arg("--version").output().is_ok_and(|o| o.status.success())
}

/// `lsyncd --version`, first line.
pub fn version() -> String {
    match Command::new("lsyncd").arg("--version").output() {
        Ok(o) => String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or_default().trim().to_string(),
        Err(_) => "not installed".into(),
    }
}

/// A running lsyncd. Stopped when dropped.
pub struct Lsyncd {
    child: Option<Child>,
    log: PathBuf,
    /// When it was spawned.
    pub started: Instant,
}

impl Lsyncd {
    /// Starts lsyncd in namespace `ns`, syncing `src` to `url` with `delay` seconds of event
    /// aggregation (0: hand every change to rsync at once, one rsync at a time) and rsync's
    /// archive mode with compression (`-az`, as the rsync baseline).
    pub fn start(ns: &str, src: &Path, url: &str, delay: u32, work: &Path) -> Result<Lsyncd> {
        fs::create_dir_all(work)?;
        let log = work.join("lsyncd.log");
        let _ = fs::remove_file(&log);
        let conf = work.join("lsyncd.lua");
        fs::write(
            &conf,
            format!(
                "settings {{ nodaemon = true, logfile = \"{log}\", insist = true }}\n\
                 sync {{ default.rsync, source = \"{src}\", target = \"{url}\", delay = {delay},\n\
                 \trsync = {{ archive = true, compress = true }} }}\n",
                log = log.display(),
                src = src.display()
            ),
        )?;
        let out = fs::File::create(work.join("lsyncd.out"))?;
        let started = Instant::now();
        let child = ns::command(ns, "lsyncd")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting lsyncd")?;
        Ok(Lsyncd { child: Some(child), log, started })
    }

    /// Waits until lsyncd logs the end of its startup rsync; returns the time since spawn.
    pub fn wait_startup(&mut self, timeout: Duration) -> Result<Duration> {
        loop {
            let text = fs::read_to_string(&self.log).unwrap_or_default();
            if text.lines().any(|l| l.contains("Startup of") && l.contains("finished")) {
                return Ok(self.started.elapsed());
            }
            if let Some(st) = self.child.as_mut().context("lsyncd stopped")?.try_wait()? {
                bail!("lsyncd exited ({st}); its log:\n{text}");
            }
            if self.started.elapsed() > timeout {
                bail!("lsyncd did not finish its startup within {timeout:?}; its log:\n{text}");
            }
            sleep(Duration::from_millis(20));
        }
    }

    /// CPU time of lsyncd and of the rsync processes it ran and reaped.
    pub fn cpu(&self) -> Result<Duration> {
        crate::cpu::of_process_tree(self.child.as_ref().context("lsyncd stopped")?.id())
    }

    /// Fails if lsyncd has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(st) = self.child.as_mut().context("lsyncd stopped")?.try_wait()? {
            bail!("lsyncd exited ({st}); its log {}", self.log.display());
        }
        Ok(())
    }

    /// SIGTERM (lsyncd lets a running rsync finish), then SIGKILL after 20 s.
    pub fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            crate::ns::terminate(child, Duration::from_secs(20));
        }
    }
}

impl Drop for Lsyncd {
    fn drop(&mut self) {
        self.stop();
    }
}
