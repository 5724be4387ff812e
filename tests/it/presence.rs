//! Presence on one node (issue 17), over real sockets against a real server: members kept
//! per `presence = true` namespace, joins and leaves pushed live with `join_leave` (WS
//! frames, SSE named events), reads over WebSocket and HTTP, the read right of private
//! topics, a killed connection leaving, and a client flapping its subscription next to a
//! healthy watcher.

use std::time::{Duration, Instant};

use crier::config::{Config, Namespace};
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::common::auth::{hs256, now};
use crate::common::eventsource;
use crate::common::{next_json, send_json, wait_until, within, TestServer, Ws};

const SECRET: &str = "presence-tests-secret-of-32-bytes!!";

fn namespace(pattern: &str, presence: bool, join_leave: bool) -> Namespace {
    Namespace {
        pattern: pattern.into(),
        history_size: 100,
        history_ttl: Duration::from_secs(300),
        durable: false,
        presence,
        join_leave,
    }
}

/// `lobby:*` announces joins and leaves, `room:*` only keeps members, `vip:*` is private
/// with presence; anything else has none.
fn setup(c: &mut Config) {
    c.namespaces.push(namespace("lobby:*", true, true));
    c.namespaces.push(namespace("room:*", true, false));
    c.namespaces.push(namespace("vip:*", true, true));
    c.private_topics = vec!["vip:*".into()];
    c.jwt_secret = SECRET.into();
}

fn token(sub: &str, topics: &[&str], info: Option<Value>) -> String {
    let mut claims = json!({"sub": sub, "exp": now() + 600, "topics": topics});
    if let Some(info) = info {
        claims["info"] = info;
    }
    hs256(&claims, SECRET)
}

/// A member's client id (a string on the wire) as a number, for ordering.
fn client(m: &Value) -> u64 {
    m["client"]
        .as_str()
        .expect("client is a string")
        .parse()
        .unwrap()
}

/// Subscribes and returns the `subscribed` reply.
async fn subscribe(ws: &mut Ws, topic: &str) -> Value {
    let cmd = format!(r#"{{"op":"subscribe","topic":"{topic}","id":"s"}}"#);
    let r = ask(ws, &cmd).await;
    assert_eq!(r["op"], "subscribed", "{r}");
    r
}

/// The next frame that is a join or a leave notice of `topic`, as (kind, member).
async fn next_notice(ws: &mut Ws, topic: &str) -> (&'static str, Value) {
    loop {
        let v = next_json(ws).await;
        if v["topic"] != topic || v.get("op").is_some() {
            continue;
        }
        for kind in ["join", "leave"] {
            if let Some(m) = v.get(kind) {
                return (kind, m.clone());
            }
        }
    }
}

/// A WS command and its reply (the next frame with an `op`).
async fn ask(ws: &mut Ws, cmd: &str) -> Value {
    send_json(ws, cmd).await;
    loop {
        let v = next_json(ws).await;
        if v.get("op").is_some() {
            return v;
        }
    }
}

#[tokio::test]
async fn joins_and_leaves_are_seen_live_on_websocket_and_sse() {
    let server = TestServer::start(setup).await;
    let mut watcher = server.ws("").await;
    subscribe(&mut watcher, "lobby:a").await;
    // Its own join follows its acknowledgement.
    let (kind, me) = next_notice(&mut watcher, "lobby:a").await;
    assert_eq!(kind, "join");
    assert_eq!(me["user"], Value::Null);
    assert_eq!(me["info"], Value::Null);
    let my_id = client(&me);

    // A token's sub and info claim become the member's user and info.
    let alice = token("alice", &[], Some(json!({"name": "Alice", "level": 3})));
    let mut other = server.ws(&format!("?token={alice}")).await;
    subscribe(&mut other, "lobby:a").await;
    let (kind, m) = next_notice(&mut watcher, "lobby:a").await;
    assert_eq!(kind, "join");
    assert_eq!(m["user"], "alice");
    assert_eq!(m["info"], json!({"name": "Alice", "level": 3}));
    let alice_id = client(&m);
    assert_ne!(alice_id, my_id);

    // SSE: named events `join` and `leave`, without an id (they move no position).
    let mut es = eventsource::open(server.addr, None, "?topic=lobby:a", &[])
        .await
        .expect("sse opens");
    let first = within("sse subscribed", es.next()).await.unwrap();
    assert_eq!(first.event.as_deref(), Some("subscribed"));
    let own = within("sse own join", es.next()).await.unwrap();
    assert_eq!(own.event.as_deref(), Some("join"), "{own:?}");
    assert!(own.id.is_none(), "a notice carries no id: {own:?}");
    let sse_id = client(&own.json()["join"]);
    let (kind, m) = next_notice(&mut watcher, "lobby:a").await;
    assert_eq!((kind, client(&m)), ("join", sse_id));

    send_json(&mut other, r#"{"op":"unsubscribe","topic":"lobby:a"}"#).await;
    let (kind, m) = next_notice(&mut watcher, "lobby:a").await;
    assert_eq!(kind, "leave");
    assert_eq!(
        m,
        json!({"client": alice_id.to_string(), "user": "alice", "info": {"name": "Alice", "level": 3}})
    );
    let left = within("sse leave", es.next()).await.unwrap();
    assert_eq!(left.event.as_deref(), Some("leave"));
    assert_eq!(client(&left.json()["leave"]), alice_id);

    // Notices are not publications: nothing in history, no offset.
    let (s, page) = server.get("/api/topics/lobby:a/history").await;
    assert_eq!(s, 200);
    assert_eq!(page["offset"], 0);
    // A publication still reaches everyone, after the notices.
    server.publish("lobby:a", r#"{"hello":1}"#).await;
    loop {
        let v = next_json(&mut watcher).await;
        if v.get("data").is_some() {
            assert_eq!(v["data"], json!({"hello": 1}));
            break;
        }
    }
    drop(es);
    drop(other);
    drop(watcher);
    server.assert_clean().await;
    server.shutdown().await;
}

#[tokio::test]
async fn members_and_stats_over_websocket_and_http() {
    let server = TestServer::start(setup).await;
    let alice = token("alice", &[], Some(json!("first tab")));
    let mut a1 = server.ws(&format!("?token={alice}")).await;
    let mut a2 = server.ws(&format!("?token={alice}")).await;
    let bob = token("bob", &[], None);
    let mut b = server.ws("").await;
    let mut anon = server.ws("").await;
    for ws in [&mut a1, &mut a2, &mut anon] {
        subscribe(ws, "room:1").await;
    }
    // bob authenticates over the socket, after connecting: the member takes the grant
    // the connection holds when it subscribes.
    let r = ask(&mut b, &format!(r#"{{"op":"auth","token":"{bob}"}}"#)).await;
    assert_eq!(r["op"], "authed");
    subscribe(&mut b, "room:1").await;

    // Two connections of alice, one of bob, one anonymous: 4 clients, 2 users.
    let stats = ask(
        &mut anon,
        r#"{"op":"presence_stats","topic":"room:1","id":2}"#,
    )
    .await;
    assert_eq!(
        stats,
        json!({"op": "presence_stats", "topic": "room:1", "clients": 4, "users": 2, "id": 2})
    );
    let (s, http) = server.get("/api/topics/room:1/presence/stats").await;
    assert_eq!(s, 200);
    assert_eq!(http, json!({"topic": "room:1", "clients": 4, "users": 2}));

    let list = ask(&mut anon, r#"{"op":"presence","topic":"room:1","id":1}"#).await;
    assert_eq!(list["op"], "presence");
    assert_eq!(list["id"], 1);
    assert!(list.get("next_cursor").is_none());
    let members = list["members"].as_array().unwrap();
    assert_eq!(members.len(), 4);
    let users: Vec<&Value> = members.iter().map(|m| &m["user"]).collect();
    assert_eq!(users.iter().filter(|u| **u == "alice").count(), 2);
    assert_eq!(users.iter().filter(|u| **u == "bob").count(), 1);
    assert_eq!(users.iter().filter(|u| u.is_null()).count(), 1);
    assert!(members
        .iter()
        .any(|m| m["user"] == "alice" && m["info"] == "first tab"));
    let ids: Vec<u64> = members.iter().map(client).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "client-id order");

    // Paged over HTTP, and over WS with limit + cursor.
    let (s, p1) = server.get("/api/topics/room:1/presence?limit=3").await;
    assert_eq!(s, 200, "{p1}");
    assert_eq!(p1["members"].as_array().unwrap().len(), 3);
    let cursor = p1["next_cursor"].as_str().expect("a next page").to_string();
    let (s, p2) = server
        .get(&format!(
            "/api/topics/room:1/presence?limit=3&cursor={cursor}"
        ))
        .await;
    assert_eq!(s, 200);
    assert_eq!(p2["members"].as_array().unwrap().len(), 1);
    assert!(p2.get("next_cursor").is_none());
    let all: Vec<u64> = p1["members"]
        .as_array()
        .unwrap()
        .iter()
        .chain(p2["members"].as_array().unwrap())
        .map(client)
        .collect();
    assert_eq!(all, ids);
    let w1 = ask(&mut anon, r#"{"op":"presence","topic":"room:1","limit":2}"#).await;
    let next = w1["next_cursor"].as_str().unwrap().to_string();
    let w2 = ask(
        &mut anon,
        &format!(r#"{{"op":"presence","topic":"room:1","limit":2,"cursor":"{next}"}}"#),
    )
    .await;
    assert_eq!(w1["members"].as_array().unwrap().len(), 2);
    assert_eq!(w2["members"].as_array().unwrap().len(), 2);

    // Bad reads are answered clearly.
    let (s, e) = server.get("/api/topics/room:1/presence?limit=0").await;
    assert_eq!((s, e["error"]["code"].as_str()), (400, Some("bad_query")));
    let (s, e) = server.get("/api/topics/room:1/presence?cursor=x").await;
    assert_eq!((s, e["error"]["code"].as_str()), (400, Some("bad_query")));
    let e = ask(
        &mut anon,
        r#"{"op":"presence","topic":"room:1","limit":5000}"#,
    )
    .await;
    assert_eq!(e["code"], "bad_query");

    // An unsubscribe leaves: alice's second tab goes, alice is still a user.
    send_json(&mut a2, r#"{"op":"unsubscribe","topic":"room:1"}"#).await;
    let state = server.state().clone();
    wait_until("a2 left", || state.hub.local_count("room:1") == 3).await;
    let (_, http) = server.get("/api/topics/room:1/presence/stats").await;
    assert_eq!(http, json!({"topic": "room:1", "clients": 3, "users": 2}));

    // `room:*` keeps members but announces nothing: no notice ever reached anyone.
    server.publish("room:1", r#"{"x":1}"#).await;
    let v = next_json(&mut a1).await;
    assert_eq!(
        v["data"],
        json!({"x": 1}),
        "first frame after subscribed: {v}"
    );

    for ws in [a1, a2, b, anon] {
        drop(ws);
    }
    server.assert_clean().await;
    let (_, http) = server.get("/api/topics/room:1/presence/stats").await;
    assert_eq!(http, json!({"topic": "room:1", "clients": 0, "users": 0}));
    server.shutdown().await;
}

#[tokio::test]
async fn a_killed_connection_leaves_every_topic() {
    let server = TestServer::start(setup).await;
    let mut watcher = server.ws("").await;
    subscribe(&mut watcher, "lobby:k").await;
    next_notice(&mut watcher, "lobby:k").await;

    let carol = token("carol", &[], None);
    let mut victim = server.ws(&format!("?token={carol}")).await;
    subscribe(&mut victim, "lobby:k").await;
    subscribe(&mut victim, "room:k").await;
    let (kind, m) = next_notice(&mut watcher, "lobby:k").await;
    assert_eq!((kind, m["user"].as_str()), ("join", Some("carol")));
    let victim_id = client(&m);
    let (_, stats) = server.get("/api/topics/room:k/presence/stats").await;
    assert_eq!(stats["clients"], 1);

    // The socket goes away without a close frame (a killed process).
    // Dropping the TCP stream under the WebSocket sends no close frame.
    drop(victim.into_inner());
    let (kind, m) = next_notice(&mut watcher, "lobby:k").await;
    assert_eq!((kind, client(&m)), ("leave", victim_id));
    let state = server.state().clone();
    wait_until("the victim's connection is cleaned up", || {
        state.connection_count() == 1
    })
    .await;
    let (_, stats) = server.get("/api/topics/room:k/presence/stats").await;
    assert_eq!(stats, json!({"topic": "room:k", "clients": 0, "users": 0}));
    let (_, stats) = server.get("/api/topics/lobby:k/presence/stats").await;
    assert_eq!(stats, json!({"topic": "lobby:k", "clients": 1, "users": 0}));
    drop(watcher);
    server.assert_clean().await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_private_topic_needs_the_right_to_read_it() {
    let server = TestServer::start(setup).await;
    let vip = token("dora", &["vip:*"], None);
    let mut member = server.ws(&format!("?token={vip}")).await;
    subscribe(&mut member, "vip:1").await;

    let path = "/api/topics/vip:1/presence";
    for p in [path.to_string(), format!("{path}/stats")] {
        let (s, e) = server.get(&p).await;
        assert_eq!(
            (s, e["error"]["code"].as_str()),
            (401, Some("token_required"))
        );
        let other = token("eve", &["news"], None);
        let (s, e) = server.get(&format!("{p}?token={other}")).await;
        assert_eq!(
            (s, e["error"]["code"].as_str()),
            (403, Some("topic_forbidden"))
        );
        let (s, _) = server.get(&format!("{p}?token={vip}")).await;
        assert_eq!(s, 200);
    }
    let (_, page) = server.get(&format!("{path}?token={vip}")).await;
    assert_eq!(page["members"][0]["user"], "dora");

    // Over WebSocket: the connection's grant decides, as for subscribe.
    let mut anon = server.ws("").await;
    let e = ask(&mut anon, r#"{"op":"presence","topic":"vip:1","id":5}"#).await;
    assert_eq!(
        (e["code"].as_str(), &e["id"]),
        (Some("token_required"), &json!(5))
    );
    let e = ask(&mut anon, r#"{"op":"presence_stats","topic":"vip:1"}"#).await;
    assert_eq!(e["code"], "token_required");
    let list = ask(&mut member, r#"{"op":"presence","topic":"vip:1"}"#).await;
    assert_eq!(list["members"].as_array().unwrap().len(), 1);
    drop(member);
    drop(anon);
    server.assert_clean().await;
    server.shutdown().await;
}

#[tokio::test]
async fn topics_without_presence_say_so() {
    let server = TestServer::start(setup).await;
    let mut ws = server.ws("").await;
    subscribe(&mut ws, "news").await;
    for cmd in [
        r#"{"op":"presence","topic":"news","id":1}"#,
        r#"{"op":"presence_stats","topic":"news","id":2}"#,
    ] {
        let e = ask(&mut ws, cmd).await;
        assert_eq!(e["op"], "error");
        assert_eq!(e["code"], "presence_disabled", "{e}");
    }
    for p in [
        "/api/topics/news/presence",
        "/api/topics/news/presence/stats",
    ] {
        let (s, e) = server.get(p).await;
        assert_eq!(
            (s, e["error"]["code"].as_str()),
            (404, Some("presence_disabled"))
        );
    }
    let (s, e) = server.get("/api/topics/bad%20name/presence").await;
    assert_eq!((s, e["error"]["code"].as_str()), (400, Some("bad_topic")));
    // An over-large info claim is refused with the token, saying why.
    let big = token("big", &[], Some(json!("x".repeat(2000))));
    let e = ask(&mut ws, &format!(r#"{{"op":"auth","token":"{big}"}}"#)).await;
    assert_eq!(e["code"], "bad_token");
    assert!(e["message"].as_str().unwrap().contains("info"), "{e}");
    drop(ws);
    server.assert_clean().await;
    server.shutdown().await;
}

/// One client subscribes and unsubscribes in a loop as fast as it can next to a healthy
/// watcher: each flap is a join and a leave to every subscriber, so what it can make the
/// node announce is bounded by `max_commands_per_second` (then close 4500), and the
/// watcher keeps receiving publications.
#[tokio::test]
async fn a_flapping_subscriber_is_bounded_by_the_command_rate() {
    const RATE: u32 = 100;
    let server = TestServer::start(|c| {
        setup(c);
        c.max_commands_per_second = RATE;
    })
    .await;
    let mut watcher = server.ws("").await;
    subscribe(&mut watcher, "lobby:flap").await;
    next_notice(&mut watcher, "lobby:flap").await;

    let started = Instant::now();
    let mut attacker = server.ws("").await;
    let flood = tokio::spawn(async move {
        use futures_util::SinkExt;
        let mut sent = 0u32;
        for _ in 0..5_000 {
            for op in ["subscribe", "unsubscribe"] {
                let cmd = format!(r#"{{"op":"{op}","topic":"lobby:flap"}}"#);
                if attacker.feed(Message::Text(cmd.into())).await.is_err() {
                    return (sent, attacker);
                }
                sent += 1;
            }
            if attacker.flush().await.is_err() {
                break;
            }
        }
        (sent, attacker)
    });
    // Count what the watcher is told until the attacker is closed and has left (its
    // cleanup announces the last leave before its connection is counted out).
    let (mut joins, mut leaves) = (0u32, 0u32);
    let state = server.state().clone();
    loop {
        let v = within(
            "watcher notices",
            tokio::time::timeout(Duration::from_millis(300), next_json(&mut watcher)),
        )
        .await;
        match v {
            Ok(v) if v.get("join").is_some() => joins += 1,
            Ok(v) if v.get("leave").is_some() => leaves += 1,
            Ok(_) => {}
            Err(_) if state.connection_count() == 1 => break,
            Err(_) => {}
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (sent, mut attacker) = flood.await.unwrap();
    // Closed with 4500 too_many_commands once past its burst.
    let mut code = None;
    while let Some(Ok(m)) = attacker.next().await {
        if let Message::Close(Some(f)) = m {
            code = Some(u16::from(f.code));
        }
    }
    assert_eq!(code, Some(4500));
    // Frames allowed: the burst (2 × rate) plus the rate over the time it ran; each join
    // took one subscribe among them.
    let allowed = 2.0 * f64::from(RATE) + f64::from(RATE) * elapsed;
    assert!(
        f64::from(joins) <= allowed / 2.0 + 1.0,
        "{joins} joins from {sent} frames in {elapsed:.2}s (allowed {allowed})"
    );
    assert!(
        joins >= 1 && leaves == joins,
        "{joins} joins, {leaves} leaves"
    );
    eprintln!("flap: {sent} frames sent, {joins} joins and {leaves} leaves in {elapsed:.2}s");
    // The watcher is still a healthy subscriber, and the only member.
    server.publish("lobby:flap", r#"{"after":1}"#).await;
    loop {
        let v = next_json(&mut watcher).await;
        if v.get("data").is_some() {
            assert_eq!(v["data"], json!({"after": 1}));
            break;
        }
    }
    let (_, stats) = server.get("/api/topics/lobby:flap/presence/stats").await;
    assert_eq!(stats["clients"], 1);
    drop(watcher);
    server.assert_clean().await;
    server.shutdown().await;
}

/// Under `--redis` the nodes share one view (docs/scaling.md, "Presence"; the suite
/// `presence_cluster` kills nodes and Redis): each node counts and lists the cluster's
/// members, and every node's subscribers hear every join, through the Redis broker's seam.
#[tokio::test]
async fn under_redis_the_nodes_share_one_view() {
    crate::need_redis!();
    let redis = crate::common::redis::RedisServer::start();
    let url = redis.url();
    let a = TestServer::start(|c| {
        setup(c);
        c.redis = url.clone();
    })
    .await;
    let b = TestServer::start(|c| {
        setup(c);
        c.redis = url.clone();
    })
    .await;
    let mut on_a = a.ws("").await;
    subscribe(&mut on_a, "lobby:r").await;
    let (kind, _) = next_notice(&mut on_a, "lobby:r").await;
    assert_eq!(kind, "join");
    let alice = token("alice", &[], None);
    let mut on_b = b.ws(&format!("?token={alice}")).await;
    subscribe(&mut on_b, "lobby:r").await;
    let (kind, m) = next_notice(&mut on_b, "lobby:r").await;
    assert_eq!((kind, m["user"].as_str()), ("join", Some("alice")));
    // Node a hears the join made on node b.
    let (kind, seen) = next_notice(&mut on_a, "lobby:r").await;
    assert_eq!((kind, &seen), ("join", &m));
    let mut second_on_a = a.ws("").await;
    subscribe(&mut second_on_a, "lobby:r").await;
    let (kind, _) = next_notice(&mut on_a, "lobby:r").await;
    assert_eq!(kind, "join");
    let (kind, _) = next_notice(&mut on_b, "lobby:r").await;
    assert_eq!(kind, "join");
    let (_, sa) = a.get("/api/topics/lobby:r/presence/stats").await;
    let (_, sb) = b.get("/api/topics/lobby:r/presence/stats").await;
    assert_eq!(sa, json!({"topic": "lobby:r", "clients": 3, "users": 1}));
    assert_eq!(sa, sb);
    let (_, la) = a.get("/api/topics/lobby:r/presence").await;
    let (_, lb) = b.get("/api/topics/lobby:r/presence").await;
    assert_eq!(la["members"].as_array().unwrap().len(), 3);
    assert_eq!(la, lb);
    a.publish("lobby:r", r#"{"n":1}"#).await;
    let v = next_json(&mut on_b).await;
    assert_eq!(v["data"], json!({"n": 1}), "{v}");
    drop(second_on_a);
    let (kind, _) = next_notice(&mut on_a, "lobby:r").await;
    assert_eq!(kind, "leave");
    drop((on_a, on_b));
    a.assert_clean().await;
    b.assert_clean().await;
    a.shutdown().await;
    b.shutdown().await;
}
