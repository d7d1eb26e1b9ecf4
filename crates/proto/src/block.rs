//! Blocks: the unit in which mirror, verify and watch capture compare file contents.
//!
//! 64 KiB keeps the index small (32 bytes of hash per 64 KiB, 0.05% of the data) while a
//! change of a few bytes costs at most one block on the wire. `fuse` capture does not need
//! blocks at all: it sends exactly the bytes written.

/// Size of one block in bytes.
pub const BLOCK_SIZE: u64 = 64 * 1024;

/// BLAKE3 hash of one block.
pub type BlockHash = [u8; 32];

/// Number of blocks in a file of `size` bytes (the last one may be short).
pub fn block_count(size: u64) -> u64 {
    size.div_ceil(BLOCK_SIZE)
}

/// Hashes one block.
pub fn hash_block(data: &[u8]) -> BlockHash {
    *blake3::hash(data).as_bytes()
}
