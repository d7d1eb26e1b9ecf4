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

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;

use doppel_proto::Message;
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use crate::hooks::{release_address, run_script, take_address};
use crate::manager::{FailoverError, Manager, RunKind};
use crate::progress::{FileStore, Progress, paths};
use crate::reverse::ReverseJob;
pub use crate::runner::StepReport;
use crate::runner::{
    Done, Executor, FailbackJob, ProgressStore, Runner, Stage, StepError, StepKey, Work, failback_plan,
    failover_plan,
};

/// What a failover or failback did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// The source.
    pub source: String,
    /// `failover` or `failback`.
    pub kind: RunKind,
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

/// Which point a failover takes its replicas to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PointChoice {
    /// `--at WHEN`; without it, the latest consistent point (the one before a resync that
    /// has not ended, else now).
    pub at: Option<String>,
    /// Fail over even when no consistent point exists yet (the first mirror is running).
    pub force: bool,
}

/// The steps' work, done on this target.
struct Live<'a> {
    m: &'a Manager,
    source: &'a str,
    /// The point to go back to.
    choice: PointChoice,
    /// `DOPPEL_JOBS`.
    jobs: String,
    /// The failback streams, per job.
    reverse: HashMap<String, Arc<ReverseJob>>,
}

impl Live<'_> {
    fn env(&self, job: Option<&str>, step: &str) -> Vec<(String, String)> {
        let mut env = vec![
            ("DOPPEL_SOURCE".to_string(), self.source.to_string()),
            ("DOPPEL_STEP".to_string(), step.to_string()),
            ("DOPPEL_JOBS".to_string(), self.jobs.clone()),
            ("DOPPEL_DATA".to_string(), self.m.config.data.display().to_string()),
        ];
        if let Some(j) = job {
            env.push(("DOPPEL_JOB".into(), j.to_string()));
            env.push(("DOPPEL_REPLICA".into(), self.m.replica_path(self.source, j).display().to_string()));
            env.push(("DOPPEL_EPOCH".into(), self.m.replica_state(self.source, j).0.to_string()));
        }
        env
    }

    /// Fences the job's replica, then takes it back to the point chosen (if not now). One
    /// step: a rollback cut short by a kill is finished by the next run, at the same point.
    async fn fence(&self, job: &str) -> Result<Done, StepError> {
        let (choice, now) = (self.choice.clone(), self.m.clock.now_us());
        let r = self
            .m
            .target
            .with_replica(self.source, job, move |r| -> Result<(u64, String), StepError> {
                // A point that cannot be used is refused before anything changes.
                choose_point(r, &choice, now)?;
                let epoch = r.fence()?;
                let applied = r.info().applied;
                let mut detail =
                    format!("epoch {epoch}; everything received is applied (up to op {applied})");
                if let Some((point, why)) = choose_point(r, &choice, now)? {
                    let undone = r.roll_back_to(point)?;
                    detail.push_str(&format!("; rolled back to seq:{point} ({why}): {undone} ops undone"));
                }
                Ok((epoch, detail))
            })
            .await;
        let (epoch, detail) = r.map_err(StepError::Replica)??;
        Ok(Done { detail, epoch: Some(epoch) })
    }

    async fn script(&self, stage: Stage, job: Option<&str>, script: &str) -> Result<Done, StepError> {
        let env = self.env(job, stage.as_str());
        run_script(script, &env, self.m.config.script_timeout).await?;
        Ok(Done::said(format!("`{script}` succeeded")))
    }

    async fn address(&self, take: bool, a: &str, i: &str) -> Result<Done, StepError> {
        let limit = self.m.config.script_timeout;
        let changed =
            if take { take_address(a, i, limit).await? } else { release_address(a, i, limit).await? };
        Ok(Done::said(match (take, changed) {
            (true, true) => format!("{a} added to {i}"),
            (true, false) => format!("{a} was already on {i}"),
            (false, true) => format!("{a} removed from {i}"),
            (false, false) => format!("{a} was not on {i}"),
        }))
    }

    async fn final_sync(&self, job: &str) -> Result<Done, StepError> {
        let Some(r) = self.reverse.get(job) else {
            return Ok(Done::said("no failback stream"));
        };
        let t = std::time::Instant::now();
        r.drain(self.m.config.cutover_timeout).await?;
        let s = r.snapshot();
        Ok(Done::said(format!(
            "the source applied everything ({} bytes sent in all, last {} ms)",
            s.bytes_sent,
            t.elapsed().as_millis()
        )))
    }

    async fn unfence(&self, job: &str) -> Result<Done, StepError> {
        let e = self
            .m
            .target
            .with_replica(self.source, job, |r| r.unfence())
            .await
            .map_err(StepError::Replica)??;
        Ok(Done { detail: format!("epoch {e}: the source may write again"), epoch: Some(e) })
    }

    async fn handover(&self, job: &str) -> Result<Done, StepError> {
        let info =
            self.m.target.with_replica(self.source, job, |r| r.info()).await.map_err(StepError::Replica)?;
        let Some(r) = self.reverse.get(job) else {
            return Ok(Done::said("the failback stream is gone; the source resumes with a comparison"));
        };
        r.hand_over(Message::FailbackDone {
            epoch: info.epoch,
            replica_id: info.replica_id,
            applied_seq: info.applied,
        })
        .await?;
        Ok(Done::said(format!(
            "the source resumes protection at epoch {} after op {}",
            info.epoch, info.applied
        )))
    }
}

/// The point a fenced replica goes back to, with why; `None`: it stays as it is.
fn choose_point(
    r: &doppel_apply::Replica,
    choice: &PointChoice,
    now_us: u64,
) -> Result<Option<(u64, String)>, StepError> {
    use doppel_apply::history::when::{When, rfc3339, unfinished_resync};
    let applied = r.info().applied;
    let Some(s) = r.history_summary()? else {
        return match &choice.at {
            Some(at) if at != "now" => {
                Err(StepError::Point(format!("--at {at}: the replica keeps no history (history = \"off\")")))
            }
            _ => Ok(None),
        };
    };
    if let Some(at) = &choice.at {
        let when = When::parse(at, now_us).map_err(|e| StepError::Point(e.to_string()))?;
        let point = when.resolve(&s).map_err(|e| StepError::Point(e.to_string()))?;
        let time = s.time_of(point).map_or_else(|| "the oldest point held".into(), rfc3339);
        return Ok((point < applied).then(|| (point, format!("--at {at}: {time}"))));
    }
    match unfinished_resync(&s) {
        Some((_, true)) if !choice.force => Err(StepError::Point(
            "no consistent point yet: the first mirror of this replica has not finished (the replica is partial); --force fails over to it as it is".into(),
        )),
        Some((_, true)) => Ok(None),
        Some((point, false)) => Ok((point < applied).then(|| (point, "the point before an unfinished resync".into()))),
        None => Ok(None),
    }
}

impl Executor for Live<'_> {
    async fn run(&self, work: &Work) -> Result<Done, StepError> {
        match work {
            Work::Fence { job } => self.fence(job).await,
            Work::Script { stage, job, script, .. } => self.script(*stage, job.as_deref(), script).await,
            Work::Address { addr, iface } => self.address(true, addr, iface).await,
            Work::Release { addr, iface } => self.address(false, addr, iface).await,
            Work::FinalSync { job } => self.final_sync(job).await,
            Work::Unfence { job } => self.unfence(job).await,
            Work::Handover { job } => self.handover(job).await,
        }
    }

    fn epoch(&self, job: &str) -> u64 {
        self.m.replica_state(self.source, job).0
    }
}

fn report<X, S, E, C: ?Sized>(
    run: &Runner<'_, X, S, E, C>,
    source: &str,
    kind: RunKind,
    millis: u64,
    since_last_seen_ms: Option<u64>,
) -> Report {
    Report {
        source: source.to_string(),
        kind,
        jobs: run.progress.jobs.iter().cloned().collect(),
        epochs: run.progress.epochs.clone(),
        steps: run.steps.clone(),
        millis,
        since_last_seen_ms,
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

    pub(crate) fn pick_jobs(
        &self,
        source: &str,
        jobs: Option<Vec<String>>,
    ) -> Result<Vec<String>, FailoverError> {
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
        self.failover_locked(source, jobs, cause, None, PointChoice::default()).await
    }

    /// [`Manager::failover`] to a chosen point (`doppel failover --at`).
    pub async fn failover_to(
        &self,
        source: &str,
        jobs: Option<Vec<String>>,
        cause: &str,
        choice: PointChoice,
    ) -> Result<Report, FailoverError> {
        self.failover_locked(source, jobs, cause, None, choice).await
    }

    pub(crate) async fn failover_locked(
        &self,
        source: &str,
        jobs: Option<Vec<String>>,
        cause: &str,
        last_seen_us: Option<u64>,
        choice: PointChoice,
    ) -> Result<Report, FailoverError> {
        self.exclusive(
            source,
            RunKind::Failover,
            self.run_failover(source, jobs, cause, last_seen_us, choice),
        )
        .await
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
        choice: PointChoice,
    ) -> Result<Report, FailoverError> {
        let jobs = self.pick_jobs(source, jobs)?;
        // A real failover ends a test of the source first.
        self.end_test_locked(source, "a real failover started").await?;
        if let Some(at) = &choice.at {
            let when = doppel_apply::history::when::When::parse(at, self.clock.now_us())
                .map_err(|e| FailoverError::NotReady(e.to_string()))?;
            if when.per_job() && jobs.len() != 1 {
                return Err(FailoverError::NotReady(format!(
                    "--at {at} names a point of one job: give exactly one --job"
                )));
            }
        }
        let pol = self.policy(source)?.clone();
        let store = FileStore(paths(&self.config.data, source).0);
        let p = store.load()?;
        let resumed = p.as_ref().is_some_and(|p| p.finished_us.is_none());
        let started = self.clock.now_us();
        let mut p = p.unwrap_or_else(|| Progress {
            started_us: started,
            cause: cause.to_string(),
            ..Progress::default()
        });
        if resumed
            && p.at != choice.at
            && (p.at.is_some() || choice.at.as_deref().is_some_and(|a| a != "now"))
        {
            return Err(FailoverError::NotReady(format!(
                "a failover of {source} to {} is under way: run it again with {}",
                p.at.as_deref().map_or("the latest consistent point".to_string(), |a| format!("--at {a}")),
                p.at.as_deref().map_or("no --at".to_string(), |a| format!("--at {a}")),
            )));
        }
        p.at.clone_from(&choice.at);
        p.jobs.extend(jobs.iter().cloned());
        p.finished_us = None;
        p.failed = None;
        let live =
            Live { m: self, source, choice: choice.clone(), jobs: joined(&p.jobs), reverse: HashMap::new() };
        let mut run = Runner::new(source, RunKind::Failover, (&live, &store, &self.events, &*self.clock), p);
        run.save()?;
        self.events.record(run.event("failover-started").detail(format!(
            "{cause}; jobs {}{}",
            jobs.join(", "),
            if resumed { " (continuing)" } else { "" }
        )));
        run.run(&failover_plan(&pol, &jobs)).await?;
        let end = self.clock.now_us();
        run.progress.finished_us = Some(end);
        run.save()?;
        let since = last_seen_us.map(|s| end.saturating_sub(s) / 1000);
        let report = report(&run, source, RunKind::Failover, end.saturating_sub(started) / 1000, since);
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
        let store = FileStore(path);
        let earlier = store.load()?;
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
        let mut reverse = HashMap::new();
        for job in &jobs {
            let unfenced = earlier.as_ref().is_some_and(|p| p.done.contains(&StepKey::Unfence(job.clone())));
            if !all_failed_over.contains(job) && !unfenced {
                return Err(FailoverError::NoReplica(format!("job {job} of {source} is not failed over")));
            }
            match self.reverse_job(source, job) {
                Some(r) => {
                    if !unfenced {
                        r.ready().map_err(|e| FailoverError::NotReady(format!("job {job}: {e}")))?;
                    }
                    reverse.insert(job.clone(), r);
                }
                None if unfenced => {}
                None => {
                    return Err(FailoverError::NotReady(format!(
                        "job {job}: the source has not connected for failback: run `doppel protect --failback` on {source} and wait until it holds the replica"
                    )));
                }
            }
        }
        let started = self.clock.now_us();
        let mut p = earlier.unwrap_or_else(|| Progress {
            started_us: started,
            cause: "manual".into(),
            ..Progress::default()
        });
        p.jobs.extend(jobs.iter().cloned());
        p.failed = None;
        // The addresses go when no job of the source stays on this side.
        let release = !all_failed_over.iter().any(|j| !jobs.contains(j));
        let plan_jobs: Vec<FailbackJob> =
            jobs.iter().map(|j| FailbackJob { job: j.clone(), streaming: reverse.contains_key(j) }).collect();
        let plan = failback_plan(&pol, &plan_jobs, &p, release);
        let live = Live { m: self, source, choice: PointChoice::default(), jobs: joined(&p.jobs), reverse };
        let mut run = Runner::new(source, RunKind::Failback, (&live, &store, &self.events, &*self.clock), p);
        run.save()?;
        self.events.record(run.event("failback-started").detail(format!("jobs {}", jobs.join(", "))));
        run.run(&plan).await?;
        // Done: the failback streams and the failover record of these jobs are history.
        for (job, r) in &live.reverse {
            if let Err(e) = r.forget() {
                tracing::warn!(%job, error = %e, "cannot remove the failback state");
            }
        }
        for job in &jobs {
            self.reverse.lock().remove(&(source.to_string(), job.clone()));
        }
        let report =
            report(&run, source, RunKind::Failback, self.clock.now_us().saturating_sub(started) / 1000, None);
        let remaining: Vec<String> =
            self.target.jobs_of(source).into_iter().filter(|j| self.replica_state(source, j).1).collect();
        let fo = FileStore(fo_path.clone());
        if remaining.is_empty() {
            Progress::remove(&fo_path).map_err(|e| FailoverError::Io { path: fo_path.clone(), source: e })?;
        } else if let Some(mut p) = fo.load()? {
            for job in &jobs {
                p.jobs.remove(job);
                p.done.retain(|k| !k.is_failover_of(job));
            }
            fo.save(&p)?;
        }
        Progress::remove(&store.0).map_err(|e| FailoverError::Io { path: store.0.clone(), source: e })?;
        self.events.record(
            run.event("failback-done")
                .millis(report.millis)
                .detail(format!("jobs {} handed back; protection resumes from the source", jobs.join(", "))),
        );
        Ok(report)
    }
}

fn joined(jobs: &std::collections::BTreeSet<String>) -> String {
    jobs.iter().cloned().collect::<Vec<_>>().join(" ")
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
