//! The source side of the link.
//!
//! One session per connection: handshake, then the decision the target's answer calls for
//! (resume after the acknowledged sequence; compare the whole tree when the replica is not the
//! one the index describes; compare the names changed since the last checkpoint after a crash),
//! then batches stream from the spool in a window of unacknowledged bytes while acks drop the
//! acknowledged prefix. Any break ends the session; the loop reconnects with backoff and
//! jitter and resumes from the acknowledged sequence, so nothing acknowledged is sent again
//! and nothing unacknowledged is lost.

use crate::listing::{FeedError, ListingFeed};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use doppel_link::{ByteCounter, FrameReader, FrameWriter, LinkError};
use doppel_mirror::VerifyReport;
use doppel_proto::{
    Entry, Hello, ListScope, Message, PROTOCOL_VERSION, Refusal, TruncatedText, Welcome, truncated_debug,
    truncated_text,
};
use doppel_spool::Spool;
use parking_lot::Mutex;
use tokio::io::{BufReader, BufWriter};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::capture_loop::Command;
use crate::connect::{Conn, Connector};
use crate::error::{AgentError, RequestError};
use crate::resume::{Known, LinkPlanner, Then, WelcomePlan, resync_due};
use crate::sender::{Compression, Compressor, Resends, Window, send};
use crate::state::JobState;
use crate::status::{JobStatus, Phase};

/// The link of one job.
pub struct Link {
    /// How to reach the target.
    pub connector: Connector,
    /// Job name.
    pub job: String,
    /// The job's spool.
    pub spool: Arc<Spool>,
    /// Job state (replica id and epoch).
    pub state: Arc<Mutex<JobState>>,
    /// Live status.
    pub status: Arc<JobStatus>,
    /// Orders to the capture thread.
    pub commands: std::sync::mpsc::Sender<Command>,
    /// How batches are compressed.
    pub compression: Compression,
    /// Resend accounting across sessions.
    pub resends: Arc<Resends>,
    /// Unacknowledged bytes allowed in flight.
    pub window: u64,
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// Cancelled to stop.
    pub shutdown: CancellationToken,
    /// Whether what the previous run left is still to be compared with the replica, and what
    /// each Welcome calls for.
    pub planner: LinkPlanner,
    /// Verify requests from the control socket.
    pub verify: mpsc::Receiver<VerifyRequest>,
    /// Whether the spool overflowed.
    pub overflow: Arc<crate::overflow::Overflow>,
    /// Sent as the last message when stopping, in place of a goodbye (a failback's handover).
    pub final_message: Arc<Mutex<Option<Message>>>,
    /// Last listing request id used.
    pub list_id: u64,
}

/// A request to verify the replica (and repair it if asked).
pub struct VerifyRequest {
    /// Queue repairs for the differences.
    pub repair: bool,
    /// The answer.
    pub reply: oneshot::Sender<Result<VerifyReport, RequestError>>,
}

/// How a session ended.
enum End {
    /// Shutdown requested.
    Stopped,
    /// Something retrying may fix.
    Retry(LinkError),
    /// A refusal retrying cannot fix.
    Fatal(Refusal),
}

impl From<LinkError> for End {
    fn from(e: LinkError) -> End {
        End::Retry(e)
    }
}

impl Link {
    /// Runs until shutdown (Ok) or a fatal refusal.
    pub async fn run(mut self) -> Result<(), AgentError> {
        let mut backoff = Duration::from_millis(200);
        let mut sessions = 0u64;
        loop {
            let started = Instant::now();
            sessions += 1;
            let span = tracing::info_span!("session", n = sessions, replica = tracing::field::Empty);
            let end = self.session().instrument(span).await;
            self.status.connected.store(false, Ordering::Relaxed);
            match end {
                End::Stopped => return Ok(()),
                End::Fatal(r) => {
                    let phase =
                        if matches!(r, Refusal::Fenced { .. }) { Phase::Fenced } else { Phase::Refused };
                    self.status.set_state(phase);
                    self.status.set_detail(r.to_string());
                    tracing::error!(reason = %r, "the target refused this job");
                    return Err(AgentError::Refused(r));
                }
                End::Retry(e) => {
                    if started.elapsed() > Duration::from_secs(30) {
                        backoff = Duration::from_millis(200);
                    }
                    tracing::warn!(error = %e, retry_in = ?backoff, "link down");
                    self.status.set_state(Phase::Disconnected);
                    self.status.set_detail(e.to_string());
                    let jittered = tokio::time::Instant::now() + backoff.mul_f64(0.8 + 0.4 * jitter());
                    loop {
                        tokio::select! {
                            _ = self.shutdown.cancelled() => return Ok(()),
                            _ = tokio::time::sleep_until(jittered) => break,
                            Some(req) = self.verify.recv() => {
                                let _ = req.reply.send(Err(RequestError::NotConnected));
                            }
                        }
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    async fn session(&mut self) -> End {
        let conn = tokio::select! {
            _ = self.shutdown.cancelled() => return End::Stopped,
            c = self.connector.connect(&self.status.bytes_sent, &self.status.bytes_received) => match c {
                Ok(c) => c,
                Err(e) => return End::Retry(e),
            },
        };
        match self.converse(conn).await {
            Ok(()) => End::Stopped,
            Err(e) => e,
        }
    }

    async fn converse(&mut self, conn: Box<dyn Conn>) -> Result<(), End> {
        let (r, w) = tokio::io::split(conn);
        let mut reader =
            FrameReader::new(BufReader::with_capacity(256 << 10, r), 64 << 20, ByteCounter::default());
        let mut writer = FrameWriter::new(BufWriter::with_capacity(256 << 10, w), ByteCounter::default());
        let (replica_id, epoch) = {
            let st = self.state.lock();
            (st.replica_id, st.epoch)
        };
        writer
            .send_now(&Message::Hello(Hello {
                protocol: PROTOCOL_VERSION,
                job: self.job.clone(),
                agent_version: env!("CARGO_PKG_VERSION").to_string(),
                replica_id,
                epoch,
            }))
            .await?;
        let first = match tokio::time::timeout(Duration::from_secs(60), reader.read()).await {
            Err(_) => return Err(LinkError::Timeout(Duration::from_secs(60)).into()),
            // A target of another version whose Welcome does not decode here: as if it had
            // refused us by version (retrying cannot help).
            Ok(Err(LinkError::Version { peer, ours })) => {
                return Err(End::Fatal(Refusal::Version { target: peer, source: ours }));
            }
            Ok(r) => r?,
        };
        let welcome = match first {
            Message::Welcome(w) => w,
            Message::Refused(r) => return Err(classify(r)),
            other => return Err(End::Retry(LinkError::Protocol(format!("expected Welcome, got {other:?}")))),
        };
        self.status.connected.store(true, Ordering::Relaxed);
        self.status.connections.fetch_add(1, Ordering::Relaxed);
        self.state.lock().fenced = None;
        self.status.set_detail("");
        let replica: String = welcome.replica_id.iter().map(|b| format!("{b:02x}")).collect();
        tracing::Span::current().record("replica", replica.as_str());
        tracing::info!(applied = welcome.applied_seq, epoch = welcome.epoch, "connected to target");

        let window = Arc::new(Window::new(self.window));
        *self.status.window.lock() = Some(window.clone());
        // Two batches in hand: enough to keep the socket busy while the next one is packed, few
        // enough that a broken connection takes little unsent data down with it.
        let (out_tx, out_rx) = mpsc::channel::<Message>(2);
        let (list_tx, mut list_rx) = mpsc::channel::<Message>(16);
        let stop = self.shutdown.child_token();
        let mut tasks = tokio::task::JoinSet::new();
        let heartbeat = self.heartbeat;
        // Says when the writer has flushed everything and closed its half: all the end waits for.
        let (written_tx, written_rx) = oneshot::channel::<()>();
        tasks.spawn(
            async move {
                let r = doppel_link::framed::write_pump(writer, out_rx, heartbeat).await;
                let _ = written_tx.send(());
                r.map_err(End::Retry)
            }
            .in_current_span(),
        );
        {
            let (spool, window, status, dead) =
                (self.spool.clone(), window.clone(), self.status.clone(), heartbeat * 3);
            tasks.spawn(receive(reader, spool, window, status, list_tx, dead).in_current_span());
        }
        let (start_tx, start_rx) = oneshot::channel::<u64>();
        let sender;
        {
            let (spool, out, window, resends) =
                (self.spool.clone(), out_tx.clone(), window.clone(), self.resends.clone());
            let compressor = Compressor::new(self.compression, self.status.compression_level.clone());
            sender = tasks.spawn(
                async move {
                    match start_rx.await {
                        Ok(from) => {
                            send(spool, out, window, compressor, resends, from).await.map_err(End::Retry)
                        }
                        Err(_) => std::future::pending().await,
                    }
                }
                .in_current_span(),
            );
        }
        let control = self.after_welcome(&welcome, &out_tx, &mut list_rx, start_tx);
        let outcome = tokio::select! {
            _ = stop.cancelled() => Ok(()),
            r = control => r,
            Some(r) = tasks.join_next() => match r {
                Ok(Ok(())) => Err(End::Retry(LinkError::Closed)),
                Ok(Err(e)) => Err(e),
                Err(e) => Err(End::Retry(LinkError::Protocol(format!("link task failed: {e}")))),
            },
        };
        let mut overflow_tick = tokio::time::interval(Duration::from_millis(250));
        overflow_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let outcome = match outcome {
            // The decision is made and streaming runs: serve verify requests until the end.
            // The overflow is looked at on a tick that always runs: a branch enabled only while
            // the overflow is active would be decided when each wait begins, and an overflow
            // entered during a wait (the spool filling while the link is up) would never end.
            Ok(()) if !stop.is_cancelled() => loop {
                tokio::select! {
                    _ = stop.cancelled() => break Ok(()),
                    Some(r) = tasks.join_next() => break match r {
                        Ok(Ok(())) => Err(End::Retry(LinkError::Closed)),
                        Ok(Err(e)) => Err(e),
                        Err(e) => Err(End::Retry(LinkError::Protocol(format!("link task failed: {e}")))),
                    },
                    Some(req) = self.verify.recv() => {
                        let answer = self.verify_once(req.repair, &out_tx, &mut list_rx).await;
                        let _ = req.reply.send(answer);
                    }
                    _ = overflow_tick.tick() => {
                        // The overflow ends once everything queued before it is acknowledged.
                        let s = self.spool.stats();
                        if resync_due(self.overflow.active(), s.acked, s.last_seq)
                            && let Err(e) = self.compare_suspects(true, &welcome, &out_tx, &mut list_rx).await
                        {
                            break Err(e);
                        }
                    }
                }
            },
            other => other,
        };
        if outcome.is_ok() {
            let last = self.final_message.lock().take();
            let last = last.unwrap_or(Message::Goodbye { reason: "source agent stopping".into() });
            let _ = tokio::time::timeout(Duration::from_secs(5), out_tx.send(last)).await;
        }
        // The sender holds a handle on the writer's queue: stopping it lets the queue close, so
        // the writer ends as soon as the last message is flushed. Waiting for every task
        // instead (the reader ends only when the peer closes) made each clean stop and each
        // failback handover wait out the whole timeout.
        sender.abort();
        drop(out_tx);
        let _ = tokio::time::timeout(Duration::from_millis(500), written_rx).await;
        tasks.abort_all();
        outcome
    }

    /// Decides between resuming and comparing, starts the sender, and runs crash recovery.
    async fn after_welcome(
        &mut self,
        w: &Welcome,
        out: &mpsc::Sender<Message>,
        lists: &mut mpsc::Receiver<Message>,
        start_sender: oneshot::Sender<u64>,
    ) -> Result<(), End> {
        let knows = Known::from(&*self.state.lock());
        let scanning = self.status.state() == Phase::Scanning;
        match self.planner.on_welcome(knows, w, scanning) {
            WelcomePlan::MirrorAll { interrupt_other } => {
                if interrupt_other {
                    // The comparison running against another replica must give way.
                    self.spool.interrupt();
                }
                self.mirror_all(w, out, lists).await?;
                let _ = start_sender.send(w.applied_seq + 1);
            }
            WelcomePlan::Resume { catch_up_to, then } => {
                self.spool
                    .catch_up(catch_up_to)
                    .map_err(|e| End::Retry(LinkError::Protocol(e.to_string())))?;
                if then == Then::Replicate {
                    self.status.set_state(Phase::Replicating);
                }
                let _ = start_sender.send(w.applied_seq + 1);
                if then == Then::CompareSuspects {
                    self.compare_suspects(false, w, out, lists).await?;
                    self.planner.suspects_compared();
                }
            }
        }
        Ok(())
    }

    /// Lists the whole replica and has the capture thread compare the whole tree with it;
    /// returns once numbering restarted after the target's applied sequence.
    async fn mirror_all(
        &mut self,
        w: &Welcome,
        out: &mpsc::Sender<Message>,
        lists: &mut mpsc::Receiver<Message>,
    ) -> Result<(), End> {
        self.status.set_state(Phase::Mirroring);
        tracing::info!("the replica is new or unknown to this agent: comparing the whole tree");
        self.list_id += 1;
        let (feed, listing) = crate::listing::channel();
        let (tx, rx) = oneshot::channel();
        self.command(Command::MirrorAll {
            applied: w.applied_seq,
            replica_id: w.replica_id,
            epoch: w.epoch,
            listing,
            started: tx,
        })?;
        feed_list(out, lists, self.list_id, ListScope::All, feed).await?;
        rx.await.map_err(|_| End::Retry(LinkError::Protocol("the capture thread stopped".into())))?;
        self.planner.mirroring_all();
        Ok(())
    }

    /// Drains the spool, asks the capture thread what may differ (left by the previous run, or
    /// recorded during an overflow when `resync`), lists it on the target, and has it compared.
    async fn compare_suspects(
        &mut self,
        resync: bool,
        w: &Welcome,
        out: &mpsc::Sender<Message>,
        lists: &mut mpsc::Receiver<Message>,
    ) -> Result<(), End> {
        self.status.set_state(Phase::Mirroring);
        // The replica must hold what survived in the spool before the suspects are compared.
        let target = self.spool.stats().last_seq;
        while self.spool.stats().acked < target {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (tx, rx) = oneshot::channel();
        self.command(if resync { Command::Resync { reply: tx } } else { Command::Suspects { reply: tx } })?;
        let stopped = || End::Retry(LinkError::Protocol("the capture thread stopped".into()));
        let mut suspects = rx.await.map_err(|_| stopped())?;
        if !suspects.whole_tree && !suspects.children.is_empty() {
            // Names removed from directories whose region stands for them: what the replica
            // holds there and the source does not.
            let dirs = suspects.children.iter().map(|(d, _)| d.to_wire()).collect();
            self.list_id += 1;
            let (feed, on_replica) = crate::listing::channel();
            let (tx, rx) = oneshot::channel();
            self.command(Command::Vanished { suspects, on_replica, reply: tx })?;
            feed_list(out, lists, self.list_id, ListScope::Children(dirs), feed).await?;
            suspects = rx.await.map_err(|_| stopped())?.ok_or_else(|| {
                End::Retry(LinkError::Protocol("the replica's directories were not listed whole".into()))
            })?;
        }
        let names_scope = if suspects.whole_tree {
            ListScope::All
        } else {
            ListScope::Paths(suspects.names.iter().map(|p| p.to_wire()).collect())
        };
        // Ranges are few and small: listed whole; names may be the whole tree: streamed.
        let ranges_scope =
            ListScope::Ranges(suspects.ranges.iter().map(|(p, o, l)| (p.to_wire(), *o, *l)).collect());
        self.list_id += 1;
        let ranges = request_list(out, lists, self.list_id, ranges_scope).await?;
        self.list_id += 1;
        let (feed, names) = crate::listing::channel();
        self.command(Command::MirrorSuspects {
            suspects,
            names,
            ranges,
            replica_id: w.replica_id,
            epoch: w.epoch,
        })?;
        feed_list(out, lists, self.list_id, names_scope, feed).await
    }

    /// Waits for the spool to drain (so the listing reflects everything captured so far),
    /// lists the whole replica, and has the capture thread compare.
    async fn verify_once(
        &mut self,
        repair: bool,
        out: &mpsc::Sender<Message>,
        lists: &mut mpsc::Receiver<Message>,
    ) -> Result<VerifyReport, RequestError> {
        let target = self.spool.stats().last_seq;
        let deadline = Instant::now() + Duration::from_secs(600);
        while self.spool.stats().acked < target {
            if Instant::now() > deadline {
                return Err(RequestError::CatchUpTimeout);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.list_id += 1;
        let (feed, listing) = crate::listing::channel();
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Verify { listing, repair, reply: tx })
            .map_err(|_| RequestError::CaptureStopped)?;
        feed_list(out, lists, self.list_id, ListScope::All, feed).await.map_err(|e| match e {
            End::Retry(e) => RequestError::Link(e),
            End::Fatal(r) => RequestError::Refused(r),
            End::Stopped => RequestError::SessionStopped,
        })?;
        rx.await.map_err(|_| RequestError::CaptureStopped)?
    }

    fn command(&self, c: Command) -> Result<(), End> {
        self.commands
            .send(c)
            .map_err(|_| End::Retry(LinkError::Protocol("the capture thread stopped".into())))
    }
}

fn classify(r: Refusal) -> End {
    match r {
        Refusal::Busy | Refusal::Other { .. } => End::Retry(LinkError::Refused(r)),
        fatal => End::Fatal(fatal),
    }
}

fn jitter() -> f64 {
    let mut b = [0u8; 2];
    let _ = getrandom::fill(&mut b);
    u16::from_le_bytes(b) as f64 / u16::MAX as f64
}

/// Asks for listing `id` of `scope` and passes it to the capture thread through `feed`, a
/// chunk at a time, as it arrives.
async fn feed_list(
    out: &mpsc::Sender<Message>,
    lists: &mut mpsc::Receiver<Message>,
    id: u64,
    scope: ListScope,
    feed: ListingFeed,
) -> Result<(), End> {
    out.send(Message::ListRequest { id, scope }).await.map_err(|_| End::Retry(LinkError::Closed))?;
    feed.forward(lists, id).await.map_err(|e| match e {
        FeedError::Closed => End::Retry(LinkError::Closed),
        FeedError::Target(e) => {
            End::Retry(LinkError::Protocol(format!("the target could not list the replica: {e}")))
        }
    })
}

/// Asks for listing `id` of `scope` and gathers it whole (for listings bounded by what was
/// asked, such as byte ranges).
async fn request_list(
    out: &mpsc::Sender<Message>,
    lists: &mut mpsc::Receiver<Message>,
    id: u64,
    scope: ListScope,
) -> Result<Vec<Entry>, End> {
    let closed = || End::Retry(LinkError::Closed);
    out.send(Message::ListRequest { id, scope }).await.map_err(|_| closed())?;
    let mut all: Vec<Entry> = Vec::new();
    loop {
        match lists.recv().await.ok_or_else(closed)? {
            Message::ListEntries { id: i, entries } if i == id => {
                for e in entries {
                    // A big file arrives in pieces: consecutive entries of the same path whose
                    // blocks continue where the previous piece ended.
                    match all.last_mut() {
                        Some(prev)
                            if prev.path == e.path
                                && e.first_block > prev.first_block
                                && e.first_block == prev.first_block + prev.blocks.len() as u64 =>
                        {
                            prev.blocks.extend(e.blocks)
                        }
                        _ => all.push(e),
                    }
                }
            }
            Message::ListEnd { id: i, error } if i == id => {
                return match error {
                    None => Ok(all),
                    Some(e) => Err(End::Retry(LinkError::Protocol(format!(
                        "the target could not list the replica: {e}"
                    )))),
                };
            }
            _ => {}
        }
    }
}

async fn receive<R: tokio::io::AsyncRead + Unpin>(
    mut reader: FrameReader<R>,
    spool: Arc<Spool>,
    window: Arc<Window>,
    status: Arc<JobStatus>,
    lists: mpsc::Sender<Message>,
    dead_after: Duration,
) -> Result<(), End> {
    loop {
        let msg = tokio::time::timeout(dead_after, reader.read())
            .await
            .map_err(|_| End::Retry(LinkError::Timeout(dead_after)))??;
        match msg {
            Message::Ack { seq } => {
                spool.ack(seq).map_err(|e| End::Retry(LinkError::Protocol(e.to_string())))?;
                window.acked(seq);
                status.acked_at_us.store(doppel_link::framed::now_us(), Ordering::Relaxed);
                if status.sync_degraded.load(Ordering::Relaxed) && seq >= spool.stats().last_seq {
                    status.sync_degraded.store(false, Ordering::Relaxed);
                    tracing::warn!("sync replication restored: the target caught up");
                }
            }
            Message::OpRefused { seq, reason } => {
                status.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(seq, reason = %TruncatedText(&reason), "the target refused an op");
            }
            m @ (Message::ListEntries { .. } | Message::ListEnd { .. }) => {
                let _ = lists.send(m).await;
            }
            Message::Heartbeat { .. } => {}
            Message::Stalled { reason } => {
                let reason = truncated_text(&reason);
                tracing::warn!(%reason, "the target paused applying; waiting for it");
                *status.stalled.lock() = Some(reason);
            }
            Message::Resumed => {
                tracing::info!("the target resumed applying");
                *status.stalled.lock() = None;
            }
            Message::Goodbye { reason } => {
                return Err(End::Retry(LinkError::Protocol(format!(
                    "target closed the link: {}",
                    TruncatedText(&reason)
                ))));
            }
            Message::Refused(r) => return Err(classify(r)),
            other => {
                return Err(End::Retry(LinkError::Protocol(format!(
                    "unexpected message from target: {}",
                    truncated_debug(&other)
                ))));
            }
        }
    }
}
