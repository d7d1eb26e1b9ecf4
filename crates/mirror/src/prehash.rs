//! Hashing the source's files while the other side lists its replica.
//!
//! A difference mirror against a full replica (a failback, an index lost) used to run in two
//! halves: the target read and hashed its whole replica for the listing while the source
//! waited, then the source read and hashed its whole tree while the target waited. rsync's
//! delta transfer hashes both copies at once. So does this: while the listing arrives, each
//! regular file it names (and does not vouch for) is offered to a [`Prehash`] thread, which
//! hashes the source's file of that name into a throwaway index. The comparison then takes a
//! file's hashes from there ([`Prehashed::blocks`]) when the file is provably unchanged since
//! (the same stat, and no change within the file system's clock granularity of the hashing's
//! start: [`IndexEntry::settled`]), and reads only the blocks that differ from the listing's.
//!
//! The hashing never holds the listing up: a name offered while the thread is far behind is
//! left to the comparison, and the thread stops when the listing ends.

use std::fs::File;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use doppel_fs::Meta;
use doppel_proto::{BLOCK_SIZE, BlockHash, Entry, EntryKind, RelPath};

use crate::error::MirrorError;
use crate::index::{Index, IndexEntry, Snapshot};
use crate::reconcile::ReconcileStats;

/// Names waiting for the hashing thread; past this, offered names are left to the comparison.
const QUEUE: usize = 4096;

/// The hashing thread, while a listing arrives.
pub struct Prehash {
    queue: Option<SyncSender<RelPath>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<Index, MirrorError>>>,
    started_us: u64,
}

impl Prehash {
    /// Starts hashing files of the tree at `root` as they are offered, into a throwaway index
    /// beneath `scratch` with a page cache of `cache_bytes`; bytes read count in `stats`.
    pub fn start(
        root: &Path,
        scratch: &Path,
        cache_bytes: usize,
        stats: Arc<ReconcileStats>,
    ) -> Result<Prehash, MirrorError> {
        let index = Index::scratch_in(scratch, cache_bytes)?;
        let started_us = now_us();
        let (tx, rx) = sync_channel(QUEUE);
        let stop = Arc::new(AtomicBool::new(false));
        let hasher = Hasher { root: root.to_path_buf(), stop: stop.clone(), stats, started_us };
        let thread = std::thread::Builder::new()
            .name("prehash".into())
            .spawn(move || hasher.run(index, rx))
            .map_err(|source| MirrorError::Io { path: root.to_path_buf(), source })?;
        Ok(Prehash { queue: Some(tx), stop, thread: Some(thread), started_us })
    }

    /// Offers the file a listing entry names, if hashing it ahead can spare the comparison a
    /// read: a regular file's first entry, with content, not vouched for. Never waits.
    pub fn offer(&self, e: &Entry) {
        if e.kind != EntryKind::File || e.first_block != 0 || e.vouched || e.size == 0 {
            return;
        }
        if let (Some(q), Ok(path)) = (&self.queue, RelPath::try_from(&e.path)) {
            let _ = q.try_send(path);
        }
    }

    /// Stops hashing (within a block) and returns what was hashed.
    pub fn finish(mut self) -> Result<Prehashed, MirrorError> {
        let mut index = self.stop_thread()?;
        let view = index.snapshot()?;
        Ok(Prehashed { view, _index: index, started_us: self.started_us })
    }

    fn stop_thread(&mut self) -> Result<Index, MirrorError> {
        self.stop.store(true, Ordering::Relaxed);
        self.queue = None;
        let thread =
            self.thread.take().ok_or_else(|| MirrorError::Store("the hashing thread is gone".into()))?;
        thread.join().map_err(|_| MirrorError::Store("the hashing thread panicked".into()))?
    }
}

impl Drop for Prehash {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.stop_thread();
        }
    }
}

/// What a [`Prehash`] hashed.
pub struct Prehashed {
    view: Snapshot,
    /// Holds the store (and its directory) while the view is read.
    _index: Index,
    started_us: u64,
}

impl Prehashed {
    /// The block hashes of the source's file `path`, whose stat is now `meta`, if it was
    /// hashed and has not changed since before the hashing began.
    pub fn blocks(&self, path: &RelPath, meta: &Meta) -> Result<Option<Vec<BlockHash>>, MirrorError> {
        let Some(e) = self.view.get(path)? else { return Ok(None) };
        let fits = e.blocks.len() as u64 == meta.size.div_ceil(BLOCK_SIZE);
        Ok((fits && e.settled(meta, self.started_us)).then_some(e.blocks))
    }
}

/// The hashing thread's side.
struct Hasher {
    root: PathBuf,
    stop: Arc<AtomicBool>,
    stats: Arc<ReconcileStats>,
    started_us: u64,
}

impl Hasher {
    fn run(self, mut index: Index, names: Receiver<RelPath>) -> Result<Index, MirrorError> {
        for path in names.iter() {
            if self.stop.load(Ordering::Relaxed) {
                break;
            }
            match self.hash(&path) {
                Ok(Some(e)) => index.insert(&path, &e)?,
                Ok(None) => {}
                // Unreadable now, or stopped midway: the comparison reads it.
                Err(e) => tracing::debug!(path = ?path, error = %e, "not hashed ahead"),
            }
        }
        Ok(index)
    }

    /// The entry of `path` with its blocks, if it is a regular file that did not change
    /// while (nor shortly before) it was read.
    fn hash(&self, path: &RelPath) -> io::Result<Option<IndexEntry>> {
        let file = File::options()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(self.root.join(path.as_path()))?;
        let meta = Meta::from_std(&file.metadata()?);
        let mut e = IndexEntry::from_meta(&meta);
        if meta.kind != EntryKind::File || !e.settled(&meta, self.started_us) {
            return Ok(None);
        }
        let count = meta.size.div_ceil(BLOCK_SIZE);
        let mut blocks = Vec::with_capacity(count as usize);
        doppel_fs::hash::hash_blocks_sparse(&file, meta.size, 0, count, |h| {
            if self.stop.load(Ordering::Relaxed) {
                return Err(io::Error::new(io::ErrorKind::Interrupted, "the listing ended"));
            }
            blocks.push(h);
            Ok(())
        })?;
        ReconcileStats::add(&self.stats.bytes_hashed, meta.size);
        if !e.unchanged(&Meta::from_std(&file.metadata()?)) {
            return Ok(None);
        }
        e.blocks = blocks;
        Ok(Some(e))
    }
}

fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}
