//! A small HTTP/1 client for the command line (`crier publish`) and the load tool, on the
//! hyper stack the server already links, so no second HTTP implementation is pulled in.
//! `https://` URLs go over rustls (the server's TLS stack), kept alive and pooled like
//! plain ones, trusting the public web roots plus a private CA given with `with_ca_file`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

#[derive(Clone)]
pub struct HttpClient {
    inner: Client<Connector, Full<Bytes>>,
    key: Option<String>,
}

/// Plain TCP for `http://`, rustls over it for `https://`, behind one pooled client: both
/// keep their connections alive, so a publisher over TLS pays one handshake per
/// connection, not one per request.
#[derive(Clone)]
struct Connector {
    http: HttpConnector,
    tls: Arc<rustls::ClientConfig>,
}

/// A pooled connection of either kind.
enum Io {
    Plain(TokioIo<TcpStream>),
    Tls(Box<TokioIo<TlsStream<TcpStream>>>),
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<Uri> for Connector {
    type Response = Io;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Io, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let (mut http, tls) = (self.http.clone(), self.tls.clone());
        Box::pin(async move {
            let https = uri.scheme_str() == Some("https");
            let tcp = http.call(uri.clone()).await?;
            if !https {
                return Ok(Io::Plain(tcp));
            }
            let host = uri
                .host()
                .unwrap_or("")
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let name = rustls_pki_types::ServerName::try_from(host.clone())
                .map_err(|e| format!("{host}: {e}"))?;
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp.into_inner())
                .await
                .map_err(|e| format!("TLS with {host}: {e}"))?;
            Ok(Io::Tls(Box::new(TokioIo::new(stream))))
        })
    }
}

impl Connection for Io {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The public web roots, plus the certificates of `ca_file` (PEM) when given.
pub fn tls_config(ca_file: Option<&std::path::Path>) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let certs = rustls_pki_types::CertificateDer::pem_file_iter(path)
            .map_err(|e| anyhow::anyhow!("CA file {}: {e}", path.display()))?;
        let mut n = 0;
        for c in certs {
            let c = c.map_err(|e| anyhow::anyhow!("CA file {}: {e}", path.display()))?;
            roots
                .add(c)
                .map_err(|e| anyhow::anyhow!("CA file {}: {e}", path.display()))?;
            n += 1;
        }
        anyhow::ensure!(
            n > 0,
            "CA file {}: no CERTIFICATE block in it",
            path.display()
        );
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}

impl HttpClient {
    pub fn new(key: Option<String>) -> Self {
        Self::with_tls(key, tls_config(None).expect("the built-in roots load"))
    }

    fn with_tls(key: Option<String>, tls: Arc<rustls::ClientConfig>) -> Self {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        // https:// URLs reach the connector too; it adds the TLS layer.
        http.enforce_http(false);
        HttpClient {
            inner: Client::builder(TokioExecutor::new()).build(Connector { http, tls }),
            key,
        }
    }

    /// Trusts the CA certificates of a PEM file too, for a server with a private CA.
    pub fn with_ca_file(self, path: &std::path::Path) -> anyhow::Result<Self> {
        Ok(Self::with_tls(self.key, tls_config(Some(path))?))
    }

    pub async fn request(
        &self,
        method: Method,
        url: &str,
        body: Option<Bytes>,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        let mut req = Request::builder().method(method).uri(url);
        // Every write carries a body here, and crier refuses writes without this type
        // (api::intent), so it is sent whenever there is one, even an empty one.
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        if let Some(k) = &self.key {
            req = req.header("authorization", format!("Bearer {k}"));
        }
        let req = req.body(Full::new(body.unwrap_or_default()))?;
        let resp = self.inner.request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }

    pub async fn post(
        &self,
        url: &str,
        body: impl Into<Bytes>,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        self.request(Method::POST, url, Some(body.into())).await
    }

    pub async fn get(&self, url: &str) -> anyhow::Result<(StatusCode, Bytes)> {
        self.request(Method::GET, url, None).await
    }

    /// GETs `url` and hands the body's chunks to `each` as they arrive, for a body too
    /// large to hold (a backup). On a status other than 2xx nothing is handed over and the
    /// error carries the status and the server's answer.
    pub async fn get_each(
        &self,
        url: &str,
        mut each: impl FnMut(&[u8]) -> std::io::Result<()>,
    ) -> anyhow::Result<u64> {
        let mut req = Request::builder().method(Method::GET).uri(url);
        if let Some(k) = &self.key {
            req = req.header("authorization", format!("Bearer {k}"));
        }
        let resp = self
            .inner
            .request(req.body(Full::new(Bytes::new()))?)
            .await?;
        let status = resp.status();
        let mut body = resp.into_body();
        if !status.is_success() {
            let text = body.collect().await?.to_bytes();
            anyhow::bail!("{status}: {}", String::from_utf8_lossy(&text));
        }
        let mut n = 0u64;
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data() {
                n += data.len() as u64;
                each(&data)?;
            }
        }
        Ok(n)
    }
}
