//! A QEMU Machine Protocol client: JSON lines over a Unix socket.
//!
//! Why not the `qapi` crates: their types are generated from one QEMU version's schema, and
//! the QEMU running a protected guest is whatever the host has (Debian 12 ships 7.2, others
//! 9.x); the handful of commands used here are stable since QEMU 6 and are written as plain
//! JSON, so replies from any of them parse.
//!
//! A connection is opened per operation and closed after it: QEMU serves one client at a
//! time per monitor socket, and holding it would lock the operator out of it.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

/// What went wrong talking to QEMU.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be reached or broke.
    #[error("QMP socket {path}: {source}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// QEMU refused a command.
    #[error("QEMU refused {command}: {class}: {desc}")]
    Refused {
        /// The command.
        command: String,
        /// QEMU's error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// QEMU did not answer in time: its monitor serves one client at a time (another one is
    /// connected), or QEMU itself is stuck.
    #[error(
        "QEMU's monitor at {path} did not answer within {waited:?} (another client holds it, or QEMU is stuck)"
    )]
    Silent {
        /// The socket.
        path: PathBuf,
        /// How long it was waited for.
        waited: Duration,
    },
    /// Something that is not QMP came back.
    #[error("QMP socket {path}: unexpected answer {answer}")]
    Protocol {
        /// The socket.
        path: PathBuf,
        /// What came.
        answer: String,
    },
}

impl QmpError {
    /// Whether QEMU is gone (its socket refuses connections or has vanished).
    pub fn is_gone(&self) -> bool {
        matches!(self, QmpError::Io { source, .. } if matches!(
            source.kind(),
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
        ))
    }

    /// QEMU's error class, if it refused a command.
    pub fn class(&self) -> Option<&str> {
        match self {
            QmpError::Refused { class, .. } => Some(class),
            _ => None,
        }
    }
}

impl From<QmpError> for io::Error {
    fn from(e: QmpError) -> io::Error {
        match e {
            QmpError::Io { source, path } => {
                io::Error::new(source.kind(), format!("QMP socket {}: {source}", path.display()))
            }
            QmpError::Silent { .. } => io::Error::new(io::ErrorKind::TimedOut, e.to_string()),
            other => io::Error::other(other.to_string()),
        }
    }
}

/// A QMP session (capabilities negotiated).
pub struct Qmp {
    path: PathBuf,
    timeout: Duration,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects, reads the greeting and leaves capabilities negotiation mode. `timeout` bounds
    /// every read (a monitor busy with another client does not answer).
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let io = |source| QmpError::Io { path: path.to_path_buf(), source };
        let stream = UnixStream::connect(path).map_err(io)?;
        stream.set_read_timeout(Some(timeout)).map_err(io)?;
        stream.set_write_timeout(Some(timeout)).map_err(io)?;
        let writer = stream.try_clone().map_err(io)?;
        let mut q = Qmp { path: path.to_path_buf(), timeout, reader: BufReader::new(stream), writer };
        // The greeting comes first, but an event may be delivered ahead of it (seen with
        // QEMU 10 when the monitor was still busy with a client that died).
        let greeting = q.read_reply()?;
        if greeting.get("QMP").is_none() {
            return Err(q.protocol(&greeting));
        }
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn protocol(&self, v: &Value) -> QmpError {
        QmpError::Protocol { path: self.path.clone(), answer: v.to_string() }
    }

    fn read(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).map_err(|source| match source.kind() {
            // What a read past its timeout returns.
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                QmpError::Silent { path: self.path.clone(), waited: self.timeout }
            }
            _ => QmpError::Io { path: self.path.clone(), source },
        })?;
        if n == 0 {
            let source = io::Error::new(io::ErrorKind::UnexpectedEof, "QEMU closed the monitor");
            return Err(QmpError::Io { path: self.path.clone(), source });
        }
        serde_json::from_str(&line)
            .map_err(|_| QmpError::Protocol { path: self.path.clone(), answer: line.trim().to_string() })
    }

    /// The next message that is not an event (events are not asked for, and nothing here
    /// waits for one).
    fn read_reply(&mut self) -> Result<Value, QmpError> {
        loop {
            let v = self.read()?;
            if v.get("event").is_none() {
                return Ok(v);
            }
        }
    }

    /// Runs `command` with `arguments`; returns its `return` value. Events that arrive
    /// meanwhile are skipped.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let mut req =
            serde_json::to_vec(&json!({ "execute": command, "arguments": arguments })).expect("JSON encodes");
        req.push(b'\n');
        self.writer.write_all(&req).map_err(|source| QmpError::Io { path: self.path.clone(), source })?;
        let v = self.read_reply()?;
        if let Some(r) = v.get("return") {
            return Ok(r.clone());
        }
        if let Some(e) = v.get("error") {
            let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_string();
            return Err(QmpError::Refused { command: command.into(), class: s("class"), desc: s("desc") });
        }
        Err(self.protocol(&v))
    }
}

/// One disk of a guest, as `query-block` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestDisk {
    /// The name doppel gives it (the drive id, or the device id): letters, digits, `.`, `_`, `-`.
    pub name: String,
    /// The block node the guest's device reads and writes.
    pub node: String,
    /// Its size in bytes.
    pub size: u64,
    /// The image file behind it, as QEMU names it.
    pub file: String,
    /// The image format (`raw`, `qcow2`, ...).
    pub format: String,
}

/// The writable disks of a guest, from a `query-block` answer: drives with a medium, not
/// read-only (CD-ROMs and read-only drives carry nothing to protect).
pub fn guest_disks(query_block: &Value) -> Vec<GuestDisk> {
    let mut out = Vec::new();
    for dev in query_block.as_array().into_iter().flatten() {
        let Some(ins) = dev.get("inserted") else { continue };
        if ins.get("ro").and_then(Value::as_bool).unwrap_or(false) {
            continue;
        }
        let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        let qdev = s(dev, "qdev");
        let device = s(dev, "device");
        let name = if !device.is_empty() { device } else { qdev_name(&qdev) };
        let name = safe_name(&name);
        let node = s(ins, "node-name");
        if name.is_empty() || name.starts_with('.') || node.is_empty() {
            continue;
        }
        let image = ins.get("image").cloned().unwrap_or(Value::Null);
        out.push(GuestDisk {
            name,
            node,
            size: image.get("virtual-size").and_then(Value::as_u64).unwrap_or(0),
            file: s(ins, "file"),
            format: s(ins, "drv"),
        });
    }
    out
}

/// The block node `node` of a `query-named-block-nodes` answer, as a disk named after it.
pub fn named_node(nodes: &Value, node: &str) -> Option<GuestDisk> {
    let n = nodes.as_array()?.iter().find(|n| n.get("node-name").and_then(Value::as_str) == Some(node))?;
    let s = |k: &str| n.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let name = safe_name(node);
    if n.get("ro").and_then(Value::as_bool).unwrap_or(false) || name.starts_with('.') {
        return None;
    }
    Some(GuestDisk {
        name,
        node: node.to_string(),
        size: n.get("image").and_then(|i| i.get("virtual-size")).and_then(Value::as_u64).unwrap_or(0),
        file: s("file"),
        format: s("drv"),
    })
}

fn safe_name(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).collect()
}

/// `/machine/peripheral/virtio-disk0/virtio-backend` → `virtio-disk0`.
fn qdev_name(qdev: &str) -> String {
    let parts: Vec<&str> = qdev.split('/').filter(|p| !p.is_empty()).collect();
    match parts.iter().position(|p| *p == "peripheral") {
        Some(i) if i + 1 < parts.len() => parts[i + 1].to_string(),
        _ => parts.last().map(|s| s.to_string()).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_come_from_query_block_without_cdroms_or_read_only_drives() {
        let answer = json!([
            {"device": "disk0", "qdev": "/machine/peripheral-anon/device[0]/virtio-backend",
             "inserted": {"ro": false, "node-name": "#block123", "drv": "qcow2", "file": "/v/a.qcow2",
                          "image": {"virtual-size": 1073741824u64}}},
            {"device": "", "qdev": "/machine/peripheral/virtio-disk1/virtio-backend",
             "inserted": {"ro": false, "node-name": "libvirt-2-format", "drv": "raw", "file": "/v/b.raw",
                          "image": {"virtual-size": 4096}}},
            {"device": "ide1-cd0", "qdev": "/machine/unattached/device[23]", "removable": true},
            {"device": "ro0", "inserted": {"ro": true, "node-name": "n", "image": {"virtual-size": 1}}}
        ]);
        let disks = guest_disks(&answer);
        assert_eq!(disks.len(), 2, "{disks:?}");
        assert_eq!(disks[0].name, "disk0");
        assert_eq!(disks[0].node, "#block123");
        assert_eq!(disks[0].size, 1 << 30);
        assert_eq!(disks[0].format, "qcow2");
        assert_eq!(disks[1].name, "virtio-disk1");
        assert_eq!(disks[1].file, "/v/b.raw");
    }

    #[test]
    fn a_monitor_that_never_answers_is_named_as_silent_after_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        // Accepted by the kernel (the backlog) but never served, as when QEMU is busy with
        // another client or stuck.
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let started = std::time::Instant::now();
        let Err(e) = Qmp::connect(&path, Duration::from_millis(300)) else {
            panic!("a silent monitor connected")
        };
        assert!(started.elapsed() >= Duration::from_millis(300), "gave up early: {:?}", started.elapsed());
        let text = e.to_string();
        assert!(
            matches!(e, QmpError::Silent { .. }) && text.contains("did not answer within 300ms"),
            "{text}"
        );
        assert!(text.contains("qmp.sock"), "{text}");
        assert_eq!(io::Error::from(e).kind(), io::ErrorKind::TimedOut);
    }

    #[test]
    fn a_hostile_drive_name_cannot_leave_the_disks_directory() {
        let answer = json!([{"device": "a/../../etc/x", "inserted": {"node-name": "n", "image": {"virtual-size": 1}}}]);
        let disks = guest_disks(&answer);
        assert_eq!(disks[0].name, "a_.._.._etc_x");
        // A leading dot is refused outright (names such as ".." would be special).
        let answer = json!([{"device": "..", "inserted": {"node-name": "n", "image": {"virtual-size": 1}}}]);
        assert!(guest_disks(&answer).is_empty());
    }
}
