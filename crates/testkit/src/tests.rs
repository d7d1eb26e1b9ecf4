//! The comparison must catch every kind of difference, or the tests built on it prove nothing.

use std::os::unix::fs::{PermissionsExt, lchown};

use rustix::fs::{AtFlags, CWD, Timespec, Timestamps};

use super::*;

/// A small tree with one of everything the comparison looks at.
fn base(root: &Path) {
    Tree::at(root)
        .file("f", b"content")
        .file("g", b"other")
        .dir("d/sub")
        .file("d/sub/h", b"deep")
        .dir("e")
        .symlink("l", "f")
        .chmod("f", 0o640);
    set_xattr(&root.join("f"), "user.a", b"1");
    set_xattr(&root.join("f"), "user.b", b"2");
    set_xattr(&root.join("d"), "user.dir", b"x");
    pin_times(root);
}

fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    rustix::fs::lsetxattr(p, name, value, rustix::fs::XattrFlags::empty()).expect("setxattr");
}

/// Gives every name the same modification time, so a change of names (which touches the
/// parent directory's time) shows up only as the difference it is meant to be.
fn pin_times(root: &Path) {
    let names: Vec<String> = snapshot(root, Compare::default()).into_keys().collect();
    for n in names {
        set_mtime(&root.join(&n), 1_600_000_000);
    }
}

fn set_mtime(p: &Path, secs: i64) {
    let t = Timespec { tv_sec: secs, tv_nsec: 0 };
    let ts = Timestamps { last_access: t, last_modification: t };
    rustix::fs::utimensat(CWD, p, &ts, AtFlags::SYMLINK_NOFOLLOW).expect("utimensat");
}

/// The one name whose description differs between the trees, and the fields that differ.
fn differences(a: &Path, b: &Path) -> Vec<(String, Vec<&'static str>)> {
    let (sa, sb) = (snapshot(a, Compare::default()), snapshot(b, Compare::default()));
    let mut keys: Vec<&String> = sa.keys().chain(sb.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter_map(|k| match (sa.get(k), sb.get(k)) {
            (Some(x), Some(y)) if x == y => None,
            (Some(x), Some(y)) => Some((k.clone(), fields(x, y))),
            _ => Some((k.clone(), vec!["presence"])),
        })
        .collect()
}

fn fields(x: &Node, y: &Node) -> Vec<&'static str> {
    let checks: [(&'static str, bool); 8] = [
        ("kind", x.kind != y.kind),
        ("mode", x.mode != y.mode),
        ("owner", x.owner != y.owner),
        ("mtime", x.mtime_ns != y.mtime_ns),
        ("content", x.content != y.content),
        ("size", x.size != y.size),
        ("links", x.links != y.links),
        ("xattrs", x.xattrs != y.xattrs),
    ];
    checks.into_iter().filter(|(_, differs)| *differs).map(|(f, _)| f).collect()
}

/// Builds the base tree twice, changes the second copy with `change`, and checks that
/// [`compare_trees`] fails naming `name` and that exactly `want` differ there.
fn caught(what: &str, name: &str, want: &[&str], change: impl FnOnce(&Path)) {
    let d = tempfile::tempdir().expect("tempdir");
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    base(&a);
    base(&b);
    assert_eq!(compare_trees(&a, &b, Compare::default()), Ok(()), "{what}: the copies start equal");
    change(&b);
    let err = compare_trees(&a, &b, Compare::default()).expect_err(what);
    assert!(err.starts_with("1 differences") && err.contains(&format!("  {name}: ")), "{what}: {err}");
    assert_eq!(differences(&a, &b), [(name.to_string(), want.to_vec())], "{what}: {err}");
}

#[test]
fn equal_trees_compare_equal() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    base(&a);
    base(&b);
    Tree::at(&a).hardlink("d/hard", "g");
    Tree::at(&b).hardlink("d/hard", "g");
    pin_times(&a);
    pin_times(&b);
    assert_eq!(compare_trees(&a, &b, Compare::default()), Ok(()));
    let snap = snapshot(&a, Compare::default());
    assert_eq!(
        snap["f"].xattrs,
        [("user.a".to_string(), b"1".to_vec()), ("user.b".to_string(), b"2".to_vec())]
    );
    assert_eq!(snap["g"].links, ["d/hard"]);
}

#[test]
fn content_of_the_same_size() {
    caught("content", "f", &["content"], |b| {
        fs::write(b.join("f"), b"CONTENT").unwrap();
        set_mtime(&b.join("f"), 1_600_000_000);
    });
}

#[test]
fn size() {
    caught("size", "g", &["content", "size"], |b| {
        fs::write(b.join("g"), b"oth").unwrap();
        set_mtime(&b.join("g"), 1_600_000_000);
    });
}

#[test]
fn missing_and_extra_names() {
    caught("missing", "g", &["presence"], |b| {
        fs::remove_file(b.join("g")).unwrap();
        pin_times(b);
    });
    caught("extra", "d/new", &["presence"], |b| {
        fs::write(b.join("d/new"), b"").unwrap();
        pin_times(b);
    });
}

#[test]
fn types() {
    caught("file vs dir", "g", &["kind", "mode", "content", "size"], |b| {
        fs::remove_file(b.join("g")).unwrap();
        fs::create_dir(b.join("g")).unwrap();
        pin_times(b);
    });
    caught("file vs symlink", "g", &["kind", "mode", "content", "size"], |b| {
        fs::remove_file(b.join("g")).unwrap();
        std::os::unix::fs::symlink("f", b.join("g")).unwrap();
        pin_times(b);
    });
    caught("dir vs symlink", "e", &["kind", "mode", "content"], |b| {
        fs::remove_dir(b.join("e")).unwrap();
        std::os::unix::fs::symlink("d", b.join("e")).unwrap();
        pin_times(b);
    })
}

#[test]
fn symlink_target() {
    caught("symlink target", "l", &["content"], |b| {
        fs::remove_file(b.join("l")).unwrap();
        std::os::unix::fs::symlink("g", b.join("l")).unwrap();
        pin_times(b);
    });
}

#[test]
fn mode() {
    caught("mode", "f", &["mode"], |b| {
        fs::set_permissions(b.join("f"), fs::Permissions::from_mode(0o644)).unwrap();
    });
    caught("directory mode", "d", &["mode"], |b| {
        fs::set_permissions(b.join("d"), fs::Permissions::from_mode(0o700)).unwrap();
    });
}

#[test]
fn owner_and_group() {
    if !require(rustix::process::geteuid().is_root(), "changing owners needs root") {
        return;
    }
    caught("uid", "f", &["owner"], |b| lchown(b.join("f"), Some(4321), None).unwrap());
    caught("gid", "l", &["owner"], |b| lchown(b.join("l"), None, Some(4321)).unwrap());
}

#[test]
fn mtime() {
    caught("file mtime", "f", &["mtime"], |b| set_mtime(&b.join("f"), 1_600_000_001));
    caught("symlink mtime", "l", &["mtime"], |b| set_mtime(&b.join("l"), 1_600_000_001));
    caught("directory mtime", "d/sub", &["mtime"], |b| set_mtime(&b.join("d/sub"), 1));
}

#[test]
fn directory_mtimes_can_be_ignored() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    base(&a);
    base(&b);
    set_mtime(&b.join("d"), 1);
    assert!(compare_trees(&a, &b, Compare::default()).is_err());
    assert_eq!(compare_trees(&a, &b, Compare { ignore_dir_mtimes: true }), Ok(()));
}

#[test]
fn xattr_names() {
    caught("missing xattr", "f", &["xattrs"], |b| rustix::fs::lremovexattr(b.join("f"), "user.b").unwrap());
    caught("extra xattr", "d", &["xattrs"], |b| set_xattr(&b.join("d"), "user.more", b""));
    caught("renamed xattr", "d", &["xattrs"], |b| {
        rustix::fs::lremovexattr(b.join("d"), "user.dir").unwrap();
        set_xattr(&b.join("d"), "user.dis", b"x");
    });
}

#[test]
fn xattr_values() {
    caught("xattr value", "f", &["xattrs"], |b| set_xattr(&b.join("f"), "user.a", b"one"));
    caught("empty xattr value", "d", &["xattrs"], |b| set_xattr(&b.join("d"), "user.dir", b""));
}

#[test]
fn trusted_and_security_xattrs() {
    if !require(rustix::process::geteuid().is_root(), "trusted.* attributes need root") {
        return;
    }
    caught("trusted xattr", "g", &["xattrs"], |b| set_xattr(&b.join("g"), "trusted.t", b"v"));
    caught("security xattr", "g", &["xattrs"], |b| set_xattr(&b.join("g"), "security.s", b"v"));
}

#[test]
fn hard_link_structure() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    base(&a);
    base(&b);
    fs::copy(a.join("g"), a.join("d/g2")).unwrap();
    Tree::at(&b).hardlink("d/g2", "g");
    pin_times(&a);
    pin_times(&b);
    assert!(compare_trees(&a, &b, Compare::default()).is_err());
    assert_eq!(differences(&a, &b), [("d/g2".to_string(), vec!["links"]), ("g".to_string(), vec!["links"])]);
}
