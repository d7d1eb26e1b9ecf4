//! The group-commit policy on a virtual clock: single transitions as tables, and whole streams
//! driven through a copy of the worker's loop ([`Sim`]) whose commits are checked against the
//! rules of the module documentation.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::*;

const INTERVAL: Duration = Duration::from_millis(100);
const MIB: u64 = 1 << 20;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A fresh policy at `t0` on a replica durable up to 0.
fn policy(t0: Instant) -> GroupCommit {
    GroupCommit::new(INTERVAL, COMMIT_BYTES, 0, 0, t0)
}

#[test]
fn idle_decisions() {
    let t0 = Instant::now();
    let mut p = policy(t0);
    assert_eq!(p.idle(t0 + ms(500)), Idle::WaitForWork, "nothing applied: nothing to commit");
    p.op_applied(1, 10, false);
    // Committed at t0 (start), so the next commit is due at t0 + interval.
    let table = [
        (ms(0), Idle::WaitUntil(t0 + INTERVAL)),
        (ms(99), Idle::WaitUntil(t0 + INTERVAL)),
        (ms(100), Idle::CommitNow(Commit::CLEAN)),
        (ms(5000), Idle::CommitNow(Commit::CLEAN)),
    ];
    for (at, want) in table {
        assert_eq!(p.idle(t0 + at), want, "idle at +{at:?}");
    }
    p.committed(t0 + ms(120), Some(1));
    assert!(!p.pending());
    assert_eq!(p.idle(t0 + ms(121)), Idle::WaitForWork);
    // A few MiB applied and a source that waits for its acknowledgement: committed as soon as
    // the queue runs dry; one byte less, or a source waiting for nothing, waits for the interval.
    p.op_applied(2, EAGER_BYTES - 1, false);
    assert_eq!(p.after_batch(t0 + ms(130), false, true), None);
    assert_eq!(p.idle(t0 + ms(130)), Idle::WaitUntil(t0 + ms(220)));
    p.op_applied(3, 1, false);
    assert_eq!(p.after_batch(t0 + ms(131), false, false), None);
    assert_eq!(p.idle(t0 + ms(131)), Idle::WaitUntil(t0 + ms(220)));
    assert_eq!(p.after_batch(t0 + ms(132), false, true), None);
    assert_eq!(p.idle(t0 + ms(132)), Idle::CommitNow(Commit::CLEAN));
}

/// A row of [`after_batch_decisions`]: ops applied as (data bytes, fsync), time of the
/// decision, whether work is queued behind, the expected decision.
type BatchCase = (&'static [(u64, bool)], Duration, bool, Option<Commit>);

#[test]
fn after_batch_decisions() {
    let t0 = Instant::now();
    let table: &[BatchCase] = &[
        // Within the interval, small, no barrier: the group stays open.
        (&[(4096, false)], ms(10), false, None),
        (&[(4096, false)], ms(10), true, None),
        // A quiet spell: the interval since the last commit passed, commit at once.
        (&[(4096, false)], ms(100), false, Some(Commit { dirty: false })),
        (&[(4096, false)], ms(3000), false, Some(Commit { dirty: false })),
        // Work queued behind the commit: its checkpoint is dirty at once.
        (&[(4096, false)], ms(3000), true, Some(Commit { dirty: true })),
        // An fsync barrier closes the group at once, whatever the time.
        (&[(4096, false), (0, true)], ms(1), false, Some(Commit { dirty: false })),
        (&[(0, true)], ms(0), true, Some(Commit { dirty: true })),
        // Size: 64 MiB closes the group, one byte less does not.
        (&[(32 * MIB, false), (32 * MIB - 1, false)], ms(1), false, None),
        (&[(32 * MIB, false), (32 * MIB, false)], ms(1), false, Some(Commit { dirty: false })),
        (&[(COMMIT_BYTES * 2, false)], ms(1), true, Some(Commit { dirty: true })),
    ];
    for (i, (ops, at, queued, want)) in table.iter().enumerate() {
        let mut p = policy(t0);
        for (seq, (len, fsync)) in ops.iter().enumerate() {
            p.op_applied(seq as u64 + 1, *len, *fsync);
        }
        assert_eq!(
            p.after_batch(t0 + *at, *queued, false),
            *want,
            "case {i}: {ops:?} at +{at:?}, queued {queued}"
        );
    }
}

#[test]
fn a_commit_closes_the_group() {
    let t0 = Instant::now();
    let mut p = policy(t0);
    p.op_applied(1, COMMIT_BYTES, true);
    assert!(p.after_batch(t0, false, false).is_some());
    p.committed(t0 + ms(1), Some(1));
    // Size and barrier were counted for the closed group only.
    p.op_applied(2, 10, false);
    assert_eq!(p.after_batch(t0 + ms(2), false, false), None);
    assert_eq!(p.durable(), 1);
}

#[test]
fn a_failed_commit_is_retried_one_interval_later() {
    let t0 = Instant::now();
    let mut p = policy(t0);
    p.op_applied(1, 10, false);
    p.committed(t0 + ms(200), None);
    assert!(p.pending(), "a failed commit made nothing durable");
    assert_eq!(p.durable(), 0);
    assert_eq!(p.idle(t0 + ms(201)), Idle::WaitUntil(t0 + ms(300)), "no commit loop");
}

#[test]
fn duplicates_do_not_make_work_pending() {
    let t0 = Instant::now();
    let mut p = GroupCommit::new(INTERVAL, COMMIT_BYTES, 7, 7, t0);
    p.op_applied(7, 0, false);
    assert!(!p.pending());
    assert_eq!(p.idle(t0 + ms(1000)), Idle::WaitForWork);
}

#[test]
fn stall_transitions() {
    let t0 = Instant::now();
    let mut s = Stall::new();
    assert!(!s.stalled());
    assert_eq!(s.succeeded(t0), None, "an op that never failed does not resume anything");
    let first = s.failed(t0, true);
    assert_eq!(first, StallStep { announce: true, next: AfterStall::RetryAt(t0 + STALL_RETRY) });
    let again = s.failed(t0 + STALL_RETRY, true);
    assert_eq!(again, StallStep { announce: false, next: AfterStall::RetryAt(t0 + 2 * STALL_RETRY) });
    assert!(s.stalled());
    assert_eq!(s.succeeded(t0 + ms(2500)), Some(ms(2500)));
    assert!(!s.stalled());
    assert_eq!(s.succeeded(t0 + ms(2600)), None, "resumed once");
    // A session that ended gives up, after announcing if that was the first failure.
    assert_eq!(s.failed(t0, false), StallStep { announce: true, next: AfterStall::GiveUp });
    assert_eq!(s.failed(t0, false), StallStep { announce: false, next: AfterStall::GiveUp });
}

/// A batch arriving at the worker.
#[derive(Clone)]
struct Arrival {
    at: Duration,
    /// Ops as (data bytes, fsync).
    ops: Vec<(u64, bool)>,
    /// The batch's `ack_wanted`.
    ack_wanted: bool,
}

fn small(at: Duration) -> Arrival {
    Arrival { at, ops: vec![(4096, false)], ack_wanted: false }
}

/// What the simulated worker did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Did {
    Commit { at: Duration, durable: u64, dirty: bool },
    Stalled { at: Duration },
    Retry { at: Duration },
    Resumed { at: Duration },
}

/// The worker's loop over the policy, on a virtual clock: applying takes no time, a commit
/// makes everything applied durable, and the disk refuses ops while `full` says so.
struct Sim {
    t0: Instant,
    now: Instant,
    policy: GroupCommit,
    stall: Stall,
    queue: VecDeque<Arrival>,
    seq: u64,
    /// Arrival time of each op by sequence (index seq - 1).
    arrived: Vec<Duration>,
    did: Vec<Did>,
    full: Box<dyn Fn(Duration) -> bool>,
}

impl Sim {
    fn new(arrivals: Vec<Arrival>) -> Sim {
        let t0 = Instant::now();
        Sim {
            t0,
            now: t0,
            policy: policy(t0),
            stall: Stall::new(),
            queue: arrivals.into(),
            seq: 0,
            arrived: Vec::new(),
            did: Vec::new(),
            full: Box::new(|_| false),
        }
    }

    fn at(&self) -> Duration {
        self.now - self.t0
    }

    fn commit(&mut self, c: Commit) {
        let durable = self.seq;
        self.did.push(Did::Commit { at: self.at(), durable, dirty: c.dirty });
        self.policy.committed(self.now, Some(durable));
    }

    /// Runs until every arrival is applied and durable.
    fn run(mut self) -> Sim {
        loop {
            let arrived = self.queue.front().is_some_and(|a| self.t0 + a.at <= self.now);
            if arrived {
                let a = self.queue.pop_front().expect("front");
                self.batch(&a);
                continue;
            }
            let next = self.queue.front().map(|a| self.t0 + a.at);
            match (self.policy.idle(self.now), next) {
                (Idle::WaitForWork, None) => return self,
                (Idle::WaitForWork, Some(t)) => self.now = t,
                (Idle::WaitUntil(due), Some(t)) if t < due => self.now = t,
                (Idle::WaitUntil(due), _) => {
                    self.now = due;
                    self.commit(Commit::CLEAN);
                }
                (Idle::CommitNow(c), _) => self.commit(c),
            }
        }
    }

    fn batch(&mut self, a: &Arrival) {
        for &(len, fsync) in &a.ops {
            while (self.full)(self.at()) {
                let step = self.stall.failed(self.now, true);
                if step.announce {
                    self.commit(Commit::CLEAN);
                    self.did.push(Did::Stalled { at: self.at() });
                }
                let AfterStall::RetryAt(t) = step.next else { unreachable!("the session stays open") };
                self.now = t;
                self.did.push(Did::Retry { at: self.at() });
            }
            if self.stall.succeeded(self.now).is_some() {
                self.did.push(Did::Resumed { at: self.at() });
            }
            self.seq += 1;
            self.arrived.push(a.at);
            self.policy.op_applied(self.seq, len, fsync);
        }
        let queued = self.queue.front().is_some_and(|n| self.t0 + n.at <= self.now);
        if let Some(c) = self.policy.after_batch(self.now, queued, a.ack_wanted) {
            self.commit(c);
        }
    }

    fn commits(&self) -> Vec<(Duration, u64, bool)> {
        self.did
            .iter()
            .filter_map(|d| match *d {
                Did::Commit { at, durable, dirty } => Some((at, durable, dirty)),
                _ => None,
            })
            .collect()
    }

    /// For every op, how long it waited between arriving and becoming durable.
    fn latencies(&self) -> Vec<Duration> {
        let commits = self.commits();
        (1..=self.seq)
            .map(|seq| {
                let (at, _, _) = *commits
                    .iter()
                    .find(|(_, d, _)| *d >= seq)
                    .unwrap_or_else(|| panic!("op {seq} never durable"));
                at - self.arrived[seq as usize - 1]
            })
            .collect()
    }
}

#[test]
fn an_op_after_a_quiet_spell_is_committed_at_once() {
    let sim = Sim::new(vec![small(ms(5000)), small(ms(9000))]).run();
    assert_eq!(sim.commits(), vec![(ms(5000), 1, false), (ms(9000), 2, false)]);
    assert!(sim.latencies().iter().all(|l| l.is_zero()));
}

#[test]
fn a_busy_stream_commits_at_most_once_per_interval() {
    // One small op every millisecond for two seconds.
    let arrivals: Vec<Arrival> = (1..=2000).map(|i| small(ms(i))).collect();
    let sim = Sim::new(arrivals).run();
    let commits = sim.commits();
    for pair in commits.windows(2) {
        assert!(pair[1].0 - pair[0].0 >= INTERVAL, "two commits within one interval: {pair:?}");
    }
    // 2 s of stream: about one commit per interval, not one per op.
    assert!((19..=21).contains(&commits.len()), "{} commits: {commits:?}", commits.len());
    assert_eq!(commits.last().map(|c| c.1), Some(2000), "everything ends durable");
    let worst = sim.latencies().into_iter().max().expect("ops");
    assert!(worst <= INTERVAL, "an op waited {worst:?} for its commit");
}

#[test]
fn a_trickle_after_a_commit_waits_for_the_interval() {
    // The first op finds the worker idle since start (a quiet spell), the next ones follow
    // closely and join one group that closes when the interval is up.
    let sim = Sim::new(vec![small(ms(1000)), small(ms(1010)), small(ms(1020)), small(ms(1030))]).run();
    assert_eq!(sim.commits(), vec![(ms(1000), 1, false), (ms(1100), 4, false)]);
}

#[test]
fn size_closes_a_group_before_the_interval() {
    // Eight batches of 16 MiB queued at once: the first closes the quiet spell, every fourth
    // after it reaches 64 MiB with more queued, and the last three wait for the interval.
    let arrivals: Vec<Arrival> =
        (1..=8).map(|_| Arrival { at: ms(1001), ops: vec![(16 * MIB, false)], ack_wanted: false }).collect();
    let sim = Sim::new(arrivals).run();
    assert_eq!(sim.commits(), vec![(ms(1001), 1, true), (ms(1001), 5, true), (ms(1101), 8, false)]);
}

#[test]
fn a_source_waiting_for_its_acknowledgement_is_committed_when_the_queue_runs_dry() {
    // 8 MiB from a source whose producer waits: committed at once; then 1 MiB, under
    // EAGER_BYTES, waits for the interval.
    let sim = Sim::new(vec![
        small(ms(1000)),
        Arrival { at: ms(1010), ops: vec![(8 * MIB, false)], ack_wanted: true },
        Arrival { at: ms(1030), ops: vec![(MIB, false)], ack_wanted: true },
    ])
    .run();
    assert_eq!(sim.commits(), vec![(ms(1000), 1, false), (ms(1010), 2, false), (ms(1110), 3, false)]);
}

/// 1 MiB every millisecond for 300 ms, with or without `ack_wanted`.
fn stream(ack_wanted: bool) -> Vec<(Duration, u64, bool)> {
    let arrivals: Vec<Arrival> =
        (1..=300).map(|i| Arrival { at: ms(1000 + i), ops: vec![(MIB, false)], ack_wanted }).collect();
    let commits = Sim::new(arrivals).run().commits();
    assert_eq!(commits.last().map(|c| c.1), Some(300), "everything ends durable");
    commits
}

#[test]
fn only_a_source_that_waits_gets_early_commits() {
    // A fuse writer's stream (its records go to disk, it waits for nothing): the first commit
    // (a quiet spell), one per 64 MiB and the last, not one per 4 MiB.
    let relaxed = stream(false);
    assert!(relaxed.len() <= 6, "{} commits: {relaxed:?}", relaxed.len());
    // The same stream from a comparison waiting for acknowledgements: committed every time the
    // queue runs dry with 4 MiB applied.
    let waiting = stream(true);
    assert!(waiting.len() >= 70, "{} commits", waiting.len());
}

#[test]
fn an_fsync_closes_the_group_at_once() {
    let sim = Sim::new(vec![
        small(ms(1000)),
        small(ms(1010)),
        Arrival { at: ms(1020), ops: vec![(4096, false), (0, true)], ack_wanted: false },
        small(ms(1030)),
    ])
    .run();
    assert_eq!(sim.commits(), vec![(ms(1000), 1, false), (ms(1020), 4, false), (ms(1120), 5, false)]);
}

#[test]
fn a_commit_with_work_queued_behind_it_is_dirty() {
    // Two batches arrive together after a quiet spell: the first closes a group (the interval
    // passed) while the second is already queued; the second then waits for the interval.
    let sim = Sim::new(vec![small(ms(1000)), small(ms(1000))]).run();
    assert_eq!(sim.commits(), vec![(ms(1000), 1, true), (ms(1100), 2, false)]);
}

#[test]
fn a_full_disk_stalls_retries_every_second_and_resumes() {
    // The disk is full from 2.05 s to 4.5 s; ops arrive every 10 ms from 2 s.
    let arrivals: Vec<Arrival> = (0..10).map(|i| small(ms(2000 + 10 * i))).collect();
    let mut sim = Sim::new(arrivals);
    sim.full = Box::new(|t| t >= ms(2050) && t < ms(4500));
    let sim = sim.run();
    let stalled: Vec<&Did> = sim.did.iter().filter(|d| matches!(d, Did::Stalled { .. })).collect();
    assert_eq!(stalled, [&Did::Stalled { at: ms(2050) }], "one Stalled per stall");
    // What was applied before the failing op was committed when the stall began.
    assert!(sim.did.contains(&Did::Commit { at: ms(2050), durable: 5, dirty: false }), "{:?}", sim.did);
    let retries: Vec<Duration> =
        sim.did.iter().filter_map(|d| if let Did::Retry { at } = d { Some(*at) } else { None }).collect();
    assert_eq!(retries, vec![ms(3050), ms(4050), ms(5050)], "one retry a second until space came back");
    assert_eq!(sim.did.iter().filter(|d| matches!(d, Did::Resumed { .. })).count(), 1);
    assert!(sim.did.contains(&Did::Resumed { at: ms(5050) }));
    // The op that waited out the stall is not lost: everything ends durable.
    assert_eq!(sim.commits().last().map(|c| c.1), Some(10));
    assert_eq!(sim.seq, 10);
}

/// A commit whose writes run beside the applying closes its group when it begins (the next
/// group's size and interval count from there) and makes its ops durable only when it ends.
#[test]
fn a_commit_beside_the_applying_closes_its_group_when_it_begins() {
    let t0 = Instant::now();
    let mut p = policy(t0);
    p.op_applied(1, COMMIT_BYTES, false);
    assert_eq!(p.after_batch(t0 + ms(1), true, false), Some(Commit { dirty: true }));
    p.began(t0 + ms(1));
    p.op_applied(2, 10, false);
    assert_eq!(p.after_batch(t0 + ms(2), true, false), None, "a new group, counted from the begin");
    assert_eq!(p.durable(), 0, "nothing durable before the writes are done");
    p.finished(Some(1));
    assert_eq!(p.durable(), 1);
    assert!(p.pending(), "what was applied meanwhile waits for the next commit");
    assert_eq!(p.idle(t0 + ms(50)), Idle::WaitUntil(t0 + ms(101)));
}
