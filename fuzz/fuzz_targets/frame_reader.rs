//! A byte stream as the frame reader meets it on a connection. The first byte says how many of
//! the following pieces get a valid header (so their payloads reach the message decoder past
//! the checksum); whatever is left goes on the stream as it is.
#![no_main]

use doppel_fuzz::{Meter, check};
use doppel_link::{ByteCounter, FrameReader};
use doppel_proto::MAX_FRAME_DEFAULT;
use doppel_proto::frame::header_for;
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static METER: Meter = Meter;

fuzz_target!(|data: &[u8]| {
    let Some((&k, rest)) = data.split_first() else { return };
    let mut stream = Vec::new();
    let mut rest = rest;
    for _ in 0..k % 8 {
        let Some((&len, tail)) = rest.split_first() else { break };
        let (payload, tail) = tail.split_at((len as usize).min(tail.len()));
        stream.extend_from_slice(&header_for(payload));
        stream.extend_from_slice(payload);
        rest = tail;
    }
    stream.extend_from_slice(rest);
    let max = if k & 0x80 != 0 { 64 } else { MAX_FRAME_DEFAULT };
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    check(stream.len(), 0, || {
        rt.block_on(async {
            let mut r = FrameReader::new(&stream[..], max, ByteCounter::default());
            while r.read().await.is_ok() {}
        })
    });
});
