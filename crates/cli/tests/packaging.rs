//! What an administrator installs and runs around the binary: the Prometheus and Grafana
//! examples, the .deb (man pages, completions, systemd units, a real replication with the
//! installed binary), and the systemd readiness and watchdog notifications.

mod common;

use std::fs;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use doppel_testkit::skip::require_tools;

/// The repository's root.
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

/// Runs `cmd`; its output, after asserting that it succeeded.
fn ok(cmd: &mut Command) -> String {
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd:?} failed ({}):\n{text}", out.status);
    text
}

/// The words of `text` that name doppel metrics (`doppel_...`, less the label `doppel_job`).
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("doppel_") && *w != "doppel_job")
        .map(str::to_string)
        .collect()
}

/// The metric names the `/metrics` endpoint writes: the string literals of its source
/// (`"job_lag_seconds"`...), with the `doppel_` prefix it puts on each.
fn exposed() -> std::collections::BTreeSet<String> {
    let src = fs::read_to_string(repo().join("crates/cli/src/http/metrics.rs")).unwrap();
    let names: std::collections::BTreeSet<String> = src
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|s| {
            ["job_", "replica_", "source_", "build_info"].iter().any(|p| s.starts_with(p))
                && s.chars().all(|c| c.is_ascii_lowercase() || c == '_')
        })
        .map(|s| format!("doppel_{s}"))
        .collect();
    assert!(names.len() > 40, "metric names not found in the endpoint's source: {names:?}");
    names
}

fn unknown_metrics(text: &str) -> Vec<String> {
    let exposed = exposed();
    metric_names(text).into_iter().filter(|m| !exposed.contains(m)).collect()
}

#[test]
fn alert_rules_pass_promtool_checks_and_unit_tests() {
    let Some([promtool]) = require_tools(["promtool"]) else { return };
    let dir = repo().join("examples/prometheus");
    let out = ok(Command::new(&promtool).args(["check", "rules", "doppel-alerts.yml"]).current_dir(&dir));
    assert!(out.contains("SUCCESS"), "{out}");
    // Every alert fires on its synthetic series and stays quiet on the healthy ones.
    let out = ok(Command::new(&promtool).args(["test", "rules", "doppel-alerts.test.yml"]).current_dir(&dir));
    assert!(out.contains("SUCCESS"), "{out}");
    let rules = fs::read_to_string(dir.join("doppel-alerts.yml")).unwrap();
    let tests = fs::read_to_string(dir.join("doppel-alerts.test.yml")).unwrap();
    for alert in rules.lines().filter_map(|l| l.trim().strip_prefix("- alert: ")) {
        assert!(tests.contains(&format!("alertname: {alert}\n")), "no unit test evaluates {alert}");
    }
    assert!(unknown_metrics(&rules).is_empty(), "rules use unknown metrics: {:?}", unknown_metrics(&rules));
}

#[test]
fn grafana_dashboard_parses_and_uses_only_exposed_metrics() {
    let path = repo().join("examples/grafana/doppel-dashboard.json");
    let text = fs::read_to_string(&path).unwrap();
    let d: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let vars: Vec<&str> =
        d["templating"]["list"].as_array().unwrap().iter().filter_map(|v| v["name"].as_str()).collect();
    for v in ["source", "doppel_job"] {
        assert!(vars.contains(&v), "template variable {v} missing: {vars:?}");
    }
    let mut exprs = 0;
    for p in d["panels"].as_array().unwrap().iter().filter(|p| p["type"] != "row") {
        let targets = p["targets"].as_array().unwrap_or_else(|| panic!("panel without targets: {p}"));
        for t in targets {
            let e = t["expr"].as_str().unwrap();
            assert!(!metric_names(e).is_empty(), "{e}");
            exprs += 1;
        }
    }
    assert!(exprs >= 20, "only {exprs} queries");
    assert!(
        unknown_metrics(&text).is_empty(),
        "dashboard uses unknown metrics: {:?}",
        unknown_metrics(&text)
    );
    // The labels doppel sets; Prometheus's own `job`/`instance` are never doppel's.
    assert!(!text.contains("{job=") && !text.contains(", job="), "uses Prometheus's `job` label as doppel's");
}

#[test]
fn generated_man_pages_and_completions_cover_every_visible_command() {
    let dir = tempfile::tempdir().unwrap();
    let out = ok(Command::new(doppel()).args(["generate", "man"]).arg(dir.path().join("man")));
    let pages: Vec<&str> = out.lines().collect();
    for name in
        ["doppel", "doppel-protect", "doppel-target", "doppel-history-restore", "doppel-test-failover"]
    {
        let page = dir.path().join(format!("man/{name}.1"));
        let text = fs::read_to_string(&page)
            .unwrap_or_else(|e| panic!("{}: {e}; written: {pages:?}", page.display()));
        assert!(text.lines().any(|l| l.starts_with(&format!(".TH {name} 1"))), "{name}: no .TH header");
    }
    // The packagers' command and clap's `help` have no page.
    assert!(!dir.path().join("man/doppel-generate.1").exists());
    assert!(!dir.path().join("man/doppel-help.1").exists());
    ok(Command::new(doppel()).args(["generate", "completions"]).arg(dir.path().join("c")));
    let bash = fs::read_to_string(dir.path().join("c/doppel.bash")).unwrap();
    let zsh = fs::read_to_string(dir.path().join("c/_doppel")).unwrap();
    let fish = fs::read_to_string(dir.path().join("c/doppel.fish")).unwrap();
    for (shell, text) in [("bash", &bash), ("zsh", &zsh), ("fish", &fish)] {
        for sub in ["protect", "target", "test-failover", "history"] {
            assert!(text.contains(sub), "{shell} completions lack {sub}");
        }
        assert!(!text.contains("generate"), "{shell} completions offer the hidden `generate`");
    }
    assert!(zsh.starts_with("#compdef doppel"), "{}", &zsh[..40]);
    ok(Command::new("bash").arg("-n").arg(dir.path().join("c/doppel.bash")));
}

/// Purges the package when dropped (also when the test fails half way).
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", "doppel"]).stdin(Stdio::null()).output();
    }
}

/// Whether dpkg has `package` installed.
fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "install ok installed")
}

#[test]
fn deb_installs_man_pages_completions_units_and_a_binary_that_replicates() {
    if !require(rustix::process::geteuid().is_root(), "installing a .deb needs root") {
        return;
    }
    let Some([_, _, analyze, _, man]) = require_tools(["dpkg-deb", "dpkg", "systemd-analyze", "zcat", "man"])
    else {
        return;
    };
    // The package depends on fuse3 (the fuse capture); dpkg -i does not fetch dependencies.
    if !require(installed("fuse3"), "the package depends on fuse3, not installed") {
        return;
    }
    // Never overwrite an administrator's doppel.
    for p in ["/usr/bin/doppel", "/etc/doppel/doppel.toml"] {
        if Path::new(p).exists() && !installed("doppel") {
            skip_or_fail(&format!("{p} exists and is not from the package: this test will not replace it"));
            return;
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let out = ok(Command::new("bash")
        .arg(repo().join("packaging/build-deb.sh"))
        .arg("--binary")
        .arg(doppel())
        .arg("--out")
        .arg(dir.path()));
    let deb = PathBuf::from(out.lines().last().unwrap().trim());
    let version = ok(Command::new(doppel()).arg("--version"));
    assert!(
        deb.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(&format!("doppel_{}_", version.split_whitespace().nth(1).unwrap())),
        "{}",
        deb.display()
    );
    let fields = ok(Command::new("dpkg-deb").args(["--field"]).arg(&deb));
    assert!(fields.contains("Depends: fuse3, libc6"), "{fields}");
    assert!(fields.contains("Recommends: rsync, iputils-arping"), "{fields}");

    let _installed = Installed;
    ok(Command::new("dpkg").arg("-i").arg(&deb).env("DEBIAN_FRONTEND", "noninteractive"));
    assert_eq!(ok(Command::new("/usr/bin/doppel").arg("--version")), version);

    for name in ["doppel", "doppel-protect", "doppel-target", "doppel-failover", "doppel-history-restore"] {
        let page = format!("/usr/share/man/man1/{name}.1.gz");
        let text = ok(Command::new("zcat").arg(&page));
        assert!(text.lines().any(|l| l.starts_with(&format!(".TH {name} 1"))), "{page}: no .TH header");
    }
    // `man doppel` and `man doppel-protect` find and render the installed pages.
    for (page, option) in [("doppel", "--config"), ("doppel-protect", "--capture")] {
        let text = ok(Command::new(&man).args(["-P", "cat", page]).env("MANWIDTH", "100"));
        assert!(text.contains(page) && text.contains(option), "man {page}:\n{text}");
    }
    let bash = fs::read_to_string("/usr/share/bash-completion/completions/doppel").unwrap();
    assert!(bash.contains("complete") && bash.contains("test-failover"), "bash completions");
    ok(Command::new("bash").args(["-n", "/usr/share/bash-completion/completions/doppel"]));
    assert!(
        fs::read_to_string("/usr/share/zsh/vendor-completions/_doppel")
            .unwrap()
            .starts_with("#compdef doppel")
    );
    assert!(
        fs::read_to_string("/usr/share/fish/vendor_completions.d/doppel.fish")
            .unwrap()
            .contains("complete -c doppel")
    );
    for f in [
        "examples/doppel.toml",
        "examples/failover/start-vm.sh",
        "examples/failover/notify.sh",
        "examples/prometheus/doppel-alerts.yml",
        "examples/grafana/doppel-dashboard.json",
        "copyright",
    ] {
        assert!(Path::new("/usr/share/doc/doppel").join(f).is_file(), "/usr/share/doc/doppel/{f} missing");
    }

    // The configuration is a conffile, commented out: it parses, and configures nothing.
    let conffiles = ok(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "doppel"]));
    assert!(conffiles.contains("/etc/doppel/doppel.toml"), "{conffiles}");
    let conf = fs::read_to_string("/etc/doppel/doppel.toml").unwrap();
    assert!(
        conf.lines().all(|l| l.trim().is_empty() || l.trim_start().starts_with('#')),
        "a setting is not commented out"
    );
    let home = dir.path().join("home");
    ok(Command::new("/usr/bin/doppel")
        .args(["--config", "/etc/doppel/doppel.toml", "--home"])
        .arg(&home)
        .arg("init"));

    // The units are installed, valid, and neither enabled nor started.
    let units = ["/lib/systemd/system/doppel-target.service", "/lib/systemd/system/doppel-protect.service"];
    ok(Command::new(&analyze).arg("verify").args(units));
    for u in units {
        let text = fs::read_to_string(u).unwrap();
        assert!(text.contains("Type=notify") && text.contains("WatchdogSec="), "{u}");
    }
    for wants in ["doppel-target.service", "doppel-protect.service"] {
        assert!(
            !Path::new("/etc/systemd/system/multi-user.target.wants").join(wants).exists(),
            "{wants} enabled"
        );
    }

    // The installed binary replicates a tree (an embedded target: no daemon, no keys).
    let src = dir.path().join("src");
    Tree::at(&src).standard();
    let replica = dir.path().join("replica");
    let log = dir.path().join("agent.log");
    let child = Command::new("/usr/bin/doppel")
        .args(["protect", src.to_str().unwrap(), "--to", replica.to_str().unwrap()])
        .env("DOPPEL_HOME", &home)
        .env("DOPPEL_LOG", "info")
        .env_remove("DOPPEL_CONFIG")
        .env_remove("NOTIFY_SOCKET")
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut agent = Proc { child, log, home: home.clone() };
    wait_converged(&src, &replica, Duration::from_secs(60), &mut agent);
    // Then live changes.
    Tree::at(&src).file("new/file", &noise(9, 300_000)).file("a.txt", b"changed\n");
    fs::remove_file(src.join("dir2/e")).unwrap();
    wait_converged(&src, &replica, Duration::from_secs(60), &mut agent);
    assert!(agent.stop().success(), "{}", agent.log());

    ok(Command::new("dpkg").args(["--purge", "doppel"]));
    assert!(!installed("doppel"));
    for gone in
        ["/usr/bin/doppel", "/etc/doppel/doppel.toml", units[0], units[1], "/usr/share/man/man1/doppel.1.gz"]
    {
        assert!(!Path::new(gone).exists(), "{gone} left after purge");
    }
}

/// A `NOTIFY_SOCKET` for a process under test: what it sends, as systemd would see it.
struct Notifications {
    sock: UnixDatagram,
    path: PathBuf,
}

impl Notifications {
    fn bind(dir: &Path) -> Notifications {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        Notifications { sock, path }
    }

    /// The next message, if one arrives before `deadline`.
    fn next(&self, deadline: Instant) -> Option<String> {
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            match self.sock.recv(&mut buf) {
                Ok(n) => return Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
                Err(e)
                    if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(e) => panic!("notify socket: {e}"),
            }
        }
        None
    }

    /// Waits for a message with line `line`; returns it and the WATCHDOG=1 times seen meanwhile.
    fn wait_for(&self, line: &str, timeout: Duration, proc: &mut Proc) -> (String, Vec<Instant>) {
        let deadline = Instant::now() + timeout;
        let mut pings = Vec::new();
        loop {
            assert!(proc.running(), "exited before sending {line}: {}", proc.log());
            let Some(m) = self.next(deadline.min(Instant::now() + Duration::from_secs(1))) else {
                assert!(Instant::now() < deadline, "no {line} within {timeout:?}; log:\n{}", proc.log());
                continue;
            };
            if m.lines().any(|l| l == "WATCHDOG=1") {
                pings.push(Instant::now());
            }
            if m.lines().any(|l| l == line) {
                return (m, pings);
            }
        }
    }

    /// Asserts that WATCHDOG=1 keeps arriving, `n` times, never further apart than
    /// `WATCHDOG_USEC`.
    fn watchdog_pings(&self, n: usize, proc: &mut Proc) {
        let mut last = Instant::now();
        for _ in 0..n {
            self.wait_for("WATCHDOG=1", WATCHDOG, proc);
            let gap = last.elapsed();
            assert!(gap < WATCHDOG, "{gap:?} between watchdog pings, over WATCHDOG_USEC");
            last = Instant::now();
        }
    }
}

/// The WATCHDOG_USEC the tests set: pings are due every second.
const WATCHDOG: Duration = Duration::from_secs(2);

fn start_notifying(home: &Path, name: &str, notify: &Notifications, args: &[&str]) -> Proc {
    fs::create_dir_all(home).unwrap();
    let log = home.join(format!("{name}.log"));
    let child = Command::new(doppel())
        .arg("--home")
        .arg(home)
        .args(args)
        .env("DOPPEL_LOG", "info")
        .env_remove("DOPPEL_CONFIG")
        .env_remove("WATCHDOG_PID")
        .env("NOTIFY_SOCKET", &notify.path)
        .env("WATCHDOG_USEC", WATCHDOG.as_micros().to_string())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    Proc { child, log, home: home.to_path_buf() }
}

#[test]
fn target_tells_systemd_it_is_ready_once_listening_and_feeds_the_watchdog() {
    let dir = tempfile::tempdir().unwrap();
    let notify = Notifications::bind(dir.path());
    let home = dir.path().join("home");
    let data = dir.path().join("data");
    let mut target = start_notifying(
        &home,
        "target",
        &notify,
        &["target", "--listen", "127.0.0.1:0", "--data", data.to_str().unwrap()],
    );
    let (ready, _) = notify.wait_for("READY=1", Duration::from_secs(30), &mut target);
    // Ready means usable: sources can connect, and `doppel reload`/`status` get answers.
    let addr =
        fs::read_to_string(home.join("run/target.addr")).expect("the address is written before READY=1");
    std::net::TcpStream::connect(&addr).unwrap_or_else(|e| panic!("READY=1 but {addr} refuses: {e}"));
    std::os::unix::net::UnixStream::connect(home.join("run/target.sock"))
        .expect("the control socket answers");
    assert!(ready.contains(&format!("STATUS=listening on {addr}")), "{ready}");
    notify.watchdog_pings(4, &mut target);
    let pid = rustix::process::Pid::from_child(&target.child);
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let stopping = std::iter::from_fn(|| notify.next(deadline)).find(|m| m.contains("STOPPING=1"));
    assert!(stopping.is_some(), "no STOPPING=1 after SIGTERM");
    assert!(target.wait(Duration::from_secs(60)).success(), "{}", target.log());
}

#[test]
fn protect_tells_systemd_it_is_ready_once_its_jobs_run_and_feeds_the_watchdog() {
    let dir = tempfile::tempdir().unwrap();
    let notify = Notifications::bind(dir.path());
    let home = dir.path().join("home");
    let src = dir.path().join("src");
    Tree::at(&src).standard();
    let replica = dir.path().join("replica");
    let mut agent = start_notifying(
        &home,
        "agent",
        &notify,
        &["protect", src.to_str().unwrap(), "--to", replica.to_str().unwrap(), "--name", "www"],
    );
    let (ready, _) = notify.wait_for("READY=1", Duration::from_secs(60), &mut agent);
    assert!(ready.contains("STATUS=protecting 1 job(s): www"), "{ready}");
    // Ready means the job runs: its control socket answers and it has left `starting`.
    let s = job_status(&home, "www");
    assert!(s["state"].is_string() && s["state"] != "starting", "{s}");
    notify.watchdog_pings(3, &mut agent);
    wait_converged(&src, &replica, Duration::from_secs(60), &mut agent);
    assert!(agent.stop().success(), "{}", agent.log());
}

#[test]
fn without_a_notify_socket_nothing_is_sent_and_the_target_runs() {
    // The watchdog variables alone (no NOTIFY_SOCKET, as outside systemd) change nothing.
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    fs::create_dir_all(&home).unwrap();
    let log = home.join("target.log");
    let child = Command::new(doppel())
        .arg("--home")
        .arg(&home)
        .args(["target", "--listen", "127.0.0.1:0", "--data"])
        .arg(dir.path().join("data"))
        .env_remove("NOTIFY_SOCKET")
        .env_remove("DOPPEL_CONFIG")
        .env("WATCHDOG_USEC", "2000000")
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut target = Proc { child, log, home: home.clone() };
    let addr = wait_until(Duration::from_secs(30), "the target to listen", || {
        assert!(target.running(), "{}", target.log());
        fs::read_to_string(home.join("run/target.addr")).map_err(|e| e.to_string())
    });
    std::net::TcpStream::connect(&addr).unwrap();
    assert!(target.stop().success(), "{}", target.log());
    assert!(!target.log().contains("cannot notify systemd"), "{}", target.log());
}
