//! The resume plan: what a job does after any break, decided from facts alone.
//!
//! Two moments decide. At start, [`StartPlan::decide`] reads what the previous run left on
//! disk ([`Left`]): how changes were captured, whether it stopped cleanly, whether an index
//! describes a known replica (and when it was saved), and which dirty regions are left. On each
//! connection, [`LinkPlanner::on_welcome`] reads the target's [`Welcome`] and what this agent
//! knows about replicas ([`Known`]). Both are pure: the capture thread and the link only carry
//! out what they return, and the tests below walk every combination.
//!
//! # Why `watch` and `fuse` read the saved index the opposite way
//!
//! The index is saved only right after the spool is persisted, so it never describes ops that
//! could be lost (see "Restarts without re-mirroring" in `docs/architecture.md`).
//!
//! - **`watch`, clean stop**: the index and the spool describe exactly the same ops, and the
//!   index holds block hashes. Whatever changed while no agent ran shows as a stat difference
//!   from the index, and the hashes say which blocks: the tree is compared with the index
//!   *locally* and the target is asked nothing ([`StartPlan::LocalRescan`]).
//! - **`watch`, unclean stop**: ops emitted after the last index checkpoint may have died in
//!   memory, or may have reached the target. The names whose stat differs from the index saved
//!   at that time (or that are "racy" around it) are suspects to compare *with the replica*.
//! - **`fuse`, clean stop**: the mount was detached first and a stat-only index (no hashes) was
//!   saved as of the detach; everything the mount captured is in the spool. What changed while
//!   the job was stopped went uncaptured and shows as a stat difference from that index; having
//!   no hashes to compare with locally, those names are compared with the replica.
//! - **`fuse`, unclean stop**: every op was written through to the spool before the change was
//!   acknowledged, and the tree could not change uncaptured (a dead mount answers `ENOTCONN`
//!   until the next start detaches it). The saved index dates from some earlier checkpoint and
//!   says nothing about this run; only the activity log's hot regions (changes made but maybe
//!   not sequenced) are suspects ("The activity log" in `docs/architecture.md`).
//!
//! So the saved index is a source of suspects after an *unclean* `watch` stop and after a
//! *clean* `fuse` stop, and never otherwise. Without a known replica nothing is compared
//! before the target answers: its unknown replica calls for a whole-tree difference mirror,
//! which covers every region as well.

use doppel_proto::Welcome;

use crate::activity::Region;
use crate::config::CaptureMode;
use crate::state::JobState;

/// How a job captures changes, as far as resuming goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Watch events, turned into ops by comparing with the index.
    Watch,
    /// A capture mount that sequences ops itself.
    Fuse,
}

impl From<&CaptureMode> for Mode {
    fn from(c: &CaptureMode) -> Mode {
        match c {
            CaptureMode::Watch(_) => Mode::Watch,
            // The guest's disks behave as files written through a capture mount.
            CaptureMode::Fuse | CaptureMode::Vm(_) => Mode::Fuse,
        }
    }
}

/// What the previous run left on disk, as found at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Left {
    /// How changes are captured.
    pub mode: Mode,
    /// The previous run stopped cleanly (spool and index saved together).
    pub clean_stop: bool,
    /// When the index describing a known replica was saved (µs since the epoch); `None` if no
    /// replica is known or its index is gone.
    pub index_saved_at_us: Option<u64>,
    /// Regions the dirty set (activity log, or names recorded during an overflow) still holds.
    pub regions: Vec<Region>,
}

impl Left {
    /// The facts from the job state and what was found beside it: the index saved at
    /// `index_saved_at_us` counts only if the state names the replica it describes (it is
    /// forgotten when a whole-tree mirror starts, so a crash mid-mirror leads to a new one).
    pub fn found(mode: Mode, state: &JobState, index_saved_at_us: Option<u64>, regions: Vec<Region>) -> Left {
        Left {
            mode,
            clean_stop: state.clean,
            index_saved_at_us: index_saved_at_us.filter(|_| state.replica_id.is_some()),
            regions,
        }
    }
}

/// How the previous run ended, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Spool and index were saved together.
    Clean,
    /// Killed, crashed, or stopped before it could save them.
    Unclean,
}

/// What the previous run left to compare with the replica.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Names whose stat differs from the index saved at this time (µs since the epoch).
    pub saved_at_us: Option<u64>,
    /// The dirty set's regions.
    pub regions: Vec<Region>,
}

impl Recovery {
    /// Whether there is something to compare.
    pub fn pending(&self) -> bool {
        self.saved_at_us.is_some() || !self.regions.is_empty()
    }
}

/// What a job does at start, before it hears from the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartPlan {
    /// No index describes a known replica: nothing can be compared until the target answers,
    /// and its answer will call for a whole-tree difference mirror (which covers any regions
    /// left too). A `watch` job buffers events meanwhile.
    FirstContact,
    /// `watch`, clean stop: compare the tree with the index locally and stream at once; then
    /// compare `regions` (left by an overflow) with the replica, if any.
    LocalRescan {
        /// Dirty regions to compare with the replica after the rescan.
        regions: Vec<Region>,
    },
    /// Compare suspects with the replica once the spool has drained.
    CompareSuspects {
        /// What to compare.
        recovery: Recovery,
        /// How the previous run ended.
        after: Stop,
    },
    /// Nothing to compare: resume from the target's acknowledged sequence.
    Resume,
}

impl StartPlan {
    /// The plan for what the previous run `left` (see the module documentation for why).
    pub fn decide(left: Left) -> StartPlan {
        let Some(saved_at) = left.index_saved_at_us else { return StartPlan::FirstContact };
        let after = if left.clean_stop { Stop::Clean } else { Stop::Unclean };
        let saved_at_us = match (left.mode, after) {
            (Mode::Watch, Stop::Clean) => return StartPlan::LocalRescan { regions: left.regions },
            (Mode::Watch, Stop::Unclean) | (Mode::Fuse, Stop::Clean) => Some(saved_at),
            (Mode::Fuse, Stop::Unclean) => None,
        };
        let recovery = Recovery { saved_at_us, regions: left.regions };
        if recovery.pending() { StartPlan::CompareSuspects { recovery, after } } else { StartPlan::Resume }
    }

    /// Whether the capture thread compares the tree with the index locally before streaming.
    pub fn local_rescan(&self) -> bool {
        matches!(self, StartPlan::LocalRescan { .. })
    }

    /// What is to be compared with the replica once connected.
    pub fn to_compare(&self) -> Recovery {
        match self {
            StartPlan::LocalRescan { regions } => Recovery { saved_at_us: None, regions: regions.clone() },
            StartPlan::CompareSuspects { recovery, .. } => recovery.clone(),
            StartPlan::FirstContact | StartPlan::Resume => Recovery::default(),
        }
    }

    /// How the job resumes, in words for the log (tests look for "clean restart").
    pub fn describe(&self) -> &'static str {
        match self {
            StartPlan::FirstContact => "first contact",
            StartPlan::LocalRescan { .. } => "clean restart",
            StartPlan::CompareSuspects { after: Stop::Clean, .. } => {
                "clean restart, comparing what changed while stopped"
            }
            StartPlan::CompareSuspects { after: Stop::Unclean, .. } => "after an unclean stop",
            StartPlan::Resume => "after an unclean stop, nothing to compare",
        }
    }
}

/// What this agent knows about replicas when a Welcome arrives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Known {
    /// The replica the index describes.
    pub replica_id: Option<[u8; 16]>,
    /// The replica a whole-tree comparison is running against (in this process).
    pub mirroring: Option<[u8; 16]>,
}

impl From<&JobState> for Known {
    fn from(st: &JobState) -> Known {
        Known { replica_id: st.replica_id, mirroring: st.mirroring }
    }
}

/// What the link does once the target welcomed it. In every case the sender starts after the
/// target's applied sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WelcomePlan {
    /// The replica is new or unknown to this agent, or the target lost track of it
    /// (`needs_resync`): list it whole and have the capture thread compare the whole tree,
    /// numbering after the applied sequence. The comparison covers any pending suspects.
    MirrorAll {
        /// A comparison against another replica is running and must give way first.
        interrupt_other: bool,
    },
    /// The replica is the one the index describes, or the one a whole-tree comparison
    /// interrupted by the link runs against (what it queued is in the spool, sent from the
    /// acknowledged point): acknowledge up to `catch_up_to` (the target may be ahead of the
    /// spool when ops that reached it died in this agent's memory) and go on.
    Resume {
        /// The target's applied sequence.
        catch_up_to: u64,
        /// What follows.
        then: Then,
    },
}

/// What follows a resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Then {
    /// Drain the spool, then compare what the previous run left with the replica.
    CompareSuspects,
    /// Nothing to compare: the job is replicating.
    Replicate,
    /// The capture thread is still comparing the tree with the index locally and will say
    /// when it is replicating.
    KeepScanning,
}

/// The link's side of the plan, across its sessions: whether the comparison the start plan
/// called for is still to be done (a session that breaks before it is done leaves it to the
/// next one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkPlanner {
    suspects_pending: bool,
}

impl LinkPlanner {
    /// The planner for a job that started with `start`.
    pub fn new(start: &StartPlan) -> LinkPlanner {
        LinkPlanner { suspects_pending: start.to_compare().pending() }
    }

    /// Whether suspects are still to be compared with the replica.
    pub fn suspects_pending(&self) -> bool {
        self.suspects_pending
    }

    /// The decision for `welcome`, given what the agent `knows` and whether the capture thread
    /// is `scanning` (its local rescan).
    pub fn on_welcome(&self, knows: Known, welcome: &Welcome, scanning: bool) -> WelcomePlan {
        let id = Some(welcome.replica_id);
        let known = (knows.replica_id == id || knows.mirroring == id) && !welcome.needs_resync;
        if !known {
            let interrupt_other = knows.mirroring.is_some_and(|m| m != welcome.replica_id);
            return WelcomePlan::MirrorAll { interrupt_other };
        }
        let then = if self.suspects_pending {
            Then::CompareSuspects
        } else if scanning {
            Then::KeepScanning
        } else {
            Then::Replicate
        };
        WelcomePlan::Resume { catch_up_to: welcome.applied_seq, then }
    }

    /// A whole-tree comparison started: it covers the suspects.
    pub fn mirroring_all(&mut self) {
        self.suspects_pending = false;
    }

    /// The suspects were compared.
    pub fn suspects_compared(&mut self) {
        self.suspects_pending = false;
    }
}

/// Whether an overflow can end: once everything queued before it is acknowledged, the names
/// recorded meanwhile are compared with the replica.
pub fn resync_due(overflow_active: bool, acked: u64, last_seq: u64) -> bool {
    overflow_active && acked == last_seq
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: [u8; 16] = [0xa; 16];
    const B: [u8; 16] = [0xb; 16];
    const T: u64 = 1_700_000_000_000_000;

    fn hot() -> Vec<Region> {
        vec![Region::Extent(b"f".to_vec(), 2), Region::Name(b"d/n".to_vec())]
    }

    fn left(mode: Mode, clean: bool, saved: Option<u64>, regions: Vec<Region>) -> Left {
        Left { mode, clean_stop: clean, index_saved_at_us: saved, regions }
    }

    fn suspects(saved_at_us: Option<u64>, regions: Vec<Region>, after: Stop) -> StartPlan {
        StartPlan::CompareSuspects { recovery: Recovery { saved_at_us, regions }, after }
    }

    fn welcome(id: [u8; 16], applied_seq: u64, needs_resync: bool) -> Welcome {
        Welcome {
            protocol: doppel_proto::PROTOCOL_VERSION,
            replica_id: id,
            applied_seq,
            epoch: 3,
            needs_resync,
            max_frame: 64 << 20,
            source_name: "src".into(),
        }
    }

    /// Every combination of the start facts.
    #[test]
    fn start_plan_for_every_combination() {
        use Mode::{Fuse, Watch};
        let none = Vec::new;
        let cases: Vec<(Left, StartPlan)> = vec![
            // No known replica: nothing to compare before the target answers, whatever is left.
            (left(Watch, true, None, none()), StartPlan::FirstContact),
            (left(Watch, false, None, none()), StartPlan::FirstContact),
            (left(Watch, true, None, hot()), StartPlan::FirstContact),
            (left(Watch, false, None, hot()), StartPlan::FirstContact),
            (left(Fuse, true, None, none()), StartPlan::FirstContact),
            (left(Fuse, false, None, none()), StartPlan::FirstContact),
            (left(Fuse, true, None, hot()), StartPlan::FirstContact),
            (left(Fuse, false, None, hot()), StartPlan::FirstContact),
            // watch, clean: local rescan, then what an overflow left.
            (left(Watch, true, Some(T), none()), StartPlan::LocalRescan { regions: none() }),
            (left(Watch, true, Some(T), hot()), StartPlan::LocalRescan { regions: hot() }),
            // watch, unclean: the saved index gives the suspects.
            (left(Watch, false, Some(T), none()), suspects(Some(T), none(), Stop::Unclean)),
            (left(Watch, false, Some(T), hot()), suspects(Some(T), hot(), Stop::Unclean)),
            // fuse, clean: the stat index gives what changed while stopped.
            (left(Fuse, true, Some(T), none()), suspects(Some(T), none(), Stop::Clean)),
            (left(Fuse, true, Some(T), hot()), suspects(Some(T), hot(), Stop::Clean)),
            // fuse, unclean: only the activity log's hot regions.
            (left(Fuse, false, Some(T), hot()), suspects(None, hot(), Stop::Unclean)),
            (left(Fuse, false, Some(T), none()), StartPlan::Resume),
        ];
        for (facts, want) in cases {
            assert_eq!(StartPlan::decide(facts.clone()), want, "{facts:?}");
        }
    }

    #[test]
    fn start_plan_consequences() {
        let rescan = StartPlan::LocalRescan { regions: hot() };
        assert!(rescan.local_rescan());
        assert_eq!(rescan.to_compare(), Recovery { saved_at_us: None, regions: hot() });
        assert!(!StartPlan::LocalRescan { regions: Vec::new() }.to_compare().pending());
        let unclean = suspects(Some(T), Vec::new(), Stop::Unclean);
        assert!(!unclean.local_rescan());
        assert!(unclean.to_compare().pending());
        assert!(!StartPlan::FirstContact.to_compare().pending());
        assert!(!StartPlan::Resume.to_compare().pending());
        // The restart test looks for these words.
        assert_eq!(rescan.describe(), "clean restart");
        assert!(suspects(Some(T), Vec::new(), Stop::Clean).describe().starts_with("clean restart"));
        assert_eq!(unclean.describe(), "after an unclean stop");
        assert_eq!(StartPlan::FirstContact.describe(), "first contact");
    }

    /// The index counts only while the state names the replica it describes.
    #[test]
    fn facts_from_the_job_state() {
        let mut st = JobState { replica_id: Some(A), clean: true, ..JobState::default() };
        let f = Left::found(Mode::Watch, &st, Some(T), hot());
        assert_eq!(f, left(Mode::Watch, true, Some(T), hot()));
        st.replica_id = None;
        assert_eq!(Left::found(Mode::Watch, &st, Some(T), hot()).index_saved_at_us, None);
    }

    /// Every combination of what the agent knows and what the target (replica A) says.
    #[test]
    fn welcome_plan_for_every_combination() {
        // (index describes, mirroring, needs_resync) -> None: resume, Some(interrupt): mirror.
        type Id = Option<[u8; 16]>;
        let table: [(Id, Id, bool, Option<bool>); 18] = [
            (None, None, false, Some(false)),
            (None, None, true, Some(false)),
            (None, Some(A), false, None),
            (None, Some(A), true, Some(false)),
            (None, Some(B), false, Some(true)),
            (None, Some(B), true, Some(true)),
            (Some(A), None, false, None),
            (Some(A), None, true, Some(false)),
            (Some(A), Some(A), false, None),
            (Some(A), Some(A), true, Some(false)),
            (Some(A), Some(B), false, None),
            (Some(A), Some(B), true, Some(true)),
            (Some(B), None, false, Some(false)),
            (Some(B), None, true, Some(false)),
            (Some(B), Some(A), false, None),
            (Some(B), Some(A), true, Some(false)),
            (Some(B), Some(B), false, Some(true)),
            (Some(B), Some(B), true, Some(true)),
        ];
        // (suspects pending, scanning) -> what follows a resume.
        let follow = [
            (false, false, Then::Replicate),
            (false, true, Then::KeepScanning),
            (true, false, Then::CompareSuspects),
            (true, true, Then::CompareSuspects),
        ];
        for (replica_id, mirroring, needs_resync, mirror) in table {
            for (pending, scanning, then) in follow {
                let knows = Known { replica_id, mirroring };
                let planner = LinkPlanner { suspects_pending: pending };
                let got = planner.on_welcome(knows, &welcome(A, 42, needs_resync), scanning);
                let want = match mirror {
                    Some(interrupt_other) => WelcomePlan::MirrorAll { interrupt_other },
                    None => WelcomePlan::Resume { catch_up_to: 42, then },
                };
                assert_eq!(
                    got, want,
                    "{knows:?} resync={needs_resync} pending={pending} scanning={scanning}"
                );
            }
        }
    }

    /// Spot checks of the table above, named after the situations they stand for.
    #[test]
    fn welcome_plan_situations() {
        let idle = LinkPlanner { suspects_pending: false };
        let a = Known { replica_id: Some(A), mirroring: None };
        // The target is ahead of the spool (ops that reached it died in memory): catch up.
        assert_eq!(
            idle.on_welcome(a, &welcome(A, 1000, false), false),
            WelcomePlan::Resume { catch_up_to: 1000, then: Then::Replicate }
        );
        // The target lost track of the replica: a whole-tree comparison, nothing to interrupt.
        assert_eq!(
            idle.on_welcome(a, &welcome(A, 7, true), false),
            WelcomePlan::MirrorAll { interrupt_other: false }
        );
        // An unknown replica (first contact, rebuilt target, rotated id).
        assert_eq!(
            idle.on_welcome(Known::default(), &welcome(B, 0, false), false),
            WelcomePlan::MirrorAll { interrupt_other: false }
        );
        assert_eq!(
            idle.on_welcome(a, &welcome(B, 0, false), false),
            WelcomePlan::MirrorAll { interrupt_other: false }
        );
    }

    /// Killed mid-mirror of A, then B answers: the mirror of A had forgotten the index, so the
    /// restart is a first contact and B gets a whole-tree comparison.
    #[test]
    fn killed_during_a_mirror_then_another_replica() {
        // What `MirrorAll` saved before comparing: no replica (mirroring is not saved).
        let st = JobState { replica_id: None, mirroring: Some(A), clean: false, ..JobState::default() };
        let saved: JobState = serde_json::from_slice(&serde_json::to_vec(&st).unwrap()).unwrap();
        let start = StartPlan::decide(Left::found(Mode::Watch, &saved, Some(T), hot()));
        assert_eq!(start, StartPlan::FirstContact);
        let planner = LinkPlanner::new(&start);
        assert!(!planner.suspects_pending());
        assert_eq!(
            planner.on_welcome(Known::from(&saved), &welcome(B, 5, false), false),
            WelcomePlan::MirrorAll { interrupt_other: false }
        );
        // Same in fuse mode.
        let start = StartPlan::decide(Left::found(Mode::Fuse, &saved, Some(T), hot()));
        assert_eq!(start, StartPlan::FirstContact);
    }

    /// The link broke mid-mirror of A (same process): A resumes the comparison where it was,
    /// B interrupts it and starts its own.
    #[test]
    fn link_broke_during_a_mirror() {
        let mut planner = LinkPlanner::new(&StartPlan::FirstContact);
        let knows = Known { replica_id: None, mirroring: Some(A) };
        assert_eq!(
            planner.on_welcome(knows, &welcome(A, 9, false), false),
            WelcomePlan::Resume { catch_up_to: 9, then: Then::Replicate }
        );
        assert_eq!(
            planner.on_welcome(knows, &welcome(B, 0, false), false),
            WelcomePlan::MirrorAll { interrupt_other: true }
        );
        planner.mirroring_all();
        assert!(!planner.suspects_pending());
    }

    /// Killed right after an index checkpoint: the state was never marked clean, so the names
    /// changed since the checkpoint (none, or only racy ones) are compared with the replica.
    #[test]
    fn killed_after_an_index_save() {
        let st = JobState { replica_id: Some(A), clean: false, ..JobState::default() };
        let start = StartPlan::decide(Left::found(Mode::Watch, &st, Some(T), Vec::new()));
        assert_eq!(start, suspects(Some(T), Vec::new(), Stop::Unclean));
        let mut planner = LinkPlanner::new(&start);
        let knows = Known::from(&st);
        assert_eq!(
            planner.on_welcome(knows, &welcome(A, 3, false), false),
            WelcomePlan::Resume { catch_up_to: 3, then: Then::CompareSuspects }
        );
        // The session broke before the comparison: the next one compares.
        assert_eq!(
            planner.on_welcome(knows, &welcome(A, 4, false), false),
            WelcomePlan::Resume { catch_up_to: 4, then: Then::CompareSuspects }
        );
        planner.suspects_compared();
        assert_eq!(
            planner.on_welcome(knows, &welcome(A, 4, false), false),
            WelcomePlan::Resume { catch_up_to: 4, then: Then::Replicate }
        );
    }

    /// fuse: a clean stop compares the stat index's differences, an unclean one the activity
    /// log; the opposite of watch.
    #[test]
    fn fuse_clean_and_unclean_against_watch() {
        for (clean, fuse_saved, watch_saved) in [(true, Some(T), None), (false, None, Some(T))] {
            let st = JobState { replica_id: Some(A), clean, ..JobState::default() };
            let fuse = StartPlan::decide(Left::found(Mode::Fuse, &st, Some(T), hot()));
            assert_eq!(fuse.to_compare().saved_at_us, fuse_saved, "fuse clean={clean}");
            let watch = StartPlan::decide(Left::found(Mode::Watch, &st, Some(T), hot()));
            assert_eq!(watch.to_compare().saved_at_us, watch_saved, "watch clean={clean}");
            assert_eq!(watch.local_rescan(), clean);
            assert_eq!(fuse.to_compare().regions, hot());
        }
    }

    /// A clean watch restart: the link does not announce replicating while the rescan runs.
    #[test]
    fn clean_watch_restart_keeps_scanning() {
        let st = JobState { replica_id: Some(A), clean: true, ..JobState::default() };
        let start = StartPlan::decide(Left::found(Mode::Watch, &st, Some(T), Vec::new()));
        let planner = LinkPlanner::new(&start);
        assert_eq!(
            planner.on_welcome(Known::from(&st), &welcome(A, 8, false), true),
            WelcomePlan::Resume { catch_up_to: 8, then: Then::KeepScanning }
        );
    }

    #[test]
    fn an_overflow_resyncs_once_drained() {
        assert!(resync_due(true, 10, 10));
        assert!(!resync_due(true, 9, 10));
        assert!(!resync_due(false, 10, 10));
    }
}
