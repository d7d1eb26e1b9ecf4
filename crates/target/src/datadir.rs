//! The target's data directory, readable by root only.
//!
//! Replicas hold other machines' files with their owners, modes and set-id bits; whoever can
//! reach into them can read every source's data and run its set-uid programs. So the data
//! directory and the `replicas` and `state` directories in it are mode 0700, and a data
//! directory found looser (made by hand, or by an older version) is tightened at start.

use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The mode of the target's own directories.
pub const PRIVATE: u32 = 0o700;

/// A directory of the data directory that could not be made private.
#[derive(Debug, thiserror::Error)]
#[error("cannot make {} private (mode 0700): {source}", path.display())]
pub struct DataDirError {
    /// The directory.
    pub path: PathBuf,
    /// Why.
    #[source]
    pub source: io::Error,
}

/// A directory whose mode was tightened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tightened {
    /// The directory.
    pub path: PathBuf,
    /// Its mode before (permission bits).
    pub was: u32,
}

/// Creates `dir` (and missing parents) mode 0700, or tightens it to 0700 if it exists with
/// more permissions; says so if it tightened it.
pub fn private_dir(dir: &Path) -> Result<Option<Tightened>, DataDirError> {
    let err = |source| DataDirError { path: dir.to_path_buf(), source };
    std::fs::DirBuilder::new().recursive(true).mode(PRIVATE).create(dir).map_err(err)?;
    let was = std::fs::metadata(dir).map_err(err)?.permissions().mode() & 0o7777;
    if was & !PRIVATE == 0 {
        return Ok(None);
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(PRIVATE)).map_err(err)?;
    Ok(Some(Tightened { path: dir.to_path_buf(), was }))
}

/// Makes `data`, `data/replicas` and `data/state` private (see [`private_dir`]) and logs each
/// directory that had to be tightened.
pub fn secure_data_dir(data: &Path) -> Result<Vec<Tightened>, DataDirError> {
    let mut tightened = Vec::new();
    for d in [data.to_path_buf(), data.join("replicas"), data.join("state")] {
        if let Some(t) = private_dir(&d)? {
            tracing::warn!(path = %t.path.display(), was = format!("{:#o}", t.was), "tightened to 0700: replicas must be reachable by root only");
            tightened.push(t);
        }
    }
    Ok(tightened)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn created_private_and_loose_ones_tightened() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("a/data");
        assert_eq!(secure_data_dir(&data).unwrap(), vec![]);
        for d in [&data, &data.join("replicas"), &data.join("state")] {
            assert_eq!(mode(d), 0o700, "{}", d.display());
        }
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(data.join("state"), std::fs::Permissions::from_mode(0o710)).unwrap();
        let t = secure_data_dir(&data).unwrap();
        assert_eq!(
            t,
            vec![
                Tightened { path: data.clone(), was: 0o755 },
                Tightened { path: data.join("state"), was: 0o710 },
            ]
        );
        assert_eq!((mode(&data), mode(&data.join("state"))), (0o700, 0o700));
        // Stricter than 0700 is left alone.
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o500)).unwrap();
        assert_eq!(private_dir(&data).unwrap(), None);
        assert_eq!(mode(&data), 0o500);
    }
}
