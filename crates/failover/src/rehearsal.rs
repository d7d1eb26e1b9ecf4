//! Test failover: each job's replica at a point, as a writable view, with the source's test
//! scripts run against it, while replication into the real replicas goes on.
//!
//! Views live under `DATA/tests/SOURCE/JOB/` (see [`crate::testview`]); `test.json` there
//! says which test runs. A test ends with `--end` (its end scripts run, then its views and
//! everything written in them go), when a real failover of the source starts, or when the
//! target stops: a target that stops cleanly ends its tests; one that was killed ends them
//! when it starts again (the end scripts run then). A view pins its point in the replica's
//! history, so retention never drops what it shows.

use std::path::{Path, PathBuf};

use doppel_apply::history::view::{PointView, summary};
use doppel_apply::history::when::{When, rfc3339, unfinished_resync};
use doppel_apply::history::{attic_of, dir_of};
use serde::{Deserialize, Serialize};

use crate::events::Event;
use crate::hooks::run_script;
use crate::manager::{FailoverError, Manager};
use crate::testview::{MountedView, detach_beneath};

/// A point, as reports show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointInfo {
    /// When it was current (RFC 3339; the capture time of its op).
    pub time: String,
    /// Its sequence.
    pub seq: u64,
    /// `op`, `fsync`, `bookmark`, `pre-resync`, `resynced`.
    pub kind: String,
}

/// One job of a test failover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestJob {
    /// The job.
    pub job: String,
    /// Where its view is mounted.
    pub view: PathBuf,
    /// The point it shows.
    pub point: PointInfo,
}

/// A test failover, as `doppel test-failover --json` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestReport {
    /// The source.
    pub source: String,
    /// Its jobs.
    pub jobs: Vec<TestJob>,
    /// When it started (µs since the epoch).
    pub started_us: u64,
}

/// A running test: its report and its mounts.
pub(crate) struct Rehearsal {
    report: TestReport,
    views: Vec<MountedView>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> FailoverError + '_ {
    move |source| FailoverError::Io { path: path.to_path_buf(), source }
}

impl Manager {
    /// Where the tests of `source` keep their views.
    pub fn tests_dir(&self, source: &str) -> PathBuf {
        self.config.data.join("tests").join(source)
    }

    /// The test failover of `source` running now, if any.
    pub fn running_test(&self, source: &str) -> Option<TestReport> {
        self.tests.lock().get(source).map(|r| r.report.clone())
    }

    /// Starts a test failover of `source` (all its jobs, or `jobs`) at `at` (default: the
    /// latest consistent point of each job).
    pub async fn test_failover(
        &self,
        source: &str,
        jobs: Option<Vec<String>>,
        at: Option<String>,
    ) -> Result<TestReport, FailoverError> {
        let lock = self.op_lock(source);
        let _g = lock.lock().await;
        if let Some(r) = self.running_test(source) {
            return Err(FailoverError::NotReady(format!(
                "a test failover of {source} is running (since {}): end it with `doppel test-failover {source} --end`",
                rfc3339(r.started_us)
            )));
        }
        let jobs = self.pick_jobs(source, jobs)?;
        let when = match &at {
            Some(a) => Some(
                When::parse(a, self.clock.now_us()).map_err(|e| FailoverError::NotReady(e.to_string()))?,
            ),
            None => None,
        };
        if when.as_ref().is_some_and(When::per_job) && jobs.len() != 1 {
            return Err(FailoverError::NotReady(format!(
                "--at {} names a point of one job: give exactly one --job",
                at.as_deref().unwrap_or_default()
            )));
        }
        let dir = self.tests_dir(source);
        let mut rehearsal = Rehearsal {
            report: TestReport {
                source: source.to_string(),
                jobs: Vec::new(),
                started_us: self.clock.now_us(),
            },
            views: Vec::new(),
        };
        let started = self.mount_views(source, &jobs, when.as_ref(), &dir, &mut rehearsal);
        let started = match started {
            Ok(()) => self.run_test_scripts(source, &rehearsal.report, false).await,
            Err(e) => Err(e),
        };
        if let Err(e) = started {
            drop(rehearsal);
            detach_beneath(&dir);
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        let report = rehearsal.report.clone();
        let body = serde_json::to_vec_pretty(&report).expect("a report serializes");
        std::fs::write(dir.join("test.json"), body).map_err(io_err(&dir))?;
        let points: Vec<String> = report
            .jobs
            .iter()
            .map(|j| format!("{} at seq:{} ({}, {})", j.job, j.point.seq, j.point.time, j.point.kind))
            .collect();
        self.events.record(
            Event::new(source, "test-failover-started").detail(format!("tested at {}", points.join("; "))),
        );
        self.tests.lock().insert(source.to_string(), rehearsal);
        Ok(report)
    }

    /// Opens and mounts each job's view at its point.
    fn mount_views(
        &self,
        source: &str,
        jobs: &[String],
        when: Option<&When>,
        dir: &Path,
        into: &mut Rehearsal,
    ) -> Result<(), FailoverError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        for job in jobs {
            let (root, state) = self.target.config.layout.paths(source, job);
            let hdir = dir_of(&state);
            let s = summary(&hdir, &attic_of(&root, &state)).map_err(io_err(&hdir))?;
            let newest = s.newest.map_or(0, |n| n.0);
            let point = match when {
                Some(w) => w.resolve(&s).map_err(|e| FailoverError::NotReady(format!("{job}: {e}")))?,
                None => match unfinished_resync(&s) {
                    Some((_, true)) => {
                        return Err(FailoverError::NotReady(format!(
                            "{job}: no consistent point yet: the first mirror of this replica has not finished"
                        )));
                    }
                    Some((p, false)) => p,
                    None => newest,
                },
            };
            let kind = s.points.iter().rev().find(|p| p.seq == point).map_or("op", |p| p.mark.kind());
            let time = s.time_of(point).map_or_else(|| "before the oldest op held".into(), rfc3339);
            let view = PointView::open(&root, &hdir, point, newest)
                .map_err(|e| FailoverError::NotReady(format!("{job}: {e}")))?;
            let jdir = dir.join(job);
            let mounted = MountedView::mount(view, &root, &jdir).map_err(io_err(&jdir))?;
            into.report.jobs.push(TestJob {
                job: job.clone(),
                view: mounted.view.clone(),
                point: PointInfo { time, seq: point, kind: kind.to_string() },
            });
            into.views.push(mounted);
        }
        Ok(())
    }

    /// Runs the `test_failover` scripts (or, with `end`, the `test_failover_end` ones) of
    /// each job of the test.
    async fn run_test_scripts(&self, source: &str, r: &TestReport, end: bool) -> Result<(), FailoverError> {
        let pol = self.policy(source)?;
        let (scripts, step) = if end {
            (&pol.test_failover_end, "test-failover-end")
        } else {
            (&pol.test_failover, "test-failover")
        };
        for j in &r.jobs {
            let env: Vec<(String, String)> = [
                ("DOPPEL_SOURCE", source.to_string()),
                ("DOPPEL_JOB", j.job.clone()),
                ("DOPPEL_STEP", step.to_string()),
                ("DOPPEL_REPLICA", j.view.display().to_string()),
                ("DOPPEL_TEST", "1".to_string()),
                ("DOPPEL_POINT", format!("seq:{}", j.point.seq)),
                ("DOPPEL_POINT_TIME", j.point.time.clone()),
                ("DOPPEL_DATA", self.config.data.display().to_string()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
            for s in scripts {
                run_script(s, &env, self.config.script_timeout).await.map_err(|e| FailoverError::Step {
                    step: format!("{step} ({})", j.job),
                    error: crate::runner::StepError::Hook(e),
                })?;
            }
        }
        Ok(())
    }

    /// Ends the test failover of `source`: its end scripts run, then its views and everything
    /// written in them go. `None`: no test was running.
    pub async fn end_test(&self, source: &str, why: &str) -> Result<Option<TestReport>, FailoverError> {
        let lock = self.op_lock(source);
        let _g = lock.lock().await;
        self.end_test_locked(source, why).await
    }

    /// [`Manager::end_test`] with the source's lock held.
    pub(crate) async fn end_test_locked(
        &self,
        source: &str,
        why: &str,
    ) -> Result<Option<TestReport>, FailoverError> {
        let running = self.tests.lock().remove(source);
        let dir = self.tests_dir(source);
        let report = match &running {
            Some(r) => Some(r.report.clone()),
            // Left by a target that was killed: its record says which views there were.
            None => std::fs::read(dir.join("test.json")).ok().and_then(|b| serde_json::from_slice(&b).ok()),
        };
        let Some(report) = report else {
            let _ = std::fs::remove_dir_all(&dir);
            return Ok(None);
        };
        let scripts = self.run_test_scripts(source, &report, true).await;
        // Unmounts its views (a killed target's are detached below).
        drop(running);
        detach_beneath(&dir);
        std::fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
        let mut detail = format!("{why}; views and everything written in them discarded");
        if let Err(e) = &scripts {
            detail.push_str(&format!("; an end script failed: {e}"));
        }
        self.events.record(Event::new(source, "test-failover-ended").detail(detail));
        Ok(Some(report))
    }

    /// Ends the tests a killed target left (at start), and every running test (at a clean
    /// stop).
    pub async fn end_all_tests(&self, why: &str) {
        let mut sources: Vec<String> = self.tests.lock().keys().cloned().collect();
        if let Ok(rd) = std::fs::read_dir(self.config.data.join("tests")) {
            sources.extend(rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()));
        }
        sources.sort();
        sources.dedup();
        for s in sources {
            if let Err(e) = self.end_test(&s, why).await {
                tracing::warn!(source = %s, error = %e, "could not end a test failover");
            }
        }
    }
}
