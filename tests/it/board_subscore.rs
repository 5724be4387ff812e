//! The tie-breaking subscore (issue 19): a board option `tiebreak` (`high` / `low`) and a
//! `subscore` on posted scores; equal scores rank by subscore, then by who reached them
//! first. Durable, shown in entries and live, the same under `--redis`, and refused with
//! a clear code where it cannot apply.

use std::time::Duration;

use crate::common::http::{code, get, post};
use crate::common::*;
use crier::config::{BoardPolicyConfig, Config};
use crier::server::Server;
use serde_json::{json, Value};

async fn scores(addr: impl std::fmt::Display, board: &str, body: Value) -> (u16, Value) {
    post(addr, &format!("/api/boards/{board}/scores"), &body).await
}

/// (player, score, subscore) of a list of entries, in rank order.
fn rows(list: &Value) -> Vec<(String, f64, Option<f64>)> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["player"].as_str().unwrap().to_string(),
                e["score"].as_f64().unwrap(),
                e["subscore"].as_f64(),
            )
        })
        .collect()
}

fn row(p: &str, s: f64, u: f64) -> (String, f64, Option<f64>) {
    (p.to_string(), s, Some(u))
}

/// Equal scores: lower subscore first (`tiebreak: low`, e.g. seconds taken), a missing
/// subscore counts as 0, then whoever reached it first.
const POSTS: &str = r#"[
    {"player": "slow", "score": 100, "subscore": 50},
    {"player": "fast", "score": 100, "subscore": 20.5},
    {"player": "zero", "score": 100},
    {"player": "neg", "score": 100, "subscore": -3},
    {"player": "low", "score": 90, "subscore": -100},
    {"player": "fast2", "score": 100, "subscore": 20.5}
]"#;

fn expected() -> Vec<(String, f64, Option<f64>)> {
    vec![
        row("neg", 100.0, -3.0),
        row("zero", 100.0, 0.0),
        row("fast", 100.0, 20.5),
        row("fast2", 100.0, 20.5),
        row("slow", 100.0, 50.0),
        row("low", 90.0, -100.0),
    ]
}

#[tokio::test]
async fn equal_scores_rank_by_subscore_durably_and_live() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = || Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_path_buf(),
        board_update_interval: Duration::from_millis(10),
        board_policies: vec![BoardPolicyConfig {
            pattern: "tb-*".into(),
            tiebreak: Some("high".into()),
            ..Default::default()
        }],
        ..Config::default()
    };
    let server = Server::start(cfg()).await.unwrap();
    let addr = server.addr;
    let (s, b) = post(addr, "/api/boards/race", &json!({"tiebreak": "low"})).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["options"]["tiebreak"], "low", "{b}");
    let mut live = http::ws(addr, "?topic=board:race").await;
    let (s, b) = scores(addr, "race", serde_json::from_str(POSTS).unwrap()).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["results"][0]["rank"], 5, "{b}");
    let (_, page) = get(addr, "/api/boards/race").await;
    assert_eq!(rows(&page["entries"]), expected(), "{page}");
    assert_eq!(page["tiebreak"], "low");
    let top = within("the live top with subscores", async {
        loop {
            let d = next_data(&mut live).await;
            if d["players"] == 6 {
                return d;
            }
        }
    })
    .await;
    assert_eq!(rows(&top["top"]), expected(), "{top}");
    assert_eq!(top["tiebreak"], "low");

    // `best`: the same score with a better subscore is an improvement; a worse one is not.
    let (_, b) = scores(
        addr,
        "race",
        json!([{"player": "slow", "score": 100, "subscore": -5},
               {"player": "neg", "score": 100, "subscore": 1}]),
    )
    .await;
    assert_eq!(
        (&b["results"][0]["rank"], &b["results"][0]["changed"]),
        (&json!(1), &json!(true)),
        "{b}"
    );
    assert_eq!(b["results"][1]["changed"], false, "{b}");
    let (_, me) = get(addr, "/api/boards/race/players/slow?around=1").await;
    assert_eq!(me["entry"]["subscore"], -5, "{me}");
    assert_eq!(rows(&me["around"])[1], row("neg", 100.0, -3.0), "{me}");

    // Refusals, each with nothing applied.
    let (s, b) = scores(addr, "plain", json!({"player": "a", "score": 1})).await;
    assert_eq!(s, 200, "{b}");
    let (_, page) = get(addr, "/api/boards/plain").await;
    assert!(page["entries"][0].get("subscore").is_none(), "{page}");
    assert!(page.get("tiebreak").is_none(), "{page}");
    let (s, b) = scores(
        addr,
        "plain",
        json!([{"player": "b", "score": 1}, {"player": "c", "score": 1, "subscore": 2}]),
    )
    .await;
    assert_eq!((s, code(&b)), (400, "no_tiebreak"), "{b}");
    assert!(b["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("entry 1"));
    for bad in [json!("7"), json!(1e16), json!({}), json!([1])] {
        let (s, b) = scores(
            addr,
            "race",
            json!({"player": "x", "score": 1, "subscore": bad}),
        )
        .await;
        assert_eq!(s, 400, "{bad}: {b}");
        assert!(
            ["invalid_score", "bad_json"].contains(&code(&b)),
            "{bad}: {b}"
        );
    }
    let (_, page) = get(addr, "/api/boards/plain").await;
    assert_eq!(page["players"], 1);
    let (s, b) = post(addr, "/api/boards/race", &json!({"tiebreak": "high"})).await;
    assert_eq!((s, code(&b)), (409, "conflict"), "{b}");
    let (s, b) = post(addr, "/api/boards/race", &json!({})).await;
    assert_eq!((s, code(&b)), (409, "conflict"), "{b}");
    let (s, b) = post(addr, "/api/boards/race", &json!({"tiebreak": "middle"})).await;
    assert_eq!(s, 400, "{b}");

    // A `[[board]]` table gives boards made by their first score a tiebreak.
    let (s, b) = scores(
        addr,
        "tb-1",
        json!([{"player": "a", "score": 5, "subscore": 1}, {"player": "b", "score": 5, "subscore": 9}]),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["results"][1]["rank"], 1, "{b}");
    drop(live);
    server.shutdown().await;

    // After a restart: the same order, the same subscores, the same options.
    let server = Server::start(cfg()).await.unwrap();
    let (_, page) = get(server.addr, "/api/boards/race").await;
    let mut want = expected();
    want.retain(|r| r.0 != "slow");
    want.insert(0, row("slow", 100.0, -5.0));
    assert_eq!(rows(&page["entries"]), want, "{page}");
    assert_eq!(page["options"]["tiebreak"], "low");
    let (_, page) = get(server.addr, "/api/boards/tb-1").await;
    assert_eq!(page["entries"][0]["player"], "b", "{page}");
    server.shutdown().await;
}

/// Under `--redis` the sorted set carries the subscore: every node ranks alike, a node
/// started later loads it, and a delete finds the member.
#[tokio::test]
async fn under_redis_the_sorted_set_carries_the_subscore() {
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
    let (s, r) = post(a.addr, "/api/boards/race", &json!({"tiebreak": "low"})).await;
    assert_eq!(s, 200, "{r}");
    let (s, r) = scores(a.addr, "race", serde_json::from_str(POSTS).unwrap()).await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["results"][0]["rank"], 5, "{r}");
    assert_eq!(r["results"][2]["rank"], 2, "{r}");
    let (_, page) = a.get("/api/boards/race").await;
    assert_eq!(rows(&page["entries"]), expected(), "{page}");
    wait_until("node b's mirror holds the batch", || {
        b.state()
            .boards
            .with_board("race", |v| v.ranking.len())
            .is_ok_and(|n| n == 6)
    })
    .await;
    let (_, page) = b.get("/api/boards/race").await;
    assert_eq!(rows(&page["entries"]), expected(), "{page}");

    // `best` by subscore; a delete finds the member (subscore and all) in the sorted set.
    let (_, r) = scores(
        b.addr,
        "race",
        json!({"player": "slow", "score": 100, "subscore": -5.5}),
    )
    .await;
    assert_eq!(
        (&r["results"][0]["rank"], &r["results"][0]["changed"]),
        (&json!(1), &json!(true)),
        "{r}"
    );
    let (s, r) = crate::common::http::delete(a.addr, "/api/boards/race/players/neg", None).await;
    assert_eq!(s, 200, "{r}");
    let (_, page) = b.get("/api/boards/race").await;
    assert!(
        !rows(&page["entries"]).iter().any(|r| r.0 == "neg"),
        "{page}"
    );
    assert_eq!(page["players"], 5, "{page}");
    let (s, r) = scores(
        a.addr,
        "plain",
        json!([{"player": "b", "score": 1}, {"player": "c", "score": 1, "subscore": 2}]),
    )
    .await;
    assert_eq!((s, code(&r)), (400, "no_tiebreak"), "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("entry 1"),
        "{r}"
    );
    let (s, r) = post(a.addr, "/api/boards/race", &json!({"tiebreak": "high"})).await;
    assert_eq!((s, code(&r)), (409, "conflict"), "{r}");

    // Redis orders members by the subscore's text key, the mirror by the number: the ranks
    // the script answers (ZRANK) agree with the mirror's for subscores of every size.
    let (s, r) = post(a.addr, "/api/boards/mix", &json!({"tiebreak": "high"})).await;
    assert_eq!(s, 200, "{r}");
    let subs = [
        0.0,
        -0.0,
        1e15,
        -1e15,
        1e-300,
        -1e-300,
        5e-324,
        0.1,
        -0.1,
        0.5,
        1.0,
        1.5,
        2.0,
        -2.0,
        3.0,
        1024.0,
        1023.999,
        -1023.999,
        123456.789,
        -7.0,
        2.5e-5,
        999999999999999.9,
    ];
    let batch: Vec<Value> = subs
        .iter()
        .enumerate()
        .map(|(i, u)| json!({"player": format!("m{i:02}"), "score": 7, "subscore": u}))
        .collect();
    let (s, r) = scores(a.addr, "mix", json!(batch)).await;
    assert_eq!(s, 200, "{r}");
    let (_, page) = a.get("/api/boards/mix").await;
    for res in r["results"].as_array().unwrap() {
        let e = page["entries"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["player"] == res["player"])
            .unwrap();
        assert_eq!(e["rank"], res["rank"], "{page}\n{r}");
    }
    let got: Vec<f64> = rows(&page["entries"])
        .iter()
        .map(|r| r.2.unwrap())
        .collect();
    let mut want: Vec<f64> = subs
        .iter()
        .map(|u| if *u == 0.0 { 0.0 } else { *u })
        .collect();
    want.sort_by(|x, y| y.total_cmp(x));
    assert_eq!(got, want);

    // A node started now loads the board from Redis, subscores included.
    let c = start().await;
    let (_, page) = c.get("/api/boards/race").await;
    let mut want = expected();
    want.retain(|r| r.0 != "slow" && r.0 != "neg");
    want.insert(0, row("slow", 100.0, -5.5));
    assert_eq!(rows(&page["entries"]), want, "{page}");
}
