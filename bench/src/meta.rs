//! The metadata-heavy workload fio has no job for: create many small files in a few
//! directories, stat them all, unlink them all, each phase timed on its own.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// Size of every file.
pub const FILE_SIZE: usize = 4096;

/// Timings of one run of the workload.
#[derive(Debug, Clone, Copy, Default)]
pub struct MetaTimes {
    /// Creating and writing every file (create, write 4 KiB, close).
    pub create: Duration,
    /// `lstat` of every file.
    pub stat: Duration,
    /// Unlinking every file.
    pub unlink: Duration,
}

/// The directories and files of the workload under `root`: `files` spread round-robin over
/// `dirs` directories.
pub fn paths(root: &Path, dirs: usize, files: usize) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let ds: Vec<PathBuf> = (0..dirs.max(1)).map(|d| root.join(format!("d{d:02}"))).collect();
    let fs = (0..files).map(|i| ds[i % ds.len()].join(format!("f{i:06}"))).collect();
    (ds, fs)
}

/// Makes the (empty) directories, untimed.
pub fn prepare(root: &Path, dirs: usize) -> Result<()> {
    for d in paths(root, dirs, 0).0 {
        fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    }
    Ok(())
}

/// Runs the three phases in `root` (prepared with [`prepare`]).
pub fn run(root: &Path, dirs: usize, files: usize) -> Result<MetaTimes> {
    let (_, names) = paths(root, dirs, files);
    let content: Vec<u8> = (0..FILE_SIZE).map(|i| (i * 7 + 13) as u8).collect();
    let mut t = MetaTimes::default();

    let start = Instant::now();
    for p in &names {
        let mut f = fs::File::create(p).with_context(|| format!("creating {}", p.display()))?;
        f.write_all(&content).with_context(|| format!("writing {}", p.display()))?;
    }
    t.create = start.elapsed();

    let start = Instant::now();
    let mut bytes = 0u64;
    for p in &names {
        bytes += fs::symlink_metadata(p).with_context(|| format!("stat {}", p.display()))?.len();
    }
    t.stat = start.elapsed();
    anyhow::ensure!(bytes == (files * FILE_SIZE) as u64, "stat saw {bytes} bytes in {files} files");

    let start = Instant::now();
    for p in &names {
        fs::remove_file(p).with_context(|| format!("removing {}", p.display()))?;
    }
    t.unlink = start.elapsed();
    Ok(t)
}

/// Removes the directories (untimed).
pub fn clean(root: &Path, dirs: usize) -> Result<()> {
    for d in paths(root, dirs, 0).0 {
        fs::remove_dir(&d).with_context(|| format!("removing {}", d.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_stats_and_unlinks() {
        let d = std::env::temp_dir().join(format!("doppel-bench-meta-{}", std::process::id()));
        fs::create_dir_all(&d).unwrap();
        prepare(&d, 3).unwrap();
        run(&d, 3, 10).unwrap();
        assert!(fs::read_dir(d.join("d01")).unwrap().next().is_none());
        clean(&d, 3).unwrap();
        fs::remove_dir(&d).unwrap();
    }
}
