//! The HTTP endpoint of a live target and agent: Prometheus metrics that `promtool` accepts and
//! that follow the sources as they come and go, and an API that says what `status --json` says.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::Value;

/// `GET path` on the endpoint whose address `HOME/run/http.addr` holds: (status code, body).
fn get(home: &Path, path: &str) -> (u16, String) {
    let addr = std::fs::read_to_string(home.join("run/http.addr")).expect("the HTTP endpoint's address");
    let mut s = std::net::TcpStream::connect(addr.trim()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: doppel\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let code = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, body.to_string())
}

/// The value of series `series` (name and labels, as exposed) in `text`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// `promtool check metrics` on `text`: the linter's complaints, empty when there are none.
fn promtool(text: &str) -> String {
    use std::process::{Command, Stdio};
    let Some([promtool]) = doppel_testkit::require_tools(["promtool"]) else { return String::new() };
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() { said } else { format!("exit {}: {said}", out.status) }
}

fn metrics(home: &Path) -> String {
    let (code, body) = get(home, "/metrics");
    assert_eq!(code, 200, "{body}");
    body
}

/// Waits until the target's metrics show `series` at `value`.
fn wait_metric(home: &Path, series: &str, value: f64) -> String {
    wait_until(Duration::from_secs(60), &format!("{series} = {value}"), || {
        let text = metrics(home);
        match sample(&text, series) {
            Some(v) if v == value => Ok(text),
            other => Err(format!("{series} is {other:?}")),
        }
    })
}

#[test]
fn metrics_and_api_follow_two_sources() {
    let dir = tempfile::tempdir().unwrap();
    let (h1, h2) = (dir.path().join("web1-home"), dir.path().join("web2-home"));
    let (id1, id2) = (init(&h1), init(&h2));
    let config = format!(
        "[target]\nhttp = \"127.0.0.1:0\"\n\
         [[target.allow]]\nname = \"web1\"\nid = \"{id1}\"\npolicy = \"manual\"\ninterval_secs = 1\nmissed = 2\n\
         [[target.allow]]\nname = \"web2\"\nid = \"{id2}\"\npolicy = \"manual\"\ninterval_secs = 1\nmissed = 2\n"
    );
    let data = dir.path().join("target-data");
    let target = start_target_config(dir.path(), &config, "127.0.0.1:0", &data, None);
    let th = dir.path().join("target-home");
    let trees = [dir.path().join("src1"), dir.path().join("src2")];
    for (i, t) in trees.iter().enumerate() {
        Tree::at(t)
            .file("a.txt", format!("source {i}").as_bytes())
            .file("d/b.bin", &noise(i as u64, 200_000));
    }
    let mut a1 = target.protect(
        &h1,
        "agent",
        &trees[0],
        &["--name", "www", "--heartbeat", "1", "--http", "127.0.0.1:0"],
    );
    let mut a2 = target.protect(&h2, "agent", &trees[1], &["--name", "db", "--heartbeat", "1"]);
    wait_converged(&trees[0], &data.join("replicas/web1/www"), Duration::from_secs(60), &mut a1);
    wait_converged(&trees[1], &data.join("replicas/web2/db"), Duration::from_secs(60), &mut a2);

    // The target: both sources alive, both replicas connected, and promtool finds nothing to say.
    wait_metric(&th, r#"doppel_source_state{source="web1",state="alive"}"#, 1.0);
    let text = wait_metric(&th, r#"doppel_source_state{source="web2",state="alive"}"#, 1.0);
    assert_eq!(promtool(&text), "", "{text}");
    for (source, job) in [("web1", "www"), ("web2", "db")] {
        let l = format!(r#"{{doppel_job="{job}",source="{source}"}}"#);
        assert_eq!(sample(&text, &format!("doppel_replica_connected{l}")), Some(1.0), "{text}");
        assert!(sample(&text, &format!("doppel_replica_received_bytes_total{l}")).unwrap() > 200_000.0);
        let lag = sample(&text, &format!("doppel_replica_apply_lag_seconds{l}")).expect("apply lag");
        assert!((0.0..60.0).contains(&lag), "lag {lag}");
    }
    // The API says what `status --json` says.
    let (code, body) = get(&th, "/api/status");
    assert_eq!(code, 200);
    let api: Value = serde_json::from_str(&body).unwrap();
    let (st, out, err) = run(&th, &["status", "--json"]);
    assert!(st.success(), "{err}");
    let cli: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(api["schema"], 1);
    assert_eq!(api["schema"], cli["schema"]);
    let names = |v: &Value, key: &str, field: &str| -> Vec<String> {
        v[key].as_array().unwrap().iter().map(|r| format!("{}/{}", r["source"], r[field])).collect()
    };
    assert_eq!(names(&api, "replicas", "job"), names(&cli, "replicas", "job"));
    assert_eq!(names(&api, "sources", "state"), names(&cli, "sources", "state"));
    assert_eq!(names(&api, "replicas", "job").len(), 2, "{body}");

    // The agent's own endpoint: its job replicating, promtool content.
    let text = wait_metric(&h1, r#"doppel_job_state{doppel_job="www",state="replicating"}"#, 1.0);
    assert_eq!(promtool(&text), "", "{text}");
    assert_eq!(sample(&text, r#"doppel_job_connected{doppel_job="www"}"#), Some(1.0));
    assert!(sample(&text, r#"doppel_job_sent_bytes_total{doppel_job="www"}"#).unwrap() > 200_000.0);
    assert!(sample(&text, r#"doppel_job_last_acknowledged_timestamp_seconds{doppel_job="www"}"#).is_some());

    // web2 dies: the target's metrics say so, web1 stays alive.
    a2.kill();
    wait_metric(&th, r#"doppel_replica_connected{doppel_job="db",source="web2"}"#, 0.0);
    let text = wait_metric(&th, r#"doppel_source_state{source="web2",state="failed"}"#, 1.0);
    assert_eq!(sample(&text, r#"doppel_source_state{source="web1",state="alive"}"#), Some(1.0), "{text}");
    assert_eq!(sample(&text, r#"doppel_replica_connected{doppel_job="www",source="web1"}"#), Some(1.0));
    // The lag charts have samples of both replicas.
    let (_, lag) = get(&th, "/api/lag");
    let lag: Value = serde_json::from_str(&lag).unwrap();
    let keys: Vec<&str> =
        lag["series"].as_array().unwrap().iter().filter_map(|s| s["key"].as_str()).collect();
    assert!(keys.contains(&"web1/www"), "{lag}");
    drop(a1);
}
