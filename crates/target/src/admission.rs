//! What the accept loop does before a peer is authenticated, as pure decisions.
//!
//! Anyone who can reach the target's port can open connections. Until a connection has
//! finished its TLS handshake and sent its Hello it has proved nothing, yet each one costs a
//! file descriptor, handshake state and a task. So that unauthenticated peers cannot exhaust
//! those (and, through them, lock allowed sources out), the accept loop ([`crate::server`])
//! asks this module:
//!
//! - [`Handshakes`]: whether a new connection may start its handshake. At most
//!   `max_total` handshakes are in flight, at most `max_per_address` from one address (an
//!   IPv6 peer counts by its /64, which one subscriber usually holds whole). A connection
//!   over either cap is closed at once, before any TLS work, and counted.
//! - [`AcceptBackoff`]: how long to wait after `accept` failed. Out of file descriptors or
//!   memory, the listener stays readable and `accept` fails again at once: retrying without
//!   a pause is a busy loop. The wait grows from [`BACKOFF_MIN`] to [`BACKOFF_MAX`] and
//!   starts over after a success. Errors that concern one connection only (it was reset
//!   before it was accepted) are not waited on: a peer could otherwise slow the loop down by
//!   resetting its own connections.
//! - [`Warnings`]: whether a warning may be logged now: at most one line per interval per
//!   kind, carrying the count of those suppressed since, so a flood of connections cannot
//!   flood the log.
//!
//! Every decision takes the time as an argument, so the tests run on a virtual clock.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// First wait after an `accept` error.
pub const BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest wait after `accept` errors in a row.
pub const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// At most one warning line of each kind per this interval.
pub const WARN_EVERY: Duration = Duration::from_secs(10);

/// Default cap on handshakes in flight.
pub const MAX_HANDSHAKES: usize = 64;
/// Default cap on handshakes in flight from one address.
pub const MAX_HANDSHAKES_PER_ADDRESS: usize = 8;

/// The caps on handshakes in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeLimits {
    /// In total.
    pub max_total: usize,
    /// From one address (IPv4) or one /64 (IPv6).
    pub max_per_address: usize,
}

impl Default for HandshakeLimits {
    fn default() -> HandshakeLimits {
        HandshakeLimits { max_total: MAX_HANDSHAKES, max_per_address: MAX_HANDSHAKES_PER_ADDRESS }
    }
}

/// Whether a new connection may start its handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// It may: call [`Handshakes::finish`] once its handshake is over, however it ended.
    Admitted,
    /// `max_total` handshakes are in flight.
    OverTotal,
    /// `max_per_address` handshakes from its address are in flight.
    OverAddress,
}

/// What counts as one address for the per-address cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum AddrKey {
    V4(u32),
    /// The /64 prefix.
    V6(u64),
}

impl From<IpAddr> for AddrKey {
    fn from(ip: IpAddr) -> AddrKey {
        match ip {
            IpAddr::V4(v4) => AddrKey::V4(v4.into()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => AddrKey::V4(v4.into()),
                None => AddrKey::V6((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

/// The handshakes in flight, by address.
#[derive(Debug, Clone, Default)]
pub struct Handshakes {
    limits: HandshakeLimits,
    total: usize,
    by_addr: HashMap<AddrKey, usize>,
    /// Connections closed over the total cap, since this started.
    pub over_total: u64,
    /// Connections closed over the per-address cap, since this started.
    pub over_address: u64,
}

impl Handshakes {
    /// No handshake in flight, under `limits` (a cap of 0 counts as 1).
    pub fn new(limits: HandshakeLimits) -> Handshakes {
        let limits = HandshakeLimits {
            max_total: limits.max_total.max(1),
            max_per_address: limits.max_per_address.max(1),
        };
        Handshakes { limits, ..Handshakes::default() }
    }

    /// Whether a connection from `ip` may start its handshake; if so, it counts as in flight
    /// until [`Handshakes::finish`].
    pub fn start(&mut self, ip: IpAddr) -> Admission {
        if self.total >= self.limits.max_total {
            self.over_total += 1;
            return Admission::OverTotal;
        }
        let n = self.by_addr.entry(ip.into()).or_default();
        if *n >= self.limits.max_per_address {
            self.over_address += 1;
            return Admission::OverAddress;
        }
        *n += 1;
        self.total += 1;
        Admission::Admitted
    }

    /// The handshake of an admitted connection from `ip` is over (done, failed or timed out).
    pub fn finish(&mut self, ip: IpAddr) {
        let key = AddrKey::from(ip);
        if let Some(n) = self.by_addr.get_mut(&key) {
            *n -= 1;
            self.total -= 1;
            if *n == 0 {
                self.by_addr.remove(&key);
            }
        }
    }

    /// Handshakes in flight.
    pub fn in_flight(&self) -> usize {
        self.total
    }

    /// Handshakes in flight from `ip`'s address.
    pub fn in_flight_from(&self, ip: IpAddr) -> usize {
        self.by_addr.get(&ip.into()).copied().unwrap_or(0)
    }

    /// Connections closed over a cap, since this started.
    pub fn refused(&self) -> u64 {
        self.over_total + self.over_address
    }
}

/// What an `accept` error means for the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptError {
    /// Out of a resource (file descriptors, socket buffers, memory): `accept` fails again at
    /// once until some is freed.
    Exhausted,
    /// One connection failed before it was accepted (reset, aborted, refused by a firewall
    /// rule): the next one may well succeed.
    Connection,
    /// Anything else: not known to pass, so waited on like exhaustion.
    Other,
}

impl AcceptError {
    /// The class of `e`.
    pub fn of(e: &io::Error) -> AcceptError {
        match e.raw_os_error() {
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => AcceptError::Exhausted,
            Some(
                libc::ECONNABORTED
                | libc::ECONNRESET
                | libc::EINTR
                | libc::EAGAIN
                | libc::EPROTO
                | libc::EPERM
                | libc::ETIMEDOUT
                | libc::ENETDOWN
                | libc::ENETUNREACH
                | libc::EHOSTDOWN
                | libc::EHOSTUNREACH
                | libc::ENONET
                | libc::ENOPROTOOPT
                | libc::EOPNOTSUPP,
            ) => AcceptError::Connection,
            _ => AcceptError::Other,
        }
    }
}

/// The wait after `accept` errors in a row.
#[derive(Debug, Clone, Default)]
pub struct AcceptBackoff {
    next: Option<Duration>,
}

impl AcceptBackoff {
    /// How long to wait before accepting again after an error of class `e` (zero: at once).
    pub fn on_error(&mut self, e: AcceptError) -> Duration {
        if e == AcceptError::Connection {
            return Duration::ZERO;
        }
        let wait = self.next.unwrap_or(BACKOFF_MIN);
        self.next = Some((wait * 2).min(BACKOFF_MAX));
        wait
    }

    /// `accept` succeeded: the next error waits [`BACKOFF_MIN`] again.
    pub fn on_success(&mut self) {
        self.next = None;
    }
}

/// One kind of warning, logged at most once per interval.
#[derive(Debug, Clone)]
pub struct Warnings {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl Default for Warnings {
    fn default() -> Warnings {
        Warnings::every(WARN_EVERY)
    }
}

impl Warnings {
    /// At most one line per `every`.
    pub fn every(every: Duration) -> Warnings {
        Warnings { every, last: None, suppressed: 0 }
    }

    /// Something worth a warning happened at `now`: `Some(n)` if a line is to be logged now,
    /// `n` being how many were suppressed since the last line; `None` if this one is
    /// suppressed (and counted).
    pub fn hit(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < self.every => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests;
