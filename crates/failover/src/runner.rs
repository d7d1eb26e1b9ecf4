//! The sequencing of a failover or failback, without I/O: which steps, in which order, which
//! to skip because an earlier run completed them, what to record.
//!
//! A run is a plan ([`failover_plan`], [`failback_plan`]) of [`Work`] items carried out by a
//! [`Runner`] over three small traits: an [`Executor`] does each step's work, a
//! [`ProgressStore`] keeps the set of completed steps durably, an [`EventSink`] receives the
//! events, and a [`Clock`] times them. Each completed step is saved before the next starts,
//! so a run that stopped anywhere (a failing script, the target killed) is continued by the
//! next one, which skips exactly the completed steps: a fence (an epoch bump) or a script is
//! never done twice.

use std::cmp::Ordering;
use std::fmt;
use std::future::Future;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::clock::Clock;
use crate::events::Event;
use crate::hooks::HookError;
use crate::manager::{FailoverError, RunKind};
use crate::policy::SourcePolicy;
use crate::progress::Progress;
use crate::reverse::ReverseError;

/// A stage of operator scripts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Before the addresses are taken over.
    PreFailover,
    /// Per job, to start the workload on the replica.
    Failover,
    /// Per job, to stop the workload on the replica at failback.
    StopWorkload,
}

impl Stage {
    /// The stage's name in step keys, events and `DOPPEL_STEP`.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::PreFailover => "pre-failover",
            Stage::Failover => "failover",
            Stage::StopWorkload => "stop-workload",
        }
    }

    fn parse(s: &str) -> Option<Stage> {
        [Stage::PreFailover, Stage::Failover, Stage::StopWorkload].into_iter().find(|st| st.as_str() == s)
    }
}

/// A step that is recorded as done once it completes.
///
/// Written in the progress file as the strings earlier versions wrote (`fence:www`,
/// `pre-failover:0`, `failover:www:0`, `address:10.0.0.5/24`, `release:10.0.0.5/24`,
/// `unfence:www`, `handover:www`), and ordered as those strings, so files stay the same.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum StepKey {
    /// The job's replica was fenced.
    Fence(String),
    /// Script `index` of `stage` (for `job`, in per-job stages) succeeded.
    Script {
        /// The stage.
        stage: Stage,
        /// The job, for per-job stages.
        job: Option<String>,
        /// The script's place in its list.
        index: usize,
    },
    /// The address was taken over.
    Address(String),
    /// The address was released.
    Release(String),
    /// The job's replica was unfenced.
    Unfence(String),
    /// The job's handover was sent.
    Handover(String),
}

impl fmt::Display for StepKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StepKey::Fence(j) => write!(f, "fence:{j}"),
            StepKey::Script { stage, job: Some(j), index } => write!(f, "{}:{j}:{index}", stage.as_str()),
            StepKey::Script { stage, job: None, index } => write!(f, "{}:{index}", stage.as_str()),
            StepKey::Address(a) => write!(f, "address:{a}"),
            StepKey::Release(a) => write!(f, "release:{a}"),
            StepKey::Unfence(j) => write!(f, "unfence:{j}"),
            StepKey::Handover(j) => write!(f, "handover:{j}"),
        }
    }
}

/// A progress file holds a step key this version does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown step {0:?}")]
pub struct BadStepKey(pub String);

impl FromStr for StepKey {
    type Err = BadStepKey;

    fn from_str(s: &str) -> Result<StepKey, BadStepKey> {
        let bad = || BadStepKey(s.to_string());
        let (head, rest) = s.split_once(':').ok_or_else(bad)?;
        if rest.is_empty() {
            return Err(bad());
        }
        let key = match head {
            "fence" => StepKey::Fence(rest.into()),
            "address" => StepKey::Address(rest.into()),
            "release" => StepKey::Release(rest.into()),
            "unfence" => StepKey::Unfence(rest.into()),
            "handover" => StepKey::Handover(rest.into()),
            _ => {
                let stage = Stage::parse(head).ok_or_else(bad)?;
                // Job names have no colon (they are `[A-Za-z0-9._-]`).
                let (job, index) = match rest.split_once(':') {
                    Some((j, i)) if !j.is_empty() => (Some(j.to_string()), i),
                    Some(_) => return Err(bad()),
                    None => (None, rest),
                };
                StepKey::Script { stage, job, index: index.parse().map_err(|_| bad())? }
            }
        };
        Ok(key)
    }
}

impl TryFrom<String> for StepKey {
    type Error = BadStepKey;

    fn try_from(s: String) -> Result<StepKey, BadStepKey> {
        s.parse()
    }
}

impl From<StepKey> for String {
    fn from(k: StepKey) -> String {
        k.to_string()
    }
}

impl Ord for StepKey {
    fn cmp(&self, other: &StepKey) -> Ordering {
        self.to_string().cmp(&other.to_string())
    }
}

impl PartialOrd for StepKey {
    fn partial_cmp(&self, other: &StepKey) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl StepKey {
    /// Whether the step belongs to the failover of `job` (its fence or its failover scripts).
    pub fn is_failover_of(&self, job: &str) -> bool {
        match self {
            StepKey::Fence(j) => j == job,
            StepKey::Script { stage: Stage::Failover, job: Some(j), .. } => j == job,
            _ => false,
        }
    }
}

/// The work of one step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Work {
    /// Fence the job's replica (a new epoch; the old source is refused from then on).
    Fence {
        /// The job.
        job: String,
    },
    /// Run an operator script.
    Script {
        /// The stage.
        stage: Stage,
        /// The job, for per-job stages.
        job: Option<String>,
        /// The script's place in its list.
        index: usize,
        /// The script.
        script: String,
    },
    /// Take the address over on the interface.
    Address {
        /// `10.0.0.5/24`.
        addr: String,
        /// The interface.
        iface: String,
    },
    /// Release the address from the interface.
    Release {
        /// `10.0.0.5/24`.
        addr: String,
        /// The interface.
        iface: String,
    },
    /// The failback's final sync: every change reaches the source. Not recorded: it is
    /// cheap to repeat, and skipped once the job is unfenced.
    FinalSync {
        /// The job.
        job: String,
    },
    /// Unfence the job's replica (a new epoch in which the source may write again).
    Unfence {
        /// The job.
        job: String,
    },
    /// Send the handover, the failback stream's last message.
    Handover {
        /// The job.
        job: String,
    },
}

impl Work {
    /// The key that records the step as done, if it is recorded.
    pub fn key(&self) -> Option<StepKey> {
        Some(match self {
            Work::Fence { job } => StepKey::Fence(job.clone()),
            Work::Script { stage, job, index, .. } => {
                StepKey::Script { stage: *stage, job: job.clone(), index: *index }
            }
            Work::Address { addr, .. } => StepKey::Address(addr.clone()),
            Work::Release { addr, .. } => StepKey::Release(addr.clone()),
            Work::FinalSync { .. } => return None,
            Work::Unfence { job } => StepKey::Unfence(job.clone()),
            Work::Handover { job } => StepKey::Handover(job.clone()),
        })
    }

    /// The step's name in events and reports.
    pub fn name(&self) -> &'static str {
        match self {
            Work::Fence { .. } => "fence",
            Work::Script { stage, .. } => stage.as_str(),
            Work::Address { .. } => "address",
            Work::Release { .. } => "release-address",
            Work::FinalSync { .. } => "final-sync",
            Work::Unfence { .. } => "unfence",
            Work::Handover { .. } => "handover",
        }
    }

    /// The job, for per-job steps.
    pub fn job(&self) -> Option<&str> {
        match self {
            Work::Fence { job }
            | Work::FinalSync { job }
            | Work::Unfence { job }
            | Work::Handover { job } => Some(job),
            Work::Script { job, .. } => job.as_deref(),
            Work::Address { .. } | Work::Release { .. } => None,
        }
    }

    /// `fence (www)`, `address`: how errors name the step.
    fn label(&self) -> String {
        match self.job() {
            Some(j) => format!("{} ({j})", self.name()),
            None => self.name().to_string(),
        }
    }
}

/// The steps of a failover of `jobs`: fence each, the pre-failover scripts, the addresses,
/// each job's failover scripts.
pub fn failover_plan(pol: &SourcePolicy, jobs: &[String]) -> Vec<Work> {
    let mut plan: Vec<Work> = jobs.iter().map(|j| Work::Fence { job: j.clone() }).collect();
    plan.extend(scripts(Stage::PreFailover, None, &pol.pre_failover));
    if let Some(iface) = &pol.interface {
        plan.extend(pol.addresses.iter().map(|a| Work::Address { addr: a.clone(), iface: iface.clone() }));
    }
    for j in jobs {
        plan.extend(scripts(Stage::Failover, Some(j), &pol.failover));
    }
    plan
}

/// One job's failback, as [`failback_plan`] needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailbackJob {
    /// The job.
    pub job: String,
    /// Its failback stream runs (it may be gone once the job was unfenced).
    pub streaming: bool,
}

/// The steps of a failback cutover of `jobs`: each job's stop-workload scripts, the final
/// sync of each job still fenced, the release of the addresses (when `release`: no job of
/// the source stays failed over), then per job unfence and handover.
pub fn failback_plan(pol: &SourcePolicy, jobs: &[FailbackJob], done: &Progress, release: bool) -> Vec<Work> {
    let mut plan = Vec::new();
    for j in jobs {
        plan.extend(scripts(Stage::StopWorkload, Some(&j.job), &pol.stop_workload));
    }
    for j in jobs {
        if j.streaming && !done.done.contains(&StepKey::Unfence(j.job.clone())) {
            plan.push(Work::FinalSync { job: j.job.clone() });
        }
    }
    if let (Some(iface), true) = (&pol.interface, release) {
        plan.extend(pol.addresses.iter().map(|a| Work::Release { addr: a.clone(), iface: iface.clone() }));
    }
    for j in jobs {
        plan.push(Work::Unfence { job: j.job.clone() });
        plan.push(Work::Handover { job: j.job.clone() });
    }
    plan
}

fn scripts(stage: Stage, job: Option<&String>, list: &[String]) -> impl Iterator<Item = Work> {
    list.iter().enumerate().map(move |(index, s)| Work::Script {
        stage,
        job: job.cloned(),
        index,
        script: s.clone(),
    })
}

/// Why a step failed.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// A script or an address change.
    #[error(transparent)]
    Hook(#[from] HookError),
    /// The replica could not be reached.
    #[error(transparent)]
    Replica(#[from] doppel_target::LeaseError),
    /// The replica refused.
    #[error(transparent)]
    Apply(#[from] doppel_apply::ApplyError),
    /// The failback stream.
    #[error(transparent)]
    Failback(#[from] ReverseError),
    /// The point to fail over to cannot be used.
    #[error("{0}")]
    Point(String),
}

/// What a step did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Done {
    /// In words.
    pub detail: String,
    /// The job's epoch afterwards, for steps that change it.
    pub epoch: Option<u64>,
}

impl Done {
    /// Done, as `detail` says.
    pub fn said(detail: impl Into<String>) -> Done {
        Done { detail: detail.into(), epoch: None }
    }
}

/// Does the work of steps.
pub trait Executor: Sync {
    /// Does `work`.
    fn run(&self, work: &Work) -> impl Future<Output = Result<Done, StepError>> + Send;

    /// The current epoch of `job`'s replica (recorded for steps an earlier run completed).
    fn epoch(&self, job: &str) -> u64;
}

/// Keeps a run's progress durably.
pub trait ProgressStore: Sync {
    /// The saved progress, if any.
    fn load(&self) -> Result<Option<Progress>, FailoverError>;
    /// Saves `p` durably (it is read back after a crash).
    fn save(&self, p: &Progress) -> Result<(), FailoverError>;
}

/// Receives the events of a run.
pub trait EventSink: Sync {
    /// Records `e`.
    fn record(&self, e: Event);
}

/// Whether a step ran now or was done by an earlier run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StepStatus {
    /// Done by this run.
    Done,
    /// Done by an earlier run.
    Skipped,
}

impl StepStatus {
    /// `done` or `skipped`.
    pub fn as_str(self) -> &'static str {
        match self {
            StepStatus::Done => "done",
            StepStatus::Skipped => "skipped",
        }
    }
}

impl fmt::Display for StepStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// One step of a [`crate::Report`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepReport {
    /// The step (`fence`, `failover`...).
    pub step: String,
    /// The job, for per-job steps.
    pub job: Option<String>,
    /// Done now, or skipped (done by an earlier run).
    pub status: StepStatus,
    /// How long it took.
    pub millis: u64,
    /// More, in words.
    pub detail: String,
}

/// Carries out plans, recording each completed step.
pub struct Runner<'a, X, S, E, C: ?Sized> {
    source: &'a str,
    kind: RunKind,
    exec: &'a X,
    store: &'a S,
    events: &'a E,
    clock: &'a C,
    /// The progress: what is done, and the epochs set.
    pub progress: Progress,
    /// The steps of this run so far.
    pub steps: Vec<StepReport>,
}

impl<'a, X: Executor, S: ProgressStore, E: EventSink, C: Clock + ?Sized> Runner<'a, X, S, E, C> {
    /// A run of `kind` for `source` that goes on from `progress`.
    pub fn new(
        source: &'a str,
        kind: RunKind,
        (exec, store, events, clock): (&'a X, &'a S, &'a E, &'a C),
        progress: Progress,
    ) -> Self {
        Runner { source, kind, exec, store, events, clock, progress, steps: Vec::new() }
    }

    /// An event of this run, now.
    pub fn event(&self, kind: &str) -> Event {
        Event::new(self.source, kind).at(self.clock.now_us())
    }

    /// Saves the progress.
    pub fn save(&self) -> Result<(), FailoverError> {
        self.store.save(&self.progress)
    }

    /// Carries out `plan` in order; stops at the first step that fails (recording why, and a
    /// `KIND-failed` event).
    pub async fn run(&mut self, plan: &[Work]) -> Result<(), FailoverError> {
        for work in plan {
            if let Err(e) = self.step(work).await {
                self.events.record(self.event(&format!("{}-failed", self.kind)).detail(e.to_string()));
                return Err(e);
            }
        }
        Ok(())
    }

    fn step_event(&self, work: &Work, status: &str) -> Event {
        let e = self.event(&format!("{}-step", self.kind)).step(work.name(), status);
        match work.job() {
            Some(j) => e.job(j),
            None => e,
        }
    }

    fn push(&mut self, work: &Work, status: StepStatus, millis: u64, detail: String) {
        self.steps.push(StepReport {
            step: work.name().to_string(),
            job: work.job().map(str::to_string),
            status,
            millis,
            detail,
        });
    }

    /// Runs one step unless an earlier run completed it.
    async fn step(&mut self, work: &Work) -> Result<(), FailoverError> {
        let key = work.key();
        if key.as_ref().is_some_and(|k| self.progress.done.contains(k)) {
            return self.skip(work);
        }
        self.events.record(self.step_event(work, "started"));
        let t = self.clock.now_us();
        let r = self.exec.run(work).await;
        let millis = self.clock.now_us().saturating_sub(t) / 1000;
        match r {
            Ok(done) => {
                if let (Some(epoch), Some(job)) = (done.epoch, work.job()) {
                    self.progress.epochs.insert(job.to_string(), epoch);
                }
                if let Some(k) = key {
                    self.progress.done.insert(k);
                    self.save()?;
                }
                self.events.record(self.step_event(work, "done").millis(millis).detail(done.detail.clone()));
                self.push(work, StepStatus::Done, millis, done.detail);
                Ok(())
            }
            Err(error) => {
                let step = work.label();
                self.progress.failed = Some(format!("{step}: {error}"));
                self.save()?;
                self.events.record(self.step_event(work, "failed").millis(millis).detail(error.to_string()));
                Err(FailoverError::Step { step, error })
            }
        }
    }

    fn skip(&mut self, work: &Work) -> Result<(), FailoverError> {
        const EARLIER: &str = "done by an earlier run";
        if let Work::Fence { job } | Work::Unfence { job } = work {
            let epoch = self.exec.epoch(job);
            if self.progress.epochs.insert(job.clone(), epoch) != Some(epoch) {
                self.save()?;
            }
        }
        self.events.record(self.step_event(work, "skipped").detail(EARLIER));
        self.push(work, StepStatus::Skipped, 0, EARLIER.into());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use parking_lot::Mutex;

    use super::*;
    use crate::clock::VirtualClock;
    use crate::policy::SourcePolicy;

    /// Progress kept in memory, as a file would keep it (saved copies only).
    #[derive(Default)]
    struct MemStore(Mutex<Option<Progress>>);

    impl ProgressStore for MemStore {
        fn load(&self) -> Result<Option<Progress>, FailoverError> {
            Ok(self.0.lock().clone())
        }
        fn save(&self, p: &Progress) -> Result<(), FailoverError> {
            *self.0.lock() = Some(p.clone());
            Ok(())
        }
    }

    #[derive(Default)]
    struct Sink(Mutex<Vec<Event>>);

    impl EventSink for Sink {
        fn record(&self, e: Event) {
            self.0.lock().push(e);
        }
    }

    /// Does nothing but note each step, take 5 ms of virtual time, and fail at `fail_at`.
    struct Fake<'a> {
        clock: &'a VirtualClock,
        calls: Mutex<Vec<Work>>,
        fail_at: Option<usize>,
        epoch: Mutex<u64>,
    }

    impl<'a> Fake<'a> {
        fn new(clock: &'a VirtualClock, fail_at: Option<usize>) -> Fake<'a> {
            Fake { clock, calls: Mutex::default(), fail_at, epoch: Mutex::new(1) }
        }
        fn calls(&self) -> Vec<Work> {
            self.calls.lock().clone()
        }
    }

    impl Executor for Fake<'_> {
        fn run(&self, work: &Work) -> impl Future<Output = Result<Done, StepError>> + Send {
            let n = {
                let mut calls = self.calls.lock();
                calls.push(work.clone());
                calls.len() - 1
            };
            self.clock.advance_us(5_000);
            let r = if Some(n) == self.fail_at {
                Err(StepError::Hook(HookError::Failed {
                    script: "start-vm".into(),
                    status: "exit status: 3".into(),
                    tail: vec!["no such VM".into()],
                }))
            } else {
                let epoch = match work {
                    Work::Fence { .. } | Work::Unfence { .. } => {
                        let mut e = self.epoch.lock();
                        *e += 1;
                        Some(*e)
                    }
                    _ => None,
                };
                Ok(Done { detail: format!("did {}", work.name()), epoch })
            };
            async move { r }
        }

        fn epoch(&self, _job: &str) -> u64 {
            *self.epoch.lock()
        }
    }

    fn policy() -> SourcePolicy {
        let mut p = SourcePolicy::manual("s");
        p.pre_failover = vec!["check-quorum".into()];
        p.failover = vec!["start-vm".into(), "announce".into()];
        p.stop_workload = vec!["stop-vm".into()];
        p.interface = Some("eth0".into());
        p.addresses = vec!["10.0.0.5/24".into(), "fd00::5/64".into()];
        p
    }

    fn jobs() -> Vec<String> {
        vec!["db".into(), "www".into()]
    }

    async fn run_once(
        kind: RunKind,
        plan: &[Work],
        exec: &Fake<'_>,
        store: &MemStore,
        sink: &Sink,
        clock: &VirtualClock,
    ) -> (Result<(), FailoverError>, Vec<StepReport>) {
        let p = store.load().unwrap().unwrap_or_default();
        let mut run = Runner::new("s", kind, (exec, store, sink, clock), p);
        let r = run.run(plan).await;
        (r, run.steps)
    }

    #[test]
    fn the_failover_plan_fences_first_and_starts_workloads_last() {
        let names: Vec<String> = failover_plan(&policy(), &jobs())
            .iter()
            .map(|w| w.key().map(|k| k.to_string()).unwrap_or_else(|| w.name().into()))
            .collect();
        assert_eq!(
            names,
            [
                "fence:db",
                "fence:www",
                "pre-failover:0",
                "address:10.0.0.5/24",
                "address:fd00::5/64",
                "failover:db:0",
                "failover:db:1",
                "failover:www:0",
                "failover:www:1"
            ]
        );
        // No interface: no address steps.
        let mut p = policy();
        p.interface = None;
        assert!(!failover_plan(&p, &jobs()).iter().any(|w| matches!(w, Work::Address { .. })));
    }

    #[test]
    fn the_failback_plan_syncs_only_fenced_jobs_and_releases_only_when_told() {
        let fb = |job: &str, streaming| FailbackJob { job: job.into(), streaming };
        let mut done = Progress::default();
        done.done.insert(StepKey::Unfence("db".into()));
        let plan = failback_plan(&policy(), &[fb("db", true), fb("www", true), fb("x", false)], &done, true);
        let names: Vec<String> = plan.iter().map(|w| format!("{}{:?}", w.name(), w.job())).collect();
        assert_eq!(
            names,
            [
                "stop-workload Some(\"db\")",
                "stop-workload Some(\"www\")",
                "stop-workload Some(\"x\")",
                "final-syncSome(\"www\")",
                "release-addressNone",
                "release-addressNone",
                "unfenceSome(\"db\")",
                "handoverSome(\"db\")",
                "unfenceSome(\"www\")",
                "handoverSome(\"www\")",
                "unfenceSome(\"x\")",
                "handoverSome(\"x\")",
            ]
            .map(|s| s.replace(' ', ""))
        );
        let kept = failback_plan(&policy(), &[fb("www", true)], &Progress::default(), false);
        assert!(!kept.iter().any(|w| matches!(w, Work::Release { .. })));
    }

    #[tokio::test]
    async fn a_run_records_every_step_with_its_virtual_duration() {
        let clock = VirtualClock::at(1_000_000);
        let (store, sink) = (MemStore::default(), Sink::default());
        let exec = Fake::new(&clock, None);
        let plan = failover_plan(&policy(), &jobs());
        let (r, steps) = run_once(RunKind::Failover, &plan, &exec, &store, &sink, &clock).await;
        r.unwrap();
        assert_eq!(exec.calls(), plan);
        assert!(steps.iter().all(|s| s.status == StepStatus::Done && s.millis == 5), "{steps:?}");
        let p = store.load().unwrap().unwrap();
        assert_eq!(p.done.len(), plan.len());
        assert_eq!(p.epochs, std::collections::BTreeMap::from([("db".into(), 2), ("www".into(), 3)]));
        let events = sink.0.lock().clone();
        assert_eq!(events.len(), 2 * plan.len());
        assert!(events.iter().all(|e| e.kind == "failover-step"));
        assert_eq!(events[1].millis, Some(5));
        assert_eq!(events[1].time_us, 1_005_000);
        assert_eq!((events[0].step.as_deref(), events[0].job.as_deref()), (Some("fence"), Some("db")));
        // Run again: everything is skipped, nothing is done twice.
        let again = Fake::new(&clock, None);
        let (r, steps) = run_once(RunKind::Failover, &plan, &again, &store, &sink, &clock).await;
        r.unwrap();
        assert!(again.calls().is_empty());
        assert!(steps.iter().all(|s| s.status == StepStatus::Skipped));
    }

    /// A run that stops at step k, then a rerun: the rerun does exactly the steps from k on.
    async fn stop_and_rerun_at_every_step(kind: RunKind, plan: Vec<Work>) {
        for k in 0..plan.len() {
            let clock = VirtualClock::at(0);
            let (store, sink) = (MemStore::default(), Sink::default());
            let first = Fake::new(&clock, Some(k));
            let (r, _) = run_once(kind, &plan, &first, &store, &sink, &clock).await;
            let Err(FailoverError::Step { step, error }) = r else { panic!("step {k}: {r:?}") };
            assert_eq!(step, plan[k].label());
            assert!(error.to_string().contains("exit status: 3") && error.to_string().contains("no such VM"));
            assert_eq!(first.calls(), plan[..=k], "step {k}: the run stops at the failing step");
            let saved = store.load().unwrap().unwrap();
            assert!(saved.failed.as_deref().is_some_and(|f| f.contains("no such VM")), "{saved:?}");
            let kinds: Vec<String> = sink.0.lock().iter().map(|e| e.kind.clone()).collect();
            assert_eq!(kinds.last().map(String::as_str), Some(format!("{kind}-failed").as_str()));

            let second = Fake::new(&clock, None);
            let (r, steps) = run_once(kind, &plan, &second, &store, &sink, &clock).await;
            r.unwrap();
            // Keyless steps (the final sync) are repeated; recorded ones never.
            let redone: Vec<Work> = plan[..k]
                .iter()
                .filter(|w| w.key().is_none())
                .cloned()
                .chain(plan[k..].iter().cloned())
                .collect();
            assert_eq!(second.calls(), redone, "step {k}");
            let skipped = steps.iter().filter(|s| s.status == StepStatus::Skipped).count();
            assert_eq!(skipped, plan[..k].iter().filter(|w| w.key().is_some()).count(), "step {k}");
        }
    }

    #[tokio::test]
    async fn a_failover_stopped_between_any_two_steps_goes_on_where_it_stopped() {
        stop_and_rerun_at_every_step(RunKind::Failover, failover_plan(&policy(), &jobs())).await;
    }

    #[tokio::test]
    async fn a_failback_stopped_between_any_two_steps_goes_on_where_it_stopped() {
        let fb: Vec<FailbackJob> =
            jobs().into_iter().map(|job| FailbackJob { job, streaming: true }).collect();
        stop_and_rerun_at_every_step(
            RunKind::Failback,
            failback_plan(&policy(), &fb, &Progress::default(), true),
        )
        .await;
    }

    #[tokio::test]
    async fn a_skipped_fence_records_the_replicas_epoch_without_bumping_it() {
        let clock = VirtualClock::at(0);
        let (store, sink) = (MemStore::default(), Sink::default());
        let mut p = Progress::default();
        p.done.insert(StepKey::Fence("www".into()));
        store.save(&p).unwrap();
        let exec = Fake::new(&clock, None);
        *exec.epoch.lock() = 7;
        let plan = vec![Work::Fence { job: "www".into() }];
        let (r, steps) = run_once(RunKind::Failover, &plan, &exec, &store, &sink, &clock).await;
        r.unwrap();
        assert!(exec.calls().is_empty(), "the epoch is not bumped twice");
        assert_eq!(steps[0].status, StepStatus::Skipped);
        assert_eq!(store.load().unwrap().unwrap().epochs["www"], 7);
    }
}
