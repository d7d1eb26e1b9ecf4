//! Extended attributes, read and written without following symlinks.
//!
//! Reading uses the `l*xattr` calls on source paths. Writing on the target goes through an
//! `O_PATH` handle from [`crate::Beneath`] and its `/proc/self/fd` name, so the attribute lands
//! on exactly the inode that was resolved beneath the replica root.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;

use doppel_proto::Xattr;

/// Lists all extended attributes of `path` (not following a final symlink), sorted by name.
/// File systems without xattr support give an empty list.
pub fn read_all(path: &Path) -> io::Result<Vec<Xattr>> {
    let mut names = vec![0u8; 1024];
    let n = loop {
        match rustix::fs::llistxattr(path, &mut names[..]) {
            Ok(n) => break n,
            Err(rustix::io::Errno::RANGE) => {
                let want = rustix::fs::llistxattr_query(path).map_err(io::Error::from)?;
                names.resize(want.max(names.len() * 2), 0);
            }
            Err(rustix::io::Errno::NOTSUP) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        }
    };
    let mut out = Vec::new();
    for name in names[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let mut value = vec![0u8; 256];
        let len = loop {
            match rustix::fs::lgetxattr(path, name, &mut value[..]) {
                Ok(len) => break Some(len),
                Err(rustix::io::Errno::RANGE) => {
                    let want = rustix::fs::lgetxattr_query(path, name).map_err(io::Error::from)?;
                    value.resize(want.max(value.len() * 2), 0);
                }
                Err(rustix::io::Errno::NODATA) => break None,
                Err(e) => return Err(e.into()),
            }
        };
        if let Some(len) = len {
            value.truncate(len);
            out.push(Xattr { name: name.to_vec(), value });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Makes the attributes of the inode behind `fd` (an `O_PATH` handle) exactly `wanted`:
/// sets every listed one and removes the others.
pub fn replace_all(fd: BorrowedFd<'_>, wanted: &[Xattr]) -> io::Result<()> {
    let proc = format!("/proc/self/fd/{}", fd.as_raw_fd());
    let proc = Path::new(&proc);
    let current = read_all_following(proc)?;
    for x in &current {
        if !wanted.iter().any(|w| w.name == x.name) {
            rustix::fs::removexattr(proc, &x.name[..]).map_err(io::Error::from)?;
        }
    }
    for w in wanted {
        if current.iter().any(|c| c.name == w.name && c.value == w.value) {
            continue;
        }
        rustix::fs::setxattr(proc, &w.name[..], &w.value, rustix::fs::XattrFlags::empty())
            .map_err(io::Error::from)?;
    }
    Ok(())
}

/// Lists the attributes of the inode behind `fd` (an `O_PATH` handle to a file or directory).
pub fn read_fd(fd: BorrowedFd<'_>) -> io::Result<Vec<Xattr>> {
    let proc = format!("/proc/self/fd/{}", fd.as_raw_fd());
    let mut x = read_all_following(Path::new(&proc))?;
    x.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(x)
}

fn read_all_following(path: &Path) -> io::Result<Vec<Xattr>> {
    let mut names = vec![0u8; 64 * 1024];
    let n = match rustix::fs::listxattr(path, &mut names[..]) {
        Ok(n) => n,
        Err(rustix::io::Errno::NOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut out = Vec::new();
    for name in names[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let mut value = vec![0u8; 64 * 1024];
        if let Ok(len) = rustix::fs::getxattr(path, name, &mut value[..]) {
            value.truncate(len);
            out.push(Xattr { name: name.to_vec(), value });
        }
    }
    Ok(out)
}
