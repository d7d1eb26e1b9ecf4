//! Bandwidth schedules: which rate applies at which time of the week.
//!
//! A schedule is a default rate plus rules such as "Monday to Friday, 08:00 to 18:00, 20
//! Mbit/s"; the first rule that matches the local time wins. A rule whose end is before its
//! start spans midnight. The effective rate is re-evaluated every 30 seconds by the agent, and
//! `doppel limit` can override it until told to go back to the schedule.

use doppel_link::ratelimit::parse_rate;

/// One rule of a schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Days it applies to, Monday first.
    pub days: [bool; 7],
    /// Start, minutes after midnight.
    pub from: u32,
    /// End (exclusive), minutes after midnight.
    pub to: u32,
    /// Bytes per second (0: unlimited).
    pub rate: u64,
}

/// A default rate and rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Schedule {
    /// Bytes per second when no rule matches (0: unlimited).
    pub default: u64,
    /// Rules, first match wins.
    pub rules: Vec<Rule>,
}

/// A schedule rule that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// Not a day name.
    #[error("unknown day {0:?} (use mon..sun)")]
    UnknownDay(String),
    /// Not `HH:MM`.
    #[error("bad time {0:?}: expected HH:MM")]
    TimeFormat(String),
    /// `HH:MM` out of range.
    #[error("bad time {0:?}")]
    BadTime(String),
    /// The rate cannot be read.
    #[error("{0}")]
    Rate(#[from] doppel_link::ratelimit::RateError),
}

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

fn day(s: &str) -> Result<usize, ScheduleError> {
    let s = s.trim().to_ascii_lowercase();
    DAYS.iter().position(|d| s.starts_with(d)).ok_or(ScheduleError::UnknownDay(s))
}

/// Parses `mon-fri`, `sat,sun`, `daily`, `weekdays`, `weekends`, or combinations with commas.
pub fn parse_days(s: &str) -> Result<[bool; 7], ScheduleError> {
    let mut out = [false; 7];
    for part in s.split(',') {
        let part = part.trim().to_ascii_lowercase();
        match part.as_str() {
            "daily" | "*" | "all" => out = [true; 7],
            "weekdays" => out[..5].iter_mut().for_each(|d| *d = true),
            "weekends" => out[5..].iter_mut().for_each(|d| *d = true),
            p if p.contains('-') => {
                let (a, b) = p.split_once('-').expect("has a dash");
                let (a, b) = (day(a)?, day(b)?);
                let mut i = a;
                loop {
                    out[i] = true;
                    if i == b {
                        break;
                    }
                    i = (i + 1) % 7;
                }
            }
            p => out[day(p)?] = true,
        }
    }
    Ok(out)
}

/// Parses `HH:MM` into minutes after midnight (`24:00` allowed as an end).
pub fn parse_time(s: &str) -> Result<u32, ScheduleError> {
    let bad = || ScheduleError::BadTime(s.to_string());
    let (h, m) = s.trim().split_once(':').ok_or_else(|| ScheduleError::TimeFormat(s.to_string()))?;
    let (h, m): (u32, u32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if m >= 60 || h > 24 || (h == 24 && m > 0) {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

impl Rule {
    /// Builds a rule from its text fields.
    pub fn parse(days: &str, from: &str, to: &str, rate: &str) -> Result<Rule, ScheduleError> {
        Ok(Rule {
            days: parse_days(days)?,
            from: parse_time(from)?,
            to: parse_time(to)?,
            rate: parse_rate(rate).map_err(ScheduleError::Rate)?,
        })
    }

    fn matches(&self, weekday: usize, minute: u32) -> bool {
        if self.from <= self.to {
            self.days[weekday] && (self.from..self.to).contains(&minute)
        } else {
            // Spans midnight: the evening of a listed day, or the morning after one.
            (self.days[weekday] && minute >= self.from) || (self.days[(weekday + 6) % 7] && minute < self.to)
        }
    }
}

impl Schedule {
    /// A constant rate.
    pub fn constant(rate: u64) -> Schedule {
        Schedule { default: rate, rules: Vec::new() }
    }

    /// The rate on `weekday` (0 = Monday) at `minute` after midnight.
    pub fn rate_at(&self, weekday: usize, minute: u32) -> u64 {
        self.rules.iter().find(|r| r.matches(weekday, minute)).map_or(self.default, |r| r.rate)
    }

    /// The rate now, in local time.
    pub fn rate_now(&self) -> u64 {
        if self.rules.is_empty() {
            return self.default;
        }
        let (weekday, minute) = local_now();
        self.rate_at(weekday, minute)
    }
}

/// Local weekday (0 = Monday) and minute of the day.
fn local_now() -> (usize, u32) {
    // SAFETY: `time(NULL)` and `localtime_r` with a valid out-pointer are thread-safe libc
    // calls; `tm` is fully written by `localtime_r` before it is read.
    unsafe {
        let t = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&t, &mut tm).is_null() {
            return (0, 0);
        }
        (((tm.tm_wday + 6) % 7) as usize, (tm.tm_hour * 60 + tm.tm_min) as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn office_hours_and_overnight_rules() {
        let s = Schedule {
            default: 0,
            rules: vec![
                Rule::parse("mon-fri", "08:00", "18:00", "20Mbit").unwrap(),
                Rule::parse("fri", "22:00", "02:00", "1MB").unwrap(),
            ],
        };
        assert_eq!(s.rate_at(0, 9 * 60), 2_500_000);
        assert_eq!(s.rate_at(0, 18 * 60), 0);
        assert_eq!(s.rate_at(5, 9 * 60), 0, "Saturday is not an office day");
        assert_eq!(s.rate_at(4, 23 * 60), 1_000_000, "Friday night");
        assert_eq!(s.rate_at(5, 60), 1_000_000, "early Saturday belongs to Friday's rule");
        assert_eq!(s.rate_at(6, 60), 0);
        assert_eq!(parse_days("sat-mon").unwrap(), [true, false, false, false, false, true, true]);
        assert_eq!(parse_days("weekends,wed").unwrap(), [false, false, true, false, false, true, true]);
        assert!(parse_days("someday").is_err());
        assert!(parse_time("25:00").is_err());
    }
}

#[cfg(test)]
mod error_tests {
    use super::*;

    /// The messages `doppel protect` prints for a bad rule.
    #[test]
    fn bad_rules_say_what_is_wrong() {
        assert_eq!(parse_days("mon-fry").unwrap_err().to_string(), r#"unknown day "fry" (use mon..sun)"#);
        assert_eq!(parse_time("8h").unwrap_err().to_string(), r#"bad time "8h": expected HH:MM"#);
        assert_eq!(parse_time("24:30").unwrap_err(), ScheduleError::BadTime("24:30".into()));
        assert!(matches!(Rule::parse("daily", "08:00", "18:00", "fast"), Err(ScheduleError::Rate(_))));
        assert_eq!(
            crate::sender::Compression::parse("zip").unwrap_err().to_string(),
            r#"bad compression "zip": use off, fast, balanced, max, auto or a level 1-19"#
        );
    }
}
