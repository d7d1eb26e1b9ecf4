//! The [`Manager`]: failover and failback for every source of one target.
//!
//! It owns the monitor (see [`crate::monitor`]), runs failovers and failback cutovers step by
//! step (see [`crate::steps`]), one at a time per source, and takes the connections of
//! sources that ask for their jobs back (it is the target's
//! [`FailbackHandler`](doppel_target::FailbackHandler)).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use doppel_proto::Refusal;
use doppel_target::{FailbackHandler, Stream, Target};
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

use crate::clock::{Clock, SystemClock};
use crate::events::{Event, EventLog};
use crate::monitor::Watch;
use crate::policy::{Policy, SourcePolicy};
use crate::reverse::ReverseJob;
use crate::verdict::{self, Verdict};

/// Why a failover or failback could not complete.
#[derive(Debug, thiserror::Error)]
pub enum FailoverError {
    /// Not a source this target knows.
    #[error("unknown source {0:?}")]
    UnknownSource(String),
    /// The source has no replicas here (or not the job asked for).
    #[error("{0}")]
    NoReplica(String),
    /// A step failed; running the command again continues from this step.
    #[error(
        "step {step} failed: {error}\n(fix the cause and run the command again: completed steps are not repeated)"
    )]
    Step {
        /// The step.
        step: String,
        /// Why.
        error: crate::runner::StepError,
    },
    /// A failback cutover cannot start yet.
    #[error("{0}")]
    NotReady(String),
    /// Saving progress.
    #[error("cannot record progress in {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Settings shared by every source.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// The target's data directory.
    pub data: PathBuf,
    /// Longest time one script may run.
    pub script_timeout: Duration,
    /// Longest time the final sync of a failback cutover may take.
    pub cutover_timeout: Duration,
    /// When the notify command hears of lag, disconnects and quotas.
    pub alerts: crate::alerts::AlertTiming,
}

impl ManagerConfig {
    /// Defaults for `data`.
    pub fn new(data: &Path) -> ManagerConfig {
        ManagerConfig {
            data: data.to_path_buf(),
            script_timeout: Duration::from_secs(600),
            cutover_timeout: Duration::from_secs(600),
            alerts: crate::alerts::AlertTiming::default(),
        }
    }
}

/// A failover or a failback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunKind {
    /// Taking the workload over on the replica.
    Failover,
    /// Handing it back to its source.
    Failback,
}

impl RunKind {
    /// `failover` or `failback`.
    pub fn as_str(self) -> &'static str {
        match self {
            RunKind::Failover => "failover",
            RunKind::Failback => "failback",
        }
    }

    /// The state a source shows while a run of this kind goes on.
    pub fn state(self) -> SourceState {
        match self {
            RunKind::Failover => SourceState::FailingOver,
            RunKind::Failback => SourceState::FailingBack,
        }
    }
}

impl std::fmt::Display for RunKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// A source's state as `doppel status` shows it (in these kebab-case words).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceState {
    /// No replica of it here.
    NeverSeen,
    /// Heard from within the last interval.
    Alive,
    /// Its agents stopped cleanly: no failover by itself.
    Stopped,
    /// The link missed a check (probes may still answer).
    Silent,
    /// The link and every probe missed the threshold.
    Failed,
    /// A failover runs.
    FailingOver,
    /// The workload runs on the replica.
    FailedOver,
    /// A failback cutover runs.
    FailingBack,
}

/// What `doppel status` shows about a source on the target.
#[derive(Debug, Clone, Serialize)]
pub struct SourceStatus {
    /// The source.
    pub source: String,
    /// `auto` or `manual`.
    pub policy: Policy,
    /// `never-seen`, `alive`, `stopped` (its agents stopped cleanly: no failover by itself),
    /// `silent` (the link missed a check; probes may still answer),
    /// `failed`, `failing-over`, `failed-over`, `failing-back`.
    pub state: SourceState,
    /// Seconds since the source was last heard from.
    pub silent_secs: f64,
    /// Seconds until the source counts as failed (and, with the `auto` policy, fails over),
    /// while it is silent and no probe answers.
    pub failover_in_secs: Option<f64>,
    /// Checks missed in a row, and the threshold.
    pub missed: u32,
    /// See [`SourcePolicy::missed`].
    pub threshold: u32,
    /// The last error of a failover or failback, until one succeeds.
    pub error: Option<String>,
    /// Jobs.
    pub jobs: Vec<JobFailoverStatus>,
}

/// One job's part of [`SourceStatus`].
#[derive(Debug, Clone, Serialize)]
pub struct JobFailoverStatus {
    /// The job.
    pub job: String,
    /// The workload runs on the replica.
    pub failed_over: bool,
    /// The replica's epoch.
    pub epoch: u64,
    /// The failback stream, while one runs.
    pub failback: Option<FailbackStatus>,
}

/// A running failback stream.
#[derive(Debug, Clone, Serialize)]
pub struct FailbackStatus {
    /// The sending job's state (`mirroring`, `replicating`...).
    pub state: String,
    /// The source is connected.
    pub connected: bool,
    /// Bytes sent to the source.
    pub bytes_sent: u64,
    /// Bytes not yet applied by the source.
    pub pending_bytes: u64,
    /// Bytes of the replica read to compare it with the source.
    pub bytes_hashed: u64,
}

/// Failover and failback for every source of one target.
pub struct Manager {
    pub(crate) target: Arc<Target>,
    pub(crate) config: ManagerConfig,
    policies: RwLock<Arc<HashMap<String, SourcePolicy>>>,
    pub(crate) events: EventLog,
    /// When the manager started: a source not heard from since is given the full threshold.
    pub(crate) started_us: u64,
    /// The time decisions are made on.
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) watches: Mutex<HashMap<String, Watch>>,
    /// One failover or failback at a time per source.
    pub(crate) ops: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    pub(crate) reverse: Mutex<HashMap<(String, String), Arc<ReverseJob>>>,
    /// Running test failovers, by source.
    pub(crate) tests: Mutex<HashMap<String, crate::rehearsal::Rehearsal>>,
    /// What the notify command was told of lag, disconnects and quotas.
    pub(crate) alerts: Mutex<crate::alerts::Alerts>,
    pub(crate) me: Weak<Manager>,
}

impl Manager {
    /// A manager for `target`'s sources; those without a policy get [`SourcePolicy::manual`].
    /// Installs itself as the target's failback handler.
    pub fn new(target: Arc<Target>, config: ManagerConfig, policies: Vec<SourcePolicy>) -> Arc<Manager> {
        Manager::with_clock(target, config, policies, Arc::new(SystemClock))
    }

    /// [`Manager::new`], on `clock`.
    pub fn with_clock(
        target: Arc<Target>,
        config: ManagerConfig,
        policies: Vec<SourcePolicy>,
        clock: Arc<dyn Clock>,
    ) -> Arc<Manager> {
        let by_name = Self::by_name(&target, policies);
        let events = EventLog::new(&config.data.join("events.jsonl"));
        let alerts = Mutex::new(crate::alerts::Alerts::new(config.alerts));
        let m = Arc::new_cyclic(|me| Manager {
            target: target.clone(),
            config,
            policies: RwLock::new(Arc::new(by_name)),
            events,
            started_us: clock.now_us(),
            clock,
            watches: Mutex::default(),
            ops: Mutex::default(),
            reverse: Mutex::default(),
            tests: Mutex::default(),
            alerts,
            me: me.clone(),
        });
        target.set_failback_handler(m.clone());
        m
    }

    /// The target the manager works for.
    pub fn target(&self) -> &Arc<Target> {
        &self.target
    }

    /// The event log.
    pub fn events(&self) -> &EventLog {
        &self.events
    }

    /// Policies by source name: every allowed source has one ([`SourcePolicy::manual`] if the
    /// configuration gives none).
    fn by_name(target: &Target, policies: Vec<SourcePolicy>) -> HashMap<String, SourcePolicy> {
        let mut by_name: HashMap<String, SourcePolicy> =
            policies.into_iter().map(|p| (p.name.clone(), p)).collect();
        for a in target.allowed().iter() {
            by_name.entry(a.name.clone()).or_insert_with(|| SourcePolicy::manual(&a.name));
        }
        by_name
    }

    /// The policies now.
    pub(crate) fn policies(&self) -> Arc<HashMap<String, SourcePolicy>> {
        self.policies.read().clone()
    }

    /// Replaces the policies (a configuration reload, after the target's allowed sources were
    /// replaced). A source whose monitoring rules changed is watched afresh under the new ones;
    /// a failover or failback under way finishes under the policy it started with.
    pub fn reload(&self, policies: Vec<SourcePolicy>) {
        let new = Arc::new(Self::by_name(&self.target, policies));
        let old = std::mem::replace(&mut *self.policies.write(), new.clone());
        self.watches.lock().retain(|name, _| {
            matches!((old.get(name), new.get(name)), (Some(a), Some(b)) if verdict::Rules::of(a) == verdict::Rules::of(b))
        });
    }

    /// The policy of `source`.
    pub fn policy(&self, source: &str) -> Result<SourcePolicy, FailoverError> {
        self.policies().get(source).cloned().ok_or_else(|| FailoverError::UnknownSource(source.to_string()))
    }

    pub(crate) fn op_lock(&self, source: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.ops.lock().entry(source.to_string()).or_default().clone()
    }

    /// A fresh watch of `source`, counting from the manager's start.
    pub(crate) fn new_watch(&self, source: &str) -> Watch {
        let rules = match self.policies().get(source) {
            Some(p) => verdict::Rules::of(p),
            None => verdict::Rules::of(&SourcePolicy::manual(source)),
        };
        Watch { verdict: verdict::Watch::new(rules, self.started_us), running: None, error: None }
    }

    /// The replica's checkpoint: (epoch, failed over).
    pub(crate) fn replica_state(&self, source: &str, job: &str) -> (u64, bool) {
        match self.target.checkpoint(source, job) {
            Ok(Some(c)) => (c.epoch, c.failed_over),
            _ => (0, false),
        }
    }

    /// The replica tree of `job`.
    pub(crate) fn replica_path(&self, source: &str, job: &str) -> PathBuf {
        self.target.config.layout.paths(source, job).0
    }

    pub(crate) fn reverse_job(&self, source: &str, job: &str) -> Option<Arc<ReverseJob>> {
        self.reverse.lock().get(&(source.to_string(), job.to_string())).cloned()
    }

    /// Runs the notify command of `source` (if any) for `event`, without waiting for it.
    pub(crate) fn notify(&self, source: &str, event: &str, detail: &str) {
        let Some(cmd) = self.policies().get(source).and_then(|p| p.notify.clone()) else { return };
        let env = vec![
            ("DOPPEL_SOURCE".to_string(), source.to_string()),
            ("DOPPEL_EVENT".to_string(), event.to_string()),
            ("DOPPEL_DETAIL".to_string(), detail.to_string()),
        ];
        let limit = self.config.script_timeout;
        let source = source.to_string();
        let event = event.to_string();
        let me = self.me.clone();
        tokio::spawn(async move {
            let r = crate::hooks::run_script(&cmd, &env, limit).await;
            if let Some(m) = me.upgrade() {
                let e = Event::new(&source, "notify").detail(match &r {
                    Ok(()) => format!("{event}: notified"),
                    Err(e) => format!("{event}: notify command failed: {e}"),
                });
                m.events.record(e);
            }
        });
    }

    /// Status of every source.
    pub fn status(&self) -> Vec<SourceStatus> {
        let policies = self.policies();
        let mut pols: Vec<&SourcePolicy> = policies.values().collect();
        pols.sort_by(|a, b| a.name.cmp(&b.name));
        pols.into_iter().map(|p| self.source_status(p)).collect()
    }

    fn source_status(&self, pol: &SourcePolicy) -> SourceStatus {
        let source = pol.name.as_str();
        let now = self.clock.now_us();
        let jobs: Vec<JobFailoverStatus> = self
            .target
            .jobs_of(source)
            .into_iter()
            .map(|job| {
                let (epoch, failed_over) = self.replica_state(source, &job);
                let failback = self.reverse_job(source, &job).map(|r| {
                    let s = r.snapshot();
                    FailbackStatus {
                        state: s.state,
                        connected: s.connected,
                        bytes_sent: s.bytes_sent,
                        pending_bytes: s.pending_bytes,
                        bytes_hashed: s.bytes_hashed,
                    }
                });
                JobFailoverStatus { job, failed_over, epoch, failback }
            })
            .collect();
        let seen = self.target.last_seen_us(source);
        let (running, error, view) = {
            let mut watches = self.watches.lock();
            let w = watches.entry(source.to_string()).or_insert_with(|| self.new_watch(source));
            w.verdict.heard(seen);
            (w.running, w.error.clone(), w.verdict.view(now))
        };
        let state = if let Some(run) = running {
            run.state()
        } else if jobs.is_empty() {
            SourceState::NeverSeen
        } else if jobs.iter().any(|j| j.failed_over) {
            SourceState::FailedOver
        } else if self.target.source_stopped(source) {
            SourceState::Stopped
        } else {
            match view.verdict {
                Verdict::Alive => SourceState::Alive,
                Verdict::Silent | Verdict::Suspect => SourceState::Silent,
                Verdict::Failed => SourceState::Failed,
                Verdict::Stopped => SourceState::Stopped,
            }
        };
        let countdown = view.countdown_us.filter(|_| state == SourceState::Silent);
        SourceStatus {
            source: source.to_string(),
            policy: pol.policy,
            state,
            silent_secs: now.saturating_sub(self.last_heard_us(source)) as f64 / 1e6,
            failover_in_secs: countdown.map(|us| us as f64 / 1e6),
            missed: view.missed,
            threshold: pol.missed,
            error,
            jobs,
        }
    }
}

impl FailbackHandler for Manager {
    fn accept(
        &self,
        source: &str,
        job: &str,
        stream: Box<dyn Stream>,
    ) -> Result<(), (Refusal, Box<dyn Stream>)> {
        if !self.target.jobs_of(source).iter().any(|j| j == job) || !self.replica_state(source, job).1 {
            // The name as the peer sent it, bounded: it has not been checked.
            return Err((Refusal::NotFailedOver { job: doppel_proto::truncated(job) }, stream));
        }
        if let Some(r) = self.reverse_job(source, job).filter(|r| !r.finished()) {
            return r.offer(stream).map_err(|s| (Refusal::Busy, s));
        }
        // Starting the sending job opens its watch and spool: off the session's task.
        let me = self.me.upgrade().expect("the manager outlives its target's sessions");
        let (source, job) = (source.to_string(), job.to_string());
        tokio::spawn(async move {
            let replica = me.replica_path(&source, &job);
            let home = me.config.data.join("failback").join(&source);
            let (s, j) = (source.clone(), job.clone());
            let limit = me.policies().get(&source).map_or(0, |p| p.failback_limit);
            let started =
                tokio::task::spawn_blocking(move || ReverseJob::start(&s, &j, &replica, &home, limit)).await;
            let r = match started {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    let reason = format!("cannot start the failback of {job}: {e}");
                    me.events.record(Event::new(&source, "failback-error").job(&job).detail(reason.clone()));
                    doppel_target::refuse_stream(stream, Refusal::Other { reason }).await;
                    return;
                }
                Err(e) => {
                    doppel_target::refuse_stream(stream, Refusal::Other { reason: e.to_string() }).await;
                    return;
                }
            };
            me.events.record(
                Event::new(&source, "failback-connected")
                    .job(&job)
                    .detail("streaming the replica back to its source"),
            );
            me.reverse.lock().insert((source, job), r.clone());
            if let Err(s) = r.offer(stream) {
                doppel_target::refuse_stream(s, Refusal::Busy).await;
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `doppel status --json` shows these words; scripts read them.
    #[test]
    fn states_and_policies_serialise_to_the_words_status_always_showed() {
        let words = [
            (SourceState::NeverSeen, "never-seen"),
            (SourceState::Alive, "alive"),
            (SourceState::Stopped, "stopped"),
            (SourceState::Silent, "silent"),
            (SourceState::Failed, "failed"),
            (SourceState::FailingOver, "failing-over"),
            (SourceState::FailedOver, "failed-over"),
            (SourceState::FailingBack, "failing-back"),
        ];
        for (state, word) in words {
            assert_eq!(serde_json::to_value(state).unwrap(), word);
        }
        assert_eq!(serde_json::to_value(Policy::Auto).unwrap(), "auto");
        assert_eq!(serde_json::to_value(Policy::Manual).unwrap(), "manual");
        assert_eq!(serde_json::to_value(RunKind::Failback).unwrap(), "failback");
        assert_eq!(RunKind::Failover.state(), SourceState::FailingOver);
    }
}
