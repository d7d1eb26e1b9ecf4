//! The target's TLS listener.
//!
//! Every connection is authenticated by TLS (the source proves it holds the key of its
//! certificate) and then authorised by identity: only identities on the allow list get a
//! session, under the name the list gives them. Anything else gets a refusal naming the
//! identity it presented, which is what the operator needs to add it.
//!
//! Before that, a connection is nobody's: how many may be in their handshake at once (in
//! total and per address), how long a handshake may take, how `accept` errors are waited out
//! and how often any of it is logged is decided by [`crate::admission`]; this loop only
//! carries the decisions out.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use doppel_link::tls::{peer_id, server_config};
use doppel_link::{ByteCounter, FrameWriter, Identity, Metered};
use doppel_proto::{Message, Refusal};
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::admission::{AcceptBackoff, AcceptError, Admission, Handshakes, Warnings};
use crate::registry::Target;
use crate::session::handle_stream_until;

/// The accept loop's state shared with the connections in their handshake.
struct Preauth {
    handshakes: Handshakes,
    /// Connections closed over a cap.
    over_cap: Warnings,
    /// Handshakes that failed or timed out.
    failed: Warnings,
    /// Identities not on the allow list.
    unknown: Warnings,
}

/// One handshake in flight: counted until dropped.
struct Permit {
    preauth: Arc<Mutex<Preauth>>,
    ip: IpAddr,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.preauth.lock().handshakes.finish(self.ip);
    }
}

/// Logs a warning of kind `$kind` (a [`Warnings`] field of [`Preauth`]) unless one was
/// logged lately; the line counts those suppressed since.
macro_rules! warn_limited {
    ($preauth:expr, $kind:ident, $($rest:tt)+) => {
        let hit = $preauth.lock().$kind.hit(Instant::now());
        if let Some(suppressed) = hit {
            tracing::warn!(suppressed, $($rest)+);
        }
    };
}

/// Accepts connections on `listener` until the target's shutdown token is cancelled, then
/// waits for open sessions to finish (each commits what it applied).
pub async fn serve(target: Arc<Target>, identity: &Identity, listener: TcpListener) -> std::io::Result<()> {
    let acceptor = TlsAcceptor::from(server_config(identity).map_err(std::io::Error::other)?);
    let tracker = TaskTracker::new();
    let preauth = Arc::new(Mutex::new(Preauth {
        handshakes: Handshakes::new(target.config.handshakes),
        over_cap: Warnings::default(),
        failed: Warnings::default(),
        unknown: Warnings::default(),
    }));
    let (mut backoff, mut accept_failed) = (AcceptBackoff::default(), Warnings::default());
    loop {
        let (tcp, addr) = tokio::select! {
            _ = target.shutdown.cancelled() => break,
            a = listener.accept() => match a {
                Ok(a) => {
                    backoff.on_success();
                    a
                }
                Err(e) => {
                    // Out of descriptors, the listener stays readable and accept fails again
                    // at once: wait, or this is a busy loop.
                    let wait = backoff.on_error(AcceptError::of(&e));
                    if let Some(suppressed) = accept_failed.hit(Instant::now()) {
                        tracing::warn!(error = %e, suppressed, retry_in = ?wait, "accept failed");
                    }
                    if !wait.is_zero() {
                        tokio::select! {
                            _ = target.shutdown.cancelled() => break,
                            _ = tokio::time::sleep(wait) => {}
                        }
                    }
                    continue;
                }
            },
        };
        let ip = addr.ip();
        let admission = preauth.lock().handshakes.start(ip);
        if admission != Admission::Admitted {
            // Closed before any TLS work, with a reset: no FIN exchange, no TIME_WAIT here.
            let _ = tcp.set_zero_linger();
            drop(tcp);
            let (in_flight, from_peer, refused) = {
                let p = preauth.lock();
                (p.handshakes.in_flight(), p.handshakes.in_flight_from(ip), p.handshakes.refused())
            };
            let cap = match admission {
                Admission::OverAddress => "per-address",
                _ => "total",
            };
            warn_limited!(preauth, over_cap, peer = %addr, cap, in_flight, from_peer, refused_since_start = refused,
                "too many connections in their handshake: closed a new one at once");
            continue;
        }
        let permit = Permit { preauth: preauth.clone(), ip };
        let _ = tcp.set_nodelay(true);
        let (target, acceptor, preauth) = (target.clone(), acceptor.clone(), preauth.clone());
        // Every line logged about this connection, its session's included, names the peer.
        let span = tracing::info_span!("connection", peer = %addr);
        let conn = async move {
            // One deadline for the TLS handshake and the Hello (or the refusal) after it.
            let timeout = target.config.handshake_timeout;
            let deadline = tokio::time::Instant::now() + timeout;
            let metered = Metered::new(tcp, ByteCounter::default(), ByteCounter::default());
            // A stopping target does not wait for strangers' handshakes.
            let handshake = tokio::select! {
                _ = target.shutdown.cancelled() => return,
                h = tokio::time::timeout_at(deadline, acceptor.accept(metered)) => h,
            };
            let tls = match handshake {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "TLS handshake failed");
                    warn_limited!(preauth, failed, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!("TLS handshake timed out");
                    warn_limited!(preauth, failed, ?timeout, "TLS handshake timed out");
                    return;
                }
            };
            let Some(id) = peer_id(tls.get_ref().1.peer_certificates()) else { return };
            let Some(name) = target.name_of(&id) else {
                warn_limited!(preauth, unknown, identity = %id, "refusing a source that is not on the allow list");
                let mut w = FrameWriter::new(tls, ByteCounter::default());
                let refusal = Message::Refused(Refusal::UnknownSource { identity: id.to_string() });
                let _ = tokio::time::timeout_at(deadline, async {
                    let _ = w.send_now(&refusal).await;
                    let _ = w.shutdown().await;
                })
                .await;
                return;
            };
            drop(preauth);
            let _ = handle_stream_until(target, tls, name, deadline, permit).await;
        };
        tracker.spawn(conn.instrument(span));
    }
    tracker.close();
    tracker.wait().await;
    Ok(())
}
