//! A small HTTP/1 client for the command line (`crier publish`) and the load tool, on the
//! hyper stack the server already links, so no second HTTP implementation is pulled in.
//! `https://` URLs go over rustls (the server's TLS stack), one connection per request,
//! trusting the public web roots plus a private CA given with `with_ca_file`.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

#[derive(Clone)]
pub struct HttpClient {
    inner: Client<HttpConnector, Full<Bytes>>,
    key: Option<String>,
    tls: Arc<rustls::ClientConfig>,
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
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        HttpClient {
            inner: Client::builder(TokioExecutor::new()).build(connector),
            key,
            tls: tls_config(None).expect("the built-in roots load"),
        }
    }

    /// Trusts the CA certificates of a PEM file too, for a server with a private CA.
    pub fn with_ca_file(mut self, path: &std::path::Path) -> anyhow::Result<Self> {
        self.tls = tls_config(Some(path))?;
        Ok(self)
    }

    /// One request over a fresh TLS connection.
    async fn request_tls(&self, req: Request<Full<Bytes>>) -> anyhow::Result<(StatusCode, Bytes)> {
        let uri = req.uri().clone();
        let host = uri
            .host()
            .ok_or_else(|| anyhow::anyhow!("{uri}: no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(443);
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| anyhow::anyhow!("connecting to {host}:{port}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let name = rustls_pki_types::ServerName::try_from(host.clone())
            .map_err(|e| anyhow::anyhow!("{host}: {e}"))?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| anyhow::anyhow!("TLS with {host}:{port}: {e}"))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
        let driver = tokio::spawn(conn);
        // An origin-form target and a Host header, as on any HTTP/1.1 connection.
        let (mut parts, body) = req.into_parts();
        let authority = uri.authority().map(|a| a.to_string()).unwrap_or(host);
        parts.uri = uri.path_and_query().map_or("/", |p| p.as_str()).parse()?;
        parts
            .headers
            .insert(hyper::header::HOST, authority.parse()?);
        let resp = sender
            .send_request(Request::from_parts(parts, body))
            .await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        driver.abort();
        Ok((status, body))
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
        if req.uri().scheme_str() == Some("https") {
            return self.request_tls(req).await;
        }
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
}
