//! The markdown report of the `vm` mode.

use std::fmt::Write as _;
use std::time::Duration;

use crate::VmArgs;
use crate::fuse::median;
use crate::machine::Machine;
use crate::stats::Sample;
use crate::vm::{Cell, Config, VmResults, WORKLOADS, Workload};

/// The goal for hypervisor capture / unprotected.
const GOAL: f64 = 0.90;
/// The goal for the replication lag p99 under load.
const LAG_GOAL: Duration = Duration::from_millis(100);

/// The whole report.
pub fn markdown(args: &VmArgs, m: &Machine, r: &VmResults) -> String {
    let mut s = String::new();
    let captures: Vec<String> = r.captures.iter().map(|(c, cap)| format!("{}: {cap}", c.name())).collect();
    s.push_str(&m.table("###", &[("fio", &m.fio), ("QEMU", &r.qemu), ("capture", &captures.join("; "))]));
    summary(&mut s, args, r);
    per_run(&mut s, args, r);
    lag(&mut s, args, r);
    cpu(&mut s, args, r);
    threads(&mut s, args, r);
    let _ = writeln!(s, "Commands (`SOCKET`: the configuration's `qemu-storage-daemon` NBD socket):\n");
    for w in &WORKLOADS {
        let _ = writeln!(s, "- `{}`: `{}`", w.key, w.command_line(args));
    }
    let verified: Vec<String> = r
        .verified
        .iter()
        .map(|(c, b)| format!("{} ({:.2} GiB)", c.name(), *b as f64 / (1u64 << 30) as f64))
        .collect();
    let warnings: Vec<String> = r.log_warnings.iter().map(|(c, n)| format!("{}: {n}", c.name())).collect();
    let _ = writeln!(
        s,
        "\nAfter the runs every replica image equalled its disk byte for byte, live and after a clean stop \
         of the agent: {}. Warning or error lines in the agents' logs: {}.",
        verified.join(", "),
        warnings.join(", ")
    );
    for p in &r.profiles {
        let _ = writeln!(s, "Profile: `{}`", p.display());
    }
    s
}

fn unit(w: &Workload) -> &'static str {
    if w.iops { "IOPS" } else { "MiB/s" }
}

fn fmt(w: &Workload, v: f64) -> String {
    if w.iops { format!("{v:.0}") } else { format!("{v:.1}") }
}

fn med(cells: &[Cell], w: &Workload) -> f64 {
    median(cells.iter().map(|c| c.value(w)).collect())
}

fn describe(cfg: Config) -> &'static str {
    match cfg {
        Config::None => "unprotected",
        Config::MirrorNull => "reference: QEMU's active mirror to a `null-co` node (no doppel)",
        Config::MirrorNbd => "reference: QEMU's active mirror over NBD to a null export (no doppel)",
        Config::Fuse => "image in a `--capture fuse` job root",
        Config::Vm => "**hypervisor capture** (`protect --vm`)",
        Config::VmRemote => "hypervisor capture to a `doppel target` on 127.0.0.1",
    }
}

fn summary(s: &mut String, args: &VmArgs, r: &VmResults) {
    let _ = writeln!(
        s,
        "### A {} MiB disk at QEMU's block layer, unprotected and protected (replicating to a local directory), median of {} runs of {} s\n",
        args.size >> 20,
        args.runs,
        args.runtime
    );
    let _ = writeln!(
        s,
        "Throughput of the guest's writes (higher is better), 16 in flight; ratios are to unprotected, of \
         the medians. Goal for hypervisor capture: >= {GOAL:.2} with replication lag p99 under {} ms. \
         Both agents async (no `--sync`), history of the local destinations: {}.\n",
        LAG_GOAL.as_millis(),
        args.history.as_deref().map_or("doppel's default (24h)".to_string(), |h| format!("`--history {h}`"))
    );
    let mut head = String::from("| configuration |");
    let mut rule = String::from("|---|");
    for w in &WORKLOADS {
        let _ = write!(head, " {} {} | / unprot. |", w.key, unit(w));
        rule.push_str("---|---|");
    }
    let _ = writeln!(s, "{head}\n{rule}");
    for cfg in crate::vm::configs(args) {
        let mut row = format!("| {} |", describe(cfg));
        for (wi, w) in WORKLOADS.iter().enumerate() {
            let (none, v) = (med(&r.cells[wi][Config::None as usize], w), med(&r.cells[wi][cfg as usize], w));
            let _ = write!(row, " {} | {:.3} |", fmt(w, v), v / none);
        }
        let _ = writeln!(s, "{row}");
    }
    let _ = writeln!(s);
    for (wi, w) in WORKLOADS.iter().enumerate() {
        let c = &r.cells[wi];
        let ratio = med(&c[Config::Vm as usize], w) / med(&c[Config::None as usize], w);
        let lag99 = all_status_lag(&c[Config::Vm as usize])
            .percentile(99.0)
            .max(probe_lags(&c[Config::Vm as usize]).percentile(99.0));
        let verdict = match (ratio >= GOAL, lag99 < LAG_GOAL) {
            (true, true) => "**met**".to_string(),
            (false, true) => format!("**missed** on throughput ({:.0} % of the goal)", 100.0 * ratio / GOAL),
            (true, false) => "**missed** on lag".to_string(),
            (false, false) => {
                format!("**missed** on throughput ({:.0} % of the goal) and on lag", 100.0 * ratio / GOAL)
            }
        };
        let _ = writeln!(
            s,
            "- `{}`: hypervisor capture {:.3} of unprotected, lag p99 {} ms (the larger of `lag_seconds` and \
             the probes'): {verdict}.",
            w.key,
            ratio,
            ms(lag99)
        );
    }
    let _ = writeln!(s);
}

fn probe_lags(cells: &[Cell]) -> Sample {
    Sample::new(cells.iter().flat_map(|c| c.probe_lags.values().to_vec()).collect())
}

fn per_run(s: &mut String, args: &VmArgs, r: &VmResults) {
    let runs: String = (1..=args.runs).map(|i| format!(" run {i} |")).collect();
    let _ = writeln!(s, "#### Every run, and the guest's write latency\n");
    let _ = writeln!(
        s,
        "Completion latency: fio's `clat` of the guest's writes (median of the runs' p50 and p99).\n"
    );
    let _ = writeln!(s, "| workload | configuration |{runs} median | clat p50 | clat p99 |");
    let _ = writeln!(s, "|---|---|{}---|---|---|", "---|".repeat(args.runs));
    for (wi, w) in WORKLOADS.iter().enumerate() {
        for cfg in crate::vm::configs(args) {
            let cells = &r.cells[wi][cfg as usize];
            let row: String = cells.iter().map(|c| format!(" {} |", fmt(w, c.value(w)))).collect();
            let p50 = Sample::new(cells.iter().map(|c| c.clat.0).collect()).median();
            let p99 = Sample::new(cells.iter().map(|c| c.clat.1).collect()).median();
            let _ = writeln!(
                s,
                "| {} | {} {} |{row} {} | {:.3} ms | {:.3} ms |",
                w.key,
                cfg.name(),
                unit(w),
                fmt(w, med(cells, w)),
                p50.as_secs_f64() * 1e3,
                p99.as_secs_f64() * 1e3
            );
        }
        for cfg in crate::vm::configs(args).into_iter().skip(1) {
            let ratios: Vec<f64> = r.cells[wi][Config::None as usize]
                .iter()
                .zip(&r.cells[wi][cfg as usize])
                .map(|(n, c)| c.value(w) / n.value(w))
                .collect();
            let row: String = ratios.iter().map(|x| format!(" {x:.3} |")).collect();
            let _ =
                writeln!(s, "| {} | {} / unprotected |{row} {:.3} | | |", w.key, cfg.name(), median(ratios));
        }
    }
    let _ = writeln!(s);
}

fn all_status_lag(cells: &[Cell]) -> Sample {
    Sample::new(cells.iter().flat_map(|c| c.status.iter().map(|p| Duration::from_secs_f64(p.lag))).collect())
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}

fn lag(s: &mut String, args: &VmArgs, r: &VmResults) {
    let _ = writeln!(s, "### Replication lag during the runs (all runs together)\n");
    let _ = writeln!(
        s,
        "`lag_seconds`: `doppel status --json` polled every 50 ms (age of the oldest unacknowledged op). \
         Probes: a stamped {} KiB block written through the daemon's NBD export (as the guest writes) every \
         {} ms into the last MiB of the disk, its slot in the replica image polled every millisecond; lag = \
         seen - the time its write began (so it includes the write itself, queued behind fio's 16). Drain: \
         from the end of fio until the agent had acknowledged everything.\n",
        4, args.probe_ms
    );
    let _ = writeln!(
        s,
        "| workload | configuration | `lag_seconds` p50 / p99 / max (ms) | probe lag p50 / p99 / max (ms) | probes seen / written | probe write p50 / p99 (ms) | `pending_bytes` max | drain (s, median) |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
    for (wi, w) in WORKLOADS.iter().enumerate() {
        for cfg in crate::vm::configs(args).into_iter().filter(|c| *c >= Config::Fuse) {
            let cells = &r.cells[wi][cfg as usize];
            let st = all_status_lag(cells);
            let pl = probe_lags(cells);
            let pw = Sample::new(cells.iter().flat_map(|c| c.probe_writes.values().to_vec()).collect());
            let written: u64 = cells.iter().map(|c| c.probes).sum();
            let pending = cells.iter().flat_map(|c| c.status.iter().map(|p| p.pending)).max().unwrap_or(0);
            let drain = Sample::new(cells.iter().map(|c| c.drain).collect()).median();
            let _ = writeln!(
                s,
                "| {} | {} | {} / {} / {} | {} / {} / {} | {} / {written} | {} / {} | {:.1} MiB | {:.2} |",
                w.key,
                cfg.name(),
                ms(st.percentile(50.0)),
                ms(st.percentile(99.0)),
                ms(st.max()),
                ms(pl.percentile(50.0)),
                ms(pl.percentile(99.0)),
                ms(pl.max()),
                pl.len(),
                ms(pw.percentile(50.0)),
                ms(pw.percentile(99.0)),
                pending as f64 / (1u64 << 20) as f64,
                drain.as_secs_f64()
            );
        }
    }
    let unprot: Vec<String> = WORKLOADS
        .iter()
        .enumerate()
        .map(|(wi, w)| {
            let pw = Sample::new(
                r.cells[wi][Config::None as usize]
                    .iter()
                    .flat_map(|c| c.probe_writes.values().to_vec())
                    .collect(),
            );
            format!("{} {} / {} ms", w.key, ms(pw.percentile(50.0)), ms(pw.percentile(99.0)))
        })
        .collect();
    let _ = writeln!(s, "\nProbe write p50 / p99 unprotected, for comparison: {}.\n", unprot.join("; "));
}

fn cpu(s: &mut String, args: &VmArgs, r: &VmResults) {
    let _ = writeln!(s, "#### CPU (medians, seconds)\n");
    let _ = writeln!(
        s,
        "fio's process; the configuration's `qemu-storage-daemon` during fio; the agent from the start of \
         fio until drained; everything else meanwhile (kernel threads, the probes and polls, other users). \
         The machine has {} CPU-seconds per second.\n",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    let _ =
        writeln!(s, "| workload | configuration | fio | qemu-storage-daemon | doppel | everything else |");
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    let m =
        |c: &[Cell], f: fn(&Cell) -> Duration| Sample::new(c.iter().map(f).collect()).median().as_secs_f64();
    for (wi, w) in WORKLOADS.iter().enumerate() {
        for cfg in crate::vm::configs(args) {
            let c = &r.cells[wi][cfg as usize];
            let _ = writeln!(
                s,
                "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} |",
                w.key,
                cfg.name(),
                m(c, |c| c.fio_cpu),
                m(c, |c| c.qsd_cpu),
                m(c, |c| c.agent_cpu),
                m(c, |c| c.others)
            );
        }
    }
    let _ = writeln!(s);
}

fn threads(s: &mut String, args: &VmArgs, r: &VmResults) {
    let _ = writeln!(
        s,
        "#### Where the CPU went, per thread kind (mean of the runs, seconds: CPU / runnable but waiting for a CPU)\n"
    );
    let _ = writeln!(
        s,
        "From `/proc/PID/task/TID/schedstat` of the configuration's daemon (`qsd`), agent (`doppel`) and, for \
         the NBD reference, the null server, from the start of fio until drained. Threads with under 0.05 s \
         of CPU are left out.\n"
    );
    for (wi, w) in WORKLOADS.iter().enumerate() {
        for cfg in crate::vm::configs(args) {
            let cells = &r.cells[wi][cfg as usize];
            let n = cells.len() as f64;
            let mut by: Vec<(String, f64, f64)> = Vec::new();
            for c in cells {
                for (name, cpu, wait) in &c.threads {
                    match by.iter_mut().find(|(k, _, _)| k == name) {
                        Some(e) => {
                            e.1 += cpu / n;
                            e.2 += wait / n;
                        }
                        None => by.push((name.clone(), cpu / n, wait / n)),
                    }
                }
            }
            by.sort_by(|a, b| b.1.total_cmp(&a.1));
            let top: Vec<String> = by
                .iter()
                .filter(|(_, v, _)| *v >= 0.05)
                .take(8)
                .map(|(k, v, wt)| format!("`{k}` {v:.2} / {wt:.2}"))
                .collect();
            let _ = writeln!(s, "- {} / {}: {}", w.key, cfg.name(), top.join(", "));
        }
    }
    let _ = writeln!(s);
}
