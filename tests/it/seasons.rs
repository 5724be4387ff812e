//! Seasons (issue 19): scheduled resets on an injected wall clock (no sleeps), the archive
//! of closed seasons, a score at the boundary landing in exactly one season, a node that
//! was down at a boundary closing on start, and `keep_seasons`.

use std::time::Duration;

use crate::common::http::code;
use crate::common::*;
use crier::config::Config;
use crier::server::Server;
use serde_json::{json, Value};

/// Wed 2026-12-02 10:00 UTC, and the Monday midnights after it in Tokyo (UTC+9).
const T0: i64 = 1_796_205_600_000;
const MON_TOKYO: i64 = 1_796_569_200_000; // 2026-12-06T15:00:00Z
const WEEK: i64 = 7 * 24 * 3600 * 1000;

async fn start() -> TestServer {
    let srv = TestServer::start(|c| c.board_update_interval = Duration::from_millis(10)).await;
    srv.state().boards.clock().set(T0);
    srv
}

async fn put(srv: &TestServer, board: &str, options: Value) -> (u16, Value) {
    srv.post_with_key(&format!("/api/boards/{board}"), &options.to_string(), None)
        .await
}

async fn scores(srv: &TestServer, board: &str, body: Value) -> Value {
    let (s, b) = srv
        .post_with_key(
            &format!("/api/boards/{board}/scores"),
            &body.to_string(),
            None,
        )
        .await;
    assert_eq!(s, 200, "{b}");
    b
}

async fn season_of(srv: &TestServer, board: &str) -> Value {
    let (s, b) = srv.get(&format!("/api/boards/{board}")).await;
    assert_eq!(s, 200, "{b}");
    b
}

async fn wait_season(srv: &TestServer, board: &str, n: u64) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let b = season_of(srv, board).await;
        if b["season"]["number"] == n {
            return b;
        }
        assert!(tokio::time::Instant::now() < deadline, "season {n}: {b}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn a_weekly_season_in_a_zone_closes_archives_and_starts_empty_live() {
    let srv = start().await;
    let (s, b) = put(
        &srv,
        "arena",
        json!({"reset": "0 0 * * MON", "timezone": "Asia/Tokyo", "keep_seasons": 5}),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["options"]["timezone"], "Asia/Tokyo");
    let ack = scores(
        &srv,
        "arena",
        json!([{"player": "ann", "score": 300, "meta": {"name": "Ann"}}, {"player": "bob", "score": 200}]),
    )
    .await;
    assert_eq!(ack["season"], 1);
    let b = season_of(&srv, "arena").await;
    assert_eq!(b["season"]["number"], 1);
    assert_eq!(b["season"]["started"], "2026-12-02T10:00:00.000Z");
    assert_eq!(b["season"]["ends"], "2026-12-06T15:00:00.000Z");
    assert_eq!(b["next_reset"], "2026-12-06T15:00:00.000Z");

    let mut ws = srv.ws("?topic=board:arena").await;
    let snap = within("the snapshot with both players", async {
        loop {
            let m = next_json(&mut ws).await;
            if m.get("op").is_none() && m["data"]["players"] == 2 {
                return m["data"].clone();
            }
        }
    })
    .await;
    assert_eq!(
        (snap["season"].as_u64(), snap["players"].as_u64()),
        (Some(1), Some(2))
    );

    // One ms before the boundary nothing happens; at it, the season closes.
    srv.state().boards.clock().set(MON_TOKYO - 1);
    assert_eq!(season_of(&srv, "arena").await["season"]["number"], 1);
    srv.state().boards.clock().set(MON_TOKYO);
    let b = wait_season(&srv, "arena", 2).await;
    assert_eq!(b["players"], 0);
    assert_eq!(b["season"]["started"], "2026-12-06T15:00:00.000Z");
    assert_eq!(b["next_reset"], "2026-12-13T15:00:00.000Z");
    let live = within("the watcher sees the new season", async {
        loop {
            let m = next_json(&mut ws).await;
            if m["data"]["season"] == 2 {
                return m["data"].clone();
            }
        }
    })
    .await;
    assert_eq!(live["players"], 0);
    assert_eq!(live["top"], json!([]));

    let (s, list) = srv.get("/api/boards/arena/seasons").await;
    assert_eq!(s, 200, "{list}");
    assert_eq!(list["season"]["number"], 2);
    assert_eq!(
        list["seasons"],
        json!([{"number": 1, "started": "2026-12-02T10:00:00.000Z",
                "ended": "2026-12-06T15:00:00.000Z", "players": 2}])
    );
    let (s, one) = srv.get("/api/boards/arena/seasons/1?limit=1").await;
    assert_eq!(s, 200, "{one}");
    assert_eq!(one["players"], 2);
    assert_eq!(
        one["entries"],
        json!([{"rank": 1, "player": "ann", "score": 300, "meta": {"name": "Ann"}}])
    );
    let (s, bob) = srv
        .get("/api/boards/arena/seasons/1/players/bob?around=1")
        .await;
    assert_eq!(s, 200, "{bob}");
    assert_eq!(
        (
            bob["entry"]["rank"].as_u64(),
            bob["around"].as_array().map(Vec::len)
        ),
        (Some(2), Some(2))
    );
    let (s, e) = srv.get("/api/boards/arena/seasons/2").await;
    assert_eq!((s, code(&e)), (404, "no_season"));
    let (s, e) = srv.get("/api/boards/arena/seasons/x").await;
    assert_eq!((s, code(&e)), (400, "bad_query"));
    let (s, e) = srv.get("/api/boards/arena/seasons/1/players/zed").await;
    assert_eq!((s, code(&e)), (404, "no_player"));

    let ack = scores(&srv, "arena", json!({"player": "cat", "score": 5})).await;
    assert_eq!(
        (ack["season"].as_u64(), ack["results"][0]["rank"].as_u64()),
        (Some(2), Some(1))
    );
}

/// Posts race the boundary: each acknowledgement names a season, and the archive of
/// season 1 holds exactly the players acknowledged in 1, the board exactly those in 2.
#[tokio::test]
async fn a_score_at_the_boundary_lands_in_exactly_one_season() {
    let srv = start().await;
    let (s, _) = put(&srv, "race", json!({"reset": "0 0 * * *"})).await;
    assert_eq!(s, 200);
    let boundary = 1_796_256_000_000; // 2026-12-03T00:00:00Z
    let mut posts = tokio::task::JoinSet::new();
    for i in 0..40 {
        let url = srv.url("/api/boards/race/scores");
        posts.spawn(async move {
            let body = json!({"player": format!("p{i}"), "score": i}).to_string();
            let (s, b) = crate::common::http::post_url(&url, body, None).await;
            assert_eq!(s, 200, "{b}");
            (format!("p{i}"), b["season"].as_u64().unwrap())
        });
        if i == 20 {
            srv.state().boards.clock().set(boundary);
        }
    }
    let mut in_season = [Vec::new(), Vec::new()];
    while let Some(r) = posts.join_next().await {
        let (p, season) = r.unwrap();
        assert!(season == 1 || season == 2, "{p}: season {season}");
        in_season[season as usize - 1].push(p);
    }
    let b = wait_season(&srv, "race", 2).await;
    let names = |v: &Value| -> Vec<String> {
        let mut n: Vec<String> = v["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["player"].as_str().unwrap().to_string())
            .collect();
        n.sort();
        n
    };
    in_season[0].sort();
    in_season[1].sort();
    assert_eq!(names(&b), in_season[1]);
    let (s, one) = srv.get("/api/boards/race/seasons/1?limit=100").await;
    assert_eq!(s, 200, "{one}");
    assert_eq!(names(&one), in_season[0]);
    assert_eq!(in_season[0].len() + in_season[1].len(), 40);
    let (_, list) = srv.get("/api/boards/race/seasons").await;
    assert_eq!(
        list["seasons"].as_array().unwrap().len(),
        1,
        "one close: {list}"
    );
}

/// A node down at the boundary closes the season on start (here: real time is years past
/// the injected one), the archive survives restarts, and only `keep_seasons` are kept.
#[tokio::test]
async fn a_node_down_at_the_boundary_closes_on_start_and_the_archive_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = || Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_path_buf(),
        board_update_interval: Duration::from_millis(10),
        ..Config::default()
    };
    let server = Server::start(cfg()).await.unwrap();
    let boards = server.state.boards.clone();
    boards.clock().set(T0);
    let addr = server.addr;
    let (s, b) = crate::common::http::post(
        addr,
        "/api/boards/old",
        &json!({"reset": "0 0 * * *", "keep_seasons": 2}),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    // Three daily seasons closed on the injected clock, each with one player.
    for day in 0..3i64 {
        let (s, b) = crate::common::http::post(
            addr,
            "/api/boards/old/scores",
            &json!({"player": format!("d{day}"), "score": day}),
        )
        .await;
        assert_eq!((s, b["season"].as_i64()), (200, Some(day + 1)), "{b}");
        boards.clock().set(T0 + (day + 1) * 24 * 3600 * 1000);
        let want = day as u64 + 2;
        wait_until("the season closes", || {
            boards
                .with_board("old", |b| b.season.number == want)
                .unwrap()
        })
        .await;
    }
    let (_, list) = crate::common::http::get(addr, "/api/boards/old/seasons").await;
    let kept: Vec<u64> = list["seasons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["number"].as_u64().unwrap())
        .collect();
    assert_eq!(kept, [3, 2], "newest first, keep_seasons = 2");
    let (s, e) = crate::common::http::get(addr, "/api/boards/old/seasons/1").await;
    assert_eq!((s, code(&e)), (404, "no_season"));
    // One more player in season 4, then the node goes down; it starts again on the real
    // clock, years after the season's end.
    let (s, _) = crate::common::http::post(
        addr,
        "/api/boards/old/scores",
        &json!({"player": "late", "score": 9}),
    )
    .await;
    assert_eq!(s, 200);
    server.shutdown().await;
    drop(boards);

    let server = Server::start(cfg()).await.unwrap();
    let addr = server.addr;
    let boards = server.state.boards.clone();
    wait_until("the node closes the season it missed", || {
        boards.with_board("old", |b| b.season.number == 5).unwrap()
    })
    .await;
    let (_, b) = crate::common::http::get(addr, "/api/boards/old").await;
    assert_eq!(b["players"], 0);
    let (_, four) = crate::common::http::get(addr, "/api/boards/old/seasons/4").await;
    assert_eq!(four["entries"][0]["player"], "late", "{four}");
    let (_, three) = crate::common::http::get(addr, "/api/boards/old/seasons/3").await;
    assert_eq!(three["entries"][0]["player"], "d2", "{three}");
    // The new season started at the latest boundary (a midnight), not at the restart.
    let started = b["season"]["started"].as_str().unwrap().to_string();
    assert!(started.ends_with("T00:00:00.000Z"), "{started}");
    server.shutdown().await;
}

#[tokio::test]
async fn bad_schedules_are_refused_with_the_reason() {
    let srv = start().await;
    for (options, want) in [
        (json!({"reset": "every monday"}), "not a cron expression"),
        (
            json!({"reset": "0 0 * * MON", "timezone": "Mars/Olympus"}),
            "IANA",
        ),
        (json!({"reset": "0 0 31 2 *"}), "never fires"),
        (json!({"keep_seasons": 0}), "keep_seasons"),
    ] {
        let (s, b) = put(&srv, "bad", options.clone()).await;
        assert_eq!((s, code(&b)), (400, "bad_options"), "{options}: {b}");
        assert!(
            b["error"]["message"].as_str().unwrap().contains(want),
            "{b}"
        );
    }
    // A board without a schedule is in season 1 for good.
    scores(&srv, "plain", json!({"player": "a", "score": 1})).await;
    let b = season_of(&srv, "plain").await;
    assert_eq!(
        (b["season"]["number"].as_u64(), b["next_reset"].is_null()),
        (Some(1), true)
    );
    assert!(b["season"].get("ends").is_none(), "{b}");
    let _ = WEEK;
}

/// Three nodes on one Redis, each with its own clock, all past the boundary at once: one
/// close for the cluster (one archive, season 2 everywhere), and the acknowledgements of
/// scores racing the boundary through every node name the season they landed in.
#[tokio::test]
async fn under_redis_three_nodes_close_the_season_once() {
    crate::need_redis!();
    let redis = crate::common::redis::RedisServer::start();
    let url = redis.url();
    let mut nodes = Vec::new();
    for _ in 0..3 {
        let srv = TestServer::start(|c| {
            c.redis = url.clone();
            c.board_update_interval = Duration::from_millis(10);
        })
        .await;
        srv.state().boards.clock().set(T0);
        nodes.push(srv);
    }
    let (s, b) = put(
        &nodes[0],
        "cup",
        json!({"reset": "0 0 * * *", "keep_seasons": 3}),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let boundary = 1_796_256_000_000; // 2026-12-03T00:00:00Z
    for (i, n) in nodes.iter().enumerate() {
        let ack = scores(n, "cup", json!({"player": format!("early{i}"), "score": i})).await;
        assert_eq!(ack["season"], 1, "{ack}");
    }
    for n in &nodes {
        wait_until("every node sees the schedule", || {
            n.state()
                .boards
                .with_board("cup", |b| b.ends == Some(boundary))
                .unwrap_or(false)
        })
        .await;
    }
    // The boundary passes on every node, while each posts one more score.
    let mut posts = tokio::task::JoinSet::new();
    for (i, n) in nodes.iter().enumerate() {
        n.state().boards.clock().set(boundary);
        let url = n.url("/api/boards/cup/scores");
        posts.spawn(async move {
            let body = json!({"player": format!("late{i}"), "score": 100 + i}).to_string();
            let (s, b) = crate::common::http::post_url(&url, body, None).await;
            assert_eq!(s, 200, "{b}");
            b["season"].as_u64().unwrap()
        });
    }
    while let Some(season) = posts.join_next().await {
        assert_eq!(
            season.unwrap(),
            2,
            "posted on a node whose clock passed the boundary"
        );
    }
    for n in &nodes {
        let b = wait_season(n, "cup", 2).await;
        wait_until("the late scores on every node", || {
            n.state()
                .boards
                .with_board("cup", |b| b.ranking.len() == 3)
                .unwrap()
        })
        .await;
        assert_eq!(b["season"]["started"], "2026-12-03T00:00:00.000Z");
        let (_, list) = n.get("/api/boards/cup/seasons").await;
        assert_eq!(
            list["seasons"],
            json!([{"number": 1, "started": list["seasons"][0]["started"],
                    "ended": "2026-12-03T00:00:00.000Z", "players": 3}]),
            "one close for the cluster"
        );
        let (_, one) = n.get("/api/boards/cup/seasons/1").await;
        let mut names: Vec<&str> = one["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["player"].as_str().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["early0", "early1", "early2"]);
    }
}
