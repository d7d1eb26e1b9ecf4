//! Applying a run of new files on several threads at once ("lanes"), keeping every file's
//! op order.
//!
//! A mirror of small files sends, per file, a `Create`, a `Write` or two and a `SetAttr`;
//! applied one after the other on one thread, each is a few system calls waiting on the
//! kernel, and that thread bounds the mirror. Ops on *different new files* commute: none reads
//! or changes what another touches, except their directories' entries (each a name of its
//! own) and times (which the file system sets, whatever the order). So [`plan`] takes the
//! longest prefix of a batch made of creates of regular files and the data and attribute ops
//! on files created earlier in it, and gives every file's ops to one lane (by its name), in
//! order; [`run`] carries the lanes out on threads and reports each op's result.
//!
//! What stays on one thread, in stream order, and why:
//! - any op that changes names but a create (a rename, an unlink, a link, a mkdir...): the
//!   ops after it see the tree it leaves;
//! - data and attribute ops on files that existed before the run: two names may be one file
//!   (hard links), whose writes must not cross;
//! - everything, when the replica keeps history: each op's undo is taken from the state its
//!   predecessors left and journaled in stream order (a directory's creates form a chain
//!   through its times), or when a quota is measured op by op (see [`crate::Replica`]).
//!
//! After a kill in the middle of a run, its ops are applied again from the progress marker
//! on: each is exact to replay whatever else of the run was done, because its file is new
//! and no op after the run has touched it yet (the run's ops are all recorded in the progress
//! marker before anything after them is applied).

use std::collections::HashSet;
use std::hash::BuildHasher;

use doppel_fs::Beneath;
use doppel_proto::{Op, RelPath};

use crate::error::ApplyError;
use crate::ops::{OpenFile, apply_op_with};

/// Below this many ops a run is applied on the calling thread alone: starting threads costs
/// more than it saves.
pub const MIN_RUN: usize = 32;

/// The lane of each op of the longest prefix of `ops` that may be applied on `lanes`
/// threads at once (empty if shorter than [`MIN_RUN`] or if `lanes < 2`).
pub fn plan<'a>(ops: impl IntoIterator<Item = &'a Op>, lanes: usize) -> Vec<usize> {
    if lanes < 2 {
        return Vec::new();
    }
    let hasher = std::hash::RandomState::new();
    let mut created: HashSet<RelPath> = HashSet::new();
    let mut plan = Vec::new();
    for op in ops {
        let Some(path) = lane_path(op, &created) else { break };
        plan.push((hasher.hash_one(&path) % lanes as u64) as usize);
        if matches!(op, Op::Create { .. }) {
            created.insert(path);
        }
    }
    if plan.len() < MIN_RUN {
        plan.clear();
    }
    plan
}

/// The new file `op` acts on, if it may go to a lane after the ops already planned (whose
/// created files are `created`).
fn lane_path(op: &Op, created: &HashSet<RelPath>) -> Option<RelPath> {
    let (w, create) = match op {
        Op::Create { path, .. } => (path, true),
        Op::Write { path, .. }
        | Op::Truncate { path, .. }
        | Op::Fallocate { path, .. }
        | Op::SetAttr { path, .. } => (path, false),
        _ => return None,
    };
    // Checked as the op itself will check it (a name refused there ends the run here).
    let path = RelPath::try_from(w).ok().filter(|p| !p.is_root())?;
    match (create, created.contains(&path)) {
        (true, false) | (false, true) => Some(path),
        // A second create of one name, or an op on a file the run did not create.
        _ => None,
    }
}

/// What became of each op given to [`run`]: `None` for ops not carried out (an op before
/// them in their lane failed in a way that may pass, so they must wait for it).
pub type Results = Vec<Option<Result<(), ApplyError>>>;

/// Carries out `ops` (sequences `first..`) on the lanes `plan` gave them, the calling
/// thread taking lane 0. A lane stops at an error that may pass (space, I/O): that op and
/// the rest of its lane are left for the caller to retry in order; a refused op counts as
/// done, as it does on one thread.
pub fn run(root: &Beneath, first: u64, ops: &[&Op], plan: &[usize], devices: bool) -> Results {
    let lanes = plan.iter().max().map_or(0, |m| m + 1);
    let lane = |n: usize| {
        let mut open = OpenFile::default();
        let mut notes = None;
        let mut done = Vec::new();
        for (i, op) in ops.iter().enumerate().filter(|(i, _)| plan[*i] == n) {
            let r = apply_op_with(root, &mut open, &mut notes, first + i as u64, op, devices);
            let stop = matches!(r, Err(ref e) if !matches!(e, ApplyError::Refused { .. }));
            done.push((i, r));
            if stop {
                break;
            }
        }
        done
    };
    let mut results: Results = ops.iter().map(|_| None).collect();
    let lane = &lane;
    let finished: Vec<_> = std::thread::scope(|s| {
        let spawn = |n: usize| {
            std::thread::Builder::new().name(format!("doppel-lane{n}")).spawn_scoped(s, move || lane(n))
        };
        let others: Vec<_> = (1..lanes).map(|n| (n, spawn(n))).collect();
        let mut all = vec![lane(0)];
        for (n, h) in others {
            // No thread (the system is out of them): this one carries that lane out too.
            all.push(match h {
                Ok(h) => h.join().unwrap_or_default(),
                Err(_) => lane(n),
            });
        }
        all
    });
    for (i, r) in finished.into_iter().flatten() {
        results[i] = Some(r);
    }
    results
}

#[cfg(test)]
mod tests {
    use doppel_proto::{Attrs, Op, WirePath};

    use super::*;

    fn wire(p: &str) -> WirePath {
        WirePath(p.as_bytes().to_vec())
    }

    fn create(p: &str) -> Op {
        Op::Create { path: wire(p), mode: 0o644 }
    }

    fn write(p: &str) -> Op {
        Op::Write { path: wire(p), offset: 0, data: b"x".to_vec() }
    }

    fn files(n: usize) -> Vec<Op> {
        (0..n)
            .flat_map(|i| {
                let p = format!("d/f{i}");
                [create(&p), write(&p), Op::SetAttr { path: wire(&p), attrs: Attrs::default() }]
            })
            .collect()
    }

    /// Every op of a file goes to that file's lane; the run stops at the first op that must
    /// wait for what is before it.
    #[test]
    fn a_run_holds_new_files_whole_and_ends_where_order_matters() {
        let mut ops = files(20);
        ops.push(Op::Mkdir { path: wire("e"), mode: 0o755 });
        ops.extend(files(20));
        let plan = plan(&ops, 3);
        assert_eq!(plan.len(), 60, "the run ends at the mkdir");
        for f in plan.chunks(3) {
            assert!(f.iter().all(|&l| l == f[0] && l < 3), "one file, one lane: {f:?}");
        }
        let used: HashSet<_> = plan.iter().collect();
        assert!(used.len() > 1, "the files are spread over the lanes");
    }

    #[test]
    fn ops_on_files_the_run_did_not_create_end_it() {
        for stop in [
            write("old"),
            create("d/f3"),
            Op::Create { path: wire("d/./f99"), mode: 0o644 },
            Op::Mknod { path: wire("fifo"), mode: libc::S_IFIFO | 0o644, rdev: 0 },
            Op::Unlink { path: wire("d/f0") },
            Op::Create { path: wire("../x"), mode: 0o644 },
        ] {
            let mut ops = files(40);
            ops.push(stop.clone());
            ops.extend(files(2));
            let planned = plan(&ops, 2).len();
            assert_eq!(planned, 120, "{stop:?}");
        }
        assert_eq!(plan(&files(40), 1).len(), 0, "one lane: nothing to plan");
        assert_eq!(plan(&files(10), 2).len(), 0, "shorter than a run");
    }
}
