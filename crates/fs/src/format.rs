//! Versions of what doppel keeps on disk.
//!
//! Every directory doppel keeps state in (a job's directory on the source, a replica's state
//! directory and the data directory on the target) carries a `FORMAT` file: one line, the kind
//! of directory and the version of the formats of every file in it (`doppel-job 1`). A new
//! release that changes a format raises the version and converts older directories when it
//! opens them; a directory written by a newer release is refused with both versions named,
//! rather than misread. Directories from before the stamp existed hold version 1: the formats
//! of the first release, which every later release must read.
//!
//! The stamp is per directory rather than per file because the files of one directory change
//! together (the spool and the index of a job describe the same ops) and several of them are
//! raw records with no room for a header.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The name of the stamp file.
pub const STAMP: &str = "FORMAT";

/// One kind of state directory and the versions this build handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Format {
    /// What the directory is (`doppel-job`, `doppel-replica`, `doppel-target`).
    pub kind: &'static str,
    /// The version this build writes.
    pub current: u32,
    /// The oldest version this build can take over.
    pub oldest: u32,
}

/// Why a state directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// Written by a newer release.
    #[error(
        "{dir}: {kind} format {found} was written by a newer doppel; this build reads formats {oldest} to {current}: run the newer release, or restore this directory from before the upgrade"
    )]
    Newer {
        /// The directory.
        dir: PathBuf,
        /// Its kind.
        kind: &'static str,
        /// The version found.
        found: u32,
        /// The oldest version this build reads.
        oldest: u32,
        /// The version this build writes.
        current: u32,
    },
    /// Too old to be converted by this release.
    #[error(
        "{dir}: {kind} format {found} is too old for this doppel (it reads formats {oldest} to {current}): upgrade through an intermediate release"
    )]
    Older {
        /// The directory.
        dir: PathBuf,
        /// Its kind.
        kind: &'static str,
        /// The version found.
        found: u32,
        /// The oldest version this build reads.
        oldest: u32,
        /// The version this build writes.
        current: u32,
    },
    /// The stamp names another kind of directory, or is not a stamp.
    #[error("{path}: {reason}")]
    Bad {
        /// The stamp file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Reading or writing the stamp failed.
    #[error("{path}: {source}")]
    Io {
        /// The stamp file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// The format version of the state directory `dir`: what its stamp says; 1 for a directory
/// that holds files but no stamp (written before stamps existed); `None` for a missing or empty
/// directory (new: nothing to convert).
pub fn found(dir: &Path, kind: &str) -> Result<Option<u32>, FormatError> {
    let path = dir.join(STAMP);
    match fs::read_to_string(&path) {
        Ok(text) => parse(&text, kind).map(Some).map_err(|reason| FormatError::Bad { path, reason }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let io_err = |source| FormatError::Io { path: dir.to_path_buf(), source };
            match fs::read_dir(dir) {
                Ok(mut entries) => Ok(entries.next().transpose().map_err(io_err)?.map(|_| 1)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(io_err(e)),
            }
        }
        Err(source) => Err(FormatError::Io { path, source }),
    }
}

/// Parses a stamp's text (`KIND VERSION`).
fn parse(text: &str, kind: &str) -> Result<u32, String> {
    let mut words = text.split_whitespace();
    let (Some(k), Some(v), None) = (words.next(), words.next(), words.next()) else {
        return Err(format!("not a doppel format stamp: {:?}", text.chars().take(80).collect::<String>()));
    };
    if k != kind {
        return Err(format!("this is a {k} directory, not a {kind} one"));
    }
    v.parse().map_err(|_| format!("bad {kind} format version {v:?}"))
}

/// Writes the stamp durably (temporary file, fsync, rename, directory fsync).
pub fn stamp(dir: &Path, kind: &str, version: u32) -> Result<(), FormatError> {
    let path = dir.join(STAMP);
    let tmp = dir.join(".FORMAT.tmp");
    (|| -> io::Result<()> {
        let mut f = File::create(&tmp)?;
        writeln!(f, "{kind} {version}")?;
        f.sync_all()?;
        fs::rename(&tmp, &path)?;
        File::open(dir)?.sync_all()
    })()
    .map_err(|source| FormatError::Io { path, source })
}

impl Format {
    /// Checks that this build can use `dir` (creating it if missing), converts it from an
    /// older version with `upgrade(found)`, and stamps it with the current version. Returns
    /// the version found (`None`: the directory was new).
    pub fn take_over(
        &self,
        dir: &Path,
        upgrade: impl FnOnce(u32) -> Result<(), FormatError>,
    ) -> Result<Option<u32>, FormatError> {
        let found = found(dir, self.kind)?;
        match found {
            Some(v) if v > self.current => return Err(self.error(dir, v, true)),
            Some(v) if v < self.oldest => return Err(self.error(dir, v, false)),
            Some(v) if v < self.current => {
                upgrade(v)?;
                tracing::info!(dir = %dir.display(), kind = self.kind, from = v, to = self.current, "converted state to the current format");
            }
            _ => {}
        }
        // An unstamped directory of version 1 is stamped even when this build writes 1.
        if found != Some(self.current) || !dir.join(STAMP).exists() {
            fs::create_dir_all(dir).map_err(|source| FormatError::Io { path: dir.to_path_buf(), source })?;
            stamp(dir, self.kind, self.current)?;
        }
        Ok(found)
    }

    fn error(&self, dir: &Path, found: u32, newer: bool) -> FormatError {
        let (dir, kind, oldest, current) = (dir.to_path_buf(), self.kind, self.oldest, self.current);
        if newer {
            FormatError::Newer { dir, kind, found, oldest, current }
        } else {
            FormatError::Older { dir, kind, found, oldest, current }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const F: Format = Format { kind: "doppel-test", current: 3, oldest: 2 };

    #[test]
    fn a_new_directory_is_created_and_stamped() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("new");
        assert_eq!(F.take_over(&dir, |_| panic!("nothing to convert")).unwrap(), None);
        assert_eq!(fs::read_to_string(dir.join(STAMP)).unwrap(), "doppel-test 3\n");
        assert_eq!(F.take_over(&dir, |_| panic!("nothing to convert")).unwrap(), Some(3));
        // An empty existing directory is new too.
        let empty = d.path().join("empty");
        fs::create_dir(&empty).unwrap();
        assert_eq!(found(&empty, F.kind).unwrap(), None);
    }

    #[test]
    fn an_unstamped_directory_with_files_is_version_1() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("state.json"), b"{}").unwrap();
        assert_eq!(found(d.path(), F.kind).unwrap(), Some(1));
        let v1 = Format { kind: "doppel-test", current: 2, oldest: 1 };
        let mut converted = None;
        assert_eq!(
            v1.take_over(d.path(), |v| {
                converted = Some(v);
                Ok(())
            })
            .unwrap(),
            Some(1)
        );
        assert_eq!(converted, Some(1));
        assert_eq!(fs::read_to_string(d.path().join(STAMP)).unwrap(), "doppel-test 2\n");
        // Version 1 taken over by a build that still writes 1: stamped, nothing converted.
        let same = tempfile::tempdir().unwrap();
        fs::write(same.path().join("state.json"), b"{}").unwrap();
        let v1 = Format { kind: "doppel-test", current: 1, oldest: 1 };
        assert_eq!(v1.take_over(same.path(), |_| panic!("nothing to convert")).unwrap(), Some(1));
        assert_eq!(fs::read_to_string(same.path().join(STAMP)).unwrap(), "doppel-test 1\n");
    }

    #[test]
    fn newer_and_too_old_versions_are_refused_naming_both() {
        let d = tempfile::tempdir().unwrap();
        stamp(d.path(), F.kind, 4).unwrap();
        let e = F.take_over(d.path(), |_| Ok(())).unwrap_err().to_string();
        assert!(e.contains("format 4 was written by a newer doppel") && e.contains("formats 2 to 3"), "{e}");
        assert_eq!(fs::read_to_string(d.path().join(STAMP)).unwrap(), "doppel-test 4\n", "left untouched");
        stamp(d.path(), F.kind, 1).unwrap();
        let e = F.take_over(d.path(), |_| Ok(())).unwrap_err().to_string();
        assert!(e.contains("format 1 is too old") && e.contains("formats 2 to 3"), "{e}");
    }

    #[test]
    fn a_failed_conversion_leaves_the_old_stamp() {
        let d = tempfile::tempdir().unwrap();
        stamp(d.path(), F.kind, 2).unwrap();
        let failed = F.take_over(d.path(), |_| {
            Err(FormatError::Bad { path: d.path().into(), reason: "conversion failed".into() })
        });
        assert!(failed.unwrap_err().to_string().contains("conversion failed"));
        assert_eq!(found(d.path(), F.kind).unwrap(), Some(2));
    }

    #[test]
    fn a_stamp_of_another_kind_or_garbage_is_refused() {
        let d = tempfile::tempdir().unwrap();
        stamp(d.path(), "doppel-other", 1).unwrap();
        let e = F.take_over(d.path(), |_| Ok(())).unwrap_err().to_string();
        assert!(e.contains("this is a doppel-other directory, not a doppel-test one"), "{e}");
        fs::write(d.path().join(STAMP), "\u{0}\u{1} garbage here").unwrap();
        assert!(
            F.take_over(d.path(), |_| Ok(())).unwrap_err().to_string().contains("not a doppel format stamp")
        );
        fs::write(d.path().join(STAMP), "doppel-test x").unwrap();
        assert!(
            F.take_over(d.path(), |_| Ok(()))
                .unwrap_err()
                .to_string()
                .contains("bad doppel-test format version")
        );
    }
}
