//! Progress of long work: the initial mirror (and any whole-tree comparison of `protect`),
//! `verify`, `history restore` and a failback. On a terminal (standard error) a bar with the
//! bytes and files done, the rate and the ETA (`indicatif`); otherwise a plain log line every
//! few seconds (`DOPPEL_PROGRESS_SECS`, 10 by default), such as
//! `mirror: 1.2 GiB of 4.0 GiB (30%), 3,120 of 10,000 files, 85.0 MiB/s, ETA 33 s`.
//!
//! The libraries only count; this module draws. Log lines written while a bar is drawn go
//! through [`LogWriter`], which takes the bars off the screen for the line.

use std::collections::VecDeque;
use std::io::{IsTerminal, Write};
use std::sync::LazyLock;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use doppel_agent::{Agent, JobStatusSnapshot, StatusSource};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio_util::sync::CancellationToken;

/// How often a terminal's bars are refreshed from what they show.
pub const TICK: Duration = Duration::from_millis(200);

/// Files (or objects, or ops) and bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub files: u64,
    pub bytes: u64,
}

impl Counts {
    pub fn new(files: u64, bytes: u64) -> Counts {
        Counts { files, bytes }
    }
}

/// The bars on the terminal, shared so log lines can step around them.
static BARS: LazyLock<MultiProgress> =
    LazyLock::new(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(8)));
/// Bars shown now.
static SHOWN: AtomicUsize = AtomicUsize::new(0);
/// `--quiet`: no bars (log lines follow the log level).
static QUIET: AtomicBool = AtomicBool::new(false);

/// No bars (`--quiet`).
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

/// The interval of the plain progress lines.
fn log_interval() -> Duration {
    std::env::var("DOPPEL_PROGRESS_SECS")
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map_or(Duration::from_secs(10), Duration::from_secs_f64)
}

/// Whether progress draws bars (standard error is a terminal) rather than log lines.
pub fn on_terminal() -> bool {
    std::io::stderr().is_terminal()
}

/// The tracing writer: standard error, around the bars while any is shown.
#[derive(Clone, Copy, Default)]
pub struct LogWriter;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;
    fn make_writer(&'a self) -> LogWriter {
        LogWriter
    }
}

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // One event is one write: the whole line goes out while the bars are off the screen.
        if SHOWN.load(Ordering::Relaxed) > 0 {
            BARS.suspend(|| std::io::stderr().write_all(buf))?;
        } else {
            std::io::stderr().write_all(buf)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// `1234567` as `1,234,567`.
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A duration for people: `33 s`, `4 min 10 s`, `2 h 05 min`.
pub fn duration(d: Duration) -> String {
    let s = d.as_secs_f64().round() as u64;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {:02} min", s / 3600, s % 3600 / 60),
    }
}

/// The time left at `rate` bytes per second; `None` when the rate says nothing.
pub fn eta(done: u64, total: u64, rate: Option<f64>) -> Option<Duration> {
    let rate = rate.filter(|r| *r > 0.0 && r.is_finite())?;
    Some(Duration::from_secs_f64(total.saturating_sub(done) as f64 / rate))
}

/// The rate of a growing count over a sliding window of samples.
#[derive(Debug, Clone)]
pub struct Rate {
    window: Duration,
    samples: VecDeque<(Instant, u64)>,
}

impl Rate {
    pub fn new(window: Duration) -> Rate {
        Rate { window, samples: VecDeque::new() }
    }

    /// The count was `value` at `at`. A count that went back (a new comparison) starts over.
    pub fn push(&mut self, at: Instant, value: u64) {
        if self.samples.back().is_some_and(|&(_, v)| v > value) {
            self.samples.clear();
        }
        self.samples.push_back((at, value));
        // Keep one sample at least a window old, so the rate spans the whole window.
        while self.samples.len() > 2 && at.duration_since(self.samples[1].0) >= self.window {
            self.samples.pop_front();
        }
    }

    /// Units per second over the window (`None` before the samples span a second: the first
    /// burst, such as a queue filling, says little about the pace).
    pub fn per_sec(&self) -> Option<f64> {
        let (&(t0, v0), &(t1, v1)) = (self.samples.front()?, self.samples.back()?);
        let dt = t1.duration_since(t0);
        (dt >= Duration::from_secs(1)).then(|| (v1 - v0) as f64 / dt.as_secs_f64())
    }
}

/// The plain line: `mirror: 1.2 GiB of 4.0 GiB (30%), 3,120 of 10,000 files, 85.0 MiB/s, ETA
/// 34 s`; without a total, `failback: 1.2 GiB, 3,120 ops, 85.0 MiB/s`.
pub fn line(what: &str, unit: &str, done: Counts, total: Option<Counts>, rate: Option<f64>) -> String {
    let iec = doppel_apply::quota::iec;
    let words = rate_words(rate);
    match total {
        Some(t) => {
            let (done, pct, eta) = against(done, t, rate);
            format!(
                "{what}: {} of {} ({pct:.0}%), {} of {} {unit}, {words}, {eta}",
                iec(done.bytes),
                iec(t.bytes),
                thousands(done.files),
                thousands(t.files),
            )
        }
        None => format!("{what}: {}, {} {unit}, {words}", iec(done.bytes), thousands(done.files)),
    }
}

/// The same, shorter, beside a bar on a terminal: `30% 1.2 GiB/4.0 GiB, 3,120/10,000 files,
/// 85.0 MiB/s, ETA 34 s`.
pub fn bar_text(unit: &str, done: Counts, total: Option<Counts>, rate: Option<f64>) -> String {
    let iec = doppel_apply::quota::iec;
    let words = rate_words(rate);
    match total {
        Some(t) => {
            let (done, pct, eta) = against(done, t, rate);
            format!(
                "{pct:.0}% {}/{}, {}/{} {unit}, {words}, {eta}",
                iec(done.bytes),
                iec(t.bytes),
                thousands(done.files),
                thousands(t.files)
            )
        }
        None => format!("{}, {} {unit}, {words}", iec(done.bytes), thousands(done.files)),
    }
}

/// How far a job's comparison is, for `doppel status`: `compared 1.2 GiB of 4.0 GiB (30%),
/// 3,120 of 10,000 files`, or while its walk still counts the tree `compared 1.2 GiB, 3,120
/// files (counting the tree)`.
pub fn compared(done: Counts, total: Option<Counts>) -> String {
    let iec = doppel_apply::quota::iec;
    match total {
        Some(t) => {
            let (done, pct, _) = against(done, t, None);
            format!(
                "compared {} of {} ({pct:.0}%), {} of {} files",
                iec(done.bytes),
                iec(t.bytes),
                thousands(done.files),
                thousands(t.files)
            )
        }
        None => format!("compared {}, {} files (counting the tree)", iec(done.bytes), thousands(done.files)),
    }
}

/// `85.0 MiB/s`, or `rate unknown`.
fn rate_words(rate: Option<f64>) -> String {
    rate.map_or_else(|| "rate unknown".to_string(), |r| format!("{}/s", doppel_apply::quota::iec(r as u64)))
}

/// `done` held to `total`, the share done in percent (by bytes, or by files when the files
/// are empty) and the ETA in words.
fn against(done: Counts, total: Counts, rate: Option<f64>) -> (Counts, f64, String) {
    let done = Counts::new(done.files.min(total.files), done.bytes.min(total.bytes));
    let pct = match (total.bytes, total.files) {
        (0, 0) => 100.0,
        (0, f) => done.files as f64 * 100.0 / f as f64,
        (b, _) => done.bytes as f64 * 100.0 / b as f64,
    };
    let eta = match eta(done.bytes, total.bytes, rate) {
        Some(d) => format!("ETA {}", duration(d)),
        None if done.bytes >= total.bytes => "ETA 0 s".to_string(),
        None => "ETA unknown".to_string(),
    };
    (done, pct, eta)
}

enum Out {
    Bar { bar: ProgressBar, sized: bool },
    Log { every: Duration, last: Instant },
}

/// One piece of long work's progress; dropped when done (or given up), its bar goes away
/// and the caller says how it ended.
pub struct Progress {
    what: String,
    unit: &'static str,
    total: Option<Counts>,
    done: Counts,
    rate: Rate,
    out: Out,
    last_update: Option<Instant>,
}

impl Progress {
    /// Progress of `what` (the line's first word, say `mirror` or `job web: verify`), counting
    /// `unit` (`files`, `objects`, `ops`): a bar on a terminal, log lines otherwise.
    pub fn new(what: impl Into<String>, unit: &'static str) -> Progress {
        let what = what.into();
        let now = Instant::now();
        let out = if on_terminal() && !QUIET.load(Ordering::Relaxed) {
            // Complete before it is first drawn.
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden())
                .with_style(spinner_style())
                .with_prefix(what.clone())
                .with_message(bar_text(unit, Counts::default(), None, None));
            let bar = BARS.add(bar);
            SHOWN.fetch_add(1, Ordering::Relaxed);
            bar.enable_steady_tick(Duration::from_millis(120));
            Out::Bar { bar, sized: false }
        } else {
            Out::Log { every: log_interval(), last: now }
        };
        let mut rate = Rate::new(Duration::from_secs(20));
        rate.push(now, 0);
        Progress { what, unit, total: None, done: Counts::default(), rate, out, last_update: None }
    }

    /// The whole work, once known (`None`: not known, or no longer).
    pub fn set_total(&mut self, total: Option<Counts>) {
        if self.total == total {
            return;
        }
        self.total = total;
        // The next update shows the new total at once.
        self.last_update = None;
        if let Out::Bar { bar, sized } = &mut self.out {
            match total {
                Some(t) => {
                    bar.set_length(t.bytes);
                    if !*sized {
                        bar.disable_steady_tick();
                        bar.set_style(bar_style());
                        *sized = true;
                    }
                }
                None => {
                    bar.unset_length();
                    bar.set_style(spinner_style());
                    bar.enable_steady_tick(Duration::from_millis(120));
                    *sized = false;
                }
            }
        }
    }

    /// What is done so far.
    pub fn update(&mut self, done: Counts) {
        self.update_at(done, Instant::now());
    }

    fn update_at(&mut self, done: Counts, now: Instant) {
        // Callers may report every block: look at most a few times a second.
        if self.last_update.is_some_and(|t| now.duration_since(t) < Duration::from_millis(50)) {
            self.done = done;
            return;
        }
        self.last_update = Some(now);
        self.done = done;
        self.rate.push(now, done.bytes);
        match &mut self.out {
            Out::Bar { bar, .. } => {
                let bytes = match self.total {
                    Some(t) => done.bytes.min(t.bytes),
                    None => done.bytes,
                };
                // The message first: a draw skipped by the refresh limit then only lags.
                bar.set_message(bar_text(self.unit, done, self.total, self.rate.per_sec()));
                bar.set_position(bytes);
            }
            Out::Log { every, last } => {
                if now.duration_since(*last) >= *every {
                    *last = now;
                    tracing::info!("{}", line(&self.what, self.unit, done, self.total, self.rate.per_sec()));
                }
            }
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Out::Bar { bar, .. } = &self.out {
            bar.finish_and_clear();
            BARS.remove(bar);
            SHOWN.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// The bar takes the width the text leaves (the whole line fits the terminal).
fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template("{prefix} [{wide_bar}] {msg}")
        .expect("a valid template")
        .progress_chars("=> ")
}

fn spinner_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner} {prefix}: {msg}").expect("a valid template")
}

/// What a job's status says about its whole-tree comparison.
fn comparison(s: &JobStatusSnapshot) -> (Counts, Option<Counts>) {
    let done = Counts::new(s.mirror_done_files.unwrap_or(0), s.mirror_done_bytes.unwrap_or(0));
    let total = s.mirror_total_files.zip(s.mirror_total_bytes).map(|(f, b)| Counts::new(f, b));
    (done, total)
}

/// `doppel protect`: shows each job's mirror (and local scan) while it runs, until `stop`.
pub fn watch_jobs(agents: &[Agent], stop: CancellationToken) -> impl Future<Output = ()> + use<> {
    watch(agents.iter().map(Agent::status_source).collect(), stop)
}

async fn watch(jobs: Vec<StatusSource>, stop: CancellationToken) {
    let tick = if on_terminal() { TICK } else { Duration::from_secs(1).min(log_interval()) };
    let mut shown: Vec<Option<(String, Progress)>> = jobs.iter().map(|_| None).collect();
    let many = jobs.len() > 1;
    loop {
        for (job, slot) in jobs.iter().zip(shown.iter_mut()) {
            let s = job.snapshot();
            let phase = match s.state.as_str() {
                "mirroring" => Some("mirror"),
                "scanning" => Some("scan"),
                _ => None,
            };
            let Some(phase) = phase else {
                *slot = None;
                continue;
            };
            if slot.as_ref().is_none_or(|(p, _)| p != phase) {
                let what = if many { format!("job {}: {phase}", s.job) } else { phase.to_string() };
                *slot = Some((phase.to_string(), Progress::new(what, "files")));
            }
            let (_, p) = slot.as_mut().expect("just set");
            let (done, total) = comparison(&s);
            if s.mirror_done_bytes.is_some() {
                p.set_total(total);
                p.update(done);
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(tick) => {}
        }
    }
}

/// `doppel verify`: the job's comparison while the verify runs, polled from its status with
/// `status` until `done` is set.
pub fn watch_verify(job: &str, status: impl Fn() -> Option<JobStatusSnapshot>, done: &AtomicBool) {
    let tick = if on_terminal() { TICK } else { Duration::from_secs(1).min(log_interval()) };
    let mut p: Option<Progress> = None;
    while !done.load(Ordering::Relaxed) {
        if let Some(s) = status() {
            // A mirror or scan under way runs first; the verify waits for it.
            let ours = !matches!(s.state.as_str(), "mirroring" | "scanning");
            if ours {
                let p = p.get_or_insert_with(|| Progress::new(format!("verify {job}"), "files"));
                let (d, total) = comparison(&s);
                if s.mirror_done_bytes.is_some() {
                    p.set_total(total);
                    p.update(d);
                }
            }
        }
        let until = Instant::now() + tick;
        while !done.load(Ordering::Relaxed) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `protect --failback`: what the embedded target received and applied, until it stops.
pub fn failback(job: &str) -> impl FnOnce(&std::sync::Arc<doppel_target::Target>) + use<> {
    let job = job.to_string();
    move |target| {
        let target = target.clone();
        tokio::spawn(async move {
            let tick = if on_terminal() { TICK } else { Duration::from_secs(1).min(log_interval()) };
            let mut p = Progress::new(format!("failback {job}"), "ops");
            // Ops applied by this run (a resumed failback's replica has applied some before).
            let mut first_applied = None;
            loop {
                if let Some(r) = target.status().into_iter().next() {
                    let base = *first_applied.get_or_insert(r.applied);
                    p.update(Counts::new(r.applied.saturating_sub(base), r.bytes_received));
                }
                tokio::select! {
                    _ = target.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(tick) => {}
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_durations_read_as_people_write_them() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(3120), "3,120");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(duration(Duration::from_millis(32_600)), "33 s");
        assert_eq!(duration(Duration::from_secs(250)), "4 min 10 s");
        assert_eq!(duration(Duration::from_secs(2 * 3600 + 5 * 60 + 9)), "2 h 05 min");
    }

    #[test]
    fn the_log_line_shows_share_counts_rate_and_eta() {
        let gib = 1u64 << 30;
        let total = Some(Counts::new(10_000, 4 * gib));
        let done = Counts::new(3120, gib * 12 / 10);
        let rate = Some(85.0 * (1 << 20) as f64);
        assert_eq!(
            line("mirror", "files", done, total, rate),
            "mirror: 1.2 GiB of 4.0 GiB (30%), 3,120 of 10,000 files, 85.0 MiB/s, ETA 34 s"
        );
        assert_eq!(
            line("failback web", "ops", done, None, rate),
            "failback web: 1.2 GiB, 3,120 ops, 85.0 MiB/s"
        );
        assert_eq!(
            line("verify", "files", done, total, None),
            "verify: 1.2 GiB of 4.0 GiB (30%), 3,120 of 10,000 files, rate unknown, ETA unknown"
        );
        // Files that grew while compared do not take it past the whole.
        let over = Counts::new(10_001, 5 * gib);
        assert_eq!(
            line("mirror", "files", over, total, rate),
            "mirror: 4.0 GiB of 4.0 GiB (100%), 10,000 of 10,000 files, 85.0 MiB/s, ETA 0 s"
        );
        // A tree of empty files goes by its files.
        assert_eq!(
            line("mirror", "files", Counts::new(5, 0), Some(Counts::new(20, 0)), None),
            "mirror: 0 B of 0 B (25%), 5 of 20 files, rate unknown, ETA 0 s"
        );
    }

    #[test]
    fn the_bar_text_is_short() {
        let gib = 1u64 << 30;
        let (done, total) = (Counts::new(3120, gib * 12 / 10), Some(Counts::new(10_000, 4 * gib)));
        assert_eq!(
            bar_text("files", done, total, Some(85.0 * (1 << 20) as f64)),
            "30% 1.2 GiB/4.0 GiB, 3,120/10,000 files, 85.0 MiB/s, ETA 34 s"
        );
        assert_eq!(bar_text("ops", Counts::default(), None, None), "0 B, 0 ops, rate unknown");
    }

    #[test]
    fn status_tells_how_far_a_comparison_is() {
        let gib = 1u64 << 30;
        let done = Counts::new(3120, gib * 12 / 10);
        assert_eq!(
            compared(done, Some(Counts::new(10_000, 4 * gib))),
            "compared 1.2 GiB of 4.0 GiB (30%), 3,120 of 10,000 files"
        );
        assert_eq!(compared(done, None), "compared 1.2 GiB, 3,120 files (counting the tree)");
    }

    #[test]
    fn rate_follows_the_recent_window_and_eta_the_rest() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut r = Rate::new(Duration::from_secs(10));
        assert_eq!(r.per_sec(), None);
        r.push(at(0), 0);
        assert_eq!(r.per_sec(), None, "one sample tells no rate");
        r.push(t0 + Duration::from_millis(300), 400);
        assert_eq!(r.per_sec(), None, "a burst in the first second tells no rate");
        r.push(at(5), 500);
        assert_eq!(r.per_sec(), Some(100.0));
        // Faster now: after a window the old pace no longer counts.
        for s in 6..=30 {
            r.push(at(s), 500 + (s - 5) * 1000);
        }
        assert_eq!(r.per_sec(), Some(1000.0));
        // A count that starts over (another comparison) starts the rate over.
        r.push(at(31), 10);
        assert_eq!(r.per_sec(), None);
        r.push(at(33), 2010);
        assert_eq!(r.per_sec(), Some(1000.0));

        assert_eq!(eta(1000, 4000, Some(100.0)), Some(Duration::from_secs(30)));
        assert_eq!(eta(5000, 4000, Some(100.0)), Some(Duration::ZERO));
        assert_eq!(eta(0, 4000, Some(0.0)), None);
        assert_eq!(eta(0, 4000, None), None);
    }

    /// Not on a terminal, a line is logged once per interval, not per update.
    #[test]
    fn log_lines_come_once_per_interval() {
        let t0 = Instant::now();
        let mut p = Progress {
            what: "mirror".into(),
            unit: "files",
            total: Some(Counts::new(10, 1000)),
            done: Counts::default(),
            rate: Rate::new(Duration::from_secs(20)),
            out: Out::Log { every: Duration::from_secs(10), last: t0 },
            last_update: None,
        };
        let mut logged = Vec::new();
        for ms in (0..=25_000).step_by(100) {
            let now = t0 + Duration::from_millis(ms);
            let before = match &p.out {
                Out::Log { last, .. } => *last,
                Out::Bar { .. } => unreachable!(),
            };
            p.update_at(Counts::new(ms / 2500, ms / 25), now);
            if let Out::Log { last, .. } = &p.out
                && *last != before
            {
                logged.push(ms);
            }
        }
        assert_eq!(logged, vec![10_000, 20_000]);
    }
}
