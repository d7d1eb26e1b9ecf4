//! The example failover scripts (`examples/failover/*.sh`) run as `doppel failover` runs them
//! (`/bin/sh -c` on the command line of the target's config, with `DOPPEL_REPLICA`,
//! `DOPPEL_JOB`, `DOPPEL_EPOCH` and the rest in the environment), against a hostile replica:
//! a domain XML attaching a host block device, a job named `emergency`, symlinks out of the
//! replica, qcow2 images naming files outside it, names with shell metacharacters. Every tool
//! they drive (`virsh`, `systemctl`, `qemu-system-x86_64`, `pg_ctl`, `runuser`, `mount`, ...)
//! is a stub first on `PATH` that records its argv: the tests assert the exact commands run,
//! and that a refused case exits non-zero, says why, and ran nothing. One test runs two of them
//! through a real `doppel failover`; one gives a non-root user its replica through the real
//! bind mount of `start-postgres.sh` and checks it reaches that replica and nothing else.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::*;

/// The shipped script `name`.
fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/failover").join(name).canonicalize().unwrap()
}

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

/// A target's data directory with one replica, stubs of the tools the scripts drive, and a
/// record of every stub's argv.
struct Rig {
    dir: tempfile::TempDir,
    /// The stubs, first on `PATH` (and `PG_BIN`).
    bin: PathBuf,
    /// What the stubs keep (a domain defined, a mail's body, the state of a stubbed server).
    state: PathBuf,
    /// `RUN_DIR`.
    run: PathBuf,
    data: PathBuf,
    job: String,
}

/// The tools stubbed; each records its argv (tab-separated, one line per call) and then does
/// what the `stub_body` says.
const TOOLS: &[&str] = &[
    "virsh",
    "systemctl",
    "qemu-system-x86_64",
    "mount",
    "umount",
    "runuser",
    "su",
    "chown",
    "pg_ctl",
    "pg_ctlcluster",
    "pg_isready",
    "logger",
    "mail",
];

impl Rig {
    /// A rig whose replica is `data/replicas/s/JOB`, with every tool of [`TOOLS`] stubbed.
    fn new(job: &str) -> Rig {
        Rig::with_stubs(job, TOOLS)
    }

    fn with_stubs(job: &str, tools: &[&str]) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        // Reachable by other users (the postgres test's); the data directory below is not.
        chmod(dir.path(), 0o755);
        let r = Rig {
            bin: dir.path().join("bin"),
            state: dir.path().join("state"),
            run: dir.path().join("run"),
            data: dir.path().join("data"),
            job: job.to_string(),
            dir,
        };
        for d in [&r.bin, &r.state, &r.run] {
            fs::create_dir_all(d).unwrap();
        }
        chmod(&r.state, 0o777);
        for d in [r.data.clone(), r.data.join("replicas"), r.data.join("replicas/s"), r.replica()] {
            fs::create_dir_all(&d).unwrap();
            chmod(&d, 0o700);
        }
        let calls = r.calls_file();
        fs::write(&calls, "").unwrap();
        chmod(&calls, 0o666);
        for tool in tools {
            let p = r.bin.join(tool);
            fs::write(
                &p,
                format!(
                    "#!/bin/sh\n\
                     {{ printf '%s' \"${{0##*/}}\"; for a in \"$@\"; do printf '\\t%s' \"$a\"; done; printf '\\n'; }} >> {calls}\n\
                     {body}\n",
                    calls = calls.display(),
                    body = stub_body(tool, &r.state)
                ),
            )
            .unwrap();
            chmod(&p, 0o755);
        }
        r
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn replica(&self) -> PathBuf {
        self.replica_of(&self.job)
    }

    fn replica_of(&self, job: &str) -> PathBuf {
        self.data.join("replicas/s").join(job)
    }

    /// The replica's path with every symlink resolved (what the scripts hand on).
    fn real_replica(&self) -> String {
        self.replica().canonicalize().unwrap().display().to_string()
    }

    fn calls_file(&self) -> PathBuf {
        self.dir.path().join("calls")
    }

    /// Every stub call so far, in order, each as its argv (the tool's name first).
    fn calls(&self) -> Vec<Vec<String>> {
        fs::read_to_string(self.calls_file())
            .unwrap()
            .lines()
            .map(|l| l.split('\t').map(str::to_string).collect())
            .collect()
    }

    /// The environment `doppel failover` gives a per-job script (see `crates/failover`).
    fn env(&self, cmd: &mut Command) {
        cmd.env_clear()
            .env(
                "PATH",
                format!(
                    "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    self.bin.display()
                ),
            )
            .env("DOPPEL_SOURCE", "s")
            .env("DOPPEL_STEP", "failover")
            .env("DOPPEL_JOBS", &self.job)
            .env("DOPPEL_DATA", &self.data)
            .env("DOPPEL_JOB", &self.job)
            .env("DOPPEL_REPLICA", self.replica())
            .env("DOPPEL_EPOCH", "2");
    }

    /// Runs `SETTINGS SCRIPT` through `/bin/sh -c` as a `failover = [...]` line does, with
    /// `extra` added to the environment (values a config line would need quoting for).
    fn run(&self, settings: &str, script: &str, extra: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new("/bin/sh");
        self.env(&mut cmd);
        cmd.arg("-c").arg(format!("RUN_DIR={} {settings} {}", self.run.display(), example(script).display()));
        for (k, v) in extra {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    }

    /// [`Rig::run`], which must succeed.
    fn ok(&self, settings: &str, script: &str, extra: &[(&str, &str)]) -> String {
        let out = self.run(settings, script, extra);
        let text =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(
            out.status.success(),
            "{script} {settings} {extra:?} failed: {text}\ncalls: {:?}",
            self.calls()
        );
        text
    }

    /// [`Rig::run`], which must be refused: non-zero, `why` in its stderr, no tool run.
    fn refused(&self, settings: &str, script: &str, extra: &[(&str, &str)], why: &str) {
        let out = self.run(settings, script, extra);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{script} {settings} {extra:?} was not refused; stdout: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(err.contains(why), "{script} {settings} {extra:?}: wanted {why:?} in: {err}");
        assert!(err.starts_with(&format!("{script}: ")), "a message that does not name the script: {err}");
        assert_eq!(self.calls(), Vec::<Vec<String>>::new(), "{script} {settings} {extra:?} ran tools");
    }
}

/// What each stub does after recording its call.
fn stub_body(tool: &str, state: &Path) -> String {
    let s = state.display();
    match tool {
        // `domstate` says what the state file says; `define` keeps the XML it was given.
        "virsh" => format!(
            "case $1 in\n\
             domstate) cat {s}/virsh.state 2>/dev/null || echo 'shut off' ;;\n\
             define) cp \"$2\" {s}/defined.xml ;;\n\
             shutdown) echo 'shut off' > {s}/virsh.state ;;\n\
             esac"
        ),
        // Runs the command as root (the user switch is what the recorded argv shows).
        "runuser" | "su" => {
            "while [ \"$#\" -gt 0 ] && [ \"$1\" != -- ]; do shift; done; shift; exec \"$@\"".into()
        }
        // A server that runs after `start` until `stop`.
        "pg_ctl" => format!(
            "for a in \"$@\"; do last=$a; done\n\
             case $last in\n\
             status) [ -e {s}/pg.running ] ;;\n\
             start) touch {s}/pg.running ;;\n\
             stop) rm -f {s}/pg.running ;;\n\
             esac"
        ),
        "mail" => format!("cat >> {s}/mail.body"),
        _ => "exit 0".into(),
    }
}

/// How a case prepares its replica.
type Setup = dyn Fn(&Rig);

/// Settings given in the environment.
type Env<'a> = &'a [(&'a str, &'a str)];

fn argv(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| w.to_string()).collect()
}

/// A qcow2 header: version 3, `backing` naming a backing file (its offset non-zero) or not,
/// `data_file` the incompatible feature bit of an external data file.
fn qcow2(backing: bool, data_file: bool) -> Vec<u8> {
    let mut h = vec![0u8; 512];
    h[..4].copy_from_slice(b"QFI\xfb");
    h[4..8].copy_from_slice(&3u32.to_be_bytes());
    if backing {
        h[8..16].copy_from_slice(&400u64.to_be_bytes());
        h[16..20].copy_from_slice(&11u32.to_be_bytes());
        h[400..411].copy_from_slice(b"/etc/shadow");
    }
    if data_file {
        h[72..80].copy_from_slice(&4u64.to_be_bytes());
    }
    h
}

// ---------------------------------------------------------------------------------------------
// start-service.sh, stop-service.sh

/// The unit is the one SERVICE names, whatever the job is called; the drop-in gives it the
/// replica; exactly daemon-reload, start, is-active run.
#[test]
fn start_service_starts_the_configured_unit() {
    let rig = Rig::new("emergency");
    rig.ok("SERVICE=myapp.service BIND_TO=/var/lib/myapp", "start-service.sh", &[]);
    assert_eq!(
        rig.calls(),
        [
            argv(&["systemctl", "daemon-reload"]),
            argv(&["systemctl", "start", "myapp.service"]),
            argv(&["systemctl", "is-active", "--quiet", "myapp.service"]),
        ]
    );
    let r = rig.replica().display().to_string();
    assert_eq!(
        fs::read_to_string(rig.run.join("systemd/system/myapp.service.d/doppel-failover.conf")).unwrap(),
        format!("[Service]\nEnvironment=DOPPEL_REPLICA={r} DOPPEL_EPOCH=2\nBindPaths={r}:/var/lib/myapp\n")
    );
    rig.ok("SERVICE=myapp.service", "stop-service.sh", &[]);
    assert_eq!(
        rig.calls()[3..],
        [argv(&["systemctl", "stop", "myapp.service"]), argv(&["systemctl", "daemon-reload"])]
    );
    assert!(!rig.run.join("systemd/system/myapp.service.d/doppel-failover.conf").exists());
}

/// A job named `emergency` with no SERVICE configured starts nothing (before: emergency.service);
/// unit names with shell or unit-file metacharacters, or that are not services, are refused;
/// so is a job's run when ONLY_JOB names another job (it does nothing, successfully).
#[test]
fn start_service_never_takes_the_unit_from_the_job_name() {
    let rig = Rig::new("emergency");
    rig.refused("", "start-service.sh", &[], "set SERVICE");
    rig.refused("", "stop-service.sh", &[], "set SERVICE");
    for bad in [
        "x;reboot.service",
        "$(touch /pwned).service",
        "-emergency.service",
        "a b.service",
        "rescue.target",
        ".service",
    ] {
        rig.refused("", "start-service.sh", &[("SERVICE", bad)], "SERVICE");
        rig.refused("", "stop-service.sh", &[("SERVICE", bad)], "SERVICE");
    }
    rig.refused("SERVICE=app.service", "start-service.sh", &[("BIND_TO", "/srv/x y")], "BIND_TO");
    assert!(!rig.run.join("systemd").exists(), "a drop-in directory was made");
    let out = rig.ok("SERVICE=app.service ONLY_JOB=web", "start-service.sh", &[]);
    assert!(out.contains("nothing to do"), "{out}");
    assert_eq!(rig.calls(), Vec::<Vec<String>>::new());
}

// ---------------------------------------------------------------------------------------------
// start-vm.sh, stop-vm.sh

/// The administrator's domain XML, as `virsh dumpxml` writes it: a qcow2 system disk, a raw
/// data disk in a subdirectory, an empty CD-ROM drive, a network interface.
const DOMAIN: &str = "<domain type='kvm'>
  <name>vm1</name>
  <memory unit='KiB'>1048576</memory>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/vm1.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type=\"file\" device=\"disk\">
      <driver name=\"qemu\" type=\"raw\"/>
      <source file=\"/var/lib/libvirt/images/data/extra.img\" index=\"2\"/>
      <target dev=\"vdb\" bus=\"virtio\"/>
    </disk>
    <disk type='file' device='cdrom'>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <interface type='network'>
      <source network='default'/>
    </interface>
  </devices>
</domain>
";

/// What a hostile source puts in its replica as the domain's definition: the host's disk.
const HOSTILE_DOMAIN: &str = "<domain type='kvm'>
  <name>vm1</name>
  <devices>
    <disk type='block' device='disk'>
      <source dev='/dev/sda'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>
";

impl Rig {
    /// A replica with the images [`DOMAIN`] names (the data disk through a symlink that stays
    /// in the replica) and a hostile domain XML of its own; the administrator's XML in
    /// `etc/vm1.xml`.
    fn vm(job: &str) -> Rig {
        let rig = Rig::new(job);
        Tree::at(&rig.replica())
            .file("vm1.qcow2", &qcow2(false, false))
            .file("extra-real.img", &noise(1, 4096))
            .dir("data")
            .symlink("data/extra.img", "../extra-real.img")
            .file("vm1.xml", HOSTILE_DOMAIN.as_bytes());
        Tree::at(&rig.path("etc")).file("vm1.xml", DOMAIN.as_bytes());
        rig
    }

    fn vm_xml(&self) -> String {
        format!("VM_XML={}", self.path("etc/vm1.xml").display())
    }
}

/// libvirt: the domain defined is the administrator's XML with each disk pointed at the
/// (resolved) image in the replica, nothing else changed; the replica's own XML is not read.
/// Exactly domstate, define, start run; the rewritten XML is not left behind.
#[test]
fn start_vm_defines_the_targets_domain_on_the_replicas_images() {
    let rig = Rig::vm("emergency");
    rig.ok(&format!("VM_NAME=vm1 VM_BACKEND=libvirt {}", rig.vm_xml()), "start-vm.sh", &[]);
    let xml = rig.run.join("doppel-failover-vm1.xml").display().to_string();
    assert_eq!(
        rig.calls(),
        [
            argv(&["virsh", "domstate", "vm1"]),
            argv(&["virsh", "define", &xml]),
            argv(&["virsh", "start", "vm1"])
        ]
    );
    let r = rig.real_replica();
    let want = DOMAIN
        .replace("/var/lib/libvirt/images/vm1.qcow2", &format!("{r}/vm1.qcow2"))
        .replace("/var/lib/libvirt/images/data/extra.img", &format!("{r}/extra-real.img"));
    assert_eq!(fs::read_to_string(rig.state.join("defined.xml")).unwrap(), want);
    assert_eq!(fs::read_dir(&rig.run).unwrap().count(), 0, "left behind in RUN_DIR");
    // A rerun while it runs: nothing but the check.
    fs::write(rig.state.join("virsh.state"), "running\n").unwrap();
    let out = rig.ok(&format!("VM_NAME=vm1 VM_BACKEND=libvirt {}", rig.vm_xml()), "start-vm.sh", &[]);
    assert!(out.contains("already running"), "{out}");
    assert_eq!(rig.calls()[3..], [argv(&["virsh", "domstate", "vm1"])]);
    // stop-vm: shutdown, wait for it, undefine.
    rig.ok("VM_NAME=vm1 VM_BACKEND=libvirt", "stop-vm.sh", &[]);
    assert_eq!(
        rig.calls()[4..],
        [
            argv(&["virsh", "domstate", "vm1"]),
            argv(&["virsh", "shutdown", "vm1"]),
            argv(&["virsh", "domstate", "vm1"]),
            argv(&["virsh", "undefine", "vm1"]),
        ]
    );
}

/// Each way a replica or a domain XML could attach something of the host's is refused before
/// anything runs, with a message that says what and why.
#[test]
fn start_vm_refuses_anything_but_regular_images_inside_the_replica() {
    let settings = |rig: &Rig| format!("VM_NAME=vm1 VM_BACKEND=libvirt {}", rig.vm_xml());
    // Settings: no name (the job's is not used), a name with metacharacters, no XML here
    // (the replica's is not used).
    let rig = Rig::vm("vm1");
    rig.refused("VM_BACKEND=libvirt", "start-vm.sh", &[], "set VM_NAME");
    rig.refused("VM_BACKEND=libvirt", "stop-vm.sh", &[], "set VM_NAME");
    for bad in ["vm1;reboot", "$(reboot)", "-c", "vm 1"] {
        rig.refused("VM_BACKEND=libvirt", "start-vm.sh", &[("VM_NAME", bad)], "is not a plain name");
        rig.refused("VM_BACKEND=libvirt", "stop-vm.sh", &[("VM_NAME", bad)], "is not a plain name");
    }
    rig.refused(
        "VM_NAME=vm1 VM_BACKEND=libvirt",
        "start-vm.sh",
        &[("VM_XML", "/nonexistent/vm1.xml")],
        "no domain XML at /nonexistent/vm1.xml",
    );
    rig.refused(&settings(&rig), "start-vm.sh", &[("SOURCE_DIR", "/var/lib/$(reboot)")], "SOURCE_DIR");

    // Domain XMLs that attach the host's things.
    let xml_cases: &[(&str, &str, &str)] = &[
        (
            "block device",
            "<disk type='block' device='disk'>\n      <source dev='/dev/sda'/>",
            "a disk that is not a file in the replica: <disk type='block' device='disk'>",
        ),
        (
            "file disk naming a device",
            "<disk type='file' device='disk'>\n      <source dev='/dev/sda'/>",
            "a disk source that is not a file: <source dev='/dev/sda'/>",
        ),
        (
            "network disk",
            "<disk type='network' device='disk'>\n      <source protocol='nbd' name='x'/>",
            "not a file in the replica",
        ),
        (
            "disk outside SOURCE_DIR",
            "<disk type='file' device='disk'>\n      <source file='/etc/shadow'/>",
            "disk /etc/shadow is not under SOURCE_DIR (/var/lib/libvirt/images)",
        ),
        (
            "a format whose images name other files",
            "<disk type='file' device='disk'>\n      <driver name='qemu' type='vmdk'/>\n      <source file='/var/lib/libvirt/images/vm1.qcow2'/>",
            "a disk format other than raw or qcow2 (its image could name other files): <driver name='qemu' type='vmdk'/>",
        ),
        (
            "a host directory",
            "<filesystem type='mount'>\n      <source dir='/'/>\n    </filesystem>\n    <disk type='file' device='disk'>\n      <source file='/var/lib/libvirt/images/vm1.qcow2'/>",
            "attaches a host directory or device: <filesystem type='mount'>",
        ),
        (
            "a host device",
            "<hostdev mode='subsystem' type='pci'>\n    </hostdev>\n    <disk type='file' device='disk'>\n      <source file='/var/lib/libvirt/images/vm1.qcow2'/>",
            "attaches a host directory or device",
        ),
        (
            "a path climbing out",
            "<disk type='file' device='disk'>\n      <source file='/var/lib/libvirt/images/../../../../../../../../../../../../../../etc/shadow'/>",
            "resolves to /etc/shadow, outside the replica",
        ),
    ];
    for (what, disk, why) in xml_cases {
        let rig = Rig::vm("vm1");
        let xml = DOMAIN.replacen("<disk type='file' device='disk'>\n      <driver name='qemu' type='qcow2'/>\n      <source file='/var/lib/libvirt/images/vm1.qcow2'/>", disk, 1);
        assert_ne!(xml, DOMAIN, "{what}");
        fs::write(rig.path("etc/vm1.xml"), xml).unwrap();
        println!("{what}");
        rig.refused(&settings(&rig), "start-vm.sh", &[], why);
    }
    let rig = Rig::vm("vm1");
    fs::write(rig.path("etc/vm1.xml"), DOMAIN.replace("<name>vm1</name>", "<name>prod-db</name>")).unwrap();
    rig.refused(&settings(&rig), "start-vm.sh", &[], "names the domain \"prod-db\", not VM_NAME vm1");

    // Replicas whose images lead out, or are not images.
    fn other(rig: &Rig) {
        Tree::at(&rig.replica_of("other")).file("disk.img", b"another job's disk");
    }
    let image_cases: &[(&str, &Setup, &str)] = &[
        (
            "symlink to /etc/shadow",
            &|r: &Rig| {
                fs::remove_file(r.replica().join("vm1.qcow2")).unwrap();
                Tree::at(&r.replica()).symlink("vm1.qcow2", "/etc/shadow");
            },
            "vm1.qcow2 resolves to /etc/shadow, outside the replica",
        ),
        (
            "symlink to a device",
            &|r: &Rig| {
                fs::remove_file(r.replica().join("vm1.qcow2")).unwrap();
                Tree::at(&r.replica()).symlink("vm1.qcow2", "/dev/null");
            },
            "resolves to /dev/null, outside the replica",
        ),
        (
            "symlink into another job's replica",
            &|r: &Rig| {
                other(r);
                fs::remove_file(r.replica().join("vm1.qcow2")).unwrap();
                Tree::at(&r.replica()).symlink("vm1.qcow2", "../other/disk.img");
            },
            "outside the replica",
        ),
        (
            "directory in a symlinked path",
            &|r: &Rig| {
                fs::remove_file(r.replica().join("data/extra.img")).unwrap();
                fs::remove_dir(r.replica().join("data")).unwrap();
                Tree::at(&r.replica()).symlink("data", "/dev");
            },
            "outside the replica",
        ),
        (
            "a directory",
            &|r: &Rig| {
                fs::remove_file(r.replica().join("vm1.qcow2")).unwrap();
                Tree::at(&r.replica()).dir("vm1.qcow2");
            },
            "vm1.qcow2 is not a regular file",
        ),
        (
            "missing",
            &|r: &Rig| fs::remove_file(r.replica().join("vm1.qcow2")).unwrap(),
            "vm1.qcow2 is not a regular file",
        ),
        (
            "qcow2 with a backing file",
            &|r: &Rig| {
                fs::write(r.replica().join("vm1.qcow2"), qcow2(true, false)).unwrap();
            },
            "qcow2 image with a backing file",
        ),
        (
            "qcow2 with an external data file",
            &|r: &Rig| {
                fs::write(r.replica().join("vm1.qcow2"), qcow2(false, true)).unwrap();
            },
            "qcow2 image with an external data file",
        ),
        (
            "a name with metacharacters",
            &|r: &Rig| {
                fs::remove_file(r.replica().join("vm1.qcow2")).unwrap();
                fs::write(r.replica().join("x'y.img"), b"").unwrap();
                Tree::at(&r.replica()).symlink("vm1.qcow2", "x'y.img");
            },
            "has characters other than",
        ),
    ];
    for (what, setup, why) in image_cases {
        let rig = Rig::vm("vm1");
        setup(&rig);
        println!("{what}");
        rig.refused(&settings(&rig), "start-vm.sh", &[], why);
    }
}

/// QEMU directly: the one image of the replica, resolved, in a `-drive` whose options cannot
/// be extended by the image's name; a symlink out of the replica, an image named to inject
/// options, several images, or a VM_IMAGE leaving the replica, are refused.
#[test]
fn start_vm_qemu_boots_the_replicas_image_only() {
    let rig = Rig::new("emergency");
    Tree::at(&rig.replica()).file("disk.qcow2", &qcow2(false, false)).file("notes.txt", b"not an image");
    // KVM named explicitly: the default depends on whether this machine's /dev/kvm opens.
    rig.ok("VM_NAME=vm1 VM_BACKEND=qemu QEMU_ACCEL=kvm", "start-vm.sh", &[]);
    let pid = rig.run.join("doppel-vm-vm1.pid").display().to_string();
    let drive = format!("file={}/disk.qcow2,format=qcow2,if=virtio,cache=none", rig.real_replica());
    assert_eq!(
        rig.calls(),
        [argv(&[
            "qemu-system-x86_64",
            "-name",
            "vm1",
            "-enable-kvm",
            "-m",
            "2048",
            "-smp",
            "2",
            "-drive",
            &drive,
            "-display",
            "none",
            "-daemonize",
            "-pidfile",
            &pid
        ])]
    );
    // Where KVM is not usable, QEMU's emulator: the same line with `-accel tcg`.
    let tcg = Rig::new("emergency");
    Tree::at(&tcg.replica()).file("disk.qcow2", &qcow2(false, false));
    tcg.ok("VM_NAME=vm1 VM_BACKEND=qemu QEMU_ACCEL=tcg", "start-vm.sh", &[]);
    let call = &tcg.calls()[0];
    assert_eq!(call[3..5], ["-accel".to_string(), "tcg".to_string()], "{call:?}");
    assert!(!call.contains(&"-enable-kvm".to_string()), "{call:?}");
    let bad = Rig::new("emergency");
    Tree::at(&bad.replica()).file("disk.qcow2", &qcow2(false, false));
    bad.refused(
        "VM_NAME=vm1 VM_BACKEND=qemu QEMU_ACCEL=hvf",
        "start-vm.sh",
        &[],
        "QEMU_ACCEL must be kvm or tcg",
    );

    let cases: &[(&str, &Setup, Env, &str)] = &[
        (
            "symlink to /etc/shadow",
            &|r: &Rig| {
                Tree::at(&r.replica()).symlink("disk.img", "/etc/shadow");
            },
            &[],
            "disk.img resolves to /etc/shadow, outside the replica",
        ),
        (
            "symlink into another replica",
            &|r: &Rig| {
                Tree::at(&r.replica_of("other")).file("d.img", b"x");
                Tree::at(&r.replica()).symlink("disk.img", "../other/d.img");
            },
            &[],
            "outside the replica",
        ),
        (
            "option injection in the name",
            &|r: &Rig| {
                Tree::at(&r.replica()).file("a,file=.etc.shadow.img", b"x");
            },
            &[],
            "has characters other than",
        ),
        (
            "two images",
            &|r: &Rig| {
                Tree::at(&r.replica()).file("a.img", b"x").file("b.img", b"y");
            },
            &[],
            "several disk images",
        ),
        ("none", &|_: &Rig| {}, &[], "no disk image"),
        (
            "VM_IMAGE out of the replica",
            &|r: &Rig| {
                Tree::at(&r.replica()).file("a.img", b"x");
            },
            &[("VM_IMAGE", "../../../../../etc/shadow")],
            "must be a path inside the replica",
        ),
        (
            "qcow2 with a backing file",
            &|r: &Rig| {
                Tree::at(&r.replica()).file("a.qcow2", &qcow2(true, false));
            },
            &[],
            "backing file",
        ),
    ];
    for (what, setup, extra, why) in cases {
        let rig = Rig::new("vm1");
        setup(&rig);
        println!("{what}");
        rig.refused("VM_NAME=vm1 VM_BACKEND=qemu", "start-vm.sh", extra, why);
    }
}

// ---------------------------------------------------------------------------------------------
// start-postgres.sh, stop-postgres.sh

impl Rig {
    /// A replica holding a cluster (owned by `nobody`, as the source's postgres uid would own
    /// it), `pg/` a root-only directory for PG_DATA, `log/` for the server's log.
    fn pg() -> Rig {
        Rig::pg_with(TOOLS)
    }

    fn pg_with(tools: &[&str]) -> Rig {
        let rig = Rig::with_stubs("pgdata", tools);
        Tree::at(&rig.replica()).file("PG_VERSION", b"15\n").file("postmaster.pid", b"4242\n");
        std::os::unix::fs::chown(rig.replica(), Some(65534), Some(65534)).unwrap();
        fs::create_dir(rig.path("pg")).unwrap();
        chmod(&rig.path("pg"), 0o755);
        fs::create_dir(rig.path("log")).unwrap();
        chmod(&rig.path("log"), 0o777);
        rig
    }

    fn pg_settings(&self) -> String {
        format!(
            "PG_USER=nobody PG_BIN={} PG_PORT=5433 PG_DATA={} PG_LOG={}",
            self.bin.display(),
            self.pg_data(),
            self.path("log/pg.log").display()
        )
    }

    fn pg_data(&self) -> String {
        self.path("pg/main").display().to_string()
    }
}

/// The replica is bind-mounted on PG_DATA (then made nosuid, nodev, noexec) and the server
/// started there as PG_USER, with the configuration's data_directory overridden; the log,
/// a symlink planted in the log directory, is neither created nor chowned by root.
#[test]
fn start_postgres_mounts_the_replica_and_runs_the_server_as_its_user() {
    if !require(rustix::process::geteuid().is_root(), "the postgres scripts run as root") {
        return;
    }
    let rig = Rig::pg();
    let victim = rig.path("victim");
    fs::write(&victim, "root's").unwrap();
    std::os::unix::fs::symlink(&victim, rig.path("log/pg.log")).unwrap();
    let (d, bin, log) =
        (rig.pg_data(), rig.bin.display().to_string(), rig.path("log/pg.log").display().to_string());
    let pg_ctl = format!("{bin}/pg_ctl");
    let opts =
        format!("-p 5433 -c config_file=/etc/postgresql/15/main/postgresql.conf -c data_directory={d}");
    rig.ok(&format!("{} PG_CONF=/etc/postgresql/15/main", rig.pg_settings()), "start-postgres.sh", &[]);
    let r = rig.replica().display().to_string();
    assert_eq!(
        rig.calls(),
        [
            argv(&["mount", "--bind", &r, &d]),
            argv(&["mount", "-o", "remount,bind,nosuid,nodev,noexec", &d]),
            argv(&["runuser", "-u", "nobody", "--", &pg_ctl, "-D", &d, "status"]),
            argv(&["pg_ctl", "-D", &d, "status"]),
            argv(&[
                "runuser", "-u", "nobody", "--", &pg_ctl, "-D", &d, "-o", &opts, "-l", &log, "-w", "-t",
                "300", "start"
            ]),
            argv(&["pg_ctl", "-D", &d, "-o", &opts, "-l", &log, "-w", "-t", "300", "start"]),
            argv(&["pg_isready", "-p", "5433", "-t", "60"]),
        ]
    );
    assert_eq!(fs::metadata(rig.path("pg/main")).unwrap().mode() & 0o7777, 0o755);
    assert_eq!(fs::metadata(&victim).unwrap().uid(), 0, "root chowned the log's symlink target");
    assert_eq!(fs::read_to_string(&victim).unwrap(), "root's");
    // stop-postgres: a fast stop as the user; nothing to unmount (the stub mounted nothing).
    rig.ok(&rig.pg_settings(), "stop-postgres.sh", &[]);
    assert_eq!(
        rig.calls()[7..],
        [
            argv(&["runuser", "-u", "nobody", "--", &pg_ctl, "-D", &d, "status"]),
            argv(&["pg_ctl", "-D", &d, "status"]),
            argv(&[
                "runuser", "-u", "nobody", "--", &pg_ctl, "-D", &d, "-m", "fast", "-w", "-t", "300", "stop"
            ]),
            argv(&["pg_ctl", "-D", &d, "-m", "fast", "-w", "-t", "300", "stop"]),
        ]
    );
}

/// Where PG_DATA could be swapped for a symlink by someone other than root, where a setting
/// would reach pg_ctl's shell command line, or the server would run as root: refused before
/// anything runs or is made.
#[test]
fn start_postgres_refuses_unsafe_settings() {
    if !require(rustix::process::geteuid().is_root(), "the postgres scripts run as root") {
        return;
    }
    let rig = Rig::pg();
    let s = rig.pg_settings();
    rig.refused(
        &s.replace(&format!("PG_DATA={}", rig.pg_data()), ""),
        "start-postgres.sh",
        &[],
        "set PG_DATA",
    );
    rig.refused(
        &s.replace(&format!("PG_DATA={}", rig.pg_data()), ""),
        "stop-postgres.sh",
        &[],
        "set PG_DATA",
    );
    // A parent writable by others, a symlinked parent, a symlink as PG_DATA.
    fs::create_dir(rig.path("loose")).unwrap();
    chmod(&rig.path("loose"), 0o777);
    let loose = rig.path("loose/main").display().to_string();
    let without = |key: &str| {
        s.split(' ').filter(|kv| !kv.starts_with(&format!("{key}="))).collect::<Vec<_>>().join(" ")
    };
    rig.refused(
        &without("PG_DATA"),
        "start-postgres.sh",
        &[("PG_DATA", &loose)],
        "(above PG_DATA) is writable by others than root",
    );
    std::os::unix::fs::symlink(rig.path("pg"), rig.path("link")).unwrap();
    let linked = rig.path("link/main").display().to_string();
    rig.refused(
        &without("PG_DATA"),
        "start-postgres.sh",
        &[("PG_DATA", &linked)],
        "(above PG_DATA) is a symlink or not a directory",
    );
    std::os::unix::fs::symlink("/etc", rig.path("pg/main")).unwrap();
    rig.refused(&s, "start-postgres.sh", &[], "is a symlink");
    fs::remove_file(rig.path("pg/main")).unwrap();
    for (k, v, why) in [
        ("PG_DATA", "relative/main", "is not an absolute path"),
        ("PG_DATA", "/srv/pg/$(reboot)", "has characters other than"),
        ("PG_DATA", "/srv/pg/../../etc", "has a .. component"),
        ("PG_PORT", "5432 -c archive_command=reboot", "is not a port number"),
        ("PG_CONF", "/etc/postgresql/\"x", "has characters other than"),
        ("PG_LOG", "/var/log/`reboot`.log", "has characters other than"),
        ("PG_USER", "root", "PG_USER must not be root"),
        ("PG_USER", "-f", "is not a user name"),
        ("DOPPEL_JOB", "x$(reboot)", "is not a plain name"),
    ] {
        rig.refused(&without(k), "start-postgres.sh", &[(k, v)], why);
    }
    assert!(!rig.path("pg/main").exists(), "PG_DATA was made");
}

/// The access the `postgres` user gets, for real: the replica bind-mounted on PG_DATA, the
/// server's stub started through the real `runuser` as `nobody` (the replica's owner). It
/// reads and writes its replica through PG_DATA, and cannot reach it through the data
/// directory, nor another replica of the same source whose own mode lets everyone in; the
/// mount is nosuid, nodev, noexec; the data directory stays 0700. A rerun does not mount
/// twice; stop-postgres takes the mount away.
#[test]
fn start_postgres_gives_the_service_user_its_replica_and_nothing_else() {
    if !require(rustix::process::geteuid().is_root(), "bind mounts and runuser need root") {
        return;
    }
    let Some([_runuser, findmnt]) = doppel_testkit::require_tools(["runuser", "findmnt"]) else {
        return;
    };
    let rig = Rig::pg_with(&["pg_ctl", "pg_isready"]);
    let probe = rig.state.join("probe");
    let other = rig.replica_of("other");
    Tree::at(&other).file("secret", b"another job's data");
    chmod(&other, 0o755);
    chmod(&other.join("secret"), 0o644);
    // The server's stub, run as the user: what can it reach?
    let pg_ctl = rig.bin.join("pg_ctl");
    let stub = fs::read_to_string(&pg_ctl).unwrap().replace(
        "start) touch",
        &format!(
            "start) d=$2\n\
             {{ echo \"uid $(id -u)\"; echo \"version $(cat \"$d/PG_VERSION\")\"; \
             if cat {other}/secret >/dev/null 2>&1; then echo 'other: reachable'; else echo 'other: denied'; fi; \
             if cat {replica}/PG_VERSION >/dev/null 2>&1; then echo 'direct: reachable'; else echo 'direct: denied'; fi; \
             echo written > \"$d/written\" && echo 'write: ok'; }} >> {probe}\n\
             touch",
            other = other.display(),
            replica = rig.replica().display(),
            probe = probe.display()
        ),
    );
    fs::write(&pg_ctl, stub).unwrap();
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            while Command::new("mountpoint").arg("-q").arg(&self.0).status().is_ok_and(|s| s.success()) {
                let _ = Command::new("umount").arg("-l").arg(&self.0).status();
            }
        }
    }
    let _guard = Unmount(rig.path("pg/main"));
    // The source's lock file, a symlink to a file of the target's: removed, not followed.
    let victim = rig.path("victim");
    fs::write(&victim, "root's").unwrap();
    fs::remove_file(rig.replica().join("postmaster.pid")).unwrap();
    std::os::unix::fs::symlink(&victim, rig.replica().join("postmaster.pid")).unwrap();
    rig.ok(&rig.pg_settings(), "start-postgres.sh", &[]);
    assert_eq!(
        fs::read_to_string(&probe).unwrap(),
        "uid 65534\nversion 15\nother: denied\ndirect: denied\nwrite: ok\n",
        "what the user reached"
    );
    let written = rig.replica().join("written");
    assert_eq!(fs::read_to_string(&written).unwrap(), "written\n");
    assert_eq!(fs::metadata(&written).unwrap().uid(), 65534);
    assert!(
        rig.replica().join("postmaster.pid").symlink_metadata().is_err(),
        "the source's lock file was left"
    );
    assert_eq!(fs::read_to_string(&victim).unwrap(), "root's", "the lock file's symlink was followed");
    let opts = Command::new(&findmnt)
        .args(["-n", "-o", "OPTIONS", "--mountpoint"])
        .arg(rig.path("pg/main"))
        .output()
        .unwrap();
    let opts = String::from_utf8_lossy(&opts.stdout).trim().to_string();
    for o in ["nosuid", "nodev", "noexec"] {
        assert!(opts.split(',').any(|x| x == o), "mount options {opts:?} lack {o}");
    }
    for d in [rig.data.clone(), rig.data.join("replicas"), rig.data.join("replicas/s")] {
        assert_eq!(fs::metadata(&d).unwrap().mode() & 0o7777, 0o700, "{}", d.display());
    }
    let d = rig.pg_data();
    let log = rig.path("log/pg.log").display().to_string();
    assert_eq!(
        rig.calls(),
        [
            argv(&["pg_ctl", "-D", &d, "status"]),
            argv(&["pg_ctl", "-D", &d, "-o", "-p 5433", "-l", &log, "-w", "-t", "300", "start"]),
            argv(&["pg_isready", "-p", "5433", "-t", "60"])
        ]
    );
    // A rerun of the failover: the server runs, the mount is there once.
    let out = rig.ok(&rig.pg_settings(), "start-postgres.sh", &[]);
    assert!(out.contains("already running"), "{out}");
    let n = Command::new(&findmnt)
        .args(["-n", "-o", "TARGET", "--mountpoint"])
        .arg(rig.path("pg/main"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&n.stdout).lines().count(), 1, "mounted twice");
    // Failback: stopped, unmounted; the user reaches nothing any more.
    rig.ok(&rig.pg_settings(), "stop-postgres.sh", &[]);
    assert_eq!(
        rig.calls()[4..],
        [
            argv(&["pg_ctl", "-D", &d, "status"]),
            argv(&["pg_ctl", "-D", &d, "-m", "fast", "-w", "-t", "300", "stop"])
        ]
    );
    assert!(!Command::new("mountpoint").arg("-q").arg(&d).status().unwrap().success(), "still mounted");
    let st = Command::new("runuser")
        .args(["-u", "nobody", "--", "test", "-e"])
        .arg(format!("{d}/PG_VERSION"))
        .status()
        .unwrap();
    assert!(!st.success(), "the user still sees the replica");
}

// ---------------------------------------------------------------------------------------------
// notify.sh

/// The detail (which can quote the source's file names) reaches the journal and the mail as
/// one line of printable characters: no forged log line, no `~!` mailer escape at a line's
/// start; a MAILTO that reads as an option is refused.
#[test]
fn notify_flattens_the_detail() {
    let rig = Rig::new("j");
    let detail = "`start-vm.sh` failed (exit status: 1):\n    refused: disk image a\n~!reboot\r\x1b[2J.img";
    let flat = "`start-vm.sh` failed (exit status: 1):     refused: disk image a ~!reboot [2J.img";
    let env = [("DOPPEL_EVENT", "failover-failed"), ("DOPPEL_DETAIL", detail)];
    rig.ok("MAILTO=ops@example.com", "notify.sh", &env);
    let msg = format!("doppel: failover-failed on s: {flat}");
    assert_eq!(
        rig.calls(),
        [
            argv(&["logger", "-t", "doppel", "-p", "daemon.crit", "--", &msg]),
            argv(&["mail", "-s", "doppel: failover-failed on s", "ops@example.com"]),
        ]
    );
    assert_eq!(fs::read_to_string(rig.state.join("mail.body")).unwrap(), format!("{msg}\n"));
    let rig = Rig::new("j");
    let out = rig.run("", "notify.sh", &[("DOPPEL_EVENT", "failover-done"), ("MAILTO", "-oQ/tmp/x")]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a list of mail addresses"));
    assert_eq!(rig.calls().iter().map(|c| c[0].as_str()).collect::<Vec<_>>(), ["logger"]);
}

// ---------------------------------------------------------------------------------------------
// Through doppel

/// Must-show 6 of issue 10, end to end: a source replicates a job named `emergency` holding a
/// domain XML that attaches the host's disk; `doppel failover` runs the shipped scripts from
/// the target's config: exactly the unit and the domain that config names are started, the
/// domain from the target's XML, on the replica's image.
#[test]
fn doppel_failover_runs_only_what_the_targets_config_says() {
    let rig = Rig::vm("emergency");
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    Tree::at(&src)
        .file("vm1.qcow2", &qcow2(false, false))
        .file("extra-real.img", &noise(1, 4096))
        .dir("data")
        .symlink("data/extra.img", "../extra-real.img")
        .symlink("shadow.img", "/etc/shadow")
        .file("vm1.xml", HOSTILE_DOMAIN.as_bytes());
    let home = dir.path().join("source-home");
    let sid = init(&home);
    let path = format!("PATH={}:$PATH RUN_DIR={}", rig.bin.display(), rig.run.display());
    let config = format!(
        "[[target.allow]]\nname = \"s\"\nid = \"{sid}\"\n\
         failover = [\"{path} SERVICE=app.service {service}\", \"{path} VM_NAME=vm1 VM_BACKEND=libvirt {xml} {vm}\"]\n",
        service = example("start-service.sh").display(),
        xml = rig.vm_xml(),
        vm = example("start-vm.sh").display(),
    );
    let target = start_target_config(dir.path(), &config, "127.0.0.1:0", &dir.path().join("data"), None);
    let replica = target.data.join("replicas/s/emergency");
    let mut agent = target.protect(&home, "agent", &src, &["--name", "emergency", "--capture", "inotify"]);
    wait_converged(&src, &replica, Duration::from_secs(30), &mut agent);
    let (st, out, err) = run(&dir.path().join("target-home"), &["failover", "s"]);
    assert!(st.success(), "failover: {out}{err}");
    let xml = rig.run.join("doppel-failover-vm1.xml").display().to_string();
    assert_eq!(
        rig.calls(),
        [
            argv(&["systemctl", "daemon-reload"]),
            argv(&["systemctl", "start", "app.service"]),
            argv(&["systemctl", "is-active", "--quiet", "app.service"]),
            argv(&["virsh", "domstate", "vm1"]),
            argv(&["virsh", "define", &xml]),
            argv(&["virsh", "start", "vm1"]),
        ]
    );
    let r = replica.canonicalize().unwrap().display().to_string();
    let want = DOMAIN
        .replace("/var/lib/libvirt/images/vm1.qcow2", &format!("{r}/vm1.qcow2"))
        .replace("/var/lib/libvirt/images/data/extra.img", &format!("{r}/extra-real.img"));
    assert_eq!(fs::read_to_string(rig.state.join("defined.xml")).unwrap(), want);
    let dropin =
        fs::read_to_string(rig.run.join("systemd/system/app.service.d/doppel-failover.conf")).unwrap();
    assert_eq!(
        dropin,
        format!("[Service]\nEnvironment=DOPPEL_REPLICA={} DOPPEL_EPOCH=2\n", replica.display())
    );
}

/// A port nobody listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The real thing: a PostgreSQL cluster (owned by `postgres`, as on the source) replicates
/// through doppel; `doppel failover` runs `start-postgres.sh`, which serves it as `postgres`
/// from PG_DATA: the rows written on the source are there, the server's data directory is
/// PG_DATA, and `postgres` still cannot reach the replica through the target's data directory.
/// `stop-postgres.sh` stops it and takes the mount away.
#[test]
fn a_real_postgres_fails_over_as_its_user_onto_its_replica() {
    if !require(rustix::process::geteuid().is_root(), "bind mounts and runuser need root") {
        return;
    }
    let Some([runuser, _findmnt]) = doppel_testkit::require_tools(["runuser", "findmnt"]) else {
        return;
    };
    let pg_bin = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|b| b.join("initdb").is_file())
        // The newest major version (9.6 sorts after 15 as text).
        .max_by_key(|b| {
            let v = b.parent().and_then(|v| v.file_name()).and_then(|v| v.to_str()).unwrap_or("");
            v.split('.').next().and_then(|m| m.parse::<u32>().ok()).unwrap_or(0)
        });
    let Some(pg_bin) = doppel_testkit::require_ok(
        pg_bin.ok_or_else(|| "PostgreSQL (/usr/lib/postgresql/*/bin) is not installed".to_string()),
    ) else {
        return;
    };
    let id = Command::new("id").args(["-u", "postgres"]).output().unwrap();
    if !require(id.status.success(), "no postgres user") {
        return;
    }
    let uid: u32 = String::from_utf8_lossy(&id.stdout).trim().parse().unwrap();
    let as_postgres = |args: &[&str]| {
        let out = Command::new(&runuser).args(["-u", "postgres", "--"]).args(args).output().unwrap();
        let text =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    };
    let tool = |name: &str| pg_bin.join(name).display().to_string();

    let dir = tempfile::tempdir().unwrap();
    chmod(dir.path(), 0o755);
    let (src, pg, log) = (dir.path().join("src"), dir.path().join("pg"), dir.path().join("log"));
    for d in [&src, &pg, &log] {
        fs::create_dir(d).unwrap();
    }
    for d in [&src, &log] {
        std::os::unix::fs::chown(d, Some(uid), None).unwrap();
    }
    let cluster = src.join("pgdata");
    let pg_data = pg.join("main");
    // Stops whatever server and mount a failure leaves behind.
    struct Cleanup(String, PathBuf, PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            for d in [&self.1, &self.2] {
                let _ = Command::new("runuser")
                    .args(["-u", "postgres", "--", &self.0, "-D"])
                    .arg(d)
                    .args(["-m", "immediate", "stop"])
                    .output();
            }
            while Command::new("mountpoint").arg("-q").arg(&self.2).status().is_ok_and(|s| s.success()) {
                let _ = Command::new("umount").arg("-l").arg(&self.2).status();
            }
        }
    }
    let _cleanup = Cleanup(tool("pg_ctl"), cluster.clone(), pg_data.clone());

    // The source: a cluster with a table, shut down cleanly.
    let (ok, text) =
        as_postgres(&[&tool("initdb"), "-D", cluster.to_str().unwrap(), "-A", "trust", "--no-sync"]);
    assert!(ok, "initdb: {text}");
    let sock = src.display().to_string();
    let (ok, text) = as_postgres(&[
        &tool("pg_ctl"),
        "-D",
        cluster.to_str().unwrap(),
        "-o",
        &format!("-p {} -k {sock} -c listen_addresses=", free_port()),
        "-l",
        log.join("source.log").to_str().unwrap(),
        "-w",
        "start",
    ]);
    assert!(ok, "source server: {text}");
    let port_of_source =
        fs::read_to_string(cluster.join("postmaster.pid")).unwrap().lines().nth(3).unwrap().to_string();
    let (ok, text) = as_postgres(&[
        &tool("psql"),
        "-h",
        &sock,
        "-p",
        &port_of_source,
        "-d",
        "postgres",
        "-Atc",
        "create table t (x int); insert into t select generate_series(1, 100)",
    ]);
    assert!(ok, "psql: {text}");
    let (ok, text) =
        as_postgres(&[&tool("pg_ctl"), "-D", cluster.to_str().unwrap(), "-m", "fast", "-w", "stop"]);
    assert!(ok, "stop: {text}");

    // Replicated to a target whose failover starts the server.
    let port = free_port();
    let settings = format!(
        "PG_BIN={} PG_PORT={port} PG_DATA={} PG_LOG={}",
        pg_bin.display(),
        pg_data.display(),
        log.join("failover.log").display()
    );
    let home = dir.path().join("source-home");
    let sid = init(&home);
    let config = format!(
        "[[target.allow]]\nname = \"s\"\nid = \"{sid}\"\nfailover = [\"{settings} {}\"]\n",
        example("start-postgres.sh").display()
    );
    let target = start_target_config(dir.path(), &config, "127.0.0.1:0", &dir.path().join("data"), None);
    let replica = target.data.join("replicas/s/pgdata");
    let mut agent = target.protect(&home, "agent", &cluster, &["--name", "pgdata", "--capture", "inotify"]);
    wait_converged(&cluster, &replica, Duration::from_secs(30), &mut agent);
    let (st, out, err) = run(&dir.path().join("target-home"), &["failover", "s"]);
    assert!(
        st.success(),
        "failover: {out}{err}\nserver log: {}",
        fs::read_to_string(log.join("failover.log")).unwrap_or_default()
    );

    let q = |sql: &str| {
        as_postgres(&[
            &tool("psql"),
            "-h",
            "/var/run/postgresql",
            "-p",
            &port.to_string(),
            "-d",
            "postgres",
            "-Atc",
            sql,
        ])
    };
    assert_eq!(q("select count(*), sum(x) from t"), (true, "100|5050\n".to_string()));
    assert_eq!(q("show data_directory"), (true, format!("{}\n", pg_data.display())));
    let (reached, _) = as_postgres(&["test", "-r", replica.join("PG_VERSION").to_str().unwrap()]);
    assert!(!reached, "postgres reaches the replica through the data directory");
    assert_eq!(fs::metadata(&target.data).unwrap().mode() & 0o7777, 0o700);

    // Failback's first step: stopped, unmounted.
    let mut cmd = Command::new("/bin/sh");
    cmd.env("DOPPEL_JOB", "pgdata").env("DOPPEL_REPLICA", &replica).env("DOPPEL_STEP", "stop-workload");
    cmd.arg("-c").arg(format!("{settings} {}", example("stop-postgres.sh").display()));
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "stop-postgres: {}", String::from_utf8_lossy(&out.stderr));
    assert!(!q("select 1").0, "the server still answers");
    assert!(!Command::new("mountpoint").arg("-q").arg(&pg_data).status().unwrap().success(), "still mounted");
}
