//! The target's per-source privilege policy end to end: a real `doppel target` whose allow
//! list gives three sources `allow`, `strip` and `refuse`, and a real `doppel protect` on each,
//! replicating the same set-uid file, file with a capability (`setcap`) and chowned file.
//! Device nodes, FIFOs and sockets have their own test, `special_files.rs`.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::Value;

const POLICIES: [(&str, &str); 3] = [
    ("allow", ""),
    ("strip", "setid = \"strip\"\nowners = \"strip\"\ncapabilities = \"strip\"\ndevices = \"strip\"\n"),
    ("refuse", "setid = \"refuse\"\nowners = \"refuse\"\ncapabilities = \"refuse\"\n"),
];

/// A source tree with one file per privilege, and a plain file.
fn privileged_tree(src: &Path, setcap: &Path) {
    Tree::at(src)
        .file("su", b"#!/bin/sh\n")
        .file("cap", b"cap\n")
        .file("own", b"own\n")
        .file("plain", b"plain\n");
    std::fs::set_permissions(src.join("su"), std::fs::Permissions::from_mode(0o4755)).unwrap();
    std::os::unix::fs::chown(src.join("own"), Some(1234), Some(5678)).unwrap();
    let st = std::process::Command::new(setcap)
        .arg("cap_net_bind_service+ep")
        .arg(src.join("cap"))
        .status()
        .unwrap();
    assert!(st.success(), "setcap failed");
}

fn has_capability(path: &Path) -> bool {
    rustix::fs::lgetxattr(path, "security.capability", &mut [0u8; 64]).is_ok()
}

/// The target's status row of `source`.
fn row(target_home: &Path, source: &str) -> Value {
    let (st, out, err) = run(target_home, &["status", "--json"]);
    assert!(st.success(), "status failed: {err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    v["replicas"].as_array().unwrap().iter().find(|r| r["source"] == source).cloned().unwrap_or(Value::Null)
}

fn count(r: &Value, what: &str, privilege: &str) -> u64 {
    r[what][privilege].as_u64().unwrap_or(0)
}

#[test]
fn privilege_policies_allow_strip_and_refuse_end_to_end() {
    if !require(rustix::process::geteuid().is_root(), "chown and setcap need root") {
        return;
    }
    let Some([setcap]) = doppel_testkit::skip::require_tools(["setcap"]) else { return };
    let dir = tempfile::tempdir().unwrap();
    let target_id = target_identity(dir.path());
    let mut config = String::from("[target]\n");
    let mut sources = Vec::new();
    for (name, rules) in POLICIES {
        let home = dir.path().join(format!("{name}-home"));
        let id = init(&home);
        config += &format!("[[target.allow]]\nname = \"{name}\"\nid = \"{id}\"\n{rules}");
        let src = dir.path().join(format!("{name}-src"));
        privileged_tree(&src, &setcap);
        sources.push((name, home, src));
    }
    let data = dir.path().join("target-data");
    let target = start_target_config(dir.path(), &config, "127.0.0.1:0", &data, None);
    assert_eq!(target.id, target_id);
    let mut agents = Vec::new();
    for (_, home, src) in &sources {
        agents.push(target.protect(home, "agent", src, &["--name", "job"]));
    }
    let th = &target.proc.home;
    let replica = |name: &str, f: &str| data.join("replicas").join(name).join("job").join(f);
    // Everything without privilege converges for every source.
    wait_until(Duration::from_secs(60), "every replica's plain file", || {
        for (name, _, _) in &sources {
            let got = std::fs::read(replica(name, "plain")).map_err(|e| format!("{name}: {e}"))?;
            if got != b"plain\n" {
                return Err(format!("{name}: plain is {got:?}"));
            }
        }
        Ok(())
    });

    // allow: as the source has them.
    wait_until(Duration::from_secs(30), "allow's privileged files", || {
        let su = std::fs::metadata(replica("allow", "su")).map_err(|e| e.to_string())?;
        let own = std::fs::metadata(replica("allow", "own")).map_err(|e| e.to_string())?;
        let ok = su.mode() & 0o7777 == 0o4755
            && (own.uid(), own.gid()) == (1234, 5678)
            && has_capability(&replica("allow", "cap"));
        ok.then_some(()).ok_or_else(|| format!("su {:o}, own {}:{}", su.mode(), own.uid(), own.gid()))
    });
    let r = row(th, "allow");
    assert_eq!(
        (r["stripped"]["setid"].as_u64(), r["policy_refused"]["setid"].as_u64()),
        (Some(0), Some(0)),
        "{r}"
    );

    // strip: the files arrive, without their privileged parts, and status counts them.
    wait_until(Duration::from_secs(30), "strip's counts", || {
        let r = row(th, "strip");
        let all = ["setid", "owners", "capabilities"].iter().all(|p| count(&r, "stripped", p) >= 1);
        all.then_some(()).ok_or_else(|| r.to_string())
    });
    let su = std::fs::metadata(replica("strip", "su")).unwrap();
    assert_eq!(su.mode() & 0o7777, 0o755);
    assert_eq!(std::fs::read(replica("strip", "su")).unwrap(), b"#!/bin/sh\n");
    let own = std::fs::metadata(replica("strip", "own")).unwrap();
    assert_eq!((own.uid(), own.gid()), (0, 0));
    assert!(replica("strip", "cap").is_file() && !has_capability(&replica("strip", "cap")));
    let r = row(th, "strip");
    assert!(
        ["setid", "owners", "capabilities", "devices"].iter().all(|p| count(&r, "policy_refused", p) == 0),
        "{r}"
    );

    // refuse: those ops are refused and counted; the rest of the stream went on (plain above).
    wait_until(Duration::from_secs(30), "refuse's counts", || {
        let r = row(th, "refuse");
        let all = ["setid", "owners", "capabilities"].iter().all(|p| count(&r, "policy_refused", p) >= 1);
        all.then_some(()).ok_or_else(|| r.to_string())
    });
    assert!(!replica("refuse", "su").exists(), "the set-uid file's creation was refused");
    assert_eq!(std::fs::metadata(replica("refuse", "own")).unwrap().uid(), 0);
    assert!(!has_capability(&replica("refuse", "cap")));
    let r = row(th, "refuse");
    assert!(r["refused"].as_u64().unwrap() >= 3, "{r}");
    // The human status says it too.
    let (_, out, _) = run(th, &["status"]);
    assert!(out.contains("PRIVILEGES: refused setid"), "{out}");
    assert!(out.contains("PRIVILEGES: stripped setid"), "{out}");

    // The agents kept replicating through all of it.
    for ((name, home, _), agent) in sources.iter().zip(&mut agents) {
        assert!(agent.running(), "{name}: {}", agent.log());
        assert_eq!(job_status(home, "job")["state"], "replicating", "{name}");
    }
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!((mode(&data), mode(&data.join("replicas")), mode(&data.join("state"))), (0o700, 0o700, 0o700));
}

/// A data directory made loose by hand is tightened when the target starts.
#[test]
fn a_loose_data_directory_is_tightened_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("target-data");
    std::fs::create_dir_all(data.join("state")).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(data.join("state"), std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut target = start_target(dir.path(), &[], 0);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!((mode(&data), mode(&data.join("state")), mode(&data.join("replicas"))), (0o700, 0o700, 0o700));
    target.proc.stop();
}

/// Bad privilege values and names starting with '-' stop the target with one line naming the
/// key or the name.
#[test]
fn bad_privilege_settings_and_dash_names_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let id = init(&home);
    let data = dir.path().join("data");
    let cases = [
        (
            format!("[[target.allow]]\nname = \"s\"\nid = \"{id}\"\nsetid = \"maybe\"\n"),
            "source s: setid = \"maybe\": use \"allow\", \"strip\" or \"refuse\"",
        ),
        (
            format!("[[target.allow]]\nname = \"s\"\nid = \"{id}\"\nowners = \"refuse\"\n"),
            "source s: setid = \"allow\" with owners = \"refuse\"",
        ),
        (
            format!("[[target.allow]]\nname = \"-s\"\nid = \"{id}\"\n"),
            "source name \"-s\" must not start with '-'",
        ),
    ];
    for (allow, want) in cases {
        let path = dir.path().join("t.toml");
        std::fs::write(&path, format!("[target]\n{allow}")).unwrap();
        let args = [
            "target",
            "--listen",
            "127.0.0.1:0",
            "--data",
            data.to_str().unwrap(),
            "--config",
            path.to_str().unwrap(),
        ];
        let (st, _, err) = run(&home, &args);
        assert!(!st.success(), "{allow}: the target started");
        let line = err.lines().find(|l| l.contains(want)).unwrap_or_else(|| panic!("{want:?} not in {err}"));
        assert!(line.len() < 200, "{line}");
    }
    let (st, _, err) =
        run(&home, &["protect", data.to_str().unwrap(), "--to", "/nonexistent-x", "--name=-job"]);
    assert!(!st.success() && err.contains("must not start with '-'"), "{err}");
}
