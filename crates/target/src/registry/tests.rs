//! The registry and sessions over in-memory streams (no sockets): one session per replica, a
//! new connection cancelling the old, fencing, status. Every wait has a deadline.

use std::sync::Arc;
use std::time::Duration;

use doppel_link::{ByteCounter, FrameReader, FrameWriter, LinkError};
use doppel_proto::{
    Hello, MAX_FRAME_DEFAULT, Message, Op, OpRecord, PROTOCOL_VERSION, Refusal, WirePath, pack_batch,
};
use tokio::io::{DuplexStream, ReadHalf, WriteHalf};
use tokio::task::JoinHandle;

use super::*;
use crate::config::{Layout, TargetConfig};
use crate::session::{Handover, handle_stream};

/// Longest wait for any single expected event.
const DEADLINE: Duration = Duration::from_secs(20);

fn target(tmp: &tempfile::TempDir) -> Arc<Target> {
    let mut cfg = TargetConfig::new(Layout::DataDir(tmp.path().to_path_buf()));
    cfg.commit_interval = Duration::from_millis(20);
    Target::new(cfg)
}

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no result within {DEADLINE:?}"))
}

type Session = JoinHandle<Result<Option<Handover>, LinkError>>;

/// The source's end of an in-memory connection served by `handle_stream`.
struct Source {
    r: FrameReader<ReadHalf<DuplexStream>>,
    w: FrameWriter<WriteHalf<DuplexStream>>,
    session: Session,
}

impl Source {
    fn connect(target: &Arc<Target>, name: &str) -> Source {
        let (ours, theirs) = tokio::io::duplex(1 << 20);
        let session = tokio::spawn(handle_stream(target.clone(), theirs, name.to_string()));
        let (r, w) = tokio::io::split(ours);
        Source {
            r: FrameReader::new(r, MAX_FRAME_DEFAULT, ByteCounter::default()),
            w: FrameWriter::new(w, ByteCounter::default()),
            session,
        }
    }

    async fn send(&mut self, m: &Message) {
        within("send", self.w.send_now(m)).await.expect("send");
    }

    async fn recv(&mut self) -> Result<Message, LinkError> {
        within("receive", self.r.read()).await
    }

    /// Says Hello for `job` at `epoch` and returns the answer.
    async fn hello(&mut self, job: &str, epoch: u64) -> Message {
        let hello = Hello {
            protocol: PROTOCOL_VERSION,
            job: job.to_string(),
            agent_version: "test".into(),
            replica_id: None,
            epoch,
        };
        self.send(&Message::Hello(hello)).await;
        self.recv().await.expect("an answer to Hello")
    }

    /// The next message that is not a heartbeat.
    async fn next(&mut self) -> Result<Message, LinkError> {
        loop {
            match self.recv().await {
                Ok(Message::Heartbeat { .. }) => continue,
                other => return other,
            }
        }
    }
}

fn mkdir(seq: u64, name: &str) -> Vec<u8> {
    OpRecord { seq, time_us: 1, op: Op::Mkdir { path: WirePath(name.as_bytes().to_vec()), mode: 0o755 } }
        .encode()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_applies_and_acknowledges_durable_progress() {
    let tmp = tempfile::tempdir().unwrap();
    let t = target(&tmp);
    let mut s = Source::connect(&t, "src");
    let Message::Welcome(w) = s.hello("job", 0).await else { panic!("expected a Welcome") };
    assert_eq!(w.applied_seq, 0);
    s.send(&Message::Batch(pack_batch(1, &[mkdir(1, "a"), mkdir(2, "b")], None))).await;
    assert_eq!(s.next().await.expect("ack"), Message::Ack { seq: 2 });
    assert!(tmp.path().join("replicas/src/job/a").is_dir() && tmp.path().join("replicas/src/job/b").is_dir());
    let st = t.status();
    assert_eq!(st.len(), 1, "{st:?}");
    assert_eq!((st[0].applied, st[0].durable, st[0].connected), (2, 2, true));
    assert_eq!(st[0].state, ReplicaState::Replicating);
    s.send(&Message::Goodbye { reason: "stopping".into() }).await;
    within("session end", s.session).await.expect("join").expect("clean end");
    assert_eq!(t.slot("src", "job").snapshot().state, ReplicaState::Stopped);
    assert!(t.source_stopped("src"), "a goodbye is recorded as a clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_lease_per_replica() {
    let tmp = tempfile::tempdir().unwrap();
    let t = target(&tmp);
    let slot = t.slot("src", "job");
    let first = slot.lease(&t, DEADLINE).await.expect("first lease");
    assert!(!first.cancel.is_cancelled());
    // A second lease cancels the first holder and waits for the replica to come back.
    let waiting = tokio::spawn({
        let (slot, t) = (slot.clone(), t.clone());
        async move { slot.lease(&t, DEADLINE).await }
    });
    within("the first holder is cancelled", first.cancel.cancelled()).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!waiting.is_finished(), "the second lease must wait for the replica");
    slot.give_back(first.replica);
    let second = within("second lease", waiting).await.expect("join").expect("second lease");
    assert!(!second.cancel.is_cancelled());
    // Nobody gives it back this time: a third lease gives up after its wait.
    let third = slot.lease(&t, Duration::from_millis(100)).await;
    assert!(matches!(third, Err(LeaseError::NotReleased)), "{:?}", third.err());
    assert!(second.cancel.is_cancelled());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_cannot_be_opened_is_an_open_error() {
    let tmp = tempfile::tempdir().unwrap();
    let t = target(&tmp);
    // The replica's tree is a file: it cannot be opened as a directory.
    std::fs::create_dir_all(tmp.path().join("replicas/src")).unwrap();
    std::fs::write(tmp.path().join("replicas/src/job"), b"not a directory").unwrap();
    let slot = t.slot("src", "job");
    let e = slot.lease(&t, DEADLINE).await.err().expect("an error");
    assert!(matches!(e, LeaseError::Open(_)), "{e:?}");
    assert!(e.to_string().starts_with("cannot open replica: "), "{e}");
    // The slot is usable again once the problem is gone.
    std::fs::remove_file(tmp.path().join("replicas/src/job")).unwrap();
    slot.lease(&t, DEADLINE).await.expect("lease after repair");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_connection_cancels_the_old_session() {
    let tmp = tempfile::tempdir().unwrap();
    let t = target(&tmp);
    let mut old = Source::connect(&t, "src");
    assert!(matches!(old.hello("job", 0).await, Message::Welcome(_)));
    old.send(&Message::Batch(pack_batch(1, &[mkdir(1, "a")], None))).await;
    assert_eq!(old.next().await.expect("ack"), Message::Ack { seq: 1 });
    let mut new = Source::connect(&t, "src");
    let Message::Welcome(w) = new.hello("job", 0).await else { panic!("expected a Welcome") };
    assert_eq!(w.applied_seq, 1, "the new session resumes where the old one got");
    // The old session ended (its stream closed) and handed the replica over.
    let ended = within("old session ends", &mut old.session).await.expect("join");
    assert!(matches!(ended, Ok(None)), "{ended:?}");
    assert!(old.next().await.is_err(), "the old connection is closed");
    new.send(&Message::Batch(pack_batch(2, &[mkdir(2, "b")], None))).await;
    assert_eq!(new.next().await.expect("ack"), Message::Ack { seq: 2 });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_refuses_the_old_source() {
    let tmp = tempfile::tempdir().unwrap();
    let t = target(&tmp);
    let mut s = Source::connect(&t, "src");
    let Message::Welcome(w) = s.hello("job", 0).await else { panic!("expected a Welcome") };
    let old_epoch = w.epoch;
    // Fencing takes the replica from the running session.
    let epoch =
        within("fence", t.with_replica("src", "job", |r| r.fence())).await.expect("lease").expect("fence");
    assert!(epoch > old_epoch);
    within("fenced session ends", s.session).await.expect("join").expect("ends quietly");
    for hello_epoch in [0, old_epoch] {
        let mut again = Source::connect(&t, "src");
        assert_eq!(again.hello("job", hello_epoch).await, Message::Refused(Refusal::Fenced { epoch }));
        let ended = within("refused session ends", again.session).await.expect("join");
        assert!(matches!(ended, Err(LinkError::Refused(Refusal::Fenced { .. }))), "{ended:?}");
    }
    let st = t.slot("src", "job").snapshot();
    assert_eq!((st.failed_over, st.epoch, st.fenced_refusals), (true, epoch, 2));
    // The fence is in the replica's checkpoint: a target started afresh refuses too.
    let t2 = target(&tmp);
    let mut later = Source::connect(&t2, "src");
    assert_eq!(later.hello("job", old_epoch).await, Message::Refused(Refusal::Fenced { epoch }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_job_names_and_versions_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let t = target(&tmp);
    let mut s = Source::connect(&t, "src");
    let Message::Refused(Refusal::BadJob { reason }) = s.hello("../up", 0).await else {
        panic!("expected BadJob")
    };
    assert!(reason.contains("must not start with a dot"), "{reason}");
    let mut s = Source::connect(&t, "src");
    let hello = Hello {
        protocol: PROTOCOL_VERSION + 1,
        job: "job".into(),
        agent_version: "test".into(),
        replica_id: None,
        epoch: 0,
    };
    s.send(&Message::Hello(hello)).await;
    let answer = s.recv().await.expect("answer");
    assert_eq!(
        answer,
        Message::Refused(Refusal::Version { target: PROTOCOL_VERSION, source: PROTOCOL_VERSION + 1 })
    );
}

/// A source of a later protocol whose Hello this build cannot decode is refused by version,
/// both named, and its agent (the next build, reading the refusal) says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_hello_of_another_version_is_refused_by_version() {
    use tokio::io::AsyncWriteExt;
    let tmp = tempfile::tempdir().unwrap();
    let t = target(&tmp);
    let (ours, theirs) = tokio::io::duplex(1 << 20);
    let session = tokio::spawn(handle_stream(t.clone(), theirs, "src".into()));
    let (r, mut w) = tokio::io::split(ours);
    // Hello (tag 0), version 300, then fields of a shape this build does not know.
    let payload = [0u8, 0xac, 0x02, 0xff, 0xff, 0xff, 0xff];
    let mut frame = doppel_proto::frame::header_for(&payload).to_vec();
    frame.extend_from_slice(&payload);
    w.write_all(&frame).await.unwrap();
    let mut r = FrameReader::new(r, MAX_FRAME_DEFAULT, ByteCounter::default());
    let answer = within("refusal", r.read()).await.expect("an answer");
    let Message::Refused(refusal) = answer else { panic!("expected a refusal, got {answer:?}") };
    assert_eq!(refusal, Refusal::Version { target: PROTOCOL_VERSION, source: 300 });
    let text = refusal.to_string();
    assert!(text.contains("300") && text.contains(&PROTOCOL_VERSION.to_string()), "{text}");
    let ended = within("session end", session).await.expect("join");
    assert!(matches!(ended, Err(LinkError::Version { peer: 300, .. })), "{ended:?}");
    assert_eq!(t.slot("src", "job").snapshot().state, ReplicaState::Unseen, "no replica was touched");
}

/// The agent's side: a Welcome of a later version that does not decode is read as that
/// version, not as a malformed frame.
#[tokio::test]
async fn an_undecodable_welcome_names_its_version() {
    use tokio::io::AsyncWriteExt;
    let (mut a, b) = tokio::io::duplex(1 << 16);
    let payload = [1u8, 0xac, 0x02, 0xff];
    a.write_all(&doppel_proto::frame::header_for(&payload)).await.unwrap();
    a.write_all(&payload).await.unwrap();
    let mut r = FrameReader::new(b, MAX_FRAME_DEFAULT, ByteCounter::default());
    let err = within("read", r.read()).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("the peer speaks protocol version 300, this build speaks {PROTOCOL_VERSION}")
    );
    // A malformed frame that is no handshake stays a malformed frame.
    let payload = [4u8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
    a.write_all(&doppel_proto::frame::header_for(&payload)).await.unwrap();
    a.write_all(&payload).await.unwrap();
    assert!(matches!(within("read", r.read()).await, Err(LinkError::Frame(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_lists_replicas_found_on_disk() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let t = target(&tmp);
        let mut s = Source::connect(&t, "src");
        assert!(matches!(s.hello("job", 0).await, Message::Welcome(_)));
        s.send(&Message::Batch(pack_batch(1, &[mkdir(1, "a")], None))).await;
        assert_eq!(s.next().await.expect("ack"), Message::Ack { seq: 1 });
        // Hanging up without a goodbye: the target sees the stream end.
        let Source { r, w, session } = s;
        drop((r, w));
        within("session end", session).await.expect("join").expect("end");
        assert_eq!(t.slot("src", "job").snapshot().state, ReplicaState::Disconnected);
    }
    let t = target(&tmp);
    let st = t.status();
    assert_eq!(st.len(), 1, "{st:?}");
    let r = &st[0];
    assert_eq!((r.source.as_str(), r.job.as_str(), r.durable, r.applied), ("src", "job", 1, 1));
    assert_eq!((r.state.clone(), r.connected, r.last_seen_secs), (ReplicaState::Unseen, false, None));
    assert_eq!(t.jobs_of("src"), vec!["job".to_string()]);
    assert!(!t.source_stopped("src"), "it disconnected without a goodbye");
}

#[test]
fn replica_states_read_as_words() {
    let table = [
        (ReplicaState::Unseen, ""),
        (ReplicaState::Replicating, "replicating"),
        (ReplicaState::Paused("no space left on device".into()), "paused: no space left on device"),
        (ReplicaState::Stopped, "stopped"),
        (ReplicaState::Disconnected, "disconnected"),
    ];
    for (state, word) in table {
        assert_eq!(state.to_string(), word);
        let json = serde_json::to_string(&state).unwrap();
        assert_eq!(json, serde_json::to_string(word).unwrap());
        assert_eq!(serde_json::from_str::<ReplicaState>(&json).unwrap(), state);
    }
    let e = serde_json::from_str::<ReplicaState>("\"dancing\"").unwrap_err();
    assert!(e.to_string().contains("unknown replica state \"dancing\""), "{e}");
}

/// Log lines written by this test binary (the global subscriber of [`every_line_of_a_session_names_it`]).
#[derive(Clone, Default)]
struct Lines(Arc<parking_lot::Mutex<Vec<u8>>>);

impl std::io::Write for Lines {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_line_of_a_session_names_it() {
    let lines = Lines::default();
    let writer = lines.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::set_global_default(subscriber).expect("the only test that installs a subscriber");
    let tmp = tempfile::tempdir().unwrap();
    let t = target(&tmp);
    let mut s = Source::connect(&t, "spanned");
    assert!(matches!(s.hello("the-job", 0).await, Message::Welcome(_)));
    // A gap breaks the stream: the worker thread logs it and says goodbye.
    s.send(&Message::Batch(pack_batch(5, &[mkdir(5, "a")], None))).await;
    assert!(matches!(s.next().await, Ok(Message::Goodbye { .. })));
    let _ = within("session end", s.session).await.expect("join");
    let text = String::from_utf8(lines.0.lock().clone()).unwrap();
    let ours: Vec<&str> = text.lines().filter(|l| l.contains("spanned")).collect();
    for what in ["source connected", "stream broken", "source disconnected"] {
        let line =
            ours.iter().find(|l| l.contains(what)).unwrap_or_else(|| panic!("no {what:?} line in {text}"));
        assert!(line.contains("session{n=") && line.contains("source=spanned job=the-job"), "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_gone_before_its_welcome_does_not_keep_the_replica() {
    let tmp = tempfile::tempdir().unwrap();
    let t = target(&tmp);
    let mut gone = Source::connect(&t, "src");
    let hello = Hello {
        protocol: PROTOCOL_VERSION,
        job: "job".into(),
        agent_version: "test".into(),
        replica_id: None,
        epoch: 0,
    };
    gone.send(&Message::Hello(hello)).await;
    let Source { r, w, session } = gone;
    drop((r, w));
    let ended = within("the session of the vanished source ends", session).await.expect("join");
    assert!(ended.is_err(), "the Welcome could not be sent: {ended:?}");
    // The replica was handed back: the next connection gets it at once, not after the
    // 30 s a lease waits for a session to let go.
    let mut next = Source::connect(&t, "src");
    let answer = tokio::time::timeout(Duration::from_secs(10), next.hello("job", 0)).await;
    assert!(matches!(answer, Ok(Message::Welcome(_))), "{answer:?}");
}
