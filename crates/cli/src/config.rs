//! The configuration file (`/etc/doppel/doppel.toml` by default), in TOML.
//!
//! Unknown keys are errors naming the key and its line: a misspelt `exclude` silently
//! replicating a cache directory is exactly the kind of surprise a DR tool must not spring.
//!
//! ```toml
//! [target]
//! listen = "0.0.0.0:7340"
//! data = "/srv/doppel"
//! [[target.allow]]
//! name = "web1"
//! id = "3f1c...e2"          # `doppel id` on web1
//!
//! [pins]                    # target identities, by address
//! "dr.example.com:7340" = "9ab0...77"
//!
//! [[job]]
//! name = "www"
//! path = "/var/www"
//! to = "dr.example.com:7340"  # or a local directory
//! exclude = ["cache/", "*.tmp"]
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use doppel_agent::{CaptureMode, Compression, Destination, JobConfig, Rule, Schedule};
use doppel_capture::WatchBackend;
use doppel_link::NodeId;
use doppel_link::ratelimit::parse_rate;
use serde::Deserialize;

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// State directory (overridden by `--home` and `$DOPPEL_HOME`).
    pub home: Option<PathBuf>,
    /// Target settings.
    pub target: Option<TargetSection>,
    /// Target identities by `HOST:PORT`.
    #[serde(default)]
    pub pins: BTreeMap<String, String>,
    /// Bandwidth shared by all jobs going to a target, by `HOST:PORT`.
    #[serde(default)]
    pub bandwidth: BTreeMap<String, BandwidthSection>,
    /// Jobs of this source.
    #[serde(default)]
    pub job: Vec<JobSection>,
    /// The HTTP endpoint of `doppel protect` (`--http`).
    pub http: Option<String>,
    /// Its token file (`--http-token-file`).
    pub http_token_file: Option<PathBuf>,
    /// Command `doppel protect` runs when a job's lag passes `rpo`, its link is down or sync
    /// mode degrades (`--notify`).
    pub notify: Option<String>,
    /// The recovery point objective of `doppel protect`'s jobs (`30s`, `5m`; `--rpo`).
    pub rpo: Option<String>,
    /// Seconds a condition must last before `notify` hears of it [default: 10].
    pub alert_after_secs: Option<u64>,
}

/// `[target]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetSection {
    /// Listen address.
    pub listen: Option<String>,
    /// Data directory.
    pub data: Option<PathBuf>,
    /// Allowed sources.
    #[serde(default)]
    pub allow: Vec<AllowSection>,
    /// Heartbeat interval in seconds.
    pub heartbeat_secs: Option<u64>,
    /// Longest time a failover or failback script may run, in seconds.
    pub script_timeout_secs: Option<u64>,
    /// Longest time the final sync of a failback cutover may take, in seconds.
    pub cutover_timeout_secs: Option<u64>,
    /// Connections in their handshake (TLS and Hello, not yet authenticated) at once.
    pub max_handshakes: Option<usize>,
    /// Connections in their handshake at once from one address (IPv6: one /64).
    pub max_handshakes_per_address: Option<usize>,
    /// Longest time a connection may take for its TLS handshake and Hello, in seconds.
    pub handshake_timeout_secs: Option<u64>,
    /// History kept of every replica: how far back (`24h`, `30d`; `off` keeps none).
    pub history: Option<String>,
    /// Size limit of each replica's history (`50GiB`, `10%` of the replica, `unlimited`).
    pub history_size: Option<SizeValue>,
    /// A window of history no size limit and no shortage of space cuts (`1h`).
    pub history_min: Option<String>,
    /// Threads each replica without history applies a run of new files on (default 1: every
    /// op on the session's own thread).
    pub apply_threads: Option<usize>,
    /// The HTTP endpoint of `doppel target` (`--http`).
    pub http: Option<String>,
    /// Its token file (`--http-token-file`).
    pub http_token_file: Option<PathBuf>,
    /// The recovery point objective of every source without its own (`30s`, `5m`): each
    /// source's `notify` hears when a replica's lag passes it.
    pub rpo: Option<String>,
    /// Seconds a condition (lag, disconnect, quota) must last before `notify` hears of it
    /// [default: 10].
    pub alert_after_secs: Option<u64>,
}

/// The timing of notices, with `alert_after_secs` as their hold.
pub fn alert_timing(after: Option<u64>) -> doppel_failover::alerts::AlertTiming {
    let mut t = doppel_failover::alerts::AlertTiming::default();
    if let Some(s) = after {
        t.hold = std::time::Duration::from_secs(s);
    }
    t
}

/// The HTTP endpoint asked for by the flags, else by the config file's `http` and
/// `http_token_file` (`None`: off).
pub fn http_options(
    flags: &crate::cli::HttpArgs,
    addr: Option<&String>,
    token_file: Option<&PathBuf>,
) -> Option<crate::http::HttpOptions> {
    let addr = flags.http.as_ref().or(addr)?.clone();
    let token_file = flags.http_token_file.as_ref().or(token_file).cloned();
    Some(crate::http::HttpOptions { addr, token_file })
}

/// `[[target.allow]]`: a source, and what to do when it fails.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowSection {
    /// The source's name on this target.
    pub name: String,
    /// Its identity.
    pub id: String,
    /// `auto` (fail over once the source counts as failed) or `manual` (alert only).
    pub policy: Option<String>,
    /// Seconds between checks.
    pub interval_secs: Option<u64>,
    /// Checks in a row the link and every probe must miss before the source counts as failed.
    pub missed: Option<u32>,
    /// Probes besides the link: `tcp:HOST:PORT`, `http[s]://HOST[:PORT]/PATH`, `cmd:COMMAND`.
    #[serde(default)]
    pub probes: Vec<String>,
    /// Command run when the source fails, and on failover and failback (`$DOPPEL_EVENT`).
    pub notify: Option<String>,
    /// Addresses taken over on failover (`10.0.0.5/24`).
    #[serde(default)]
    pub addresses: Vec<String>,
    /// The interface they go on.
    pub interface: Option<String>,
    /// Scripts run once before taking over.
    #[serde(default)]
    pub pre_failover: Vec<String>,
    /// Scripts run per job to start the workload on the replica.
    #[serde(default)]
    pub failover: Vec<String>,
    /// Scripts run per job at failback cutover, to stop the workload on the replica.
    #[serde(default)]
    pub stop_workload: Vec<String>,
    /// Scripts run per job when a test failover starts, against its view (`DOPPEL_TEST=1`).
    #[serde(default)]
    pub test_failover: Vec<String>,
    /// Scripts run per job when a test failover ends, before its view is discarded.
    #[serde(default)]
    pub test_failover_end: Vec<String>,
    /// Bandwidth of each job's failback stream (`50Mbit`, `unlimited`).
    pub failback_limit: Option<String>,
    /// The recovery point objective (`30s`, `5m`): `notify` hears when a replica's lag passes
    /// it [default: `[target]` rpo].
    pub rpo: Option<String>,
    /// Set-uid/set-gid bits: `allow` (default), `strip` or `refuse`.
    pub setid: Option<String>,
    /// Owners other than root, and ACLs: `allow` (default), `strip` or `refuse`.
    pub owners: Option<String>,
    /// `security.*` and `trusted.*` attributes: `allow` (default), `strip` or `refuse`.
    pub capabilities: Option<String>,
    /// Device nodes: `refuse` (default), `strip` or `allow`.
    pub devices: Option<String>,
    /// Allocated bytes all its replicas may take (`500GiB`, or a number of bytes).
    pub quota_bytes: Option<SizeValue>,
    /// Inodes all its replicas may take.
    pub quota_files: Option<u64>,
    /// Jobs it may have on this target.
    pub max_jobs: Option<u32>,
    /// History kept of its replicas (overrides `[target] history`).
    pub history: Option<String>,
    /// Size limit of each of its replicas' history (overrides `[target] history_size`).
    pub history_size: Option<SizeValue>,
    /// Its minimum history window (overrides `[target] history_min`).
    pub history_min: Option<String>,
}

/// A size in the config file: a number of bytes, or a string with a unit (`"10GiB"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum SizeValue {
    /// Bytes.
    Bytes(u64),
    /// With a unit, as [`parse_size`] reads it.
    Text(String),
}

impl SizeValue {
    /// The size in bytes.
    pub fn bytes(&self) -> Result<u64> {
        match self {
            SizeValue::Bytes(b) => Ok(*b),
            SizeValue::Text(t) => parse_size(t),
        }
    }
}

impl AllowSection {
    /// What this source may do that grants privilege on the target; an error names the key.
    pub fn privileges(&self) -> Result<doppel_target::PrivilegePolicy> {
        use doppel_target::Privilege;
        let mut p = doppel_target::PrivilegePolicy::default();
        for (privilege, value) in [
            (Privilege::SetId, &self.setid),
            (Privilege::Owners, &self.owners),
            (Privilege::Capabilities, &self.capabilities),
            (Privilege::Devices, &self.devices),
        ] {
            if let Some(v) = value {
                let rule = v.parse().map_err(|e| anyhow!("source {}: {privilege} = {e}", self.name))?;
                p.set(privilege, rule);
            }
        }
        p.check().map_err(|e| anyhow!("source {}: {e}", self.name))?;
        Ok(p)
    }

    /// How much of the target this source may take; an error names the key.
    pub fn limits(&self) -> Result<doppel_target::SourceLimits> {
        let bytes = match &self.quota_bytes {
            Some(v) => Some(v.bytes().map_err(|e| anyhow!("source {}: quota_bytes: {e}", self.name))?),
            None => None,
        };
        if self.max_jobs == Some(0) || self.quota_files == Some(0) || bytes == Some(0) {
            bail!("source {}: a limit of 0 would refuse everything; remove the source instead", self.name);
        }
        Ok(doppel_target::SourceLimits {
            quota: doppel_target::QuotaLimits { bytes, files: self.quota_files },
            max_jobs: self.max_jobs,
        })
    }

    /// The failover policy this section describes.
    pub fn policy(&self) -> Result<doppel_failover::SourcePolicy> {
        let mut p = doppel_failover::SourcePolicy::manual(&self.name);
        p.policy = match self.policy.as_deref() {
            None | Some("manual") => doppel_failover::Policy::Manual,
            Some("auto") => doppel_failover::Policy::Auto,
            Some(other) => bail!("source {}: policy {other:?}: use auto or manual", self.name),
        };
        if let Some(i) = self.interval_secs {
            p.interval = std::time::Duration::from_secs(i.max(1));
        }
        if let Some(m) = self.missed {
            p.missed = m.max(1);
        }
        p.probes = self
            .probes
            .iter()
            .map(|s| parse_probe(s).with_context(|| format!("source {}", self.name)))
            .collect::<Result<_>>()?;
        p.notify = self.notify.clone();
        p.addresses = self.addresses.clone();
        p.interface = self.interface.clone();
        if !p.addresses.is_empty() && p.interface.is_none() {
            bail!("source {}: addresses need an interface to go on (interface = \"eth0\")", self.name);
        }
        p.pre_failover = self.pre_failover.clone();
        p.failover = self.failover.clone();
        p.stop_workload = self.stop_workload.clone();
        p.test_failover = self.test_failover.clone();
        p.test_failover_end = self.test_failover_end.clone();
        if let Some(r) = &self.rpo {
            p.rpo = Some(parse_duration(r).with_context(|| format!("source {}: rpo", self.name))?);
        }
        if let Some(r) = &self.failback_limit {
            p.failback_limit =
                parse_rate(r).map_err(|e| anyhow!("source {}: failback_limit: {e}", self.name))?;
        }
        Ok(p)
    }
}

/// Parses a probe: `tcp:HOST:PORT`, `http://...` or `https://...`, `cmd:COMMAND`.
pub fn parse_probe(s: &str) -> Result<doppel_failover::Probe> {
    if let Some(addr) = s.strip_prefix("tcp:") {
        if addr.rsplit_once(':').is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err()) {
            bail!("probe {s:?}: expected tcp:HOST:PORT");
        }
        return Ok(doppel_failover::Probe::Tcp(addr.to_string()));
    }
    if s.starts_with("http://") || s.starts_with("https://") {
        doppel_failover::probe::check_url(s).map_err(|e| anyhow!("probe {s:?}: {e}"))?;
        return Ok(doppel_failover::Probe::Http(s.to_string()));
    }
    if let Some(cmd) = s.strip_prefix("cmd:").filter(|c| !c.trim().is_empty()) {
        return Ok(doppel_failover::Probe::Command(cmd.to_string()));
    }
    bail!("probe {s:?}: expected tcp:HOST:PORT, http://HOST/PATH or cmd:COMMAND")
}

/// `[bandwidth."HOST:PORT"]`: a rate and rules for everything sent to one target.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BandwidthSection {
    /// Default rate (`100Mbit`, `unlimited`).
    pub rate: Option<String>,
    /// Rules, first match wins.
    #[serde(default)]
    pub schedule: Vec<RuleSection>,
}

/// One rule of a bandwidth schedule.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSection {
    /// `mon-fri`, `sat,sun`, `daily`...
    pub days: String,
    /// `HH:MM`.
    pub from: String,
    /// `HH:MM` (before `from`: spans midnight).
    pub to: String,
    /// The rate while the rule applies.
    pub rate: String,
}

/// A compression setting: a name or a level.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum CompressionSetting {
    /// A zstd level (0: off).
    Level(i64),
    /// `off`, `fast`, `balanced`, `max`, `auto`.
    Name(String),
}

/// Builds a schedule from a default rate and rules.
pub fn schedule(rate: Option<&str>, rules: &[RuleSection]) -> Result<Schedule> {
    let default = rate.map(parse_rate).transpose().map_err(|e| anyhow!(e))?.unwrap_or(0);
    let rules = rules
        .iter()
        .map(|r| Rule::parse(&r.days, &r.from, &r.to, &r.rate))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!(e))?;
    Ok(Schedule { default, rules })
}

/// Parses a duration: a whole number with a unit, `s`, `m`, `h` or `d` (`90s`, `15m`, `24h`,
/// `30d`).
pub fn parse_duration(s: &str) -> Result<std::time::Duration> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| anyhow!("bad duration {s:?}: a whole number and s, m, h or d"))?;
    let scale = match unit.trim() {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => bail!("bad duration {s:?}: a whole number and s, m, h or d"),
    };
    Ok(std::time::Duration::from_secs(n.saturating_mul(scale)))
}

/// Parses a size: a whole number of bytes with an optional unit, decimal (`KB`, `MB`, `GB`,
/// `TB`, also `K`, `M`, `G`, `T`) or binary (`KiB`, `MiB`, `GiB`, `TiB`), e.g. `4GiB`,
/// `500MB`, `1048576`. Rates (`8Mbit`, `5MB/s`) are refused: a size is not a bandwidth, and
/// reading `8Mbit/s` as one megabyte would silently shrink a limit eightfold.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim();
    let scale: u64 = match unit {
        "" | "B" => 1,
        "K" | "KB" | "kB" => 1_000,
        "M" | "MB" => 1_000_000,
        "G" | "GB" => 1_000_000_000,
        "T" | "TB" => 1_000_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        u if u.ends_with("/s") || u.ends_with("ps") || u.to_ascii_lowercase().contains("bit") => {
            bail!("bad size {s:?}: {u:?} is a rate; a size is in bytes, e.g. 4GiB, 500MB")
        }
        u => bail!("bad size {s:?}: unknown unit {u:?} (use B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"),
    };
    let n: f64 = num.parse().map_err(|_| anyhow!("bad size {s:?}: expected e.g. 4GiB, 500MB, 1048576"))?;
    let bytes = n * scale as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        bail!("bad size {s:?}: too large");
    }
    if bytes < 1.0 {
        bail!("bad size {s:?}: must be more than zero");
    }
    Ok(bytes as u64)
}

/// `[[job]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSection {
    /// Job name.
    pub name: String,
    /// Protected directory (or `vm`).
    pub path: Option<PathBuf>,
    /// A QEMU guest to protect at the hypervisor instead of a directory: its QMP socket.
    pub vm: Option<PathBuf>,
    /// With `vm`: the drives or block nodes to protect [default: every writable drive].
    #[serde(default)]
    pub vm_disks: Vec<String>,
    /// Destination: `HOST:PORT` or a local directory.
    pub to: String,
    /// Target identity (else from `[pins]`).
    pub target_id: Option<String>,
    /// Include rules (watch capture only: the fuse capture refuses rules).
    #[serde(default)]
    pub include: Vec<String>,
    /// Exclude rules (watch capture only).
    #[serde(default)]
    pub exclude: Vec<String>,
    /// `watch`, `fanotify`, `inotify` or `fuse`.
    pub capture: Option<String>,
    /// fsync waits for the target (fuse capture).
    pub sync: Option<bool>,
    /// Seconds an fsync may wait in sync mode before the job degrades to async.
    pub sync_timeout_secs: Option<u64>,
    /// The kernel's write-back cache under the fuse capture (faster; keeps the order at each
    /// fsync only, as a local disk does).
    pub fuse_writeback: Option<bool>,
    /// The local destination already holds a copy of the source to start from.
    pub seeded: Option<bool>,
    /// `off`, `fast`, `balanced`, `max`, `auto`, or a zstd level 1-19 (0: off).
    pub compression: Option<CompressionSetting>,
    /// Bandwidth limit of the job (`20Mbit`, `unlimited`).
    pub bandwidth: Option<String>,
    /// Rules overriding `bandwidth` at certain times.
    #[serde(default)]
    pub bandwidth_schedule: Vec<RuleSection>,
    /// Spool memory in MiB.
    pub spool_memory_mib: Option<u64>,
    /// Spool disk limit in MiB.
    pub spool_disk_mib: Option<u64>,
    /// Memory the index's cache may use (`16MiB`, or bytes); the index itself is on disk.
    pub index_cache: Option<SizeValue>,
    /// Heartbeat interval in seconds.
    pub heartbeat_secs: Option<u64>,
    /// History kept by the embedded target of a `to = DIR` job (`24h`, `off`).
    pub history: Option<String>,
    /// Its size limit (`5GiB`, `10%`, `unlimited`).
    pub history_size: Option<SizeValue>,
    /// Its minimum window.
    pub history_min: Option<String>,
}

impl FileConfig {
    /// Loads `--config`, else `$DOPPEL_CONFIG`, else `/etc/doppel/doppel.toml` if it exists.
    pub fn load(flag: Option<&Path>) -> Result<FileConfig> {
        let path = match flag
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os("DOPPEL_CONFIG").map(PathBuf::from))
        {
            Some(p) => p,
            None => {
                let p = PathBuf::from("/etc/doppel/doppel.toml");
                if !p.exists() {
                    return Ok(FileConfig::default());
                }
                p
            }
        };
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        parse(&text).map_err(|e| anyhow!("{}:{e}", path.display()))
    }
}

/// Parses config text; errors read `LINE: message`.
pub fn parse(text: &str) -> Result<FileConfig, String> {
    toml::from_str(text).map_err(|e: toml::de::Error| {
        let line = e.span().map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1).unwrap_or(0);
        let msg = e.message().trim().to_string();
        let key = e.span().map(|s| text[s.clone()].trim().to_string()).unwrap_or_default();
        if msg.starts_with("unknown field") {
            format!("{line}: unknown key {key} ({msg})")
        } else {
            format!("{line}: {msg}")
        }
    })
}

/// Parses a destination: a local directory, or `HOST:PORT`.
pub fn destination(
    to: &str,
    target_id: Option<&str>,
    pins: &BTreeMap<String, String>,
) -> Result<Destination> {
    let remote = (!to.starts_with('/') && !to.starts_with('.')).then(|| to.rsplit_once(':')).flatten();
    let Some((host, port)) = remote.filter(|(host, _)| !host.is_empty()) else {
        return Ok(Destination::Local(PathBuf::from(to)));
    };
    // `HOST:` or `HOST:99999` is a mistyped target, not a directory to create and mirror into.
    if port.is_empty() || port.bytes().all(|b| b.is_ascii_digit()) {
        match port.parse::<u16>() {
            Ok(p) if p > 0 => {}
            _ => bail!(
                "--to {to}: the port of target {host} must be a number from 1 to 65535 (for a local \
                 directory of that name write ./{to})"
            ),
        }
    } else {
        return Ok(Destination::Local(PathBuf::from(to)));
    }
    let id = target_id.or_else(|| pins.get(to).map(String::as_str)).ok_or_else(|| {
        anyhow!("no identity for target {to}: pass --target-id (from `doppel id` on the target) or add it under [pins]")
    })?;
    let target_id: NodeId = id.parse()?;
    Ok(Destination::Remote { addr: to.to_string(), target_id })
}

/// Maps a capture mode name.
pub fn capture_mode(name: &str) -> Result<CaptureMode> {
    Ok(match name {
        "watch" | "auto" => CaptureMode::Watch(WatchBackend::Auto),
        "fanotify" => CaptureMode::Watch(WatchBackend::Fanotify),
        "inotify" => CaptureMode::Watch(WatchBackend::Inotify),
        "fuse" => CaptureMode::Fuse,
        other => bail!("unknown capture mode {other:?}: use watch, fanotify, inotify or fuse"),
    })
}

/// History retention from `history`, `history_size` and `history_min` on top of `base`
/// (`history = "off"` keeps none; a size or minimum alone turns the default on).
pub fn retention(
    base: doppel_target::HistoryPolicy,
    keep: Option<&str>,
    size: Option<&SizeValue>,
    min: Option<&str>,
) -> Result<doppel_target::HistoryPolicy> {
    use doppel_apply::retention::SizeLimit;
    if keep.is_some_and(|k| k == "off" || k == "0") {
        return Ok(None);
    }
    if keep.is_none() && size.is_none() && min.is_none() {
        return Ok(base);
    }
    let mut r = base.unwrap_or(doppel_apply::history::DEFAULT_RETENTION);
    if let Some(k) = keep {
        r.keep = parse_duration(k).context("history")?;
    }
    if let Some(m) = min {
        r.min = parse_duration(m).context("history_min")?;
    }
    r.size = match size {
        None => r.size,
        Some(SizeValue::Text(t)) if t == "unlimited" => SizeLimit::Unlimited,
        Some(SizeValue::Text(t)) if t.trim().ends_with('%') => {
            let p: f64 = t
                .trim()
                .trim_end_matches('%')
                .trim()
                .parse()
                .map_err(|_| anyhow!("history_size: bad percentage {t:?}"))?;
            if !(p > 0.0 && p <= 1000.0) {
                bail!("history_size: {t:?} is not a percentage above 0");
            }
            SizeLimit::Percent(p)
        }
        Some(v) => SizeLimit::Bytes(v.bytes().context("history_size")?),
    };
    Ok(Some(r))
}

/// A job from its config section.
pub fn job_from_section(s: &JobSection, pins: &BTreeMap<String, String>) -> Result<JobConfig> {
    let dest = destination(&s.to, s.target_id.as_deref(), pins).with_context(|| format!("job {}", s.name))?;
    let mut job = match (&s.path, &s.vm) {
        (Some(path), None) => JobConfig::new(&s.name, path.clone(), dest),
        (None, Some(qmp)) => {
            if s.capture.is_some() {
                bail!(
                    "job {}: `capture` does not apply to a `vm` job (its writes are captured by QEMU)",
                    s.name
                );
            }
            let mut j = JobConfig::new(&s.name, PathBuf::new(), dest);
            j.capture =
                CaptureMode::Vm(doppel_agent::VmSource { qmp: qmp.clone(), disks: s.vm_disks.clone() });
            j
        }
        (Some(_), Some(_)) => {
            bail!("job {}: give either `path` (a directory) or `vm` (a guest's QMP socket), not both", s.name)
        }
        (None, None) => {
            bail!("job {}: give `path`, the directory to protect, or `vm`, a guest's QMP socket", s.name)
        }
    };
    if !s.vm_disks.is_empty() && s.vm.is_none() {
        bail!("job {}: `vm_disks` needs `vm`", s.name);
    }
    job.include = s.include.clone();
    job.exclude = s.exclude.clone();
    if let Some(c) = &s.capture {
        job.capture = capture_mode(c)?;
    }
    job.sync = s.sync.unwrap_or(false);
    let local = matches!(job.dest, Destination::Local(_));
    if !local && (s.history.is_some() || s.history_size.is_some() || s.history_min.is_some()) {
        bail!(
            "job {}: history, history_size and history_min set a `to = DIR` replica's history; a target keeps its \
             replicas' history as its own config says (`history` under [target] or the source's [[target.allow]])",
            s.name
        );
    }
    job.history =
        retention(job.history, s.history.as_deref(), s.history_size.as_ref(), s.history_min.as_deref())
            .with_context(|| format!("job {}", s.name))?;
    if let Some(t) = s.sync_timeout_secs {
        job.sync_timeout = std::time::Duration::from_secs(t.max(1));
    }
    if job.sync && !job.capture.sequences_writes() {
        bail!("job {}: sync = true needs capture = \"fuse\" (or a `vm` job)", s.name);
    }
    job.fuse_writeback = s.fuse_writeback.unwrap_or(false);
    job.seeded = s.seeded.unwrap_or(false);
    if job.fuse_writeback && job.capture != CaptureMode::Fuse {
        bail!("job {}: fuse_writeback = true needs capture = \"fuse\"", s.name);
    }
    match &s.compression {
        Some(CompressionSetting::Level(l)) => {
            job.compression =
                Compression::parse(&l.to_string()).map_err(|e| anyhow!("job {}: {e}", s.name))?
        }
        Some(CompressionSetting::Name(n)) => {
            job.compression = Compression::parse(n).map_err(|e| anyhow!("job {}: {e}", s.name))?
        }
        None => {}
    }
    job.bandwidth =
        schedule(s.bandwidth.as_deref(), &s.bandwidth_schedule).with_context(|| format!("job {}", s.name))?;
    if let Some(m) = s.spool_memory_mib {
        job.spool.memory = (m << 20) as usize;
    }
    if let Some(d) = s.spool_disk_mib {
        job.spool.disk = d << 20;
    }
    if let Some(c) = &s.index_cache {
        job.index_cache = c.bytes().with_context(|| format!("job {}: index_cache", s.name))? as usize;
    }
    if let Some(h) = s.heartbeat_secs {
        job.heartbeat = std::time::Duration::from_secs(h.max(1));
    }
    Ok(job)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units_and_rates_are_refused() {
        assert_eq!(parse_size("1048576").unwrap(), 1 << 20);
        assert_eq!(parse_size("4GiB").unwrap(), 4 << 30);
        assert_eq!(parse_size("500MB").unwrap(), 500_000_000);
        assert_eq!(parse_size(" 1.5 KiB ").unwrap(), 1536);
        assert_eq!(parse_size("2T").unwrap(), 2_000_000_000_000);
        for rate in ["8Mbit/s", "8Mbit", "5MB/s", "100kbps", "10Gbit"] {
            let e = parse_size(rate).unwrap_err().to_string();
            assert!(e.contains("is a rate"), "{rate}: {e}");
        }
        for bad in ["", "0", "0.1", "MB", "12 parsecs", "-5MB", "99999999999TiB"] {
            let e = parse_size(bad).unwrap_err().to_string();
            assert!(e.starts_with("bad size"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn unknown_keys_name_the_key_and_line() {
        let text = "[target]\nlisten = \"0.0.0.0:1\"\n\n[[job]]\nname = \"a\"\npath = \"/x\"\nto = \"/y\"\nexclud = [\"*.tmp\"]\n";
        let e = parse(text).unwrap_err();
        assert!(e.starts_with("8: unknown key exclud"), "{e}");
        let e = parse("bogus = 1\n").unwrap_err();
        assert!(e.starts_with("1: unknown key bogus"), "{e}");
        let e = parse("[target]\nlisten = 5\n").unwrap_err();
        assert!(e.starts_with("2: "), "{e}");
    }

    #[test]
    fn full_config_parses() {
        let c = parse(include_str!("../../../examples/doppel.toml")).unwrap();
        assert_eq!(c.job.len(), 3);
        let vm = job_from_section(&c.job[2], &c.pins).unwrap();
        assert_eq!(
            vm.capture,
            CaptureMode::Vm(doppel_agent::VmSource { qmp: "/run/doppel-web1.qmp".into(), disks: vec![] })
        );
        assert!(vm.sync);
        let t = c.target.unwrap();
        assert_eq!(
            (t.max_handshakes, t.max_handshakes_per_address, t.handshake_timeout_secs),
            (Some(64), Some(8), Some(10))
        );
        assert_eq!(t.allow.len(), 1);
        let p = t.allow[0].policy().unwrap();
        assert_eq!(p.policy, doppel_failover::Policy::Auto);
        assert_eq!(p.interval, std::time::Duration::from_secs(5));
        assert_eq!(p.missed, 6);
        assert_eq!(p.probes.len(), 2);
        assert_eq!(p.failover, ["VM_NAME=web1 /etc/doppel/failover/start-vm.sh"]);
        assert_eq!(p.failback_limit, 25_000_000);
        let l = t.allow[0].limits().unwrap();
        assert_eq!((l.quota.bytes, l.quota.files, l.max_jobs), (Some(500 << 30), Some(10_000_000), Some(16)));
        // The scripts it names are the ones shipped, and they parse.
        for script in p.failover.iter().chain(&p.stop_workload).chain(p.notify.iter()) {
            let shipped = format!("../../examples/failover/{}", script.rsplit('/').next().unwrap());
            let st = std::process::Command::new("sh").arg("-n").arg(&shipped).status().unwrap();
            assert!(st.success(), "{shipped} does not parse");
        }
    }

    #[test]
    fn a_job_is_a_directory_or_a_guest_never_both_nor_neither() {
        let job = |extra: &str| {
            let c = parse(&format!("[[job]]\nname = \"j\"\nto = \"/tmp/r\"\n{extra}")).unwrap();
            job_from_section(&c.job[0], &c.pins).map_err(|e| format!("{e:#}"))
        };
        assert!(job("path = \"/srv\"\n").is_ok());
        let e = job("").unwrap_err();
        assert!(e.contains("give `path`, the directory to protect, or `vm`"), "{e}");
        let e = job("path = \"/srv\"\nvm = \"/run/q.sock\"\n").unwrap_err();
        assert!(e.contains("not both"), "{e}");
        let e = job("vm = \"/run/q.sock\"\ncapture = \"fuse\"\n").unwrap_err();
        assert!(e.contains("`capture` does not apply to a `vm` job"), "{e}");
        let e = job("path = \"/srv\"\nvm_disks = [\"disk0\"]\n").unwrap_err();
        assert!(e.contains("`vm_disks` needs `vm`"), "{e}");
        let j = job("vm = \"/run/q.sock\"\nvm_disks = [\"disk0\", \"disk1\"]\nsync = true\n").unwrap();
        assert_eq!(
            j.capture,
            CaptureMode::Vm(doppel_agent::VmSource {
                qmp: "/run/q.sock".into(),
                disks: vec!["disk0".into(), "disk1".into()]
            })
        );
    }

    #[test]
    fn history_settings_of_a_job_going_to_a_target_are_refused_not_ignored() {
        let job = |to: &str| {
            let id = "ab".repeat(32);
            let c = parse(&format!(
                "[[job]]\nname = \"j\"\npath = \"/srv\"\nto = \"{to}\"\ntarget_id = \"{id}\"\nhistory = \"2d\"\n"
            ))
            .unwrap();
            job_from_section(&c.job[0], &c.pins).map_err(|e| format!("{e:#}"))
        };
        assert!(job("/tmp/r").is_ok());
        let e = job("dr:7340").unwrap_err();
        assert!(e.contains("job j: history, history_size and history_min set a `to = DIR` replica's"), "{e}");
    }

    #[test]
    fn history_retention_reads_durations_sizes_shares_and_off() {
        use doppel_apply::retention::SizeLimit;
        use std::time::Duration;
        let base = Some(doppel_apply::history::DEFAULT_RETENTION);
        let text = |s: &str| SizeValue::Text(s.into());
        assert_eq!(retention(base, None, None, None).unwrap(), base);
        assert_eq!(retention(base, Some("off"), None, None).unwrap(), None);
        let r = retention(None, Some("30d"), Some(&text("10%")), Some("2h")).unwrap().unwrap();
        assert_eq!(
            (r.keep, r.size, r.min),
            (Duration::from_secs(30 * 86_400), SizeLimit::Percent(10.0), Duration::from_secs(7200))
        );
        let r = retention(base, None, Some(&text("5GiB")), None).unwrap().unwrap();
        assert_eq!((r.keep, r.size), (Duration::from_secs(86_400), SizeLimit::Bytes(5 << 30)));
        assert_eq!(
            retention(base, None, Some(&text("unlimited")), None).unwrap().unwrap().size,
            SizeLimit::Unlimited
        );
        for (k, s, m) in
            [(Some("3 weeks"), None, None), (None, Some(text("-5%")), None), (None, None, Some("1x"))]
        {
            let e = format!("{:#}", retention(base, k, s.as_ref(), m).unwrap_err());
            assert!(e.starts_with("history"), "{e}");
        }
    }

    #[test]
    fn limits_are_checked() {
        let limits = |extra: &str| {
            let text = format!("[target]\n[[target.allow]]\nname = \"s\"\nid = \"x\"\n{extra}\n");
            parse(&text).unwrap().target.unwrap().allow.remove(0).limits()
        };
        assert_eq!(limits("").unwrap(), doppel_target::SourceLimits::default());
        assert_eq!(limits("quota_bytes = 1048576").unwrap().quota.bytes, Some(1 << 20));
        assert_eq!(limits("quota_bytes = \"2GiB\"").unwrap().quota.bytes, Some(2 << 30));
        let e = format!("{:#}", limits("quota_bytes = \"20Mbit\"").unwrap_err());
        assert!(e.starts_with("source s: quota_bytes: bad size \"20Mbit\""), "{e}");
        let e = format!("{:#}", limits("max_jobs = 0").unwrap_err());
        assert_eq!(e, "source s: a limit of 0 would refuse everything; remove the source instead");
    }

    #[test]
    fn privilege_settings_are_checked() {
        use doppel_target::{PrivilegePolicy, Rule};
        let allow = |extra: &str| {
            let text = format!("[target]\n[[target.allow]]\nname = \"s\"\nid = \"x\"\n{extra}\n");
            parse(&text).unwrap().target.unwrap().allow.remove(0).privileges()
        };
        assert_eq!(allow("").unwrap(), PrivilegePolicy::default());
        let p =
            allow("setid = \"strip\"\nowners = \"refuse\"\ncapabilities = \"strip\"\ndevices = \"allow\"")
                .unwrap();
        assert_eq!(
            p,
            PrivilegePolicy {
                setid: Rule::Strip,
                owners: Rule::Refuse,
                capabilities: Rule::Strip,
                devices: Rule::Allow
            }
        );
        let e = format!("{:#}", allow("capabilities = \"maybe\"").unwrap_err());
        assert_eq!(e, "source s: capabilities = \"maybe\": use \"allow\", \"strip\" or \"refuse\"");
        let e = format!("{:#}", allow("owners = \"strip\"").unwrap_err());
        assert!(
            e.starts_with("source s: setid = \"allow\" with owners = \"strip\"") && !e.contains('\n'),
            "{e}"
        );
        let e =
            parse("[target]\n[[target.allow]]\nname = \"s\"\nid = \"x\"\nsetuid = \"strip\"\n").unwrap_err();
        assert!(e.starts_with("5: unknown key setuid"), "{e}");
    }

    #[test]
    fn failover_settings_are_checked() {
        let allow = |extra: &str| {
            let text = format!("[target]\n[[target.allow]]\nname = \"s\"\nid = \"x\"\n{extra}\n");
            parse(&text).unwrap().target.unwrap().allow.remove(0).policy()
        };
        assert_eq!(allow("").unwrap().policy, doppel_failover::Policy::Manual);
        let e = format!("{:#}", allow("policy = \"sometimes\"").unwrap_err());
        assert!(e.contains("use auto or manual"), "{e}");
        let e = format!("{:#}", allow("addresses = [\"10.0.0.5/24\"]").unwrap_err());
        assert!(e.contains("need an interface"), "{e}");
        let e = format!("{:#}", allow("probes = [\"ping 10.0.0.5\"]").unwrap_err());
        assert!(format!("{e:#}").contains("expected tcp:HOST:PORT"), "{e:#}");
        let e = allow("probes = [\"tcp:10.0.0.5\"]").unwrap_err();
        assert!(format!("{e:#}").contains("expected tcp:HOST:PORT"), "{e:#}");
        let e = allow("probes = [\"http://[::1/\"]").unwrap_err();
        assert!(format!("{e:#}").contains("probe \"http://[::1/\""), "{e:#}");
        let p = allow("probes = [\"https://[::1]:8443/health\"]").unwrap();
        assert_eq!(p.probes, [doppel_failover::Probe::Http("https://[::1]:8443/health".into())]);
        let p =
            allow("probes = [\"tcp:10.0.0.5:22\", \"cmd:ping -c1 10.0.0.5\", \"http://10.0.0.5/\"]").unwrap();
        assert_eq!(
            p.probes,
            [
                doppel_failover::Probe::Tcp("10.0.0.5:22".into()),
                doppel_failover::Probe::Command("ping -c1 10.0.0.5".into()),
                doppel_failover::Probe::Http("http://10.0.0.5/".into()),
            ]
        );
    }

    #[test]
    fn destinations() {
        let pins = BTreeMap::from([("dr:7340".to_string(), "ab".repeat(32))]);
        assert!(matches!(destination("/mnt/r", None, &pins).unwrap(), Destination::Local(_)));
        assert!(matches!(destination("replica", None, &pins).unwrap(), Destination::Local(_)));
        assert!(matches!(destination("dr:7340", None, &pins).unwrap(), Destination::Remote { .. }));
        let e = destination("other:1", None, &pins).unwrap_err().to_string();
        assert!(e.contains("--target-id"), "{e}");
        assert!(destination("h:1", Some("zz"), &pins).is_err());
        // A mistyped port is an error, not a directory named after it.
        for bad in ["127.0.0.1:99999", "127.0.0.1:", "dr:0"] {
            let e = destination(bad, Some(&"ab".repeat(32)), &pins).unwrap_err().to_string();
            assert!(e.contains("must be a number from 1 to 65535") && e.contains(&format!("./{bad}")), "{e}");
        }
        // A name with a colon and no port-like tail is a directory.
        assert!(matches!(destination("backup:daily", None, &pins).unwrap(), Destination::Local(_)));
        assert!(matches!(destination("./127.0.0.1:99999", None, &pins).unwrap(), Destination::Local(_)));
    }
}
