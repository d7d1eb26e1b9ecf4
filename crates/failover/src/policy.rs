//! What the target does for each source.

use std::time::Duration;

/// Whether a failed source fails over by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Fail over once the source has been failed for the threshold.
    Auto,
    /// Alert only (the notify command, status); an operator runs `doppel failover`.
    Manual,
}

/// A check of a source besides its link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// A TCP connection to `HOST:PORT` succeeds.
    Tcp(String),
    /// An HTTP GET of the URL answers 2xx or 3xx.
    Http(String),
    /// A shell command exits 0.
    Command(String),
}

/// The failover settings of one source.
#[derive(Debug, Clone)]
pub struct SourcePolicy {
    /// The source's name.
    pub name: String,
    /// Auto or manual.
    pub policy: Policy,
    /// How often the source is checked.
    pub interval: Duration,
    /// Checks in a row that must fail before the source counts as failed.
    pub missed: u32,
    /// Checks besides the link; the source is failed only when the link and every probe say
    /// so.
    pub probes: Vec<Probe>,
    /// Run (with `DOPPEL_SOURCE` and `DOPPEL_EVENT`) when the source is found failed, and on
    /// failover and failback.
    pub notify: Option<String>,
    /// Addresses (`10.0.0.5/24`) the target takes over on failover.
    pub addresses: Vec<String>,
    /// The interface they go on.
    pub interface: Option<String>,
    /// Run before taking over (stop here if one fails).
    pub pre_failover: Vec<String>,
    /// Run per job to start the workload on the replica.
    pub failover: Vec<String>,
    /// Run per job at failback cutover, to stop the workload on the replica.
    pub stop_workload: Vec<String>,
    /// Bandwidth of each job's failback stream, in bytes per second (0: unlimited): the
    /// stream shares the production link with whatever else runs there.
    pub failback_limit: u64,
    /// Run per job when a test failover starts, against its view (`DOPPEL_REPLICA`,
    /// `DOPPEL_TEST=1`).
    pub test_failover: Vec<String>,
    /// Run per job when a test failover ends, before its view goes.
    pub test_failover_end: Vec<String>,
    /// The recovery point objective: the notify command hears when a replica's lag passes it.
    pub rpo: Option<Duration>,
}

impl SourcePolicy {
    /// Manual policy and no scripts: what a source without failover settings gets (`doppel
    /// failover` still works).
    pub fn manual(name: &str) -> SourcePolicy {
        SourcePolicy {
            name: name.to_string(),
            policy: Policy::Manual,
            interval: Duration::from_secs(5),
            missed: 6,
            probes: Vec::new(),
            notify: None,
            addresses: Vec::new(),
            interface: None,
            pre_failover: Vec::new(),
            failover: Vec::new(),
            stop_workload: Vec::new(),
            failback_limit: 0,
            test_failover: Vec::new(),
            test_failover_end: Vec::new(),
            rpo: None,
        }
    }
}
