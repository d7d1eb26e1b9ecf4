//! Probes: ways to tell a source is alive besides its replication link.
//!
//! A probe is a liveness check, nothing more: it answers "does the source's host still
//! answer?", so the monitor does not fail over a live source whose replication link alone is
//! cut. Each probe has a time limit ([`TIMEOUT`]); one that does not answer within it failed.

use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use url::{Host, Position, Url};

use crate::policy::Probe;

/// How long one probe may take.
pub const TIMEOUT: Duration = Duration::from_secs(3);

/// Why a probe says the source is not alive.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The probe's URL does not parse, or is not `http://` or `https://`.
    #[error("probe URL {url:?}: {why}")]
    BadUrl {
        /// The URL.
        url: String,
        /// What is wrong with it.
        why: String,
    },
    /// Connecting, the TLS handshake, or the exchange failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The server answered something that is not an HTTP status line.
    #[error("not an HTTP answer: {0:?}")]
    NotHttp(String),
    /// The server answered with a status other than 2xx or 3xx.
    #[error("HTTP status {0}")]
    Status(u16),
    /// The command exited unsuccessfully.
    #[error("the command failed ({0})")]
    Command(std::process::ExitStatus),
    /// No answer within the time limit.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// Whether `p` says the source is alive, within [`TIMEOUT`].
pub async fn alive(p: &Probe) -> bool {
    match check(p, TIMEOUT).await {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!(probe = ?p, error = %e, "probe failed");
            false
        }
    }
}

/// Runs `p`, which must succeed within `limit`.
pub async fn check(p: &Probe, limit: Duration) -> Result<(), ProbeError> {
    let run = async {
        match p {
            Probe::Tcp(addr) => TcpStream::connect(addr.as_str()).await.map(drop).map_err(ProbeError::from),
            Probe::Http(url) => http(url).await,
            Probe::Command(cmd) => command(cmd).await,
        }
    };
    tokio::time::timeout(limit, run).await.map_err(|_| ProbeError::Timeout(limit))?
}

async fn command(cmd: &str) -> Result<(), ProbeError> {
    let status =
        tokio::process::Command::new("/bin/sh").arg("-c").arg(cmd).kill_on_drop(true).status().await?;
    if status.success() { Ok(()) } else { Err(ProbeError::Command(status)) }
}

/// An HTTP or HTTPS GET of `url`: a 2xx or 3xx answer counts as alive.
///
/// The URL is parsed as a URL (IPv6 literals such as `http://[::1]:8080/`, default ports,
/// path and query).
///
/// Checks an HTTP(S) probe's URL as the probe will read it (for the config file: a typo is
/// an error at start, not a probe that never answers).
pub fn check_url(url: &str) -> Result<(), ProbeError> {
    let bad = |why: String| ProbeError::BadUrl { url: url.to_string(), why };
    let u = Url::parse(url).map_err(|e| bad(e.to_string()))?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err(bad(format!("scheme {:?} is not http or https", u.scheme())));
    }
    u.host().ok_or_else(|| bad("no host".into()))?;
    Ok(())
}

/// **Certificates are not verified** for `https://`: the TLS handshake must complete and the
/// server must answer with a good status, but any certificate is accepted. A liveness probe
/// only has to show that the source's host answers; the certificates of a source's services
/// are often self-signed or issued by a private CA the target does not know, and the target
/// may have no system roots at all. Accepting them costs nothing in safety: a probe that
/// wrongly says "alive" only delays a failover (the operator can still run `doppel
/// failover`), it can never start a second copy of the workload, so it cannot cause a split
/// brain. Nothing secret is sent, and nothing received is trusted beyond the status code.
async fn http(url: &str) -> Result<(), ProbeError> {
    let bad = |why: String| ProbeError::BadUrl { url: url.to_string(), why };
    let u = Url::parse(url).map_err(|e| bad(e.to_string()))?;
    let tls = match u.scheme() {
        "http" => false,
        "https" => true,
        other => return Err(bad(format!("scheme {other:?} is not http or https"))),
    };
    let host = u.host().ok_or_else(|| bad("no host".into()))?.to_owned();
    let port = u.port_or_known_default().ok_or_else(|| bad("no port".into()))?;
    let tcp = match &host {
        Host::Domain(d) => TcpStream::connect((d.as_str(), port)).await?,
        Host::Ipv4(a) => TcpStream::connect((*a, port)).await?,
        Host::Ipv6(a) => TcpStream::connect((*a, port)).await?,
    };
    // `host_str` keeps the brackets of an IPv6 literal, as the Host header wants them.
    let host_header = match u.port() {
        Some(p) => format!("{}:{p}", u.host_str().unwrap_or_default()),
        None => u.host_str().unwrap_or_default().to_string(),
    };
    let request = format!(
        "GET {} HTTP/1.0\r\nHost: {host_header}\r\nUser-Agent: doppel-probe\r\nConnection: close\r\n\r\n",
        &u[Position::BeforePath..Position::AfterQuery]
    );
    let code = if tls {
        let name = match host {
            Host::Domain(d) => ServerName::try_from(d).map_err(|e| bad(e.to_string()))?,
            Host::Ipv4(a) => ServerName::IpAddress(std::net::IpAddr::V4(a).into()),
            Host::Ipv6(a) => ServerName::IpAddress(std::net::IpAddr::V6(a).into()),
        };
        let connector = tokio_rustls::TlsConnector::from(any_certificate_config()?);
        exchange(connector.connect(name, tcp).await?, &request).await?
    } else {
        exchange(tcp, &request).await?
    };
    if (200..400).contains(&code) { Ok(()) } else { Err(ProbeError::Status(code)) }
}

/// Sends `request` and reads the status code of the answer.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, request: &str) -> Result<u16, ProbeError> {
    s.write_all(request.as_bytes()).await?;
    s.flush().await?;
    // The status line is all a probe needs; it is short.
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < 1024 {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&head);
    let line = text.lines().next().unwrap_or_default();
    let mut words = line.split_whitespace();
    match (words.next(), words.next().and_then(|c| c.parse::<u16>().ok())) {
        (Some(v), Some(code)) if v.starts_with("HTTP/") => Ok(code),
        _ => Err(ProbeError::NotHttp(line.chars().take(80).collect())),
    }
}

/// A TLS client configuration that completes the handshake with any certificate (see
/// [`http`] for why): the handshake signature is still checked against the certificate
/// presented, so the server must hold its key.
fn any_certificate_config() -> Result<Arc<rustls::ClientConfig>, ProbeError> {
    let p = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = AnyCertificate { algs: p.signature_verification_algorithms };
    let cfg = rustls::ClientConfig::builder_with_provider(p.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ProbeError::Io(std::io::Error::other(e)))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

#[derive(Debug)]
struct AnyCertificate {
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    use super::*;

    /// A server on `bind` that answers every request with `status`, and reports the request
    /// line it got. Wrapped in TLS with a self-signed certificate when `tls`.
    async fn server(bind: &str, status: u16, tls: bool) -> (SocketAddr, mpsc::UnboundedReceiver<String>) {
        let l = TcpListener::bind(bind).await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let acceptor = tls.then(self_signed_acceptor);
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let (tx, acceptor) = (tx.clone(), acceptor.clone());
                tokio::spawn(async move {
                    match acceptor {
                        Some(a) => {
                            if let Ok(s) = a.accept(s).await {
                                answer(s, status, tx).await
                            }
                        }
                        None => answer(s, status, tx).await,
                    }
                });
            }
        });
        (addr, rx)
    }

    async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
        mut s: S,
        status: u16,
        tx: mpsc::UnboundedSender<String>,
    ) {
        let mut req = Vec::new();
        let mut buf = [0u8; 512];
        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => req.extend_from_slice(&buf[..n]),
            }
        }
        let _ = tx.send(String::from_utf8_lossy(&req).into_owned());
        let _ =
            s.write_all(format!("HTTP/1.0 {status} Whatever\r\nContent-Length: 0\r\n\r\n").as_bytes()).await;
        let _ = s.shutdown().await;
    }

    fn self_signed_acceptor() -> tokio_rustls::TlsAcceptor {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert =
            rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap().self_signed(&key).unwrap();
        let der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        let cfg =
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(vec![cert.der().clone()], der)
                .unwrap();
        tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
    }

    async fn http_check(url: String) -> Result<(), ProbeError> {
        check(&Probe::Http(url), Duration::from_secs(10)).await
    }

    #[tokio::test]
    async fn http_probes_reach_ipv4_and_ipv6_literals_with_path_and_query() {
        let (v4, mut got4) = server("127.0.0.1:0", 204, false).await;
        http_check(format!("http://{v4}/health?deep=1")).await.unwrap();
        let req = got4.recv().await.unwrap();
        assert!(req.starts_with("GET /health?deep=1 HTTP/1.0\r\n"), "{req}");
        assert!(req.contains(&format!("\r\nHost: 127.0.0.1:{}\r\n", v4.port())), "{req}");

        let (v6, mut got6) = server("[::1]:0", 302, false).await;
        assert!(v6.is_ipv6());
        http_check(format!("http://[::1]:{}", v6.port())).await.unwrap();
        let req = got6.recv().await.unwrap();
        assert!(req.starts_with("GET / HTTP/1.0\r\n"), "{req}");
        assert!(req.contains(&format!("\r\nHost: [::1]:{}\r\n", v6.port())), "{req}");
    }

    #[tokio::test]
    async fn https_probes_complete_the_handshake_with_a_self_signed_certificate() {
        let (addr, mut got) = server("127.0.0.1:0", 200, true).await;
        http_check(format!("https://{addr}/ping")).await.unwrap();
        assert!(got.recv().await.unwrap().starts_with("GET /ping HTTP/1.0\r\n"));
        let (addr, _) = server("127.0.0.1:0", 200, true).await;
        http_check(format!("https://localhost:{}/", addr.port())).await.unwrap();
        // Plain HTTP to a TLS server, or TLS to a plain one (which waits for a request that
        // never comes), is not an answer.
        let within = Duration::from_secs(2);
        let (tls, _) = server("127.0.0.1:0", 200, true).await;
        assert!(check(&Probe::Http(format!("http://{tls}/")), within).await.is_err());
        let (plain, _) = server("127.0.0.1:0", 200, false).await;
        assert!(check(&Probe::Http(format!("https://{plain}/")), within).await.is_err());
    }

    #[tokio::test]
    async fn bad_answers_closed_ports_and_bad_urls_fail() {
        let (addr, _) = server("127.0.0.1:0", 500, false).await;
        assert!(matches!(http_check(format!("http://{addr}/")).await, Err(ProbeError::Status(500))));
        let (addr, _) = server("127.0.0.1:0", 503, true).await;
        assert!(matches!(http_check(format!("https://{addr}/")).await, Err(ProbeError::Status(503))));
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        assert!(matches!(http_check(format!("http://{closed}/")).await, Err(ProbeError::Io(_))));
        assert!(!alive(&Probe::Tcp(closed.to_string())).await);
        for url in ["ftp://127.0.0.1/", "not a url", "http:///nohost"] {
            assert!(http_check(url.into()).await.is_err(), "{url}");
        }
    }

    #[tokio::test]
    async fn a_silent_server_fails_at_the_time_limit() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let _keep = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                held.push(s);
            }
        });
        let t = std::time::Instant::now();
        let r = check(&Probe::Http(format!("http://{addr}/")), Duration::from_millis(300)).await;
        assert!(matches!(r, Err(ProbeError::Timeout(_))), "{r:?}");
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    }

    #[tokio::test]
    async fn tcp_and_command_probes() {
        let (addr, _) = server("127.0.0.1:0", 200, false).await;
        assert!(alive(&Probe::Tcp(addr.to_string())).await);
        assert!(alive(&Probe::Command("true".into())).await);
        assert!(matches!(
            check(&Probe::Command("exit 3".into()), TIMEOUT).await,
            Err(ProbeError::Command(s)) if s.code() == Some(3)
        ));
        assert!(matches!(
            check(&Probe::Command("sleep 30".into()), Duration::from_millis(200)).await,
            Err(ProbeError::Timeout(_))
        ));
    }
}
