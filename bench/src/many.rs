//! `many`: one target holding many sources, each with its own identity, tree and agent
//! process on this machine (inotify capture: fanotify marks the whole file system, and every
//! simulated source would then see all the others' writes).
//!
//! 1. **Initial mirror** of every source at once: time until every replica equals its source,
//!    and the aggregate rate against the disk's own sequential write rate (measured first:
//!    1 GiB written and synced).
//! 2. **Steady load**: each source updates its small files `rate` times a second; a watcher
//!    on every replica (one inotify instance) sees each update arrive, and its lag is the time
//!    seen minus the time written, per source.
//! 3. The same **beside a noisy source**: source 0 also writes 1 MiB pieces as fast as it can.
//!
//! The target's CPU time, resident memory and threads are read from `/proc` at each step.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, sleep};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use doppel_testkit::{Compare, compare_trees};
use inotify::{Inotify, WatchMask};
use std::sync::Mutex as StdMutex;

use crate::ManyArgs;
use crate::stats::Sample;

/// Bytes of every small file, and of every update.
const SMALL: usize = 4096;
/// How long the initial mirror and the final drain may take.
const TIMEOUT: Duration = Duration::from_secs(600);

/// A process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Memory and threads of a process.
#[derive(Debug, Clone, Copy, Default)]
struct Footprint {
    rss: u64,
    threads: u64,
}

fn footprint(pid: u32) -> Result<Footprint> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok(Footprint { rss: field("VmRSS:") * 1024, threads: field("Threads:") })
}

/// One simulated source.
struct Source {
    home: PathBuf,
    src: PathBuf,
    replica: PathBuf,
    id: String,
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// Sequential write rate of the scratch directory's disk: 1 GiB written and synced.
fn disk_rate(dir: &Path) -> Result<f64> {
    let path = dir.join("disk-rate.tmp");
    let f = fs::File::create(&path)?;
    let chunk = vec![0x5au8; 8 << 20];
    let started = Instant::now();
    for i in 0..128u64 {
        f.write_all_at(&chunk, i * chunk.len() as u64)?;
    }
    f.sync_all()?;
    let secs = started.elapsed().as_secs_f64();
    drop(f);
    fs::remove_file(&path)?;
    Ok((1u64 << 30) as f64 / secs)
}

fn doppel(bin: &Path, home: &Path) -> Command {
    let mut c = Command::new(bin);
    c.arg("--home").arg(home);
    c
}

fn init(bin: &Path, home: &Path) -> Result<String> {
    let out = doppel(bin, home).arg("init").output().context("doppel init")?;
    if !out.status.success() {
        bail!("doppel init failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn spawn(mut cmd: Command, log: &Path) -> Result<Proc> {
    let f = fs::File::create(log)?;
    let child =
        cmd.stdin(Stdio::null()).stdout(f.try_clone()?).stderr(f).spawn().context("spawning doppel")?;
    Ok(Proc(child))
}

/// Every source's tree: `files` small files and one file of `big` bytes.
fn make_sources(args: &ManyArgs, bin: &Path, root: &Path, data: &Path) -> Result<Vec<Source>> {
    let mut v = Vec::new();
    for i in 0..args.sources {
        let home = root.join(format!("homes/s{i}"));
        let src = root.join(format!("src/s{i}"));
        fs::create_dir_all(&src)?;
        let id = init(bin, &home)?;
        for j in 0..args.files {
            fs::write(src.join(format!("f{j}")), doppel_testkit::noise((i * 1000 + j) as u64, SMALL))?;
        }
        if args.big > 0 {
            fs::write(src.join("big"), doppel_testkit::noise(i as u64, args.big as usize))?;
        }
        v.push(Source { home, src, replica: data.join(format!("replicas/s{i}/job")), id });
    }
    Ok(v)
}

/// Starts the target with every source allowed; returns it, its address and identity.
fn start_target(bin: &Path, root: &Path, data: &Path, sources: &[Source]) -> Result<(Proc, String, String)> {
    let home = root.join("target-home");
    let id = init(bin, &home)?;
    // Every simulated source connects from 127.0.0.1: the per-address handshake cap is for
    // separate machines.
    let mut config = String::from("[target]\nmax_handshakes_per_address = 1024\nmax_handshakes = 1024\n");
    for (i, s) in sources.iter().enumerate() {
        config += &format!("[[target.allow]]\nname = \"s{i}\"\nid = \"{}\"\n", s.id);
    }
    let cfg = root.join("target.toml");
    fs::write(&cfg, config)?;
    let addr_file = home.join("run/target.addr");
    let _ = fs::remove_file(&addr_file);
    let mut cmd = doppel(bin, &home);
    cmd.arg("--config").arg(&cfg).args(["target", "--listen", "127.0.0.1:0", "--data"]).arg(data);
    let mut p = spawn(cmd, &root.join("target.log"))?;
    let started = Instant::now();
    loop {
        if let Ok(a) = fs::read_to_string(&addr_file) {
            return Ok((p, a.trim().to_string(), id));
        }
        if let Some(st) = p.0.try_wait()? {
            bail!("doppel target exited ({st})");
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!("doppel target did not listen within 30 s");
        }
        sleep(Duration::from_millis(20));
    }
}

/// Waits until every replica equals its source; returns when each did, from `since`.
fn wait_all_equal(sources: &[Source], since: Instant) -> Result<Vec<Duration>> {
    let mut done: Vec<Option<Duration>> = vec![None; sources.len()];
    while done.iter().any(Option::is_none) {
        if since.elapsed() > TIMEOUT {
            let left = done.iter().filter(|d| d.is_none()).count();
            bail!("{left} replicas still differ from their sources after {TIMEOUT:?}");
        }
        for (s, d) in sources.iter().zip(done.iter_mut()).filter(|(_, d)| d.is_none()) {
            if compare_trees(&s.src, &s.replica, Compare::default()).is_ok() {
                *d = Some(since.elapsed());
            }
        }
        sleep(Duration::from_millis(100));
    }
    Ok(done.into_iter().flatten().collect())
}

/// Per-source lags of one steady-load phase, and what the noisy writer wrote.
struct Phase {
    lags: Vec<Sample>,
    updates: u64,
    target_cpu: Duration,
    noisy_bytes: u64,
    wall: Duration,
}

/// The latest update written to each (source, file): its stamp.
type Written = Arc<StdMutex<HashMap<(usize, usize), (u64, u64)>>>;

/// Runs the steady load (and the noisy writer on source 0 if `noisy`) for `args.secs`.
fn phase(args: &ManyArgs, sources: &[Source], target_pid: u32, noisy: bool) -> Result<Phase> {
    let written: Written = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let lags: Arc<StdMutex<Vec<Vec<Duration>>>> = Arc::new(StdMutex::new(vec![Vec::new(); sources.len()]));
    let watcher = watch(sources, written.clone(), lags.clone())?;
    let noisy_bytes = Arc::new(AtomicU64::new(0));
    let noise = noisy.then(|| {
        let (path, stop, n) = (sources[0].src.join("noisy"), stop.clone(), noisy_bytes.clone());
        thread::spawn(move || noisy_writer(&path, &stop, &n))
    });
    let cpu0 = crate::cpu::of_process(target_pid)?;
    let started = Instant::now();
    let total = args.rate * args.sources as u64 * args.secs;
    let every = Duration::from_secs_f64(1.0 / (args.rate * args.sources as u64) as f64);
    for k in 0..total {
        let due = started + every * k as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            sleep(wait);
        }
        let s = (k % args.sources as u64) as usize;
        let f = ((k / args.sources as u64) % args.files as u64) as usize;
        let stamp = (k + 1, now_us());
        let mut buf = format!("{} {}\n", stamp.0, stamp.1).into_bytes();
        buf.resize(64, b' ');
        written.lock().expect("lock").insert((s, f), stamp);
        fs::OpenOptions::new()
            .write(true)
            .open(sources[s].src.join(format!("f{f}")))?
            .write_all_at(&buf, 0)?;
    }
    let wall = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    if let Some(n) = noise {
        let _ = n.join();
    }
    // Let the last updates arrive before the watcher stops.
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(30) {
        let seen: usize = lags.lock().expect("lock").iter().map(Vec::len).sum();
        if seen as u64 >= total * 95 / 100 {
            break;
        }
        sleep(Duration::from_millis(100));
    }
    sleep(Duration::from_secs(1));
    watcher.store(true, Ordering::Relaxed);
    let target_cpu = crate::cpu::of_process(target_pid)? - cpu0;
    let lags = std::mem::take(&mut *lags.lock().expect("lock")).into_iter().map(Sample::new).collect();
    Ok(Phase { lags, updates: total, target_cpu, noisy_bytes: noisy_bytes.load(Ordering::Relaxed), wall })
}

/// Writes 1 MiB pieces over a 256 MiB file as fast as it can until `stop`.
fn noisy_writer(path: &Path, stop: &AtomicBool, bytes: &AtomicU64) {
    let Ok(f) = fs::OpenOptions::new().create(true).truncate(false).write(true).open(path) else { return };
    let piece = doppel_testkit::noise(99, 1 << 20);
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        if f.write_all_at(&piece, (i % 256) << 20).is_err() {
            return;
        }
        bytes.fetch_add(1 << 20, Ordering::Relaxed);
        i += 1;
    }
}

/// Watches every replica; records the lag of each update the first time it is seen. Returns
/// the flag that stops the watcher.
fn watch(
    sources: &[Source],
    written: Written,
    lags: Arc<StdMutex<Vec<Vec<Duration>>>>,
) -> Result<Arc<AtomicBool>> {
    let mut inotify = Inotify::init().context("inotify")?;
    let mut dirs = HashMap::new();
    for (i, s) in sources.iter().enumerate() {
        let wd = inotify
            .watches()
            .add(&s.replica, WatchMask::MODIFY | WatchMask::CLOSE_WRITE | WatchMask::MOVED_TO)
            .with_context(|| format!("watching {}", s.replica.display()))?;
        dirs.insert(wd, i);
    }
    let replicas: Vec<PathBuf> = sources.iter().map(|s| s.replica.clone()).collect();
    let done = Arc::new(AtomicBool::new(false));
    let finished = done.clone();
    thread::spawn(move || {
        let mut seen: HashMap<(usize, usize), u64> = HashMap::new();
        let mut buf = vec![0u8; 1 << 16];
        while !finished.load(Ordering::Relaxed) {
            let events = match inotify.read_events(&mut buf) {
                Ok(e) => e.map(|e| (e.wd.clone(), e.name.map(|n| n.to_owned()))).collect::<Vec<_>>(),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    sleep(Duration::from_millis(1));
                    continue;
                }
                Err(_) => return,
            };
            for (wd, name) in events {
                let (Some(&s), Some(name)) = (dirs.get(&wd), name) else { continue };
                let Some(f) = name.to_str().and_then(|n| n.strip_prefix('f')).and_then(|n| n.parse().ok())
                else {
                    continue;
                };
                let mut head = [0u8; 64];
                let Ok(file) = fs::File::open(replicas[s].join(&name)) else { continue };
                let Ok(n) = file.read_at(&mut head, 0) else { continue };
                let text = String::from_utf8_lossy(&head[..n]);
                let mut parts = text.split_whitespace();
                let (Some(Ok(seq)), Some(Ok(at))) =
                    (parts.next().map(str::parse::<u64>), parts.next().map(str::parse::<u64>))
                else {
                    continue;
                };
                let last = seen.entry((s, f)).or_insert(0);
                if seq <= *last || written.lock().expect("lock").get(&(s, f)).is_none() {
                    continue;
                }
                *last = seq;
                lags.lock().expect("lock")[s].push(Duration::from_micros(now_us().saturating_sub(at)));
            }
        }
    });
    Ok(done)
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
}

/// Lag over all sources (excluding `skip`) and the spread of per-source p99s.
fn lag_rows(p: &Phase, skip: Option<usize>) -> (Sample, Sample, usize) {
    let mut all = Vec::new();
    let mut p99s = Vec::new();
    for (_, s) in p.lags.iter().enumerate().filter(|(i, _)| Some(*i) != skip) {
        all.extend_from_slice(s.values());
        if s.len() > 0 {
            p99s.push(s.percentile(99.0));
        }
    }
    let n = all.len();
    (Sample::new(all), Sample::new(p99s), n)
}

/// `many`: the whole measurement, one report.
pub fn main(args: &ManyArgs) -> Result<()> {
    let bin = crate::agent::doppel_binary()?;
    crate::machine::require_root()?;
    if args.sources == 0 || args.files == 0 || args.rate == 0 {
        bail!("--sources, --files and --rate must be at least 1");
    }
    if args.dir.exists() {
        fs::remove_dir_all(&args.dir).with_context(|| format!("clearing {}", args.dir.display()))?;
    }
    fs::create_dir_all(&args.dir)?;
    let root = fs::canonicalize(&args.dir)?;
    let machine = crate::machine::Machine::describe(&root, &bin)?;
    eprintln!("[bench] {}", machine.one_line());
    let disk = disk_rate(&root)?;
    eprintln!("[bench] disk sequential write: {:.0} MiB/s", disk / (1 << 20) as f64);
    let data = root.join("target-data");
    let sources = make_sources(args, &bin, &root, &data)?;
    let total_bytes: u64 = (args.files * SMALL) as u64 * args.sources as u64 + args.big * args.sources as u64;
    if !crate::cpu::wait_quiet(Duration::from_secs(120))? {
        eprintln!("[bench] warning: the machine did not become quiet within 120 s");
    }
    let (target, addr, target_id) = start_target(&bin, &root, &data, &sources)?;
    let pid = target.0.id();
    let base = footprint(pid)?;
    let cpu0 = crate::cpu::of_process(pid)?;
    let busy0 = crate::cpu::machine_busy()?;
    let started = Instant::now();
    let mut agents = Vec::new();
    for s in &sources {
        let mut cmd = doppel(&bin, &s.home);
        cmd.arg("protect").arg(&s.src).args([
            "--name",
            "job",
            "--to",
            &addr,
            "--target-id",
            &target_id,
            "--capture",
            "inotify",
        ]);
        agents.push(spawn(cmd, &s.home.with_extension("log"))?);
    }
    let each = wait_all_equal(&sources, started)?;
    let mirror = started.elapsed();
    let mirror_cpu = crate::cpu::of_process(pid)? - cpu0;
    let mirror_busy = crate::cpu::machine_busy()? - busy0;
    let held = footprint(pid)?;
    eprintln!("[bench] all {} replicas equal after {:.1} s", args.sources, mirror.as_secs_f64());
    let quiet = phase(args, &sources, pid, false)?;
    let after_quiet = footprint(pid)?;
    eprintln!("[bench] steady load done");
    let noisy = phase(args, &sources, pid, true)?;
    let after_noisy = footprint(pid)?;
    eprintln!("[bench] steady load beside a noisy source done");
    // Everything the sources wrote arrives.
    let drain = Instant::now();
    wait_all_equal(&sources, drain)?;
    let drained = drain.elapsed();
    drop(agents);
    drop(target);

    let each = Sample::new(each);
    let (q_all, q_p99s, q_n) = lag_rows(&quiet, None);
    let (n_all, n_p99s, n_n) = lag_rows(&noisy, Some(0));
    let (q_others, _, _) = lag_rows(&quiet, Some(0));
    let mut r = String::new();
    r += &machine.table("###", &[]);
    r += &format!(
        "### Many sources: {} sources, one target, on one machine\n\nEach source: its own identity, agent process (`--capture inotify`) and tree of {} files of {} KiB plus one of {}; {} in all. Disk sequential write (1 GiB, synced): {:.0} MiB/s.\n\n",
        args.sources,
        args.files,
        SMALL / 1024,
        mib(args.big),
        mib(total_bytes),
        disk / (1 << 20) as f64
    );
    r += "| initial mirror | value |\n|---|---|\n";
    r += &format!("| all replicas equal to their sources after | {:.1} s |\n", mirror.as_secs_f64());
    r += &format!(
        "| per source: first / median / last equal | {:.1} / {:.1} / {:.1} s |\n",
        each.min().as_secs_f64(),
        each.percentile(50.0).as_secs_f64(),
        each.percentile(100.0).as_secs_f64()
    );
    let rate = total_bytes as f64 / mirror.as_secs_f64();
    r += &format!(
        "| aggregate apply rate | {:.0} MiB/s ({:.0} % of the disk's sequential write rate) |\n",
        rate / (1 << 20) as f64,
        100.0 * rate / disk
    );
    r += &format!("| target CPU | {:.1} s |\n", mirror_cpu.as_secs_f64());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    r += &format!(
        "| the machine's CPU busy meanwhile (all cores: the agents, their file reads, the target) | {:.1} s of {:.1} s available ({:.0} %) |\n",
        mirror_busy.as_secs_f64(),
        mirror.as_secs_f64() * cores,
        100.0 * mirror_busy.as_secs_f64() / (mirror.as_secs_f64() * cores)
    );
    r += &format!(
        "| target RSS / threads: started, all connected, after the loads | {} / {}, {} / {}, {} / {} |\n",
        mib(base.rss),
        base.threads,
        mib(held.rss),
        held.threads,
        mib(after_noisy.rss.max(after_quiet.rss)),
        after_noisy.threads
    );
    r += &format!(
        "| target memory per source | {} |\n\n",
        mib(held.rss.saturating_sub(base.rss) / args.sources as u64)
    );
    r += &format!(
        "Steady load: every source overwrites the head of its small files, {} updates/s each ({} in all), for {} s; lag = seen in the replica minus written.\n\n",
        args.rate,
        args.rate * args.sources as u64,
        args.secs
    );
    r += "| | updates written / seen | lag p50 | lag p99 | max | per-source p99: median / worst | target CPU |\n|---|---|---|---|---|---|---|\n";
    for (name, p, all, p99s, n) in [
        ("steady load", &quiet, &q_all, &q_p99s, q_n),
        ("beside a noisy source (others)", &noisy, &n_all, &n_p99s, n_n),
    ] {
        r += &format!(
            "| {name} | {} / {n} | {} | {} | {} | {} / {} | {:.1} s ({:.0} % of a core) |\n",
            p.updates,
            ms(all.percentile(50.0)),
            ms(all.percentile(99.0)),
            ms(all.percentile(100.0)),
            ms(p99s.percentile(50.0)),
            ms(p99s.percentile(100.0)),
            p.target_cpu.as_secs_f64(),
            100.0 * p.target_cpu.as_secs_f64() / p.wall.as_secs_f64()
        );
    }
    r += &format!(
        "\nThe noisy source wrote {} ({:.0} MiB/s) beside them. p99 lag of the other sources beside it against without it: {:.2}x (the same sources without it: p99 {}). Everything written was on the replicas {:.1} s after the last write.\n",
        mib(noisy.noisy_bytes),
        noisy.noisy_bytes as f64 / (1 << 20) as f64 / noisy.wall.as_secs_f64(),
        n_all.percentile(99.0).as_secs_f64() / q_others.percentile(99.0).as_secs_f64().max(1e-9),
        ms(q_others.percentile(99.0)),
        drained.as_secs_f64()
    );
    println!("{r}");
    if let Some(out) = &args.out {
        fs::write(out, &r)?;
        eprintln!("[bench] report written to {}", out.display());
    }
    if !args.keep {
        fs::remove_dir_all(&root)?;
    }
    Ok(())
}
