//! Bandwidth limits.
//!
//! A [`RateLimiter`] is a token bucket; [`Limited`] wraps the TCP stream beneath TLS, so what
//! it counts is every byte the link puts on the wire: data, TLS framing, heartbeats, listing
//! requests. One limiter can be shared by several connections (every job going to one target),
//! and a connection can be under several (its job's and its target's): a write waits for the
//! strictest. The rate can change at any moment (schedules, `doppel limit`).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A token bucket of bytes per second; rate 0 means unlimited.
#[derive(Debug)]
pub struct RateLimiter {
    rate: AtomicU64,
    bucket: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    /// A limiter at `rate` bytes per second (0: unlimited).
    pub fn new(rate: u64) -> Arc<RateLimiter> {
        Arc::new(RateLimiter {
            rate: AtomicU64::new(rate),
            bucket: Mutex::new(Bucket { tokens: 0.0, last: Instant::now() }),
        })
    }

    /// Changes the rate (0: unlimited), effective for the next write.
    pub fn set_rate(&self, rate: u64) {
        self.rate.store(rate, Ordering::Relaxed);
    }

    /// The rate in bytes per second (0: unlimited).
    pub fn rate(&self) -> u64 {
        self.rate.load(Ordering::Relaxed)
    }

    /// The largest burst: 100 ms worth, at least 16 KiB. Tokens saved while the sender was
    /// briefly busy elsewhere are not lost, and no second carries more than a tenth extra.
    fn burst(rate: u64) -> f64 {
        ((rate / 10) as f64).max(16384.0)
    }

    /// How many of `want` bytes may go now, or how long to wait before trying again.
    fn grant(&self, want: usize) -> Result<usize, Duration> {
        let rate = self.rate();
        if rate == 0 {
            return Ok(want);
        }
        let mut b = self.bucket.lock();
        let now = Instant::now();
        let burst = Self::burst(rate);
        b.tokens = (b.tokens + rate as f64 * now.duration_since(b.last).as_secs_f64()).min(burst);
        b.last = now;
        if b.tokens >= 1.0 {
            return Ok(want.min(b.tokens as usize));
        }
        // Wait until a sensible chunk (not a single byte) is available.
        let need = (want as f64).min(burst / 4.0) - b.tokens;
        Err(Duration::from_secs_f64(need / rate as f64).max(Duration::from_micros(200)))
    }

    /// Spends `n` tokens for bytes actually written.
    fn take(&self, n: usize) {
        if self.rate() == 0 {
            return;
        }
        let mut b = self.bucket.lock();
        b.tokens -= n as f64;
    }
}

/// `S` with its writes held to the rates of `limiters`.
pub struct Limited<S> {
    inner: S,
    limiters: Vec<Arc<RateLimiter>>,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> Limited<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, limiters: Vec<Arc<RateLimiter>>) -> Self {
        Limited { inner, limiters, sleep: None }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Limited<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Limited<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            if let Some(s) = self.sleep.as_mut() {
                match s.as_mut().poll(cx) {
                    Poll::Ready(()) => self.sleep = None,
                    Poll::Pending => return Poll::Pending,
                }
            }
            let mut allow = buf.len();
            let mut wait: Option<Duration> = None;
            for l in &self.limiters {
                match l.grant(allow) {
                    Ok(n) => allow = allow.min(n),
                    Err(d) => wait = Some(wait.map_or(d, |w| w.max(d))),
                }
            }
            if let Some(d) = wait {
                self.sleep = Some(Box::pin(tokio::time::sleep(d)));
                continue;
            }
            let this = &mut *self;
            let r = Pin::new(&mut this.inner).poll_write(cx, &buf[..allow]);
            if let Poll::Ready(Ok(n)) = &r {
                for l in &this.limiters {
                    l.take(*n);
                }
            }
            return r;
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A rate that cannot be read; the message names the text and what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RateError(String);

/// Parses a rate: `unlimited`/`0`, or a number with a unit: bits (`kbit`, `Mbit`, `Gbit`,
/// decimal) or bytes (`KB`, `MB`, `GB` decimal; `KiB`, `MiB`, `GiB` binary; `B`), with an
/// optional `/s` or `ps`. Returns bytes per second.
pub fn parse_rate(s: &str) -> Result<u64, RateError> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    if lower == "unlimited" || lower == "off" || lower == "none" || lower == "0" {
        return Ok(0);
    }
    let t = t.trim_end_matches("/s").trim_end_matches("ps").trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| RateError(format!("bad rate {s:?}: expected e.g. 20Mbit, 5MB, 500KiB or unlimited")))?;
    let unit = unit.trim();
    let bytes_per_unit = match unit {
        "" | "B" => 1.0,
        "bit" | "b" => 1.0 / 8.0,
        "kbit" | "Kbit" | "kb" => 1e3 / 8.0,
        "mbit" | "Mbit" | "Mb" => 1e6 / 8.0,
        "gbit" | "Gbit" | "Gb" => 1e9 / 8.0,
        "KB" | "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(RateError(format!(
                "bad rate {s:?}: unknown unit {other:?} (use bit, kbit, Mbit, Gbit, B, KB, MB, GB, KiB, MiB, GiB)"
            )));
        }
    };
    let v = n * bytes_per_unit;
    if !(v.is_finite() && v >= 1.0) {
        return Err(RateError(format!("bad rate {s:?}: too small")));
    }
    Ok(v as u64)
}

/// Formats bytes per second for people (`unlimited`, `12.5 Mbit/s`).
pub fn format_rate(rate: u64) -> String {
    if rate == 0 {
        return "unlimited".into();
    }
    let bits = rate as f64 * 8.0;
    if bits >= 1e9 {
        format!("{:.1} Gbit/s", bits / 1e9)
    } else if bits >= 1e6 {
        format!("{:.1} Mbit/s", bits / 1e6)
    } else {
        format!("{:.0} kbit/s", bits / 1e3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn rates_parse() {
        assert_eq!(parse_rate("10Mbit").unwrap(), 1_250_000);
        assert_eq!(parse_rate("10 Mbit/s").unwrap(), 1_250_000);
        assert_eq!(parse_rate("5MB").unwrap(), 5_000_000);
        assert_eq!(parse_rate("2MiB").unwrap(), 2 << 20);
        assert_eq!(parse_rate("unlimited").unwrap(), 0);
        assert!(parse_rate("fast").unwrap_err().to_string().contains("bad rate"));
        assert!(parse_rate("10 furlongs").unwrap_err().to_string().contains("unknown unit"));
        assert_eq!(format_rate(1_250_000), "10.0 Mbit/s");
    }

    #[tokio::test]
    async fn holds_the_rate_and_follows_changes() {
        let limiter = RateLimiter::new(400_000);
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut w = Limited::new(a, vec![limiter.clone()]);
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 1 << 16];
            let mut n = 0;
            while let Ok(k) = b.read(&mut buf).await {
                if k == 0 {
                    break;
                }
                n += k;
            }
            n
        });
        let chunk = vec![7u8; 8192];
        let t = Instant::now();
        for _ in 0..50 {
            w.write_all(&chunk).await.unwrap();
        }
        let secs = t.elapsed().as_secs_f64();
        let rate = 50.0 * 8192.0 / secs;
        assert!((360_000.0..=440_000.0).contains(&rate), "measured {rate} B/s for a 400000 B/s limit");
        limiter.set_rate(0);
        let t = Instant::now();
        for _ in 0..50 {
            w.write_all(&chunk).await.unwrap();
        }
        assert!(t.elapsed() < Duration::from_millis(200), "unlimited after the change");
        drop(w);
        assert_eq!(reader.await.unwrap(), 100 * 8192);
    }
}
