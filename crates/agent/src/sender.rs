//! The sending half of a session: spool → batches → link, in a window of unacknowledged
//! bytes sized to the bandwidth-delay product, with compression that adapts to the link.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use doppel_link::LinkError;
use doppel_proto::{Message, Packer};
use doppel_spool::Spool;
use parking_lot::Mutex;
use tokio::sync::{Notify, mpsc};

/// Raw bytes of ops per batch.
const BATCH_BYTES: usize = 1 << 20;

/// While earlier batches await their ack, the sender waits up to this long for
/// [`COALESCE_RECORDS`] records before sending what it has. Without it, records that arrive
/// one by one (a comparison of small files) went out two per batch: a batch, a TLS record and
/// a system call on each side per file. The delay is small next to the ack it waits behind
/// (the target commits every 100 ms), and an idle link sends at once.
const COALESCE: Duration = Duration::from_millis(5);

/// Records that make a batch worth sending without waiting [`COALESCE`].
const COALESCE_RECORDS: u64 = 1024;
// A batch holds records of at most BATCH_BYTES in total, each behind a 4-byte length (a record
// is at least 4 bytes: at most doubling it), and one record beyond the budget (a write carries
// at most 1 MiB, plus its path): the target refuses a batch decoding to more than
// MAX_BATCH_RAW.
const _: () = assert!(2 * BATCH_BYTES + (1 << 20) + (64 << 10) <= doppel_proto::MAX_BATCH_RAW as usize);
/// Smallest and largest window.
const MIN_WINDOW: u64 = 8 << 20;
const MAX_WINDOW: u64 = 256 << 20;

/// A compression setting that is none of the known words or levels.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad compression {0:?}: use off, fast, balanced, max, auto or a level 1-19")]
pub struct BadCompression(pub String);

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
    pub fn parse(s: &str) -> Result<Compression, BadCompression> {
        Ok(match s.trim() {
            "off" | "none" | "0" => Compression::Off,
            "fast" => Compression::Level(1),
            "balanced" => Compression::Level(3),
            "max" => Compression::Level(19),
            "auto" => Compression::Auto,
            n => match n.parse::<i32>() {
                Ok(l @ 1..=19) => Compression::Level(l),
                _ => return Err(BadCompression(s.to_string())),
            },
        })
    }
}

/// Levels `auto` moves between (higher ones cost far more CPU than a link usually saves).
const LADDER: [i32; 4] = [1, 3, 6, 9];

/// The `auto` level decision, fed with explicit times: the pure core of [`Compressor`].
///
/// Over each period of at least a second it adds up time spent compressing (`busy`) and time
/// spent waiting for the link (`waited`): compressing more than half the time means the CPU is
/// the bottleneck (a step down); waiting more than half the time while compressing less than a
/// quarter means the link is (a step up: more compression for little CPU). Data that does not
/// compress drops to the cheapest level at once.
#[derive(Debug, Clone)]
pub struct Levels {
    mode: Compression,
    step: usize,
    busy: Duration,
    waited: Duration,
    since: Instant,
}

impl Levels {
    /// Levels in `mode`, the first period starting at `now` (`auto` starts at level 3).
    pub fn new(mode: Compression, now: Instant) -> Levels {
        Levels { mode, step: 1, busy: Duration::ZERO, waited: Duration::ZERO, since: now }
    }

    /// The level for the next batch (`None`: raw).
    pub fn level(&self) -> Option<i32> {
        match self.mode {
            Compression::Off => None,
            Compression::Level(l) => Some(l),
            Compression::Auto => Some(LADDER[self.step]),
        }
    }

    /// A batch took `busy` to compress and `waited` for the link, and `compressed` says whether
    /// it compressed at all; `now` is when this is observed.
    pub fn observe(&mut self, busy: Duration, waited: Duration, compressed: bool, now: Instant) {
        self.busy += busy;
        self.waited += waited;
        if self.mode == Compression::Auto && !compressed {
            self.step = 0;
        }
        let elapsed = now.saturating_duration_since(self.since);
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
        }
        self.busy = Duration::ZERO;
        self.waited = Duration::ZERO;
        self.since = now;
    }
}

/// Chooses the level of each batch ([`Levels`] on the real clock) and reports it for status.
pub struct Compressor {
    levels: Levels,
    /// The level in use, for status (0: off).
    pub current: Arc<AtomicU64>,
}

impl Compressor {
    /// A compressor in `mode`, reporting its level to `current`.
    pub fn new(mode: Compression, current: Arc<AtomicU64>) -> Compressor {
        let c = Compressor { levels: Levels::new(mode, Instant::now()), current };
        c.report();
        c
    }

    /// The level for the next batch.
    pub fn level(&self) -> Option<i32> {
        self.levels.level()
    }

    /// Records time spent compressing and waiting for the link, and whether the batch
    /// compressed at all; in `auto` mode, adjusts the level (see [`Levels`]).
    pub fn observe(&mut self, busy: Duration, waited: Duration, compressed: bool) {
        self.levels.observe(busy, waited, compressed, Instant::now());
        self.report();
    }

    fn report(&self) {
        self.current.store(self.level().unwrap_or(0) as u64, Ordering::Relaxed);
    }
}

/// The window's arithmetic, fed with explicit times: the pure core of [`Window`].
///
/// The limit follows the bandwidth-delay product: twice the smoothed acknowledged byte rate
/// times the delay an unqueued batch sees, between 8 MiB and 256 MiB. That delay is the
/// smallest send-to-ack time of the session plus the smoothed time between acks (the target's
/// commit cadence): not the smoothed send-to-ack time, which also counts the time batches wait
/// in the target's queue. A queue the window itself fills would then grow the window, which
/// would grow the queue: with a target slower than the source (many small files), the window
/// doubled every round trip up to the ceiling, and a measured mirror of 400,000 small files ran
/// with acks 56 s late and 42 MB in flight. The rate and the gap are smoothed over about eight
/// samples so that one slow commit does not halve the window; the rate needs two acks, so the
/// first one only measures the latency and the limit stays where it started.
#[derive(Debug, Clone)]
pub struct InFlight {
    /// Sent batches not yet acknowledged: last sequence, bytes, when sent.
    batches: VecDeque<(u64, u64, Instant)>,
    bytes: u64,
    /// Smoothed time from sending a batch to its ack (for status: it includes queueing).
    latency: Option<Duration>,
    /// Smallest time from sending a batch to its ack: the delay without a queue.
    min_latency: Option<Duration>,
    /// Smoothed time between acks that freed something.
    gap: Option<Duration>,
    /// Smoothed acknowledged bytes per second.
    rate: Option<f64>,
    last_ack: Option<Instant>,
    max: u64,
}

impl InFlight {
    /// Nothing in flight, the limit at `initial` (clamped).
    pub fn new(initial: u64) -> InFlight {
        InFlight {
            batches: VecDeque::new(),
            bytes: 0,
            latency: None,
            min_latency: None,
            gap: None,
            rate: None,
            last_ack: None,
            max: initial.clamp(MIN_WINDOW, MAX_WINDOW),
        }
    }

    /// Whether another batch may be sent.
    pub fn has_room(&self) -> bool {
        self.bytes < self.max
    }

    /// Bytes sent and not acknowledged.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The current limit.
    pub fn limit(&self) -> u64 {
        self.max
    }

    /// The smoothed ack latency.
    pub fn latency(&self) -> Option<Duration> {
        self.latency
    }

    /// A batch ending at `last_seq` of `bytes` was sent at `now`.
    pub fn sent(&mut self, last_seq: u64, bytes: u64, now: Instant) {
        self.batches.push_back((last_seq, bytes, now));
        self.bytes += bytes;
    }

    /// Everything up to `seq` was acknowledged at `now`; returns the bytes freed.
    pub fn acked(&mut self, seq: u64, now: Instant) -> u64 {
        let mut freed = 0;
        let mut sent_at = None;
        while let Some(&(last, b, t)) = self.batches.front()
            && last <= seq
        {
            self.batches.pop_front();
            self.bytes -= b;
            freed += b;
            sent_at = Some(t);
        }
        let Some(t) = sent_at else { return 0 };
        let sample = now.saturating_duration_since(t);
        self.latency = Some(self.latency.map_or(sample, |l| (l * 7 + sample) / 8));
        self.min_latency = Some(self.min_latency.map_or(sample, |m| m.min(sample)));
        if let Some(prev) = self.last_ack {
            let gap = now.saturating_duration_since(prev);
            self.gap = Some(self.gap.map_or(gap, |g| (g * 7 + gap) / 8));
            let dt = gap.as_secs_f64().max(1e-3);
            let r = freed as f64 / dt;
            self.rate = Some(self.rate.map_or(r, |old| old * 0.875 + r * 0.125));
        }
        self.last_ack = Some(now);
        if let (Some(l), Some(g), Some(r)) = (self.min_latency, self.gap, self.rate) {
            let delay = (l + g).as_secs_f64();
            self.max = ((2.0 * r * delay) as u64).clamp(MIN_WINDOW, MAX_WINDOW);
        }
        freed
    }
}

/// Batches sent and not yet acknowledged, limited as [`InFlight`] says, on the real clock;
/// the sender waits here for room.
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
        let core = InFlight::new(initial);
        Window {
            limit: AtomicU64::new(core.limit()),
            inner: Mutex::new(core),
            freed: Notify::new(),
            latency_us: AtomicU64::new(0),
        }
    }

    /// Waits until the window has room.
    pub async fn wait_room(&self) {
        loop {
            let notified = self.freed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.inner.lock().has_room() {
                return;
            }
            notified.await;
        }
    }

    /// Bytes sent and not yet acknowledged.
    pub fn in_flight(&self) -> u64 {
        self.inner.lock().bytes()
    }

    /// A batch ending at `last_seq` of `bytes` was sent.
    pub fn sent(&self, last_seq: u64, bytes: u64) {
        self.inner.lock().sent(last_seq, bytes, Instant::now());
    }

    /// Everything up to `seq` is acknowledged.
    pub fn acked(&self, seq: u64) {
        let mut g = self.inner.lock();
        if g.acked(seq, Instant::now()) > 0 {
            self.limit.store(g.limit(), Ordering::Relaxed);
            self.latency_us.store(g.latency().map_or(0, |l| l.as_micros() as u64), Ordering::Relaxed);
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

/// Whether `records` make a batch worth sending at once, even behind unacknowledged ones:
/// [`COALESCE_RECORDS`] of them, or half a batch of bytes. Counting records alone made every
/// batch of a big file's 1 MiB writes wait out [`COALESCE`] (a budget of 16 MiB never holds
/// 1,024 of them), which capped a local mirror of big files at about 200 MB/s.
fn worth_a_batch(records: &[impl AsRef<[u8]>]) -> bool {
    records.len() as u64 >= COALESCE_RECORDS
        || records.iter().map(|r| r.as_ref().len()).sum::<usize>() >= BATCH_BYTES / 2
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
    let mut packer = Packer::default();
    loop {
        spool.wait_for(next).await;
        // A full window is not a slow link: the target may be slow to apply (its acks come
        // late), and compressing harder would only spend more CPU, so only the time the
        // link's writer keeps a batch waiting counts as waiting for the link.
        window.wait_room().await;
        let read = |next| spool.read(next, BATCH_BYTES).map_err(|e| LinkError::Protocol(e.to_string()));
        let (mut first, mut records) = read(next)?;
        if window.in_flight() > 0 && !worth_a_batch(&records) {
            // The link is busy: let a few more records join this batch rather than send each
            // as it comes (see [`COALESCE`]).
            let _ = tokio::time::timeout(COALESCE, spool.wait_for(next + COALESCE_RECORDS)).await;
            (first, records) = read(next)?;
        }
        if records.is_empty() {
            // Only a closed spool wakes us without a record.
            return Ok(());
        }
        let t = Instant::now();
        let level = compressor.level();
        let mut batch = packer.pack(first, &records, level);
        batch.ack_wanted = spool.pressed();
        let busy = t.elapsed();
        let compressed = level.is_none() || batch.codec == doppel_proto::Codec::Zstd;
        let n = records.len() as u64;
        let last = first + n - 1;
        let size = batch.payload.len() as u64;
        let sending = Instant::now();
        out.send(Message::Batch(batch)).await.map_err(|_| LinkError::Closed)?;
        let waited = sending.elapsed();
        compressor.observe(busy, waited, compressed);
        if first <= resends.max_sent.load(Ordering::Relaxed) {
            resends.bytes.fetch_add(size, Ordering::Relaxed);
        }
        resends.max_sent.fetch_max(last, Ordering::Relaxed);
        window.sent(last, size);
        next = last + 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_window_starts_clamped() {
        assert_eq!(InFlight::new(0).limit(), MIN_WINDOW);
        assert_eq!(InFlight::new(1 << 40).limit(), MAX_WINDOW);
        assert_eq!(InFlight::new(32 * MIB).limit(), 32 * MIB);
    }

    #[test]
    fn room_until_the_limit_and_acks_free_it() {
        let t0 = Instant::now();
        let mut w = InFlight::new(MIN_WINDOW);
        assert!(w.has_room());
        w.sent(10, 4 * MIB, t0);
        assert!(w.has_room());
        w.sent(20, 4 * MIB, t0);
        assert!(!w.has_room(), "8 MiB in flight fills an 8 MiB window");
        // An ack inside the first batch frees nothing.
        assert_eq!(w.acked(9, t0 + ms(5)), 0);
        assert_eq!(w.latency(), None);
        assert!(!w.has_room());
        assert_eq!(w.acked(15, t0 + ms(10)), 4 * MIB);
        assert!(w.has_room());
        assert_eq!(w.bytes(), 4 * MIB);
        // An ack covering everything, and one repeated, free what is left once.
        assert_eq!(w.acked(25, t0 + ms(20)), 4 * MIB);
        assert_eq!(w.acked(25, t0 + ms(30)), 0);
        assert_eq!(w.bytes(), 0);
    }

    #[test]
    fn the_first_ack_measures_latency_only() {
        let t0 = Instant::now();
        let mut w = InFlight::new(16 * MIB);
        w.sent(1, MIB, t0);
        w.acked(1, t0 + ms(200));
        assert_eq!(w.latency(), Some(ms(200)));
        assert_eq!(w.limit(), 16 * MIB, "no rate yet: the limit stays");
    }

    /// 10 MiB acknowledged every 100 ms (100 MiB/s) with acks 500 ms after sending: the delay
    /// is 500 ms plus the 100 ms between acks, and twice the bandwidth-delay product 120 MiB.
    #[test]
    fn the_window_grows_to_twice_the_bandwidth_delay_product() {
        let t0 = Instant::now();
        let mut w = InFlight::new(MIN_WINDOW);
        for i in 0..4u64 {
            let at = t0 + ms(100 * i);
            w.sent(i, 10 * MIB, at);
            w.acked(i, at + ms(500));
        }
        // Acks are 100 ms apart from the second one on: every rate sample is 100 MiB/s.
        let want = 120 * MIB;
        let got = w.limit();
        assert!(got.abs_diff(want) < MIB / 100, "limit {got}, want about {want}");
        assert_eq!(w.latency(), Some(ms(500)));
    }

    /// A target slower than the source: it takes 10 MiB/s, acks what it applied every 100 ms,
    /// and the sender keeps the window full. The time batches wait in the target's queue is
    /// made by the window itself: counting it as link delay grew the window every round trip
    /// (to the 256 MiB ceiling, acks a minute late); the window must stay at the floor.
    #[test]
    fn a_queue_at_a_slow_target_does_not_grow_the_window() {
        let t0 = Instant::now();
        let mut w = InFlight::new(MIN_WINDOW);
        // Batches in the target's queue: last sequence, bytes, when sent.
        let mut queue: VecDeque<(u64, u64)> = VecDeque::new();
        let (mut seq, mut applied_bytes, mut applied_seq) = (0u64, 0u64, 0u64);
        let rate = 10 * MIB; // per second
        for tick in 1..=600u64 {
            let now = t0 + ms(100 * tick);
            while w.has_room() {
                seq += 1;
                w.sent(seq, MIB, now - ms(100));
                queue.push_back((seq, MIB));
            }
            // 100 ms of applying at 10 MiB/s, then one commit and its ack.
            let mut budget = rate / 10 + applied_bytes;
            applied_bytes = 0;
            while let Some(&(s, b)) = queue.front() {
                if b > budget {
                    applied_bytes = budget;
                    break;
                }
                budget -= b;
                queue.pop_front();
                applied_seq = s;
            }
            w.acked(applied_seq, now);
        }
        assert_eq!(w.limit(), MIN_WINDOW, "the window grew on its own queue");
        let latency = w.latency().unwrap();
        assert!(latency < ms(1500), "acks {latency:?} late: 8 MiB at 10 MiB/s is under a second");
    }

    #[test]
    fn the_window_is_clamped_on_slow_and_fast_links() {
        let t0 = Instant::now();
        // 1 MiB per second with 100 ms acks: 200 KiB, below the floor.
        let mut slow = InFlight::new(64 * MIB);
        for i in 0..3u64 {
            let at = t0 + ms(1000 * i);
            slow.sent(i, MIB, at);
            slow.acked(i, at + ms(100));
        }
        assert_eq!(slow.limit(), MIN_WINDOW);
        // 1 GiB per second with 1 s acks: 2 GiB, above the ceiling.
        let mut fast = InFlight::new(MIN_WINDOW);
        for i in 0..3u64 {
            let at = t0 + ms(100 * i);
            fast.sent(i, 100 * MIB, at);
            fast.acked(i, at + ms(1000));
        }
        assert_eq!(fast.limit(), MAX_WINDOW);
    }

    /// Latency, the gap between acks and the rate move an eighth of the way to each sample; the
    /// limit uses the smallest latency seen.
    #[test]
    fn samples_are_smoothed() {
        let t0 = Instant::now();
        let mut w = InFlight::new(MIN_WINDOW);
        w.sent(1, 10 * MIB, t0);
        w.acked(1, t0 + ms(800));
        w.sent(2, 10 * MIB, t0 + ms(800));
        // 100 ms ack: latency (7 * 800 + 100) / 8 = 712.5 ms, smallest 100 ms; rate 10 MiB
        // per 100 ms, acks 100 ms apart.
        w.acked(2, t0 + ms(900));
        assert_eq!(w.latency(), Some(Duration::from_micros(712_500)));
        let bdp = |rate: f64, delay: Duration| (2.0 * rate * delay.as_secs_f64()) as u64;
        assert_eq!(w.limit(), bdp(100.0 * MIB as f64, ms(100) + ms(100)).max(MIN_WINDOW));
        // A sample of 200 MiB/s moves the rate to 0.875 * 100 + 0.125 * 200 = 112.5 MiB/s; the
        // 50 ms ack is the smallest yet, and the gap (7 * 100 + 50) / 8 ms.
        w.sent(3, 10 * MIB, t0 + ms(900));
        w.acked(3, t0 + ms(950));
        let lat = w.latency().unwrap();
        assert_eq!(lat, (Duration::from_micros(712_500) * 7 + ms(50)) / 8);
        let gap = (ms(100) * 7 + ms(50)) / 8;
        assert_eq!(w.limit(), bdp(112.5 * MIB as f64, ms(50) + gap).max(MIN_WINDOW));
    }

    /// Two acks at the same instant count as a millisecond apart, not as an infinite rate.
    #[test]
    fn simultaneous_acks_have_a_floor() {
        let t0 = Instant::now();
        let mut w = InFlight::new(MIN_WINDOW);
        w.sent(1, MIB, t0);
        w.sent(2, MIB, t0);
        w.acked(1, t0 + ms(100));
        w.acked(2, t0 + ms(100));
        // 1 MiB per ms with 100 ms acks: twice that is 200 MiB (an infinite rate would be
        // clamped to 256 MiB).
        assert_eq!(w.limit(), 200 * MIB);
    }

    #[test]
    fn fixed_modes_never_change_level() {
        let t0 = Instant::now();
        for (mode, level) in [(Compression::Off, None), (Compression::Level(7), Some(7))] {
            let mut l = Levels::new(mode, t0);
            l.observe(ms(900), ms(0), false, t0 + ms(1000));
            l.observe(ms(0), ms(900), true, t0 + ms(2000));
            assert_eq!(l.level(), level);
        }
    }

    /// One period of `busy` compressing and `waited` for the link, a second long.
    fn period(l: &mut Levels, start: Instant, busy: u64, waited: u64) -> Instant {
        l.observe(ms(busy), ms(waited), true, start + ms(1000));
        start + ms(1000)
    }

    #[test]
    fn auto_goes_up_while_the_link_is_the_bottleneck() {
        let mut t = Instant::now();
        let mut l = Levels::new(Compression::Auto, t);
        assert_eq!(l.level(), Some(3));
        let mut seen = Vec::new();
        for _ in 0..4 {
            t = period(&mut l, t, 100, 800);
            seen.push(l.level().unwrap());
        }
        assert_eq!(seen, [6, 9, 9, 9], "up one step a period, to the top of the ladder");
    }

    #[test]
    fn auto_goes_down_while_the_cpu_is_the_bottleneck() {
        let mut t = Instant::now();
        let mut l = Levels::new(Compression::Auto, t);
        t = period(&mut l, t, 100, 800);
        t = period(&mut l, t, 100, 800);
        assert_eq!(l.level(), Some(9));
        let mut seen = Vec::new();
        for _ in 0..4 {
            t = period(&mut l, t, 600, 300);
            seen.push(l.level().unwrap());
        }
        assert_eq!(seen, [6, 3, 1, 1], "down one step a period, to the bottom");
    }

    #[test]
    fn auto_holds_in_between() {
        let mut t = Instant::now();
        let mut l = Levels::new(Compression::Auto, t);
        // Waiting most of the time but compressing a third of it: neither rule applies.
        t = period(&mut l, t, 300, 600);
        assert_eq!(l.level(), Some(3));
        // Neither busy nor waiting.
        period(&mut l, t, 100, 100);
        assert_eq!(l.level(), Some(3));
    }

    #[test]
    fn auto_decides_once_a_second_on_what_that_second_saw() {
        let t0 = Instant::now();
        let mut l = Levels::new(Compression::Auto, t0);
        // Half a second of waiting: too early to decide.
        l.observe(ms(0), ms(500), true, t0 + ms(500));
        assert_eq!(l.level(), Some(3));
        // The period ends at 1 s: 0.9 s waiting in 1 s, up.
        l.observe(ms(0), ms(400), true, t0 + ms(1000));
        assert_eq!(l.level(), Some(6));
        // The next period starts empty: a CPU-bound second goes down, whatever came before.
        l.observe(ms(700), ms(0), true, t0 + ms(2000));
        assert_eq!(l.level(), Some(3));
    }

    #[test]
    fn incompressible_data_drops_to_the_cheapest_level_at_once() {
        let t0 = Instant::now();
        let mut l = Levels::new(Compression::Auto, t0);
        period(&mut l, t0, 0, 900);
        assert_eq!(l.level(), Some(6));
        l.observe(ms(1), ms(0), false, t0 + ms(1001));
        assert_eq!(l.level(), Some(1));
    }
}

#[cfg(test)]
mod coalescing {
    use super::*;
    use doppel_proto::{Op, WirePath};
    use doppel_spool::{Placement, SpoolLimits};

    /// Records arriving one by one while a batch awaits its ack leave in batches of many, not
    /// one batch each; all of them, in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_trickling_in_behind_an_unacked_batch_share_batches() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open(dir.path(), SpoolLimits::default()).unwrap().0);
        let window = Arc::new(Window::new(64 << 20));
        // An earlier batch (sequences before 1) is in flight and never acknowledged.
        window.sent(0, 1000);
        let (tx, mut rx) = mpsc::channel(1024);
        let compressor = Compressor::new(Compression::Off, Arc::new(AtomicU64::new(0)));
        let sender = tokio::spawn(send(spool.clone(), tx, window, compressor, Arc::default(), 1));
        const N: u64 = 3000;
        let writer = {
            let spool = spool.clone();
            std::thread::spawn(move || {
                for i in 0..N {
                    let op = Op::Mkdir { path: WirePath(format!("d{i}").into_bytes()), mode: 0o755 };
                    spool.append(op, 0, Placement::Spill, true).unwrap();
                    std::thread::sleep(Duration::from_micros(50));
                }
            })
        };
        let (mut batches, mut next) = (0u64, 1u64);
        while next <= N {
            let m = tokio::time::timeout(Duration::from_secs(30), rx.recv()).await.expect("a batch in time");
            let Some(Message::Batch(b)) = m else { panic!("not a batch") };
            assert_eq!(b.first_seq, next, "batches in order, none skipped");
            next += b.count as u64;
            batches += 1;
        }
        writer.join().unwrap();
        assert!(batches * 10 <= N, "{N} records went out in {batches} batches");
        sender.abort();
    }

    /// Records of half a batch's bytes or more go out at once behind an unacked batch: they
    /// never wait for a thousand more (a big file's writes waited 5 ms per batch, capping a
    /// local mirror at about 200 MB/s). On a paused clock, any wait would show as time passed.
    #[tokio::test(start_paused = true)]
    async fn big_records_do_not_wait_to_coalesce() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open(dir.path(), SpoolLimits::default()).unwrap().0);
        const N: u64 = 20;
        for i in 0..N {
            let op = Op::Write { path: WirePath(b"big".to_vec()), offset: i << 20, data: vec![7; 600 << 10] };
            spool.append(op, 0, Placement::Spill, true).unwrap();
        }
        let window = Arc::new(Window::new(256 << 20));
        window.sent(0, 1000);
        let (tx, mut rx) = mpsc::channel(1024);
        let compressor = Compressor::new(Compression::Off, Arc::new(AtomicU64::new(0)));
        let start = tokio::time::Instant::now();
        let sender = tokio::spawn(send(spool.clone(), tx, window, compressor, Arc::default(), 1));
        let mut next = 1;
        while next <= N {
            let Some(Message::Batch(b)) = rx.recv().await else { panic!("not a batch") };
            assert_eq!(b.first_seq, next);
            next += b.count as u64;
        }
        assert!(start.elapsed() < COALESCE, "the batches waited {:?} to coalesce", start.elapsed());
        sender.abort();
    }

    /// The first batch sent from a spool holding `n` records of 1 MiB placed as `placement`.
    async fn first_batch(placement: Placement, n: u64) -> doppel_proto::Batch {
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open(dir.path(), SpoolLimits::default()).unwrap().0);
        for i in 0..n {
            let op = Op::Write { path: WirePath(b"big".to_vec()), offset: i << 20, data: vec![7; 1 << 20] };
            spool.append(op, 0, placement, true).unwrap();
        }
        let (tx, mut rx) = mpsc::channel(1024);
        let compressor = Compressor::new(Compression::Off, Arc::new(AtomicU64::new(0)));
        let window = Arc::new(Window::new(256 << 20));
        let sender = tokio::spawn(send(spool, tx, window, compressor, Arc::default(), 1));
        let Some(Message::Batch(b)) = rx.recv().await else { panic!("not a batch") };
        sender.abort();
        b
    }

    /// A batch asks for an early acknowledgement while a comparison's records press on the
    /// spool's memory (half of the 16 MiB it may queue), not for a few records, and never for
    /// records on disk (a fuse writer's, which wait for nothing).
    #[tokio::test]
    async fn batches_say_when_their_producer_waits_for_acknowledgements() {
        assert!(first_batch(Placement::WaitForMemory, 12).await.ack_wanted);
        assert!(!first_batch(Placement::WaitForMemory, 2).await.ack_wanted);
        assert!(!first_batch(Placement::Disk, 12).await.ack_wanted);
    }
}
