//! One source connection for one job.
//!
//! The session reads frames and feeds the apply worker in stream order; a writer task sends
//! what the worker produces (acks, refusals, listings) and heartbeats when otherwise quiet. A
//! malformed frame, an oversized frame, a sequence gap or a silent peer ends this session only:
//! the replica keeps everything applied so far and the next connection resumes from it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use doppel_link::{ByteCounter, FrameReader, FrameWriter, LinkError};
use doppel_proto::{
    Batch, Hello, MAX_BATCH_RAW, Message, OpRecord, PROTOCOL_VERSION, Refusal, Truncated, TruncatedText,
    Unpacker, Welcome, truncated_debug,
};
use tokio::io::{AsyncRead, AsyncWrite, BufReader, BufWriter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tracing::Instrument;

use crate::config::valid_name;
use crate::registry::{ReplicaState, Slot, Target};
use crate::worker::{self, Work};

/// Sessions started since this process started: numbers them in the logs, so that the lines
/// of two sessions of one replica (a reconnect racing the old connection) can be told apart.
static SESSIONS: AtomicU64 = AtomicU64::new(0);

/// Serves one authenticated connection from the source known as `source`. Returns when the
/// connection ends; the error says why it ended abnormally.
pub async fn handle_stream<S>(
    target: Arc<Target>,
    stream: S,
    source: String,
) -> Result<Option<Handover>, LinkError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let deadline = tokio::time::Instant::now() + target.config.handshake_timeout;
    handle_stream_until(target, stream, source, deadline, ()).await
}

/// [`handle_stream`] for a connection whose handshake must be over by `deadline` (the TLS
/// handshake before it counts against the same deadline): its first message must have
/// arrived by then. `permit` (the accept loop's count of handshakes in flight) is dropped as
/// soon as it has, or the connection ended.
pub async fn handle_stream_until<S, P: Send>(
    target: Arc<Target>,
    stream: S,
    source: String,
    deadline: tokio::time::Instant,
    permit: P,
) -> Result<Option<Handover>, LinkError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let cfg = &target.config;
    // The first frame decides what this connection is: replication, or a failback.
    let mut stream = BufReader::with_capacity(256 << 10, stream);
    let received = ByteCounter::default();
    let first = {
        let mut r = FrameReader::new(&mut stream, cfg.max_frame, received.clone());
        let first = tokio::select! {
            _ = target.shutdown.cancelled() => return Err(LinkError::Closed),
            m = tokio::time::timeout_at(deadline, r.read()) => m,
        };
        match first {
            Ok(Err(LinkError::Version { peer, ours })) => {
                // A source of another version whose Hello does not decode here: it still
                // reads a refusal naming both versions (refusals keep their shape).
                tracing::warn!(source = %source, peer, ours, "refusing a source of another protocol version");
                let refusal = Message::Refused(Refusal::Version { target: ours, source: peer });
                let _ = FrameWriter::new(&mut stream, ByteCounter::default()).send_now(&refusal).await;
                return Err(LinkError::Version { peer, ours });
            }
            Ok(m) => m?,
            Err(_) => return Err(LinkError::Timeout(cfg.handshake_timeout)),
        }
    };
    drop(permit);
    if let Message::FailbackHello(hello) = first {
        return failback(&target, source, hello, stream).await.map(|()| None);
    }
    handle_after(target, stream, source, first, received).await
}

/// [`handle_stream`] for a connection whose first message the caller already read (the
/// source side of a failback reads it to tell a refusal from the DR side's `Hello`).
/// `received` counts the bytes read so far.
///
/// Everything the session logs, on its own tasks and its worker thread too, is inside a
/// `session` span naming the session number, the source and (once the Hello named it) the job.
pub async fn handle_after<S>(
    target: Arc<Target>,
    stream: S,
    source: String,
    first: Message,
    received: ByteCounter,
) -> Result<Option<Handover>, LinkError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let n = SESSIONS.fetch_add(1, Ordering::Relaxed) + 1;
    let span = tracing::info_span!("session", n, source = %source, job = tracing::field::Empty);
    session(target, stream, source, first, received).instrument(span).await
}

async fn session<S>(
    target: Arc<Target>,
    stream: S,
    source: String,
    first: Message,
    received: ByteCounter,
) -> Result<Option<Handover>, LinkError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let cfg = &target.config;
    let (r, w) = tokio::io::split(stream);
    let mut reader = FrameReader::new(r, cfg.max_frame, received.clone());
    let mut writer = FrameWriter::new(BufWriter::with_capacity(256 << 10, w), ByteCounter::default());
    let Admitted { job, slot, lease, info } = match admit(&target, &source, first).await {
        Ok(a) => a,
        Err(refusal) => return refuse(&mut writer, refusal).await,
    };
    let welcome = Welcome {
        protocol: PROTOCOL_VERSION,
        replica_id: info.replica_id,
        applied_seq: info.applied,
        epoch: info.epoch,
        needs_resync: info.needs_resync,
        max_frame: cfg.max_frame,
        source_name: source.clone(),
    };
    if let Err(e) = writer.send_now(&Message::Welcome(welcome)).await {
        // The replica goes back, or the next connection would wait for it in vain.
        slot.give_back(lease.replica);
        return Err(e);
    }
    tracing::info!(applied = info.applied, "source connected");
    target.mark_stopped(&source, &job, false);
    slot.status.connected_at(info.applied);

    // Four batches queued keep the apply worker busy (a source packs up to 1 MiB a batch);
    // sixteen held up to 100 MiB of decoded small-file records per session for no gain.
    let (work_tx, work_rx) = mpsc::channel::<Work>(4);
    let (out_tx, out_rx) = mpsc::channel::<worker::Outgoing>(64);
    let cancel = lease.cancel.clone();
    let worker = {
        let (slot, out_tx, cancel, interval) =
            (slot.clone(), out_tx.clone(), cancel.clone(), cfg.commit_interval);
        let lists = worker::Listings {
            budget: target.source_budgets(&source).listing.clone(),
            known: cfg.known_blocks.clone(),
        };
        let replica = lease.replica;
        let span = tracing::Span::current();
        worker::spawn(move || {
            span.in_scope(|| worker::run(replica, work_rx, out_tx, slot, interval, cancel, lists))
        })
    };
    let writer_task = tokio::spawn(
        doppel_link::framed::write_pump(writer, out_rx, cfg.heartbeat).instrument(tracing::Span::current()),
    );
    let echo = out_tx.clone();
    drop(out_tx);

    let budget = Budget::new(&target, &source);
    let result =
        read_loop(&mut reader, &work_tx, &echo, &slot, cfg.heartbeat * 3, &cancel, &received, &budget).await;
    drop(echo);
    slot.status.epoch.store(info.epoch, Ordering::Relaxed);
    drop(work_tx);
    // The worker applies and commits what it was given, but no longer waits on the source
    // (a stall on a full disk, room for a listing the source may never read).
    cancel.cancel();
    match worker.await {
        Ok(replica) => slot.give_back(replica),
        Err(_) => {
            tracing::error!("apply worker panicked");
            slot.abandon();
        }
    }
    // A source that stopped reading leaves the writer stuck on a full socket: it gets as long
    // as a silent peer would, then goes.
    let mut writer_task = writer_task;
    if tokio::time::timeout(cfg.heartbeat * 3, &mut writer_task).await.is_err() {
        writer_task.abort();
    }
    ended(&target, &slot, &source, &job, &result);
    result
}

/// A connection that may replicate: its job, the replica leased for it, and where the
/// replica stands (made durable, so the Welcome can promise it).
struct Admitted {
    job: String,
    slot: Arc<Slot>,
    lease: crate::registry::Lease,
    info: doppel_apply::ReplicaInfo,
}

/// Checks the Hello (version, job name), leases the replica (ending any session holding it),
/// makes what the previous session applied durable, and refuses a fenced source. On refusal
/// the replica is handed back.
async fn admit(target: &Target, source: &str, first: Message) -> Result<Admitted, Refusal> {
    let Message::Hello(hello) = first else {
        return Err(Refusal::Other { reason: "expected Hello".into() });
    };
    if hello.protocol != PROTOCOL_VERSION {
        return Err(Refusal::Version { target: PROTOCOL_VERSION, source: hello.protocol });
    }
    if let Err(e) = valid_name(&hello.job) {
        return Err(Refusal::BadJob { reason: e.to_string() });
    }
    tracing::Span::current().record("job", tracing::field::display(&hello.job));
    let slot = within_max_jobs(target, source, &hello.job)?;
    let mut lease = slot
        .lease(target, Duration::from_secs(30))
        .await
        .map_err(|e| Refusal::Other { reason: e.to_string() })?;
    // Welcome promises durability up to `applied_seq`: make whatever the previous session
    // applied durable before saying so.
    let committed = tokio::task::spawn_blocking(move || {
        let c = lease.replica.commit();
        (lease, c)
    })
    .await;
    let (lease, committed) = match committed {
        Ok(done) => done,
        Err(e) => {
            slot.abandon();
            return Err(Refusal::Other { reason: format!("replica not available: commit task failed: {e}") });
        }
    };
    if let Err(e) = committed {
        slot.give_back(lease.replica);
        return Err(Refusal::Other { reason: format!("replica not available: {e}") });
    }
    let info = lease.replica.info();
    if info.failed_over || (hello.epoch != 0 && hello.epoch < info.epoch) {
        slot.give_back(lease.replica);
        tracing::warn!(epoch = info.epoch, "refusing a fenced source");
        target.note_fenced(source, &hello.job);
        return Err(Refusal::Fenced { epoch: info.epoch });
    }
    Ok(Admitted { job: hello.job, slot, lease, info })
}

/// The slot of `job`, unless it is a job the source may not add: it has `max_jobs` replicas
/// here already (a job it has is always admitted, whatever the limit became).
fn within_max_jobs(target: &Target, source: &str, job: &str) -> Result<Arc<Slot>, Refusal> {
    let max = target.source(source).and_then(|a| a.limits.max_jobs);
    target.slot_within(source, job, max).map_err(|jobs| {
        tracing::warn!(jobs, max_jobs = max, "refusing a job over the source's max_jobs");
        Refusal::Other {
            reason: format!(
                "source {source} has {jobs} jobs on this target, its max_jobs is {}",
                max.unwrap_or(0)
            ),
        }
    })
}

/// Records how a session ended: a goodbye is a clean stop (kept on disk for the failover
/// monitor), anything else a disconnection.
fn ended(
    target: &Target,
    slot: &Slot,
    source: &str,
    job: &str,
    result: &Result<Option<Handover>, LinkError>,
) {
    let status = &slot.status;
    status.connected.store(false, Ordering::Relaxed);
    if status.goodbye.load(Ordering::Relaxed) {
        target.mark_stopped(source, job, true);
        status.set_state(ReplicaState::Stopped);
    } else {
        status.set_state(ReplicaState::Disconnected);
    }
    match result {
        Ok(Some(h)) => tracing::info!(epoch = h.epoch, "the sender handed the job over"),
        Ok(None) => tracing::info!("source disconnected"),
        Err(e) => tracing::warn!(error = %e, "session ended"),
    }
}

/// How a failback stream ended: the job goes back to its source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Handover {
    /// The epoch the source protects the job in from now on.
    pub epoch: u64,
    /// The replica it protects it to.
    pub replica_id: [u8; 16],
    /// The replica's applied sequence, to continue after.
    pub applied_seq: u64,
}

/// A byte stream handed to a failback handler.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Takes failback connections (implemented by the failover manager).
pub trait FailbackHandler: Send + Sync {
    /// Takes the connection of `source`, which asked for `job` back; on refusal, returns the
    /// reason and the stream, so the refusal can be sent on it.
    fn accept(
        &self,
        source: &str,
        job: &str,
        stream: Box<dyn Stream>,
    ) -> Result<(), (Refusal, Box<dyn Stream>)>;
}

async fn failback<S>(
    target: &Arc<Target>,
    source: String,
    hello: Hello,
    stream: BufReader<S>,
) -> Result<(), LinkError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let refusal = match target.failback_handler() {
        None => (
            Refusal::Other { reason: "this target does not run failbacks".into() },
            Box::new(stream) as Box<dyn Stream>,
        ),
        Some(h) => match h.accept(&source, &hello.job, Box::new(stream)) {
            Ok(()) => {
                tracing::info!(%source, job = %Truncated(&hello.job), "failback connection accepted");
                return Ok(());
            }
            Err(r) => r,
        },
    };
    let (refusal, stream) = refusal;
    let mut w = FrameWriter::new(stream, ByteCounter::default());
    refuse(&mut w, refusal).await
}

/// Sends `r` on a stream handed to a failback handler, and closes it (for refusals decided
/// after [`FailbackHandler::accept`] returned).
pub async fn refuse_stream(stream: Box<dyn Stream>, r: Refusal) {
    let mut w = FrameWriter::new(stream, ByteCounter::default());
    let _: Result<(), LinkError> = refuse(&mut w, r).await;
}

async fn refuse<W: AsyncWrite + Unpin, T>(writer: &mut FrameWriter<W>, r: Refusal) -> Result<T, LinkError> {
    tracing::warn!(reason = %r, "refusing connection");
    writer.send_now(&Message::Refused(r.clone())).await?;
    let _ = writer.shutdown().await;
    Err(LinkError::Refused(r))
}

/// The memory a session may fill with decoded batches waiting for its worker, in KiB: at
/// most this much per session, per source (all its sessions) and for the whole target. A few
/// KB of zstd decode to up to [`MAX_BATCH_RAW`]; without these bounds a source could queue a
/// gigabyte per job. A session over its share stops reading its socket until its worker has
/// applied what it holds (the source's window then fills and it waits), so one tenant's
/// backlog never takes another's memory.
pub struct Budget {
    session: Arc<Semaphore>,
    source: Arc<Semaphore>,
    global: Arc<Semaphore>,
}

/// KiB of decoded batches one session may hold.
pub const SESSION_BUDGET_KIB: u32 = 128 << 10;
/// KiB of decoded batches all sessions of one source may hold.
pub const SOURCE_BUDGET_KIB: u32 = 256 << 10;
/// KiB of decoded batches the whole target may hold.
pub const TARGET_BUDGET_KIB: u32 = 1 << 20;

/// KiB of listing messages all sessions of one source may have waiting to be written.
pub const LIST_BUDGET_KIB: u32 = 16 << 10;

/// Permits taken for one batch, given back when the worker has applied it.
pub struct Held(#[allow(dead_code)] [OwnedSemaphorePermit; 3]);

impl Budget {
    fn new(target: &Target, source: &str) -> Budget {
        Budget {
            session: Arc::new(Semaphore::new(SESSION_BUDGET_KIB as usize)),
            source: target.source_budgets(source).decode.clone(),
            global: target.decode_budget(),
        }
    }

    /// Waits for room for `kib` (at most a session's whole budget).
    async fn take(&self, kib: u32) -> Held {
        let kib = kib.clamp(1, SESSION_BUDGET_KIB);
        let take = |s: &Arc<Semaphore>| s.clone().acquire_many_owned(kib);
        let closed = "decode budgets are never closed";
        Held([
            take(&self.session).await.expect(closed),
            take(&self.source).await.expect(closed),
            take(&self.global).await.expect(closed),
        ])
    }
}

/// What a batch weighs decoded, in KiB: its bytes, plus the records it may hold (each at
/// least 5 bytes on the wire, an [`OpRecord`] in memory).
fn decoded_kib(b: &Batch) -> u32 {
    let records = (b.count as u64).min(b.raw_len as u64 / 5);
    let bytes = b.raw_len as u64 + records * std::mem::size_of::<OpRecord>() as u64;
    bytes.div_ceil(1024).min(u32::MAX as u64) as u32
}

#[allow(clippy::too_many_arguments)]
async fn read_loop<R: AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
    work: &mpsc::Sender<Work>,
    echo: &mpsc::Sender<worker::Outgoing>,
    slot: &Slot,
    dead_after: Duration,
    cancel: &tokio_util::sync::CancellationToken,
    received: &ByteCounter,
    budget: &Budget,
) -> Result<Option<Handover>, LinkError> {
    let mut counted = received.get();
    let mut unpacker = Unpacker::default();
    loop {
        let msg = tokio::select! {
            _ = cancel.cancelled() => return Ok(None),
            m = tokio::time::timeout(dead_after, reader.read()) => match m {
                Ok(m) => m,
                Err(_) => return Err(LinkError::Timeout(dead_after)),
            },
        };
        let now = received.get();
        slot.status.bytes_received.add(now - counted);
        counted = now;
        slot.status.seen();
        let item = match msg {
            Ok(Message::Batch(b)) => {
                let kib = decoded_kib(&b);
                if kib > SESSION_BUDGET_KIB {
                    return Err(LinkError::Protocol(format!(
                        "batch at seq {} would take {kib} KiB decoded, more than the {SESSION_BUDGET_KIB} KiB a session may hold",
                        b.first_seq
                    )));
                }
                let held = tokio::select! {
                    _ = cancel.cancelled() => return Ok(None),
                    h = budget.take(kib) => h,
                };
                let records = unpacker
                    .unpack(&b, MAX_BATCH_RAW)
                    .map_err(|e| LinkError::Protocol(format!("bad batch at seq {}: {e}", b.first_seq)))?;
                Work::Records { records, held, ack_wanted: b.ack_wanted }
            }
            Ok(Message::ListRequest { id, scope }) => Work::List { id, scope },
            Ok(Message::Heartbeat { time_us }) => {
                // Answered at once: a source whose heartbeat is shorter than this target's
                // must not take a quiet target for a dead one.
                let _ = echo.try_send(Message::Heartbeat { time_us }.into());
                continue;
            }
            Ok(Message::Goodbye { reason }) => {
                tracing::info!(reason = %TruncatedText(&reason), "source said goodbye");
                slot.status.goodbye.store(true, Ordering::Relaxed);
                return Ok(None);
            }
            Ok(Message::FailbackDone { epoch, replica_id, applied_seq }) => {
                return Ok(Some(Handover { epoch, replica_id, applied_seq }));
            }
            Ok(other) => {
                return Err(LinkError::Protocol(format!(
                    "unexpected message from source: {}",
                    truncated_debug(&other)
                )));
            }
            Err(LinkError::Closed) => return Ok(None),
            Err(e) => return Err(e),
        };
        tokio::select! {
            _ = cancel.cancelled() => return Ok(None),
            sent = work.send(item) => if sent.is_err() {
                return Err(LinkError::Protocol("the apply worker stopped".into()));
            },
        }
    }
}
