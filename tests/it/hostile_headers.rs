//! Ambiguous requests (issue 15, finding 6): a header that must be single sent twice, an
//! `Origin` that is not a serialized origin, a signed token whose `exp` is out of range,
//! and names made of dots. Each is refused with its own code before anything is done, and a
//! healthy subscriber next to them sees only the legitimate publications.

use std::net::SocketAddr;

use crate::common::auth::{hs256, now};
use crate::common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SECRET: &str = "an-hs256-secret-of-32-bytes-or-more!";

/// Sends `head` (request line and headers, without the blank line) and `body`, and reads
/// one answer: status and JSON body.
async fn raw(addr: SocketAddr, head: &str, body: &str) -> (u16, Value) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!("{head}\r\n\r\n{body}");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = within("response head", s.read(&mut chunk)).await.unwrap();
        assert!(n > 0, "closed before an answer to {head:?}");
        buf.extend_from_slice(&chunk[..n]);
    };
    let text = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let status = text[9..12].parse().unwrap();
    let len: usize = text
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    while buf.len() < head_end + len {
        let n = within("response body", s.read(&mut chunk)).await.unwrap();
        assert!(n > 0, "closed inside the body");
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = serde_json::from_slice(&buf[head_end..head_end + len]).unwrap_or(Value::Null);
    (status, body)
}

/// A publish of `body` to `t` with the given extra header lines.
async fn publish_with(addr: SocketAddr, extra: &[&str], body: &str) -> (u16, Value) {
    let mut head = format!("POST /api/publish/t HTTP/1.1\r\nHost: {addr}");
    let mut has_ct = false;
    let mut has_cl = false;
    for h in extra {
        has_ct |= h.to_ascii_lowercase().starts_with("content-type:");
        has_cl |= h.to_ascii_lowercase().starts_with("content-length:");
        head.push_str("\r\n");
        head.push_str(h);
    }
    if !has_ct {
        head.push_str("\r\nContent-Type: application/json");
    }
    if !has_cl {
        head.push_str(&format!("\r\nContent-Length: {}", body.len()));
    }
    raw(addr, &head, body).await
}

/// A healthy subscriber of `t` that checks it received exactly the `{"ok":N}` published.
struct Healthy {
    ws: Ws,
    seen: u64,
}

impl Healthy {
    async fn join(srv: &TestServer) -> Healthy {
        let mut ws = srv.ws("?topic=t").await;
        assert_eq!(next_json(&mut ws).await["op"], "subscribed");
        Healthy { ws, seen: 0 }
    }
    /// Publishes `{"ok":N}` plainly and checks it is the next message.
    async fn check(&mut self, srv: &TestServer, key: Option<&str>) {
        let (s, b) = srv
            .post_with_key(
                "/api/publish/t",
                &json!({ "ok": self.seen }).to_string(),
                key,
            )
            .await;
        assert_eq!(s, 200, "{b}");
        let m = next_json(&mut self.ws).await;
        assert_eq!(m["data"]["ok"], self.seen, "healthy subscriber saw {m}");
        self.seen += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_that_must_be_single_sent_twice_is_refused() {
    let srv = TestServer::start(|c| {
        c.publisher_keys = vec!["the-key".into()];
    })
    .await;
    let addr = srv.addr;
    let mut healthy = Healthy::join(&srv).await;
    healthy.check(&srv, Some("the-key")).await;

    let same = format!("Origin: http://{addr}");
    let cases: Vec<(Vec<String>, &str, &str)> = vec![
        // A valid key followed by a wrong one, and the other way round: neither wins.
        (
            vec![
                "Authorization: Bearer the-key".into(),
                "Authorization: Bearer other".into(),
            ],
            "duplicate_header",
            "authorization",
        ),
        (
            vec![
                "Authorization: Bearer other".into(),
                "Authorization: Bearer the-key".into(),
            ],
            "duplicate_header",
            "authorization",
        ),
        // A same-origin Origin followed by a foreign one let a write through before.
        (
            vec![
                "Authorization: Bearer the-key".into(),
                same.clone(),
                "Origin: http://evil.example".into(),
            ],
            "duplicate_header",
            "origin",
        ),
        (
            vec![
                "Authorization: Bearer the-key".into(),
                "Content-Type: text/plain".into(),
                "Content-Type: application/json".into(),
            ],
            "duplicate_header",
            "content-type",
        ),
        (
            vec![
                "Authorization: Bearer the-key".into(),
                "Idempotency-Key: a".into(),
                "Idempotency-Key: b".into(),
            ],
            "duplicate_header",
            "idempotency-key",
        ),
        (
            vec![
                "Authorization: Bearer the-key".into(),
                format!("Host: {addr}"),
            ],
            "duplicate_header",
            "host",
        ),
    ];
    for (headers, code, name) in &cases {
        let refs: Vec<&str> = headers.iter().map(String::as_str).collect();
        let (status, body) = publish_with(addr, &refs, r#"{"bad":1}"#).await;
        assert_eq!(status, 400, "{headers:?}: {body}");
        assert_eq!(body["error"]["code"], *code, "{headers:?}: {body}");
        let message = body["error"]["message"]
            .as_str()
            .unwrap()
            .to_ascii_lowercase();
        assert!(message.contains(name), "{headers:?}: {message}");
    }
    // Content-Length is judged by hyper before any layer runs: two different lengths are a
    // smuggling attempt it refuses itself (a bare 400, then it closes); two equal ones say
    // the same thing and it keeps one (RFC 9112 6.3), so the body is never ambiguous.
    let (status, _) = publish_with(
        addr,
        &[
            "Authorization: Bearer the-key",
            "Content-Length: 9",
            "Content-Length: 10",
        ],
        r#"{"bad":1}"#,
    )
    .await;
    assert_eq!(status, 400);

    // The same on the streams: a WebSocket upgrade and an SSE stream.
    let upgrade = format!(
        "GET /ws?topic=t HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         {same}\r\nOrigin: http://evil.example"
    );
    let (status, body) = raw(addr, &upgrade, "").await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (400, &json!("duplicate_header"))
    );
    let sse = format!(
        "GET /sse?topic=t HTTP/1.1\r\nHost: {addr}\r\n{same}\r\nOrigin: http://evil.example"
    );
    let (status, body) = raw(addr, &sse, "").await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (400, &json!("duplicate_header"))
    );
    // Last-Event-ID keeps its own code.
    let sse = format!(
        "GET /sse?topic=t HTTP/1.1\r\nHost: {addr}\r\nLast-Event-ID: a:1\r\nLast-Event-ID: a:2"
    );
    let (status, body) = raw(addr, &sse, "").await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (400, &json!("bad_last_event_id"))
    );
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("Last-Event-ID"));

    // Nothing was published; a header repeated that may be repeated is fine.
    let (status, body) = publish_with(
        addr,
        &[
            "Authorization: Bearer the-key",
            "Accept: application/json",
            "Accept: text/plain",
        ],
        &json!({ "ok": healthy.seen }).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(next_json(&mut healthy.ws).await["data"]["ok"], healthy.seen);
    healthy.seen += 1;
    healthy.check(&srv, Some("the-key")).await;
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_serialized_origin_is_an_origin() {
    let srv = TestServer::start(|_| {}).await;
    let addr = srv.addr;
    let mut healthy = Healthy::join(&srv).await;
    healthy.check(&srv, None).await;
    for bad in [
        format!("http://{addr}/"),
        format!("http://{addr}/x"),
        format!("http://{addr}?"),
        format!("http://{addr}#"),
        format!("http://user@{addr}"),
        format!("http://{addr}, http://{addr}"),
    ] {
        let origin = format!("Origin: {bad}");
        let (status, body) = publish_with(addr, &[&origin], r#"{"bad":1}"#).await;
        assert_eq!(status, 403, "{bad:?}: {body}");
        assert_eq!(body["error"]["code"], "origin_not_allowed", "{bad:?}");
    }
    // The serialized form passes.
    let origin = format!("Origin: http://{addr}");
    let (status, body) =
        publish_with(addr, &[&origin], &json!({ "ok": healthy.seen }).to_string()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(next_json(&mut healthy.ws).await["data"]["ok"], healthy.seen);
    healthy.seen += 1;
    healthy.check(&srv, None).await;
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_token_with_an_exp_out_of_range_says_so() {
    let srv = TestServer::start(|c| {
        c.jwt_secret = SECRET.into();
        c.private_topics = vec!["p:*".into()];
    })
    .await;
    for exp in [
        json!(1e300),
        json!(-1),
        json!(1.8446744073709552e19),
        json!(now() as f64 + 60.5),
        json!("tomorrow"),
    ] {
        let token = hs256(
            &json!({ "sub": "a", "exp": exp, "topics": ["p:*"] }),
            SECRET,
        );
        let (status, body) = srv.get(&format!("/sse?topic=p:1&token={token}")).await;
        assert_eq!(status, 401, "exp {exp}: {body}");
        assert_eq!(body["error"]["code"], "bad_token", "exp {exp}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("\"exp\""), "exp {exp}: {message}");
        assert!(!message.contains("signature"), "exp {exp}: {message}");
    }
    // A forged one still says the signature does not match.
    let token = hs256(
        &json!({ "sub": "a", "exp": now() + 60, "topics": ["p:*"] }),
        "another-secret-of-32-bytes-or-more!!",
    );
    let (status, body) = srv.get(&format!("/sse?topic=p:1&token={token}")).await;
    assert_eq!(status, 401);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("signature"));
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_and_dot_dot_are_not_names() {
    let srv = TestServer::start(|_| {}).await;
    let mut healthy = Healthy::join(&srv).await;
    for name in ["%2E", "%2E%2E", "%2e"] {
        let (status, body) = srv
            .post_with_key(&format!("/api/publish/{name}"), "{}", None)
            .await;
        assert_eq!(status, 400, "{name}: {body}");
        assert_eq!(body["error"]["code"], "bad_topic");
        let (status, body) = srv
            .post_with_key(
                &format!("/api/boards/{name}/scores"),
                r#"{"player":"p","score":1}"#,
                None,
            )
            .await;
        assert_eq!(status, 400, "{name}: {body}");
        assert_eq!(body["error"]["code"], "bad_board");
        let (status, body) = srv.get(&format!("/sse?topic={name}")).await;
        assert_eq!(status, 400, "{name}: {body}");
    }
    // Dots inside a name are still fine.
    let (status, body) = srv
        .post_with_key(
            "/api/boards/a..b/scores",
            r#"{"player":"p","score":1}"#,
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        srv.get("/api/boards").await.1["boards"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    healthy.check(&srv, None).await;
    srv.shutdown().await;
}
