//! Target configuration.

use std::path::PathBuf;
use std::time::Duration;

use doppel_apply::PrivilegePolicy;
use doppel_link::NodeId;
use doppel_proto::{Echoed, MAX_FRAME_DEFAULT};

use crate::admission::HandshakeLimits;

/// A source allowed to connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedSource {
    /// The name its replicas are filed under (`DATA/replicas/NAME/JOB`).
    pub name: String,
    /// Its identity (`doppel id` on the source).
    pub id: NodeId,
    /// What its ops may do that grants privilege on this target.
    pub privileges: PrivilegePolicy,
    /// How much of this target it may take.
    pub limits: SourceLimits,
    /// How much history its replicas keep (`None`: the target's [`TargetConfig::history`]).
    pub history: Option<HistoryPolicy>,
}

/// How much history a replica keeps: `None` keeps none.
pub type HistoryPolicy = Option<doppel_apply::retention::Retention>;

/// How much of a target one source may take (`None`: no limit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SourceLimits {
    /// Allocated bytes and inodes of all its replicas together.
    pub quota: doppel_apply::quota::Limits,
    /// Jobs (replicas) it may have on this target.
    pub max_jobs: Option<u32>,
}

impl AllowedSource {
    /// A source with the default privilege policy and no limits.
    pub fn new(name: impl Into<String>, id: NodeId) -> AllowedSource {
        AllowedSource {
            name: name.into(),
            id,
            privileges: PrivilegePolicy::default(),
            limits: SourceLimits::default(),
            history: None,
        }
    }

    /// With its own history retention.
    pub fn with_history(mut self, h: HistoryPolicy) -> AllowedSource {
        self.history = Some(h);
        self
    }

    /// This source with privilege policy `p`.
    pub fn with_privileges(self, p: PrivilegePolicy) -> AllowedSource {
        AllowedSource { privileges: p, ..self }
    }

    /// This source with limits `l`.
    pub fn with_limits(self, l: SourceLimits) -> AllowedSource {
        AllowedSource { limits: l, ..self }
    }
}

/// Where replicas and their state live.
#[derive(Debug, Clone)]
pub enum Layout {
    /// A data directory for many sources: `replicas/SOURCE/JOB/` holds nothing but the
    /// replica tree; `state/SOURCE/JOB/` holds its state.
    DataDir(PathBuf),
    /// One replica at an explicit place (the embedded target of `doppel protect DIR --to
    /// LOCAL_DIR`): the tree is `replica` itself, state goes to `state`.
    Embedded {
        /// The replica tree.
        replica: PathBuf,
        /// Its state directory.
        state: PathBuf,
    },
}

impl Layout {
    /// The replica tree and state directory of `job` from `source`.
    pub fn paths(&self, source: &str, job: &str) -> (PathBuf, PathBuf) {
        match self {
            Layout::DataDir(d) => {
                (d.join("replicas").join(source).join(job), d.join("state").join(source).join(job))
            }
            Layout::Embedded { replica, state } => (replica.clone(), state.clone()),
        }
    }
}

/// Everything a target needs to run.
#[derive(Debug, Clone)]
pub struct TargetConfig {
    /// Where replicas live.
    pub layout: Layout,
    /// Sources that may connect when the target starts: [`crate::Target::new`] moves them
    /// into the live list ([`crate::Target::allowed`]), which a reload replaces.
    pub allowed: Vec<AllowedSource>,
    /// Largest frame accepted.
    pub max_frame: u32,
    /// Heartbeat interval; a peer silent for three intervals is presumed dead.
    pub heartbeat: Duration,
    /// Time allowed for the TLS handshake and the Hello, together: a peer that has not sent
    /// its Hello by then is dropped.
    pub handshake_timeout: Duration,
    /// Caps on connections in their handshake (not yet authenticated), in total and per
    /// address; connections over them are closed at once (see [`crate::admission`]).
    pub handshakes: HandshakeLimits,
    /// Longest time ops may wait on the target before being made durable and acknowledged.
    pub commit_interval: Duration,
    /// How much history replicas keep unless their source says otherwise.
    pub history: HistoryPolicy,
    /// Block hashes of replica files known without reading them, for listings: set by the
    /// source side of a failback, whose replica is its own tree and whose agent's index
    /// describes it; `None` everywhere else (every listed file is read).
    pub known_blocks: Option<std::sync::Arc<dyn doppel_apply::listing::KnownBlocks>>,
    /// The names of each replica that belong to the stream: set by the source side of a
    /// failback, whose replica is its own tree and keeps the names its job's rules leave out
    /// (never listed, removed or replaced: see [`doppel_apply::outside`]); everything
    /// everywhere else.
    pub selection: doppel_fs::Selection,
    /// Threads each replica without history applies a run of new files on (`None`: one, the
    /// session's own; see [`doppel_apply::lanes`]).
    pub apply_threads: Option<usize>,
}

impl TargetConfig {
    /// Defaults for a layout.
    pub fn new(layout: Layout) -> TargetConfig {
        TargetConfig {
            layout,
            allowed: Vec::new(),
            max_frame: MAX_FRAME_DEFAULT,
            heartbeat: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
            handshakes: HandshakeLimits::default(),
            commit_interval: Duration::from_millis(100),
            history: Some(doppel_apply::history::DEFAULT_RETENTION),
            known_blocks: None,
            selection: doppel_fs::Selection::all(),
            apply_threads: None,
        }
    }
}

/// Why a string cannot name a source or a job (see [`valid_name`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Empty or longer than 64 characters.
    #[error("{0:?} must be 1 to 64 characters long")]
    Length(Echoed),
    /// Starts with a dot (hidden, or `.`/`..`).
    #[error("{0:?} must not start with a dot")]
    LeadingDot(Echoed),
    /// Starts with a dash: a name that reads as an option to every command it is passed to
    /// (scripts, `doppel failover NAME`).
    #[error("{0:?} must not start with '-'")]
    LeadingDash(Echoed),
    /// Contains a character that is not allowed.
    #[error("{name:?} contains {bad:?}; use letters, digits, '.', '_' or '-'")]
    Character {
        /// The name (bounded: a name from the wire may be as long as a frame).
        name: Echoed,
        /// The first character not allowed.
        bad: char,
    },
}

/// Whether `s` can name a source or a job: it becomes a directory name on the target, so it is
/// restricted to letters, digits, `.`, `_` and `-`, does not start with `.` or `-`, and is at
/// most 64 characters long.
pub fn valid_name(s: &str) -> Result<(), NameError> {
    if s.is_empty() || s.len() > 64 {
        return Err(NameError::Length(Echoed::new(s)));
    }
    if s.starts_with('.') {
        return Err(NameError::LeadingDot(Echoed::new(s)));
    }
    if s.starts_with('-') {
        return Err(NameError::LeadingDash(Echoed::new(s)));
    }
    if let Some(bad) = s.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(NameError::Character { name: Echoed::new(s), bad });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "web-1", "a-", "1-2", "db_2.prod", &"x".repeat(64)] {
            assert_eq!(valid_name(ok), Ok(()), "{ok:?}");
        }
        let table = [
            ("", "\"\" must be 1 to 64 characters long"),
            (&*"x".repeat(65), "must be 1 to 64 characters long"),
            (".hidden", "\".hidden\" must not start with a dot"),
            ("..", "must not start with a dot"),
            ("-rf", "\"-rf\" must not start with '-'"),
            ("--help", "must not start with '-'"),
            ("a/b", "\"a/b\" contains '/'; use letters, digits, '.', '_' or '-'"),
            ("caf\u{e9}", "contains '\u{e9}'"),
            // A hostile name is echoed bounded, with its length.
            (&*"x".repeat(60 << 20), "\"… (62914560 bytes) must be 1 to 64 characters long"),
        ];
        for (name, want) in table {
            let e = valid_name(name).expect_err(name).to_string();
            assert!(e.contains(want) && e.len() < 400, "{:?}: {e}", doppel_proto::Truncated(name));
        }
    }

    #[test]
    fn layout_paths() {
        let d = Layout::DataDir(PathBuf::from("/data"));
        assert_eq!(
            d.paths("s", "j"),
            (PathBuf::from("/data/replicas/s/j"), PathBuf::from("/data/state/s/j"))
        );
        let e = Layout::Embedded { replica: PathBuf::from("/r"), state: PathBuf::from("/st") };
        assert_eq!(e.paths("any", "thing"), (PathBuf::from("/r"), PathBuf::from("/st")));
    }
}
