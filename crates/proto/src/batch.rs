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

/// Largest decoded batch a receiver accepts. A sender packs about 1 MiB of records (plus at
/// most one record beyond that, itself at most 1 MiB of data), so this leaves more than 2x
/// headroom, and it bounds what a few bytes of zstd can make the receiver hold: decoded records
/// take up to about 25 times their encoding in memory (the fuzz tests measure 122 MB for 8 MiB
/// of the smallest records, 209 MB for 8 MiB of empty xattrs).
pub const MAX_BATCH_RAW: u32 = 8 << 20;

/// Smallest encoding of a record: sequence, time and op tag take at least a byte each, and the
/// smallest op (`Fsync` without a path, or an empty path) one more.
const MIN_RECORD_LEN: usize = 4;

/// Unpacks and decodes the records, checking sizes and sequence continuity.
///
/// Memory is bounded by what the peer actually sent, never by a number it declared: zstd
/// output is capped at `raw_len` (itself capped at `max_raw`) and cannot grow past it; the
/// records are counted (each at least [`MIN_RECORD_LEN`] bytes) and the count checked against
/// the header before the vector is sized, so a lying `count` or a payload of empty records
/// costs nothing.
pub fn unpack_batch(batch: &Batch, max_raw: u32) -> Result<Vec<OpRecord>, BatchError> {
    if batch.raw_len > max_raw {
        return Err(BatchError::TooLarge { raw_len: batch.raw_len, max: max_raw });
    }
    let decoded;
    let raw: &[u8] = match batch.codec {
        Codec::Raw => &batch.payload,
        Codec::Zstd => {
            // The output buffer is exactly `raw_len`: a frame decoding to more fails.
            decoded = zstd::bulk::decompress(&batch.payload, batch.raw_len as usize)
                .map_err(|e| BatchError::Codec(e.to_string()))?;
            &decoded
        }
    };
    if raw.len() != batch.raw_len as usize {
        return Err(BatchError::Codec(format!("decoded {} bytes, header said {}", raw.len(), batch.raw_len)));
    }
    // First pass: the framing alone, so that `count` is checked before it sizes anything.
    let count = records(raw).try_fold(0usize, |n, r| r.map(|_| n + 1))?;
    if count != batch.count as usize {
        return Err(BatchError::Sequence(format!("{count} records, header said {}", batch.count)));
    }
    let mut out = Vec::with_capacity(count);
    for (index, bytes) in records(raw).enumerate() {
        let rec =
            OpRecord::decode(bytes?).map_err(|e| BatchError::Record { index, reason: e.to_string() })?;
        // Checked: a `first_seq` near the top of the range must not overflow.
        if Some(rec.seq) != batch.first_seq.checked_add(index as u64) {
            return Err(BatchError::Sequence(format!(
                "record {index} has seq {}, expected {} + {index}",
                rec.seq, batch.first_seq
            )));
        }
        out.push(rec);
    }
    Ok(out)
}

/// The records of a decoded payload, each `[u32 length][record]`, as slices.
fn records(raw: &[u8]) -> impl Iterator<Item = Result<&[u8], BatchError>> {
    let mut rest = raw;
    let mut index = 0;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let bad = |reason: String| Some(Err(BatchError::Record { index, reason }));
        if rest.len() < 4 {
            rest = &[];
            return bad("truncated length".into());
        }
        let len = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
        if len < MIN_RECORD_LEN {
            rest = &[];
            return bad(format!("{len} bytes is shorter than any record"));
        }
        if rest.len() - 4 < len {
            rest = &[];
            return bad("truncated record".into());
        }
        let rec = &rest[4..4 + len];
        rest = &rest[4 + len..];
        index += 1;
        Some(Ok(rec))
    })
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
