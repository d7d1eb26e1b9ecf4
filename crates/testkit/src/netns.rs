//! A two-host network for tests and benchmarks: two network namespaces joined by a veth
//! pair, with `tc tbf` for bandwidth, nftables for loss, and the link itself taken down and
//! up. Traffic stays inside the namespaces. Needs root and iproute2 (and nft for loss).

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Two hosts, `a` (10.77.N.1) and `b` (10.77.N.2).
pub struct NetBench {
    /// Namespace of host a.
    pub a: String,
    /// Namespace of host b.
    pub b: String,
    /// Address of host a.
    pub a_ip: String,
    /// Address of host b.
    pub b_ip: String,
    veth_a: String,
    veth_b: String,
}

fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0]).args(&args[1..]).output().map_err(|e| format!("{}: {e}", args[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl NetBench {
    /// Creates the namespaces and the link (up, unlimited, no loss).
    pub fn new() -> Result<NetBench, String> {
        let n = (std::process::id() % 200) * 50 + NEXT.fetch_add(1, Ordering::Relaxed) % 50;
        let subnet = n % 250 + 1;
        let tag = format!("{n:x}");
        let bench = NetBench {
            a: format!("dp{tag}a"),
            b: format!("dp{tag}b"),
            a_ip: format!("10.77.{subnet}.1"),
            b_ip: format!("10.77.{subnet}.2"),
            veth_a: format!("dpv{tag}a"),
            veth_b: format!("dpv{tag}b"),
        };
        let _ = run(&["ip", "netns", "del", &bench.a]);
        let _ = run(&["ip", "netns", "del", &bench.b]);
        run(&["ip", "netns", "add", &bench.a])?;
        run(&["ip", "netns", "add", &bench.b])?;
        run(&["ip", "link", "add", &bench.veth_a, "type", "veth", "peer", "name", &bench.veth_b])?;
        run(&["ip", "link", "set", &bench.veth_a, "netns", &bench.a])?;
        run(&["ip", "link", "set", &bench.veth_b, "netns", &bench.b])?;
        for (ns, dev, ip) in [(&bench.a, &bench.veth_a, &bench.a_ip), (&bench.b, &bench.veth_b, &bench.b_ip)]
        {
            run(&["ip", "-n", ns, "addr", "add", &format!("{ip}/24"), "dev", dev])?;
            run(&["ip", "-n", ns, "link", "set", dev, "up"])?;
            run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(bench)
    }

    /// Limits both directions to `mbit` Mbit/s with a token bucket filter.
    pub fn set_rate(&self, mbit: u32) -> Result<(), String> {
        for (ns, dev) in [(&self.a, &self.veth_a), (&self.b, &self.veth_b)] {
            let rate = format!("{mbit}mbit");
            let burst = format!("{}kb", (mbit as u64 * 1000 / 8 / 100).max(16));
            run(&[
                "ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate",
                &rate, "burst", &burst, "latency", "50ms",
            ])?;
        }
        Ok(())
    }

    /// Drops `percent` % of the packets host a sends (nftables, random).
    pub fn set_loss(&self, percent: u32) -> Result<(), String> {
        let _ = run(&["ip", "netns", "exec", &self.a, "nft", "delete", "table", "inet", "doppel_loss"]);
        if percent == 0 {
            return Ok(());
        }
        let rules = format!(
            "table inet doppel_loss {{ chain out {{ type filter hook output priority 0; policy accept; numgen random mod 100 < {percent} drop; }} }}"
        );
        run(&["ip", "netns", "exec", &self.a, "nft", &rules])
    }

    /// Takes the link down (`false`) or up (`true`), as a pulled cable would: no resets are sent.
    pub fn set_link(&self, up: bool) -> Result<(), String> {
        run(&["ip", "-n", &self.a, "link", "set", &self.veth_a, if up { "up" } else { "down" }])
    }

    /// Host b's end of the link (an interface name inside namespace `b`).
    pub fn iface_b(&self) -> &str {
        &self.veth_b
    }

    /// Bytes host a has sent on the link so far (kernel counters of its veth end).
    pub fn bytes_sent_by_a(&self) -> u64 {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.a,
                "cat",
                &format!("/sys/class/net/{}/statistics/tx_bytes", self.veth_a),
            ])
            .output();
        out.ok().and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok()).unwrap_or(0)
    }

    /// A command run inside namespace `ns`.
    pub fn command(ns: &str, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(program);
        c
    }
}

impl Drop for NetBench {
    fn drop(&mut self) {
        let _ = run(&["ip", "netns", "del", &self.a]);
        let _ = run(&["ip", "netns", "del", &self.b]);
    }
}

/// Whether network namespaces can be made here (root, iproute2).
pub fn available() -> bool {
    rustix::process::geteuid().is_root()
        && Command::new("ip").arg("-V").output().is_ok_and(|o| o.status.success())
}
