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

use std::sync::Arc;
use std::time::Duration;

use crate::events::Event;
use crate::manager::Manager;
use crate::policy::{Policy, SourcePolicy};

/// What the monitor knows about one source.
#[derive(Debug, Clone, Default)]
pub struct Watch {
    /// Checks missed in a row (the smaller of the link's and the probes' counts).
    pub missed: u32,
    /// Checks the link alone missed (the source is silent, whatever the probes say).
    pub link_missed: u32,
    /// Failures in a row of each probe.
    pub probe_fails: Vec<u32>,
    /// Some probe answered at the last check: the source lives, whatever its link says.
    pub probe_answered: bool,
    /// When the probes run next (microseconds since the epoch).
    pub next_probe_us: u64,
    /// The source counts as failed (until it is heard from again).
    pub failed: bool,
    /// A failover or failback running (`failing-over`, `failing-back`).
    pub running: Option<String>,
    /// The last failover or failback error.
    pub error: Option<String>,
    /// Silence counts from here at the earliest (microseconds since the epoch): the end of a
    /// failover or failback, whose connections do not count as the source being heard from.
    pub baseline_us: u64,
}

impl Watch {
    /// Seconds until the threshold is reached, given `silent_secs` of link silence; none while
    /// a probe answers (the countdown would not move).
    pub fn remaining_secs(&self, p: &SourcePolicy, silent_secs: f64) -> Option<f64> {
        if self.probe_answered {
            return None;
        }
        let interval = p.interval.as_secs_f64();
        let link = interval * p.missed as f64 - silent_secs;
        let probes = self
            .probe_fails
            .iter()
            .map(|f| p.missed.saturating_sub(*f) as f64 * interval)
            .fold(0.0, f64::max);
        Some(link.max(probes).max(0.0))
    }
}

impl Manager {
    /// When `source` was last heard from, as far as the monitor is concerned: never before
    /// the manager started.
    pub(crate) fn last_heard_us(&self, source: &str) -> u64 {
        self.target.last_seen_us(source).max(self.started_us)
    }

    /// Watches every source until the target shuts down.
    pub async fn run(self: Arc<Self>) {
        let tick = self.policies.values().map(|p| p.interval).min().unwrap_or(Duration::from_secs(1));
        let tick = tick.min(Duration::from_secs(1)).max(Duration::from_millis(100));
        let mut timer = tokio::time::interval(tick);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.target.shutdown.cancelled() => break,
                _ = timer.tick() => {}
            }
            let mut names: Vec<String> = self.policies.keys().cloned().collect();
            names.sort();
            for name in names {
                self.check(&name).await;
            }
        }
        let reverse: Vec<_> =
            self.reverse.lock().unwrap_or_else(|p| p.into_inner()).drain().map(|(_, r)| r).collect();
        for r in reverse {
            let _ = r.stop().await;
        }
    }

    async fn check(self: &Arc<Self>, source: &str) {
        let pol = self.policies[source].clone();
        let jobs = self.target.jobs_of(source);
        let busy = self
            .watches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(source)
            .is_some_and(|w| w.running.is_some());
        let failed_over = jobs.iter().any(|j| self.replica_state(source, j).1);
        let now = doppel_link::framed::now_us();
        // A source whose agent said goodbye was stopped on purpose: no countdown until it is
        // back (a crash, a pulled cable or a dead machine says nothing).
        let stopped = self.target.source_stopped(source);
        if jobs.is_empty() || busy || failed_over || stopped {
            let mut watches = self.watches.lock().unwrap_or_else(|p| p.into_inner());
            let w = watches.entry(source.to_string()).or_default();
            w.missed = 0;
            w.link_missed = 0;
            w.probe_fails.clear();
            w.failed = false;
            w.baseline_us = now;
            return;
        }
        let baseline =
            self.watches.lock().unwrap_or_else(|p| p.into_inner()).get(source).map_or(0, |w| w.baseline_us);
        let seen = self.last_heard_us(source).max(baseline);
        let silent_us = now.saturating_sub(seen);
        let interval_us = pol.interval.as_micros().max(1) as u64;
        let link_missed = (silent_us / interval_us).min(u32::MAX as u64) as u32;
        let run_probes = {
            let mut watches = self.watches.lock().unwrap_or_else(|p| p.into_inner());
            let w = watches.entry(source.to_string()).or_default();
            if w.probe_fails.len() != pol.probes.len() {
                w.probe_fails = vec![0; pol.probes.len()];
            }
            w.link_missed = link_missed;
            if link_missed == 0 {
                w.probe_fails.iter_mut().for_each(|f| *f = 0);
                w.probe_answered = false;
                w.next_probe_us = 0;
                if w.failed {
                    w.failed = false;
                    drop(watches);
                    self.events.record(Event::new(source, "source-back").detail("heard from again"));
                    return;
                }
                w.missed = 0;
                return;
            }
            let due = !pol.probes.is_empty() && now >= w.next_probe_us;
            if due {
                w.next_probe_us = now + interval_us;
            }
            due
        };
        if run_probes {
            let mut set = tokio::task::JoinSet::new();
            for (i, p) in pol.probes.iter().enumerate() {
                let p = p.clone();
                set.spawn(async move { (i, crate::probe::alive(&p).await) });
            }
            let results = set.join_all().await;
            let mut watches = self.watches.lock().unwrap_or_else(|p| p.into_inner());
            let w = watches.entry(source.to_string()).or_default();
            w.probe_answered = results.iter().any(|(_, alive)| *alive);
            for (i, alive) in results {
                if let Some(f) = w.probe_fails.get_mut(i) {
                    *f = if alive { 0 } else { f.saturating_add(1) };
                }
            }
        }
        let newly_failed = {
            let mut watches = self.watches.lock().unwrap_or_else(|p| p.into_inner());
            let w = watches.entry(source.to_string()).or_default();
            w.missed = w.probe_fails.iter().copied().fold(link_missed, u32::min);
            let reached = w.missed >= pol.missed;
            let newly = reached && !w.failed;
            if newly {
                w.failed = true;
                if pol.policy == Policy::Auto {
                    w.running = Some("failing-over".into());
                }
            }
            newly
        };
        if !newly_failed {
            return;
        }
        let detail = format!(
            "silent for {:.1} s ({} checks of {:?} missed){}",
            silent_us as f64 / 1e6,
            link_missed,
            pol.interval,
            if pol.probes.is_empty() {
                String::new()
            } else {
                format!("; {} probes failing too", pol.probes.len())
            }
        );
        self.events.record(Event::new(source, "source-failed").detail(detail.clone()));
        self.notify(source, "source-failed", &detail);
        match pol.policy {
            Policy::Manual => self.events.record(
                Event::new(source, "failover-needed")
                    .detail(format!("manual policy: run `doppel failover {source}` to fail over")),
            ),
            Policy::Auto => {
                let me = self.clone();
                let source = source.to_string();
                tokio::spawn(async move {
                    let cause = format!("auto: {detail}");
                    let r = me.failover_locked(&source, None, &cause, Some(seen)).await;
                    if let Err(e) = r {
                        tracing::error!(%source, error = %e, "automatic failover failed");
                    }
                });
            }
        }
    }
}
