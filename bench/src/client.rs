//! The workload's client, in this process's own network namespace (the host), reaching the
//! service address on the target's side through a veth pair of its own: the source's host
//! is cut off at the failure, the client is not, as users on another network would be.

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use doppel_testkit::netns::NetBench;

use crate::ns;
use crate::serve;

/// The client's link into host b. Removed when dropped.
pub struct ClientLink {
    host_dev: String,
}

impl ClientLink {
    /// Links the host (10.78.N.1) to namespace b (10.78.N.2) and routes `service_ip` there.
    /// Until host b takes the address over, it drops the client's connection attempts (it
    /// does not forward), so each attempt ends at its connect timeout ([`CONNECT_TIMEOUT`]);
    /// once the address is local to host b, the kernel there completes the handshake at once.
    pub fn new(net: &NetBench, service_ip: &str) -> Result<ClientLink> {
        let subnet = net.a_ip.split('.').nth(2).context("NetBench address")?;
        let tag = net.a.trim_start_matches("dp").trim_end_matches('a');
        let (host_dev, b_dev) = (format!("dpc{tag}h"), format!("dpc{tag}b"));
        let (host_ip, b_ip) = (format!("10.78.{subnet}.1"), format!("10.78.{subnet}.2"));
        let _ = ns::run(&["ip", "link", "del", &host_dev]);
        ns::run(&["ip", "link", "add", &host_dev, "type", "veth", "peer", "name", &b_dev])?;
        let link = ClientLink { host_dev: host_dev.clone() };
        ns::run(&["ip", "link", "set", &b_dev, "netns", &net.b])?;
        ns::run(&["ip", "addr", "add", &format!("{host_ip}/24"), "dev", &host_dev])?;
        ns::run(&["ip", "link", "set", &host_dev, "up"])?;
        ns::run(&["ip", "-n", &net.b, "addr", "add", &format!("{b_ip}/24"), "dev", &b_dev])?;
        ns::run(&["ip", "-n", &net.b, "link", "set", &b_dev, "up"])?;
        ns::run(&["ip", "route", "replace", &format!("{service_ip}/32"), "via", &b_ip, "dev", &host_dev])?;
        Ok(link)
    }
}

impl Drop for ClientLink {
    fn drop(&mut self) {
        let _ = ns::run(&["ip", "link", "del", &self.host_dev]);
    }
}

/// How long one connection attempt may take to be accepted. A handshake with a local
/// listener over a veth takes well under a millisecond; a dropped SYN is never answered. So
/// this bounds how late the client notices the service: one polling period plus at most this.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(10);

/// How long the client waits for the answer once connected.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(1);

/// Microseconds since the epoch: the clock of doppel's event log.
pub fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_micros() as u64
}

/// When the service first accepted a connection and first gave the expected answer
/// (microseconds since the epoch), and how many attempts it took.
#[derive(Debug, Clone, Copy, Default)]
pub struct Answered {
    /// First TCP connection accepted (a refused or unreachable one does not count).
    pub connected_us: u64,
    /// First answer equal to the expected one.
    pub answered_us: u64,
    /// Attempts made.
    pub attempts: u64,
    /// Answers that came but were not the expected one.
    pub wrong: u64,
}

/// Asks `addr` every `every` until it answers `expected`, for at most `timeout`.
pub fn poll(addr: SocketAddr, expected: &str, every: Duration, timeout: Duration) -> Result<Answered> {
    let started = Instant::now();
    let mut a = Answered::default();
    let mut last_error = String::new();
    while started.elapsed() < timeout {
        let t = Instant::now();
        a.attempts += 1;
        match serve::get(&addr, CONNECT_TIMEOUT, ANSWER_TIMEOUT) {
            Ok(body) => {
                if a.connected_us == 0 {
                    a.connected_us = now_us();
                }
                if body.as_deref() == Some(expected) {
                    a.answered_us = now_us();
                    return Ok(a);
                }
                a.wrong += 1;
                last_error = format!("answer {body:?}");
            }
            Err(e) => last_error = e.to_string(),
        }
        std::thread::sleep(every.saturating_sub(t.elapsed()));
    }
    bail!("the service at {addr} did not answer {expected:?} within {timeout:?} (last: {last_error})")
}
