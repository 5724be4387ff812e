//! Subscriber tokens over WebSocket (issue #9): the handshake (`?token=`, `Authorization:
//! Bearer`), in-band `auth` and `refresh`, private topics refused or allowed, expiry with
//! and without refresh, a flood of bad tokens next to a healthy client, and tokens kept
//! out of the server's log. Real servers and sockets; tokens minted here with jsonwebtoken.

use std::time::Duration;

use crate::common::*;
use base64::Engine;
use crier::config::Config;
use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "0123456789abcdef0123456789abcdef-ws";
const OTHER_SECRET: &str = "another-secret-of-thirty-two-bytes!!";

fn now() -> u64 {
    crate::common::auth::now() as u64
}

fn fixture(name: &str) -> String {
    crate::common::auth::fixture(name)
}

/// Claims for `sub`, valid for `ttl` seconds (negative: expired), allowing `topics`.
fn claims(sub: &str, ttl: i64, topics: &[&str]) -> Value {
    json!({"sub": sub, "exp": now() as i64 + ttl, "topics": topics})
}

fn hs(claims: &Value, secret: &str) -> String {
    crate::common::auth::hs256(claims, secret)
}

fn token(sub: &str, ttl: i64, topics: &[&str]) -> String {
    hs(&claims(sub, ttl, topics), SECRET)
}

/// A node where `private:*` and `chat:*` need a token checked with `SECRET`.
fn private_cfg(c: &mut Config) {
    c.jwt_secret = SECRET.into();
    c.private_topics = vec!["private:*".into(), "chat:*".into()];
}

async fn private_server() -> TestServer {
    TestServer::start(private_cfg).await
}

/// The HTTP answer to a refused upgrade: status and JSON body.
async fn refused(server: &TestServer, query: &str, bearer: Option<&str>) -> (u16, Value) {
    let mut req = format!("ws://{}/ws{query}", server.addr)
        .into_client_request()
        .unwrap();
    if let Some(t) = bearer {
        req.headers_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok(_) => panic!("the upgrade of {query} was accepted"),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body = resp.body().clone().unwrap_or_default();
            (
                resp.status().as_u16(),
                serde_json::from_slice(&body).unwrap_or(Value::Null),
            )
        }
        Err(e) => panic!("unexpected failure: {e}"),
    }
}

async fn ws_bearer(server: &TestServer, query: &str, bearer: &str) -> Ws {
    let mut req = format!("ws://{}/ws{query}", server.addr)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {bearer}").parse().unwrap());
    tokio_tungstenite::connect_async(req).await.unwrap().0
}

async fn publish_ok(server: &TestServer, topic: &str, body: &str) {
    let (s, b) = server.publish(topic, body).await;
    assert_eq!(s, 200, "{b}");
}

/// Publishes to `topic` and expects it on `ws` as the next frame.
async fn delivered(server: &TestServer, ws: &mut Ws, topic: &str, n: u64) {
    publish_ok(server, topic, &format!(r#"{{"n":{n}}}"#)).await;
    let m = next_json(ws).await;
    assert_eq!(
        (m["topic"].as_str(), &m["data"]["n"]),
        (Some(topic), &json!(n)),
        "{m}"
    );
}

/// Publishes to the private `hidden` topic and then to the public `marker`: the next frame
/// on `ws` is the marker, so nothing of `hidden` reached it.
async fn nothing_of(server: &TestServer, ws: &mut Ws, hidden: &str) {
    publish_ok(server, hidden, r#"{"secret":true}"#).await;
    delivered(server, ws, "marker", 0).await;
}

async fn subscribe(ws: &mut Ws, topic: &str, id: u64) -> Value {
    send_json(
        ws,
        &format!(r#"{{"op":"subscribe","topic":"{topic}","id":{id}}}"#),
    )
    .await;
    next_json(ws).await
}

async fn send_auth(ws: &mut Ws, op: &str, token: &str, id: u64) -> Value {
    send_json(
        ws,
        &format!(r#"{{"op":"{op}","token":"{token}","id":{id}}}"#),
    )
    .await;
    next_json(ws).await
}

fn assert_error(m: &Value, code: &str, id: u64) {
    assert_eq!(
        (m["op"].as_str(), m["code"].as_str(), &m["id"]),
        (Some("error"), Some(code), &json!(id)),
        "{m}"
    );
}

#[tokio::test]
async fn public_topics_are_unchanged_with_and_without_auth() {
    for server in [TestServer::start(|_| {}).await, private_server().await] {
        let mut ws = server.ws("?topic=news&topic=marker").await;
        assert_eq!(next_json(&mut ws).await["op"], "subscribed");
        assert_eq!(next_json(&mut ws).await["op"], "subscribed");
        assert_eq!(subscribe(&mut ws, "other", 1).await["op"], "subscribed");
        delivered(&server, &mut ws, "news", 1).await;
        delivered(&server, &mut ws, "other", 2).await;
        drop(ws);
        server.assert_clean().await;
    }
    // A token given to a node that checks none is ignored.
    let open = TestServer::start(|_| {}).await;
    let mut ws = open
        .ws(&format!(
            "?topic=private:a&token={}",
            token("alice", 60, &[])
        ))
        .await;
    assert_eq!(next_json(&mut ws).await["op"], "subscribed");
}

#[tokio::test]
async fn no_token_is_refused_before_upgrade_and_on_subscribe() {
    let server = private_server().await;
    let (status, body) = refused(&server, "?topic=news&topic=private:a", None).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "token_required", "{body}");
    assert_eq!(server.state().hub.total_subscriptions(), 0);

    let mut ws = server.ws("?topic=marker").await;
    assert_eq!(next_json(&mut ws).await["op"], "subscribed");
    let m = subscribe(&mut ws, "private:a", 5).await;
    assert_error(&m, "token_required", 5);
    nothing_of(&server, &mut ws, "private:a").await;
    drop(ws);
    server.assert_clean().await;
}

#[tokio::test]
async fn good_tokens_by_query_header_and_in_band_auth_receive_publications() {
    let server = private_server().await;
    let t = token("alice", 60, &["private:a"]);

    let mut by_query = server.ws(&format!("?topic=private:a&token={t}")).await;
    assert_eq!(next_json(&mut by_query).await["op"], "subscribed");
    delivered(&server, &mut by_query, "private:a", 1).await;

    let mut by_header = ws_bearer(&server, "?topic=private:a", &t).await;
    assert_eq!(next_json(&mut by_header).await["op"], "subscribed");
    delivered(&server, &mut by_header, "private:a", 2).await;

    let mut in_band = server.ws("").await;
    let m = send_auth(&mut in_band, "auth", &t, 7).await;
    assert_eq!(m["op"], "authed", "{m}");
    assert_eq!(m["sub"], "alice");
    assert_eq!(m["id"], 7);
    assert!(m["exp"].as_u64().unwrap() > now());
    assert!(!m.to_string().contains(&t), "the token is never echoed");
    assert_eq!(
        subscribe(&mut in_band, "private:a", 8).await["op"],
        "subscribed"
    );
    delivered(&server, &mut in_band, "private:a", 3).await;

    // An `exp` too far ahead for the monotonic clock is valid, and never overflows it.
    let far = hs(
        &json!({"sub": "alice", "exp": u64::MAX, "topics": ["private:a"]}),
        SECRET,
    );
    let mut far_ws = server.ws(&format!("?topic=private:a&token={far}")).await;
    assert_eq!(next_json(&mut far_ws).await["op"], "subscribed");
    let mut far_in_band = server.ws("").await;
    assert_eq!(
        send_auth(&mut far_in_band, "auth", &far, 1).await["op"],
        "authed"
    );
    delivered(&server, &mut far_ws, "private:a", 4).await;
    assert_eq!(
        subscribe(&mut far_in_band, "private:a", 2).await["op"],
        "subscribed"
    );
    delivered(&server, &mut far_in_band, "private:a", 5).await;
}

#[tokio::test]
async fn forged_none_expired_and_not_yet_valid_tokens_are_refused() {
    let server = private_server().await;
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let alg_none = format!(
        "{}.{}.",
        b64(&json!({"alg":"none","typ":"JWT"})),
        b64(&claims("alice", 60, &["private:*"]))
    );
    let mut not_yet = claims("alice", 60, &["private:*"]);
    not_yet["nbf"] = json!(now() + 30);
    let cases = [
        (
            hs(&claims("alice", 60, &["private:*"]), OTHER_SECRET),
            "bad_token",
        ),
        (alg_none, "bad_token"),
        (token("alice", -5, &["private:*"]), "token_expired"),
        (hs(&not_yet, SECRET), "bad_token"),
        ("not-a-jwt".to_string(), "bad_token"),
    ];
    for (t, code) in &cases {
        // Refused at the handshake, for private and public topics alike.
        for topic in ["private:a", "news"] {
            let (status, body) = refused(&server, &format!("?topic={topic}&token={t}"), None).await;
            assert_eq!(
                (status, body["error"]["code"].as_str()),
                (401, Some(*code)),
                "{body}"
            );
            let message = body["error"]["message"].as_str().unwrap();
            assert!(!message.contains(t.as_str()), "the token is never echoed");
        }
        let (status, body) = refused(&server, "?topic=private:a", Some(t)).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (401, Some(*code)),
            "{body}"
        );
        // In band: an error frame with the id, then close 4501.
        let mut ws = server.ws("").await;
        let m = send_auth(&mut ws, "auth", t, 3).await;
        assert_error(&m, code, 3);
        assert_eq!(expect_close(&mut ws).await, 4501);
    }
    assert_eq!(server.state().hub.total_subscriptions(), 0);
    server.assert_clean().await;
}

#[tokio::test]
async fn a_token_for_other_topics_is_forbidden_and_patterns_match() {
    let server = private_server().await;
    let t = token("bob", 60, &["chat:*", "private:b"]);
    let (status, body) = refused(&server, &format!("?topic=private:a&token={t}"), None).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("topic_forbidden")),
        "{body}"
    );
    assert_eq!(server.state().hub.total_subscriptions(), 0);

    let mut ws = server
        .ws(&format!("?topic=chat:lobby&topic=marker&token={t}"))
        .await;
    assert_eq!(next_json(&mut ws).await["op"], "subscribed");
    assert_eq!(next_json(&mut ws).await["op"], "subscribed");
    assert_error(
        &subscribe(&mut ws, "private:a", 1).await,
        "topic_forbidden",
        1,
    );
    assert_eq!(
        subscribe(&mut ws, "chat:room-2", 2).await["op"],
        "subscribed"
    );
    assert_eq!(subscribe(&mut ws, "private:b", 3).await["op"], "subscribed");
    nothing_of(&server, &mut ws, "private:a").await;
    delivered(&server, &mut ws, "chat:lobby", 1).await;
    delivered(&server, &mut ws, "chat:room-2", 2).await;
    delivered(&server, &mut ws, "private:b", 3).await;
}

#[tokio::test]
async fn rs256_and_es256_tokens_with_public_keys() {
    let server = TestServer::start(|c| {
        c.jwt_public_key = vec![fixture("rsa-public.pem"), fixture("ec-public.pem")];
        c.private_topics = vec!["private:*".into()];
    })
    .await;
    let c = claims("carol", 60, &["private:*"]);
    let pem = |name: &str| std::fs::read(fixture(name)).unwrap();
    let rs = encode(
        &Header::new(Algorithm::RS256),
        &c,
        &EncodingKey::from_rsa_pem(&pem("rsa-private.pem")).unwrap(),
    )
    .unwrap();
    let es = encode(
        &Header::new(Algorithm::ES256),
        &c,
        &EncodingKey::from_ec_pem(&pem("ec-private.pem")).unwrap(),
    )
    .unwrap();
    let other_rs = encode(
        &Header::new(Algorithm::RS256),
        &c,
        &EncodingKey::from_rsa_pem(&pem("other-rsa-private.pem")).unwrap(),
    )
    .unwrap();
    for (i, t) in [rs, es].iter().enumerate() {
        let mut ws = server.ws(&format!("?topic=private:k&token={t}")).await;
        assert_eq!(next_json(&mut ws).await["op"], "subscribed");
        delivered(&server, &mut ws, "private:k", i as u64).await;
        let mut in_band = server.ws("").await;
        assert_eq!(send_auth(&mut in_band, "auth", t, 1).await["op"], "authed");
        assert_eq!(
            subscribe(&mut in_band, "private:k", 2).await["op"],
            "subscribed"
        );
    }
    // Signed by another key, or HS256 on a node with public keys only (no key confusion).
    for t in [other_rs, token("carol", 60, &["private:*"])] {
        let (status, body) = refused(&server, &format!("?topic=private:k&token={t}"), None).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (401, Some("bad_token")),
            "{body}"
        );
    }
}

#[tokio::test]
async fn a_token_that_expires_without_refresh_closes_4005() {
    let server = private_server().await;
    let mut ws = server
        .ws(&format!(
            "?topic=private:a&token={}",
            token("alice", 3, &["private:a"])
        ))
        .await;
    assert_eq!(next_json(&mut ws).await["op"], "subscribed");
    // In band too; both tokens run out in the same few seconds, not one after the other.
    let mut in_band = server.ws("").await;
    let m = send_auth(&mut in_band, "auth", &token("alice", 3, &[]), 1).await;
    assert_eq!(m["op"], "authed");
    delivered(&server, &mut ws, "private:a", 1).await;
    assert_eq!(expect_close(&mut ws).await, 4005);
    assert_eq!(expect_close(&mut in_band).await, 4005);
    drop((ws, in_band));
    server.assert_clean().await;
}

#[tokio::test]
async fn a_refreshed_connection_outlives_its_first_token() {
    let server = private_server().await;
    // A few seconds: enough for the refresh to arrive first on a loaded machine.
    let first_claims = claims("alice", 4, &["private:a"]);
    let first_exp = first_claims["exp"].as_u64().unwrap();
    let first = hs(&first_claims, SECRET);
    let mut ws = server.ws(&format!("?topic=private:a&token={first}")).await;
    assert_eq!(next_json(&mut ws).await["op"], "subscribed");
    let m = send_auth(&mut ws, "refresh", &token("alice", 60, &["private:a"]), 4).await;
    assert_eq!(
        (m["op"].as_str(), &m["sub"], &m["id"]),
        (Some("refreshed"), &json!("alice"), &json!(4)),
        "{m}"
    );
    assert!(m["exp"].as_u64().unwrap() >= first_exp + 50);
    // Past the first token's expiry (and the second it may round up to) the connection
    // still receives.
    wait_until("the first token has expired", || now() > first_exp + 1).await;
    delivered(&server, &mut ws, "private:a", 1).await;
    delivered(&server, &mut ws, "private:a", 2).await;
}

#[tokio::test]
async fn refresh_with_another_sub_or_without_a_grant_closes_4501() {
    let server = private_server().await;
    let mut ws = server
        .ws(&format!(
            "?topic=private:a&token={}",
            token("alice", 60, &["private:a"])
        ))
        .await;
    assert_eq!(next_json(&mut ws).await["op"], "subscribed");
    let m = send_auth(&mut ws, "refresh", &token("mallory", 60, &["private:*"]), 9).await;
    assert_error(&m, "bad_token", 9);
    assert!(m["message"].as_str().unwrap().contains("same sub"), "{m}");
    assert_eq!(expect_close(&mut ws).await, 4501);

    let mut ws = server.ws("").await;
    let m = send_auth(&mut ws, "refresh", &token("alice", 60, &[]), 1).await;
    assert_error(&m, "bad_token", 1);
    assert_eq!(expect_close(&mut ws).await, 4501);

    // A second auth is not a refresh.
    let mut ws = server.ws("").await;
    assert_eq!(
        send_auth(&mut ws, "auth", &token("alice", 60, &[]), 1).await["op"],
        "authed"
    );
    let m = send_auth(&mut ws, "auth", &token("alice", 60, &[]), 2).await;
    assert_error(&m, "bad_token", 2);
    assert!(
        m["message"].as_str().unwrap().contains("use refresh"),
        "{m}"
    );
    assert_eq!(expect_close(&mut ws).await, 4501);

    // An auth without a token string.
    let mut ws = server.ws("").await;
    send_json(&mut ws, r#"{"op":"auth","id":3}"#).await;
    assert_error(&next_json(&mut ws).await, "bad_token", 3);
    assert_eq!(expect_close(&mut ws).await, 4501);
    drop(ws);
    server.assert_clean().await;
}

#[tokio::test]
async fn a_refresh_that_drops_a_topic_unsubscribes_it() {
    let server = private_server().await;
    let t = token("alice", 60, &["private:a", "private:b"]);
    let mut ws = server
        .ws(&format!(
            "?topic=private:a&topic=private:b&topic=marker&token={t}"
        ))
        .await;
    for _ in 0..3 {
        assert_eq!(next_json(&mut ws).await["op"], "subscribed");
    }
    send_json(
        &mut ws,
        &format!(
            r#"{{"op":"refresh","token":"{}","id":2}}"#,
            token("alice", 60, &["private:a"])
        ),
    )
    .await;
    let m = next_json(&mut ws).await;
    assert_eq!(m, json!({"op":"unsubscribed","topic":"private:b"}));
    assert_eq!(next_json(&mut ws).await["op"], "refreshed");
    nothing_of(&server, &mut ws, "private:b").await;
    delivered(&server, &mut ws, "private:a", 1).await;
    assert_error(
        &subscribe(&mut ws, "private:b", 3).await,
        "topic_forbidden",
        3,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_client_is_unaffected_by_a_bad_auth_flood() {
    let server = private_server().await;
    let addr = server.addr;
    let t = token("alice", 60, &["private:a"]);
    let mut healthy = server.ws(&format!("?topic=private:a&token={t}")).await;
    assert_eq!(next_json(&mut healthy).await["op"], "subscribed");
    const N: u64 = 100;
    let reader = tokio::spawn(async move {
        for i in 0..N {
            let m = next_json(&mut healthy).await;
            assert_eq!(m["data"]["i"], i, "healthy client missed or reordered: {m}");
        }
    });
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut flooders = Vec::new();
    for f in 0..4 {
        let stop = stop.clone();
        flooders.push(tokio::spawn(async move {
            let forged = hs(&claims("eve", 60, &["private:*"]), OTHER_SECRET);
            let mut rounds = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
                    .await
                    .unwrap();
                for i in 0..50 {
                    let cmd = format!(r#"{{"op":"auth","token":"{forged}","id":{i}}}"#);
                    if ws.send(Message::Text(cmd.into())).await.is_err() {
                        break;
                    }
                }
                // The first is answered, then the connection is closed 4501.
                let m = next_json(&mut ws).await;
                assert_eq!(
                    (m["code"].as_str(), &m["id"]),
                    (Some("bad_token"), &json!(0)),
                    "flooder {f}: {m}"
                );
                assert_eq!(expect_close(&mut ws).await, 4501);
                rounds += 1;
            }
            rounds
        }));
    }
    let http = crier::http_client::HttpClient::new(None);
    for i in 0..N {
        let (status, _) = http
            .post(
                &server.url("/api/publish/private:a"),
                format!(r#"{{"i":{i}}}"#),
            )
            .await
            .unwrap();
        assert_eq!(status, 200);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    within("the healthy client got everything", reader)
        .await
        .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for f in flooders {
        assert!(within("flooder stops", f).await.unwrap() > 0);
    }
    // The publisher's kept-alive connection would hold the check below until the server
    // ends it (header_read_timeout, 10 s, also bounds idle connections).
    drop(http);
    server.assert_clean().await;
}

#[tokio::test]
async fn private_topics_with_the_redis_broker() {
    crate::need_redis!();
    let redis = crate::common::redis::RedisServer::start();
    let server = TestServer::start(|c| {
        private_cfg(c);
        c.redis = redis.url();
    })
    .await;
    // Under Redis a subscribe waits for Redis: the connection runs it as a task, in order.
    let t = token("alice", 60, &["private:a", "private:b"]);
    let mut ws = server.ws(&format!("?topic=marker&token={t}")).await;
    assert_eq!(next_json(&mut ws).await["op"], "subscribed");
    assert_error(
        &subscribe(&mut ws, "private:z", 1).await,
        "topic_forbidden",
        1,
    );
    // Subscribes in flight, then a refresh that drops one of them: it lands after them.
    send_json(&mut ws, r#"{"op":"subscribe","topic":"private:a","id":2}"#).await;
    send_json(&mut ws, r#"{"op":"subscribe","topic":"private:b","id":3}"#).await;
    send_json(
        &mut ws,
        &format!(
            r#"{{"op":"refresh","token":"{}","id":4}}"#,
            token("alice", 60, &["private:a"])
        ),
    )
    .await;
    let replies: Vec<Value> = [
        next_json(&mut ws).await,
        next_json(&mut ws).await,
        next_json(&mut ws).await,
        next_json(&mut ws).await,
    ]
    .into();
    assert_eq!(replies[0]["op"], "subscribed", "{replies:?}");
    assert_eq!(replies[1]["op"], "subscribed", "{replies:?}");
    assert_eq!(replies[2], json!({"op":"unsubscribed","topic":"private:b"}));
    assert_eq!(replies[3]["op"], "refreshed", "{replies:?}");
    nothing_of(&server, &mut ws, "private:b").await;
    delivered(&server, &mut ws, "private:a", 1).await;
}

#[test]
fn the_token_never_appears_in_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_crier"));
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .args(["--jwt-secret", SECRET, "--private-topic", "private:*"])
        .env("CRIER_LOG", "debug");
    let (_proc, addr, logs) = spawn_logged(cmd);
    let good = token("alice", 60, &["private:a"]);
    let forged = hs(&claims("eve", 60, &["private:*"]), OTHER_SECRET);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (mut ws, _) = tokio_tungstenite::connect_async(format!(
            "ws://{addr}/ws?topic=private:a&token={good}"
        ))
        .await
        .unwrap();
        assert_eq!(next_json(&mut ws).await["op"], "subscribed");
        let m = send_auth(&mut ws, "refresh", &good, 1).await;
        assert_eq!(m["op"], "refreshed");
        ws.close(None).await.unwrap();
        while let Some(Ok(_)) = ws.next().await {}
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
            .await
            .unwrap();
        let m = send_auth(&mut ws, "auth", &forged, 2).await;
        assert_eq!(m["code"], "bad_token");
        assert_eq!(expect_close(&mut ws).await, 4501);
        let refused = tokio_tungstenite::connect_async(format!(
            "ws://{addr}/ws?topic=private:a&token={forged}"
        ))
        .await;
        assert!(refused.is_err());
    });
    // Both connections' ends are logged at debug: once both are in, so is everything
    // said about them.
    let mut lines = Vec::new();
    let mut closed = 0;
    while closed < 2 {
        let line = logs.recv_timeout(WAIT).expect("the server logs each close");
        if line.contains("websocket closed") {
            closed += 1;
        }
        lines.push(line);
    }
    while let Ok(line) = logs.try_recv() {
        lines.push(line);
    }
    assert!(
        lines.iter().any(|l| l.contains("DEBUG")),
        "debug logging is on"
    );
    for t in [&good, &forged] {
        let signature = t.rsplit('.').next().unwrap();
        for line in &lines {
            assert!(!line.contains(signature), "a token in the log: {line}");
        }
    }
}
