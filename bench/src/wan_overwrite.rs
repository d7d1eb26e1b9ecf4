//! 4 KiB random overwrites in a large file (a disk image, a database file): the same
//! overwrites, at page-aligned random offsets, made with each tool in charge of a destination
//! that already holds the file as it was, then the time until the destination has them and
//! the bytes that crossed the link per byte changed. doppel watches the file (`watch`
//! capture: it re-reads the file and sends the 64 KiB blocks that changed) or sees every
//! write (`fuse` capture: the writes themselves); rsync compares the whole file by checksums
//! (its delta-transfer algorithm), writing a new copy (default) or in place (`--inplace`).

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use doppel_testkit::noise;

use crate::agent::JobStatus;
use crate::mirror::{prepare_cold, verify};
use crate::remote::{self, Homes};
use crate::rsyncd::{self, Daemon};
use crate::scratch::{Scratch, remove_if_present};
use crate::wan::{Env, RSYNC_PORT, Traffic, measured};

/// Size of one overwrite.
pub const PAGE: u64 = 4096;
/// The file's name in every tree.
const NAME: &str = "disk.img";

/// One tool's run.
#[derive(Debug, Clone, Default)]
pub struct OverwriteRun {
    /// What ran.
    pub tool: String,
    /// Time from the first overwrite until the destination had them all, and the traffic.
    pub traffic: Traffic,
    /// For rsync: its `--stats`.
    pub rsync: Option<rsyncd::Stats>,
    /// For doppel: the agent's own count of bytes sent for the overwrites.
    pub doppel_sent: Option<u64>,
}

/// The large file, generated once (noise) and kept with `--keep`.
pub fn ensure_big(scratch: &Scratch, size: u64) -> Result<PathBuf> {
    let path = scratch.kept(&format!("big-{size}.img"));
    if fs::metadata(&path).is_ok_and(|m| m.len() == size) {
        return Ok(path);
    }
    eprintln!("[bench] generating a {:.1} GiB file", size as f64 / (1u64 << 30) as f64);
    let partial = path.with_extension("partial");
    let f = File::create(&partial)?;
    let chunk = 8u64 << 20;
    let mut off = 0;
    while off < size {
        let n = chunk.min(size - off);
        f.write_all_at(&noise(0xb16 + off, n as usize), off)?;
        off += n;
    }
    f.sync_all()?;
    fs::rename(&partial, &path)?;
    Ok(path)
}

/// The overwrites: `count` distinct page-aligned offsets and contents, the same for every
/// tool. Distinct, because a page written twice holds only its second content, and the wait
/// for the destination to hold every overwrite would never end.
fn overwrites(size: u64, count: u64) -> Vec<(u64, Vec<u8>)> {
    let pages = size / PAGE;
    let count = count.min(pages);
    let mut x = 0x5eed_u64;
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    while (out.len() as u64) < count {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let page = x % pages;
        if seen.insert(page) {
            out.push((page * PAGE, noise(0x0e_0000 + out.len() as u64, PAGE as usize)));
        }
    }
    out
}

/// Makes the overwrites in `file`, then `fsync`s it (as a database would).
fn apply(file: &Path, ws: &[(u64, Vec<u8>)]) -> Result<()> {
    let f =
        OpenOptions::new().write(true).open(file).with_context(|| format!("opening {}", file.display()))?;
    for (off, data) in ws {
        f.write_all_at(data, *off)?;
    }
    f.sync_all()?;
    Ok(())
}

/// Whether `file` holds every overwrite.
fn holds(file: &Path, ws: &[(u64, Vec<u8>)]) -> bool {
    let Ok(f) = File::open(file) else { return false };
    let mut buf = vec![0u8; PAGE as usize];
    ws.iter().all(|(off, data)| f.read_exact_at(&mut buf, *off).is_ok() && &buf == data)
}

/// Copies the base file into `dir` as [`NAME`], the file and `dir` with the base's
/// modification time (rsync compares times in whole seconds: two directories made in the
/// same second would never have their times aligned).
fn place(base: &Path, dir: &Path) -> Result<()> {
    fs::create_dir_all(dir)?;
    let to = dir.join(NAME);
    fs::copy(base, &to).with_context(|| format!("copying {} to {}", base.display(), to.display()))?;
    let mtime = fs::metadata(base)?.modified()?;
    File::options().write(true).open(&to)?.set_modified(mtime)?;
    File::open(dir)?.set_modified(mtime)?;
    Ok(())
}

/// Runs every tool on its own copies of `base`.
pub fn run(env: &Env, base: &Path) -> Result<Vec<OverwriteRun>> {
    let size = fs::metadata(base)?.len();
    let ws = overwrites(size, env.args.overwrites);
    let mut out = Vec::new();
    for (tool, capture) in [("doppel (watch)", None), ("doppel (fuse)", Some("fuse"))] {
        let r = doppel(env, base, &ws, tool, capture)?;
        eprintln!("[bench] {tool}: overwrites replicated in {:.2} s", r.traffic.wall.as_secs_f64());
        out.push(r);
    }
    for (tool, opts) in [("rsync -az", &["-az"][..]), ("rsync -az --inplace", &["-az", "--inplace"][..])] {
        let r = rsync(env, base, &ws, tool, opts)?;
        eprintln!("[bench] {tool}: overwrites copied in {:.2} s", r.traffic.wall.as_secs_f64());
        out.push(r);
    }
    Ok(out)
}

fn doppel(
    env: &Env,
    base: &Path,
    ws: &[(u64, Vec<u8>)],
    tool: &str,
    capture: Option<&str>,
) -> Result<OverwriteRun> {
    let src = env.scratch.wan("big-src");
    let homes = Homes::new(&env.scratch.wan("big-doppel"));
    remove_if_present(&src)?;
    remove_if_present(&homes.work)?;
    place(base, &src)?;
    // The replica already holds the file: the first contact compares block hashes only.
    place(base, &homes.replica())?;
    let target = remote::start_target(&env.doppel, &env.net.b, &homes, &env.target_listen(), "")?;
    let extra: Vec<&str> = capture.map(|c| vec!["--capture", c]).unwrap_or_default();
    let mut agent = remote::start_agent(&env.doppel, &env.net.a, &homes, &src, &target, &extra)?;
    // Identical already: the comparison may find nothing to send, so no op to wait for.
    agent.wait_status(Duration::from_millis(50), Duration::from_secs(1800), JobStatus::drained)?;
    let sent_before = agent.status()?.map(|s| s.bytes_sent).unwrap_or(0);
    prepare_cold()?;
    let replica = homes.replica().join(NAME);
    let (_, traffic) = measured(&env.wire, || {
        apply(&src.join(NAME), ws)?;
        let t = Instant::now();
        loop {
            agent.check_alive()?;
            if holds(&replica, ws) && agent.status()?.is_some_and(|s| s.drained()) {
                return Ok(());
            }
            if t.elapsed() > Duration::from_secs(1800) {
                bail!("{tool}: the replica did not get the overwrites within 30 minutes");
            }
            sleep(Duration::from_millis(20));
        }
    })?;
    let sent = agent.status()?.map(|s| s.bytes_sent).unwrap_or(0) - sent_before;
    verify(&src, &homes.replica())?;
    agent.stop()?;
    drop(target);
    verify(&src, &homes.replica())?;
    remove_if_present(&src)?;
    remove_if_present(&homes.work)?;
    Ok(OverwriteRun { tool: tool.into(), traffic, rsync: None, doppel_sent: Some(sent) })
}

fn rsync(env: &Env, base: &Path, ws: &[(u64, Vec<u8>)], tool: &str, opts: &[&str]) -> Result<OverwriteRun> {
    let (src, dst) = (env.scratch.wan("big-src"), env.scratch.wan("big-rsync-dst"));
    remove_if_present(&src)?;
    remove_if_present(&dst)?;
    place(base, &src)?;
    place(base, &dst)?;
    let daemon = Daemon::start(&env.net.b, &env.wire.b_ip, RSYNC_PORT, &dst, &env.scratch.wan("work"))?;
    prepare_cold()?;
    let (stats, traffic) = measured(&env.wire, || {
        apply(&src.join(NAME), ws)?;
        rsyncd::push(&env.net.a, opts, &src, &daemon.url)
    })?;
    if !holds(&dst.join(NAME), ws) {
        bail!("{tool}: the destination does not hold the overwrites");
    }
    verify(&src, &dst)?;
    drop(daemon);
    remove_if_present(&src)?;
    remove_if_present(&dst)?;
    Ok(OverwriteRun { tool: tool.into(), traffic, rsync: Some(stats), doppel_sent: None })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overwrites_are_aligned_and_inside() {
        let ws = overwrites(1 << 30, 500);
        assert_eq!(ws.len(), 500);
        assert!(ws.iter().all(|(o, d)| o % PAGE == 0 && o + PAGE <= 1 << 30 && d.len() == PAGE as usize));
        assert_eq!(ws, overwrites(1 << 30, 500));
        // Distinct pages, even where collisions are certain (more overwrites than half the pages).
        let small = overwrites(64 * PAGE, 64);
        let pages: std::collections::HashSet<u64> = small.iter().map(|(o, _)| *o).collect();
        assert_eq!(pages.len(), 64);
    }
}
