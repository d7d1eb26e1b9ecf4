//! Whole VMs on the DR side: the shipped `start-vm.sh` and `stop-vm.sh` as a target's
//! `failover` and `stop_workload` commands, booting the VM kit's guest
//! (`doppel_testkit::vm`) from the replica's image with QEMU directly (`VM_BACKEND=qemu`).
//!
//! Not part of `common` (whose `mod.rs` every test file compiles): include it with
//! `#[path = "common/vm.rs"] mod vm_common;`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use doppel_testkit::vm::{Mode, VmKit};

/// The shipped example script `name` (`examples/failover/NAME`).
pub fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/failover").join(name).canonicalize().unwrap()
}

/// `QEMU_ACCEL=...` for the scripts, only where their own choice (KVM when `/dev/kvm` opens)
/// would differ from the kit's (which also wants the CPU's virtualization extensions): a host
/// whose `/dev/kvm` opens but runs no guest.
fn accel_setting() -> String {
    let script_picks_kvm = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    match (VmKit::accel(), script_picks_kvm) {
        ("kvm", false) => "QEMU_ACCEL=kvm ".into(),
        ("tcg", true) => "QEMU_ACCEL=tcg ".into(),
        _ => String::new(),
    }
}

/// The `failover = [...]` command that boots the kit's guest in `mode` from the replica's one
/// image with `start-vm.sh` (QEMU daemonized, its pid file in `run_dir`, its console in
/// `serial`). Fit for a TOML basic string (no `"` or `\`).
pub fn start_vm_command(kit: &VmKit, vm_name: &str, run_dir: &Path, mode: Mode, serial: &Path) -> String {
    format!(
        "VM_NAME={vm_name} VM_BACKEND=qemu RUN_DIR={} {}QEMU_ARGS='{}' {}",
        run_dir.display(),
        accel_setting(),
        kit.qemu_args(mode, serial).join(" "),
        example("start-vm.sh").display()
    )
}

/// The `stop_workload = [...]` command that stops it with `stop-vm.sh`.
pub fn stop_vm_command(vm_name: &str, run_dir: &Path) -> String {
    format!(
        "VM_NAME={vm_name} VM_BACKEND=qemu RUN_DIR={} SHUTDOWN_SECS=30 {}",
        run_dir.display(),
        example("stop-vm.sh").display()
    )
}

/// The pid of the QEMU `start-vm.sh` started for `vm_name`, if it runs.
pub fn dr_vm_pid(run_dir: &Path, vm_name: &str) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(run_dir.join(format!("doppel-vm-{vm_name}.pid")))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let words: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    words.windows(2).any(|w| w[0] == b"-name" && w[1] == vm_name.as_bytes()).then_some(pid)
}

/// SIGKILLs that QEMU, if it runs (the test's cleanup: it is daemonized, no child of ours).
pub fn kill_dr_vm(run_dir: &Path, vm_name: &str) {
    if let Some(pid) = dr_vm_pid(run_dir, vm_name) {
        if let Some(pid) = rustix::process::Pid::from_raw(pid) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
        doppel_testkit::wait_until(std::time::Duration::from_secs(30), "the DR VM's QEMU to go", || {
            match dr_vm_pid(run_dir, vm_name) {
                None => Ok(()),
                Some(p) => Err(format!("pid {p} still runs")),
            }
        });
    }
}
