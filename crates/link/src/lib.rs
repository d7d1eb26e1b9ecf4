//! # doppel-link: how nodes talk
//!
//! - [`identity`]: a node's key pair and self-signed certificate, and its [`NodeId`] (the
//!   BLAKE3 hash of the certificate), which is what operators copy between machines.
//! - [`tls`]: TLS 1.3 configurations in which each side accepts exactly the identities it was
//!   told about: the source pins the target's id, the target checks the source's id against
//!   its allow list. No certificate authority is involved.
//! - [`ratelimit`]: bandwidth limits on every byte a link sends.
//! - [`framed`]: reading and writing [`doppel_proto::Message`] frames over any byte stream,
//!   with the frame size cap and byte counters for status and tests.

pub mod framed;
pub mod identity;
pub mod metered;
pub mod ratelimit;
pub mod tls;

pub use framed::{ByteCounter, FrameReader, FrameWriter, LinkError};
pub use identity::{Identity, IdentityError, NodeId};
pub use metered::Metered;
pub use ratelimit::{Limited, RateLimiter};
