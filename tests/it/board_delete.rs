//! Forgetting a player (issue 19): `DELETE /api/boards/{b}/players/{p}` removes the entry
//! durably, and the top and the followers of the windows it leaves are updated live, on
//! one node and under `--redis`.

use std::time::Duration;

use crate::common::http::{code, delete};
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
        json!({"board": "arena", "player": "p03", "deleted": true})
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
