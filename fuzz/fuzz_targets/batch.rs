//! A batch with any header and payload: `[first_seq u64][count u32][raw_len u32][flags u8]`,
//! then the payload. Flag 1: zstd codec; flag 2: compress the payload first (so the records
//! reach the decoder through zstd); flag 4 with 2: declare the decoded size from the header,
//! not the real one.
#![no_main]

use doppel_fuzz::{Meter, check};
use doppel_proto::{Batch, Codec, MAX_BATCH_RAW, unpack_batch};
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static METER: Meter = Meter;

fuzz_target!(|data: &[u8]| {
    if data.len() < 17 {
        return;
    }
    let first_seq = u64::from_le_bytes(data[0..8].try_into().unwrap());
    let count = u32::from_le_bytes(data[8..12].try_into().unwrap());
    let mut raw_len = u32::from_le_bytes(data[12..16].try_into().unwrap());
    let flags = data[16];
    let mut payload = data[17..].to_vec();
    let mut codec = if flags & 1 != 0 { Codec::Zstd } else { Codec::Raw };
    if flags & 2 != 0 {
        if flags & 4 == 0 {
            raw_len = payload.len() as u32;
        }
        payload = zstd::bulk::compress(&payload, 1).unwrap();
        codec = Codec::Zstd;
    }
    let batch = Batch { first_seq, count, codec, raw_len, payload };
    let declared = if codec == Codec::Zstd && raw_len <= MAX_BATCH_RAW { raw_len as usize } else { 0 };
    if let Ok(recs) = check(batch.payload.len(), declared, || unpack_batch(&batch, MAX_BATCH_RAW)) {
        assert_eq!(recs.len(), count as usize);
        for (i, r) in recs.iter().enumerate() {
            assert_eq!(Some(r.seq), first_seq.checked_add(i as u64));
        }
    }
});
