//! The markdown report of the `files` mode.

use std::fmt::Write as _;
use std::time::Duration;

use crate::files::{FilesArgs, FilesResults, Tool, ToolRun};
use crate::files_tree::FilesTree;
use crate::machine::Machine;
use crate::stats::Sample;

const MIB: f64 = (1u64 << 20) as f64;

/// A byte count of a run (a peak RSS).
type Bytes = fn(&ToolRun) -> u64;

/// Every table of a run.
pub fn markdown(args: &FilesArgs, m: &Machine, tree: &FilesTree, r: &FilesResults) -> String {
    let mut s = m.table("###", &[("rsync", &m.rsync)]);
    mirror_table(&mut s, args, tree, r);
    memory_table(&mut s, args, tree, r);
    change_table(&mut s, args, r);
    status_line(&mut s, r);
    s
}

/// The value of one measure in every run of a tool.
fn col(r: &FilesResults, tool: Tool, f: fn(&ToolRun) -> Duration) -> Vec<Duration> {
    r.of(tool).iter().map(f).collect()
}

/// `| name | run 1 | ... | min | median |`, in seconds.
fn row(s: &mut String, name: &str, times: &[Duration]) {
    let sample = Sample::new(times.to_vec());
    let cells: String = times.iter().map(|t| format!(" {:.2} |", t.as_secs_f64())).collect();
    let _ = writeln!(
        s,
        "| {name} |{cells} {:.2} | {:.2} |",
        sample.min().as_secs_f64(),
        sample.median().as_secs_f64()
    );
}

/// `| name | a/b of the minima | of the medians |`.
fn ratio(s: &mut String, name: &str, a: &[Duration], b: &[Duration]) {
    let (a, b) = (Sample::new(a.to_vec()), Sample::new(b.to_vec()));
    let r = |x: Duration, y: Duration| x.as_secs_f64() / y.as_secs_f64().max(1e-9);
    let _ = writeln!(s, "| {name} | {:.2} | {:.2} |", r(a.min(), b.min()), r(a.median(), b.median()));
}

fn header(s: &mut String, first: &str, runs: usize) {
    let cols: String = (1..=runs).map(|i| format!(" run {i} |")).collect();
    let _ = writeln!(s, "| {first} |{cols} min | median |");
    let _ = writeln!(s, "|---|{}---|---|", "---|".repeat(runs));
}

fn mirror_table(s: &mut String, args: &FilesArgs, tree: &FilesTree, r: &FilesResults) {
    let _ = writeln!(
        s,
        "### Initial mirror: {} files of 0-99 bytes ({:.1} MiB) in {} directories, cold cache, empty destination\n",
        tree.shape.files,
        tree.bytes as f64 / MIB,
        tree.shape.dirs
    );
    header(s, "seconds", args.runs);
    let wall = |t| col(r, t, |x| x.mirror);
    let synced = |t| col(r, t, |x| x.mirror_synced);
    row(s, "`rsync -a SRC/ DST/`", &wall(Tool::Rsync));
    row(s, "`rsync -a` then `sync`", &synced(Tool::Rsync));
    row(s, "`rsync -a SRC/ rsync://127.0.0.1/dst/` (daemon)", &wall(Tool::RsyncDaemon));
    row(s, "the same, then `sync`", &synced(Tool::RsyncDaemon));
    row(s, "`doppel protect SRC --to DIR` until caught up", &wall(Tool::DoppelLocal));
    row(s, "`doppel protect SRC --to 127.0.0.1:PORT` until caught up", &wall(Tool::DoppelRemote));
    let cpu = |t| col(r, t, |x| x.mirror_cpu);
    row(s, "CPU (user + sys) of `rsync -a`", &cpu(Tool::Rsync));
    row(s, "CPU of rsync to its daemon (client and daemon)", &cpu(Tool::RsyncDaemon));
    row(s, "CPU of doppel to a directory (agent and embedded target)", &cpu(Tool::DoppelLocal));
    row(s, "CPU of doppel to 127.0.0.1 (agent and target)", &cpu(Tool::DoppelRemote));
    let files = tree.shape.files as f64;
    let rate = |t| Sample::new(synced(t)).median().as_secs_f64().max(1e-9);
    let _ = writeln!(
        s,
        "\nFiles per second (median, until durable): rsync -a {:.0}, rsync to its daemon {:.0}, doppel to a \
         directory {:.0}, doppel to 127.0.0.1 {:.0}.\n",
        files / rate(Tool::Rsync),
        files / rate(Tool::RsyncDaemon),
        files / rate(Tool::DoppelLocal),
        files / rate(Tool::DoppelRemote)
    );
    let _ = writeln!(s, "| ratio | of the minima | of the medians |");
    let _ = writeln!(s, "|---|---|---|");
    ratio(s, "doppel to a directory / (rsync -a + sync)", &wall(Tool::DoppelLocal), &synced(Tool::Rsync));
    ratio(
        s,
        "doppel to 127.0.0.1 / (rsync to its daemon + sync)",
        &wall(Tool::DoppelRemote),
        &synced(Tool::RsyncDaemon),
    );
    ratio(
        s,
        "doppel to 127.0.0.1 / doppel to a directory",
        &wall(Tool::DoppelRemote),
        &wall(Tool::DoppelLocal),
    );
    s.push('\n');
}

fn memory_table(s: &mut String, args: &FilesArgs, tree: &FilesTree, r: &FilesResults) {
    let _ =
        writeln!(s, "### Peak memory of doppel (`VmHWM`, through the initial mirror and the change pass)\n");
    let cols: String = (1..=args.runs).map(|i| format!(" run {i} |")).collect();
    let _ = writeln!(s, "| MiB |{cols} max | bytes per file |");
    let _ = writeln!(s, "|---|{}---|---|", "---|".repeat(args.runs));
    let rows: [(&str, Tool, Bytes); 3] = [
        ("agent to a directory (the embedded target included)", Tool::DoppelLocal, |x| x.agent_rss),
        ("agent to 127.0.0.1", Tool::DoppelRemote, |x| x.agent_rss),
        ("target on 127.0.0.1", Tool::DoppelRemote, |x| x.target_rss),
    ];
    for (name, tool, f) in rows {
        let v: Vec<u64> = r.of(tool).iter().map(f).collect();
        let cells: String = v.iter().map(|b| format!(" {:.1} |", *b as f64 / MIB)).collect();
        let max = v.iter().copied().max().unwrap_or(0);
        let per_file = max as f64 / tree.shape.files as f64;
        let _ = writeln!(s, "| {name} |{cells} {:.1} | {per_file:.0} |", max as f64 / MIB);
    }
    let cache = args.index_cache.as_deref().unwrap_or("doppel's default");
    let _ = writeln!(s, "\nIndex cache (`--index-cache`): {cache}.\n");
}

fn change_table(s: &mut String, args: &FilesArgs, r: &FilesResults) {
    let changed = r.runs.first().and_then(|run| run.first()).map_or(0, |x| x.changed_files);
    let _ = writeln!(
        s,
        "### Change pass: {changed} files ({} %) rewritten in place with new content of the same size, \
         cold cache\n",
        args.change_percent
    );
    let _ = writeln!(
        s,
        "Timed from the last rewrite (the rewrites themselves took {:.2} s, median) until the copy has every \
         change durably.\n",
        Sample::new(r.runs.iter().flatten().map(|x| x.change_writes).collect()).median().as_secs_f64()
    );
    header(s, "seconds", args.runs);
    let change = |t| col(r, t, |x| x.change);
    row(s, "`rsync -a` again, then `sync`", &change(Tool::Rsync));
    row(s, "rsync to its daemon again, then `sync`", &change(Tool::RsyncDaemon));
    row(s, "doppel to a directory: every change acknowledged and in the replica", &change(Tool::DoppelLocal));
    row(s, "doppel to 127.0.0.1: the same", &change(Tool::DoppelRemote));
    let cpu = |t| col(r, t, |x| x.change_cpu);
    row(s, "CPU of `rsync -a`", &cpu(Tool::Rsync));
    row(s, "CPU of rsync to its daemon (client and daemon)", &cpu(Tool::RsyncDaemon));
    row(s, "CPU of doppel to a directory", &cpu(Tool::DoppelLocal));
    row(s, "CPU of doppel to 127.0.0.1 (agent and target)", &cpu(Tool::DoppelRemote));
    let _ = writeln!(s, "\n| ratio | of the minima | of the medians |");
    let _ = writeln!(s, "|---|---|---|");
    ratio(s, "doppel to a directory / (rsync -a + sync)", &change(Tool::DoppelLocal), &change(Tool::Rsync));
    ratio(
        s,
        "doppel to 127.0.0.1 / (rsync to its daemon + sync)",
        &change(Tool::DoppelRemote),
        &change(Tool::RsyncDaemon),
    );
    s.push('\n');
}

fn status_line(s: &mut String, r: &FilesResults) {
    for tool in [Tool::DoppelLocal, Tool::DoppelRemote] {
        if let Some(st) = r.of(tool).last().and_then(|x| x.status.clone()) {
            let _ = writeln!(
                s,
                "{} (last run, when caught up): capture `{}`, {} files / {:.1} MiB hashed, {:.1} MiB sent, {} ops \
                 acknowledged.\n",
                tool.name(),
                st.capture,
                st.files_hashed,
                st.bytes_hashed as f64 / MIB,
                st.bytes_sent as f64 / MIB,
                st.acked
            );
        }
    }
}
