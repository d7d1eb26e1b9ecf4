//! Link protocol messages.
//!
//! A connection starts with [`Message::Hello`] from the source; the target answers
//! [`Message::Welcome`] or [`Message::Refused`]. Then the source streams
//! [`Message::Batch`]es (pipelined, never stop-and-wait) and the target streams
//! [`Message::Ack`]s as the ops become durable. Either side sends [`Message::Heartbeat`] when it
//! has been quiet, so a dead peer is noticed. Listings ([`Message::ListRequest`]) serve the
//! difference mirror: they travel in the same ordered stream as batches, so a listing always
//! reflects every op sent before it.
//!
//! Wire stability: variant order is the tag; add new variants at the end only.

use serde::{Deserialize, Serialize};

use crate::block::BlockHash;
use crate::echo::{Truncated, TruncatedText};
use crate::op::{Timestamp, Xattr};
use crate::path::WirePath;

/// The protocol spoken by this build. Peers with a different major version are refused in the
/// handshake with a message naming both versions.
pub const PROTOCOL_VERSION: u32 = 3;

/// First message of a connection, from the source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// [`PROTOCOL_VERSION`] of the source.
    pub protocol: u32,
    /// The job this connection replicates (one connection per job).
    pub job: String,
    /// The source's software version, for logs.
    pub agent_version: String,
    /// The replica the source believes it is talking to (from an earlier Welcome); `None` on
    /// first contact. A mismatch means the target's replica is not the one the source's index
    /// describes, and the source must run a difference mirror.
    pub replica_id: Option<[u8; 16]>,
    /// The epoch the source last knew. A target whose replica has a newer epoch (after a
    /// failover) refuses the stream: the source is fenced.
    pub epoch: u64,
}

/// The target's answer to an accepted [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// [`PROTOCOL_VERSION`] of the target.
    pub protocol: u32,
    /// Identity of the replica (random, made when the replica was created).
    pub replica_id: [u8; 16],
    /// Every op up to this sequence is durable on the target; the source resumes after it.
    pub applied_seq: u64,
    /// The replica's epoch.
    pub epoch: u64,
    /// The target cannot vouch that its replica equals a prefix of the op stream (it crashed
    /// with ops applied but not made durable, across a reboot): the source must compare.
    pub needs_resync: bool,
    /// Largest frame the target accepts, in bytes.
    pub max_frame: u32,
    /// The name under which the target knows this source (from its allow list).
    pub source_name: String,
}

/// Why a connection was refused; the target closes it after sending this.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    /// The source's identity is not on the target's allow list.
    UnknownSource {
        /// The identity presented.
        identity: String,
    },
    /// Protocol versions differ.
    Version {
        /// The target's version.
        target: u32,
        /// The version the source announced.
        source: u32,
    },
    /// The job name is not a valid single name.
    BadJob {
        /// Why.
        reason: String,
    },
    /// The replica's epoch moved on (failover happened): this source may not write to it.
    Fenced {
        /// The replica's current epoch.
        epoch: u64,
    },
    /// Another connection is already replicating this job.
    Busy,
    /// Any other reason, in words.
    Other {
        /// Why.
        reason: String,
    },
    /// A failback was asked for a job that is not failed over (never was, or was handed back
    /// already): the source resumes protecting it the ordinary way.
    NotFailedOver {
        /// The job.
        job: String,
    },
}

/// Shown with every name and reason bounded ([`crate::echo`]): a refusal is logged on both
/// sides, and its text may come from the peer.
impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::UnknownSource { identity } => {
                write!(f, "the target does not allow source identity {}", Truncated(identity))
            }
            Refusal::Version { target, source } => {
                write!(f, "protocol version mismatch: target speaks {target}, source {source}")
            }
            Refusal::BadJob { reason } => write!(f, "bad job name: {}", TruncatedText(reason)),
            Refusal::Fenced { epoch } => {
                write!(f, "fenced: the replica failed over (epoch {epoch}); this source may not write to it")
            }
            Refusal::Busy => write!(f, "another connection is already replicating this job"),
            Refusal::Other { reason } => write!(f, "{}", TruncatedText(reason)),
            Refusal::NotFailedOver { job } => {
                write!(f, "job {} is not failed over: there is nothing to fail back", Truncated(job))
            }
        }
    }
}

/// How a batch payload is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Codec {
    /// Stored as is (incompressible data, or compression off).
    Raw,
    /// zstd-compressed.
    Zstd,
}

/// A run of consecutive op records.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    /// Sequence of the first record.
    pub first_seq: u64,
    /// Number of records.
    pub count: u32,
    /// Encoding of `payload`.
    pub codec: Codec,
    /// Size of the payload once decoded, checked before decoding (no decompression bombs).
    pub raw_len: u32,
    /// The records (see [`crate::batch`]).
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    /// The sender's producer is waiting, or soon will be, for acknowledgements to free its
    /// memory (a comparison whose records queue up): the target commits a group with a few
    /// MiB applied as soon as its queue runs dry instead of at the end of its interval. A
    /// producer that is not held back (a fuse writer, whose records go to disk) leaves it
    /// unset, and its stream is committed in fewer, larger groups.
    pub ack_wanted: bool,
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("first_seq", &self.first_seq)
            .field("count", &self.count)
            .field("codec", &self.codec)
            .field("raw_len", &self.raw_len)
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

/// What part of a replica a listing covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ListScope {
    /// The whole tree.
    All,
    /// Just these paths (each one itself; directories are not descended into).
    Paths(Vec<WirePath>),
    /// Byte ranges of files: `(path, offset, len)`, widened to whole blocks. Each answer entry
    /// carries the blocks of one range, starting at [`Entry::first_block`].
    Ranges(Vec<(WirePath, u64, u64)>),
    /// The entries directly beneath these directories, described without block hashes (names,
    /// types and attributes): what an agent needs to find names gone from the source.
    Children(Vec<WirePath>),
}

/// The type of a tree entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EntryKind {
    /// Regular file.
    File,
    /// Directory.
    Dir,
    /// Symbolic link.
    Symlink,
    /// FIFO.
    Fifo,
    /// Socket, device or anything else (not replicated as content).
    Other,
}

/// One entry of a replica listing, with per-block hashes for regular files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Path relative to the replica root.
    pub path: WirePath,
    /// Type.
    pub kind: EntryKind,
    /// Size in bytes (files) or 0.
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time.
    pub mtime: Timestamp,
    /// Symlink target.
    #[serde(with = "serde_bytes")]
    pub link_target: Vec<u8>,
    /// Inode number when the file has more than one name, so hard-link groups can be compared.
    pub link_group: Option<u64>,
    /// Index of the block `blocks[0]` describes (non-zero only for ranges).
    pub first_block: u64,
    /// BLAKE3 of each block of a regular file, in order.
    pub blocks: Vec<BlockHash>,
    /// Extended attributes, sorted by name.
    #[serde(deserialize_with = "crate::op::xattrs")]
    pub xattrs: Vec<Xattr>,
    /// The lister vouches that this regular file holds exactly what the other side last
    /// received of it: its blocks come from the lister's index, and nothing changed the file
    /// since (a failback's source, whose index the replica had acknowledged). A file there of
    /// the same size and modification time then need not be read to be compared.
    pub vouched: bool,
}

/// Every message of the link protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Source → target: opens the conversation.
    Hello(Hello),
    /// Target → source: accepted, here is where to resume.
    Welcome(Welcome),
    /// Target → source: refused; the connection closes.
    Refused(Refusal),
    /// Source → target: ops.
    Batch(Batch),
    /// Target → source: every op up to `seq` is durable.
    Ack {
        /// Highest durable sequence.
        seq: u64,
    },
    /// Target → source: one op was refused (and skipped); the stream goes on.
    OpRefused {
        /// Its sequence.
        seq: u64,
        /// Why, in words.
        reason: String,
    },
    /// Either way: I am alive (sent when otherwise quiet).
    Heartbeat {
        /// Sender's wall clock, microseconds since the epoch.
        time_us: u64,
    },
    /// Source → target: describe (part of) the replica, after applying everything before.
    ListRequest {
        /// Echoed in the answer.
        id: u64,
        /// What to describe.
        scope: ListScope,
    },
    /// Target → source: part of a listing.
    ListEntries {
        /// The request's id.
        id: u64,
        /// Entries, in walk order.
        entries: Vec<Entry>,
    },
    /// Target → source: the listing is complete (or failed, with the reason).
    ListEnd {
        /// The request's id.
        id: u64,
        /// Set if the listing could not be made.
        error: Option<String>,
    },
    /// Either way: closing on purpose, with the reason.
    Goodbye {
        /// Why.
        reason: String,
    },
    /// Target → source: applying is paused (a full disk, say) and will resume by itself;
    /// nothing is lost, acks just stop until then.
    Stalled {
        /// Why, in words.
        reason: String,
    },
    /// Target → source: applying resumed after a stall.
    Resumed,
    /// Source → target, first message of a failback connection: the source is repaired and
    /// wants its job back. Roles then swap on this connection: the target sends (as a source
    /// would, starting with a `Hello`) and the source applies.
    FailbackHello(Hello),
    /// The sending side of a failback stream, last message: everything is applied and the job
    /// goes back to its source, to be protected again from `epoch` on, resuming after
    /// `applied_seq` on replica `replica_id`.
    FailbackDone {
        /// The new epoch.
        epoch: u64,
        /// The replica the source protects again.
        replica_id: [u8; 16],
        /// The replica's applied sequence, which the source continues after.
        applied_seq: u64,
    },
}

impl Message {
    /// Encodes into a frame payload.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("encoding a message into memory cannot fail")
    }

    /// Decodes a frame payload.
    pub fn decode(bytes: &[u8]) -> Result<Message, postcard::Error> {
        postcard::from_bytes(bytes)
    }

    /// The protocol version a handshake payload (`Hello`, `Welcome`, `FailbackHello`) announces,
    /// read from its first bytes alone; `None` for any other message.
    ///
    /// Every field after the version may change from one protocol version to the next, so a
    /// peer of another version may send a handshake this build cannot decode. The variant tag
    /// and the version that follows it never change, so the peer can still be told, by number,
    /// why it is refused, instead of seeing a malformed frame.
    pub fn peek_protocol(bytes: &[u8]) -> Option<u32> {
        const HANDSHAKES: [u32; 3] = [0, 1, 13];
        let (tag, rest) = postcard::take_from_bytes::<u32>(bytes).ok()?;
        if !HANDSHAKES.contains(&tag) {
            return None;
        }
        postcard::take_from_bytes::<u32>(rest).ok().map(|(v, _)| v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_tags() {
        let msgs = [
            (
                0,
                Message::Hello(Hello {
                    protocol: 1,
                    job: "j".into(),
                    agent_version: "v".into(),
                    replica_id: None,
                    epoch: 0,
                }),
            ),
            (4, Message::Ack { seq: 5 }),
            (6, Message::Heartbeat { time_us: 1 }),
            (10, Message::Goodbye { reason: String::new() }),
            (
                13,
                Message::FailbackHello(Hello {
                    protocol: 1,
                    job: "j".into(),
                    agent_version: "v".into(),
                    replica_id: None,
                    epoch: 0,
                }),
            ),
        ];
        for (tag, m) in msgs {
            let b = m.encode();
            assert_eq!(b[0], tag);
            assert_eq!(Message::decode(&b).unwrap(), m);
        }
    }

    /// A handshake of a later version whose fields this build cannot decode still names its
    /// version; other messages name none.
    #[test]
    fn the_version_of_an_undecodable_handshake_is_read() {
        let welcome = Welcome {
            protocol: PROTOCOL_VERSION,
            replica_id: [7; 16],
            applied_seq: 9,
            epoch: 2,
            needs_resync: false,
            max_frame: 1 << 20,
            source_name: "s".into(),
        };
        assert_eq!(Message::peek_protocol(&Message::Welcome(welcome).encode()), Some(PROTOCOL_VERSION));
        for tag in [0u8, 1, 13] {
            // Version 300 (a two-byte varint), then fields of a shape this build does not know.
            let future = [tag, 0xac, 0x02, 0xff, 0xff, 0xff];
            assert!(Message::decode(&future).is_err());
            assert_eq!(Message::peek_protocol(&future), Some(300), "tag {tag}");
        }
        assert_eq!(Message::peek_protocol(&Message::Ack { seq: 5 }.encode()), None);
        assert_eq!(Message::peek_protocol(&[]), None);
        assert_eq!(Message::peek_protocol(&[0]), None);
    }
}
