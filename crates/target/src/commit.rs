//! The group-commit policy of the apply worker, as a pure state machine.
//!
//! The worker ([`crate::worker`]) applies ops as they arrive and makes them durable in groups
//! (one `syncfs` and one checkpoint per group, then an ack). *When* a group closes, and what
//! the worker does while the disk is full, is decided here, over explicit time values, so the
//! policy can be tested on a virtual clock without a replica, a channel or a thread:
//!
//! - A group closes at most once per commit interval: committing whenever the queue was
//!   momentarily empty made a steady stream of small writes `syncfs` the whole file system
//!   hundreds of times a second.
//! - An op that arrives after a quiet spell (the interval since the last commit has passed) is
//!   committed at once: nothing is gained by making it wait.
//! - After [`COMMIT_BYTES`] of data the group closes even if more is queued, which bounds what
//!   a crash of the target can cost the source to resend.
//! - When the source says its producer waits for acknowledgements (the last batch's
//!   `ack_wanted`: a comparison whose records fill its memory budget) and [`EAGER_BYTES`] or
//!   more were applied since the last commit, the group closes as soon as the queue runs dry,
//!   without waiting for the interval to end. A comparison may run only 16 MiB ahead of its
//!   acknowledgements, so waiting out the 100 ms interval capped a local mirror of big files
//!   at about 160 MiB/s. Committing early for every stream instead (whenever the queue ran dry
//!   with 4 MiB applied) made a fuse writer's 1 GiB, whose records go to disk and which waits
//!   for nothing, commit every 4 MiB, and the flushes took a third of the writer's speed on a
//!   shared disk.
//! - After an `Fsync` op the group closes at once: a source waiting in sync mode, or an
//!   application that asked for durability, must not wait for a timer.
//! - A commit with ops already queued behind it writes its checkpoint marked dirty at once
//!   (the first op after a commit would rewrite it so anyway): one checkpoint write saved.
//! - A full disk (or another error that may pass) stalls the replica instead of failing it:
//!   the worker commits what it has, tells the source `Stalled`, retries every
//!   [`STALL_RETRY`], and says `Resumed` once the op went through ([`Stall`]).

use std::time::{Duration, Instant};

/// Commit after this much op data even if more is queued.
pub const COMMIT_BYTES: u64 = 64 << 20;

/// With this much op data applied since the last commit, and the source waiting for its
/// acknowledgement, a queue that runs dry closes the group without waiting for the interval.
pub const EAGER_BYTES: u64 = 4 << 20;

/// How long a stalled replica waits before retrying the op that failed.
pub const STALL_RETRY: Duration = Duration::from_secs(1);

/// Where the worker gets the time from and how it waits: the system clock in production, a
/// virtual one in tests of code built on this module.
pub trait Clock {
    /// The current time.
    fn now(&self) -> Instant;
    /// Blocks the calling thread until `at` (at once if it has passed).
    fn sleep_until(&self, at: Instant);
}

/// The system's monotonic clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn sleep_until(&self, at: Instant) {
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
    }
}

/// A commit to make now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Commit {
    /// Ops are queued behind this commit: write the checkpoint marked dirty at once
    /// (`Replica::commit_continuing`) rather than clean (`Replica::commit`).
    pub dirty: bool,
}

impl Commit {
    /// A commit with nothing known to be queued behind it.
    pub const CLEAN: Commit = Commit { dirty: false };
}

/// What the worker does when its queue is empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idle {
    /// Everything applied is durable: wait for work, however long it takes.
    WaitForWork,
    /// Applied ops wait for the commit due at this time, unless more work joins them first.
    WaitUntil(Instant),
    /// The commit is due (or overdue): make it now.
    CommitNow(Commit),
}

/// The group-commit decisions of one session's worker.
#[derive(Debug, Clone)]
pub struct GroupCommit {
    interval: Duration,
    max_bytes: u64,
    last_commit: Instant,
    /// Op data applied since the last commit.
    bytes_since: u64,
    /// An `Fsync` op was applied since the last commit.
    barrier: bool,
    /// The last batch said its source waits for acknowledgements.
    ack_wanted: bool,
    /// Highest sequence applied.
    applied: u64,
    /// Highest sequence a commit made durable.
    durable: u64,
}

impl GroupCommit {
    /// The policy of a worker starting at `now` on a replica that applied up to `applied` and
    /// is durable up to `durable` (a session starts with a commit, so the two are equal).
    pub fn new(interval: Duration, max_bytes: u64, applied: u64, durable: u64, now: Instant) -> GroupCommit {
        GroupCommit {
            interval,
            max_bytes,
            last_commit: now,
            bytes_since: 0,
            barrier: false,
            ack_wanted: false,
            applied: applied.max(durable),
            durable,
        }
    }

    /// Applied ops are waiting for a commit.
    pub fn pending(&self) -> bool {
        self.applied > self.durable
    }

    /// Highest sequence a commit made durable (and acknowledged).
    pub fn durable(&self) -> u64 {
        self.durable
    }

    /// The commit interval has passed since the last commit.
    fn interval_passed(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.last_commit) >= self.interval
    }

    /// An op went through: the replica has applied up to `applied_seq` (unchanged for a
    /// duplicate), the op carried `data_len` bytes of data, and `fsync` says whether it was
    /// an `Fsync` barrier.
    pub fn op_applied(&mut self, applied_seq: u64, data_len: u64, fsync: bool) {
        self.applied = self.applied.max(applied_seq);
        self.bytes_since += data_len;
        self.barrier |= fsync;
    }

    /// A batch of records was applied at `now`: whether to close the group, and whether
    /// `more_queued` work makes the checkpoint dirty at once.
    /// `ack_wanted` is the batch's [`doppel_proto::Batch::ack_wanted`].
    pub fn after_batch(&mut self, now: Instant, more_queued: bool, ack_wanted: bool) -> Option<Commit> {
        self.ack_wanted = ack_wanted;
        let close = self.barrier || self.bytes_since >= self.max_bytes || self.interval_passed(now);
        close.then_some(Commit { dirty: more_queued })
    }

    /// The queue is empty at `now`: wait, or commit.
    pub fn idle(&self, now: Instant) -> Idle {
        if !self.pending() {
            return Idle::WaitForWork;
        }
        let due = self.last_commit + self.interval;
        let eager = self.ack_wanted && self.bytes_since >= EAGER_BYTES;
        if now < due && !eager { Idle::WaitUntil(due) } else { Idle::CommitNow(Commit::CLEAN) }
    }

    /// A commit was made at `now`; `durable` is the sequence it made durable, `None` if it
    /// failed. Either way the group is closed: a failing commit is retried at the next
    /// decision, not in a loop.
    pub fn committed(&mut self, now: Instant, durable: Option<u64>) {
        self.began(now);
        self.finished(durable);
    }

    /// A commit that runs beside the applying began at `now`: the group is closed (the ops
    /// applied from here on form the next one), though nothing is durable yet.
    pub fn began(&mut self, now: Instant) {
        self.last_commit = now;
        self.bytes_since = 0;
        self.barrier = false;
    }

    /// A commit ended: `durable` is the sequence it made durable, `None` if it failed.
    pub fn finished(&mut self, durable: Option<u64>) {
        if let Some(seq) = durable {
            self.durable = self.durable.max(seq);
        }
    }
}

/// What the worker does after an op failed in a way that may pass (no space, an I/O error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StallStep {
    /// First failure of this op: commit what was applied before it (so the source gets its
    /// acks and can drop that much of its spool) and tell the source `Stalled`.
    pub announce: bool,
    /// What comes next.
    pub next: AfterStall,
}

/// See [`StallStep::next`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterStall {
    /// Try the op again at this time.
    RetryAt(Instant),
    /// The session is over (cancelled, or the peer is gone): stop retrying; what was applied
    /// stays applied and the next session resumes after it.
    GiveUp,
}

/// The full-disk stall of one op: stalled on the first failure, retried every
/// [`STALL_RETRY`], resumed when the op goes through.
#[derive(Debug, Clone, Default)]
pub struct Stall {
    since: Option<Instant>,
}

impl Stall {
    /// A replica that is not stalled.
    pub fn new() -> Stall {
        Stall::default()
    }

    /// Whether the replica is stalled.
    pub fn stalled(&self) -> bool {
        self.since.is_some()
    }

    /// The op failed at `now`; `session_open` says whether the session still runs.
    pub fn failed(&mut self, now: Instant, session_open: bool) -> StallStep {
        let announce = self.since.is_none();
        self.since.get_or_insert(now);
        let next = if session_open { AfterStall::RetryAt(now + STALL_RETRY) } else { AfterStall::GiveUp };
        StallStep { announce, next }
    }

    /// The op went through: returns how long the replica was stalled if it was (the worker
    /// then tells the source `Resumed`), and clears the stall.
    pub fn succeeded(&mut self, now: Instant) -> Option<Duration> {
        self.since.take().map(|since| now.saturating_duration_since(since))
    }
}

#[cfg(test)]
mod tests;
