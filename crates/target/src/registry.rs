//! The replicas a target holds.
//!
//! Each replica has a slot. A session leases the slot's [`Replica`] for as long as it runs;
//! a new connection for the same replica (the source reconnected before the target noticed
//! the old connection die) cancels the old session and waits for it to hand the replica back,
//! so two sessions can never write to one replica.

use doppel_apply::unreplicated::UnreplicatedName;
use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use doppel_apply::quota::Account;
use doppel_apply::{ApplyError, Privilege, PrivilegePolicy, Replica};
use doppel_link::{ByteCounter, NodeId};
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::{AllowedSource, Layout, TargetConfig};

/// Memory one source's sessions share, in KiB permits: decoded batches waiting for their
/// workers, and listing messages waiting to be written.
pub struct SourceBudgets {
    /// Decoded batches.
    pub decode: Arc<tokio::sync::Semaphore>,
    /// Listing messages.
    pub listing: Arc<tokio::sync::Semaphore>,
}

impl SourceBudgets {
    fn new() -> SourceBudgets {
        let kib = |k: u32| Arc::new(tokio::sync::Semaphore::new(k as usize));
        SourceBudgets {
            decode: kib(crate::session::SOURCE_BUDGET_KIB),
            listing: kib(crate::session::LIST_BUDGET_KIB),
        }
    }
}

/// What a reload changed, by source name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reloaded {
    /// Newly allowed.
    pub added: Vec<String>,
    /// No longer allowed (their sessions were ended).
    pub removed: Vec<String>,
    /// Identity or privilege policy changed (their sessions were ended, to reconnect under it).
    pub restarted: Vec<String>,
    /// Limits changed (in effect at once, sessions kept).
    pub changed: Vec<String>,
}

enum Held {
    Closed,
    Open(Box<Replica>),
    Leased,
}

/// What a replica is doing. Shown in words by `doppel status` (and serialized as those
/// words, so `status --json` reads as it always did).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ReplicaState {
    /// No session since this target started (shown empty).
    #[default]
    Unseen,
    /// A session is connected and applying.
    Replicating,
    /// Applying waits for an error that may pass (a full disk): the op is retried every
    /// second. The text is the error.
    Paused(String),
    /// The source's agent stopped cleanly (it said goodbye).
    Stopped,
    /// The session ended without a goodbye.
    Disconnected,
}

impl fmt::Display for ReplicaState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplicaState::Unseen => Ok(()),
            ReplicaState::Replicating => f.write_str("replicating"),
            ReplicaState::Paused(reason) => write!(f, "paused: {reason}"),
            ReplicaState::Stopped => f.write_str("stopped"),
            ReplicaState::Disconnected => f.write_str("disconnected"),
        }
    }
}

/// A replica state word that is none of [`ReplicaState`]'s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown replica state {0:?}")]
pub struct UnknownState(pub String);

impl FromStr for ReplicaState {
    type Err = UnknownState;

    fn from_str(s: &str) -> Result<ReplicaState, UnknownState> {
        Ok(match s {
            "" => ReplicaState::Unseen,
            "replicating" => ReplicaState::Replicating,
            "stopped" => ReplicaState::Stopped,
            "disconnected" => ReplicaState::Disconnected,
            _ => match s.strip_prefix("paused: ") {
                Some(reason) => ReplicaState::Paused(reason.to_string()),
                None => return Err(UnknownState(s.to_string())),
            },
        })
    }
}

impl Serialize for ReplicaState {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ReplicaState {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<ReplicaState, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// Why a replica could not be leased.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// Opening the replica failed (its tree or state is unusable).
    #[error("cannot open replica: {0}")]
    Open(#[source] ApplyError),
    /// The session holding it did not hand it back before the deadline.
    #[error("the previous session did not release the replica in time")]
    NotReleased,
    /// The blocking task that opened or used the replica failed (panicked).
    #[error("replica task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Ops of one replica that its source's privilege policy stripped or refused, per privilege
/// (since the target started). Shown by `doppel status`, so a policy never acts silently.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrivilegeCounts {
    /// Set-id bits.
    pub setid: u64,
    /// Owners and ACLs.
    pub owners: u64,
    /// `security.*` and `trusted.*` attributes.
    pub capabilities: u64,
    /// Device nodes.
    pub devices: u64,
}

impl PrivilegeCounts {
    /// The count of `p`.
    pub fn get(&self, p: Privilege) -> u64 {
        match p {
            Privilege::SetId => self.setid,
            Privilege::Owners => self.owners,
            Privilege::Capabilities => self.capabilities,
            Privilege::Devices => self.devices,
        }
    }

    /// Whether nothing was counted.
    pub fn is_empty(&self) -> bool {
        Privilege::ALL.iter().all(|&p| self.get(p) == 0)
    }
}

/// Live [`PrivilegeCounts`].
#[derive(Default)]
pub struct PrivilegeCounters([AtomicU64; 4]);

impl PrivilegeCounters {
    /// Counts one op for `p`.
    pub fn add(&self, p: Privilege) {
        self.0[p as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// The counts now.
    pub fn snapshot(&self) -> PrivilegeCounts {
        let n = |p: Privilege| self.0[p as usize].load(Ordering::Relaxed);
        PrivilegeCounts {
            setid: n(Privilege::SetId),
            owners: n(Privilege::Owners),
            capabilities: n(Privilege::Capabilities),
            devices: n(Privilege::Devices),
        }
    }
}

/// A status snapshot of one replica, for `doppel status` and the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    /// Source name.
    pub source: String,
    /// Job name.
    pub job: String,
    /// Whether a session is connected.
    pub connected: bool,
    /// What the replica is doing.
    pub state: ReplicaState,
    /// Last applied sequence.
    pub applied: u64,
    /// Last durable (acknowledged) sequence.
    pub durable: u64,
    /// Bytes received on the link (all sessions since the target started).
    pub bytes_received: u64,
    /// Ops refused (hostile or impossible).
    pub refused: u64,
    /// Seconds since the source was last heard from.
    pub last_seen_secs: Option<u64>,
    /// When the last op was applied, seconds since the epoch (`None`: none since the target
    /// started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_applied_unix: Option<f64>,
    /// How long the last op applied took from its capture on the source to its apply here, in
    /// seconds: the replication lag as the target sees it (the two clocks' skew included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apply_lag_seconds: Option<f64>,
    /// The replica's epoch.
    pub epoch: u64,
    /// The workload failed over to this replica.
    pub failed_over: bool,
    /// Connections of the fenced source refused since the target started.
    pub fenced_refusals: u64,
    /// Ops applied without a privileged part, per privilege (an op may count for several).
    #[serde(default)]
    pub stripped: PrivilegeCounts,
    /// Ops refused by the privilege policy, per privilege (also counted in `refused`).
    #[serde(default)]
    pub policy_refused: PrivilegeCounts,
    /// The source's use of this target against its quota (all its replicas together), when a
    /// quota is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<QuotaUse>,
    /// Its point-in-time history (`None`: kept off, or not opened since the target started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<doppel_apply::history::HistoryStatus>,
    /// Names the source has that the replica does not (refused: a device node the policy
    /// refuses, say), the first [`UNREPLICATED_SHOWN`] of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unreplicated: Vec<UnreplicatedName>,
    /// How many such names in all.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unreplicated_count: u64,
}

/// Unreplicated names a status shows.
pub const UNREPLICATED_SHOWN: usize = 20;

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl ReplicaStatus {
    /// Whether the replica's source is over its quota, in words: applying waits for room, or
    /// the use reached the quota.
    pub fn over_quota(&self) -> Option<String> {
        match &self.state {
            ReplicaState::Paused(why) if why.contains("over quota") => Some(why.clone()),
            _ => self.quota.as_ref()?.reached(),
        }
    }
}

/// A source's use against its quota.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaUse {
    /// Allocated bytes of all its replicas (`None` until counted).
    pub used_bytes: Option<u64>,
    /// Inodes of all its replicas (`None` until counted).
    pub used_files: Option<u64>,
    /// `quota_bytes`.
    pub quota_bytes: Option<u64>,
    /// `quota_files`.
    pub quota_files: Option<u64>,
}

impl QuotaUse {
    /// Whether the quota is reached (the source's writes are refused), in words.
    pub fn reached(&self) -> Option<String> {
        let full =
            |used: Option<u64>, limit: Option<u64>| matches!((used, limit), (Some(u), Some(l)) if u >= l);
        if full(self.used_bytes, self.quota_bytes) {
            return Some(format!(
                "{} used of a quota of {}",
                crate::iec(self.used_bytes.unwrap_or(0)),
                crate::iec(self.quota_bytes.unwrap_or(0))
            ));
        }
        full(self.used_files, self.quota_files).then(|| {
            format!(
                "{} files used of a quota of {}",
                self.used_files.unwrap_or(0),
                self.quota_files.unwrap_or(0)
            )
        })
    }
}

/// Shared, lock-free-ish counters of one replica.
#[derive(Default)]
pub struct SlotStatus {
    /// See [`ReplicaStatus::connected`].
    pub connected: AtomicBool,
    /// See [`ReplicaStatus::applied`].
    pub applied: AtomicU64,
    /// See [`ReplicaStatus::durable`].
    pub durable: AtomicU64,
    /// See [`ReplicaStatus::bytes_received`].
    pub bytes_received: ByteCounter,
    /// See [`ReplicaStatus::refused`].
    pub refused: AtomicU64,
    /// Last time the source was heard from, µs since the epoch.
    pub last_seen_us: AtomicU64,
    /// When the last batch was applied, µs since the epoch (0: none since start).
    pub applied_at_us: AtomicU64,
    /// The source's capture time of the last op applied, µs since the epoch.
    pub applied_op_time_us: AtomicU64,
    /// See [`ReplicaStatus::state`].
    pub state: Mutex<ReplicaState>,
    /// See [`ReplicaStatus::epoch`].
    pub epoch: AtomicU64,
    /// See [`ReplicaStatus::failed_over`].
    pub failed_over: AtomicBool,
    /// See [`ReplicaStatus::fenced_refusals`].
    pub fenced_refusals: AtomicU64,
    /// The source said goodbye (a clean stop) on the last session.
    pub goodbye: AtomicBool,
    /// See [`ReplicaStatus::stripped`].
    pub stripped: PrivilegeCounters,
    /// See [`ReplicaStatus::policy_refused`].
    pub policy_refused: PrivilegeCounters,
    /// See [`ReplicaStatus::history`] (updated after each commit).
    pub history: Mutex<Option<doppel_apply::history::HistoryStatus>>,
    /// See [`ReplicaStatus::unreplicated`] and its count (updated after each batch).
    pub unreplicated: Mutex<(Vec<UnreplicatedName>, u64)>,
}

impl SlotStatus {
    /// Sets the state.
    pub fn set_state(&self, s: ReplicaState) {
        *self.state.lock() = s;
    }

    /// A session started on a replica that applied (and made durable) up to `applied`.
    pub fn connected_at(&self, applied: u64) {
        self.goodbye.store(false, Ordering::Relaxed);
        self.connected.store(true, Ordering::Relaxed);
        self.applied.store(applied, Ordering::Relaxed);
        self.durable.store(applied, Ordering::Relaxed);
        self.set_state(ReplicaState::Replicating);
        self.seen();
    }

    /// Records that ops up to `applied` were applied now, the last of them captured at
    /// `op_time_us` on the source.
    pub fn applied_now(&self, applied: u64, op_time_us: u64) {
        self.applied.store(applied, Ordering::Relaxed);
        self.applied_op_time_us.store(op_time_us, Ordering::Relaxed);
        self.applied_at_us.store(now_us(), Ordering::Relaxed);
    }

    /// Records that the source was heard from now.
    pub fn seen(&self) {
        self.last_seen_us.store(now_us(), Ordering::Relaxed);
    }
}

pub use doppel_link::framed::now_us;

/// In a replica's state directory: its source's agent stopped cleanly.
const STOPPED_MARKER: &str = "source-stopped";

/// One replica's slot.
pub struct Slot {
    /// Source name.
    pub source: String,
    /// Job name.
    pub job: String,
    held: Mutex<Held>,
    returned: Notify,
    session: Mutex<Option<CancellationToken>>,
    /// Counters.
    pub status: SlotStatus,
}

/// A leased replica: give it back with [`Slot::give_back`].
pub struct Lease {
    /// The replica.
    pub replica: Replica,
    /// Cancelled when another session takes over or the target shuts down.
    pub cancel: CancellationToken,
}

impl Slot {
    /// Takes the replica for a new session, cancelling any session holding it and waiting
    /// (up to `wait`) for it to be handed back; opens it on first use.
    pub async fn lease(&self, target: &Target, wait: Duration) -> Result<Lease, LeaseError> {
        let cancel = target.shutdown.child_token();
        if let Some(old) = self.session.lock().replace(cancel.clone()) {
            old.cancel();
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.returned.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let taken = {
                let mut h = self.held.lock();
                match std::mem::replace(&mut *h, Held::Leased) {
                    Held::Open(r) => Some(Ok(*r)),
                    Held::Closed => Some(Err(())),
                    Held::Leased => None,
                }
            };
            match taken {
                Some(Ok(mut replica)) => {
                    // A reload may have changed the policies since the replica was opened.
                    replica.set_privileges(target.privileges_of(&self.source));
                    let history = target.history_of(&self.source);
                    let replica = tokio::task::spawn_blocking(move || {
                        let set = replica.set_history(history);
                        (replica, set)
                    })
                    .await?;
                    if let (_, Err(e)) = &replica {
                        tracing::warn!(source = %self.source, job = %self.job, error = %e, "could not change the replica's history");
                    }
                    let replica = replica.0;
                    return Ok(Lease { replica, cancel });
                }
                Some(Err(())) => {
                    let (tree, state) = target.config.layout.paths(&self.source, &self.job);
                    let privileges = target.privileges_of(&self.source);
                    let account = target.account(&self.source);
                    let history = target.history_of(&self.source);
                    let lanes = target.config.apply_threads;
                    let selection = target.config.selection.clone();
                    let opened = tokio::task::spawn_blocking(move || {
                        let mut r = Replica::open_with_history(&tree, &state, history)?;
                        if let Some(n) = lanes {
                            r.set_lanes(n);
                        }
                        r.set_selection(selection);
                        r.set_privileges(privileges);
                        r.set_account(account);
                        Ok(r)
                    })
                    .await?;
                    match opened {
                        Ok(replica) => return Ok(Lease { replica, cancel }),
                        Err(e) => {
                            *self.held.lock() = Held::Closed;
                            return Err(LeaseError::Open(e));
                        }
                    }
                }
                None => {
                    if tokio::time::timeout_at(deadline, notified).await.is_err() {
                        return Err(LeaseError::NotReleased);
                    }
                }
            }
        }
    }

    /// Hands a replica back after its session ended.
    pub fn give_back(&self, replica: Replica) {
        *self.held.lock() = Held::Open(Box::new(replica));
        self.returned.notify_waiters();
    }

    /// Drops a failed lease (the replica is reopened on next use).
    pub fn abandon(&self) {
        *self.held.lock() = Held::Closed;
        self.returned.notify_waiters();
    }

    /// A status snapshot.
    pub fn snapshot(&self) -> ReplicaStatus {
        let s = &self.status;
        let seen = s.last_seen_us.load(Ordering::Relaxed);
        // One lock: two in one expression would hold the first while taking the second.
        let (unreplicated, unreplicated_count) = s.unreplicated.lock().clone();
        let (at, op_time) =
            (s.applied_at_us.load(Ordering::Relaxed), s.applied_op_time_us.load(Ordering::Relaxed));
        ReplicaStatus {
            source: self.source.clone(),
            job: self.job.clone(),
            connected: s.connected.load(Ordering::Relaxed),
            state: s.state.lock().clone(),
            applied: s.applied.load(Ordering::Relaxed),
            durable: s.durable.load(Ordering::Relaxed),
            bytes_received: s.bytes_received.get(),
            refused: s.refused.load(Ordering::Relaxed),
            last_seen_secs: (seen > 0).then(|| now_us().saturating_sub(seen) / 1_000_000),
            last_applied_unix: (at > 0).then(|| at as f64 / 1e6),
            apply_lag_seconds: (at > 0 && op_time > 0).then(|| at.saturating_sub(op_time) as f64 / 1e6),
            epoch: s.epoch.load(Ordering::Relaxed),
            failed_over: s.failed_over.load(Ordering::Relaxed),
            fenced_refusals: s.fenced_refusals.load(Ordering::Relaxed),
            stripped: s.stripped.snapshot(),
            policy_refused: s.policy_refused.snapshot(),
            quota: None,
            history: *s.history.lock(),
            unreplicated,
            unreplicated_count,
        }
    }
}

/// A target: its configuration and replicas.
pub struct Target {
    /// Configuration (its `allowed` list is moved into [`Target::allowed`] at start).
    pub config: TargetConfig,
    allowed: RwLock<Arc<Vec<AllowedSource>>>,
    accounts: Mutex<HashMap<String, Arc<Account>>>,
    /// Decoded batches waiting for a worker, all sources together (see
    /// [`crate::session::Budget`]).
    decoded: Arc<tokio::sync::Semaphore>,
    budgets: Mutex<HashMap<String, Arc<SourceBudgets>>>,
    slots: Mutex<HashMap<(String, String), Arc<Slot>>>,
    /// Cancelled to stop every session.
    pub shutdown: CancellationToken,
    failback: Mutex<Option<Arc<dyn crate::session::FailbackHandler>>>,
}

impl Target {
    /// A target with no replicas open yet.
    pub fn new(mut config: TargetConfig) -> Arc<Target> {
        let allowed = std::mem::take(&mut config.allowed);
        Arc::new(Target {
            config,
            allowed: RwLock::new(Arc::new(allowed)),
            accounts: Mutex::default(),
            decoded: Arc::new(tokio::sync::Semaphore::new(crate::session::TARGET_BUDGET_KIB as usize)),
            budgets: Mutex::default(),
            slots: Mutex::default(),
            shutdown: CancellationToken::new(),
            failback: Mutex::new(None),
        })
    }

    /// The sources allowed now.
    pub fn allowed(&self) -> Arc<Vec<AllowedSource>> {
        self.allowed.read().clone()
    }

    /// The allow entry of `source`, if it is allowed now.
    pub fn source(&self, source: &str) -> Option<AllowedSource> {
        self.allowed.read().iter().find(|a| a.name == source).cloned()
    }

    /// The name of an allowed identity.
    pub fn name_of(&self, id: &NodeId) -> Option<String> {
        self.allowed.read().iter().find(|a| a.id == *id).map(|a| a.name.clone())
    }

    /// The privilege policy of `source`: its allow entry's, or the default (an embedded
    /// target, which has no allow list, keeps what every target did before policies).
    pub fn privileges_of(&self, source: &str) -> PrivilegePolicy {
        self.source(source).map(|a| a.privileges).unwrap_or_default()
    }

    /// How much history the replicas of `source` keep.
    pub fn history_of(&self, source: &str) -> crate::config::HistoryPolicy {
        self.source(source).and_then(|a| a.history).unwrap_or(self.config.history)
    }

    /// The quota account of `source`, shared by all its replicas.
    pub fn account(&self, source: &str) -> Arc<Account> {
        let limits = self.source(source).map(|a| a.limits.quota).unwrap_or_default();
        let mut accounts = self.accounts.lock();
        accounts
            .entry(source.to_string())
            .or_insert_with(|| {
                // The replicas and their history (journals and attics, with the small state
                // files beside them) count against the quota.
                let roots = match &self.config.layout {
                    Layout::DataDir(d) => vec![d.join("replicas").join(source), d.join("state").join(source)],
                    Layout::Embedded { replica, state } => {
                        let attic = doppel_apply::history::attic_of(replica, state);
                        let mut roots = vec![replica.clone(), state.clone()];
                        if !attic.starts_with(state) {
                            roots.push(attic);
                        }
                        roots
                    }
                };
                Arc::new(Account::new(roots, limits))
            })
            .clone()
    }

    /// The decode budget of the whole target; see [`crate::session::Budget`].
    pub fn decode_budget(&self) -> Arc<tokio::sync::Semaphore> {
        self.decoded.clone()
    }

    /// The budgets shared by `source`'s sessions.
    pub fn source_budgets(&self, source: &str) -> Arc<SourceBudgets> {
        self.budgets
            .lock()
            .entry(source.to_string())
            .or_insert_with(|| Arc::new(SourceBudgets::new()))
            .clone()
    }

    /// Replaces the allowed sources (a configuration reload). Limits take effect at once (a
    /// replica paused over quota resumes at its next retry); a source removed, or whose
    /// identity or privilege policy changed, has its sessions ended, so it reconnects under
    /// the new entry or not at all. Other sources' sessions go on untouched.
    pub fn reload(&self, allowed: Vec<AllowedSource>) -> Reloaded {
        let old = std::mem::replace(&mut *self.allowed.write(), Arc::new(allowed.clone()));
        let mut r = Reloaded::default();
        for a in &allowed {
            match old.iter().find(|o| o.name == a.name) {
                None => r.added.push(a.name.clone()),
                Some(o) if o.id != a.id || o.privileges != a.privileges => r.restarted.push(a.name.clone()),
                Some(o) if o != a => r.changed.push(a.name.clone()),
                Some(_) => {}
            }
            if let Some(acc) = self.accounts.lock().get(&a.name) {
                acc.set_limits(a.limits.quota);
            }
        }
        r.removed = old
            .iter()
            .filter(|o| !allowed.iter().any(|a| a.name == o.name))
            .map(|o| o.name.clone())
            .collect();
        for name in r.removed.iter().chain(&r.restarted) {
            self.end_sessions(name);
        }
        r
    }

    /// Ends every session of `source`.
    fn end_sessions(&self, source: &str) {
        let slots: Vec<Arc<Slot>> =
            self.slots.lock().iter().filter(|((s, _), _)| s == source).map(|(_, s)| s.clone()).collect();
        for slot in slots {
            if let Some(t) = slot.session.lock().as_ref() {
                t.cancel();
            }
        }
    }

    /// The slot of `job` from `source` if the source has it already or has fewer than `max`
    /// jobs (on disk or connecting now: counted under one lock, so jobs opened all at once
    /// cannot slip past the limit together); otherwise the number of jobs it has.
    pub fn slot_within(&self, source: &str, job: &str, max: Option<u32>) -> Result<Arc<Slot>, usize> {
        let Some(max) = max else { return Ok(self.slot(source, job)) };
        let on_disk = self.jobs_of(source);
        let mut slots = self.slots.lock();
        let mut jobs: std::collections::BTreeSet<&str> = on_disk.iter().map(String::as_str).collect();
        jobs.extend(slots.keys().filter(|(s, _)| s == source).map(|(_, j)| j.as_str()));
        if !jobs.contains(job) && jobs.len() >= max as usize {
            return Err(jobs.len());
        }
        Ok(Self::slot_in(&mut slots, source, job))
    }

    /// The slot of `job` from `source`.
    pub fn slot(&self, source: &str, job: &str) -> Arc<Slot> {
        Self::slot_in(&mut self.slots.lock(), source, job)
    }

    fn slot_in(slots: &mut HashMap<(String, String), Arc<Slot>>, source: &str, job: &str) -> Arc<Slot> {
        slots
            .entry((source.to_string(), job.to_string()))
            .or_insert_with(|| {
                Arc::new(Slot {
                    source: source.to_string(),
                    job: job.to_string(),
                    held: Mutex::new(Held::Closed),
                    returned: Notify::new(),
                    session: Mutex::new(None),
                    status: SlotStatus::default(),
                })
            })
            .clone()
    }

    /// Installs the handler of failback connections.
    pub fn set_failback_handler(&self, h: Arc<dyn crate::session::FailbackHandler>) {
        *self.failback.lock() = Some(h);
    }

    /// The handler of failback connections, if any.
    pub fn failback_handler(&self) -> Option<Arc<dyn crate::session::FailbackHandler>> {
        self.failback.lock().clone()
    }

    /// When `source` was last heard from on any of its jobs, in microseconds since the epoch
    /// (0: not since this target started). What the failover monitor watches.
    pub fn last_seen_us(&self, source: &str) -> u64 {
        let slots = self.slots.lock();
        slots
            .iter()
            .filter(|((s, _), _)| s == source)
            .map(|(_, slot)| slot.status.last_seen_us.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0)
    }

    /// Records whether `job` of `source` was stopped cleanly by its agent (it said goodbye),
    /// durably, so that a monitor does not take a planned stop for a failure, even after this
    /// target restarts.
    pub fn mark_stopped(&self, source: &str, job: &str, stopped: bool) {
        let (_, state) = self.config.layout.paths(source, job);
        let marker = state.join(STOPPED_MARKER);
        let r = if stopped {
            std::fs::write(&marker, b"the source's agent stopped cleanly\n")
        } else {
            match std::fs::remove_file(&marker) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        };
        if let Err(e) = r {
            tracing::warn!(%source, %job, error = %e, path = %marker.display(), "cannot record the clean stop");
        }
    }

    /// Whether every job of `source` was stopped cleanly by its agent and has not reconnected.
    pub fn source_stopped(&self, source: &str) -> bool {
        let jobs = self.jobs_of(source);
        !jobs.is_empty()
            && jobs.iter().all(|j| self.config.layout.paths(source, j).1.join(STOPPED_MARKER).exists())
    }

    /// Records that a fenced source tried to replicate.
    pub fn note_fenced(&self, source: &str, job: &str) {
        self.slot(source, job).status.fenced_refusals.fetch_add(1, Ordering::Relaxed);
    }

    /// The durable fencing state of `job` of `source` (its epoch, whether it failed over, its
    /// applied sequence), as its checkpoint holds it; `None` for a replica never written.
    ///
    /// The one reader of that state for everything but the session holding the replica (which
    /// sees it through `Replica::info`): status, the monitor and the failover steps ask here, so
    /// where the state lives can change in one place.
    pub fn checkpoint(
        &self,
        source: &str,
        job: &str,
    ) -> Result<Option<doppel_apply::state::Checkpoint>, ApplyError> {
        doppel_apply::state::read_checkpoint(&self.config.layout.paths(source, job).1)
    }

    /// The jobs this target holds for `source` (found on disk).
    pub fn jobs_of(&self, source: &str) -> Vec<String> {
        let mut jobs: Vec<String> = match &self.config.layout {
            crate::config::Layout::DataDir(d) => std::fs::read_dir(d.join("state").join(source))
                .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
                .unwrap_or_default(),
            crate::config::Layout::Embedded { .. } => Vec::new(),
        };
        jobs.sort();
        jobs
    }

    /// Runs `f` on the replica of `job` from `source` with no session using it (a running one
    /// is ended first and its worker finishes applying what it received).
    pub async fn with_replica<R: Send + 'static>(
        &self,
        source: &str,
        job: &str,
        f: impl FnOnce(&mut Replica) -> R + Send + 'static,
    ) -> Result<R, LeaseError> {
        let slot = self.slot(source, job);
        let lease = slot.lease(self, Duration::from_secs(60)).await?;
        let mut replica = lease.replica;
        let (replica, r) = tokio::task::spawn_blocking(move || {
            let r = f(&mut replica);
            (replica, r)
        })
        .await?;
        let info = replica.info();
        slot.status.epoch.store(info.epoch, Ordering::Relaxed);
        slot.status.failed_over.store(info.failed_over, Ordering::Relaxed);
        slot.give_back(replica);
        Ok(r)
    }

    /// Status of every replica seen since start, plus replicas found on disk.
    pub fn status(&self) -> Vec<ReplicaStatus> {
        if let crate::config::Layout::DataDir(d) = &self.config.layout {
            // Replicas not connected since start still deserve a line.
            if let Ok(sources) = std::fs::read_dir(d.join("state")) {
                for s in sources.flatten() {
                    if let Ok(jobs) = std::fs::read_dir(s.path()) {
                        for j in jobs.flatten() {
                            let (src, job) = (
                                s.file_name().to_string_lossy().into_owned(),
                                j.file_name().to_string_lossy().into_owned(),
                            );
                            let slot = self.slot(&src, &job);
                            if slot.status.epoch.load(Ordering::Relaxed) == 0
                                && let Ok(Some(c)) = self.checkpoint(&src, &job)
                            {
                                slot.status.durable.fetch_max(c.applied, Ordering::Relaxed);
                                slot.status.applied.fetch_max(c.applied, Ordering::Relaxed);
                                slot.status.epoch.store(c.epoch, Ordering::Relaxed);
                                slot.status.failed_over.store(c.failed_over, Ordering::Relaxed);
                            }
                        }
                    }
                }
            }
        }
        let mut v: Vec<ReplicaStatus> = self.slots.lock().values().map(|s| s.snapshot()).collect();
        v.sort_by(|a, b| (&a.source, &a.job).cmp(&(&b.source, &b.job)));
        for r in &mut v {
            r.quota = self.quota_use(&r.source);
        }
        v
    }

    /// Whether `source` is over its quota, in words (`None`: it is not, or has none).
    pub fn over_quota(&self, source: &str) -> Option<String> {
        // The use is the source's: counted once, not once per replica.
        let quota = self.quota_use(source);
        self.jobs_of(source)
            .iter()
            .map(|j| ReplicaStatus { quota, ..self.slot(source, j).snapshot() })
            .find_map(|r| r.over_quota())
    }

    /// `source`'s use against its quota, if it has one.
    fn quota_use(&self, source: &str) -> Option<QuotaUse> {
        let account = self.accounts.lock().get(source).cloned();
        let limits = account.as_ref().map(|a| a.limits()).filter(|l| l.any())?;
        let used = account.and_then(|a| a.used());
        Some(QuotaUse {
            used_bytes: used.map(|u| u.bytes),
            used_files: used.map(|u| u.files),
            quota_bytes: limits.bytes,
            quota_files: limits.files,
        })
    }
}

#[cfg(test)]
mod tests;
