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
    image: PathBuf,
    format: String,
    child: Option<Child>,
}

impl StorageDaemon {
    /// Starts a daemon in `dir` on `image` (`raw` or `qcow2`), with `discard=unmap`.
    pub fn start(dir: &Path, image: &Path, format: &str) -> StorageDaemon {
        let mut d = StorageDaemon {
            dir: dir.to_path_buf(),
            image: image.to_path_buf(),
            format: format.into(),
            child: None,
        };
        d.restart();
        d
    }

    /// Starts it again (after [`StorageDaemon::kill`]), as a host restarting the guest would.
    pub fn restart(&mut self) {
        let _ = std::fs::remove_file(self.qmp());
        let _ = std::fs::remove_file(self.guest_socket());
        let file = format!("driver=file,node-name=file0,filename={},discard=unmap", self.image.display());
        let fmt = format!("driver={},node-name=disk0,file=file0,discard=unmap", self.format);
        let nbd = format!("addr.type=unix,addr.path={}", self.guest_socket().display());
        let qmp = format!("socket,path={},server=on,wait=off,id=m", self.qmp().display());
        let child = Command::new("qemu-storage-daemon")
            .args(["--blockdev", &file, "--blockdev", &fmt, "--nbd-server", &nbd])
            .args(["--export", "type=nbd,id=guest,node-name=disk0,name=guest,writable=on"])
            .args(["--chardev", &qmp, "--monitor", "chardev=m,mode=control"])
            .stdout(Stdio::null())
            .spawn()
            .expect("qemu-storage-daemon starts");
        self.child = Some(child);
        crate::wait_until(Duration::from_secs(30), "qemu-storage-daemon's sockets", || {
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
        let url = format!("nbd+unix:///guest?socket={}", self.guest_socket().display());
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

impl Drop for StorageDaemon {
    fn drop(&mut self) {
        self.kill();
    }
}
