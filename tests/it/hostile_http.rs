//! Hostile pages (issue 6, items 4 and 8): cross-site form posts and `no-cors` fetches,
//! foreign and DNS-rebinding Origins, against real sockets. Each attack runs beside a healthy
//! subscriber that must see every legitimate publication and nothing else, and leaves the
//! boards unchanged.

use std::net::SocketAddr;

use crate::common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One answer read off a raw socket: status, lower-cased head, and the JSON body if any.
struct Answer {
    status: u16,
    head: String,
    body: Value,
}

impl Answer {
    fn code(&self) -> Option<&str> {
        self.body["error"]["code"].as_str()
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == name).then(|| v.trim())
        })
    }
}

/// Sends one request with exactly these headers (`Host` defaults to the server's address)
/// and reads the head, then a `Content-Length` body if the answer has one. A streaming or
/// upgraded answer returns after its head.
async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Answer {
    let mut req = format!("{method} {path} HTTP/1.1\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: {addr}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-length"))
    {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    req.push_str(body);
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(req.as_bytes()).await.unwrap();
    read_answer(&mut stream).await
}

async fn read_answer(stream: &mut TcpStream) -> Answer {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = within("response head", stream.read(&mut chunk))
            .await
            .unwrap();
        assert!(n > 0, "connection closed before a response head");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let status = head[9..12].parse().expect("status code");
    let mut answer = Answer {
        status,
        head,
        body: Value::Null,
    };
    if let Some(len) = answer.header("content-length") {
        let len: usize = len.parse().unwrap();
        while buf.len() < head_end + len {
            let n = within("response body", stream.read(&mut chunk))
                .await
                .unwrap();
            assert!(n > 0, "connection closed inside the body");
            buf.extend_from_slice(&chunk[..n]);
        }
        answer.body = serde_json::from_slice(&buf[head_end..head_end + len]).unwrap_or(Value::Null);
    }
    answer
}

const JSON: (&str, &str) = ("Content-Type", "application/json");

/// A raw WebSocket upgrade with the given extra headers.
async fn upgrade(addr: SocketAddr, headers: &[(&str, &str)]) -> Answer {
    let mut all = vec![
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Sec-WebSocket-Version", "13"),
    ];
    all.extend_from_slice(headers);
    send(addr, "GET", "/ws?topic=probe", &all, "").await
}

/// Every kind of write, each with a body that would change something visible.
fn writes() -> [(&'static str, &'static str, &'static str); 5] {
    [
        ("POST", "/api/publish/t", r#"{"n":-1}"#),
        (
            "POST",
            "/api/boards/arena/scores",
            r#"{"player":"mallory","score":1e9}"#,
        ),
        ("POST", "/api/boards/arena/reset", ""),
        ("PUT", "/api/boards/arena", r#"{"top":1}"#),
        ("POST", "/api/boards/other", r#"{"top":1}"#),
    ]
}

/// A subscriber that must see publications `{"n":1}`, `{"n":2}`, ... in order and nothing
/// else, on WebSocket and SSE both.
struct Healthy {
    ws: Ws,
    sse: Sse,
    next: u64,
}

impl Healthy {
    async fn connect(srv: &TestServer) -> Healthy {
        let mut ws = srv.ws("?topic=t").await;
        assert_eq!(next_json(&mut ws).await["op"], "subscribed");
        let sse = Sse::connect(srv.addr, "?topic=t").await;
        let mut h = Healthy { ws, sse, next: 1 };
        h.publish_and_receive(srv).await;
        h
    }

    /// Publishes the next legitimate message and checks both transports get it next.
    async fn publish_and_receive(&mut self, srv: &TestServer) {
        let n = self.next;
        self.next += 1;
        let (s, _) = srv.publish("t", &json!({ "n": n }).to_string()).await;
        assert_eq!(s, 200);
        assert_eq!(next_json(&mut self.ws).await["data"], json!({ "n": n }));
        let (_, ev) = self.sse.next_event().await.expect("sse stream open");
        assert_eq!(ev["data"], json!({ "n": n }));
    }
}

/// A board with one legitimate score, and a check that it still holds exactly that.
async fn seed_board(srv: &TestServer) {
    let (s, _) = srv
        .post_with_key("/api/boards/arena", r#"{"top":5}"#, None)
        .await;
    assert_eq!(s, 200);
    let (s, _) = srv
        .post_with_key(
            "/api/boards/arena/scores",
            r#"{"player":"ann","score":7}"#,
            None,
        )
        .await;
    assert_eq!(s, 200);
}

async fn assert_board_untouched(srv: &TestServer) {
    let (s, b) = srv.get("/api/boards/arena").await;
    assert_eq!(s, 200);
    assert_eq!(b["top"], 5, "board options unchanged");
    assert_eq!(b["players"], 1, "no score added or reset");
    assert_eq!(b["entries"][0]["player"], "ann");
    let (_, list) = srv.get("/api/boards").await;
    assert!(
        !list.to_string().contains("\"other\""),
        "no board created: {list}"
    );
}

#[tokio::test]
async fn form_posts_get_415_and_change_nothing() {
    let srv = TestServer::start(|_| {}).await;
    seed_board(&srv).await;
    let mut healthy = Healthy::connect(&srv).await;
    for ct in [
        Some("application/x-www-form-urlencoded"),
        Some("text/plain"),
        Some("text/plain;charset=UTF-8"),
        Some("multipart/form-data; boundary=xyz"),
        Some("application/jsonp"),
        None,
    ] {
        for (method, path, body) in writes() {
            let headers: Vec<(&str, &str)> = ct.map(|c| ("Content-Type", c)).into_iter().collect();
            let a = send(srv.addr, method, path, &headers, body).await;
            assert_eq!(
                (a.status, a.code()),
                (415, Some("unsupported_media_type")),
                "{method} {path} as {ct:?}"
            );
            assert!(a.body["error"]["message"].is_string());
        }
        healthy.publish_and_receive(&srv).await;
    }
    assert_board_untouched(&srv).await;

    // JSON with parameters, in any case, is a write.
    let a = send(
        srv.addr,
        "POST",
        "/api/publish/t",
        &[("Content-Type", "Application/JSON; charset=utf-8")],
        &json!({ "n": healthy.next }).to_string(),
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(next_json(&mut healthy.ws).await["data"]["n"], healthy.next);
}

#[tokio::test]
async fn refused_before_the_body_is_read() {
    let srv = TestServer::start(|_| {}).await;
    let mut healthy = Healthy::connect(&srv).await;
    // Headers promise a large body that never comes: the answer must not wait for it,
    // nor be about its size.
    let a = send(
        srv.addr,
        "POST",
        "/api/publish/t",
        &[
            ("Content-Type", "text/plain"),
            ("Content-Length", "10000000"),
        ],
        "",
    )
    .await;
    assert_eq!((a.status, a.code()), (415, Some("unsupported_media_type")));
    let a = send(
        srv.addr,
        "POST",
        "/api/publish/t",
        &[
            JSON,
            ("Origin", "http://evil.example"),
            ("Content-Length", "10000000"),
        ],
        "",
    )
    .await;
    assert_eq!((a.status, a.code()), (403, Some("origin_not_allowed")));
    healthy.publish_and_receive(&srv).await;
}

#[tokio::test]
async fn cross_site_writes_get_403_and_change_nothing() {
    let srv = TestServer::start(|_| {}).await;
    seed_board(&srv).await;
    let mut healthy = Healthy::connect(&srv).await;
    let same = format!("http://{}", srv.addr);
    let attacks: [(&[(&str, &str)], &str); 5] = [
        // A no-cors fetch or form post as current browsers label it.
        (
            &[JSON, ("Sec-Fetch-Site", "cross-site")],
            "cross_site_request",
        ),
        // A foreign page, with or without fetch metadata.
        (
            &[JSON, ("Origin", "http://evil.example")],
            "origin_not_allowed",
        ),
        (
            &[
                JSON,
                ("Origin", "https://evil.example"),
                ("Sec-Fetch-Site", "cross-site"),
            ],
            "origin_not_allowed",
        ),
        // Sandboxed frames and data: URLs send "null".
        (&[JSON, ("Origin", "null")], "origin_not_allowed"),
        // Claiming our origin does not help when the browser says cross-site.
        (
            &[JSON, ("Origin", &same), ("Sec-Fetch-Site", "cross-site")],
            "cross_site_request",
        ),
    ];
    for (headers, code) in attacks {
        for (method, path, body) in writes() {
            let a = send(srv.addr, method, path, headers, body).await;
            assert_eq!(
                (a.status, a.code()),
                (403, Some(code)),
                "{method} {path} with {headers:?}"
            );
        }
        healthy.publish_and_receive(&srv).await;
    }
    assert_board_untouched(&srv).await;
}

#[tokio::test]
async fn same_origin_browser_requests_pass() {
    let srv = TestServer::start(|_| {}).await;
    seed_board(&srv).await;
    let mut healthy = Healthy::connect(&srv).await;
    let port = srv.addr.port();
    let ip_origin = format!("http://127.0.0.1:{port}");
    let ip_host = format!("127.0.0.1:{port}");
    let local_origin = format!("http://localhost:{port}");
    let local_host = format!("localhost:{port}");
    let cases: [Vec<(&str, &str)>; 4] = [
        vec![("Origin", &ip_origin), ("Sec-Fetch-Site", "same-origin")],
        vec![("Host", &local_host), ("Origin", &local_origin)],
        // The default port written in Host but not in Origin, and the other way round.
        vec![("Host", "127.0.0.1:80"), ("Origin", "http://127.0.0.1")],
        vec![("Host", "127.0.0.1"), ("Origin", "http://127.0.0.1:80")],
    ];
    for headers in &cases {
        let mut with_json = headers.clone();
        with_json.push(JSON);
        let n = healthy.next;
        healthy.next += 1;
        let a = send(
            srv.addr,
            "POST",
            "/api/publish/t",
            &with_json,
            &json!({ "n": n }).to_string(),
        )
        .await;
        assert_eq!(a.status, 200, "{headers:?}: {:?}", a.body);
        assert_eq!(next_json(&mut healthy.ws).await["data"]["n"], n);
        assert_eq!(healthy.sse.next_event().await.unwrap().1["data"]["n"], n);
        let a = send(
            srv.addr,
            "POST",
            "/api/boards/arena/scores",
            &with_json,
            r#"{"player":"bob","score":3}"#,
        )
        .await;
        assert_eq!(a.status, 200, "{headers:?}: {:?}", a.body);
        assert_eq!(upgrade(srv.addr, headers).await.status, 101, "{headers:?}");
        let a = send(srv.addr, "GET", "/sse?topic=t", headers, "").await;
        assert_eq!(a.status, 200, "{headers:?}");
        assert_eq!(a.header("access-control-allow-origin"), None);
    }
    let a = send(
        srv.addr,
        "POST",
        "/api/boards/arena/reset",
        &[JSON, ("Origin", &ip_origin), ("Host", &ip_host)],
        "",
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let (_, b) = srv.get("/api/boards/arena").await;
    assert_eq!(b["players"], 0);
    healthy.publish_and_receive(&srv).await;
}

#[tokio::test]
async fn dns_rebinding_is_refused_everywhere() {
    let srv = TestServer::start(|_| {}).await;
    seed_board(&srv).await;
    let mut healthy = Healthy::connect(&srv).await;
    let port = srv.addr.port();
    // The attacker's page at evil.example, its name re-pointed at crier: Origin and Host
    // agree, and both name the attacker.
    let origin = format!("http://evil.example:{port}");
    let host = format!("evil.example:{port}");
    let rebinding = [("Origin", origin.as_str()), ("Host", host.as_str())];
    let on_port_80 = [
        ("Origin", "http://evil.example"),
        ("Host", "evil.example:80"),
    ];
    for headers in [&rebinding[..], &on_port_80[..]] {
        let a = upgrade(srv.addr, headers).await;
        assert_eq!((a.status, a.code()), (403, Some("origin_not_allowed")));
        let a = send(srv.addr, "GET", "/sse?topic=t", headers, "").await;
        assert_eq!((a.status, a.code()), (403, Some("origin_not_allowed")));
        for (method, path, body) in writes() {
            let mut h = headers.to_vec();
            h.push(JSON);
            let a = send(srv.addr, method, path, &h, body).await;
            assert_eq!(
                (a.status, a.code()),
                (403, Some("origin_not_allowed")),
                "{method} {path}"
            );
        }
        healthy.publish_and_receive(&srv).await;
    }
    assert_board_untouched(&srv).await;
    // Nothing refused holds a connection: only the healthy subscriber's two remain.
    let state = srv.state().clone();
    wait_until("only the healthy connections left", || {
        state.connection_count() == 2
    })
    .await;
}

#[tokio::test]
async fn sse_follows_the_origin_rule() {
    let srv = TestServer::start(|c| c.allowed_origins = vec!["https://game.example".into()]).await;
    let mut healthy = Healthy::connect(&srv).await;
    // An <img>/<script> or no-cors fetch from another site: no Origin, but labelled.
    let a = send(
        srv.addr,
        "GET",
        "/sse?topic=t",
        &[("Sec-Fetch-Site", "cross-site")],
        "",
    )
    .await;
    assert_eq!((a.status, a.code()), (403, Some("cross_site_request")));
    // An EventSource on a foreign page.
    let a = send(
        srv.addr,
        "GET",
        "/sse?topic=t",
        &[("Origin", "https://evil.example")],
        "",
    )
    .await;
    assert_eq!((a.status, a.code()), (403, Some("origin_not_allowed")));
    // A listed site may read the stream: CORS answered for exactly its origin.
    let a = send(
        srv.addr,
        "GET",
        "/sse?topic=t",
        &[
            ("Origin", "https://game.example"),
            ("Sec-Fetch-Site", "cross-site"),
        ],
        "",
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(
        a.header("access-control-allow-origin"),
        Some("https://game.example")
    );
    healthy.publish_and_receive(&srv).await;
}

#[tokio::test]
async fn configured_public_origin_is_trusted() {
    let srv = TestServer::start(|c| {
        c.public_origins = vec!["https://crier.example".into()];
        c.allowed_origins = vec!["https://game.example".into()];
    })
    .await;
    let mut healthy = Healthy::connect(&srv).await;
    // Behind a reverse proxy the Host is whatever the proxy forwards; the listed origin
    // decides, with or without its default port, whatever the Host says.
    let trusted: [Vec<(&str, &str)>; 4] = [
        vec![("Origin", "https://crier.example")],
        vec![
            ("Origin", "https://crier.example:443"),
            ("Host", "crier.example"),
        ],
        vec![
            ("Origin", "https://CRIER.example"),
            ("Host", "crier.example:443"),
        ],
        vec![
            ("Origin", "https://game.example"),
            ("Sec-Fetch-Site", "cross-site"),
        ],
    ];
    for headers in &trusted {
        let mut with_json = headers.clone();
        with_json.push(JSON);
        let n = healthy.next;
        healthy.next += 1;
        let a = send(
            srv.addr,
            "POST",
            "/api/publish/t",
            &with_json,
            &json!({ "n": n }).to_string(),
        )
        .await;
        assert_eq!(a.status, 200, "{headers:?}: {:?}", a.body);
        assert_eq!(next_json(&mut healthy.ws).await["data"]["n"], n);
        assert_eq!(healthy.sse.next_event().await.unwrap().1["data"]["n"], n);
        assert_eq!(upgrade(srv.addr, headers).await.status, 101, "{headers:?}");
    }
    // Same name, wrong scheme or port; a rebinding name; an unlisted site.
    for origin in [
        "http://crier.example",
        "https://crier.example:8443",
        "https://evil.example",
    ] {
        let host = origin.split("://").nth(1).unwrap();
        let headers = [("Origin", origin), ("Host", host), JSON];
        let a = send(srv.addr, "POST", "/api/publish/t", &headers, r#"{"n":-1}"#).await;
        assert_eq!(
            (a.status, a.code()),
            (403, Some("origin_not_allowed")),
            "{origin}"
        );
        let a = upgrade(srv.addr, &headers[..2]).await;
        assert_eq!(a.status, 403, "{origin}");
    }
    // The bundled page's same-origin EventSource (no Origin) under the public name.
    let a = send(
        srv.addr,
        "GET",
        "/sse?topic=t",
        &[("Host", "crier.example"), ("Sec-Fetch-Site", "same-origin")],
        "",
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.header("access-control-allow-origin"), None);
    // The bundled page opened by IP address still works.
    let ip_origin = format!("http://{}", srv.addr);
    assert_eq!(
        upgrade(srv.addr, &[("Origin", &ip_origin)]).await.status,
        101
    );
    healthy.publish_and_receive(&srv).await;
}
