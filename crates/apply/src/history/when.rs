//! WHEN: how an operator names a point (`now`, a time, a time ago, `seq:N`, a bookmark), and
//! which point of a history it is.
//!
//! A time means the latest point at or before it: the point just before the first op, in
//! sequence order, captured after that time. Points are ordered by sequence, so when a
//! source's clock stepped back, an op stamped earlier but applied later never comes before
//! the ops it followed.

use super::record::Mark;
use super::view::Summary;

/// A point, as given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum When {
    /// The newest point.
    Now,
    /// A moment (µs since the epoch).
    Time(u64),
    /// `seq:N`.
    Seq(u64),
    /// A bookmark's name.
    Bookmark(String),
}

/// Why a WHEN names no point.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WhenError {
    /// It does not parse.
    #[error("bad point {given:?}: {why}")]
    Bad {
        /// As given.
        given: String,
        /// Why.
        why: String,
    },
    /// It is outside the window held.
    #[error("{what} is {side} the history held ({window})")]
    Outside {
        /// The point, in words.
        what: String,
        /// `before` or `outside`.
        side: &'static str,
        /// The window, in words.
        window: String,
    },
    /// No bookmark of that name is held.
    #[error("no bookmark {name:?} in the history held ({window})")]
    NoBookmark {
        /// The name.
        name: String,
        /// The window, in words.
        window: String,
    },
}

/// Bookmark names: `[A-Za-z0-9._-]`, not starting with `-` or a digit, not `now`.
pub fn check_bookmark_name(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s != "now"
        && !s.starts_with(|c: char| c == '-' || c.is_ascii_digit())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !ok {
        return Err("a bookmark name is letters, digits, '.', '_' and '-', not starting with '-' or a digit, and not \"now\"".into());
    }
    Ok(())
}

fn parse_ago(s: &str) -> Option<u64> {
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().ok()?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return None,
    };
    Some(n.saturating_mul(scale).saturating_mul(1_000_000))
}

impl When {
    /// Parses WHEN (`now_us` for times ago).
    pub fn parse(s: &str, now_us: u64) -> Result<When, WhenError> {
        let bad = |why: &str| WhenError::Bad { given: s.to_string(), why: why.to_string() };
        if s == "now" {
            return Ok(When::Now);
        }
        if let Some(n) = s.strip_prefix("seq:") {
            return n.parse().map(When::Seq).map_err(|_| bad("seq:N needs a number"));
        }
        if let Some(ago) = s.strip_prefix('-') {
            let us =
                parse_ago(ago).ok_or_else(|| bad("a time ago is a whole number and s, m, h or d (-15m)"))?;
            return Ok(When::Time(now_us.saturating_sub(us)));
        }
        if s.starts_with(|c: char| c.is_ascii_digit()) {
            let t: jiff::Timestamp =
                s.parse().map_err(|e| bad(&format!("not an RFC 3339 time with its offset ({e})")))?;
            return Ok(When::Time(u64::try_from(t.as_microsecond()).unwrap_or(0)));
        }
        check_bookmark_name(s).map_err(|e| bad(&e))?;
        Ok(When::Bookmark(s.to_string()))
    }

    /// Whether the point belongs to one job (`seq:N`, a bookmark) rather than to a moment.
    pub fn per_job(&self) -> bool {
        matches!(self, When::Seq(_) | When::Bookmark(_))
    }

    /// The point this names in `s`.
    pub fn resolve(&self, s: &Summary) -> Result<u64, WhenError> {
        let newest = s.newest.map_or(0, |n| n.0);
        match self {
            When::Now => Ok(newest),
            When::Seq(n) => {
                let oldest = s.oldest.map_or(newest, |o| o.0);
                if *n < oldest || *n > newest {
                    return Err(WhenError::Outside {
                        what: format!("seq:{n}"),
                        side: "outside",
                        window: window(s),
                    });
                }
                Ok(*n)
            }
            When::Time(t) => s.point_at(*t).ok().flatten().ok_or_else(|| WhenError::Outside {
                what: rfc3339(*t),
                side: "before",
                window: window(s),
            }),
            When::Bookmark(b) => s
                .points
                .iter()
                .rev()
                .find(|p| matches!(&p.mark, Mark::Bookmark(n) if n == b))
                .map(|p| p.seq)
                .ok_or_else(|| WhenError::NoBookmark { name: b.clone(), window: window(s) }),
        }
    }
}

/// A time for people and JSON (RFC 3339, UTC).
pub fn rfc3339(us: u64) -> String {
    jiff::Timestamp::from_microsecond(us as i64).map(|t| t.to_string()).unwrap_or_else(|_| us.to_string())
}

/// The window a history holds, in words.
pub fn window(s: &Summary) -> String {
    match (s.oldest, s.newest) {
        (Some((o, _)), Some((n, nt))) => {
            let ot = s.oldest.map_or(0, |o| o.1);
            format!("points {o} (before {}) to {n} ({})", rfc3339(ot), rfc3339(nt))
        }
        _ => "no history yet".into(),
    }
}

/// Where a resync stands in a history: the point before the newest resync that has not
/// ended, if one has not. `initial` when it is the first mirror of a replica whose history
/// starts at its creation (no consistent point exists before it).
pub fn unfinished_resync(s: &Summary) -> Option<(u64, bool)> {
    let last_pre = s.points.iter().rposition(|p| p.mark == Mark::PreResync)?;
    if s.points[last_pre..].iter().any(|p| p.mark == Mark::Resynced) {
        return None;
    }
    let ever_resynced = s.points[..last_pre].iter().any(|p| p.mark == Mark::Resynced);
    let initial = !ever_resynced && s.oldest.is_some_and(|o| o.0 == 0);
    Some((s.points[last_pre].seq, initial))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::journal::Journal;
    use crate::history::record::{Draft, UndoSet};

    /// A journal of sets at `times` (sequence, time), with `marks`, read back as a summary.
    fn summary(times: &[(u64, u64)], marks: &[(u64, Mark)]) -> (tempfile::TempDir, Summary) {
        let d = tempfile::tempdir().unwrap();
        let (dir, attic) = (d.path().join("h"), d.path().join("a"));
        let mut j = Journal::open(&dir, &attic).unwrap();
        j.set_segment_bytes(200);
        for &(seq, time_us) in times {
            let mark = marks.iter().find(|(s, _)| *s == seq).map(|(_, m)| m.clone());
            let set = UndoSet { seq, time_us, op_hash: seq, mark, undo: Vec::new() };
            j.append(&Draft { set, data: Vec::new() }).unwrap();
        }
        let s = crate::history::view::summary(&dir, &attic).unwrap();
        (d, s)
    }

    #[test]
    fn when_parses_every_form_and_refuses_the_rest_saying_why() {
        let now = 10_000_000_000;
        assert_eq!(When::parse("now", now).unwrap(), When::Now);
        assert_eq!(When::parse("seq:42", now).unwrap(), When::Seq(42));
        assert_eq!(When::parse("-15m", now).unwrap(), When::Time(now - 900_000_000));
        assert_eq!(When::parse("-2h", now).unwrap(), When::Time(now - 7_200_000_000));
        assert_eq!(
            When::parse("2026-12-04T17:05:00Z", now).unwrap(),
            When::parse("2026-12-04T18:05:00+01:00", now).unwrap()
        );
        assert_eq!(When::parse("before-upgrade", now).unwrap(), When::Bookmark("before-upgrade".into()));
        for bad in ["seq:x", "2026-12-04T17:05:00", "-5 parsecs", "a b", "9lives", "now2?"] {
            assert!(When::parse(bad, now).is_err(), "{bad}");
        }
        assert!(check_bookmark_name("now").is_err());
        assert!(check_bookmark_name("-x").is_err());
    }

    #[test]
    fn a_time_is_the_point_before_the_first_op_after_it_even_when_the_clock_stepped_back() {
        // Op 3's clock stepped back to before op 2.
        let (_d, s) = summary(&[(1, 100), (2, 200), (3, 150), (4, 300)], &[]);
        assert_eq!(When::Time(250).resolve(&s), Ok(3), "op 4 is the first after 250");
        // 160: op 2 (200) is the first op after it in sequence order; op 3 (150) came later.
        assert_eq!(When::Time(160).resolve(&s), Ok(1));
        assert_eq!(When::Time(999).resolve(&s), Ok(4));
        assert!(matches!(When::Time(50).resolve(&s), Err(WhenError::Outside { side: "before", .. })));
        assert!(
            When::Seq(9).resolve(&s).unwrap_err().to_string().contains("outside the history held (points 0")
        );
    }

    #[test]
    fn an_unfinished_resync_is_found_and_the_first_mirror_is_told_apart() {
        let times: Vec<_> = (1..=9).map(|s| (s, s * 10)).collect();
        let (_d, s) = summary(&times, &[(1, Mark::PreResync)]);
        assert_eq!(unfinished_resync(&s), Some((1, true)));
        let (_d, s) = summary(&times, &[(1, Mark::PreResync), (4, Mark::Resynced), (6, Mark::PreResync)]);
        assert_eq!(unfinished_resync(&s), Some((6, false)));
        let (_d, s) = summary(&times, &[(1, Mark::PreResync), (4, Mark::Resynced)]);
        assert_eq!(unfinished_resync(&s), None);
        assert_eq!(s.time_of(4), Some(40));
    }
}
