//! Friends views (issue 19): `board:{board}:friends@a@b@c` pushes the ranking of a given
//! set of players when any of them moves, coalesced per update interval, over WebSocket
//! and SSE, on every node under `--redis`; `GET /api/boards/{b}/friends?players=a,b,c`
//! reads it once. Bad sets (too many players, empty or repeated names) are refused with
//! `bad_topic` while a healthy watcher keeps its updates.

use std::time::Duration;

use crate::common::http::code;
use crate::common::*;
use serde_json::{json, Value};

async fn scores(srv: &TestServer, board: &str, body: Value) {
    let (s, b) = srv
        .post_with_key(
            &format!("/api/boards/{board}/scores"),
            &body.to_string(),
            None,
        )
        .await;
    assert_eq!(s, 200, "{b}");
}

/// The view's ranking as (rank, player).
fn ranking(v: &Value) -> Vec<(u64, String)> {
    v["ranking"]
        .as_array()
        .unwrap_or_else(|| panic!("no ranking in {v}"))
        .iter()
        .map(|e| {
            let rank = e["rank"].as_u64().unwrap();
            (rank, e["player"].as_str().unwrap().to_string())
        })
        .collect()
}

fn r(list: &[(u64, &str)]) -> Vec<(u64, String)> {
    list.iter().map(|(k, p)| (*k, p.to_string())).collect()
}

/// p00..p39 with scores 3900..0: p00 first.
async fn seed(srv: &TestServer, board: &str) {
    let seed: Vec<Value> = (0..40)
        .map(|i| json!({"player": format!("p{i:02}"), "score": (39 - i) * 100}))
        .collect();
    scores(srv, board, json!(seed)).await;
}

#[tokio::test]
async fn a_friends_view_moves_with_its_players_over_ws_sse_and_rest() {
    let srv = TestServer::start(|c| c.board_update_interval = Duration::from_millis(10)).await;
    seed(&srv, "arena").await;
    let mut ws = srv.ws("?topic=board:arena:friends@p20@p05@ghost").await;
    let v = next_data(&mut ws).await;
    assert_eq!(ranking(&v), r(&[(6, "p05"), (21, "p20")]), "{v}");
    assert_eq!(v["missing"], json!(["ghost"]));
    assert_eq!(v["friends"], json!(["p20", "p05", "ghost"]));
    assert_eq!(v["players"], 40);

    // None of them moves (ranks 1 and 2 swap): nothing. Then ghost posts and lands at 2:
    // both friends move one down, and that is the next view.
    scores(&srv, "arena", json!({"player": "p01", "score": 5000})).await;
    scores(&srv, "arena", json!({"player": "ghost", "score": 3950})).await;
    let v = next_data(&mut ws).await;
    assert_eq!(
        ranking(&v),
        r(&[(2, "ghost"), (7, "p05"), (22, "p20")]),
        "{v}"
    );
    assert_eq!(v["missing"], json!([]));

    // Over SSE, the same view.
    let mut sse = Sse::connect(srv.addr, "?topic=board:arena:friends@p05@ghost").await;
    let (_, first) = within("the SSE view", sse.next_event()).await.unwrap();
    let first = first.get("data").cloned().unwrap_or(first);
    assert_eq!(ranking(&first), r(&[(2, "ghost"), (7, "p05")]), "{first}");

    // Read once over REST.
    let (s, b) = srv
        .get("/api/boards/arena/friends?players=p05,nobody,ghost")
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(ranking(&b), r(&[(2, "ghost"), (7, "p05")]), "{b}");
    assert_eq!(
        (&b["missing"], &b["board"], &b["season"]),
        (&json!(["nobody"]), &json!("arena"), &json!(1))
    );
}

/// A burst of scores becomes a few views, the last one the newest ranking.
#[tokio::test]
async fn a_burst_of_moves_is_coalesced_per_update_interval() {
    let srv = TestServer::start(|c| c.board_update_interval = Duration::from_millis(300)).await;
    seed(&srv, "burst").await;
    let mut ws = srv.ws("?topic=board:burst:friends@p30@p31").await;
    let v = next_data(&mut ws).await;
    assert_eq!(ranking(&v), r(&[(31, "p30"), (32, "p31")]));
    const POSTS: i64 = 20;
    for i in 1..=POSTS {
        scores(
            &srv,
            "burst",
            json!({"player": "p31", "score": 4000 + i * 100}),
        )
        .await;
    }
    let mut views = 0;
    loop {
        let v = next_data(&mut ws).await;
        views += 1;
        if v["ranking"][0]["score"] == json!(4000 + POSTS * 100) {
            assert_eq!(ranking(&v), r(&[(1, "p31"), (32, "p30")]), "{v}");
            break;
        }
    }
    assert!(views < POSTS, "{views} views for {POSTS} posts");
}

const SECRET: &str = "a-test-secret-of-at-least-32-bytes!!";

/// The status and error code of a refused WebSocket upgrade.
async fn refused_upgrade(srv: &TestServer, query: &str) -> (u16, String) {
    match tokio_tungstenite::connect_async(format!("ws://{}/ws{query}", srv.addr)).await {
        Ok(_) => panic!("the upgrade of {query} was accepted"),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body: Value =
                serde_json::from_slice(&resp.body().clone().unwrap_or_default()).unwrap();
            (resp.status().as_u16(), code(&body).to_string())
        }
        Err(e) => panic!("unexpected failure: {e}"),
    }
}

/// Too many players, an empty name, a name twice, a bad board: refused on every path with
/// `bad_topic`; on a `follow_own_only` board a view needs the token of one of its players.
/// A healthy watcher's view keeps moving throughout.
#[tokio::test]
async fn bad_sets_are_refused_next_to_a_healthy_watcher() {
    let srv = TestServer::start(|c| {
        c.board_update_interval = Duration::from_millis(10);
        c.jwt_secret = SECRET.into();
        c.board_policies = vec![crier::config::BoardPolicyConfig {
            pattern: "own*".into(),
            follow_own_only: true,
            ..Default::default()
        }];
    })
    .await;
    seed(&srv, "arena").await;
    seed(&srv, "own").await;
    let mut healthy = srv.ws("?topic=board:arena:friends@p10@p11").await;
    assert_eq!(
        ranking(&next_data(&mut healthy).await),
        r(&[(11, "p10"), (12, "p11")])
    );

    let many: Vec<String> = (0..=crier::topic::MAX_FRIENDS)
        .map(|i| format!("{i}"))
        .collect();
    let many = many.join("@");
    let bad = [
        format!("board:arena:friends@{many}"),
        "board:arena:friends@p1@@p2".into(),
        "board:arena:friends@".into(),
        "board:arena:friends@p1@p2@p1".into(),
        "board:..:friends@p1".into(),
    ];
    for t in &bad {
        let q = format!("?topic={t}");
        assert_eq!(
            refused_upgrade(&srv, &q).await,
            (400, "bad_topic".into()),
            "{t}"
        );
        let (s, b) = srv.get(&format!("/sse{q}")).await;
        assert_eq!((s, code(&b)), (400, "bad_topic"), "{t}: {b}");
    }
    // A subscribe command on an open connection.
    let mut attacker = srv.ws("?topic=board:arena").await;
    assert_eq!(next_json(&mut attacker).await["op"], "subscribed");
    send_json(
        &mut attacker,
        &format!(r#"{{"op":"subscribe","topic":"{}","id":9}}"#, bad[0]),
    )
    .await;
    let m = within("the refusal", async {
        loop {
            let m = next_json(&mut attacker).await;
            if m["op"] == "error" {
                return m;
            }
        }
    })
    .await;
    assert_eq!(
        (&m["code"], &m["id"]),
        (&json!("bad_topic"), &json!(9)),
        "{m}"
    );
    // REST: the same checks, and `players` is needed.
    let csv = many.replace('@', ",");
    for q in [
        format!("players={csv}"),
        "players=a,,b".into(),
        "players=a,b,a".into(),
        "players=a%20b".into(),
        String::new(),
    ] {
        let (s, b) = srv.get(&format!("/api/boards/arena/friends?{q}")).await;
        assert_eq!((s, code(&b)), (400, "bad_topic"), "{q}: {b}");
    }

    // follow_own_only: a view only for one of its players.
    let p05 = auth::mint(SECRET, "p05", &[], 60);
    let q = "?topic=board:own:friends@p05@p06";
    assert_eq!(
        refused_upgrade(&srv, q).await,
        (401, "token_required".into())
    );
    let p07 = auth::mint(SECRET, "p07", &[], 60);
    assert_eq!(
        refused_upgrade(&srv, &format!("{q}&token={p07}")).await,
        (403, "topic_forbidden".into())
    );
    let (s, b) = srv
        .get(&format!(
            "/api/boards/own/friends?players=p05,p06&token={p07}"
        ))
        .await;
    assert_eq!((s, code(&b)), (403, "topic_forbidden"), "{b}");
    let mut mine = srv.ws(&format!("{q}&token={p05}")).await;
    assert_eq!(
        ranking(&next_data(&mut mine).await),
        r(&[(6, "p05"), (7, "p06")])
    );

    // The healthy watcher still sees its view move.
    scores(&srv, "arena", json!({"player": "p11", "score": 99999})).await;
    let v = next_data(&mut healthy).await;
    assert_eq!(ranking(&v), r(&[(1, "p11"), (12, "p10")]), "{v}");
}

/// Under `--redis`, a view on one node moves with scores posted through another.
#[tokio::test]
async fn under_redis_a_view_on_another_node_moves() {
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
    scores(
        &a,
        "cup",
        json!([{"player": "ann", "score": 10}, {"player": "bob", "score": 5}, {"player": "cy", "score": 1}]),
    )
    .await;
    let mut ws = b.ws("?topic=board:cup:friends@bob@cy").await;
    within("the first view", async {
        loop {
            if ranking(&next_data(&mut ws).await) == r(&[(2, "bob"), (3, "cy")]) {
                return;
            }
        }
    })
    .await;
    scores(&a, "cup", json!({"player": "cy", "score": 50})).await;
    let v = next_data(&mut ws).await;
    assert_eq!(ranking(&v), r(&[(1, "cy"), (3, "bob")]), "{v}");
    let (s, body) = b.get("/api/boards/cup/friends?players=cy,bob").await;
    assert_eq!((s, ranking(&body)), (200, r(&[(1, "cy"), (3, "bob")])));
}

/// A new follower's first window, and a new friends view, go out at subscribe time (with
/// the next update), not at the next once-a-second watcher check: each of several comes
/// within a few update intervals.
#[tokio::test]
async fn the_first_window_and_view_come_at_subscribe_time() {
    let srv = TestServer::start(|c| c.board_update_interval = Duration::from_millis(10)).await;
    seed(&srv, "quick").await;
    for i in 0..3 {
        let t0 = std::time::Instant::now();
        let mut ws = srv.ws(&format!("?topic=board:quick@p{:02}", 10 + i)).await;
        let w = next_data(&mut ws).await;
        let took = t0.elapsed();
        assert_eq!(w["entry"]["rank"], 11 + i, "{w}");
        assert!(
            took < Duration::from_millis(500),
            "window {i} took {took:?}"
        );

        let t0 = std::time::Instant::now();
        let mut sse =
            Sse::connect(srv.addr, &format!("?topic=board:quick:friends@p0{i}@p20")).await;
        let (_, v) = within("the view", sse.next_event()).await.unwrap();
        let took = t0.elapsed();
        let v = v.get("data").cloned().unwrap_or(v);
        assert_eq!(ranking(&v)[0].1, format!("p0{i}"), "{v}");
        assert!(took < Duration::from_millis(500), "view {i} took {took:?}");
    }
}
