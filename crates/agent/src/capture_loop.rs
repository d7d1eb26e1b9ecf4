//! The capture thread: changes in, ops out.
//!
//! It owns the reconciler (and so the index) alone, so no lock guards the index. In `watch`
//! mode it turns watch events into ops; in `fuse` mode the mount sequences ops itself and this
//! thread keeps the activity log cool. In both modes it carries out the comparisons the link
//! asks for: a whole-tree difference mirror when the replica is unknown, or a comparison of
//! just the names and ranges that may differ (after a crash, after changes made while a `fuse`
//! job was stopped, or after a spool overflow). In `watch` mode, until one of those has
//! happened (or a clean restart let it compare the tree with its saved index locally), it only
//! buffers events: ops emitted against an index that may not describe the replica would be
//! wrong.
//!
//! When the spool is full (overflow), `watch` mode records the names it would have compared in
//! the persistent dirty set instead of emitting ops; `fuse` mode keeps the activity log's
//! regions sticky (see `fuse_sink`).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use doppel_capture::fuse::FuseCapture;
use doppel_capture::{EventSource, FsEvent};
use doppel_mirror::prehash::Prehash;
use doppel_mirror::{EventQueue, Index, IndexEntry, MirrorError, OpSink, Reconciler, VerifyReport};
use doppel_proto::{Entry, Op, PointKind, RelPath};
use doppel_spool::{Placement, Spool, SpoolError};
use doppel_target::registry::now_us;
use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::activity::{ActivityLog, EXTENT, Region};
use crate::error::{AgentError, RequestError};
use crate::listing::Listing;
use crate::overflow::Overflow;
use crate::resume::StartPlan;
use crate::state::JobState;
use crate::status::{JobStatus, Phase};

/// Events kept while waiting for the link's decision; beyond this a full rescan follows.
const MAX_BUFFERED_EVENTS: usize = 200_000;
/// A region cools once acknowledged and idle this long.
const COOL_AFTER: Duration = Duration::from_secs(10);

/// Names and byte ranges that may differ between the source and the replica.
#[derive(Debug, Default, Clone)]
pub struct Suspects {
    /// Names to compare (existence, type, attributes; whole content for files).
    pub names: Vec<RelPath>,
    /// Byte ranges of files to compare block by block: `(path, offset, len)`.
    pub ranges: Vec<(RelPath, u64, u64)>,
    /// Events were lost: compare the whole tree (listing everything).
    pub whole_tree: bool,
    /// Directories whose entries made since a time are to be compared (see
    /// [`Region::Children`]); their names join [`Suspects::names`] once looked up.
    pub children: Vec<(RelPath, u64)>,
    /// The dirty-set regions these came from, released once compared.
    pub regions: Vec<Region>,
}

/// Orders from the link.
pub enum Command {
    /// The target's replica is unknown to the index: compare the whole tree with `listing`.
    /// Pending ops are discarded and numbering continues after `applied`; `started` is
    /// answered once that is done, so the link can start sending.
    MirrorAll {
        /// The target's applied sequence.
        applied: u64,
        /// The replica's id.
        replica_id: [u8; 16],
        /// The replica's epoch.
        epoch: u64,
        /// The target's listing of the whole replica, arriving.
        listing: Listing,
        /// Answered when numbering was reset.
        started: oneshot::Sender<()>,
    },
    /// What did the previous run leave to compare?
    Suspects {
        /// The answer.
        reply: oneshot::Sender<Suspects>,
    },
    /// The spool has drained after an overflow: stop recording dirty names, and say what to
    /// compare.
    Resync {
        /// The answer.
        reply: oneshot::Sender<Suspects>,
    },
    /// Compare the suspects with the target's listings of them.
    MirrorSuspects {
        /// What was asked.
        suspects: Suspects,
        /// The target's listing of the names (or of everything, for a whole-tree comparison),
        /// arriving.
        names: Listing,
        /// The target's listing of the ranges.
        ranges: Vec<Entry>,
        /// The replica's id.
        replica_id: [u8; 16],
        /// The replica's epoch.
        epoch: u64,
    },
    /// Adds to `suspects` the names the replica's directories hold (`on_replica`, a listing of
    /// [`Suspects::children`]) that the source's do not: removals a [`Region::Children`]
    /// stands for.
    Vanished {
        /// What the previous run (or the overflow) left to compare.
        suspects: Suspects,
        /// The replica's entries directly beneath those directories, arriving (a directory
        /// may hold millions: never gathered whole).
        on_replica: Listing,
        /// The answer; `None` if the listing did not arrive whole (the link retries).
        reply: oneshot::Sender<Option<Suspects>>,
    },
    /// Take in every change made so far (pending events, and anything a stat comparison with
    /// the index finds), queue its ops, and answer: the last step before a handover.
    Settle {
        /// Answered once the ops are queued.
        reply: oneshot::Sender<Result<(), RequestError>>,
    },
    /// Compare the whole tree with `listing` and report; with `repair`, also bring the names
    /// that differ in line.
    Verify {
        /// The target's listing of the whole replica, arriving.
        listing: Listing,
        /// Queue repairs.
        repair: bool,
        /// The report, or why there is none.
        reply: oneshot::Sender<Result<VerifyReport, RequestError>>,
    },
}

/// How changes are captured.
pub enum Source {
    /// Watch events.
    Watch(Box<dyn EventSource>),
    /// A capture mount (unmounted at stop, before the final checkpoint).
    Fuse(Option<FuseCapture>),
    /// A guest's disks, captured at the hypervisor (detached at stop).
    Vm(Option<doppel_capture::vm::VmCapture>),
}

/// Everything the capture thread owns.
pub struct Capture {
    /// The reconciler (and index).
    pub rec: Reconciler,
    /// Where ops go.
    pub spool: Arc<Spool>,
    /// How changes are captured.
    pub source: Source,
    /// The persistent dirty set: the activity log in `fuse` mode, the names recorded during an
    /// overflow in `watch` mode.
    pub dirty: Arc<ActivityLog>,
    /// Whether the spool overflowed.
    pub overflow: Arc<Overflow>,
    /// Index file.
    pub index_path: PathBuf,
    /// Job state file.
    pub state_path: PathBuf,
    /// Job state (shared with the link).
    pub state: Arc<Mutex<JobState>>,
    /// Live status.
    pub status: Arc<JobStatus>,
    /// Set to stop.
    pub stop: Arc<AtomicBool>,
    /// Commands from the link.
    pub commands: Receiver<Command>,
    /// What the start plan still asks of this thread: a local rescan first, and what the
    /// previous run left to compare with the replica (until compared, or covered by a
    /// whole-tree comparison).
    pub plan: StartPlan,
    /// Settle time for events.
    pub debounce: Duration,
    /// How often to checkpoint the index.
    pub checkpoint_interval: Duration,
}

/// Sends ops to the spool.
struct SpoolSink<'a> {
    spool: &'a Spool,
    placement: Placement,
    /// Set for long comparisons, so a stop request interrupts them.
    stop: Option<&'a AtomicBool>,
    /// When the changes being sent were noticed (else: now).
    noticed_us: Option<u64>,
}

impl<'a> SpoolSink<'a> {
    /// For live changes: spill to disk, report a full spool as an overflow.
    fn live(spool: &'a Spool) -> Self {
        SpoolSink { spool, placement: Placement::Spill, stop: None, noticed_us: None }
    }

    /// For comparisons: wait for memory, stop when asked to.
    fn comparing(spool: &'a Spool, stop: &'a AtomicBool) -> Self {
        SpoolSink { spool, placement: Placement::WaitForMemory, stop: Some(stop), noticed_us: None }
    }
}

impl OpSink for SpoolSink<'_> {
    fn emit(&mut self, op: Op) -> Result<(), MirrorError> {
        if self.stop.is_some_and(|s| s.load(Ordering::Relaxed)) {
            return Err(MirrorError::Sink("stopping".into()));
        }
        match self.spool.append(op, self.noticed_us.unwrap_or_else(now_us), self.placement, false) {
            Ok(_) => Ok(()),
            Err(SpoolError::Full { .. }) => Err(MirrorError::Overflow),
            Err(SpoolError::Interrupted) => Err(MirrorError::Interrupted),
            Err(e) => Err(MirrorError::Sink(e.to_string())),
        }
    }
}

fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> AgentError + '_ {
    move |source| AgentError::Io { path: path.to_path_buf(), source }
}

impl Capture {
    fn watching(&self) -> bool {
        matches!(self.source, Source::Watch(_))
    }

    /// Runs until stopped. Returns whether the job ended cleanly (index and spool saved
    /// together, so the next start knows exactly what it has to compare).
    pub fn run(mut self) -> Result<bool, AgentError> {
        *self.status.reconcile.lock() = Some(self.rec.stats());
        let backend = match &self.source {
            Source::Watch(w) => w.backend().to_string(),
            Source::Fuse(m) => {
                let mut features = Vec::new();
                if m.as_ref().is_some_and(|m| m.passthrough()) {
                    features.push("passthrough reads");
                }
                if m.as_ref().is_some_and(|m| m.writeback()) {
                    features.push("write-back cache");
                }
                if features.is_empty() { "fuse".into() } else { format!("fuse ({})", features.join(", ")) }
            }
            Source::Vm(v) => {
                let disks: Vec<String> = v.iter().flat_map(|v| v.disks()).map(|d| d.name).collect();
                format!("vm (QEMU active mirror: {})", disks.join(", "))
            }
        };
        *self.status.backend.lock() = backend;
        let mut streaming = !self.watching();
        let mut queue = EventQueue::new();
        let mut buffered: Vec<FsEvent> = Vec::new();
        let mut overflowed = false;
        if self.plan.local_rescan() {
            self.status.set_state(Phase::Scanning);
            let spool = self.spool.clone();
            let mut sink = SpoolSink::live(&spool);
            sink.stop = Some(&self.stop);
            match self.rec.sync_tree(&RelPath::root(), &mut sink).and_then(|_| self.rec.finish(&mut sink)) {
                Err(MirrorError::Overflow) => {
                    self.enter_overflow(&mut queue, vec![Region::Tree(Vec::new())])?
                }
                r => r?,
            }
            streaming = true;
            self.status.set_state(Phase::Replicating);
        }
        let mut last_checkpoint = Instant::now();
        let mut last_cool = Instant::now();
        let mut dirty_since_checkpoint = false;
        let mut events = Vec::new();
        while !self.stop.load(Ordering::Relaxed) {
            self.status.dirty_regions.store(self.dirty.len() as u64, Ordering::Relaxed);
            match self.commands.recv_timeout(Duration::ZERO) {
                Ok(Command::Settle { reply }) => {
                    let r = self.settle(&mut queue).map_err(RequestError::Failed);
                    let _ = reply.send(r);
                }
                Ok(cmd) => {
                    if self.handle(cmd)? && !streaming {
                        streaming = true;
                        let spool = self.spool.clone();
                        let mut sink = SpoolSink::live(&spool);
                        for ev in buffered.drain(..) {
                            queue.push(ev, &mut self.rec, &mut sink)?;
                        }
                        if overflowed {
                            queue.rescan_all();
                            overflowed = false;
                        }
                        dirty_since_checkpoint = true;
                    }
                    continue;
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            let wait = if queue.is_empty() { Duration::from_millis(100) } else { self.debounce / 2 };
            match &mut self.source {
                Source::Watch(w) => {
                    events.clear();
                    w.read(&mut events, wait).map_err(io(self.rec.root()))?;
                }
                Source::Fuse(_) | Source::Vm(_) => {
                    if let Source::Vm(Some(v)) = &self.source
                        && let Some(why) = v.lost()
                    {
                        return Err(AgentError::CaptureLost(why));
                    }
                    if last_cool.elapsed() >= Duration::from_secs(2) {
                        self.dirty
                            .cool(self.spool.stats().acked, COOL_AFTER)
                            .map_err(io(&self.index_path))?;
                        last_cool = Instant::now();
                    }
                    match self.commands.recv_timeout(wait) {
                        // Every write is queued as it happens: nothing is left to take in.
                        Ok(Command::Settle { reply }) => {
                            let _ = reply.send(Ok(()));
                        }
                        Ok(cmd) => {
                            self.handle(cmd)?;
                        }
                        Err(_) => {}
                    }
                    continue;
                }
            }
            if !streaming {
                if buffered.len() + events.len() > MAX_BUFFERED_EVENTS {
                    overflowed = true;
                    buffered.clear();
                } else {
                    buffered.append(&mut events);
                }
                continue;
            }
            if self.overflow.active() {
                // The spool is full: remember what changed, to compare it later.
                let regions: Vec<Region> = events.drain(..).flat_map(event_regions).collect();
                self.dirty.add_sticky(&regions).map_err(io(&self.index_path))?;
                continue;
            }
            let spool = self.spool.clone();
            let mut sink = SpoolSink::live(&spool);
            let mut pushed = Ok(());
            for ev in events.drain(..) {
                pushed = pushed.and_then(|_| queue.push(ev, &mut self.rec, &mut sink));
            }
            let mut flushed = Ok(());
            if pushed.is_ok() && !queue.is_empty() && (queue.due(self.debounce) || queue.len() > 10_000) {
                sink.noticed_us = queue.oldest_us();
                flushed = queue.flush(&mut self.rec, &mut sink);
                dirty_since_checkpoint = true;
            }
            match pushed.and(flushed) {
                Err(MirrorError::Overflow) => self.enter_overflow(&mut queue, Vec::new())?,
                r => r?,
            }
            if dirty_since_checkpoint && last_checkpoint.elapsed() >= self.checkpoint_interval {
                self.checkpoint()?;
                last_checkpoint = Instant::now();
                dirty_since_checkpoint = false;
            }
        }
        self.finish(streaming, queue)
    }

    /// Queues the ops of every change made so far (`watch` mode).
    fn settle(&mut self, queue: &mut EventQueue) -> Result<(), AgentError> {
        if let Source::Watch(w) = &mut self.source {
            let mut events = Vec::new();
            w.read(&mut events, Duration::ZERO).map_err(io(self.rec.root()))?;
            let spool = self.spool.clone();
            let mut sink = SpoolSink::live(&spool);
            for ev in events {
                queue.push(ev, &mut self.rec, &mut sink)?;
            }
            queue.flush_all(&mut self.rec, &mut sink)?;
            // Anything an event may have missed shows as a stat difference from the index.
            self.rec.sync_tree(&RelPath::root(), &mut sink)?;
            self.rec.finish(&mut sink)?;
        }
        Ok(())
    }

    /// The spool is full: every name still waiting (and `extra`) goes to the dirty set.
    fn enter_overflow(&mut self, queue: &mut EventQueue, extra: Vec<Region>) -> Result<(), AgentError> {
        self.overflow.enter();
        let mut regions = extra;
        regions.extend(queue.take_paths().into_iter().map(|p| Region::Name(p.as_bytes().to_vec())));
        self.dirty.add_sticky(&regions).map_err(io(&self.index_path))
    }

    /// Stopping: take in what is left and save what the next start needs. Returns whether the
    /// stop is clean.
    fn finish(mut self, streaming: bool, mut queue: EventQueue) -> Result<bool, AgentError> {
        if !streaming || self.plan.to_compare().pending() || self.overflow.active() {
            return Ok(false);
        }
        match &mut self.source {
            Source::Watch(w) => {
                let mut events = Vec::new();
                let _ = w.read(&mut events, Duration::ZERO);
                let spool = self.spool.clone();
                let mut sink = SpoolSink::live(&spool);
                for ev in events {
                    queue.push(ev, &mut self.rec, &mut sink)?;
                }
                if queue.flush_all(&mut self.rec, &mut sink).is_err() {
                    return Ok(false);
                }
                self.checkpoint()?;
            }
            Source::Fuse(mount) => {
                // Nothing changes through the mount once it is gone; what changes after that,
                // while the job is stopped, shows as a stat difference from this index.
                // Files still open are served (and captured) for a while after the detach, and
                // new opens already reach the tree uncaptured: the index is saved as of the
                // detach, so anything touched since then is a "racy" suspect at the next start.
                let detached_at = now_us();
                // The reconciler reaches the tree through the mount's descriptor of it, which
                // goes with the mount (and its number may name another file after): the
                // index is made through a descriptor of its own.
                let beneath = std::fs::File::open(self.rec.root()).map_err(io(self.rec.root()))?;
                if let Some(m) = mount.take() {
                    m.unmount().map_err(io(self.rec.root()))?;
                }
                if !self.dirty.sticky().is_empty() {
                    return Ok(false);
                }
                let tree =
                    PathBuf::from(format!("/proc/self/fd/{}/.", std::os::fd::AsRawFd::as_raw_fd(&beneath)));
                self.rec.restat_index(&tree)?;
                self.checkpoint_as_of(detached_at)?;
                self.dirty.clear().map_err(io(&self.index_path))?;
            }
            Source::Vm(vm) => {
                // The guest writes on uncaptured once the mirror is gone, and nothing on its
                // disks' views says what changed: the next start compares them whole with the
                // replica (only differing blocks travel), so no index is kept.
                if let Some(v) = vm.take() {
                    v.detach().map_err(io(self.rec.root()))?;
                }
                self.spool.persist()?;
                self.dirty.clear().map_err(io(&self.index_path))?;
            }
        }
        Ok(true)
    }

    /// Saves the spool durably, then the index that describes it.
    fn checkpoint(&mut self) -> Result<(), AgentError> {
        self.checkpoint_as_of(now_us())
    }

    /// A checkpoint whose index describes the tree as of `at` (microseconds since the epoch).
    fn checkpoint_as_of(&mut self, at: u64) -> Result<(), AgentError> {
        self.spool.persist()?;
        let seq = self.spool.stats().last_seq;
        self.rec.index.save(at, seq)?;
        self.status.show_index(&self.rec.index)?;
        Ok(())
    }

    /// Carries out a command; returns whether a `watch` job may start streaming.
    fn handle(&mut self, cmd: Command) -> Result<bool, AgentError> {
        match cmd {
            Command::MirrorAll { applied, replica_id, epoch, listing, started } => {
                self.status.set_state(Phase::Mirroring);
                // The index takes the listing in as it comes; until the state below says a
                // mirror runs, a failed listing leaves the index as it was saved.
                let t = Instant::now();
                // Saved first, so a failed listing can roll back to exactly this.
                self.checkpoint()?;
                if let Err(e) = self.seed_all(listing) {
                    tracing::warn!(error = %e, "difference mirror: no complete listing; the link retries");
                    self.rec.index.rollback()?;
                    return Ok(false);
                }
                let entries = self.rec.index.len()?;
                tracing::info!(
                    entries,
                    seconds = t.elapsed().as_secs_f64(),
                    "difference mirror: replica listed"
                );
                // The index is about to describe another replica: forget the old one first,
                // so a crash mid-mirror leads to a fresh mirror.
                {
                    let mut st = self.state.lock();
                    st.replica_id = None;
                    st.mirroring = Some(replica_id);
                    st.save(&self.state_path)?;
                }
                self.spool.reset(applied)?;
                self.overflow.leave();
                let _ = started.send(());
                tracing::info!("difference mirror: comparing the whole tree");
                let regions = self.dirty.sticky();
                let t = Instant::now();
                let spool = self.spool.clone();
                let mut sink = SpoolSink::comparing(&spool, &self.stop);
                sink.emit(Op::Point { kind: PointKind::PreResync })?;
                let compared =
                    self.rec.sync_tree(&RelPath::root(), &mut sink).and_then(|_| self.rec.finish(&mut sink));
                self.rec.set_prehashed(None);
                match compared {
                    Err(MirrorError::Interrupted) => {
                        tracing::warn!("difference mirror interrupted: the replica changed; starting over");
                        self.state.lock().mirroring = None;
                        return Ok(false);
                    }
                    r => r?,
                }
                let stats = self.rec.stats();
                tracing::info!(
                    seconds = t.elapsed().as_secs_f64(),
                    files_hashed = stats.files_hashed.load(Ordering::Relaxed),
                    bytes_queued = stats.bytes_emitted.load(Ordering::Relaxed),
                    "difference mirror: tree compared"
                );
                self.compared(&regions);
                self.complete(replica_id, epoch)?;
                Ok(true)
            }
            Command::Suspects { reply } => {
                let s = self.suspects()?;
                tracing::info!(
                    names = s.names.len(),
                    ranges = s.ranges.len(),
                    whole_tree = s.whole_tree,
                    "to compare with the replica"
                );
                let _ = reply.send(s);
                Ok(false)
            }
            Command::Resync { reply } => {
                self.overflow.leave();
                let mut s = suspects_of(self.dirty.sticky());
                self.look_up_children(&mut s)?;
                tracing::info!(
                    names = s.names.len(),
                    ranges = s.ranges.len(),
                    whole_tree = s.whole_tree,
                    "after the overflow: to compare with the replica"
                );
                let _ = reply.send(s);
                Ok(false)
            }
            Command::Vanished { mut suspects, on_replica, reply } => {
                match self.add_vanished(&mut suspects, on_replica) {
                    Err(AgentError::Listing(e)) => {
                        tracing::warn!(error = %e, "listing the replica's directories: incomplete; the link retries");
                        let _ = reply.send(None);
                    }
                    r => {
                        r?;
                        let _ = reply.send(Some(suspects));
                    }
                }
                Ok(false)
            }
            Command::MirrorSuspects { suspects, names, ranges, replica_id, epoch } => {
                self.status.set_state(Phase::Mirroring);
                self.checkpoint()?;
                let seeded = if suspects.whole_tree {
                    self.seed_all(names)
                } else {
                    self.seed_paths(&suspects.names, names)
                };
                if let Err(e) = seeded {
                    tracing::warn!(error = %e, "comparing suspects: no complete listing; the link retries");
                    self.rec.index.rollback()?;
                    return Ok(false);
                }
                let spool = self.spool.clone();
                let mut sink = SpoolSink::comparing(&spool, &self.stop);
                sink.emit(Op::Point { kind: PointKind::PreResync })?;
                if suspects.whole_tree {
                    let compared = self.rec.sync_tree(&RelPath::root(), &mut sink);
                    self.rec.set_prehashed(None);
                    compared?;
                } else {
                    for p in &suspects.names {
                        self.rec.sync_entry(p, &mut sink)?;
                    }
                }
                for (path, offset, len) in &suspects.ranges {
                    if let Some(remote) = covering(&ranges, path, offset / doppel_proto::BLOCK_SIZE) {
                        self.rec.sync_range(path, *offset, *len, remote, &mut sink)?;
                    }
                }
                self.rec.finish(&mut sink)?;
                self.compared(&suspects.regions);
                self.complete(replica_id, epoch)?;
                Ok(true)
            }
            Command::Settle { reply } => {
                let _ = reply.send(Err(RequestError::NotStreaming));
                Ok(false)
            }
            Command::Verify { listing, repair, reply } => {
                let result = self.verify(listing, repair);
                let _ = reply.send(result.map_err(RequestError::Failed));
                Ok(false)
            }
        }
    }

    /// What the previous run left to compare.
    fn suspects(&self) -> Result<Suspects, AgentError> {
        let left = self.plan.to_compare();
        let mut s = suspects_of(left.regions);
        if let Some(t) = left.saved_at_us {
            s.names.extend(self.rec.suspects(t)?);
        }
        self.look_up_children(&mut s)?;
        Ok(s)
    }

    /// Adds to `s` the names of `on_replica` that are gone from the source.
    fn add_vanished(&self, s: &mut Suspects, mut on_replica: Listing) -> Result<(), AgentError> {
        let root = self.rec.root();
        for e in &mut on_replica {
            let Ok(p) = RelPath::try_from(&e.path) else { continue };
            let full = root.join(p.as_path());
            match std::fs::symlink_metadata(&full) {
                Ok(_) => {}
                Err(err)
                    if matches!(
                        err.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                    ) =>
                {
                    s.names.push(p)
                }
                Err(err) => return Err(AgentError::Io { path: full, source: err }),
            }
        }
        on_replica.finish()?;
        s.names.sort();
        s.names.dedup();
        Ok(())
    }

    /// Adds to `s` the entries its directories' [`Region::Children`] stand for.
    fn look_up_children(&self, s: &mut Suspects) -> Result<(), AgentError> {
        let root = self.rec.root();
        for (dir, since) in &s.children {
            let found =
                crate::activity::made_since(root, dir, *since).map_err(io(&root.join(dir.as_path())))?;
            s.names.extend(found);
        }
        s.names.sort();
        s.names.dedup();
        Ok(())
    }

    /// `regions` have been compared with the replica: nothing the start plan asked for is
    /// left (a whole-tree comparison covers it too).
    fn compared(&mut self, regions: &[Region]) {
        self.plan = StartPlan::Resume;
        self.dirty.compared(regions);
    }

    /// Replaces the whole index by `listing`, as it arrives. Meanwhile the tree's files the
    /// listing names are hashed on another thread, for the whole-tree comparison that follows
    /// (which must [`Reconciler::set_prehashed`] `None` when done): the source's tree is read
    /// while the target reads its replica, not after.
    fn seed_all(&mut self, mut listing: Listing) -> Result<(), AgentError> {
        let prehash = self.prehash();
        self.rec.seed_all((&mut listing).inspect(|e| {
            if let Some(p) = &prehash {
                p.offer(e);
            }
        }))?;
        listing.finish()?;
        let finished = prehash.map(Prehash::finish).transpose();
        let prehashed = finished
            .inspect_err(|e| tracing::warn!(error = %e, "the files hashed during the listing are lost: the comparison reads them"))
            .ok()
            .flatten();
        self.rec.set_prehashed(prehashed);
        Ok(())
    }

    /// A thread hashing the tree's files while the replica is listed (`None` if it cannot
    /// start: the comparison then reads every file, as before).
    fn prehash(&self) -> Option<Prehash> {
        let scratch = self.index_path.parent().unwrap_or(std::path::Path::new("/"));
        let cache = self.rec.index.footprint().cache_bytes as usize;
        Prehash::start(self.rec.root(), scratch, cache, self.rec.stats())
            .inspect_err(|e| tracing::warn!(error = %e, "cannot hash ahead of the comparison"))
            .ok()
    }

    /// Replaces the entries of `paths` by `listing`, as it arrives.
    fn seed_paths(&mut self, paths: &[RelPath], mut listing: Listing) -> Result<(), AgentError> {
        self.rec.seed_paths(paths, &mut listing)?;
        listing.finish()
    }

    fn verify(&mut self, mut listing: Listing, repair: bool) -> Result<VerifyReport, AgentError> {
        let t = Instant::now();
        let scratch = self.index_path.parent().unwrap_or(std::path::Path::new("/")).to_path_buf();
        let compared = doppel_mirror::verify::compare_with(
            self.rec.root(),
            self.rec.selection().clone(),
            &mut listing,
            self.rec.guard(),
            self.rec.stats().tree.clone(),
            &scratch,
        );
        // Compared with part of the replica, the rest would read as missing: no report.
        listing.finish()?;
        let (mut report, differing) = compared?;
        tracing::info!(
            seconds = t.elapsed().as_secs_f64(),
            compared = report.entries_compared,
            differences = report.differences.len(),
            "verify: tree compared"
        );
        if repair && !differing.is_empty() {
            let spool = self.spool.clone();
            let mut sink = SpoolSink::comparing(&spool, &self.stop);
            sink.emit(Op::Point { kind: PointKind::PreResync })?;
            let unrepaired = doppel_mirror::verify::repair(&mut self.rec, &differing, &mut sink)?;
            sink.emit(Op::Point { kind: PointKind::Resynced })?;
            let (left, queued) = differing.names.iter().partition(|(p, _)| unrepaired.contains(p));
            let names = |v: Vec<&(RelPath, _)>| v.into_iter().map(|(p, _)| p.to_string()).collect();
            (report.unrepaired, report.repaired) = (names(left), names(queued));
        }
        Ok(report)
    }

    /// The index now describes `replica_id`: checkpoint, and remember it.
    fn complete(&mut self, replica_id: [u8; 16], epoch: u64) -> Result<(), AgentError> {
        // The replica is consistent again from here: its history says so.
        let spool = self.spool.clone();
        SpoolSink::comparing(&spool, &self.stop).emit(Op::Point { kind: PointKind::Resynced })?;
        self.checkpoint()?;
        let mut st = self.state.lock();
        st.replica_id = Some(replica_id);
        st.mirroring = None;
        st.epoch = epoch;
        st.save(&self.state_path)?;
        drop(st);
        self.status.set_state(Phase::Replicating);
        Ok(())
    }
}

/// The dirty-set regions an event touches.
fn event_regions(ev: FsEvent) -> Vec<Region> {
    let name = |p: RelPath| Region::Name(p.as_bytes().to_vec());
    match ev {
        FsEvent::Modified(p) | FsEvent::Closed(p) | FsEvent::Attrib(p) => vec![name(p)],
        FsEvent::Created { path, is_dir: true } => vec![Region::Tree(path.as_bytes().to_vec())],
        FsEvent::Created { path, .. } | FsEvent::Removed { path, .. } => vec![name(path)],
        FsEvent::Renamed { from, to, is_dir } => {
            if is_dir {
                vec![name(from), Region::Tree(to.as_bytes().to_vec())]
            } else {
                vec![name(from), name(to)]
            }
        }
        FsEvent::Rescan(p) => vec![Region::Tree(p.as_bytes().to_vec())],
    }
}

/// The comparison `regions` call for: names and ranges as recorded; a tree region is a
/// whole-tree comparison for the root, and the directory's name otherwise (a directory new to
/// the replica is compared with everything beneath it).
fn suspects_of(regions: Vec<Region>) -> Suspects {
    let mut s = Suspects::default();
    for r in &regions {
        match (r, r.path()) {
            (Region::Tree(p), _) if p.is_empty() => s.whole_tree = true,
            (Region::Name(_) | Region::Tree(_), Some(p)) => s.names.push(p),
            (Region::Children(_, since), Some(p)) => {
                s.children.push((p.clone(), *since));
                s.names.push(p);
            }
            (Region::Extent(_, i), Some(p)) => s.ranges.push((p, i * EXTENT, EXTENT)),
            _ => {}
        }
    }
    s.names.sort();
    s.names.dedup();
    s.regions = regions;
    s
}

/// The listing entry of `path` whose blocks cover block `first` (adjacent ranges of a file
/// arrive merged into one entry), or else the one just before it (the replica's file ends
/// there).
fn covering<'a>(entries: &'a [Entry], path: &RelPath, first: u64) -> Option<&'a Entry> {
    entries
        .iter()
        .filter(|e| e.path.0 == path.as_bytes() && e.first_block <= first)
        .max_by_key(|e| e.first_block)
}

/// Makes `index` one of stat fields only (no block hashes): what a `fuse` job handed back by a
/// failback compares against at its next start to find the names changed while nothing
/// captured them (a running job's stop keeps what it can: [`Reconciler::restat_index`]).
pub(crate) fn stat_index(
    index: &mut Index,
    root: &std::path::Path,
    selection: &doppel_fs::Selection,
) -> Result<(), AgentError> {
    index.clear()?;
    let mut failed = None;
    let walked = doppel_fs::walk::walk(root, &RelPath::root(), selection, &mut |w| {
        index.insert(&w.path, &IndexEntry::from_meta(&w.meta)).map_err(|e| {
            failed = Some(e);
            std::io::Error::other("index store failed")
        })
    });
    if let Some(e) = failed {
        return Err(e.into());
    }
    walked.map_err(io(root))
}
