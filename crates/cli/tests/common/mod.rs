//! Helpers for end-to-end tests: real `doppel` processes, real files, real sockets.

#![allow(dead_code)]

pub mod browser;
pub mod sqlite;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

#[allow(unused_imports)]
pub use doppel_testkit::{
    Compare, Proxy, Tree, compare_trees, noise, require, require_fuse, skip_or_fail, snapshot, wait_until,
};

/// The binary under test.
pub fn doppel() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_doppel"))
}

/// Runs `doppel ARGS` to completion; returns (status, stdout, stderr).
pub fn run(home: &Path, args: &[&str]) -> (ExitStatus, String, String) {
    let out = Command::new(doppel())
        .arg("--home")
        .arg(home)
        .args(args)
        .env("DOPPEL_LOG", "warn")
        .env_remove("DOPPEL_CONFIG")
        .output()
        .expect("run doppel");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `doppel init`; returns the identity.
pub fn init(home: &Path) -> String {
    let (st, out, err) = run(home, &["init"]);
    assert!(st.success(), "init failed: {err}");
    out.trim().to_string()
}

/// A running doppel process, killed when dropped.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
    pub home: PathBuf,
}

impl Proc {
    /// Starts `doppel --home HOME ARGS` with its log in `HOME/<name>.log`.
    pub fn start(home: &Path, name: &str, args: &[&str]) -> Proc {
        Proc::start_with(Command::new(doppel()), home, name, args)
    }

    /// Like [`Proc::start`], inside network namespace `ns`.
    pub fn start_in(ns: &str, home: &Path, name: &str, args: &[&str]) -> Proc {
        Proc::start_with(doppel_testkit::netns::NetBench::command(ns, &doppel()), home, name, args)
    }

    fn start_with(mut cmd: Command, home: &Path, name: &str, args: &[&str]) -> Proc {
        fs::create_dir_all(home).unwrap();
        let log = home.join(format!("{name}.log"));
        let f = fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let child = cmd
            .arg("--home")
            .arg(home)
            .args(args)
            .env("DOPPEL_LOG", "info")
            .env_remove("DOPPEL_CONFIG")
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .expect("spawn doppel");
        Proc { child, log, home: home.to_path_buf() }
    }

    /// The log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for the exit (at most 60 s).
    pub fn stop(&mut self) -> ExitStatus {
        let pid = rustix::process::Pid::from_child(&self.child);
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        self.wait(Duration::from_secs(60))
    }

    /// Waits for the process to exit by itself.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < deadline, "process did not exit in {timeout:?}; log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A target daemon on 127.0.0.1.
pub struct TargetProc {
    pub proc: Proc,
    pub addr: String,
    pub id: String,
    pub data: PathBuf,
}

impl TargetProc {
    /// Starts `doppel protect SRC --to THIS --target-id ID ARGS...` with home `home`, its log in
    /// `HOME/<log>.log`.
    pub fn protect(&self, home: &Path, log: &str, src: &Path, args: &[&str]) -> Proc {
        let mut argv = vec!["protect", src.to_str().unwrap(), "--to", &self.addr, "--target-id", &self.id];
        argv.extend_from_slice(args);
        Proc::start(home, log, &argv)
    }
}

/// Starts a target with its home in `dir/target-home`, data in `dir/target-data`, allowing
/// `allow` (NAME, ID), listening on `port` (0: any).
pub fn start_target(dir: &Path, allow: &[(&str, &str)], port: u16) -> TargetProc {
    start_target_with(dir, allow, &format!("127.0.0.1:{port}"), &dir.join("target-data"), None)
}

/// A target listening on `listen`, keeping replicas in `data`, optionally inside network
/// namespace `ns`.
pub fn start_target_with(
    dir: &Path,
    allow: &[(&str, &str)],
    listen: &str,
    data: &Path,
    ns: Option<&str>,
) -> TargetProc {
    let mut args = Vec::new();
    for (name, id) in allow {
        args.push("--allow".into());
        args.push(format!("{name}={id}"));
    }
    start_target_args(dir, listen, data, ns, args)
}

/// A target whose config file (`dir/target.toml`) holds `config` (e.g. `[[target.allow]]`
/// sections with failover settings).
pub fn start_target_config(
    dir: &Path,
    config: &str,
    listen: &str,
    data: &Path,
    ns: Option<&str>,
) -> TargetProc {
    let path = dir.join("target.toml");
    fs::write(&path, config).unwrap();
    start_target_args(dir, listen, data, ns, vec!["--config".into(), path.to_string_lossy().into_owned()])
}

/// The identity of the target whose home is `dir/target-home` (created if needed), for
/// configs that must name it before the target starts.
pub fn target_identity(dir: &Path) -> String {
    init(&dir.join("target-home"))
}

fn start_target_args(
    dir: &Path,
    listen: &str,
    data: &Path,
    ns: Option<&str>,
    extra: Vec<String>,
) -> TargetProc {
    let home = dir.join("target-home");
    let data = data.to_path_buf();
    let id = init(&home);
    let _ = fs::remove_file(home.join("run/target.addr"));
    let listen = listen.to_string();
    let mut args: Vec<String> =
        vec!["target".into(), "--listen".into(), listen, "--data".into(), data.to_string_lossy().into()];
    args.extend(extra);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut proc = match ns {
        Some(ns) => Proc::start_in(ns, &home, "target", &argv),
        None => Proc::start(&home, "target", &argv),
    };
    let addr = wait_until(Duration::from_secs(30), "the target to listen", || {
        if !proc.running() {
            panic!("target exited: {}", proc.log());
        }
        fs::read_to_string(home.join("run/target.addr")).map_err(|e| e.to_string())
    });
    TargetProc { proc, addr, id, data }
}

/// The status of `job` from `doppel status --json`.
pub fn job_status(home: &Path, job: &str) -> Value {
    let (st, out, err) = run(home, &["status", "--json"]);
    assert!(st.success(), "status failed: {err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    v["jobs"].as_array().unwrap().iter().find(|j| j["job"] == job).cloned().unwrap_or(Value::Null)
}

/// Bytes the running agent of `job` has sent since it started.
pub fn bytes_sent(home: &Path, job: &str) -> u64 {
    job_status(home, job)["bytes_sent"].as_u64().unwrap_or(0)
}

/// Waits until the replica equals the source.
pub fn wait_converged(src: &Path, replica: &Path, timeout: Duration, proc: &mut Proc) {
    wait_until(timeout, "the replica to equal the source", || {
        if !proc.running() {
            panic!("agent exited early; log:\n{}", proc.log());
        }
        compare_trees(src, replica, Compare::default())
    });
}

/// Writes a file of `size` bytes of noise in 8 MiB pieces (no huge allocation).
pub fn big_file(path: &Path, size: u64, seed: u64) {
    let f = fs::File::create(path).unwrap();
    let chunk = 8 << 20;
    let mut off = 0u64;
    while off < size {
        let n = chunk.min(size - off) as usize;
        f.write_all_at(&noise(seed + off, n), off).unwrap();
        off += n as u64;
    }
}

/// Makes every kind of change a live system makes: in-place overwrites, appends, truncates
/// (both ways), renames of files and directories, deletes, chmods, new nested directories,
/// a retargeted symlink, a new hard link, an explicit mtime, and extended attributes changed,
/// added and removed.
pub fn churn(src: &Path) {
    let t = Tree::at(src);
    let big = src.join("big.img");
    if big.exists() {
        let f = fs::OpenOptions::new().write(true).open(&big).unwrap();
        f.write_all_at(&noise(77, 1 << 20), 100 << 20).unwrap();
        f.write_all_at(b"tiny change", 3).unwrap();
    }
    let mut f = fs::OpenOptions::new().append(true).open(src.join("a.txt")).unwrap();
    std::io::Write::write_all(&mut f, b"appended line\n").unwrap();
    drop(f);
    fs::OpenOptions::new().write(true).open(src.join("dir1/b.bin")).unwrap().set_len(1234).unwrap();
    fs::OpenOptions::new().write(true).open(src.join("dir2/e")).unwrap().set_len(200_000).unwrap();
    fs::rename(src.join("dir1/sub/c.txt"), src.join("dir1/c-renamed.txt")).unwrap();
    fs::rename(src.join("dir1/sub"), src.join("moved-sub")).unwrap();
    fs::remove_file(src.join("empty")).unwrap();
    fs::remove_dir(src.join("emptydir")).unwrap();
    t.chmod("dir2/e", 0o640).chmod("dir2", 0o711);
    t.file("new/deep/er/file1", &noise(5, 3000)).file("new/deep/file2", b"two");
    fs::remove_file(src.join("link-rel")).unwrap();
    t.symlink("link-rel", "a.txt");
    t.hardlink("new/hard-to-a", "a.txt");
    t.xattr("a.txt", "user.comment", b"a longer note, changed").xattr("new/deep/file2", "user.new", b"2");
    t.remove_xattr("dir1", "user.dir").xattr("dir2", "user.dir", b"on dir2 now");
    t.mtime("dir2/e", 1_500_000_000);
    fs::remove_dir_all(src.join("moved-sub/deeper")).unwrap();
}

/// Lazily detaches a capture mount a test's agent left at `path` (an agent killed with SIGKILL
/// cannot unmount, and a stale mount keeps the test's temporary directory from going).
pub fn detach_stale_mount(path: &Path) {
    let mounted = || doppel_testkit::mount_points().unwrap_or_default().iter().any(|m| m == path);
    // Agents restarted over a stale mount may have stacked several: detach each.
    for _ in 0..16 {
        if !mounted() || rustix::mount::unmount(path, rustix::mount::UnmountFlags::DETACH).is_err() {
            break;
        }
    }
}

/// Detaches what a test's agents left mounted at its path when dropped: declare it after the
/// temporary directory and before the agents (dropped after them, before the directory).
pub struct StaleMountGuard(pub PathBuf);

impl Drop for StaleMountGuard {
    fn drop(&mut self) {
        detach_stale_mount(&self.0);
    }
}

/// Whether a live doppel capture mount serves `path` (a FUSE file system answers `statfs`
/// there; a stale or detached one does not).
pub fn capture_mount_live(path: &Path) -> bool {
    const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;
    match rustix::fs::statfs(path) {
        #[allow(clippy::unnecessary_cast)]
        Ok(s) => s.f_type as i64 == FUSE_SUPER_MAGIC,
        Err(_) => false,
    }
}

/// Whether the fuse tests can run here (root and the FUSE device); if not, the test is
/// skipped, or fails under `DOPPEL_TEST_STRICT=1`.
pub fn fuse_available() -> bool {
    require_fuse()
}

/// The target's view of source `name` (from `doppel status --json` there).
pub fn source_status(target_home: &Path, name: &str) -> Value {
    let (st, out, err) = run(target_home, &["status", "--json"]);
    assert!(st.success(), "status failed: {err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    v["sources"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["source"] == name)
        .cloned()
        .unwrap_or(Value::Null)
}

/// Writes a shell script to `path`; returns the command that runs it.
pub fn script(path: &Path, body: &str) -> String {
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
    format!("sh {}", path.display())
}

/// The target's view of one replica (from `doppel status --json` on the target).
pub fn replica_status(target_home: &Path) -> Value {
    let (st, out, err) = run(target_home, &["status", "--json"]);
    assert!(st.success(), "status failed: {err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    v["replicas"].as_array().and_then(|r| r.first().cloned()).unwrap_or(Value::Null)
}

/// A small deterministic random number generator (xorshift), seeded per test and printed,
/// so a failing run can be replayed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        println!("random seed {seed}");
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn from_time() -> Rng {
        Rng::new(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// The `watch` capture back-ends an end-to-end scenario runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watch {
    /// `--capture fanotify` (root only).
    Fanotify,
    /// `--capture inotify`.
    Inotify,
}

impl Watch {
    /// The agent's arguments that choose this back-end.
    pub fn args(self) -> [&'static str; 2] {
        match self {
            Watch::Fanotify => ["--capture", "fanotify"],
            Watch::Inotify => ["--capture", "inotify"],
        }
    }

    /// Whether the back-end can run here; fanotify needs root (skipped without it, or failed
    /// under `DOPPEL_TEST_STRICT=1`).
    pub fn available(self) -> bool {
        self == Watch::Inotify || require(rustix::process::geteuid().is_root(), "fanotify capture needs root")
    }
}

/// One `#[test]` per watch back-end for each scenario `fn NAME(watch: Watch)`: a module
/// `NAME` with the tests `fanotify` and `inotify`, so both back-ends are tested end to end.
#[macro_export]
macro_rules! with_each_watch_backend {
    ($($scenario:ident),* $(,)?) => {
        $(
            mod $scenario {
                use super::common::Watch;

                #[test]
                fn fanotify() {
                    if Watch::Fanotify.available() {
                        super::$scenario(Watch::Fanotify);
                    }
                }

                #[test]
                fn inotify() {
                    super::$scenario(Watch::Inotify);
                }
            }
        )*
    };
}
