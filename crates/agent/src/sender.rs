//! The sending half of a session: spool → batches → link, in a window of unacknowledged
//! bytes sized to the bandwidth-delay product, with compression that adapts to the link.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use doppel_link::LinkError;
use doppel_proto::{Message, pack_batch};
use doppel_spool::Spool;
use tokio::sync::{Notify, mpsc};

/// Raw bytes of ops per batch.
const BATCH_BYTES: usize = 1 << 20;
/// Smallest and largest window.
const MIN_WINDOW: u64 = 8 << 20;
const MAX_WINDOW: u64 = 256 << 20;

/// How batches are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Raw.
    Off,
    /// A fixed zstd level.
    Level(i32),
    /// Starts at level 3, goes up while the link is the bottleneck and down while the CPU is.
    Auto,
}

impl Compression {
    /// Parses `off`, `fast`, `balanced`, `max`, `auto`, or a zstd level 1-19.
    pub fn parse(s: &str) -> Result<Compression, String> {
        Ok(match s.trim() {
            "off" | "none" | "0" => Compression::Off,
            "fast" => Compression::Level(1),
            "balanced" => Compression::Level(3),
            "max" => Compression::Level(19),
            "auto" => Compression::Auto,
            n => match n.parse::<i32>() {
                Ok(l @ 1..=19) => Compression::Level(l),
                _ => {
                    return Err(format!(
                        "bad compression {s:?}: use off, fast, balanced, max, auto or a level 1-19"
                    ));
                }
            },
        })
    }
}

/// Levels `auto` moves between (higher ones cost far more CPU than a link usually saves).
const LADDER: [i32; 4] = [1, 3, 6, 9];

/// Chooses the level of each batch.
pub struct Compressor {
    mode: Compression,
    step: usize,
    busy: Duration,
    waited: Duration,
    since: Instant,
    /// The level in use, for status (0: off).
    pub current: Arc<AtomicU64>,
}

impl Compressor {
    /// A compressor in `mode`, reporting its level to `current`.
    pub fn new(mode: Compression, current: Arc<AtomicU64>) -> Compressor {
        let c = Compressor {
            mode,
            step: 1,
            busy: Duration::ZERO,
            waited: Duration::ZERO,
            since: Instant::now(),
            current,
        };
        c.current.store(c.level().unwrap_or(0) as u64, Ordering::Relaxed);
        c
    }

    /// The level for the next batch.
    pub fn level(&self) -> Option<i32> {
        match self.mode {
            Compression::Off => None,
            Compression::Level(l) => Some(l),
            Compression::Auto => Some(LADDER[self.step]),
        }
    }

    /// Records time spent compressing and time spent waiting for the link, and whether the
    /// batch compressed at all; in `auto` mode, adjusts the level: to the cheapest when data
    /// does not compress, and once a second down when compressing takes most of the time (the
    /// CPU is the bottleneck), up when waiting for the link does and compression is cheap.
    pub fn observe(&mut self, busy: Duration, waited: Duration, compressed: bool) {
        self.busy += busy;
        self.waited += waited;
        if self.mode == Compression::Auto && !compressed && self.step > 0 {
            self.step = 0;
            self.current.store(self.level().unwrap_or(0) as u64, Ordering::Relaxed);
        }
        let elapsed = self.since.elapsed();
        if elapsed < Duration::from_secs(1) {
            return;
        }
        if self.mode == Compression::Auto {
            let cpu = self.busy.as_secs_f64() / elapsed.as_secs_f64();
            let link = self.waited.as_secs_f64() / elapsed.as_secs_f64();
            if cpu > 0.5 && self.step > 0 {
                self.step -= 1;
            } else if link > 0.5 && cpu < 0.25 && self.step + 1 < LADDER.len() {
                self.step += 1;
            }
            self.current.store(self.level().unwrap_or(0) as u64, Ordering::Relaxed);
        }
        self.busy = Duration::ZERO;
        self.waited = Duration::ZERO;
        self.since = Instant::now();
    }
}

struct InFlight {
    batches: VecDeque<(u64, u64, Instant)>,
    bytes: u64,
    /// Smoothed time from sending a batch to its ack.
    latency: Option<Duration>,
    /// Smoothed acknowledged bytes per second.
    rate: Option<f64>,
    last_ack: Option<Instant>,
    max: u64,
}

/// Batches sent and not yet acknowledged. The limit follows the bandwidth-delay product:
/// twice the acknowledged byte rate times the time an ack takes (which includes the target's
/// commit interval), between 8 MiB and 256 MiB.
pub struct Window {
    inner: Mutex<InFlight>,
    freed: Notify,
    /// The current limit, for status.
    pub limit: AtomicU64,
    /// The smoothed ack latency in microseconds, for status.
    pub latency_us: AtomicU64,
}

impl Window {
    /// A window starting at `initial` bytes.
    pub fn new(initial: u64) -> Window {
        let max = initial.clamp(MIN_WINDOW, MAX_WINDOW);
        Window {
            inner: Mutex::new(InFlight {
                batches: VecDeque::new(),
                bytes: 0,
                latency: None,
                rate: None,
                last_ack: None,
                max,
            }),
            freed: Notify::new(),
            limit: AtomicU64::new(max),
            latency_us: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, InFlight> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until the window has room.
    pub async fn wait_room(&self) {
        loop {
            let notified = self.freed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let g = self.lock();
                if g.bytes < g.max {
                    return;
                }
            }
            notified.await;
        }
    }

    /// A batch ending at `last_seq` of `bytes` was sent.
    pub fn sent(&self, last_seq: u64, bytes: u64) {
        let mut g = self.lock();
        g.batches.push_back((last_seq, bytes, Instant::now()));
        g.bytes += bytes;
    }

    /// Everything up to `seq` is acknowledged.
    pub fn acked(&self, seq: u64) {
        let mut g = self.lock();
        let now = Instant::now();
        let mut freed = 0;
        let mut sent_at = None;
        while g.batches.front().is_some_and(|(last, _, _)| *last <= seq) {
            let (_, b, t) = g.batches.pop_front().expect("front exists");
            g.bytes -= b;
            freed += b;
            sent_at = Some(t);
        }
        if let Some(t) = sent_at {
            let sample = now.duration_since(t);
            g.latency = Some(g.latency.map_or(sample, |l| (l * 7 + sample) / 8));
            if let Some(prev) = g.last_ack {
                let dt = now.duration_since(prev).as_secs_f64().max(1e-3);
                let r = freed as f64 / dt;
                g.rate = Some(g.rate.map_or(r, |old| old * 0.875 + r * 0.125));
            }
            g.last_ack = Some(now);
            if let (Some(l), Some(r)) = (g.latency, g.rate) {
                g.max = ((2.0 * r * l.as_secs_f64()) as u64).clamp(MIN_WINDOW, MAX_WINDOW);
                self.limit.store(g.max, Ordering::Relaxed);
            }
            self.latency_us.store(g.latency.map_or(0, |l| l.as_micros() as u64), Ordering::Relaxed);
        }
        drop(g);
        self.freed.notify_waiters();
    }
}

/// Counts bytes sent again after a reconnect (sequences already sent by an earlier session).
#[derive(Default)]
pub struct Resends {
    /// Highest sequence ever sent, across sessions.
    pub max_sent: AtomicU64,
    /// Batch bytes that covered sequences sent before.
    pub bytes: AtomicU64,
}

/// Streams the spool from `next` until the spool closes or the link fails.
pub async fn send(
    spool: Arc<Spool>,
    out: mpsc::Sender<Message>,
    window: Arc<Window>,
    mut compressor: Compressor,
    resends: Arc<Resends>,
    mut next: u64,
) -> Result<(), LinkError> {
    loop {
        spool.wait_for(next).await;
        let waiting = Instant::now();
        window.wait_room().await;
        let mut waited = waiting.elapsed();
        let (first, records) =
            spool.read(next, BATCH_BYTES).map_err(|e| LinkError::Protocol(e.to_string()))?;
        if records.is_empty() {
            // Only a closed spool wakes us without a record.
            return Ok(());
        }
        let t = Instant::now();
        let level = compressor.level();
        let batch = pack_batch(first, &records, level);
        let busy = t.elapsed();
        let compressed = level.is_none() || batch.codec == doppel_proto::Codec::Zstd;
        let n = records.len() as u64;
        let last = first + n - 1;
        let size = batch.payload.len() as u64;
        let sending = Instant::now();
        out.send(Message::Batch(batch)).await.map_err(|_| LinkError::Closed)?;
        waited += sending.elapsed();
        compressor.observe(busy, waited, compressed);
        if first <= resends.max_sent.load(Ordering::Relaxed) {
            resends.bytes.fetch_add(size, Ordering::Relaxed);
        }
        resends.max_sent.fetch_max(last, Ordering::Relaxed);
        window.sent(last, size);
        next = last + 1;
    }
}
