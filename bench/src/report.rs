//! The markdown report: every number of a run, with the machine it ran on.

use std::fmt::Write as _;
use std::time::Duration;

use crate::CoreArgs;
use crate::lag::LagResults;
use crate::machine::Machine;
use crate::mirror::{MirrorResults, Run};
use crate::stats::Sample;
use crate::tree::{Class, TreeInfo};

const GIB: f64 = (1u64 << 30) as f64;
const MIB: f64 = (1u64 << 20) as f64;

/// Prints a mode's finished report, and writes it to `out` too when asked: every mode ends
/// this way, so the terminal and the file always hold the same text.
pub fn publish(report: &str, out: Option<&std::path::Path>) -> anyhow::Result<()> {
    println!("{report}");
    if let Some(out) = out {
        std::fs::write(out, report)?;
        eprintln!("[bench] report written to {}", out.display());
    }
    Ok(())
}

/// The whole report.
pub fn markdown(
    args: &CoreArgs,
    m: &Machine,
    tree: &TreeInfo,
    mirror: &MirrorResults,
    lag: &LagResults,
) -> String {
    let mut s = String::new();
    machine_table(&mut s, m);
    mirror_table(&mut s, args, tree, mirror);
    lag_table(&mut s, args, lag);
    s
}

fn machine_table(s: &mut String, m: &Machine) {
    s.push_str(&m.table("###", &[("rsync", &m.rsync)]));
}

fn mirror_table(s: &mut String, args: &CoreArgs, tree: &TreeInfo, r: &MirrorResults) {
    let class = |c: &Class| format!("{} files, {:.0} MiB", c.files, c.bytes as f64 / MIB);
    let _ = writeln!(
        s,
        "### Initial mirror: {:.2} GiB, {} files in {} directories, cold cache, empty destination\n",
        tree.bytes() as f64 / GIB,
        tree.files(),
        tree.dirs
    );
    let _ = writeln!(
        s,
        "Tree: small (1-64 KiB) {}; medium (1-8 MiB) {}; large {}; {:.0} MiB of it text, the rest noise.\n",
        class(&tree.small),
        class(&tree.medium),
        class(&tree.large),
        tree.text_bytes as f64 / MIB
    );
    let runs: String = (1..=args.runs).map(|i| format!(" run {i} |")).collect();
    let _ = writeln!(s, "| seconds |{runs} min | median |");
    let _ = writeln!(s, "|---|{}---|---|", "---|".repeat(args.runs));
    let col = |runs: &[Run], f: fn(&Run) -> Duration| runs.iter().map(f).collect::<Vec<_>>();
    let rows = [
        ("`rsync -a SRC/ DST/`", col(&r.rsync, |r| r.wall)),
        ("`rsync -a` then `sync`", r.rsync_synced.clone()),
        ("`doppel protect SRC --to DST` until caught up", col(&r.doppel, |r| r.wall)),
        ("CPU (user + sys) of rsync's processes", col(&r.rsync, |r| r.cpu)),
        ("CPU (user + sys) of doppel", col(&r.doppel, |r| r.cpu)),
        ("CPU of everything else during rsync", col(&r.rsync, |r| r.others)),
        ("CPU of everything else during doppel", col(&r.doppel, |r| r.others)),
    ];
    for (name, times) in &rows {
        let sample = Sample::new(times.clone());
        let cells: String = times.iter().map(|t| format!(" {:.2} |", t.as_secs_f64())).collect();
        let (min, median) = (sample.min().as_secs_f64(), sample.median().as_secs_f64());
        let _ = writeln!(s, "| {name} |{cells} {min:.2} | {median:.2} |");
    }
    let _ = writeln!(s);
    let (rs, rss, d) =
        (Sample::new(rows[0].1.clone()), Sample::new(rows[1].1.clone()), Sample::new(rows[2].1.clone()));
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
    let _ = writeln!(s, "| ratio | of the minima | of the medians |");
    let _ = writeln!(s, "|---|---|---|");
    let _ = writeln!(
        s,
        "| doppel / rsync -a | {:.2} | {:.2} |",
        ratio(d.min(), rs.min()),
        ratio(d.median(), rs.median())
    );
    let _ = writeln!(
        s,
        "| doppel / (rsync -a + sync) | {:.2} | {:.2} |\n",
        ratio(d.min(), rss.min()),
        ratio(d.median(), rss.median())
    );
    let st = &r.doppel_status;
    let _ = writeln!(
        s,
        "doppel (last run): capture `{}`, {} files and {:.2} GiB hashed, {} ops acknowledged.\n",
        st.capture,
        st.files_hashed,
        st.bytes_hashed as f64 / GIB,
        st.acked
    );
}

fn lag_table(s: &mut String, args: &CoreArgs, r: &LagResults) {
    let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1e3);
    let _ = writeln!(
        s,
        "### Replication lag: {} in-place updates/s for {} s over {} files of 1 KiB\n",
        args.rate, args.lag_secs, r.pool
    );
    let _ = writeln!(s, "| measure | value |");
    let _ = writeln!(s, "|---|---|");
    let rows = [
        ("pool replicated in", format!("{:.2} s", r.pool_replicated.as_secs_f64())),
        (
            "updates written",
            format!(
                "{} in {:.2} s ({:.1}/s)",
                r.updates,
                r.stream.as_secs_f64(),
                r.updates as f64 / r.stream.as_secs_f64()
            ),
        ),
        (
            "writer lateness p99 / max",
            format!("{} / {}", ms(r.lateness.percentile(99.0)), ms(r.lateness.max())),
        ),
        ("updates observed on the replica", r.lags.len().to_string()),
        ("coalesced (replaced by a later update before seen)", r.coalesced.to_string()),
        ("missed (last update of a file never seen)", r.missed.to_string()),
        ("inotify overflows on the replica side", r.overflows.to_string()),
        ("lag p50", ms(r.lags.percentile(50.0))),
        ("lag p90", ms(r.lags.percentile(90.0))),
        ("lag p99", ms(r.lags.percentile(99.0))),
        ("lag max", ms(r.lags.max())),
        (
            "`doppel status`: max `lag_seconds`",
            format!("{:.3} s ({} polls)", r.status_max_lag, r.status_polls),
        ),
        ("`doppel status`: max `pending_bytes`", format!("{:.1} KiB", r.status_max_pending as f64 / 1024.0)),
        (
            "doppel CPU from the first update until the replica was equal",
            format!(
                "{:.2} s ({:.0} % of one core)",
                r.agent_cpu.as_secs_f64(),
                100.0 * r.agent_cpu.as_secs_f64() / (r.stream + r.drained).as_secs_f64()
            ),
        ),
        ("CPU of everything else meanwhile", format!("{:.2} s", r.others_cpu.as_secs_f64())),
        ("replica equal to the source after the last write", format!("{:.2} s", r.drained.as_secs_f64())),
    ];
    for (k, v) in rows {
        let _ = writeln!(s, "| {k} | {v} |");
    }
}
