//! The manager against a real target in this process: the monitor's rule (the link and every
//! probe), the countdown, automatic failover, and failback requests that must be refused.
//!
//! Connections are in-memory pipes served by the target's own session code, so hand-made
//! frames can ask for what no well-behaved source would.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use doppel_failover::{Manager, ManagerConfig, Policy, Probe, SourcePolicy};
use doppel_link::{ByteCounter, FrameReader, FrameWriter, Identity};
use doppel_proto::{Hello, Message, PROTOCOL_VERSION, Refusal};
use doppel_target::{AllowedSource, Layout, Target, TargetConfig};
use doppel_testkit::wait_until;

/// A target with one replica (job `www` of source `s`) on disk, and its manager.
fn setup(dir: &Path, policy: SourcePolicy) -> (Arc<Target>, Arc<Manager>) {
    let data = dir.join("data");
    let (tree, state) = Layout::DataDir(data.clone()).paths("s", "www");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("f"), b"replicated").unwrap();
    drop(doppel_apply::Replica::open(&tree, &state).unwrap());
    let (me, _) = Identity::load_or_create(&dir.join("s-home")).unwrap();
    let mut cfg = TargetConfig::new(Layout::DataDir(data.clone()));
    cfg.allowed = vec![AllowedSource::new("s", me.id)];
    let target = Target::new(cfg);
    let manager = Manager::new(target.clone(), ManagerConfig::new(&data), vec![policy]);
    tokio::spawn(manager.clone().run());
    (target, manager)
}

fn policy(interval_ms: u64, missed: u32, probes: Vec<Probe>) -> SourcePolicy {
    let mut p = SourcePolicy::manual("s");
    p.policy = Policy::Auto;
    p.interval = Duration::from_millis(interval_ms);
    p.missed = missed;
    p.probes = probes;
    p
}

fn state_of(m: &Manager) -> serde_json::Value {
    serde_json::to_value(m.status().into_iter().find(|s| s.source == "s").unwrap()).unwrap()
}

async fn wait_state(m: &Arc<Manager>, want: &'static str, within: Duration) -> serde_json::Value {
    let m = m.clone();
    tokio::task::spawn_blocking(move || {
        wait_until(within, &format!("state {want}"), || {
            let s = state_of(&m);
            (s["state"] == want).then_some(s.clone()).ok_or(s.to_string())
        })
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_link_with_a_live_probe_does_not_fail_over_until_the_probe_dies_too() {
    let dir = tempfile::tempdir().unwrap();
    // The source's service still answers: only the replication link is down.
    let service = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = service.local_addr().unwrap().to_string();
    let accepting = tokio::spawn(async move {
        loop {
            let _ = service.accept().await;
        }
    });
    let (_target, m) = setup(dir.path(), policy(200, 3, vec![Probe::Tcp(addr)]));
    // Silent from the start: the countdown runs while the link misses checks...
    let s = wait_state(&m, "silent", Duration::from_secs(10)).await;
    assert!(s["failover_in_secs"].is_null() || s["failover_in_secs"].as_f64().unwrap() < 0.61, "{s}");
    // ... but the probe answers, so the source is not failed, however long the silence.
    let m2 = m.clone();
    tokio::task::spawn_blocking(move || {
        wait_until(Duration::from_secs(20), "a long silence", || {
            let s = state_of(&m2);
            (s["silent_secs"].as_f64().unwrap() > 1.2).then_some(()).ok_or(s.to_string())
        })
    })
    .await
    .unwrap();
    let s = state_of(&m);
    assert_eq!(s["state"], "silent", "{s}");
    assert!(s["failover_in_secs"].is_null(), "no countdown while the probe answers: {s}");
    assert_eq!(s["jobs"][0]["failed_over"], false, "{s}");
    // The service dies: now the link and the probe agree.
    accepting.abort();
    let _ = accepting.await;
    let s = wait_state(&m, "failed-over", Duration::from_secs(20)).await;
    assert_eq!(s["jobs"][0]["epoch"], 2, "{s}");
    let kinds: Vec<String> = m.events().read().unwrap().into_iter().map(|e| e.kind).collect();
    assert!(
        kinds.contains(&"source-failed".to_string()) && kinds.contains(&"failover-done".to_string()),
        "{kinds:?}"
    );
}

/// Sends `hello` as a failback request of source `s` and returns the target's answer.
async fn ask_failback(target: &Arc<Target>, job: &str) -> Message {
    let (ours, theirs) = tokio::io::duplex(1 << 20);
    let t = target.clone();
    let served =
        tokio::spawn(async move { doppel_target::session::handle_stream(t, theirs, "s".into()).await });
    let (r, w) = tokio::io::split(ours);
    let mut w = FrameWriter::new(w, ByteCounter::default());
    let hello = Hello {
        protocol: PROTOCOL_VERSION,
        job: job.to_string(),
        agent_version: "test".into(),
        replica_id: None,
        epoch: 0,
    };
    w.send_now(&Message::FailbackHello(hello)).await.unwrap();
    let mut r = FrameReader::new(r, 1 << 20, ByteCounter::default());
    let answer = tokio::time::timeout(Duration::from_secs(20), r.read()).await.unwrap().unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(20), served).await;
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failback_requests_for_jobs_that_are_not_failed_over_are_refused_and_touch_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = policy(1000, 1000, Vec::new());
    p.policy = Policy::Manual;
    let (target, m) = setup(dir.path(), p);
    let data = dir.path().join("data");
    // Not failed over: the source resumes the ordinary way.
    match ask_failback(&target, "www").await {
        Message::Refused(Refusal::NotFailedOver { job }) => assert_eq!(job, "www"),
        other => panic!("expected NotFailedOver, got {other:?}"),
    }
    // Jobs that do not exist, or names that try to leave the data directory.
    for job in ["nope", "../../etc", "/etc", "www/../..", ""] {
        match ask_failback(&target, job).await {
            Message::Refused(Refusal::NotFailedOver { .. }) => {}
            other => panic!("{job:?}: expected a refusal, got {other:?}"),
        }
    }
    assert!(!data.join("failback").exists(), "a refused request started a failback");
    // Failed over: the request is taken, and the replica starts going home.
    let report = m.failover("s", None, "test").await.unwrap();
    assert_eq!(report.epochs["www"], 2);
    match ask_failback(&target, "www").await {
        Message::Hello(h) => assert_eq!(h.job, "www"),
        other => panic!("expected the DR side's Hello, got {other:?}"),
    }
    assert!(data.join("failback/s/jobs/www").is_dir());
}
