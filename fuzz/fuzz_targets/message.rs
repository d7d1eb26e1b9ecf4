//! Any bytes as a frame payload: the message, the version peek, the paths it carries, and a
//! batch's records.
#![no_main]

use doppel_fuzz::{Meter, acceptable, check};
use doppel_proto::{Codec, ListScope, MAX_BATCH_RAW, Message, RelPath, unpack_batch};
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static METER: Meter = Meter;

fuzz_target!(|data: &[u8]| {
    check(data.len(), 0, || Message::peek_protocol(data));
    let Ok(m) = check(data.len(), 0, || Message::decode(data)) else { return };
    assert_eq!(Message::decode(&m.encode()).ok().as_ref(), Some(&m), "re-encoding changes the message");
    let paths: Vec<_> = match &m {
        Message::ListRequest { scope: ListScope::Paths(p), .. } => p.iter().collect(),
        Message::ListRequest { scope: ListScope::Ranges(r), .. } => r.iter().map(|(p, _, _)| p).collect(),
        Message::ListEntries { entries, .. } => entries.iter().map(|e| &e.path).collect(),
        _ => Vec::new(),
    };
    for w in paths {
        assert_eq!(RelPath::try_from(w).is_ok(), acceptable(&w.0), "{w:?}");
    }
    if let Message::Batch(b) = &m {
        let declared =
            if b.codec == Codec::Zstd && b.raw_len <= MAX_BATCH_RAW { b.raw_len as usize } else { 0 };
        if let Ok(recs) = check(b.payload.len(), declared, || unpack_batch(b, MAX_BATCH_RAW)) {
            assert_eq!(recs.len(), b.count as usize);
        }
    }
});
