//! Node identities.
//!
//! `doppel init` makes a P-256 key pair and a self-signed certificate and stores both (DER,
//! key readable by the owner only) under `HOME/identity/`. The node's id is the BLAKE3 hash of
//! the certificate in hex: short enough to paste into a config, and unforgeable, so pinning it
//! is all the trust setup two machines need.

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// Identity errors.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Reading or writing the identity files failed.
    #[error("identity file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// No identity exists yet.
    #[error("no identity in {0}: run `doppel init` first")]
    Missing(PathBuf),
    /// Generating the key or certificate failed.
    #[error("cannot generate identity: {0}")]
    Generate(String),
    /// An id string is malformed.
    #[error("bad node id {0:?}: expected 64 hexadecimal characters (as `doppel id` prints)")]
    BadId(String),
}

/// A node's identity: the hash of its certificate.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId([u8; 32]);

impl NodeId {
    /// The id of a certificate.
    pub fn of_cert(cert_der: &[u8]) -> NodeId {
        NodeId(*blake3::hash(cert_der).as_bytes())
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({self})")
    }
}

impl FromStr for NodeId {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<NodeId, IdentityError> {
        let s = s.trim();
        let bad = || IdentityError::BadId(s.to_string());
        if s.len() != 64 || !s.is_ascii() {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(NodeId(out))
    }
}

/// A node's certificate and private key.
pub struct Identity {
    /// DER-encoded self-signed certificate.
    pub cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
    /// The hash of `cert`.
    pub id: NodeId,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity").field("id", &self.id).finish_non_exhaustive()
    }
}

fn paths(home: &Path) -> (PathBuf, PathBuf) {
    let dir = home.join("identity");
    (dir.join("cert.der"), dir.join("key.der"))
}

impl Identity {
    /// Makes a fresh identity in memory.
    pub fn generate() -> Result<Identity, IdentityError> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| IdentityError::Generate(e.to_string()))?;
        let params = rcgen::CertificateParams::new(vec!["doppel".to_string()])
            .map_err(|e| IdentityError::Generate(e.to_string()))?;
        let cert = params.self_signed(&key).map_err(|e| IdentityError::Generate(e.to_string()))?;
        let cert = cert.der().clone();
        let id = NodeId::of_cert(&cert);
        Ok(Identity { cert, key: PrivatePkcs8KeyDer::from(key.serialize_der()), id })
    }

    /// Loads the identity stored under `home`.
    pub fn load(home: &Path) -> Result<Identity, IdentityError> {
        let (cert_path, key_path) = paths(home);
        let read = |p: &Path| match fs::read(p) {
            Ok(b) => Ok(b),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(IdentityError::Missing(home.to_path_buf())),
            Err(e) => Err(IdentityError::Io { path: p.to_path_buf(), source: e }),
        };
        let cert = CertificateDer::from(read(&cert_path)?);
        let key = PrivatePkcs8KeyDer::from(read(&key_path)?);
        let id = NodeId::of_cert(&cert);
        Ok(Identity { cert, key, id })
    }

    /// Loads the identity under `home`, creating it first if there is none. Returns whether
    /// it was created.
    pub fn load_or_create(home: &Path) -> Result<(Identity, bool), IdentityError> {
        match Identity::load(home) {
            Ok(i) => Ok((i, false)),
            Err(IdentityError::Missing(_)) => {
                let i = Identity::generate()?;
                i.store(home)?;
                Ok((i, true))
            }
            Err(e) => Err(e),
        }
    }

    fn store(&self, home: &Path) -> Result<(), IdentityError> {
        let (cert_path, key_path) = paths(home);
        let dir = cert_path.parent().expect("identity files live in a directory");
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |source| IdentityError::Io { path: p, source }
        };
        fs::create_dir_all(dir).map_err(io(dir))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
        // Key first, created private; the certificate's presence marks a complete identity.
        let write_private = |p: &Path, bytes: &[u8]| -> io::Result<()> {
            use io::Write;
            let tmp = p.with_extension("tmp");
            let mut f =
                fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            fs::rename(&tmp, p)
        };
        write_private(&key_path, self.key.secret_pkcs8_der()).map_err(io(&key_path))?;
        write_private(&cert_path, &self.cert).map_err(io(&cert_path))?;
        Ok(())
    }

    /// The private key, for TLS configuration.
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_is_idempotent_and_id_roundtrips() {
        let d = tempfile::tempdir().unwrap();
        let (a, created) = Identity::load_or_create(d.path()).unwrap();
        assert!(created);
        let (b, created) = Identity::load_or_create(d.path()).unwrap();
        assert!(!created);
        assert_eq!(a.id, b.id);
        let s = a.id.to_string();
        assert_eq!(s.len(), 64);
        assert_eq!(s.parse::<NodeId>().unwrap(), a.id);
        assert!("xyz".parse::<NodeId>().unwrap_err().to_string().contains("64 hexadecimal"));
        let mode = fs::metadata(d.path().join("identity/key.der")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(Identity::load(&d.path().join("nope")), Err(IdentityError::Missing(_))));
    }
}
