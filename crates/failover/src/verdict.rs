//! The monitor's verdict on one source: a state machine without I/O.
//!
//! [`Watch`] is fed what the monitor observes (link frames, probe results, ticks of the
//! clock, a clean stop) with the time of each, and says what the source is
//! ([`Watch::view`]) and what to do ([`Action`]). The rules (see `docs/architecture.md`,
//! "Failover and failback" › Monitor):
//!
//! - every interval of link silence is a missed check; while the link is silent each probe
//!   runs once per interval and counts its failures in a row;
//! - the source is **failed** when the link *and* every probe have missed `missed` checks in
//!   a row: a cut between the sites alone must not start a second copy of the workload;
//! - a silent link with an answering probe is **silent** with no countdown (it would not
//!   move); without an answering probe it is **suspect**, with the time left;
//! - silence never counts from before the target started (a target that starts while a
//!   source is down gives it the whole threshold) nor from before the end of the last
//!   failover or failback;
//! - a source whose agents stopped cleanly is **stopped** and never fails by itself;
//! - a failed source fails over by itself under the `auto` policy; under `manual` the
//!   operator is alerted.
//!
//! Times are microseconds since the Unix epoch, passed in by the caller: tests run the rules
//! on virtual time.

use crate::policy::{Policy, SourcePolicy};

/// The parts of a [`SourcePolicy`] the verdict depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    /// The check interval, in microseconds (at least 1).
    pub interval_us: u64,
    /// Checks in a row that make the source failed.
    pub missed: u32,
    /// How many probes the source has.
    pub probes: usize,
    /// What a failed source leads to.
    pub policy: Policy,
}

impl Rules {
    /// The rules of `p`.
    pub fn of(p: &SourcePolicy) -> Rules {
        Rules {
            interval_us: (p.interval.as_micros() as u64).max(1),
            missed: p.missed,
            probes: p.probes.len(),
            policy: p.policy,
        }
    }
}

/// What the monitor makes of a source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Heard from within the last interval.
    Alive,
    /// The link missed a check but a probe answers: the source lives; no countdown.
    Silent,
    /// The link missed a check and no probe answers (yet): counting down to failed.
    Suspect,
    /// The link and every probe missed the threshold.
    Failed,
    /// Its agents stopped cleanly: maintenance, not a disaster; never failed by itself.
    Stopped,
}

/// What the shell must do after an input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing.
    None,
    /// Run every probe now and report with [`Watch::probed`].
    RunProbes,
    /// The source has just become failed.
    Failed(Failure),
    /// A failed source was heard from again.
    Back,
}

/// What to do about a source that has just failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Fail it over (policy `auto`).
    FailOver,
    /// Alert the operator, who runs `doppel failover` (policy `manual`).
    Alert,
}

/// A source that has just become failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failure {
    /// What to do about it.
    pub decision: Decision,
    /// Where its silence was counted from (its last sign of life, or a later baseline).
    pub since_us: u64,
    /// How long it has been silent.
    pub silent_us: u64,
    /// Checks its link missed.
    pub link_missed: u32,
}

/// The monitor's view of a source at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View {
    /// The verdict.
    pub verdict: Verdict,
    /// Microseconds until the source counts as failed; only while [`Verdict::Suspect`].
    pub countdown_us: Option<u64>,
    /// Checks missed in a row (the smaller of the link's and the probes' counts).
    pub missed: u32,
    /// Microseconds since the source was last heard from (or since the target started).
    pub silent_us: u64,
}

/// The monitor's state for one source.
#[derive(Debug, Clone)]
pub struct Watch {
    rules: Rules,
    /// The last link frame, never before the target started.
    heard_us: u64,
    /// Silence counts from here at the earliest.
    baseline_us: u64,
    link_missed: u32,
    probe_fails: Vec<u32>,
    probe_answered: bool,
    next_probe_us: u64,
    missed: u32,
    failed: bool,
    stopped: bool,
}

impl Watch {
    /// A source watched by a target that started at `started_us`: silence counts from then
    /// at the earliest.
    pub fn new(rules: Rules, started_us: u64) -> Watch {
        Watch {
            rules,
            heard_us: started_us,
            baseline_us: started_us,
            link_missed: 0,
            probe_fails: vec![0; rules.probes],
            probe_answered: false,
            next_probe_us: 0,
            missed: 0,
            failed: false,
            stopped: false,
        }
    }

    /// The rules.
    pub fn rules(&self) -> Rules {
        self.rules
    }

    /// A link frame from the source arrived at `at_us`.
    pub fn heard(&mut self, at_us: u64) {
        self.heard_us = self.heard_us.max(at_us);
    }

    /// Silence counts from `at_us` at the earliest: a failover or failback ended or began
    /// (its connections are not the source being heard from).
    pub fn rebase(&mut self, at_us: u64) {
        self.baseline_us = self.baseline_us.max(at_us);
    }

    /// Whether the source's agents all stopped cleanly (they said goodbye), as of now.
    pub fn set_stopped(&mut self, stopped: bool) {
        self.stopped = stopped;
    }

    /// The source is not watched at `at_us` (it has no replica here, a failover or failback
    /// runs, or it is failed over): nothing counts, and silence counts from here.
    pub fn hold(&mut self, at_us: u64) {
        self.missed = 0;
        self.link_missed = 0;
        self.probe_fails.iter_mut().for_each(|f| *f = 0);
        self.probe_answered = false;
        self.next_probe_us = 0;
        self.failed = false;
        self.rebase(at_us);
    }

    /// A check at `now_us`.
    pub fn tick(&mut self, now_us: u64) -> Action {
        if self.stopped {
            self.hold(now_us);
            return Action::None;
        }
        self.link_missed =
            (self.counted_silence(now_us) / self.rules.interval_us).min(u32::MAX as u64) as u32;
        if self.link_missed == 0 {
            self.missed = 0;
            self.probe_fails.iter_mut().for_each(|f| *f = 0);
            self.probe_answered = false;
            self.next_probe_us = 0;
            if self.failed {
                self.failed = false;
                return Action::Back;
            }
            return Action::None;
        }
        if self.rules.probes > 0 && now_us >= self.next_probe_us {
            self.next_probe_us = now_us + self.rules.interval_us;
            return Action::RunProbes;
        }
        self.judge(now_us)
    }

    /// The probes asked for by [`Action::RunProbes`] gave `alive` (one per probe) at `now_us`.
    pub fn probed(&mut self, now_us: u64, alive: &[bool]) -> Action {
        if self.stopped || self.link_missed == 0 {
            // Things changed while the probes ran; the next tick judges.
            return Action::None;
        }
        self.probe_answered = alive.iter().any(|a| *a);
        for (f, a) in self.probe_fails.iter_mut().zip(alive) {
            *f = if *a { 0 } else { f.saturating_add(1) };
        }
        self.judge(now_us)
    }

    fn judge(&mut self, now_us: u64) -> Action {
        self.missed = self.probe_fails.iter().copied().fold(self.link_missed, u32::min);
        if self.missed < self.rules.missed || self.failed {
            return Action::None;
        }
        self.failed = true;
        let since_us = self.heard_us.max(self.baseline_us);
        Action::Failed(Failure {
            decision: match self.rules.policy {
                Policy::Auto => Decision::FailOver,
                Policy::Manual => Decision::Alert,
            },
            since_us,
            silent_us: now_us.saturating_sub(since_us),
            link_missed: self.link_missed,
        })
    }

    fn counted_silence(&self, now_us: u64) -> u64 {
        now_us.saturating_sub(self.heard_us.max(self.baseline_us))
    }

    /// What the source is at `now_us`, as of the last check.
    pub fn view(&self, now_us: u64) -> View {
        let verdict = if self.stopped {
            Verdict::Stopped
        } else if self.failed {
            Verdict::Failed
        } else if self.link_missed == 0 {
            Verdict::Alive
        } else if self.probe_answered {
            Verdict::Silent
        } else {
            Verdict::Suspect
        };
        View {
            verdict,
            countdown_us: (verdict == Verdict::Suspect).then(|| self.countdown_us(now_us)),
            missed: self.missed,
            silent_us: now_us.saturating_sub(self.heard_us),
        }
    }

    /// Time left until the threshold: the later of the link's and the slowest probe's.
    fn countdown_us(&self, now_us: u64) -> u64 {
        let i = self.rules.interval_us;
        let link = (i * self.rules.missed as u64).saturating_sub(self.counted_silence(now_us));
        let probes = self
            .probe_fails
            .iter()
            .map(|f| self.rules.missed.saturating_sub(*f) as u64 * i)
            .max()
            .unwrap_or(0);
        link.max(probes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000;
    /// The target started here.
    const T0: u64 = 100_000 * S;

    fn rules(probes: usize, policy: Policy) -> Rules {
        Rules { interval_us: S, missed: 3, probes, policy }
    }

    fn failed_at(w: &Action) -> Option<Failure> {
        match w {
            Action::Failed(f) => Some(*f),
            _ => None,
        }
    }

    #[test]
    fn link_only_alive_suspect_failed_with_the_countdown() {
        let mut w = Watch::new(rules(0, Policy::Auto), T0);
        w.heard(T0 + S);
        // Within the interval: alive.
        assert_eq!(w.tick(T0 + S + S / 2), Action::None);
        assert_eq!(w.view(T0 + S + S / 2).verdict, Verdict::Alive);
        assert_eq!(w.view(T0 + S + S / 2).countdown_us, None);
        // One interval of silence: suspect, 2 s left.
        assert_eq!(w.tick(T0 + 2 * S), Action::None);
        let v = w.view(T0 + 2 * S);
        assert_eq!((v.verdict, v.countdown_us, v.missed, v.silent_us), (Verdict::Suspect, Some(2 * S), 1, S));
        // The countdown moves with time between checks.
        assert_eq!(w.view(T0 + 2 * S + S / 4).countdown_us, Some(2 * S - S / 4));
        assert_eq!(w.tick(T0 + 3 * S + S / 2), Action::None);
        assert_eq!(w.view(T0 + 3 * S + S / 2).countdown_us, Some(S / 2));
        // Three intervals: failed, once.
        let f = failed_at(&w.tick(T0 + 4 * S)).expect("failed");
        assert_eq!(
            f,
            Failure { decision: Decision::FailOver, since_us: T0 + S, silent_us: 3 * S, link_missed: 3 }
        );
        assert_eq!(w.view(T0 + 4 * S).verdict, Verdict::Failed);
        assert_eq!(w.view(T0 + 4 * S).countdown_us, None);
        assert_eq!(w.tick(T0 + 5 * S), Action::None, "failed only once");
        // Heard from again: back, then alive.
        w.heard(T0 + 5 * S + 1);
        assert_eq!(w.tick(T0 + 5 * S + 2), Action::Back);
        assert_eq!(w.view(T0 + 5 * S + 2).verdict, Verdict::Alive);
        assert_eq!(w.view(T0 + 5 * S + 2).missed, 0);
        assert_eq!(w.tick(T0 + 5 * S + 3), Action::None);
    }

    #[test]
    fn the_link_returning_resets_the_count() {
        let mut w = Watch::new(rules(0, Policy::Auto), T0);
        assert_eq!(w.tick(T0 + 2 * S), Action::None);
        assert_eq!(w.view(T0 + 2 * S).missed, 2);
        w.heard(T0 + 2 * S + 10);
        assert_eq!(w.tick(T0 + 2 * S + 20), Action::None);
        assert_eq!(w.view(T0 + 2 * S + 20).verdict, Verdict::Alive);
        // A new silence needs the whole threshold again.
        assert_eq!(w.tick(T0 + 5 * S), Action::None);
        assert_eq!(w.view(T0 + 5 * S).verdict, Verdict::Suspect);
        assert!(failed_at(&w.tick(T0 + 5 * S + 10)).is_some());
    }

    #[test]
    fn an_answering_probe_holds_off_failure_and_stops_the_countdown() {
        let mut w = Watch::new(rules(2, Policy::Auto), T0);
        // The link misses a check: the probes run, once per interval.
        assert_eq!(w.tick(T0 + S), Action::RunProbes);
        assert_eq!(w.view(T0 + S).verdict, Verdict::Suspect, "no probe answered yet");
        assert_eq!(w.probed(T0 + S, &[false, true]), Action::None);
        let v = w.view(T0 + S);
        assert_eq!((v.verdict, v.countdown_us, v.missed), (Verdict::Silent, None, 0));
        assert_eq!(w.tick(T0 + S + S / 2), Action::None, "not due yet");
        // However long the silence, one answering probe keeps the source alive.
        for k in 2..20 {
            assert_eq!(w.tick(T0 + k * S), Action::RunProbes, "check {k}");
            assert_eq!(w.probed(T0 + k * S, &[false, true]), Action::None);
            assert_eq!(w.view(T0 + k * S).verdict, Verdict::Silent);
        }
        // The second probe dies too: its failures count from here.
        assert_eq!(w.tick(T0 + 20 * S), Action::RunProbes);
        assert_eq!(w.probed(T0 + 20 * S, &[false, false]), Action::None);
        let v = w.view(T0 + 20 * S);
        assert_eq!((v.verdict, v.missed, v.countdown_us), (Verdict::Suspect, 1, Some(2 * S)));
        assert_eq!(w.tick(T0 + 21 * S), Action::RunProbes);
        assert_eq!(w.probed(T0 + 21 * S, &[false, false]), Action::None);
        assert_eq!(w.tick(T0 + 22 * S), Action::RunProbes);
        let f = failed_at(&w.probed(T0 + 22 * S, &[false, false])).expect("failed");
        assert_eq!(f.link_missed, 22);
        assert_eq!(f.silent_us, 22 * S);
    }

    #[test]
    fn a_probe_answering_again_resets_its_count() {
        let mut w = Watch::new(rules(1, Policy::Manual), T0);
        for k in 1..=2 {
            assert_eq!(w.tick(T0 + k * S), Action::RunProbes);
            assert_eq!(w.probed(T0 + k * S, &[false]), Action::None);
        }
        assert_eq!(w.view(T0 + 2 * S).missed, 2);
        assert_eq!(w.tick(T0 + 3 * S), Action::RunProbes);
        assert_eq!(w.probed(T0 + 3 * S, &[true]), Action::None);
        assert_eq!(w.view(T0 + 3 * S).missed, 0);
        for k in 4..=5 {
            assert_eq!(w.tick(T0 + k * S), Action::RunProbes);
            assert_eq!(w.probed(T0 + k * S, &[false]), Action::None);
        }
        assert_eq!(w.tick(T0 + 6 * S), Action::RunProbes);
        let f = failed_at(&w.probed(T0 + 6 * S, &[false])).expect("failed after 3 failures in a row");
        assert_eq!(f.decision, Decision::Alert);
    }

    #[test]
    fn the_link_must_miss_the_threshold_too() {
        // Probes failing from the first check do not make the source failed before its link
        // has missed `missed` checks.
        let mut w = Watch::new(rules(1, Policy::Auto), T0);
        assert_eq!(w.tick(T0 + S), Action::RunProbes);
        w.probed(T0 + S, &[false]);
        assert_eq!(w.tick(T0 + 2 * S), Action::RunProbes);
        w.probed(T0 + 2 * S, &[false]);
        assert_eq!(w.tick(T0 + 3 * S - 1), Action::None);
        assert_eq!(w.view(T0 + 3 * S - 1).missed, 2);
        assert_eq!(w.tick(T0 + 3 * S), Action::RunProbes);
        assert!(failed_at(&w.probed(T0 + 3 * S, &[false])).is_some());
    }

    #[test]
    fn the_countdown_waits_for_the_slowest_witness() {
        let mut w = Watch::new(rules(1, Policy::Auto), T0);
        // The link has been silent long, the probe only started failing.
        w.heard(T0);
        assert_eq!(w.tick(T0 + 10 * S), Action::RunProbes);
        assert_eq!(w.probed(T0 + 10 * S, &[false]), Action::None);
        assert_eq!(w.view(T0 + 10 * S).countdown_us, Some(2 * S), "two more probe failures");
    }

    #[test]
    fn a_stopped_source_never_fails_and_counts_afresh_when_it_returns() {
        let mut w = Watch::new(rules(0, Policy::Auto), T0);
        assert_eq!(w.tick(T0 + 2 * S), Action::None);
        w.set_stopped(true);
        for k in 3..100 {
            assert_eq!(w.tick(T0 + k * S), Action::None);
        }
        let v = w.view(T0 + 100 * S);
        assert_eq!((v.verdict, v.countdown_us, v.missed), (Verdict::Stopped, None, 0));
        // Still down after the stop is lifted (an agent came and went): counted from the stop.
        w.set_stopped(false);
        assert_eq!(w.tick(T0 + 100 * S), Action::None);
        assert_eq!(w.view(T0 + 100 * S).verdict, Verdict::Suspect);
        assert_eq!(w.view(T0 + 100 * S).countdown_us, Some(2 * S));
        assert!(failed_at(&w.tick(T0 + 102 * S)).is_some());
        // A source that stops while failed is no longer failed.
        w.set_stopped(true);
        assert_eq!(w.tick(T0 + 103 * S), Action::None);
        assert_eq!(w.view(T0 + 103 * S).verdict, Verdict::Stopped);
    }

    #[test]
    fn a_target_starting_while_the_source_is_down_gives_it_the_whole_threshold() {
        let mut w = Watch::new(rules(0, Policy::Auto), T0);
        // Last heard from long before the target started.
        w.heard(T0 - 3600 * S);
        assert_eq!(w.tick(T0 + 1), Action::None);
        assert_eq!(w.view(T0 + 1).verdict, Verdict::Alive);
        assert_eq!(w.view(T0 + 1).silent_us, 1);
        assert_eq!(w.tick(T0 + S), Action::None);
        assert_eq!(w.view(T0 + S).countdown_us, Some(2 * S));
        assert_eq!(w.tick(T0 + 3 * S - 1), Action::None);
        let f = failed_at(&w.tick(T0 + 3 * S)).expect("failed");
        assert_eq!(f.since_us, T0);
    }

    #[test]
    fn holding_resets_and_counts_from_the_end_of_the_hold() {
        let mut w = Watch::new(rules(1, Policy::Auto), T0);
        assert_eq!(w.tick(T0 + S), Action::RunProbes);
        w.probed(T0 + S, &[false]);
        // A failover runs, then the jobs are failed over, then handed back.
        for k in 2..50 {
            w.hold(T0 + k * S);
        }
        let v = w.view(T0 + 50 * S);
        assert_eq!((v.verdict, v.missed), (Verdict::Alive, 0));
        assert_eq!(w.tick(T0 + 50 * S), Action::RunProbes, "one interval after the hold ended");
        assert_eq!(w.probed(T0 + 50 * S, &[false]), Action::None);
        assert_eq!(w.view(T0 + 50 * S).missed, 1);
        // Rebasing alone (a run began) moves the start of the count too.
        w.rebase(T0 + 60 * S);
        assert_eq!(w.tick(T0 + 60 * S + 1), Action::None);
        assert_eq!(w.view(T0 + 60 * S + 1).verdict, Verdict::Alive);
    }

    #[test]
    fn probe_results_that_arrive_after_the_source_returned_are_ignored() {
        let mut w = Watch::new(rules(1, Policy::Auto), T0);
        for k in 1..=2 {
            assert_eq!(w.tick(T0 + k * S), Action::RunProbes);
            w.probed(T0 + k * S, &[false]);
        }
        assert_eq!(w.tick(T0 + 3 * S), Action::RunProbes);
        // While the probes run, the link comes back and a check sees it.
        w.heard(T0 + 3 * S + 1);
        assert_eq!(w.tick(T0 + 3 * S + 2), Action::None);
        assert_eq!(w.probed(T0 + 3 * S + 3, &[false]), Action::None);
        assert_eq!(w.view(T0 + 3 * S + 3).verdict, Verdict::Alive);
    }

    #[test]
    fn the_policy_decides_what_a_failure_leads_to() {
        for (policy, decision) in [(Policy::Auto, Decision::FailOver), (Policy::Manual, Decision::Alert)] {
            let mut w = Watch::new(rules(0, policy), T0);
            let f = failed_at(&w.tick(T0 + 3 * S)).expect("failed");
            assert_eq!(f.decision, decision);
        }
    }
}
