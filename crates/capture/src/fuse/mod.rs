//! The `fuse` capture mode: an in-place pass-through mount that sees every change.
//!
//! The agent opens the job root, then mounts a FUSE file system over the same path and serves
//! the underlying tree through the directory handle it kept, so applications keep their paths
//! and every mutating call (with its offset and bytes) is performed by the daemon on the real
//! tree and turned into ops in the order the effects landed (see [`locks`]). Before a change
//! is made, the region it touches is recorded through [`CaptureSink::prepare`] (the agent keeps
//! an on-disk activity log of hot regions); after it, its ops are sequenced through
//! [`CaptureSink::commit`].

mod fs;
pub mod locks;
pub mod mounts;
pub mod nodes;

use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use doppel_proto::{Op, RelPath};

pub use locks::Locks;
pub use mounts::{Existing, abort_connection, open_files_under, recover_stale};

/// Raises this process's open-file limit as far as it may go, quietly: the soft limit to the
/// hard one, and, where permitted (root with `CAP_SYS_RESOURCE`), both to the kernel's
/// ceiling (`/proc/sys/fs/nr_open`). The capture daemon needs a descriptor for every file an
/// application holds open through the mount, on top of its own; the usual soft default (1,024)
/// would make applications fail with "Too many open files" long before the machine is out of
/// descriptors. Returns the soft limit in force afterwards.
pub fn raise_open_file_limit() -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(1 << 20);
    let now = getrlimit(Resource::Nofile);
    let hard = now.maximum.unwrap_or(ceiling);
    if hard < ceiling
        && setrlimit(Resource::Nofile, Rlimit { current: Some(ceiling), maximum: Some(ceiling) }).is_ok()
    {
        return ceiling;
    }
    let soft = hard.min(ceiling);
    if now.current.is_some_and(|c| c < soft) {
        let _ = setrlimit(Resource::Nofile, Rlimit { current: Some(soft), maximum: now.maximum });
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// A region about to change, recorded durably before the change is made.
#[derive(Debug, Clone, Copy)]
pub enum Dirty<'a> {
    /// Bytes of a file.
    Extent {
        /// The file.
        path: &'a RelPath,
        /// First byte.
        offset: u64,
        /// Number of bytes.
        len: u64,
    },
    /// A name (removed, renamed, or its attributes changed).
    Name(&'a RelPath),
    /// A name about to be made (a file, directory, node, symlink or hard link that does not
    /// exist yet). Told apart from [`Dirty::Name`] because a new name can be found again after
    /// a crash by looking at its directory (its inode's change time is recent), so one record
    /// for the directory can stand for every name made in it.
    New(&'a RelPath),
    /// A name about to be removed. Like [`Dirty::New`], its directory's record can stand for
    /// it: after a crash, names the replica's directory holds and the source's does not are
    /// found by listing both.
    Gone(&'a RelPath),
}

/// Where the mount sends what it captures.
pub trait CaptureSink: Send + Sync + 'static {
    /// Proof that [`CaptureSink::prepare`] ran; given back to [`CaptureSink::commit`].
    type Prepared: Send;

    /// Records, durably, that these regions are about to change. An error refuses the change
    /// (the application gets `EIO`): a change that could be lost in a crash must not happen.
    fn prepare(&self, dirty: &[Dirty<'_>]) -> io::Result<Self::Prepared>;

    /// Sequences the ops describing a change that was made; returns the last sequence.
    fn commit(&self, prepared: Self::Prepared, ops: Vec<Op>) -> io::Result<u64>;

    /// The application asked for durability up to `seq` (`fsync`, `O_SYNC`): in sync mode this
    /// waits until the target acknowledged it.
    fn barrier(&self, seq: u64);
}

/// Options of a mount.
#[derive(Debug, Clone)]
pub struct FuseOptions {
    /// Kernel request threads.
    pub threads: usize,
    /// Use kernel passthrough for read-only opens when the kernel offers it.
    pub passthrough: bool,
    /// At stop, how long files still open on the detached mount keep being served (and
    /// captured) before the connection is aborted.
    pub drain: Duration,
    /// Kernel write-back caching (`FUSE_WRITEBACK_CACHE`): buffered writes complete in the
    /// page cache and reach the daemon later, in larger requests and in whatever order the
    /// kernel writes pages back. Much faster for small writes, but the op stream then keeps
    /// only what a local disk keeps: `fsync`, `fdatasync`, `msync` and `close` make the
    /// kernel write the file's dirty pages back before the daemon sees the call, so every
    /// write an `fsync` covered is sequenced before it, and nothing written after it returned
    /// can precede it. Between two such points, writes may be reordered (within and across
    /// files), and a killed agent loses what the kernel had not yet written back, on the
    /// source as well. Off by default: without it every write is sequenced in the order it
    /// happened.
    pub writeback: bool,
    /// With the write-back cache: how many bytes of the mount's pages may be dirty before
    /// writers are throttled (the mount's `/sys/class/bdi/*/max_bytes`). The kernel gives a
    /// FUSE mount 1 % of the dirty threshold (about 48 MiB on a 24 GiB machine), far less than
    /// a disk gets, which makes writers wait for the daemon after a few thousand pages; this
    /// lets the mount hold as much as a disk would, bounded. `None` keeps the kernel's limit.
    pub writeback_dirty: Option<u64>,
}

impl Default for FuseOptions {
    fn default() -> Self {
        FuseOptions {
            threads: 8,
            passthrough: true,
            drain: Duration::from_secs(5),
            writeback: false,
            writeback_dirty: Some(1 << 30),
        }
    }
}

/// A live mount. Dropping it unmounts: the mount is detached at once (new opens reach the
/// underlying tree), files still open on it are served for [`FuseOptions::drain`], then the
/// connection is aborted so that neither open files nor copies of the mount in other mount
/// namespaces can hold the stop.
pub struct FuseCapture {
    root: PathBuf,
    /// The mount's device, naming its connection in `fusectl`.
    dev: u64,
    drain: Duration,
    root_fd: Arc<OwnedFd>,
    locks: Arc<Locks>,
    session: Option<fuser::BackgroundSession>,
    passthrough: Arc<std::sync::atomic::AtomicBool>,
    writeback: Arc<std::sync::atomic::AtomicBool>,
}

impl FuseCapture {
    /// Opens `root`, then mounts over it. `root` must be canonical. Recovers a stale mount
    /// left by a killed agent first, and warns about files that processes opened before the
    /// mount (their writes would bypass capture).
    pub fn mount<S: CaptureSink>(root: &Path, sink: Arc<S>, opts: FuseOptions) -> io::Result<FuseCapture> {
        if recover_stale(root)? == Existing::RecoveredStale {
            tracing::warn!(root = %root.display(), "recovered a stale doppel mount left by an agent that did not stop cleanly");
        }
        for (pid, path) in open_files_under(root) {
            tracing::warn!(
                pid,
                path = %path.display(),
                "file opened before the capture mount: writes through this descriptor bypass capture until it is reopened"
            );
        }
        let root_fd = Arc::new(
            rustix::fs::open(
                root,
                rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
                0.into(),
            )
            .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("{}: {e}", root.display())))?,
        );
        let locks = Arc::new(Locks::default());
        let passthrough = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writeback = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let filesystem = fs::DoppelFs::new(
            &root_fd,
            locks.clone(),
            sink,
            fs::Wanted { passthrough: opts.passthrough, writeback: opts.writeback },
            passthrough.clone(),
            writeback.clone(),
        )?;
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::FSName("doppel".into()),
            fuser::MountOption::Subtype("doppel".into()),
            fuser::MountOption::DefaultPermissions,
            fuser::MountOption::Suid,
            fuser::MountOption::Dev,
            fuser::MountOption::Exec,
        ];
        config.acl = fuser::SessionACL::All;
        config.n_threads = Some(opts.threads.max(1));
        config.clone_fd = true;
        let session = fuser::Session::new(filesystem, root, &config).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot mount the capture file system on {}: {e}", root.display()),
            )
        })?;
        let session = session.spawn()?;
        let dev = rustix::fs::stat(root).map(|st| st.st_dev).unwrap_or(0);
        let (pt, wb) = (
            passthrough.load(std::sync::atomic::Ordering::Relaxed),
            writeback.load(std::sync::atomic::Ordering::Relaxed),
        );
        if opts.writeback && !wb {
            tracing::warn!(root = %root.display(), "the kernel offers no FUSE write-back cache: every write goes through the daemon as it happens");
        }
        if let (true, Some(limit)) = (wb, opts.writeback_dirty) {
            set_dirty_limit(dev, limit);
        }
        tracing::info!(root = %root.display(), passthrough = pt, writeback = wb, "capture mount active");
        Ok(FuseCapture {
            root: root.to_path_buf(),
            dev,
            drain: opts.drain,
            root_fd,
            locks,
            session: Some(session),
            passthrough,
            writeback,
        })
    }

    /// The locks the mirror must take while it reads the tree under a live mount.
    pub fn locks(&self) -> Arc<Locks> {
        self.locks.clone()
    }

    /// A path that reaches the underlying tree (not the mount): `/proc/self/fd/N/.`.
    pub fn underlying(&self) -> PathBuf {
        use std::os::fd::AsRawFd;
        PathBuf::from(format!("/proc/self/fd/{}/.", self.root_fd.as_raw_fd()))
    }

    /// Whether reads of read-only opens bypass the daemon (kernel passthrough).
    pub fn passthrough(&self) -> bool {
        self.passthrough.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the kernel write-back cache is on (see [`FuseOptions::writeback`]).
    pub fn writeback(&self) -> bool {
        self.writeback.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Unmounts and waits for the request threads to finish.
    pub fn unmount(mut self) -> io::Result<()> {
        self.stop()
    }

    fn stop(&mut self) -> io::Result<()> {
        let Some(session) = self.session.take() else { return Ok(()) };
        tracing::info!(root = %self.root.display(), "unmounting the capture mount");
        let holders = open_files_under(&self.root);
        // A plain unmount fails with EBUSY while any file is open on the mount; detaching never
        // does, and the session ends by itself once the last file is closed.
        match rustix::mount::unmount(&self.root, rustix::mount::UnmountFlags::DETACH) {
            Ok(()) | Err(rustix::io::Errno::INVAL) => {}
            Err(e) => {
                return Err(io::Error::new(
                    io::Error::from(e).kind(),
                    format!("cannot detach the capture mount at {}: {e}", self.root.display()),
                ));
            }
        }
        let ended = |within: Duration| {
            let deadline = Instant::now() + within;
            while !session.guard.is_finished() {
                if Instant::now() >= deadline {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            true
        };
        if !ended(self.drain) {
            let held: Vec<String> =
                holders.iter().map(|(pid, path)| format!("{pid}:{}", path.display())).collect();
            tracing::warn!(
                root = %self.root.display(),
                open = ?held,
                "the capture mount is still in use (open files, or a copy in another mount namespace); aborting its connection: further I/O on those files fails with ENOTCONN"
            );
            abort_connection(self.dev)?;
            if !ended(Duration::from_secs(10)) {
                return Err(io::Error::other(format!(
                    "the capture mount at {} did not end after its connection was aborted",
                    self.root.display()
                )));
            }
        }
        // The request threads are done; what is left is fuser's own unmount, which finds the
        // mount point already detached (the directory underneath is held open by `root_fd`, so
        // it can never be unmounted by mistake).
        if let Err(e) = session.umount_and_join() {
            tracing::debug!(error = %e, "unmount after detach");
        }
        Ok(())
    }
}

/// Lets the mount with device `dev` hold `limit` bytes of dirty pages (its backing device's
/// `max_bytes`); quietly keeps the kernel's limit where that cannot be set.
fn set_dirty_limit(dev: u64, limit: u64) {
    let bdi = format!("/sys/class/bdi/{}:{}", rustix::fs::major(dev), rustix::fs::minor(dev));
    match std::fs::write(format!("{bdi}/max_bytes"), limit.to_string()) {
        Ok(()) => tracing::debug!(bdi, limit, "dirty page limit of the capture mount"),
        Err(e) => tracing::info!(
            bdi,
            error = %e,
            "cannot raise the capture mount's dirty page limit: writers wait for the daemon sooner"
        ),
    }
}

impl Drop for FuseCapture {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::error!(error = %e, "unmount failed");
        }
    }
}
