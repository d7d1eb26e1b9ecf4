//! # Real virtual machines for tests
//!
//! A small, reproducible guest under QEMU: Debian's cloud kernel and a busybox initramfs whose
//! `/init` runs a workload on the guest's one disk (`/dev/vda`, ext4 without a partition
//! table) and reports each durable step on the first serial port, one line per event. It
//! works with KVM where it is usable (see [`VmKit::accel`]) and with QEMU's emulator (TCG)
//! everywhere else: a boot to the first durable record takes 2-5 s under TCG.
//!
//! ```ignore
//! use doppel_testkit::vm::{Boot, Format, Mode, VmKit};
//! let Some(kit) = doppel_testkit::require_ok(VmKit::get()) else { return }; // skip or fail
//! kit.make_disk(&img, Format::Raw, 64 << 20)?;
//! let mut guest = kit.boot(Boot::new(&img, Format::Raw, Mode::Records))?;
//! guest.wait_acks(50, Duration::from_secs(120))?;   // 50 records durable on the image
//! guest.kill();                                      // SIGKILL, a pulled plug
//! let report = kit.check(&img, Format::Raw)?;        // boots a check on a snapshot
//! assert!(report.clean && report.last_record >= guest.acked());
//! ```
//!
//! ## What the kit prepares (once per machine, cached)
//! The cache directory is `$DOPPEL_VMKIT_DIR`, or `/var/tmp/doppel-vmkit`.
//! - The kernel: the image package `linux-image-cloud-amd64` depends on, fetched with
//!   `apt-get download` and unpacked with `dpkg-deb -x` (never installed: its hooks would run
//!   on the test machine), kept as `linux-image-VERSION/` holding `vmlinuz`, the modules the
//!   guest needs (`virtio`, `virtio_ring`, `virtio_pci` and its dependencies, `virtio_blk`, and
//!   `ext4` with its own if the kernel has it as a module) and `modules.load`, their load
//!   order from `modules.dep` (made with `busybox depmod`). Built in a temporary directory and
//!   renamed into place, so concurrent test processes never see half of one.
//! - The initramfs: `initrd-HASH.cpio` (newc, uncompressed), holding busybox (static), the
//!   modules, `/init`, and `sqlite3` and `e2fsck` from this machine with the shared libraries
//!   and dynamic loader they need. Named by the hash of its content.
//!
//! Needed on the machine: `qemu-system-x86_64` (Debian `qemu-system-x86`), `qemu-img`
//! (`qemu-utils`, for qcow2 disks), `busybox` (`busybox-static`), `mkfs.ext4` and `e2fsck`
//! (`e2fsprogs`), `sqlite3`, `ldd` (`libc-bin`), and, to prepare the kernel the first time,
//! `apt-get` with package lists and `dpkg-deb`. What is missing makes [`VmKit::get`] fail
//! with a reason; tests hand it to [`crate::require_ok`] (skipped on a developer's machine,
//! failed under `DOPPEL_TEST_STRICT=1`).
//!
//! ## The guest
//! The mode is one kernel command line token, `doppel.mode=MODE` (see [`Mode`]), so a failover
//! script that word-splits its QEMU arguments can pass it. `/init` mounts `/proc`, `/sys` and
//! `/dev`, loads the modules in order, and writes everything to `/dev/ttyS0` itself (no
//! `console=` argument needed). Its lines (a `\r` may end each):
//! - `DOPPEL-BOOT mode=MODE`: `/init` started.
//! - `ACK n`: record `n` was appended to `/records` on the disk and `fdatasync` returned.
//!   Records are the lines `R%014d` (`R00000000000001`, ...), numbered from 1, each appended
//!   once; a workload starting on a disk that has records cuts off what follows the unbroken
//!   run of them (a crash's torn tail) and goes on after the last one.
//! - `COMMIT n`: the row with id `n` was inserted into table `t` of the SQLite database
//!   `/app.db` (WAL, `synchronous=FULL`) and the commit returned.
//! - `RECORDS n later bad` (and `RECORDS-BAD` lines when `bad` is not 0), `SQLITE rows max
//!   integrity`, `FSCK clean` or `FSCK dirty RC` (after `FSCK-OUT` lines with e2fsck's
//!   output), then `CHECK-DONE`: the check (see [`CheckReport`]).
//! - `DOPPEL-FAIL what`: something failed; the guest powers off.
//!
//! All QEMU processes the kit starts are killed when their [`Guest`] is dropped.
//!
//! ## Driving the hypervisor, and VMs the kit did not start
//! - [`Boot::qmp_socket`] gives QEMU a QMP socket; the disk is `-drive
//!   file=...,format=...,if=virtio,cache=...,id=disk0` (its block backend is [`DISK_ID`]);
//!   [`Qmp`] is a minimal client (raw JSON lines in and out); [`Boot::extra_args`] adds
//!   anything else. [`VmKit::command_args`] shows the whole command line.
//! - [`VmKit::qemu_args`] gives the words a failover script needs to boot the same guest
//!   (memory, kernel, initramfs, `-append doppel.mode=MODE`, `-serial file:PATH`) without
//!   accelerator or disk; [`Console::at`] then reads that VM's console.
//! - [`VmKit::check`] checks an image without changing it (a QEMU snapshot), e.g. a replica
//!   at a cut.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::skip::which;

/// The environment variable naming the cache directory.
pub const DIR_VAR: &str = "DOPPEL_VMKIT_DIR";
/// The cache directory when [`DIR_VAR`] is not set.
pub const DEFAULT_DIR: &str = "/var/tmp/doppel-vmkit";
/// The environment variable that chooses the accelerator: `kvm`, `tcg`, or unset/`auto`
/// (see [`VmKit::accel`]).
pub const ACCEL_VAR: &str = "DOPPEL_VMKIT_ACCEL";
/// The meta-package whose kernel image the kit boots.
pub const KERNEL_PACKAGE: &str = "linux-image-cloud-amd64";
/// Memory of a guest, MiB.
pub const MEMORY_MIB: u32 = 256;
/// The QEMU `id` of the guest's disk in [`VmKit::boot`] (its block backend in QMP).
pub const DISK_ID: &str = "disk0";

/// The guest's `/init`, the same for every mode (`@RECORDS_AWK@` is [`RECORDS_AWK`]).
const INIT: &str = r#"#!/bin/sh
# /init of the doppel VM kit's guest (crates/testkit/src/vm.rs). Every line it prints goes
# straight to the first serial port.
PATH=/bin:/sbin:/usr/bin:/usr/sbin
export PATH
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/null >/dev/ttyS0 2>&1
fail() {
    echo "DOPPEL-FAIL $*"
    poweroff -f
    sleep 3600
}
mode=
for w in $(cat /proc/cmdline); do
    case $w in doppel.mode=*) mode=${w#doppel.mode=} ;; esac
done
echo "DOPPEL-BOOT mode=$mode"
while read -r m; do
    insmod "/modules/$m.ko" || fail "insmod $m"
done </modules.load
i=0
while [ ! -b /dev/vda ]; do
    i=$((i + 1))
    [ "$i" -lt 2000 ] || fail "no /dev/vda"
    usleep 10000
done

# "N LATER BAD" about /records: it starts with records 1..N; LATER records follow after a run
# of zero bytes (appends that were not synced, whose size reached the disk before their data:
# a file system may leave that after a crash; only unacknowledged records can be there);
# BAD lines are neither (garbage, a record out of order): the first few go to /tmp/bad.
records() {
    rm -f /tmp/bad
    if [ -f /mnt/records ]; then
        tr '\000' '@' </mnt/records | awk -v out=/tmp/bad '@RECORDS_AWK@'
    else
        echo "0 0 0"
    fi
}

check() {
    # Mounting replays the journal, as any boot does.
    mount -t ext4 /dev/vda /mnt || fail "mount /dev/vda"
    set -- $(records)
    echo "RECORDS $1 $2 $3"
    [ ! -f /tmp/bad ] || sed 's/^/RECORDS-BAD /' /tmp/bad | cat -v
    if [ -f /mnt/app.db ]; then
        rows=$(sqlite3 /mnt/app.db "SELECT count(*) || ' ' || coalesce(max(id), 0) FROM t;" 2>&1 | tr '\n' ' ')
        integrity=$(sqlite3 /mnt/app.db "PRAGMA integrity_check;" 2>&1 | tr '\n' ' ')
        echo "SQLITE $rows $integrity"
    else
        echo "SQLITE 0 0 none"
    fi
    umount /mnt || fail "umount /mnt"
    if e2fsck -fn /dev/vda >/tmp/fsck 2>&1; then
        echo "FSCK clean"
    else
        rc=$?
        sed 's/^/FSCK-OUT /' /tmp/fsck
        echo "FSCK dirty $rc"
    fi
    echo "CHECK-DONE"
}

# Appends records after the last one on the disk, each made durable before its ACK. What
# follows the unbroken records (the torn tail of a crash) is cut off first, as a log's
# recovery does.
write_records() {
    set -- $(records)
    n=$1
    if [ -f /mnt/records ]; then
        truncate -s $((n * 16)) /mnt/records || fail "truncate the records"
        sync -d /mnt/records || fail "fdatasync the records"
    fi
    while :; do
        n=$((n + 1))
        printf 'R%014d\n' "$n" >>/mnt/records || fail "append record $n"
        sync -d /mnt/records || fail "fdatasync record $n"
        echo "ACK $n"
    done
}

# One SQLite connection inserting rows after the last one, each commit confirmed after it
# returned (WAL with synchronous=FULL: the commit is durable when it returns).
write_sqlite() {
    sqlite3 -bail /mnt/app.db "PRAGMA journal_mode=WAL; CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v TEXT);" >/dev/null ||
        fail "create the SQLite table"
    k=$(sqlite3 -bail /mnt/app.db "SELECT coalesce(max(id), 0) FROM t;") || fail "read the SQLite table"
    {
        echo "PRAGMA synchronous=FULL;"
        while :; do
            k=$((k + 1))
            echo "INSERT INTO t(id, v) VALUES($k, 'row $k');"
            echo ".print COMMIT $k"
        done
    } | sqlite3 -bail /mnt/app.db
    fail "sqlite3 stopped"
}

workload() { # RECORDS SQLITE (yes/no)
    mount -t ext4 /dev/vda /mnt || fail "mount /dev/vda"
    if [ "$2" = yes ]; then
        if [ "$1" = yes ]; then
            write_sqlite &
        else
            write_sqlite
        fi
    fi
    write_records
}

case $mode in
records) workload yes no ;;
sqlite) workload no yes ;;
mixed) workload yes yes ;;
check)
    check
    sync
    poweroff -f
    ;;
serve)
    check
    workload yes yes
    ;;
*) fail "unknown doppel.mode \"$mode\"" ;;
esac
sleep 3600
"#;

/// The awk program that reads the records file (NULs made `@`) and prints `N LATER BAD`
/// (every line from the first bad one on is bad), the first bad lines going to the file
/// `out` (see `records()` in [`INIT`]).
const RECORDS_AWK: &str = r#"
function bad_line() { bad++; after = 1; if (bad <= 5) print NR ": " $0 >out }
BEGIN { n = 0; last = 0; after = 0; later = 0; bad = 0 }
{
    if (bad) { bad_line(); next }
    line = $0; hole = 0
    if (line ~ /^@/) { hole = 1; after = 1; sub(/^@+/, "", line) }
    if (line == "") { if (!hole) bad_line(); next }
    if (length(line) != 15 || line !~ /^R[0-9]+$/) { bad_line(); next }
    # Without its leading zeros (busybox awk would read the number as octal).
    sub(/^R0*/, "", line)
    k = line + 0
    if (hole ? k <= last : k != last + 1) { bad_line(); next }
    if (after) later++; else n = k
    last = k
}
END { print n, later, bad }
"#;

/// The guest's `/init` as it goes into the initramfs.
fn init_script() -> String {
    INIT.replace("@RECORDS_AWK@", RECORDS_AWK)
}

/// What the guest does, chosen by the `doppel.mode=` token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Appends numbered records, `ACK n` after each `fdatasync`, forever.
    Records,
    /// SQLite commits, `COMMIT n` after each, forever.
    Sqlite,
    /// Both at once (two processes): `ACK n` and `COMMIT n` lines interleave.
    Mixed,
    /// Checks the disk (see [`CheckReport`]) and powers off.
    Check,
    /// Checks the disk as [`Mode::Check`] does, then goes on as [`Mode::Mixed`]: a VM that
    /// comes up after a failover, says what it found, and serves writes.
    Serve,
}

impl Mode {
    /// The mode's name on the kernel command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Records => "records",
            Mode::Sqlite => "sqlite",
            Mode::Mixed => "mixed",
            Mode::Check => "check",
            Mode::Serve => "serve",
        }
    }

    /// The kernel command line token: `doppel.mode=NAME`.
    pub fn token(self) -> String {
        format!("doppel.mode={}", self.as_str())
    }
}

/// A disk image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
}

impl Format {
    /// QEMU's name (`format=`).
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }

    /// The file name extension failover scripts recognize (`img`, `qcow2`).
    pub fn extension(self) -> &'static str {
        match self {
            Format::Raw => "img",
            Format::Qcow2 => "qcow2",
        }
    }
}

/// QEMU's cache mode for the disk (`cache=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Cache {
    /// `O_DIRECT`, flushes passed down: what hypervisors use for VM disks.
    #[default]
    None,
    /// The host's page cache, flushes passed down.
    Writeback,
    /// `O_DIRECT` and `O_DSYNC`: every write is durable on completion.
    Directsync,
}

impl Cache {
    /// QEMU's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Cache::None => "none",
            Cache::Writeback => "writeback",
            Cache::Directsync => "directsync",
        }
    }
}

/// How to boot a guest; [`Boot::new`] gives the defaults, fields change the rest.
#[derive(Debug, Clone)]
pub struct Boot {
    /// The disk image (becomes `/dev/vda`).
    pub disk: PathBuf,
    pub format: Format,
    pub mode: Mode,
    /// [default: [`Cache::None`]]
    pub cache: Cache,
    /// Writes go to a temporary overlay, the image is left as it is (`snapshot=on`)
    /// [default: false].
    pub snapshot: bool,
    /// A QMP socket: `-qmp unix:PATH,server=on,wait=off` [default: none].
    pub qmp_socket: Option<PathBuf>,
    /// Where the serial console goes (`-serial file:PATH`) [default: a temporary file removed
    /// with the [`Guest`]].
    pub serial: Option<PathBuf>,
    /// More QEMU arguments, appended last.
    pub extra_args: Vec<String>,
}

impl Boot {
    /// Boots `disk` in `mode`, with the defaults.
    pub fn new(disk: &Path, format: Format, mode: Mode) -> Boot {
        Boot {
            disk: disk.to_path_buf(),
            format,
            mode,
            cache: Cache::None,
            snapshot: false,
            qmp_socket: None,
            serial: None,
            extra_args: Vec::new(),
        }
    }
}

/// What a check of a disk found (the lines of [`Mode::Check`] and [`Mode::Serve`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckReport {
    /// `e2fsck -fn` found nothing to fix after the journal was replayed by a mount.
    pub clean: bool,
    /// e2fsck's output when it was not clean.
    pub fsck_output: String,
    /// The records file starts with records 1..=`last_record`, in order (0: none).
    pub last_record: u64,
    /// Records after a run of zero bytes that follows those: appends that were not synced
    /// and whose size reached the disk before their data, as a file system may leave after a
    /// crash; later records that were synced then survive (only unacknowledged records can
    /// be there). They are numbered above `last_record`, in order.
    pub records_after_gap: u64,
    /// Lines that are neither (garbage, records out of order or repeated), counted from the
    /// first such line to the end: 0 on a sound disk.
    pub record_tail: u64,
    /// The first of those lines (`LINE: TEXT`, NULs as `@`, control characters as `^X`).
    pub record_tail_text: String,
    /// Rows of the SQLite table (0 without a database).
    pub sqlite_rows: u64,
    /// The highest row id (0 without a database).
    pub sqlite_max_id: u64,
    /// `PRAGMA integrity_check` (`ok`), or `none` without a database, or the error.
    pub sqlite_integrity: String,
}

impl CheckReport {
    /// The SQLite database is sound: absent, or `integrity_check` says `ok` and the ids are
    /// 1..=rows.
    pub fn sqlite_ok(&self) -> bool {
        self.sqlite_integrity == "none"
            || (self.sqlite_integrity == "ok" && self.sqlite_rows == self.sqlite_max_id)
    }

    /// Parses the check lines of a console log; `None` until `CHECK-DONE`.
    pub fn parse(console: &str) -> Option<CheckReport> {
        let lines: Vec<&str> = console.lines().map(|l| l.trim_end_matches('\r')).collect();
        let done = lines.iter().position(|l| *l == "CHECK-DONE")?;
        let lines = &lines[..done];
        let last = |prefix: &str| lines.iter().rev().find_map(|l| l.strip_prefix(prefix));
        let mut r = CheckReport {
            clean: last("FSCK ") == Some("clean"),
            fsck_output: lines.iter().filter_map(|l| l.strip_prefix("FSCK-OUT ")).fold(
                String::new(),
                |mut s, l| {
                    let _ = writeln!(s, "{l}");
                    s
                },
            ),
            last_record: 0,
            records_after_gap: 0,
            record_tail: 0,
            record_tail_text: lines.iter().filter_map(|l| l.strip_prefix("RECORDS-BAD ")).fold(
                String::new(),
                |mut s, l| {
                    let _ = writeln!(s, "{l}");
                    s
                },
            ),
            sqlite_rows: 0,
            sqlite_max_id: 0,
            sqlite_integrity: String::new(),
        };
        if let Some(rec) = last("RECORDS ") {
            let mut w = rec.split_whitespace().map(|n| n.parse::<u64>().ok());
            r.last_record = w.next().flatten()?;
            r.records_after_gap = w.next().flatten()?;
            r.record_tail = w.next().flatten()?;
        }
        let sql = last("SQLITE ")?;
        let mut w = sql.splitn(3, ' ');
        match (w.next().and_then(|n| n.parse().ok()), w.next().and_then(|n| n.parse().ok()), w.next()) {
            (Some(rows), Some(max), Some(integrity)) => {
                r.sqlite_rows = rows;
                r.sqlite_max_id = max;
                r.sqlite_integrity = integrity.trim().to_string();
            }
            _ => r.sqlite_integrity = sql.trim().to_string(),
        }
        Some(r)
    }
}

/// A guest's serial console log, as QEMU writes it (`-serial file:PATH`). Works for a guest
/// the kit started ([`Guest::console`]) and for one started by someone else (a failover
/// script) with [`VmKit::qemu_args`].
#[derive(Debug, Clone)]
pub struct Console {
    path: PathBuf,
}

impl Console {
    /// The log at `path` (it may not exist yet).
    pub fn at(path: &Path) -> Console {
        Console { path: path.to_path_buf() }
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Everything logged so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.path).unwrap_or_default()).into_owned()
    }

    fn highest(&self, prefix: &str) -> u64 {
        self.text()
            .lines()
            .filter_map(|l| l.trim_end_matches('\r').strip_prefix(prefix)?.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
    }

    /// The highest record acknowledged (`ACK n`), 0 if none.
    pub fn acked(&self) -> u64 {
        self.highest("ACK ")
    }

    /// The highest SQLite commit acknowledged (`COMMIT n`), 0 if none.
    pub fn committed(&self) -> u64 {
        self.highest("COMMIT ")
    }

    /// What the guest said failed (`DOPPEL-FAIL ...`), if it did.
    pub fn failure(&self) -> Option<String> {
        self.text().lines().find_map(|l| l.strip_prefix("DOPPEL-FAIL ").map(|s| s.trim_end().to_string()))
    }

    /// The check's findings, once the guest printed them all.
    pub fn report(&self) -> Option<CheckReport> {
        CheckReport::parse(&self.text())
    }

    /// The last `n` lines, for error messages.
    pub fn tail(&self, n: usize) -> String {
        let text = self.text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Polls `found` until it gives a value; fails after `timeout`, when the guest reports a
    /// failure, or when `alive` says the guest is gone (and `found` still gives nothing).
    pub fn wait_for<T>(
        &self,
        timeout: Duration,
        what: &str,
        mut alive: impl FnMut() -> bool,
        mut found: impl FnMut(&Console) -> Option<T>,
    ) -> Result<T, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let running = alive();
            if let Some(v) = found(self) {
                return Ok(v);
            }
            if let Some(f) = self.failure() {
                return Err(format!("waiting for {what}: the guest failed: {f}\n{}", self.tail(30)));
            }
            if !running {
                return Err(format!("waiting for {what}: the guest is gone; console:\n{}", self.tail(30)));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "timed out after {timeout:?} waiting for {what}; console:\n{}",
                    self.tail(30)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until record `n` is acknowledged; returns the highest acknowledged.
    pub fn wait_acks(&self, n: u64, timeout: Duration) -> Result<u64, String> {
        self.wait_for(timeout, &format!("ACK {n}"), || true, |c| Some(c.acked()).filter(|&a| a >= n))
    }

    /// Waits until commit `n` is acknowledged; returns the highest acknowledged.
    pub fn wait_commits(&self, n: u64, timeout: Duration) -> Result<u64, String> {
        self.wait_for(timeout, &format!("COMMIT {n}"), || true, |c| Some(c.committed()).filter(|&a| a >= n))
    }

    /// Waits for the check's findings.
    pub fn wait_report(&self, timeout: Duration) -> Result<CheckReport, String> {
        self.wait_for(timeout, "the check's report", || true, Console::report)
    }
}

/// A running guest, killed (SIGKILL) when dropped.
pub struct Guest {
    child: Child,
    console: Console,
    qmp: Option<PathBuf>,
    /// The serial log is the kit's own temporary file, removed on drop.
    own_serial: bool,
}

impl Guest {
    /// Its serial console.
    pub fn console(&self) -> &Console {
        &self.console
    }

    /// The QEMU process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The QMP socket, if [`Boot::qmp_socket`] asked for one.
    pub fn qmp_socket(&self) -> Option<&Path> {
        self.qmp.as_deref()
    }

    /// Whether QEMU still runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The highest record acknowledged.
    pub fn acked(&self) -> u64 {
        self.console.acked()
    }

    /// The highest SQLite commit acknowledged.
    pub fn committed(&self) -> u64 {
        self.console.committed()
    }

    /// Waits until record `n` is acknowledged (fails early if the guest dies or fails);
    /// returns the highest acknowledged.
    pub fn wait_acks(&mut self, n: u64, timeout: Duration) -> Result<u64, String> {
        let console = self.console.clone();
        console.wait_for(
            timeout,
            &format!("ACK {n}"),
            || self.running(),
            |c| Some(c.acked()).filter(|&a| a >= n),
        )
    }

    /// Waits until commit `n` is acknowledged; returns the highest acknowledged.
    pub fn wait_commits(&mut self, n: u64, timeout: Duration) -> Result<u64, String> {
        let console = self.console.clone();
        console.wait_for(
            timeout,
            &format!("COMMIT {n}"),
            || self.running(),
            |c| Some(c.committed()).filter(|&a| a >= n),
        )
    }

    /// Waits for QEMU to exit by itself (the guest powered off).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().map_err(|e| e.to_string())? {
                return Ok(st);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "QEMU did not exit within {timeout:?}; console:\n{}",
                    self.console.tail(30)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL, and waits for it to be gone: a pulled plug (what QEMU had not written to the
    /// image is lost, as a host crash would lose it).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.kill();
        if self.own_serial {
            let _ = fs::remove_file(&self.console.path);
        }
    }
}

/// The prepared kit: a kernel and an initramfs, and the tools to run them.
#[derive(Debug, Clone)]
pub struct VmKit {
    kernel: PathBuf,
    initrd: PathBuf,
    kernel_version: String,
    qemu: PathBuf,
}

static KIT: OnceLock<Result<VmKit, String>> = OnceLock::new();
static SERIALS: AtomicU64 = AtomicU64::new(0);

impl VmKit {
    /// The kit, prepared on first use (and cached on disk across processes): `Err` says what
    /// is missing, for [`crate::require_ok`].
    pub fn get() -> Result<VmKit, String> {
        KIT.get_or_init(|| VmKit::prepare().map_err(|e| format!("the VM kit cannot be prepared: {e}")))
            .clone()
    }

    /// The cache directory.
    pub fn dir() -> PathBuf {
        std::env::var_os(DIR_VAR).map(PathBuf::from).unwrap_or_else(|| PathBuf::from(DEFAULT_DIR))
    }

    /// The kernel image (`-kernel`).
    pub fn kernel(&self) -> &Path {
        &self.kernel
    }

    /// The initramfs (`-initrd`).
    pub fn initrd(&self) -> &Path {
        &self.initrd
    }

    /// The kernel's version (`6.1.0-48-cloud-amd64`).
    pub fn kernel_version(&self) -> &str {
        &self.kernel_version
    }

    /// Whether this process can use KVM: `/dev/kvm` opens read-write (it exists, permissions
    /// and the container's device rules allow it) and the CPU has virtualization extensions
    /// (`vmx` or `svm` in `/proc/cpuinfo`; some nested setups have a `/dev/kvm` that opens but
    /// runs no guest).
    pub fn kvm_usable() -> bool {
        let opens = fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let extensions = cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
        opens && extensions
    }

    /// The accelerator guests use: `kvm` or `tcg`, as [`ACCEL_VAR`] says, or else `kvm`
    /// where [`VmKit::kvm_usable`], `tcg` elsewhere.
    pub fn accel() -> &'static str {
        match std::env::var(ACCEL_VAR).as_deref() {
            Ok("kvm") => "kvm",
            Ok("tcg") => "tcg",
            _ if VmKit::kvm_usable() => "kvm",
            _ => "tcg",
        }
    }

    /// The accelerator arguments [`VmKit::boot`] uses: `-accel kvm -accel tcg` (QEMU falls
    /// back to its emulator if KVM fails to start) or `-accel tcg`, after [`VmKit::accel`].
    pub fn accel_args() -> Vec<String> {
        match VmKit::accel() {
            "kvm" => words("-accel kvm -accel tcg"),
            _ => words("-accel tcg"),
        }
    }

    /// The machine-wide QEMU arguments of a guest in `mode` whose console goes to `serial`:
    /// memory, one CPU, no default devices, the kernel, the initramfs, the mode (one token)
    /// and the serial port. Without accelerator and disk, for a failover script that adds its
    /// own (`QEMU_ARGS` of `start-vm.sh`): no word has a space or a quote.
    pub fn qemu_args(&self, mode: Mode, serial: &Path) -> Vec<String> {
        vec![
            "-m".into(),
            MEMORY_MIB.to_string(),
            "-smp".into(),
            "1".into(),
            "-nodefaults".into(),
            "-no-reboot".into(),
            "-kernel".into(),
            self.kernel.display().to_string(),
            "-initrd".into(),
            self.initrd.display().to_string(),
            "-append".into(),
            mode.token(),
            "-serial".into(),
            format!("file:{}", serial.display()),
        ]
    }

    /// The complete QEMU command line [`VmKit::boot`] runs for `b` (its serial log already
    /// chosen), without the program name. Unlike [`VmKit::qemu_args`], the kernel's command
    /// line has more than the mode: a kernel panic is printed on the console and ends QEMU at
    /// once (`console=ttyS0 loglevel=1 panic=-1`; nothing else of the kernel's is printed).
    pub fn command_args(&self, b: &Boot, serial: &Path) -> Vec<String> {
        let mut args = self.qemu_args(b.mode, serial);
        if let Some(i) = args.iter().position(|a| a == "-append") {
            args[i + 1] = format!("{} console=ttyS0 loglevel=1 panic=-1", b.mode.token());
        }
        args.extend(VmKit::accel_args());
        args.extend(["-display".into(), "none".into()]);
        let mut drive = format!(
            "file={},format={},if=virtio,cache={},id={DISK_ID}",
            b.disk.display(),
            b.format.as_str(),
            b.cache.as_str()
        );
        if b.snapshot {
            drive.push_str(",snapshot=on");
        }
        args.extend(["-drive".into(), drive]);
        if let Some(q) = &b.qmp_socket {
            args.extend(["-qmp".into(), format!("unix:{},server=on,wait=off", q.display())]);
        }
        args.extend(b.extra_args.iter().cloned());
        args
    }

    /// Starts QEMU as `b` says. Returns once the process runs (the guest boots on; wait on
    /// its console).
    pub fn boot(&self, b: Boot) -> Result<Guest, String> {
        if let Some(bad) = [&b.disk]
            .into_iter()
            .chain(&b.serial)
            .chain(&b.qmp_socket)
            .find(|p| p.to_string_lossy().contains(','))
        {
            return Err(format!("{} has a comma, which QEMU's options cannot take", bad.display()));
        }
        let (serial, own_serial) = match &b.serial {
            Some(p) => (p.clone(), false),
            None => {
                let n = SERIALS.fetch_add(1, Ordering::Relaxed);
                (std::env::temp_dir().join(format!("doppel-vm-{}-{n}.log", std::process::id())), true)
            }
        };
        let _ = fs::remove_file(&serial);
        if let Some(q) = &b.qmp_socket {
            let _ = fs::remove_file(q);
        }
        let args = self.command_args(&b, &serial);
        let child = Command::new(&self.qemu)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.qemu.display()))?;
        let mut guest = Guest { child, console: Console::at(&serial), qmp: b.qmp_socket.clone(), own_serial };
        // QEMU creates the serial file (and the QMP socket) before the guest runs; an error in
        // the arguments ends it at once.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = guest.child.try_wait().map_err(|e| e.to_string())? {
                let mut err = String::new();
                if let Some(mut e) = guest.child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                return Err(format!("QEMU exited at once ({st}): {err}\nargs: {args:?}"));
            }
            let qmp_ready = b.qmp_socket.as_ref().is_none_or(|q| q.exists());
            if serial.exists() && qmp_ready {
                break;
            }
            if Instant::now() >= deadline {
                return Err(format!("QEMU did not start within 30 s: args {args:?}"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // Keep QEMU's stderr flowing to ours (a full pipe would stall it).
        if let Some(e) = guest.child.stderr.take() {
            std::thread::spawn(move || {
                for line in BufReader::new(e).lines().map_while(Result::ok) {
                    eprintln!("qemu: {line}");
                }
            });
        }
        Ok(guest)
    }

    /// Makes an ext4 file system of `size` bytes (no partition table) in a new image `path`,
    /// in `format`; an existing file is replaced. The blocks the file system does not use are
    /// zeros (a sparse raw file, a small qcow2). Inode tables and journal are initialized at
    /// once (nothing is left for the guest's kernel to zero in the background).
    pub fn make_disk(&self, path: &Path, format: Format, size: u64) -> Result<(), String> {
        self.make_disk_filled(path, format, size, None)
    }

    /// [`VmKit::make_disk`], with the blocks the file system does not use holding
    /// pseudo-random bytes from `seed` ([`crate::noise`]): a copy of the whole image can
    /// neither skip nor compress them, so what a transfer sent tells whether it sent the
    /// whole image or only the changed blocks.
    pub fn make_disk_with_noise(
        &self,
        path: &Path,
        format: Format,
        size: u64,
        seed: u64,
    ) -> Result<(), String> {
        self.make_disk_filled(path, format, size, Some(seed))
    }

    fn make_disk_filled(
        &self,
        path: &Path,
        format: Format,
        size: u64,
        noise: Option<u64>,
    ) -> Result<(), String> {
        let raw = match format {
            Format::Raw => path.to_path_buf(),
            Format::Qcow2 => path.with_extension("tmp-raw"),
        };
        let _ = fs::remove_file(&raw);
        let create = || -> std::io::Result<()> {
            let f = fs::File::create(&raw)?;
            f.set_len(size)?;
            if let Some(seed) = noise {
                const CHUNK: u64 = 8 << 20;
                let mut off = 0;
                while off < size {
                    let n = CHUNK.min(size - off);
                    std::os::unix::fs::FileExt::write_all_at(&f, &crate::noise(seed ^ off, n as usize), off)?;
                    off += n;
                }
                f.sync_all()?;
            }
            Ok(())
        };
        create().map_err(|e| format!("cannot create {}: {e}", raw.display()))?;
        let mkfs = which("mkfs.ext4")?;
        // nodiscard: on a file, a discard punches out the whole image (the noise too).
        run(Command::new(mkfs)
            .args(["-q", "-F", "-b", "4096", "-L", "doppel-vm"])
            .args(["-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0"])
            .arg(&raw))?;
        if format == Format::Qcow2 {
            let qemu_img = which("qemu-img").map_err(|e| format!("{e} (apt-get install qemu-utils)"))?;
            let _ = fs::remove_file(path);
            let r =
                run(Command::new(qemu_img).args(["convert", "-f", "raw", "-O", "qcow2"]).arg(&raw).arg(path));
            let _ = fs::remove_file(&raw);
            r?;
        }
        Ok(())
    }

    /// Boots [`Mode::Check`] on a snapshot of `disk` (the image is not changed, not even by
    /// the journal's replay) and returns what it found.
    pub fn check(&self, disk: &Path, format: Format) -> Result<CheckReport, String> {
        let mut b = Boot::new(disk, format, Mode::Check);
        b.snapshot = true;
        let mut guest = self.boot(b)?;
        let status = guest.wait_exit(Duration::from_secs(300))?;
        guest.console.report().ok_or_else(|| {
            format!("the check printed no report (QEMU {status}); console:\n{}", guest.console.tail(40))
        })
    }

    fn prepare() -> Result<VmKit, String> {
        let qemu =
            which("qemu-system-x86_64").map_err(|e| format!("{e} (apt-get install qemu-system-x86)"))?;
        let busybox = which("busybox").map_err(|e| format!("{e} (apt-get install busybox-static)"))?;
        if !is_static(&busybox)? {
            return Err(format!(
                "{} is not statically linked (apt-get install busybox-static)",
                busybox.display()
            ));
        }
        for (tool, pkg) in
            [("mkfs.ext4", "e2fsprogs"), ("e2fsck", "e2fsprogs"), ("sqlite3", "sqlite3"), ("ldd", "libc-bin")]
        {
            which(tool).map_err(|e| format!("{e} (apt-get install {pkg})"))?;
        }
        let dir = VmKit::dir();
        fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let kdir = match cached_kernel(&dir) {
            Some(k) => k,
            None => prepare_kernel(&dir, &busybox)?,
        };
        let kernel_version = fs::read_to_string(kdir.join("version"))
            .map_err(|e| format!("{}: {e}", kdir.display()))?
            .trim()
            .to_string();
        let initrd = build_initrd(&dir, &kdir, &busybox)?;
        Ok(VmKit { kernel: kdir.join("vmlinuz"), initrd, kernel_version, qemu })
    }
}

/// Splits on spaces.
fn words(s: &str) -> Vec<String> {
    s.split_whitespace().map(String::from).collect()
}

/// Runs a command to completion; `Err` with its output unless it succeeded.
fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.stdin(Stdio::null()).output().map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether the ELF file has no program interpreter (is statically linked).
fn is_static(p: &Path) -> Result<bool, String> {
    let b = fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?;
    let bad = || format!("{} is not a 64-bit ELF file", p.display());
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 {
        return Err(bad());
    }
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(b[32..40].try_into().expect("8 bytes")) as usize;
    let (phentsize, phnum) = (u16_at(54), u16_at(56));
    for i in 0..phnum {
        let o = phoff + i * phentsize;
        if o + 4 > b.len() {
            return Err(bad());
        }
        if u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes")) == 3 {
            return Ok(false); // PT_INTERP
        }
    }
    Ok(true)
}

/// A kernel prepared earlier (the newest), if any.
fn cached_kernel(dir: &Path) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("linux-image-"))
                && p.join("version").is_file()
        })
        .collect();
    found.sort();
    found.pop()
}

/// A temporary directory in `dir`, unique to this process and call.
fn temp_in(dir: &Path, what: &str) -> Result<PathBuf, String> {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let p =
        dir.join(format!(".tmp-{what}-{}-{nanos}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
    fs::create_dir_all(&p).map_err(|e| format!("cannot create {}: {e}", p.display()))?;
    Ok(p)
}

/// Fetches and unpacks the cloud kernel, picks its modules, and renames the result into
/// `dir/linux-image-VERSION`.
fn prepare_kernel(dir: &Path, busybox: &Path) -> Result<PathBuf, String> {
    for tool in ["apt-cache", "apt-get", "dpkg-deb"] {
        which(tool).map_err(|e| format!("{e}: it is needed to fetch the guest's kernel"))?;
    }
    let deps = run(Command::new("apt-cache").args(["depends", KERNEL_PACKAGE]))
        .map_err(|e| format!("{e} (are the package lists there? apt-get update)"))?;
    let package = deps
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-") && !p.starts_with('<'))
        .ok_or_else(|| format!("apt-cache depends {KERNEL_PACKAGE} names no kernel image: {deps}"))?
        .to_string();
    let final_dir = dir.join(&package);
    if final_dir.join("version").is_file() {
        return Ok(final_dir);
    }
    let tmp = temp_in(dir, "kernel")?;
    let result = (|| {
        run(Command::new("apt-get").args(["download", "-q", &package]).current_dir(&tmp))?;
        let deb = fs::read_dir(&tmp)
            .map_err(|e| e.to_string())?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .ok_or_else(|| format!("apt-get download {package} left no .deb"))?;
        let root = tmp.join("root");
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
        let vmlinuz = fs::read_dir(root.join("boot"))
            .map_err(|e| format!("{package} has no /boot: {e}"))?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-")))
            .ok_or_else(|| format!("{package} has no /boot/vmlinuz-*"))?;
        let version = vmlinuz.file_name().expect("named").to_string_lossy()["vmlinuz-".len()..].to_string();
        let config = fs::read_to_string(root.join(format!("boot/config-{version}"))).unwrap_or_default();
        let moddir = ["lib/modules", "usr/lib/modules"]
            .iter()
            .map(|d| root.join(d).join(&version))
            .find(|d| d.is_dir())
            .ok_or_else(|| format!("{package} has no modules for {version}"))?;
        let base = moddir.parent().and_then(Path::parent).and_then(Path::parent).expect("ROOT/lib/modules/V");
        if !moddir.join("modules.dep").is_file() {
            run(Command::new(busybox).args(["depmod", "-b"]).arg(base).arg(&version))?;
        }
        let dep = fs::read_to_string(moddir.join("modules.dep")).map_err(|e| format!("modules.dep: {e}"))?;
        // The drivers the guest needs, unless the kernel has them built in.
        let mut wanted = Vec::new();
        for (option, module) in [
            ("CONFIG_VIRTIO", "virtio"),
            ("CONFIG_VIRTIO_PCI", "virtio_pci"),
            ("CONFIG_VIRTIO_BLK", "virtio_blk"),
            ("CONFIG_EXT4_FS", "ext4"),
        ] {
            match config_value(&config, option) {
                Some("y") => {}
                Some("m") => wanted.push(module),
                // Without the config file, rely on modules.dep: a module there is loaded.
                None if config.is_empty() => wanted.push(module),
                other => return Err(format!("{package}: {option} is {other:?}, the guest needs it")),
            }
        }
        let order = load_order(&dep, &wanted)?;
        let out = tmp.join("out");
        fs::create_dir_all(out.join("modules")).map_err(|e| e.to_string())?;
        fs::copy(&vmlinuz, out.join("vmlinuz")).map_err(|e| format!("copy the kernel: {e}"))?;
        let mut load = String::new();
        for (name, rel) in &order {
            if !rel.ends_with(".ko") {
                return Err(format!(
                    "module {rel} is compressed; the guest's busybox insmod loads plain .ko files"
                ));
            }
            fs::copy(moddir.join(rel), out.join("modules").join(format!("{name}.ko")))
                .map_err(|e| format!("copy {rel}: {e}"))?;
            let _ = writeln!(load, "{name}");
        }
        fs::write(out.join("modules.load"), load).map_err(|e| e.to_string())?;
        fs::write(out.join("version"), format!("{version}\n")).map_err(|e| e.to_string())?;
        // Another process may have won the race: its copy is as good as ours.
        match fs::rename(&out, &final_dir) {
            Err(e) if !final_dir.join("version").is_file() => {
                return Err(format!("cannot rename into {}: {e}", final_dir.display()));
            }
            _ => {}
        }
        Ok(final_dir.clone())
    })();
    let _ = fs::remove_dir_all(&tmp);
    result
}

/// The value of `OPTION=` in a kernel config (`y`, `m`), if set.
fn config_value<'a>(config: &'a str, option: &str) -> Option<&'a str> {
    config.lines().find_map(|l| l.strip_prefix(option)?.strip_prefix('='))
}

/// The modules to load for `wanted`, dependencies first: (name, path relative to the
/// modules directory). Names are file names without `.ko`, with `-` as `_`.
fn load_order(modules_dep: &str, wanted: &[&str]) -> Result<Vec<(String, String)>, String> {
    let name_of = |path: &str| {
        let file = path.rsplit('/').next().unwrap_or(path);
        let stem = file.split(".ko").next().unwrap_or(file);
        stem.replace('-', "_")
    };
    let mut deps: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    for line in modules_dep.lines() {
        let Some((m, d)) = line.split_once(':') else { continue };
        deps.insert(name_of(m), (m.to_string(), d.split_whitespace().map(name_of).collect()));
    }
    fn visit(
        n: &str,
        deps: &BTreeMap<String, (String, Vec<String>)>,
        seen: &mut BTreeSet<String>,
        out: &mut Vec<(String, String)>,
    ) -> Result<(), String> {
        if !seen.insert(n.to_string()) {
            return Ok(());
        }
        let (path, ds) = deps.get(n).ok_or_else(|| format!("module {n} is not in modules.dep"))?;
        for d in ds {
            visit(d, deps, seen, out)?;
        }
        out.push((n.to_string(), path.clone()));
        Ok(())
    }
    let (mut seen, mut out) = (BTreeSet::new(), Vec::new());
    for w in wanted {
        visit(w, &deps, &mut seen, &mut out)?;
    }
    Ok(out)
}

/// The shared libraries and the loader `bin` needs (from `ldd`): paths as the loader looks
/// them up, each with the file to copy.
fn shared_libs(bin: &Path) -> Result<Vec<PathBuf>, String> {
    let out = run(Command::new(which("ldd")?).arg(bin))?;
    let mut libs = Vec::new();
    for line in out.lines() {
        let line = line.trim();
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next().unwrap_or(""),
            None => line.split_whitespace().next().unwrap_or(""),
        };
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        } else if line.contains("not found") {
            return Err(format!("{}: {line}", bin.display()));
        }
    }
    Ok(libs)
}

/// A newc cpio archive being built in memory.
struct Cpio {
    buf: Vec<u8>,
    ino: u32,
    dirs: BTreeSet<String>,
}

impl Cpio {
    fn new() -> Cpio {
        Cpio { buf: Vec::new(), ino: 1, dirs: BTreeSet::new() }
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
        let name = name.trim_start_matches('/');
        let fields = [
            self.ino,
            mode,
            0,
            0,
            if mode & 0o170000 == 0o040000 { 2 } else { 1 },
            0,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.ino += 1;
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    /// Directories leading to `path` (not `path` itself), each once.
    fn parents(&mut self, path: &str) {
        let mut acc = String::new();
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        for p in &parts[..parts.len().saturating_sub(1)] {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(p);
            if self.dirs.insert(acc.clone()) {
                let a = acc.clone();
                self.entry(&a, 0o040755, b"", (0, 0));
            }
        }
    }

    fn dir(&mut self, path: &str) {
        self.parents(&format!("{path}/x"));
    }

    fn file(&mut self, path: &str, mode: u32, data: &[u8]) {
        self.parents(path);
        self.entry(path, 0o100000 | mode, data, (0, 0));
    }

    fn symlink(&mut self, path: &str, target: &str) {
        self.parents(path);
        self.entry(path, 0o120777, target.as_bytes(), (0, 0));
    }

    fn char_dev(&mut self, path: &str, major: u32, minor: u32) {
        self.parents(path);
        self.entry(path, 0o020600, b"", (major, minor));
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, b"", (0, 0));
        self.buf
    }
}

/// Builds the initramfs (or finds it built): `dir/initrd-HASH.cpio`.
fn build_initrd(dir: &Path, kdir: &Path, busybox: &Path) -> Result<PathBuf, String> {
    let read = |p: &Path| fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
    let mut c = Cpio::new();
    for d in ["dev", "proc", "sys", "mnt", "tmp", "etc", "bin", "sbin", "usr/bin", "usr/sbin", "modules"] {
        c.dir(d);
    }
    c.char_dev("dev/console", 5, 1);
    c.file("bin/busybox", 0o755, &read(busybox)?);
    c.symlink("bin/sh", "busybox");
    c.symlink("etc/mtab", "/proc/mounts");
    c.file("init", 0o755, init_script().as_bytes());
    let load = fs::read_to_string(kdir.join("modules.load")).map_err(|e| e.to_string())?;
    c.file("modules.load", 0o644, load.as_bytes());
    for m in load.lines().filter(|l| !l.is_empty()) {
        c.file(&format!("modules/{m}.ko"), 0o644, &read(&kdir.join("modules").join(format!("{m}.ko")))?);
    }
    let mut libs = BTreeSet::new();
    for (tool, at) in [("sqlite3", "usr/bin/sqlite3"), ("e2fsck", "usr/sbin/e2fsck")] {
        let p = which(tool)?;
        c.file(at, 0o755, &read(&p)?);
        libs.extend(shared_libs(&p)?);
    }
    for lib in libs {
        // Put at the path the loader looks for; the content is the file it resolves to.
        let real = fs::canonicalize(&lib).map_err(|e| format!("{}: {e}", lib.display()))?;
        c.file(&lib.to_string_lossy(), 0o755, &read(&real)?);
    }
    let bytes = c.finish();
    let hash = blake3::hash(&bytes).to_hex();
    let path = dir.join(format!("initrd-{}.cpio", &hash[..16]));
    if fs::metadata(&path).is_ok_and(|m| m.len() == bytes.len() as u64) {
        return Ok(path);
    }
    let tmp = temp_in(dir, "initrd")?;
    let t = tmp.join("initrd.cpio");
    let r = fs::write(&t, &bytes)
        .and_then(|_| fs::set_permissions(&t, fs::Permissions::from_mode(0o644)))
        .and_then(|_| fs::rename(&t, &path))
        .map_err(|e| format!("cannot write {}: {e}", path.display()));
    let _ = fs::remove_dir_all(&tmp);
    r.map(|_| path)
}

/// A minimal QMP client: the lines QEMU answers, raw JSON (parse them with whatever JSON
/// library the caller has).
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events received while waiting for answers, in order.
    pub events: Vec<String>,
}

impl Qmp {
    /// Connects to `socket` (retrying until `timeout`) and leaves negotiation mode.
    pub fn connect(socket: &Path, timeout: Duration) -> Result<Qmp, String> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!("cannot connect to QMP at {}: {e}", socket.display()));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        stream.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
        let writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut q = Qmp { reader: BufReader::new(stream), writer, events: Vec::new() };
        let greeting = q.line()?;
        if !greeting.contains("\"QMP\"") {
            return Err(format!("not a QMP greeting: {greeting}"));
        }
        q.execute(r#"{"execute": "qmp_capabilities"}"#)?;
        Ok(q)
    }

    fn line(&mut self) -> Result<String, String> {
        let mut l = String::new();
        match self.reader.read_line(&mut l) {
            Ok(0) => Err("QMP connection closed".into()),
            Ok(_) => Ok(l.trim_end().to_string()),
            Err(e) => Err(format!("reading QMP: {e}")),
        }
    }

    /// Sends one command (a JSON object) and returns QEMU's answer line: `{"return": ...}`,
    /// or `Err` with `{"error": ...}`. Events arriving meanwhile go to [`Qmp::events`].
    pub fn execute(&mut self, command: &str) -> Result<String, String> {
        self.writer.write_all(format!("{command}\n").as_bytes()).map_err(|e| format!("writing QMP: {e}"))?;
        loop {
            let l = self.line()?;
            if l.starts_with("{\"return\"") {
                return Ok(l);
            }
            if l.starts_with("{\"error\"") {
                return Err(l);
            }
            self.events.push(l);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_load_after_their_dependencies() {
        let dep = "kernel/drivers/virtio/virtio_ring.ko:\n\
                   kernel/drivers/virtio/virtio.ko:\n\
                   kernel/drivers/virtio/virtio_pci_modern_dev.ko:\n\
                   kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko\n\
                   kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n";
        let order: Vec<String> =
            load_order(dep, &["virtio_pci", "virtio_blk"]).unwrap().into_iter().map(|(n, _)| n).collect();
        assert_eq!(order, ["virtio_ring", "virtio_pci_modern_dev", "virtio", "virtio_pci", "virtio_blk"]);
        assert!(load_order(dep, &["ext4"]).unwrap_err().contains("ext4"));
    }

    #[test]
    fn a_check_report_is_parsed_once_complete() {
        let log = "DOPPEL-BOOT mode=check\r\nRECORDS 42 2 0\r\nSQLITE 7 7 ok \r\nFSCK clean\r\n";
        assert_eq!(CheckReport::parse(log), None);
        let r = CheckReport::parse(&format!("{log}CHECK-DONE\r\nACK 43\r\n")).unwrap();
        assert!(r.clean && r.sqlite_ok(), "{r:?}");
        assert_eq!(
            (r.last_record, r.records_after_gap, r.record_tail, r.sqlite_rows, r.sqlite_max_id),
            (42, 2, 0, 7, 7)
        );
        let dirty = "RECORDS 3 0 1\nRECORDS-BAD 4: R@@x\nSQLITE 0 0 none\nFSCK-OUT Inode 12 has a bad extent\nFSCK dirty 4\nCHECK-DONE\n";
        let r = CheckReport::parse(dirty).unwrap();
        assert!(!r.clean && r.fsck_output.contains("bad extent") && r.record_tail == 1, "{r:?}");
        assert_eq!(r.record_tail_text, "4: R@@x\n");
        assert!(r.sqlite_ok());
        let broken = "RECORDS 3 0 0\nSQLITE Error: no such table: t  ok \nFSCK clean\nCHECK-DONE\n";
        assert!(!CheckReport::parse(broken).unwrap().sqlite_ok());
    }

    /// The guest's reading of its records file, run here with this machine's busybox.
    #[test]
    fn records_are_a_prefix_then_maybe_zeros_and_later_records_and_anything_else_is_bad() {
        let Some([busybox]) = crate::require_tools(["busybox"]) else { return };
        let dir = tempfile::tempdir().unwrap();
        let rec = |n: u64| format!("R{n:014}\n").into_bytes();
        let zeros = |records: usize| vec![0u8; records * 16];
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (Vec::new(), "0 0 0"),
            ([rec(1), rec(2), rec(3)].concat(), "3 0 0"),
            ((1..=20).map(rec).collect::<Vec<_>>().concat(), "20 0 0"),
            ([(1..=9).map(rec).collect::<Vec<_>>().concat(), zeros(3), rec(13), rec(14)].concat(), "9 2 0"),
            ([rec(1), rec(2), zeros(2)].concat(), "2 0 0"),
            ([rec(1), rec(2), zeros(2), rec(5), rec(6)].concat(), "2 2 0"),
            ([rec(1), rec(3)].concat(), "1 0 1"),
            ([rec(1), b"hello\n".to_vec(), rec(2)].concat(), "1 0 2"),
            ([rec(1), rec(2), zeros(1), rec(2)].concat(), "2 0 1"),
            ([rec(1), rec(2)[..9].to_vec()].concat(), "1 0 1"),
        ];
        for (i, (content, want)) in cases.into_iter().enumerate() {
            let file = dir.path().join(format!("records{i}"));
            let bad = dir.path().join(format!("bad{i}"));
            fs::write(&file, content).unwrap();
            let script = format!(
                "{bb} tr '\\000' '@' <{f} | {bb} awk -v out={b} '{RECORDS_AWK}'",
                bb = busybox.display(),
                f = file.display(),
                b = bad.display()
            );
            let got = run(Command::new(&busybox).args(["sh", "-c", &script])).unwrap();
            assert_eq!(got.trim(), want, "case {i}");
            let bad_lines = fs::read_to_string(&bad).unwrap_or_default();
            assert_eq!(
                bad_lines.lines().count() as u64,
                want.rsplit(' ').next().unwrap().parse::<u64>().unwrap(),
                "case {i}: {bad_lines}"
            );
        }
    }

    #[test]
    fn the_newc_archive_is_well_formed() {
        let mut c = Cpio::new();
        c.file("a/b/c", 0o644, b"hello");
        let bytes = c.finish();
        assert_eq!(&bytes[..6], b"070701");
        assert_eq!(bytes.len() % 4, 0);
        // a, a/b, a/b/c and the trailer.
        assert_eq!(bytes.windows(6).filter(|w| w == b"070701").count(), 4);
    }

    /// The kit or, when it cannot be prepared here, `None` after a skip (or a failure under
    /// `DOPPEL_TEST_STRICT=1`).
    fn kit() -> Option<VmKit> {
        crate::require_ok(VmKit::get())
    }

    const LONG: Duration = Duration::from_secs(180);

    #[test]
    fn a_guest_killed_mid_stream_leaves_a_clean_disk_with_every_acknowledged_record_and_commit() {
        let Some(kit) = kit() else { return };
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        kit.make_disk(&img, Format::Raw, 64 << 20).unwrap();
        let started = Instant::now();
        let mut guest = kit.boot(Boot::new(&img, Format::Raw, Mode::Mixed)).unwrap();
        guest.wait_acks(1, LONG).unwrap();
        let booted = started.elapsed();
        guest.wait_acks(30, LONG).unwrap();
        guest.wait_commits(10, LONG).unwrap();
        guest.kill();
        let (acked, committed) = (guest.acked(), guest.committed());
        let t = Instant::now();
        let r = kit.check(&img, Format::Raw).unwrap();
        println!(
            "first ACK {booted:?} after boot; {acked} records, {committed} commits; check took {:?}: {r:?}",
            t.elapsed()
        );
        assert!(r.clean, "{}", r.fsck_output);
        assert!(r.last_record >= acked && r.record_tail == 0, "acked {acked}: {r:?}");
        assert!(r.sqlite_ok() && r.sqlite_rows >= committed, "committed {committed}: {r:?}");
        // The check ran on a snapshot: a second one finds the image as it was.
        assert_eq!(kit.check(&img, Format::Raw).unwrap(), r);
    }

    #[test]
    fn a_disk_with_noise_is_a_clean_file_system_whose_free_blocks_are_not_zeros() {
        let Some(kit) = kit() else { return };
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        kit.make_disk_with_noise(&img, Format::Raw, 32 << 20, 1).unwrap();
        run(Command::new(which("e2fsck").unwrap()).arg("-fn").arg(&img)).unwrap();
        let bytes = fs::read(&img).unwrap();
        let blocks = bytes.len() / 4096;
        let zeros = bytes.chunks(4096).filter(|b| b.iter().all(|&x| x == 0)).count();
        assert!(zeros < blocks / 4, "{zeros} of {blocks} blocks are zeros");
    }

    #[test]
    fn a_qcow2_guest_serves_on_after_what_it_found_and_answers_qmp() {
        let Some(kit) = kit() else { return };
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.qcow2");
        kit.make_disk(&img, Format::Qcow2, 64 << 20).unwrap();
        let mut guest = kit.boot(Boot::new(&img, Format::Qcow2, Mode::Records)).unwrap();
        guest.wait_acks(5, LONG).unwrap();
        guest.kill();
        let acked = guest.acked();
        let mut b = Boot::new(&img, Format::Qcow2, Mode::Serve);
        b.qmp_socket = Some(dir.path().join("qmp.sock"));
        b.serial = Some(dir.path().join("serial.log"));
        let mut guest = kit.boot(b).unwrap();
        let mut qmp = Qmp::connect(guest.qmp_socket().unwrap(), Duration::from_secs(30)).unwrap();
        let block = qmp.execute(r#"{"execute": "query-block"}"#).unwrap();
        assert!(block.contains(&format!("\"device\": \"{DISK_ID}\"")), "{block}");
        assert!(qmp.execute(r#"{"execute": "no-such-command"}"#).unwrap_err().contains("error"));
        let r = guest.console().wait_report(LONG).unwrap();
        assert!(r.clean && r.last_record >= acked && r.record_tail == 0, "acked {acked}: {r:?}");
        assert_eq!((r.sqlite_rows, r.sqlite_integrity.as_str()), (0, "none"));
        // It goes on after the last record, and commits.
        guest.wait_acks(r.last_record + 3, LONG).unwrap();
        guest.wait_commits(2, LONG).unwrap();
        let text = guest.console().text();
        assert!(
            !text.contains(&format!("ACK {}\r", r.last_record)),
            "record {} written twice:\n{text}",
            r.last_record
        );
        assert_eq!(dir.path().join("serial.log"), guest.console().path());
    }
}
