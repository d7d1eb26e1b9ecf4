//! `doppel target`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use std::time::Duration;

use doppel_failover::{Manager, ManagerConfig, SourcePolicy};
use doppel_link::{Identity, NodeId};
use doppel_target::{AllowedSource, Layout, Reloaded, Target, TargetConfig, valid_name};

use crate::cli::TargetArgs;
use crate::config::{FileConfig, TargetSection};

/// The formats of a target's data directory (`failover/SOURCE.json`, `events.jsonl`, the
/// layout of `replicas/` and `state/`; each replica's state directory has its own stamp).
/// Version 1: the first release's.
pub const DATA_FORMAT: doppel_fs::format::Format =
    doppel_fs::format::Format { kind: "doppel-target", current: 1, oldest: 1 };
use crate::control::{self, ControlRequest, ControlResponse, SourceRow, StatusReport};

pub async fn run(a: TargetArgs, file: FileConfig, config: Option<PathBuf>, home: PathBuf) -> Result<()> {
    let section = file.target.unwrap_or_default();
    let listen = a
        .listen
        .clone()
        .or(section.listen.clone())
        .ok_or_else(|| anyhow!("--listen ADDR is required (or [target] listen)"))?;
    let data = a
        .data
        .clone()
        .or(section.data.clone())
        .ok_or_else(|| anyhow!("--data DIR is required (or [target] data)"))?;
    let (allowed, policies) = sources(&section, &a.allow)?;
    // Listening first: a target that cannot listen changes nothing (no data directory made,
    // no note of it for `doppel history`).
    let http =
        match crate::config::http_options(&a.http, section.http.as_ref(), section.http_token_file.as_ref()) {
            Some(o) => Some(crate::http::bind(&o).await?),
            None => None,
        };
    let listener = bind(&listen).await.with_context(|| format!("cannot listen on {listen}"))?;
    let (me, created) = Identity::load_or_create(&home)?;
    if created {
        tracing::info!(identity = %me.id, "created this node's identity");
    }
    let _home_lock = doppel_fs::lock::lock_exclusive(&home.join("target.lock"))?.ok_or_else(|| {
        anyhow!("a target already runs with home {} (its control socket is there)", home.display())
    })?;
    doppel_target::secure_data_dir(&data).context("data directory")?;
    let _data_lock = doppel_fs::lock::lock_exclusive(&data)?
        .ok_or_else(|| anyhow!("the data directory {} is in use by a target running now", data.display()))?;
    raise_open_file_limit();
    DATA_FORMAT.take_over(&data, |_| Ok(()))?;
    let mut cfg = TargetConfig::new(Layout::DataDir(data.clone()));
    cfg.allowed = allowed;
    cfg.history = target_history(&section)?;
    // Where `doppel history` finds this target's replicas.
    let _ = std::fs::write(
        super::history::data_note(&home),
        std::fs::canonicalize(&data)?.to_string_lossy().as_bytes(),
    );
    if let Some(h) = a.heartbeat.or(section.heartbeat_secs) {
        cfg.heartbeat = std::time::Duration::from_secs(h.max(1));
    }
    if let Some(n) = section.max_handshakes {
        cfg.handshakes.max_total = n.max(1);
    }
    if let Some(n) = section.max_handshakes_per_address {
        cfg.handshakes.max_per_address = n.max(1);
    }
    if let Some(t) = section.handshake_timeout_secs {
        cfg.handshake_timeout = Duration::from_secs(t.max(1));
    }
    cfg.apply_threads = match section.apply_threads {
        Some(0) => bail!("[target] apply_threads must be at least 1"),
        n => n,
    };
    let addr = listener.local_addr()?;
    let target = Target::new(cfg);
    let shutdown = super::on_signals()?;
    {
        let t = target.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            t.shutdown.cancel();
        });
    }
    let run = control::run_dir(&home);
    std::fs::create_dir_all(&run)?;
    crate::home::write_atomically(&run.join("target.addr"), addr.to_string().as_bytes())?;
    let mut mc = ManagerConfig::new(&data);
    if let Some(t) = section.script_timeout_secs {
        mc.script_timeout = Duration::from_secs(t.max(1));
    }
    if let Some(t) = section.cutover_timeout_secs {
        mc.cutover_timeout = Duration::from_secs(t.max(1));
    }
    mc.alerts = crate::config::alert_timing(section.alert_after_secs);
    let manager = Manager::new(target.clone(), mc, policies);
    // Test failovers a killed target left: their end scripts run and their views go.
    manager.end_all_tests("the target was restarted").await;
    tokio::spawn(manager.clone().run());
    let stopping = manager.clone();
    let reloader = Arc::new(Reloader { config, flags: a.allow.clone(), manager: manager.clone() });
    reload_on_hangup(reloader.clone())?;
    let handler: control::Handler = Arc::new(move |req| {
        let (m, r) = (manager.clone(), reloader.clone());
        Box::pin(async move { answer(&m, &r, req).await })
    });
    tokio::spawn(control::serve(run.join("target.sock"), handler, target.shutdown.clone()));
    if let Some(h) = http {
        tokio::spawn(serve_http(h, home.clone(), target.shutdown.clone()));
    }
    let ready =
        crate::systemd::Readiness::sockets(vec![run.join("target.sock")], format!("listening on {addr}"));
    crate::systemd::spawn(ready, target.shutdown.clone());
    tracing::info!(%addr, identity = %me.id, data = %data.display(), sources = target.allowed().len(), "target listening");
    doppel_target::serve(target.clone(), &me, listener).await?;
    // A test failover does not outlive the target: it is ended cleanly.
    stopping.end_all_tests("the target stopped").await;
    let _ = std::fs::remove_file(run.join("target.addr"));
    Ok(())
}

/// Serves the HTTP endpoint; its failure is logged, not fatal (replication goes on).
pub(super) async fn serve_http(
    h: crate::http::Bound,
    home: PathBuf,
    stop: tokio_util::sync::CancellationToken,
) {
    if let Err(e) = crate::http::serve(h, home, stop).await {
        tracing::error!("{e:#}");
    }
}

/// The allowed sources and their failover policies, from the config file's `[[target.allow]]`
/// sections and the `--allow NAME=ID` flags.
fn sources(section: &TargetSection, flags: &[String]) -> Result<(Vec<AllowedSource>, Vec<SourcePolicy>)> {
    let mut allowed = Vec::new();
    let mut policies = Vec::new();
    for s in &section.allow {
        let mut a = allow(&s.name, &s.id)?.with_privileges(s.privileges()?).with_limits(s.limits()?);
        if s.history.is_some() || s.history_size.is_some() || s.history_min.is_some() {
            let base = target_history(section)?;
            let h = crate::config::retention(
                base,
                s.history.as_deref(),
                s.history_size.as_ref(),
                s.history_min.as_deref(),
            )
            .with_context(|| format!("source {}", s.name))?;
            a = a.with_history(h);
        }
        allowed.push(a);
        let mut p = s.policy()?;
        if p.rpo.is_none()
            && let Some(r) = &section.rpo
        {
            p.rpo = Some(crate::config::parse_duration(r).context("[target] rpo")?);
        }
        policies.push(p);
    }
    for s in flags {
        let (name, id) = s.split_once('=').ok_or_else(|| anyhow!("--allow {s:?}: expected NAME=ID"))?;
        allowed.push(allow(name, id)?);
    }
    let mut names: Vec<&str> = allowed.iter().map(|a| a.name.as_str()).collect();
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        bail!("source {} is allowed twice", w[0]);
    }
    Ok((allowed, policies))
}

/// The history retention `[target]` sets for every replica.
fn target_history(section: &TargetSection) -> Result<doppel_target::HistoryPolicy> {
    crate::config::retention(
        Some(doppel_apply::history::DEFAULT_RETENTION),
        section.history.as_deref(),
        section.history_size.as_ref(),
        section.history_min.as_deref(),
    )
    .context("[target]")
}

/// Re-reads the configuration of a running target: its allowed sources, their limits,
/// privilege and failover policies. (The listen address and the data directory stay as they
/// were started: changing them takes a restart.)
struct Reloader {
    /// The config file as given at start (`--config`, else `$DOPPEL_CONFIG`, else the default).
    config: Option<PathBuf>,
    /// `--allow` flags given at start (kept across reloads).
    flags: Vec<String>,
    manager: Arc<Manager>,
}

impl Reloader {
    /// Reads and applies the file; an invalid file changes nothing and says why.
    fn reload(&self) -> Result<Reloaded> {
        let file = FileConfig::load(self.config.as_deref()).context("configuration not reloaded")?;
        let section = file.target.unwrap_or_default();
        let (allowed, policies) = sources(&section, &self.flags).context("configuration not reloaded")?;
        let r = self.manager.target().reload(allowed);
        self.manager.reload(policies);
        tracing::info!(added = ?r.added, removed = ?r.removed, restarted = ?r.restarted, changed = ?r.changed, "configuration reloaded");
        Ok(r)
    }
}

/// Reloads the configuration on every SIGHUP.
fn reload_on_hangup(r: Arc<Reloader>) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            if let Err(e) = r.reload() {
                tracing::error!("SIGHUP: {e:#}; the previous configuration stays in force");
            }
        }
    });
    Ok(())
}

/// Answers a control request.
async fn answer(m: &Manager, r: &Reloader, req: ControlRequest) -> ControlResponse {
    let report = |r: Result<doppel_failover::Report, doppel_failover::FailoverError>| match r {
        Ok(r) => ControlResponse::Report(r),
        Err(e) => ControlResponse::error(e.to_string()),
    };
    // No job named means every job of the source.
    let some = |jobs: Vec<String>| (!jobs.is_empty()).then_some(jobs);
    match req {
        ControlRequest::Status => ControlResponse::Status(StatusReport {
            replicas: m.target().status(),
            sources: m
                .status()
                .into_iter()
                .map(|s| {
                    let test = m.running_test(&s.source);
                    SourceRow { test, ..SourceRow::from(s) }
                })
                .collect(),
            ..StatusReport::default()
        }),
        ControlRequest::Failover { source, jobs, at, force } => {
            let cause = match &at {
                Some(a) => format!("manual: doppel failover --at {a}"),
                None => "manual: doppel failover".into(),
            };
            report(
                m.failover_to(&source, some(jobs), &cause, doppel_failover::PointChoice { at, force }).await,
            )
        }
        ControlRequest::Failback { source, jobs } => report(m.failback(&source, some(jobs)).await),
        ControlRequest::TestFailover { source, jobs, at, end: false } => {
            match m.test_failover(&source, some(jobs), at).await {
                Ok(r) => ControlResponse::Test { test: Some(r), ended: false },
                Err(e) => ControlResponse::error(e.to_string()),
            }
        }
        ControlRequest::TestFailover { source, end: true, .. } => {
            match m.end_test(&source, "ended by the operator (doppel test-failover --end)").await {
                Ok(r) => ControlResponse::Test { test: r, ended: true },
                Err(e) => ControlResponse::error(e.to_string()),
            }
        }
        ControlRequest::Reload => match r.reload() {
            Ok(r) => ControlResponse::Reloaded {
                added: r.added,
                removed: r.removed,
                restarted: r.restarted,
                changed: r.changed,
            },
            Err(e) => ControlResponse::error(format!("{e:#}; the previous configuration stays in force")),
        },
        ControlRequest::Events => match m.events().read() {
            Ok(events) => ControlResponse::Events { events },
            Err(e) => ControlResponse::error(e.to_string()),
        },
        other @ (ControlRequest::Verify { .. }
        | ControlRequest::Limit { .. }
        | ControlRequest::Bookmark { .. }) => ControlResponse::error(format!(
            "{} is served by the job's control socket on the source, not by the target",
            other.op()
        )),
    }
}

/// Raises the soft limit on open files to the hard one. Every session holds a socket and its
/// replica's files, and the soft limit most systems start services with (1024) is reached by
/// a few hundred jobs, after which `accept` fails for everyone; the hard limit is what the
/// administrator allows (systemd's `LimitNOFILE`, `ulimit -Hn`).
fn raise_open_file_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let now = getrlimit(Resource::Nofile);
    if now.current.is_some() && now.current != now.maximum {
        match setrlimit(Resource::Nofile, Rlimit { current: now.maximum, maximum: now.maximum }) {
            Ok(()) => tracing::debug!(from = now.current, to = now.maximum, "raised the open file limit"),
            Err(e) => tracing::warn!(error = %e, limit = now.current, "cannot raise the open file limit"),
        }
    }
}

/// Connections the kernel completes and queues for `accept`: the default (128) fills in a
/// moment when many sources reconnect at once, or while the target waits out a shortage of
/// descriptors, and a source whose SYN finds it full waits a second or more to retry.
const LISTEN_BACKLOG: u32 = 1024;

/// Listens on `addr` (`HOST:PORT`; the first of its addresses that binds).
async fn bind(addr: &str) -> std::io::Result<tokio::net::TcpListener> {
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        let socket =
            if a.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        socket.set_reuseaddr(true)?;
        match socket.bind(a).and_then(|()| socket.listen(LISTEN_BACKLOG)) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("the address resolves to nothing")))
}

fn allow(name: &str, id: &str) -> Result<AllowedSource> {
    valid_name(name).map_err(|e| anyhow!("source name {e}"))?;
    let id: NodeId = id.parse().with_context(|| format!("source {name}"))?;
    Ok(AllowedSource::new(name, id))
}

/// `doppel reload`: asks the running target to re-read its configuration.
pub fn reload(home: &std::path::Path) -> Result<()> {
    let sock = super::failover::target_socket(home)?;
    match control::call(&sock, &ControlRequest::Reload, Duration::from_secs(60))? {
        ControlResponse::Reloaded { added, removed, restarted, changed } => {
            let list = |v: &[String]| if v.is_empty() { "none".to_string() } else { v.join(", ") };
            outln!("configuration reloaded")?;
            outln!("  added:      {}", list(&added))?;
            outln!("  removed:    {}", list(&removed))?;
            outln!("  reconnected (identity or privileges changed): {}", list(&restarted))?;
            outln!("  limits changed: {}", list(&changed))?;
            Ok(())
        }
        ControlResponse::Error { message } => bail!("reload failed: {message}"),
        other => bail!("reload failed: unexpected answer {other:?}"),
    }
}
