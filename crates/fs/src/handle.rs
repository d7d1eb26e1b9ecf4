//! File handles: a name for an inode that outlives its path.
//!
//! `name_to_handle_at(2)` gives an opaque handle for an inode (its number and generation, on
//! ext4, xfs, btrfs and tmpfs); `open_by_handle_at(2)` opens that inode again later, wherever
//! it has been renamed to and whether or not any name is left, as long as it exists. A
//! replica's history keys its records by handle, so a point-in-time view finds a file's old
//! bytes however it was renamed since. Opening needs `CAP_DAC_READ_SEARCH` (the target runs as
//! root); a file system without handles (`EOPNOTSUPP`) has no history.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use rustix::fs::OFlags;

/// Longest handle the kernel gives (`MAX_HANDLE_SZ`).
const MAX_HANDLE: usize = 128;

/// An inode's handle: its type and opaque bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct Handle {
    /// The handle type (`handle_type`).
    pub kind: i32,
    /// The opaque bytes (`f_handle`).
    pub bytes: Vec<u8>,
}

/// `struct file_handle` with room for the largest handle.
#[repr(C)]
struct RawHandle {
    handle_bytes: u32,
    handle_type: i32,
    f_handle: [u8; MAX_HANDLE],
}

impl Handle {
    /// The handle of `name` in `dir` (never following a final symlink); an empty `name` means
    /// `dir` itself.
    pub fn of(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<Handle> {
        let name = std::ffi::CString::new(name).map_err(|_| io::ErrorKind::InvalidInput)?;
        let mut raw =
            RawHandle { handle_bytes: MAX_HANDLE as u32, handle_type: 0, f_handle: [0; MAX_HANDLE] };
        let mut mount_id: libc::c_int = 0;
        let flags = if name.is_empty() { libc::AT_EMPTY_PATH } else { 0 };
        // SAFETY: `raw` is a `struct file_handle` whose `handle_bytes` says how much room its
        // `f_handle` has; `name` is NUL-terminated; both outlive the call.
        let rc = unsafe {
            libc::name_to_handle_at(
                dir.as_raw_fd(),
                name.as_ptr(),
                (&raw mut raw).cast::<libc::file_handle>(),
                &mut mount_id,
                flags,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let n = (raw.handle_bytes as usize).min(MAX_HANDLE);
        Ok(Handle { kind: raw.handle_type, bytes: raw.f_handle[..n].to_vec() })
    }

    /// Opens the inode on the file system of `mount` with `flags` (`O_CLOEXEC` added). A
    /// removed inode fails with `ESTALE`.
    pub fn open(&self, mount: BorrowedFd<'_>, flags: OFlags) -> io::Result<OwnedFd> {
        if self.bytes.len() > MAX_HANDLE {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        let mut raw = RawHandle {
            handle_bytes: self.bytes.len() as u32,
            handle_type: self.kind,
            f_handle: [0; MAX_HANDLE],
        };
        raw.f_handle[..self.bytes.len()].copy_from_slice(&self.bytes);
        let flags = (flags | OFlags::CLOEXEC).bits() as libc::c_int;
        // SAFETY: `raw` is a valid `struct file_handle` of `handle_bytes` bytes, alive for
        // the call.
        let fd = unsafe {
            libc::open_by_handle_at(mount.as_raw_fd(), (&raw mut raw).cast::<libc::file_handle>(), flags)
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just returned this descriptor, owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::fs::{Mode, OFlags};
    use std::os::fd::AsFd;

    #[test]
    fn a_handle_opens_its_file_after_a_rename_and_after_the_last_name_is_gone_only_while_open() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a"), b"hello").unwrap();
        let dir = rustix::fs::open(d.path(), OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap();
        let h = Handle::of(dir.as_fd(), b"a").unwrap();
        assert_eq!(h, Handle::of(dir.as_fd(), b"a").unwrap());
        std::fs::rename(d.path().join("a"), d.path().join("b")).unwrap();
        let fd = h.open(dir.as_fd(), OFlags::RDONLY).unwrap();
        let mut buf = [0u8; 5];
        rustix::io::pread(&fd, &mut buf, 0).unwrap();
        assert_eq!(&buf, b"hello");
        let root = Handle::of(dir.as_fd(), b"").unwrap();
        assert_ne!(root, h);
        drop(fd);
        std::fs::remove_file(d.path().join("b")).unwrap();
        let gone = h.open(dir.as_fd(), OFlags::RDONLY).unwrap_err();
        assert_eq!(gone.raw_os_error(), Some(libc::ESTALE), "{gone}");
    }
}
