//! `history`: what the point-in-time history costs and gives, side by side in one run.
//!
//! - Apply throughput with history on and off, for an overwrite-heavy workload (random
//!   64 KiB overwrites of a large file) and a create-heavy one (small new files), driving the
//!   replica's apply directly (what the target's workers do), commits grouped as the target
//!   groups them; runs alternate on and off.
//! - History bytes per byte overwritten.
//! - Restore of a tree (the point before 10 % of it was overwritten) against `cp -a` of the
//!   replica, both from a cold cache.
//! - Test-failover start (a writable view of a point) for a small and a large replica.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use doppel_apply::Replica;
use doppel_apply::history::view::PointView;
use doppel_apply::history::{dir_of, restore::restore};
use doppel_proto::{Op, OpRecord, WirePath};

use crate::HistoryArgs;

const MIB: u64 = 1 << 20;

struct Rig {
    root: PathBuf,
    state: PathBuf,
    replica: Replica,
    seq: u64,
}

fn w(p: &str) -> WirePath {
    WirePath(p.as_bytes().to_vec())
}

fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

impl Rig {
    fn new(dir: &Path, name: &str, history: bool) -> Result<Rig> {
        let root = dir.join(name).join("replica");
        let state = dir.join(name).join("state");
        let mut replica = Replica::open(&root, &state)?;
        if !history {
            replica.set_history(None)?;
        }
        Ok(Rig { root, state, replica, seq: 0 })
    }

    /// A replica without history applying runs of new files on `lanes` threads.
    fn lanes(dir: &Path, name: &str, lanes: usize) -> Result<Rig> {
        let mut rig = Rig::new(dir, name, false)?;
        rig.replica.set_lanes(lanes);
        Ok(rig)
    }

    /// Applies `ops` as one batch, as the target's worker does (each run of new files ahead
    /// on the replica's lanes, then every op in order).
    fn apply_batch(&mut self, ops: Vec<Op>) -> Result<()> {
        let time_us = now_us();
        let recs: Vec<_> =
            ops.into_iter().zip(self.seq + 1..).map(|(op, seq)| OpRecord { seq, time_us, op }).collect();
        for i in 0..recs.len() {
            self.replica.apply_ahead(&recs[i..]);
            self.replica.apply(&recs[i])?;
        }
        self.seq += recs.len() as u64;
        Ok(())
    }

    fn apply(&mut self, op: Op) -> Result<()> {
        self.seq += 1;
        self.replica.apply(&OpRecord { seq: self.seq, time_us: now_us(), op })?;
        Ok(())
    }

    fn commit(&mut self) -> Result<()> {
        self.replica.commit()?;
        Ok(())
    }

    /// Commits what was applied on a thread of its own while the next batch applies, as the
    /// target's worker does with more ops queued; `pending` is the commit still running
    /// (ended first: at most one runs).
    fn commit_beside(
        &mut self,
        pending: &mut Option<
            std::thread::JoinHandle<Result<doppel_apply::Flushed, doppel_apply::ApplyError>>,
        >,
    ) -> Result<()> {
        self.end_commit(pending)?;
        if let Some(flush) = self.replica.begin_commit()? {
            *pending = Some(std::thread::spawn(move || flush.run()));
        }
        Ok(())
    }

    fn end_commit(
        &mut self,
        pending: &mut Option<
            std::thread::JoinHandle<Result<doppel_apply::Flushed, doppel_apply::ApplyError>>,
        >,
    ) -> Result<()> {
        if let Some(h) = pending.take() {
            let flushed = h.join().map_err(|_| anyhow::anyhow!("the commit thread panicked"))??;
            self.replica.end_commit(flushed)?;
        }
        Ok(())
    }

    fn history_bytes(&mut self) -> u64 {
        self.replica.history().map_or(0, |h| h.journal().bytes())
    }
}

/// A pseudo-random stream (xorshift), so every run writes the same bytes at the same places.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// Writes a file of `size` bytes in 1 MiB ops.
fn big(rig: &mut Rig, path: &str, size: u64, rng: &mut Rng) -> Result<()> {
    rig.apply(Op::Create { path: w(path), mode: 0o644 })?;
    let mut buf = vec![0u8; MIB as usize];
    let mut off = 0;
    while off < size {
        rng.fill(&mut buf);
        rig.apply(Op::Write { path: w(path), offset: off, data: buf.clone() })?;
        off += MIB;
    }
    rig.commit()
}

/// Random 64 KiB overwrites of `bytes` in all; returns MiB/s and the history bytes they added.
fn overwrite(rig: &mut Rig, file: u64, bytes: u64, seed: u64) -> Result<(f64, u64)> {
    let mut rng = Rng(seed);
    let mut buf = vec![0u8; 64 << 10];
    let before = rig.history_bytes();
    let t = Instant::now();
    for i in 0..bytes / (64 << 10) {
        rng.fill(&mut buf);
        let off = (rng.next() % (file / (64 << 10))) * (64 << 10);
        rig.apply(Op::Write { path: w("disk.img"), offset: off, data: buf.clone() })?;
        if i % 64 == 63 {
            rig.commit()?;
        }
    }
    rig.commit()?;
    let secs = t.elapsed().as_secs_f64();
    Ok((bytes as f64 / MIB as f64 / secs, rig.history_bytes() - before))
}

/// `files` new 4 KiB files with their mtime, in batches of 256 files, each committed beside
/// the applying of the next (as a mirror of small files arrives at a target); returns files
/// per second and this process's CPU time per file, in µs.
fn create(rig: &mut Rig, files: u64, run: usize) -> Result<(f64, f64)> {
    let mut rng = Rng(7 + run as u64);
    let mut buf = vec![0u8; 4096];
    rig.apply(Op::Mkdir { path: w(&format!("c{run}")), mode: 0o755 })?;
    rig.commit()?;
    let cpu = crate::cpu::of_process(std::process::id())?;
    let t = Instant::now();
    let mtime = Some(doppel_proto::Timestamp { secs: 1_700_000_000, nanos: 0 });
    let mut pending = None;
    for batch in (0..files).collect::<Vec<_>>().chunks(256) {
        let mut ops = Vec::with_capacity(batch.len() * 3);
        for i in batch {
            let p = format!("c{run}/f{i:06}");
            rng.fill(&mut buf);
            ops.push(Op::Create { path: w(&p), mode: 0o644 });
            ops.push(Op::Write { path: w(&p), offset: 0, data: buf.clone() });
            ops.push(Op::SetAttr { path: w(&p), attrs: doppel_proto::Attrs { mtime, ..Default::default() } });
        }
        rig.apply_batch(ops)?;
        rig.commit_beside(&mut pending)?;
    }
    rig.end_commit(&mut pending)?;
    rig.commit()?;
    let cpu = crate::cpu::of_process(std::process::id())? - cpu;
    Ok((files as f64 / t.elapsed().as_secs_f64(), cpu.as_secs_f64() * 1e6 / files as f64))
}

fn cold() -> Result<()> {
    crate::machine::sync();
    crate::machine::drop_caches()
}

/// Entry point.
pub fn main(args: &HistoryArgs) -> Result<()> {
    crate::machine::require_root()?;
    let dir = args.dir.join(format!("history-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let r = run(args, &dir);
    if !args.keep {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let report = r?;
    crate::report::publish(&report, args.out.as_deref())
}

fn run(args: &HistoryArgs, dir: &Path) -> Result<String> {
    let mut s = String::new();
    let _ = writeln!(s, "### History: cost on apply, bytes kept, restore and test-failover start\n");
    // Apply throughput, alternating on and off.
    let (mut on, mut off) = (Rig::new(dir, "on", true)?, Rig::lanes(dir, "off", 1)?);
    let lanes =
        args.apply_threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let mut wide = Rig::lanes(dir, "lanes", lanes)?;
    for (rig, seed) in [(&mut on, 1), (&mut off, 1)] {
        big(rig, "disk.img", args.file, &mut Rng(seed))?;
    }
    let (mut ow_on, mut ow_off, mut cr_on, mut cr_off) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut cr_lanes, mut cpu_off, mut cpu_lanes) = (Vec::new(), Vec::new(), Vec::new());
    let mut hist_bytes = 0;
    for run in 0..args.runs {
        eprintln!("[bench] history run {}/{}", run + 1, args.runs);
        // Each timed phase starts with nothing dirty: the two replicas share a file system, and
        // a commit that syncs it would otherwise flush the other one's writes.
        crate::machine::sync();
        let (mbs, added) = overwrite(&mut on, args.file, args.overwrite, 100 + run as u64)?;
        ow_on.push(mbs);
        hist_bytes += added;
        crate::machine::sync();
        ow_off.push(overwrite(&mut off, args.file, args.overwrite, 100 + run as u64)?.0);
        crate::machine::sync();
        cr_on.push(create(&mut on, args.files, run)?.0);
        crate::machine::sync();
        let (rate, cpu) = create(&mut off, args.files, run)?;
        cr_off.push(rate);
        cpu_off.push(cpu);
        crate::machine::sync();
        let (rate, cpu) = create(&mut wide, args.files, run)?;
        cr_lanes.push(rate);
        cpu_lanes.push(cpu);
    }
    let med = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let _ = writeln!(s, "| workload | history off | history on | on / off |\n|---|---:|---:|---:|");
    let _ = writeln!(
        s,
        "| random 64 KiB overwrites of a {} MiB file ({} MiB per run), MiB/s | {:.0} | {:.0} | {:.2} |",
        args.file / MIB,
        args.overwrite / MIB,
        med(&ow_off),
        med(&ow_on),
        med(&ow_on) / med(&ow_off)
    );
    let _ = writeln!(
        s,
        "| new 4 KiB files with their mtime ({} per run), files/s | {:.0} | {:.0} | {:.2} |",
        args.files,
        med(&cr_off),
        med(&cr_on),
        med(&cr_on) / med(&cr_off)
    );
    let _ = writeln!(
        s,
        "\nHistory off, the same new files applied on {lanes} threads at once (`[target] apply_threads = \
         {lanes}`) against one: {:.0} files/s against {:.0} ({:.2}x); CPU time of the \
         applying process per file {:.1} µs against {:.1}.",
        med(&cr_lanes),
        med(&cr_off),
        med(&cr_lanes) / med(&cr_off),
        med(&cpu_lanes),
        med(&cpu_off)
    );
    let per_byte = hist_bytes as f64 / (args.overwrite * args.runs as u64) as f64;
    let _ = writeln!(s, "\nHistory kept per byte overwritten: {per_byte:.3} bytes (goal: at most 1.1).\n");
    drop(on);
    drop(off);
    drop(wide);

    // Restore of a tree against cp -a of the replica.
    let mut t = Rig::new(dir, "restore", true)?;
    let files = (args.tree / (4 * MIB)).max(1);
    let mut rng = Rng(99);
    for i in 0..files {
        big(&mut t, &format!("f{i:05}"), 4 * MIB, &mut rng)?;
    }
    let point = t.seq;
    let mut buf = vec![0u8; MIB as usize];
    for i in (0..files).step_by(10) {
        rng.fill(&mut buf);
        let p = format!("f{i:05}");
        for k in 0..4 {
            t.apply(Op::Write { path: w(&p), offset: k * MIB, data: buf.clone() })?;
        }
    }
    t.commit()?;
    let (mut rs, mut cp) = (Vec::new(), Vec::new());
    for run in 0..args.runs {
        let out = dir.join(format!("restored{run}"));
        std::fs::create_dir_all(&out)?;
        cold()?;
        let started = Instant::now();
        let mut view = PointView::open(&t.root, &dir_of(&t.state), point, t.seq)?;
        restore(&mut view, &[], &out, &mut |_| {})?;
        rs.push(started.elapsed().as_secs_f64());
        std::fs::remove_dir_all(&out)?;
        cold()?;
        let started = Instant::now();
        let st = std::process::Command::new("cp").arg("-a").arg(&t.root).arg(&out).status()?;
        if !st.success() {
            bail!("cp -a failed");
        }
        cp.push(started.elapsed().as_secs_f64());
        std::fs::remove_dir_all(&out)?;
    }
    let _ = writeln!(
        s,
        "| restore of a {} MiB tree ({} files; the point before 10 % of it was overwritten), cold cache | seconds |\n|---|---:|\n| `cp -a` of the replica | {:.2} |\n| `history restore` | {:.2} ({:.2}x cp) |\n",
        files * 4,
        files,
        med(&cp),
        med(&rs),
        med(&rs) / med(&cp)
    );
    drop(t);

    // Test-failover start: small and large replica.
    let _ = writeln!(
        s,
        "| test-failover start (view of the newest point mounted, root listed) | ms |\n|---|---:|"
    );
    for (name, size) in [("small", args.small_view), ("large", args.large_view)] {
        let mut r = Rig::new(dir, &format!("view-{name}"), true)?;
        let n = (size / (8 * MIB)).max(1);
        for i in 0..n {
            r.apply(Op::Create { path: w(&format!("img{i}")), mode: 0o644 })?;
            // Mostly allocated but written sparsely: the mount must not depend on size.
            r.apply(Op::Truncate { path: w(&format!("img{i}")), size: 8 * MIB })?;
            r.apply(Op::Write { path: w(&format!("img{i}")), offset: 0, data: vec![1; 4096] })?;
        }
        r.commit()?;
        let mut times = Vec::new();
        for run in 0..args.runs {
            let mdir = dir.join(format!("mount-{name}-{run}"));
            let started = Instant::now();
            let view = PointView::open(&r.root, &dir_of(&r.state), r.seq, r.seq)?;
            let mounted = doppel_failover::testview::MountedView::mount(view, &r.root, &mdir)
                .context("mounting a test view (FUSE and overlayfs needed)")?;
            let entries = std::fs::read_dir(&mounted.view)?.count();
            times.push(started.elapsed().as_secs_f64() * 1000.0);
            if entries as u64 != n {
                bail!("the view shows {entries} entries, not {n}");
            }
            drop(mounted);
            let _ = std::fs::remove_dir_all(&mdir);
        }
        let _ = writeln!(s, "| {} MiB replica ({} files) | {:.1} |", size / MIB, n, med(&times));
    }
    Ok(s)
}
