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
/// `None` to send raw. A one-off: a sender packing batch after batch keeps a [`Packer`].
pub fn pack_batch(first_seq: u64, records: &[impl AsRef<[u8]>], level: Option<i32>) -> Batch {
    Packer::default().pack(first_seq, records, level)
}

/// Packs batches with one zstd context kept from batch to batch.
///
/// Making a context allocates and clears its tables (more at higher levels): with small files
/// the batches are small and many, and a context per batch took a third of the sender's time
/// spent compressing (perf, 100,000 files of 0-99 bytes).
#[derive(Default)]
pub struct Packer {
    /// The context and the level it is set to.
    zstd: Option<(zstd::bulk::Compressor<'static>, i32)>,
}

impl Packer {
    /// [`pack_batch`] with this packer's context.
    pub fn pack(&mut self, first_seq: u64, records: &[impl AsRef<[u8]>], level: Option<i32>) -> Batch {
        let raw_len: usize = records.iter().map(|r| 4 + r.as_ref().len()).sum();
        let mut raw = Vec::with_capacity(raw_len);
        for r in records {
            raw.extend_from_slice(&(r.as_ref().len() as u32).to_le_bytes());
            raw.extend_from_slice(r.as_ref());
        }
        let (codec, payload) = match level.map(|l| self.compress(&raw, l)) {
            Some(Some(c)) if (c.len() as f64) <= raw.len() as f64 * WORTHWHILE => (Codec::Zstd, c),
            _ => (Codec::Raw, raw),
        };
        Batch {
            first_seq,
            count: records.len() as u32,
            codec,
            raw_len: raw_len as u32,
            payload,
            ack_wanted: false,
        }
    }

    /// `raw` compressed at `level`, or `None` if zstd fails (the batch then goes raw).
    fn compress(&mut self, raw: &[u8], level: i32) -> Option<Vec<u8>> {
        match &mut self.zstd {
            Some((c, l)) if *l == level => {}
            Some((c, l)) => {
                c.set_compression_level(level).ok()?;
                *l = level;
            }
            None => self.zstd = Some((zstd::bulk::Compressor::new(level).ok()?, level)),
        }
        let (c, _) = self.zstd.as_mut()?;
        c.compress(raw).ok()
    }
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
    Unpacker::default().unpack(batch, max_raw)
}

/// Unpacks batches with one zstd context kept from batch to batch (see [`Packer`]).
#[derive(Default)]
pub struct Unpacker {
    zstd: Option<zstd::bulk::Decompressor<'static>>,
}

impl Unpacker {
    /// [`unpack_batch`] with this unpacker's context.
    pub fn unpack(&mut self, batch: &Batch, max_raw: u32) -> Result<Vec<OpRecord>, BatchError> {
        if batch.raw_len > max_raw {
            return Err(BatchError::TooLarge { raw_len: batch.raw_len, max: max_raw });
        }
        let decoded;
        let raw: &[u8] = match batch.codec {
            Codec::Raw => &batch.payload,
            Codec::Zstd => {
                decoded = self.decompress(&batch.payload, batch.raw_len as usize)?;
                &decoded
            }
        };
        decode_records(batch, raw)
    }

    /// The output buffer is exactly `raw_len`: a frame decoding to more fails.
    fn decompress(&mut self, payload: &[u8], raw_len: usize) -> Result<Vec<u8>, BatchError> {
        let codec = |e: std::io::Error| BatchError::Codec(e.to_string());
        let d = match &mut self.zstd {
            Some(d) => d,
            None => self.zstd.insert(zstd::bulk::Decompressor::new().map_err(codec)?),
        };
        d.decompress(payload, raw_len).map_err(codec)
    }
}

/// The records of a decoded payload, checked against the batch's header.
fn decode_records(batch: &Batch, raw: &[u8]) -> Result<Vec<OpRecord>, BatchError> {
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

    /// One packer and one unpacker carry batch after batch across level changes, raw batches
    /// and a batch that does not decode, each decoding to exactly what was packed.
    #[test]
    fn kept_contexts_roundtrip_across_levels_and_failures() {
        let (mut packer, mut unpacker) = (Packer::default(), Unpacker::default());
        let mut first = 1;
        for level in [Some(3), Some(3), Some(9), None, Some(1), Some(19), Some(1)] {
            let r = recs(first, 4, format!("level {level:?} ").repeat(200).as_bytes());
            let b = packer.pack(first, &r, level);
            assert_eq!(b.codec == Codec::Zstd, level.is_some(), "level {level:?}");
            assert_eq!(b, pack_batch(first, &r, level), "a kept context packs as a fresh one");
            let out = unpacker.unpack(&b, 1 << 24).unwrap();
            assert_eq!(out.iter().map(|o| o.encode()).collect::<Vec<_>>(), r, "level {level:?}");
            let mut bad = b.clone();
            if bad.codec == Codec::Zstd {
                let n = bad.payload.len();
                bad.payload[n / 2] ^= 0xff;
                bad.payload.truncate(n - 3);
                assert!(unpacker.unpack(&bad, 1 << 24).is_err(), "a damaged frame at level {level:?}");
            }
            first += 4;
        }
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
