//! What a `vm` job remembers of its guest's disks, and the source side of its failback.
//!
//! A failback replaces a tree with the replica, comparing block by block so that only what
//! differs travels. A vm job's tree is QEMU's read-only views of the guest's disks, which do
//! not exist while the guest is down (as it is during a failback: it runs on the DR side).
//! So the failback stages each disk as a raw file in the job's tree, converted locally from
//! the image recorded at the last attach (`qemu-img convert`: a local read, nothing on the
//! link), lets the ordinary failback compare and patch those files, and after the handover
//! writes them back into the images in their own format. Only changed blocks cross the link;
//! the local cost is one read and one write of each disk.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use doppel_capture::vm::{GuestDisk, Qmp, image_name};
use serde::{Deserialize, Serialize};

use crate::error::{AgentError, io_at};

/// One disk of the guest, as recorded at attach (`HOME/jobs/JOB/vm.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRecord {
    /// doppel's name for it (`NAME.raw` in the replica).
    pub name: String,
    /// The image file on this host.
    pub file: PathBuf,
    /// Its format (`raw`, `qcow2`).
    pub format: String,
    /// Its size in bytes.
    pub size: u64,
}

const RECORD: &str = "vm.json";

/// Records the guest's disks in the job directory `dir`.
pub fn record(dir: &Path, disks: &[GuestDisk]) -> Result<(), AgentError> {
    let rec: Vec<DiskRecord> = disks
        .iter()
        .map(|d| DiskRecord {
            name: d.name.clone(),
            file: d.file.clone().into(),
            format: d.format.clone(),
            size: d.size,
        })
        .collect();
    let path = dir.join(RECORD);
    let tmp = dir.join(format!("{RECORD}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec_pretty(&rec).expect("JSON encodes")).map_err(io_at(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io_at(&path))
}

/// The disks recorded in the job directory `dir`, if any.
pub fn load(dir: &Path) -> Result<Option<Vec<DiskRecord>>, AgentError> {
    let path = dir.join(RECORD);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
            AgentError::Config(format!("{}: unreadable record of the guest's disks: {e}", path.display()))
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_at(&path)(e)),
    }
}

/// The guest's disks staged as raw files in the job's tree, for a failback.
#[derive(Debug)]
pub struct Staged {
    root: PathBuf,
    disks: Vec<DiskRecord>,
}

/// Stages the disks of the vm job `name` (guest behind `qmp`) for its failback: refuses while
/// the guest runs here (a failback rewrites its disks), then converts each recorded image to
/// `HOME/vm/JOB/NAME.raw`.
pub fn stage(home: &Path, name: &str, qmp: &Path) -> Result<Staged, AgentError> {
    if Qmp::connect(qmp, Duration::from_secs(2)).is_ok() {
        return Err(AgentError::Config(format!(
            "the guest of job {name} is running here (its QMP socket {} answers): shut it down before a failback, which rewrites its disks",
            qmp.display()
        )));
    }
    let dir = crate::agent::job_dir(home, name);
    let disks = load(&dir)?.ok_or_else(|| {
        AgentError::Config(format!(
            "job {name}: no record of the guest's disks ({}): a vm job is failed back after it was protected here at least once",
            dir.join(RECORD).display()
        ))
    })?;
    let root = home.join("vm").join(name);
    std::fs::create_dir_all(&root).map_err(io_at(&root))?;
    for e in std::fs::read_dir(&root).map_err(io_at(&root))? {
        let p = e.map_err(io_at(&root))?.path();
        detach_mount(&p);
        std::fs::remove_file(&p).map_err(io_at(&p))?;
    }
    for d in &disks {
        if !d.file.is_absolute() || d.file.to_string_lossy().starts_with("json:") {
            return Err(AgentError::Config(format!(
                "disk {}: QEMU named its image {:?}, not a file this failback can write; restore it by hand from the replica's {}",
                d.name,
                d.file,
                image_name(&d.name)
            )));
        }
        let staged = root.join(image_name(&d.name));
        if d.file.exists() {
            let part = root.join(format!("{}.part", image_name(&d.name)));
            qemu_img(&["convert", "-f", &d.format, "-O", "raw"], &d.file, &part)?;
            std::fs::rename(&part, &staged).map_err(io_at(&staged))?;
        } else {
            // A new host: everything will come over the link.
            let f = std::fs::File::create(&staged).map_err(io_at(&staged))?;
            f.set_len(d.size).map_err(io_at(&staged))?;
        }
        tracing::info!(disk = %d.name, image = %d.file.display(), "failback: disk staged as a raw file");
    }
    Ok(Staged { root, disks })
}

impl Staged {
    /// Where the staged disks are (the failback's tree).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// After the handover: writes each staged disk back into its image, then removes it.
    pub fn write_back(self) -> Result<(), AgentError> {
        for d in &self.disks {
            let staged = self.root.join(image_name(&d.name));
            let mut args = vec!["convert", "-f", "raw", "-O", d.format.as_str()];
            if d.file.exists() {
                args.push("-n"); // into the existing image (keeps its options)
            }
            qemu_img(&args, &staged, &d.file)?;
            std::fs::remove_file(&staged).map_err(io_at(&staged))?;
            tracing::info!(disk = %d.name, image = %d.file.display(), "failback: disk written back into its image");
        }
        Ok(())
    }

    /// The failback did not replace the tree (nothing was failed over): drops the staged
    /// copies, leaving the images as they were.
    pub fn discard(self) -> Result<(), AgentError> {
        for d in &self.disks {
            let staged = self.root.join(image_name(&d.name));
            std::fs::remove_file(&staged).map_err(io_at(&staged))?;
        }
        Ok(())
    }
}

fn qemu_img(args: &[&str], from: &Path, to: &Path) -> Result<(), AgentError> {
    let out = Command::new("qemu-img")
        .args(args)
        .arg(from)
        .arg(to)
        .output()
        .map_err(|e| AgentError::Io { path: "qemu-img".into(), source: e })?;
    if !out.status.success() {
        return Err(AgentError::Config(format!(
            "qemu-img {} {} {}: {}",
            args.join(" "),
            from.display(),
            to.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Detaches a view a dead QEMU left mounted on `path`.
fn detach_mount(path: &Path) {
    while rustix::mount::unmount(path, rustix::mount::UnmountFlags::DETACH).is_ok() {}
}

/// Waits until the guest behind `qmp` answers, or `stop` is cancelled (returns false).
pub async fn wait_for_guest(qmp: &Path, stop: &tokio_util::sync::CancellationToken) -> bool {
    let mut told = false;
    loop {
        let q = qmp.to_path_buf();
        let up = tokio::task::spawn_blocking(move || Qmp::connect(&q, Duration::from_secs(2)).is_ok())
            .await
            .unwrap_or(false);
        if up {
            return true;
        }
        if !told {
            tracing::info!(qmp = %qmp.display(), "waiting for the guest: protection resumes once its QMP socket answers");
            told = true;
        }
        tokio::select! {
            _ = stop.cancelled() => return false,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
