//! Any bytes as one op record (a batch's element, and a spool record).
#![no_main]

use doppel_fuzz::{Meter, acceptable, check};
use doppel_proto::{Op, OpRecord, RelPath};
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static METER: Meter = Meter;

fuzz_target!(|data: &[u8]| {
    let Ok(r) = check(data.len(), 0, || OpRecord::decode(data)) else { return };
    assert_eq!(OpRecord::decode(&r.encode()).ok().as_ref(), Some(&r));
    let other = match &r.op {
        Op::Rename { from, .. } => Some(from),
        Op::Link { existing, .. } => Some(existing),
        _ => None,
    };
    for w in r.op.path().into_iter().chain(other) {
        assert_eq!(RelPath::try_from(w).is_ok(), acceptable(&w.0), "{w:?}");
    }
});
