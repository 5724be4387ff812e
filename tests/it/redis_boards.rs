//! Shared leaderboards (issue 8): real `crier serve --redis` nodes on one real
//! `redis-server`. A score posted through any node is ranked the same way on every node,
//! ties included, watchers of every node see it, and every acknowledged score survives a
//! restart of everything (AOF `always`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::http::{get, post, ws};
use crate::common::redis::{node, RedisServer};
use crate::common::{next_json, serve_binary, within, Ws, WAIT};
use serde_json::{json, Value};

/// The whole ranking as a node shows it: (rank, player, score).
async fn ranking(addr: &str, board: &str) -> Vec<(u64, String, f64)> {
    let (status, body) = get(addr, &format!("/api/boards/{board}?limit=1000")).await;
    assert_eq!(status, 200, "{body}");
    body["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["rank"].as_u64().unwrap(),
                e["player"].as_str().unwrap().to_string(),
                e["score"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// The ranking, or the status a node answered instead.
async fn ranking_or_status(addr: &str, board: &str) -> Result<Vec<(u64, String, f64)>, u16> {
    let (status, _) = get(addr, &format!("/api/boards/{board}?limit=1")).await;
    if status != 200 {
        return Err(status);
    }
    Ok(ranking(addr, board).await)
}

/// One acknowledged post: what was sent, the answer, and when (on a counter every task
/// bumps) it was sent and acknowledged, so "acknowledged before the other was sent" is
/// known without clocks.
#[derive(Clone, Debug)]
struct Posted {
    player: String,
    sent: f64,
    result_score: f64,
    changed: bool,
    sent_at: u64,
    acked_at: u64,
}

const BOARDS: [&str; 3] = ["best", "late", "inc"];

/// Three tasks post 200 scores each, alternating between the nodes, over three boards
/// (best/high, latest/low, increment/high) with few distinct scores, so ties abound.
async fn concurrent_posts(nodes: &[String]) -> HashMap<&'static str, Vec<Posted>> {
    let clock = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for t in 0..3u64 {
        let nodes = nodes.to_vec();
        let clock = clock.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for i in 0..200u64 {
                let board = BOARDS[((i + t) % 3) as usize];
                let player = format!("p{}", (i * 7 + t * 5) % 23);
                let score = match board {
                    "inc" => ((i + t) % 3 + 1) as f64,
                    _ => ((i * 13 + t * 7) % 6 * 10) as f64,
                };
                let addr = &nodes[((i + t) % nodes.len() as u64) as usize];
                let sent_at = clock.fetch_add(1, Ordering::SeqCst);
                let (status, body) = post(
                    addr,
                    &format!("/api/boards/{board}/scores"),
                    &json!({"player": player, "score": score}),
                )
                .await;
                assert_eq!(status, 200, "{body}");
                let acked_at = clock.fetch_add(1, Ordering::SeqCst);
                let r = &body["results"][0];
                out.push((
                    board,
                    Posted {
                        player,
                        sent: score,
                        result_score: r["score"].as_f64().unwrap(),
                        changed: r["changed"].as_bool().unwrap(),
                        sent_at,
                        acked_at,
                    },
                ));
            }
            out
        }));
    }
    let mut by_board: HashMap<&'static str, Vec<Posted>> = HashMap::new();
    for t in tasks {
        for (board, p) in t.await.unwrap() {
            by_board.entry(board).or_default().push(p);
        }
    }
    by_board
}

/// Checks a final ranking against the one-node rules: each player's score (best = the
/// highest posted, increment = the sum, latest = one it posted), the board's order, and
/// the tie rule where the posts' order is known: of two players tied on a score, the one
/// whose achieving post was acknowledged before the other's was sent ranks first.
fn check_rules(board: &str, posts: &[Posted], shown: &[(u64, String, f64)]) {
    let mut players: HashMap<&str, Vec<&Posted>> = HashMap::new();
    for p in posts {
        players.entry(&p.player).or_default().push(p);
    }
    assert_eq!(shown.len(), players.len(), "{board}: every player ranked");
    let ranks: Vec<u64> = shown.iter().map(|(r, _, _)| *r).collect();
    assert_eq!(ranks, (1..=shown.len() as u64).collect::<Vec<_>>());
    let mut achieving: HashMap<&str, &Posted> = HashMap::new();
    for (_, player, score) in shown {
        let mine = &players[player.as_str()];
        match board {
            "best" => {
                let max = mine.iter().map(|p| p.sent).fold(f64::MIN, f64::max);
                assert_eq!(*score, max, "{board}: {player} keeps the best");
            }
            "inc" => {
                let sum: f64 = mine.iter().map(|p| p.sent).sum();
                assert_eq!(*score, sum, "{board}: {player} has the sum");
            }
            _ => assert!(mine.iter().any(|p| p.sent == *score), "{board}: {player}"),
        }
        if board != "late" {
            // Scores only grow here, so exactly one post set the final score.
            let set: Vec<&&Posted> = mine
                .iter()
                .filter(|p| p.changed && p.result_score == *score)
                .collect();
            assert_eq!(set.len(), 1, "{board}: {player}: {set:?}");
            achieving.insert(player, set[0]);
        }
    }
    let mut ties = 0;
    for w in shown.windows(2) {
        let ((_, x, sx), (_, y, sy)) = (&w[0], &w[1]);
        match board {
            "late" => assert!(sx <= sy, "{board}: low scores first"),
            _ => assert!(sx >= sy, "{board}: high scores first"),
        }
        if sx == sy {
            ties += 1;
            if let (Some(ax), Some(ay)) = (achieving.get(x.as_str()), achieving.get(y.as_str())) {
                assert!(
                    ay.acked_at > ax.sent_at,
                    "{board}: {y} reached {sy} before {x} tried, yet ranks below"
                );
            }
        }
    }
    assert!(ties > 0 || board == "inc", "{board}: the test made ties");
}

/// Every node shows the same rankings; returns them.
async fn same_everywhere(nodes: &[String]) -> HashMap<&'static str, Vec<(u64, String, f64)>> {
    let mut out = HashMap::new();
    for board in BOARDS {
        let first = ranking(&nodes[0], board).await;
        for n in &nodes[1..] {
            // Other nodes follow the pub/sub hop behind: wait for them, bounded.
            let deadline = Instant::now() + WAIT;
            loop {
                let other = ranking(n, board).await;
                if other == first {
                    break;
                }
                assert!(Instant::now() < deadline, "{board}: {other:?} != {first:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        out.insert(board, first);
    }
    out
}

#[tokio::test]
async fn one_leaderboard_across_nodes_survives_a_restart_of_everything() {
    crate::need_redis!();
    let mut redis = RedisServer::start_with_aof();
    let (a_proc, a, _da) = node(&redis);
    let (b_proc, b, _db) = node(&redis);
    let nodes = vec![a.clone(), b.clone()];
    for (board, options) in [
        ("late", json!({"order": "low", "mode": "latest"})),
        ("inc", json!({"mode": "increment"})),
    ] {
        let (status, body) = post(&b, &format!("/api/boards/{board}"), &options).await;
        assert_eq!(status, 200, "{body}");
    }
    // Options set through node b are on node a (read-your-writes holds on b at once).
    let (_, inc) = get(&b, "/api/boards/inc").await;
    assert_eq!(inc["mode"], "increment");

    let posts = concurrent_posts(&nodes).await;
    let before = same_everywhere(&nodes).await;
    for board in BOARDS {
        check_rules(board, &posts[board], &before[board]);
    }

    // Ties posted one after the other through alternating nodes: earlier achiever first.
    for (i, player) in ["tie1", "tie2", "tie3"].iter().enumerate() {
        let (status, body) = post(
            &nodes[i % 2],
            "/api/boards/ties/scores",
            &json!([{"player": player, "score": 500}, {"player": "x", "score": 1}]),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        // The posting node answers with its own write already readable.
        assert_eq!(body["results"][0]["rank"], i as u64 + 1, "{body}");
    }
    let (status, body) = post(
        &a,
        "/api/boards/ties/scores",
        &json!({"player": "tie0", "score": 499}),
    )
    .await;
    assert_eq!(
        (status, body["results"][0]["rank"].as_u64()),
        (200, Some(4))
    );
    // Node b follows over pub/sub (the documented hop): wait for it, then compare.
    let want = ["tie1", "tie2", "tie3", "tie0", "x"];
    let ties = within("node b shows the ties", async {
        loop {
            let ties = ranking(&b, "ties").await;
            if ties.len() >= want.len() {
                return ties;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let order: Vec<&str> = ties.iter().map(|(_, p, _)| p.as_str()).collect();
    assert_eq!(order, want);

    // SIGKILL every node and Redis, then start it all again.
    drop(a_proc);
    drop(b_proc);
    redis.kill();
    redis.restart();
    let (_a2, a2, _da2) = node(&redis);
    let (_b2, b2, _db2) = node(&redis);
    let nodes = vec![a2.clone(), b2.clone()];
    let after = same_everywhere(&nodes).await;
    assert_eq!(
        after, before,
        "every acknowledged score is back, ranked the same"
    );
    assert_eq!(ranking(&a2, "ties").await, ties);
    // And the boards go on from where they were (seq, version, options).
    let (status, body) = post(
        &a2,
        "/api/boards/ties/scores",
        &json!({"player": "tie4", "score": 500}),
    )
    .await;
    assert_eq!(
        (status, body["results"][0]["rank"].as_u64()),
        (200, Some(4))
    );
    let (_, inc) = get(&b2, "/api/boards/inc").await;
    assert_eq!(inc["mode"], "increment");
}

/// Reads the board's updates until one satisfies `want`.
async fn update_where(ws: &mut Ws, what: &str, want: impl Fn(&Value) -> bool) -> Value {
    within(what, async {
        loop {
            let m = next_json(ws).await;
            if m.get("op").is_none() && want(&m["data"]) {
                return m["data"].clone();
            }
        }
    })
    .await
}

fn top_players(update: &Value) -> Vec<String> {
    update["top"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["player"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn watchers_on_every_node_see_scores_posted_anywhere() {
    crate::need_redis!();
    let redis = RedisServer::start();
    let (_a, a, _da) = node(&redis);
    let (_b, b, _db) = node(&redis);
    let (status, _) = post(
        &b,
        "/api/boards/w/scores",
        &json!({"player": "ann", "score": 10}),
    )
    .await;
    assert_eq!(status, 200);

    let mut on_a = ws(&a, "?topic=board:w").await;
    assert_eq!(next_json(&mut on_a).await["op"], "subscribed");
    let snap = update_where(&mut on_a, "the snapshot on node a", |d| {
        top_players(d) == ["ann"]
    })
    .await;
    assert_eq!(snap["players"], 1);

    // A score through node b reaches node a's watcher as an update.
    let (status, _) = post(
        &b,
        "/api/boards/w/scores",
        &json!({"player": "bob", "score": 20}),
    )
    .await;
    assert_eq!(status, 200);
    update_where(&mut on_a, "bob's score on node a", |d| {
        top_players(d) == ["bob", "ann"]
    })
    .await;

    // A watcher on node b: both nodes' snapshots and lists count both watchers.
    let mut on_b = ws(&b, "?topic=board:w").await;
    assert_eq!(next_json(&mut on_b).await["op"], "subscribed");
    for w in [&mut on_a, &mut on_b] {
        update_where(w, "a snapshot counting both watchers", |d| {
            d["watchers"] == 2
        })
        .await;
    }
    for n in [&a, &b] {
        let (_, page) = get(n, "/api/boards/w").await;
        assert_eq!(page["watchers"], 2, "{page}");
        let (_, list) = get(n, "/api/boards").await;
        assert_eq!(list["boards"][0]["watchers"], 2, "{list}");
    }
    // The watcher on node b leaves: node a's watcher hears the count drop.
    drop(on_b);
    update_where(&mut on_a, "the count after one watcher left", |d| {
        d["watchers"] == 1
    })
    .await;
}

#[tokio::test]
async fn redis_down_fails_scores_fast_and_changes_nothing() {
    crate::need_redis!();
    let mut redis = RedisServer::start_with_aof();
    let (_a, a, _da) = node(&redis);
    let (_b, b, _db) = node(&redis);
    let (status, _) = post(
        &a,
        "/api/boards/d/scores",
        &json!([{"player": "ann", "score": 10}, {"player": "bob", "score": 5}]),
    )
    .await;
    assert_eq!(status, 200);
    let before = ranking(&a, "d").await;
    // Node b learns of the board over pub/sub: it shows it before Redis goes away, or
    // there would be no mirror to read from while Redis is down.
    within("node b mirrors the board", async {
        while ranking_or_status(&b, "d").await.ok() != Some(before.clone()) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    redis.kill();
    for n in [&a, &b] {
        let started = Instant::now();
        let (status, body) = post(
            n,
            "/api/boards/d/scores",
            &json!({"player": "cat", "score": 99}),
        )
        .await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["error"]["code"], "store_unavailable", "{body}");
        assert!(started.elapsed() < WAIT, "a failed score does not hang");
        // Reads go on from the mirror.
        assert_eq!(ranking(n, "d").await, before);
    }

    redis.restart();
    // Once the nodes are back on Redis a score goes through; the refused one never shows.
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, _) = post(
            &b,
            "/api/boards/d/scores",
            &json!({"player": "dan", "score": 1}),
        )
        .await;
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "scores work again after redis returns"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut want = before.clone();
    want.push((3, "dan".to_string(), 1.0));
    for n in [&a, &b] {
        let deadline = Instant::now() + WAIT;
        loop {
            let got = ranking(n, "d").await;
            if got == want {
                break;
            }
            assert!(Instant::now() < deadline, "{got:?} != {want:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The boards' pub/sub connection cut by Redis: the nodes reconnect and catch up every
/// board, and a score posted meanwhile shows on both. Redis restarted without persistence
/// lost the boards: the nodes drop their mirrors instead of showing what Redis forgot.
#[tokio::test]
async fn mirrors_catch_up_after_a_cut_connection_and_follow_a_redis_that_lost_the_board() {
    crate::need_redis!();
    let mut redis = RedisServer::start();
    let (_a, a, _da) = node(&redis);
    let (_b, b, _db) = node(&redis);
    let (status, _) = post(
        &a,
        "/api/boards/c/scores",
        &json!({"player": "ann", "score": 10}),
    )
    .await;
    assert_eq!(status, 200);
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(killed >= 2, "every node's subscriptions were cut: {killed}");
    let (status, _) = post(
        &b,
        "/api/boards/c/scores",
        &json!({"player": "bob", "score": 20}),
    )
    .await;
    assert_eq!(status, 200);
    let want = vec![(1, "bob".to_string(), 20.0), (2, "ann".to_string(), 10.0)];
    for n in [&a, &b] {
        let deadline = Instant::now() + WAIT;
        while ranking(n, "c").await != want {
            assert!(Instant::now() < deadline, "node {n} caught up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    redis.kill();
    redis.restart();
    for n in [&a, &b] {
        let deadline = Instant::now() + WAIT;
        while get(n, "/api/boards/c").await.0 != 404 {
            assert!(Instant::now() < deadline, "node {n} dropped the lost board");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // The board starts over when scored again, on every node.
    let deadline = Instant::now() + WAIT;
    while post(
        &a,
        "/api/boards/c/scores",
        &json!({"player": "cat", "score": 5}),
    )
    .await
    .0 != 200
    {
        assert!(Instant::now() < deadline, "scores work again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for n in [&a, &b] {
        let deadline = Instant::now() + WAIT;
        while ranking_or_empty(n, "c").await != [(1, "cat".to_string(), 5.0)] {
            assert!(Instant::now() < deadline, "node {n} has the new board");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn ranking_or_empty(addr: &str, board: &str) -> Vec<(u64, String, f64)> {
    if get(addr, &format!("/api/boards/{board}")).await.0 == 404 {
        return Vec::new();
    }
    ranking(addr, board).await
}

/// The same writes, one after the other, through two Redis nodes (alternating) and through
/// one node without Redis: every answer and the final pages are byte-for-byte the same
/// JSON, edge scores included (fractions, -0, ±1e15, tiny exponents), as are refusals.
#[tokio::test]
async fn redis_boards_answer_exactly_as_one_node_does() {
    crate::need_redis!();
    let redis = RedisServer::start();
    let (_a, a, _da) = node(&redis);
    let (_b, b, _db) = node(&redis);
    let alone = crate::common::TestServer::start(|_| {}).await;
    let one = alone.addr.to_string();
    let writes: Vec<(&str, Value)> = vec![
        (
            "/api/boards/lo",
            json!({"order": "low", "mode": "latest", "top": 3}),
        ),
        (
            "/api/boards/lo/scores",
            json!([
                {"player": "a", "score": 0.1}, {"player": "b", "score": -0.0},
                {"player": "c", "score": 1e15}, {"player": "d", "score": -1e15},
                {"player": "e", "score": 1.5e-7}, {"player": "f", "score": 123.456},
                {"player": "g", "score": 0.1}, {"player": "a", "score": 0.1, "meta": {"x": 1}}
            ]),
        ),
        (
            "/api/boards/lo/scores",
            json!({"player": "b", "score": 0.30000000000000004}),
        ),
        ("/api/boards/lo", json!({"order": "high"})),
        ("/api/boards/lo/reset", json!({})),
        (
            "/api/boards/lo",
            json!({"order": "high", "mode": "increment"}),
        ),
        (
            "/api/boards/lo/scores",
            json!([
                {"player": "a", "score": 0.1}, {"player": "a", "score": 0.2},
                {"player": "b", "score": 0.30000000000000004}, {"player": "c", "score": 0}
            ]),
        ),
        (
            "/api/boards/lo/scores",
            json!([
                {"player": "z", "score": 5}, {"player": "a", "score": 1e15}
            ]),
        ),
        (
            "/api/boards/hi/scores",
            json!([
                {"player": "p", "score": 7, "meta": {"n": "P"}}, {"player": "q", "score": 7},
                {"player": "p", "score": 3, "meta": {"n": "worse"}}, {"player": "r", "score": 7.0}
            ]),
        ),
        (
            "/api/boards/hi/scores",
            json!({"player": "q", "score": 8, "meta": {"n": "Q"}}),
        ),
        ("/api/boards/hi", json!({"order": "low"})),
        ("/api/boards/nope/reset", json!({})),
    ];
    for (i, (path, body)) in writes.iter().enumerate() {
        let shared = post(if i % 2 == 0 { &a } else { &b }, path, body).await;
        let single = post(&one, path, body).await;
        assert_eq!(shared, single, "{path} {body}");
    }
    for board in ["lo", "hi"] {
        let path = format!("/api/boards/{board}?limit=1000");
        let (_, single) = get(&one, &path).await;
        for n in [&a, &b] {
            let deadline = Instant::now() + WAIT;
            loop {
                let (_, shared) = get(n, &path).await;
                if shared["entries"] == single["entries"] {
                    for k in ["players", "order", "mode", "top"] {
                        assert_eq!(shared[k], single[k], "{board}: {k}");
                    }
                    break;
                }
                assert!(Instant::now() < deadline, "{shared} != {single}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// A node started after a big board was built loads it in chunks (several `HSCAN`
/// rounds) and shows the same ranking as the node that built it.
#[tokio::test]
async fn a_late_node_loads_a_big_board_in_chunks() {
    crate::need_redis!();
    let redis = RedisServer::start();
    let (_a, a, _da) = node(&redis);
    for batch in 0..3u64 {
        let scores: Vec<Value> = (0..1000u64)
            .map(|i| json!({"player": format!("p{}", (batch * 1000 + i) % 2500), "score": (i * 31) % 97}))
            .collect();
        let (status, body) = post(&a, "/api/boards/big/scores", &json!(scores)).await;
        assert_eq!(status, 200, "{body}");
    }
    let (_b, b, _db) = node(&redis);
    let mut shown = Vec::new();
    for n in [&a, &b] {
        let mut all = Vec::new();
        for offset in [0, 1000, 2000] {
            let (_, page) = get(n, &format!("/api/boards/big?limit=1000&offset={offset}")).await;
            all.extend(page["entries"].as_array().unwrap().iter().cloned());
        }
        assert_eq!(all.len(), 2500);
        shown.push(all);
    }
    assert_eq!(shown[0], shown[1]);
}

/// An attack on the node's two topic tables: connections that watch never-posted
/// `board:*` names (held by the node-local broker) and fresh topics (held through Redis),
/// then leave, round after round. Every round must leave nothing behind, or the tables
/// (capped by `max_topics`) would fill up and refuse everyone; a healthy watcher still
/// watches a real board afterwards.
#[tokio::test]
async fn watchers_of_ghost_topics_leave_nothing_behind() {
    crate::need_redis!();
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (_proc, addr) = serve_binary(
        dir.path(),
        "127.0.0.1:0",
        &[
            "--redis",
            &redis.url(),
            "--max-topics",
            "20",
            "--max-subscriber-topics",
            "20",
        ],
    );
    let (status, body) = post(
        &addr,
        "/api/boards/arena/scores",
        &json!({"player": "p1", "score": 5}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    for round in 0..5 {
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
            .await
            .unwrap();
        for i in 0..8 {
            for topic in [format!("board:ghost-{round}-{i}"), format!("t-{round}-{i}")] {
                crate::common::send_json(
                    &mut ws,
                    &json!({"op": "subscribe", "topic": topic}).to_string(),
                )
                .await;
                let v = next_json(&mut ws).await;
                assert_eq!(
                    (v["op"].as_str(), v["topic"].as_str()),
                    (Some("subscribed"), Some(topic.as_str())),
                    "round {round}: {v}"
                );
            }
        }
        drop(ws);
        within("the node lets the connection go", async {
            loop {
                let (_, h) = get(&addr, "/healthz").await;
                if h["connections"] == 0 && h["subscriptions"] == 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
    }
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws?topic=board:arena"))
        .await
        .unwrap();
    let v = next_json(&mut ws).await;
    assert_eq!(v["op"], "subscribed", "{v}");
    let v = next_json(&mut ws).await;
    assert_eq!(v["data"]["top"][0]["player"], "p1", "{v}");
}
