//! Calibrates the emulated link before anything is measured over it: the round-trip time a
//! small message sees, and what one plain TCP stream achieves in bulk. The second number is
//! the ceiling for any tool: its "utilisation" is the fraction of the rate limit that a
//! bare socket, with no application behind it, gets through.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::delay::Wire;
use crate::ns;
use crate::stats::Sample;

/// What the calibration found.
#[derive(Debug, Clone, Default)]
pub struct LinkCheck {
    /// Round trips of a 1-byte message over an established connection.
    pub rtt: Sample,
    /// Bytes per second a single TCP stream moved from a to b, after its first second.
    pub stream_rate: f64,
    /// How long the stream ran.
    pub stream_secs: f64,
    /// Wire bytes (IP packets, a to b) per payload byte of the stream: TCP/IP headers, acks
    /// excluded (they go b to a).
    pub overhead: f64,
}

/// Measures `wire` between namespaces `a` and `b`: 20 round trips, then `secs` of bulk.
pub fn run(wire: &Wire, a: &str, b: &str, secs: u64) -> Result<LinkCheck> {
    let port = 7399;
    let listener = ns::within(b, || Ok(TcpListener::bind((wire.b_ip.as_str(), port))?))?;
    let server = std::thread::spawn(move || serve(listener));
    let target = format!("{}:{port}", wire.b_ip);
    let mut echo = ns::within(a, || Ok(TcpStream::connect(&target)?))?;
    echo.set_nodelay(true)?;
    let mut rtts = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        echo.write_all(b"x")?;
        echo.read_exact(&mut [0u8; 1])?;
        rtts.push(t.elapsed());
    }
    drop(echo);
    let mut bulk = ns::within(a, || Ok(TcpStream::connect(&target)?))?;
    let chunk = vec![0x5au8; 1 << 20];
    let (t, wire_start) = (Instant::now(), wire.bytes_a_to_b());
    while t.elapsed() < Duration::from_secs(secs) {
        bulk.write_all(&chunk)?;
    }
    drop(bulk);
    let r = server.join().map_err(|_| anyhow::anyhow!("calibration server panicked"))??;
    let wire_bytes = wire.bytes_a_to_b() - wire_start;
    let steady = r.total - r.at_one_sec.0;
    Ok(LinkCheck {
        rtt: Sample::new(rtts),
        stream_rate: steady as f64 / (r.end - r.at_one_sec.1).as_secs_f64().max(1e-3),
        stream_secs: r.end.as_secs_f64(),
        overhead: wire_bytes as f64 / r.total.max(1) as f64,
    })
}

/// What the receiving end of the bulk stream counted.
struct Received {
    total: u64,
    /// Bytes and time one second after the first byte (the end of slow start, roughly).
    at_one_sec: (u64, Duration),
    end: Duration,
}

/// Echoes the first connection byte by byte, then counts what the second one brings.
fn serve(listener: TcpListener) -> Result<Received> {
    let (mut echo, _) = listener.accept().context("calibration: accept")?;
    echo.set_nodelay(true)?;
    let mut byte = [0u8; 1];
    while echo.read(&mut byte)? == 1 {
        echo.write_all(&byte)?;
    }
    let (mut bulk, _) = listener.accept()?;
    let mut buf = vec![0u8; 1 << 20];
    let mut r = Received { total: 0, at_one_sec: (0, Duration::ZERO), end: Duration::ZERO };
    let mut first = None;
    loop {
        let n = bulk.read(&mut buf)?;
        let t0 = *first.get_or_insert_with(Instant::now);
        if n == 0 {
            r.end = t0.elapsed();
            return Ok(r);
        }
        r.total += n as u64;
        if r.at_one_sec.1.is_zero() && t0.elapsed() >= Duration::from_secs(1) {
            r.at_one_sec = (r.total, t0.elapsed());
        }
    }
}
