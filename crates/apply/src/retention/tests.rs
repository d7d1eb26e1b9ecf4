//! The retention rule: each case as a table row, then a simulated ransomware flood on a virtual
//! clock.

use super::*;

const S: u64 = 1_000_000;
const H: u64 = 3600 * S;

/// Segment `i` of a run made one per hour: records `100i+1 ..= 100i+100`, written during hour
/// `i`, `bytes` each.
fn hourly(n: u64, bytes: u64) -> Vec<Segment> {
    (0..n)
        .map(|i| Segment {
            first_seq: 100 * i + 1,
            last_seq: 100 * i + 100,
            first_time_us: i * H,
            newest_time_us: i * H + H - S,
            bytes,
        })
        .collect()
}

fn rule(keep_h: u64, size: SizeLimit, min_h: u64) -> Retention {
    Retention { keep: Duration::from_secs(keep_h * 3600), size, min: Duration::from_secs(min_h * 3600) }
}

fn at(now_h: u64) -> Facts {
    Facts { now_us: now_h * H, replica_bytes: 1000, need_bytes: 0, pin: None }
}

/// (case, rule, facts, segments, dropped, cut below keep, pause)
type Case<'a> = (&'a str, Retention, Facts, &'a [Segment], usize, bool, bool);

#[test]
fn each_rule_decides_as_the_table_says() {
    use SizeLimit::*;
    let ten = hourly(10, 100); // hours 0..10, 1000 bytes in all; now is hour 10
    let cases: Vec<Case> = vec![
        ("nothing expired, no limit", rule(24, Unlimited, 0), at(10), &ten, 0, false, false),
        ("time: segments older than keep go", rule(4, Unlimited, 0), at(10), &ten, 6, false, false),
        ("time: keep 0 drops all but what min holds", rule(0, Unlimited, 1), at(10), &ten, 9, false, false),
        (
            "size: bytes over the limit go, oldest first",
            rule(24, Bytes(550), 0),
            at(10),
            &ten,
            5,
            true,
            false,
        ),
        ("size: a percentage of the replica", rule(24, Percent(30.0), 0), at(10), &ten, 7, true, false),
        ("size: within the limit nothing goes", rule(24, Bytes(1000), 0), at(10), &ten, 0, false, false),
        ("size never cuts the minimum window", rule(24, Bytes(100), 3), at(10), &ten, 7, true, true),
        (
            "space needed comes from the oldest",
            rule(24, Unlimited, 0),
            Facts { need_bytes: 250, ..at(10) },
            &ten,
            3,
            true,
            false,
        ),
        (
            "space needed inside the minimum window pauses",
            rule(24, Unlimited, 8),
            Facts { need_bytes: 500, ..at(10) },
            &ten,
            2,
            true,
            true,
        ),
        (
            "a pin holds its records even past keep",
            rule(2, Unlimited, 0),
            Facts { pin: Some(250), ..at(10) },
            &ten,
            2,
            false,
            false,
        ),
        (
            "a pin that blocks needed space pauses",
            rule(24, Bytes(0), 0),
            Facts { pin: Some(0), ..at(10) },
            &ten,
            0,
            false,
            true,
        ),
        ("no history", rule(1, Bytes(0), 0), at(10), &[], 0, false, false),
    ];
    for (case, r, facts, segs, drop, cut, pause) in cases {
        let plan = r.plan(segs, facts);
        assert_eq!((plan.drop, plan.cut_below_keep, plan.pause), (drop, cut, pause), "{case}: {plan:?}");
        assert_eq!(plan.freed, segs[..drop].iter().map(|s| s.bytes).sum::<u64>(), "{case}");
        let held =
            segs.get(drop).map(|s| Held { oldest_point: s.first_seq - 1, oldest_time_us: s.first_time_us });
        assert_eq!(plan.held, held, "{case}");
    }
}

#[test]
fn a_source_clock_stepping_back_never_drops_younger_records() {
    // The third segment was captured by a clock set hours back: it looks old, but the segment
    // before it does not, so the run stops there and it is kept.
    let mut segs = hourly(4, 10);
    segs[2].first_time_us = 0;
    segs[2].newest_time_us = S;
    let plan = rule(3, SizeLimit::Unlimited, 0).plan(&segs, at(4));
    assert_eq!(plan.drop, 1, "{plan:?}");
}

/// A ransomware flood on a virtual clock: the source overwrites everything at once, fast. The
/// size limit drops old points but never the last hour (`min`); the replica pauses until time
/// makes room, and the good points of the hour before the attack are still held throughout.
#[test]
fn a_flood_of_overwrites_pauses_instead_of_cutting_the_minimum_window() {
    let r = rule(24, SizeLimit::Bytes(10_000), 1);
    let mut segs: Vec<Segment> = Vec::new();
    let mut now = 0;
    let add = |segs: &mut Vec<Segment>, now: u64, bytes: u64| {
        let seq = segs.last().map_or(1, |s| s.last_seq + 1);
        segs.push(Segment { first_seq: seq, last_seq: seq, first_time_us: now, newest_time_us: now, bytes });
    };
    // Ten quiet hours: one small segment a minute.
    while now < 10 * H {
        add(&mut segs, now, 10);
        now += 60 * S;
    }
    let attack = now;
    let last_good = *segs.last().expect("quiet hours");
    let mut paused_at = None;
    // The flood: 1000 bytes a second, retention run after each segment.
    while now < attack + 2 * H {
        let plan = r.plan(&segs, Facts { now_us: now, replica_bytes: 0, need_bytes: 0, pin: None });
        for gone in segs.drain(..plan.drop) {
            assert!(gone.newest_time_us < now - H, "a record of the last hour was dropped at {now}");
        }
        let total: u64 = segs.iter().map(|s| s.bytes).sum();
        let held = plan.held.expect("history is never emptied by a flood");
        if plan.pause {
            // Paused: no new writes until time makes room again.
            paused_at.get_or_insert(now);
            assert!(total > 10_000);
        } else {
            assert!(total <= 10_000, "over the limit without pausing: {total}");
            add(&mut segs, now, 1000);
        }
        if now <= last_good.newest_time_us + H {
            // The last good point is within the minimum window: it is held.
            assert!(held.oldest_point < last_good.last_seq, "a point before the attack is held at {now}");
        }
        now += S;
    }
    assert!(paused_at.is_some_and(|p| p < attack + 60 * S), "the flood paused the source within a minute");
}
