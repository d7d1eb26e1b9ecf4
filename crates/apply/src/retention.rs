//! Which history a replica keeps: the retention rule as a pure decision.
//!
//! A replica's history (its undo journal) is a run of segments, oldest first; a segment goes as
//! a whole. A point `p` can be restored while every record after `p` is held, so dropping the
//! oldest segment moves the start of the window to the point just before the next one. The
//! rule, in order:
//!
//! - **Time**: a segment whose newest record is older than `now - keep` holds nothing the
//!   window needs: it goes.
//! - **Size**: while the history is larger than its limit (bytes, or a share of the replica's
//!   size), the oldest segments go, even inside `keep` (status then warns that the size limit cut
//!   the window below the time configured).
//! - **Space**: when the disk or the quota is full, the caller asks for bytes; they come from the
//!   oldest segments, likewise.
//! - **Never below `min`**: a segment holding any record newer than `now - min` never goes,
//!   whatever the size limit or the space needed (a ransomware flood must not push every good
//!   point out). When only such segments are left and bytes are still needed, the replica
//!   pauses (as on a full disk) until time moves the window on.
//! - **Pins**: a restore or a test failover reading point `p` pins it; no segment holding a
//!   record after `p` goes while the pin lasts, not even by time.
//!
//! Times are the source's capture times of the records; sequence numbers order them. The rule
//! reads only each segment's newest time, so a source clock that stepped back makes a segment
//! look younger (kept longer), never older.

use std::time::Duration;

/// How much history to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Keep every point of this window (`history`).
    pub keep: Duration,
    /// Size limit (`history_size`).
    pub size: SizeLimit,
    /// A window no size limit and no shortage of space cuts (`history_min`).
    pub min: Duration,
}

/// The size limit of a history.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SizeLimit {
    /// No limit but the disk's.
    Unlimited,
    /// At most this many bytes.
    Bytes(u64),
    /// At most this share of the replica's size, in percent.
    Percent(f64),
}

/// A percentage comes from the configuration, never NaN: equality is total.
impl Eq for SizeLimit {}

impl SizeLimit {
    /// The limit in bytes for a replica of `replica_bytes`.
    pub fn bytes(self, replica_bytes: u64) -> Option<u64> {
        match self {
            SizeLimit::Unlimited => None,
            SizeLimit::Bytes(b) => Some(b),
            SizeLimit::Percent(p) => Some((replica_bytes as f64 * p / 100.0) as u64),
        }
    }
}

/// One segment of the journal, as retention sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Sequence of its first record.
    pub first_seq: u64,
    /// Sequence of its last record.
    pub last_seq: u64,
    /// Capture time of its first record (µs since the epoch).
    pub first_time_us: u64,
    /// Capture time of its newest record (µs since the epoch).
    pub newest_time_us: u64,
    /// Bytes it takes on disk (records, and the files it moved aside).
    pub bytes: u64,
}

/// What retention decides from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Facts {
    /// Now (µs since the epoch).
    pub now_us: u64,
    /// The replica's size in bytes (for a percentage limit).
    pub replica_bytes: u64,
    /// Bytes that must be freed now (the disk or the quota is full), beyond the size limit.
    pub need_bytes: u64,
    /// The oldest point a running restore or test failover reads, if any.
    pub pin: Option<u64>,
}

/// Retention's decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Drop this many of the oldest segments.
    pub drop: usize,
    /// Bytes freed by dropping them.
    pub freed: u64,
    /// The window held afterwards; `None` if no history is left.
    pub held: Option<Held>,
    /// The size limit or the space needed dropped points younger than `keep`: the window held
    /// is shorter than the one configured.
    pub cut_below_keep: bool,
    /// Bytes are still needed and only the minimum window (or pinned points) is left: the
    /// replica must pause until time moves the window on.
    pub pause: bool,
}

/// The window of points a history holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    /// The oldest point that can be restored: the state before this sequence's op is applied
    /// (`first_seq - 1` of the oldest segment kept).
    pub oldest_point: u64,
    /// When that point was current (the capture time of the first record kept).
    pub oldest_time_us: u64,
}

impl Retention {
    /// Decides which of `segments` (oldest first) go.
    pub fn plan(&self, segments: &[Segment], facts: Facts) -> Plan {
        let min_from = facts.now_us.saturating_sub(micros(self.min));
        // A `keep` shorter than `min` keeps `min`.
        let keep_from = facts.now_us.saturating_sub(micros(self.keep)).min(min_from);
        let total: u64 = segments.iter().map(|s| s.bytes).sum();
        let limit = self.size.bytes(facts.replica_bytes).unwrap_or(u64::MAX);
        let mut to_free = total.saturating_sub(limit).saturating_add(facts.need_bytes);
        let pinned = |s: &Segment| facts.pin.is_some_and(|p| s.last_seq > p);
        let mut plan = Plan { drop: 0, freed: 0, held: None, cut_below_keep: false, pause: false };
        for s in segments {
            if pinned(s) {
                break;
            }
            let expired = s.newest_time_us < keep_from;
            let protected = s.newest_time_us >= min_from;
            if !expired && (to_free == 0 || protected) {
                break;
            }
            plan.cut_below_keep |= !expired;
            plan.drop += 1;
            plan.freed += s.bytes;
            to_free = to_free.saturating_sub(s.bytes);
        }
        plan.pause = to_free > 0;
        plan.held = segments
            .get(plan.drop)
            .map(|s| Held { oldest_point: s.first_seq.saturating_sub(1), oldest_time_us: s.first_time_us });
        plan
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests;
