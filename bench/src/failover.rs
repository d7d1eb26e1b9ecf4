//! `failover`: the recovery time of an automatic failover, step by step (see
//! [`crate::rto`]), and the time and bytes of a failback after the workload changed part of
//! a 2 GiB tree on the DR side, against rsync (see [`crate::failback`]).

use std::process::Command;

use anyhow::{Result, bail};

use crate::machine::{self, Machine};
use crate::scratch::Scratch;
use crate::{FailoverArgs, agent, failback, failover_report, rto, tree};

/// Runs both measurements (or the one `--only` names) and prints the report.
pub fn main(args: &FailoverArgs) -> Result<()> {
    let doppel = agent::doppel_binary()?;
    machine::require_root()?;
    machine::require_rsync()?;
    if args.only.as_deref() != Some("failback") {
        require_sqlite3()?;
    }
    if args.runs == 0 {
        anyhow::bail!("--runs must be at least 1");
    }
    let scratch = Scratch::open(&args.dir)?;
    let machine = Machine::describe(&args.dir, &doppel)?;
    eprintln!("[bench] {}", machine.one_line());
    let rto = match args.only.as_deref() {
        None | Some("rto") => rto::run(args, &scratch, &doppel)?,
        _ => Vec::new(),
    };
    let (tree, fb) = match args.only.as_deref() {
        None | Some("failback") => {
            let tree = tree::ensure(&scratch, args.size)?;
            let fb = failback::run(args, &scratch, &doppel, &tree)?;
            (Some(tree), fb)
        }
        _ => (None, Vec::new()),
    };
    let report = failover_report::markdown(args, &machine, &rto, tree.as_ref(), &fb);
    crate::report::publish(&report, args.out.as_deref())?;
    if !args.keep {
        scratch.remove()?;
    }
    Ok(())
}

/// Fails with the fix when the `sqlite3` shell is missing: the recovery-time workload is a
/// SQLite database, checked and queried by the failover script.
fn require_sqlite3() -> Result<()> {
    match Command::new("sqlite3").arg("-version").output() {
        Ok(o) if o.status.success() => Ok(()),
        _ => {
            bail!("sqlite3 is not installed (or does not run); install it, e.g. `apt-get install -y sqlite3`")
        }
    }
}
