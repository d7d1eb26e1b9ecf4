//! systemd service notifications (`Type=notify`, sd_notify(3)): readiness, stopping, and the
//! watchdog. Without `NOTIFY_SOCKET` in the environment (not started by systemd) nothing is
//! sent and nothing is spawned.
//!
//! The watchdog pings come from a task on the process's tokio runtime: if the runtime stops
//! running tasks (every worker blocked or deadlocked), the pings stop and systemd, after
//! `WatchdogSec`, kills and restarts the service (`Restart=on-failure`).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

/// When a service is ready, and what it then says it does.
pub struct Readiness {
    /// `STATUS=` sent with `READY=1`.
    status: String,
    /// True once the service is ready (polled).
    ready: Box<dyn Fn() -> bool + Send + Sync>,
}

impl Readiness {
    /// Ready once every control socket in `sockets` accepts connections.
    pub fn sockets(sockets: Vec<PathBuf>, status: String) -> Readiness {
        Readiness { status, ready: Box::new(move || sockets.iter().all(|s| accepts(s))) }
    }

    /// Ready once each agent has started (its capture runs: it left `starting`) and its
    /// control socket accepts connections.
    pub fn agents(agents: &[doppel_agent::Agent], home: &std::path::Path) -> Readiness {
        let jobs: Vec<_> = agents
            .iter()
            .map(|a| (crate::control::job_socket(home, &a.job().name), a.status_source()))
            .collect();
        let names: Vec<&str> = agents.iter().map(|a| a.job().name.as_str()).collect();
        Readiness {
            status: format!("protecting {} job(s): {}", names.len(), names.join(", ")),
            ready: Box::new(move || {
                jobs.iter().all(|(sock, src)| src.snapshot().state != "starting" && accepts(sock))
            }),
        }
    }
}

/// Whether a Unix socket at `path` accepts a connection (a stale socket file left by a killed
/// process does not).
fn accepts(path: &std::path::Path) -> bool {
    std::os::unix::net::UnixStream::connect(path).is_ok()
}

/// Whether the service manager listens for notifications.
pub fn enabled() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// `READY=1` with `STATUS=status`.
pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Whether `STOPPING=1` went out (it is sent once, by whichever notices the stop first).
static STOPPING_SENT: AtomicBool = AtomicBool::new(false);

/// `STOPPING=1`, once. Called where a signal starts the stop, not only from the task that
/// watches the shutdown token: the service can finish and drop its runtime before that task
/// runs again, and systemd then never hears that the stop was asked for.
pub fn stopping() {
    if enabled() && !STOPPING_SENT.swap(true, Ordering::SeqCst) {
        notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    }
}

/// The interval of the watchdog pings: half of `WATCHDOG_USEC`, when systemd set it for this
/// process.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero()).map(|d| d / 2)
}

/// On the current tokio runtime: sends `READY=1` once `readiness` holds, `STOPPING=1` when
/// `shutdown` is cancelled, and `WATCHDOG=1` every half `WATCHDOG_USEC` while the runtime
/// runs tasks. Does nothing when not started by systemd.
pub fn spawn(readiness: Readiness, shutdown: CancellationToken) {
    if !enabled() {
        return;
    }
    if let Some(every) = watchdog_interval() {
        tracing::debug!(?every, "systemd watchdog");
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                // A task spawned and awaited: the ping proves the runtime's scheduler still
                // picks up new work, not only that this one task runs.
                if tokio::spawn(async {}).await.is_ok() {
                    notify(&[NotifyState::Watchdog]);
                }
            }
        });
    }
    tokio::spawn(async move {
        let mut poll = tokio::time::interval(Duration::from_millis(50));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = poll.tick() => {
                    if (readiness.ready)() {
                        ready(&readiness.status);
                        tracing::debug!(status = %readiness.status, "told systemd we are ready");
                        shutdown.cancelled().await;
                        break;
                    }
                }
            }
        }
        stopping();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_are_ready_when_they_accept_not_when_a_stale_file_is_there() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("target.sock");
        let ready = Readiness::sockets(vec![path.clone()], "listening".into());
        assert!(!(ready.ready)(), "no socket yet");
        // A socket file nobody listens on any more (a killed process's).
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        assert!(!(ready.ready)(), "a stale socket file is not a ready service");
        let _ = std::fs::remove_file(&path);
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert!((ready.ready)());
    }
}
