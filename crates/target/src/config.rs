//! Target configuration.

use std::path::PathBuf;
use std::time::Duration;

use doppel_link::NodeId;
use doppel_proto::MAX_FRAME_DEFAULT;

/// A source allowed to connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedSource {
    /// The name its replicas are filed under (`DATA/replicas/NAME/JOB`).
    pub name: String,
    /// Its identity (`doppel id` on the source).
    pub id: NodeId,
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
    /// Sources that may connect.
    pub allowed: Vec<AllowedSource>,
    /// Largest frame accepted.
    pub max_frame: u32,
    /// Heartbeat interval; a peer silent for three intervals is presumed dead.
    pub heartbeat: Duration,
    /// Time allowed for the TLS handshake and the Hello.
    pub handshake_timeout: Duration,
    /// Longest time ops may wait on the target before being made durable and acknowledged.
    pub commit_interval: Duration,
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
            commit_interval: Duration::from_millis(100),
        }
    }

    /// The name of an allowed identity.
    pub fn name_of(&self, id: &NodeId) -> Option<&str> {
        self.allowed.iter().find(|a| a.id == *id).map(|a| a.name.as_str())
    }
}

/// Whether `s` can name a source or a job: it becomes a directory name on the target, so it is
/// restricted to letters, digits, `.`, `_` and `-`, does not start with `.`, and is at most 64
/// characters long.
pub fn valid_name(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 64 {
        return Err(format!("{s:?} must be 1 to 64 characters long"));
    }
    if s.starts_with('.') {
        return Err(format!("{s:?} must not start with a dot"));
    }
    if let Some(c) = s.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(format!("{s:?} contains {c:?}; use letters, digits, '.', '_' or '-'"));
    }
    Ok(())
}
