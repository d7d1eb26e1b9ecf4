//! Wiring a job together, and taking it apart cleanly.

use std::fs;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use doppel_capture::fuse::{FuseCapture, FuseOptions};
use doppel_capture::open_watch;
use doppel_capture::vm::{VmCapture, VmOptions};
use doppel_fs::Selection;
use doppel_link::{Identity, RateLimiter};
use doppel_mirror::{Index, Reconciler};
use doppel_spool::Spool;
use doppel_target::{Layout, Target, TargetConfig, valid_name};
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::activity::ActivityLog;
use crate::bandwidth::Schedule;
use crate::capture_loop::{Capture, Source};
use crate::config::{CaptureMode, Destination, JobConfig};
use crate::connect::Connector;
use crate::error::{AgentError, RequestError, io_at};
use crate::fuse_sink::{FuseSink, MountGuard, VmGuard};
use crate::link_loop::{Link, VerifyRequest};
use crate::overflow::Overflow;
use crate::resume::{Left, LinkPlanner, Mode, StartPlan};
use crate::state::JobState;
use crate::status::{JobStatus, JobStatusSnapshot, Phase};

/// Where the message sent last when the job stops goes (a failback's handover).
pub type FinalMessage = Arc<Mutex<Option<doppel_proto::Message>>>;

/// A prepared job, ready to run.
pub struct Agent {
    job: JobConfig,
    spool: Arc<Spool>,
    status: Arc<JobStatus>,
    state: Arc<Mutex<JobState>>,
    state_path: PathBuf,
    capture: Option<Capture>,
    commands_tx: std::sync::mpsc::Sender<crate::capture_loop::Command>,
    connector: Option<Connector>,
    embedded: Option<Arc<Target>>,
    stop: Arc<AtomicBool>,
    planner: LinkPlanner,
    verify_tx: tokio::sync::mpsc::Sender<VerifyRequest>,
    verify_rx: Option<tokio::sync::mpsc::Receiver<VerifyRequest>>,
    limit: Limit,
    overflow: Arc<Overflow>,
    final_message: FinalMessage,
    _lock: OwnedFd,
    /// A lock on a local destination directory, held while the job runs.
    _dest_lock: Option<OwnedFd>,
}

/// The job's bandwidth limit: its schedule, and an override set at run time.
#[derive(Clone)]
pub struct Limit {
    limiter: Arc<RateLimiter>,
    schedule: Schedule,
    state: Arc<Mutex<JobState>>,
    state_path: PathBuf,
    status: Arc<JobStatus>,
}

impl Limit {
    /// Applies the override (from job state) or the schedule's rate for now.
    pub fn refresh(&self) {
        let rate = self.state.lock().rate_override.unwrap_or_else(|| self.schedule.rate_now());
        if rate != self.limiter.rate() {
            tracing::info!(rate = %doppel_link::ratelimit::format_rate(rate), "bandwidth limit");
        }
        self.limiter.set_rate(rate);
        self.status.rate_limit.store(rate, Ordering::Relaxed);
    }

    /// Overrides the schedule with `rate` (bytes per second, 0: unlimited), or goes back to it
    /// (`None`). Kept across restarts.
    pub fn set(&self, rate: Option<u64>) -> Result<(), AgentError> {
        {
            let mut st = self.state.lock();
            st.rate_override = rate;
            st.save(&self.state_path)?;
        }
        self.refresh();
        Ok(())
    }
}

/// The span every line about job `name` is logged in (a process may run several jobs).
fn job_span(name: &str) -> tracing::Span {
    tracing::info_span!("job", job = %name)
}

/// The formats of a job's directory (`state.json`, `index.redb`, the spool's segments and
/// `acked`, `activity.log`/`dirty.log`; the embedded target's state directory inside it has
/// its own stamp). Version 1: the first release's, with the whole-file `index.bin`; version 2:
/// the index in a redb store (a version 1 index is taken over by `open_index`, under the
/// job's lock). A release of format 1 refuses a directory of format 2, which it cannot read.
pub const JOB_FORMAT: doppel_fs::format::Format =
    doppel_fs::format::Format { kind: "doppel-job", current: 2, oldest: 1 };

/// `HOME/jobs/JOB`.
pub fn job_dir(home: &Path, job: &str) -> PathBuf {
    home.join("jobs").join(job)
}

fn canonical(p: &Path, what: &str) -> Result<PathBuf, AgentError> {
    fs::canonicalize(p).map_err(|e| AgentError::Config(format!("{what} {}: {e}", p.display())))
}

impl Agent {
    /// Checks the job, takes its lock, recovers its spool and index, and starts watching.
    pub fn new(job: JobConfig, home: &Path) -> Result<Agent, AgentError> {
        Agent::new_with(job, home, None)
    }

    /// [`Agent::new`] with connections from `connector` (for destinations that are not dialled,
    /// such as a failback's source).
    pub fn new_with(
        mut job: JobConfig,
        home: &Path,
        connector: Option<Connector>,
    ) -> Result<Agent, AgentError> {
        let _span = job_span(&job.name).entered();
        valid_name(&job.name).map_err(|e| AgentError::Config(format!("job name {e}")))?;
        if job.capture.sequences_writes() && !(job.include.is_empty() && job.exclude.is_empty()) {
            // The capture sequences every write it sees, renames across the rules' boundary
            // included: it cannot leave names out, so it must not pretend to.
            return Err(AgentError::Config(format!(
                "include and exclude rules are not supported with the {} capture (every write it \
                 sees is replicated): protect a directory that holds only what must be \
                 replicated, or use the watch capture",
                job.capture.name()
            )));
        }
        if job.capture == CaptureMode::Fuse {
            recover_stale_mount(&job.root)?;
        }
        if let CaptureMode::Vm(_) = &job.capture {
            // The job's tree is doppel's own directory of the disks' raw views.
            fs::create_dir_all(home).map_err(io_at(home))?;
            let views = canonical(home, "state directory")?.join("vm").join(&job.name);
            fs::create_dir_all(&views).map_err(io_at(&views))?;
            job.root = views;
        }
        job.root = canonical(&job.root, "protected directory")?;
        if !job.root.is_dir() {
            return Err(AgentError::Config(format!("{} is not a directory", job.root.display())));
        }
        fs::create_dir_all(home).map_err(io_at(home))?;
        let home = canonical(home, "state directory")?;
        if home.starts_with(&job.root) {
            return Err(AgentError::Config(format!(
                "the state directory {} is inside the protected tree {}; choose another --home",
                home.display(),
                job.root.display()
            )));
        }
        if let Destination::Local(dir) = &mut job.dest {
            // Judged before the directory is made: a refused destination inside the protected
            // tree must not be left there.
            let planned = doppel_fs::beneath::canonical_to_be(dir).map_err(io_at(dir))?;
            if planned.starts_with(&job.root) || job.root.starts_with(&planned) {
                return Err(AgentError::Config(format!(
                    "the destination {} and the protected tree {} must not contain one another",
                    planned.display(),
                    job.root.display()
                )));
            }
            fs::create_dir_all(&*dir).map_err(io_at(dir))?;
            *dir = canonical(dir, "destination")?;
        }
        let dir = job_dir(&home, &job.name);
        // Before the lock file: a directory holding nothing yet is new, not of format 1.
        JOB_FORMAT.take_over(&dir, |_| Ok(()))?;
        let lock = take_lock(&dir, &job.name)?;
        let stale = Index::remove_stale_scratch(&dir);
        if stale > 0 {
            tracing::info!(job = %job.name, stale, "removed throwaway indexes a killed agent left behind");
        }

        let state_path = dir.join("state.json");
        let mut state = JobState::load(&state_path)?;
        let dest_lock = match &job.dest {
            Destination::Local(replica) => Some(lock_destination(replica)?),
            _ => None,
        };
        let dest = job.dest.to_string();
        if state.dest != dest {
            if let Destination::Local(replica) = &job.dest
                && !job.seeded
                && holds_files(replica)?
            {
                return Err(AgentError::DestinationNotEmpty { dest: replica.clone() });
            }
            if !state.dest.is_empty() {
                set_aside_embedded_state(&dir, &state.dest)?;
            }
            state = JobState { dest, ..JobState::default() };
            // Claimed before anything is written there: a restart, even in the middle of the
            // first mirror, finds the directory is this job's replica.
            state.save(&state_path)?;
        }
        let (spool, recovery) = Spool::open(&dir.join("spool"), job.spool)?;
        if recovery.discarded_after_gap {
            tracing::warn!(job = %job.name, "ops that were only in memory died with the previous process; they will be found again");
        }
        let index_path = dir.join(INDEX_FILE);
        // A vm job keeps no index (see `Source::Vm` at stop): it always compares at start.
        let vm = matches!(job.capture, CaptureMode::Vm(_));
        let (mut index, saved) = open_index(&index_path, job.index_cache)?;
        let saved = saved.filter(|_| state.replica_id.is_some() && !vm);
        if saved.is_none() {
            state.replica_id = None;
            index.clear()?;
        }
        let previous = state.clone();
        state.clean = false;
        state.save(&state_path)?;

        let selection =
            Selection::new(&job.include, &job.exclude).map_err(|e| AgentError::Config(e.to_string()))?;
        let status = Arc::new(JobStatus::default());
        status.show_index(&index)?;
        status.set_state(Phase::Starting);
        status.sync.store(job.sync, Ordering::Relaxed);
        let spool = Arc::new(spool);
        let state = Arc::new(Mutex::new(state));
        let stop = Arc::new(AtomicBool::new(false));
        let (commands_tx, commands_rx) = std::sync::mpsc::channel();
        let overflow = status.overflow.clone();
        // The dirty set: in fuse mode the activity log; in watch mode the names recorded while
        // the spool was full. Whatever it holds at start must be compared with the replica.
        let dirty_path = dir.join(if job.capture.sequences_writes() { "activity.log" } else { "dirty.log" });
        let (dirty, left) = ActivityLog::open(&dirty_path).map_err(io_at(&dirty_path))?;
        let dirty = Arc::new(dirty);
        let plan = StartPlan::decide(Left::found(
            Mode::from(&job.capture),
            &previous,
            saved.map(|s| s.saved_at_us),
            left,
        ));
        let sink = || {
            Arc::new(FuseSink {
                spool: spool.clone(),
                activity: dirty.clone(),
                status: status.clone(),
                sync: job.sync,
                sync_timeout: job.sync_timeout,
                overflow: overflow.clone(),
            })
        };
        let (source, rec) = match &job.capture {
            CaptureMode::Watch(backend) => {
                let watch = open_watch(&job.root, *backend)
                    .map_err(|e| AgentError::Io { path: job.root.clone(), source: e })?;
                (Source::Watch(watch), Reconciler::new(&job.root, selection, index))
            }
            CaptureMode::Fuse => {
                let opts = FuseOptions { writeback: job.fuse_writeback, ..FuseOptions::default() };
                let mount = FuseCapture::mount(&job.root, sink(), opts)
                    .map_err(|e| AgentError::Io { path: job.root.clone(), source: e })?;
                let rec = Reconciler::new(&mount.underlying(), selection, index)
                    .with_guard(Arc::new(MountGuard(mount.locks())));
                (Source::Fuse(Some(mount)), rec)
            }
            CaptureMode::Vm(guest) => {
                let opts = VmOptions {
                    qmp: guest.qmp.clone(),
                    disks: guest.disks.clone(),
                    disks_dir: job.root.clone(),
                    socket: dir.join("nbd.sock"),
                    tag: format!("doppel-{}", job.name),
                    sync: job.sync,
                    qmp_timeout: std::time::Duration::from_secs(10),
                };
                let vm = VmCapture::attach(opts, sink()).map_err(|e| {
                    let hint = match e.kind() {
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                            " (is the guest running, with -qmp unix:PATH,server=on,wait=off?)"
                        }
                        _ => "",
                    };
                    AgentError::Config(format!("cannot attach to the guest: {e}{hint}"))
                })?;
                crate::vm_disks::record(&dir, &vm.disks())?;
                let guard = VmGuard { locks: vm.locks(), views: vm.views() };
                let rec = Reconciler::new(&job.root, selection, index).with_guard(Arc::new(guard));
                (Source::Vm(Some(vm)), rec)
            }
        };
        let planner = LinkPlanner::new(&plan);
        let capture = Capture {
            rec,
            spool: spool.clone(),
            source,
            dirty,
            overflow: overflow.clone(),
            index_path,
            state_path: state_path.clone(),
            state: state.clone(),
            status: status.clone(),
            stop: stop.clone(),
            commands: commands_rx,
            plan: plan.clone(),
            debounce: job.debounce,
            checkpoint_interval: job.checkpoint_interval,
        };
        let job_limiter = RateLimiter::new(0);
        let (connector, embedded) = match (&job.dest, connector) {
            (_, Some(c)) => (c.limited_by(job_limiter.clone()), None),
            (Destination::Failback { source }, None) => {
                return Err(AgentError::Config(format!("the failback of {source} needs its connections")));
            }
            (Destination::Local(replica), None) => {
                let layout = Layout::Embedded { replica: replica.clone(), state: dir.join(EMBEDDED_STATE) };
                let mut cfg = TargetConfig::new(layout);
                cfg.history = job.history;
                let target = Target::new(cfg);
                (Connector::Embedded(target.clone()), Some(target))
            }
            (Destination::Remote { addr, target_id }, None) => {
                let (me, created) = Identity::load_or_create(&home)?;
                if created {
                    tracing::info!(identity = %me.id, "created this node's identity");
                }
                let mut limiters = vec![job_limiter.clone()];
                limiters.extend(job.target_limiter.clone());
                (Connector::remote(addr, &me, *target_id, limiters)?, None)
            }
        };
        tracing::info!(
            job = %job.name,
            root = %job.root.display(),
            dest = %job.dest,
            capture = ?job.capture,
            sync = job.sync,
            resume = plan.describe(),
            "protecting"
        );
        let (verify_tx, verify_rx) = tokio::sync::mpsc::channel(4);
        let limit = Limit {
            limiter: job_limiter,
            schedule: job.bandwidth.clone(),
            state: state.clone(),
            state_path: state_path.clone(),
            status: status.clone(),
        };
        limit.refresh();
        Ok(Agent {
            final_message: Arc::default(),
            overflow,
            limit,
            verify_tx,
            verify_rx: Some(verify_rx),
            job,
            spool,
            status,
            state,
            state_path,
            capture: Some(capture),
            commands_tx,
            connector: Some(connector),
            embedded,
            stop,
            planner,
            _lock: lock,
            _dest_lock: dest_lock,
        })
    }

    /// The job's configuration (paths canonicalized).
    pub fn job(&self) -> &JobConfig {
        &self.job
    }

    /// A status snapshot.
    pub fn status(&self) -> JobStatusSnapshot {
        self.status.snapshot(
            &self.job.name,
            &self.job.root.to_string_lossy(),
            &self.job.dest.to_string(),
            &self.spool,
        )
    }

    /// Where to put the message sent last when the job stops (a failback's handover).
    pub fn final_message(&self) -> FinalMessage {
        self.final_message.clone()
    }

    /// A handle to make the job take in every change made so far.
    pub fn settler(&self) -> Settler {
        Settler(Mutex::new(self.commands_tx.clone()))
    }

    /// The job's bandwidth limit, to change it at run time.
    pub fn limit(&self) -> Limit {
        self.limit.clone()
    }

    /// A handle to put bookmarks into the job's op stream.
    pub fn bookmarker(&self) -> Bookmarker {
        Bookmarker {
            spool: self.spool.clone(),
            overflow: self.overflow.clone(),
            status: self.status.clone(),
            state: self.state.clone(),
            state_path: self.state_path.clone(),
        }
    }

    /// A handle to request verifications while the job runs.
    pub fn verifier(&self) -> Verifier {
        Verifier(self.verify_tx.clone())
    }

    /// Live status handle (for a status server that outlives `run`'s borrow).
    pub fn status_source(&self) -> StatusSource {
        StatusSource {
            embedded: self.embedded.clone(),
            status: self.status.clone(),
            spool: self.spool.clone(),
            job: self.job.name.clone(),
            root: self.job.root.to_string_lossy().into_owned(),
            dest: self.job.dest.to_string(),
        }
    }

    /// Runs until `shutdown` is cancelled (Ok) or the job cannot go on (Err).
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), AgentError> {
        let capture = self.capture.take().expect("run is called once");
        let span = job_span(&self.job.name);
        let capture_span = span.clone();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let thread = std::thread::Builder::new()
            .name(format!("capture-{}", self.job.name))
            .spawn(move || {
                let _span = capture_span.entered();
                let r = capture.run();
                let _ = done_tx.send(());
                r
            })
            .map_err(|e| AgentError::Io { path: self.job.root.clone(), source: e })?;
        let link_stop = CancellationToken::new();
        let link = Link {
            connector: self.connector.take().expect("run is called once"),
            job: self.job.name.clone(),
            spool: self.spool.clone(),
            state: self.state.clone(),
            status: self.status.clone(),
            commands: self.commands_tx.clone(),
            compression: self.job.compression,
            resends: self.status.resends.clone(),
            window: self.job.window,
            heartbeat: self.job.heartbeat,
            shutdown: link_stop.clone(),
            planner: self.planner,
            verify: self.verify_rx.take().expect("run is called once"),
            overflow: self.overflow.clone(),
            list_id: 0,
            final_message: self.final_message.clone(),
        };
        let mut link_task = tokio::spawn(link.run().instrument(span.clone()));
        let refresher = {
            let limit = self.limit.clone();
            tokio::spawn(
                async move {
                    loop {
                        tokio::time::sleep(std::time::Duration::from_secs(30)).await;
                        limit.refresh();
                    }
                }
                .instrument(span.clone()),
            )
        };
        let mut link_result = None;
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = done_rx => {}
            r = &mut link_task => link_result = Some(r),
        }
        // Stop capture first: it saves spool and index together when it can.
        self.stop.store(true, Ordering::Relaxed);
        let joined = tokio::task::spawn_blocking(move || thread.join()).await;
        let capture_result = match joined {
            Ok(Ok(r)) => r,
            _ => Err(AgentError::Config("the capture thread panicked".into())),
        };
        link_stop.cancel();
        let link_result = match link_result {
            Some(r) => r,
            None => link_task.await,
        };
        refresher.abort();
        self.spool.close();
        if let Some(t) = &self.embedded {
            t.shutdown.cancel();
        }
        let clean = matches!(capture_result, Ok(true));
        {
            let mut st = self.state.lock();
            st.clean = clean;
            if let Ok(Err(AgentError::Refused(doppel_proto::Refusal::Fenced { epoch }))) = &link_result {
                st.fenced = Some(*epoch);
            }
            st.save(&self.state_path)?;
        }
        self.status.set_state(Phase::Stopped);
        tracing::info!(job = %self.job.name, clean, "stopped");
        match (capture_result, link_result) {
            (Err(e), _) if !is_stopping(&e) => Err(e),
            (_, Ok(Err(e))) => Err(e),
            _ => Ok(()),
        }
    }
}

/// The file of a job's index store, in its directory.
pub const INDEX_FILE: &str = "index.redb";

/// Opens the job's index store, and what its last save recorded (`None` if nothing). An
/// unreadable store (a torn disk, a layout from elsewhere) is set aside with a warning and a
/// new one made: the job compares the whole tree with the replica as on first contact (only
/// differences travel). A damaged index never keeps the job from starting.
pub(crate) fn open_index(
    path: &Path,
    cache: usize,
) -> Result<(Index, Option<doppel_mirror::index::Saved>), AgentError> {
    let (mut index, saved) = match Index::open(path, cache) {
        Err(doppel_mirror::MirrorError::Index { reason, .. }) => {
            set_aside(path, &reason)?;
            (Index::open(path, cache)?.0, None)
        }
        r => r?,
    };
    // The whole-file index of job format 1: taken over once, then removed.
    let old = path.with_file_name("index.bin");
    if !old.exists() {
        return Ok((index, saved));
    }
    let imported = match index.import_whole_file(&old) {
        Ok(s) => s,
        Err(doppel_mirror::MirrorError::Index { reason, .. }) => {
            set_aside(&old, &reason)?;
            index.clear()?;
            None
        }
        Err(e) => return Err(e.into()),
    };
    if imported.is_some() {
        tracing::info!(from = %old.display(), to = %path.display(), entries = index.len()?, "index taken over from the earlier format");
        fs::remove_file(&old).map_err(io_at(&old))?;
    }
    Ok((index, imported.or(saved)))
}

/// Moves an unreadable index out of the way (kept for inspection), with a warning.
fn set_aside(path: &Path, reason: &str) -> Result<(), AgentError> {
    let mut aside = path.as_os_str().to_owned();
    aside.push(".unreadable");
    let aside = PathBuf::from(aside);
    fs::rename(path, &aside).map_err(io_at(path))?;
    tracing::warn!(
        index = %path.display(),
        kept_as = %aside.display(),
        %reason,
        "the index is unreadable: comparing the whole tree with the replica to rebuild it"
    );
    Ok(())
}

fn is_stopping(e: &AgentError) -> bool {
    matches!(e, AgentError::Mirror(doppel_mirror::MirrorError::Sink(_)))
}

/// Everything needed to report a job's status.
#[derive(Clone)]
pub struct StatusSource {
    embedded: Option<Arc<Target>>,
    status: Arc<JobStatus>,
    spool: Arc<Spool>,
    job: String,
    root: String,
    dest: String,
}

impl StatusSource {
    /// A snapshot.
    pub fn snapshot(&self) -> JobStatusSnapshot {
        let mut s = self.status.snapshot(&self.job, &self.root, &self.dest, &self.spool);
        s.history = self.embedded.as_ref().and_then(|t| t.status().into_iter().find_map(|r| r.history));
        s
    }
}

pub(crate) fn take_lock(dir: &Path, job: &str) -> Result<OwnedFd, AgentError> {
    let path = dir.join("lock");
    doppel_fs::lock::lock_exclusive(&path)
        .map_err(io_at(&path))?
        .ok_or_else(|| AgentError::Locked { job: job.to_string(), lock: path.clone() })
}

/// Locks a local destination directory for a running job, so that no other job (in this
/// process or another) mirrors into it at the same time: two would each delete what the
/// other's source has and its own lacks.
fn lock_destination(dir: &Path) -> Result<OwnedFd, AgentError> {
    doppel_fs::lock::lock_exclusive(dir)
        .map_err(io_at(dir))?
        .ok_or_else(|| AgentError::DestinationInUse { dest: dir.to_path_buf() })
}

/// The job directory's subdirectory where the embedded target of a local destination keeps
/// its replica's state and history.
pub const EMBEDDED_STATE: &str = "embedded-target";

/// Sets aside what the embedded target kept for the job's previous destination (its
/// replica's state and history): it describes that directory, and read as the new one's it
/// listed the old points and restored them from the wrong tree. Kept, not deleted: it is the
/// only history of the old replica, which is still there.
fn set_aside_embedded_state(dir: &Path, old_dest: &str) -> Result<(), AgentError> {
    let state = dir.join(EMBEDDED_STATE);
    if !state.exists() {
        return Ok(());
    }
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let aside = dir.join(format!("{EMBEDDED_STATE}.before-{secs}"));
    fs::rename(&state, &aside).map_err(io_at(&state))?;
    tracing::warn!(
        previous = old_dest,
        kept = %aside.display(),
        "the job's destination changed: the state and history of its previous replica are set aside"
    );
    Ok(())
}

/// Whether a directory holds anything besides a fresh file system's `lost+found`.
fn holds_files(dir: &Path) -> Result<bool, AgentError> {
    let mut entries = fs::read_dir(dir).map_err(io_at(dir))?;
    Ok(entries.any(|e| e.map_or(true, |e| e.file_name() != "lost+found")))
}

/// Requests verifications of a running job.
#[derive(Clone)]
pub struct Verifier(tokio::sync::mpsc::Sender<VerifyRequest>);

impl Verifier {
    /// Compares the replica with the source (after the replica caught up with everything
    /// captured so far) and, with `repair`, queues the fixes.
    pub async fn verify(&self, repair: bool) -> Result<doppel_mirror::VerifyReport, RequestError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.0.send(VerifyRequest { repair, reply: tx }).await.map_err(|_| RequestError::Stopping)?;
        rx.await.map_err(|_| RequestError::Stopping)?
    }
}

/// Puts named points into a running job's op stream (`doppel history bookmark`).
#[derive(Clone)]
pub struct Bookmarker {
    spool: Arc<Spool>,
    overflow: Arc<Overflow>,
    status: Arc<JobStatus>,
    state: Arc<Mutex<JobState>>,
    state_path: PathBuf,
}

/// Why a bookmark was not placed.
#[derive(Debug, thiserror::Error)]
pub enum BookmarkError {
    /// Changes are not all in the op stream now: a bookmark would not mark what it says.
    #[error(
        "the job is in overflow (changes are being re-compared, not streamed): a bookmark now would not mark a consistent point; try again once it replicates"
    )]
    Overflow,
    /// The job is not streaming changes.
    #[error("the job is {0}, not replicating: a bookmark now would not mark a consistent point")]
    NotReplicating(String),
    /// The job already has a bookmark of that name.
    #[error("the job already has a bookmark {0:?}: bookmark names are unique per job")]
    Duplicate(String),
    /// The job's state could not be saved.
    #[error("saving the job's bookmarks: {0}")]
    State(String),
    /// The spool refused it.
    #[error("the spool refused the bookmark: {0}")]
    Spool(String),
}

impl Bookmarker {
    /// Appends a bookmark after every change captured so far; returns its sequence.
    pub fn bookmark(&self, name: &str) -> Result<u64, BookmarkError> {
        if self.overflow.active() {
            return Err(BookmarkError::Overflow);
        }
        let phase = self.status.state();
        if phase != crate::status::Phase::Replicating {
            return Err(BookmarkError::NotReplicating(format!("{phase:?}").to_lowercase()));
        }
        {
            let mut st = self.state.lock();
            if !st.bookmarks.insert(name.to_string()) {
                return Err(BookmarkError::Duplicate(name.to_string()));
            }
            st.save(&self.state_path).map_err(|e| BookmarkError::State(e.to_string()))?;
        }
        let op = doppel_proto::Op::Point { kind: doppel_proto::PointKind::Bookmark(name.to_string()) };
        self.spool
            .append(op, doppel_target::registry::now_us(), doppel_spool::Placement::Spill, true)
            .map_err(|e| BookmarkError::Spool(e.to_string()))
    }
}

/// Detaches a doppel mount left at `root` by an agent that was killed, before anything else
/// touches the path (which answers `ENOTCONN` until then).
fn recover_stale_mount(root: &Path) -> Result<(), AgentError> {
    let parent = root.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let (Ok(parent), Some(name)) = (fs::canonicalize(parent), root.file_name()) else { return Ok(()) };
    let candidate = parent.join(name);
    match doppel_capture::fuse::recover_stale(&candidate) {
        Ok(doppel_capture::fuse::Existing::RecoveredStale) => {
            tracing::warn!(root = %candidate.display(), "detached a stale doppel mount left by an agent that did not stop cleanly");
            Ok(())
        }
        Ok(_) => Ok(()),
        Err(e) => Err(AgentError::Io { path: candidate, source: e }),
    }
}

/// Makes a running job queue every change made so far.
pub struct Settler(Mutex<std::sync::mpsc::Sender<crate::capture_loop::Command>>);

impl Settler {
    /// Returns once the ops of every change made before the call are queued.
    pub async fn settle(&self) -> Result<(), RequestError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.0
            .lock()
            .send(crate::capture_loop::Command::Settle { reply: tx })
            .map_err(|_| RequestError::Stopping)?;
        rx.await.map_err(|_| RequestError::Stopping)?
    }
}
