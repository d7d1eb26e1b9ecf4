//! Time, as the monitor and the step runner see it: the system's, or a virtual one in tests.

use std::sync::atomic::{AtomicU64, Ordering};

/// A source of time in microseconds since the Unix epoch.
///
/// The decision cores never read the time themselves; the shells read a clock and pass the
/// values in, so tests drive them on a [`VirtualClock`] and never wait for real seconds.
pub trait Clock: Send + Sync {
    /// Now, in microseconds since the Unix epoch.
    fn now_us(&self) -> u64;
}

/// The system's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_us(&self) -> u64 {
        doppel_link::framed::now_us()
    }
}

/// A clock that moves only when told to.
#[derive(Debug, Default)]
pub struct VirtualClock(AtomicU64);

impl VirtualClock {
    /// A clock reading `us`.
    pub fn at(us: u64) -> VirtualClock {
        VirtualClock(AtomicU64::new(us))
    }

    /// Moves the clock `us` forward.
    pub fn advance_us(&self, us: u64) {
        self.0.fetch_add(us, Ordering::SeqCst);
    }
}

impl Clock for VirtualClock {
    fn now_us(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}
