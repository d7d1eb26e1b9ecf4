//! Batches: consecutive op records packed into one message, compressed when that pays.
//!
//! The payload is the records' encodings, each preceded by its length as a little-endian
//! `u32`: the spool stores exactly these encodings, so the sender packs without re-encoding.
//! Compression is skipped when it saves less than 3%: already-compressed data (media, archives,
//! encrypted volumes) then costs no CPU on the receiving side either.

use crate::message::{Batch, Codec};
use crate::op::OpRecord;

/// Compressed output must be at most this fraction of the input, or the batch goes raw.
const WORTHWHILE: f64 = 0.97;

/// Why a batch could not be unpacked. Any of these means the peer is broken or hostile.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// The declared decoded size is above the limit.
    #[error("batch declares {raw_len} decoded bytes, above the limit of {max}")]
    TooLarge {
        /// Declared.
        raw_len: u32,
        /// Limit.
        max: u32,
    },
    /// Decompression failed or produced a different size than declared.
    #[error("batch payload does not decode: {0}")]
    Codec(String),
    /// A record is cut short or not a valid record.
    #[error("batch record {index} is malformed: {reason}")]
    Record {
        /// Position within the batch.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// Records are not consecutive from `first_seq`, or their count differs.
    #[error("batch sequence error: {0}")]
    Sequence(String),
}

/// Packs encoded records (consecutive, starting at `first_seq`). `level` is the zstd level, or
/// `None` to send raw.
pub fn pack_batch(first_seq: u64, records: &[impl AsRef<[u8]>], level: Option<i32>) -> Batch {
    let raw_len: usize = records.iter().map(|r| 4 + r.as_ref().len()).sum();
    let mut raw = Vec::with_capacity(raw_len);
    for r in records {
        raw.extend_from_slice(&(r.as_ref().len() as u32).to_le_bytes());
        raw.extend_from_slice(r.as_ref());
    }
    let (codec, payload) = match level {
        Some(level) => match zstd::bulk::compress(&raw, level) {
            Ok(c) if (c.len() as f64) <= raw.len() as f64 * WORTHWHILE => (Codec::Zstd, c),
            _ => (Codec::Raw, raw),
        },
        None => (Codec::Raw, raw),
    };
    Batch { first_seq, count: records.len() as u32, codec, raw_len: raw_len as u32, payload }
}

/// Unpacks and decodes the records, checking sizes and sequence continuity.
pub fn unpack_batch(batch: &Batch, max_raw: u32) -> Result<Vec<OpRecord>, BatchError> {
    if batch.raw_len > max_raw {
        return Err(BatchError::TooLarge { raw_len: batch.raw_len, max: max_raw });
    }
    let decoded;
    let raw: &[u8] = match batch.codec {
        Codec::Raw => &batch.payload,
        Codec::Zstd => {
            decoded = zstd::bulk::decompress(&batch.payload, batch.raw_len as usize)
                .map_err(|e| BatchError::Codec(e.to_string()))?;
            &decoded
        }
    };
    if raw.len() != batch.raw_len as usize {
        return Err(BatchError::Codec(format!("decoded {} bytes, header said {}", raw.len(), batch.raw_len)));
    }
    // `count` comes from the peer: it may only size the vector as far as the payload could
    // possibly hold records (each takes at least 5 bytes).
    let mut out = Vec::with_capacity((batch.count as usize).min(raw.len() / 5));
    let mut rest = raw;
    while !rest.is_empty() {
        let index = out.len();
        if rest.len() < 4 {
            return Err(BatchError::Record { index, reason: "truncated length".into() });
        }
        let len = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
        if rest.len() < 4 + len {
            return Err(BatchError::Record { index, reason: "truncated record".into() });
        }
        let rec = OpRecord::decode(&rest[4..4 + len])
            .map_err(|e| BatchError::Record { index, reason: e.to_string() })?;
        let want = batch.first_seq + index as u64;
        if rec.seq != want {
            return Err(BatchError::Sequence(format!("record {index} has seq {}, expected {want}", rec.seq)));
        }
        out.push(rec);
        rest = &rest[4 + len..];
    }
    if out.len() != batch.count as usize {
        return Err(BatchError::Sequence(format!("{} records, header said {}", out.len(), batch.count)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::Op;
    use crate::path::WirePath;

    fn recs(first: u64, n: u64, data: &[u8]) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| {
                OpRecord {
                    seq: first + i,
                    time_us: 0,
                    op: Op::Write { path: WirePath(b"f".to_vec()), offset: i, data: data.to_vec() },
                }
                .encode()
            })
            .collect()
    }

    #[test]
    fn compresses_when_it_pays_and_roundtrips() {
        let r = recs(10, 5, &[7u8; 4096]);
        let b = pack_batch(10, &r, Some(3));
        assert_eq!(b.codec, Codec::Zstd);
        assert!(b.payload.len() < 2000);
        let out = unpack_batch(&b, 1 << 24).unwrap();
        assert_eq!(out.len(), 5);
        assert_eq!(out[4].seq, 14);
    }

    #[test]
    fn incompressible_goes_raw() {
        let mut x: u64 = 0x9e3779b97f4a7c15;
        let noise: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let b = pack_batch(1, &recs(1, 1, &noise), Some(3));
        assert_eq!(b.codec, Codec::Raw);
        assert_eq!(unpack_batch(&b, 1 << 24).unwrap().len(), 1);
    }

    #[test]
    fn refuses_bombs_gaps_and_garbage() {
        let mut b = pack_batch(1, &recs(1, 3, b"abc"), Some(3));
        b.raw_len = u32::MAX;
        assert!(matches!(unpack_batch(&b, 1 << 24), Err(BatchError::TooLarge { .. })));
        let b = pack_batch(5, &recs(1, 3, b"abc"), None);
        assert!(matches!(unpack_batch(&b, 1 << 24), Err(BatchError::Sequence(_))));
        let mut b = pack_batch(1, &recs(1, 3, b"abc"), None);
        b.payload.truncate(b.payload.len() - 2);
        b.raw_len = b.payload.len() as u32;
        assert!(matches!(unpack_batch(&b, 1 << 24), Err(BatchError::Record { .. })));
        // A huge declared count must not size an allocation.
        let mut b = pack_batch(1, &recs(1, 1, b"abc"), None);
        b.count = u32::MAX;
        assert!(matches!(unpack_batch(&b, 1 << 24), Err(BatchError::Sequence(_))));
    }
}
