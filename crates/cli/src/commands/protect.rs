//! `doppel protect`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use doppel_agent::failback::Outcome;
use doppel_agent::{Agent, JobConfig, Schedule};
use tokio_util::sync::CancellationToken;

use crate::cli::{CaptureMode, ProtectArgs};
use crate::config::{FileConfig, destination, job_from_section};
use crate::control::{self, ControlRequest, ControlResponse, ReceivingJob, StatusReport};

pub async fn run(a: ProtectArgs, file: FileConfig, home: PathBuf) -> Result<()> {
    let failback = a.failback;
    let notices = notice_options(&a, &file)?;
    let http = match crate::config::http_options(&a.http, file.http.as_ref(), file.http_token_file.as_ref()) {
        Some(o) => Some(crate::http::bind(&o).await?),
        None => None,
    };
    let stop_http = CancellationToken::new();
    if let Some(h) = http {
        tokio::spawn(super::target::serve_http(h, home.clone(), stop_http.clone()));
    }
    let _stop_http = stop_http.drop_guard();
    let mut jobs = jobs(a, &file)?;
    share_target_limits(&mut jobs, &file)?;
    if failback {
        return run_failback(jobs, home).await;
    }
    let mut agents = Vec::new();
    for job in jobs {
        let name = job.name.clone();
        agents.push(Agent::new(job, &home).with_context(|| format!("job {name}"))?);
    }
    let shutdown = super::on_signals()?;
    let stop_control = CancellationToken::new();
    if let Some(o) = notices {
        let jobs = agents.iter().map(Agent::status_source).collect();
        tokio::spawn(crate::notices::watch(jobs, o, shutdown.clone()));
    }
    tokio::spawn(crate::progress::watch_jobs(&agents, shutdown.clone()));
    let mut runs = tokio::task::JoinSet::new();
    let ready = crate::systemd::Readiness::agents(&agents, &home);
    for agent in agents {
        let name = agent.job().name.clone();
        let sock = control::job_socket(&home, &name);
        tokio::spawn(control::serve(sock, handler(&agent), stop_control.clone()));
        let token = shutdown.clone();
        runs.spawn(async move { (name, agent.run(token).await.map_err(anyhow::Error::from)) });
    }
    crate::systemd::spawn(ready, shutdown.clone());
    let r = join(runs, &shutdown).await;
    stop_control.cancel();
    r
}

/// `protect --failback`: each job first receives its tree back from the target (until the
/// operator's cutover there hands it over), then is protected as usual.
async fn run_failback(jobs: Vec<JobConfig>, home: PathBuf) -> Result<()> {
    let shutdown = super::on_signals()?;
    let stop_control = CancellationToken::new();
    let mut runs = tokio::task::JoinSet::new();
    for job in jobs {
        let (home, shutdown, stop_control) = (home.clone(), shutdown.clone(), stop_control.clone());
        runs.spawn(async move {
            let name = job.name.clone();
            let r = async {
                let mut job = job;
                // A vm job's disks are staged as raw files for the failback to patch.
                let staged = match &job.capture {
                    doppel_agent::CaptureMode::Vm(guest) => {
                        let s = doppel_agent::vm_disks::stage(&home, &name, &guest.qmp)?;
                        job.root = s.root().to_path_buf();
                        Some(s)
                    }
                    _ => None,
                };
                let sock = control::job_socket(&home, &name);
                let phase = CancellationToken::new();
                let serving = tokio::spawn(control::serve(
                    sock.clone(),
                    receiving(&name, &job.dest.to_string()),
                    phase.clone(),
                ));
                tracing::info!(job = %name, "failback: asking the target for the job's replica");
                let outcome = doppel_agent::failback::receive_with(
                    &job,
                    &home,
                    shutdown.clone(),
                    crate::progress::failback(&name),
                )
                .await;
                phase.cancel();
                let _ = serving.await;
                let outcome = outcome?;
                match outcome {
                    Outcome::Stopped => return Ok(()),
                    Outcome::HandedBack(a) => {
                        tracing::info!(job = %name, epoch = a.epoch, "failback complete: protecting again")
                    }
                    Outcome::NotFailedOver => {}
                }
                if let (Some(s), doppel_agent::CaptureMode::Vm(guest)) = (staged, &job.capture) {
                    match outcome {
                        Outcome::HandedBack(_) => s.write_back()?,
                        _ => s.discard()?,
                    }
                    tracing::info!(job = %name, "the guest's disks hold the replica: start the guest here");
                    if !doppel_agent::vm_disks::wait_for_guest(&guest.qmp, &shutdown).await {
                        return Ok(());
                    }
                }
                let agent = Agent::new(job, &home)?;
                tokio::spawn(control::serve(sock, handler(&agent), stop_control.clone()));
                agent.run(shutdown).await.map_err(anyhow::Error::from)
            }
            .await;
            (name, r)
        });
    }
    let r = join(runs, &shutdown).await;
    stop_control.cancel();
    r
}

/// `--notify` and `--rpo`, else the config's `notify` and `rpo` (`None`: no notify command).
fn notice_options(a: &ProtectArgs, file: &FileConfig) -> Result<Option<crate::notices::NoticeOptions>> {
    let Some(command) = a.notify.clone().or_else(|| file.notify.clone()) else {
        if a.rpo.is_some() {
            bail!("--rpo needs --notify (the command told when the lag passes it)");
        }
        return Ok(None);
    };
    let rpo = match a.rpo.as_ref().or(file.rpo.as_ref()) {
        Some(r) => Some(crate::config::parse_duration(r).context("rpo")?),
        None => None,
    };
    let timing = crate::config::alert_timing(file.alert_after_secs);
    Ok(Some(crate::notices::NoticeOptions { command, rpo, timing }))
}

/// Waits for every job; a job that fails leaves the others running, and the first error is
/// returned once all have ended.
async fn join(
    mut runs: tokio::task::JoinSet<(String, Result<()>)>,
    shutdown: &CancellationToken,
) -> Result<()> {
    let mut first_error = None;
    while let Some(r) = runs.join_next().await {
        let (name, r) = r?;
        if let Err(e) = r {
            // One job refused for good (its identity not allowed, fenced after a failover)
            // must not stop the agent's other jobs; the agent ends, with this error, once
            // every job has.
            if !runs.is_empty() && !shutdown.is_cancelled() {
                tracing::error!(job = %name, error = format!("{e:#}"), "job stopped; the agent's other jobs go on");
            }
            first_error.get_or_insert_with(|| e.context(format!("job {name}")));
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The control socket's handler for a running job.
fn handler(agent: &Agent) -> control::Handler {
    let src = agent.status_source();
    let verifier = agent.verifier();
    let limit = agent.limit();
    let bookmarker = agent.bookmarker();
    Arc::new(move |req| {
        let (src, verifier, limit) = (src.clone(), verifier.clone(), limit.clone());
        let bookmarker = bookmarker.clone();
        Box::pin(async move {
            match req {
                ControlRequest::Status => ControlResponse::Status(StatusReport {
                    jobs: vec![src.snapshot()],
                    ..StatusReport::default()
                }),
                ControlRequest::Limit { rate } => match set_limit(&limit, &rate) {
                    Ok(()) => ControlResponse::Limit { rate_limit: src.snapshot().rate_limit },
                    Err(e) => ControlResponse::error(e),
                },
                ControlRequest::Bookmark { name } => match bookmarker.bookmark(&name) {
                    Ok(seq) => ControlResponse::Bookmarked { seq },
                    Err(e) => ControlResponse::error(e.to_string()),
                },
                ControlRequest::Verify { repair } => match verifier.verify(repair).await {
                    Ok(report) => ControlResponse::Verify(report),
                    Err(e) => ControlResponse::error(e.to_string()),
                },
                other => ControlResponse::error(format!(
                    "{} is served by the target's control socket, not by a job's",
                    other.op()
                )),
            }
        })
    })
}

/// `doppel limit JOB RATE`: a rate, or `schedule` to go back to the configured schedule.
fn set_limit(limit: &doppel_agent::Limit, rate: &str) -> Result<(), String> {
    let parsed = if rate == "schedule" {
        None
    } else {
        Some(doppel_link::ratelimit::parse_rate(rate).map_err(|e| e.to_string())?)
    };
    limit.set(parsed).map_err(|e| e.to_string())
}

/// The control socket's handler for a job of `protect --failback` while it receives its
/// replica back: it reports that, and refuses what needs a running job.
fn receiving(job: &str, dest: &str) -> control::Handler {
    let row = ReceivingJob::new(job, dest);
    Arc::new(move |req| {
        let row = row.clone();
        Box::pin(async move {
            match req {
                ControlRequest::Status => {
                    ControlResponse::Status(StatusReport { receiving: vec![row], ..StatusReport::default() })
                }
                other => ControlResponse::error(format!(
                    "job {} is receiving its replica back (failback): {} works once the target ran `doppel failback` and the job is protected again",
                    row.job,
                    other.op()
                )),
            }
        })
    })
}

fn jobs(mut a: ProtectArgs, file: &FileConfig) -> Result<Vec<JobConfig>> {
    let vm = a.vm.take();
    if vm.is_none() && !a.vm_disk.is_empty() {
        bail!("--vm-disk chooses disks of a guest: it needs --vm QMP_SOCKET");
    }
    if let Some(qmp) = &vm {
        // The job's tree is doppel's directory of the guest's disk views, under --home.
        a.src = Some(qmp.clone());
        if a.name.is_none() {
            a.name = qmp.file_stem().map(|s| s.to_string_lossy().into_owned());
        }
    }
    let Some(src) = a.src.take() else {
        if file.job.is_empty() {
            bail!("nothing to protect: give a directory and --to DEST, or add [[job]] entries to the config");
        }
        return file.job.iter().map(|s| job_from_section(s, &file.pins)).collect();
    };
    let to =
        a.to.take()
            .ok_or_else(|| anyhow!("--to DEST is required: a local directory or HOST:PORT of a target"))?;
    let name = match a.name.take() {
        Some(n) => n,
        None => std::fs::canonicalize(&src)
            .with_context(|| format!("protected directory {}", src.display()))?
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| anyhow!("cannot name a job after {}: pass --name", src.display()))?,
    };
    let dest = destination(&to, a.target_id.as_deref(), &file.pins)?;
    if let Some(qmp) = vm {
        let mut job = JobConfig::new(&name, PathBuf::new(), dest);
        job.capture = doppel_agent::CaptureMode::Vm(doppel_agent::VmSource { qmp, disks: a.vm_disk.clone() });
        job.sync = a.sync;
        if let Some(t) = a.sync_timeout {
            job.sync_timeout = std::time::Duration::from_secs(t.max(1));
        }
        link_settings(&mut job, &a)?;
        return Ok(vec![job]);
    }
    let mut job = match file.job.iter().find(|j| j.name == name) {
        Some(s) => {
            let mut j = job_from_section(s, &file.pins)?;
            j.root = src.clone();
            j.dest = dest;
            j
        }
        None => JobConfig::new(&name, src, dest),
    };
    job.include.extend(a.include.iter().cloned());
    job.exclude.extend(a.exclude.iter().cloned());
    if let Some(c) = a.capture {
        job.capture = match c {
            CaptureMode::Watch => doppel_agent::CaptureMode::Watch(doppel_capture::WatchBackend::Auto),
            CaptureMode::Fanotify => doppel_agent::CaptureMode::Watch(doppel_capture::WatchBackend::Fanotify),
            CaptureMode::Inotify => doppel_agent::CaptureMode::Watch(doppel_capture::WatchBackend::Inotify),
            CaptureMode::Fuse => doppel_agent::CaptureMode::Fuse,
        };
    }
    link_settings(&mut job, &a)?;
    job.sync |= a.sync;
    job.fuse_writeback |= a.fuse_writeback;
    job.seeded |= a.seeded;
    if let Some(t) = a.sync_timeout {
        job.sync_timeout = std::time::Duration::from_secs(t.max(1));
    }
    if job.sync && job.capture != doppel_agent::CaptureMode::Fuse {
        bail!("--sync needs --capture fuse: only the fuse capture sees fsync calls");
    }
    if a.fuse_writeback && job.capture != doppel_agent::CaptureMode::Fuse {
        bail!("--fuse-writeback needs --capture fuse: it is a mode of the fuse mount");
    }
    Ok(vec![job])
}

/// The settings of the command line that every kind of job takes: link, spool, history.
fn link_settings(job: &mut JobConfig, a: &ProtectArgs) -> Result<()> {
    if let Some(r) = &a.limit {
        job.bandwidth = Schedule::constant(doppel_link::ratelimit::parse_rate(r).map_err(|e| anyhow!(e))?);
    }
    if let Some(c) = &a.compression {
        job.compression = doppel_agent::Compression::parse(c).map_err(|e| anyhow!(e))?;
    }
    if let Some(s) = &a.spool_limit {
        job.spool.disk = crate::config::parse_size(s)?;
        job.spool.memory = job.spool.memory.min(job.spool.disk as usize);
    }
    if let Some(h) = a.heartbeat {
        job.heartbeat = std::time::Duration::from_secs(h.max(1));
    }
    if let Some(c) = &a.index_cache {
        job.index_cache = crate::config::parse_size(c)? as usize;
    }
    let remote = !matches!(job.dest, doppel_agent::Destination::Local(_));
    if remote && (a.history.is_some() || a.history_size.is_some() || a.history_min.is_some()) {
        bail!(
            "--history, --history-size and --history-min set a --to DIR replica's history; a target keeps its replicas' history as its own config says (`history` under [target] or the source's [[target.allow]])"
        );
    }
    let size = a.history_size.clone().map(crate::config::SizeValue::Text);
    job.history =
        crate::config::retention(job.history, a.history.as_deref(), size.as_ref(), a.history_min.as_deref())?;
    Ok(())
}

/// Gives every job going to a target with a `[bandwidth."HOST:PORT"]` section the same limiter,
/// kept at the section's scheduled rate.
fn share_target_limits(jobs: &mut [JobConfig], file: &FileConfig) -> Result<()> {
    for (addr, section) in &file.bandwidth {
        let schedule = crate::config::schedule(section.rate.as_deref(), &section.schedule)
            .with_context(|| format!("[bandwidth.\"{addr}\"]"))?;
        let limiter = doppel_link::RateLimiter::new(schedule.rate_now());
        for job in jobs.iter_mut() {
            if matches!(&job.dest, doppel_agent::Destination::Remote { addr: a, .. } if a == addr) {
                job.target_limiter = Some(limiter.clone());
            }
        }
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_secs(30)).await;
                limiter.set_rate(schedule.rate_now());
            }
        });
    }
    Ok(())
}
