//! Running things inside the network namespaces of a [`doppel_testkit::netns::NetBench`].
//!
//! Processes are started with `nsenter --net=/run/netns/NS` rather than `ip netns exec`: the
//! latter also gives the process a mount namespace of its own, and then a `--capture fuse`
//! mount made by an agent would be invisible to the benchmark, which writes through it.
//! Sockets the benchmark itself needs inside a namespace (the link calibration) are made by a
//! thread that has moved into it: a socket keeps its namespace whichever thread uses it.

use std::fs::File;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, anyhow, bail};
use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};

/// `program` to be run inside network namespace `ns` (and in this process's mount namespace).
pub fn command(ns: &str, program: impl AsRef<Path>) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{ns}")).arg("--").arg(program.as_ref());
    c
}

/// Runs `f` on a thread that has moved into network namespace `ns`.
pub fn within<T: Send>(ns: &str, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let path = format!("/run/netns/{ns}");
    let handle = File::open(&path).with_context(|| format!("opening {path}"))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            move_into_link_name_space(std::os::fd::AsFd::as_fd(&handle), Some(LinkNameSpaceType::Network))
                .with_context(|| format!("entering network namespace {ns}"))?;
            f()
        })
        .join()
        .map_err(|_| anyhow!("a thread in namespace {ns} panicked"))?
    })
}

/// Runs `ip ARGS` (or any command line) and fails with its error output.
pub fn run(args: &[&str]) -> Result<()> {
    let out =
        Command::new(args[0]).args(&args[1..]).output().with_context(|| format!("running {}", args[0]))?;
    if !out.status.success() {
        bail!("`{}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Bytes (received, sent) by interface `dev` in namespace `ns`, from the kernel's counters
/// (`/proc/thread-self/net/dev` read by a thread inside the namespace: `/sys/class/net` would
/// show the namespace `/sys` was mounted in).
pub fn dev_bytes(ns: &str, dev: &str) -> Result<(u64, u64)> {
    let text = within(ns, || Ok(std::fs::read_to_string("/proc/thread-self/net/dev")?))?;
    parse_dev(&text, dev).with_context(|| format!("no counters for {dev} in namespace {ns}"))
}

/// (rx_bytes, tx_bytes) of `dev` in the text of `/proc/net/dev`.
fn parse_dev(text: &str, dev: &str) -> Option<(u64, u64)> {
    let line = text.lines().find_map(|l| l.trim_start().strip_prefix(dev)?.strip_prefix(':'))?;
    let v: Vec<u64> = line.split_whitespace().filter_map(|f| f.parse().ok()).collect();
    Some((*v.first()?, *v.get(8)?))
}

/// Stops a process started with [`command`] as an operator would: SIGTERM, then SIGKILL if it
/// has not exited within `grace` (a daemon that ignores the signal must not hang the run).
pub fn terminate(mut child: std::process::Child, grace: std::time::Duration) {
    use rustix::process::{Pid, Signal, kill_process};
    if let Some(pid) = Pid::from_raw(child.id() as i32) {
        let _ = kill_process(pid, Signal::TERM);
    }
    let t = std::time::Instant::now();
    while t.elapsed() < grace {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[cfg(test)]
mod tests {
    #[test]
    fn proc_net_dev() {
        let text = "Inter-|   Receive |  Transmit\n face |bytes packets\n    lo: 10 1 0 0 0 0 0 0 20 2 0 0 0 0 0 0\n  tun0: 300 3 0 0 0 0 0 0 400 4 0 0 0 0 0 0\n";
        assert_eq!(super::parse_dev(text, "tun0"), Some((300, 400)));
        assert_eq!(super::parse_dev(text, "lo"), Some((10, 20)));
        assert_eq!(super::parse_dev(text, "eth0"), None);
    }
}
