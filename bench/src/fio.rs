//! fio, driven with `--output-format=json`: one job description, the exact command line, and
//! the bandwidth and IOPS parsed from its report.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// One fio job, as the `fuse` mode runs it on both sides.
#[derive(Debug, Clone)]
pub struct FioJob {
    /// fio's `--name` (also the name of the job in the report).
    pub name: &'static str,
    /// `--rw`: `write`, `randwrite`, `randread`, `read`.
    pub rw: &'static str,
    /// `--bs`.
    pub bs: &'static str,
    /// `--size`, in bytes (of the one file all the job's processes share).
    pub size: u64,
    /// `--runtime=N --time_based`, or run until `size` bytes are done.
    pub runtime: Option<u64>,
    /// `--numjobs` (the processes share the file; `--group_reporting` sums them).
    pub numjobs: u32,
    /// `--end_fsync=1`: the run includes writing the file back.
    pub end_fsync: bool,
    /// The job writes a new file, appending without preallocating it (`--overwrite=0
    /// --fallocate=none`, as `dd` or `cp` would); otherwise it works on a laid-out file, in
    /// place (`--overwrite=1`: a database or a disk image).
    pub new_file: bool,
    /// The file, relative to the directory the job runs in.
    pub file: &'static str,
    /// `O_DIRECT` with this many requests in flight (`--ioengine=libaio --direct=1
    /// --iodepth=N`), as a hypervisor with `cache=none` drives a disk image; `None`: buffered
    /// `psync`.
    pub direct_depth: Option<u32>,
}

impl FioJob {
    /// The arguments, for a run in `dir`. Buffered I/O (`--direct=0`, `psync`) unless the job
    /// is a VM-like `O_DIRECT` one, and no cache invalidation by fio:
    /// the benchmark decides whether a run starts cold (drops the page cache) or warm.
    pub fn args(&self, dir: &Path) -> Vec<String> {
        let mut a = vec![
            format!("--name={}", self.name),
            format!("--directory={}", dir.display()),
            format!("--filename={}", self.file),
            format!("--rw={}", self.rw),
            format!("--bs={}", self.bs),
            format!("--size={}", self.size),
            "--invalidate=0".into(),
            format!("--numjobs={}", self.numjobs),
            "--group_reporting".into(),
            "--output-format=json".into(),
            "--eta=never".into(),
        ];
        match self.direct_depth {
            None => a.extend(["--ioengine=psync".into(), "--direct=0".into()]),
            Some(d) => a.extend(["--ioengine=libaio".into(), "--direct=1".into(), format!("--iodepth={d}")]),
        }
        if self.new_file {
            a.push("--overwrite=0".into());
            a.push("--fallocate=none".into());
        } else {
            a.push("--overwrite=1".into());
        }
        if let Some(secs) = self.runtime {
            a.push(format!("--runtime={secs}"));
            a.push("--time_based".into());
        }
        if self.end_fsync {
            a.push("--end_fsync=1".into());
        }
        a
    }

    /// The command line, as the report quotes it (with `DIR` for the directory).
    pub fn command_line(&self) -> String {
        let args: Vec<String> = self
            .args(Path::new("DIR"))
            .into_iter()
            .filter(|a| !a.starts_with("--output-format") && !a.starts_with("--eta"))
            .collect();
        format!("fio {}", args.join(" "))
    }
}

/// What one fio run did.
#[derive(Debug, Clone, Copy, Default)]
pub struct FioResult {
    /// Bytes per second (reads plus writes), summed over the job's processes.
    pub bw: f64,
    /// I/O operations per second, summed likewise.
    pub iops: f64,
    /// fio's own run time of the job (includes the final fsync of `--end_fsync`).
    pub runtime: Duration,
    /// Wall time of the fio process (setup included).
    pub wall: Duration,
}

/// Runs `job` in `dir`; fails with fio's message if it fails.
pub fn run(job: &FioJob, dir: &Path) -> Result<FioResult> {
    let t = Instant::now();
    let out = Command::new("fio").args(job.args(dir)).output().context("running fio")?;
    let wall = t.elapsed();
    if !out.status.success() {
        bail!(
            "{} failed ({}): {}{}",
            job.command_line(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    let mut r =
        parse(&out.stdout).with_context(|| format!("parsing the JSON report of {}", job.command_line()))?;
    r.wall = wall;
    Ok(r)
}

/// Lays out `file` in `dir` with `size` bytes written (fio's own layout: its buffer pattern,
/// 1 MiB at a time, as before any read job), unless it already has that size.
pub fn lay_out(dir: &Path, file: &'static str, size: u64) -> Result<()> {
    if std::fs::metadata(dir.join(file)).is_ok_and(|m| m.len() == size) {
        return Ok(());
    }
    let job = FioJob {
        name: "layout",
        rw: "read",
        bs: "1M",
        size,
        runtime: None,
        numjobs: 1,
        end_fsync: false,
        new_file: false,
        file,
        direct_depth: None,
    };
    let out =
        Command::new("fio").args(job.args(dir)).arg("--create_only=1").output().context("running fio")?;
    if !out.status.success() {
        bail!(
            "laying out {} failed ({}): {}",
            dir.join(file).display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// fio's JSON report (fio may print warnings before it: the JSON starts at the first `{`),
/// refused if it has no job or its job failed.
pub(crate) fn report(stdout: &[u8]) -> Result<Value> {
    let start = stdout.iter().position(|&b| b == b'{').context("no JSON in fio's output")?;
    let v: Value = serde_json::from_slice(&stdout[start..])?;
    let job = &v["jobs"][0];
    if job.is_null() {
        bail!("no job in fio's report");
    }
    if let Some(e) = job["error"].as_i64().filter(|&e| e != 0) {
        bail!("fio reports error {e}");
    }
    Ok(v)
}

/// Parses fio's JSON report.
fn parse(stdout: &[u8]) -> Result<FioResult> {
    let v = report(stdout)?;
    let job = &v["jobs"][0];
    let mut r = FioResult::default();
    let mut runtime_ms = 0u64;
    for dir in ["read", "write"] {
        let d = &job[dir];
        r.bw += d["bw_bytes"].as_f64().unwrap_or(0.0);
        r.iops += d["iops"].as_f64().unwrap_or(0.0);
        runtime_ms = runtime_ms.max(d["runtime"].as_u64().unwrap_or(0));
    }
    r.runtime = Duration::from_millis(runtime_ms);
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_report_after_warnings() {
        let out = br#"fio: some warning
{"fio version": "fio-3.33", "jobs": [{"jobname": "x", "error": 0,
  "read": {"bw_bytes": 0, "iops": 0.0, "runtime": 0},
  "write": {"bw_bytes": 1048576, "iops": 256.0, "runtime": 2000}}]}"#;
        let r = parse(out).unwrap();
        assert_eq!(r.bw, 1048576.0);
        assert_eq!(r.iops, 256.0);
        assert_eq!(r.runtime, Duration::from_secs(2));
        assert!(parse(b"no json").is_err());
    }

    #[test]
    fn command_line_names_the_parameters() {
        let job = FioJob {
            name: "randwrite",
            rw: "randwrite",
            bs: "4k",
            size: 1 << 30,
            runtime: Some(20),
            numjobs: 1,
            end_fsync: false,
            new_file: false,
            file: "rand.dat",
            direct_depth: None,
        };
        let c = job.command_line();
        for part in
            ["--rw=randwrite", "--bs=4k", "--size=1073741824", "--runtime=20 --time_based", "--direct=0"]
        {
            assert!(c.contains(part), "{c}");
        }
    }
}
