use super::*;
use doppel_proto::WirePath;

fn op(i: u64, n: usize) -> Op {
    Op::Write { path: WirePath(b"f".to_vec()), offset: i, data: vec![i as u8; n] }
}

fn seqs(recs: &[Bytes]) -> Vec<u64> {
    recs.iter().map(|r| OpRecord::decode(r).unwrap().seq).collect()
}

fn limits(memory: usize, disk: u64) -> SpoolLimits {
    SpoolLimits { memory, disk, segment: 4096 }
}

#[test]
fn sequences_are_gap_free_and_reads_span_memory_and_disk() {
    let d = tempfile::tempdir().unwrap();
    let (s, rec) = Spool::open(d.path(), limits(2000, 1 << 20)).unwrap();
    assert_eq!(rec, Recovery { acked: 0, last_seq: 0, discarded_after_gap: false });
    for i in 1..=100 {
        assert_eq!(s.append(op(i, 100), i, Placement::Spill, true).unwrap(), i);
    }
    let st = s.stats();
    assert!(st.disk_bytes > 0 && st.memory_bytes > 0, "{st:?}");
    assert_eq!(seqs(&s.read(1, usize::MAX).unwrap().1), (1..=100).collect::<Vec<_>>());
    assert_eq!(seqs(&s.read(57, 300).unwrap().1), vec![57, 58]);
    assert!(s.read(101, 1000).unwrap().1.is_empty());
    assert_eq!(st.oldest_pending_us, Some(1));
}

#[test]
fn ack_drops_prefix_and_deletes_segments() {
    let d = tempfile::tempdir().unwrap();
    let (s, _) = Spool::open(d.path(), limits(0, 1 << 20)).unwrap();
    for i in 1..=200 {
        s.append(op(i, 100), i, Placement::Spill, true).unwrap();
    }
    let files = || {
        std::fs::read_dir(d.path())
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "seg"))
            .count()
    };
    let before = files();
    assert!(before > 3);
    s.ack(150).unwrap();
    assert!(files() < before);
    assert_eq!(seqs(&s.read(1, usize::MAX).unwrap().1), (151..=200).collect::<Vec<_>>());
    s.ack(200).unwrap();
    assert_eq!(s.stats().disk_bytes, 0);
    assert_eq!(s.stats().oldest_pending_us, None);
}

#[test]
fn persist_then_reopen_recovers_everything_unacked() {
    let d = tempfile::tempdir().unwrap();
    {
        let (s, _) = Spool::open(d.path(), limits(1 << 20, 1 << 20)).unwrap();
        for i in 1..=50 {
            s.append(op(i, 10), i, Placement::Spill, true).unwrap();
        }
        s.ack(20).unwrap();
        s.persist().unwrap();
    }
    let (s, rec) = Spool::open(d.path(), limits(1 << 20, 1 << 20)).unwrap();
    assert_eq!(rec, Recovery { acked: 20, last_seq: 50, discarded_after_gap: false });
    assert_eq!(seqs(&s.read(0, usize::MAX).unwrap().1), (21..=50).collect::<Vec<_>>());
    assert_eq!(s.append(op(0, 1), 0, Placement::Spill, true).unwrap(), 51);
}

#[test]
fn memory_only_records_are_lost_and_a_gap_discards_later_segments() {
    let d = tempfile::tempdir().unwrap();
    {
        let (s, _) = Spool::open(d.path(), limits(1500, 1 << 20)).unwrap();
        // 1..=10 in memory, then persist: on disk.
        for i in 1..=10 {
            s.append(op(i, 100), i, Placement::Spill, true).unwrap();
        }
        s.persist().unwrap();
        // 11.. fill memory, then spill to disk after a memory-only stretch.
        for i in 11..=40 {
            s.append(op(i, 100), i, Placement::Spill, true).unwrap();
        }
        // Dropped without persist: memory records 11..n die, disk ones after them are orphans.
    }
    let (s, rec) = Spool::open(d.path(), limits(1500, 1 << 20)).unwrap();
    assert_eq!(rec.last_seq, 10);
    assert!(rec.discarded_after_gap);
    assert_eq!(seqs(&s.read(0, usize::MAX).unwrap().1), (1..=10).collect::<Vec<_>>());
}

#[test]
fn torn_tail_is_truncated() {
    let d = tempfile::tempdir().unwrap();
    {
        let (s, _) = Spool::open(d.path(), limits(0, 1 << 20)).unwrap();
        for i in 1..=5 {
            s.append(op(i, 10), i, Placement::Spill, true).unwrap();
        }
    }
    let seg = d.path().join(segment::name_for(1));
    let len = std::fs::metadata(&seg).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    f.set_len(len - 3).unwrap();
    let (s, rec) = Spool::open(d.path(), limits(0, 1 << 20)).unwrap();
    assert_eq!(rec.last_seq, 4);
    assert_eq!(s.append(op(9, 1), 0, Placement::Spill, true).unwrap(), 5);
    assert_eq!(seqs(&s.read(0, usize::MAX).unwrap().1), vec![1, 2, 3, 4, 5]);
}

#[test]
fn full_disk_refuses_or_waits_for_acks() {
    let d = tempfile::tempdir().unwrap();
    let (s, _) = Spool::open(d.path(), limits(0, 1000)).unwrap();
    let mut n = 0;
    loop {
        match s.append(op(n, 100), 0, Placement::Spill, false) {
            Ok(_) => n += 1,
            Err(SpoolError::Full { used, limit }) => {
                assert!(used <= limit);
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(n > 3);
    let s = std::sync::Arc::new(s);
    let s2 = s.clone();
    let waiter = std::thread::spawn(move || s2.append(op(99, 100), 0, Placement::Spill, true).unwrap());
    s.ack(n).unwrap();
    assert_eq!(waiter.join().unwrap(), n + 1);
}

/// A target behind the spool: what it has not applied is kept, numbering goes on.
#[test]
fn catch_up_behind_the_spool_keeps_the_rest() {
    let d = tempfile::tempdir().unwrap();
    let (s, _) = Spool::open(d.path(), limits(1 << 20, 1 << 20)).unwrap();
    for i in 1..=5 {
        s.append(op(i, 1), 0, Placement::Spill, true).unwrap();
    }
    s.catch_up(3).unwrap();
    assert_eq!(seqs(&s.read(0, usize::MAX).unwrap().1), [4, 5]);
    assert_eq!(s.append(op(0, 1), 0, Placement::Spill, true).unwrap(), 6);
}

#[test]
fn reset_and_catch_up_renumber() {
    let d = tempfile::tempdir().unwrap();
    let (s, _) = Spool::open(d.path(), limits(1 << 20, 1 << 20)).unwrap();
    for i in 1..=5 {
        s.append(op(i, 1), 0, Placement::Spill, true).unwrap();
    }
    s.catch_up(9).unwrap();
    assert!(s.read(0, usize::MAX).unwrap().1.is_empty());
    assert_eq!(s.append(op(0, 1), 0, Placement::Spill, true).unwrap(), 10);
    s.reset(100).unwrap();
    assert_eq!(s.stats().acked, 100);
    assert_eq!(s.append(op(0, 1), 0, Placement::Spill, true).unwrap(), 101);
}

#[tokio::test]
async fn wait_for_wakes_on_append() {
    let d = tempfile::tempdir().unwrap();
    let (s, _) = Spool::open(d.path(), SpoolLimits::default()).unwrap();
    let s = std::sync::Arc::new(s);
    let s2 = s.clone();
    let t = tokio::spawn(async move {
        s2.wait_for(1).await;
        s2.read(1, 100).unwrap().1.len()
    });
    tokio::task::yield_now().await;
    s.append(op(1, 1), 0, Placement::Spill, true).unwrap();
    assert_eq!(tokio::time::timeout(Duration::from_secs(5), t).await.unwrap().unwrap(), 1);
}

/// A waiter for a later record is not woken by the appends before it (one wake per record
/// cost a system call per record), and is woken by the one it waits for.
#[tokio::test]
async fn wait_for_sleeps_through_appends_before_its_record() {
    let d = tempfile::tempdir().unwrap();
    let (s, _) = Spool::open(d.path(), SpoolLimits::default()).unwrap();
    let s = std::sync::Arc::new(s);
    let s2 = s.clone();
    let mut t = tokio::spawn(async move { s2.wait_for(10).await });
    tokio::task::yield_now().await;
    for i in 1..=9 {
        s.append(op(i, 1), 0, Placement::Spill, true).unwrap();
        tokio::task::yield_now().await;
        assert_eq!(s.lock().wake_at, 11, "the waiter is registered for record 10 after {i} appends");
    }
    assert!(tokio::time::timeout(Duration::from_millis(50), &mut t).await.is_err(), "woke before record 10");
    s.append(op(10, 1), 0, Placement::Spill, true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), t).await.expect("woken by record 10").unwrap();
}

#[test]
fn disk_placement_writes_through_and_survives_without_persist() {
    let d = tempfile::tempdir().unwrap();
    {
        let (s, _) = Spool::open(d.path(), limits(1 << 20, 1 << 20)).unwrap();
        for i in 1..=5 {
            s.append(op(i, 10), i, Placement::Disk, true).unwrap();
        }
        assert_eq!(s.stats().memory_bytes, 0);
        // Dropped without persist, as a killed process would be.
    }
    let (s, rec) = Spool::open(d.path(), limits(1 << 20, 1 << 20)).unwrap();
    assert_eq!(rec.last_seq, 5);
    assert_eq!(seqs(&s.read(0, usize::MAX).unwrap().1), vec![1, 2, 3, 4, 5]);
}

#[test]
fn wait_acked_times_out_or_wakes() {
    let d = tempfile::tempdir().unwrap();
    let (s, _) = Spool::open(d.path(), SpoolLimits::default()).unwrap();
    let s = std::sync::Arc::new(s);
    let seq = s.append(op(1, 1), 0, Placement::Disk, true).unwrap();
    assert!(!s.wait_acked(seq, Duration::from_millis(30)));
    let s2 = s.clone();
    let t = std::thread::spawn(move || s2.wait_acked(seq, Duration::from_secs(10)));
    s.ack(seq).unwrap();
    assert!(t.join().unwrap());
}

#[test]
fn an_acknowledged_segment_is_written_over_by_the_next_and_its_old_records_never_return() {
    use std::os::unix::fs::MetadataExt;
    let d = tempfile::tempdir().unwrap();
    let spare = d.path().join(SPARE_FILE);
    let ino = |p: &std::path::Path| std::fs::metadata(p).unwrap().ino();
    {
        let (s, _) = Spool::open(d.path(), limits(0, 1 << 20)).unwrap();
        // Segments of 4096 bytes: about 35 records of 100 bytes each.
        for i in 1..=100 {
            s.append(op(i, 100), i, Placement::Disk, false).unwrap();
        }
        let first = d.path().join(segment::name_for(1));
        let first_ino = ino(&first);
        s.ack(100).unwrap();
        // One acknowledged file is kept (the first one retired), the others are deleted.
        assert_eq!(ino(&spare), first_ino);
        let segs = std::fs::read_dir(d.path())
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "seg"));
        assert_eq!(segs.count(), 0);
        // The next segment is that file, written over from its start; three short records
        // leave most of its 35 old ones behind the new end.
        for i in 101..=103 {
            s.append(op(i, 10), i, Placement::Disk, false).unwrap();
        }
        assert!(!spare.exists());
        assert_eq!(ino(&d.path().join(segment::name_for(101))), first_ino);
        assert_eq!(seqs(&s.read(101, usize::MAX).unwrap().1), vec![101, 102, 103]);
    }
    // A kill now: recovery finds the three new records and none of the old ones.
    let (s, rec) = Spool::open(d.path(), limits(0, 1 << 20)).unwrap();
    assert_eq!(rec, Recovery { acked: 100, last_seq: 103, discarded_after_gap: false });
    let recs = s.read(101, usize::MAX).unwrap().1;
    assert_eq!(seqs(&recs), vec![101, 102, 103]);
    assert!(
        recs.iter()
            .all(|r| matches!(&OpRecord::decode(r).unwrap().op, Op::Write { data, .. } if data.len() == 10))
    );
    assert_eq!(s.append(op(104, 10), 104, Placement::Disk, false).unwrap(), 104);
}

#[test]
fn a_reset_that_numbers_lower_does_not_write_over_a_spare() {
    let d = tempfile::tempdir().unwrap();
    let spare = d.path().join(SPARE_FILE);
    let (s, _) = Spool::open(d.path(), limits(0, 1 << 20)).unwrap();
    for i in 1..=100 {
        s.append(op(i, 100), i, Placement::Disk, false).unwrap();
    }
    s.ack(100).unwrap();
    assert!(spare.exists());
    // A new replica: numbering starts again at 1, below the spare's old records. Records of
    // the same size as the old ones: written over the spare, old record 4 would follow new
    // record 3 where recovery looks for it.
    s.reset(0).unwrap();
    assert!(!spare.exists());
    for i in 1..=3 {
        assert_eq!(s.append(op(i, 100), i, Placement::Disk, false).unwrap(), i);
    }
    drop(s);
    let (s, rec) = Spool::open(d.path(), limits(0, 1 << 20)).unwrap();
    assert_eq!(rec.last_seq, 3);
    assert_eq!(seqs(&s.read(1, usize::MAX).unwrap().1), vec![1, 2, 3]);
}

#[test]
fn a_spare_left_by_an_earlier_process_is_deleted_at_open() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join(SPARE_FILE), b"old records").unwrap();
    let (s, rec) = Spool::open(d.path(), limits(0, 1 << 20)).unwrap();
    assert_eq!(rec.last_seq, 0);
    assert!(!d.path().join(SPARE_FILE).exists());
    assert_eq!(s.append(op(1, 10), 1, Placement::Disk, false).unwrap(), 1);
}
