//! What the undo journal holds: one [`UndoSet`] per op, framed on disk.
//!
//! A set says how to get back to the state just before its op: which directory entries were
//! bound to what (by inode handle), which objects were moved aside into the attic instead of
//! being removed, the old bytes of overwritten ranges, old sizes, old attributes and times.
//! Two readers use it: a point-in-time view reads sets newest-to-oldest as *absolute* facts
//! ("before op N, this entry held that inode"), and a rollback replays them backwards as
//! *inverse steps* on the replica itself.
//!
//! Frame: `magic (4) | header length u32 | data length u64 | BLAKE3 of header and data,
//! first 16 bytes | header (postcard) | data`. Old bytes go in the data part, after the
//! header, so a reader can index a set without reading them.

use doppel_fs::handle::Handle;
use doppel_proto::Attrs;
use serde::{Deserialize, Serialize};

/// Frame magic ("doppel undo set", version 1).
pub const MAGIC: [u8; 4] = *b"DUS1";
/// Bytes before the header.
pub const PREFIX: usize = 4 + 4 + 8 + 16;
/// Largest header accepted (a set lists a handful of names and ranges).
pub const MAX_HEADER: u32 = 16 << 20;

/// A point worth naming in a listing (every op boundary is a point; these are the ones shown).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mark {
    /// The source fsynced (in fuse mode; with `--sync` the fsync returned only once durable here).
    Fsync,
    /// An operator's named bookmark.
    Bookmark(String),
    /// A difference mirror (resync) starts after this point: until it ends, this is the latest
    /// consistent point.
    PreResync,
    /// The resync that started at the matching `PreResync` ended: the replica is consistent again.
    Resynced,
}

impl Mark {
    /// The kind's name in listings and JSON.
    pub fn kind(&self) -> &'static str {
        match self {
            Mark::Fsync => "fsync",
            Mark::Bookmark(_) => "bookmark",
            Mark::PreResync => "pre-resync",
            Mark::Resynced => "resynced",
        }
    }
}

/// One old range of a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Range {
    /// Offset in the file.
    pub off: u64,
    /// Length.
    pub len: u64,
    /// The old bytes were all zero: nothing is stored.
    pub zero: bool,
    /// Where the old bytes start in the set's data part (when not `zero`).
    pub data_at: u64,
}

/// One fact or step of a set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Undo {
    /// Before the op, `name` in directory `dir` held `before` (or nothing).
    Entry {
        /// The directory.
        dir: Handle,
        /// The name in it.
        name: Vec<u8>,
        /// What it held.
        before: Option<Handle>,
    },
    /// The op would have removed or replaced the object at `path`; it was moved to the attic
    /// as `attic` instead (rollback moves it back).
    Aside {
        /// Its path in the replica.
        path: Vec<u8>,
        /// Its name in the attic.
        attic: String,
    },
    /// The op created `path` (rollback removes it).
    Created {
        /// Its path.
        path: Vec<u8>,
        /// It is a directory.
        dir: bool,
    },
    /// The op renamed `from` to `to` (rollback renames it back).
    Renamed {
        /// Old name.
        from: Vec<u8>,
        /// New name.
        to: Vec<u8>,
    },
    /// The op exchanged `a` and `b` (rollback exchanges them again).
    Exchanged {
        /// One name.
        a: Vec<u8>,
        /// The other.
        b: Vec<u8>,
    },
    /// The op changed the file's bytes or size: its old size and the old bytes of every range
    /// the op changed within that size.
    Content {
        /// The file.
        obj: Handle,
        /// Its size before.
        old_size: u64,
        /// The old bytes.
        ranges: Vec<Range>,
    },
    /// The object's attributes before the op (only the fields the op changes are present).
    Attrs {
        /// The object.
        obj: Handle,
        /// The old values.
        old: Attrs,
    },
}

/// Everything needed to undo one op.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UndoSet {
    /// The op's sequence.
    pub seq: u64,
    /// The op's capture time (µs since the epoch, the source's clock).
    pub time_us: u64,
    /// A short hash of the op: a set already journaled for this sequence is reused only for
    /// the same op (a replay after a kill), never for another op that got the number after a
    /// resync.
    pub op_hash: u64,
    /// A point worth naming, if the op is one.
    pub mark: Option<Mark>,
    /// Facts and steps, in the order they were taken.
    pub undo: Vec<Undo>,
}

/// A set being built: its header and its data part.
#[derive(Debug)]
pub struct Draft {
    /// The header.
    pub set: UndoSet,
    /// The old bytes.
    pub data: Vec<u8>,
}

impl Draft {
    /// Old bytes read in place: `read` fills `len` bytes at the end of the data part; an
    /// all-zero read is kept as a flag instead. Returns the range to record.
    pub fn read_range(
        &mut self,
        off: u64,
        len: usize,
        read: impl FnOnce(&mut [u8]) -> std::io::Result<()>,
    ) -> std::io::Result<Range> {
        let start = self.data.len();
        self.data.resize(start + len, 0);
        read(&mut self.data[start..])?;
        if self.data[start..].iter().all(|&b| b == 0) {
            self.data.truncate(start);
            return Ok(Draft::zero_range(off, len));
        }
        Ok(Range { off, len: len as u64, zero: false, data_at: start as u64 })
    }

    /// Old bytes known to be zero without reading them (a hole): kept as the flag alone.
    pub fn zero_range(off: u64, len: usize) -> Range {
        Range { off, len: len as u64, zero: true, data_at: 0 }
    }

    /// The frame's prefix and header; the data part follows them on disk as it is.
    pub fn encode_head(&self) -> Vec<u8> {
        let header = postcard::to_stdvec(&self.set).expect("an undo set serializes");
        let mut out = Vec::with_capacity(PREFIX + header.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&(header.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.data.len() as u64).to_le_bytes());
        out.extend_from_slice(&check(&header, &self.data));
        out.extend_from_slice(&header);
        out
    }

    /// The whole frame in one buffer (tests).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.encode_head();
        out.extend_from_slice(&self.data);
        out
    }
}

/// The checksum of a frame's header and data.
pub fn check(header: &[u8], data: &[u8]) -> [u8; 16] {
    let mut h = blake3::Hasher::new();
    h.update(header);
    h.update(data);
    let mut out = [0u8; 16];
    out.copy_from_slice(&h.finalize().as_bytes()[..16]);
    out
}

/// A frame's prefix, decoded.
#[derive(Debug, Clone, Copy)]
pub struct Prefix {
    /// Header length.
    pub header_len: u32,
    /// Data length.
    pub data_len: u64,
    /// Checksum.
    pub check: [u8; 16],
}

impl Prefix {
    /// Decodes a prefix; `None` if it is not one (a torn or foreign tail).
    pub fn decode(b: &[u8; PREFIX]) -> Option<Prefix> {
        if b[..4] != MAGIC {
            return None;
        }
        let header_len = u32::from_le_bytes(b[4..8].try_into().expect("4 bytes"));
        let data_len = u64::from_le_bytes(b[8..16].try_into().expect("8 bytes"));
        (header_len <= MAX_HEADER).then(|| Prefix {
            header_len,
            data_len,
            check: b[16..32].try_into().expect("16 bytes"),
        })
    }

    /// The whole frame's length.
    pub fn frame_len(&self) -> u64 {
        PREFIX as u64 + u64::from(self.header_len) + self.data_len
    }
}

/// A short hash of an op, telling a replay of the same op from another op that got the same
/// sequence. A write is hashed without its data: the set of a write holds the range's bytes
/// *before* it, which do not depend on what is written, so any write of that range and length
/// may share it (and hashing every written byte would cost as much as journaling them).
pub fn op_hash(op: &doppel_proto::Op) -> u64 {
    let h = match op {
        doppel_proto::Op::Write { path, offset, data } => {
            postcard::to_io(&(path, offset, data.len() as u64), blake3::Hasher::new())
        }
        op => postcard::to_io(op, blake3::Hasher::new()),
    }
    .expect("an op serializes into a hasher");
    u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().expect("8 bytes"))
}
