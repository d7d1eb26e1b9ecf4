//! A wide-area link between the two namespaces of a [`NetBench`]: a rate limit and a delay in
//! each direction, on IP packets.
//!
//! Why not `tc netem`: this kernel is built without `sch_netem` (and without the BPF qdisc),
//! so no qdisc can delay packets. Why not a TCP proxy that holds each chunk: the TCP
//! connection the tools open would then end at the proxy, one hop away, and its congestion
//! window, slow start and retransmissions would never see the delay, which is what a
//! bandwidth-delay product is about. So the benchmark builds the link itself: a TUN device in
//! each namespace (point-to-point addresses 10.79.N.1 and 10.79.N.2), a `tbf` qdisc on each
//! (the same as [`NetBench::set_rate`] puts on the veth), and this process moving every packet
//! that leaves one TUN device into the other after holding it for the one-way delay. TCP
//! between the namespaces then sees a real round-trip time and a real bottleneck queue.
//! Every byte crossing is counted here (IP packets, headers included: what the `tbf`
//! accounts, and what the TUN devices' own counters say, which the report cross-checks).

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::thread::{JoinHandle, sleep};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use doppel_testkit::netns::NetBench;
use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::ioctl::{Opcode, Updater, ioctl, opcode};

use crate::ns;

/// `TUNSETIFF`: `_IOW('T', 202, int)`.
const TUNSETIFF: Opcode = opcode::write::<i32>(b'T', 202);
const IFF_TUN: i16 = 0x0001;
const IFF_NO_PI: i16 = 0x1000;
/// Ethernet's: packets as large as on the veth.
const MTU: usize = 1500;

/// `struct ifreq` with the `ifr_flags` member of its union.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: i16,
    _pad: [u8; 22],
}

/// Bytes and packets that crossed one way.
#[derive(Default)]
struct Counters {
    bytes: AtomicU64,
    packets: AtomicU64,
}

/// The link. Dropping it stops the forwarding (the devices go with the namespaces).
pub struct Wire {
    /// Address of host a on the link.
    pub a_ip: String,
    /// Address of host b on the link.
    pub b_ip: String,
    /// Rate limit of each direction, in Mbit/s.
    pub mbit: u32,
    /// Delay of each direction.
    pub one_way: Duration,
    dev_a: String,
    dev_b: String,
    ns_a: String,
    ns_b: String,
    a_to_b: Arc<Counters>,
    b_to_a: Arc<Counters>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Wire {
    /// Builds the link between `net`'s namespaces: `mbit` Mbit/s and `one_way` of delay each
    /// way.
    pub fn new(net: &NetBench, mbit: u32, one_way: Duration) -> Result<Wire> {
        // 10.77.N.1 -> N: one subnet per NetBench, so concurrent benchmarks do not collide.
        let subnet = net.a_ip.split('.').nth(2).context("NetBench address")?.to_string();
        let tag = net.a.trim_start_matches("dp").trim_end_matches('a').to_string();
        let (dev_a, dev_b) = (format!("dpw{tag}a"), format!("dpw{tag}b"));
        let (a_ip, b_ip) = (format!("10.79.{subnet}.1"), format!("10.79.{subnet}.2"));
        let tun_a = ns::within(&net.a, || open_tun(&dev_a))?;
        let tun_b = ns::within(&net.b, || open_tun(&dev_b))?;
        for (ns, dev, me, peer) in [(&net.a, &dev_a, &a_ip, &b_ip), (&net.b, &dev_b, &b_ip, &a_ip)] {
            ns::run(&["ip", "-n", ns, "addr", "add", me, "peer", peer, "dev", dev])?;
            ns::run(&["ip", "-n", ns, "link", "set", dev, "mtu", &MTU.to_string(), "up"])?;
            let rate = format!("{mbit}mbit");
            let burst = format!("{}kb", (mbit as u64 * 1000 / 8 / 100).max(16));
            ns::run(&[
                "ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate",
                &rate, "burst", &burst, "latency", "50ms",
            ])?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (a_to_b, b_to_a) = (Arc::new(Counters::default()), Arc::new(Counters::default()));
        let mut threads = Vec::new();
        for (from, to, counters) in [
            (tun_a.try_clone()?, tun_b.try_clone()?, a_to_b.clone()),
            (tun_b.try_clone()?, tun_a.try_clone()?, b_to_a.clone()),
        ] {
            let (tx, rx) = channel();
            let s = stop.clone();
            threads.push(std::thread::spawn(move || read_side(from, tx, one_way, &counters, &s)));
            let s = stop.clone();
            threads.push(std::thread::spawn(move || write_side(to, rx, &s)));
        }
        Ok(Wire {
            a_ip,
            b_ip,
            mbit,
            one_way,
            dev_a,
            dev_b,
            ns_a: net.a.clone(),
            ns_b: net.b.clone(),
            a_to_b,
            b_to_a,
            stop,
            threads,
        })
    }

    /// Bytes host a has sent to host b so far (IP packets).
    pub fn bytes_a_to_b(&self) -> u64 {
        self.a_to_b.bytes.load(Ordering::Relaxed)
    }

    /// Bytes host b has sent to host a so far.
    pub fn bytes_b_to_a(&self) -> u64 {
        self.b_to_a.bytes.load(Ordering::Relaxed)
    }

    /// The TUN devices' own counters of bytes sent (a's, b's): a cross-check of the forwarder.
    pub fn kernel_tx_bytes(&self) -> Result<(u64, u64)> {
        Ok((ns::dev_bytes(&self.ns_a, &self.dev_a)?.1, ns::dev_bytes(&self.ns_b, &self.dev_b)?.1))
    }

    /// Bytes per second the rate limit lets through each way.
    pub fn rate_bytes(&self) -> f64 {
        self.mbit as f64 * 1e6 / 8.0
    }
}

impl Drop for Wire {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Creates TUN device `name` in the calling thread's network namespace.
fn open_tun(name: &str) -> Result<File> {
    let f = OpenOptions::new().read(true).write(true).open("/dev/net/tun").context("opening /dev/net/tun")?;
    let mut req = IfReq { name: [0; 16], flags: IFF_TUN | IFF_NO_PI, _pad: [0; 22] };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `IfReq` lays out.
    unsafe { ioctl(f.as_fd(), Updater::<TUNSETIFF, IfReq>::new(&mut req)) }
        .with_context(|| format!("creating TUN device {name}"))?;
    Ok(f)
}

/// Reads packets leaving one device and queues them with the time they may arrive.
fn read_side(
    mut from: File,
    tx: Sender<(Instant, Vec<u8>)>,
    delay: Duration,
    c: &Counters,
    stop: &AtomicBool,
) {
    let tick = Timespec { tv_sec: 0, tv_nsec: 100_000_000 };
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        let mut fds = [PollFd::new(&from, PollFlags::IN)];
        match poll(&mut fds, Some(&tick)) {
            Ok(0) | Err(rustix::io::Errno::INTR) => continue,
            Ok(_) => {}
            Err(_) => return,
        }
        match from.read(&mut buf) {
            Ok(n) => {
                c.bytes.fetch_add(n as u64, Ordering::Relaxed);
                c.packets.fetch_add(1, Ordering::Relaxed);
                if tx.send((Instant::now() + delay, buf[..n].to_vec())).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted || e.kind() == ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}

/// Delivers queued packets into the other device once their delay is over (in order: the
/// delay is the same for every packet).
fn write_side(mut to: File, rx: Receiver<(Instant, Vec<u8>)>, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let (due, packet) = match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(p) => p,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            sleep(wait);
        }
        // A packet the stack refuses (the namespace going away) is lost, as on a wire.
        let _ = to.write(&packet);
    }
}
