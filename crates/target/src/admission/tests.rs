use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::*;

fn v4(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(192, 0, 2, last))
}

fn v6(s: &str) -> IpAddr {
    IpAddr::V6(s.parse::<Ipv6Addr>().unwrap())
}

#[test]
fn per_address_cap_closes_the_excess_of_one_address_only() {
    let mut h = Handshakes::new(HandshakeLimits { max_total: 64, max_per_address: 8 });
    for _ in 0..8 {
        assert_eq!(h.start(v4(1)), Admission::Admitted);
    }
    for _ in 0..100 {
        assert_eq!(h.start(v4(1)), Admission::OverAddress);
    }
    // Another address is not affected by the first one's flood.
    assert_eq!(h.start(v4(2)), Admission::Admitted);
    assert_eq!((h.in_flight(), h.in_flight_from(v4(1)), h.in_flight_from(v4(2))), (9, 8, 1));
    assert_eq!((h.over_address, h.over_total, h.refused()), (100, 0, 100));
    // A finished handshake frees its address's slot, and only that.
    h.finish(v4(1));
    assert_eq!(h.start(v4(1)), Admission::Admitted);
    assert_eq!(h.start(v4(1)), Admission::OverAddress);
}

#[test]
fn total_cap_holds_across_addresses_and_frees_as_handshakes_end() {
    let mut h = Handshakes::new(HandshakeLimits { max_total: 4, max_per_address: 3 });
    for a in [1, 1, 2, 3] {
        assert_eq!(h.start(v4(a)), Admission::Admitted);
    }
    assert_eq!(h.start(v4(4)), Admission::OverTotal);
    assert_eq!(h.start(v4(1)), Admission::OverTotal);
    h.finish(v4(2));
    assert_eq!(h.in_flight_from(v4(2)), 0);
    assert_eq!(h.start(v4(4)), Admission::Admitted);
    assert_eq!((h.in_flight(), h.over_total), (4, 2));
    for a in [1, 1, 3, 4] {
        h.finish(v4(a));
    }
    assert_eq!(h.in_flight(), 0);
    // Nothing is left behind for addresses that came and went.
    assert!(h.by_addr.is_empty());
}

#[test]
fn finishing_what_was_never_admitted_changes_nothing() {
    let mut h = Handshakes::new(HandshakeLimits { max_total: 2, max_per_address: 1 });
    assert_eq!(h.start(v4(1)), Admission::Admitted);
    h.finish(v4(9));
    assert_eq!(h.in_flight(), 1);
}

#[test]
fn ipv6_counts_by_slash_64_and_mapped_v4_as_v4() {
    let mut h = Handshakes::new(HandshakeLimits { max_total: 64, max_per_address: 2 });
    assert_eq!(h.start(v6("2001:db8:1:1::1")), Admission::Admitted);
    assert_eq!(h.start(v6("2001:db8:1:1:ffff::2")), Admission::Admitted);
    // The same /64, another interface id: the same subscriber.
    assert_eq!(h.start(v6("2001:db8:1:1:1234::9")), Admission::OverAddress);
    // Another /64 is another address.
    assert_eq!(h.start(v6("2001:db8:1:2::1")), Admission::Admitted);
    // An IPv4 peer on a dual-stack socket is its IPv4 address.
    assert_eq!(h.start(v6("::ffff:192.0.2.7")), Admission::Admitted);
    assert_eq!(h.start(v4(7)), Admission::Admitted);
    assert_eq!(h.start(v4(7)), Admission::OverAddress);
}

#[test]
fn zero_caps_count_as_one() {
    let mut h = Handshakes::new(HandshakeLimits { max_total: 0, max_per_address: 0 });
    assert_eq!(h.start(v4(1)), Admission::Admitted);
    assert_eq!(h.start(v4(2)), Admission::OverTotal);
}

fn os(errno: i32) -> io::Error {
    io::Error::from_raw_os_error(errno)
}

#[test]
fn accept_errors_are_classed() {
    for e in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
        assert_eq!(AcceptError::of(&os(e)), AcceptError::Exhausted, "{e}");
    }
    for e in [libc::ECONNABORTED, libc::EPERM, libc::EINTR, libc::EPROTO] {
        assert_eq!(AcceptError::of(&os(e)), AcceptError::Connection, "{e}");
    }
    assert_eq!(AcceptError::of(&os(libc::EBADF)), AcceptError::Other);
    assert_eq!(AcceptError::of(&io::Error::other("no errno")), AcceptError::Other);
}

#[test]
fn backoff_grows_to_its_cap_and_starts_over_after_a_success() {
    let mut b = AcceptBackoff::default();
    let waits: Vec<Duration> = (0..10).map(|_| b.on_error(AcceptError::Exhausted)).collect();
    let ms = |n| Duration::from_millis(n);
    assert_eq!(
        waits,
        [ms(10), ms(20), ms(40), ms(80), ms(160), ms(320), ms(640), ms(1000), ms(1000), ms(1000)]
    );
    // A reset connection costs no wait and does not move the backoff.
    assert_eq!(b.on_error(AcceptError::Connection), Duration::ZERO);
    assert_eq!(b.on_error(AcceptError::Other), ms(1000));
    b.on_success();
    assert_eq!(b.on_error(AcceptError::Other), ms(10));
    assert_eq!(b.on_error(AcceptError::Exhausted), ms(20));
}

/// An accept loop failing with EMFILE for a minute, on a virtual clock: it tries about once a
/// second (not millions of times), and logs about once per warning interval.
#[test]
fn a_minute_of_emfile_costs_few_attempts_and_few_lines() {
    let t0 = Instant::now();
    let mut now = t0;
    let (mut b, mut w) = (AcceptBackoff::default(), Warnings::default());
    let (mut attempts, mut lines, mut counted) = (0u64, 0u64, 0u64);
    while now < t0 + Duration::from_secs(60) {
        attempts += 1;
        if let Some(suppressed) = w.hit(now) {
            lines += 1;
            counted += 1 + suppressed;
        }
        now += b.on_error(AcceptError::of(&os(libc::EMFILE)));
    }
    assert!(attempts < 70, "{attempts} attempts");
    assert!(lines <= 7, "{lines} lines");
    // Every failure is accounted for in some line, but the ones since the last line.
    assert!(counted <= attempts && attempts - counted < 12, "{counted} of {attempts}");
}

#[test]
fn warnings_are_one_line_per_interval_with_the_count_suppressed() {
    let t0 = Instant::now();
    let s = Duration::from_secs;
    let mut w = Warnings::every(s(10));
    assert_eq!(w.hit(t0), Some(0));
    for i in 1..=500 {
        assert_eq!(w.hit(t0 + Duration::from_millis(i * 10)), None);
    }
    assert_eq!(w.hit(t0 + s(10)), Some(500));
    assert_eq!(w.hit(t0 + s(11)), None);
    // A quiet spell: the next one is logged at once, with what was suppressed before it.
    assert_eq!(w.hit(t0 + s(100)), Some(1));
    assert_eq!(w.hit(t0 + s(200)), Some(0));
}
