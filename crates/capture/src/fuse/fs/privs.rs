//! Dropping privileges on writes: set-id bits and file capabilities.
//!
//! A write to a file (or a truncate, or an `O_TRUNC` open) by a process without
//! `CAP_FSETID` drops the file's set-user-id bit, and its set-group-id bit if it is
//! group-executable; any change to it drops its file capabilities (`security.capability`).
//! Left to the kernel, that costs a `GETXATTR` request before *every* write through the mount
//! (FUSE never marks its inodes "no security attributes"), one round trip to the daemon per
//! write, and in write-back mode per `write(2)` of the application. So the mount negotiates
//! `FUSE_HANDLE_KILLPRIV_V2`: the kernel then skips that check and leaves the dropping to the
//! daemon, telling it on each write whether the writer lacks `CAP_FSETID`.
//!
//! The daemon writes as root, so the underlying file system never drops set-id bits for it
//! but does drop file capabilities. Which objects carry privileges at all is looked up once
//! per node (a `fstat` and a `getxattr` on the underlying object) and remembered; only for
//! those does a change pay for dropping them, and for sending the result (mode and extended
//! attributes) as an op. For truncates and `O_TRUNC` opens the kernel's hint does not reach
//! the daemon (the `fuser` interface does not carry it), so the caller's uid stands in for it:
//! a caller other than root is taken to lack `CAP_FSETID`.
//!
//! **Modes of new objects.** The kernel applies the caller's umask to the mode of a `creat`,
//! `mkdir` or `mknod` before the request reaches the daemon. The daemon creates the object
//! itself, and its own umask (a property of the whole process, `022` for most, which the rest
//! of the agent relies on for its own files) is then applied a second time: `0620` asked with
//! umask `0` gave `0600`, a directory made `0777` for others to write in came out `0755` and
//! refused them. Creating as root and then giving the object to its caller (`chown`) also
//! makes the kernel drop the set-id bits of a non-directory, which a caller's own
//! `creat(…, 04755)` keeps. So the daemon compares the mode it got with the mode asked for and
//! sets it where they differ (`names::settled_mode`); no application can reach the new name
//! before that (it is not in the kernel's cache until the reply, and lookups wait for the
//! namespace lock the creation holds).

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::Ordering;

use doppel_proto::{Attrs, Xattr};

use super::{CaptureSink, DoppelFs};
use crate::fuse::nodes::{Node, PRIVS_NONE, PRIVS_SOME, PRIVS_UNKNOWN};

/// The extended attribute holding file capabilities.
const CAPS: &str = "security.capability";

/// Who made a change, as far as dropping privileges is concerned.
#[derive(Debug, Clone, Copy)]
pub(super) struct Caller {
    /// Group id (set-group-id is dropped for callers outside the file's group).
    pub gid: u32,
    /// Process id, to find the caller's supplementary groups (0: unknown).
    pub pid: u32,
}

impl Caller {
    /// The caller of `req`.
    pub(super) fn of(req: &fuser::Request) -> Caller {
        Caller { gid: req.gid(), pid: req.pid() }
    }

    /// Whether the caller is in group `gid`, as the kernel's `in_group_p` decides: its group
    /// or one of its supplementary groups (read from `/proc/PID/status`; a caller that cannot
    /// be looked at counts as outside).
    pub(super) fn in_group(&self, gid: u32) -> bool {
        if self.gid == gid {
            return true;
        }
        if self.pid == 0 {
            return false;
        }
        let Ok(status) = std::fs::read_to_string(format!("/proc/{}/status", self.pid)) else { return false };
        status
            .lines()
            .find_map(|l| l.strip_prefix("Groups:"))
            .is_some_and(|g| g.split_whitespace().any(|x| x.parse::<u32>() == Ok(gid)))
    }

    /// The set-id bits of a non-directory with `st_mode` `mode` and group `gid` that a
    /// `chown` by this caller (lacking `CAP_FSETID`) drops, as the kernel's
    /// `setattr_should_drop_suidgid` decides: set-user-id always, set-group-id if the file is
    /// group-executable or the caller is outside its group.
    pub(super) fn chown_kills(&self, mode: u32, gid: u32) -> u32 {
        let mut kill = mode & libc::S_ISUID;
        if mode & libc::S_ISGID != 0 && (mode & libc::S_IXGRP != 0 || !self.in_group(gid)) {
            kill |= libc::S_ISGID;
        }
        kill
    }

    /// The caller of `req` if it must be taken to lack `CAP_FSETID` (anyone but root).
    pub(super) fn unprivileged(req: &fuser::Request) -> Option<Caller> {
        (req.uid() != 0).then(|| Caller::of(req))
    }
}

impl<S: CaptureSink> DoppelFs<S> {
    /// Whether `node`'s object carries set-id bits or file capabilities (`fd` reaches it).
    /// Always false when the kernel drops privileges itself.
    pub(super) fn has_privs(&self, node: &Node, fd: BorrowedFd<'_>) -> bool {
        if !self.killpriv.load(Ordering::Relaxed) {
            return false;
        }
        match node.privs.load(Ordering::Relaxed) {
            PRIVS_NONE => false,
            PRIVS_SOME => true,
            _ => {
                let setid = rustix::fs::fstat(fd)
                    .map(|st| st.st_mode & (libc::S_ISUID | libc::S_ISGID) != 0)
                    .unwrap_or(true);
                let caps = rustix::fs::fgetxattr(fd, CAPS, &mut [0u8; 0][..]).is_ok();
                let some = setid || caps;
                node.privs.store(if some { PRIVS_SOME } else { PRIVS_NONE }, Ordering::Relaxed);
                some
            }
        }
    }

    /// After a change to an object that carried privileges: drops its set-id bits if `kill`
    /// names a caller without `CAP_FSETID` (set-user-id always; set-group-id if the file is
    /// group-executable or the caller is not in its group, as the kernel does), and returns
    /// the attributes the replica needs now: the mode, and every extended attribute (the
    /// underlying file system removed the capabilities itself).
    pub(super) fn dropped_privs(&self, node: &Node, fd: BorrowedFd<'_>, kill: Option<Caller>) -> Attrs {
        node.privs.store(PRIVS_UNKNOWN, Ordering::Relaxed);
        let mut attrs = Attrs::default();
        let Ok(st) = rustix::fs::fstat(fd) else { return attrs };
        let mut mode = st.st_mode & 0o7777;
        if let Some(caller) = kill {
            let mut drop = libc::S_ISUID;
            if mode & libc::S_IXGRP != 0 || !caller.in_group(st.st_gid) {
                drop |= libc::S_ISGID;
            }
            if mode & drop != 0 {
                mode &= !drop;
                if let Err(e) = rustix::fs::fchmod(fd, rustix::fs::Mode::from_raw_mode(mode)) {
                    tracing::warn!(error = %e, "cannot drop set-id bits after a write");
                    mode = st.st_mode & 0o7777;
                }
            }
        }
        attrs.mode = Some(mode);
        attrs.xattrs = Some(xattrs_of(fd));
        attrs
    }
}

/// Every extended attribute of the object behind `fd`, sorted by name.
pub(super) fn xattrs_of(fd: BorrowedFd<'_>) -> Vec<Xattr> {
    let mut names = vec![0u8; 64 * 1024];
    let Ok(n) = rustix::fs::flistxattr(fd.as_fd(), &mut names[..]) else { return Vec::new() };
    let mut out = Vec::new();
    for name in names[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let mut v = vec![0u8; 64 * 1024];
        if let Ok(len) = rustix::fs::fgetxattr(fd, name, &mut v[..]) {
            v.truncate(len);
            out.push(Xattr { name: name.to_vec(), value: v });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}
