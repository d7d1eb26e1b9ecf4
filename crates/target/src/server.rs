//! The target's TLS listener.
//!
//! Every connection is authenticated by TLS (the source proves it holds the key of its
//! certificate) and then authorised by identity: only identities on the allow list get a
//! session, under the name the list gives them. Anything else gets a refusal naming the
//! identity it presented, which is what the operator needs to add it.

use std::sync::Arc;

use doppel_link::tls::{peer_id, server_config};
use doppel_link::{ByteCounter, FrameWriter, Identity, Metered};
use doppel_proto::{Message, Refusal};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::registry::Target;
use crate::session::handle_stream;

/// Accepts connections on `listener` until the target's shutdown token is cancelled, then
/// waits for open sessions to finish (each commits what it applied).
pub async fn serve(target: Arc<Target>, identity: &Identity, listener: TcpListener) -> std::io::Result<()> {
    let acceptor = TlsAcceptor::from(server_config(identity).map_err(std::io::Error::other)?);
    let tracker = TaskTracker::new();
    loop {
        let (tcp, addr) = tokio::select! {
            _ = target.shutdown.cancelled() => break,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let (target, acceptor) = (target.clone(), acceptor.clone());
        // Every line logged about this connection, its session's included, names the peer.
        let span = tracing::info_span!("connection", peer = %addr);
        let conn = async move {
            let timeout = target.config.handshake_timeout;
            let metered = Metered::new(tcp, ByteCounter::default(), ByteCounter::default());
            let tls = match tokio::time::timeout(timeout, acceptor.accept(metered)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::warn!("TLS handshake timed out");
                    return;
                }
            };
            let Some(id) = peer_id(tls.get_ref().1.peer_certificates()) else { return };
            let Some(name) = target.name_of(&id) else {
                tracing::warn!(identity = %id, "refusing a source that is not on the allow list");
                let mut w = FrameWriter::new(tls, ByteCounter::default());
                let _ =
                    w.send_now(&Message::Refused(Refusal::UnknownSource { identity: id.to_string() })).await;
                let _ = w.shutdown().await;
                return;
            };
            let _ = handle_stream(target, tls, name).await;
        };
        tracker.spawn(conn.instrument(span));
    }
    tracker.close();
    tracker.wait().await;
    Ok(())
}
