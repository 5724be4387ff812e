//! Leaderboards over real sockets: the API, live updates (snapshot first, then only
//! changes that watchers can see, bursts coalesced), validation, and durability across a
//! SIGKILL of the real binary.

use std::time::Duration;

use crate::common::*;
use serde_json::{json, Value};

async fn post_scores(srv: &TestServer, board: &str, body: Value) -> (u16, Value) {
    srv.post_with_key(
        &format!("/api/boards/{board}/scores"),
        &body.to_string(),
        None,
    )
    .await
}

/// The next board update on a WebSocket, skipping command replies.
async fn next_update(ws: &mut Ws) -> Value {
    loop {
        let m = next_json(ws).await;
        if m.get("op").is_none() {
            return m["data"].clone();
        }
    }
}

fn names(update: &Value) -> Vec<String> {
    update["top"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["player"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn watcher_sees_snapshot_then_new_leader_and_nothing_for_invisible_changes() {
    let srv = TestServer::start(|c| c.board_update_interval = Duration::from_millis(20)).await;
    let (s, _) = srv
        .post_with_key(
            "/api/boards/arena",
            r#"{"order":"high","mode":"best","top":3}"#,
            None,
        )
        .await;
    assert_eq!(s, 200);
    let (s, body) = post_scores(
        &srv,
        "arena",
        json!([
            {"player":"ann","score":300,"meta":{"name":"Ann"}},
            {"player":"bob","score":200},
            {"player":"cat","score":100},
            {"player":"dan","score":50}
        ]),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let ranks: Vec<u64> = body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["rank"].as_u64().unwrap())
        .collect();
    assert_eq!(ranks, vec![1, 2, 3, 4]);

    let mut ws = srv.ws("?topic=board:arena").await;
    assert_eq!(next_json(&mut ws).await["op"], "subscribed");
    // The snapshot is the last published state; had the batch's update still been inside
    // its throttle window, that update follows right after it.
    let mut snap = next_update(&mut ws).await;
    if names(&snap).is_empty() {
        snap = next_update(&mut ws).await;
    }
    assert_eq!(
        names(&snap),
        ["ann", "bob", "cat"],
        "snapshot first, top 3 only"
    );
    assert_eq!(snap["players"], 4);
    assert_eq!(snap["top"][0]["meta"]["name"], "Ann");
    assert_eq!(snap["top"][0]["score"], 300);
    let v0 = snap["version"].as_u64().unwrap();

    // Outside the visible top 3: no update. A worse score in best mode: no change at all.
    let (_, body) = post_scores(&srv, "arena", json!({"player":"dan","score":60})).await;
    assert_eq!(
        (
            body["results"][0]["rank"].as_u64(),
            body["results"][0]["changed"].as_bool()
        ),
        (Some(4), Some(true))
    );
    let (_, body) = post_scores(&srv, "arena", json!({"player":"ann","score":10})).await;
    assert_eq!(
        (
            body["results"][0]["score"].as_f64(),
            body["results"][0]["changed"].as_bool()
        ),
        (Some(300.0), Some(false))
    );
    // dan jumps to first place: exactly one update, showing him on top.
    let (_, body) = post_scores(
        &srv,
        "arena",
        json!({"player":"dan","score":999,"meta":{"name":"Dan"}}),
    )
    .await;
    assert_eq!(body["results"][0]["rank"], 1);
    let up = next_update(&mut ws).await;
    assert_eq!(names(&up), ["dan", "ann", "bob"]);
    assert!(up["version"].as_u64().unwrap() > v0);
    // A ping round-trip proves nothing else (e.g. an update for dan's 60) was queued.
    send_json(&mut ws, r#"{"op":"ping","id":1}"#).await;
    assert_eq!(next_json(&mut ws).await["op"], "pong");

    // The same over SSE: snapshot first.
    let mut sse = Sse::connect(srv.addr, "?topic=board:arena").await;
    let (_, ev) = sse.next_event().await.unwrap();
    assert_eq!(names(&ev["data"]), ["dan", "ann", "bob"]);

    // Reads: page, around-me, list.
    let (s, page) = srv.get("/api/boards/arena?limit=2&offset=1").await;
    assert_eq!(s, 200);
    let players: Vec<&str> = page["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["player"].as_str().unwrap())
        .collect();
    assert_eq!(players, ["ann", "bob"]);
    assert_eq!(page["entries"][0]["rank"], 2);
    let (_, me) = srv.get("/api/boards/arena/players/bob?around=1").await;
    assert_eq!(me["entry"]["rank"], 3);
    let around: Vec<&str> = me["around"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["player"].as_str().unwrap())
        .collect();
    assert_eq!(around, ["ann", "bob", "cat"]);
    let (_, list) = srv.get("/api/boards").await;
    assert_eq!(list["boards"][0]["name"], "arena");
    assert_eq!(list["boards"][0]["players"], 4);
    let (s, b) = srv.get("/api/boards/arena/players/nobody").await;
    assert_eq!((s, b["error"]["code"].as_str()), (404, Some("no_player")));
    let (s, b) = srv.get("/api/boards/nope").await;
    assert_eq!((s, b["error"]["code"].as_str()), (404, Some("no_board")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_posts_coalesces_into_a_handful_of_updates_ending_at_the_newest() {
    let srv = TestServer::start(|c| c.board_update_interval = Duration::from_millis(50)).await;
    post_scores(&srv, "burst", json!({"player":"p0","score":0})).await;
    let mut ws = srv.ws("?topic=board:burst").await;
    next_json(&mut ws).await;
    next_update(&mut ws).await;
    let updates_before = srv.state().metrics.board_updates.get();

    // 1000 posts, each a new leader, from 10 concurrent posters.
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for t in 0..10 {
        let url = srv.url("/api/boards/burst/scores");
        tasks.push(tokio::spawn(async move {
            let http = crier::http_client::HttpClient::new(None);
            for i in 0..100 {
                let n = i * 10 + t + 1;
                let (s, _) = http
                    .post(
                        &url,
                        json!({"player": format!("p{n}"), "score": n}).to_string(),
                    )
                    .await
                    .unwrap();
                assert_eq!(s, 200);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Updates arrive until one shows the final leader; versions only go up.
    let mut seen = 0;
    let mut last_version = 0;
    loop {
        let up = next_update(&mut ws).await;
        seen += 1;
        let v = up["version"].as_u64().unwrap();
        assert!(v > last_version, "versions increase");
        last_version = v;
        if up["top"][0]["player"] == "p1000" {
            break;
        }
    }
    // At most one update per 50 ms window (plus the leading one), however slow the
    // machine: the throttle, not the post count, bounds the updates.
    let published = srv.state().metrics.board_updates.get() - updates_before;
    let windows = started.elapsed().as_millis() as u64 / 50 + 2;
    assert!(
        published <= windows,
        "{published} updates in {windows} windows"
    );
    assert!(
        published < 1000,
        "1000 posts coalesced into {published} updates"
    );
    assert!(seen <= published as usize);
}

#[tokio::test]
async fn invalid_scores_are_rejected_whole_and_name_the_entry() {
    let srv = TestServer::start(|c| c.publisher_keys = vec!["gamekey".into()]).await;
    let post = |body: Value, key: Option<&'static str>| {
        let srv = &srv;
        async move {
            srv.post_with_key("/api/boards/b1/scores", &body.to_string(), key)
                .await
        }
    };
    let (s, _) = post(json!({"player":"a","score":1}), None).await;
    assert_eq!(s, 401);
    let (s, _) = post(json!({"player":"a","score":1}), Some("nope")).await;
    assert_eq!(s, 403);
    let (s, _) = post(json!({"player":"a","score":1}), Some("gamekey")).await;
    assert_eq!(s, 200);
    for (body, needle) in [
        (
            json!([{"player":"b","score":5},{"score":3}]),
            "entry 1: missing \"player\"",
        ),
        (
            json!([{"player":"b","score":5},{"player":"c"}]),
            "entry 1: missing \"score\"",
        ),
        (json!([{"player":"b","score":1e300}]), "entry 0: score"),
        (json!([{"player":"b","score":"12"}]), "entry 0"),
        (json!([{"player":"","score":1}]), "entry 0: player"),
        (
            json!([{"player":"b","score":1,"meta":{"pad":"x".repeat(600)}}]),
            "over 512 bytes",
        ),
        (json!([{"player":"b","score":1,"meta":[1]}]), "JSON object"),
        (
            json!([{"player":"b","score":1,"extra":true}]),
            "unknown field",
        ),
        (json!(42), "score object"),
    ] {
        let (s, b) = post(body.clone(), Some("gamekey")).await;
        assert_eq!(s, 400, "{body}");
        let msg = b["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{msg:?} should mention {needle:?}");
    }
    let (s, b) = srv
        .post_with_key(
            "/api/boards/bad%20name/scores",
            r#"{"player":"a","score":1}"#,
            Some("gamekey"),
        )
        .await;
    assert_eq!((s, b["error"]["code"].as_str()), (400, Some("bad_board")));
    // Nothing of the rejected batches landed: still only "a".
    let (_, page) = srv.get("/api/boards/b1").await;
    assert_eq!(page["players"], 1);
    // Reset needs the key and empties the board.
    let (s, _) = srv.post_with_key("/api/boards/b1/reset", "", None).await;
    assert_eq!(s, 401);
    let (s, _) = srv
        .post_with_key("/api/boards/b1/reset", "", Some("gamekey"))
        .await;
    assert_eq!(s, 200);
    assert_eq!(srv.get("/api/boards/b1").await.1["players"], 0);
}

#[tokio::test]
async fn modes_and_low_order() {
    let srv = TestServer::start(|_| {}).await;
    srv.post_with_key("/api/boards/race", r#"{"order":"low"}"#, None)
        .await;
    post_scores(
        &srv,
        "race",
        json!([{"player":"a","score":61.5},{"player":"b","score":59.25}]),
    )
    .await;
    let (_, b) = post_scores(&srv, "race", json!({"player":"a","score":58})).await;
    assert_eq!(b["results"][0]["rank"], 1, "lower time wins");
    srv.post_with_key("/api/boards/kills", r#"{"mode":"increment"}"#, None)
        .await;
    post_scores(
        &srv,
        "kills",
        json!([{"player":"a","score":2},{"player":"a","score":3}]),
    )
    .await;
    let (_, me) = srv.get("/api/boards/kills/players/a").await;
    assert_eq!(me["entry"]["score"], 5);
    let (s, b) = srv
        .post_with_key("/api/boards/kills", r#"{"order":"low"}"#, None)
        .await;
    assert_eq!((s, b["error"]["code"].as_str()), (409, Some("conflict")));
    let (s, b) = srv
        .post_with_key("/api/boards/kills", r#"{"top":1000}"#, None)
        .await;
    assert_eq!((s, b["error"]["code"].as_str()), (400, Some("bad_options")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_no_acknowledged_score() {
    let dir = tempfile::tempdir().unwrap();
    let (mut proc, addr) = serve_binary(dir.path(), "127.0.0.1:0", &[]);
    let acked = std::sync::Arc::new(parking_lot::Mutex::new(Vec::<(String, u64)>::new()));
    let mut posters = Vec::new();
    for t in 0..8 {
        let url = format!("http://{addr}/api/boards/durable/scores");
        let acked = acked.clone();
        posters.push(tokio::spawn(async move {
            let http = crier::http_client::HttpClient::new(None);
            for i in 0u64.. {
                let player = format!("t{t}-{}", i % 50);
                let body = json!([{"player": player, "score": i}, {"player": format!("batch{t}-{i}"), "score": 1}]);
                match http.post(&url, body.to_string()).await {
                    Ok((s, _)) if s == 200 => acked.lock().push((player, i)),
                    _ => return, // the server died mid-request: not acknowledged
                }
            }
        }));
    }
    wait_until("some scores acknowledged", || acked.lock().len() >= 400).await;
    proc.0.kill().unwrap(); // SIGKILL
    proc.0.wait().unwrap();
    for p in posters {
        p.await.unwrap();
    }
    let acked = acked.lock().clone();

    let (_proc, addr) = serve_binary(dir.path(), "127.0.0.1:0", &[]);
    let http = crier::http_client::HttpClient::new(None);
    let (_, body) = http
        .get(&format!("http://{addr}/api/boards/durable?limit=1000"))
        .await
        .unwrap();
    let page: Value = serde_json::from_slice(&body).unwrap();
    let stored: std::collections::HashMap<String, f64> = page["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["player"].as_str().unwrap().to_string(),
                e["score"].as_f64().unwrap(),
            )
        })
        .collect();
    for (player, score) in &acked {
        let got = stored.get(player).copied();
        assert!(
            got.is_some_and(|s| s >= *score as f64),
            "acknowledged {player}={score} lost (found {got:?})"
        );
    }
    assert!(
        page["players"].as_u64().unwrap() as usize >= acked.len(),
        "every batch's second entry is there too"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_watcher_is_not_cut_off_and_converges_to_the_newest_ranking() {
    use crier::ws::frame::{Decoder, Message, Role};
    use tokio::io::AsyncReadExt;

    let srv = TestServer::start(|c| {
        c.queue_max_bytes = 32 * 1024;
        c.board_update_interval = Duration::from_millis(1);
    })
    .await;
    srv.post_with_key("/api/boards/conf", r#"{"top":100}"#, None)
        .await;
    let seed: Vec<Value> = (0..100)
        .map(
            |i| json!({"player": format!("seed{i}"), "score": i, "meta": {"name": "x".repeat(40)}}),
        )
        .collect();
    post_scores(&srv, "conf", Value::Array(seed)).await;

    // A watcher that stops reading right after the handshake, with a tiny window.
    let mut watcher = raw_ws(srv.addr, "?topic=board:conf", Some(4096)).await;
    wait_until("watching", || {
        srv.state().hub.subscriber_count("board:conf") == 1
    })
    .await;
    // Each update carries 100 entries (~8 KB). Post new leaders until the watcher's kernel
    // buffers are full and its queue starts conflating (bounded), then one final leader.
    let mut posted = 0;
    while srv.state().metrics.conflated.get() < 50 {
        assert!(posted < 5000, "queue never started conflating");
        for _ in 0..20 {
            posted += 1;
            let (s, _) = post_scores(
                &srv,
                "conf",
                json!({"player": format!("lead{posted}"), "score": 1000 + posted}),
            )
            .await;
            assert_eq!(s, 200);
        }
    }
    let (s, _) = post_scores(&srv, "conf", json!({"player": "final", "score": 1_000_000})).await;
    assert_eq!(s, 200);
    assert_eq!(
        srv.state().metrics.slow_consumer_disconnects.get(),
        0,
        "conflated, not cut off"
    );

    // Now read: the stream ends with an update whose leader is the last one posted.
    let mut decoder = Decoder::new(Role::Client, 1 << 20);
    let mut last_leader = String::new();
    let mut frames = 0;
    while last_leader != "final" {
        let buf = decoder.buffer_mut(64 * 1024);
        let n = within("watcher catches up", watcher.read_buf(buf))
            .await
            .unwrap();
        assert!(n > 0, "connection closed before converging");
        while let Some(msg) = decoder.next_message().unwrap() {
            if let Message::Text(t) = msg {
                let v: Value = serde_json::from_slice(&t).unwrap();
                if let Some(p) = v["data"]["top"][0]["player"].as_str() {
                    last_leader = p.to_string();
                    frames += 1;
                }
            }
        }
    }
    assert!(
        frames < posted,
        "stale updates were replaced, not all delivered ({frames} of {posted})"
    );
    assert_eq!(
        srv.state().hub.subscriber_count("board:conf"),
        1,
        "still subscribed"
    );
}
