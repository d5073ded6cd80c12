//! TLS set-up: the certificate chain and private key read from PEM files, and the rustls
//! server configuration (ring provider, TLS 1.2 and 1.3, ALPN `h2` then `http/1.1`) built from
//! them. Every error names the file(s) it is about.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ServerConfig;

/// Why a TLS certificate or key could not be loaded. Every variant names the file(s).
#[derive(Debug)]
pub enum TlsError {
    /// The file could not be read (missing, permissions, ...).
    Read { path: PathBuf, source: io::Error },
    /// The file is not valid PEM.
    Pem { path: PathBuf, source: io::Error },
    /// The certificate file holds no `CERTIFICATE` block.
    NoCertificate { path: PathBuf },
    /// The key file holds no PKCS#8, PKCS#1 or SEC1 private key block.
    NoPrivateKey { path: PathBuf },
    /// The private key is not the key of the first certificate.
    KeyMismatch {
        cert_path: PathBuf,
        key_path: PathBuf,
    },
    /// rustls refused the pair for another reason (e.g. an unsupported key type).
    Rejected {
        cert_path: PathBuf,
        key_path: PathBuf,
        source: rustls::Error,
    },
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsError::Read { path, source } => {
                write!(f, "cannot read TLS file {}: {source}", path.display())
            }
            TlsError::Pem { path, source } => {
                write!(f, "TLS file {} is not valid PEM: {source}", path.display())
            }
            TlsError::NoCertificate { path } => write!(
                f,
                "no certificate in {}: expected a PEM block 'BEGIN CERTIFICATE'",
                path.display()
            ),
            TlsError::NoPrivateKey { path } => write!(
                f,
                "no private key in {}: expected a PEM block 'BEGIN PRIVATE KEY', \
                 'BEGIN RSA PRIVATE KEY' or 'BEGIN EC PRIVATE KEY'",
                path.display()
            ),
            TlsError::KeyMismatch {
                cert_path,
                key_path,
            } => write!(
                f,
                "private key {} does not match the certificate in {}",
                key_path.display(),
                cert_path.display()
            ),
            TlsError::Rejected {
                cert_path,
                key_path,
                source,
            } => write!(
                f,
                "certificate {} with key {} rejected: {source}",
                cert_path.display(),
                key_path.display()
            ),
        }
    }
}

impl std::error::Error for TlsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TlsError::Read { source, .. } | TlsError::Pem { source, .. } => Some(source),
            TlsError::Rejected { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Loads the server's TLS configuration.
pub struct TlsSettings;

impl TlsSettings {
    /// Reads a PEM certificate chain (leaf first) and a PEM private key and builds a rustls
    /// server configuration with the ring provider, TLS 1.2 and 1.3, no client auth, and ALPN
    /// `h2` then `http/1.1` (a client offering both gets h2).
    pub fn load(cert_pem: &Path, key_pem: &Path) -> Result<Arc<ServerConfig>, TlsError> {
        let cert_bytes = read_file(cert_pem)?;
        let certs: Vec<_> = rustls_pemfile::certs(&mut cert_bytes.as_slice())
            .collect::<Result<_, _>>()
            .map_err(|source| TlsError::Pem {
                path: cert_pem.to_path_buf(),
                source,
            })?;
        if certs.is_empty() {
            return Err(TlsError::NoCertificate {
                path: cert_pem.to_path_buf(),
            });
        }
        let key_bytes = read_file(key_pem)?;
        let key = rustls_pemfile::private_key(&mut key_bytes.as_slice())
            .map_err(|source| TlsError::Pem {
                path: key_pem.to_path_buf(),
                source,
            })?
            .ok_or_else(|| TlsError::NoPrivateKey {
                path: key_pem.to_path_buf(),
            })?;
        let rejected = |source: rustls::Error| match source {
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                TlsError::KeyMismatch {
                    cert_path: cert_pem.to_path_buf(),
                    key_path: key_pem.to_path_buf(),
                }
            }
            source => TlsError::Rejected {
                cert_path: cert_pem.to_path_buf(),
                key_path: key_pem.to_path_buf(),
                source,
            },
        };
        // The provider is passed explicitly: a process-wide default may be unset, or set to a
        // different provider by another crate, and either would make start-up order matter.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(rejected)?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(rejected)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}
