//! Forgetting a player (issue 19): `DELETE /api/boards/{b}/players/{p}` removes the entry
//! durably, and the top and the followers of the windows it leaves are updated live, on
//! one node and under `--redis`.

use std::time::Duration;

use crate::common::http::{self, code, delete};
use crate::common::*;
use crier::config::Config;
use crier::server::Server;
use serde_json::{json, Value};

async fn post_scores(addr: std::net::SocketAddr, board: &str, body: Value) {
    let (s, b) =
        crate::common::http::post(addr, &format!("/api/boards/{board}/scores"), &body).await;
    assert_eq!(s, 200, "{b}");
}

fn names(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|e| e["player"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn a_deleted_player_leaves_the_top_and_the_windows_and_stays_gone_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = || Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_path_buf(),
        board_update_interval: Duration::from_millis(10),
        ..Config::default()
    };
    let server = Server::start(cfg()).await.unwrap();
    let addr = server.addr;
    // p00..p19, p00 first.
    let seed: Vec<Value> = (0..20)
        .map(|i| json!({"player": format!("p{i:02}"), "score": 100 - i}))
        .collect();
    post_scores(addr, "arena", json!(seed)).await;
    let mut top = crate::common::http::ws(addr, "?topic=board:arena").await;
    let mut follower = crate::common::http::ws(addr, "?topic=board:arena@p05").await;
    let mut gone = crate::common::http::ws(addr, "?topic=board:arena@p03").await;
    assert_eq!(names(&next_data(&mut top).await["top"])[3], "p03");
    assert_eq!(next_data(&mut follower).await["entry"]["rank"], 6);
    assert_eq!(next_data(&mut gone).await["entry"]["rank"], 4);

    let (s, b) = delete(addr, "/api/boards/arena/players/p03", None).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        b,
        json!({"board": "arena", "player": "p03", "deleted": true, "seasons": []})
    );
    // (Messages sent before the delete, e.g. a watcher count, may come first.)
    let t = within("the top without p03", async {
        loop {
            let t = next_data(&mut top).await;
            if !names(&t["top"]).contains(&"p03".into()) {
                return t;
            }
        }
    })
    .await;
    assert_eq!(
        (names(&t["top"])[3].as_str(), &t["players"]),
        ("p04", &json!(19))
    );
    let w = within("p05 one rank up", async {
        loop {
            let w = next_data(&mut follower).await;
            if w["entry"]["rank"] != 6 {
                return w;
            }
        }
    })
    .await;
    assert_eq!(w["entry"]["rank"], 5, "{w}");
    assert!(!names(&w["around"]).contains(&"p03".into()), "{w}");
    let w = within("p03's window empties", async {
        loop {
            let w = next_data(&mut gone).await;
            if w["entry"]["rank"] != 4 {
                return w;
            }
        }
    })
    .await;
    assert!(w["entry"].is_null(), "{w}");
    let (s, b) = crate::common::http::get(addr, "/api/boards/arena/players/p03").await;
    assert_eq!((s, code(&b)), (404, "no_player"), "{b}");

    // Again, an unknown board, a bad name.
    let (s, b) = delete(addr, "/api/boards/arena/players/p03", None).await;
    assert_eq!((s, code(&b)), (404, "no_player"), "{b}");
    let (s, b) = delete(addr, "/api/boards/nope/players/p1", None).await;
    assert_eq!((s, code(&b)), (404, "no_board"), "{b}");
    let (s, b) = delete(addr, "/api/boards/a%20b/players/p1", None).await;
    assert_eq!((s, code(&b)), (400, "bad_board"), "{b}");

    // Posting again after the delete starts a fresh entry (not the old best).
    post_scores(addr, "arena", json!({"player": "p04", "score": 1})).await;
    let (s, _) = delete(addr, "/api/boards/arena/players/p04", None).await;
    assert_eq!(s, 200);
    post_scores(addr, "arena", json!({"player": "p04", "score": 2})).await;
    let (_, b) = crate::common::http::get(addr, "/api/boards/arena/players/p04").await;
    assert_eq!(
        (b["entry"]["score"].as_f64(), &b["players"]),
        (Some(2.0), &json!(19))
    );
    drop((top, follower, gone));
    server.shutdown().await;

    let server = Server::start(cfg()).await.unwrap();
    let (_, b) = crate::common::http::get(server.addr, "/api/boards/arena?limit=100").await;
    assert_eq!(b["players"], 19, "{b}");
    let (s, _) = crate::common::http::get(server.addr, "/api/boards/arena/players/p03").await;
    assert_eq!(s, 404);
    server.shutdown().await;
}

#[tokio::test]
async fn deleting_needs_the_boards_scope() {
    let srv = TestServer::start(|c| c.publisher_keys = vec!["k1".into()]).await;
    let (s, _) = srv
        .post_with_key(
            "/api/boards/b/scores",
            r#"{"player":"x","score":1}"#,
            Some("k1"),
        )
        .await;
    assert_eq!(s, 200);
    let (s, b) = delete(srv.addr, "/api/boards/b/players/x", None).await;
    assert_eq!(s, 401, "{b}");
    let (s, _) = delete(srv.addr, "/api/boards/b/players/x", Some("k1")).await;
    assert_eq!(s, 200);
}

/// Under `--redis`, a delete through one node reaches the other node's mirror and its
/// follower.
#[tokio::test]
async fn under_redis_a_delete_reaches_every_node() {
    crate::need_redis!();
    let redis = crate::common::redis::RedisServer::start();
    let url = redis.url();
    let start = || {
        let url = url.clone();
        TestServer::start(move |c| {
            c.redis = url;
            c.board_update_interval = Duration::from_millis(10);
        })
    };
    let (a, b) = (start().await, start().await);
    post_scores(
        a.addr,
        "cup",
        json!([{"player": "ann", "score": 10}, {"player": "bob", "score": 5}]),
    )
    .await;
    let mut ws = b.ws("?topic=board:cup@bob").await;
    within("bob at rank 2 on b", async {
        while next_data(&mut ws).await["entry"]["rank"] != 2 {}
    })
    .await;
    let (s, body) = delete(a.addr, "/api/boards/cup/players/ann", None).await;
    assert_eq!(s, 200, "{body}");
    within("bob at rank 1 on b", async {
        while next_data(&mut ws).await["entry"]["rank"] != 1 {}
    })
    .await;
    let (s, e) = b.get("/api/boards/cup/players/ann").await;
    assert_eq!((s, code(&e)), (404, "no_player"));
    let (s, e) = delete(b.addr, "/api/boards/cup/players/ann", None).await;
    assert_eq!((s, code(&e)), (404, "no_player"), "{e}");
    let (s, e) = delete(b.addr, "/api/boards/none/players/ann", None).await;
    assert_eq!((s, code(&e)), (404, "no_board"), "{e}");
}

/// Wed 2026-12-02 10:00 UTC (as in seasons.rs), and one day.
const T0: i64 = 1_796_205_600_000;
const DAY: i64 = 24 * 3600 * 1000;

/// Closes the board's current season on an injected clock: `day` days after T0.
async fn close_day(boards: &crier::leaderboard::service::Boards, board: &str, day: i64) {
    let before = boards.with_board(board, |b| b.season.number).unwrap();
    boards.clock().set(T0 + day * DAY);
    wait_until("the season closes", || {
        boards
            .with_board(board, |b| b.season.number > before)
            .unwrap()
    })
    .await;
}

fn season_players(page: &Value) -> Vec<String> {
    names(&page["entries"])
}

/// Players ask to be forgotten everywhere: the delete erases the entry from every closed
/// season the board keeps as well (their counts drop), durably, and says which.
#[tokio::test]
async fn a_delete_erases_the_player_from_closed_seasons_too() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = || Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_path_buf(),
        board_update_interval: Duration::from_millis(10),
        ..Config::default()
    };
    let server = Server::start(cfg()).await.unwrap();
    let (addr, boards) = (server.addr, server.state.boards.clone());
    boards.clock().set(T0);
    let (s, b) = http::post(
        addr,
        "/api/boards/s",
        &json!({"reset": "0 0 * * *", "tiebreak": "low"}),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    post_scores(addr, "s", json!([{"player": "ann", "score": 10, "subscore": 2}, {"player": "bob", "score": 10, "subscore": 3}])).await;
    close_day(&boards, "s", 1).await;
    post_scores(
        addr,
        "s",
        json!([{"player": "ann", "score": 7}, {"player": "cat", "score": 3}]),
    )
    .await;
    close_day(&boards, "s", 2).await;
    post_scores(addr, "s", json!({"player": "dan", "score": 1})).await;
    // Season 1 is read (and so loaded) before the delete.
    let (_, one) = http::get(addr, "/api/boards/s/seasons/1").await;
    assert_eq!(season_players(&one), ["ann", "bob"], "{one}");

    let (s, b) = delete(addr, "/api/boards/s/players/ann", None).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["seasons"], json!([1, 2]), "{b}");
    let (_, one) = http::get(addr, "/api/boards/s/seasons/1").await;
    assert_eq!(
        (
            season_players(&one),
            &one["entries"][0]["rank"],
            &one["players"]
        ),
        (vec!["bob".to_string()], &json!(1), &json!(1)),
        "{one}"
    );
    let (s, e) = http::get(addr, "/api/boards/s/seasons/2/players/ann").await;
    assert_eq!((s, code(&e)), (404, "no_player"), "{e}");
    let (_, list) = http::get(addr, "/api/boards/s/seasons").await;
    let counts: Vec<&Value> = list["seasons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| &s["players"])
        .collect();
    assert_eq!(counts, [&json!(1), &json!(1)], "{list}");
    let (s, e) = delete(addr, "/api/boards/s/players/ann", None).await;
    assert_eq!((s, code(&e)), (404, "no_player"), "{e}");
    // Only in the current season: no closed season named.
    let (s, b) = delete(addr, "/api/boards/s/players/dan", None).await;
    assert_eq!((s, &b["seasons"]), (200, &json!([])), "{b}");
    server.shutdown().await;

    let server = Server::start(cfg()).await.unwrap();
    for n in [1, 2] {
        let (_, page) = http::get(server.addr, &format!("/api/boards/s/seasons/{n}")).await;
        assert!(!season_players(&page).contains(&"ann".into()), "{page}");
        assert_eq!(page["players"], 1, "{page}");
    }
    server.shutdown().await;
}

/// Under `--redis` the script erases the closed seasons' entries (hash and sorted set)
/// once for the cluster, and every node drops what it had loaded of them.
#[tokio::test]
async fn under_redis_a_delete_erases_closed_seasons_on_every_node() {
    crate::need_redis!();
    let redis = crate::common::redis::RedisServer::start();
    let url = redis.url();
    let start = || {
        let url = url.clone();
        TestServer::start(move |c| {
            c.redis = url;
            c.board_update_interval = Duration::from_millis(10);
        })
    };
    let (a, b) = (start().await, start().await);
    for n in [&a, &b] {
        n.state().boards.clock().set(T0);
    }
    let (s, r) = http::post(
        a.addr,
        "/api/boards/s",
        &json!({"reset": "0 0 * * *", "tiebreak": "high"}),
    )
    .await;
    assert_eq!(s, 200, "{r}");
    post_scores(
        a.addr,
        "s",
        json!([{"player": "ann", "score": 10, "subscore": 2.5}, {"player": "bob", "score": 10}]),
    )
    .await;
    // The boundary passes on both nodes; a score posted past it closes the season first.
    for n in [&a, &b] {
        n.state().boards.clock().set(T0 + DAY);
    }
    post_scores(a.addr, "s", json!({"player": "zed", "score": 1})).await;
    for n in [&a, &b] {
        wait_until("season 2", || {
            n.state()
                .boards
                .with_board("s", |b| b.season.number == 2)
                .unwrap()
        })
        .await;
    }
    let (_, one) = b.get("/api/boards/s/seasons/1").await;
    assert_eq!(season_players(&one), ["ann", "bob"], "{one}");
    let (s, r) = delete(a.addr, "/api/boards/s/players/ann", None).await;
    assert_eq!((s, &r["seasons"]), (200, &json!([1])), "{r}");
    for n in [&a, &b] {
        let one = within("the archive without ann", async {
            loop {
                let (_, one) = n.get("/api/boards/s/seasons/1").await;
                if one["players"] == 1 {
                    return one;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert_eq!(season_players(&one), ["bob"], "{one}");
    }
    let mut conn = ::redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let zset: Vec<String> = ::redis::cmd("ZRANGE")
        .arg("crier:{board:s}:s1z")
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(zset.len(), 1, "{zset:?}");
    assert!(zset[0].ends_with("bob"), "{zset:?}");
    let (s, e) = delete(b.addr, "/api/boards/s/players/ann", None).await;
    assert_eq!((s, code(&e)), (404, "no_player"), "{e}");
}
