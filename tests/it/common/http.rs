//! The small HTTP and WebSocket clients the suites share: one copy each instead of one per
//! file. They reach a node by its address (`127.0.0.1:PORT`), so they serve an in-process
//! `TestServer` (whose methods call them), a node started as the real binary, a second
//! node, or nginx in front of several.

use std::fmt::Display;

use crier::http_client::HttpClient;
use serde_json::Value;

use super::Ws;

/// A reply's body as JSON; `Null` when it is not JSON (an empty body, a proxy's page).
pub fn json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap_or(Value::Null)
}

/// GET `url`: the status and the body as JSON.
pub async fn get_url(url: &str) -> (u16, Value) {
    let (status, bytes) = HttpClient::new(None).get(url).await.expect("http get");
    (status.as_u16(), json(&bytes))
}

/// GET `http://ADDR/PATH`: the status and the body as JSON.
pub async fn get(addr: impl Display, path: &str) -> (u16, Value) {
    get_url(&format!("http://{addr}{path}")).await
}

/// POST `body` to `url`, with `key` as the bearer token when given: the status and the
/// body as JSON.
pub async fn post_url(url: &str, body: String, key: Option<&str>) -> (u16, Value) {
    let (status, bytes) = HttpClient::new(key.map(String::from))
        .post(url, body)
        .await
        .expect("http post");
    (status.as_u16(), json(&bytes))
}

/// POST the JSON `body` to `http://ADDR/PATH`: the status and the body as JSON.
pub async fn post(addr: impl Display, path: &str, body: &Value) -> (u16, Value) {
    post_url(&format!("http://{addr}{path}"), body.to_string(), None).await
}

/// Publishes `body` to `topic` through the node at `addr`, which must acknowledge it
/// (200): its receipt.
pub async fn publish(addr: impl Display, topic: &str, body: &Value) -> Value {
    let (status, v) = post(addr, &format!("/api/publish/{topic}"), body).await;
    assert_eq!(status, 200, "{v}");
    v
}

/// A WebSocket to `ws://ADDR/wsQUERY` (the query with its `?`).
pub async fn ws(addr: impl Display, query: &str) -> Ws {
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws{query}"))
        .await
        .expect("ws connects");
    ws
}

/// The `error.code` of an error body ("" when there is none).
pub fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("")
}

/// POSTs `body` to `url` for a test that may crash the server meanwhile: Some(answer) on
/// 200; None when no answer came (the server died mid-request, so nothing was
/// acknowledged). Any other status fails the test.
pub async fn post_acked(http: &HttpClient, url: &str, body: String) -> Option<Value> {
    match http.post(url, body).await {
        Ok((s, b)) if s == 200 => Some(serde_json::from_slice(&b).expect("JSON answer")),
        Ok((s, b)) => panic!("{url}: unexpected {s}: {}", String::from_utf8_lossy(&b)),
        Err(_) => None,
    }
}

/// POSTs JSON to `url` with an `Idempotency-Key` (any bytes, to test invalid ones): the
/// status, the `Idempotent-Replayed` header and the body as JSON.
pub async fn publish_keyed(url: &str, body: &str, key: &[u8]) -> (u16, Option<String>, Value) {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let req = hyper::Request::post(url)
        .header("content-type", "application/json")
        .header(
            "idempotency-key",
            hyper::header::HeaderValue::from_bytes(key).unwrap(),
        )
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let resp = super::within("publish", client.request(req)).await.unwrap();
    let status = resp.status().as_u16();
    let replayed = resp
        .headers()
        .get("idempotent-replayed")
        .map(|v| v.to_str().unwrap().to_string());
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, replayed, json(&bytes))
}

/// `DELETE http://ADDR/PATH` with an optional publisher key: the status and the body as
/// JSON.
pub async fn delete(addr: impl Display, path: &str, key: Option<&str>) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr.to_string())
        .await
        .unwrap();
    let auth = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
    let req = format!("DELETE {path} HTTP/1.1\r\nHost: t\r\n{auth}Content-Type: application/json\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out);
    let status = text[9..12].parse().unwrap();
    let body = text.split_once("\r\n\r\n").unwrap().1;
    (status, json(body.as_bytes()))
}
