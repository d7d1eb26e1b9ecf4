//! The markdown report of the `wan` mode.

use std::fmt::Write as _;
use std::time::Duration;

use crate::linkcheck::LinkCheck;
use crate::lsyncd;
use crate::machine::Machine;
use crate::stats::Sample;
use crate::tree::TreeInfo;
use crate::wan::Env;
use crate::wan_lag::ToolLag;
use crate::wan_mirror::{MirrorResults, ToolRun};
use crate::wan_overwrite::{OverwriteRun, PAGE};

const MIB: f64 = (1u64 << 20) as f64;
const GIB: f64 = (1u64 << 30) as f64;

/// Every table of a run.
#[allow(clippy::too_many_arguments)]
pub fn markdown(
    env: &Env,
    m: &Machine,
    tree: &TreeInfo,
    link: &LinkCheck,
    mirror: &MirrorResults,
    lag: &[ToolLag],
    over: &[OverwriteRun],
    counters: ((u64, u64), (u64, u64)),
) -> String {
    let mut s = String::new();
    machine(&mut s, m);
    link_table(&mut s, env, link, counters);
    mirror_tables(&mut s, env, tree, mirror);
    lag_table(&mut s, env, lag);
    overwrite_table(&mut s, env, over);
    s
}

fn machine(s: &mut String, m: &Machine) {
    s.push_str(&m.table("####", &[("rsync", &m.rsync), ("lsyncd", &lsyncd::version())]));
}

fn link_table(s: &mut String, env: &Env, l: &LinkCheck, ((ka, kb), (fa, fb)): ((u64, u64), (u64, u64))) {
    let w = &env.wire;
    let ms = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1e3);
    let _ = writeln!(s, "#### The link\n");
    let _ = writeln!(s, "| measure | value |");
    let _ = writeln!(s, "|---|---|");
    let _ = writeln!(s, "| hosts (TUN devices in namespaces a and b) | {} and {} |", w.a_ip, w.b_ip);
    let _ = writeln!(s, "| rate limit (`tbf` on each TUN device) | {} Mbit/s each way |", w.mbit);
    let _ = writeln!(s, "| delay added by the forwarder | {} ms each way |", ms(w.one_way));
    let _ = writeln!(
        s,
        "| round trip of a 1-byte message, min / median / max of 20 | {} / {} / {} ms |",
        ms(l.rtt.min()),
        ms(l.rtt.median()),
        ms(l.rtt.max())
    );
    let _ = writeln!(
        s,
        "| one TCP stream for {:.0} s, payload after its first second | {:.1} Mbit/s ({:.1} % of the rate) |",
        l.stream_secs,
        l.stream_rate * 8.0 / 1e6,
        100.0 * l.stream_rate / w.rate_bytes()
    );
    let _ = writeln!(
        s,
        "| ... on the wire (IP headers included) | {:.1} Mbit/s ({:.1} % of the rate) |",
        l.stream_rate * l.overhead * 8.0 / 1e6,
        100.0 * l.stream_rate * l.overhead / w.rate_bytes()
    );
    let _ = writeln!(
        s,
        "| bytes forwarded a→b / b→a in the whole run (forwarder; TUN devices' own tx counters) | {:.1} / {:.1} MiB ({:.1} / {:.1} MiB) |\n",
        fa as f64 / MIB,
        fb as f64 / MIB,
        ka as f64 / MIB,
        kb as f64 / MIB
    );
}

fn mirror_tables(s: &mut String, env: &Env, tree: &TreeInfo, r: &MirrorResults) {
    let rate = env.wire.rate_bytes();
    let _ = writeln!(
        s,
        "#### Initial mirror: {:.2} GiB, {} files ({:.0} MiB of text), cold cache, empty destination\n",
        tree.bytes() as f64 / GIB,
        tree.files(),
        tree.text_bytes as f64 / MIB
    );
    let runs = env.args.runs;
    let head: String = (1..=runs).map(|i| format!(" run {i} |")).collect();
    let _ = writeln!(s, "| | |{head} min | median |");
    let _ = writeln!(s, "|---|---|{}---|---|", "---|".repeat(runs));
    let mut tools: Vec<(&str, &Vec<ToolRun>)> = vec![("`rsync -az` to a daemon", &r.rsync)];
    if env.lsyncd {
        tools.push(("lsyncd startup sync", &r.lsyncd));
    }
    tools.push(("`doppel protect` to a target", &r.doppel));
    type Row = (&'static str, fn(&ToolRun, f64) -> f64, usize);
    let rows: [Row; 5] = [
        ("seconds", |t, _| t.traffic.wall.as_secs_f64(), 1),
        ("MiB a→b on the wire", |t, _| t.traffic.a_to_b as f64 / MIB, 1),
        ("link utilisation, whole run", |t, rate| 100.0 * t.traffic.utilisation(rate), 1),
        (
            "link utilisation while busy (median of 1 s windows)",
            |t, rate| 100.0 * t.traffic.log.steady_rate(rate) / rate,
            1,
        ),
        ("CPU s, both hosts", |t, _| t.cpu.as_secs_f64(), 2),
    ];
    for (tool, runs_of) in &tools {
        for (name, f, prec) in &rows {
            let v: Vec<f64> = runs_of.iter().map(|t| f(t, rate)).collect();
            let cells: String = v.iter().map(|x| format!(" {x:.prec$} |")).collect();
            let (min, med) = min_median(&v);
            let unit = if name.starts_with("link") { " %" } else { "" };
            let _ = writeln!(s, "| {tool} | {name}{unit} |{cells} {min:.prec$} | {med:.prec$} |");
        }
    }
    let _ = writeln!(s);
    let wall =
        |v: &Vec<ToolRun>| min_median(&v.iter().map(|t| t.traffic.wall.as_secs_f64()).collect::<Vec<_>>());
    let (d, rs) = (wall(&r.doppel), wall(&r.rsync));
    let _ = writeln!(s, "| time ratio | of the minima | of the medians |");
    let _ = writeln!(s, "|---|---|---|");
    let _ = writeln!(s, "| doppel / rsync -az | {:.2} | {:.2} |", d.0 / rs.0, d.1 / rs.1);
    if env.lsyncd {
        let l = wall(&r.lsyncd);
        let _ = writeln!(s, "| doppel / lsyncd | {:.2} | {:.2} |", d.0 / l.0, d.1 / l.1);
    }
    let util =
        |v: &Vec<ToolRun>| min_median(&v.iter().map(|t| t.traffic.utilisation(rate)).collect::<Vec<_>>()).1;
    let _ = writeln!(
        s,
        "\nGoal of issue 4: link utilisation ≥ 90 % during the bulk transfer. doppel, median over the whole run: \
         {:.1} % ({}); rsync -az: {:.1} %.\n",
        100.0 * util(&r.doppel),
        if util(&r.doppel) >= 0.9 { "met" } else { "**not met**" },
        100.0 * util(&r.rsync)
    );
    let st = &r.doppel_status;
    let rs = &r.rsync_stats;
    let _ = writeln!(
        s,
        "doppel (last run): {} ops acknowledged, {:.1} MiB sent by the agent (its own count, TLS payload), \
         {} files / {:.2} GiB hashed. rsync (last run): {:.1} MiB sent, {:.1} MiB literal data, {} files.\n",
        st.acked,
        st.bytes_sent as f64 / MIB,
        st.files_hashed,
        st.bytes_hashed as f64 / GIB,
        rs.sent as f64 / MIB,
        rs.literal as f64 / MIB,
        rs.files
    );
}

fn lag_table(s: &mut String, env: &Env, lag: &[ToolLag]) {
    let a = env.args;
    let _ = writeln!(
        s,
        "#### Small-update lag: {} in-place updates/s of 1 KiB files for {} s ({} files), the {:.2} GiB tree mirrored\n",
        a.rate,
        a.lag_secs,
        a.pool,
        env.args.size as f64 / GIB
    );
    let head: String = lag.iter().map(|l| format!(" {} |", l.tool)).collect();
    let _ = writeln!(s, "| measure |{head}");
    let _ = writeln!(s, "|---|{}", "---|".repeat(lag.len()));
    let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1e3);
    type Row = (&'static str, fn(&ToolLag) -> String);
    let rows: [Row; 12] = [
        ("pool at the destination after", |l| format!("{:.1} s", l.pool_replicated.as_secs_f64())),
        ("updates written / seen at the destination", |l| format!("{} / {}", l.updates, l.lags.len())),
        ("coalesced / missed", |l| format!("{} / {}", l.coalesced, l.missed)),
        ("lag p50", |l| format!("{:.0} ms", l.lags.percentile(50.0).as_secs_f64() * 1e3)),
        ("lag p90", |l| format!("{:.0} ms", l.lags.percentile(90.0).as_secs_f64() * 1e3)),
        ("lag p99", |l| format!("{:.0} ms", l.lags.percentile(99.0).as_secs_f64() * 1e3)),
        ("lag max", |l| format!("{:.0} ms", l.lags.max().as_secs_f64() * 1e3)),
        ("destination equal to the source after the last write", |l| {
            format!("{:.2} s", l.drained.as_secs_f64())
        }),
        ("MiB a→b during the stream", |l| format!("{:.2}", l.traffic.a_to_b as f64 / MIB)),
        ("MiB b→a during the stream", |l| format!("{:.2}", l.traffic.b_to_a as f64 / MIB)),
        ("wire bytes (both ways) per update", |l| {
            format!("{:.0}", (l.traffic.a_to_b + l.traffic.b_to_a) as f64 / l.updates.max(1) as f64)
        }),
        ("inotify overflows at the destination", |l| l.overflows.to_string()),
    ];
    for (name, f) in rows {
        let cells: String = lag.iter().map(|l| format!(" {} |", f(l))).collect();
        let _ = writeln!(s, "| {name} |{cells}");
    }
    if let Some(l) = lag.iter().find(|l| l.passes.len() > 0) {
        let _ = writeln!(
            s,
            "\nThe rsync loop made {} passes over the whole tree, median {} (min {}, max {}).",
            l.passes.len(),
            ms(l.passes.median()),
            ms(l.passes.min()),
            ms(l.passes.max())
        );
    }
    let _ = writeln!(s);
}

fn overwrite_table(s: &mut String, env: &Env, over: &[OverwriteRun]) {
    let changed = env.args.overwrites * PAGE;
    let _ = writeln!(
        s,
        "#### {} random 4 KiB overwrites ({:.1} MiB) in a {:.1} GiB file of noise, cold cache\n",
        env.args.overwrites,
        changed as f64 / MIB,
        env.args.big_size as f64 / GIB
    );
    let _ = writeln!(
        s,
        "| tool | seconds until the destination has them | MiB a→b | MiB b→a | wire bytes per byte changed | the tool's own count |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    for o in over {
        let own = match (&o.rsync, o.doppel_sent) {
            (Some(r), _) => format!(
                "rsync: {:.1} MiB sent, {:.1} MiB received, {:.1} MiB literal, {:.0} MiB matched",
                r.sent as f64 / MIB,
                r.received as f64 / MIB,
                r.literal as f64 / MIB,
                r.matched as f64 / MIB
            ),
            (None, Some(d)) => format!("agent: {:.1} MiB sent", d as f64 / MIB),
            _ => String::new(),
        };
        let _ = writeln!(
            s,
            "| {} | {:.2} | {:.2} | {:.2} | {:.2} | {own} |",
            o.tool,
            o.traffic.wall.as_secs_f64(),
            o.traffic.a_to_b as f64 / MIB,
            o.traffic.b_to_a as f64 / MIB,
            (o.traffic.a_to_b + o.traffic.b_to_a) as f64 / changed as f64
        );
    }
    let _ = writeln!(s);
}

/// (min, median) of a sample of seconds.
fn min_median(v: &[f64]) -> (f64, f64) {
    let sample = Sample::new(v.iter().map(|&x| Duration::from_secs_f64(x.max(0.0))).collect());
    (sample.min().as_secs_f64(), sample.median().as_secs_f64())
}
