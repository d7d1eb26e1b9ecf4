//! Paths inside a job tree or a replica.
//!
//! A source must never be able to name anything outside its replica, so the target only ever
//! resolves a [`RelPath`], and the only way to get one from network bytes is
//! [`RelPath::try_from`] on a [`WirePath`], which rejects every form of escape that can be
//! expressed in a name (`..`, absolute paths, empty or `.` components, NUL bytes, over-long
//! names). Escapes through symlinks are the resolver's job (see `doppel-fs`), because they depend
//! on what is on disk, not on the bytes of the path.

use std::ffi::OsStr;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::echo::Echoed;

/// Longest path accepted, in bytes (Linux `PATH_MAX` less the terminating NUL).
pub const MAX_PATH_LEN: usize = 4095;
/// Longest single name accepted, in bytes (Linux `NAME_MAX`).
pub const MAX_NAME_LEN: usize = 255;

/// Why a path was refused. Each variant names the rule, so the log line says exactly what a
/// hostile or buggy peer tried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Paths on the wire are relative to the replica root.
    #[error("absolute path {0:?} refused: paths must be relative to the replica root")]
    Absolute(Echoed),
    /// `..` could climb out of the replica.
    #[error("path {0:?} refused: it contains a `..` component")]
    ParentComponent(Echoed),
    /// `.` and empty components (`a//b`, trailing `/`) are not normalized forms.
    #[error("path {0:?} refused: it contains an empty or `.` component")]
    EmptyComponent(Echoed),
    /// NUL would truncate the name at the system-call boundary.
    #[error("path {0:?} refused: it contains a NUL byte")]
    Nul(Echoed),
    /// Longer than the kernel accepts.
    #[error("path {0:?} refused: longer than {MAX_PATH_LEN} bytes or a name longer than {MAX_NAME_LEN}")]
    TooLong(Echoed),
    /// A name (one component) was expected but the text has a `/` in it.
    #[error("name {0:?} refused: it contains a `/`")]
    Slash(Echoed),
    /// The empty path names the root itself, which this operation cannot take.
    #[error("the replica root itself cannot be the subject of this operation")]
    Root,
}

/// A path exactly as it arrived on the wire: raw bytes, not yet checked.
///
/// Kept as a separate type so that code which resolves paths on disk cannot accidentally be
/// handed unchecked input: it takes [`RelPath`] only.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct WirePath(#[serde(with = "serde_bytes")] pub Vec<u8>);

impl fmt::Debug for WirePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(&self.0))
    }
}

impl WirePath {
    /// The bytes as text for messages, lossily.
    pub fn display(&self) -> String {
        String::from_utf8_lossy(&self.0).into_owned()
    }
}

/// A normalized path relative to a tree root: components separated by single `/`, none empty,
/// `.` or `..`, no NUL, within kernel limits. The empty path is the root itself.
///
/// Ordering is bytewise, which makes a parent sort before its children and gives every side of
/// a comparison the same deterministic walk order.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct RelPath(Vec<u8>);

impl RelPath {
    /// The root of the tree.
    pub fn root() -> Self {
        RelPath(Vec::new())
    }

    /// Checks `bytes` against every rule and wraps them.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self, PathError> {
        let bytes = bytes.into();
        validate(&bytes)?;
        Ok(RelPath(bytes))
    }

    /// Builds from a path relative to a root; used on the source side, where paths come from
    /// walking the local tree.
    pub fn from_path(path: &Path) -> Result<Self, PathError> {
        Self::new(path.as_os_str().as_bytes().to_vec())
    }

    /// Whether this is the root (the empty path).
    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// As a `Path`, for joining onto a local root.
    pub fn as_path(&self) -> &Path {
        Path::new(OsStr::from_bytes(&self.0))
    }

    /// Appends one name. Fails if `name` is not a valid single component.
    pub fn join(&self, name: &[u8]) -> Result<RelPath, PathError> {
        check_name(name)?;
        let mut v = Vec::with_capacity(self.0.len() + 1 + name.len());
        v.extend_from_slice(&self.0);
        if !v.is_empty() {
            v.push(b'/');
        }
        v.extend_from_slice(name);
        if v.len() > MAX_PATH_LEN {
            return Err(PathError::TooLong(lossy(&v)));
        }
        Ok(RelPath(v))
    }

    /// The parent path and the last name; `None` for the root.
    pub fn split_last(&self) -> Option<(RelPath, &[u8])> {
        if self.0.is_empty() {
            return None;
        }
        match self.0.iter().rposition(|&b| b == b'/') {
            Some(i) => Some((RelPath(self.0[..i].to_vec()), &self.0[i + 1..])),
            None => Some((RelPath::root(), &self.0[..])),
        }
    }

    /// The last name (empty for the root).
    pub fn name(&self) -> &[u8] {
        self.split_last().map(|(_, n)| n).unwrap_or(&[])
    }

    /// Whether `self` is `other` or lies beneath it.
    pub fn starts_with(&self, other: &RelPath) -> bool {
        if other.0.is_empty() {
            return true;
        }
        self.0.starts_with(&other.0) && (self.0.len() == other.0.len() || self.0[other.0.len()] == b'/')
    }

    /// Replaces the prefix `from` by `to` (for directory renames); `None` if not beneath `from`.
    pub fn rebase(&self, from: &RelPath, to: &RelPath) -> Option<RelPath> {
        if !self.starts_with(from) {
            return None;
        }
        let rest = &self.0[from.0.len()..];
        let rest = rest.strip_prefix(b"/").unwrap_or(rest);
        if rest.is_empty() {
            return Some(to.clone());
        }
        let mut v = to.0.clone();
        if !v.is_empty() {
            v.push(b'/');
        }
        v.extend_from_slice(rest);
        Some(RelPath(v))
    }

    /// Number of components (0 for the root).
    pub fn depth(&self) -> usize {
        if self.0.is_empty() { 0 } else { self.0.iter().filter(|&&b| b == b'/').count() + 1 }
    }

    /// Iterates over the components.
    pub fn components(&self) -> impl Iterator<Item = &[u8]> {
        self.0.split(|&b| b == b'/').filter(|c| !c.is_empty())
    }

    /// The wire form.
    pub fn to_wire(&self) -> WirePath {
        WirePath(self.0.clone())
    }
}

impl TryFrom<&WirePath> for RelPath {
    type Error = PathError;
    fn try_from(w: &WirePath) -> Result<Self, PathError> {
        RelPath::new(w.0.clone())
    }
}

impl From<&RelPath> for WirePath {
    fn from(p: &RelPath) -> Self {
        p.to_wire()
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(&self.0))
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() { f.write_str(".") } else { f.write_str(&String::from_utf8_lossy(&self.0)) }
    }
}

/// The bytes of a refused path, bounded: the error is logged and sent back to the peer.
fn lossy(b: &[u8]) -> Echoed {
    Echoed::lossy(b)
}

/// Checks one name (a single path component).
pub fn check_name(name: &[u8]) -> Result<(), PathError> {
    if name.is_empty() || name == b"." {
        return Err(PathError::EmptyComponent(lossy(name)));
    }
    if name == b".." {
        return Err(PathError::ParentComponent(lossy(name)));
    }
    if name.contains(&0) {
        return Err(PathError::Nul(lossy(name)));
    }
    if name.contains(&b'/') {
        return Err(PathError::Slash(lossy(name)));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(PathError::TooLong(lossy(name)));
    }
    Ok(())
}

fn validate(bytes: &[u8]) -> Result<(), PathError> {
    if bytes.is_empty() {
        return Ok(());
    }
    if bytes.contains(&0) {
        return Err(PathError::Nul(lossy(bytes)));
    }
    if bytes[0] == b'/' {
        return Err(PathError::Absolute(lossy(bytes)));
    }
    if bytes.len() > MAX_PATH_LEN {
        return Err(PathError::TooLong(lossy(bytes)));
    }
    for c in bytes.split(|&b| b == b'/') {
        match c {
            b"" | b"." => return Err(PathError::EmptyComponent(lossy(bytes))),
            b".." => return Err(PathError::ParentComponent(lossy(bytes))),
            c if c.len() > MAX_NAME_LEN => return Err(PathError::TooLong(lossy(bytes))),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_normal_paths() {
        for p in ["", "a", "a/b/c", "dir.with.dots/..hidden", "x/...", "ünïcode/名"] {
            RelPath::new(p.as_bytes().to_vec()).unwrap();
        }
    }

    #[test]
    fn refuses_every_escape() {
        type Check = fn(&PathError) -> bool;
        let cases: &[(&[u8], Check)] = &[
            (b"/etc/passwd", |e| matches!(e, PathError::Absolute(_))),
            (b"..", |e| matches!(e, PathError::ParentComponent(_))),
            (b"a/../../b", |e| matches!(e, PathError::ParentComponent(_))),
            (b"a/..", |e| matches!(e, PathError::ParentComponent(_))),
            (b"a//b", |e| matches!(e, PathError::EmptyComponent(_))),
            (b"a/./b", |e| matches!(e, PathError::EmptyComponent(_))),
            (b"a/", |e| matches!(e, PathError::EmptyComponent(_))),
            (b"a\0b", |e| matches!(e, PathError::Nul(_))),
        ];
        for (bytes, ok) in cases {
            let err = RelPath::new(bytes.to_vec()).unwrap_err();
            assert!(ok(&err), "{:?} gave {err}", String::from_utf8_lossy(bytes));
        }
        let long = vec![b'a'; 256];
        assert!(matches!(RelPath::new(long).unwrap_err(), PathError::TooLong(_)));
        assert!(matches!(RelPath::root().join(b"a/b").unwrap_err(), PathError::Slash(_)));
        assert!(matches!(RelPath::root().join(b"..").unwrap_err(), PathError::ParentComponent(_)));
    }

    #[test]
    fn structure_helpers() {
        let p = RelPath::new("a/b/c").unwrap();
        let (parent, name) = p.split_last().unwrap();
        assert_eq!(parent, RelPath::new("a/b").unwrap());
        assert_eq!(name, b"c");
        assert_eq!(p.depth(), 3);
        assert!(p.starts_with(&RelPath::new("a/b").unwrap()));
        assert!(!p.starts_with(&RelPath::new("a/bc").unwrap()));
        assert!(!RelPath::new("a/bc").unwrap().starts_with(&RelPath::new("a/b").unwrap()));
        let moved = p.rebase(&RelPath::new("a").unwrap(), &RelPath::new("z/y").unwrap()).unwrap();
        assert_eq!(moved, RelPath::new("z/y/b/c").unwrap());
        assert_eq!(
            RelPath::new("a").unwrap().rebase(&RelPath::new("a").unwrap(), &RelPath::root()),
            Some(RelPath::root())
        );
        assert_eq!(RelPath::new("a").unwrap().split_last().unwrap().0, RelPath::root());
    }
}
