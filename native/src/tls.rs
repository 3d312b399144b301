//! TLS with rustls (ring backend): the server's certificate, reloaded when
//! its files change, and the client's trusted roots.
//!
//! - Server: `--tls-cert` / `--tls-key` (PEM). The files are read at start
//!   (a bad pair stops the server with a clear error) and looked at again
//!   at most every [`RELOAD_CHECK`] during handshakes: a renewed
//!   certificate (certbot, cert-manager) is used for new connections
//!   without a restart, and a pair that does not load keeps the previous
//!   one in use (and says so in the log).
//! - Client: `syncline_client::tls` (re-exported here): the system's
//!   roots and Mozilla's, plus a private CA's (`--ca-file` / `SYNCLINE_CA`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

pub use syncline_client::tls::{TlsError, client_config, load_certs};
use syncline_client::tls::{file_error, provider};

/// How often a handshake looks at the certificate files' modification times.
pub const RELOAD_CHECK: Duration = Duration::from_secs(5);

fn load_pair(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = load_certs(cert)?;
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| file_error(key, e))?;
    Ok(Arc::new(CertifiedKey::from_der(
        chain,
        key_der,
        &provider(),
    )?))
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// The server's certificate, reloaded when its files change.
#[derive(Debug)]
pub struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    state: Mutex<CertState>,
}

#[derive(Debug)]
struct CertState {
    current: Arc<CertifiedKey>,
    stamps: (Option<SystemTime>, Option<SystemTime>),
    checked: Instant,
}

impl ReloadingCert {
    /// Load the pair now (an error stops the server before it listens).
    pub fn new(cert: PathBuf, key: PathBuf) -> Result<Self, TlsError> {
        let current = load_pair(&cert, &key)?;
        let stamps = (modified(&cert), modified(&key));
        Ok(ReloadingCert {
            cert,
            key,
            state: Mutex::new(CertState {
                current,
                stamps,
                checked: Instant::now(),
            }),
        })
    }

    fn current(&self) -> Arc<CertifiedKey> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.checked.elapsed() >= RELOAD_CHECK {
            s.checked = Instant::now();
            let stamps = (modified(&self.cert), modified(&self.key));
            if stamps != s.stamps {
                // A renewal writes two files: take the pair once it loads.
                match load_pair(&self.cert, &self.key) {
                    Ok(pair) => {
                        tracing::info!(cert = %self.cert.display(), "reloaded the TLS certificate");
                        s.current = pair;
                        s.stamps = stamps;
                    }
                    Err(e) => tracing::warn!(
                        "the TLS certificate changed but does not load, keeping the previous one: {e}"
                    ),
                }
            }
        }
        s.current.clone()
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// The server's TLS configuration for `--tls-cert` and `--tls-key`.
pub fn server_config(cert: PathBuf, key: PathBuf) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let resolver = Arc::new(ReloadingCert::new(cert, key)?);
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    // HTTP/1.1 only (WebSocket upgrades).
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
