//! # doppel-failover: from a dead source to a running workload, and back
//!
//! - [`policy`]: what the target does for each source: how it watches it, when it fails it
//!   over, which addresses it takes over and which scripts it runs.
//! - [`monitor`]: is each source alive? (its link, and probes): the I/O around [`verdict`].
//! - [`verdict`]: the monitor's rules as a state machine without I/O.
//! - [`clock`]: the time the decisions are made on, real or virtual.
//! - [`probe`]: checks of a source besides its link (TCP connect, HTTP, a command).
//! - [`steps`]: failover and failback cutover, step by step, resumable.
//! - [`runner`]: the step sequencing, without I/O, over small traits.
//! - [`progress`]: the record of the steps done, so a rerun goes on where a run stopped.
//! - [`hooks`]: running the operator's scripts, and taking over and releasing addresses.
//! - [`events`]: the event log `doppel events` shows: every step, with times.
//! - [`manager`]: the [`Manager`], which ties these together for one target.
//! - [`rehearsal`]: test failover: each job's replica at a point as a writable view, with
//!   the test scripts run against it, while replication goes on.
//! - [`testview`]: such a view: a FUSE file system serving the point, under an overlay.
//! - [`reverse`]: the DR side of a failback: the replica sent back to its source with the
//!   ordinary pipeline, over connections the source opens.
//!
//! The source side of a failback lives with the agent (`doppel_agent::failback`): it runs on
//! the source, under the job's lock, and ends by handing the job to an ordinary agent.

pub mod alerts;
pub mod clock;
pub mod events;
pub mod hooks;
pub mod manager;
pub mod monitor;
pub mod policy;
pub mod probe;
pub mod progress;
pub mod rehearsal;
pub mod reverse;
pub mod runner;
pub mod steps;
pub mod testview;
pub mod verdict;

pub use events::{Event, EventLog};
pub use manager::{FailoverError, Manager, ManagerConfig, RunKind, SourceState, SourceStatus};
pub use policy::{Policy, Probe, SourcePolicy};
pub use steps::{PointChoice, Report, render};
