//! Every dependency a workspace crate declares is used by that crate.
//!
//! An unused dependency costs build time on every machine and hides what a crate really
//! relies on. The check is the one `cargo machete` makes (a dependency counts as used when its
//! crate name appears as a word in the sources that can see it), kept here so that the test
//! command catches a stale line without a tool to install.

use std::fs;
use std::path::{Path, PathBuf};

/// The workspace root (two levels above this crate).
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

/// The `.rs` files beneath `dir`, read.
fn sources(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else { return out };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(sources(&p));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(fs::read_to_string(&p).unwrap());
        }
    }
    out
}

/// Whether `ident` occurs as a whole word in any of `texts`.
fn mentioned(ident: &str, texts: &[String]) -> bool {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    texts.iter().any(|t| {
        t.match_indices(ident).any(|(i, _)| {
            let before = t[..i].chars().next_back().is_none_or(|c| !word(c));
            let after = t[i + ident.len()..].chars().next().is_none_or(|c| !word(c));
            before && after
        })
    })
}

/// The unused dependencies of the crate at `dir`, as `SECTION NAME`.
fn unused(dir: &Path) -> Vec<String> {
    let manifest: toml::Table = fs::read_to_string(dir.join("Cargo.toml")).unwrap().parse().unwrap();
    let lib: Vec<String> = ["src", "build.rs"].iter().flat_map(|d| sources(&dir.join(d))).collect();
    let mut all = lib.clone();
    for d in ["tests", "benches", "examples"] {
        all.extend(sources(&dir.join(d)));
    }
    let mut out = Vec::new();
    for (section, texts) in [("dependencies", &lib), ("build-dependencies", &lib), ("dev-dependencies", &all)]
    {
        let Some(deps) = manifest.get(section).and_then(|d| d.as_table()) else { continue };
        for (name, spec) in deps {
            let package = spec.get("package").and_then(|p| p.as_str());
            let ident = if package.is_some() { name.clone() } else { name.replace('-', "_") };
            if !mentioned(&ident, texts) {
                out.push(format!("{section} {name}"));
            }
        }
    }
    // Sorted, so the result does not hang on how the TOML table orders its keys.
    out.sort();
    out
}

#[test]
fn no_crate_declares_a_dependency_it_does_not_use() {
    let root = workspace_root();
    let manifest: toml::Table = fs::read_to_string(root.join("Cargo.toml")).unwrap().parse().unwrap();
    let members = manifest["workspace"]["members"].as_array().unwrap();
    assert!(members.len() > 5, "the workspace lists its crates");
    let mut found = Vec::new();
    for m in members {
        let dir = root.join(m.as_str().unwrap());
        found.extend(unused(&dir).into_iter().map(|u| format!("{}: {u}", dir.display())));
    }
    assert!(found.is_empty(), "unused dependencies (remove them from Cargo.toml):\n{}", found.join("\n"));
}

#[test]
fn the_check_sees_an_unused_dependency() {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir(dir.path().join("src")).unwrap();
    fs::write(
        dir.path().join("Cargo.toml"),
        "[package]\nname = \"x\"\n[dependencies]\nserde = \"1\"\nserde-json = \"1\"\nrenamed = { package = \"blake3\", version = \"1\" }\n[dev-dependencies]\ntempfile = \"3\"\n",
    )
    .unwrap();
    // `serde_json_extra` and `my_serde` must not count as uses of `serde` or `serde_json`.
    fs::write(
        dir.path().join("src/lib.rs"),
        "use serde::Serialize;\nfn my_serde() {}\nstruct serde_json_extra;\n",
    )
    .unwrap();
    assert_eq!(
        unused(dir.path()),
        ["dependencies renamed", "dependencies serde-json", "dev-dependencies tempfile"]
    );
    fs::create_dir(dir.path().join("tests")).unwrap();
    fs::write(
        dir.path().join("tests/t.rs"),
        "fn t() { let _ = tempfile::tempdir(); renamed::hash(b\"\"); }\n",
    )
    .unwrap();
    // A dev-dependency counts in tests; a normal dependency does not.
    assert_eq!(unused(dir.path()), ["dependencies renamed", "dependencies serde-json"]);
}
