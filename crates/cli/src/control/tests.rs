//! The control protocol: every request and answer survives the wire, and a server answers
//! unreadable, foreign or unknown requests with an error naming the problem and goes on.

use std::collections::BTreeMap;

use doppel_mirror::verify::Difference;
use doppel_target::ReplicaState;

use super::*;

fn requests() -> Vec<ControlRequest> {
    vec![
        ControlRequest::Status,
        ControlRequest::Verify { repair: true },
        ControlRequest::Verify { repair: false },
        ControlRequest::Limit { rate: "10M".into() },
        ControlRequest::Limit { rate: "schedule".into() },
        ControlRequest::Failover { source: "web".into(), jobs: vec![], at: None, force: false },
        ControlRequest::Failover {
            source: "web".into(),
            jobs: vec!["a".into(), "b".into()],
            at: Some("-15m".into()),
            force: true,
        },
        ControlRequest::Bookmark { name: "before-upgrade".into() },
        ControlRequest::TestFailover {
            source: "web".into(),
            jobs: vec![],
            at: Some("seq:9".into()),
            end: false,
        },
        ControlRequest::TestFailover { source: "web".into(), jobs: vec![], at: None, end: true },
        ControlRequest::Failback { source: "db".into(), jobs: vec!["c".into()] },
        ControlRequest::Events,
        ControlRequest::Reload,
    ]
}

fn snapshot() -> JobStatusSnapshot {
    JobStatusSnapshot {
        job: "data".into(),
        root: "/srv/data".into(),
        dest: "dr:7300".into(),
        state: "replicating".into(),
        detail: String::new(),
        connected: true,
        capture: "fanotify".into(),
        last_captured_seq: 42,
        last_acked_seq: 40,
        last_acked_unix: Some(1_764_867_960.25),
        pending_bytes: 8192,
        spooled_bytes: 0,
        lag_seconds: 0.25,
        bytes_sent: 1 << 20,
        bytes_received: 4096,
        refused_ops: 1,
        connections: 2,
        sync: "off".into(),
        dirty_regions: 3,
        compression_level: 3,
        window_bytes: 8 << 20,
        ack_latency_ms: 12.5,
        bytes_resent: 0,
        rate_limit: 1_000_000,
        files_hashed: 10,
        bytes_hashed: 655_360,
        mirror_total_files: None,
        mirror_total_bytes: None,
        mirror_done_files: None,
        mirror_done_bytes: None,
        index_entries: 0,
        index_disk_bytes: 0,
        index_cache_bytes: 0,
        history: None,
    }
}

fn responses() -> Vec<ControlResponse> {
    let replica = ReplicaStatus {
        source: "web".into(),
        job: "data".into(),
        connected: false,
        state: ReplicaState::Paused("no space left on device".into()),
        applied: 7,
        durable: 6,
        bytes_received: 100,
        refused: 0,
        last_seen_secs: Some(3),
        last_applied_unix: Some(1_764_867_960.5),
        apply_lag_seconds: Some(0.25),
        epoch: 2,
        failed_over: false,
        fenced_refusals: 0,
        stripped: doppel_target::PrivilegeCounts { setid: 2, ..Default::default() },
        policy_refused: doppel_target::PrivilegeCounts { devices: 1, ..Default::default() },
        quota: Some(doppel_target::QuotaUse {
            used_bytes: Some(4096),
            used_files: Some(3),
            quota_bytes: Some(1 << 30),
            quota_files: None,
        }),
        history: Some(doppel_apply::history::HistoryStatus {
            oldest_point: Some(3),
            oldest_time_us: 1_764_867_900_000_000,
            newest_seq: 7,
            bytes: 65536,
            keep_secs: 86400,
            cut_below_keep: true,
            paused: false,
        }),
        unreplicated: vec![doppel_apply::unreplicated::UnreplicatedName {
            path: "dev/null".into(),
            reason: "devices are refused by this source's privilege policy".into(),
        }],
        unreplicated_count: 1,
    };
    let source = SourceRow {
        source: "web".into(),
        policy: doppel_failover::Policy::Manual,
        state: doppel_failover::SourceState::Silent,
        silent_secs: 12.5,
        failover_in_secs: Some(17.5),
        missed: 2,
        threshold: 5,
        error: Some("script failed".into()),
        jobs: vec![SourceJobRow {
            job: "data".into(),
            failed_over: true,
            epoch: 3,
            failback: Some(FailbackRow {
                state: "mirroring".into(),
                connected: true,
                bytes_sent: 10,
                pending_bytes: 20,
                bytes_hashed: 30,
            }),
        }],
        test: None,
    };
    let report = doppel_failover::Report {
        source: "web".into(),
        kind: doppel_failover::RunKind::Failover,
        jobs: vec!["data".into()],
        epochs: BTreeMap::from([("data".to_string(), 3)]),
        steps: Vec::new(),
        millis: 1500,
        since_last_seen_ms: Some(30_000),
    };
    let verify = VerifyReport {
        entries_compared: 5,
        bytes_compared: 100,
        differences: vec![Difference { path: "a".into(), what: "content".into() }],
        repaired: vec!["a".into()],
        unrepaired: Vec::new(),
    };
    vec![
        ControlResponse::Status(StatusReport::default()),
        ControlResponse::Status(StatusReport {
            jobs: vec![snapshot()],
            receiving: vec![ReceivingJob::new("data", "dr:7300")],
            replicas: vec![replica],
            sources: vec![source],
        }),
        ControlResponse::Verify(verify),
        ControlResponse::Limit { rate_limit: 0 },
        ControlResponse::Report(report),
        ControlResponse::Events { events: vec![doppel_failover::Event::new("web", "failover-started")] },
        ControlResponse::Reloaded {
            added: vec!["db".into()],
            removed: vec![],
            restarted: vec!["web".into()],
            changed: vec!["mail".into()],
        },
        ControlResponse::Bookmarked { seq: 42 },
        ControlResponse::Test {
            test: Some(doppel_failover::rehearsal::TestReport {
                source: "web".into(),
                jobs: vec![doppel_failover::rehearsal::TestJob {
                    job: "data".into(),
                    view: "/srv/doppel/tests/web/data/view".into(),
                    point: doppel_failover::rehearsal::PointInfo {
                        time: "2026-12-04T17:05:00Z".into(),
                        seq: 41,
                        kind: "fsync".into(),
                    },
                }],
                started_us: 1,
            }),
            ended: false,
        },
        ControlResponse::Test { test: None, ended: true },
        ControlResponse::error("verify failed: the job is stopping"),
    ]
}

fn value<T: Serialize>(t: &T) -> serde_json::Value {
    serde_json::to_value(t).expect("serializes")
}

#[test]
fn every_request_round_trips() {
    for req in requests() {
        let line = serde_json::to_vec(&Request { version: VERSION, request: req.clone() }).unwrap();
        let text = String::from_utf8(line.clone()).unwrap();
        assert!(text.contains(&format!("\"op\":\"{}\"", req.op())), "{text}");
        assert!(text.contains(&format!("\"version\":{VERSION}")), "{text}");
        assert_eq!(decode_request(&line).unwrap_or_else(|e| panic!("{text}: {e}")), req);
    }
    // Every op is in the list the server checks against.
    let ops: Vec<&str> = requests().iter().map(ControlRequest::op).collect();
    for op in ControlRequest::OPS {
        assert!(ops.contains(&op), "{op} has no sample request");
    }
}

#[test]
fn every_response_round_trips() {
    let path = Path::new("/run/test.sock");
    for resp in responses() {
        let line = encode_response(resp.clone());
        assert_eq!(line.last(), Some(&b'\n'));
        assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1, "one line per answer");
        let back = decode_response(path, &line)
            .unwrap_or_else(|e| panic!("{}: {e}", String::from_utf8_lossy(&line)));
        assert_eq!(value(&back), value(&resp));
    }
}

#[test]
fn unreadable_requests_are_named() {
    let table: &[(&str, &str)] = &[
        ("this is not json", "malformed request"),
        ("[1, 2]", "malformed request"),
        (r#"{"cmd":"status"}"#, "no control protocol version"),
        (r#"{"version":99,"op":"status"}"#, "version 99, this process version 1"),
        (r#"{"version":1}"#, "names no op"),
        (r#"{"version":1,"op":"reboot"}"#, "unknown op \"reboot\""),
        (r#"{"version":1,"op":"limit"}"#, "bad limit request: missing field `rate`"),
        (r#"{"version":1,"op":"verify","repair":"yes"}"#, "bad verify request"),
    ];
    for (line, want) in table {
        let e = decode_request(line.as_bytes()).expect_err(line).to_string();
        assert!(e.contains(want), "{line}: {e}");
    }
}

#[test]
fn answers_of_another_version_are_named() {
    let path = Path::new("/run/x.sock");
    let old = br#"{"jobs":[]}"#;
    let e = decode_response(path, old).expect_err("an answer without a version");
    assert!(matches!(e, CallError::Version { theirs: None, .. }), "{e}");
    assert!(e.to_string().contains("restart it with this binary"), "{e}");
    let newer = br#"{"version":2,"answer":"limit","rate_limit":1}"#;
    let e = decode_response(path, newer).expect_err("another version");
    assert!(matches!(e, CallError::Version { theirs: Some(2), .. }), "{e}");
    let e = decode_response(path, b"garbage").expect_err("garbage");
    assert!(matches!(e, CallError::Garbled { .. }), "{e}");
}

#[test]
fn job_sockets_name_their_job() {
    let home = Path::new("/home/x");
    let sock = job_socket(home, "data.v2");
    assert_eq!(sock, Path::new("/home/x/run/job-data.v2.sock"));
    assert_eq!(job_of_socket(&sock).as_deref(), Some("data.v2"));
    assert_eq!(job_of_socket(Path::new("/home/x/run/target.sock")), None);
}

/// A server answering status with one job, and limit with an error.
fn test_handler() -> Handler {
    Arc::new(|req| {
        Box::pin(async move {
            match req {
                ControlRequest::Status => ControlResponse::Status(StatusReport {
                    jobs: vec![snapshot()],
                    ..StatusReport::default()
                }),
                other => ControlResponse::error(format!("{} refused", other.op())),
            }
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_survives_bad_lines_and_keeps_answering() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("run/job-data.sock");
    let stop = CancellationToken::new();
    let server = tokio::spawn(serve(path.clone(), test_handler(), stop.clone()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        assert!(tokio::time::Instant::now() < deadline, "the socket never appeared");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let p = path.clone();
    tokio::task::spawn_blocking(move || {
        // One connection, a bad line (not even UTF-8), an unknown op, then a good request.
        let mut s = std::os::unix::net::UnixStream::connect(&p).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut ask = |line: &[u8]| {
            s.write_all(line).unwrap();
            s.write_all(b"\n").unwrap();
            let mut answer = Vec::new();
            r.read_until(b'\n', &mut answer).unwrap();
            decode_response(&p, &answer).expect("a readable answer")
        };
        let ControlResponse::Error { message } = ask(b"\xff\xfe not json") else {
            panic!("expected an error")
        };
        assert!(message.contains("malformed request"), "{message}");
        let ControlResponse::Error { message } = ask(br#"{"version":1,"op":"dance"}"#) else {
            panic!("expected an error")
        };
        assert!(message.contains("unknown op \"dance\""), "{message}");
        let ControlResponse::Status(st) = ask(br#"{"version":1,"op":"status"}"#) else {
            panic!("expected status")
        };
        assert_eq!(st.jobs, vec![snapshot()]);
        // And through the client, on a new connection.
        let answer = call(&p, &ControlRequest::Limit { rate: "1M".into() }, Duration::from_secs(20)).unwrap();
        assert_eq!(value(&answer), value(&ControlResponse::error("limit refused")));
    })
    .await
    .unwrap();
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(20), server).await.expect("server stops").unwrap().unwrap();
    assert!(!path.exists(), "the socket is removed on stop");
    let e = call(&path, &ControlRequest::Status, Duration::from_secs(1)).expect_err("nobody listens");
    assert!(matches!(e, CallError::Unreachable { .. }), "{e}");
}
