//! What every fuzz target checks besides "no panic": the memory a decode takes, measured by a
//! counting global allocator, stays within the bound the stable harness asserts
//! (`crates/link/tests/fuzz.rs`): a fixed 4 MiB plus 80 bytes per byte received (plus 80 per
//! byte a zstd batch declares it decodes to, itself capped). libFuzzer's own `-timeout` and
//! `-rss_limit_mb` catch hangs and leaks.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// Memory any decode may use whatever its input.
pub const FIXED: usize = 4 << 20;
/// Memory per byte received.
pub const PER_BYTE: usize = 80;

/// Counts live bytes, their peak and the largest allocation, per thread, while [`check`] runs.
pub struct Meter;

thread_local! {
    static ON: Cell<bool> = const { Cell::new(false) };
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn grew(n: usize) {
    let _ = ON.try_with(|on| {
        if on.get() {
            let live = LIVE.get() + n as isize;
            LIVE.set(live);
            PEAK.set(PEAK.get().max(live));
            LARGEST.set(LARGEST.get().max(n));
        }
    });
}

fn shrank(n: usize) {
    let _ = ON.try_with(|on| {
        if on.get() {
            LIVE.set(LIVE.get() - n as isize);
        }
    });
}

// SAFETY: every call goes to `System` unchanged; the counting touches only const-initialized
// thread locals without destructors, which never allocate.
unsafe impl GlobalAlloc for Meter {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        shrank(l.size());
    }

    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            grew(new);
            shrank(l.size());
        }
        q
    }
}

/// Runs a decode of `n` received bytes (`declared` more it may legitimately decode to) and
/// panics, which libFuzzer reports as a crash, if it took more memory than the bound.
pub fn check<R>(n: usize, declared: usize, f: impl FnOnce() -> R) -> R {
    LIVE.set(0);
    PEAK.set(0);
    LARGEST.set(0);
    ON.set(true);
    let r = f();
    ON.set(false);
    let limit = FIXED + PER_BYTE * (n + declared);
    let (peak, largest) = (PEAK.get().max(0) as usize, LARGEST.get());
    assert!(
        peak <= limit && largest <= limit,
        "a decode of {n} bytes (+{declared} declared) peaked at {peak} bytes (largest {largest}), above {limit}"
    );
    r
}

/// Whether a path on the wire may name something in a replica, written apart from `RelPath`'s
/// own check so the two can be compared.
pub fn acceptable(p: &[u8]) -> bool {
    p.is_empty()
        || (p.len() <= 4095
            && !p.contains(&0)
            && p.split(|&b| b == b'/').all(|c| !c.is_empty() && c != b"." && c != b".." && c.len() <= 255))
}
