//! Progress of long work with the real binary: the initial mirror of a tree of 60 MiB through a
//! bandwidth limit (so it lasts seconds), as plain log lines when standard error is a file and
//! as a bar on a pseudo-terminal (`script`); then `verify` and `history restore` with their
//! summaries.

mod common;

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// Six files of 10 MiB and 200 of 4 KiB.
fn tree(src: &Path) -> (u64, u64) {
    fs::create_dir_all(src.join("small")).unwrap();
    for i in 0..6 {
        big_file(&src.join(format!("big{i}.img")), 10 << 20, 100 + i);
    }
    for i in 0..200 {
        Tree::at(src).file(&format!("small/f{i:03}"), &noise(1000 + i, 4096));
    }
    (206, 6 * (10 << 20) + 200 * 4096)
}

/// The agent's arguments: slow enough (12 MiB/s, a spool of 8 MiB the comparison waits on)
/// that the mirror takes about five seconds.
fn protect_args<'a>(src: &'a Path, target: &'a TargetProc) -> Vec<&'a str> {
    vec![
        "protect",
        src.to_str().unwrap(),
        "--to",
        &target.addr,
        "--target-id",
        &target.id,
        "--name",
        "www",
        "--capture",
        "inotify",
        "--limit",
        "12MiB",
        "--spool-limit",
        "8MiB",
    ]
}

/// `doppel --home HOME ARGS` with progress lines every second, standard error to `HOME/NAME.log`.
fn start(home: &Path, name: &str, args: &[&str]) -> Proc {
    fs::create_dir_all(home).unwrap();
    let log = home.join(format!("{name}.log"));
    let f = fs::File::create(&log).unwrap();
    let child = Command::new(doppel())
        .arg("--home")
        .arg(home)
        .args(args)
        .env("DOPPEL_LOG", "info")
        .env("DOPPEL_PROGRESS_SECS", "1")
        .env_remove("DOPPEL_CONFIG")
        .stdout(Stdio::null())
        .stderr(f)
        .spawn()
        .unwrap();
    Proc { child, log, home: home.to_path_buf() }
}

/// Runs `doppel --home HOME ARGS` with info logs and progress every second.
fn run_logged(home: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(doppel())
        .arg("--home")
        .arg(home)
        .args(args)
        .env("DOPPEL_LOG", "info")
        .env("DOPPEL_PROGRESS_SECS", "1")
        .env_remove("DOPPEL_CONFIG")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The share of a progress line (`mirror: 23.8 MiB of 60.8 MiB (39%), ...`).
fn percent(line: &str) -> Option<u32> {
    let (_, rest) = line.split_once(" (")?;
    rest.split_once("%)")?.0.parse().ok()
}

#[test]
fn a_mirror_off_a_terminal_logs_progress_lines_and_verify_and_restore_summarise() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let home = dir.path().join("source-home");
    let (files, bytes) = tree(&src);
    let source_id = init(&home);
    let target = start_target(dir.path(), &[("web", &source_id)], 0);
    let mut agent = start(&home, "agent", &protect_args(&src, &target));

    // While it mirrors, the status knows the tree's size (as the selection holds it).
    let seen = wait_until(Duration::from_secs(60), "the status to show the mirror's total", || {
        assert!(agent.running(), "agent exited: {}", agent.log());
        let s = job_status(&home, "www");
        match s["mirror_total_bytes"].as_u64() {
            // `doppel status` says so too.
            Some(_) => {
                let (_, text, _) = run(&home, &["status"]);
                if text.contains(" of 60.8 MiB (") && text.contains(" of 206 files") {
                    Ok(s)
                } else {
                    Err(text)
                }
            }
            None if s["state"] == "replicating" => panic!("the mirror ended unseen: {s}"),
            None => Err(s.to_string()),
        }
    });
    assert_eq!(
        (seen["mirror_total_files"].as_u64(), seen["mirror_total_bytes"].as_u64()),
        (Some(files), Some(bytes))
    );
    assert!(seen["mirror_done_bytes"].as_u64().unwrap() <= bytes, "{seen}");
    let replica = target.data.join("replicas/web/www");
    wait_converged(&src, &replica, Duration::from_secs(120), &mut agent);

    let log = agent.log();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains(" mirror: ")).collect();
    let with_eta: Vec<&&str> = lines
        .iter()
        .filter(|l| {
            percent(l).is_some_and(|p| p < 100)
                && l.contains(" of 60.8 MiB (")
                && l.contains(" of 206 files, ")
                && l.contains("/s, ETA ")
        })
        .collect();
    assert!(with_eta.len() >= 2, "progress lines with a share and an ETA, once a second:\n{log}");
    let shares: Vec<u32> = lines.iter().filter_map(|l| percent(l)).collect();
    assert!(shares.windows(2).all(|w| w[0] <= w[1]), "the share only grows: {shares:?}\n{log}");
    assert!(!log.contains('\x1b'), "escape sequences in a log that is not a terminal:\n{log}");
    // Once replicating, no status shows a comparison under way.
    let s = job_status(&home, "www");
    assert!(s.get("mirror_done_bytes").is_none(), "{s}");

    // verify: the summary counts what it compared.
    let (ok, out, err) = run_logged(&home, &["verify", "www"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("replica matches the source (208 entries compared, 60.8 MiB read)"), "{out}");
    assert!(!err.contains('\x1b'), "{err}");

    // history restore: the summary counts objects and bytes.
    let to = dir.path().join("restored");
    let (ok, out, err) = run_logged(
        &target.proc.home,
        &["history", "restore", "web/www", "--at", "now", "--to", to.to_str().unwrap()],
    );
    assert!(ok, "{out}{err}");
    assert!(err.contains(": 207 objects, 60.8 MiB"), "{err}");
    assert!(!err.contains('\x1b'), "{err}");
    compare_trees(&src, &to, Compare::default()).unwrap();
    assert!(agent.stop().success(), "{}", agent.log());
}

#[test]
fn a_mirror_on_a_terminal_draws_a_bar() {
    if !require(Path::new("/usr/bin/script").exists(), "needs script (util-linux) for a pseudo-terminal") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let home = dir.path().join("source-home");
    tree(&src);
    let source_id = init(&home);
    let target = start_target(dir.path(), &[("web", &source_id)], 0);
    // The agent runs in `script`'s pseudo-terminal; the shell records its pid to stop it.
    let pid_file = dir.path().join("agent.pid");
    let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    let mut argv =
        vec![doppel().to_string_lossy().into_owned(), "--home".into(), home.to_string_lossy().into()];
    argv.extend(protect_args(&src, &target).iter().map(|s| s.to_string()));
    let cmd = format!(
        "{} & echo $! > {}; wait",
        argv.iter().map(|a| quote(a)).collect::<Vec<_>>().join(" "),
        quote(pid_file.to_str().unwrap())
    );
    let out_path = dir.path().join("terminal.out");
    let child = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .env("TERM", "xterm")
        .env("COLUMNS", "100")
        .env_remove("DOPPEL_LOG")
        .env_remove("DOPPEL_CONFIG")
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out_path).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut script = Proc { child, log: out_path.clone(), home: home.clone() };
    let replica = target.data.join("replicas/web/www");
    wait_converged(&src, &replica, Duration::from_secs(120), &mut script);
    wait_until(Duration::from_secs(30), "the agent to replicate", || {
        (job_status(&home, "www")["state"] == "replicating").then_some(()).ok_or("not yet".to_string())
    });
    let pid: i32 = fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    script.wait(Duration::from_secs(60));
    let out = fs::read_to_string(&out_path).unwrap();
    // A bar with a share, the sizes, the files, a rate and an ETA, redrawn in place.
    let frames: Vec<&str> = out
        .split(['\r', '\n'])
        .filter(|f| {
            f.contains("mirror [") && f.contains("% ") && f.contains("/206 files, ") && f.contains("ETA ")
        })
        .collect();
    assert!(frames.len() >= 3, "no progress bar drawn:\n{out}");
    assert!(frames.iter().any(|f| f.contains("/60.8 MiB, ")), "{frames:?}");
    assert!(out.contains("\x1b[2K"), "lines are not redrawn in place:\n{out}");
    // Log lines written meanwhile arrive whole, above the bar.
    assert!(out.contains("difference mirror: tree compared"), "{out}");
}
