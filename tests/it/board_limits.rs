//! Board budgets (issue 15, findings 4 and 5) against the real binary over real sockets:
//!
//! - Boards have a budget of their own (`max_boards`): their `board:*` topics never take
//!   the topic table from publishers or subscribers, also after a restart on the same data.
//! - `max_boards` refuses a new board (503 `too_many_boards`) and keeps every existing one,
//!   also when a restart lowered it.
//! - `max_players_per_board` (and a `[[board]]` table's own) refuses a batch that would add
//!   players past it, whole (409 `too_many_players`), changing nothing; players already on
//!   the board keep posting, also when a restart lowered the cap.
//! - `GET /api/boards` pages with `limit` and `cursor`: every board exactly once.

use crate::common::next_data;
use std::collections::BTreeSet;
use std::sync::Arc;

use crate::common::http::{code, get, post};
use crate::common::{next_json, serve_binary, within, Ws, WAIT};
use crier::http_client::HttpClient;
use serde_json::{json, Value};
use tokio::task::JoinSet;

/// A counter or gauge from `/metrics` (0 when absent).
async fn metric(addr: &str, name: &str) -> f64 {
    let (status, body) = HttpClient::new(None)
        .get(&format!("http://{addr}/metrics"))
        .await
        .expect("metrics");
    assert_eq!(status, 200);
    String::from_utf8_lossy(&body)
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn wait_metric(addr: &str, name: &str, at_least: f64) {
    let deadline = tokio::time::Instant::now() + WAIT * 3;
    loop {
        let v = metric(addr, name).await;
        if v >= at_least {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} stayed at {v}, expected {at_least}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Posts one score to each board, 16 at a time; every post must be acknowledged.
async fn create_boards(addr: &str, names: Vec<String>) {
    let names = Arc::new(names);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..16 {
        let (addr, names, next) = (addr.to_string(), names.clone(), next.clone());
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(name) = names.get(i) else { return };
                let (s, body) = post(
                    &addr,
                    &format!("/api/boards/{name}/scores"),
                    &json!({"player": "p", "score": i}),
                )
                .await;
                assert_eq!(s, 200, "board {name}: {body}");
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
}

async fn ws(addr: &str, topic: &str) -> Ws {
    let mut ws = crate::common::http::ws(addr, &format!("?topic={topic}")).await;
    let ack = next_json(&mut ws).await;
    assert_eq!(ack["op"], "subscribed", "{ack}");
    ws
}

/// A watcher of `board:{name}` gets the board's snapshot.
async fn watch_board(addr: &str, name: &str) {
    let mut w = ws(addr, &format!("board:{name}")).await;
    let snap = within("the board's snapshot", next_data(&mut w)).await;
    assert_eq!(snap["board"], name, "{snap}");
}

fn board_names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("b{i:04}")).collect()
}

/// Publishes to `n` topics nobody has used yet: each must be acknowledged.
async fn publish_fresh(addr: &str, prefix: &str, n: usize) {
    for i in 0..n {
        let (s, body) = post(
            addr,
            &format!("/api/publish/{prefix}-{i}"),
            &json!({"i": i}),
        )
        .await;
        assert_eq!(s, 200, "publish to a new topic {prefix}-{i}: {body}");
    }
}

/// The issue's case: `--max-topics 1000` and 1,100 boards. Every board's topic is live
/// (retained, never idle), yet publishes still create topics, a subscriber of a published
/// topic keeps receiving, every board's watchers get their snapshot, and all of it again
/// after a restart on the same data dir.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eleven_hundred_boards_leave_the_topic_table_to_publishers() {
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--max-topics", "1000"];
    let (proc, addr) = serve_binary(dir.path(), "127.0.0.1:0", &flags);
    let mut healthy = ws(&addr, "news").await;
    let (s, _) = post(&addr, "/api/publish/news", &json!({"n": 0})).await;
    assert_eq!(s, 200);
    assert_eq!(next_data(&mut healthy).await["n"], 0);

    let names = board_names(1100);
    create_boards(&addr, names.clone()).await;
    publish_fresh(&addr, "fresh", 50).await;
    wait_metric(&addr, "crier_board_updates_total", 1100.0).await;
    publish_fresh(&addr, "fresher", 50).await;
    for n in 1..=20 {
        let (s, body) = post(&addr, "/api/publish/news", &json!({"n": n})).await;
        assert_eq!(s, 200, "{body}");
    }
    for n in 1..=20 {
        assert_eq!(
            within("the healthy subscriber", next_data(&mut healthy)).await["n"],
            n
        );
    }
    for name in ["b0000", "b0999", "b1099"] {
        watch_board(&addr, name).await;
    }
    // One page is bounded however many boards exist (the unpaged list grew with them).
    let (s, body) = get(&addr, "/api/boards?limit=100000").await;
    assert_eq!(s, 200);
    assert_eq!(
        body["boards"].as_array().unwrap().len(),
        1000,
        "the largest page"
    );
    assert_eq!(body["next_cursor"], "b0999");
    drop(healthy);
    drop(proc);

    // The same data dir: every board comes back and publishes its snapshot at start.
    let (_proc, addr) = serve_binary(dir.path(), "127.0.0.1:0", &flags);
    wait_metric(&addr, "crier_board_updates_total", 1100.0).await;
    let (s, body) = get(&addr, "/api/boards/b1099").await;
    assert_eq!((s, body["players"].as_u64()), (200, Some(1)), "{body}");
    let mut healthy = ws(&addr, "after").await;
    publish_fresh(&addr, "again", 50).await;
    let (s, _) = post(&addr, "/api/publish/after", &json!({"n": 1})).await;
    assert_eq!(s, 200);
    assert_eq!(next_data(&mut healthy).await["n"], 1);
    watch_board(&addr, "b1099").await;
}

/// Past `max_boards` a new board is refused (by scores or by options) and nothing of it
/// exists; every existing board keeps working. A restart with a lower cap keeps every
/// stored board readable and writable, and refuses new ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_boards_refuses_new_boards_and_keeps_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let (proc, addr) = serve_binary(dir.path(), "127.0.0.1:0", &["--max-boards", "3"]);
    create_boards(&addr, vec!["a".into(), "b".into()]).await;
    let (s, body) = post(&addr, "/api/boards/c", &json!({"top": 5})).await;
    assert_eq!(s, 200, "{body}");
    let (s, body) = post(
        &addr,
        "/api/boards/d/scores",
        &json!({"player": "x", "score": 1}),
    )
    .await;
    assert_eq!((s, code(&body)), (503, "too_many_boards"), "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_boards"),
        "{body}"
    );
    let (s, body) = post(&addr, "/api/boards/e", &json!({})).await;
    assert_eq!((s, code(&body)), (503, "too_many_boards"), "{body}");
    for gone in ["d", "e"] {
        let (s, _) = get(&addr, &format!("/api/boards/{gone}")).await;
        assert_eq!(s, 404, "a refused board does not exist");
    }
    // Existing boards take scores, options and resets.
    let (s, _) = post(
        &addr,
        "/api/boards/a/scores",
        &json!({"player": "y", "score": 2}),
    )
    .await;
    assert_eq!(s, 200);
    let (s, _) = post(&addr, "/api/boards/c", &json!({"top": 7})).await;
    assert_eq!(s, 200);
    let (s, body) = get(&addr, "/api/boards").await;
    assert_eq!(s, 200);
    let listed: Vec<&str> = body["boards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(listed, ["a", "b", "c"]);
    drop(proc);

    let (_proc, addr) = serve_binary(dir.path(), "127.0.0.1:0", &["--max-boards", "2"]);
    let (s, body) = get(&addr, "/api/boards/a").await;
    assert_eq!((s, body["players"].as_u64()), (200, Some(2)), "{body}");
    let (s, body) = get(&addr, "/api/boards/c").await;
    assert_eq!((s, body["top"].as_u64()), (200, Some(7)), "{body}");
    let (s, _) = post(
        &addr,
        "/api/boards/c/scores",
        &json!({"player": "z", "score": 3}),
    )
    .await;
    assert_eq!(s, 200, "a board over the lowered cap keeps taking scores");
    let (s, body) = post(
        &addr,
        "/api/boards/f/scores",
        &json!({"player": "x", "score": 1}),
    )
    .await;
    assert_eq!((s, code(&body)), (503, "too_many_boards"), "{body}");
    watch_board(&addr, "c").await;
}

fn scores_of(body: &Value) -> Vec<(String, f64)> {
    let mut v: Vec<(String, f64)> = body["entries"]
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
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn players(names: &[&str], score: i64) -> Value {
    Value::Array(
        names
            .iter()
            .map(|p| json!({"player": p, "score": score}))
            .collect(),
    )
}

/// The node-wide cap and a `[[board]]` table's own; a batch that would add players past the
/// cap is refused whole, even its updates of players already there; a full board keeps
/// taking its players' scores; a restart with a lower cap keeps the board as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_players_refuses_the_whole_batch_and_keeps_the_board() {
    let dir = tempfile::tempdir().unwrap();
    let settings = dir.path().join("crier.toml");
    let data = dir.path().join("data");
    std::fs::write(
        &settings,
        "max_players_per_board = 4\n\n[[board]]\npattern = \"big*\"\nmax_players_per_board = 6\n",
    )
    .unwrap();
    let flags = ["--config", settings.to_str().unwrap()];
    let (proc, addr) = serve_binary(&data, "127.0.0.1:0", &flags);

    let (s, _) = post(
        &addr,
        "/api/boards/small/scores",
        &players(&["p1", "p2", "p3"], 10),
    )
    .await;
    assert_eq!(s, 200);
    let (_, before) = get(&addr, "/api/boards/small").await;
    // p1's update and two new players: 5 players, one too many.
    let batch = json!([
        {"player": "p1", "score": 99},
        {"player": "p4", "score": 1},
        {"player": "p5", "score": 1}
    ]);
    let (s, body) = post(&addr, "/api/boards/small/scores", &batch).await;
    assert_eq!((s, code(&body)), (409, "too_many_players"), "{body}");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("max_players_per_board") && msg.contains('4'),
        "{msg}"
    );
    let (_, after) = get(&addr, "/api/boards/small").await;
    // Scores only: `version` numbers the node's published snapshots, and the update loop
    // may publish the first batch's snapshot between the two reads (seen under load).
    assert_eq!(scores_of(&after), scores_of(&before), "nothing was applied");

    let (s, _) = post(
        &addr,
        "/api/boards/small/scores",
        &json!([{"player": "p1", "score": 99}, {"player": "p4", "score": 1}]),
    )
    .await;
    assert_eq!(s, 200, "exactly at the cap");
    let (s, body) = post(&addr, "/api/boards/small/scores", &players(&["p5"], 1)).await;
    assert_eq!((s, code(&body)), (409, "too_many_players"), "{body}");
    let (s, _) = post(
        &addr,
        "/api/boards/small/scores",
        &players(&["p2", "p3"], 50),
    )
    .await;
    assert_eq!(s, 200, "a full board takes its own players' scores");

    let six = ["q1", "q2", "q3", "q4", "q5", "q6"];
    let (s, body) = post(&addr, "/api/boards/big/scores", &players(&six, 1)).await;
    assert_eq!(s, 200, "the [[board]] table's own cap: {body}");
    let (s, body) = post(&addr, "/api/boards/big/scores", &players(&["q7"], 1)).await;
    assert_eq!((s, code(&body)), (409, "too_many_players"), "{body}");
    // A new board whose first batch is over the cap is not created.
    let (s, body) = post(
        &addr,
        "/api/boards/fresh/scores",
        &players(&["a", "b", "c", "d", "e"], 1),
    )
    .await;
    assert_eq!((s, code(&body)), (409, "too_many_players"), "{body}");
    let (s, _) = get(&addr, "/api/boards/fresh").await;
    assert_eq!(s, 404);
    let (_, small) = get(&addr, "/api/boards/small").await;
    drop(proc);

    std::fs::write(&settings, "max_players_per_board = 2\n").unwrap();
    let (_proc, addr) = serve_binary(&data, "127.0.0.1:0", &flags);
    let (s, body) = get(&addr, "/api/boards/small").await;
    assert_eq!(s, 200);
    assert_eq!(
        scores_of(&body),
        scores_of(&small),
        "kept whole and readable"
    );
    assert_eq!(body["players"], 4);
    let (s, body) = post(&addr, "/api/boards/small/scores", &players(&["p9"], 1)).await;
    assert_eq!((s, code(&body)), (409, "too_many_players"), "{body}");
    let (s, body) = post(&addr, "/api/boards/small/scores", &players(&["p2"], 70)).await;
    assert_eq!(s, 200, "{body}");
    let (s, body) = post(&addr, "/api/boards/big/scores", &players(&["q1"], 9)).await;
    assert_eq!(s, 200, "{body}");
}

/// Concurrent posts of new players to one board share group commits (the pending view):
/// exactly the cap's worth are acknowledged, and the board holds exactly those.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_new_players_stop_exactly_at_the_cap() {
    let dir = tempfile::tempdir().unwrap();
    let (_proc, addr) = serve_binary(
        dir.path(),
        "127.0.0.1:0",
        &["--max-players-per-board", "50"],
    );
    let mut tasks = JoinSet::new();
    for t in 0..8 {
        let addr = addr.clone();
        tasks.spawn(async move {
            let mut acked = Vec::new();
            for i in 0..20 {
                let p = format!("t{t}-{i}");
                let (s, body) = post(&addr, "/api/boards/race/scores", &players(&[&p], 1)).await;
                match s {
                    200 => acked.push(p),
                    409 => assert_eq!(code(&body), "too_many_players", "{body}"),
                    _ => panic!("{s}: {body}"),
                }
            }
            acked
        });
    }
    let mut acked = BTreeSet::new();
    while let Some(r) = tasks.join_next().await {
        acked.extend(r.unwrap());
    }
    assert_eq!(acked.len(), 50);
    let (_, body) = get(&addr, "/api/boards/race?limit=1000").await;
    let shown: BTreeSet<String> = scores_of(&body).into_iter().map(|(p, _)| p).collect();
    assert_eq!(shown, acked);
}

/// Follows `next_cursor` from the first page; returns every name in the order received.
async fn all_pages(addr: &str, limit: Option<usize>) -> Vec<String> {
    let mut names = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10_000 {
        let mut q = Vec::new();
        if let Some(l) = limit {
            q.push(format!("limit={l}"));
        }
        if let Some(c) = &cursor {
            q.push(format!("cursor={c}"));
        }
        let (s, body) = get(addr, &format!("/api/boards?{}", q.join("&"))).await;
        assert_eq!(s, 200, "{body}");
        let page = body["boards"].as_array().unwrap();
        assert!(
            page.len() <= limit.unwrap_or(100).min(1000),
            "{}",
            page.len()
        );
        names.extend(page.iter().map(|b| b["name"].as_str().unwrap().to_string()));
        match body["next_cursor"].as_str() {
            Some(c) => {
                assert!(!page.is_empty(), "a page that says more follows has boards");
                cursor = Some(c.to_string());
            }
            None => {
                assert!(body.get("next_cursor").is_none(), "{body}");
                return names;
            }
        }
    }
    panic!("paging did not end");
}

/// Paging visits every board exactly once, in name order, whatever the page size, also
/// while boards are being created; the defaults and the bounds of `limit` and `cursor`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paging_returns_every_board_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let (_proc, addr) = serve_binary(dir.path(), "127.0.0.1:0", &[]);
    let names = board_names(230);
    create_boards(&addr, names.clone()).await;

    for limit in [None, Some(1), Some(7), Some(100), Some(229), Some(5000)] {
        assert_eq!(all_pages(&addr, limit).await, names, "limit {limit:?}");
    }
    let (_, first) = get(&addr, "/api/boards").await;
    assert_eq!(
        first["boards"].as_array().unwrap().len(),
        100,
        "default limit"
    );
    assert_eq!(first["next_cursor"], "b0099");
    let (_, body) = get(&addr, "/api/boards?limit=0").await;
    assert_eq!(
        body["boards"].as_array().unwrap().len(),
        1,
        "limit at least 1"
    );
    let (_, body) = get(&addr, "/api/boards?cursor=b0228").await;
    assert_eq!(body["boards"][0]["name"], "b0229");
    assert!(body.get("next_cursor").is_none(), "the last page: {body}");
    let (_, body) = get(&addr, "/api/boards?cursor=b0229").await;
    assert_eq!(body, json!({"boards": []}));
    // A cursor need not be a board that exists: the page starts after it.
    let (_, body) = get(&addr, "/api/boards?limit=2&cursor=b0100x").await;
    assert_eq!(body["boards"][0]["name"], "b0101");
    for bad in ["cursor=", "cursor=a%2Fb", "limit=-1", "limit=x"] {
        let (s, body) = get(&addr, &format!("/api/boards?{bad}")).await;
        assert_eq!(s, 400, "{bad}: {body}");
        assert!(
            ["bad_query", "bad_request"].contains(&code(&body)),
            "{bad}: {body}"
        );
    }

    // Boards created while a reader pages: each board that existed before is seen exactly
    // once, and nothing twice.
    let writer = {
        let addr = addr.clone();
        tokio::spawn(async move {
            create_boards(&addr, (0..200).map(|i| format!("c{i:04}")).collect()).await;
            create_boards(&addr, (0..50).map(|i| format!("a{i:04}")).collect()).await;
        })
    };
    let seen = all_pages(&addr, Some(9)).await;
    writer.await.unwrap();
    let unique: BTreeSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no board twice");
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "in name order");
    for n in &names {
        assert!(unique.contains(n), "{n} missing");
    }
}

/// Under `--redis` every node mirrors every board and keeps its `board:*` topics on a
/// node-local memory broker: the same hole (boards past `max_topics` got no live updates
/// and no watchers), and the same budget. `max_boards` counts the boards in Redis, so it
/// holds for all nodes together; `max_players_per_board` is checked in the script that
/// applies the batch, so a refused batch changes nothing on any node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_redis_boards_keep_their_own_budget_on_every_node() {
    crate::need_redis!();
    let redis = crate::common::redis::RedisServer::start();
    let url = redis.url();
    let flags = [
        "--redis",
        &url,
        "--max-topics",
        "1000",
        "--max-boards",
        "1101",
        "--max-players-per-board",
        "3",
    ];
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (_a, addr_a) = serve_binary(dir_a.path(), "127.0.0.1:0", &flags);
    let (b, addr_b) = serve_binary(dir_b.path(), "127.0.0.1:0", &flags);
    let mut healthy = ws(&addr_b, "news").await;

    create_boards(&addr_a, board_names(1100)).await;
    for addr in [&addr_a, &addr_b] {
        wait_metric(addr, "crier_board_updates_total", 1100.0).await;
        watch_board(addr, "b1099").await;
        publish_fresh(addr, "fresh", 20).await;
    }
    let (s, _) = post(&addr_a, "/api/publish/news", &json!({"n": 1})).await;
    assert_eq!(s, 200);
    assert_eq!(
        within("the healthy subscriber", next_data(&mut healthy)).await["n"],
        1
    );

    // The 1,101st board through node B, then none more through either node.
    let (s, body) = post(&addr_b, "/api/boards/last", &json!({})).await;
    assert_eq!(s, 200, "{body}");
    for addr in [&addr_a, &addr_b] {
        let (s, body) = post(addr, "/api/boards/more/scores", &players(&["x"], 1)).await;
        assert_eq!((s, code(&body)), (503, "too_many_boards"), "{body}");
        let (s, body) = post(addr, "/api/boards/more", &json!({})).await;
        assert_eq!((s, code(&body)), (503, "too_many_boards"), "{body}");
    }
    let (s, _) = get(&addr_b, "/api/boards/more").await;
    assert_eq!(s, 404);

    // Players: b0007 holds "p"; two more fit, a batch with three more is refused whole.
    let (s, _) = post(
        &addr_a,
        "/api/boards/b0007/scores",
        &players(&["q", "r"], 5),
    )
    .await;
    assert_eq!(s, 200);
    let (_, before) = get(&addr_b, "/api/boards/b0007").await;
    let batch = json!([{"player": "q", "score": 50}, {"player": "s", "score": 1}]);
    for addr in [&addr_a, &addr_b] {
        let (s, body) = post(addr, "/api/boards/b0007/scores", &batch).await;
        assert_eq!((s, code(&body)), (409, "too_many_players"), "{body}");
    }
    for addr in [&addr_a, &addr_b] {
        let (_, after) = get(addr, "/api/boards/b0007").await;
        assert_eq!(scores_of(&after), scores_of(&before), "nothing applied");
    }
    let (s, _) = post(&addr_b, "/api/boards/b0007/scores", &players(&["q"], 50)).await;
    assert_eq!(s, 200, "a full board takes its players' scores");

    // A node restarted mirrors every board again, with the same budget.
    drop(healthy);
    drop(b);
    let (_b, addr_b) = serve_binary(dir_b.path(), "127.0.0.1:0", &flags);
    wait_metric(&addr_b, "crier_board_updates_total", 1101.0).await;
    watch_board(&addr_b, "last").await;
    publish_fresh(&addr_b, "again", 20).await;
}
