//! The machine: what the report says it ran on, and the page-cache control that makes the
//! timed runs start cold.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The machine, as the report describes it.
#[derive(Debug, Clone)]
pub struct Machine {
    /// Online CPUs (`nproc`).
    pub cpus: usize,
    /// CPU model name.
    pub cpu_model: String,
    /// `MemTotal` in bytes.
    pub memory: u64,
    /// Kernel release.
    pub kernel: String,
    /// File system of `--dir`, as `stat -f -c %T` names it, with the mount's type if that is
    /// more precise (`stat` calls ext4 `ext2/ext3`).
    pub filesystem: String,
    /// `rsync --version`, first line (`not installed` when it is not).
    pub rsync: String,
    /// `fio --version` (`not installed` when it is not).
    pub fio: String,
    /// `doppel --version`.
    pub doppel: String,
    /// The commit the workspace was at, and whether `crates/` had uncommitted changes (the
    /// binaries are built from the working tree, which others may be editing).
    pub source: String,
}

impl Machine {
    /// Describes this machine and the file system holding `dir`.
    pub fn describe(dir: &Path, doppel: &Path) -> Result<Machine> {
        let meminfo = std::fs::read_to_string("/proc/meminfo")?;
        let mem_kib: u64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no MemTotal in /proc/meminfo")?;
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            .unwrap_or_else(|| "unknown".into());
        let stat_fs = output("stat", &["-f", "-c", "%T", &dir.to_string_lossy()])?;
        let mount_fs = output("findmnt", &["-n", "-o", "FSTYPE", "--target", &dir.to_string_lossy()]);
        let filesystem = match mount_fs {
            Ok(m) if !m.is_empty() && m != stat_fs => format!("{stat_fs} (mounted as {m})"),
            _ => stat_fs,
        };
        Ok(Machine {
            cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            cpu_model,
            memory: mem_kib * 1024,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")?.trim().to_string(),
            filesystem,
            rsync: version("rsync"),
            fio: version("fio"),
            doppel: output(&doppel.to_string_lossy(), &["--version"])?,
            source: source_revision(),
        })
    }

    /// A line for the progress log.
    pub fn one_line(&self) -> String {
        format!(
            "{} CPUs ({}), {:.1} GiB RAM, Linux {}, {}",
            self.cpus,
            self.cpu_model,
            self.memory as f64 / (1u64 << 30) as f64,
            self.kernel,
            self.filesystem
        )
    }

    /// The report's machine table under `heading` (`###` or `####`, as the report nests it):
    /// the columns every mode shares, then `tools` (a tool's name and version, or any other
    /// column the mode needs, such as the capture back-end), then doppel and the source.
    pub fn table(&self, heading: &str, tools: &[(&str, &str)]) -> String {
        let mut head = vec!["nproc", "CPU", "memory", "kernel", "file system of --dir"];
        let memory = format!("{:.1} GiB", self.memory as f64 / (1u64 << 30) as f64);
        let cpus = self.cpus.to_string();
        let mut row = vec![cpus.as_str(), self.cpu_model.as_str(), &memory, &self.kernel, &self.filesystem];
        for (name, value) in tools {
            head.push(name);
            row.push(value);
        }
        head.extend(["doppel", "source"]);
        row.extend([self.doppel.as_str(), self.source.as_str()]);
        format!(
            "{heading} Machine\n\n| {} |\n|{}\n| {} |\n\n",
            head.join(" | "),
            "---|".repeat(head.len()),
            row.join(" | ")
        )
    }
}

/// `COMMIT` or `COMMIT + uncommitted changes in crates/`, from the workspace this program was
/// built in; `unknown` outside a git checkout.
fn source_revision() -> String {
    let workspace = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let Ok(commit) = output("git", &["-C", workspace, "rev-parse", "--short", "HEAD"]) else {
        return "unknown".into();
    };
    match output("git", &["-C", workspace, "status", "--porcelain", "--", "crates"]) {
        Ok(changes) if changes.is_empty() => commit,
        Ok(changes) => {
            format!("{commit} + uncommitted changes to {} paths in crates/", changes.lines().count())
        }
        Err(_) => commit,
    }
}

/// The first line of `cmd --version`, or `not installed`.
fn version(cmd: &str) -> String {
    match output(cmd, &["--version"]) {
        Ok(v) => v.lines().next().unwrap_or_default().to_string(),
        Err(_) => "not installed".into(),
    }
}

/// The first line of a command's standard output, trimmed.
fn output(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd).args(args).output().with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!("{cmd} {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Fails with the fix when rsync is not installed: the comparison needs it.
pub fn require_rsync() -> Result<()> {
    match Command::new("rsync").arg("--version").output() {
        Ok(o) if o.status.success() => Ok(()),
        _ => bail!("rsync is not installed (or does not run); install it, e.g. `apt-get install -y rsync`"),
    }
}

/// Fails with the fix when fio is not installed: the `fuse` mode drives its workloads.
pub fn require_fio() -> Result<()> {
    match Command::new("fio").arg("--version").output() {
        Ok(o) if o.status.success() => Ok(()),
        _ => bail!("fio is not installed (or does not run); install it, e.g. `apt-get install -y fio`"),
    }
}

/// Fails unless root: dropping the page cache needs it, and both tools must start cold.
pub fn require_root() -> Result<()> {
    if !rustix::process::geteuid().is_root() {
        bail!("run as root: each timed run starts by dropping the page cache (/proc/sys/vm/drop_caches)");
    }
    Ok(())
}

/// Writes every dirty page back (`sync(2)`), so one run's writeback is not charged to the next.
pub fn sync() {
    rustix::fs::sync();
}

/// Syncs, then drops the page cache, dentries and inodes, so the next run reads from disk.
pub fn drop_caches() -> Result<()> {
    sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3\n").context("dropping the page cache")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_has_as_many_cells_as_columns() {
        let m = Machine {
            cpus: 2,
            cpu_model: "AMD EPYC".into(),
            memory: 24 << 30,
            kernel: "6.18".into(),
            filesystem: "ext4".into(),
            rsync: "rsync 3".into(),
            fio: "fio-3".into(),
            doppel: "doppel 0.1.0".into(),
            source: "abc1234".into(),
        };
        let t = m.table("####", &[("fio", &m.fio), ("capture", "fuse")]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "#### Machine");
        assert_eq!(
            lines[2],
            "| nproc | CPU | memory | kernel | file system of --dir | fio | capture | doppel | source |"
        );
        assert_eq!(lines[3], "|---|---|---|---|---|---|---|---|---|");
        assert_eq!(
            lines[4],
            "| 2 | AMD EPYC | 24.0 GiB | 6.18 | ext4 | fio-3 | fuse | doppel 0.1.0 | abc1234 |"
        );
    }
}
