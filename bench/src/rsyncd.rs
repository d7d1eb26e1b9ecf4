//! rsync over the network, as the baselines run it: an rsync daemon (`rsync --daemon`, plain
//! TCP, no ssh, so no cipher cost is charged to rsync) in one namespace, the client in the
//! other, and the client's `--stats` parsed.

use std::fs;
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::ns;

/// A running rsync daemon exporting one writable module, `dst`. Killed when dropped.
pub struct Daemon {
    /// `rsync://HOST:PORT/dst/`.
    pub url: String,
    child: Child,
}

impl Daemon {
    /// Starts a daemon in namespace `ns` on `ip:port` exporting `path` as module `dst`
    /// (running as root, so owners, groups and modes are kept as with a local `rsync -a`).
    pub fn start(ns: &str, ip: &str, port: u16, path: &Path, work: &Path) -> Result<Daemon> {
        fs::create_dir_all(path)?;
        fs::create_dir_all(work)?;
        let conf = work.join(format!("rsyncd-{port}.conf"));
        fs::write(
            &conf,
            format!(
                "pid file = {pid}\nuse chroot = false\nuid = root\ngid = root\nnumeric ids = yes\n\
                 [dst]\n    path = {path}\n    read only = false\n",
                pid = work.join(format!("rsyncd-{port}.pid")).display(),
                path = path.display()
            ),
        )?;
        let log = fs::File::create(work.join(format!("rsyncd-{port}.log")))?;
        let child = ns::command(ns, "rsync")
            .args(["--daemon", "--no-detach"])
            .arg(format!("--config={}", conf.display()))
            .args(["--address", ip, "--port", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting rsync --daemon")?;
        let mut d = Daemon { url: format!("rsync://{ip}:{port}/dst/"), child };
        let t = Instant::now();
        loop {
            let listening = ns::within(ns, || Ok(TcpStream::connect((ip, port)).is_ok()))?;
            if listening {
                return Ok(d);
            }
            if let Some(st) = d.child.try_wait()? {
                bail!("rsync --daemon exited ({st})");
            }
            if t.elapsed() > Duration::from_secs(10) {
                bail!("rsync --daemon did not listen on {ip}:{port} within 10 s");
            }
            sleep(Duration::from_millis(20));
        }
    }
}

impl Daemon {
    /// CPU time of the daemon and of the processes it forked and reaped (one per connection).
    pub fn cpu(&self) -> Result<std::time::Duration> {
        crate::cpu::of_process_tree(self.child.id())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What rsync's `--stats` said.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stats {
    /// `Total bytes sent` (by the client).
    pub sent: u64,
    /// `Total bytes received`.
    pub received: u64,
    /// `Literal data`: file bytes sent as they are (the rest were matched).
    pub literal: u64,
    /// `Matched data`.
    pub matched: u64,
    /// `Number of regular files transferred`.
    pub files: u64,
}

/// Runs `rsync OPTS --stats SRC/ URL` in namespace `ns`; fails with its output.
pub fn push(ns: &str, opts: &[&str], src: &Path, url: &str) -> Result<Stats> {
    let out = ns::command(ns, "rsync")
        .args(opts)
        .arg("--stats")
        .arg(format!("{}/", src.display()))
        .arg(url)
        .output()
        .context("running rsync")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "rsync {} {}/ {url} failed ({}): {}{}",
            opts.join(" "),
            src.display(),
            out.status,
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(parse_stats(&text))
}

/// Reads the numbers of `--stats` output (they may carry thousands separators).
pub fn parse_stats(text: &str) -> Stats {
    let num = |key: &str| -> u64 {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .and_then(|rest| rest.trim_start_matches(':').split_whitespace().next())
            .map(|n| n.chars().filter(char::is_ascii_digit).collect::<String>())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    Stats {
        sent: num("Total bytes sent"),
        received: num("Total bytes received"),
        literal: num("Literal data"),
        matched: num("Matched data"),
        files: num("Number of regular files transferred"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn stats() {
        let text = "Number of files: 3 (reg: 2, dir: 1)\nNumber of regular files transferred: 2\n\
                    Literal data: 1,234 bytes\nMatched data: 0 bytes\nTotal bytes sent: 1,500\n\
                    Total bytes received: 77\n";
        let s = super::parse_stats(text);
        assert_eq!((s.sent, s.received, s.literal, s.matched, s.files), (1500, 77, 1234, 0, 2));
    }
}
