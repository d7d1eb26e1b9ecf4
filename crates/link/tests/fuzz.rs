//! Fuzzing of everything a peer can make this side decode: frames as the reader meets them on a
//! stream and as `decode_frame` takes them, messages (handshakes, batches, acks, listings),
//! batches (raw and zstd), op records and paths.
//!
//! Each decoder is fed random bytes and mutated valid encodings (bit flips, truncations,
//! insertions, inflated length prefixes and counts, lying batch headers, zstd bombs), and every
//! case asserts:
//! - no panic (in a debug build this includes arithmetic overflow);
//! - no hang: a case finishes within [`CASE_LIMIT`], and a watchdog aborts the binary, naming
//!   the input, if one runs for [`HANG`];
//! - bounded memory: the counting allocator below records the peak of live bytes and the largest
//!   single allocation made during the decode, and both stay within [`bound`] of the bytes the
//!   peer actually sent (for a zstd batch, of the decoded size it declares, itself capped).
//!
//! Valid values also round-trip (decode of an encoding gives the value back).
//!
//! The run lasts `DOPPEL_FUZZ_SECS` seconds in all (default 20), shared by the fuzz tests;
//! `DOPPEL_FUZZ_SECS=600 cargo test -p doppel-link --test fuzz` is the long run. The
//! cargo-fuzz targets in `fuzz/` cover the same decoders, coverage-guided, on nightly.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use doppel_link::{ByteCounter, FrameReader, LinkError};
use doppel_proto::frame::{HEADER_LEN, header_for};
use doppel_proto::op::MAX_XATTRS;
use doppel_proto::{
    Attrs, BatchError, Codec, Entry, EntryKind, Hello, ListScope, MAX_BATCH_RAW, MAX_FRAME_DEFAULT, Message,
    Op, OpRecord, Refusal, RelPath, RenameFlags, Timestamp, Welcome, WirePath, Xattr, decode_frame,
    encode_frame, pack_batch, unpack_batch,
};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

mod meter {
    //! A global allocator that counts, per thread and only while [`measure`] runs, the live
    //! bytes, their peak and the largest single allocation.
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    pub struct Meter;

    thread_local! {
        static ON: Cell<bool> = const { Cell::new(false) };
        static LIVE: Cell<isize> = const { Cell::new(0) };
        static PEAK: Cell<isize> = const { Cell::new(0) };
        static LARGEST: Cell<usize> = const { Cell::new(0) };
    }

    fn grew(n: usize) {
        let _ = ON.try_with(|on| {
            if on.get() {
                let live = LIVE.get() + n as isize;
                LIVE.set(live);
                PEAK.set(PEAK.get().max(live));
                LARGEST.set(LARGEST.get().max(n));
            }
        });
    }

    fn shrank(n: usize) {
        let _ = ON.try_with(|on| {
            if on.get() {
                LIVE.set(LIVE.get() - n as isize);
            }
        });
    }

    // SAFETY: every call goes to `System` unchanged; the counting touches only const-initialized
    // thread locals without destructors, which never allocate.
    unsafe impl GlobalAlloc for Meter {
        unsafe fn alloc(&self, l: Layout) -> *mut u8 {
            let p = unsafe { System.alloc(l) };
            if !p.is_null() {
                grew(l.size());
            }
            p
        }

        unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
            let p = unsafe { System.alloc_zeroed(l) };
            if !p.is_null() {
                grew(l.size());
            }
            p
        }

        unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
            unsafe { System.dealloc(p, l) };
            shrank(l.size());
        }

        unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
            let q = unsafe { System.realloc(p, l, new) };
            if !q.is_null() {
                // Counted as a move: old and new are both live for a moment.
                grew(new);
                shrank(l.size());
            }
            q
        }
    }

    /// What one decode took.
    #[derive(Debug, Clone, Copy)]
    pub struct Usage {
        /// Peak of bytes allocated and not yet freed.
        pub peak: usize,
        /// Largest single allocation.
        pub largest: usize,
    }

    /// Runs `f` on this thread, counting what it allocates (what it returns included).
    pub fn measure<R>(f: impl FnOnce() -> R) -> (R, Usage) {
        LIVE.set(0);
        PEAK.set(0);
        LARGEST.set(0);
        ON.set(true);
        let r = f();
        ON.set(false);
        (r, Usage { peak: PEAK.get().max(0) as usize, largest: LARGEST.get() })
    }
}

#[global_allocator]
static METER: meter::Meter = meter::Meter;

/// Memory any decode may use whatever its input: serde sizes a vector from the count the peer
/// declares, but never more than 1 MiB ahead of the elements that actually decode, and a
/// message nests vectors at most three deep (listing entries, their hashes and xattrs).
const FIXED: usize = 4 << 20;

/// Memory per byte received that a decode may hold: a decoded value is bigger than its
/// encoding (an empty path is one byte on the wire and a 24-byte `Vec` in memory, an xattr two
/// bytes and 48), and a growing vector holds the old and the doubled buffer for a moment.
const PER_BYTE: usize = 80;

/// The most a decode of `n` bytes may allocate, at its peak and in one piece.
fn bound(n: usize) -> usize {
    FIXED + PER_BYTE * n
}

/// A case that takes longer fails (and is shrunk): decoding is linear and at most 16 MiB.
const CASE_LIMIT: Duration = Duration::from_secs(5);

/// A case that runs this long is a hang: the watchdog aborts the binary.
const HANG: Duration = Duration::from_secs(60);

/// Number of fuzz tests sharing the time budget.
const TARGETS: u32 = 6;

/// Each fuzz test's share of `DOPPEL_FUZZ_SECS` (default 20 s in all).
fn budget() -> Duration {
    let total: f64 = std::env::var("DOPPEL_FUZZ_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(20.0);
    Duration::from_secs_f64(total.max(0.0)) / TARGETS
}

/// Cases in flight, by thread: when each started and the first bytes of its input.
type InFlight = Mutex<HashMap<ThreadId, (Instant, &'static str, Vec<u8>)>>;

fn in_flight() -> &'static InFlight {
    static CASES: OnceLock<InFlight> = OnceLock::new();
    static WATCHDOG: OnceLock<()> = OnceLock::new();
    let cases = CASES.get_or_init(Default::default);
    WATCHDOG.get_or_init(|| {
        std::thread::spawn(|| {
            loop {
                std::thread::sleep(Duration::from_secs(1));
                let cases = in_flight().lock().unwrap_or_else(|e| e.into_inner());
                for (start, name, input) in cases.values() {
                    if start.elapsed() > HANG {
                        eprintln!(
                            "{name}: a case has run for {:?}: hang on input {input:02x?}",
                            start.elapsed()
                        );
                        std::process::abort();
                    }
                }
            }
        });
    });
    cases
}

/// Runs one decode of `input` (`n` bytes from the peer; `extra` more it may legitimately hold,
/// such as a batch's declared decoded size), checking time and memory.
fn decode<R>(
    name: &'static str,
    input: &[u8],
    n: usize,
    extra: usize,
    f: impl FnOnce() -> R,
) -> Result<R, TestCaseError> {
    let me = std::thread::current().id();
    in_flight().lock().unwrap().insert(me, (Instant::now(), name, input[..input.len().min(256)].to_vec()));
    let start = Instant::now();
    let (r, used) = meter::measure(f);
    let took = start.elapsed();
    in_flight().lock().unwrap().remove(&me);
    let limit = bound(n) + PER_BYTE * extra;
    prop_assert!(took < CASE_LIMIT, "{name}: a decode of {n} bytes took {took:?}");
    prop_assert!(
        used.peak <= limit && used.largest <= limit,
        "{name}: a decode of {n} bytes (+{extra} declared) allocated {used:?}, above {limit}"
    );
    Ok(r)
}

/// Runs `test` on values of `strategy` for this test's share of the budget (at least one round).
fn fuzz<S: Strategy>(name: &str, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>) {
    const ROUND: u32 = 64;
    let deadline = Instant::now() + budget();
    let config =
        Config { cases: ROUND, failure_persistence: None, max_shrink_time: 60_000, ..Config::default() };
    let mut cases = 0u64;
    loop {
        // A runner counts its successes: a fresh one (with a fresh seed) for every round.
        if let Err(e) = TestRunner::new(config.clone()).run(&strategy, &test) {
            panic!("{name}: {e}");
        }
        cases += u64::from(ROUND);
        if Instant::now() >= deadline {
            break;
        }
    }
    eprintln!("{name}: {cases} cases, no failure");
}

// Values.

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..max)
}

/// Paths: mostly plausible names, sometimes anything.
fn wire_path() -> impl Strategy<Value = WirePath> {
    prop_oneof![
        4 => vec(prop_oneof![Just(b'a'), Just(b'/'), Just(b'.'), Just(0u8), any::<u8>()], 0..24),
        1 => bytes(300),
    ]
    .prop_map(WirePath)
}

fn timestamp() -> impl Strategy<Value = Timestamp> {
    (any::<i64>(), any::<u32>()).prop_map(|(secs, nanos)| Timestamp { secs, nanos })
}

fn xattr() -> impl Strategy<Value = Xattr> {
    (bytes(16), bytes(32)).prop_map(|(name, value)| Xattr { name, value })
}

fn attrs() -> impl Strategy<Value = Attrs> {
    (
        any::<Option<u32>>(),
        any::<Option<u32>>(),
        any::<Option<u32>>(),
        proptest::option::of(timestamp()),
        proptest::option::of(timestamp()),
        proptest::option::of(vec(xattr(), 0..4)),
    )
        .prop_map(|(mode, uid, gid, atime, mtime, xattrs)| Attrs {
            mode,
            uid,
            gid,
            atime,
            mtime,
            xattrs,
        })
}

fn op() -> impl Strategy<Value = Op> {
    let p = wire_path;
    prop_oneof![
        (p(), any::<u32>()).prop_map(|(path, mode)| Op::Create { path, mode }),
        (p(), any::<u32>()).prop_map(|(path, mode)| Op::Mkdir { path, mode }),
        (p(), bytes(40)).prop_map(|(path, target)| Op::Symlink { path, target }),
        (p(), p()).prop_map(|(path, existing)| Op::Link { path, existing }),
        (p(), p(), any::<(bool, bool)>()).prop_map(|(from, to, (noreplace, exchange))| Op::Rename {
            from,
            to,
            flags: RenameFlags { noreplace, exchange }
        }),
        p().prop_map(|path| Op::Unlink { path }),
        p().prop_map(|path| Op::Rmdir { path }),
        (p(), any::<u64>(), bytes(600)).prop_map(|(path, offset, data)| Op::Write { path, offset, data }),
        (p(), any::<u64>()).prop_map(|(path, size)| Op::Truncate { path, size }),
        (p(), attrs()).prop_map(|(path, attrs)| Op::SetAttr { path, attrs }),
        proptest::option::of(p()).prop_map(|path| Op::Fsync { path }),
        (p(), any::<u32>(), any::<u64>()).prop_map(|(path, mode, rdev)| Op::Mknod { path, mode, rdev }),
        (p(), any::<u32>(), any::<u64>(), any::<u64>()).prop_map(|(path, mode, offset, len)| Op::Fallocate {
            path,
            mode,
            offset,
            len
        }),
    ]
}

/// A first sequence number: small, or where adding the record index overflows.
fn first_seq() -> impl Strategy<Value = u64> {
    prop_oneof![0..1000u64, (u64::MAX - 8)..=u64::MAX]
}

/// Consecutive records from `first` (wrapping: the wrapped ones are for the decoder to refuse).
fn records() -> impl Strategy<Value = (u64, Vec<OpRecord>)> {
    (first_seq(), vec((any::<u64>(), op()), 0..8)).prop_map(|(first, ops)| {
        let recs = ops
            .into_iter()
            .enumerate()
            .map(|(i, (time_us, op))| OpRecord { seq: first.wrapping_add(i as u64), time_us, op })
            .collect();
        (first, recs)
    })
}

fn encoded(recs: &[OpRecord]) -> Vec<Vec<u8>> {
    recs.iter().map(OpRecord::encode).collect()
}

fn hello() -> impl Strategy<Value = Hello> {
    (any::<u32>(), ".{0,12}", ".{0,12}", any::<Option<[u8; 16]>>(), any::<u64>()).prop_map(
        |(protocol, job, agent_version, replica_id, epoch)| Hello {
            protocol,
            job,
            agent_version,
            replica_id,
            epoch,
        },
    )
}

fn entry() -> impl Strategy<Value = Entry> {
    (
        (wire_path(), 0..5u8, any::<u64>(), any::<u32>(), any::<u32>(), any::<u32>(), timestamp()),
        (
            bytes(16),
            any::<Option<u64>>(),
            any::<u64>(),
            vec(any::<[u8; 32]>(), 0..4),
            vec(xattr(), 0..3),
            any::<bool>(),
        ),
    )
        .prop_map(
            |(
                (path, kind, size, mode, uid, gid, mtime),
                (link_target, link_group, first_block, blocks, xattrs, vouched),
            )| {
                let kind =
                    [EntryKind::File, EntryKind::Dir, EntryKind::Symlink, EntryKind::Fifo, EntryKind::Other]
                        [kind as usize];
                Entry {
                    path,
                    kind,
                    size,
                    mode,
                    uid,
                    gid,
                    mtime,
                    link_target,
                    link_group,
                    first_block,
                    blocks,
                    xattrs,
                    vouched,
                }
            },
        )
}

fn refusal() -> impl Strategy<Value = Refusal> {
    prop_oneof![
        ".{0,12}".prop_map(|identity| Refusal::UnknownSource { identity }),
        any::<(u32, u32)>().prop_map(|(target, source)| Refusal::Version { target, source }),
        ".{0,12}".prop_map(|reason| Refusal::BadJob { reason }),
        any::<u64>().prop_map(|epoch| Refusal::Fenced { epoch }),
        Just(Refusal::Busy),
        ".{0,12}".prop_map(|reason| Refusal::Other { reason }),
        ".{0,12}".prop_map(|job| Refusal::NotFailedOver { job }),
    ]
}

fn message() -> impl Strategy<Value = Message> {
    let welcome =
        (any::<u32>(), any::<[u8; 16]>(), any::<u64>(), any::<u64>(), any::<bool>(), any::<u32>(), ".{0,12}")
            .prop_map(|(protocol, replica_id, applied_seq, epoch, needs_resync, max_frame, source_name)| {
                Welcome { protocol, replica_id, applied_seq, epoch, needs_resync, max_frame, source_name }
            });
    let scope = prop_oneof![
        Just(ListScope::All),
        vec(wire_path(), 0..4).prop_map(ListScope::Paths),
        vec(wire_path(), 0..4).prop_map(ListScope::Children),
        vec((wire_path(), any::<u64>(), any::<u64>()), 0..4).prop_map(ListScope::Ranges),
    ];
    prop_oneof![
        hello().prop_map(Message::Hello),
        welcome.prop_map(Message::Welcome),
        refusal().prop_map(Message::Refused),
        (records(), proptest::option::of(1..4i32))
            .prop_map(|((first, recs), level)| Message::Batch(pack_batch(first, &encoded(&recs), level))),
        any::<u64>().prop_map(|seq| Message::Ack { seq }),
        (any::<u64>(), ".{0,12}").prop_map(|(seq, reason)| Message::OpRefused { seq, reason }),
        any::<u64>().prop_map(|time_us| Message::Heartbeat { time_us }),
        (any::<u64>(), scope).prop_map(|(id, scope)| Message::ListRequest { id, scope }),
        (any::<u64>(), vec(entry(), 0..3)).prop_map(|(id, entries)| Message::ListEntries { id, entries }),
        (any::<u64>(), proptest::option::of(".{0,12}"))
            .prop_map(|(id, error)| Message::ListEnd { id, error }),
        ".{0,12}".prop_map(|reason| Message::Goodbye { reason }),
        ".{0,12}".prop_map(|reason| Message::Stalled { reason }),
        Just(Message::Resumed),
        hello().prop_map(Message::FailbackHello),
        (any::<u64>(), any::<[u8; 16]>(), any::<u64>()).prop_map(|(epoch, replica_id, applied_seq)| {
            Message::FailbackDone { epoch, replica_id, applied_seq }
        }),
    ]
}

// Mutations.

/// One change to an encoding.
#[derive(Debug, Clone)]
enum Mutation {
    /// Flips one bit.
    Flip(Index, u8),
    /// Replaces one byte.
    Set(Index, u8),
    /// Cuts the rest off.
    Truncate(Index),
    /// Inserts bytes.
    Insert(Index, Vec<u8>),
    /// Removes up to this many bytes.
    Remove(Index, u8),
    /// Replaces one byte by the varint of a big number: an inflated length prefix or count.
    Varint(Index, u64),
    /// Repeats a stretch.
    Repeat(Index, u8, u8),
}

fn big() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(u64::from(u32::MAX)),
        Just(u64::MAX),
        Just(u64::from(MAX_FRAME_DEFAULT)),
        (1u64 << 16)..(1 << 36),
        0..300u64,
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<Index>(), 0..8u8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        any::<Index>().prop_map(Mutation::Truncate),
        (any::<Index>(), bytes(8)).prop_map(|(i, b)| Mutation::Insert(i, b)),
        (any::<Index>(), 1..16u8).prop_map(|(i, n)| Mutation::Remove(i, n)),
        (any::<Index>(), big()).prop_map(|(i, v)| Mutation::Varint(i, v)),
        (any::<Index>(), 1..16u8, 1..64u8).prop_map(|(i, n, t)| Mutation::Repeat(i, n, t)),
    ]
}

fn varint(mut v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return out;
        }
        out.push(b | 0x80);
    }
}

fn mutate(mut v: Vec<u8>, ms: &[Mutation]) -> Vec<u8> {
    for m in ms {
        let len = v.len();
        let at = |i: &Index| if len == 0 { 0 } else { i.index(len) };
        match m {
            Mutation::Flip(i, bit) if len > 0 => v[at(i)] ^= 1 << bit,
            Mutation::Set(i, b) if len > 0 => v[at(i)] = *b,
            Mutation::Truncate(i) => v.truncate(at(i)),
            Mutation::Insert(i, b) => {
                let a = at(i);
                v.splice(a..a, b.iter().copied());
            }
            Mutation::Remove(i, n) if len > 0 => {
                let a = at(i);
                v.drain(a..(a + *n as usize).min(len));
            }
            Mutation::Varint(i, big) => {
                let a = at(i);
                let end = (a + 1).min(len);
                v.splice(a..end, varint(*big));
            }
            Mutation::Repeat(i, n, times) if len > 0 => {
                let a = at(i);
                let stretch = v[a..(a + *n as usize).min(len)].to_vec();
                let tail = v.split_off(a);
                for _ in 0..*times {
                    v.extend_from_slice(&stretch);
                }
                v.extend_from_slice(&tail);
            }
            _ => {}
        }
    }
    v
}

/// A message payload: random bytes, or a valid encoding mutated.
fn payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        1 => bytes(2048),
        4 => (message(), vec(mutation(), 0..4)).prop_map(|(m, ms)| mutate(m.encode(), &ms)),
    ]
}

/// A frame: a payload with a valid header (so the decode gets past the checksum), or a
/// whole frame mutated, or a header with a chosen length.
fn frame() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => payload().prop_map(|p| [header_for(&p).as_slice(), &p].concat()),
        2 => (message(), vec(mutation(), 0..4)).prop_map(|(m, ms)| mutate(encode_frame(&m), &ms)),
        1 => (big(), payload()).prop_map(|(len, p)| {
            let mut f = header_for(&p).to_vec();
            f[..4].copy_from_slice(&(len as u32).to_le_bytes());
            f.extend_from_slice(&p);
            f
        }),
        1 => bytes(64),
    ]
}

/// Every path a message carries (what the target turns into `RelPath`s).
fn paths(m: &Message) -> Vec<&WirePath> {
    match m {
        Message::ListRequest { scope: ListScope::Paths(p) | ListScope::Children(p), .. } => {
            p.iter().collect()
        }
        Message::ListRequest { scope: ListScope::Ranges(r), .. } => r.iter().map(|(p, _, _)| p).collect(),
        Message::ListEntries { entries, .. } => entries.iter().map(|e| &e.path).collect(),
        _ => Vec::new(),
    }
}

/// Rules a path on the wire must follow to name something in a replica, written apart from
/// `RelPath`'s own check so the two can be compared.
fn acceptable(p: &[u8]) -> bool {
    p.is_empty()
        || (p.len() <= 4095
            && !p.contains(&0)
            && p.split(|&b| b == b'/').all(|c| !c.is_empty() && c != b"." && c != b".." && c.len() <= 255))
}

// The fuzz tests.

#[test]
fn messages_decode_from_any_bytes_within_bounds() {
    fuzz("messages", payload(), |p| {
        let m = decode("Message::decode", &p, p.len(), 0, || Message::decode(&p))?;
        decode("Message::peek_protocol", &p, p.len(), 0, || Message::peek_protocol(&p))?;
        if let Ok(m) = m {
            prop_assert_eq!(Message::decode(&m.encode()).ok(), Some(m.clone()), "re-encoding changes it");
            for w in paths(&m) {
                let r = decode("RelPath::try_from", &w.0, w.0.len(), 0, || RelPath::try_from(w))?;
                prop_assert_eq!(r.is_ok(), acceptable(&w.0), "path {:?}", w);
            }
        }
        Ok(())
    });
}

#[test]
fn frames_decode_from_any_bytes_within_bounds() {
    fuzz("frames", (frame(), prop_oneof![Just(MAX_FRAME_DEFAULT), 0..4096u32]), |(f, max)| {
        let r = decode("decode_frame", &f, f.len(), 0, || decode_frame(&f, max))?;
        if let Ok(Some((m, used))) = r {
            prop_assert!(used <= f.len() && used - HEADER_LEN <= max as usize);
            prop_assert_eq!(Message::decode(&f[HEADER_LEN..used]).ok(), Some(m));
        }
        Ok(())
    });
}

#[test]
fn the_frame_reader_reads_hostile_streams_within_bounds() {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let streams = (vec(frame(), 1..6), prop_oneof![Just(MAX_FRAME_DEFAULT), 16..4096u32]);
    fuzz("frame reader", streams, |(frames, max)| {
        let stream = frames.concat();
        let read = decode("FrameReader::read", &stream, stream.len(), 0, || {
            rt.block_on(async {
                let mut r = FrameReader::new(&stream[..], max, ByteCounter::default());
                let mut n = 0;
                loop {
                    match r.read().await {
                        Ok(_) => n += 1,
                        Err(e) => return (n, e),
                    }
                }
            })
        })?;
        // Whole valid frames at the start are read; the stream ends in an error or its end.
        let mut valid = 0;
        let mut rest = &stream[..];
        while let Ok(Some((_, used))) = decode_frame(rest, max) {
            valid += 1;
            rest = &rest[used..];
        }
        prop_assert_eq!(read.0, valid, "{:?}", read.1);
        if rest.is_empty() {
            prop_assert!(matches!(read.1, LinkError::Closed), "{:?}", read.1);
        }
        Ok(())
    });
}

/// A batch as a hostile peer may send it.
#[derive(Debug, Clone)]
enum BadBatch {
    /// Valid records, packed, with mutated header fields.
    Fields {
        first: u64,
        recs: Vec<OpRecord>,
        level: Option<i32>,
        count: Option<u32>,
        raw_len: Option<u32>,
        seq: Option<u64>,
        codec: bool,
    },
    /// Valid records, their decoded payload mutated (and compressed again, or not).
    Payload { first: u64, recs: Vec<OpRecord>, ms: Vec<Mutation>, zstd: bool },
    /// Compressed bytes mutated.
    Compressed { first: u64, recs: Vec<OpRecord>, ms: Vec<Mutation> },
    /// `size` bytes of one value compressed, declared as `raw_len` with `count` records.
    Bomb { size: u32, byte: u8, raw_len: u32, count: u32 },
}

fn bad_batch() -> impl Strategy<Value = BadBatch> {
    let declared = || {
        prop_oneof![Just(u32::MAX), Just(MAX_BATCH_RAW), Just(MAX_BATCH_RAW + 1), any::<u32>(), 0..4096u32]
    };
    prop_oneof![
        4 => (records(), proptest::option::of(1..4i32), proptest::option::of(declared()), proptest::option::of(declared()), proptest::option::of(first_seq()), any::<bool>())
            .prop_map(|((first, recs), level, count, raw_len, seq, codec)| BadBatch::Fields { first, recs, level, count, raw_len, seq, codec }),
        4 => (records(), vec(mutation(), 1..4), any::<bool>())
            .prop_map(|((first, recs), ms, zstd)| BadBatch::Payload { first, recs, ms, zstd }),
        2 => (records(), vec(mutation(), 1..4)).prop_map(|((first, recs), ms)| BadBatch::Compressed { first, recs, ms }),
        1 => (prop_oneof![0..(1u32 << 16), (MAX_BATCH_RAW - 64)..(MAX_BATCH_RAW + 64)], any::<u8>(), declared(), declared())
            .prop_map(|(size, byte, raw_len, count)| BadBatch::Bomb { size, byte, raw_len, count }),
    ]
}

/// Builds the batch, and the records it must unpack to if it is still valid.
fn build(b: &BadBatch) -> (doppel_proto::Batch, Option<Vec<OpRecord>>) {
    let valid =
        |first: u64, recs: &[OpRecord]| recs.is_empty() || first.checked_add(recs.len() as u64 - 1).is_some();
    match b {
        BadBatch::Fields { first, recs, level, count, raw_len, seq, codec } => {
            let mut batch = pack_batch(*first, &encoded(recs), *level);
            let untouched = count.is_none() && raw_len.is_none() && seq.is_none() && !codec;
            batch.count = count.unwrap_or(batch.count);
            batch.raw_len = raw_len.unwrap_or(batch.raw_len);
            batch.first_seq = seq.unwrap_or(batch.first_seq);
            if *codec {
                batch.codec = if batch.codec == Codec::Raw { Codec::Zstd } else { Codec::Raw };
            }
            (batch, (untouched && valid(*first, recs)).then(|| recs.clone()))
        }
        BadBatch::Payload { first, recs, ms, zstd } => {
            let raw = mutate(pack_batch(*first, &encoded(recs), None).payload, ms);
            let mut batch = pack_batch(*first, &encoded(recs), None);
            batch.raw_len = raw.len() as u32;
            batch.payload = raw;
            if *zstd {
                batch.payload = zstd::bulk::compress(&batch.payload, 1).unwrap();
                batch.codec = Codec::Zstd;
            }
            (batch, None)
        }
        BadBatch::Compressed { first, recs, ms } => {
            let mut batch = pack_batch(*first, &encoded(recs), None);
            batch.payload = mutate(zstd::bulk::compress(&batch.payload, 1).unwrap(), ms);
            batch.codec = Codec::Zstd;
            (batch, None)
        }
        BadBatch::Bomb { size, byte, raw_len, count } => {
            let payload = zstd::bulk::compress(&vec![*byte; *size as usize], 1).unwrap();
            let batch = doppel_proto::Batch {
                first_seq: 1,
                count: *count,
                codec: Codec::Zstd,
                raw_len: *raw_len,
                payload,
                ack_wanted: false,
            };
            (batch, None)
        }
    }
}

#[test]
fn batches_unpack_within_bounds() {
    fuzz("batches", bad_batch(), |b| {
        let (batch, expect) = build(&b);
        // A zstd batch may legitimately decode to what it declares, if within the cap.
        let declared = if batch.codec == Codec::Zstd && batch.raw_len <= MAX_BATCH_RAW {
            batch.raw_len as usize
        } else {
            0
        };
        let n = batch.payload.len();
        let out =
            decode("unpack_batch", &batch.payload, n, declared, || unpack_batch(&batch, MAX_BATCH_RAW))?;
        if let Some(recs) = expect {
            prop_assert_eq!(out.ok(), Some(recs), "a valid batch does not round-trip");
        } else if let Ok(recs) = out {
            // Whatever passes is consecutive from `first_seq`, as many as declared.
            prop_assert_eq!(recs.len(), batch.count as usize);
            for (i, r) in recs.iter().enumerate() {
                prop_assert_eq!(Some(r.seq), batch.first_seq.checked_add(i as u64));
            }
        }
        // And as the target meets it: inside a frame.
        let frame = encode_frame(&Message::Batch(batch));
        let _ = decode("decode_frame(batch)", &frame, frame.len(), 0, || {
            decode_frame(&frame, MAX_FRAME_DEFAULT)
        })?;
        Ok(())
    });
}

#[test]
fn op_records_decode_from_any_bytes_within_bounds() {
    let input = prop_oneof![
        1 => bytes(1024).prop_map(|b| (None, b)),
        3 => ((any::<u64>(), any::<u64>(), op()), vec(mutation(), 0..4)).prop_map(|((seq, time_us, op), ms)| {
            let r = OpRecord { seq, time_us, op };
            let b = mutate(r.encode(), &ms);
            (ms.is_empty().then_some(r), b)
        }),
    ];
    fuzz("op records", input, |(valid, b)| {
        let r = decode("OpRecord::decode", &b, b.len(), 0, || OpRecord::decode(&b))?;
        if let Some(valid) = valid {
            prop_assert_eq!(r.ok(), Some(valid), "an op record does not round-trip");
        } else if let Ok(r) = r {
            prop_assert_eq!(OpRecord::decode(&r.encode()).ok(), Some(r.clone()));
            for w in r.op.path().into_iter().chain(match &r.op {
                Op::Rename { from, .. } => Some(from),
                Op::Link { existing, .. } => Some(existing),
                _ => None,
            }) {
                prop_assert_eq!(RelPath::try_from(w).is_ok(), acceptable(&w.0), "path {:?}", w);
            }
        }
        Ok(())
    });
}

#[test]
fn paths_are_accepted_exactly_by_their_rules() {
    let alphabet =
        prop_oneof![4 => Just(b'a'), 2 => Just(b'/'), 2 => Just(b'.'), 1 => Just(0u8), 1 => any::<u8>()];
    let path = prop_oneof![
        4 => vec(alphabet, 0..32),
        1 => (1usize..300, 1usize..20).prop_map(|(name, n)| {
            let mut p = vec![b'x'; name];
            for _ in 1..n {
                p.push(b'/');
                p.extend(std::iter::repeat_n(b'y', name));
            }
            p
        }),
        1 => bytes(5000),
    ];
    fuzz("paths", path, |p| {
        let w = WirePath(p.clone());
        let r = decode("RelPath::try_from", &p, p.len(), 0, || RelPath::try_from(&w))?;
        prop_assert_eq!(r.is_ok(), acceptable(&p), "{:?}: {:?}", w, r);
        if let Ok(rel) = r {
            prop_assert_eq!(rel.to_wire(), w);
            if let Some((parent, name)) = rel.split_last() {
                prop_assert_eq!(parent.join(name).ok(), Some(rel.clone()));
                prop_assert_eq!(rel.depth(), parent.depth() + 1);
            }
        }
        Ok(())
    });
}

// The inputs that found bugs, kept as plain tests.

/// A frame header announcing 16 MiB, and nothing after it: the reader used to allocate (and
/// zero) the whole announced frame before reading a byte of it.
#[test]
fn a_frame_header_alone_does_not_allocate_the_frame() {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let mut header = header_for(&[]);
    header[..4].copy_from_slice(&MAX_FRAME_DEFAULT.to_le_bytes());
    let (r, used) = meter::measure(|| {
        rt.block_on(async {
            let mut r = FrameReader::new(&header[..], MAX_FRAME_DEFAULT, ByteCounter::default());
            r.read().await
        })
    });
    assert!(matches!(&r, Err(LinkError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof), "{r:?}");
    assert!(used.peak < 1 << 20, "8 bytes of header cost {used:?}");
}

/// 8 MiB of zeros compress to a few hundred bytes; declared as `u32::MAX` records they used to
/// size the records' vector from the payload (`raw.len() / 5` records, about 280 MB) before
/// the first record failed to decode.
#[test]
fn a_zstd_bomb_with_a_lying_count_holds_no_more_than_its_decoded_size() {
    let payload = zstd::bulk::compress(&vec![0u8; MAX_BATCH_RAW as usize], 3).unwrap();
    assert!(payload.len() < 4096);
    let batch = doppel_proto::Batch {
        first_seq: 1,
        count: u32::MAX,
        codec: Codec::Zstd,
        raw_len: MAX_BATCH_RAW,
        payload,
        ack_wanted: false,
    };
    let (r, used) = meter::measure(|| unpack_batch(&batch, MAX_BATCH_RAW));
    assert!(matches!(r, Err(BatchError::Record { index: 0, .. })), "{r:?}");
    assert!(used.peak <= MAX_BATCH_RAW as usize + (64 << 10), "{used:?}");
    // Declaring more than the cap costs nothing at all.
    let batch = doppel_proto::Batch { raw_len: MAX_BATCH_RAW + 1, ..batch };
    let (r, used) = meter::measure(|| unpack_batch(&batch, MAX_BATCH_RAW));
    assert!(matches!(r, Err(BatchError::TooLarge { .. })), "{r:?}");
    assert!(used.peak < 4096, "{used:?}");
}

/// `first_seq = u64::MAX` with two records: computing the second record's expected sequence
/// overflowed, a panic in a debug build (a wrap to 0 in a release build).
#[test]
fn a_batch_at_the_end_of_the_sequence_space_is_refused() {
    let rec = |seq| OpRecord { seq, time_us: 0, op: Op::Fsync { path: None } }.encode();
    let batch = pack_batch(u64::MAX, &[rec(u64::MAX), rec(0)], None);
    assert!(matches!(unpack_batch(&batch, MAX_BATCH_RAW), Err(BatchError::Sequence(_))));
    let batch = pack_batch(u64::MAX, &[rec(u64::MAX)], None);
    assert_eq!(unpack_batch(&batch, MAX_BATCH_RAW).unwrap().len(), 1);
}

/// The smallest record the batch framing accepts is the smallest a record encodes to.
#[test]
fn the_smallest_record_is_four_bytes() {
    let r = OpRecord { seq: 0, time_us: 0, op: Op::Fsync { path: None } };
    assert_eq!(r.encode().len(), 4);
    let r = OpRecord { seq: 0, time_us: 0, op: Op::Unlink { path: WirePath(Vec::new()) } };
    assert_eq!(r.encode().len(), 4);
}

/// The inputs that make decoded values largest relative to their encoding, at full size (the
/// random cases are small): each stays within the bound, and the figures are printed.
#[test]
fn the_worst_amplifications_stay_within_the_bound() {
    let empty = || WirePath(Vec::new());
    // A listing request of empty paths: one byte each on the wire, 24 in memory.
    let paths = Message::ListRequest { id: 1, scope: ListScope::Paths(vec![empty(); 1 << 20]) }.encode();
    // Listing entries of the smallest encoding.
    let entry = Entry {
        path: empty(),
        kind: EntryKind::File,
        size: 0,
        mode: 0,
        uid: 0,
        gid: 0,
        mtime: Timestamp::default(),
        link_target: Vec::new(),
        link_group: None,
        first_block: 0,
        blocks: Vec::new(),
        xattrs: Vec::new(),
        vouched: false,
    };
    let entries = Message::ListEntries { id: 1, entries: vec![entry; 1 << 16] }.encode();
    for (name, bytes) in [("ListRequest of empty paths", paths), ("ListEntries of empty entries", entries)] {
        let (m, used) = meter::measure(|| Message::decode(&bytes));
        assert!(m.is_ok());
        eprintln!("{name}: {} bytes decode with {used:?}", bytes.len());
        assert!(used.peak <= bound(bytes.len()), "{name}: {used:?}");
    }
    // Batches of the largest decoded size, zstd-compressed: the smallest records (ten bytes
    // with their length, as sequence numbers grow to three), and SetAttr records of as many
    // empty xattrs as a file can have (two bytes each on the wire, 48 in memory; one more is
    // refused).
    let fsyncs: Vec<Vec<u8>> = (0..(MAX_BATCH_RAW as u64 / 10))
        .map(|i| OpRecord { seq: 1 + i, time_us: 0, op: Op::Fsync { path: None } }.encode())
        .collect();
    let setattr = |seq: u64, n: usize| {
        let xattrs = Some(vec![Xattr { name: Vec::new(), value: Vec::new() }; n]);
        OpRecord {
            seq,
            time_us: 0,
            op: Op::SetAttr { path: empty(), attrs: Attrs { xattrs, ..Attrs::default() } },
        }
        .encode()
    };
    let too_many = pack_batch(1, &[setattr(1, MAX_XATTRS + 1)], Some(3));
    assert!(matches!(unpack_batch(&too_many, MAX_BATCH_RAW), Err(BatchError::Record { index: 0, .. })));
    let setattrs: Vec<Vec<u8>> = (0..MAX_BATCH_RAW as u64 / (2 * MAX_XATTRS as u64 + 16))
        .map(|i| setattr(1 + i, MAX_XATTRS))
        .collect();
    for (name, recs) in
        [("batch of Fsync records", fsyncs), ("batch of SetAttr records of empty xattrs", setattrs)]
    {
        let batch = pack_batch(1, &recs, Some(3));
        assert_eq!(batch.codec, Codec::Zstd);
        let declared = batch.raw_len as usize;
        assert!(declared <= MAX_BATCH_RAW as usize, "{declared}");
        let (r, used) = meter::measure(|| unpack_batch(&batch, MAX_BATCH_RAW));
        assert_eq!(r.unwrap().len(), recs.len());
        eprintln!("{name}: {} bytes decoding to {declared} unpack with {used:?}", batch.payload.len());
        assert!(used.peak <= bound(batch.payload.len()) + PER_BYTE * declared, "{name}: {used:?}");
    }
}
