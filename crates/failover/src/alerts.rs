//! When the notify command hears about trouble that is not a failure: replication lag past
//! the recovery point objective, a source disconnected, sync mode degraded, a source over its
//! quota. For administrators without Prometheus (who have `doppel_*` alert rules instead).
//!
//! A pure state machine: the shell feeds it, at each check, whether each condition holds for
//! each subject (a source, or a job), with the time; it answers with the notices to send. A
//! condition must hold for `hold` before it is raised (a reconnect within a second is not
//! news), is raised again every `repeat` while it lasts (a reminder, not a flood), and is
//! cleared once when it ends. A subject flapping in and out of a condition is raised at most
//! once per `min_gap`.

use std::collections::HashMap;
use std::time::Duration;

/// A condition worth a notice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Condition {
    /// Replication lag above the recovery point objective.
    Lag,
    /// The source (or the job's link) is disconnected, without a clean stop.
    Disconnected,
    /// Sync mode gave up waiting for the target: fsync no longer means "on the target".
    SyncDegraded,
    /// The source reached its quota: its writes are refused.
    OverQuota,
}

impl Condition {
    /// `DOPPEL_EVENT` when the condition is raised.
    pub fn raised(self) -> &'static str {
        match self {
            Condition::Lag => "lag-above-rpo",
            Condition::Disconnected => "disconnected",
            Condition::SyncDegraded => "sync-degraded",
            Condition::OverQuota => "over-quota",
        }
    }

    /// `DOPPEL_EVENT` when it ends.
    pub fn cleared(self) -> &'static str {
        match self {
            Condition::Lag => "lag-recovered",
            Condition::Disconnected => "reconnected",
            Condition::SyncDegraded => "sync-restored",
            Condition::OverQuota => "quota-ok",
        }
    }
}

/// The timing of notices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlertTiming {
    /// How long a condition must hold before it is raised.
    pub hold: Duration,
    /// How often it is raised again while it lasts.
    pub repeat: Duration,
    /// The shortest time between two raises of one condition of one subject.
    pub min_gap: Duration,
}

impl Default for AlertTiming {
    fn default() -> AlertTiming {
        AlertTiming {
            hold: Duration::from_secs(10),
            repeat: Duration::from_secs(3600),
            min_gap: Duration::from_secs(300),
        }
    }
}

/// A notice to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// The source or job it is about.
    pub subject: String,
    /// The condition.
    pub condition: Condition,
    /// Raised (or raised again), not cleared.
    pub raised: bool,
    /// `DOPPEL_EVENT`.
    pub event: &'static str,
}

/// What is known of one condition of one subject.
#[derive(Debug, Default, Clone, Copy)]
struct Track {
    /// Since when it holds (µs), while it does.
    since: Option<u64>,
    /// It was raised and not cleared since.
    raised: bool,
    /// When it was last raised (µs).
    last_raised: Option<u64>,
}

/// The notices' state.
#[derive(Debug, Default)]
pub struct Alerts {
    timing: AlertTiming,
    tracks: HashMap<(String, Condition), Track>,
}

fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl Alerts {
    /// No condition known yet.
    pub fn new(timing: AlertTiming) -> Alerts {
        Alerts { timing, tracks: HashMap::new() }
    }

    /// At `now` (µs), `condition` of `subject` holds (`holds`) or not: the notice to send, if
    /// any.
    pub fn observe(&mut self, now: u64, subject: &str, condition: Condition, holds: bool) -> Option<Notice> {
        let key = (subject.to_string(), condition);
        let t = self.tracks.entry(key).or_default();
        let notice = |raised| Notice {
            subject: subject.to_string(),
            condition,
            raised,
            event: if raised { condition.raised() } else { condition.cleared() },
        };
        if !holds {
            t.since = None;
            let was = std::mem::take(&mut t.raised);
            return was.then(|| notice(false));
        }
        let since = *t.since.get_or_insert(now);
        let after = |at: Option<u64>, d: Duration| at.is_none_or(|at| now.saturating_sub(at) >= us(d));
        let due = if t.raised {
            after(t.last_raised, self.timing.repeat)
        } else {
            now.saturating_sub(since) >= us(self.timing.hold) && after(t.last_raised, self.timing.min_gap)
        };
        if !due {
            return None;
        }
        t.raised = true;
        t.last_raised = Some(now);
        Some(notice(true))
    }

    /// Forgets subjects not in `keep` (a source no longer allowed, a job stopped).
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.tracks.retain(|(s, _), _| keep(s));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000;

    fn alerts() -> Alerts {
        Alerts::new(AlertTiming {
            hold: Duration::from_secs(10),
            repeat: Duration::from_secs(3600),
            min_gap: Duration::from_secs(300),
        })
    }

    /// Drives one subject's condition second by second from `from` for `secs` seconds; returns
    /// (second, raised) of each notice.
    fn run(a: &mut Alerts, from: u64, secs: u64, holds: impl Fn(u64) -> bool) -> Vec<(u64, bool)> {
        (from..from + secs)
            .filter_map(|t| a.observe(t * S, "web1", Condition::Lag, holds(t)).map(|n| (t, n.raised)))
            .collect()
    }

    #[test]
    fn raised_after_the_hold_and_cleared_once() {
        let mut a = alerts();
        // Holds from second 5 to second 59.
        let got = run(&mut a, 0, 120, |t| (5..60).contains(&t));
        assert_eq!(got, vec![(15, true), (60, false)]);
    }

    #[test]
    fn a_blip_shorter_than_the_hold_is_not_news() {
        let mut a = alerts();
        assert_eq!(run(&mut a, 0, 100, |t| t % 20 < 9), vec![]);
    }

    #[test]
    fn reminded_every_repeat_while_it_lasts() {
        let mut a = alerts();
        let got = run(&mut a, 0, 2 * 3600 + 100, |_| true);
        assert_eq!(got, vec![(10, true), (3610, true), (7210, true)]);
    }

    /// Flapping: raised, cleared, raised again only after `min_gap`; every clear follows a
    /// raise.
    #[test]
    fn flapping_is_raised_at_most_once_per_gap() {
        let mut a = alerts();
        // On for 30 s, off for 30 s, for 20 minutes.
        let got = run(&mut a, 0, 1200, |t| t % 60 < 30);
        let raises: Vec<u64> = got.iter().filter(|(_, r)| *r).map(|(t, _)| *t).collect();
        assert_eq!(raises, vec![10, 310, 610, 910]);
        for w in got.windows(2) {
            assert_ne!(w[0].1, w[1].1, "raise and clear alternate: {got:?}");
        }
    }

    #[test]
    fn subjects_and_conditions_are_tracked_apart() {
        let mut a = alerts();
        for t in 0..=10 {
            let n1 = a.observe(t * S, "web1", Condition::Disconnected, true);
            let n2 = a.observe(t * S, "web2", Condition::Disconnected, t >= 5);
            let n3 = a.observe(t * S, "web1", Condition::OverQuota, false);
            assert_eq!(n3, None);
            if t == 10 {
                assert_eq!(n1.unwrap().event, "disconnected");
                assert_eq!(n2, None);
            }
        }
        let n = a.observe(11 * S, "web1", Condition::Disconnected, false).unwrap();
        assert_eq!((n.event, n.raised, n.subject.as_str()), ("reconnected", false, "web1"));
        a.retain(|s| s != "web2");
        // web2's clock started again: forgotten.
        assert_eq!(a.observe(16 * S, "web2", Condition::Disconnected, true), None);
    }
}
