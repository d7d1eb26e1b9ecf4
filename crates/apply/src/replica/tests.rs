use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use doppel_proto::{Attrs, Op, OpRecord, RenameFlags, Timestamp, WirePath, Xattr};

use super::*;
use crate::ops::apply_op;

fn w(s: &str) -> WirePath {
    WirePath(s.as_bytes().to_vec())
}

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    state: PathBuf,
    outside: PathBuf,
    replica: Replica,
    seq: u64,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("replicas/src/job");
        let state = dir.path().join("state/src/job");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(outside.join("sub")).unwrap();
        std::fs::write(outside.join("secret"), b"do not touch").unwrap();
        std::fs::write(outside.join("sub/file"), b"nor this").unwrap();
        let replica = Replica::open(&root, &state).unwrap();
        Fixture { _dir: dir, root, state, outside, replica, seq: 0 }
    }

    fn apply(&mut self, op: Op) -> Outcome {
        self.seq += 1;
        self.replica.apply(&OpRecord { seq: self.seq, time_us: 0, op }).unwrap()
    }

    fn refused(&mut self, op: Op) -> String {
        let desc = format!("{op:?}");
        match self.apply(op) {
            Outcome::Refused(r) | Outcome::RefusedByPolicy { reason: r, .. } => r,
            o => panic!("{desc} was not refused: {o:?}"),
        }
    }
}

/// Everything under `dir`: path -> (mode, content or link target).
fn snapshot(dir: &Path) -> BTreeMap<String, (u32, Vec<u8>)> {
    let mut out = BTreeMap::new();
    fn rec(base: &Path, dir: &Path, out: &mut BTreeMap<String, (u32, Vec<u8>)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(base).unwrap().to_string_lossy().into_owned();
            let content = if m.is_file() {
                std::fs::read(&p).unwrap()
            } else if m.file_type().is_symlink() {
                std::fs::read_link(&p).unwrap().into_os_string().into_encoded_bytes()
            } else {
                Vec::new()
            };
            out.insert(rel, (m.mode(), content));
            if m.is_dir() {
                rec(base, &p, out);
            }
        }
    }
    rec(dir, dir, &mut out);
    out
}

#[test]
fn applies_every_op_kind() {
    let mut f = Fixture::new();
    let r = f.root.clone();
    f.apply(Op::Mkdir { path: w("d"), mode: 0o750 });
    f.apply(Op::Create { path: w("d/a"), mode: 0o640 });
    f.apply(Op::Write { path: w("d/a"), offset: 0, data: b"hello world".to_vec() });
    f.apply(Op::Write { path: w("d/a"), offset: 6, data: b"WORLD".to_vec() });
    f.apply(Op::Truncate { path: w("d/a"), size: 8 });
    f.apply(Op::Link { path: w("d/hard"), existing: w("d/a") });
    f.apply(Op::Symlink { path: w("d/sym"), target: b"a".to_vec() });
    f.apply(Op::Symlink { path: w("d/sym"), target: b"hard".to_vec() });
    f.apply(Op::Mknod { path: w("fifo"), mode: libc::S_IFIFO | 0o600, rdev: 0 });
    let mtime = Timestamp { secs: 1_000_000_000, nanos: 123_456_789 };
    let xattrs = vec![Xattr { name: b"user.k".to_vec(), value: b"v".to_vec() }];
    f.apply(Op::SetAttr {
        path: w("d/a"),
        attrs: Attrs {
            mode: Some(0o604),
            mtime: Some(mtime),
            xattrs: Some(xattrs.clone()),
            ..Attrs::default()
        },
    });
    f.apply(Op::Rename { from: w("d"), to: w("e"), flags: RenameFlags::default() });
    assert_eq!(std::fs::read(r.join("e/a")).unwrap(), b"hello WO");
    assert_eq!(std::fs::read(r.join("e/hard")).unwrap(), b"hello WO");
    assert_eq!(std::fs::read_link(r.join("e/sym")).unwrap(), Path::new("hard"));
    let m = std::fs::metadata(r.join("e/a")).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o604);
    assert_eq!((m.mtime(), m.mtime_nsec()), (1_000_000_000, 123_456_789));
    assert_eq!(m.nlink(), 2);
    assert_eq!(doppel_fs::xattr::read_all(&r.join("e/a")).unwrap(), xattrs);
    assert_eq!(std::fs::metadata(r.join("e")).unwrap().permissions().mode() & 0o7777, 0o750);
    f.apply(Op::Unlink { path: w("e/hard") });
    f.apply(Op::Unlink { path: w("e/sym") });
    f.apply(Op::Unlink { path: w("e/a") });
    f.apply(Op::Rmdir { path: w("e") });
    f.apply(Op::Unlink { path: w("fifo") });
    assert!(snapshot(&r).is_empty());
    assert_eq!(f.replica.commit().unwrap(), f.seq);
}

#[test]
fn hostile_ops_are_refused_and_nothing_outside_changes() {
    let mut f = Fixture::new();
    let outside = f.outside.clone();
    let before = snapshot(&outside);
    let up = "../../../outside";
    // A symlink inside the replica pointing out of it is stored as a link, never followed.
    assert_eq!(
        f.apply(Op::Symlink { path: w("evil"), target: outside.as_os_str().as_encoded_bytes().to_vec() }),
        Outcome::Applied
    );
    assert_eq!(f.apply(Op::Symlink { path: w("rel"), target: up.as_bytes().to_vec() }), Outcome::Applied);
    let mut bad_paths: Vec<WirePath> =
        ["../x", "/etc/passwd", "a/../../x", "..", "a//b", "./a", "a/."].iter().map(|s| w(s)).collect();
    bad_paths.push(WirePath(b"a\0b".to_vec()));
    bad_paths.push(WirePath(outside.join("secret").as_os_str().as_encoded_bytes().to_vec()));
    for via in ["evil", "rel"] {
        bad_paths.push(w(&format!("{via}/secret")));
        bad_paths.push(w(&format!("{via}/sub/file")));
        bad_paths.push(w(&format!("{via}/newfile")));
    }
    for p in bad_paths {
        let reasons = [
            f.refused(Op::Create { path: p.clone(), mode: 0o644 }),
            f.refused(Op::Mkdir { path: p.clone(), mode: 0o755 }),
            f.refused(Op::Write { path: p.clone(), offset: 0, data: b"pwned".to_vec() }),
            f.refused(Op::Truncate { path: p.clone(), size: 0 }),
            f.refused(Op::SetAttr {
                path: p.clone(),
                attrs: Attrs { mode: Some(0o777), ..Attrs::default() },
            }),
            f.refused(Op::Unlink { path: p.clone() }),
            f.refused(Op::Rmdir { path: p.clone() }),
            f.refused(Op::Symlink { path: p.clone(), target: b"x".to_vec() }),
            f.refused(Op::Link { path: w("stolen"), existing: p.clone() }),
            f.refused(Op::Link { path: p.clone(), existing: w("evil") }),
            f.refused(Op::Rename { from: p.clone(), to: w("moved"), flags: RenameFlags::default() }),
            f.refused(Op::Rename { from: w("evil"), to: p.clone(), flags: RenameFlags::default() }),
        ];
        for r in reasons {
            assert!(!r.is_empty());
        }
    }
    // Acting on the symlink itself as if it were a file or directory is refused too.
    let r = f.refused(Op::Write { path: w("evil"), offset: 0, data: b"x".to_vec() });
    assert!(r.contains("symlink"), "{r}");
    f.refused(Op::Truncate { path: w("rel"), size: 0 });
    // Chmod of the link itself must not reach its target.
    f.apply(Op::SetAttr { path: w("evil"), attrs: Attrs { mode: Some(0o777), ..Attrs::default() } });
    // Device nodes and unknown fallocate modes are refused.
    let r = f.refused(Op::Mknod { path: w("sda"), mode: libc::S_IFBLK | 0o666, rdev: 0x800 });
    assert!(r.contains("device node refused by this target's privilege policy"), "{r}");
    f.apply(Op::Create { path: w("f"), mode: 0o644 });
    f.refused(Op::Fallocate { path: w("f"), mode: 0x40, offset: 0, len: 10 });
    f.refused(Op::Rename { from: w("f"), to: w("f/g"), flags: RenameFlags::default() });
    f.apply(Op::Mkdir { path: w("d"), mode: 0o755 });
    f.refused(Op::Rename { from: w("d"), to: w("d/inner"), flags: RenameFlags::default() });
    f.refused(Op::Rmdir { path: w("") });
    f.refused(Op::Create { path: w(""), mode: 0o644 });
    // The refusals consumed their sequence numbers: the stream goes on.
    assert_eq!(f.replica.applied(), f.seq);
    assert_eq!(snapshot(&outside), before, "the file system outside the replica changed");
    let names: Vec<String> = snapshot(&f.root).into_keys().collect();
    assert_eq!(names, ["d", "evil", "f", "rel"]);
}

#[test]
fn duplicates_are_skipped_and_gaps_rejected() {
    let mut f = Fixture::new();
    f.apply(Op::Create { path: w("a"), mode: 0o644 });
    let again =
        OpRecord { seq: 1, time_us: 0, op: Op::Write { path: w("a"), offset: 0, data: b"x".to_vec() } };
    assert_eq!(f.replica.apply(&again).unwrap(), Outcome::Duplicate);
    assert_eq!(std::fs::read(f.root.join("a")).unwrap(), b"");
    let gap = OpRecord { seq: 5, time_us: 0, op: Op::Fsync { path: None } };
    assert!(matches!(f.replica.apply(&gap), Err(ApplyError::Gap { expected: 2, got: 5 })));
}

#[test]
fn a_killed_target_resumes_at_the_exact_op_and_replay_is_harmless() {
    let mut f = Fixture::new();
    f.apply(Op::Create { path: w("a"), mode: 0o644 });
    f.apply(Op::Write { path: w("a"), offset: 0, data: b"first".to_vec() });
    f.replica.commit().unwrap();
    f.apply(Op::Rename { from: w("a"), to: w("b"), flags: RenameFlags::default() });
    f.apply(Op::Create { path: w("a"), mode: 0o644 });
    let id = f.replica.info().replica_id;
    // "Kill" the process: no commit, reopen from the files.
    let mut r = Replica::open(&f.root, &f.state).unwrap();
    let info = r.info();
    assert_eq!((info.applied, info.replica_id, info.needs_resync), (4, id, false));
    // The op in flight when the process died may be replayed: nothing changes.
    for seq in [3, 4] {
        let rec = OpRecord {
            seq,
            time_us: 0,
            op: if seq == 3 {
                Op::Rename { from: w("a"), to: w("b"), flags: RenameFlags::default() }
            } else {
                Op::Create { path: w("a"), mode: 0o644 }
            },
        };
        assert_eq!(r.apply(&rec).unwrap(), Outcome::Duplicate);
    }
    assert_eq!(std::fs::read(f.root.join("b")).unwrap(), b"first");
    // Replaying an op right after it took effect changes nothing either.
    let (mut open, mut notes) = (OpenFile::default(), None);
    let ren = Op::Rename { from: w("b"), to: w("c"), flags: RenameFlags::default() };
    apply_op(r.root(), &mut open, &mut notes, 5, &ren).unwrap();
    apply_op(r.root(), &mut open, &mut notes, 5, &ren).unwrap();
    assert_eq!(std::fs::read(f.root.join("c")).unwrap(), b"first");
}

#[test]
fn unclean_reboot_with_unsynced_ops_demands_a_resync() {
    let mut f = Fixture::new();
    f.apply(Op::Create { path: w("a"), mode: 0o644 });
    f.replica.commit().unwrap();
    f.apply(Op::Write { path: w("a"), offset: 0, data: b"maybe on disk".to_vec() });
    let id = f.replica.info().replica_id;
    // A reboot: the progress marker was written under another boot id.
    std::fs::write(f.state.join("progress"), [b'x'; 44]).unwrap();
    let r = Replica::open(&f.root, &f.state).unwrap();
    let info = r.info();
    assert!(info.needs_resync);
    assert_ne!(info.replica_id, id);
    assert_eq!(info.applied, 1);
    // After a clean commit, a reboot is harmless.
    let mut f = Fixture::new();
    f.apply(Op::Create { path: w("a"), mode: 0o644 });
    f.replica.commit().unwrap();
    let id = f.replica.info().replica_id;
    std::fs::write(f.state.join("progress"), [b'x'; 44]).unwrap();
    let info = Replica::open(&f.root, &f.state).unwrap().info();
    assert_eq!((info.needs_resync, info.replica_id, info.applied), (false, id, 1));
}

/// A commit that more ops follow at once leaves the checkpoint marked dirty (saving the
/// second checkpoint write the next op would make): durable up to the commit, and a reboot
/// right after it demands a resync, as one after the next op would.
#[test]
fn a_continuing_commit_is_durable_and_stays_marked_dirty() {
    let mut f = Fixture::new();
    f.apply(Op::Create { path: w("a"), mode: 0o644 });
    assert_eq!(f.replica.commit_continuing().unwrap(), 1);
    let c = crate::state::read_checkpoint(&f.state).unwrap().unwrap();
    assert_eq!((c.applied, c.dirty), (1, true));
    assert_eq!(f.replica.durable(), 1);
    // The next op needs no checkpoint write of its own; a plain commit cleans the mark.
    f.apply(Op::Write { path: w("a"), offset: 0, data: b"x".to_vec() });
    assert_eq!(f.replica.commit().unwrap(), 2);
    let c = crate::state::read_checkpoint(&f.state).unwrap().unwrap();
    assert_eq!((c.applied, c.dirty), (2, false));
    // Continuing again, then a reboot before anything else was applied.
    f.apply(Op::Write { path: w("a"), offset: 1, data: b"y".to_vec() });
    f.replica.commit_continuing().unwrap();
    let id = f.replica.info().replica_id;
    std::fs::write(f.state.join("progress"), [b'x'; 44]).unwrap();
    let info = Replica::open(&f.root, &f.state).unwrap().info();
    assert!(info.needs_resync);
    assert_ne!(info.replica_id, id);
    assert_eq!(info.applied, 3);
}

/// A commit whose writes run on another thread while more ops are applied: it makes exactly
/// the ops before it durable (its checkpoint marked dirty, as more follow), renames made
/// meanwhile do not lose what it syncs, and the next plain commit covers the rest.
#[test]
fn a_commit_beside_the_applying_covers_the_ops_before_it() {
    let mut f = Fixture::new();
    assert!(f.replica.begin_commit().unwrap().is_none(), "nothing applied: nothing to commit");
    for name in ["a", "b"] {
        f.apply(Op::Create { path: w(name), mode: 0o644 });
        f.apply(Op::Write { path: w(name), offset: 0, data: name.as_bytes().to_vec() });
    }
    let flush = f.replica.begin_commit().unwrap().expect("ops to commit");
    let writes = std::thread::spawn(move || flush.run());
    // Meanwhile: a rename of a file the commit syncs, and a new file.
    f.apply(Op::Rename { from: w("a"), to: w("c"), flags: RenameFlags::default() });
    f.apply(Op::Create { path: w("d"), mode: 0o644 });
    let done = writes.join().unwrap().unwrap();
    assert_eq!(f.replica.durable(), 0, "durable only once the commit ends");
    assert_eq!(f.replica.end_commit(done).unwrap(), 4);
    assert_eq!(f.replica.durable(), 4);
    let c = crate::state::read_checkpoint(&f.state).unwrap().unwrap();
    assert_eq!((c.applied, c.dirty), (4, true), "ops were applied after it");
    assert_eq!(f.replica.commit().unwrap(), 6);
    let c = crate::state::read_checkpoint(&f.state).unwrap().unwrap();
    assert_eq!((c.applied, c.dirty), (6, false));
    assert_eq!(std::fs::read(f.root.join("c")).unwrap(), b"a");
}

/// A commit whose writes failed leaves no list of what it was to sync: the next commit syncs
/// the whole file system rather than only the names changed since.
#[test]
fn after_a_failed_commit_the_next_one_syncs_everything() {
    let mut f = Fixture::new();
    // A replica just opened syncs everything once; then only what changed.
    f.apply(Op::Create { path: w("first"), mode: 0o644 });
    f.replica.commit().unwrap();
    f.apply(Op::Create { path: w("a"), mode: 0o644 });
    let flush = f.replica.begin_commit().unwrap().expect("an op to commit");
    assert!(matches!(flush.data, crate::dirty::Opened::Each(_)), "{:?}", flush.data);
    // Its writes never happened.
    drop(flush);
    f.replica.commit_failed();
    f.apply(Op::Create { path: w("b"), mode: 0o644 });
    let flush = f.replica.begin_commit().unwrap().expect("ops to commit");
    assert!(matches!(flush.data, crate::dirty::Opened::Whole(_)), "{:?}", flush.data);
}

#[test]
fn listing_describes_the_tree_with_block_hashes() {
    let mut f = Fixture::new();
    f.apply(Op::Mkdir { path: w("d"), mode: 0o755 });
    f.apply(Op::Create { path: w("d/big"), mode: 0o644 });
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    f.apply(Op::Write { path: w("d/big"), offset: 0, data: data.clone() });
    f.apply(Op::Link { path: w("d/big2"), existing: w("d/big") });
    f.apply(Op::Symlink { path: w("l"), target: b"d/big".to_vec() });
    let mut entries = Vec::new();
    crate::listing::list(f.replica.root(), &doppel_proto::ListScope::All, &mut |e| {
        entries.push(e);
        Ok(())
    })
    .unwrap();
    let names: Vec<String> = entries.iter().map(|e| e.path.display()).collect();
    assert_eq!(names, ["", "d", "d/big", "d/big2", "l"]);
    let big = &entries[2];
    assert_eq!(big.size, 200_000);
    assert_eq!(big.blocks.len(), 4);
    assert_eq!(big.blocks[3], doppel_proto::hash_block(&data[3 * 65536..]));
    assert!(big.link_group.is_some() && big.link_group == entries[3].link_group);
    assert_eq!(entries[4].link_target, b"d/big");
    let mut some = Vec::new();
    let scope = doppel_proto::ListScope::Paths(vec![w("l"), w("missing"), w("../x"), w("l/through")]);
    crate::listing::list(f.replica.root(), &scope, &mut |e| {
        some.push(e.path.display());
        Ok(())
    })
    .unwrap();
    assert_eq!(some, ["l"]);
    // A directory's children: names and attributes, no hashes; not through a symlink, not
    // out of the replica, nothing for a file or a missing directory.
    let mut children = Vec::new();
    let scope = doppel_proto::ListScope::Children(vec![w("d"), w("l"), w("../x"), w("d/big"), w("missing")]);
    crate::listing::list(f.replica.root(), &scope, &mut |e| {
        children.push(e);
        Ok(())
    })
    .unwrap();
    let names: Vec<String> = children.iter().map(|e| e.path.display()).collect();
    assert_eq!(names, ["d/big", "d/big2"]);
    assert!(
        children
            .iter()
            .all(|e| e.blocks.is_empty() && e.size == 200_000 && e.kind == doppel_proto::EntryKind::File)
    );
    // The root's children.
    let mut top = Vec::new();
    crate::listing::list(f.replica.root(), &doppel_proto::ListScope::Children(vec![w("")]), &mut |e| {
        top.push(e.path.display());
        Ok(())
    })
    .unwrap();
    assert_eq!(top, ["d", "l"]);
}

#[test]
fn listings_split_huge_files_into_pieces() {
    let mut f = Fixture::new();
    f.apply(Op::Create { path: w("huge"), mode: 0o644 });
    // Six blocks, in pieces of four (the real piece size is 65,536 blocks).
    f.apply(Op::Truncate { path: w("huge"), size: 6 * doppel_proto::BLOCK_SIZE });
    let mut entries = Vec::new();
    let scope = doppel_proto::ListScope::Paths(vec![w("huge")]);
    crate::listing::list_in_pieces(f.replica.root(), &scope, 4, &mut |e| {
        entries.push(e);
        Ok(())
    })
    .unwrap();
    assert_eq!(entries.len(), 2);
    assert_eq!((entries[0].first_block, entries[0].blocks.len()), (0, 4));
    assert_eq!((entries[1].first_block, entries[1].blocks.len()), (4, 2));
}

/// What a lister knows of files' blocks: a file it knows (the right number of blocks) is
/// listed from that knowledge, vouched for and in pieces, without being read; a file whose
/// known blocks do not fit its size is read; nothing else is vouched for.
#[test]
fn listings_take_known_blocks_instead_of_reading() {
    #[derive(Debug)]
    struct Knows;
    impl crate::listing::KnownBlocks for Knows {
        fn blocks(
            &self,
            path: &doppel_proto::RelPath,
            _: &doppel_fs::Meta,
        ) -> Option<Vec<doppel_proto::BlockHash>> {
            match path.to_wire().display().as_str() {
                "known" => Some((0..6).map(|i| [i; 32]).collect()),
                "stale" => Some(vec![[9; 32]]),
                _ => None,
            }
        }
    }
    let mut f = Fixture::new();
    for name in ["known", "stale", "other"] {
        f.apply(Op::Create { path: w(name), mode: 0o644 });
        f.apply(Op::Truncate { path: w(name), size: 6 * doppel_proto::BLOCK_SIZE });
    }
    let mut entries = Vec::new();
    crate::listing::list_knowing(
        f.replica.root(),
        &doppel_proto::ListScope::All,
        4,
        Some(&Knows),
        &doppel_fs::Selection::all(),
        &mut |e| {
            entries.push(e);
            Ok(())
        },
    )
    .unwrap();
    let zero = doppel_proto::hash_block(&[0; doppel_proto::BLOCK_SIZE as usize]);
    let pieces = |name: &str| -> Vec<_> {
        entries.iter().filter(|e| e.path.display() == name).map(|e| (e.first_block, e.vouched)).collect()
    };
    assert_eq!(pieces("known"), [(0, true), (4, true)]);
    let known: Vec<_> =
        entries.iter().filter(|e| e.path.display() == "known").flat_map(|e| e.blocks.clone()).collect();
    assert_eq!(known, (0..6).map(|i| [i; 32]).collect::<Vec<_>>(), "the known blocks, not the file's");
    for name in ["stale", "other"] {
        assert_eq!(pieces(name), [(0, false), (4, false)], "{name}");
        assert!(
            entries.iter().filter(|e| e.path.display() == name).all(|e| e.blocks.iter().all(|b| *b == zero))
        );
    }
    assert!(entries.iter().filter(|e| e.kind != doppel_proto::EntryKind::File).all(|e| !e.vouched));
}

/// Lists `scope` of the fixture's replica as a selecting target lists it.
fn listed(f: &Fixture, scope: doppel_proto::ListScope) -> Vec<String> {
    let mut names = Vec::new();
    let (root, selection) = (f.replica.root(), f.replica.selection());
    crate::listing::list_knowing(root, &scope, 4, None, selection, &mut |e| {
        names.push(e.path.display());
        Ok(())
    })
    .unwrap();
    names
}

/// A replica that is a source's own tree keeps the names its rules leave out: its listings
/// never show them (so the side comparing with it never removes them), and the stream's ops
/// that would remove, replace or write them are skipped; a file the stream moves onto one
/// leaves its old name. Names the stream makes outside the rules are its own, and a rename
/// carries them into the selection.
#[test]
fn a_selecting_replica_keeps_the_names_its_rules_leave_out() {
    let mut f = Fixture::new();
    doppel_testkit::Tree::at(&f.root)
        .file("keep.txt", b"selected")
        .file("scratch.tmp", b"the tree's own")
        .file("d/x.tmp", b"its own too")
        .file("cache/blob", b"and this");
    f.replica.set_selection(doppel_fs::Selection::new(&[], &["*.tmp".into(), "cache/".into()]).unwrap());
    assert_eq!(listed(&f, doppel_proto::ListScope::All), ["", "d", "keep.txt"]);
    let some = vec![w("scratch.tmp"), w("cache"), w("cache/blob"), w("keep.txt")];
    assert_eq!(listed(&f, doppel_proto::ListScope::Paths(some)), ["keep.txt"]);
    assert_eq!(listed(&f, doppel_proto::ListScope::Children(vec![w(""), w("d")])), ["d", "keep.txt"]);
    assert!(listed(&f, doppel_proto::ListScope::Ranges(vec![(w("scratch.tmp"), 0, 10)])).is_empty());
    for op in [
        Op::Unlink { path: w("scratch.tmp") },
        Op::Write { path: w("d/x.tmp"), offset: 0, data: b"REPLACED".to_vec() },
        Op::Unlink { path: w("cache/blob") },
        Op::Rmdir { path: w("cache") },
        Op::Create { path: w("cache/new"), mode: 0o644 },
    ] {
        assert_eq!(f.apply(op.clone()), Outcome::Skipped, "{op:?}");
    }
    let mv = |from: &str, to: &str| Op::Rename { from: w(from), to: w(to), flags: RenameFlags::default() };
    assert_eq!(f.apply(mv("keep.txt", "scratch.tmp")), Outcome::Applied);
    assert!(!f.root.join("keep.txt").exists(), "the moved name leaves its old one");
    // Made by the stream, then renamed into the selection.
    f.apply(Op::Create { path: w("report.tmp"), mode: 0o644 });
    assert_eq!(
        f.apply(Op::Write { path: w("report.tmp"), offset: 0, data: b"report".to_vec() }),
        Outcome::Applied
    );
    assert_eq!(f.apply(mv("report.tmp", "report")), Outcome::Applied);
    f.replica.commit().unwrap();
    assert_eq!(std::fs::read(f.root.join("report")).unwrap(), b"report");
    for (name, bytes) in
        [("scratch.tmp", &b"the tree's own"[..]), ("d/x.tmp", b"its own too"), ("cache/blob", b"and this")]
    {
        assert_eq!(std::fs::read(f.root.join(name)).unwrap(), bytes, "{name}");
    }
    assert!(!f.root.join("cache/new").exists());
}

/// The privilege policy on disk, for each rule: a set-uid file, a foreign owner, a `trusted.*`
/// attribute and a device node arrive as sent (allow), without the privileged part (strip),
/// or not at all (refuse), and the outcome says which.
#[test]
fn privilege_policy_on_disk() {
    use crate::privilege::{Privilege as P, Rule};
    if !doppel_testkit::skip::require(rustix::process::geteuid().is_root(), "owners and devices need root") {
        return;
    }
    for rule in [Rule::Allow, Rule::Strip, Rule::Refuse] {
        let mut f = Fixture::new();
        f.replica.set_privileges(PrivilegePolicy::all(rule));
        let setuid = f.apply(Op::Create { path: w("su"), mode: 0o4755 });
        let owner = f.apply(Op::Create { path: w("own"), mode: 0o644 });
        assert_eq!(owner, Outcome::Applied, "{rule}");
        let owner = f.apply(Op::SetAttr {
            path: w("own"),
            attrs: Attrs {
                uid: Some(1234),
                gid: Some(5678),
                xattrs: Some(vec![
                    Xattr { name: b"trusted.t".to_vec(), value: b"1".to_vec() },
                    Xattr { name: b"user.u".to_vec(), value: b"2".to_vec() },
                ]),
                ..Attrs::default()
            },
        });
        let dev = f.apply(Op::Mknod { path: w("null"), mode: libc::S_IFCHR | 0o666, rdev: 0x103 });
        let meta = |n: &str| std::fs::symlink_metadata(f.root.join(n));
        let xattrs = || doppel_fs::xattr::read_all(&f.root.join("own")).unwrap();
        match rule {
            Rule::Allow => {
                assert_eq!(
                    (setuid, owner.clone(), dev),
                    (Outcome::Applied, Outcome::Applied, Outcome::Applied)
                );
                assert_eq!(meta("su").unwrap().mode() & 0o7777, 0o4755);
                assert_eq!((meta("own").unwrap().uid(), meta("own").unwrap().gid()), (1234, 5678));
                assert_eq!(xattrs().len(), 2);
                assert_eq!(meta("null").unwrap().mode() & libc::S_IFMT, libc::S_IFCHR);
            }
            Rule::Strip => {
                assert_eq!(setuid, Outcome::Stripped(vec![P::SetId]));
                assert_eq!(owner, Outcome::Stripped(vec![P::Owners, P::Capabilities]));
                assert_eq!(dev, Outcome::Stripped(vec![P::Devices]));
                assert_eq!(meta("su").unwrap().mode() & 0o7777, 0o755);
                assert_eq!((meta("own").unwrap().uid(), meta("own").unwrap().gid()), (0, 0));
                assert_eq!(xattrs(), vec![Xattr { name: b"user.u".to_vec(), value: b"2".to_vec() }]);
                assert!(meta("null").unwrap().is_file(), "a stripped device is an empty file");
            }
            Rule::Refuse => {
                for (o, p) in [(&setuid, P::SetId), (&owner, P::Owners), (&dev, P::Devices)] {
                    assert!(
                        matches!(o, Outcome::RefusedByPolicy { privilege, .. } if *privilege == p),
                        "{o:?}"
                    );
                }
                assert!(meta("su").is_err() && meta("null").is_err());
                assert_eq!((meta("own").unwrap().uid(), xattrs()), (0, vec![]));
            }
        }
        // Whatever was refused or stripped, the stream goes on.
        assert_eq!(f.apply(Op::Mkdir { path: w("after"), mode: 0o755 }), Outcome::Applied, "{rule}");
    }
}

/// Without a policy set, a replica does what every target did before policies: device nodes
/// are refused, everything else applies.
#[test]
fn default_privileges_refuse_only_devices() {
    let mut f = Fixture::new();
    let o = f.apply(Op::Mknod { path: w("sda"), mode: libc::S_IFBLK | 0o660, rdev: 0x800 });
    assert!(
        matches!(o, Outcome::RefusedByPolicy { privilege: crate::privilege::Privilege::Devices, .. }),
        "{o:?}"
    );
    assert_eq!(f.apply(Op::Create { path: w("su"), mode: 0o4755 }), Outcome::Applied);
    assert_eq!(std::fs::metadata(f.root.join("su")).unwrap().mode() & 0o7777, 0o4755);
}

/// The mirror sends `Create`, `Write`, `SetAttr` for every new file; the create holds the file
/// it made open for the two that follow. They must land on that file and on no other: a write
/// to another name opens that name, and an op that changes names lets go of the held file.
#[test]
fn the_file_a_create_opened_serves_its_own_path_only() {
    let mut f = Fixture::new();
    let r = f.root.clone();
    let mtime = Timestamp { secs: 1_000_000_000, nanos: 5 };
    let attrs = |mode| Attrs { mode: Some(mode), mtime: Some(mtime), ..Attrs::default() };
    f.apply(Op::Create { path: w("a"), mode: 0o600 });
    f.apply(Op::Create { path: w("b"), mode: 0o600 });
    // "b" is held: the write to "a" opens "a".
    f.apply(Op::Write { path: w("a"), offset: 0, data: b"for a".to_vec() });
    f.apply(Op::Write { path: w("b"), offset: 0, data: b"for b".to_vec() });
    f.apply(Op::SetAttr { path: w("b"), attrs: attrs(0o640) });
    f.apply(Op::Create { path: w("c"), mode: 0o600 });
    f.apply(Op::Rename { from: w("c"), to: w("d"), flags: RenameFlags::default() });
    let reason = f.refused(Op::Write { path: w("c"), offset: 0, data: b"for c".to_vec() });
    assert!(reason.contains('c'), "{reason}");
    f.apply(Op::Write { path: w("d"), offset: 0, data: b"for d".to_vec() });
    f.apply(Op::SetAttr { path: w("a"), attrs: attrs(0o444) });
    let want = [("a", &b"for a"[..], 0o444), ("b", b"for b", 0o640), ("d", b"for d", 0o600)];
    for (name, content, mode) in want {
        assert_eq!(std::fs::read(r.join(name)).unwrap(), content, "{name}");
        let m = std::fs::metadata(r.join(name)).unwrap();
        assert_eq!(m.mode() & 0o7777, mode, "{name}");
    }
    for name in ["a", "b"] {
        let m = std::fs::metadata(r.join(name)).unwrap();
        assert_eq!((m.mtime(), m.mtime_nsec()), (1_000_000_000, 5), "{name}");
    }
    assert!(!r.join("c").exists());
    assert_eq!(f.replica.commit().unwrap(), f.seq);
}

mod lanes;
