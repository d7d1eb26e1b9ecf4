//! The mixed source tree: many small files in nested directories, a few hundred medium files
//! and a few large ones, mostly incompressible noise with some compressible text.
//!
//! The tree is a pure function of its total size (fixed seeds), so runs on different machines
//! copy the same bytes, and a kept tree can be reused when the size matches.

use std::fs;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::machine;
use crate::scratch::Scratch;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
/// Bump when the generated content changes, so kept trees of an older layout are rebuilt.
const LAYOUT: u64 = 1;

/// What one file of the tree holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Content {
    /// Incompressible pseudo-random bytes.
    Noise,
    /// Lines of words: compresses several times.
    Text,
}

/// One file to generate.
#[derive(Debug, Clone)]
struct FileSpec {
    rel: String,
    len: u64,
    content: Content,
    seed: u64,
}

/// Counts for one class of files.
#[derive(Debug, Clone, Copy, Default)]
pub struct Class {
    /// Number of files.
    pub files: u64,
    /// Their total size.
    pub bytes: u64,
}

/// What was generated.
#[derive(Debug, Clone, Copy, Default)]
pub struct TreeInfo {
    /// Files of 1-64 KiB.
    pub small: Class,
    /// Files of 1-8 MiB.
    pub medium: Class,
    /// Files of 100-500 MiB (at the full 2 GiB size; scaled down with `--size`).
    pub large: Class,
    /// Bytes of text (the rest is noise).
    pub text_bytes: u64,
    /// Directories, the root included.
    pub dirs: u64,
}

impl TreeInfo {
    /// All files.
    pub fn files(&self) -> u64 {
        self.small.files + self.medium.files + self.large.files
    }

    /// All bytes.
    pub fn bytes(&self) -> u64 {
        self.small.bytes + self.medium.bytes + self.large.bytes
    }

    fn to_json(self, size: u64) -> Value {
        json!({
            "layout": LAYOUT, "size": size,
            "small": [self.small.files, self.small.bytes],
            "medium": [self.medium.files, self.medium.bytes],
            "large": [self.large.files, self.large.bytes],
            "text_bytes": self.text_bytes, "dirs": self.dirs,
        })
    }

    /// The info of a complete tree of `size` bytes, if `v` describes one.
    fn from_json(v: &Value, size: u64) -> Option<TreeInfo> {
        if v["layout"].as_u64()? != LAYOUT || v["size"].as_u64()? != size || v["complete"] != true {
            return None;
        }
        let class = |k: &str| Some(Class { files: v[k][0].as_u64()?, bytes: v[k][1].as_u64()? });
        Some(TreeInfo {
            small: class("small")?,
            medium: class("medium")?,
            large: class("large")?,
            text_bytes: v["text_bytes"].as_u64()?,
            dirs: v["dirs"].as_u64()?,
        })
    }
}

/// A small deterministic generator (xorshift64*): sizes and words must repeat across runs.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

/// Returns the tree under `scratch.src()`, generating it unless a complete tree of this size
/// is already there.
pub fn ensure(scratch: &Scratch, size: u64) -> Result<TreeInfo> {
    let marker = scratch.tree_marker();
    let existing = fs::read(&marker).ok().and_then(|b| serde_json::from_slice::<Value>(&b).ok());
    if let Some(info) = existing.and_then(|v| TreeInfo::from_json(&v, size)) {
        eprintln!("[bench] reusing the tree generated earlier in {}", scratch.src().display());
        return Ok(info);
    }
    // Claim src/ before touching it: an interrupted generation is still ours to replace.
    fs::write(&marker, json!({ "layout": LAYOUT, "size": size, "complete": false }).to_string())?;
    crate::scratch::remove_if_present(&scratch.src())?;
    let started = Instant::now();
    let (specs, info) = plan(size);
    eprintln!(
        "[bench] generating {} files, {:.2} GiB in {}",
        info.files(),
        info.bytes() as f64 / (1u64 << 30) as f64,
        scratch.src().display()
    );
    write_all(&scratch.src(), &specs)?;
    let info = TreeInfo { dirs: count_dirs(&scratch.src())?, ..info };
    machine::sync();
    // rsync compares directory times in whole seconds: a directory it creates in the same
    // second as the source's mtime keeps its creation time, and the copy would not verify.
    std::thread::sleep(Duration::from_millis(1100));
    let mut v = info.to_json(size);
    v["complete"] = true.into();
    fs::write(&marker, v.to_string())?;
    eprintln!("[bench] tree generated in {:.1} s", started.elapsed().as_secs_f64());
    Ok(info)
}

/// Decides every file: 30 % of the bytes in small files, 40 % in medium, 30 % in three large.
fn plan(size: u64) -> (Vec<FileSpec>, TreeInfo) {
    let mut rng = Rng::new(0xd0_99e1);
    let mut specs = Vec::new();
    let mut info = TreeInfo::default();
    let small_budget = size * 30 / 100;
    let medium_budget = size * 40 / 100;
    let large_budget = size - small_budget - medium_budget;

    while info.small.bytes < small_budget {
        let i = info.small.files;
        let len = rng.range(KIB, 64 * KIB).min(small_budget - info.small.bytes);
        let (a, b) = (i % 16, (i / 16) % 12);
        let deeper = if i.is_multiple_of(3) { format!("c{}/", i % 4) } else { String::new() };
        let content = if rng.next().is_multiple_of(5) { Content::Text } else { Content::Noise };
        let ext = if content == Content::Text { "txt" } else { "dat" };
        let rel = format!("small/a{a:02}/b{b:02}/{deeper}f{i:05}.{ext}");
        push(&mut specs, &mut info.small, &mut info.text_bytes, rel, len, content);
    }
    while info.medium.bytes < medium_budget {
        let i = info.medium.files;
        let len = rng.range(MIB, 8 * MIB).min(medium_budget - info.medium.bytes);
        let content = if i.is_multiple_of(10) { Content::Text } else { Content::Noise };
        let rel = format!("medium/m{}/file{i:04}.bin", i % 8);
        push(&mut specs, &mut info.medium, &mut info.text_bytes, rel, len, content);
    }
    // Half, 30 % and the rest (20 %) of the large budget: 307, 184 and 123 MiB at 2 GiB.
    let (first, second) = (large_budget / 2, large_budget * 3 / 10);
    for (i, len) in [first, second, large_budget - first - second].into_iter().enumerate() {
        let rel = format!("large/image{i}.img");
        push(&mut specs, &mut info.large, &mut info.text_bytes, rel, len, Content::Noise);
    }
    (specs, info)
}

fn push(specs: &mut Vec<FileSpec>, class: &mut Class, text: &mut u64, rel: String, len: u64, c: Content) {
    let seed = specs.len() as u64 + 1;
    specs.push(FileSpec { rel, len, content: c, seed });
    class.files += 1;
    class.bytes += len;
    if c == Content::Text {
        *text += len;
    }
}

fn write_all(root: &Path, specs: &[FileSpec]) -> Result<()> {
    for s in specs {
        let p = root.join(&s.rel);
        fs::create_dir_all(p.parent().expect("files have a parent"))?;
        write_file(&p, s).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

/// Writes one file in chunks of at most 1 MiB, so a 300 MiB file needs no 300 MiB buffer.
fn write_file(p: &Path, s: &FileSpec) -> Result<()> {
    let mut out = BufWriter::with_capacity(MIB as usize, fs::File::create(p)?);
    let mut words = Rng::new(s.seed);
    let mut left = s.len;
    let mut chunk_no = 0u64;
    while left > 0 {
        let n = left.min(MIB) as usize;
        let chunk = match s.content {
            Content::Noise => doppel_testkit::noise((s.seed << 20) | chunk_no, n),
            Content::Text => text(&mut words, n),
        };
        out.write_all(&chunk)?;
        left -= n as u64;
        chunk_no += 1;
    }
    out.flush()?;
    Ok(())
}

/// `len` bytes of lines of words from a small vocabulary.
fn text(rng: &mut Rng, len: usize) -> Vec<u8> {
    const WORDS: [&str; 32] = [
        "replica",
        "source",
        "target",
        "block",
        "hash",
        "spool",
        "batch",
        "link",
        "apply",
        "index",
        "mirror",
        "rename",
        "write",
        "fsync",
        "commit",
        "ack",
        "sequence",
        "capture",
        "watch",
        "event",
        "lag",
        "tree",
        "file",
        "directory",
        "owner",
        "mode",
        "time",
        "extent",
        "journal",
        "page",
        "cache",
        "disk",
    ];
    let mut out = Vec::with_capacity(len + 16);
    let mut col = 0;
    while out.len() < len {
        let w = WORDS[(rng.next() % WORDS.len() as u64) as usize];
        out.extend_from_slice(w.as_bytes());
        col += w.len() + 1;
        if col > 72 {
            out.push(b'\n');
            col = 0;
        } else {
            out.push(b' ');
        }
    }
    out.truncate(len);
    out
}

fn count_dirs(root: &Path) -> Result<u64> {
    let mut n = 1;
    for e in fs::read_dir(root)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            n += count_dirs(&e.path())?;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_at_full_size_has_the_intended_mix() {
        let (specs, info) = plan(2 << 30);
        assert_eq!(info.bytes(), 2 << 30);
        assert!((18_000..22_000).contains(&info.small.files), "{info:?}");
        assert!((100..400).contains(&info.medium.files), "{info:?}");
        assert_eq!(info.large.files, 3);
        assert!(specs.iter().filter(|s| s.rel.starts_with("large/")).all(|s| s.len >= 100 * MIB));
        assert!(info.text_bytes > 0 && info.text_bytes < info.bytes() / 5, "{info:?}");
    }

    #[test]
    fn text_has_the_requested_length() {
        assert_eq!(text(&mut Rng::new(1), 1000).len(), 1000);
    }
}
