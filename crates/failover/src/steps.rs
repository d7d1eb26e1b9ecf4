//! Failover and failback, step by step.
//!
//! A failover: **fence** each job (the replica applies everything received, becomes durable,
//! moves to a new epoch and refuses its old source from then on), run the **pre-failover**
//! scripts, take over the **addresses**, run each job's **failover** scripts (which start the
//! workload on the replica). A failback cutover: run the **stop-workload** scripts, the
//! **final sync** (every change made on the DR side reaches the source), **release** the
//! addresses, **unfence** each job (a new epoch in which the source may write again) and
//! **hand over** (the last message of the failback stream tells the source where it resumes).
//!
//! Every step that completes is recorded (see [`crate::progress`]) and every step is an
//! event with its duration; a run that stops at a failing step reports it, and the next run
//! skips what was done.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::Instant;

use doppel_link::framed::now_us;
use doppel_proto::Message;
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use crate::events::Event;
use crate::hooks::{release_address, run_script, take_address};
use crate::manager::{FailoverError, Manager, RunKind};
use crate::progress::{Progress, paths};

/// What a failover or failback did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// The source.
    pub source: String,
    /// `failover` or `failback`.
    pub kind: String,
    /// The jobs.
    pub jobs: Vec<String>,
    /// Each job's epoch afterwards.
    pub epochs: BTreeMap<String, u64>,
    /// The steps, in order.
    pub steps: Vec<StepReport>,
    /// How long this run took, in milliseconds.
    pub millis: u64,
    /// For a failover: milliseconds from the source's last sign of life to the end (the
    /// recovery time), when known.
    pub since_last_seen_ms: Option<u64>,
}

/// One step of a [`Report`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepReport {
    /// The step (`fence`, `failover`...).
    pub step: String,
    /// The job, for per-job steps.
    pub job: Option<String>,
    /// `done` or `skipped` (done by an earlier run).
    pub status: String,
    /// How long it took.
    pub millis: u64,
    /// More, in words.
    pub detail: String,
}

/// A run in progress.
struct Run<'a> {
    m: &'a Manager,
    source: &'a str,
    kind: &'static str,
    path: PathBuf,
    p: Progress,
    steps: Vec<StepReport>,
}

impl Run<'_> {
    fn save(&self) -> Result<(), FailoverError> {
        self.p.save(&self.path).map_err(|source| FailoverError::Io { path: self.path.clone(), source })
    }

    fn event(&self, kind: &str) -> Event {
        Event::new(self.source, kind)
    }

    /// Runs one step unless `key` says it was done; records it either way.
    async fn step<F, Fut>(
        &mut self,
        key: Option<String>,
        step: &str,
        job: Option<&str>,
        f: F,
    ) -> Result<(), FailoverError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<String, String>>,
    {
        let kind = format!("{}-step", self.kind);
        let with_job = |e: Event| match job {
            Some(j) => e.job(j),
            None => e,
        };
        if key.as_ref().is_some_and(|k| self.p.done.contains(k)) {
            self.m
                .events
                .record(with_job(self.event(&kind).step(step, "skipped")).detail("done by an earlier run"));
            self.steps.push(StepReport {
                step: step.into(),
                job: job.map(str::to_string),
                status: "skipped".into(),
                millis: 0,
                detail: "done by an earlier run".into(),
            });
            return Ok(());
        }
        self.m.events.record(with_job(self.event(&kind).step(step, "started")));
        let t = Instant::now();
        let r = f().await;
        let millis = t.elapsed().as_millis() as u64;
        match r {
            Ok(detail) => {
                if let Some(k) = key {
                    self.p.done.insert(k);
                    self.save()?;
                }
                self.m.events.record(
                    with_job(self.event(&kind).step(step, "done")).millis(millis).detail(detail.clone()),
                );
                self.steps.push(StepReport {
                    step: step.into(),
                    job: job.map(str::to_string),
                    status: "done".into(),
                    millis,
                    detail,
                });
                Ok(())
            }
            Err(error) => {
                let label = match job {
                    Some(j) => format!("{step} ({j})"),
                    None => step.to_string(),
                };
                self.p.failed = Some(format!("{label}: {error}"));
                self.save()?;
                self.m.events.record(
                    with_job(self.event(&kind).step(step, "failed")).millis(millis).detail(error.clone()),
                );
                Err(FailoverError::Step { step: label, error })
            }
        }
    }

    fn env(&self, job: Option<&str>, step: &str) -> Vec<(String, String)> {
        let mut env = vec![
            ("DOPPEL_SOURCE".to_string(), self.source.to_string()),
            ("DOPPEL_STEP".to_string(), step.to_string()),
            ("DOPPEL_JOBS".to_string(), self.p.jobs.iter().cloned().collect::<Vec<_>>().join(" ")),
            ("DOPPEL_DATA".to_string(), self.m.config.data.display().to_string()),
        ];
        if let Some(j) = job {
            env.push(("DOPPEL_JOB".into(), j.to_string()));
            env.push(("DOPPEL_REPLICA".into(), self.m.replica_path(self.source, j).display().to_string()));
            env.push(("DOPPEL_EPOCH".into(), self.m.replica_state(self.source, j).0.to_string()));
        }
        env
    }

    async fn scripts(
        &mut self,
        step: &str,
        job: Option<&str>,
        scripts: &[String],
    ) -> Result<(), FailoverError> {
        let limit = self.m.config.script_timeout;
        for (i, script) in scripts.iter().enumerate() {
            let key = match job {
                Some(j) => format!("{step}:{j}:{i}"),
                None => format!("{step}:{i}"),
            };
            let env = self.env(job, step);
            let script = script.clone();
            self.step(Some(key), step, job, || async move {
                run_script(&script, &env, limit)
                    .await
                    .map(|()| format!("`{script}` succeeded"))
                    .map_err(|e| e.to_string())
            })
            .await?;
        }
        Ok(())
    }

    /// Takes over (`take`) or releases `addrs` on `iface`, one step each.
    async fn addresses(&mut self, take: bool, addrs: &[String], iface: &str) -> Result<(), FailoverError> {
        let limit = self.m.config.script_timeout;
        let (step, key) = if take { ("address", "address") } else { ("release-address", "release") };
        for addr in addrs {
            let (a, i) = (addr.clone(), iface.to_string());
            self.step(Some(format!("{key}:{addr}")), step, None, || async move {
                let changed = if take {
                    take_address(&a, &i, limit).await
                } else {
                    release_address(&a, &i, limit).await
                };
                Ok(match (take, changed.map_err(|e| e.to_string())?) {
                    (true, true) => format!("{a} added to {i}"),
                    (true, false) => format!("{a} was already on {i}"),
                    (false, true) => format!("{a} removed from {i}"),
                    (false, false) => format!("{a} was not on {i}"),
                })
            })
            .await?;
        }
        Ok(())
    }

    fn report(&self, started: Instant, since_last_seen_ms: Option<u64>) -> Report {
        Report {
            source: self.source.to_string(),
            kind: self.kind.to_string(),
            jobs: self.p.jobs.iter().cloned().collect(),
            epochs: self.p.epochs.clone(),
            steps: self.steps.clone(),
            millis: started.elapsed().as_millis() as u64,
            since_last_seen_ms,
        }
    }
}

impl Manager {
    fn set_running(&self, source: &str, running: Option<RunKind>, error: Option<Option<String>>) {
        let now = self.clock.now_us();
        let mut watches = self.watches.lock();
        let w = watches.entry(source.to_string()).or_insert_with(|| self.new_watch(source));
        w.running = running;
        w.verdict.rebase(now);
        if let Some(e) = error {
            w.error = e;
        }
    }

    fn pick_jobs(&self, source: &str, jobs: Option<Vec<String>>) -> Result<Vec<String>, FailoverError> {
        self.policy(source)?;
        let all = self.target.jobs_of(source);
        if all.is_empty() {
            return Err(FailoverError::NoReplica(format!("this target holds no replica of {source}")));
        }
        match jobs {
            None => Ok(all),
            Some(js) => {
                for j in &js {
                    if !all.contains(j) {
                        return Err(FailoverError::NoReplica(format!(
                            "this target holds no replica of job {j} of {source} (it has: {})",
                            all.join(", ")
                        )));
                    }
                }
                Ok(js)
            }
        }
    }

    /// Fails `source` over: all its jobs, or `jobs`. Continues a run that stopped half way.
    pub async fn failover(
        &self,
        source: &str,
        jobs: Option<Vec<String>>,
        cause: &str,
    ) -> Result<Report, FailoverError> {
        self.failover_locked(source, jobs, cause, None).await
    }

    pub(crate) async fn failover_locked(
        &self,
        source: &str,
        jobs: Option<Vec<String>>,
        cause: &str,
        last_seen_us: Option<u64>,
    ) -> Result<Report, FailoverError> {
        self.exclusive(source, RunKind::Failover, self.run_failover(source, jobs, cause, last_seen_us)).await
    }

    /// Runs `work`, a failover or failback (`what`) of `source`, as the only one of the
    /// source's: shown as running while it runs, its error kept for status and its outcome
    /// (`WHAT-done` or `WHAT-failed`) sent to the notify command. Everything it logs is in a
    /// span that names the source and the kind of run.
    async fn exclusive(
        &self,
        source: &str,
        what: RunKind,
        work: impl Future<Output = Result<Report, FailoverError>>,
    ) -> Result<Report, FailoverError> {
        let span = tracing::info_span!("run", %source, kind = %what);
        let lock = self.op_lock(source);
        let _g = lock.lock().instrument(span.clone()).await;
        self.set_running(source, Some(what), None);
        let r = work.instrument(span).await;
        let error = r.as_ref().err().map(|e| e.to_string());
        self.set_running(source, None, Some(error));
        let detail = match &r {
            Ok(rep) => format!("completed in {} ms", rep.millis),
            Err(e) => e.to_string(),
        };
        let outcome = if r.is_ok() { "done" } else { "failed" };
        self.notify(source, &format!("{what}-{outcome}"), &detail);
        r
    }

    async fn run_failover(
        &self,
        source: &str,
        jobs: Option<Vec<String>>,
        cause: &str,
        last_seen_us: Option<u64>,
    ) -> Result<Report, FailoverError> {
        let jobs = self.pick_jobs(source, jobs)?;
        let pol = self.policy(source)?.clone();
        let (path, _) = paths(&self.config.data, source);
        let p = Progress::load(&path).map_err(|e| FailoverError::Io { path: path.clone(), source: e })?;
        let resumed = p.as_ref().is_some_and(|p| p.finished_us.is_none());
        let mut p = p.unwrap_or_else(|| Progress {
            started_us: now_us(),
            cause: cause.to_string(),
            ..Progress::default()
        });
        p.jobs.extend(jobs.iter().cloned());
        p.finished_us = None;
        p.failed = None;
        let started = Instant::now();
        let mut run = Run { m: self, source, kind: "failover", path, p, steps: Vec::new() };
        run.save()?;
        self.events.record(run.event("failover-started").detail(format!(
            "{cause}; jobs {}{}",
            jobs.join(", "),
            if resumed { " (continuing)" } else { "" }
        )));
        let fail = |e: FailoverError| {
            self.events.record(Event::new(source, "failover-failed").detail(e.to_string()));
            e
        };
        for job in &jobs {
            let target = self.target.clone();
            let (s, j) = (source.to_string(), job.clone());
            run.step(Some(format!("fence:{job}")), "fence", Some(job), || async move {
                let r = target.with_replica(&s, &j, |r| r.fence().map(|e| (e, r.info().applied))).await?;
                let (epoch, applied) = r.map_err(|e| e.to_string())?;
                Ok(format!("epoch {epoch}; everything received is applied (up to op {applied})"))
            })
            .await
            .map_err(fail)?;
            let epoch = self.replica_state(source, job).0;
            run.p.epochs.insert(job.clone(), epoch);
        }
        run.save()?;
        run.scripts("pre-failover", None, &pol.pre_failover).await.map_err(fail)?;
        if let Some(iface) = &pol.interface {
            run.addresses(true, &pol.addresses, iface).await.map_err(fail)?;
        }
        for job in &jobs {
            run.scripts("failover", Some(job), &pol.failover).await.map_err(fail)?;
        }
        let end = now_us();
        run.p.finished_us = Some(end);
        run.save()?;
        let since = last_seen_us.map(|s| end.saturating_sub(s) / 1000);
        let report = run.report(started, since);
        let mut done = run.event("failover-done").millis(report.millis);
        done.detail = match since {
            Some(ms) => {
                format!("workload running on the replica; {ms} ms after the source was last heard from")
            }
            None => "workload running on the replica".into(),
        };
        self.events.record(done);
        Ok(report)
    }

    /// The failback cutover of `source` (all its failed-over jobs, or `jobs`): the source must
    /// be connected in failback mode and hold the whole replica.
    pub async fn failback(&self, source: &str, jobs: Option<Vec<String>>) -> Result<Report, FailoverError> {
        self.exclusive(source, RunKind::Failback, self.run_failback(source, jobs)).await
    }

    async fn run_failback(&self, source: &str, jobs: Option<Vec<String>>) -> Result<Report, FailoverError> {
        let all_failed_over: Vec<String> =
            self.target.jobs_of(source).into_iter().filter(|j| self.replica_state(source, j).1).collect();
        let (fo_path, path) = paths(&self.config.data, source);
        let earlier =
            Progress::load(&path).map_err(|e| FailoverError::Io { path: path.clone(), source: e })?;
        let jobs = match jobs {
            Some(js) => js,
            // A cutover that stopped after unfencing some jobs goes on with them.
            None => {
                let mut js = all_failed_over.clone();
                if let Some(p) = &earlier {
                    js.extend(p.jobs.iter().filter(|j| !all_failed_over.contains(j)).cloned());
                }
                js
            }
        };
        if jobs.is_empty() {
            return Err(FailoverError::NoReplica(format!("no job of {source} is failed over")));
        }
        let pol = self.policy(source)?.clone();
        let mut reverse = Vec::new();
        for job in &jobs {
            let unfenced = earlier.as_ref().is_some_and(|p| p.done.contains(&format!("unfence:{job}")));
            if !all_failed_over.contains(job) && !unfenced {
                return Err(FailoverError::NoReplica(format!("job {job} of {source} is not failed over")));
            }
            match self.reverse_job(source, job) {
                Some(r) => {
                    if !unfenced {
                        r.ready().map_err(|e| FailoverError::NotReady(format!("job {job}: {e}")))?;
                    }
                    reverse.push((job.clone(), Some(r)));
                }
                None if unfenced => reverse.push((job.clone(), None)),
                None => {
                    return Err(FailoverError::NotReady(format!(
                        "job {job}: the source has not connected for failback: run `doppel protect --failback` on {source} and wait until it holds the replica"
                    )));
                }
            }
        }
        let mut p = earlier.unwrap_or_else(|| Progress {
            started_us: now_us(),
            cause: "manual".into(),
            ..Progress::default()
        });
        p.jobs.extend(jobs.iter().cloned());
        p.failed = None;
        let started = Instant::now();
        let mut run = Run { m: self, source, kind: "failback", path: path.clone(), p, steps: Vec::new() };
        run.save()?;
        self.events.record(run.event("failback-started").detail(format!("jobs {}", jobs.join(", "))));
        let fail = |e: FailoverError| {
            self.events.record(Event::new(source, "failback-failed").detail(e.to_string()));
            e
        };
        for job in &jobs {
            run.scripts("stop-workload", Some(job), &pol.stop_workload).await.map_err(fail)?;
        }
        let cutover = self.config.cutover_timeout;
        for (job, r) in &reverse {
            let Some(r) = r.clone() else { continue };
            if run.p.done.contains(&format!("unfence:{job}")) {
                continue;
            }
            run.step(None, "final-sync", Some(job), || async move {
                let t = Instant::now();
                r.drain(cutover).await.map_err(|e| e.to_string())?;
                let s = r.snapshot();
                Ok(format!(
                    "the source applied everything ({} bytes sent in all, last {} ms)",
                    s.bytes_sent,
                    t.elapsed().as_millis()
                ))
            })
            .await
            .map_err(fail)?;
        }
        // The addresses go when no job of the source stays on this side.
        let staying = all_failed_over.iter().any(|j| !jobs.contains(j));
        if let (Some(iface), false) = (&pol.interface, staying) {
            run.addresses(false, &pol.addresses, iface).await.map_err(fail)?;
        }
        for (job, r) in &reverse {
            let target = self.target.clone();
            let (s, j) = (source.to_string(), job.clone());
            run.step(Some(format!("unfence:{job}")), "unfence", Some(job), || async move {
                let e = target.with_replica(&s, &j, |r| r.unfence()).await?.map_err(|e| e.to_string())?;
                Ok(format!("epoch {e}: the source may write again"))
            })
            .await
            .map_err(fail)?;
            run.p.epochs.insert(job.clone(), self.replica_state(source, job).0);
            run.save()?;
            let target = self.target.clone();
            let (s, j) = (source.to_string(), job.clone());
            let r = r.clone();
            run.step(Some(format!("handover:{job}")), "handover", Some(job), || async move {
                let info = target.with_replica(&s, &j, |r| r.info()).await?;
                let Some(r) = r else {
                    return Ok("the failback stream is gone; the source resumes with a comparison".into());
                };
                r.hand_over(Message::FailbackDone {
                    epoch: info.epoch,
                    replica_id: info.replica_id,
                    applied_seq: info.applied,
                })
                .await
                .map_err(|e| e.to_string())?;
                Ok(format!("the source resumes protection at epoch {} after op {}", info.epoch, info.applied))
            })
            .await
            .map_err(fail)?;
        }
        // Done: the failback streams and the failover record of these jobs are history.
        for (job, r) in &reverse {
            if let Some(Err(e)) = r.as_ref().map(|r| r.forget()) {
                tracing::warn!(%source, %job, error = %e, "cannot remove the failback state");
            }
            self.reverse.lock().remove(&(source.to_string(), job.clone()));
        }
        let report = run.report(started, None);
        let remaining: Vec<String> =
            self.target.jobs_of(source).into_iter().filter(|j| self.replica_state(source, j).1).collect();
        let io = |path: &PathBuf| {
            let path = path.clone();
            move |source| FailoverError::Io { path, source }
        };
        if remaining.is_empty() {
            Progress::remove(&fo_path).map_err(io(&fo_path))?;
        } else if let Some(mut fo) = Progress::load(&fo_path).map_err(io(&fo_path))? {
            for job in &jobs {
                fo.jobs.remove(job);
                fo.done.retain(|k| {
                    !(k == &format!("fence:{job}") || k.starts_with(&format!("failover:{job}:")))
                });
            }
            fo.save(&fo_path).map_err(io(&fo_path))?;
        }
        Progress::remove(&path).map_err(io(&path))?;
        self.events.record(
            Event::new(source, "failback-done")
                .millis(report.millis)
                .detail(format!("jobs {} handed back; protection resumes from the source", jobs.join(", "))),
        );
        Ok(report)
    }
}

/// Makes the report of a run readable for a terminal.
pub fn render(r: &Report) -> String {
    let mut out = String::new();
    for s in &r.steps {
        let job = s.job.as_deref().map(|j| format!(" [{j}]")).unwrap_or_default();
        out.push_str(&format!(
            "  {:<16}{:<10} {:>7} ms  {}\n",
            format!("{}{job}", s.step),
            s.status,
            s.millis,
            s.detail
        ));
    }
    out.push_str(&format!("{} of {} completed in {} ms", r.kind, r.source, r.millis));
    if let Some(ms) = r.since_last_seen_ms {
        out.push_str(&format!(" ({ms} ms since the source was last heard from)"));
    }
    out
}
