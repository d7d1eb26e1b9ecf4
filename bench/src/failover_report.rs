//! The markdown report of the `failover` mode.

use std::fmt::Write as _;

use crate::FailoverArgs;
use crate::failback::{FailbackRun, RsyncRun};
use crate::machine::Machine;
use crate::rto::RtoRun;
use crate::tree::TreeInfo;

const MIB: f64 = (1u64 << 20) as f64;
const GIB: f64 = (1u64 << 30) as f64;

/// Every table of a run.
pub fn markdown(
    args: &FailoverArgs,
    m: &Machine,
    rto: &[RtoRun],
    tree: Option<&TreeInfo>,
    fb: &[FailbackRun],
) -> String {
    let mut s = String::new();
    let sqlite = tool_version("sqlite3", "-version", 1);
    let arping = tool_version("arping", "-V", 4);
    s.push_str(&m.table("####", &[("rsync", &m.rsync), ("sqlite3", &sqlite), ("arping", &arping)]));
    if !rto.is_empty() {
        rto_tables(&mut s, args, rto);
    }
    if let (Some(tree), false) = (tree, fb.is_empty()) {
        failback_tables(&mut s, args, tree, fb);
    }
    s
}

/// A table row: name, the values of every run, then min and median.
fn row(s: &mut String, name: &str, v: &[f64], prec: usize) {
    let cells: String = v.iter().map(|x| format!(" {x:.prec$} |")).collect();
    let mut sorted = v.to_vec();
    sorted.sort_by(f64::total_cmp);
    let (min, med) = (sorted[0], sorted[(sorted.len() - 1) / 2]);
    let _ = writeln!(s, "| {name} |{cells} {min:.prec$} | {med:.prec$} |");
}

fn header(s: &mut String, first: &str, runs: usize) {
    let head: String = (1..=runs).map(|i| format!(" run {i} |")).collect();
    let _ = writeln!(s, "| {first} |{head} min | median |");
    let _ = writeln!(s, "|---|{}---|---|", "---|".repeat(runs));
}

fn rto_tables(s: &mut String, args: &FailoverArgs, runs: &[RtoRun]) {
    let _ = writeln!(
        s,
        "#### Recovery time: auto policy, interval {} s, missed {} (threshold {} s), agent heartbeat 1 s, \
         SQLite database of {} rows\n",
        args.interval,
        args.missed,
        args.interval * args.missed as u64,
        runs[0].rows
    );
    let _ = writeln!(
        s,
        "Milliseconds after T0 (cable pulled and agent SIGKILLed), from the target's event log and the client:\n"
    );
    header(s, "event", runs.len());
    let col = |f: &dyn Fn(&RtoRun) -> u64| runs.iter().map(|r| r.ms(f(r))).collect::<Vec<_>>();
    row(s, "source last heard from (per the target)", &col(&|r| r.last_heard), 0);
    row(s, "`source-failed`", &col(&|r| r.failed), 0);
    row(s, "`failover-started`", &col(&|r| r.started), 0);
    for step in step_names(runs) {
        row(s, &format!("step `{step}` started"), &col(&|r| step_times(r, &step).0), 0);
        row(s, &format!("step `{step}` done"), &col(&|r| step_times(r, &step).1), 0);
    }
    row(s, "`failover-done`", &col(&|r| r.done), 0);
    row(s, "first HTTP answer of any kind", &col(&|r| r.client.connected_us), 0);
    row(s, "first correct answer (the total)", &col(&|r| r.client.answered_us), 0);
    let _ = writeln!(s);

    let _ = writeln!(s, "Broken down (milliseconds; the rows of a run add up to its total):\n");
    header(s, "part", runs.len());
    let span = |f: &dyn Fn(&RtoRun) -> (u64, u64)| {
        runs.iter().map(|r| (f(r).1 as f64 - f(r).0 as f64) / 1000.0).collect::<Vec<_>>()
    };
    row(s, "detection: T0 → `source-failed`", &span(&|r| (r.t0, r.failed)), 0);
    let first_step = |r: &RtoRun| r.steps.first().map_or(r.done, |st| st.1);
    row(s, "`source-failed` → first step", &span(&|r| (r.failed, first_step(r))), 0);
    for step in step_names(runs) {
        row(s, &format!("step `{step}`"), &span(&|r| step_times(r, &step)), 0);
    }
    let gaps = |r: &RtoRun| {
        let in_steps: u64 = r.steps.iter().map(|st| st.2.saturating_sub(st.1)).sum();
        (0, r.done.saturating_sub(first_step(r)).saturating_sub(in_steps))
    };
    row(s, "between and after the steps, until `failover-done`", &span(&gaps), 0);
    row(s, "`failover-done` → first correct answer", &span(&|r| (r.done, r.client.answered_us)), 0);
    row(s, "**total: T0 → first correct answer**", &span(&|r| (r.t0, r.client.answered_us)), 0);
    row(s, "for reference: last heard → `source-failed`", &span(&|r| (r.last_heard, r.failed)), 0);
    let attempts: Vec<String> =
        runs.iter().map(|r| format!("{} ({} wrong)", r.client.attempts, r.client.wrong)).collect();
    let _ = writeln!(
        s,
        "\nClient attempts per run (every 10 ms, each given {} ms to connect): {}.\n",
        crate::client::CONNECT_TIMEOUT.as_millis(),
        attempts.join(", ")
    );
    let stale: Vec<String> = runs.iter().map(|r| r.stale_dirs.to_string()).collect();
    let _ = writeln!(
        s,
        "Directories of the replica whose modification time still differed from the source's at the cut \
         (the database's own directory, after its rollback journal came and went; see the findings): {}.\n",
        stale.join(", ")
    );
}

/// Step names in the order of the first run.
fn step_names(runs: &[RtoRun]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for (n, _, _) in &runs[0].steps {
        if !names.contains(n) {
            names.push(n.clone());
        }
    }
    names
}

/// (started, done) of the first `step` of a run.
fn step_times(r: &RtoRun, step: &str) -> (u64, u64) {
    r.steps.iter().find(|s| s.0 == step).map_or((r.t0, r.t0), |s| (s.1, s.2))
}

/// The values of every run, as `a / b / c`.
fn each(v: &[f64]) -> String {
    v.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>().join(" / ")
}

/// Picks one rsync baseline out of a run.
type Pick = fn(&FailbackRun) -> &RsyncRun;

fn failback_tables(s: &mut String, args: &FailoverArgs, tree: &TreeInfo, runs: &[FailbackRun]) {
    let c = runs[0].changes;
    let _ = writeln!(
        s,
        "#### Failback: {:.2} GiB tree ({} files), {:.1} % of it changed on the DR side, source job captured by `{}`, cold cache, veth without limit\n",
        tree.bytes() as f64 / GIB,
        tree.files(),
        args.change_percent,
        args.capture
    );
    let _ = writeln!(
        s,
        "Changes: {:.1} MiB overwritten in place in {} large and medium files (128 KiB at a time), {} small files \
         ({:.1} MiB) rewritten, {} new files ({:.1} MiB); {:.1} MiB in all.\n",
        c.overwritten.0 as f64 / MIB,
        c.overwritten.1,
        c.rewritten.1,
        c.rewritten.0 as f64 / MIB,
        c.created.1,
        c.created.0 as f64 / MIB,
        c.bytes() as f64 / MIB
    );
    let v = |f: &dyn Fn(&FailbackRun) -> f64| runs.iter().map(f).collect::<Vec<_>>();
    let med = |f: &dyn Fn(&FailbackRun) -> f64| {
        let mut x = v(f);
        x.sort_by(f64::total_cmp);
        x[(x.len() - 1) / 2]
    };
    let rsyncs: [(&str, Pick); 3] = [
        ("`rsync -a` into an empty directory (full copy, the baseline)", |r| &r.full),
        ("`rsync -a --whole-file` over the stale tree", |r| &r.whole),
        ("`rsync -a` over the stale tree (delta transfer)", |r| &r.delta),
    ];

    let _ = writeln!(s, "Seconds until the source holds the DR side's tree, durably:\n");
    header(s, "seconds", runs.len());
    for (name, pick) in rsyncs {
        row(s, &format!("{name}, then `sync`"), &v(&|r| pick(r).synced.as_secs_f64()), 2);
    }
    row(
        s,
        "doppel: `protect --failback` until the source holds the replica (ready)",
        &v(&|r| r.doppel.ready.as_secs_f64()),
        2,
    );
    row(s, "doppel: `doppel failback` (the cutover)", &v(&|r| r.doppel.cutover.as_secs_f64()), 2);
    row(s, "**doppel: ready + cutover**", &v(&|r| (r.doppel.ready + r.doppel.cutover).as_secs_f64()), 2);
    row(
        s,
        "doppel: from the start of the cutover until the source protects again",
        &v(&|r| r.doppel.resumed.as_secs_f64()),
        2,
    );
    for (name, pick) in rsyncs {
        row(s, &format!("for reference: {name} alone"), &v(&|r| pick(r).wall.as_secs_f64()), 2);
    }
    let _ = writeln!(s);

    let _ = writeln!(s, "Bytes and CPU (medians; MiB are 2^20 bytes, counted on the veth by the kernel):\n");
    let _ = writeln!(
        s,
        "| tool | MiB DR → source | MiB source → DR | MiB sent by the tool's own count | files sent | CPU s (both ends) \
         | CPU s of everything else meanwhile, each run |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|");
    for (name, pick) in rsyncs {
        let _ = writeln!(
            s,
            "| {name} | {:.1} | {:.1} | {:.1} (`--stats` sent; {:.1} literal) | {:.0} | {:.2} | {} |",
            med(&|r| pick(r).wire.b_to_a as f64 / MIB),
            med(&|r| pick(r).wire.a_to_b as f64 / MIB),
            med(&|r| pick(r).stats.sent as f64 / MIB),
            med(&|r| pick(r).stats.literal as f64 / MIB),
            med(&|r| pick(r).stats.files as f64),
            med(&|r| pick(r).cpu.as_secs_f64()),
            each(&v(&|r| pick(r).others.as_secs_f64())),
        );
    }
    let _ = writeln!(
        s,
        "| doppel (ready + cutover, until the source protects again) | {:.1} | {:.1} | {:.1} (the target's failback \
         `bytes_sent`; {:.1} when ready) | | {:.2} (agent and target) | {} |\n",
        med(&|r| r.doppel.wire.b_to_a as f64 / MIB),
        med(&|r| r.doppel.wire.a_to_b as f64 / MIB),
        med(&|r| r.doppel.bytes_total as f64 / MIB),
        med(&|r| r.doppel.bytes_ready as f64 / MIB),
        med(&|r| r.doppel.cpu.as_secs_f64()),
        each(&v(&|r| r.doppel.others.as_secs_f64())),
    );

    let doppel_t = med(&|r| (r.doppel.ready + r.doppel.cutover).as_secs_f64());
    let doppel_b = med(&|r| (r.doppel.wire.b_to_a + r.doppel.wire.a_to_b) as f64);
    let _ = writeln!(
        s,
        "| doppel (ready + cutover) against | time (with `sync`), ratio of the medians | bytes on the wire (both ways), ratio of the medians |"
    );
    let _ = writeln!(s, "|---|---|---|");
    for (name, pick) in rsyncs {
        let t = med(&|r| pick(r).synced.as_secs_f64());
        let b = med(&|r| (pick(r).wire.b_to_a + pick(r).wire.a_to_b) as f64);
        let _ = writeln!(s, "| {name} | {:.2} | {:.3} |", doppel_t / t, doppel_b / b);
    }
    let _ = writeln!(s);

    let _ = writeln!(s, "Cutover steps (`doppel failback --json`), milliseconds:\n");
    let mut names: Vec<String> = Vec::new();
    for (n, _) in &runs[0].doppel.steps {
        if !names.contains(n) {
            names.push(n.clone());
        }
    }
    header(s, "step", runs.len());
    for n in names {
        let ms = v(&|r| r.doppel.steps.iter().filter(|st| st.0 == n).map(|st| st.1).sum::<u64>() as f64);
        row(s, &format!("`{n}`"), &ms, 0);
    }
    let _ = writeln!(s);
}

/// The first `words` words of `TOOL ARG`'s first line of output (its version), or `none`.
fn tool_version(tool: &str, arg: &str, words: usize) -> String {
    std::process::Command::new(tool)
        .arg(arg)
        .output()
        .ok()
        .map(|o| [o.stdout, o.stderr].concat())
        .and_then(|out| {
            let text = String::from_utf8_lossy(&out).into_owned();
            let line = text.lines().next()?.trim().to_string();
            (!line.is_empty()).then(|| line.split_whitespace().take(words).collect::<Vec<_>>().join(" "))
        })
        .unwrap_or_else(|| "none".into())
}
