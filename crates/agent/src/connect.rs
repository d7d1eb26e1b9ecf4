//! Reaching a destination.

use std::sync::Arc;
use std::time::Duration;

use doppel_link::tls::{TlsSetupError, client_config, server_name};
use doppel_link::{ByteCounter, Identity, Limited, LinkError, Metered, NodeId, RateLimiter};
use doppel_target::Target;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::rustls::ClientConfig;
use tracing::Instrument;

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
        /// Bandwidth limits every byte sent must respect (the job's, the target's).
        limiters: Vec<Arc<RateLimiter>>,
    },
    /// An in-process target behind a pipe.
    Embedded(Arc<Target>),
    /// Connections opened by the peer (a source asking for its job back during a failback):
    /// each connect waits for the next one.
    Incoming {
        /// The connections, as the peer opens them.
        streams: tokio::sync::Mutex<tokio::sync::mpsc::Receiver<Box<dyn doppel_target::Stream>>>,
        /// Bandwidth limits (on the bytes inside the connection's TLS, which the target
        /// terminated).
        limiters: Vec<Arc<RateLimiter>>,
    },
}

impl Connector {
    /// Connections from the peer's `streams`, as the peer opens them.
    pub fn incoming(streams: tokio::sync::mpsc::Receiver<Box<dyn doppel_target::Stream>>) -> Connector {
        Connector::Incoming { streams: tokio::sync::Mutex::new(streams), limiters: Vec::new() }
    }

    /// Also subject to `limiter` (connectors the agent did not build itself).
    pub fn limited_by(self, limiter: Arc<RateLimiter>) -> Connector {
        match self {
            Connector::Incoming { streams, mut limiters } => {
                limiters.push(limiter);
                Connector::Incoming { streams, limiters }
            }
            other => other,
        }
    }

    /// A connector for a remote target.
    pub fn remote(
        addr: &str,
        me: &Identity,
        target_id: NodeId,
        limiters: Vec<Arc<RateLimiter>>,
    ) -> Result<Connector, TlsSetupError> {
        let tls = client_config(me, target_id)?;
        Ok(Connector::Remote { addr: addr.to_string(), tls, limiters })
    }

    /// Opens one connection; the counters see every byte on the wire.
    pub async fn connect(
        &self,
        sent: &ByteCounter,
        received: &ByteCounter,
    ) -> Result<Box<dyn Conn>, LinkError> {
        const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
        match self {
            Connector::Remote { addr, tls, limiters } => {
                let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
                    .await
                    .map_err(|_| LinkError::Timeout(CONNECT_TIMEOUT))??;
                let _ = tcp.set_nodelay(true);
                limit_unsent(&tcp);
                // Beneath TLS: the limits and counters see every byte on the wire.
                let metered =
                    Limited::new(Metered::new(tcp, received.clone(), sent.clone()), limiters.clone());
                let connector = tokio_rustls::TlsConnector::from(tls.clone());
                let tls = tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(server_name(), metered))
                    .await
                    .map_err(|_| LinkError::Timeout(CONNECT_TIMEOUT))??;
                Ok(Box::new(tls))
            }
            Connector::Incoming { streams, limiters } => {
                let stream = streams.lock().await.recv().await.ok_or(LinkError::Closed)?;
                Ok(Box::new(Limited::new(
                    Metered::new(stream, received.clone(), sent.clone()),
                    limiters.clone(),
                )))
            }
            Connector::Embedded(target) => {
                let (ours, theirs) = tokio::io::duplex(4 << 20);
                let target = target.clone();
                tokio::spawn(
                    async move {
                        let _ =
                            doppel_target::session::handle_stream(target, theirs, "local".to_string()).await;
                    }
                    .in_current_span(),
                );
                Ok(Box::new(Metered::new(ours, received.clone(), sent.clone())))
            }
        }
    }
}

/// Keeps at most 256 KiB of not-yet-sent data in the socket buffer (`TCP_NOTSENT_LOWAT`): the
/// kernel still keeps the congestion window full, but what a broken connection takes down with
/// it, and what must then be sent again, stays small.
fn limit_unsent(tcp: &tokio::net::TcpStream) {
    use std::os::fd::AsRawFd;
    let v: libc::c_int = 256 * 1024;
    // SAFETY: a plain setsockopt on a socket we own, with a pointer to a live c_int and its
    // size; failure only leaves the default in place.
    let _ = unsafe {
        libc::setsockopt(
            tcp.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}
