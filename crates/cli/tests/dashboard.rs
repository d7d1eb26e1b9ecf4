//! The dashboard in a real headless Chromium (issue 11): served by a live target with two
//! sources, it loads without console errors, shows both sources and their replicas as they
//! are, and follows a source's agent being killed without a reload. The last screenshot is
//! kept as `target/test-artifacts/dashboard.png`.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::browser::{self, Browser};
use common::*;
use serde_json::Value;

/// Every source group and replica row of the page, by the data attributes the page sets for
/// tests (never by scraping text), and the page's own error list.
const READ_PAGE: &str = r#"(() => {
  const sources = {};
  for (const b of document.querySelectorAll('#sources tbody[data-source]')) {
    const jobs = {};
    for (const r of b.querySelectorAll('tr[data-job]')) {
      jobs[r.dataset.job] = { state: r.dataset.state, connected: r.dataset.connected === 'true' };
    }
    sources[b.dataset.source] = { state: b.dataset.state, jobs };
  }
  return {
    api: document.body.dataset.api,
    updates: Number(document.body.dataset.updates),
    sources,
    events: document.querySelectorAll('#events li').length,
    errors: window.doppelErrors || null,
    marker: window.__doppelTestMarker || null,
  };
})()"#;

/// Where the screenshot goes: `target/test-artifacts/` of this workspace.
fn artifacts_dir() -> PathBuf {
    match option_env!("CARGO_TARGET_TMPDIR").map(Path::new).and_then(Path::parent) {
        Some(target) => target.join("test-artifacts"),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/test-artifacts"),
    }
}

/// A target on 127.0.0.1 with its HTTP endpoint on a free loopback port, allowing `allow`;
/// returns it and the endpoint's address.
fn start_target_with_http(dir: &Path, allow: &[(&str, &str)]) -> (TargetProc, String) {
    let home = dir.join("target-home");
    let data = dir.join("target-data");
    let id = init(&home);
    let mut args = vec![
        "target".to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--data".into(),
        data.to_string_lossy().into_owned(),
        "--http".into(),
        "127.0.0.1:0".into(),
    ];
    for (name, id) in allow {
        args.push("--allow".into());
        args.push(format!("{name}={id}"));
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut proc = Proc::start(&home, "target", &argv);
    let mut read = |file: &str| {
        let path = home.join("run").join(file);
        wait_until(Duration::from_secs(30), &format!("the target to write {}", path.display()), || {
            if !proc.running() {
                panic!("target exited: {}", proc.log());
            }
            std::fs::read_to_string(&path).map_err(|e| e.to_string()).and_then(|s| {
                if s.trim().is_empty() { Err("empty".into()) } else { Ok(s.trim().to_string()) }
            })
        })
    };
    let addr = read("target.addr");
    let http = read("http.addr");
    (TargetProc { proc, addr, id, data }, http)
}

/// Whether `page` shows `source` in source state `state` (one of), with replica `job` in
/// replica state `job_state` and connected as `connected`.
fn shows(
    page: &Value,
    source: &str,
    states: &[&str],
    job: &str,
    job_state: &str,
    connected: bool,
) -> Result<(), String> {
    let s = &page["sources"][source];
    let state = s["state"].as_str().unwrap_or("(absent)");
    if !states.contains(&state) {
        return Err(format!("{source} is {state}, not {states:?}"));
    }
    let j = &s["jobs"][job];
    if j["state"] != job_state || j["connected"] != connected {
        return Err(format!("{source}/{job} is {j}, not {job_state} (connected: {connected})"));
    }
    Ok(())
}

#[test]
fn dashboard_shows_two_live_sources_and_follows_a_disconnect() {
    let Some(_) = doppel_testkit::require_ok(browser::find_chromium()) else { return };
    let browser =
        Browser::launch().unwrap_or_else(|e| panic!("chromium is installed but did not start: {e}"));

    let dir = tempfile::tempdir().unwrap();
    let (alpha_home, beta_home) = (dir.path().join("alpha-home"), dir.path().join("beta-home"));
    let (alpha_id, beta_id) = (init(&alpha_home), init(&beta_home));
    let (target, http) = start_target_with_http(dir.path(), &[("alpha", &alpha_id), ("beta", &beta_id)]);

    let mut agents = Vec::new();
    for (name, home) in [("alpha", &alpha_home), ("beta", &beta_home)] {
        let src = dir.path().join(format!("{name}-src"));
        Tree::at(&src).file("index.html", b"<h1>hello</h1>").file("data/blob.bin", &noise(7, 200_000));
        // Beta's agent serves its own page too. A heartbeat every second keeps an idle source
        // clearly alive (the default equals the target's check interval).
        let mut args = vec!["--name", "data", "--capture", "inotify", "--heartbeat", "1"];
        if name == "beta" {
            args.extend(["--http", "127.0.0.1:0"]);
        }
        let mut agent = target.protect(home, "agent", &src, &args);
        let replica = target.data.join("replicas").join(name).join("data");
        wait_converged(&src, &replica, Duration::from_secs(60), &mut agent);
        // A change after the first mirror, so that the target has applied an op (its lag).
        Tree::at(&src).file("late.txt", b"changed while protected");
        wait_converged(&src, &replica, Duration::from_secs(60), &mut agent);
        agents.push(agent);
    }

    let mut page = browser.new_page().unwrap();
    let url = format!("http://{http}/");
    page.navigate(&url).unwrap_or_else(|e| panic!("{e}; chromium stderr:\n{}", browser.stderr()));
    page.eval("window.__doppelTestMarker = 'not reloaded'; true").unwrap();

    let first =
        page.wait_for(Duration::from_secs(60), "both sources alive and replicating", READ_PAGE, |v| {
            if v["api"] != "ok" {
                return Err(format!("the page's API state is {}", v["api"]));
            }
            shows(v, "alpha", &["alive"], "data", "replicating", true)?;
            shows(v, "beta", &["alive"], "data", "replicating", true)?;
            Ok(v.clone())
        });
    println!("page after load: {first}");
    assert_eq!(first["errors"], Value::Array(vec![]), "the page caught errors: {first}");
    let errors = page.console_errors();
    assert!(errors.is_empty(), "console errors while loading {url}: {errors:#?}");

    // alpha's agent dies without a goodbye: the same page (not reloaded) must follow.
    agents[0].kill();
    let after = page.wait_for(
        Duration::from_secs(90),
        "alpha disconnected and silent while beta stays alive",
        READ_PAGE,
        |v| {
            shows(v, "alpha", &["silent", "failed"], "data", "disconnected", false)?;
            shows(v, "beta", &["alive"], "data", "replicating", true)?;
            Ok(v.clone())
        },
    );
    println!("page after the kill: {after}");
    assert_eq!(after["marker"], "not reloaded", "the page was reloaded: {after}");
    assert!(
        after["updates"].as_u64() > first["updates"].as_u64(),
        "the page did not poll again: {first} then {after}"
    );

    // The summary bar counts what the rows show.
    let counts = page
        .eval(
            "Object.fromEntries(Array.from(document.querySelectorAll('#summary [data-of]'))\
             .map(c => [c.dataset.of + ':' + c.dataset.chip, Number(c.dataset.count)]))",
        )
        .unwrap();
    let count = |k: &str| counts[k].as_u64().unwrap_or(0);
    assert_eq!(count("sources:alive"), 1, "{counts}");
    assert_eq!(count("sources:silent") + count("sources:failed"), 1, "{counts}");
    assert_eq!((count("jobs:replicating"), count("jobs:disconnected")), (1, 1), "{counts}");

    // The agent's own page: its job, from the same assets.
    let agent_http =
        std::fs::read_to_string(beta_home.join("run/http.addr")).expect("beta's agent serves HTTP");
    let mut agent_page = browser.new_page().unwrap();
    agent_page.navigate(&format!("http://{}/", agent_http.trim())).unwrap();
    let job = agent_page.wait_for(
        Duration::from_secs(60),
        "the agent's page to show its job replicating",
        "(() => { const r = document.querySelector('#jobs tr[data-job=\"data\"]'); \
         return r && { state: r.dataset.state, connected: r.dataset.connected, errors: window.doppelErrors }; })()",
        |v| if v["state"] == "replicating" && v["connected"] == "true" { Ok(v.clone()) } else { Err(format!("{v}")) },
    );
    assert_eq!(job["errors"], Value::Array(vec![]), "the agent's page caught errors: {job}");
    let errors = agent_page.console_errors();
    assert!(errors.is_empty(), "console errors on the agent's page: {errors:#?}");
    let agent_shot = artifacts_dir().join("dashboard-agent.png");
    agent_page.screenshot(&agent_shot).unwrap();
    println!("screenshot: {}", agent_shot.display());

    let shot = artifacts_dir().join("dashboard.png");
    page.screenshot(&shot).unwrap();
    println!("screenshot: {}", shot.display());

    assert_eq!(after["errors"], Value::Array(vec![]), "the page caught errors: {after}");
    let errors = page.console_errors();
    assert!(errors.is_empty(), "console errors on {url}: {errors:#?}");
    drop(agents);
    drop(target);
}
