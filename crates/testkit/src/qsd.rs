//! A `qemu-storage-daemon` holding a disk image as QEMU holds a guest's: block node `disk0`,
//! a writable NBD export through which `qemu-io` writes as the guest would, and a QMP socket
//! for doppel's vm capture. Much faster to start than a guest, and it exercises the same
//! block layer, mirror job and exports.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

/// Whether `qemu-storage-daemon`, `qemu-io` and `qemu-img` run here, and FUSE works (the
/// disks' raw views are FUSE exports); a missing one skips the test, or fails it under
/// `DOPPEL_TEST_STRICT=1`.
pub fn available() -> bool {
    let ok = ["qemu-storage-daemon", "qemu-io", "qemu-img"].iter().all(|t| {
        Command::new(t)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    crate::require(
        ok,
        "the vm capture tests need qemu-storage-daemon, qemu-io and qemu-img (Debian's qemu-system-x86 / qemu-utils)",
    ) && crate::require_fuse()
}

/// A running daemon. Killed on drop.
pub struct StorageDaemon {
    dir: PathBuf,
    /// Image and format of each disk: node `disk0`, `disk1`...
    images: Vec<(PathBuf, String)>,
    child: Option<Child>,
}

impl StorageDaemon {
    /// Starts a daemon in `dir` on `image` (`raw` or `qcow2`), with `discard=unmap`.
    pub fn start(dir: &Path, image: &Path, format: &str) -> StorageDaemon {
        StorageDaemon::start_many(dir, &[(image, format)])
    }

    /// A daemon holding several disks: `images[i]` is node `disk{i}`, written through
    /// [`StorageDaemon::io_on`]`(i, ..)`.
    pub fn start_many(dir: &Path, images: &[(&Path, &str)]) -> StorageDaemon {
        let images = images.iter().map(|(p, f)| (p.to_path_buf(), f.to_string())).collect();
        let mut d = StorageDaemon { dir: dir.to_path_buf(), images, child: None };
        d.restart();
        d
    }

    /// Starts it again (after [`StorageDaemon::kill`]), as a host restarting the guest would.
    pub fn restart(&mut self) {
        let _ = std::fs::remove_file(self.qmp());
        let _ = std::fs::remove_file(self.guest_socket());
        let nbd = format!("addr.type=unix,addr.path={}", self.guest_socket().display());
        let qmp = format!("socket,path={},server=on,wait=off,id=m", self.qmp().display());
        let mut cmd = Command::new("qemu-storage-daemon");
        cmd.args(["--nbd-server", &nbd]); // before the exports that need it
        for (i, (image, format)) in self.images.iter().enumerate() {
            let file = format!("driver=file,node-name=file{i},filename={},discard=unmap", image.display());
            let fmt = format!("driver={format},node-name=disk{i},file=file{i},discard=unmap");
            let export = format!("type=nbd,id={0},node-name=disk{i},name={0},writable=on", export_name(i));
            cmd.args(["--blockdev", &file, "--blockdev", &fmt, "--export", &export]);
        }
        let child = cmd
            .args(["--chardev", &qmp, "--monitor", "chardev=m,mode=control"])
            .stdout(Stdio::null())
            .spawn()
            .expect("qemu-storage-daemon starts");
        self.child = Some(child);
        crate::wait_until(Duration::from_secs(30), "qemu-storage-daemon's sockets", || {
            if let Some(Ok(Some(st))) = self.child.as_mut().map(Child::try_wait) {
                panic!("qemu-storage-daemon exited: {st}");
            }
            (self.qmp().exists() && self.guest_socket().exists())
                .then_some(())
                .ok_or_else(|| "not yet".to_string())
        });
    }

    /// The QMP socket (what `doppel protect --vm` takes).
    pub fn qmp(&self) -> PathBuf {
        self.dir.join("qsd-qmp.sock")
    }

    fn guest_socket(&self) -> PathBuf {
        self.dir.join("qsd-guest.sock")
    }

    /// A guest write: runs `qemu-io -c CMD` (e.g. `write -P 0x55 1M 64k`) on the disk.
    pub fn io(&self, cmd: &str) -> Output {
        self.io_on(0, cmd)
    }

    /// [`StorageDaemon::io`] on disk `i`.
    pub fn io_on(&self, i: usize, cmd: &str) -> Output {
        let url = format!("nbd+unix:///{}?socket={}", export_name(i), self.guest_socket().display());
        Command::new("qemu-io").args(["-f", "raw", "-c", cmd, &url]).output().expect("qemu-io runs")
    }

    /// [`StorageDaemon::io`], asserting that it succeeded.
    pub fn write(&self, cmd: &str) {
        let out = self.io(cmd);
        assert!(out.status.success(), "qemu-io {cmd}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// The disk's bytes as the guest sees them (through the daemon's export).
    pub fn disk_bytes(&self) -> Vec<u8> {
        let url = format!("nbd+unix:///guest?socket={}", self.guest_socket().display());
        let out = self.dir.join("qsd-read.raw");
        let st = Command::new("qemu-img")
            .args(["convert", "-U", "-f", "raw", "-O", "raw", &url])
            .arg(&out)
            .status()
            .expect("qemu-img runs");
        assert!(st.success(), "qemu-img convert of the guest's disk");
        let bytes = std::fs::read(&out).unwrap();
        let _ = std::fs::remove_file(&out);
        bytes
    }

    /// SIGKILLs the daemon (the host's QEMU dies).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The NBD export of disk `i` for the "guest".
fn export_name(i: usize) -> String {
    if i == 0 { "guest".into() } else { format!("guest{i}") }
}

impl Drop for StorageDaemon {
    fn drop(&mut self) {
        self.kill();
        detach_mounts_beneath(&self.dir);
    }
}

/// Lazily detaches every mount beneath `dir`: the daemon's FUSE exports (the disks' raw views)
/// outlive a killed daemon as dead mounts, which keep a test's temporary directory from going
/// (a test that failed midway never stopped doppel's attach cleanly).
fn detach_mounts_beneath(dir: &Path) {
    let mut beneath: Vec<PathBuf> = crate::mount_points()
        .unwrap_or_default()
        .into_iter()
        .filter(|m| m.starts_with(dir) && m != dir)
        .collect();
    // Deepest first, and each as often as it is stacked.
    beneath.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    for m in beneath {
        let _ = rustix::mount::unmount(&m, rustix::mount::UnmountFlags::DETACH);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mounted_at(path: &Path) -> bool {
        crate::mount_points().unwrap().iter().any(|m| m == path)
    }

    #[test]
    fn mounts_beneath_a_directory_are_detached_and_those_elsewhere_are_not() {
        if !crate::require(rustix::process::geteuid().is_root(), "mounting a tmpfs needs root") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (inner, deeper, outside) =
            (dir.path().join("a"), dir.path().join("a/b"), tempfile::tempdir().unwrap());
        std::fs::create_dir(&inner).unwrap();
        let tmpfs = |at: &Path| {
            rustix::mount::mount("none", at, "tmpfs", rustix::mount::MountFlags::empty(), None).unwrap()
        };
        tmpfs(&inner);
        std::fs::create_dir(&deeper).unwrap();
        tmpfs(&deeper);
        tmpfs(outside.path());
        detach_mounts_beneath(dir.path());
        assert!(!mounted_at(&inner) && !mounted_at(&deeper), "a mount beneath the directory is left");
        assert!(mounted_at(outside.path()), "a mount elsewhere was detached");
        rustix::mount::unmount(outside.path(), rustix::mount::UnmountFlags::DETACH).unwrap();
    }
}
