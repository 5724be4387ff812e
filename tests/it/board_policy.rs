//! Board policies (`[[board]]`) over real sockets: score bounds (a batch is all or
//! nothing), the per-player rate with its `Retry-After`, `scoped_keys_only`, a healthy
//! client unaffected by a refused flood, and the real binary reading both tables.

use std::time::{Duration, Instant};

use crate::common::*;
use crier::config::{BoardPolicyConfig, Config, KeyConfig};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const FLAT: &str = "flat-publisher-key";
const ARENA: &str = "arena-server-0123456789";

fn policy(pattern: &str, f: impl FnOnce(&mut BoardPolicyConfig)) -> BoardPolicyConfig {
    let mut c = BoardPolicyConfig {
        pattern: pattern.into(),
        ..BoardPolicyConfig::default()
    };
    f(&mut c);
    c
}

struct Reply {
    status: u16,
    retry_after: Option<u64>,
    body: Value,
}

/// One POST over a fresh connection, keeping the headers (`Retry-After`).
async fn post(srv: &TestServer, path: &str, body: &str, key: Option<&str>) -> Reply {
    let mut s = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    let auth = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n{auth}Connection: close\r\n\r\n{body}",
        srv.addr,
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    within("the reply", s.read_to_end(&mut raw)).await.unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("a full response");
    let status = head[9..12].parse().unwrap();
    let retry_after = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("retry-after")
            .then(|| v.trim().parse().unwrap())
    });
    Reply {
        status,
        retry_after,
        body: serde_json::from_str(body).unwrap_or(Value::Null),
    }
}

async fn scores(srv: &TestServer, board: &str, body: Value, key: Option<&str>) -> Reply {
    post(
        srv,
        &format!("/api/boards/{board}/scores"),
        &body.to_string(),
        key,
    )
    .await
}

fn code(r: &Reply) -> &str {
    crate::common::http::code(&r.body)
}

fn message(r: &Reply) -> &str {
    r.body["error"]["message"].as_str().unwrap_or("")
}

#[tokio::test]
async fn bounds_refuse_the_whole_batch() {
    let srv = TestServer::start(|c| {
        c.board_policies = vec![policy("arena*", |p| {
            p.min_score = Some(0.0);
            p.max_score = Some(1_000_000.0);
        })];
    })
    .await;
    let r = scores(
        &srv,
        "arena",
        json!([{"player":"alice","score":10},{"player":"bob","score":5000000}]),
        None,
    )
    .await;
    assert_eq!(
        (r.status, code(&r)),
        (400, "score_out_of_bounds"),
        "{}",
        r.body
    );
    assert!(
        message(&r).starts_with(
            "board policy \"arena*\": score 5000000 of player \"bob\" is above max_score 1000000"
        ),
        "{}",
        r.body
    );
    let (s, _) = srv.get("/api/boards/arena").await;
    assert_eq!(
        s, 404,
        "nothing applied: not even alice's score created the board"
    );
    let r = scores(&srv, "arena", json!({"player":"alice","score":-1}), None).await;
    assert_eq!(r.status, 400);
    assert!(message(&r).contains("below min_score 0"), "{}", r.body);
    let r = scores(
        &srv,
        "arena",
        json!({"player":"alice","score":1000000}),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "the bound itself is allowed: {}", r.body);
    // Boards the pattern does not match have no policy.
    let r = scores(&srv, "other", json!({"player":"bob","score":5000000}), None).await;
    assert_eq!(r.status, 200, "{}", r.body);

    // Increment boards: each delta and the total it makes.
    let r = post(
        &srv,
        "/api/boards/arena-inc",
        r#"{"mode":"increment"}"#,
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = scores(
        &srv,
        "arena-inc",
        json!({"player":"al","score":600000}),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = scores(
        &srv,
        "arena-inc",
        json!([{"player":"bo","score":1},{"player":"al","score":600000}]),
        None,
    )
    .await;
    assert_eq!(
        (r.status, code(&r)),
        (400, "score_out_of_bounds"),
        "{}",
        r.body
    );
    assert!(
        message(&r).contains("total 1200000 of player \"al\" is above max_score"),
        "{}",
        r.body
    );
    let r = scores(&srv, "arena-inc", json!({"player":"al","score":-1}), None).await;
    assert_eq!(
        r.status, 400,
        "a negative delta is below min_score: {}",
        r.body
    );
    let (_, page) = srv.get("/api/boards/arena-inc").await;
    assert_eq!(page["players"], 1, "bo was not applied: {page}");
    assert_eq!(page["entries"][0]["score"], 600000, "{page}");
    srv.shutdown().await;
}

#[tokio::test]
async fn scoped_keys_only_takes_a_key_whose_scope_names_the_board() {
    let srv = TestServer::start(|c: &mut Config| {
        c.publisher_keys = vec![FLAT.into()];
        c.keys = vec![KeyConfig {
            name: "arena-server".into(),
            secret: ARENA.into(),
            boards: vec!["arena*".into()],
            ..KeyConfig::default()
        }];
        c.board_policies = vec![policy("arena*", |p| p.scoped_keys_only = true)];
    })
    .await;
    let one = json!({"player":"alice","score":1});
    let r = scores(&srv, "arena", one.clone(), Some(FLAT)).await;
    assert_eq!(
        (r.status, code(&r)),
        (403, "scoped_key_required"),
        "{}",
        r.body
    );
    assert!(
        message(&r).starts_with("board policy \"arena*\": only a [[key]]"),
        "{}",
        r.body
    );
    let r = scores(&srv, "arena", one.clone(), None).await;
    assert_eq!((r.status, code(&r)), (401, "unauthorized"));
    let r = scores(&srv, "arena", one.clone(), Some(ARENA)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    // The flat key still configures and resets it; only posting is limited.
    let r = post(&srv, "/api/boards/arena/reset", "{}", Some(FLAT)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    srv.shutdown().await;

    // Open posting (no keys at all) is not a scoped key either.
    let srv = TestServer::start(|c| {
        c.board_policies = vec![policy("arena*", |p| p.scoped_keys_only = true)];
    })
    .await;
    let r = scores(&srv, "arena", one.clone(), None).await;
    assert_eq!(
        (r.status, code(&r)),
        (403, "scoped_key_required"),
        "{}",
        r.body
    );
    assert!(message(&r).contains("no key"), "{}", r.body);
    let r = scores(&srv, "elsewhere", one, None).await;
    assert_eq!(r.status, 200);
    srv.shutdown().await;
}

/// The window is a minute, so this test waits one out; while it does, a flood of refused
/// posts runs beside a healthy publisher and subscriber, which must notice nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_window_refuses_then_lets_through_and_a_flood_hurts_nobody() {
    let srv = TestServer::start(|c| {
        c.board_policies = vec![policy("quick", |p| p.max_submissions_per_minute = Some(2))];
    })
    .await;
    let alice = json!({"player":"alice","score":1});
    // A batch refused by validation counts nothing.
    let r = scores(
        &srv,
        "quick",
        json!([{"player":"alice","score":1},{"player":"","score":1}]),
        None,
    )
    .await;
    assert_eq!((r.status, code(&r)), (400, "invalid_score"), "{}", r.body);
    let first = Instant::now();
    for _ in 0..2 {
        let r = scores(&srv, "quick", alice.clone(), None).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let r = scores(&srv, "quick", alice.clone(), None).await;
    assert_eq!(
        (r.status, code(&r)),
        (429, "too_many_submissions"),
        "{}",
        r.body
    );
    assert!(
        message(&r).starts_with("board policy \"quick\": player \"alice\" has 2 accepted"),
        "{}",
        r.body
    );
    let wait = r.retry_after.expect("Retry-After");
    assert!((1..=61).contains(&wait), "{wait}");
    // Another player, and a batch holding more than the limit for one player.
    let r = scores(&srv, "quick", json!({"player":"bob","score":1}), None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = scores(
        &srv,
        "quick",
        json!([{"player":"cat","score":1},{"player":"cat","score":2},{"player":"cat","score":3}]),
        None,
    )
    .await;
    assert_eq!(r.status, 429, "{}", r.body);

    // The flood: alice over and over, every post refused, while a subscriber hears every
    // publication of a healthy publisher.
    let mut ws = srv.ws("?topic=news").await;
    let reply = next_json(&mut ws).await;
    assert_eq!(reply["op"], "subscribed", "{reply}");
    let flood = {
        let addr = srv.addr;
        tokio::spawn(async move {
            let mut refused = 0;
            for _ in 0..200 {
                let (s, _) = crier::http_client::HttpClient::new(None)
                    .post(
                        &format!("http://{addr}/api/boards/quick/scores"),
                        r#"{"player":"alice","score":1}"#,
                    )
                    .await
                    .unwrap();
                if s.as_u16() == 429 {
                    refused += 1;
                }
            }
            refused
        })
    };
    for i in 0..50 {
        let (s, b) = srv.publish("news", &format!("{{\"i\":{i}}}")).await;
        assert_eq!(s, 200, "{b}");
        let m = next_json(&mut ws).await;
        assert_eq!(m["data"]["i"], i, "{m}");
    }
    assert_eq!(flood.await.unwrap(), 200, "every flooding post was refused");
    let (_, page) = srv.get("/api/boards/quick/players/alice").await;
    assert_eq!(page["entry"]["score"], 1, "{page}");
    assert!(srv.state().board_policies.tracked() <= 3);

    // Once the window has passed, alice posts again: the policy clock is moved, not waited
    // for (the window's arithmetic is unit-tested in src/leaderboard/policy.rs). Within the
    // minute she is still refused; a minute and a second later she is let through.
    let policies = &srv.state().board_policies;
    let elapsed = first.elapsed().as_secs();
    policies.skip_ahead(Duration::from_secs(55u64.saturating_sub(elapsed)));
    let r = scores(&srv, "quick", alice.clone(), None).await;
    assert_eq!(r.status, 429, "still inside the minute: {}", r.body);
    let wait = r.retry_after.expect("Retry-After");
    assert!((1..=8).contains(&wait), "{wait}");
    policies.skip_ahead(Duration::from_secs(wait));
    let r = scores(&srv, "quick", alice.clone(), None).await;
    assert_eq!(r.status, 200, "after Retry-After: {}", r.body);
    drop(ws);
    srv.shutdown().await;
}

#[tokio::test]
async fn the_binary_reads_key_and_board_tables() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crier.toml");
    std::fs::write(
        &path,
        format!(
            r#"
publisher_keys = ["{FLAT}"]

[[key]]
name = "arena-server"
secret = "{ARENA}"
publish = ["game:*"]
boards = ["arena*"]

[[board]]
pattern = "arena*"
min_score = 0
max_score = 1000
max_submissions_per_minute = 1
scoped_keys_only = true
"#
        ),
    )
    .unwrap();
    let data = dir.path().join("data");
    let (_proc, addr) = serve_binary(&data, "127.0.0.1:0", &["--config", path.to_str().unwrap()]);
    let client = |k: &str| crier::http_client::HttpClient::new(Some(k.into()));
    let url = |p: &str| format!("http://{addr}{p}");
    let status_code = |r: (hyper::StatusCode, bytes::Bytes)| {
        let v: Value = serde_json::from_slice(&r.1).unwrap_or(Value::Null);
        (
            r.0.as_u16(),
            v["error"]["code"].as_str().unwrap_or("").to_string(),
        )
    };
    let post = |k: &str, p: &str, b: &str| {
        let (c, u, b) = (client(k), url(p), b.to_string());
        async move { status_code(c.post(&u, b).await.unwrap()) }
    };
    assert_eq!(post(ARENA, "/api/publish/game:1", "1").await.0, 200);
    assert_eq!(
        post(ARENA, "/api/publish/chat", "1").await,
        (403, "no_publish_scope".into())
    );
    let alice = r#"{"player":"alice","score":5}"#;
    assert_eq!(
        post(FLAT, "/api/boards/arena/scores", alice).await,
        (403, "scoped_key_required".into())
    );
    assert_eq!(
        post(
            ARENA,
            "/api/boards/arena/scores",
            r#"{"player":"alice","score":5000}"#
        )
        .await,
        (400, "score_out_of_bounds".into())
    );
    assert_eq!(post(ARENA, "/api/boards/arena/scores", alice).await.0, 200);
    assert_eq!(
        post(ARENA, "/api/boards/arena/scores", alice).await,
        (429, "too_many_submissions".into())
    );
    assert_eq!(
        post(ARENA, "/api/boards/arena/reset", "{}").await,
        (403, "no_reset_scope".into())
    );
    let metrics = client(ARENA).get(&url("/metrics")).await.unwrap();
    assert_eq!(status_code(metrics), (403, "no_admin_scope".into()));
    let metrics = client(FLAT).get(&url("/metrics")).await.unwrap();
    assert_eq!(metrics.0.as_u16(), 200);
}

#[test]
fn bad_board_tables_are_refused_naming_the_problem() {
    for (toml, expect) in [
        (
            "[[board]]\npattern = \"a\"\nmin_score = 5\nmax_score = 1\n",
            "min_score 5 is above max_score 1",
        ),
        (
            "[[board]]\npattern = \"a\"\nmax_submissions_per_minute = 0\n",
            "max_submissions_per_minute must be 1-10000",
        ),
        (
            "[[board]]\npattern = \"a\"\nmax_players_per_board = 0\n",
            "max_players_per_board must be at least 1",
        ),
        ("[[board]]\npattern = \"a:b\"\n", "must be a board name"),
        (
            "[[board]]\npattern = \"a\"\nmax = 1\n",
            "unknown field `max`",
        ),
        ("[[board]]\nmin_score = 1\n", "missing field `pattern`"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("crier.toml");
        std::fs::write(&path, toml).unwrap();
        let e = crier::server::resolve_config(&crier::config::ServeArgs {
            config: Some(path),
            ..Default::default()
        })
        .unwrap_err();
        let e = format!("{e:#}");
        assert!(e.contains(expect), "{toml}: {e}");
    }
}

/// Under `--redis` the policy holds on every node: bounds (an increment total included,
/// read from the shared ranking) and the rate, which each node counts for itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_hold_on_redis_nodes_and_each_node_counts_its_own_rate() {
    crate::need_redis!();
    let redis = crate::common::redis::RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crier.toml");
    std::fs::write(
        &path,
        "[[board]]\npattern = \"arena*\"\nmin_score = 0\nmax_score = 1000\n\
         max_submissions_per_minute = 1\n",
    )
    .unwrap();
    let node = |name: &str| {
        serve_binary(
            &dir.path().join(name),
            "127.0.0.1:0",
            &["--redis", &redis.url(), "--config", path.to_str().unwrap()],
        )
    };
    let (_a, a) = node("a");
    let (_b, b) = node("b");
    let http = crier::http_client::HttpClient::new(None);
    let post = |addr: &str, p: &str, body: &str| {
        let (http, url, body) = (http.clone(), format!("http://{addr}{p}"), body.to_string());
        async move {
            let (s, bytes) = http.post(&url, body).await.unwrap();
            let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            (s.as_u16(), v)
        }
    };
    let (s, v) = post(
        &a,
        "/api/boards/arena/scores",
        r#"{"player":"al","score":2000}"#,
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (400, Some("score_out_of_bounds")),
        "{v}"
    );
    let (s, v) = post(
        &a,
        "/api/boards/arena/scores",
        r#"{"player":"al","score":10}"#,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = post(
        &a,
        "/api/boards/arena/scores",
        r#"{"player":"al","score":11}"#,
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (429, Some("too_many_submissions")),
        "{v}"
    );
    // Node b has counted nothing for al: per node, as documented.
    let (s, v) = post(
        &b,
        "/api/boards/arena/scores",
        r#"{"player":"al","score":12}"#,
    )
    .await;
    assert_eq!(s, 200, "{v}");

    // An increment board: a total over max_score is refused on the other node too.
    let (s, v) = post(&a, "/api/boards/arena-inc", r#"{"mode":"increment"}"#).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = post(
        &a,
        "/api/boards/arena-inc/scores",
        r#"{"player":"bo","score":600}"#,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let url = format!("http://{b}/api/boards/arena-inc/players/bo");
    let mut seen = false;
    let deadline = Instant::now() + WAIT;
    while !seen && Instant::now() < deadline {
        let (s, bytes) = http.get(&url).await.unwrap();
        let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        seen = s == 200 && v["entry"]["score"] == 600;
        if !seen {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert!(seen, "node b sees bo's score");
    let (s, v) = post(
        &b,
        "/api/boards/arena-inc/scores",
        r#"{"player":"bo","score":600}"#,
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (400, Some("score_out_of_bounds")),
        "{v}"
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("total 1200"),
        "{v}"
    );
}
