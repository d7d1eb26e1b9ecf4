//! The markdown report of the `fuse` mode.

use std::fmt::Write as _;
use std::time::Duration;

use crate::FuseArgs;
use crate::fuse::{Cell, FuseResults, LagRun, Metric, Side, Unit, median};
use crate::machine::Machine;
use crate::stats::Sample;

const GIB: f64 = (1u64 << 30) as f64;
const MIB: f64 = (1u64 << 20) as f64;

/// The whole report.
pub fn markdown(args: &FuseArgs, m: &Machine, r: &FuseResults) -> String {
    let mut s = String::new();
    s.push_str(&m.table("###", &[("fio", &m.fio), ("capture", &r.capture)]));
    summary(&mut s, args, r);
    per_run(&mut s, args, r);
    cpu(&mut s, r);
    lag(&mut s, args, r);
    let _ = writeln!(s, "Commands (`DIR` is the native directory or the protected tree):\n");
    let mut seen = Vec::new();
    for mt in &r.metrics {
        if !seen.contains(&mt.command) {
            let _ = writeln!(s, "- `{}`: `{}`", mt.key, mt.command);
            seen.push(mt.command.clone());
        }
    }
    let _ = writeln!(
        s,
        "\nAfter the runs the replica equalled the source ({:.2} GiB; {} ops acknowledged), live and \
         after a clean stop; {} warning or error lines in the agent's log.",
        r.verified_bytes as f64 / GIB,
        r.ops,
        r.log_warnings
    );
    let _ = writeln!(
        s,
        "The agent could open {} files (`--agent-nofile {}`): its fuse daemon keeps one descriptor per \
         inode the kernel knows, which bounds the files that can be live at once through the mount.",
        r.nofile, args.agent_nofile
    );
    for p in &r.profiles {
        let _ = writeln!(s, "Profile: `{}`", p.display());
    }
    s
}

fn value(u: Unit, v: f64) -> String {
    match u {
        Unit::MibPerSec => format!("{v:.1}"),
        Unit::Iops | Unit::FilesPerSec => format!("{v:.0}"),
    }
}

fn summary(s: &mut String, args: &FuseArgs, r: &FuseResults) {
    let _ = writeln!(
        s,
        "### Native directory vs `--capture fuse` mount (replicating to a local directory), median of {} runs\n",
        args.runs
    );
    let _ = writeln!(
        s,
        "Every value is a throughput (higher is better); the ratio is fuse / native of the medians, so \
         1.00 is parity.\n"
    );
    let _ = writeln!(s, "| workload | unit | native | fuse | fuse / native | goal | met |");
    let _ = writeln!(s, "|---|---|---|---|---|---|---|");
    for mt in &r.metrics {
        let ratio = mt.ratio();
        let (goal, met) = match mt.goal {
            Some(g) if ratio >= g => (format!(">= {g:.2}"), format!("yes (+{:.2})", ratio - g)),
            Some(g) => (format!(">= {g:.2}"), format!("**no** ({:.0} % of the goal)", 100.0 * ratio / g)),
            None => ("-".into(), "-".into()),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {:.3} | {goal} | {met} |",
            mt.label,
            mt.unit.name(),
            value(mt.unit, mt.median(Side::Native)),
            value(mt.unit, mt.median(Side::Fuse)),
            ratio
        );
    }
    let _ = writeln!(s);
}

fn per_run(s: &mut String, args: &FuseArgs, r: &FuseResults) {
    let runs: String = (1..=args.runs).map(|i| format!(" run {i} |")).collect();
    let _ = writeln!(s, "#### Every run\n");
    let _ = writeln!(s, "| workload | |{runs} median |");
    let _ = writeln!(s, "|---|---|{}---|", "---|".repeat(args.runs));
    for mt in &r.metrics {
        for side in Side::BOTH {
            let cells = cells(mt, side);
            let row: String = cells.iter().map(|c| format!(" {} |", value(mt.unit, c.value))).collect();
            let _ = writeln!(
                s,
                "| {} | {} {} |{row} {} |",
                mt.key,
                side.name(),
                mt.unit.name(),
                value(mt.unit, mt.median(side))
            );
        }
        let ratios = mt.run_ratios();
        let row: String = ratios.iter().map(|x| format!(" {x:.3} |")).collect();
        let _ = writeln!(s, "| {} | fuse / native |{row} {:.3} |", mt.key, median(ratios.clone()));
    }
    let _ = writeln!(s);
}

fn cells(mt: &Metric, side: Side) -> &[Cell] {
    match side {
        Side::Native => &mt.native,
        Side::Fuse => &mt.fuse,
    }
}

fn cpu(s: &mut String, r: &FuseResults) {
    let _ = writeln!(s, "#### Time and CPU (medians, seconds)\n");
    let _ = writeln!(
        s,
        "Wall: fio's process (setup included) or the phase. CPU: of fio's processes (of the benchmark \
         itself for the metadata workload), of the doppel agent from the start of the workload until its \
         replication had drained, and of everything else meanwhile (kernel writeback, other users). \
         The metadata CPU columns cover all three phases. Drain: from the end of the workload until the \
         agent had acknowledged everything.\n"
    );
    let _ = writeln!(s, "| workload | side | wall | workload CPU | doppel CPU | everything else | drain |");
    let _ = writeln!(s, "|---|---|---|---|---|---|---|");
    let med =
        |c: &[Cell], f: fn(&Cell) -> Duration| Sample::new(c.iter().map(f).collect()).median().as_secs_f64();
    for mt in &r.metrics {
        let whole = !matches!(mt.key, "meta-stat" | "meta-unlink");
        for side in Side::BOTH {
            let c = cells(mt, side);
            let cpu_cols = if whole {
                format!(
                    "{:.2} | {:.2} | {:.2} | {:.2}",
                    med(c, |c| c.tool_cpu),
                    med(c, |c| c.agent_cpu),
                    med(c, |c| c.others),
                    med(c, |c| c.drain)
                )
            } else {
                "(in create) | | |".into()
            };
            let _ = writeln!(s, "| {} | {} | {:.2} | {cpu_cols} |", mt.key, side.name(), med(c, |c| c.wall));
        }
    }
    let _ = writeln!(s);
}

fn lag(s: &mut String, args: &FuseArgs, r: &FuseResults) {
    let _ =
        writeln!(s, "### Replication lag during the fuse random writes (4 KiB, 1 job, {} s)\n", args.runtime);
    let _ = writeln!(
        s,
        "`lag_seconds`: `doppel status --json` polled every 50 ms (age of the oldest unacknowledged op). \
         Probes: a {}-byte file created through the mount every {} ms, stamped with the time its creation \
         began, and seen complete in the replica by inotify there; the probe lag includes writing it on \
         the source (behind the random writes' FUSE requests).\n",
        512, args.probe_ms
    );
    let runs: String = (1..=r.lag.len()).map(|i| format!(" run {i} |")).collect();
    let _ = writeln!(s, "| measure |{runs} all runs |");
    let _ = writeln!(s, "|---|{}---|", "---|".repeat(r.lag.len()));
    let all = LagRun {
        status: r.lag.iter().flat_map(|l| l.status.iter().copied()).collect(),
        probes: r.lag.iter().map(|l| l.probes).sum(),
        probe_writes: Sample::new(r.lag.iter().flat_map(|l| l.probe_writes.values().to_vec()).collect()),
        probe_lags: Sample::new(r.lag.iter().flat_map(|l| l.probe_lags.values().to_vec()).collect()),
        overflows: r.lag.iter().map(|l| l.overflows).sum(),
    };
    type Row = (&'static str, fn(&LagRun) -> String);
    let rows: [Row; 13] = [
        ("status polls", |l| l.status.len().to_string()),
        ("`lag_seconds` p50", |l| {
            let s = Sample::new(l.status.iter().map(|p| Duration::from_secs_f64(p.lag)).collect());
            format!("{:.1} ms", s.percentile(50.0).as_secs_f64() * 1e3)
        }),
        ("`lag_seconds` p99", |l| {
            let s = Sample::new(l.status.iter().map(|p| Duration::from_secs_f64(p.lag)).collect());
            format!("{:.1} ms", s.percentile(99.0).as_secs_f64() * 1e3)
        }),
        ("`lag_seconds` max", |l| {
            let s = Sample::new(l.status.iter().map(|p| Duration::from_secs_f64(p.lag)).collect());
            format!("{:.1} ms", s.max().as_secs_f64() * 1e3)
        }),
        ("`pending_bytes` max", |l| {
            format!("{:.1} MiB", l.status.iter().map(|p| p.pending).max().unwrap_or(0) as f64 / MIB)
        }),
        ("`spooled_bytes` max", |l| {
            format!("{:.1} MiB", l.status.iter().map(|p| p.spooled).max().unwrap_or(0) as f64 / MIB)
        }),
        ("`dirty_regions` max", |l| l.status.iter().map(|p| p.dirty_regions).max().unwrap_or(0).to_string()),
        ("probes written / seen in the replica", |l| format!("{} / {}", l.probes, l.probe_lags.len())),
        ("probe lag p50", |l| format!("{:.1} ms", l.probe_lags.percentile(50.0).as_secs_f64() * 1e3)),
        ("probe lag p99", |l| format!("{:.1} ms", l.probe_lags.percentile(99.0).as_secs_f64() * 1e3)),
        ("probe lag max", |l| format!("{:.1} ms", l.probe_lags.max().as_secs_f64() * 1e3)),
        ("probe write on the source p50 / p99", |l| {
            format!(
                "{:.1} / {:.1} ms",
                l.probe_writes.percentile(50.0).as_secs_f64() * 1e3,
                l.probe_writes.percentile(99.0).as_secs_f64() * 1e3
            )
        }),
        ("inotify overflows (replica side)", |l| l.overflows.to_string()),
    ];
    for (name, f) in rows {
        let cols: String = r.lag.iter().map(|l| format!(" {} |", f(l))).collect();
        let _ = writeln!(s, "| {name} |{cols} {} |", f(&all));
    }
    let _ = writeln!(s);
}
