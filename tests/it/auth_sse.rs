//! Subscriber tokens on `/sse` (docs/auth.md): a real server, raw HTTP over loopback,
//! HS256 tokens minted here with `jsonwebtoken`.

use std::net::SocketAddr;

use crate::common::auth::now;
use crate::common::{within, Sse, TestServer};
use base64::Engine;
use crier::metrics::{ReasonLabel, Transport};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SECRET: &str = "sse-test-secret-of-at-least-32-bytes";

fn token_with(secret: &str, topics: &[&str], exp_in: i64) -> String {
    crate::common::auth::mint(secret, "alice", topics, exp_in)
}

fn token(topics: &[&str]) -> String {
    token_with(SECRET, topics, 600)
}

async fn private_server() -> TestServer {
    TestServer::start(|c| {
        c.private_topics = vec!["private:*".into()];
        c.jwt_secret = SECRET.into();
    })
    .await
}

/// One `/sse` request on a raw socket: the status, the head, and the dechunked body read
/// so far.
struct Stream {
    status: u16,
    head: String,
    socket: TcpStream,
    raw: Vec<u8>,
    body: Vec<u8>,
    ended: bool,
}

impl Stream {
    async fn open(addr: SocketAddr, query: &str, bearer: Option<&str>) -> Stream {
        let mut socket = TcpStream::connect(addr).await.unwrap();
        let auth = bearer
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let req = format!(
            "GET /sse{query} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n{auth}Connection: close\r\n\r\n"
        );
        socket.write_all(req.as_bytes()).await.unwrap();
        let mut s = Stream {
            status: 0,
            head: String::new(),
            socket,
            raw: Vec::new(),
            body: Vec::new(),
            ended: false,
        };
        loop {
            if let Some(i) = s.raw.windows(4).position(|w| w == b"\r\n\r\n") {
                s.head = String::from_utf8_lossy(&s.raw[..i]).to_string();
                s.raw.drain(..i + 4);
                break;
            }
            assert!(s.read().await, "no response head");
        }
        s.status = s.head[9..12].parse().unwrap();
        s
    }

    async fn read(&mut self) -> bool {
        let mut chunk = [0u8; 8192];
        match within("sse read", self.socket.read(&mut chunk)).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.raw.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// Moves every complete chunk of `raw` into `body`; true at the last chunk.
    fn dechunk(&mut self) -> bool {
        loop {
            let Some(eol) = self.raw.windows(2).position(|w| w == b"\r\n") else {
                return false;
            };
            let size_text = String::from_utf8_lossy(&self.raw[..eol]).to_string();
            let size = usize::from_str_radix(size_text.trim(), 16).expect("chunk size");
            if self.raw.len() < eol + 2 + size + 2 {
                return false;
            }
            self.body
                .extend_from_slice(&self.raw[eol + 2..eol + 2 + size]);
            self.raw.drain(..eol + 2 + size + 2);
            if size == 0 {
                return true;
            }
        }
    }

    /// Reads until `body` holds `needle` (false: the stream ended first).
    async fn until(&mut self, needle: &str) -> bool {
        loop {
            self.ended |= self.dechunk();
            if String::from_utf8_lossy(&self.body).contains(needle) {
                return true;
            }
            if self.ended || !self.read().await {
                return false;
            }
        }
    }

    /// Reads to the end of the response (bounded by `within` on each read).
    async fn read_to_end(&mut self) -> String {
        while !self.ended {
            self.ended |= self.dechunk();
            if !self.ended && !self.read().await {
                break;
            }
        }
        String::from_utf8_lossy(&self.body).to_string()
    }

    /// A refusal's JSON error body (the response has a content length and the connection
    /// closes after it).
    async fn error(mut self) -> Value {
        while self.read().await {}
        serde_json::from_slice(&self.raw).expect("an error body is JSON")
    }

    /// The `id:` of the last event whose data contains `needle`.
    fn id_of(&self, needle: &str) -> String {
        let body = String::from_utf8_lossy(&self.body);
        let event = body
            .split("\n\n")
            .find(|e| e.contains(needle))
            .expect("the event was read");
        event
            .lines()
            .find_map(|l| l.strip_prefix("id: "))
            .expect("the event has an id")
            .to_string()
    }
}

async fn refused(server: &TestServer, query: &str, bearer: Option<&str>) -> (u16, String) {
    let s = Stream::open(server.addr, query, bearer).await;
    let status = s.status;
    let body = s.error().await;
    let code = body["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        body["error"]["message"].is_string(),
        "the one error shape: {body}"
    );
    (status, code)
}

#[tokio::test]
async fn private_topic_without_a_token_is_refused_before_any_stream() {
    let server = private_server().await;
    assert_eq!(
        refused(&server, "?topic=private:a", None).await,
        (401, "token_required".into())
    );
    // One private topic among public ones refuses the whole stream.
    assert_eq!(
        refused(&server, "?topic=news&topic=private:a", None).await,
        (401, "token_required".into())
    );
    server.assert_clean().await;
    assert!(
        server.state().hub.total_subscriptions() == 0,
        "nothing subscribed"
    );
}

#[tokio::test]
async fn a_good_token_in_the_query_or_as_bearer_opens_the_stream() {
    let server = private_server().await;
    let t = token(&["private:a"]);
    let mut by_query = Sse::connect(server.addr, &format!("?topic=private:a&token={t}")).await;
    let mut by_header = Stream::open(server.addr, "?topic=private:a", Some(&t)).await;
    assert_eq!(by_header.status, 200, "{}", by_header.head);
    assert!(by_header.until("event: subscribed").await);
    let (s, _) = server.publish("private:a", r#"{"n":1}"#).await;
    assert_eq!(s, 200);
    let (_, env) = by_query.next_event().await.expect("an event");
    assert_eq!(env["data"], json!({"n": 1}));
    assert!(by_header.until(r#""data":{"n":1}"#).await);
}

#[tokio::test]
async fn forged_alg_none_expired_and_malformed_tokens_are_401() {
    let server = private_server().await;
    let forged = token_with("another-secret-of-at-least-32-bytes!!", &["private:a"], 600);
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let none = format!(
        "{}.{}.",
        b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
        b64.encode(
            json!({"sub": "alice", "exp": now() + 600, "topics": ["private:a"]}).to_string()
        )
    );
    let expired = token_with(SECRET, &["private:a"], -5);
    for (t, code) in [
        (forged.as_str(), "bad_token"),
        (none.as_str(), "bad_token"),
        (expired.as_str(), "token_expired"),
        ("not-a-jwt", "bad_token"),
    ] {
        assert_eq!(
            refused(&server, &format!("?topic=private:a&token={t}"), None).await,
            (401, code.into()),
            "{t}"
        );
        assert_eq!(
            refused(&server, "?topic=private:a", Some(t)).await,
            (401, code.into()),
            "bearer {t}"
        );
        // A bad token is refused even on a public topic: the client learns at once.
        assert_eq!(
            refused(&server, &format!("?topic=news&token={t}"), None).await,
            (401, code.into()),
            "public {t}"
        );
    }
    // Sent twice (query and header): refused, not guessed.
    let good = token(&["private:a"]);
    assert_eq!(
        refused(
            &server,
            &format!("?topic=private:a&token={good}"),
            Some(&good)
        )
        .await,
        (401, "bad_token".into())
    );
    server.assert_clean().await;
}

#[tokio::test]
async fn a_token_for_another_topic_is_403() {
    let server = private_server().await;
    let t = token(&["private:b"]);
    assert_eq!(
        refused(&server, &format!("?topic=private:a&token={t}"), None).await,
        (403, "topic_forbidden".into())
    );
    // Allowed and forbidden in one stream: nothing is opened.
    assert_eq!(
        refused(
            &server,
            &format!("?topic=private:b&topic=private:a&token={t}"),
            None
        )
        .await,
        (403, "topic_forbidden".into())
    );
    server.assert_clean().await;
}

#[tokio::test]
async fn a_pattern_allows_every_topic_it_matches() {
    let server = private_server().await;
    let t = token(&["private:room-*"]);
    let mut s = Sse::connect(
        server.addr,
        &format!("?topic=private:room-1&topic=private:room-2&topic=news&token={t}"),
    )
    .await;
    for (topic, n) in [("private:room-2", 2), ("news", 3), ("private:room-1", 1)] {
        assert_eq!(
            server.publish(topic, &format!(r#"{{"n":{n}}}"#)).await.0,
            200
        );
        let (_, env) = s.next_event().await.expect("an event");
        assert_eq!(
            (env["topic"].as_str(), &env["data"]),
            (Some(topic), &json!({"n": n}))
        );
    }
    assert_eq!(
        refused(&server, &format!("?topic=private:room&token={t}"), None).await,
        (403, "topic_forbidden".into())
    );
}

#[tokio::test]
async fn public_topics_are_unchanged() {
    // With private topics configured, a public one needs nothing.
    let server = private_server().await;
    let mut s = Sse::connect(server.addr, "?topic=news").await;
    assert_eq!(server.publish("news", r#"{"n":1}"#).await.0, 200);
    assert_eq!(s.next_event().await.unwrap().1["data"], json!({"n": 1}));
    drop(s);
    server.assert_clean().await;

    // A node that checks no tokens ignores one it is given.
    let open = TestServer::start(|_| {}).await;
    let mut s = Sse::connect(open.addr, "?topic=news&token=whatever").await;
    assert_eq!(open.publish("news", r#"{"n":2}"#).await.0, 200);
    assert_eq!(s.next_event().await.unwrap().1["data"], json!({"n": 2}));
}

#[tokio::test]
async fn the_stream_ends_when_the_token_expires() {
    let server = private_server().await;
    // `exp` has whole-second precision: 2 s ahead ends the stream 1-2 s from now.
    let t = token_with(SECRET, &["private:a"], 2);
    let mut s = Stream::open(server.addr, &format!("?topic=private:a&token={t}"), None).await;
    assert_eq!(s.status, 200, "{}", s.head);
    assert!(s.until("event: subscribed").await);
    let body = s.read_to_end().await;
    assert!(s.ended, "the response ended with its last chunk: {body:?}");
    assert!(
        body.ends_with(": close token_expired\n\n"),
        "the stream says why it ended: {body:?}"
    );
    server.assert_clean().await;
    let expired = server
        .state()
        .metrics
        .disconnects
        .get_or_create(&ReasonLabel {
            transport: Transport::Sse,
            reason: "token_expired",
        })
        .get();
    assert_eq!(expired, 1, "counted under its own reason");
}

#[tokio::test]
async fn resume_with_last_event_id_and_a_fresh_token() {
    let server = private_server().await;
    let first = token(&["private:a"]);
    let mut s = Stream::open(
        server.addr,
        &format!("?topic=private:a&token={first}"),
        None,
    )
    .await;
    assert_eq!(s.status, 200);
    assert!(s.until("event: subscribed").await);
    assert_eq!(server.publish("private:a", r#"{"n":1}"#).await.0, 200);
    assert!(s.until(r#""data":{"n":1}"#).await);
    let id = s.id_of(r#""data":{"n":1}"#);
    drop(s);
    server.assert_clean().await;

    // Missed while away, then resumed with a new token: replayed, nothing twice.
    for n in 2..=3 {
        assert_eq!(
            server
                .publish("private:a", &format!(r#"{{"n":{n}}}"#))
                .await
                .0,
            200
        );
    }
    let fresh = token(&["private:*"]);
    // An expired token cannot resume.
    let old = token_with(SECRET, &["private:a"], -1);
    assert_eq!(
        refused(
            &server,
            &format!("?topic=private:a&token={old}&lastEventId={id}"),
            None
        )
        .await,
        (401, "token_expired".into())
    );
    let mut s = Stream::open(
        server.addr,
        &format!("?topic=private:a&lastEventId={id}"),
        Some(&fresh),
    )
    .await;
    assert_eq!(s.status, 200, "{}", s.head);
    assert!(s.until(r#""data":{"n":3}"#).await);
    let body = String::from_utf8_lossy(&s.body).to_string();
    assert!(body.contains(r#""recovered":true"#), "{body}");
    assert!(!body.contains(r#""data":{"n":1}"#), "nothing twice: {body}");
    assert!(body.find(r#"{"n":2}"#) < body.find(r#"{"n":3}"#), "{body}");
}

#[tokio::test]
async fn tokens_never_reach_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_crier"));
    cmd.env("CRIER_LOG", "trace")
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .args(["--jwt-secret", SECRET, "--private-topic", "private:*"]);
    let (proc, addr, logs) = crate::common::spawn_logged(cmd);
    let addr: SocketAddr = addr.parse().unwrap();
    let good = token(&["private:a"]);
    let expired = token_with(SECRET, &["private:a"], -5);
    let forged = token_with("another-secret-of-at-least-32-bytes!!", &["private:a"], 600);
    let mut s = Stream::open(addr, &format!("?topic=private:a&token={good}"), None).await;
    assert_eq!(s.status, 200);
    assert!(s.until("event: subscribed").await);
    drop(s);
    for t in [&expired, &forged] {
        let s = Stream::open(addr, &format!("?topic=private:a&token={t}"), None).await;
        assert_eq!(s.status, 401);
        let s = Stream::open(addr, "?topic=private:a", Some(t)).await;
        assert_eq!(s.status, 401);
    }
    drop(proc); // killed: its log ends
    let lines: Vec<String> = logs.iter().collect();
    assert!(
        lines.iter().any(|l| l.contains("listening on")),
        "{lines:?}"
    );
    for t in [&good, &expired, &forged] {
        // The signature alone identifies a token.
        let signature = t.rsplit('.').next().unwrap();
        assert!(
            !lines.iter().any(|l| l.contains(signature)),
            "a token was logged: {lines:?}"
        );
    }
}
