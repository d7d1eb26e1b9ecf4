//! The `vm` capture: a QEMU guest's disks, captured at the hypervisor.
//!
//! For each writable disk of the guest, doppel asks QEMU (over QMP) for two things:
//!
//! - a **read-only raw view** of the disk, a FUSE export of QEMU's own block node mounted on
//!   `DISKS/NAME.raw` (the job root): the guest's bytes as the guest sees them, whatever the
//!   image format. The mirror, verify and the comparison after a restart read it like any
//!   file, so the replica is the raw image `NAME.raw`.
//! - a **mirror job in active, write-blocking mode** (`blockdev-mirror`, `sync: none`,
//!   `copy-mode: write-blocking`) towards an NBD export that doppel serves on a Unix socket:
//!   every guest write goes to the image and to doppel before the guest sees it complete, and
//!   doppel sequences it as a `Write` op of `NAME.raw` in the job's spool (one ordered stream
//!   per VM, whatever the number of disks). Discards become hole punches.
//!
//! The mirror is never completed (that would pivot the guest onto doppel's export): stopping
//! protection cancels it, which leaves the guest on its own image, and removes the NBD node
//! and the views. A doppel that dies closes the NBD connection: QEMU fails the job and the
//! guest goes on unprotected, without an error; the next start compares the disks with the
//! replica (only differing blocks travel) and attaches again.
//!
//! **Sync mode** cannot wait on guest flushes: QEMU's mirror filter flushes only the source
//! image, never the mirror target (`bdrv_mirror_top_flush`), so doppel never sees them.
//! Instead every write is acknowledged to the guest once the target has it durable (as DRBD's
//! protocol C does); each burst of writes is closed by one `Fsync` op so that the target
//! commits it at once. After the sync timeout the job degrades to async (writes acknowledged
//! once in the local spool), as in the fuse capture.

pub mod nbd;
pub mod qmp;

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use doppel_proto::{Op, RelPath};
use serde_json::{Value, json};

use crate::fuse::{CaptureSink, Dirty, Locks};
pub use qmp::{GuestDisk, Qmp, QmpError};

/// How to reach and protect a guest.
#[derive(Debug, Clone)]
pub struct VmOptions {
    /// The guest's QMP socket.
    pub qmp: PathBuf,
    /// The disks to protect, by drive name or block node name; empty: every writable disk
    /// of the guest's devices. (A `qemu-storage-daemon` has no devices: name its nodes.)
    pub disks: Vec<String>,
    /// Where the raw views of the disks are mounted (the job root).
    pub disks_dir: PathBuf,
    /// Where doppel's NBD server listens.
    pub socket: PathBuf,
    /// Prefix of the ids doppel gives QEMU objects (unique per job on the host).
    pub tag: String,
    /// Every write waits for the target (see the module documentation).
    pub sync: bool,
    /// How long a QMP answer may take.
    pub qmp_timeout: Duration,
}

/// One attached disk.
#[derive(Debug, Clone)]
struct Attached {
    disk: GuestDisk,
    export_id: String,
    nbd_node: String,
    job_id: String,
    key: (u64, u64),
}

/// A guest under protection. Dropping it detaches (best effort); [`VmCapture::detach`] says
/// whether that worked.
pub struct VmCapture {
    opts: VmOptions,
    disks: Vec<Attached>,
    locks: Arc<Locks>,
    stop: Arc<AtomicBool>,
    lost: Arc<parking_lot::Mutex<Option<String>>>,
    server: Option<JoinHandle<()>>,
    monitor: Option<JoinHandle<()>>,
    detached: bool,
}

/// The file name of a disk's raw view and replica image.
pub fn image_name(disk: &str) -> String {
    format!("{disk}.raw")
}

impl VmCapture {
    /// Attaches to the guest behind `opts.qmp`: raw views, NBD server, mirror jobs. Objects
    /// left by a previous doppel that died are replaced.
    pub fn attach<S: CaptureSink>(opts: VmOptions, sink: Arc<S>) -> io::Result<VmCapture> {
        let mut q = Qmp::connect(&opts.qmp, opts.qmp_timeout)?;
        let disks = select_disks(&mut q, &opts.disks)?;
        if disks.is_empty() {
            return Err(io::Error::other(format!(
                "the guest behind {} has no writable disk to protect",
                opts.qmp.display()
            )));
        }
        std::fs::create_dir_all(&opts.disks_dir)?;
        remove_stale_views(&opts.disks_dir, &disks)?;
        let mut attached = Vec::new();
        for d in &disks {
            attached.push(view(&mut q, &opts, d)?);
        }
        let locks = Arc::new(Locks::default());
        let stop = Arc::new(AtomicBool::new(false));
        let server = serve(&opts, &attached, sink, locks.clone(), stop.clone())?;
        let mut cap = VmCapture {
            opts,
            disks: attached,
            locks,
            stop,
            lost: Arc::default(),
            server: Some(server),
            monitor: None,
            detached: false,
        };
        let started = cap.disks.iter().try_for_each(|a| {
            mirror(&mut q, &cap.opts, a)?;
            tracing::info!(disk = %a.disk.name, size = a.disk.size, format = %a.disk.format, file = %a.disk.file,
                "guest disk attached: every write is mirrored to doppel");
            Ok::<_, io::Error>(())
        });
        if let Err(e) = started {
            // Undone on this connection: QEMU serves one monitor client at a time, so a
            // second one (the drop's) would wait for this one until it timed out.
            if let Err(d) = cap.detach_inner(Some(q)) {
                tracing::warn!(error = %d, "could not undo a partial attach to the guest");
            }
            return Err(e);
        }
        drop(q);
        cap.monitor = Some(cap.spawn_monitor()?);
        Ok(cap)
    }

    /// The locks the mirror takes while it reads the views.
    pub fn locks(&self) -> Arc<Locks> {
        self.locks.clone()
    }

    /// The attached disks.
    pub fn disks(&self) -> Vec<GuestDisk> {
        self.disks.iter().map(|a| a.disk.clone()).collect()
    }

    /// The (device, inode) of every live raw view: a file of the job root with another
    /// identity is not a view (its export is gone) and must not be read as the disk.
    pub fn views(&self) -> HashSet<(u64, u64)> {
        self.disks.iter().map(|a| a.key).collect()
    }

    /// Why capture stopped behind doppel's back (the guest is gone, or QEMU ended a mirror
    /// job): writes are no longer captured, so the job must stop and compare at its next start.
    pub fn lost(&self) -> Option<String> {
        self.lost.lock().clone()
    }

    fn spawn_monitor(&self) -> io::Result<JoinHandle<()>> {
        let (opts, stop, lost) = (self.opts.clone(), self.stop.clone(), self.lost.clone());
        let jobs: Vec<String> = self.disks.iter().map(|a| a.job_id.clone()).collect();
        std::thread::Builder::new().name("vm-monitor".into()).spawn(move || {
            let mut next = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                if Instant::now() < next {
                    continue;
                }
                next = Instant::now() + Duration::from_secs(1);
                if let Some(why) = check_jobs(&opts, &jobs) {
                    if !stop.load(Ordering::Relaxed) {
                        tracing::error!(reason = %why, "VM capture lost: guest writes are no longer captured");
                        *lost.lock() = Some(why);
                    }
                    return;
                }
            }
        })
    }

    /// Cancels the mirror jobs (without pivoting), removes the NBD nodes and the views, and
    /// stops the NBD server.
    pub fn detach(mut self) -> io::Result<()> {
        self.detach_inner(None)
    }

    /// Detaches over `q`, or over a connection of its own.
    fn detach_inner(&mut self, q: Option<Qmp>) -> io::Result<()> {
        if self.detached {
            return Ok(());
        }
        self.detached = true;
        self.stop.store(true, Ordering::Relaxed);
        if let Some(m) = self.monitor.take() {
            let _ = m.join();
        }
        let q = match q {
            Some(q) => Ok(q),
            None => Qmp::connect(&self.opts.qmp, self.opts.qmp_timeout),
        };
        let result = match q {
            Ok(mut q) => {
                let mut first_err = None;
                for a in &self.disks {
                    if let Err(e) = remove(&mut q, a) {
                        first_err.get_or_insert(e);
                    }
                }
                first_err.map_or(Ok(()), Err)
            }
            // The guest is gone: nothing of ours is left in it.
            Err(e) if e.is_gone() => Ok(()),
            Err(e) => Err(e.into()),
        };
        let _ = std::os::unix::net::UnixStream::connect(&self.opts.socket); // wakes the accept loop
        if let Some(s) = self.server.take() {
            let _ = s.join();
        }
        let _ = std::fs::remove_file(&self.opts.socket);
        result
    }
}

impl Drop for VmCapture {
    fn drop(&mut self) {
        if let Err(e) = self.detach_inner(None) {
            tracing::warn!(error = %e, "could not detach from the guest cleanly");
        }
    }
}

/// The disks to protect: `wanted` (drive or node names) or every writable drive.
fn select_disks(q: &mut Qmp, wanted: &[String]) -> io::Result<Vec<GuestDisk>> {
    let drives = qmp::guest_disks(&q.execute("query-block", json!({}))?);
    if wanted.is_empty() {
        return Ok(drives);
    }
    let nodes = q.execute("query-named-block-nodes", json!({ "flat": true }))?;
    let mut out = Vec::new();
    for w in wanted {
        if let Some(d) = drives.iter().find(|d| &d.name == w || &d.node == w) {
            out.push(d.clone());
        } else if let Some(d) = qmp::named_node(&nodes, w) {
            out.push(d);
        } else {
            let have: Vec<&str> = drives.iter().map(|d| d.name.as_str()).collect();
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("the guest has no disk or block node named {w:?} (its drives: {})", have.join(", ")),
            ));
        }
    }
    Ok(out)
}

/// Removes files of the disks directory that are not the view of a current disk (a disk
/// removed from the guest, or left by a crash): read as disks they would be empty images.
fn remove_stale_views(dir: &Path, disks: &[GuestDisk]) -> io::Result<()> {
    let keep: HashSet<String> = disks.iter().map(|d| image_name(&d.name)).collect();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if !keep.contains(&name) {
            tracing::info!(file = %e.path().display(), "removing a view of a disk the guest no longer has");
            detach_mount(&e.path());
            std::fs::remove_file(e.path())?;
        }
    }
    Ok(())
}

fn ids(opts: &VmOptions, d: &GuestDisk) -> (String, String, String) {
    let base = format!("{}-{}", opts.tag, d.name);
    (format!("{base}-view"), format!("{base}-nbd"), base)
}

/// Mounts the raw view of disk `d` (reusing one a dead doppel left behind).
fn view(q: &mut Qmp, opts: &VmOptions, d: &GuestDisk) -> io::Result<Attached> {
    let (export_id, nbd_node, job_id) = ids(opts, d);
    let mountpoint = opts.disks_dir.join(image_name(&d.name));
    let exports = q.execute("query-block-exports", json!({}))?;
    let exists = exports
        .as_array()
        .into_iter()
        .flatten()
        .any(|e| e.get("id").and_then(Value::as_str) == Some(&export_id));
    if !exists {
        // A view of an earlier QEMU process (the guest was restarted): its mount is dead.
        detach_mount(&mountpoint);
    }
    if exists && !is_mounted_view(&opts.disks_dir, &mountpoint) {
        q.execute("block-export-del", json!({ "id": export_id, "mode": "hard" }))?;
        wait_export_gone(q, &export_id)?;
    }
    if !exists || !is_mounted_view(&opts.disks_dir, &mountpoint) {
        std::fs::OpenOptions::new().write(true).create(true).truncate(false).mode(0o600).open(&mountpoint)?;
        q.execute(
            "block-export-add",
            json!({
                "type": "fuse", "id": export_id, "node-name": d.node,
                "mountpoint": mountpoint, "writable": false,
            }),
        )?;
    }
    let md = std::fs::metadata(&mountpoint)?;
    if md.dev() == std::fs::metadata(&opts.disks_dir)?.dev() || md.len() != d.size {
        return Err(io::Error::other(format!(
            "QEMU's raw view of disk {} did not appear at {}",
            d.name,
            mountpoint.display()
        )));
    }
    Ok(Attached { disk: d.clone(), export_id, nbd_node, job_id, key: (md.dev(), md.ino()) })
}

/// Detaches whatever is mounted on `path` (nothing, usually).
fn detach_mount(path: &Path) {
    while rustix::mount::unmount(path, rustix::mount::UnmountFlags::DETACH).is_ok() {}
}

fn is_mounted_view(dir: &Path, file: &Path) -> bool {
    match (std::fs::metadata(dir), std::fs::metadata(file)) {
        (Ok(d), Ok(f)) => d.dev() != f.dev(),
        _ => false,
    }
}

fn wait_export_gone(q: &mut Qmp, id: &str) -> io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let exports = q.execute("query-block-exports", json!({}))?;
        if !exports.as_array().into_iter().flatten().any(|e| e.get("id").and_then(Value::as_str) == Some(id))
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(io::Error::other(format!("QEMU did not remove the export {id}")));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts the active mirror of `a` towards doppel's NBD export, after removing what a dead
/// doppel left (its failed job, its NBD node).
fn mirror(q: &mut Qmp, opts: &VmOptions, a: &Attached) -> io::Result<()> {
    cancel_job(q, &a.job_id, true)?;
    let nodes = q.execute("query-named-block-nodes", json!({ "flat": true }))?;
    if nodes
        .as_array()
        .into_iter()
        .flatten()
        .any(|n| n.get("node-name").and_then(Value::as_str) == Some(&a.nbd_node))
    {
        q.execute("blockdev-del", json!({ "node-name": a.nbd_node }))?;
    }
    q.execute(
        "blockdev-add",
        json!({
            // Without `discard: unmap` QEMU drops the guest's discards before they reach us.
            "driver": "nbd", "node-name": a.nbd_node, "discard": "unmap",
            "server": { "type": "unix", "path": opts.socket },
            "export": a.disk.name,
        }),
    )?;
    q.execute(
        "blockdev-mirror",
        json!({
            "job-id": a.job_id, "device": a.disk.node, "target": a.nbd_node,
            "sync": "none", "copy-mode": "write-blocking",
            "on-source-error": "report", "on-target-error": "report",
            "auto-dismiss": true,
        }),
    )?;
    Ok(())
}

/// Cancels job `id` if it exists (never completing it: that would pivot the guest) and waits
/// until it is gone.
fn cancel_job(q: &mut Qmp, id: &str, force: bool) -> io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut asked = false;
    loop {
        let jobs = q.execute("query-block-jobs", json!({}))?;
        let Some(job) = jobs
            .as_array()
            .into_iter()
            .flatten()
            .find(|j| j.get("device").and_then(Value::as_str) == Some(id))
        else {
            return Ok(());
        };
        let status = job.get("status").and_then(Value::as_str).unwrap_or("");
        // A job that fails (a dead doppel's) ends and dismisses itself on its own: it can
        // vanish between the query and the command, which then finds no such job.
        let ending = |e: &QmpError| matches!(e.class(), Some("GenericError" | "DeviceNotActive"));
        if status == "concluded" {
            match q.execute("job-dismiss", json!({ "id": id })) {
                Err(e) if !ending(&e) => return Err(e.into()),
                _ => {}
            }
        } else if !asked {
            match q.execute("block-job-cancel", json!({ "device": id, "force": force })) {
                Ok(_) => asked = true,
                Err(e) if ending(&e) => asked = true,
                Err(e) => return Err(e.into()),
            }
        }
        if Instant::now() > deadline {
            return Err(io::Error::other(format!("QEMU did not end the mirror job {id}")));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn remove(q: &mut Qmp, a: &Attached) -> io::Result<()> {
    cancel_job(q, &a.job_id, false)?;
    if let Err(e) = q.execute("blockdev-del", json!({ "node-name": a.nbd_node })) {
        tracing::warn!(node = %a.nbd_node, error = %e, "could not remove doppel's NBD node from the guest");
    }
    q.execute("block-export-del", json!({ "id": a.export_id, "mode": "hard" }))?;
    wait_export_gone(q, &a.export_id)
}

/// Why the mirror jobs are not all running, if they are not.
fn check_jobs(opts: &VmOptions, jobs: &[String]) -> Option<String> {
    let mut q = match Qmp::connect(&opts.qmp, opts.qmp_timeout) {
        Ok(q) => q,
        Err(e) if e.is_gone() => return Some(format!("the guest is gone ({e})")),
        Err(_) => return None, // busy with another client: ask again later
    };
    let list = match q.execute("query-block-jobs", json!({})) {
        Ok(l) => l,
        Err(e) => return Some(format!("QEMU does not answer query-block-jobs: {e}")),
    };
    for id in jobs {
        let job = list
            .as_array()
            .into_iter()
            .flatten()
            .find(|j| j.get("device").and_then(Value::as_str) == Some(id));
        match job.and_then(|j| j.get("status")).and_then(Value::as_str) {
            Some("running" | "ready" | "created" | "standby") => {}
            Some(other) => return Some(format!("QEMU's mirror job {id} is {other}")),
            None => {
                return Some(format!(
                    "QEMU ended the mirror job {id} (a failed write to doppel, or an operator)"
                ));
            }
        }
    }
    None
}

/// One disk as the NBD server serves it to QEMU's mirror.
struct DiskExport<S: CaptureSink> {
    path: RelPath,
    key: (u64, u64),
    view: File,
    size: u64,
    sink: Arc<S>,
    locks: Arc<Locks>,
    sync: bool,
    unsynced: AtomicBool,
}

impl<S: CaptureSink> DiskExport<S> {
    /// Sequences `op`, which changes `len` bytes at `offset`, under the locks the mirror
    /// takes, so a block it reads is never sequenced after a newer write of it.
    fn change(&self, offset: u64, len: u64, op: Op, fua: bool) -> io::Result<Option<u64>> {
        let seq = {
            let _names = self.locks.shared();
            let _file = self.locks.lock_file(self.key);
            let prepared = self.sink.prepare(&[Dirty::Extent { path: &self.path, offset, len }])?;
            self.sink.commit(prepared, vec![op])?
        };
        if !self.sync || seq == 0 {
            return Ok(None);
        }
        if fua {
            return self.barrier();
        }
        self.unsynced.store(true, Ordering::Relaxed);
        Ok(Some(seq))
    }

    /// Sequences a durability barrier (the target commits at once on it).
    fn barrier(&self) -> io::Result<Option<u64>> {
        self.unsynced.store(false, Ordering::Relaxed);
        let prepared = self.sink.prepare(&[])?;
        let seq = self.sink.commit(prepared, vec![Op::Fsync { path: Some(self.path.to_wire()) }])?;
        Ok((seq > 0).then_some(seq))
    }
}

impl<S: CaptureSink> nbd::Export for DiskExport<S> {
    fn size(&self) -> u64 {
        self.size
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.view.read_exact_at(buf, offset)
    }

    fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> io::Result<Option<u64>> {
        let len = data.len() as u64;
        self.change(offset, len, Op::Write { path: self.path.to_wire(), offset, data }, fua)
    }

    fn zero(&self, offset: u64, len: u64, punch: bool, fua: bool) -> io::Result<Option<u64>> {
        let how = if punch { libc::FALLOC_FL_PUNCH_HOLE } else { libc::FALLOC_FL_ZERO_RANGE };
        let mode = (how | libc::FALLOC_FL_KEEP_SIZE) as u32;
        self.change(offset, len, Op::Fallocate { path: self.path.to_wire(), mode, offset, len }, fua)
    }

    fn trim(&self, offset: u64, len: u64) -> io::Result<Option<u64>> {
        self.zero(offset, len, true, false)
    }

    fn flush(&self) -> io::Result<Option<u64>> {
        if self.sync { self.barrier() } else { Ok(None) }
    }

    fn idle(&self) {
        if self.sync
            && self.unsynced.load(Ordering::Relaxed)
            && let Err(e) = self.barrier()
        {
            tracing::warn!(error = %e, "could not sequence a durability barrier");
        }
    }

    fn wait(&self, ticket: u64) {
        self.sink.barrier(ticket);
    }
}

/// Starts the NBD server: one export per attached disk, one thread per connection.
fn serve<S: CaptureSink>(
    opts: &VmOptions,
    disks: &[Attached],
    sink: Arc<S>,
    locks: Arc<Locks>,
    stop: Arc<AtomicBool>,
) -> io::Result<JoinHandle<()>> {
    let _ = std::fs::remove_file(&opts.socket);
    let listener = UnixListener::bind(&opts.socket)?;
    std::fs::set_permissions(&opts.socket, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let mut exports: Vec<(String, Arc<dyn nbd::Export>)> = Vec::new();
    for a in disks {
        let view = std::fs::File::open(opts.disks_dir.join(image_name(&a.disk.name)))?;
        let path = RelPath::new(image_name(&a.disk.name).into_bytes()).map_err(io::Error::other)?;
        let export = DiskExport {
            path,
            key: a.key,
            view,
            size: a.disk.size,
            sink: sink.clone(),
            locks: locks.clone(),
            sync: opts.sync,
            unsynced: AtomicBool::new(false),
        };
        exports.push((a.disk.name.clone(), Arc::new(export)));
    }
    let exports = Arc::new(exports);
    std::thread::Builder::new().name("nbd-accept".into()).spawn(move || {
        for conn in listener.incoming() {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let Ok(conn) = conn else { continue };
            let exports = exports.clone();
            let spawned = std::thread::Builder::new().name("nbd-disk".into()).spawn(move || {
                let names: Vec<String> = exports.iter().map(|(n, _)| n.clone()).collect();
                let lookup = |name: &str| exports.iter().find(|(n, _)| n == name).map(|(_, e)| e.clone());
                if let Err(e) = nbd::serve(conn, &names, &lookup) {
                    tracing::warn!(error = %e, "NBD connection from QEMU ended with an error");
                }
            });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot serve an NBD connection");
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};

    /// A monitor that answers each command with the next of `replies`, and records the
    /// commands it was sent.
    fn scripted_monitor(dir: &Path, replies: Vec<Value>) -> (PathBuf, JoinHandle<Vec<String>>) {
        let path = dir.join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            writeln!(conn, "{}", json!({"QMP": {"version": {}, "capabilities": []}})).unwrap();
            let mut lines = BufReader::new(conn.try_clone().unwrap()).lines();
            let mut seen = Vec::new();
            for reply in std::iter::once(json!({"return": {}})).chain(replies) {
                let Some(Ok(line)) = lines.next() else { break };
                let v: Value = serde_json::from_str(&line).unwrap();
                seen.push(v["execute"].as_str().unwrap().to_string());
                writeln!(conn, "{reply}").unwrap();
            }
            seen
        });
        (path, server)
    }

    #[test]
    fn a_dead_doppels_job_that_vanishes_before_its_cancel_counts_as_ended() {
        let dir = tempfile::tempdir().unwrap();
        let job = json!({"device": "doppel-vm1-disk0", "status": "running"});
        let gone = |class: &str| json!({"error": {"class": class, "desc": "Block job 'doppel-vm1-disk0' not found"}});
        let replies = vec![
            json!({"return": [job]}),
            gone("DeviceNotActive"),
            json!({"return": [{"device": "doppel-vm1-disk0", "status": "concluded"}]}),
            gone("GenericError"),
            json!({"return": []}),
        ];
        let (path, server) = scripted_monitor(dir.path(), replies);
        let mut q = Qmp::connect(&path, Duration::from_secs(10)).unwrap();
        cancel_job(&mut q, "doppel-vm1-disk0", true).expect("a job that ended by itself is not an error");
        drop(q);
        let seen = server.join().unwrap();
        let want = [
            "qmp_capabilities",
            "query-block-jobs",
            "block-job-cancel",
            "query-block-jobs",
            "job-dismiss",
            "query-block-jobs",
        ];
        assert_eq!(seen, want);
    }

    #[test]
    fn a_refused_cancel_of_a_live_job_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let replies = vec![
            json!({"return": [{"device": "j", "status": "running"}]}),
            json!({"error": {"class": "CommandNotFound", "desc": "The command block-job-cancel has not been found"}}),
        ];
        let (path, _server) = scripted_monitor(dir.path(), replies);
        let mut q = Qmp::connect(&path, Duration::from_secs(10)).unwrap();
        let e = cancel_job(&mut q, "j", true).unwrap_err();
        assert!(
            e.to_string().contains("block-job-cancel") && e.to_string().contains("CommandNotFound"),
            "{e}"
        );
    }
}
