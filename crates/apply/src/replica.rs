//! One job's replica.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use doppel_fs::{Beneath, Selection};
use doppel_proto::OpRecord;

use crate::dirty::Dirty;
use crate::error::ApplyError;
use crate::history::History;
use crate::metered::{self, Before};
use crate::ops::{OpenFile, apply_op_with};
use crate::outside::Outside;
use crate::privilege::{Decision, Privilege, PrivilegePolicy, Rule};
use crate::quota::{Account, Usage};
use crate::state::{Checkpoint, Progress, new_replica_id, read_checkpoint, write_checkpoint};

/// The formats of a replica's state directory (`checkpoint.json`, `progress`, the stopped
/// marker). Version 1: the first release's.
pub const STATE_FORMAT: doppel_fs::format::Format =
    doppel_fs::format::Format { kind: "doppel-replica", current: 1, oldest: 1 };

/// What a source needs to know to resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaInfo {
    /// The replica's id (changes when its content can no longer be vouched for).
    pub replica_id: [u8; 16],
    /// Failover epoch.
    pub epoch: u64,
    /// Every op up to here is applied (and durable once [`Replica::commit`] returns it).
    pub applied: u64,
    /// The id was just changed because the replica may hold a partial mix of un-synced ops
    /// (the machine went down uncleanly): the source must compare, not resume.
    pub needs_resync: bool,
    /// The workload failed over to the replica (its source is fenced).
    pub failed_over: bool,
}

/// What happened to an op.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Applied.
    Applied,
    /// Already applied before (a resend after a reconnect); skipped.
    Duplicate,
    /// Applied without the privileged parts the source's policy strips (listed).
    Stripped(Vec<Privilege>),
    /// Refused and skipped for good, with the reason (also logged).
    Refused(String),
    /// It touches only names the replica does not have (refused before), or names its tree
    /// keeps out of the stream (see [`crate::outside`]): skipped quietly.
    Skipped,
    /// Refused by the source's privilege policy, and skipped for good.
    RefusedByPolicy {
        /// The privilege the op used.
        privilege: Privilege,
        /// Why, in words.
        reason: String,
    },
}

/// A replica: a plain tree at `root` plus state kept in a separate directory.
pub struct Replica {
    root: Beneath,
    state_dir: PathBuf,
    durable: Checkpoint,
    applied: u64,
    dirty_on_disk: bool,
    progress: Progress,
    open: OpenFile,
    needs_resync: bool,
    privileges: PrivilegePolicy,
    account: Option<Arc<Account>>,
    dirty: Dirty,
    history: Option<History>,
    last_retain: Option<std::time::Instant>,
    /// The tree's allocated bytes, walked for a percentage history limit when no quota
    /// count exists, when, and the bytes written since.
    measured: Option<(std::time::Instant, u64, u64)>,
    /// Names the target refused to make, and the ops on them it skips.
    unreplicated: crate::unreplicated::Unreplicated,
    /// Names the tree keeps out of the stream (a source's own, during a failback).
    outside: Outside,
    /// Threads a run of new files may be applied on ([`Replica::apply_ahead`]).
    lanes: usize,
    /// What became of ops applied ahead, by sequence, until [`Replica::apply`] takes them.
    ahead: std::collections::HashMap<u64, Outcome>,
}

impl Replica {
    /// Opens the replica whose tree is `root` (created if missing) and whose state lives in
    /// `state_dir`, recovering from whatever way the previous process ended.
    pub fn open(root: &Path, state_dir: &Path) -> Result<Replica, ApplyError> {
        Replica::open_with_history(root, state_dir, Some(crate::history::DEFAULT_RETENTION))
    }

    /// [`Replica::open`] keeping `history` (`None`: none, and nothing of it is created).
    pub fn open_with_history(
        root: &Path,
        state_dir: &Path,
        history: Option<crate::retention::Retention>,
    ) -> Result<Replica, ApplyError> {
        // Root only: the state directory, and whatever is created on the way to the tree, is
        // 0700, so a replica is never reachable by local users through a directory made here.
        // The tree's own root is data: it gets the mode the source gives it.
        let private = |d: &Path| {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(d)
                .map_err(|e| ApplyError::State { path: d.to_path_buf(), source: e })
        };
        private(state_dir)?;
        if let Some(parent) = root.parent().filter(|p| !p.as_os_str().is_empty()) {
            private(parent)?;
        }
        std::fs::create_dir_all(root)
            .map_err(|e| ApplyError::State { path: root.to_path_buf(), source: e })?;
        STATE_FORMAT.take_over(state_dir, |_| Ok(()))?;
        let beneath =
            Beneath::open(root).map_err(|e| ApplyError::State { path: root.to_path_buf(), source: e })?;
        let (mut progress, seen) = Progress::open(state_dir)?;
        let mut needs_resync = false;
        let (durable, applied) = match read_checkpoint(state_dir)? {
            None => {
                let c = Checkpoint {
                    replica_id: new_replica_id(),
                    epoch: 1,
                    applied: 0,
                    dirty: false,
                    failed_over: false,
                };
                write_checkpoint(state_dir, &c)?;
                (c, 0)
            }
            // The process died but the machine did not: every applied op is in the page
            // cache, and the progress marker says exactly how far they went.
            Some(c) if seen.is_some() => (c, c.applied.max(seen.unwrap_or(0))),
            // The machine went down with ops applied past the last durable point: some of
            // them may have reached the disk and some not, in any order.
            Some(mut c) if c.dirty => {
                tracing::warn!(
                    replica = %root.display(),
                    applied = c.applied,
                    "replica may hold un-synced changes from before an unclean shutdown; the source will compare it"
                );
                c.replica_id = new_replica_id();
                c.dirty = false;
                write_checkpoint(state_dir, &c)?;
                needs_resync = true;
                (c, c.applied)
            }
            Some(c) => (c, c.applied),
        };
        if seen.is_none() || seen.is_some_and(|s| s < applied) {
            progress.record(applied)?;
        }
        Ok(Replica {
            root: beneath,
            state_dir: state_dir.to_path_buf(),
            dirty_on_disk: durable.dirty,
            durable,
            applied,
            progress,
            open: OpenFile::default(),
            needs_resync,
            privileges: PrivilegePolicy::default(),
            account: None,
            // What a previous process applied and did not commit is in the page cache, not in
            // this process's notes: the first commit syncs the whole file system.
            dirty: Dirty::everything(),
            history: match history {
                Some(r) => open_history(root, state_dir, r)?,
                None => {
                    drop_history(root, state_dir)?;
                    None
                }
            },
            last_retain: None,
            measured: None,
            unreplicated: crate::unreplicated::Unreplicated::load(state_dir),
            outside: Outside::none(),
            lanes: 1,
            ahead: std::collections::HashMap::new(),
        })
    }

    /// Keeps the names `selection` leaves out of the stream: listings leave them out and
    /// ops never remove, replace or change them (see [`crate::outside`]). For a tree that
    /// is a source's own, receiving its replica back; every other replica selects everything.
    pub fn set_selection(&mut self, selection: Selection) {
        self.outside = if selection.selects_everything() {
            Outside::none()
        } else {
            Outside::load(&self.state_dir, selection)
        };
    }

    /// The names that belong to the stream (listings show only these).
    pub fn selection(&self) -> &Selection {
        self.outside.selection()
    }

    /// Sets how many threads a run of new files may be applied on (1: the caller's alone).
    pub fn set_lanes(&mut self, lanes: usize) {
        self.lanes = lanes.clamp(1, MAX_LANES);
    }

    /// Sets how much history to keep (`None`: none; what was kept is dropped).
    pub fn set_history(&mut self, retention: Option<crate::retention::Retention>) -> Result<(), ApplyError> {
        match (retention, &mut self.history) {
            (Some(r), Some(h)) => h.set_retention(r),
            (Some(r), None) => self.history = open_history(self.root.path(), &self.state_dir, r)?,
            (None, Some(_)) => {
                self.history = None;
                drop_history(self.root.path(), &self.state_dir)?;
                if let Some(a) = &self.account {
                    // What the history took is gone: counted again from what is left.
                    a.forget_count();
                }
            }
            (None, None) => {}
        }
        Ok(())
    }

    /// The history, if kept.
    pub fn history(&mut self) -> Option<&mut History> {
        self.history.as_mut()
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Sets what the source may do that grants privilege on the target (the default is
    /// [`PrivilegePolicy::default`]); the target's configuration decides it, per source.
    pub fn set_privileges(&mut self, p: PrivilegePolicy) {
        self.privileges = p;
    }

    /// Charges what this replica's ops take to `account` (its source's, shared with the
    /// source's other replicas), and refuses ops over its limits.
    pub fn set_account(&mut self, account: Arc<Account>) {
        self.account = Some(account);
    }

    /// The resume point and identity, as a Welcome reports them.
    pub fn info(&self) -> ReplicaInfo {
        ReplicaInfo {
            replica_id: self.durable.replica_id,
            epoch: self.durable.epoch,
            applied: self.applied,
            needs_resync: self.needs_resync,
            failed_over: self.durable.failed_over,
        }
    }

    /// The replica tree's root.
    pub fn root(&self) -> &Beneath {
        &self.root
    }

    /// Last applied sequence (not necessarily durable yet).
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// Last durable sequence.
    pub fn durable(&self) -> u64 {
        self.durable.applied
    }

    /// Applies one record. Records must come in sequence order; ones already applied are
    /// skipped. An [`ApplyError::Io`] leaves the op unapplied (retry it later); a refused op
    /// counts as done.
    pub fn apply(&mut self, rec: &OpRecord) -> Result<Outcome, ApplyError> {
        if rec.seq <= self.applied {
            return Ok(Outcome::Duplicate);
        }
        if rec.seq != self.applied + 1 {
            return Err(ApplyError::Gap { expected: self.applied + 1, got: rec.seq });
        }
        if let Some(outcome) = self.ahead.remove(&rec.seq) {
            return self.applied_one(rec, outcome);
        }
        self.mark_dirty()?;
        let outcome = match self.apply_policed(rec) {
            Err(e)
                if (e.is_no_space() || matches!(e, ApplyError::OverQuota { .. }))
                    && self.free_history(rec)? =>
            {
                self.apply_policed(rec)?
            }
            r => r?,
        };
        self.applied_one(rec, outcome)
    }

    /// Marks the checkpoint dirty before the first op after a commit changes the tree.
    fn mark_dirty(&mut self) -> Result<(), ApplyError> {
        if !self.dirty_on_disk {
            write_checkpoint(&self.state_dir, &Checkpoint { dirty: true, ..self.durable })?;
            self.dirty_on_disk = true;
        }
        Ok(())
    }

    /// Counts `rec` applied, with `outcome`.
    fn applied_one(&mut self, rec: &OpRecord, outcome: Outcome) -> Result<Outcome, ApplyError> {
        self.applied = rec.seq;
        if let Some((_, _, written)) = &mut self.measured {
            *written += rec.op.data_len() as u64;
        }
        self.progress.record(rec.seq)?;
        Ok(outcome)
    }

    /// Applies the run of new files `recs` starts with on several threads at once, when it is
    /// long enough and this replica's way of applying allows it (see [`crate::lanes`]): each
    /// op's outcome waits for [`Replica::apply`] to take it, in order, which counts it
    /// applied then. What a lane could not carry out (space ran out) is left to
    /// [`Replica::apply`] too, which retries it as it retries any op. Nothing happens when
    /// `recs` does not start right after the last applied op.
    pub fn apply_ahead(&mut self, recs: &[OpRecord]) {
        let Some(first) = recs.first() else { return };
        if !self.lanes_allowed() || first.seq != self.applied + 1 || self.ahead.contains_key(&first.seq) {
            return;
        }
        let contiguous = recs.iter().zip(first.seq..).take_while(|(r, s)| r.seq == *s).count();
        let planned = crate::lanes::plan(recs[..contiguous].iter().map(|r| &r.op), self.lanes);
        // The run ends before the first op the privilege policy refuses.
        let decided: Vec<_> = recs[..planned.len()]
            .iter()
            .map_while(|r| match self.privileges.decide(&r.op) {
                Decision::Apply { op, stripped } => Some((op, stripped)),
                Decision::Refuse { .. } => None,
            })
            .collect();
        if decided.len() < crate::lanes::MIN_RUN || self.mark_dirty().is_err() {
            return;
        }
        self.open.clear();
        let ops: Vec<&doppel_proto::Op> = decided.iter().map(|(op, _)| op.as_ref()).collect();
        let devices = self.privileges.devices == Rule::Allow;
        let results = crate::lanes::run(&self.root, first.seq, &ops, &planned[..ops.len()], devices);
        for ((rec, (op, stripped)), result) in recs.iter().zip(decided).zip(results) {
            let outcome = match result {
                Some(Ok(())) => {
                    self.dirty.note(&op);
                    if stripped.is_empty() { Outcome::Applied } else { Outcome::Stripped(stripped) }
                }
                Some(Err(ApplyError::Refused { reason, .. })) => {
                    tracing::warn!(seq = rec.seq, op = rec.op.kind(), %reason, "op refused");
                    Outcome::Refused(reason)
                }
                // Not carried out: left to `apply`.
                _ => continue,
            };
            self.ahead.insert(rec.seq, outcome);
        }
    }

    /// Whether ops may be applied ahead on several threads: not with a history (each op's
    /// undo is taken from the state the op before it left, in stream order), a quota
    /// measured op by op, or names refused before (an op on one is skipped by what came
    /// before it).
    fn lanes_allowed(&self) -> bool {
        self.lanes > 1
            && self.history.is_none()
            && self.unreplicated.is_empty()
            && self.outside.keeps_nothing()
            && self.account.as_ref().is_none_or(|a| !a.limits().any())
    }

    /// The names the replica does not have (refused before).
    pub fn unreplicated(&self) -> &crate::unreplicated::Unreplicated {
        &self.unreplicated
    }

    /// Applies `rec` as the privilege policy decides; ops on names the tree keeps out of the
    /// stream or refused before are skipped, and a name refused now is remembered.
    fn apply_policed(&mut self, rec: &OpRecord) -> Result<Outcome, ApplyError> {
        let instead;
        let rec = match self.outside.judge(&rec.op, &self.root) {
            crate::outside::Verdict::Apply => rec,
            crate::outside::Verdict::Skip => return Ok(Outcome::Skipped),
            crate::outside::Verdict::Instead(op) => {
                instead = OpRecord { seq: rec.seq, time_us: rec.time_us, op };
                &instead
            }
        };
        if self.unreplicated.judge(&rec.op) == crate::unreplicated::Verdict::Skip {
            return Ok(Outcome::Skipped);
        }
        let outcome = self.apply_allowed(rec)?;
        // Only a device node the policy refuses is kept aside: other refusals (hostile names,
        // privileged attributes) go on being refused op by op, as they always were.
        if let Outcome::RefusedByPolicy { privilege: crate::privilege::Privilege::Devices, reason } = &outcome
        {
            self.unreplicated.refused(&rec.op, reason);
        }
        Ok(outcome)
    }

    /// Applies `rec` as the privilege policy decides.
    fn apply_allowed(&mut self, rec: &OpRecord) -> Result<Outcome, ApplyError> {
        let (op, stripped) = match self.privileges.decide(&rec.op) {
            Decision::Refuse { privilege, reason } => {
                tracing::warn!(seq = rec.seq, op = rec.op.kind(), %reason, "op refused by the privilege policy");
                return Ok(Outcome::RefusedByPolicy { privilege, reason });
            }
            Decision::Apply { op, stripped } => (op, stripped),
        };
        let devices = self.privileges.devices == Rule::Allow;
        let metered = self.metered(rec.seq, &op)?;
        if self.history.is_some() {
            self.admit_history(rec.seq, &op)?;
        }
        if let Some(h) = &mut self.history {
            // After the quota check (an op over quota moves nothing aside) and its measure of
            // the tree; what the history takes is charged to the quota as well.
            let took = h.before(&self.root, rec.seq, rec.time_us, &op)?;
            self.charge(took, Usage::default());
        }
        let applied = apply_op_with(&self.root, &mut self.open, &mut self.progress, rec.seq, &op, devices);
        if let (Ok(()), Some((account, before))) = (&applied, metered) {
            metered::after(&account, &self.root, &mut self.open, before, &op);
        }
        if applied.is_ok() {
            self.dirty.note(&op);
        }
        match applied {
            Ok(()) if stripped.is_empty() => Ok(Outcome::Applied),
            Ok(()) => {
                tracing::debug!(
                    seq = rec.seq,
                    op = rec.op.kind(),
                    ?stripped,
                    "applied without privileged parts"
                );
                Ok(Outcome::Stripped(stripped))
            }
            Err(ApplyError::Refused { reason, .. }) => {
                tracing::warn!(seq = rec.seq, op = rec.op.kind(), %reason, "op refused");
                Ok(Outcome::Refused(reason))
            }
            Err(e) => Err(e),
        }
    }

    /// With a limit on the source: checks that `op` fits, and what it will change. Without
    /// one, nothing is measured (no cost).
    fn metered(
        &mut self,
        seq: u64,
        op: &doppel_proto::Op,
    ) -> Result<Option<(Arc<Account>, Before)>, ApplyError> {
        let Some(account) = self.account.clone().filter(|a| a.limits().any()) else { return Ok(None) };
        account
            .ensure_counted()
            .map_err(|e| ApplyError::State { path: self.path().to_path_buf(), source: e })?;
        metered::admit(&account, &self.root, &mut self.open, seq, op)?;
        let before = metered::before(&self.root, &mut self.open, op);
        Ok(Some((account, before)))
    }

    /// Makes every applied op durable (an `fsync` of each file and directory changed since the
    /// last commit, or one `syncfs` of the replica's file system when they are many: see
    /// [`crate::dirty`]; then the checkpoint) and returns the durable sequence, which may now
    /// be acknowledged.
    pub fn commit(&mut self) -> Result<u64, ApplyError> {
        self.commit_with(false)
    }

    /// [`Replica::commit`] when more ops are about to be applied: the checkpoint is written
    /// already marked dirty, which the first of them would otherwise do with a second
    /// checkpoint write (two `fsync`s and a rename) right after this one.
    pub fn commit_continuing(&mut self) -> Result<u64, ApplyError> {
        self.commit_with(true)
    }

    fn commit_with(&mut self, more: bool) -> Result<u64, ApplyError> {
        // Ops applied ahead and not taken (the session ended first) are applied again when
        // they come again: each is exact to replay.
        self.ahead.clear();
        if self.durable.applied == self.applied && (!self.dirty_on_disk || more) {
            return Ok(self.applied);
        }
        self.open.clear();
        let flushed = (|| {
            if let Some(h) = &mut self.history {
                h.sync()?;
            }
            crate::dirty::sync(&self.root, self.dirty.take())
                .map_err(|e| ApplyError::State { path: self.root.path().to_path_buf(), source: e })
        })();
        if let Err(e) = flushed {
            self.commit_failed();
            return Err(e);
        }
        let c = Checkpoint { applied: self.applied, dirty: more, ..self.durable };
        write_checkpoint(&self.state_dir, &c)?;
        self.durable = Checkpoint { dirty: false, ..c };
        self.dirty_on_disk = more;
        self.outside.save();
        self.retain_now_and_then()?;
        Ok(self.applied)
    }

    /// Starts a commit of everything applied so far that runs beside the ops applied next:
    /// what must reach the disk is gathered here, made durable by [`Flush::run`] on another
    /// thread, and the commit ends with [`Replica::end_commit`]. The checkpoint it writes is
    /// marked dirty (more ops follow; a clean one comes from [`Replica::commit`]). `None` when
    /// nothing was applied since the last commit. Until it ends, nothing else may write the
    /// replica's checkpoint: no other commit, no rollback, no change of identity.
    pub fn begin_commit(&mut self) -> Result<Option<Flush>, ApplyError> {
        self.ahead.clear();
        if self.durable.applied == self.applied {
            return Ok(None);
        }
        self.open.clear();
        let history = self.history.as_mut().map(|h| h.take_sync()).transpose()?;
        let data = crate::dirty::Opened::of(&self.root, self.dirty.take())
            .map_err(|e| ApplyError::State { path: self.root.path().to_path_buf(), source: e })?;
        // The checkpoint it writes is marked dirty (the first op after the last commit
        // already marked it so): ops applied meanwhile need no checkpoint write of their own.
        self.dirty_on_disk = true;
        let checkpoint = Checkpoint { applied: self.applied, dirty: true, ..self.durable };
        Ok(Some(Flush {
            history,
            data,
            root: self.root.path().to_path_buf(),
            state_dir: self.state_dir.clone(),
            checkpoint,
        }))
    }

    /// A commit failed (its [`Flush`], or [`Replica::commit`]): what it was to make durable
    /// is no longer listed, so the next commit syncs everything (the whole file system, the
    /// whole journal).
    pub fn commit_failed(&mut self) {
        self.dirty = Dirty::everything();
        if let Some(h) = &mut self.history {
            h.journal().mark_unsynced();
        }
    }

    /// Ends a commit whose [`Flush`] ran: returns the durable sequence, which may now be
    /// acknowledged.
    pub fn end_commit(&mut self, done: Flushed) -> Result<u64, ApplyError> {
        let c = done.0;
        self.durable = Checkpoint { dirty: false, ..c };
        self.outside.save();
        self.retain_now_and_then()?;
        Ok(c.applied)
    }

    /// Applies history retention at most once a second (after a commit).
    fn retain_now_and_then(&mut self) -> Result<(), ApplyError> {
        let Some(h) = &mut self.history else { return Ok(()) };
        if self.last_retain.is_some_and(|t| t.elapsed() < std::time::Duration::from_secs(1)) {
            return Ok(());
        }
        self.last_retain = Some(std::time::Instant::now());
        let size = h.retention().size;
        let replica_bytes = match size {
            crate::retention::SizeLimit::Percent(_) => self.replica_bytes(),
            _ => 0,
        };
        let over = self.over_quota_bytes();
        let Some(h) = &mut self.history else { return Ok(()) };
        h.size_segments_for(size.bytes(replica_bytes));
        let (plan, freed) = h.retain(now_us(), replica_bytes, over)?;
        self.charge(Usage::default(), freed);
        if plan.cut_below_keep {
            tracing::warn!(replica = %self.root.path().display(), "history size limit cuts the window below the time configured");
        }
        Ok(())
    }

    /// The replica's allocated bytes, for a percentage history limit: the quota's count when
    /// there is one (exact, kept up to date), else a walk of the tree, repeated every ten
    /// minutes at most (a share of the size need not follow every op) unless much was written.
    fn replica_bytes(&mut self) -> u64 {
        if let Some(u) = self.account.as_ref().and_then(|a| a.used()) {
            // The quota counts the history too.
            let history = self.history.as_mut().map_or(0, |h| h.journal().bytes());
            return u.bytes.saturating_sub(history);
        }
        // Measured again after ten minutes, or once the bytes written since are a quarter of
        // what was measured (a tree being filled, as during its first mirror).
        let fresh = self.measured.filter(|(t, b, written)| {
            t.elapsed() < std::time::Duration::from_secs(600) && written.saturating_mul(4) <= *b
        });
        if let Some((_, b, _)) = fresh {
            return b;
        }
        let bytes = crate::quota::walk(self.root.path()).map_or(0, |u| u.bytes);
        self.measured = Some((std::time::Instant::now(), bytes, 0));
        bytes
    }

    /// Space or quota ran out applying `rec`: frees history (oldest first, never the minimum
    /// window).
    /// Whether anything was freed (the op is worth retrying).
    fn free_history(&mut self, rec: &OpRecord) -> Result<bool, ApplyError> {
        if self.history.is_none() {
            return Ok(false);
        }
        let need = match &rec.op {
            doppel_proto::Op::Write { data, .. } => data.len() as u64,
            _ => 0,
        }
        .max(1 << 20);
        let need = need.max(self.over_quota_bytes());
        let Some(h) = &mut self.history else { return Ok(false) };
        let (plan, freed) = h.retain(now_us(), 0, need)?;
        self.charge(Usage::default(), freed);
        if plan.pause {
            tracing::error!(
                replica = %self.root.path().display(),
                "out of space (or quota) and only the minimum history window is left: the replica pauses"
            );
        }
        Ok(plan.freed > 0)
    }

    /// Checks that the old bytes `op` will put into the history fit the source's quota,
    /// dropping the oldest history first if they do not (never the minimum window): an
    /// overwrite takes nothing more in the tree, but as much again in the history.
    fn admit_history(&mut self, seq: u64, op: &doppel_proto::Op) -> Result<(), ApplyError> {
        let Some(account) = self.account.clone().filter(|a| a.used().is_some()) else { return Ok(()) };
        let need = Usage { bytes: op.data_len() as u64, files: 0 };
        if account.admit(need).is_ok() {
            return Ok(());
        }
        let want = need.bytes + self.over_quota_bytes();
        if let Some(h) = &mut self.history {
            let (_, freed) = h.retain(now_us(), 0, want)?;
            self.charge(Usage::default(), freed);
        }
        account.admit(need).map_err(|over| ApplyError::OverQuota { seq, kind: op.kind(), over })
    }

    /// Records a change of the source's use (history taken or freed), when its use is counted.
    fn charge(&self, added: Usage, freed: Usage) {
        if let Some(a) = self.account.as_ref().filter(|a| a.used().is_some()) {
            a.record(added, freed);
        }
    }

    /// Bytes the source is over its byte quota by (0 without one).
    fn over_quota_bytes(&self) -> u64 {
        let Some(a) = &self.account else { return 0 };
        match (a.used(), a.limits().bytes) {
            (Some(u), Some(limit)) => u.bytes.saturating_sub(limit),
            _ => 0,
        }
    }

    /// Fences the replica for a failover: makes what was applied durable, starts a new epoch
    /// and marks it failed over, so the source's stream is refused from now on. Idempotent:
    /// fencing a fenced replica changes nothing. Returns the epoch.
    pub fn fence(&mut self) -> Result<u64, ApplyError> {
        self.commit()?;
        if self.durable.failed_over {
            return Ok(self.durable.epoch);
        }
        let c = Checkpoint { epoch: self.durable.epoch + 1, failed_over: true, ..self.durable };
        write_checkpoint(&self.state_dir, &c)?;
        self.durable = c;
        Ok(c.epoch)
    }

    /// Ends a failover (the job went back to its source): starts a new epoch in which the
    /// source's stream is accepted again. Returns the new epoch.
    pub fn unfence(&mut self) -> Result<u64, ApplyError> {
        self.commit()?;
        let c = Checkpoint { epoch: self.durable.epoch + 1, failed_over: false, ..self.durable };
        write_checkpoint(&self.state_dir, &c)?;
        self.durable = c;
        Ok(c.epoch)
    }

    /// The history's window and named points (`None` without history).
    pub fn history_summary(&self) -> Result<Option<crate::history::view::Summary>, ApplyError> {
        if self.history.is_none() {
            return Ok(None);
        }
        let dir = crate::history::dir_of(&self.state_dir);
        crate::history::view::summary(&dir, &crate::history::attic_of(self.root.path(), &self.state_dir))
            .map(Some)
            .map_err(|e| ApplyError::State { path: dir, source: e })
    }

    /// Takes a fenced replica back to `point` of its history (a failover to a chosen point):
    /// every op after it is undone, the history after it is cut, and the replica gets a new
    /// id (its content is no longer what its source acknowledged). A rollback cut short
    /// resumes when asked for the same point, and refuses another one, naming it.
    pub fn roll_back_to(&mut self, point: u64) -> Result<u64, ApplyError> {
        let state_dir = self.state_dir.clone();
        let state = move |e: std::io::Error| ApplyError::State { path: state_dir.clone(), source: e };
        if !self.durable.failed_over {
            return Err(state(std::io::Error::other(
                "only a fenced (failed-over) replica can be rolled back",
            )));
        }
        let dir = crate::history::dir_of(&self.state_dir);
        if let Some((p, _)) = crate::history::rollback::in_progress(&dir).filter(|(p, _)| *p != point) {
            return Err(state(std::io::Error::other(format!(
                "a rollback to point {p} is under way: finish it with that point"
            ))));
        }
        self.commit()?;
        let retention = self.history.as_ref().map(|h| h.retention()).ok_or_else(|| {
            state(std::io::Error::other("the replica keeps no history: it cannot go back to a point"))
        })?;
        self.history = None;
        let attic = crate::history::attic_of(self.root.path(), &self.state_dir);
        let undone = crate::history::rollback::roll_back(&self.root, &dir, &attic, point).map_err(state)?;
        self.history = Some(History::open(self.root.path(), &self.state_dir, retention)?);
        if let Some(a) = &self.account {
            // Counted again from the tree and history as the rollback left them.
            a.forget_count();
        }
        self.applied = point;
        self.progress.record(point)?;
        self.dirty = Dirty::everything();
        let c = Checkpoint { applied: point, replica_id: new_replica_id(), dirty: false, ..self.durable };
        write_checkpoint(&self.state_dir, &c)?;
        self.durable = c;
        Ok(undone)
    }

    /// The replica tree's path.
    pub fn path(&self) -> &Path {
        self.root.path()
    }
}

/// Opens the history of a replica, unless its file system has no file handles (then it has
/// none, and says so once).
fn open_history(
    root: &Path,
    state_dir: &Path,
    r: crate::retention::Retention,
) -> Result<Option<History>, ApplyError> {
    let dir =
        std::fs::File::open(root).map_err(|e| ApplyError::State { path: root.to_path_buf(), source: e })?;
    if let Err(e) = doppel_fs::handle::Handle::of(std::os::fd::AsFd::as_fd(&dir), b"") {
        tracing::warn!(replica = %root.display(), error = %e, "no history: the replica's file system has no file handles");
        return Ok(None);
    }
    History::open(root, state_dir, r).map(Some)
}

/// Removes a history kept before it was turned off: kept on, it would miss the ops applied
/// meanwhile, and a view of its points would be wrong.
fn drop_history(root: &Path, state_dir: &Path) -> Result<(), ApplyError> {
    for dir in [crate::history::attic_of(root, state_dir), crate::history::dir_of(state_dir)] {
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => tracing::info!(dir = %dir.display(), "history turned off: what it held is removed"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(ApplyError::State { path: dir, source: e }),
        }
    }
    Ok(())
}

/// Threads a run of new files is applied on, at most.
const MAX_LANES: usize = 16;

pub(crate) fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// A commit's writes to the disk, on their way ([`Replica::begin_commit`]).
#[derive(Debug)]
pub struct Flush {
    history: Option<crate::history::journal::JournalSync>,
    data: crate::dirty::Opened,
    root: PathBuf,
    state_dir: PathBuf,
    checkpoint: Checkpoint,
}

/// A [`Flush`] that ran.
#[derive(Debug)]
pub struct Flushed(Checkpoint);

impl Flush {
    /// Makes the history, then the replica's changes, then the checkpoint saying so durable
    /// (on any thread).
    pub fn run(self) -> Result<Flushed, ApplyError> {
        if let Some(h) = self.history {
            h.run().map_err(|e| ApplyError::State { path: self.state_dir.clone(), source: e })?;
        }
        self.data.sync().map_err(|e| ApplyError::State { path: self.root.clone(), source: e })?;
        write_checkpoint(&self.state_dir, &self.checkpoint)?;
        Ok(Flushed(self.checkpoint))
    }
}

#[cfg(test)]
mod tests;
