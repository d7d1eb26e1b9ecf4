use super::*;
use doppel_proto::{Timestamp, WirePath};

fn w(s: &str) -> WirePath {
    WirePath(s.as_bytes().to_vec())
}

fn x(name: &str) -> Xattr {
    Xattr { name: name.as_bytes().to_vec(), value: b"v".to_vec() }
}

fn attrs(f: impl FnOnce(&mut Attrs)) -> Op {
    let mut a = Attrs { mtime: Some(Timestamp { secs: 5, nanos: 0 }), ..Attrs::default() };
    f(&mut a);
    Op::SetAttr { path: w("f"), attrs: a }
}

/// One op kind: the op, the privileges it uses, and what stripping them all leaves.
struct Case {
    name: &'static str,
    op: Op,
    uses: Vec<Privilege>,
    stripped: Op,
}

fn case(name: &'static str, op: Op, uses: &[Privilege], stripped: Op) -> Case {
    Case { name, op, uses: uses.to_vec(), stripped }
}

fn cases() -> Vec<Case> {
    use Privilege::*;
    let plain = Op::Write { path: w("f"), offset: 0, data: b"x".to_vec() };
    vec![
        case("write", plain.clone(), &[], plain),
        case(
            "create set-uid",
            Op::Create { path: w("f"), mode: 0o4755 },
            &[SetId],
            Op::Create { path: w("f"), mode: 0o755 },
        ),
        case(
            "create sticky (not set-id)",
            Op::Create { path: w("f"), mode: 0o1644 },
            &[],
            Op::Create { path: w("f"), mode: 0o1644 },
        ),
        case(
            "mkdir set-gid",
            Op::Mkdir { path: w("d"), mode: 0o2775 },
            &[SetId],
            Op::Mkdir { path: w("d"), mode: 0o775 },
        ),
        case(
            "mknod fifo",
            Op::Mknod { path: w("p"), mode: libc::S_IFIFO | 0o644, rdev: 0 },
            &[],
            Op::Mknod { path: w("p"), mode: libc::S_IFIFO | 0o644, rdev: 0 },
        ),
        case(
            "mknod char device",
            Op::Mknod { path: w("null"), mode: libc::S_IFCHR | 0o666, rdev: 0x103 },
            &[Devices],
            Op::Create { path: w("null"), mode: 0o666 },
        ),
        case(
            "mknod set-gid block device",
            Op::Mknod { path: w("sda"), mode: libc::S_IFBLK | 0o2660, rdev: 0x800 },
            &[SetId, Devices],
            Op::Create { path: w("sda"), mode: 0o660 },
        ),
        case("setattr mode", attrs(|a| a.mode = Some(0o755)), &[], attrs(|a| a.mode = Some(0o755))),
        case("setattr set-uid", attrs(|a| a.mode = Some(0o4711)), &[SetId], attrs(|a| a.mode = Some(0o711))),
        case(
            "setattr root owner",
            attrs(|a| (a.uid, a.gid) = (Some(0), Some(0))),
            &[],
            attrs(|a| (a.uid, a.gid) = (Some(0), Some(0))),
        ),
        case(
            "setattr owner",
            attrs(|a| (a.uid, a.gid) = (Some(1000), Some(0))),
            &[Owners],
            attrs(|a| (a.uid, a.gid) = (None, Some(0))),
        ),
        case(
            "setattr group",
            attrs(|a| (a.uid, a.gid) = (Some(0), Some(50))),
            &[Owners],
            attrs(|a| (a.uid, a.gid) = (Some(0), None)),
        ),
        case(
            "setattr user xattr",
            attrs(|a| a.xattrs = Some(vec![x("user.note")])),
            &[],
            attrs(|a| a.xattrs = Some(vec![x("user.note")])),
        ),
        case(
            "setattr capability",
            attrs(|a| a.xattrs = Some(vec![x("security.capability"), x("user.note")])),
            &[Capabilities],
            attrs(|a| a.xattrs = Some(vec![x("user.note")])),
        ),
        case(
            "setattr trusted and selinux",
            attrs(|a| a.xattrs = Some(vec![x("security.selinux"), x("trusted.overlay.opaque")])),
            &[Capabilities],
            attrs(|a| a.xattrs = Some(vec![])),
        ),
        case(
            "setattr acl",
            attrs(|a| a.xattrs = Some(vec![x("system.posix_acl_access")])),
            &[Owners],
            attrs(|a| a.xattrs = Some(vec![])),
        ),
        case(
            "setattr everything",
            attrs(|a| {
                (a.mode, a.uid, a.gid) = (Some(0o6755), Some(7), Some(8));
                a.xattrs = Some(vec![x("security.capability")]);
            }),
            &[SetId, Owners, Capabilities],
            attrs(|a| {
                a.mode = Some(0o755);
                a.xattrs = Some(vec![]);
            }),
        ),
    ]
}

#[test]
fn each_rule_on_each_op_kind() {
    for c in cases() {
        assert_eq!(privileges_of(&c.op), c.uses, "{}: privileges", c.name);
        let allowed = PrivilegePolicy::all(Rule::Allow).decide(&c.op);
        assert_eq!(
            allowed,
            Decision::Apply { op: Cow::Borrowed(&c.op), stripped: vec![] },
            "{}: allow",
            c.name
        );
        let stripped = PrivilegePolicy::all(Rule::Strip).decide(&c.op);
        assert_eq!(
            stripped,
            Decision::Apply { op: Cow::Owned(c.stripped.clone()), stripped: c.uses.clone() },
            "{}: strip",
            c.name
        );
        // Stripping leaves nothing privileged behind.
        assert_eq!(privileges_of(&c.stripped), vec![], "{}: stripped op", c.name);
        match (PrivilegePolicy::all(Rule::Refuse).decide(&c.op), c.uses.first()) {
            (Decision::Refuse { privilege, reason }, Some(&first)) => {
                assert_eq!(privilege, first, "{}: refuse", c.name);
                assert!(reason.contains(&format!("({} = \"refuse\")", first.key())), "{}: {reason}", c.name);
            }
            (Decision::Apply { op, stripped }, None) => {
                assert_eq!((&*op, stripped), (&c.op, vec![]), "{}: refuse, nothing privileged", c.name);
            }
            (d, _) => panic!("{}: refuse gave {d:?}", c.name),
        }
    }
}

/// A rule applies to its own privilege only: refusing one leaves ops using only others alone.
#[test]
fn each_setting_on_its_own() {
    for p in Privilege::ALL {
        let mut policy = PrivilegePolicy::all(Rule::Allow);
        policy.set(p, Rule::Refuse);
        for c in cases() {
            let refused =
                matches!(policy.decide(&c.op), Decision::Refuse { privilege, .. } if privilege == p);
            assert_eq!(refused, c.uses.contains(&p), "{p} refused, {}", c.name);
        }
    }
}

/// A refusal wins over stripping, and stripping one part keeps the others.
#[test]
fn refuse_wins_and_strip_is_partial() {
    let op = attrs(|a| {
        (a.mode, a.uid) = (Some(0o4755), Some(1000));
    });
    let p = PrivilegePolicy { setid: Rule::Strip, owners: Rule::Refuse, ..PrivilegePolicy::default() };
    assert!(matches!(p.decide(&op), Decision::Refuse { privilege: Privilege::Owners, .. }));
    let p = PrivilegePolicy { setid: Rule::Strip, ..PrivilegePolicy::default() };
    let want = attrs(|a| (a.mode, a.uid) = (Some(0o755), Some(1000)));
    assert_eq!(p.decide(&op), Decision::Apply { op: Cow::Owned(want), stripped: vec![Privilege::SetId] });
}

#[test]
fn defaults_and_checks() {
    let d = PrivilegePolicy::default();
    assert_eq!(
        (d.setid, d.owners, d.capabilities, d.devices),
        (Rule::Allow, Rule::Allow, Rule::Allow, Rule::Refuse)
    );
    assert_eq!(d.check(), Ok(()));
    let bad = PrivilegePolicy { owners: Rule::Strip, ..d };
    let e = bad.check().unwrap_err().to_string();
    assert!(e.contains("owners = \"strip\"") && e.contains("set-uid root"), "{e}");
    assert_eq!(PrivilegePolicy { setid: Rule::Strip, ..bad }.check(), Ok(()));
    assert_eq!("strip".parse(), Ok(Rule::Strip));
    assert_eq!(
        "Strip".parse::<Rule>().unwrap_err().to_string(),
        "\"Strip\": use \"allow\", \"strip\" or \"refuse\""
    );
}
