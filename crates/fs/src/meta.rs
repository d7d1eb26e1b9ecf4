//! File metadata in doppel's terms.

use std::fs::Metadata;
use std::os::unix::fs::{FileTypeExt, MetadataExt};

use doppel_proto::{EntryKind, Timestamp};

/// What doppel needs to know about a name, taken from `lstat` (symlinks are never followed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    /// Type of the entry.
    pub kind: EntryKind,
    /// Size in bytes.
    pub size: u64,
    /// Permission and set-id bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Numeric owner.
    pub uid: u32,
    /// Numeric group.
    pub gid: u32,
    /// Modification time.
    pub mtime: Timestamp,
    /// Status-change time: moves on every content, attribute or link change, and cannot be set
    /// by applications, so it catches changes that restore the mtime.
    pub ctime: Timestamp,
    /// Device of the file system.
    pub dev: u64,
    /// Inode number: with `dev`, the file's identity, used to recognise renames and hard links.
    pub ino: u64,
    /// Number of names of the file.
    pub nlink: u64,
    /// Device number for device nodes (`st_rdev`).
    pub rdev: u64,
}

impl Meta {
    /// Converts `std` metadata (from `symlink_metadata`).
    pub fn from_std(m: &Metadata) -> Meta {
        Meta {
            kind: kind_of(m),
            size: m.len(),
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
            mtime: Timestamp { secs: m.mtime(), nanos: m.mtime_nsec() as u32 },
            ctime: Timestamp { secs: m.ctime(), nanos: m.ctime_nsec() as u32 },
            dev: m.dev(),
            ino: m.ino(),
            nlink: m.nlink(),
            rdev: m.rdev(),
        }
    }

    /// Converts a raw `stat` result.
    pub fn from_stat(s: &rustix::fs::Stat) -> Meta {
        let fmt = s.st_mode & libc::S_IFMT;
        let kind = match fmt {
            libc::S_IFREG => EntryKind::File,
            libc::S_IFDIR => EntryKind::Dir,
            libc::S_IFLNK => EntryKind::Symlink,
            libc::S_IFIFO => EntryKind::Fifo,
            _ => EntryKind::Other,
        };
        Meta {
            kind,
            size: s.st_size as u64,
            mode: s.st_mode & 0o7777,
            uid: s.st_uid,
            gid: s.st_gid,
            mtime: Timestamp { secs: s.st_mtime, nanos: s.st_mtime_nsec as u32 },
            ctime: Timestamp { secs: s.st_ctime, nanos: s.st_ctime_nsec as u32 },
            dev: s.st_dev,
            ino: s.st_ino,
            nlink: s.st_nlink,
            rdev: s.st_rdev,
        }
    }

    /// Reads the metadata of `path` without following a final symlink.
    pub fn lstat(path: &std::path::Path) -> std::io::Result<Meta> {
        Ok(Meta::from_std(&std::fs::symlink_metadata(path)?))
    }
}

/// The entry kind of `std` metadata.
pub fn kind_of(m: &Metadata) -> EntryKind {
    let t = m.file_type();
    if t.is_file() {
        EntryKind::File
    } else if t.is_dir() {
        EntryKind::Dir
    } else if t.is_symlink() {
        EntryKind::Symlink
    } else if t.is_fifo() {
        EntryKind::Fifo
    } else {
        EntryKind::Other
    }
}
