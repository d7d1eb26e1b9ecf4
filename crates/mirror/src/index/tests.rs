use super::*;

fn p(s: &str) -> RelPath {
    RelPath::new(s).unwrap()
}

fn file(ino: u64) -> IndexEntry {
    IndexEntry {
        kind: EntryKind::File,
        size: 0,
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime: Timestamp::default(),
        ctime: Timestamp::default(),
        ino,
        link_target: vec![],
        blocks: vec![],
        xattrs: vec![],
    }
}

fn names(v: Vec<RelPath>) -> Vec<String> {
    v.iter().map(|p| p.to_string()).collect()
}

fn all(i: &Index) -> Vec<String> {
    names(i.first_paths(&RelPath::root(), None, usize::MAX).unwrap())
}

#[test]
fn subtrees_renames_and_inodes() {
    let mut i = Index::temporary().unwrap();
    for (k, ino) in [("a", 1), ("a/b", 2), ("a/b/c", 3), ("a-x", 4), ("ab", 5), ("z", 3)] {
        i.insert(&p(k), &file(ino)).unwrap();
    }
    // Walk order: a directory's contents come right after it, before "a-x".
    assert_eq!(all(&i), ["a", "a/b", "a/b/c", "a-x", "ab", "z"]);
    assert_eq!(names(i.first_paths(&p("a"), None, 10).unwrap()), ["a", "a/b", "a/b/c"]);
    assert_eq!(names(i.first_paths(&p("a"), Some(&p("a/b")), 10).unwrap()), ["a/b/c"]);
    assert_eq!(names(i.last_paths(&p("a"), 2).unwrap()), ["a/b/c", "a/b"]);
    assert!(i.has_children(&p("a")).unwrap());
    assert!(!i.has_children(&p("ab")).unwrap());
    assert_eq!(i.other_name(3, &p("z")).unwrap(), Some(p("a/b/c")));
    i.rename_subtree(&p("a"), &p("q/r")).unwrap();
    assert_eq!(all(&i), ["a-x", "ab", "q/r", "q/r/b", "q/r/b/c", "z"]);
    assert_eq!(i.other_name(3, &p("z")).unwrap(), Some(p("q/r/b/c")));
    i.remove(&p("z")).unwrap();
    assert_eq!(i.names_of(3).unwrap(), vec![p("q/r/b/c")]);
    // Replacing an entry moves its inode.
    i.insert(&p("q/r/b/c"), &file(9)).unwrap();
    assert!(i.names_of(3).unwrap().is_empty());
    assert_eq!(i.names_of(9).unwrap(), vec![p("q/r/b/c")]);
    assert_eq!(i.len().unwrap(), 5);
}

#[test]
fn walk_order_matches_the_store() {
    let mut v = vec![p("a-x"), p("a/b/c"), p("a"), p("a/b"), p("ab"), p("a!")];
    v.sort_by(walk_order);
    assert_eq!(names(v), ["a", "a/b", "a/b/c", "a!", "a-x", "ab"]);
}

#[test]
fn only_saved_changes_survive_a_reopen() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("index.redb");
    let (mut i, saved) = Index::open(&f, 0).unwrap();
    assert_eq!(saved, None);
    i.insert(&p("kept"), &file(1)).unwrap();
    i.save(42, 7).unwrap();
    i.insert(&p("lost"), &file(2)).unwrap();
    i.update(&p("kept"), |e| e.size = 5).unwrap();
    drop(i);
    let (mut i, saved) = Index::open(&f, 0).unwrap();
    assert_eq!(saved, Some(Saved { saved_at_us: 42, captured_seq: 7 }));
    assert_eq!(all(&i), ["kept"]);
    assert_eq!(i.get(&p("kept")).unwrap().unwrap().size, 0);
    i.insert(&p("x"), &file(3)).unwrap();
    i.rollback().unwrap();
    assert_eq!(all(&i), ["kept"]);
    i.clear().unwrap();
    assert!(i.is_empty().unwrap());
    assert!(i.names_of(1).unwrap().is_empty());
}

#[test]
fn a_damaged_store_is_an_index_error() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("index.redb");
    std::fs::write(&f, vec![0x5a; 64 * 1024]).unwrap();
    let err = Index::open(&f, 0).unwrap_err();
    assert!(matches!(err, MirrorError::Index { .. }), "{err}");
    // A valid store with pages damaged in the middle is refused at open too.
    std::fs::remove_file(&f).unwrap();
    let (mut i, _) = Index::open(&f, 0).unwrap();
    let mut e = file(1);
    e.blocks = vec![[7; 32]; 64];
    for n in 0..2000 {
        i.insert(&p(&format!("d{}/f{n}", n % 10)), &e).unwrap();
    }
    i.save(1, 1).unwrap();
    drop(i);
    let mut bytes = std::fs::read(&f).unwrap();
    let len = bytes.len();
    assert!(len > 1 << 20, "{len}");
    for b in &mut bytes[len / 2..len / 2 + 8192] {
        *b ^= 0xff;
    }
    std::fs::write(&f, &bytes).unwrap();
    let err = Index::open(&f, 0).unwrap_err();
    assert!(matches!(err, MirrorError::Index { .. }), "{err}");
}

#[test]
fn listing_pieces_extend_one_entry_and_snapshots_stay_put() {
    let mut i = Index::temporary().unwrap();
    let h = |b: u8| -> BlockHash { [b; 32] };
    let piece = |first: u64, blocks: Vec<BlockHash>| Entry {
        path: p("big").to_wire(),
        kind: EntryKind::File,
        size: 3 * doppel_proto::BLOCK_SIZE,
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime: Timestamp::default(),
        link_target: vec![],
        link_group: None,
        first_block: first,
        blocks,
        xattrs: vec![],
        vouched: false,
    };
    i.seed(&piece(0, vec![h(1), h(2)])).unwrap();
    i.seed(&piece(2, vec![h(3)])).unwrap();
    assert_eq!(i.get(&p("big")).unwrap().unwrap().blocks, vec![h(1), h(2), h(3)]);
    let snap = i.snapshot().unwrap();
    i.remove(&p("big")).unwrap();
    assert!(i.get(&p("big")).unwrap().is_none());
    assert_eq!(snap.get(&p("big")).unwrap().unwrap().blocks.len(), 3);
}

#[test]
fn throwaway_indexes_a_killed_process_left_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let live = Index::scratch_in(dir.path(), 1 << 20).unwrap();
    // A process killed while it held one: never dropped.
    std::mem::forget(Index::scratch_in(dir.path(), 1 << 20).unwrap());
    drop(live);
    std::fs::create_dir(dir.path().join("spool")).unwrap();
    std::fs::write(dir.path().join(".index-not-a-directory"), b"kept").unwrap();
    assert_eq!(Index::remove_stale_scratch(dir.path()), 1);
    let mut left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(left, [".index-not-a-directory", "spool"]);
}
