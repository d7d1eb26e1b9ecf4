//! The `files` mode's tree: a file server's many small files, N files of 0-99 bytes of noise
//! spread evenly over D directories (`dNNN/sNN`), and the change passes that rewrite a share of
//! them in place.
//!
//! Like the `core` tree, the tree is a pure function of its shape (N, D), so a kept tree is
//! reused when the shape matches. A change pass keeps every file's size, so the tree keeps its
//! byte count; only contents and modification times move.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::machine;
use crate::scratch::{Scratch, remove_if_present};

/// Bump when the generated content changes, so kept trees of an older layout are rebuilt.
const LAYOUT: &str = "files-1";
/// Threads writing the tree: creating files is mostly the kernel's work, which then runs on
/// every core.
const WRITERS: usize = 4;

/// The shape of a generated tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Files.
    pub files: u64,
    /// Directories holding them.
    pub dirs: u64,
}

/// What was generated.
#[derive(Debug, Clone, Copy)]
pub struct FilesTree {
    /// Its shape.
    pub shape: Shape,
    /// Bytes of all files.
    pub bytes: u64,
}

impl Shape {
    /// Directory `k`: `dNNN/sNN`, a hundred to a top-level directory.
    fn dir(k: u64) -> String {
        format!("d{:03}/s{:02}", k / 100, k % 100)
    }

    /// File `i`, relative to the root: in directory `i mod dirs`.
    pub fn file(&self, i: u64) -> String {
        format!("{}/f{i:07}", Shape::dir(i % self.dirs))
    }
}

/// File `i`'s size: 0-99 bytes, the same in every pass.
fn size_of(i: u64) -> usize {
    ((i * 37 + 11) % 100) as usize
}

/// Returns the tree under `scratch.src()`, generating it unless a complete tree of this shape
/// is already there.
pub fn ensure(scratch: &Scratch, shape: Shape) -> Result<FilesTree> {
    if shape.files == 0 || shape.dirs == 0 {
        bail!("--files and --dirs must be at least 1");
    }
    let marker = scratch.tree_marker();
    let existing = fs::read(&marker).ok().and_then(|b| serde_json::from_slice::<Value>(&b).ok());
    if let Some(tree) = existing.and_then(|v| from_json(&v, shape)) {
        eprintln!("[bench] reusing the tree generated earlier in {}", scratch.src().display());
        return Ok(tree);
    }
    // Claim src/ before touching it: an interrupted generation is still ours to replace.
    fs::write(&marker, json!({ "layout": LAYOUT, "complete": false }).to_string())?;
    remove_if_present(&scratch.src())?;
    let started = Instant::now();
    eprintln!(
        "[bench] generating {} files in {} directories in {}",
        shape.files,
        shape.dirs,
        scratch.src().display()
    );
    let bytes = write_all(&scratch.src(), shape)?;
    machine::sync();
    // rsync compares directory times in whole seconds: a directory it creates in the same
    // second as the source's mtime keeps its creation time, and the copy would not verify.
    std::thread::sleep(Duration::from_millis(1100));
    let v = json!({
        "layout": LAYOUT, "files": shape.files, "dirs": shape.dirs, "bytes": bytes, "complete": true,
    });
    fs::write(&marker, v.to_string())?;
    eprintln!("[bench] tree generated in {:.1} s", started.elapsed().as_secs_f64());
    Ok(FilesTree { shape, bytes })
}

/// The tree a marker describes, if it is complete and of this shape.
fn from_json(v: &Value, shape: Shape) -> Option<FilesTree> {
    let same = v["layout"] == LAYOUT
        && v["files"].as_u64()? == shape.files
        && v["dirs"].as_u64()? == shape.dirs
        && v["complete"] == true;
    same.then(|| FilesTree { shape, bytes: v["bytes"].as_u64().unwrap_or(0) })
}

/// Writes every file, each writer thread a share of the directories; returns the bytes.
fn write_all(root: &Path, shape: Shape) -> Result<u64> {
    for k in 0..shape.dirs.min(shape.files) {
        fs::create_dir_all(root.join(Shape::dir(k)))?;
    }
    std::thread::scope(|s| {
        let writers: Vec<_> =
            (0..WRITERS as u64).map(|w| s.spawn(move || write_share(root, shape, w))).collect();
        writers.into_iter().map(|h| h.join().expect("a tree writer panicked")).sum()
    })
}

/// The files of the directories `k` with `k mod WRITERS == w`, directory by directory.
fn write_share(root: &Path, shape: Shape, w: u64) -> Result<u64> {
    let mut bytes = 0;
    for k in (w..shape.dirs).step_by(WRITERS) {
        for i in (k..shape.files).step_by(shape.dirs as usize) {
            let p = root.join(shape.file(i));
            fs::write(&p, doppel_testkit::noise(i, size_of(i)))
                .with_context(|| format!("writing {}", p.display()))?;
            bytes += size_of(i) as u64;
        }
    }
    Ok(bytes)
}

/// One change pass: every `stride`-th file (offset by the pass number, so passes touch
/// different files) rewritten in place with new content of the same size.
#[derive(Debug, Clone)]
pub struct Changes {
    /// The files rewritten, relative to the root.
    pub files: Vec<PathBuf>,
    /// How long writing them took.
    pub took: Duration,
}

/// Rewrites `percent` % of the files under `root` (pass `pass`).
pub fn change(root: &Path, shape: Shape, percent: f64, pass: u64) -> Result<Changes> {
    let stride = (100.0 / percent.clamp(0.001, 100.0)).round().max(1.0) as u64;
    let t = Instant::now();
    let mut files = Vec::new();
    for i in ((pass * 7919) % stride..shape.files).step_by(stride as usize) {
        let rel = PathBuf::from(shape.file(i));
        let content = doppel_testkit::noise((pass << 40) | i, size_of(i));
        fs::write(root.join(&rel), content).with_context(|| format!("rewriting {}", rel.display()))?;
        files.push(rel);
    }
    Ok(Changes { files, took: t.elapsed() })
}

/// Whether every changed file has reached `dst`: same content and modification time. `Err`
/// names the first that has not.
pub fn arrived(src: &Path, dst: &Path, changes: &Changes) -> Result<(), String> {
    for rel in &changes.files {
        let (a, b) = (src.join(rel), dst.join(rel));
        let same_time = match (fs::metadata(&a), fs::metadata(&b)) {
            (Ok(x), Ok(y)) => (x.mtime(), x.mtime_nsec()) == (y.mtime(), y.mtime_nsec()),
            _ => false,
        };
        if !same_time || fs::read(&a).ok() != fs::read(&b).ok() {
            return Err(format!("{} has not arrived", rel.display()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_spread_over_every_directory() {
        let shape = Shape { files: 1_000_000, dirs: 1000 };
        assert_eq!(shape.file(0), "d000/s00/f0000000");
        assert_eq!(shape.file(999), "d009/s99/f0000999");
        assert_eq!(shape.file(1000), "d000/s00/f0001000");
        assert!((0..1000).all(|i| size_of(i) < 100));
    }

    #[test]
    fn a_pass_rewrites_the_share_asked_for_in_the_same_sizes() {
        let dir = std::env::temp_dir().join(format!("doppel-bench-files-tree-{}", std::process::id()));
        let scratch = Scratch::open(&dir).unwrap();
        let shape = Shape { files: 1000, dirs: 10 };
        let tree = ensure(&scratch, shape).unwrap();
        assert_eq!(tree.bytes, (0..1000).map(|i| size_of(i) as u64).sum::<u64>());
        let c = change(&scratch.src(), shape, 1.0, 1).unwrap();
        assert_eq!(c.files.len(), 10);
        let after: u64 =
            (0..1000).map(|i| fs::metadata(scratch.src().join(shape.file(i))).unwrap().len()).sum();
        assert_eq!(after, tree.bytes);
        assert!(arrived(&scratch.src(), &scratch.src(), &c).is_ok());
        assert!(arrived(&scratch.src(), &dir, &c).is_err());
        scratch.remove().unwrap();
    }
}
