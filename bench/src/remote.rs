//! doppel across the network: a fresh `doppel target` in one namespace and an agent in the
//! other protecting a tree to it, each with its own home under one work directory.

use std::path::{Path, PathBuf};

use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use doppel_testkit::{Compare, compare_trees};

use crate::agent::{Agent, JOB};
use crate::target::{TargetProc, identity};

/// The source's name on the target.
pub const SOURCE: &str = "src";

/// Where a target and an agent to it keep their state.
#[derive(Debug, Clone)]
pub struct Homes {
    /// The work directory.
    pub work: PathBuf,
}

impl Homes {
    /// Homes under `work`.
    pub fn new(work: &Path) -> Homes {
        Homes { work: work.to_path_buf() }
    }

    /// The agent's home.
    pub fn source(&self) -> PathBuf {
        self.work.join("source-home")
    }

    /// The target's home.
    pub fn target(&self) -> PathBuf {
        self.work.join("target-home")
    }

    /// The target's data directory.
    pub fn data(&self) -> PathBuf {
        self.work.join("target-data")
    }

    /// Where the target keeps the replica of the agent's job.
    pub fn replica(&self) -> PathBuf {
        self.data().join("replicas").join(SOURCE).join(JOB)
    }
}

/// Starts a target in namespace `ns` listening on `listen`, allowing the agent whose home is
/// `homes.source()` (its identity is created if needed) as [`SOURCE`], with the failover
/// settings `settings` in its `[[target.allow]]` section.
pub fn start_target(bin: &Path, ns: &str, homes: &Homes, listen: &str, settings: &str) -> Result<TargetProc> {
    let sid = identity(bin, &homes.source())?;
    let config = format!("[[target.allow]]\nname = \"{SOURCE}\"\nid = \"{sid}\"\n{settings}\n");
    TargetProc::start(bin, ns, &homes.target(), &homes.data(), listen, &config, &[])
}

/// Starts the agent in namespace `ns`: `doppel protect SRC --to TARGET --name bench EXTRA`.
pub fn start_agent(
    bin: &Path,
    ns: &str,
    homes: &Homes,
    src: &Path,
    t: &TargetProc,
    extra: &[&str],
) -> Result<Agent> {
    Agent::start_remote(bin, ns, &homes.source(), src, (&t.addr, &t.id), extra)
}

/// Waits until the agent has acknowledged everything it captured and `replica` equals `src`
/// (compared with `opts`).
pub fn wait_converged(
    agent: &mut Agent,
    src: &Path,
    replica: &Path,
    opts: Compare,
    timeout: Duration,
) -> Result<()> {
    let t = Instant::now();
    loop {
        agent.check_alive()?;
        if agent.status()?.is_some_and(|s| s.drained()) && compare_trees(src, replica, opts).is_ok() {
            return Ok(());
        }
        if t.elapsed() > timeout {
            let diffs = compare_trees(src, replica, opts).err().unwrap_or_default();
            bail!("the replica did not converge within {timeout:?}:\n{diffs}\n{}", agent.log_tail(20));
        }
        sleep(Duration::from_millis(50));
    }
}
