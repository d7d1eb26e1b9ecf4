//! The monitor: is each source alive?
//!
//! The link is the first witness: every frame a source sends (ops, acks requests,
//! heartbeats) refreshes its "last seen" time, so a source that is silent for `interval` has
//! missed a check, and one silent for `interval × missed` has missed the threshold. A link can
//! die while the source lives (a cut cable between sites), so the probes are the second
//! witness: checked every `interval` while the link is silent, each counts its failures in a
//! row, and the source counts as failed only when the link and every probe have missed the
//! threshold. Checks run every second (or every interval, if shorter), so the countdown
//! `doppel status` shows is accurate to about a second.
//!
//! Only sources that have replicas here are watched: one never seen has nothing to fail over.
//! Nor is a source whose agents all stopped cleanly (they said goodbye; the target keeps that
//! on disk): maintenance is not a disaster. Probes do not change that; an operator who must
//! fail over a stopped source runs `doppel failover`.
//! A target that starts while a source is down gives it the whole threshold from its own
//! start.
//!
//! The rules live in [`crate::verdict`], a state machine without I/O; this is the shell that
//! feeds it what the target observes, runs the probes it asks for, and acts on its verdicts.

use std::sync::Arc;
use std::time::Duration;

use crate::events::Event;
use crate::manager::{Manager, RunKind};
use crate::verdict::{self, Action, Decision, Failure};

/// What the monitor knows about one source.
#[derive(Debug, Clone)]
pub struct Watch {
    /// The verdict's state.
    pub verdict: verdict::Watch,
    /// A failover or failback running.
    pub running: Option<RunKind>,
    /// The last failover or failback error.
    pub error: Option<String>,
}

impl Manager {
    /// When `source` was last heard from, as far as the monitor is concerned: never before
    /// the manager started.
    pub(crate) fn last_heard_us(&self, source: &str) -> u64 {
        self.target.last_seen_us(source).max(self.started_us)
    }

    /// Watches every source until the target shuts down.
    pub async fn run(self: Arc<Self>) {
        let tick = self.policies().values().map(|p| p.interval).min().unwrap_or(Duration::from_secs(1));
        let tick = tick.min(Duration::from_secs(1)).max(Duration::from_millis(100));
        let mut timer = tokio::time::interval(tick);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.target.shutdown.cancelled() => break,
                _ = timer.tick() => {}
            }
            let mut names: Vec<String> = self.policies().keys().cloned().collect();
            names.sort();
            for name in names {
                self.check(&name).await;
                self.alert(&name);
            }
        }
        let reverse: Vec<_> = self.reverse.lock().drain().map(|(_, r)| r).collect();
        for r in reverse {
            let _ = r.stop().await;
        }
    }

    /// Feeds the notices' state machine what the target sees of `source` (lag past its RPO, a
    /// replica disconnected without a clean stop, its quota reached) and sends the notices.
    fn alert(&self, source: &str) {
        use crate::alerts::Condition;
        let Some(pol) = self.policies().get(source).cloned() else { return };
        if pol.notify.is_none() {
            return;
        }
        let now = self.clock.now_us();
        let replicas: Vec<_> =
            self.target.jobs_of(source).iter().map(|j| self.target.slot(source, j).snapshot()).collect();
        let gone: Vec<&str> = replicas.iter().filter(|r| !r.connected).map(|r| r.job.as_str()).collect();
        let disconnected = !gone.is_empty()
            && self.target.last_seen_us(source) > 0
            && !self.target.source_stopped(source)
            && self.watched(source);
        let worst =
            replicas.iter().filter(|r| r.connected).filter_map(|r| r.apply_lag_seconds).fold(0.0, f64::max);
        let late = pol.rpo.is_some_and(|rpo| worst > rpo.as_secs_f64());
        let quota = self.target.over_quota(source);
        let conditions = [
            (Condition::Disconnected, disconnected, format!("jobs not connected: {}", gone.join(", "))),
            (
                Condition::Lag,
                late,
                format!("replication lag {worst:.1} s, above the RPO of {:?}", pol.rpo.unwrap_or_default()),
            ),
            (Condition::OverQuota, quota.is_some(), quota.unwrap_or_default()),
        ];
        for (condition, holds, detail) in conditions {
            let notice = self.alerts.lock().observe(now, source, condition, holds);
            if let Some(n) = notice {
                let detail = if n.raised { detail } else { String::new() };
                self.events.record(Event::new(source, n.event).detail(detail.clone()));
                self.notify(source, n.event, &detail);
            }
        }
    }

    /// Whether `source` is watched now: it has replicas here, none failed over.
    fn watched(&self, source: &str) -> bool {
        let jobs = self.target.jobs_of(source);
        !jobs.is_empty() && !jobs.iter().any(|j| self.replica_state(source, j).1)
    }

    /// One check of `source`: feeds the verdict what the target saw, runs the probes it asks
    /// for, and acts on what it says.
    async fn check(self: &Arc<Self>, source: &str) {
        let watched = self.watched(source);
        let stopped = self.target.source_stopped(source);
        let seen = self.target.last_seen_us(source);
        let now = self.clock.now_us();
        let action = self.with_watch(source, |w| {
            if w.running.is_some() || !watched {
                w.verdict.hold(now);
                return Action::None;
            }
            w.verdict.set_stopped(stopped);
            w.verdict.heard(seen);
            w.verdict.tick(now)
        });
        let action = match action {
            Action::RunProbes => {
                let alive = self.run_probes(source).await;
                let now = self.clock.now_us();
                self.with_watch(source, |w| w.verdict.probed(now, &alive))
            }
            a => a,
        };
        match action {
            Action::None | Action::RunProbes => {}
            Action::Back => {
                self.events.record(Event::new(source, "source-back").detail("heard from again"));
            }
            Action::Failed(f) => self.failed(source, f),
        }
    }

    fn with_watch<R>(&self, source: &str, f: impl FnOnce(&mut Watch) -> R) -> R {
        let mut watches = self.watches.lock();
        let w = watches.entry(source.to_string()).or_insert_with(|| self.new_watch(source));
        f(w)
    }

    /// Every probe of `source`, at once: whether each says the source is alive.
    async fn run_probes(&self, source: &str) -> Vec<bool> {
        let probes = self.policies().get(source).map(|p| p.probes.clone()).unwrap_or_default();
        let mut alive = vec![false; probes.len()];
        let mut set = tokio::task::JoinSet::new();
        for (i, p) in probes.into_iter().enumerate() {
            set.spawn(async move { (i, crate::probe::alive(&p).await) });
        }
        for (i, a) in set.join_all().await {
            alive[i] = a;
        }
        alive
    }

    /// `source` has just become failed: alert, and fail it over under the `auto` policy.
    fn failed(self: &Arc<Self>, source: &str, f: Failure) {
        let policies = self.policies();
        let Some(pol) = policies.get(source) else { return };
        let detail = format!(
            "silent for {:.1} s ({} checks of {:?} missed){}",
            f.silent_us as f64 / 1e6,
            f.link_missed,
            pol.interval,
            if pol.probes.is_empty() {
                String::new()
            } else {
                format!("; {} probes failing too", pol.probes.len())
            }
        );
        self.events.record(Event::new(source, "source-failed").detail(detail.clone()));
        self.notify(source, "source-failed", &detail);
        match f.decision {
            Decision::Alert => self.events.record(
                Event::new(source, "failover-needed")
                    .detail(format!("manual policy: run `doppel failover {source}` to fail over")),
            ),
            Decision::FailOver => {
                // Shown at once, and no second check starts another.
                self.with_watch(source, |w| w.running = Some(RunKind::Failover));
                let me = self.clone();
                let source = source.to_string();
                tokio::spawn(async move {
                    let cause = format!("auto: {detail}");
                    let r =
                        me.failover_locked(&source, None, &cause, Some(f.since_us), Default::default()).await;
                    if let Err(e) = r {
                        tracing::error!(%source, error = %e, "automatic failover failed");
                    }
                });
            }
        }
    }
}
