//! # doppel-proto: the shared vocabulary of doppel
//!
//! Everything that crosses a process or machine boundary is defined here, and nothing here does
//! I/O, so every other crate (capture, spool, link, apply, mirror, target, agent) agrees on one
//! definition and the encodings can be tested byte for byte.
//!
//! - [`path`]: [`RelPath`], the only path type that may name something inside a replica, and
//!   [`WirePath`], its unvalidated form as received from the network.
//! - [`op`]: [`Op`] and [`OpRecord`], one replicated change with its gap-free sequence number.
//! - [`message`]: the link protocol's [`Message`]s (handshake, batches, acks, listings).
//! - [`frame`]: length-prefixed, checksummed frames with a hard size cap.
//! - [`batch`]: packing op records into compressed batches and unpacking them.
//! - [`block`]: the block size and block hashes used by mirror, verify and watch capture.
//! - [`echo`]: peer-controlled text (names, paths, reasons) bounded wherever it is echoed into
//!   a log line, an error or a refusal.

pub mod batch;
pub mod block;
pub mod echo;
pub mod frame;
pub mod message;
pub mod op;
pub mod path;

pub use batch::{BatchError, MAX_BATCH_RAW, Packer, Unpacker, pack_batch, unpack_batch};
pub use block::{BLOCK_SIZE, BlockHash, block_count, hash_block};
pub use echo::{
    ECHO_MAX, Echoed, TEXT_MAX, Truncated, TruncatedText, truncated, truncated_debug, truncated_text,
};
pub use frame::{FrameError, MAX_FRAME_DEFAULT, decode_frame, encode_frame};
pub use message::{
    Batch, Codec, Entry, EntryKind, Hello, ListScope, Message, PROTOCOL_VERSION, Refusal, Welcome,
};
pub use op::{Attrs, Op, OpRecord, PointKind, RenameFlags, Timestamp, Xattr};
pub use path::{PathError, RelPath, WirePath};
