//! Any bytes as a path from the wire: accepted exactly when the rules say, and an accepted
//! path splits and joins back to itself.
#![no_main]

use doppel_fuzz::{Meter, acceptable, check};
use doppel_proto::{RelPath, WirePath};
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static METER: Meter = Meter;

fuzz_target!(|data: &[u8]| {
    let w = WirePath(data.to_vec());
    let r = check(data.len(), 0, || RelPath::try_from(&w));
    assert_eq!(r.is_ok(), acceptable(data), "{w:?}: {r:?}");
    if let Ok(rel) = r {
        assert_eq!(rel.to_wire(), w);
        if let Some((parent, name)) = rel.split_last() {
            assert_eq!(parent.join(name).ok(), Some(rel.clone()));
        }
    }
});
