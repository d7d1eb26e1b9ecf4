//! Reaching a destination.

use std::sync::Arc;
use std::time::Duration;

use doppel_link::tls::{client_config, server_name};
use doppel_link::{ByteCounter, Identity, LinkError, Metered, NodeId};
use doppel_target::Target;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::rustls::ClientConfig;

/// A connection to a target, whatever carries it.
pub trait Conn: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Conn for T {}

/// How to open connections to the job's destination.
pub enum Connector {
    /// TCP + TLS to a remote target.
    Remote {
        /// `HOST:PORT`.
        addr: String,
        /// Client TLS configuration (our identity, the target's pinned id).
        tls: Arc<ClientConfig>,
    },
    /// An in-process target behind a pipe.
    Embedded(Arc<Target>),
}

impl Connector {
    /// A connector for a remote target.
    pub fn remote(addr: &str, me: &Identity, target_id: NodeId) -> Result<Connector, String> {
        let tls = client_config(me, target_id).map_err(|e| e.to_string())?;
        Ok(Connector::Remote { addr: addr.to_string(), tls })
    }

    /// Opens one connection; the counters see every byte on the wire.
    pub async fn connect(
        &self,
        sent: &ByteCounter,
        received: &ByteCounter,
    ) -> Result<Box<dyn Conn>, LinkError> {
        const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
        match self {
            Connector::Remote { addr, tls } => {
                let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
                    .await
                    .map_err(|_| LinkError::Timeout(CONNECT_TIMEOUT))??;
                let _ = tcp.set_nodelay(true);
                let metered = Metered::new(tcp, received.clone(), sent.clone());
                let connector = tokio_rustls::TlsConnector::from(tls.clone());
                let tls = tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(server_name(), metered))
                    .await
                    .map_err(|_| LinkError::Timeout(CONNECT_TIMEOUT))??;
                Ok(Box::new(tls))
            }
            Connector::Embedded(target) => {
                let (ours, theirs) = tokio::io::duplex(4 << 20);
                let target = target.clone();
                tokio::spawn(async move {
                    let _ = doppel_target::session::handle_stream(target, theirs, "local".to_string()).await;
                });
                Ok(Box::new(Metered::new(ours, received.clone(), sent.clone())))
            }
        }
    }
}
