//! A small HTTP/1 client for the command line (`crier publish`) and the load tool, on the
//! hyper stack the server already links, so no second HTTP implementation is pulled in.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

#[derive(Clone)]
pub struct HttpClient {
    inner: Client<HttpConnector, Full<Bytes>>,
    key: Option<String>,
}

impl HttpClient {
    pub fn new(key: Option<String>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        HttpClient {
            inner: Client::builder(TokioExecutor::new()).build(connector),
            key,
        }
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
}
