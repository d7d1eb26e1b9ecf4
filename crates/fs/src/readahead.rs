//! Reading small files ahead of a walk that reads them one after another.
//!
//! A comparison of a cold tree reads every file in walk order, one `read` at a time: each waits
//! for its own disk request, and the disk is idle between them (perf: 93% of the comparing
//! thread's switches were waits in `filemap_read`, 100,000 files of 0-99 bytes). A
//! [`ReadAhead`] runs a little ahead of the walk on another thread and asks the kernel to read
//! the start of each regular file the walk will reach (`posix_fadvise(WILLNEED)`, which queues
//! the reads without waiting for them), so the disk has many requests in hand and the
//! comparison's own reads find the pages already cached.
//!
//! It stays at most [`LEAD`] names ahead of the walk (counted over every name the walk lists
//! and reaches, so names the walk skips cannot stall it) and reads at most [`HEAD_BYTES`] of
//! each file: the page cache it fills is bounded, and a large file is left to the kernel's own
//! sequential readahead. Nothing it does is needed for correctness: any error is ignored.

use std::collections::VecDeque;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use parking_lot::{Condvar, Mutex};
use rustix::fs::{Advice, Mode, OFlags};

/// How many names the read-ahead may be ahead of the walk.
pub const LEAD: u64 = 512;

/// How much of each file is read ahead.
pub const HEAD_BYTES: u64 = 128 << 10;

/// One directory's names, in the order the walk reaches them, with whether each is (as far as
/// the directory entry says) a regular file.
struct Listing {
    dir: PathBuf,
    names: Vec<(Vec<u8>, bool)>,
    next: usize,
}

#[derive(Default)]
struct State {
    listings: VecDeque<Listing>,
    /// Names taken by the reader.
    taken: u64,
    /// Names the walk has reached.
    reached: u64,
    done: bool,
}

impl State {
    /// Takes the next listed name without reading it; false if none is listed.
    fn skip_one(&mut self) -> bool {
        let Some(l) = self.listings.front_mut() else { return false };
        l.next += 1;
        if l.next == l.names.len() {
            self.listings.pop_front();
        }
        self.taken += 1;
        true
    }
}

/// The walk's side and the reader's side of one read-ahead.
#[derive(Default)]
pub struct ReadAhead {
    state: Mutex<State>,
    changed: Condvar,
}

impl ReadAhead {
    /// A read-ahead with nothing listed yet.
    pub fn new() -> ReadAhead {
        ReadAhead::default()
    }

    /// The walk listed `dir`: `names` in the order it will reach them, each with whether its
    /// directory entry says it is a regular file.
    pub fn listed(&self, dir: &Path, names: Vec<(Vec<u8>, bool)>) {
        if names.is_empty() {
            return;
        }
        self.state.lock().listings.push_back(Listing { dir: dir.to_path_buf(), names, next: 0 });
        self.changed.notify_all();
    }

    /// The walk reached one more of the names it listed.
    pub fn reached(&self) {
        let mut s = self.state.lock();
        s.reached += 1;
        if s.taken.saturating_sub(s.reached) + 1 == LEAD {
            drop(s);
            self.changed.notify_all();
        }
    }

    /// The walk is over: [`ReadAhead::run`] returns.
    pub fn finish(&self) {
        self.state.lock().done = true;
        self.changed.notify_all();
    }

    /// Calls [`ReadAhead::finish`] when dropped.
    pub fn finish_on_drop(&self) -> Finish<'_> {
        Finish(self)
    }

    /// Reads ahead until [`ReadAhead::finish`]: the reader thread's body.
    pub fn run(&self) {
        while let Some((dir, name)) = self.next() {
            if let Some(name) = name {
                advise(&dir, &name);
            }
        }
    }

    /// The next name to read ahead (`None` inside: not a regular file), waiting while the
    /// reader is [`LEAD`] names ahead or has nothing listed; `None` once finished.
    fn next(&self) -> Option<(PathBuf, Option<Vec<u8>>)> {
        let mut s = self.state.lock();
        loop {
            if s.done {
                return None;
            }
            // Behind the walk: what it has reached it has read, so those names are dropped
            // unread (and the listings held stay those the walk itself holds).
            while s.taken < s.reached && s.skip_one() {}
            if s.taken.saturating_sub(s.reached) < LEAD
                && let Some(l) = s.listings.front_mut()
            {
                let (name, regular) = l.names[l.next].clone();
                let dir = l.dir.clone();
                s.skip_one();
                return Some((dir, regular.then_some(name)));
            }
            self.changed.wait(&mut s);
        }
    }
}

/// Finishes a [`ReadAhead`] when dropped.
pub struct Finish<'a>(&'a ReadAhead);

impl Drop for Finish<'_> {
    fn drop(&mut self) {
        self.0.finish();
    }
}

/// Queues a read of the start of `dir/name`, if it is still a regular file.
fn advise(dir: &Path, name: &[u8]) {
    let path = dir.join(std::ffi::OsStr::from_bytes(name));
    // Non-blocking and not following a symlink: a name replaced meanwhile by a FIFO or a link
    // costs nothing; the type is checked again before anything is read.
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let fd = match rustix::fs::open(&path, flags | OFlags::NOATIME, Mode::empty()) {
        Ok(fd) => fd,
        // Not the file's owner and without CAP_FOWNER: without O_NOATIME.
        Err(rustix::io::Errno::PERM) => match rustix::fs::open(&path, flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(_) => return,
        },
        Err(_) => return,
    };
    let regular = rustix::fs::fstat(&fd).is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFREG);
    if regular {
        let _ = rustix::fs::fadvise(&fd, 0, std::num::NonZeroU64::new(HEAD_BYTES), Advice::WillNeed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// The reader never gets more than LEAD names ahead of the walk, takes every listed name
    /// once, in order, and stops when finished.
    #[test]
    fn stays_within_its_lead_and_takes_every_name_once() {
        let ra = ReadAhead::new();
        let n = 3 * LEAD as usize;
        let names: Vec<(Vec<u8>, bool)> =
            (0..n).map(|i| (format!("f{i:05}").into_bytes(), i % 3 != 0)).collect();
        let taken = AtomicU64::new(0);
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut last = None;
                while let Some((_, name)) = ra.next() {
                    let t = taken.fetch_add(1, Ordering::SeqCst) + 1;
                    let reached = ra.state.lock().reached;
                    assert!(t <= reached + LEAD, "took {t} names with the walk at {reached}");
                    if let Some(name) = name {
                        assert!(last.as_ref().is_none_or(|l: &Vec<u8>| *l < name), "out of order");
                        last = Some(name);
                    }
                }
            });
            ra.listed(Path::new("/nonexistent"), names);
            for _ in 0..n {
                // The walk is slower than the reader: the reader must wait for it.
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
                let reached = ra.state.lock().reached;
                while taken.load(Ordering::SeqCst) < (reached + LEAD).min(n as u64) {
                    assert!(std::time::Instant::now() < deadline, "the reader stopped short of its lead");
                    std::thread::yield_now();
                }
                ra.reached();
            }
            ra.finish();
        });
        assert_eq!(taken.load(Ordering::SeqCst), n as u64);
    }

    /// A reader behind the walk skips what the walk has reached (it has been read), so the
    /// listings held never outgrow the walk's own.
    #[test]
    fn a_reader_behind_the_walk_skips_to_it() {
        let ra = ReadAhead::new();
        let names = |d: &str| (0..100).map(|i| (format!("{d}{i:03}").into_bytes(), true)).collect();
        ra.listed(Path::new("/a"), names("a"));
        ra.listed(Path::new("/b"), names("b"));
        for _ in 0..150 {
            ra.reached();
        }
        let (dir, name) = ra.next().expect("a name");
        assert_eq!((dir.as_path(), name.as_deref()), (Path::new("/b"), Some(&b"b050"[..])));
        assert_eq!(ra.state.lock().listings.len(), 1, "the first listing is dropped");
    }

    /// Advice on names that are gone, are directories or FIFOs is ignored without harm.
    #[test]
    fn odd_names_are_passed_over() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("file"), b"data").unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            dir.path().join("fifo"),
            rustix::fs::FileType::Fifo,
            Mode::from(0o600),
            0,
        )
        .unwrap();
        for name in ["file", "sub", "fifo", "gone"] {
            advise(dir.path(), name.as_bytes());
        }
        assert_eq!(std::fs::read(dir.path().join("file")).unwrap(), b"data");
    }
}
