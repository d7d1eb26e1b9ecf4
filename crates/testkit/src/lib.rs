//! # doppel-testkit: what doppel's tests share
//!
//! - [`compare_trees`]: the one definition of "the replica equals the source" used by every
//!   test: same names, types, modes, owners, modification times, content hashes, symlink
//!   targets, extended attributes and hard-link structure.
//! - [`wait_until`]: waiting on a condition with a deadline, never sleeping and hoping.
//! - [`Tree`]: building test trees in a few lines.
//! - [`proxy`]: a TCP proxy whose link can be cut and restored.
//! - [`netns`]: two hosts in network namespaces, with bandwidth, loss and link control.
//! - [`skip`]: missing prerequisites skip a test, or fail it under `DOPPEL_TEST_STRICT=1`.
//! - [`mount_points`]: what is mounted where, for tests that must leave no mount behind.

pub mod netns;
pub mod proxy;
pub mod qsd;
pub mod skip;
pub mod vm;

pub use proxy::Proxy;
pub use skip::{require, require_fuse, require_ok, require_tools, skip_or_fail};

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What is compared for each name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// `file`, `dir`, `symlink`, `fifo` or `other`.
    pub kind: &'static str,
    /// Permission bits (not compared for symlinks).
    pub mode: u32,
    /// Owner and group.
    pub owner: (u32, u32),
    /// Modification time in nanoseconds (directories and files; symlinks too).
    pub mtime_ns: i128,
    /// BLAKE3 of the content (files), or the link target (symlinks).
    pub content: String,
    /// Size in bytes (files).
    pub size: u64,
    /// For files with several names: the sorted list of their other names in the tree.
    pub links: Vec<String>,
    /// Extended attributes (`user.*`, `security.*`, `trusted.*`, whatever `llistxattr`
    /// lists on the name itself, never through a symlink), sorted by name, with their values.
    pub xattrs: Vec<(String, Vec<u8>)>,
}

/// Options for [`snapshot`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Compare {
    /// Skip directory modification times (for trees still being written).
    pub ignore_dir_mtimes: bool,
}

/// Describes every name under `root` (the root itself as `.`).
pub fn snapshot(root: &Path, opts: Compare) -> BTreeMap<String, Node> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    walk(root, root, &mut out, &mut inodes, opts);
    for names in inodes.values().filter(|n| n.len() > 1) {
        for n in names {
            let others = names.iter().filter(|o| *o != n).cloned().collect();
            out.get_mut(n).expect("named").links = others;
        }
    }
    out
}

fn walk(
    root: &Path,
    p: &Path,
    out: &mut BTreeMap<String, Node>,
    inodes: &mut BTreeMap<u64, Vec<String>>,
    opts: Compare,
) {
    let Ok(m) = fs::symlink_metadata(p) else { return };
    let rel = p.strip_prefix(root).expect("beneath root").to_string_lossy().into_owned();
    let rel = if rel.is_empty() { ".".to_string() } else { rel };
    let ft = m.file_type();
    let (kind, content) = if ft.is_file() {
        ("file", hash_file(p))
    } else if ft.is_dir() {
        ("dir", String::new())
    } else if ft.is_symlink() {
        ("symlink", fs::read_link(p).map(|t| t.to_string_lossy().into_owned()).unwrap_or_default())
    } else if m.mode() & 0o170000 == 0o010000 {
        ("fifo", String::new())
    } else {
        ("other", String::new())
    };
    let mut mtime_ns = m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128;
    if kind == "dir" && opts.ignore_dir_mtimes {
        mtime_ns = 0;
    }
    if kind == "file" && m.nlink() > 1 {
        inodes.entry(m.ino()).or_default().push(rel.clone());
    }
    out.insert(
        rel,
        Node {
            kind,
            mode: if kind == "symlink" { 0 } else { m.permissions().mode() & 0o7777 },
            owner: (m.uid(), m.gid()),
            mtime_ns,
            content,
            size: if kind == "file" { m.len() } else { 0 },
            links: Vec::new(),
            xattrs: xattrs(p),
        },
    );
    if ft.is_dir() {
        let mut names: Vec<PathBuf> = match fs::read_dir(p) {
            Ok(rd) => rd.filter_map(|e| e.ok()).map(|e| e.path()).collect(),
            Err(_) => return,
        };
        names.sort();
        for n in names {
            walk(root, &n, out, inodes, opts);
        }
    }
}

/// The extended attributes of `p` itself (a symlink's own, not its target's), sorted by name.
/// A file system without xattr support has none; any other failure is recorded as an
/// attribute of its own, so it shows up as a difference instead of being ignored.
fn xattrs(p: &Path) -> Vec<(String, Vec<u8>)> {
    let names = match read_sized(|buf| rustix::fs::llistxattr(p, buf)) {
        Ok(n) => n,
        Err(rustix::io::Errno::NOTSUP) => return Vec::new(),
        Err(e) => return vec![("<llistxattr failed>".into(), e.to_string().into_bytes())],
    };
    let mut out: Vec<(String, Vec<u8>)> = names
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty())
        .map(|name| {
            let value = read_sized(|buf| rustix::fs::lgetxattr(p, name, buf))
                .unwrap_or_else(|e| format!("<lgetxattr failed: {e}>").into_bytes());
            (String::from_utf8_lossy(name).into_owned(), value)
        })
        .collect();
    out.sort();
    out
}

/// Calls an xattr read with a growing buffer until the answer fits.
fn read_sized(mut call: impl FnMut(&mut [u8]) -> rustix::io::Result<usize>) -> rustix::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    loop {
        match call(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(rustix::io::Errno::RANGE) if buf.len() < 1 << 24 => buf.resize(buf.len() * 4, 0),
            Err(e) => return Err(e),
        }
    }
}

fn hash_file(p: &Path) -> String {
    let Ok(mut f) = fs::File::open(p) else { return "<unreadable>".into() };
    let mut h = blake3::Hasher::new();
    // Through the hasher's `Write`: no buffer allocated (and zeroed) per file, which cost
    // seconds when a snapshot covers hundreds of thousands of small files.
    match std::io::copy(&mut f, &mut h) {
        Ok(_) => h.finalize().to_hex().to_string(),
        Err(e) => format!("<unreadable: {e}>"),
    }
}

/// The differences between two snapshots (say a tree recorded at some moment and a tree
/// restored from that moment), one line each; empty when they are equal.
pub fn diff_snapshots(want: &BTreeMap<String, Node>, got: &BTreeMap<String, Node>) -> String {
    let mut out = String::new();
    for (k, v) in want {
        match got.get(k) {
            Some(x) if x == v => {}
            x => {
                let _ = writeln!(out, "{k}: want {v:?}, got {x:?}");
            }
        }
    }
    for k in got.keys().filter(|k| !want.contains_key(*k)) {
        let _ = writeln!(out, "{k}: not wanted");
    }
    out
}

/// Compares two trees; `Err` lists every difference (at most 20), for assertion messages.
pub fn compare_trees(source: &Path, replica: &Path, opts: Compare) -> Result<(), String> {
    let a = snapshot(source, opts);
    let b = snapshot(replica, opts);
    let mut diffs = Vec::new();
    for (k, na) in &a {
        match b.get(k) {
            None => diffs.push(format!("{k}: missing on replica")),
            Some(nb) if nb != na => diffs.push(format!("{k}: source {na:?} != replica {nb:?}")),
            _ => {}
        }
    }
    for k in b.keys() {
        if !a.contains_key(k) {
            diffs.push(format!("{k}: only on replica"));
        }
    }
    if diffs.is_empty() {
        return Ok(());
    }
    let mut s =
        format!("{} differences between {} and {}:\n", diffs.len(), source.display(), replica.display());
    for d in diffs.iter().take(20) {
        let _ = writeln!(s, "  {d}");
    }
    Err(s)
}

/// The mount points of this process's mount namespace, in `/proc/self/mountinfo` order (a
/// path mounted over several times is listed as often).
pub fn mount_points() -> std::io::Result<Vec<PathBuf>> {
    let info = fs::read_to_string("/proc/self/mountinfo")?;
    Ok(info.lines().filter_map(|l| l.split(' ').nth(4).map(PathBuf::from)).collect())
}

/// Polls `cond` until it returns `Ok`, or fails after `timeout` with the last error and `what`.
pub fn wait_until<T>(timeout: Duration, what: &str, mut cond: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(10);
    loop {
        match cond() {
            Ok(v) => return v,
            Err(e) if Instant::now() >= deadline => {
                panic!("timed out after {timeout:?} waiting for {what}: {e}")
            }
            Err(_) => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(200));
            }
        }
    }
}

/// Deterministic pseudo-random bytes (xorshift), so content differs everywhere yet tests repeat.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e3779b97f4a7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Builds trees for tests.
pub struct Tree {
    root: PathBuf,
}

impl Tree {
    /// Works under `root` (created if missing).
    pub fn at(root: &Path) -> Tree {
        fs::create_dir_all(root).expect("create tree root");
        Tree { root: root.to_path_buf() }
    }

    /// The full path of `rel`.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// Writes a file (creating parents).
    pub fn file(&self, rel: &str, content: &[u8]) -> &Self {
        let p = self.path(rel);
        fs::create_dir_all(p.parent().expect("has parent")).expect("create parents");
        fs::write(&p, content).expect("write file");
        self
    }

    /// Creates a directory (and parents).
    pub fn dir(&self, rel: &str) -> &Self {
        fs::create_dir_all(self.path(rel)).expect("create dir");
        self
    }

    /// Creates a symlink.
    pub fn symlink(&self, rel: &str, target: &str) -> &Self {
        std::os::unix::fs::symlink(target, self.path(rel)).expect("create symlink");
        self
    }

    /// Creates a hard link `rel` to `existing`.
    pub fn hardlink(&self, rel: &str, existing: &str) -> &Self {
        fs::hard_link(self.path(existing), self.path(rel)).expect("create hard link");
        self
    }

    /// Sets permission bits.
    pub fn chmod(&self, rel: &str, mode: u32) -> &Self {
        fs::set_permissions(self.path(rel), fs::Permissions::from_mode(mode)).expect("chmod");
        self
    }

    /// Sets the modification time (seconds since the epoch).
    pub fn mtime(&self, rel: &str, secs: u64) -> &Self {
        let f =
            fs::File::options().write(true).open(self.path(rel)).or_else(|_| fs::File::open(self.path(rel)));
        f.expect("open for mtime")
            .set_modified(std::time::UNIX_EPOCH + Duration::from_secs(secs))
            .expect("set mtime");
        self
    }

    /// Sets an extended attribute on `rel` itself (never through a symlink).
    pub fn xattr(&self, rel: &str, name: &str, value: &[u8]) -> &Self {
        rustix::fs::lsetxattr(self.path(rel), name, value, rustix::fs::XattrFlags::empty())
            .expect("set xattr");
        self
    }

    /// Removes an extended attribute from `rel` itself.
    pub fn remove_xattr(&self, rel: &str, name: &str) -> &Self {
        rustix::fs::lremovexattr(self.path(rel), name).expect("remove xattr");
        self
    }

    /// A varied tree: nested directories, small and empty files, symlinks (relative,
    /// absolute, dangling), a hard link, unusual modes, an old mtime and extended attributes
    /// on a file and a directory.
    pub fn standard(&self) -> &Self {
        self.file("a.txt", b"alpha\n")
            .file("empty", b"")
            .file("dir1/b.bin", &noise(1, 100_000))
            .file("dir1/sub/c.txt", b"deep\n")
            .file("dir1/sub/deeper/d", &noise(2, 70_000))
            .file("dir2/e", &noise(3, 5))
            .dir("emptydir")
            .symlink("link-rel", "dir1/b.bin")
            .symlink("link-abs", "/etc/hostname")
            .symlink("link-dangling", "nowhere/at/all")
            .hardlink("dir2/hard", "dir1/sub/c.txt")
            .chmod("dir2/e", 0o600)
            .chmod("a.txt", 0o751)
            .xattr("a.txt", "user.comment", b"alpha's note")
            .xattr("dir1/b.bin", "user.empty", b"")
            .xattr("dir1", "user.dir", b"a directory's attribute")
            .mtime("dir1/b.bin", 1_000_000_000)
    }
}

#[cfg(test)]
mod tests;
