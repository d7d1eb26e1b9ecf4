//! From watch hints to reconciler work.
//!
//! Renames are handled the moment they are seen, so they go on the wire as renames and in
//! their place in the order of events. Everything else only marks a name as dirty; dirty names
//! are reconciled together when the queue is flushed, which coalesces the many events a single
//! save produces into one look at the file.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use doppel_capture::FsEvent;
use doppel_proto::RelPath;

use crate::error::MirrorError;
use crate::reconcile::{OpSink, Reconciler};

/// How a dirty name must be looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Depth {
    /// The name itself (a new directory is still scanned in full).
    Entry,
    /// The whole subtree (after lost events, or a directory moved in).
    Tree,
}

/// How long a name gone from the source together with its parent directory waits for the
/// event that explains it (the rename or removal of an ancestor, normally read at the next
/// flush) before it is taken as gone. Only a safety net: a removal reconciled first takes the
/// name out of the index, which ends the wait at once.
const ORPHAN_WAIT: Duration = Duration::from_secs(10);

/// Names waiting to be reconciled.
#[derive(Debug, Default)]
pub struct EventQueue {
    dirty: BTreeMap<RelPath, Depth>,
    /// Dirty names whose parent directory had vanished from the source when their turn came
    /// (see [`Reconciler::orphaned`]), with when that was first seen. They stay dirty: the
    /// ancestor's rename, when its event arrives, moves them to their new names.
    orphans: HashMap<RelPath, Instant>,
    since: Option<Instant>,
    /// Wall-clock time of the oldest pending mark, µs since the epoch.
    since_us: Option<u64>,
}

impl EventQueue {
    /// An empty queue.
    pub fn new() -> EventQueue {
        EventQueue::default()
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.dirty.is_empty()
    }

    /// Number of dirty names.
    pub fn len(&self) -> usize {
        self.dirty.len()
    }

    fn mark(&mut self, path: RelPath, depth: Depth) {
        self.since.get_or_insert_with(Instant::now);
        self.since_us.get_or_insert_with(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_micros() as u64)
                .unwrap_or(0)
        });
        let d = self.dirty.entry(path).or_insert(depth);
        *d = (*d).max(depth);
    }

    /// Marks the whole tree for a rescan.
    pub fn rescan_all(&mut self) {
        self.mark(RelPath::root(), Depth::Tree);
    }

    /// Takes one event. Renames may emit ops at once.
    pub fn push(
        &mut self,
        ev: FsEvent,
        rec: &mut Reconciler,
        sink: &mut dyn OpSink,
    ) -> Result<(), MirrorError> {
        match ev {
            FsEvent::Modified(p) | FsEvent::Closed(p) | FsEvent::Attrib(p) => self.mark(p, Depth::Entry),
            FsEvent::Created { path, .. } | FsEvent::Removed { path, .. } => self.mark(path, Depth::Entry),
            FsEvent::Rescan(p) => self.mark(p, Depth::Tree),
            FsEvent::Renamed { from, to, is_dir } => {
                // Pending work on names that moved now concerns their new names.
                let moved: Vec<RelPath> =
                    self.dirty.keys().filter(|k| k.starts_with(&from)).cloned().collect();
                for k in moved {
                    let d = self.dirty.remove(&k).expect("key just listed");
                    self.orphans.remove(&k);
                    self.mark(k.rebase(&from, &to).expect("beneath the old name"), d);
                }
                if rec.rename(&from, &to, sink)? {
                    // Cheap when unchanged; catches a change made between events.
                    self.mark(to, Depth::Entry);
                } else {
                    self.mark(from, Depth::Entry);
                    self.mark(to, if is_dir { Depth::Tree } else { Depth::Entry });
                }
            }
        }
        Ok(())
    }

    /// When the oldest pending change was noticed (µs since the epoch): the capture time its
    /// ops carry, so replication lag counts the settle time too.
    pub fn oldest_us(&self) -> Option<u64> {
        self.since_us
    }

    /// Whether the oldest dirty mark is older than `debounce`.
    pub fn due(&self, debounce: Duration) -> bool {
        self.since.is_some_and(|s| s.elapsed() >= debounce)
    }

    /// Reconciles every dirty name (parents before children; a subtree scan covers the names
    /// beneath it), then lets the reconciler settle directory times. A name gone from the
    /// source along with its parent directory stays dirty for the event that explains it (up to
    /// [`ORPHAN_WAIT`]).
    pub fn flush(&mut self, rec: &mut Reconciler, sink: &mut dyn OpSink) -> Result<(), MirrorError> {
        self.flush_waiting(rec, sink, ORPHAN_WAIT)
    }

    /// [`EventQueue::flush`] with no name left waiting: when the agent stops, or before a
    /// comparison of the whole tree that settles whatever the events said.
    pub fn flush_all(&mut self, rec: &mut Reconciler, sink: &mut dyn OpSink) -> Result<(), MirrorError> {
        self.flush_waiting(rec, sink, Duration::ZERO)
    }

    fn flush_waiting(
        &mut self,
        rec: &mut Reconciler,
        sink: &mut dyn OpSink,
        wait: Duration,
    ) -> Result<(), MirrorError> {
        let dirty = std::mem::take(&mut self.dirty);
        let (since, since_us) = (self.since.take(), self.since_us.take());
        let mut covered: Option<RelPath> = None;
        let mut pending = dirty.into_iter();
        while let Some((path, depth)) = pending.next() {
            if covered.as_ref().is_some_and(|c| path.starts_with(c)) {
                continue;
            }
            let r = match self.waits(&path, depth, wait, rec) {
                Ok(true) => Ok(()),
                Ok(false) if depth == Depth::Tree => rec.sync_tree(&path, sink),
                Ok(false) => rec.sync_entry(&path, sink),
                Err(e) => Err(e),
            };
            if let Err(e) = r {
                // Nothing is dropped: the name that failed and those not reached stay dirty.
                self.dirty.insert(path, depth);
                self.dirty.extend(pending);
                self.since = since;
                self.since_us = since_us;
                return Err(e);
            }
            if depth == Depth::Tree && !self.dirty.contains_key(&path) {
                covered = Some(path);
            }
        }
        // A wait ends with its name: reconciled, or moved by a rename.
        let dirty = &self.dirty;
        self.orphans.retain(|k, _| dirty.contains_key(k));
        if !self.dirty.is_empty() {
            // Looked at again at the next flush, after the events read meanwhile.
            self.since = Some(Instant::now());
            self.since_us = since_us;
        }
        rec.finish(sink)
    }

    /// Whether `path` waits for the event that explains its parent's disappearance (it is
    /// then back in the dirty set, and in `self.orphans` with when the wait began).
    fn waits(
        &mut self,
        path: &RelPath,
        depth: Depth,
        wait: Duration,
        rec: &Reconciler,
    ) -> Result<bool, MirrorError> {
        let first = self.orphans.get(path).copied();
        if wait.is_zero() || first.is_some_and(|t| t.elapsed() >= wait) || !rec.orphaned(path)? {
            return Ok(false);
        }
        self.dirty.insert(path.clone(), depth);
        self.orphans.insert(path.clone(), first.unwrap_or_else(Instant::now));
        Ok(true)
    }

    /// Takes every dirty name out of the queue (to be recorded elsewhere).
    pub fn take_paths(&mut self) -> Vec<RelPath> {
        self.orphans.clear();
        self.since = None;
        self.since_us = None;
        std::mem::take(&mut self.dirty).into_keys().collect()
    }
}
