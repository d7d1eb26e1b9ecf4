//! TLS 1.3 with pinned identities.
//!
//! Certificates here carry no trust of their own: the only question is whether the peer's
//! certificate hashes to an id we were told to accept. The verifiers below therefore skip
//! chain, name and time validation (there is no chain, the name is fixed, and an identity does
//! not expire until the operator replaces it) but do verify the handshake signature, which
//! proves the peer holds the private key of the certificate it presented.
//!
//! The target's verifier accepts any well-signed client certificate and the target checks the
//! id against its allow list after the handshake; that way a refused source receives a
//! protocol message naming its id instead of an opaque TLS alert.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::identity::{Identity, NodeId};

/// The name every doppel certificate is issued for and every client asks for.
pub const SERVER_NAME: &str = "doppel";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS configuration could not be built (a corrupt key, typically).
#[derive(Debug, thiserror::Error)]
#[error("TLS setup failed: {0}")]
pub struct TlsSetupError(#[from] rustls::Error);

/// Configuration for a source connecting to a target whose id is `target`.
pub fn client_config(me: &Identity, target: NodeId) -> Result<Arc<rustls::ClientConfig>, TlsSetupError> {
    let p = provider();
    let verifier = PinnedServer { want: target, algs: p.signature_verification_algorithms };
    let cfg = rustls::ClientConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(vec![me.cert.clone()], me.key())?;
    Ok(Arc::new(cfg))
}

/// Configuration for a target: requires a client certificate, checked later by id.
pub fn server_config(me: &Identity) -> Result<Arc<rustls::ServerConfig>, TlsSetupError> {
    let p = provider();
    let verifier = AnyWellSignedClient { algs: p.signature_verification_algorithms };
    let cfg = rustls::ServerConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(vec![me.cert.clone()], me.key())?;
    Ok(Arc::new(cfg))
}

/// The name to pass when connecting.
pub fn server_name() -> ServerName<'static> {
    ServerName::try_from(SERVER_NAME).expect("a valid DNS name")
}

/// The id of the peer of an established connection.
pub fn peer_id(certs: Option<&[CertificateDer<'_>]>) -> Option<NodeId> {
    certs.and_then(|c| c.first()).map(|c| NodeId::of_cert(c))
}

#[derive(Debug)]
struct PinnedServer {
    want: NodeId,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = NodeId::of_cert(end_entity);
        if got != self.want {
            return Err(rustls::Error::General(format!(
                "target identity {got} does not match the pinned identity {}",
                self.want
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not accepted".into()))
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

#[derive(Debug)]
struct AnyWellSignedClient {
    algs: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for AnyWellSignedClient {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not accepted".into()))
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
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn handshake(
        client: &Identity,
        server: &Identity,
        pin: NodeId,
    ) -> Result<Option<NodeId>, std::io::Error> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let acceptor = tokio_rustls::TlsAcceptor::from(server_config(server).unwrap());
        let srv = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await?;
            let mut tls = acceptor.accept(tcp).await?;
            let id = peer_id(tls.get_ref().1.peer_certificates());
            tls.write_all(b"hi").await?;
            tls.flush().await?;
            Ok::<_, std::io::Error>(id)
        });
        let connector = tokio_rustls::TlsConnector::from(client_config(client, pin).unwrap());
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let mut tls = connector.connect(server_name(), tcp).await?;
        let mut buf = [0u8; 2];
        tls.read_exact(&mut buf).await?;
        srv.await.unwrap()
    }

    #[tokio::test]
    async fn mutual_auth_with_pinning() {
        let (c, s, other) =
            (Identity::generate().unwrap(), Identity::generate().unwrap(), Identity::generate().unwrap());
        assert_eq!(handshake(&c, &s, s.id).await.unwrap(), Some(c.id));
        let err = handshake(&c, &s, other.id).await.unwrap_err();
        assert!(err.to_string().contains("does not match the pinned identity"), "{err}");
    }
}
