//! crier as a Pusher Channels server (docs/pusher.md), driven by the real libraries from
//! the registries, unchanged: pusher-js and the `pusher` Node SDK (tests/pusher/drive.mjs,
//! which also checks app 1's webhooks with the SDK's own `webhook().isValid()`), Laravel
//! Echo in headless Chromium (tests/pusher/echo.mjs)
//! and the `pusher` PyPI SDK (tests/pusher/trigger.py); and hostile Pusher clients, each
//! next to a healthy one that must not notice.
//!
//! The drivers need `npm ci` in tests/pusher and a virtualenv at tests/pusher/.venv with
//! tests/pusher/requirements.txt (scripts/test makes both); missing, they follow the one
//! policy of tests/it/common/tools.rs.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crier::config::{AppConfig, Config};
use futures_util::SinkExt;
use md5::Digest;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

use crate::common::{expect_close, next_json, tools, within, TestServer, Ws};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn app(id: &str, key: &str, secret: &str) -> AppConfig {
    AppConfig {
        id: id.into(),
        key: key.into(),
        secret: secret.into(),
        ..AppConfig::default()
    }
}

/// App 1 (client events on) and app 2, as the drivers expect; app 3 holds one connection.
fn apps(c: &mut Config) {
    c.apps = vec![
        AppConfig {
            enable_client_events: true,
            ..app("1", "key1", "secret1")
        },
        app("2", "key2", "secret2"),
        AppConfig {
            max_connections: Some(1),
            ..app("3", "key3", "secret3")
        },
    ];
}

async fn run_driver(mut cmd: tokio::process::Command, addr: SocketAddr) {
    cmd.current_dir(root().join("tests/pusher"))
        .env("CRIER_ADDR", addr.to_string())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("the driver finishes within 60 s")
        .expect("the driver runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{}", stdout.trim());
}

#[tokio::test]
async fn pusher_js_and_the_node_sdk() {
    let Some(node) = tools::require("node", "apt-get install -y nodejs npm") else {
        return;
    };
    if !root().join("tests/pusher/node_modules/pusher-js").is_dir() {
        tools::missing(
            "the npm packages of tests/pusher",
            "cd tests/pusher && npm ci",
        );
        return;
    }
    // The driver receives app 1's webhooks on this port.
    let hook_port = free_port();
    let server = TestServer::start(|c| {
        apps(c);
        c.apps[0].webhooks = vec![format!("http://127.0.0.1:{hook_port}/")];
        c.webhook_vacate_grace = Duration::from_millis(100);
    })
    .await;
    let mut cmd = tokio::process::Command::new(node);
    // Node 20 has its WebSocket behind this flag (the driver's raw-protocol steps use it).
    cmd.args(["--experimental-websocket", "--no-warnings", "drive.mjs"])
        .env("CRIER_WEBHOOK_PORT", hook_port.to_string());
    run_driver(cmd, server.addr).await;
    server.shutdown().await;
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Laravel Echo over pusher-js, both their browser builds, in headless Chromium
/// (tests/pusher/echo.mjs serves the page and the app's /broadcasting/auth).
#[tokio::test]
async fn laravel_echo_in_chromium() {
    let Some(node) = tools::require("node", "apt-get install -y nodejs npm") else {
        return;
    };
    if tools::require("chromium", "apt-get install -y chromium").is_none() {
        return;
    }
    if !root()
        .join("tests/pusher/node_modules/laravel-echo")
        .is_dir()
    {
        tools::missing(
            "the npm packages of tests/pusher",
            "cd tests/pusher && npm ci",
        );
        return;
    }
    let page_port = free_port();
    let server = TestServer::start(|c| {
        apps(c);
        c.allowed_origins = vec![format!("http://127.0.0.1:{page_port}")];
    })
    .await;
    let mut cmd = tokio::process::Command::new(node);
    cmd.arg("echo.mjs")
        .env("CRIER_PAGE_PORT", page_port.to_string());
    run_driver(cmd, server.addr).await;
    server.shutdown().await;
}

#[tokio::test]
async fn the_python_sdk() {
    let python = root().join("tests/pusher/.venv/bin/python");
    if !python.is_file() {
        tools::missing(
            "the PyPI package pusher in tests/pusher/.venv",
            "python3 -m venv tests/pusher/.venv && tests/pusher/.venv/bin/pip install -r tests/pusher/requirements.txt",
        );
        return;
    }
    let server = TestServer::start(apps).await;
    let mut cmd = tokio::process::Command::new(python);
    cmd.arg("trigger.py");
    run_driver(cmd, server.addr).await;
    server.shutdown().await;
}

/// A Pusher client of app `key`, after its `connection_established`; returns its socket id.
async fn pusher_ws(addr: SocketAddr, key: &str) -> (Ws, String) {
    let url = format!("ws://{addr}/app/{key}?protocol=7&client=test&version=1");
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("connects");
    let hello = next_json(&mut ws).await;
    assert_eq!(hello["event"], "pusher:connection_established", "{hello}");
    let data: Value = serde_json::from_str(hello["data"].as_str().unwrap()).unwrap();
    (ws, data["socket_id"].as_str().unwrap().to_string())
}

async fn send(ws: &mut Ws, text: &str) {
    ws.send(Message::Text(text.into())).await.expect("sends");
}

async fn subscribe(ws: &mut Ws, channel: &str) {
    send(
        ws,
        &format!(r#"{{"event":"pusher:subscribe","data":{{"channel":"{channel}"}}}}"#),
    )
    .await;
    let ok = next_json(ws).await;
    assert_eq!(
        ok["event"], "pusher_internal:subscription_succeeded",
        "{ok}"
    );
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `POST /apps/{id}/events`, signed as the SDKs sign it.
async fn trigger(addr: SocketAddr, id: &str, key: &str, secret: &str, body: &str) -> u16 {
    signed_post(addr, &format!("/apps/{id}/events"), key, secret, body).await
}

/// A `POST` of the Pusher API to `path`, signed as the SDKs sign it.
async fn signed_post(addr: SocketAddr, path: &str, key: &str, secret: &str, body: &str) -> u16 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let md5 = hex(&md5::Md5::digest(body.as_bytes()));
    let q = format!("auth_key={key}&auth_timestamp={now}&auth_version=1.0&body_md5={md5}");
    let sig = crier::pusher::sign::sign(secret.as_bytes(), format!("POST\n{path}\n{q}").as_bytes());
    let (status, _) = crate::common::http::post_url(
        &format!("http://{addr}{path}?{q}&auth_signature={sig}"),
        body.to_string(),
        None,
    )
    .await;
    status
}

async fn event(addr: SocketAddr, channel: &str, name: &str, data: &str) {
    let body = serde_json::json!({"name": name, "channel": channel, "data": data}).to_string();
    assert_eq!(trigger(addr, "1", "key1", "secret1", &body).await, 200);
}

/// The next event named `name` (skipping others).
async fn next_event(ws: &mut Ws, name: &str) -> Value {
    loop {
        let v = next_json(ws).await;
        if v["event"] == name {
            return v;
        }
    }
}

#[tokio::test]
async fn hostile_pusher_clients_next_to_a_healthy_one() {
    let server = TestServer::start(|c| {
        apps(c);
        c.max_commands_per_second = 50;
        c.queue_max_bytes = 64 * 1024;
        c.max_message_bytes = 16 * 1024;
        c.max_topics_per_connection = 4;
    })
    .await;
    let addr = server.addr;
    let (mut healthy, _) = pusher_ws(addr, "key1").await;
    subscribe(&mut healthy, "news").await;

    // Past max_topics_per_connection: pusher:subscription_error, the rest kept.
    let (mut greedy, _) = pusher_ws(addr, "key1").await;
    for i in 0..4 {
        subscribe(&mut greedy, &format!("g{i}")).await;
    }
    send(
        &mut greedy,
        r#"{"event":"pusher:subscribe","data":{"channel":"g4"}}"#,
    )
    .await;
    let v = next_json(&mut greedy).await;
    assert_eq!(v["event"], "pusher:subscription_error", "{v}");
    assert_eq!(v["channel"], "g4");
    assert_eq!(v["data"]["status"], 503);

    // A frame flood: pusher:error 4301, then close 4301.
    let (mut flood, _) = pusher_ws(addr, "key1").await;
    for _ in 0..200 {
        if flood
            .send(Message::Text(r#"{"event":"pusher:ping","data":{}}"#.into()))
            .await
            .is_err()
        {
            break;
        }
    }
    assert_eq!(expect_close(&mut flood).await, 4301);

    // A message over max_message_bytes: closed 1009.
    let (mut big, _) = pusher_ws(addr, "key1").await;
    let _ = big.send(Message::Text("x".repeat(20_000).into())).await;
    assert_eq!(expect_close(&mut big).await, 1009);

    // Bad messages: a pusher:error each, nothing subscribed, the connection stays.
    let (mut bad, sid) = pusher_ws(addr, "key1").await;
    for text in [
        "not json",
        r#"{"event":"pusher:subscribe","data":{"channel":"a b"}}"#,
        r#"{"event":"pusher:subscribe","data":{"channel":"private-x","auth":"key1:00"}}"#,
        r#"{"event":"pusher:subscribe","data":{"channel":"presence-x","auth":"key1:00","channel_data":"{}"}}"#,
        r#"{"event":"client-x","channel":"private-x","data":{}}"#,
        r#"{"event":"client-x","channel":"news","data":{}}"#,
    ] {
        send(&mut bad, text).await;
        let v = next_event(&mut bad, "pusher:error").await;
        assert!(v["data"]["message"].is_string(), "{v}");
    }
    // A private channel signed for another socket is refused too.
    let auth = format!(
        "key1:{}",
        crier::pusher::sign::sign(b"secret1", b"1.1:private-x")
    );
    send(
        &mut bad,
        &format!(
            r#"{{"event":"pusher:subscribe","data":{{"channel":"private-x","auth":"{auth}"}}}}"#
        ),
    )
    .await;
    let v = next_event(&mut bad, "pusher:error").await;
    assert_eq!(v["data"]["code"], 4009, "{v}");
    // Signed for this socket: accepted.
    let auth = format!(
        "key1:{}",
        crier::pusher::sign::sign(b"secret1", format!("{sid}:private-x").as_bytes())
    );
    send(
        &mut bad,
        &format!(
            r#"{{"event":"pusher:subscribe","data":{{"channel":"private-x","auth":"{auth}"}}}}"#
        ),
    )
    .await;
    next_event(&mut bad, "pusher_internal:subscription_succeeded").await;

    // A client that never reads while events pour in: closed as a slow consumer, its
    // queue bounded by queue_max_bytes; the healthy client gets every event.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut slow = socket.connect(addr).await.unwrap();
    slow.write_all(
        format!(
            "GET /app/key1?protocol=7 HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    // Subscribe (one masked text frame), then read nothing more.
    let sub = br#"{"event":"pusher:subscribe","data":{"channel":"news"}}"#;
    let mut frame = vec![0x81, 0x80 | sub.len() as u8, 0, 0, 0, 0];
    frame.extend_from_slice(sub);
    slow.write_all(&frame).await.unwrap();
    crate::common::wait_until("the slow client subscribed", || {
        server.state().hub.subscriber_count("pusher/1/news") == 2
    })
    .await;
    let payload = "y".repeat(8 * 1024);
    let mut sent = 0;
    while server.state().hub.subscriber_count("pusher/1/news") == 2 {
        assert!(sent < 5000, "the slow client was never dropped");
        event(addr, "news", &format!("e{sent}"), &payload).await;
        let v = next_event(&mut healthy, &format!("e{sent}")).await;
        assert_eq!(v["channel"], "news");
        sent += 1;
    }
    eprintln!("the slow client was dropped after {sent} events of 8 KiB");
    let mut rest = Vec::new();
    let _ = within("the slow socket closes", slow.read_to_end(&mut rest)).await;

    // Over capacity: app 3 holds one connection; the second gets 4100.
    let (_first, _) = pusher_ws(addr, "key3").await;
    let url = format!("ws://{addr}/app/key3?protocol=7");
    let (mut second, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let v = next_json(&mut second).await;
    assert_eq!(v["data"]["code"], 4100, "{v}");
    assert_eq!(expect_close(&mut second).await, 4100);
    // An unknown key: 4001; a protocol not spoken: 4007.
    for (path, code) in [("nope?protocol=7", 4001), ("key1?protocol=2", 4007)] {
        let url = format!("ws://{addr}/app/{path}");
        let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        assert_eq!(next_json(&mut ws).await["data"]["code"], code);
        assert_eq!(expect_close(&mut ws).await, code);
    }

    // The healthy client saw nothing of it and still works.
    event(addr, "news", "last", "{}").await;
    next_event(&mut healthy, "last").await;
    server.shutdown().await;
}

/// Each app is its own channel space, and no crier client or publisher can name one.
#[tokio::test]
async fn apps_and_crier_topics_never_meet() {
    let server = TestServer::start(apps).await;
    let addr = server.addr;
    let (mut one, _) = pusher_ws(addr, "key1").await;
    let (mut two, _) = pusher_ws(addr, "key2").await;
    subscribe(&mut one, "room").await;
    subscribe(&mut two, "room").await;
    // App 2's trigger reaches app 2 only; a bad signature or another app's key nothing.
    let body = r#"{"name":"hi","channel":"room","data":"2"}"#;
    assert_eq!(trigger(addr, "2", "key2", "secret2", body).await, 200);
    assert_eq!(trigger(addr, "1", "key2", "secret2", body).await, 401);
    assert_eq!(trigger(addr, "1", "key1", "secret2", body).await, 401);
    assert_eq!(trigger(addr, "9", "key1", "secret1", body).await, 404);
    let too_big = serde_json::json!({"name":"x","channel":"room","data":"z".repeat(70_000)});
    assert_eq!(
        trigger(addr, "1", "key1", "secret1", &too_big.to_string()).await,
        413
    );
    assert_eq!(next_event(&mut two, "hi").await["data"], "2");
    event(addr, "room", "fence", "1").await;
    let v = next_json(&mut one).await;
    assert_eq!(v["event"], "fence", "app 1 heard only its own event: {v}");
    // Per-app metrics.
    let text = server.state().metrics.encode();
    for line in [
        r#"crier_pusher_connections{app="1"} 1"#,
        r#"crier_pusher_connections{app="2"} 1"#,
        r#"crier_pusher_events_total{app="2",source="api"} 1"#,
        r#"crier_pusher_events_total{app="1",source="api"} 1"#,
    ] {
        assert!(text.contains(line), "{line} in\n{text}");
    }
    // crier's own door cannot name a Pusher topic.
    let (status, _) = server.get("/sse?topic=pusher/1/room").await;
    assert_eq!(status, 400);
    let (status, _) = server.publish("pusher%2F1%2Froom", "{}").await;
    assert!(status == 400 || status == 404, "{status}");
    server.shutdown().await;
}

/// Two `crier` processes and their data directories: alive as long as this is.
type Nodes = (
    crate::common::Proc,
    crate::common::Proc,
    tempfile::TempDir,
    tempfile::TempDir,
);

/// Two `crier` processes on one Redis, app 1 (`key1`/`secret1`) from the flags.
fn two_nodes(redis: &crate::common::redis::RedisServer) -> (Nodes, SocketAddr, SocketAddr) {
    let url = redis.url();
    let flags = [
        "--redis",
        &url,
        "--pusher-app-id",
        "1",
        "--pusher-key",
        "key1",
        "--pusher-secret",
        "secret1",
    ];
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, addr_a) = crate::common::serve_binary(dir_a.path(), "127.0.0.1:0", &flags);
    let (b, addr_b) = crate::common::serve_binary(dir_b.path(), "127.0.0.1:0", &flags);
    (
        (a, b, dir_a, dir_b),
        addr_a.parse().unwrap(),
        addr_b.parse().unwrap(),
    )
}

/// Under `--redis`, an event triggered on one node reaches the subscribers of every node,
/// and `socket_id` excludes a socket of another node (its id names its node's run). The
/// app comes from the flags here.
#[tokio::test]
async fn two_nodes_over_redis() {
    crate::need_redis!();
    let redis = crate::common::redis::RedisServer::start();
    let (_nodes, addr_a, addr_b) = two_nodes(&redis);
    let (mut on_a, _) = pusher_ws(addr_a, "key1").await;
    let (mut on_b, sid_b) = pusher_ws(addr_b, "key1").await;
    subscribe(&mut on_a, "room").await;
    subscribe(&mut on_b, "room").await;
    let body = |name: &str, exclude: Option<&str>| {
        let mut v = serde_json::json!({"name": name, "channel": "room", "data": name});
        if let Some(s) = exclude {
            v["socket_id"] = s.into();
        }
        v.to_string()
    };
    assert_eq!(
        trigger(addr_a, "1", "key1", "secret1", &body("one", None)).await,
        200
    );
    assert_eq!(next_event(&mut on_a, "one").await["data"], "one");
    assert_eq!(next_event(&mut on_b, "one").await["data"], "one");
    // Excluding B's socket from node A: A's client gets it, B's does not.
    let two = body("two", Some(&sid_b));
    assert_eq!(trigger(addr_a, "1", "key1", "secret1", &two).await, 200);
    next_event(&mut on_a, "two").await;
    assert_eq!(
        trigger(addr_b, "1", "key1", "secret1", &body("three", None)).await,
        200
    );
    let v = next_json(&mut on_b).await;
    assert_eq!(
        v["event"], "three",
        "the excluded socket got nothing before: {v}"
    );
    next_event(&mut on_a, "three").await;

    // Presence across the nodes: members on both, member_added and member_removed once per
    // user, whichever node the user's connections are on.
    let (mut alice, sid_alice) = pusher_ws(addr_a, "key1").await;
    presence_join(&mut alice, &sid_alice, "alice").await;
    let (mut bob, sid_bob) = pusher_ws(addr_b, "key1").await;
    let members = presence_join(&mut bob, &sid_bob, "bob").await;
    assert_eq!(members["presence"]["count"], 2, "{members}");
    let added = next_event(&mut alice, "pusher_internal:member_added").await;
    assert_eq!(
        added["data"],
        r#"{"user_id":"bob","user_info":{"n":"bob"}}"#
    );
    // A second connection of bob, on node A: nobody is told.
    let (mut bob2, sid_bob2) = pusher_ws(addr_a, "key1").await;
    presence_join(&mut bob2, &sid_bob2, "bob").await;
    drop(bob);
    drop(bob2);
    let removed = next_event(&mut alice, "pusher_internal:member_removed").await;
    assert_eq!(removed["data"], r#"{"user_id":"bob"}"#);
    // Exactly one member_added and one member_removed reached alice: a fence shows it.
    let four = r#"{"name":"four","channel":"presence-room","data":"4"}"#;
    assert_eq!(trigger(addr_a, "1", "key1", "secret1", four).await, 200);
    let v = next_json(&mut alice).await;
    assert_eq!(v["event"], "four", "{v}");

    // A user signed in on node B: sent to and terminated through node A.
    let (mut carol, sid_carol) = pusher_ws(addr_b, "key1").await;
    let v = signin(&mut carol, &sid_carol, "carol", "secret1").await;
    assert_eq!(v["event"], "pusher:signin_success", "{v}");
    let hi = r##"{"name":"hi","channel":"#server-to-user-carol","data":"1"}"##;
    assert_eq!(trigger(addr_a, "1", "key1", "secret1", hi).await, 200);
    next_event(&mut carol, "hi").await;
    let path = "/apps/1/users/carol/terminate_connections";
    assert_eq!(
        signed_post(addr_a, path, "key1", "secret1", "{}").await,
        200
    );
    assert_eq!(expect_close(&mut carol).await, 4009);
}

/// Subscribes `presence-room` as `user` (auth signed as the SDKs sign it); returns the
/// members of `subscription_succeeded`.
async fn presence_join(ws: &mut Ws, socket_id: &str, user: &str) -> Value {
    let data = format!(r#"{{"user_id":"{user}","user_info":{{"n":"{user}"}}}}"#);
    let sig = crier::pusher::sign::sign(
        b"secret1",
        format!("{socket_id}:presence-room:{data}").as_bytes(),
    );
    let msg = serde_json::json!({"event": "pusher:subscribe", "data": {
        "channel": "presence-room", "auth": format!("key1:{sig}"), "channel_data": data}});
    send(ws, &msg.to_string()).await;
    let ok = next_event(ws, "pusher_internal:subscription_succeeded").await;
    serde_json::from_str(ok["data"].as_str().unwrap()).unwrap()
}

/// A signed `GET` of the Pusher HTTP API (`extra` are the other query parameters, plain
/// text that needs no escaping), as the SDKs sign it.
async fn api_get(addr: SocketAddr, path: &str, extra: &[(&str, &str)]) -> (u16, Value) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .to_string();
    let mut params = vec![
        ("auth_key", "key1"),
        ("auth_timestamp", now.as_str()),
        ("auth_version", "1.0"),
    ];
    params.extend_from_slice(extra);
    params.sort();
    let q: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let q = q.join("&");
    let sig = crier::pusher::sign::sign(b"secret1", format!("GET\n{path}\n{q}").as_bytes());
    crate::common::http::get_url(&format!("http://{addr}{path}?{q}&auth_signature={sig}")).await
}

/// Polls `api_get` until `ok` holds for the answer (cluster counts are written within a
/// second of a change); returns that answer.
async fn api_until(
    addr: SocketAddr,
    path: &str,
    extra: &[(&str, &str)],
    ok: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (status, v) = api_get(addr, path, extra).await;
        assert_eq!(status, 200, "{v}");
        if ok(&v) {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out on {path}: {v}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Under `--redis`, the channel API counts the whole cluster: a channel whose subscribers
/// are all on node B is occupied as node A sees it, `subscription_count` sums both nodes,
/// the listing holds channels only B serves, and a channel left everywhere is vacant again.
#[tokio::test]
async fn channel_api_counts_the_cluster() {
    crate::need_redis!();
    let redis = crate::common::redis::RedisServer::start();
    let (_nodes, addr_a, addr_b) = two_nodes(&redis);
    let (mut a1, _) = pusher_ws(addr_a, "key1").await;
    let (mut b1, _) = pusher_ws(addr_b, "key1").await;
    let (mut b2, _) = pusher_ws(addr_b, "key1").await;
    subscribe(&mut a1, "room").await;
    subscribe(&mut b1, "room").await;
    subscribe(&mut b2, "room").await;
    subscribe(&mut b1, "only-b").await;

    let count = [("info", "subscription_count")];
    let v = api_until(addr_a, "/apps/1/channels/room", &count, |v| {
        v["subscription_count"] == 3
    })
    .await;
    assert_eq!(v["occupied"], true, "{v}");
    let v = api_until(addr_a, "/apps/1/channels/only-b", &count, |v| {
        v["subscription_count"] == 1
    })
    .await;
    assert_eq!(v["occupied"], true, "{v}");
    let v = api_until(addr_a, "/apps/1/channels", &[], |v| {
        v["channels"].get("only-b").is_some()
    })
    .await;
    assert!(v["channels"].get("room").is_some(), "{v}");
    let only = api_until(
        addr_a,
        "/apps/1/channels",
        &[("filter_by_prefix", "only")],
        |v| v["channels"].get("only-b").is_some(),
    )
    .await;
    assert!(only["channels"].get("room").is_none(), "{only}");

    // A presence channel with members on both nodes: user_count in the listing too.
    let (mut alice, sid_alice) = pusher_ws(addr_a, "key1").await;
    presence_join(&mut alice, &sid_alice, "alice").await;
    let (mut bob, sid_bob) = pusher_ws(addr_b, "key1").await;
    presence_join(&mut bob, &sid_bob, "bob").await;
    let users = [("filter_by_prefix", "presence-"), ("info", "user_count")];
    api_until(addr_a, "/apps/1/channels", &users, |v| {
        v["channels"]["presence-room"]["user_count"] == 2
    })
    .await;

    // Everyone leaves only-b (on B): A sees it vacant and no longer listed.
    drop(b1);
    let v = api_until(addr_a, "/apps/1/channels/only-b", &count, |v| {
        v["occupied"] == false
    })
    .await;
    assert_eq!(v["subscription_count"], 0, "{v}");
    api_until(addr_a, "/apps/1/channels", &[], |v| {
        v["channels"].get("only-b").is_none()
    })
    .await;
    let v = api_until(addr_a, "/apps/1/channels/room", &count, |v| {
        v["subscription_count"] == 2
    })
    .await;
    assert_eq!(v["occupied"], true, "{v}");
    drop((a1, b2, alice, bob));
}

/// The Pusher webhook events (`{name, channel, user_id?}`) a test receiver took, in order.
#[derive(Default)]
struct Hooks(parking_lot::Mutex<Vec<Value>>);

impl Hooks {
    /// `name user_id` (or `name channel`) of each event.
    fn names(&self) -> Vec<String> {
        self.0
            .lock()
            .iter()
            .map(|e| {
                let who = e["user_id"]
                    .as_str()
                    .or(e["channel"].as_str())
                    .unwrap_or("");
                format!("{} {who}", e["name"].as_str().unwrap_or(""))
            })
            .collect()
    }

    fn count(&self, what: &str) -> usize {
        self.names().iter().filter(|n| *n == what).count()
    }

    async fn wait_for(&self, what: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while self.count(what) == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "no {what}: {:?}",
                self.names()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A webhook receiver that checks Pusher's signature (`X-Pusher-Signature`: HMAC-SHA256 of
/// the body with the app's secret) and keeps the events; its URL.
async fn pusher_hooks() -> (std::sync::Arc<Hooks>, String) {
    use axum::{body::Bytes, extract::State, http::HeaderMap};
    async fn take(
        State(h): State<std::sync::Arc<Hooks>>,
        headers: HeaderMap,
        body: Bytes,
    ) -> axum::http::StatusCode {
        let sig = headers
            .get("x-pusher-signature")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        assert_eq!(sig, crier::pusher::sign::sign(b"secret1", &body));
        let v: Value = serde_json::from_slice(&body).unwrap();
        h.0.lock()
            .extend(v["events"].as_array().unwrap().iter().cloned());
        axum::http::StatusCode::OK
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let h = std::sync::Arc::new(Hooks::default());
    let app = axum::Router::new()
        .route("/", axum::routing::post(take))
        .with_state(h.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (h, format!("http://{addr}/"))
}

/// Under `--redis`, Pusher's member_added / member_removed webhooks are sent once per
/// cluster: a user with connections on both nodes is added on its first and removed on its
/// last wherever they are, and the members of a node killed with SIGKILL are removed once,
/// by the survivor; channel_occupied once too.
#[tokio::test]
async fn member_webhooks_once_per_cluster() {
    crate::need_redis!();
    let redis = crate::common::redis::RedisServer::start();
    let (hooks, url) = pusher_hooks().await;
    let node = |dir: &tempfile::TempDir| {
        let cfg = dir.path().join("crier.toml");
        std::fs::write(
            &cfg,
            format!("[[app]]\nid = \"1\"\nkey = \"key1\"\nsecret = \"secret1\"\nwebhooks = [\"{url}\"]\n"),
        )
        .unwrap();
        crate::common::serve_binary(
            dir.path(),
            "127.0.0.1:0",
            &[
                "--redis",
                &redis.url(),
                "--config",
                cfg.to_str().unwrap(),
                "--webhook-linger",
                "5ms",
            ],
        )
    };
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (_a, addr_a) = node(&da);
    let (mut b_proc, addr_b) = node(&db);
    let (addr_a, addr_b): (SocketAddr, SocketAddr) =
        (addr_a.parse().unwrap(), addr_b.parse().unwrap());

    let (mut alice, sid) = pusher_ws(addr_a, "key1").await;
    presence_join(&mut alice, &sid, "alice").await;
    hooks.wait_for("member_added alice").await;
    let (mut bob, sid) = pusher_ws(addr_b, "key1").await;
    presence_join(&mut bob, &sid, "bob").await;
    hooks.wait_for("member_added bob").await;
    // Bob's second connection, on the other node: no webhook; his first leaving: none.
    let (mut bob2, sid) = pusher_ws(addr_a, "key1").await;
    presence_join(&mut bob2, &sid, "bob").await;
    drop(bob);
    // Carol joining on B after bob's leave there is a fence: B's writes are in order.
    let (mut carol, sid) = pusher_ws(addr_b, "key1").await;
    presence_join(&mut carol, &sid, "carol").await;
    hooks.wait_for("member_added carol").await;
    assert_eq!(hooks.count("member_removed bob"), 0, "{:?}", hooks.names());
    drop(bob2);
    hooks.wait_for("member_removed bob").await;

    // B dies with carol on it: the survivor removes her, once.
    let _ = b_proc.0.kill();
    let _ = b_proc.0.wait();
    drop(carol);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while hooks.count("member_removed carol") == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the dead node's member was never removed: {:?}",
            hooks.names()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A fence on the survivor: dave's member_added comes after any repeat would have.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (mut dave, sid) = pusher_ws(addr_a, "key1").await;
    presence_join(&mut dave, &sid, "dave").await;
    hooks.wait_for("member_added dave").await;
    for once in [
        "member_added alice",
        "member_added bob",
        "member_added carol",
        "member_removed bob",
        "member_removed carol",
        "channel_occupied presence-room",
    ] {
        assert_eq!(hooks.count(once), 1, "{once}: {:?}", hooks.names());
    }
    assert_eq!(hooks.count("member_removed alice"), 0);
    drop((alice, dave));
}

/// Signs in as `user` (the user data signed as the SDKs' `authenticateUser` signs it, with
/// `secret`); returns the server's first answer.
async fn signin(ws: &mut Ws, socket_id: &str, user: &str, secret: &str) -> Value {
    let user_data = format!(r#"{{"id":"{user}","name":"{user}"}}"#);
    let sig = crier::pusher::sign::sign(
        secret.as_bytes(),
        format!("{socket_id}::user::{user_data}").as_bytes(),
    );
    let msg = serde_json::json!({"event": "pusher:signin",
        "data": {"auth": format!("key1:{sig}"), "user_data": user_data}});
    send(ws, &msg.to_string()).await;
    next_json(ws).await
}

/// `pusher:signin` on the wire: a forged or malformed sign-in gets `pusher:error` 4009 and
/// the connection stays; nobody subscribes to a user's channel without signing in as that
/// user; a signed-in connection gets `signin_success`, its user's events, and is closed
/// with 4009 by `terminate_connections`, while a healthy client beside it carries on.
#[tokio::test]
async fn user_signin_on_the_wire() {
    let server = TestServer::start(apps).await;
    let addr = server.addr;
    let (mut healthy, _) = pusher_ws(addr, "key1").await;
    subscribe(&mut healthy, "news").await;
    let (mut ws, sid) = pusher_ws(addr, "key1").await;
    let v = signin(&mut ws, &sid, "carol", "not-the-secret").await;
    assert_eq!(v["event"], "pusher:error", "{v}");
    assert_eq!(v["data"]["code"], 4009, "{v}");
    send(
        &mut ws,
        r#"{"event":"pusher:signin","data":{"auth":"key1:00","user_data":"{}"}}"#,
    )
    .await;
    assert_eq!(next_json(&mut ws).await["data"]["code"], 4009);
    send(&mut ws, r#"{"event":"pusher:signin","data":{}}"#).await;
    assert_eq!(next_json(&mut ws).await["event"], "pusher:error");
    // Another user's channel, without signing in as that user.
    send(
        &mut ws,
        r##"{"event":"pusher:subscribe","data":{"channel":"#server-to-user-carol"}}"##,
    )
    .await;
    let v = next_json(&mut ws).await;
    assert_eq!(v["event"], "pusher:subscription_error", "{v}");
    assert_eq!(next_json(&mut ws).await["data"]["code"], 4009);
    // Signed in properly, then its own channel as pusher-js subscribes to it.
    let v = signin(&mut ws, &sid, "carol", "secret1").await;
    assert_eq!(v["event"], "pusher:signin_success", "{v}");
    let data: Value = serde_json::from_str(v["data"].as_str().unwrap()).unwrap();
    let user: Value = serde_json::from_str(data["user_data"].as_str().unwrap()).unwrap();
    assert_eq!(user["id"], "carol");
    subscribe(&mut ws, "#server-to-user-carol").await;
    let v = signin(&mut ws, &sid, "carol", "secret1").await;
    assert_eq!(v["event"], "pusher:error", "a second sign-in: {v}");
    event(addr, "#server-to-user-carol", "hello", "hi").await;
    let v = next_event(&mut ws, "hello").await;
    assert_eq!(v["channel"], "#server-to-user-carol");
    // Users' channels are not listed.
    let (status, list) = api_get(addr, "/apps/1/channels", &[]).await;
    assert_eq!(status, 200);
    assert!(
        list["channels"].get("#server-to-user-carol").is_none(),
        "{list}"
    );
    // A bad user id, a bad signature: refused; then the termination.
    let path = "/apps/1/users/car%20ol/terminate_connections";
    assert_eq!(signed_post(addr, path, "key1", "secret1", "{}").await, 400);
    let path = "/apps/1/users/carol/terminate_connections";
    assert_eq!(signed_post(addr, path, "key1", "secret2", "{}").await, 401);
    assert_eq!(signed_post(addr, path, "key1", "secret1", "{}").await, 200);
    assert_eq!(expect_close(&mut ws).await, 4009);
    event(addr, "news", "still", "here").await;
    assert_eq!(next_event(&mut healthy, "still").await["data"], "here");
    server.shutdown().await;
}
