//! Failback: how long, and how many bytes, to give a failed-over source back the workload's
//! tree after the workload changed part of it on the DR side; against rsync of the replica
//! over the old source's copy.
//!
//! Hosts a (the source) and b (the target) are network namespaces joined by a veth pair
//! without a rate limit, so the bytes on the wire are the veth's counters. The source
//! protects a copy of the generated tree, the operator fails over (`doppel failover`, the
//! agent is fenced and stops), the workload changes the replica (see [`crate::changes`]).
//! Then, each from a cold cache, the replica from host b to an rsync daemon on host a: `rsync
//! -a` into an empty directory (a full copy: the baseline), `rsync -a --whole-file` over a
//! fresh copy of the old source (files whose size or time differ are sent whole), `rsync -a`
//! over such a copy (its delta transfer: the fairest rsync); and doppel: `doppel protect
//! --failback` on host a until the target says the source holds the replica, then `doppel
//! failback` on the target (the cutover) while watching the source until it protects again.
//! Every copy is compared with the replica.

use std::path::Path;
use std::process::Command;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use doppel_testkit::netns::NetBench;
use serde_json::Value;

use crate::changes::{self, ChangeSet};
use crate::cpu;
use crate::machine;
use crate::mirror::{prepare_cold, verify};
use crate::remote::{self, Homes, SOURCE};
use crate::rsyncd::{self, Daemon};
use crate::scratch::{Scratch, remove_if_present};
use crate::tree::TreeInfo;
use crate::{FailoverArgs, ns};

/// Bytes each way on the veth during a measured stretch.
#[derive(Debug, Clone, Copy, Default)]
pub struct Wire {
    /// Host b (DR side) to host a (source).
    pub b_to_a: u64,
    /// Host a to host b.
    pub a_to_b: u64,
}

/// One rsync baseline run.
#[derive(Debug, Clone, Default)]
pub struct RsyncRun {
    /// `rsync` alone.
    pub wall: Duration,
    /// `rsync` then `sync`.
    pub synced: Duration,
    /// What crossed the veth.
    pub wire: Wire,
    /// Its `--stats`.
    pub stats: rsyncd::Stats,
    /// CPU of both ends.
    pub cpu: Duration,
    /// CPU of everything else on the machine meanwhile (see [`cpu::Meter`]).
    pub others: Duration,
}

/// One doppel failback.
#[derive(Debug, Clone, Default)]
pub struct DoppelRun {
    /// From starting `doppel protect --failback` until the target says `replicating`.
    pub ready: Duration,
    /// `doppel failback` (the cutover), as the operator waits for it.
    pub cutover: Duration,
    /// The cutover's steps: (step, millis).
    pub steps: Vec<(String, u64)>,
    /// From the start of the cutover until the source's job protects again (replicating and
    /// connected, in the original direction).
    pub resumed: Duration,
    /// The target's failback `bytes_sent` when the source held the replica.
    pub bytes_ready: u64,
    /// The same after the cutover (from its final-sync step).
    pub bytes_total: u64,
    /// What crossed the veth from the start of the failback agent until the cutover was over
    /// and the source protected again.
    pub wire: Wire,
    /// CPU of the agent and the target over the same stretch.
    pub cpu: Duration,
    /// CPU of everything else on the machine meanwhile (see [`cpu::Meter`]).
    pub others: Duration,
}

/// Everything one run measured.
#[derive(Debug, Clone, Default)]
pub struct FailbackRun {
    /// What the workload changed on the DR side.
    pub changes: ChangeSet,
    /// `rsync -a` into an empty directory.
    pub full: RsyncRun,
    /// `rsync -a --whole-file` over the old tree.
    pub whole: RsyncRun,
    /// `rsync -a`.
    pub delta: RsyncRun,
    /// doppel.
    pub doppel: DoppelRun,
}

/// Runs `args.runs` failbacks of the generated tree.
pub fn run(
    args: &FailoverArgs,
    scratch: &Scratch,
    doppel: &Path,
    tree: &TreeInfo,
) -> Result<Vec<FailbackRun>> {
    let mut out = Vec::new();
    for i in 0..args.runs {
        let r = one(args, scratch, doppel, tree, i)?;
        eprintln!(
            "[bench] failback run {}/{}: doppel ready {:.1} s + cutover {:.2} s, {:.1} MiB; rsync full copy {:.1} s, \
             {:.1} MiB; rsync --whole-file {:.1} s, {:.1} MiB; rsync {:.1} s, {:.1} MiB",
            i + 1,
            args.runs,
            r.doppel.ready.as_secs_f64(),
            r.doppel.cutover.as_secs_f64(),
            r.doppel.wire.b_to_a as f64 / (1u64 << 20) as f64,
            r.full.wall.as_secs_f64(),
            r.full.wire.b_to_a as f64 / (1u64 << 20) as f64,
            r.whole.wall.as_secs_f64(),
            r.whole.wire.b_to_a as f64 / (1u64 << 20) as f64,
            r.delta.wall.as_secs_f64(),
            r.delta.wire.b_to_a as f64 / (1u64 << 20) as f64,
        );
        out.push(r);
    }
    Ok(out)
}

fn one(
    args: &FailoverArgs,
    scratch: &Scratch,
    doppel: &Path,
    tree: &TreeInfo,
    i: usize,
) -> Result<FailbackRun> {
    let work = scratch.failover(&format!("fb-{i}"));
    remove_if_present(&work)?;
    let homes = Homes::new(&work);
    let src = work.join("src");
    copy_tree(&scratch.src(), &src)?;
    let net = NetBench::new().map_err(|e| anyhow!("creating network namespaces: {e}"))?;
    let mut target = remote::start_target(doppel, &net.b, &homes, &format!("{}:7340", net.b_ip), "")?;
    let capture = ["--capture", args.capture.as_str()];
    let mut agent = remote::start_agent(
        doppel,
        &net.a,
        &homes,
        &src,
        &target,
        &[&["--heartbeat", "1"][..], &capture].concat(),
    )?;
    agent.wait_caught_up(Duration::from_millis(100), Duration::from_secs(1800))?;
    let replica = homes.replica();
    verify(&src, &replica)?;
    target.fail(SOURCE, false)?;
    let st = agent.wait_exit(Duration::from_secs(60))?;
    if st.success() {
        bail!("the agent exited successfully after the failover: it should have been fenced");
    }
    let mut r = FailbackRun {
        changes: changes::apply(&replica, tree.bytes(), args.change_percent)?,
        ..Default::default()
    };
    machine::sync();

    let old = work.join("rsync-old");
    for (opts, stale, slot) in [
        (&["-a"][..], false, &mut r.full),
        (&["-a", "--whole-file"][..], true, &mut r.whole),
        (&["-a"][..], true, &mut r.delta),
    ] {
        if stale {
            copy_tree(&scratch.src(), &old)?;
        } else {
            remove_if_present(&old)?;
        }
        *slot = time_rsync(&net, opts, &replica, &old, &work)?;
        remove_if_present(&old)?;
    }

    r.doppel = time_doppel(&net, doppel, &homes, &src, &mut target, &capture)?;
    verify(&src, &replica)?;
    target.stop();
    drop(net);
    if !args.keep {
        remove_if_present(&work)?;
    }
    Ok(r)
}

fn time_rsync(net: &NetBench, opts: &[&str], replica: &Path, old: &Path, work: &Path) -> Result<RsyncRun> {
    let daemon = Daemon::start(&net.a, &net.a_ip, 8730, old, work)?;
    prepare_cold()?;
    let meter = cpu::Meter::start()?;
    let before = (counters(net)?, cpu::of_waited_children()?, daemon.cpu()?);
    let t = Instant::now();
    let stats = rsyncd::push(&net.b, opts, replica, &daemon.url)?;
    let wall = t.elapsed();
    machine::sync();
    let synced = t.elapsed();
    let after = counters(net)?;
    let daemon_cpu = daemon.cpu()? - before.2;
    let cpu = cpu::of_waited_children()? - before.1 + daemon_cpu;
    let others = meter.others(daemon_cpu)?;
    verify(replica, old)?;
    Ok(RsyncRun { wall, synced, wire: diff(before.0, after), stats, cpu, others })
}

fn time_doppel(
    net: &NetBench,
    bin: &Path,
    homes: &Homes,
    src: &Path,
    target: &mut crate::target::TargetProc,
    capture: &[&str],
) -> Result<DoppelRun> {
    prepare_cold()?;
    let meter = cpu::Meter::start()?;
    let (before, target_cpu) = (counters(net)?, cpu::of_process(target.pid())?);
    let mut d = DoppelRun::default();
    let mut agent = remote::start_agent(
        bin,
        &net.a,
        homes,
        src,
        target,
        &[&["--heartbeat", "1", "--failback"][..], capture].concat(),
    )?;
    loop {
        agent.check_alive()?;
        target.check_alive()?;
        let fb = &target.source_status(SOURCE)?["jobs"][0]["failback"];
        if fb["state"] == "replicating" {
            d.ready = agent.started.elapsed();
            d.bytes_ready = fb["bytes_sent"].as_u64().unwrap_or(0);
            break;
        }
        if agent.started.elapsed() > Duration::from_secs(3600) {
            bail!("the source did not get the replica within an hour: {fb}");
        }
        sleep(Duration::from_millis(50));
    }
    let agent_cpu_ready = agent.cpu()?;
    // The cutover runs on its own thread while this one watches the source come back.
    let cut = Instant::now();
    let (report, resumed) = std::thread::scope(|s| -> Result<_> {
        let target = &*target;
        let cutover = s.spawn(move || target.fail(SOURCE, true));
        let mut resumed = None;
        loop {
            agent.check_alive()?;
            // While the job switches from receiving to protecting, its status may be missing.
            let back = agent.status().ok().flatten().is_some_and(|s| s.state == "replicating" && s.connected);
            if back && resumed.is_none() {
                resumed = Some(cut.elapsed());
            }
            if cutover.is_finished() && resumed.is_some() {
                break;
            }
            if cut.elapsed() > Duration::from_secs(600) {
                bail!("the cutover or the source's resumption took over 10 minutes:\n{}", agent.log_tail(20));
            }
            sleep(Duration::from_millis(20));
        }
        let report = cutover.join().map_err(|_| anyhow!("the cutover thread panicked"))??;
        Ok((report, resumed.unwrap_or_default()))
    })?;
    let (report, cutover) = report;
    d.cutover = cutover;
    d.resumed = resumed;
    let wire_end = counters(net)?;
    d.cpu = agent.cpu().unwrap_or(agent_cpu_ready) + cpu::of_process(target.pid())? - target_cpu;
    d.others = meter.others(d.cpu)?;
    d.wire = diff(before, wire_end);
    d.steps = steps(&report);
    d.bytes_total = final_sync_bytes(&report).unwrap_or(d.bytes_ready);
    agent.stop()?;
    Ok(d)
}

/// (step, millis) of a failover or failback report.
fn steps(report: &Value) -> Vec<(String, u64)> {
    report["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| (s["step"].as_str().unwrap_or("?").to_string(), s["millis"].as_u64().unwrap_or(0)))
        .collect()
}

/// "the source applied everything (N bytes sent in all, ...)" of the final-sync step.
fn final_sync_bytes(report: &Value) -> Option<u64> {
    let step = report["steps"].as_array()?.iter().find(|s| s["step"] == "final-sync")?;
    let detail = step["detail"].as_str()?;
    detail.split('(').nth(1)?.split(' ').next()?.parse().ok()
}

/// Bytes sent so far by host a's and host b's ends of the veth.
fn counters(net: &NetBench) -> Result<(u64, u64)> {
    Ok((net.bytes_sent_by_a(), ns::dev_bytes(&net.b, net.iface_b())?.1))
}

fn diff(before: (u64, u64), after: (u64, u64)) -> Wire {
    Wire { a_to_b: after.0 - before.0, b_to_a: after.1 - before.1 }
}

/// `cp -a FROM TO` (untimed preparation; `TO` is replaced).
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    remove_if_present(to)?;
    std::fs::create_dir_all(to.parent().context("a parent")?)?;
    let st = Command::new("cp").arg("-a").arg(from).arg(to).status().context("running cp -a")?;
    if !st.success() {
        bail!("cp -a {} {} failed: {st}", from.display(), to.display());
    }
    Ok(())
}
