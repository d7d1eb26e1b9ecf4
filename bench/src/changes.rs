//! What the workload changes on the DR side while it runs there: a given share of the
//! tree's bytes, spread the way a real workload spreads it. Half as in-place overwrites of
//! 128 KiB at page-aligned offsets inside the large files and a few medium ones (disk images,
//! databases), 30 % as small files rewritten whole (documents saved again), 20 % as a few
//! new files. Deterministic: every run makes the same changes.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use doppel_testkit::noise;

/// One in-place overwrite.
const CHUNK: u64 = 128 << 10;
/// Medium files that get overwrites besides the large ones.
const MEDIUM_TOUCHED: usize = 8;
/// New files.
const NEW_FILES: u64 = 4;

/// What was changed.
#[derive(Debug, Clone, Copy, Default)]
pub struct ChangeSet {
    /// Bytes overwritten in place, and the files they went to.
    pub overwritten: (u64, u64),
    /// Bytes of small files rewritten whole, and how many files.
    pub rewritten: (u64, u64),
    /// Bytes of new files, and how many.
    pub created: (u64, u64),
}

impl ChangeSet {
    /// Every byte written.
    pub fn bytes(&self) -> u64 {
        self.overwritten.0 + self.rewritten.0 + self.created.0
    }
}

/// A small deterministic generator (xorshift).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// Changes `percent` % of `tree_bytes` in the tree at `root` (a tree made by [`crate::tree`]).
pub fn apply(root: &Path, tree_bytes: u64, percent: f64) -> Result<ChangeSet> {
    let budget = (tree_bytes as f64 * percent / 100.0) as u64;
    let mut rng = Rng(0xfa11_bacc);
    let mut c = ChangeSet::default();

    let mut big = files(&root.join("large"))?;
    big.extend(files(&root.join("medium"))?.into_iter().take(MEDIUM_TOUCHED));
    let over_budget = budget / 2;
    let mut k = 0;
    while c.overwritten.0 < over_budget {
        let path = &big[k % big.len()];
        let len = fs::metadata(path)?.len();
        let n = CHUNK.min(over_budget - c.overwritten.0).min(len);
        let off = rng.below((len - n) / 4096 + 1) * 4096;
        let f = OpenOptions::new()
            .write(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        f.write_all_at(&noise(0xc4a9_0000 + k as u64, n as usize), off)?;
        c.overwritten.0 += n;
        k += 1;
    }
    c.overwritten.1 = big.len().min(k) as u64;

    let mut small = files(&root.join("small"))?;
    let rewrite_budget = budget * 3 / 10;
    while c.rewritten.0 < rewrite_budget && !small.is_empty() {
        let path = small.swap_remove(rng.below(small.len() as u64) as usize);
        let len = fs::metadata(&path)?.len();
        fs::write(&path, noise(0x5a11_0000 + c.rewritten.1, len as usize))?;
        c.rewritten.0 += len;
        c.rewritten.1 += 1;
    }

    let new_budget = budget - c.overwritten.0 - c.rewritten.0.min(budget - c.overwritten.0);
    let dir = root.join("dr-new");
    fs::create_dir_all(&dir)?;
    for i in 0..NEW_FILES {
        let len = new_budget / NEW_FILES;
        fs::write(dir.join(format!("new-{i}.bin")), noise(0x0e30_0000 + i, len as usize))?;
        c.created.0 += len;
        c.created.1 += 1;
    }
    Ok(c)
}

/// Regular files under `dir`, recursively, sorted by path.
fn files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let e = e?;
            if e.file_type()?.is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out.sort();
    Ok(out)
}
