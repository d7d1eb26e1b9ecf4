//! The HTTP endpoint of a running target or agent (`--http ADDR`): Prometheus metrics, the
//! status and event API, and the dashboard page.
//!
//! Everything it serves is drawn from [`crate::overview::gather`], the same data
//! `doppel status --json` prints, so the page, the API, the metrics and the command line never
//! disagree. It reads only: nothing here changes a process's state.
//!
//! It shows tenants' names and paths, so an address other than loopback needs a token
//! (`--http-token-file`): every request then carries `Authorization: Bearer TOKEN`, or the
//! cookie the dashboard page sets after one visit with `?token=TOKEN`.

mod auth;
mod lag;
pub mod metrics;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::control::{self, ControlRequest, ControlResponse};
use crate::overview::{self, SCHEMA};

pub use auth::Access;

/// How often the server samples lags for the dashboard's charts, and how many samples it
/// keeps (ten minutes).
const SAMPLE_EVERY: Duration = Duration::from_secs(2);
const SAMPLES_KEPT: usize = 300;

/// Events `/api/events` returns (the newest).
const EVENTS_SHOWN: usize = 200;

/// What `--http` and `--http-token-file` (or `http` and `http_token_file` in the config)
/// ask for.
#[derive(Debug, Clone, Default)]
pub struct HttpOptions {
    /// `HOST:PORT` to listen on.
    pub addr: String,
    /// A file holding the token (its first line).
    pub token_file: Option<PathBuf>,
}

/// A bound, not yet serving, endpoint: binding happens at start so that a port in use is a
/// one-line error before anything else runs.
pub struct Bound {
    listener: tokio::net::TcpListener,
    access: Access,
}

impl Bound {
    /// The address bound (with the port the system chose for port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// Binds `opts.addr`, refusing an address other than loopback without a token.
pub async fn bind(opts: &HttpOptions) -> Result<Bound> {
    let token = match &opts.token_file {
        Some(f) => Some(auth::read_token(f)?),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(&opts.addr)
        .await
        .with_context(|| format!("cannot serve HTTP on {}", opts.addr))?;
    let addr = listener.local_addr()?;
    if token.is_none() && !addr.ip().is_loopback() {
        bail!(
            "--http {}: an address other than loopback needs --http-token-file (the endpoint shows sources, jobs and paths)",
            opts.addr
        );
    }
    Ok(Bound { listener, access: token.map_or(Access::Open, Access::token) })
}

/// What the handlers share.
struct Shared {
    home: PathBuf,
    lags: lag::Lags,
}

/// Serves until `stop` is cancelled; writes the bound address to `HOME/run/http.addr` (for
/// scripts, and tests that bind port 0) and removes it at the end.
pub async fn serve(bound: Bound, home: PathBuf, stop: CancellationToken) -> Result<()> {
    let addr = bound.local_addr()?;
    let note = control::run_dir(&home).join("http.addr");
    crate::home::write_atomically(&note, addr.to_string().as_bytes())?;
    let shared = Arc::new(Shared { home, lags: lag::Lags::new(SAMPLES_KEPT) });
    tokio::spawn(sample(shared.clone(), stop.clone()));
    let app = router(shared, bound.access);
    tracing::info!(%addr, "HTTP endpoint: /metrics, /api/status, /api/events, dashboard at /");
    let r = axum::serve(bound.listener, app).with_graceful_shutdown(stop.cancelled_owned()).await;
    let _ = std::fs::remove_file(&note);
    r.context("HTTP endpoint")
}

fn router(shared: Arc<Shared>, access: Access) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/assets/dashboard.js", get(script))
        .route("/assets/dashboard.css", get(style))
        .route("/metrics", get(metrics_text))
        .route("/api/status", get(status))
        .route("/api/events", get(events))
        .route("/api/lag", get(lags))
        .layer(axum::middleware::from_fn_with_state(Arc::new(access), auth::check))
        .with_state(shared)
}

/// Samples every job's lag for the charts.
async fn sample(shared: Arc<Shared>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Ok(all) = everything(&shared.home).await else { continue };
        shared.lags.record(doppel_link::framed::now_us() / 1_000_000, &all);
    }
}

/// [`overview::gather`] off the async threads (it calls control sockets, ours included).
async fn everything(home: &Path) -> Result<overview::Everything, tokio::task::JoinError> {
    let home = home.to_path_buf();
    tokio::task::spawn_blocking(move || overview::gather(&home)).await
}

/// The target's event log, when a target runs under this home; none otherwise.
async fn event_log(home: &Path) -> Result<Vec<doppel_failover::Event>, String> {
    let sock = control::run_dir(home).join("target.sock");
    if !sock.exists() {
        return Ok(Vec::new());
    }
    let answer = tokio::task::spawn_blocking(move || {
        control::call(&sock, &ControlRequest::Events, Duration::from_secs(10))
    })
    .await
    .map_err(|e| e.to_string())?;
    match answer {
        Ok(ControlResponse::Events { events }) => Ok(events),
        Ok(ControlResponse::Error { message }) => Err(message),
        Ok(other) => Err(format!("unexpected answer to events: {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

/// A 500 naming the cause.
fn failed(what: &str, why: impl std::fmt::Display) -> Response {
    (StatusCode::INTERNAL_SERVER_ERROR, format!("{what}: {why}\n")).into_response()
}

/// JSON that must not be cached.
fn fresh_json<T: Serialize>(v: &T) -> Response {
    match serde_json::to_vec(v) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json"), (header::CACHE_CONTROL, "no-store")], body)
            .into_response(),
        Err(e) => failed("encoding the answer", e),
    }
}

async fn status(State(s): State<Arc<Shared>>) -> Response {
    match everything(&s.home).await {
        Ok(all) => fresh_json(&all),
        Err(e) => failed("status", e),
    }
}

/// `/api/events`.
#[derive(Serialize)]
struct Events {
    schema: u32,
    events: Vec<doppel_failover::Event>,
}

async fn events(State(s): State<Arc<Shared>>) -> Response {
    match event_log(&s.home).await {
        Ok(mut events) => {
            let skip = events.len().saturating_sub(EVENTS_SHOWN);
            events.drain(..skip);
            fresh_json(&Events { schema: SCHEMA, events })
        }
        Err(e) => failed("events", e),
    }
}

async fn lags(State(s): State<Arc<Shared>>) -> Response {
    fresh_json(&s.lags.report(SAMPLE_EVERY.as_secs()))
}

async fn metrics_text(State(s): State<Arc<Shared>>) -> Response {
    let all = match everything(&s.home).await {
        Ok(all) => all,
        Err(e) => return failed("metrics", e),
    };
    // A target whose event log cannot be read still reports everything else.
    let events = event_log(&s.home).await.unwrap_or_else(|e| {
        tracing::warn!("metrics: cannot read the event log: {e}");
        Vec::new()
    });
    match metrics::render(&all, &events) {
        Ok(text) => ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response(),
        Err(e) => failed("metrics", e),
    }
}

/// The dashboard's files, built into the binary (no CDN: the DR site may have no internet).
const PAGE: &str = include_str!("../../assets/dashboard.html");
const SCRIPT: &str = include_str!("../../assets/dashboard.js");
const STYLE: &str = include_str!("../../assets/dashboard.css");

/// Only the page's own files run in it.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'";

fn asset(kind: &'static str, body: &'static str) -> Response {
    let mut r = ([(header::CONTENT_TYPE, kind)], body).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

async fn page() -> Response {
    asset("text/html; charset=utf-8", PAGE)
}

async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}

#[cfg(test)]
mod tests;
