//! Following one player live (issue 19): `board:{board}@{player}` pushes that player's
//! entry and up to 5 neighbours above and below when they change, over WebSocket and SSE;
//! a change outside the window sends nothing to its follower.

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

fn players(w: &Value) -> Vec<&str> {
    w["around"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["player"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn a_follower_gets_the_window_and_only_the_changes_that_touch_it() {
    let srv = TestServer::start(|c| c.board_update_interval = Duration::from_millis(10)).await;
    // p00..p39 with scores 3900..0: p00 first.
    let seed: Vec<Value> = (0..40)
        .map(|i| json!({"player": format!("p{i:02}"), "score": (39 - i) * 100}))
        .collect();
    scores(&srv, "arena", json!(seed)).await;
    let mut ws = srv.ws("?topic=board:arena@p20").await;
    let w = next_data(&mut ws).await;
    assert_eq!(w["player"], "p20");
    assert_eq!(w["entry"]["rank"], 21);
    assert_eq!(w["players"], 40);
    assert_eq!(
        players(&w),
        (15..=25).map(|i| format!("p{i:02}")).collect::<Vec<_>>()
    );

    // Outside the window (ranks 1-2 swap): nothing for p20. Then p30 jumps to rank 1: every
    // rank from 1 to 30 shifts, p20 moves to 22 and its window changes.
    scores(&srv, "arena", json!({"player": "p01", "score": 5000})).await;
    scores(&srv, "arena", json!({"player": "p30", "score": 9000})).await;
    let w = next_data(&mut ws).await;
    assert_eq!(w["entry"]["rank"], 22, "{w}");
    assert_eq!(w["around"][0]["player"], "p15");

    // Over SSE, with the same data; a player with no score yet gets `entry: null`.
    let mut sse = Sse::connect(srv.addr, "?topic=board:arena@newbie").await;
    let (_, first) = within("the SSE window", sse.next_event()).await.unwrap();
    let first = first.get("data").cloned().unwrap_or(first);
    assert_eq!(
        (first["player"].as_str(), first["entry"].is_null()),
        (Some("newbie"), true),
        "{first}"
    );
    scores(&srv, "arena", json!({"player": "newbie", "score": 3850})).await;
    let (_, got) = within("newbie's entry", sse.next_event()).await.unwrap();
    let got = got.get("data").cloned().unwrap_or(got);
    assert_eq!(got["entry"]["rank"], 4, "{got}");
    // And p20's follower hears of it too (one rank down).
    let w = next_data(&mut ws).await;
    assert_eq!(w["entry"]["rank"], 23, "{w}");
}

/// Under `--redis`, a follower on one node sees the window move with scores posted
/// through another.
#[tokio::test]
async fn under_redis_a_follower_on_another_node_sees_its_window_move() {
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
        json!([{"player": "ann", "score": 10}, {"player": "bob", "score": 5}]),
    )
    .await;
    let mut ws = b.ws("?topic=board:cup@bob").await;
    let w = within("bob's first window", async {
        loop {
            let w = next_data(&mut ws).await;
            if w["entry"]["rank"] == 2 {
                return w;
            }
        }
    })
    .await;
    assert_eq!(players(&w), ["ann", "bob"]);
    scores(&a, "cup", json!({"player": "bob", "score": 50})).await;
    let w = next_data(&mut ws).await;
    assert_eq!(
        (w["entry"]["rank"].as_u64(), players(&w)),
        (Some(1), vec!["bob", "ann"]),
        "{w}"
    );
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

/// `follow_own_only`: on `arena*`, `board:arena@p42` takes only a token whose `sub` is
/// p42 (WS upgrade, WS subscribe, SSE); the board's own top-N and boards
/// the table does not match stay open. p42's follower keeps its windows throughout.
#[tokio::test]
async fn follow_own_only_lets_a_player_follow_only_their_own_entry() {
    let srv = TestServer::start(|c| {
        c.board_update_interval = Duration::from_millis(10);
        c.jwt_secret = SECRET.into();
        c.board_policies = vec![crier::config::BoardPolicyConfig {
            pattern: "arena*".into(),
            follow_own_only: true,
            ..Default::default()
        }];
    })
    .await;
    let seed: Vec<Value> = (0..20)
        .map(|i| json!({"player": format!("p{}", 30 + i), "score": 100 + i}))
        .collect();
    scores(&srv, "arena", json!(seed)).await;
    scores(&srv, "open", json!(seed)).await;
    let mine = auth::mint(SECRET, "p42", &[], 60);
    let other = auth::mint(SECRET, "p7", &[], 60);

    // The healthy follower: p42 with its own token.
    let mut healthy = srv
        .ws(&format!("?topic=board:arena@p42&token={mine}"))
        .await;
    let w = next_data(&mut healthy).await;
    assert_eq!(
        (w["player"].as_str(), &w["entry"]["rank"]),
        (Some("p42"), &json!(8))
    );

    // Attacks: no token, another player's token, over WS and SSE.
    let q = "?topic=board:arena@p42";
    assert_eq!(
        refused_upgrade(&srv, q).await,
        (401, "token_required".into())
    );
    assert_eq!(
        refused_upgrade(&srv, &format!("{q}&token={other}")).await,
        (403, "topic_forbidden".into())
    );
    let (s, b) = srv.get(&format!("/sse{q}&token={other}")).await;
    assert_eq!((s, code(&b)), (403, "topic_forbidden"), "{b}");
    let (s, b) = srv.get(&format!("/sse{q}")).await;
    assert_eq!((s, code(&b)), (401, "token_required"), "{b}");
    // A subscribe command on an open connection holding p7's token.
    let mut attacker = srv.ws(&format!("?topic=board:arena&token={other}")).await;
    assert_eq!(next_json(&mut attacker).await["op"], "subscribed");
    send_json(
        &mut attacker,
        r#"{"op":"subscribe","topic":"board:arena@p42","id":9}"#,
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
        (&json!("topic_forbidden"), &json!(9)),
        "{m}"
    );
    // p7 may follow itself, and anyone may follow on a board the table does not match.
    let m = topic_command(&mut attacker, "subscribe", "board:arena@p7").await;
    assert_eq!(m["op"], "subscribed", "{m}");
    let mut anyone = srv.ws("?topic=board:open@p42").await;
    assert_eq!(next_data(&mut anyone).await["entry"]["rank"], 8);

    // A connection is one `sub` for its life (`refresh` keeps it), so a follow allowed
    // once stays allowed; nothing to re-check on refresh.

    // The healthy follower still sees its window move.
    scores(&srv, "arena", json!({"player": "p42", "score": 1000})).await;
    let w = next_data(&mut healthy).await;
    assert_eq!(w["entry"]["rank"], 1, "{w}");
}
