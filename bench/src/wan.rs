//! `wan`: doppel against `rsync -az` (to an rsync daemon) and lsyncd over an emulated
//! wide-area link (see [`crate::delay`]): the initial mirror of a tree, the lag of small
//! updates, 4 KiB random overwrites in a large file, and how full each kept the link.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use doppel_testkit::netns::NetBench;

use crate::delay::Wire;
use crate::machine::{self, Machine};
use crate::scratch::Scratch;
use crate::wirelog::WireLog;
use crate::{WanArgs, agent, linkcheck, lsyncd, tree, wan_lag, wan_mirror, wan_overwrite, wan_report};

/// Port of the doppel target.
pub const TARGET_PORT: u16 = 7340;
/// Port of the rsync daemon (one at a time).
pub const RSYNC_PORT: u16 = 8730;

/// What every measurement of the mode shares.
pub struct Env<'a> {
    /// The options.
    pub args: &'a WanArgs,
    /// The doppel binary.
    pub doppel: PathBuf,
    /// The scratch directory.
    pub scratch: Scratch,
    /// The two hosts: a (sources) and b (targets).
    pub net: NetBench,
    /// The link between them.
    pub wire: Wire,
    /// Whether lsyncd is installed (its rows are left out otherwise).
    pub lsyncd: bool,
}

impl Env<'_> {
    /// `HOST:PORT` of the doppel target on host b.
    pub fn target_listen(&self) -> String {
        format!("{}:{TARGET_PORT}", self.wire.b_ip)
    }
}

/// Traffic and time of one measured stretch.
#[derive(Debug, Clone, Default)]
pub struct Traffic {
    /// Wall-clock time.
    pub wall: Duration,
    /// Bytes a sent to b (IP packets).
    pub a_to_b: u64,
    /// Bytes b sent to a.
    pub b_to_a: u64,
    /// The bytes a sent, sampled every 100 ms.
    pub log: WireLog,
}

impl Traffic {
    /// `a_to_b / (rate × wall)`: how full the a-to-b direction was kept on average.
    pub fn utilisation(&self, rate: f64) -> f64 {
        self.a_to_b as f64 / (rate * self.wall.as_secs_f64()).max(1.0)
    }
}

/// Runs `f`, counting what crossed `wire` meanwhile.
pub fn measured<T>(wire: &Wire, f: impl FnOnce() -> Result<T>) -> Result<(T, Traffic)> {
    let (a, b) = (wire.bytes_a_to_b(), wire.bytes_b_to_a());
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let sampler = s.spawn(|| WireLog::record(wire, &stop));
        let t = Instant::now();
        let r = f();
        let wall = t.elapsed();
        stop.store(true, Ordering::Relaxed);
        let log = sampler.join().map_err(|_| anyhow!("sampler panicked"))?;
        let traffic = Traffic { wall, a_to_b: wire.bytes_a_to_b() - a, b_to_a: wire.bytes_b_to_a() - b, log };
        Ok((r?, traffic))
    })
}

/// Runs every measurement and prints the report.
pub fn main(args: &WanArgs) -> Result<()> {
    let doppel = agent::doppel_binary()?;
    machine::require_rsync()?;
    machine::require_root()?;
    if args.runs == 0 || args.pool == 0 || args.rate == 0 {
        anyhow::bail!("--runs, --pool and --rate must be positive");
    }
    let scratch = Scratch::open(&args.dir)?;
    let machine = Machine::describe(&args.dir, &doppel)?;
    eprintln!("[bench] {}", machine.one_line());
    let tree = tree::ensure(&scratch, args.size)?;
    let big = wan_overwrite::ensure_big(&scratch, args.big_size)?;
    let net = NetBench::new().map_err(|e| anyhow!("creating network namespaces: {e}"))?;
    let wire = Wire::new(&net, args.mbit, Duration::from_micros(args.rtt_ms * 500))?;
    let lsyncd = lsyncd::available();
    if !lsyncd {
        eprintln!("[bench] lsyncd is not installed: its rows are left out");
    }
    let env = Env { args, doppel, scratch, net, wire, lsyncd };
    let check = linkcheck::run(&env.wire, &env.net.a, &env.net.b, 10)?;
    eprintln!(
        "[bench] link: round trip {:.1} ms, one TCP stream {:.1} Mbit/s",
        check.rtt.median().as_secs_f64() * 1e3,
        check.stream_rate * 8.0 / 1e6
    );
    let (mirror, running) = wan_mirror::run(&env, &tree)?;
    let lag = wan_lag::run(&env, running)?;
    let overwrite = wan_overwrite::run(&env, &big)?;
    let kernel = env.wire.kernel_tx_bytes()?;
    let forwarded = (env.wire.bytes_a_to_b(), env.wire.bytes_b_to_a());
    let report =
        wan_report::markdown(&env, &machine, &tree, &check, &mirror, &lag, &overwrite, (kernel, forwarded));
    crate::report::publish(&report, args.out.as_deref())?;
    let Env { scratch, net, wire, .. } = env;
    drop(wire);
    drop(net);
    if !args.keep {
        scratch.remove()?;
    }
    Ok(())
}
