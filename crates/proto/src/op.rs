//! Ops: one replicated change each.
//!
//! An op describes an effect, not an intention: applying the ops of a job in sequence order to a
//! replica that was equal to the source before the first one leaves it equal to the source after
//! the last one. The variants mirror the file-system calls that capture observes, so `fuse`
//! capture can emit one op per call and `watch` capture can express block deltas with the same
//! words.
//!
//! Wire stability: the variant order of [`Op`] is its tag on the wire. New variants are added at
//! the end only; `tests::golden_tags` pins the existing ones.

use serde::{Deserialize, Serialize};

use crate::path::WirePath;

/// A point in time as the file system stores it (seconds and nanoseconds since the epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
pub struct Timestamp {
    /// Whole seconds since 1970-01-01 UTC (negative before).
    pub secs: i64,
    /// Nanoseconds within the second.
    pub nanos: u32,
}

/// One extended attribute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Xattr {
    /// Full name with namespace, e.g. `user.comment`.
    #[serde(with = "serde_bytes")]
    pub name: Vec<u8>,
    /// Raw value.
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
}

/// Most extended attributes one file can have on Linux: their names, each at least `a.b` and
/// a NUL, fill at most 64 KiB (`XATTR_LIST_MAX`). A decoder refuses a longer list before
/// holding it: two bytes of an empty attribute on the wire are 48 in memory, so an unbounded
/// list let 300 bytes of zstd hold 400 MB.
pub const MAX_XATTRS: usize = 65536 / 4;

/// Deserializes a list of extended attributes, refusing more than [`MAX_XATTRS`].
pub(crate) fn xattrs<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Xattr>, D::Error> {
    struct Bounded;
    impl<'de> serde::de::Visitor<'de> for Bounded {
        type Value = Vec<Xattr>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "at most {MAX_XATTRS} extended attributes")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Xattr>, A::Error> {
            let declared = seq.size_hint().unwrap_or(0);
            if declared > MAX_XATTRS {
                return Err(serde::de::Error::invalid_length(declared, &self));
            }
            let mut out = Vec::with_capacity(declared);
            while let Some(x) = seq.next_element()? {
                if out.len() == MAX_XATTRS {
                    return Err(serde::de::Error::invalid_length(out.len() + 1, &self));
                }
                out.push(x);
            }
            Ok(out)
        }
    }
    d.deserialize_seq(Bounded)
}

fn some_xattrs<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<Xattr>>, D::Error> {
    struct Opt;
    impl<'de> serde::de::Visitor<'de> for Opt {
        type Value = Option<Vec<Xattr>>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "an optional list of extended attributes")
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            xattrs(d).map(Some)
        }
    }
    d.deserialize_option(Opt)
}

/// Attribute changes; `None` leaves an attribute as it is, so a `chmod` does not have to
/// carry (and race on) the owner and times.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Attrs {
    /// Permission bits and set-id/sticky bits (`mode & 0o7777`).
    pub mode: Option<u32>,
    /// Numeric owner: replicas keep numeric ids, as `rsync --numeric-ids` does, because names
    /// may map differently on the target.
    pub uid: Option<u32>,
    /// Numeric group.
    pub gid: Option<u32>,
    /// Access time.
    pub atime: Option<Timestamp>,
    /// Modification time; set last, after data ops, so it survives them.
    pub mtime: Option<Timestamp>,
    /// When present, the complete set of extended attributes: names not listed are removed.
    #[serde(deserialize_with = "some_xattrs")]
    pub xattrs: Option<Vec<Xattr>>,
}

impl Attrs {
    /// Whether nothing would change.
    pub fn is_empty(&self) -> bool {
        self.mode.is_none()
            && self.uid.is_none()
            && self.gid.is_none()
            && self.atime.is_none()
            && self.mtime.is_none()
            && self.xattrs.is_none()
    }
}

/// Flags of a rename, as `renameat2(2)` takes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RenameFlags {
    /// Fail instead of replacing an existing destination.
    pub noreplace: bool,
    /// Atomically swap source and destination.
    pub exchange: bool,
}

/// One replicated change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Creates an empty regular file if the name is free; an existing regular file is kept as
    /// it is (so a replayed create is harmless).
    Create {
        /// The new file.
        path: WirePath,
        /// Permission bits.
        mode: u32,
    },
    /// Creates a directory; an existing directory is kept.
    Mkdir {
        /// The new directory.
        path: WirePath,
        /// Permission bits.
        mode: u32,
    },
    /// Creates (or replaces) a symbolic link. The target is stored verbatim and never followed.
    Symlink {
        /// The link itself.
        path: WirePath,
        /// What the link points to, as the source has it.
        #[serde(with = "serde_bytes")]
        target: Vec<u8>,
    },
    /// A hard link: `path` becomes another name of the file at `existing`.
    Link {
        /// The new name.
        path: WirePath,
        /// An existing name of the same file.
        existing: WirePath,
    },
    /// Renames a file or directory (a directory rename moves its whole subtree at once).
    Rename {
        /// Old name.
        from: WirePath,
        /// New name; replaced if it exists, unless `flags` say otherwise.
        to: WirePath,
        /// `renameat2` flags.
        flags: RenameFlags,
    },
    /// Removes a non-directory name.
    Unlink {
        /// The name to remove.
        path: WirePath,
    },
    /// Removes an empty directory.
    Rmdir {
        /// The directory to remove.
        path: WirePath,
    },
    /// Writes bytes at an offset of a regular file.
    Write {
        /// The file.
        path: WirePath,
        /// Byte offset.
        offset: u64,
        /// The bytes.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Sets the size of a regular file (shrinking discards, growing adds zeros).
    Truncate {
        /// The file.
        path: WirePath,
        /// New size.
        size: u64,
    },
    /// Changes attributes.
    SetAttr {
        /// The file, directory or link (the root is allowed).
        path: WirePath,
        /// What to change.
        attrs: Attrs,
    },
    /// A durability barrier: the source asked for `fsync`. The target makes everything up to
    /// here durable before acknowledging it.
    Fsync {
        /// The file the application synced, if known (informational).
        path: Option<WirePath>,
    },
    /// Creates a FIFO or another special file by mode and device number.
    Mknod {
        /// The new node.
        path: WirePath,
        /// File type and permission bits, as `mknod(2)` takes them.
        mode: u32,
        /// Device number, for device nodes.
        rdev: u64,
    },
    /// Space management within a file: punch a hole, zero a range, or preallocate.
    Fallocate {
        /// The file.
        path: WirePath,
        /// `fallocate(2)` mode bits (`FALLOC_FL_*`).
        mode: u32,
        /// Start of the range.
        offset: u64,
        /// Length of the range.
        len: u64,
    },
    /// A point worth naming in the replica's history; changes nothing in the tree. (Last in
    /// the enum, so every older op keeps its encoding.)
    Point {
        /// What the point is.
        kind: PointKind,
    },
}

/// What makes a point of the op stream worth naming.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PointKind {
    /// A difference mirror (a resync) starts: the point before it is the last consistent one
    /// until the matching [`PointKind::Resynced`].
    PreResync,
    /// The resync ended: the replica is consistent again.
    Resynced,
    /// An operator's named bookmark (`doppel history bookmark`).
    Bookmark(String),
}

impl Op {
    /// The primary path the op acts on (the destination for renames and links).
    pub fn path(&self) -> Option<&WirePath> {
        match self {
            Op::Create { path, .. }
            | Op::Mkdir { path, .. }
            | Op::Symlink { path, .. }
            | Op::Link { path, .. }
            | Op::Unlink { path }
            | Op::Rmdir { path }
            | Op::Write { path, .. }
            | Op::Truncate { path, .. }
            | Op::SetAttr { path, .. }
            | Op::Mknod { path, .. }
            | Op::Fallocate { path, .. } => Some(path),
            Op::Rename { to, .. } => Some(to),
            Op::Fsync { path } => path.as_ref(),
            Op::Point { .. } => None,
        }
    }

    /// Whether the op changes names (which names exist, or what they refer to), as opposed to
    /// the contents or attributes of an existing name. The target uses this to keep replays
    /// after a crash exact.
    pub fn changes_names(&self) -> bool {
        matches!(
            self,
            Op::Create { .. }
                | Op::Mkdir { .. }
                | Op::Symlink { .. }
                | Op::Link { .. }
                | Op::Rename { .. }
                | Op::Unlink { .. }
                | Op::Rmdir { .. }
                | Op::Mknod { .. }
        )
    }

    /// A short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Op::Create { .. } => "create",
            Op::Mkdir { .. } => "mkdir",
            Op::Symlink { .. } => "symlink",
            Op::Link { .. } => "link",
            Op::Rename { .. } => "rename",
            Op::Unlink { .. } => "unlink",
            Op::Rmdir { .. } => "rmdir",
            Op::Write { .. } => "write",
            Op::Truncate { .. } => "truncate",
            Op::SetAttr { .. } => "setattr",
            Op::Fsync { .. } => "fsync",
            Op::Mknod { .. } => "mknod",
            Op::Fallocate { .. } => "fallocate",
            Op::Point { .. } => "point",
        }
    }

    /// Payload bytes carried (for accounting).
    pub fn data_len(&self) -> usize {
        match self {
            Op::Write { data, .. } => data.len(),
            _ => 0,
        }
    }
}

/// An op with its place in the job's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpRecord {
    /// Job-scoped, gap-free sequence number, starting at 1.
    pub seq: u64,
    /// Wall-clock capture time in microseconds since the epoch: replication lag is measured
    /// against it, and point-in-time features key on it.
    pub time_us: u64,
    /// The change.
    pub op: Op,
}

impl OpRecord {
    /// Encodes for the spool and for batches.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("encoding an op record into memory cannot fail")
    }

    /// Decodes one record.
    pub fn decode(bytes: &[u8]) -> Result<OpRecord, postcard::Error> {
        postcard::from_bytes(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> WirePath {
        WirePath(s.as_bytes().to_vec())
    }

    /// The first byte of an encoded op is its tag; changing it breaks every deployed peer.
    #[test]
    fn golden_tags() {
        let ops = [
            Op::Create { path: p("a"), mode: 0o644 },
            Op::Mkdir { path: p("a"), mode: 0o755 },
            Op::Symlink { path: p("a"), target: b"b".to_vec() },
            Op::Link { path: p("a"), existing: p("b") },
            Op::Rename { from: p("a"), to: p("b"), flags: RenameFlags::default() },
            Op::Unlink { path: p("a") },
            Op::Rmdir { path: p("a") },
            Op::Write { path: p("a"), offset: 1, data: vec![1, 2] },
            Op::Truncate { path: p("a"), size: 3 },
            Op::SetAttr { path: p("a"), attrs: Attrs::default() },
            Op::Fsync { path: None },
            Op::Mknod { path: p("a"), mode: 0o10644, rdev: 0 },
            Op::Fallocate { path: p("a"), mode: 0, offset: 0, len: 1 },
        ];
        for (tag, op) in ops.iter().enumerate() {
            let bytes = postcard::to_stdvec(op).unwrap();
            assert_eq!(bytes[0] as usize, tag, "{op:?}");
            let back: Op = postcard::from_bytes(&bytes).unwrap();
            assert_eq!(&back, op);
        }
        let w = postcard::to_stdvec(&Op::Write { path: p("f"), offset: 300, data: vec![9; 3] }).unwrap();
        assert_eq!(w, [7, 1, b'f', 0xac, 0x02, 3, 9, 9, 9]);
    }

    #[test]
    fn record_roundtrip() {
        let r = OpRecord { seq: 42, time_us: 7, op: Op::Truncate { path: p("x/y"), size: 9 } };
        assert_eq!(OpRecord::decode(&r.encode()).unwrap(), r);
    }
}
