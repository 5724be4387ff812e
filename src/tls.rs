//! TLS on the listener (`tls_cert`, `tls_key`): WebSocket, SSE and the API over HTTPS on
//! the same port, with rustls (ring), TLS 1.2 and 1.3 only, and no renegotiation (rustls
//! has none).
//!
//! The certificate is reloaded without a restart, on SIGHUP and when either file's mtime
//! changes (polled every `POLL`): the server config keeps one resolver whose certified key
//! is swapped, so connections already open keep their session and only new handshakes see
//! the new certificate. A reload that fails (a half-written file, a key that does not
//! match, an expired certificate) is logged and the old certificate stays; at start the
//! same failure stops the server with the reason.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use parking_lot::RwLock;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// How often the files' mtimes are compared.
pub const POLL: Duration = Duration::from_secs(2);

/// The TLS side of the listener.
pub struct Tls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    resolver: Arc<Current>,
    cert: PathBuf,
    key: PathBuf,
}

/// The certificate new handshakes get.
#[derive(Debug)]
struct Current(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().clone())
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads and checks a certificate chain and its key: PEM, at least one certificate, a key
/// that matches the first, and a first certificate valid now.
pub fn load(cert: &Path, key: &Path) -> anyhow::Result<Arc<CertifiedKey>> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("tls_cert {}: cannot read it as PEM", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("tls_cert {}: bad PEM", cert.display()))?;
    anyhow::ensure!(
        !chain.is_empty(),
        "tls_cert {}: no CERTIFICATE block in it",
        cert.display()
    );
    let private = PrivateKeyDer::from_pem_file(key).with_context(|| {
        format!(
            "tls_key {}: no PEM private key (PKCS#8, PKCS#1 or SEC1) in it",
            key.display()
        )
    })?;
    let signing = provider()
        .key_provider
        .load_private_key(private)
        .with_context(|| format!("tls_key {}: unsupported key", key.display()))?;
    check_validity(&chain[0], cert)?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| {
        anyhow::anyhow!(
            "tls_key {} does not belong to the certificate in {}: {e}",
            key.display(),
            cert.display()
        )
    })?;
    Ok(Arc::new(certified))
}

fn check_validity(der: &CertificateDer<'_>, path: &Path) -> anyhow::Result<()> {
    let (_, parsed) = x509_parser::parse_x509_certificate(der).map_err(|e| {
        anyhow::anyhow!("tls_cert {}: not an X.509 certificate: {e}", path.display())
    })?;
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let validity = parsed.validity();
    anyhow::ensure!(
        now <= validity.not_after.timestamp(),
        "tls_cert {}: the certificate expired on {}",
        path.display(),
        validity.not_after
    );
    anyhow::ensure!(
        now >= validity.not_before.timestamp(),
        "tls_cert {}: the certificate is not valid before {}",
        path.display(),
        validity.not_before
    );
    Ok(())
}

impl Tls {
    /// The TLS side of the listener when `tls_cert` and `tls_key` are set; both or neither.
    pub fn from_config(cfg: &Config) -> anyhow::Result<Option<Arc<Tls>>> {
        match (cfg.tls_cert.is_empty(), cfg.tls_key.is_empty()) {
            (true, true) => Ok(None),
            (false, false) => Tls::new(Path::new(&cfg.tls_cert), Path::new(&cfg.tls_key)).map(Some),
            _ => anyhow::bail!("tls_cert and tls_key go together: set both, or neither"),
        }
    }

    pub fn new(cert: &Path, key: &Path) -> anyhow::Result<Arc<Tls>> {
        let resolver = Arc::new(Current(RwLock::new(load(cert, key)?)));
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .context("TLS versions")?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(Tls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            resolver,
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
        }))
    }

    /// Reads the files again; on success new handshakes use them, on failure nothing
    /// changes.
    pub fn reload(&self) -> anyhow::Result<()> {
        let fresh = load(&self.cert, &self.key)?;
        *self.resolver.0.write() = fresh;
        Ok(())
    }

    fn mtimes(&self) -> (Option<SystemTime>, Option<SystemTime>) {
        let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        (m(&self.cert), m(&self.key))
    }

    /// Reloads on SIGHUP and when a file changes, until `shutdown`.
    pub fn spawn_watcher(self: &Arc<Self>, shutdown: CancellationToken) {
        let tls = self.clone();
        tokio::spawn(async move {
            #[cfg(unix)]
            let mut hup =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            let mut seen = tls.mtimes();
            let mut poll = tokio::time::interval(POLL);
            poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                #[cfg(unix)]
                let hangup = async {
                    match hup.as_mut() {
                        Some(h) => {
                            h.recv().await;
                        }
                        None => std::future::pending().await,
                    }
                };
                #[cfg(not(unix))]
                let hangup = std::future::pending::<()>();
                let why = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = hangup => "SIGHUP",
                    _ = poll.tick() => {
                        let now = tls.mtimes();
                        if now == seen {
                            continue;
                        }
                        seen = now;
                        "a changed file"
                    }
                };
                // Reading two small files: brief enough for an async worker.
                match tls.reload() {
                    Ok(()) => tracing::info!(
                        cert = %tls.cert.display(),
                        "TLS certificate reloaded after {why}"
                    ),
                    Err(e) => tracing::warn!(
                        "TLS certificate not reloaded after {why}, the previous one stays: {e:#}"
                    ),
                }
            }
        });
    }
}
