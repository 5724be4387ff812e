//! `POST /api/publish` with a batch (issue 17, "Also"): each item gets its own receipt or
//! error, in order; items reach subscribers like single publishes; idempotency per item;
//! each item bounded by `max_message_bytes` and the body by its budget; a scoped key
//! refuses only the items outside its scope. A healthy subscriber keeps receiving.

use crier::config::{Config, KeyConfig};
use serde_json::{json, Value};

use crate::common::*;

#[tokio::test]
async fn each_item_gets_its_receipt_or_error_in_order() {
    let srv = TestServer::start(|c| c.max_message_bytes = 1024).await;
    let mut ws = srv.ws("?topic=a").await;
    assert_eq!(next_json(&mut ws).await["op"], "subscribed");
    let big = "x".repeat(2000);
    let batch = json!({"items": [
        {"topic": "a", "data": {"n": 1}},
        {"topic": "b", "data": "two"},
        {"topic": "bad topic", "data": 3},
        {"topic": "board:x", "data": 4},
        {"topic": "a", "data": big},
        {"topic": "a", "data": {"n": 2}, "idempotency_key": "k-1"},
        {"topic": "a", "data": {"n": 2}, "idempotency_key": "k-1"},
        {"topic": "a", "data": 5, "idempotency_key": ""},
    ]});
    let (status, v) = srv
        .post_with_key("/api/publish", &batch.to_string(), None)
        .await;
    assert_eq!(status, 200, "{v}");
    let r = v["results"].as_array().unwrap();
    assert_eq!(r.len(), 8, "{v}");
    assert_eq!(
        (r[0]["topic"].as_str(), r[0]["offset"].as_u64()),
        (Some("a"), Some(1))
    );
    assert_eq!(r[0]["subscribers"], 1);
    assert_eq!(
        (r[1]["topic"].as_str(), r[1]["offset"].as_u64()),
        (Some("b"), Some(1))
    );
    assert_eq!(r[2]["error"]["code"], "bad_topic", "{v}");
    assert_eq!(r[3]["error"]["code"], "reserved_topic", "{v}");
    assert_eq!(r[4]["error"]["code"], "message_too_large", "{v}");
    assert_eq!(
        (r[5]["offset"].as_u64(), &r[5]["duplicate"]),
        (Some(2), &json!(false))
    );
    // The same key again in the same batch: the first receipt, nothing published.
    assert_eq!(
        (r[6]["offset"].as_u64(), &r[6]["duplicate"]),
        (Some(2), &json!(true))
    );
    assert_eq!(r[7]["error"]["code"], "bad_idempotency_key", "{v}");
    // The subscriber got exactly the two accepted publications of "a", in order.
    let first = next_json(&mut ws).await;
    assert_eq!(
        (first["offset"].as_u64(), &first["data"]),
        (Some(1), &json!({"n": 1}))
    );
    let second = next_json(&mut ws).await;
    assert_eq!(
        (second["offset"].as_u64(), &second["data"]),
        (Some(2), &json!({"n": 2}))
    );
    // A retry of the whole batch later is safe for keyed items.
    let again = json!({"items": [{"topic": "a", "data": {"n": 2}, "idempotency_key": "k-1"}]});
    let (_, v) = srv
        .post_with_key("/api/publish", &again.to_string(), None)
        .await;
    assert_eq!(v["results"][0]["duplicate"], true, "{v}");
    let (_, h) = srv.get("/api/topics/a/history").await;
    assert_eq!(h["publications"].as_array().unwrap().len(), 2, "{h}");
    srv.shutdown().await;
}

#[tokio::test]
async fn what_is_not_a_batch_is_refused_whole_and_the_body_has_a_budget() {
    let srv = TestServer::start(|c| c.max_message_bytes = 1024).await;
    let mut ws = srv.ws("?topic=healthy").await;
    assert_eq!(next_json(&mut ws).await["op"], "subscribed");
    for (body, status, code) in [
        ("[1,2]".to_string(), 400, "bad_json"),
        // An array is not read positionally as the object.
        (r#"[[{"topic":"a","data":1}]]"#.to_string(), 400, "bad_json"),
        (r#" [{"topic":"a","data":1}]"#.to_string(), 400, "bad_json"),
        ("{\"items\":[{\"topic\":\"a\"}]}".into(), 400, "bad_json"),
        ("{\"items\":[],\"x\":1}".into(), 400, "bad_json"),
        ("{\"items\":[]}".into(), 400, "bad_body"),
        (
            json!({"items": (0..101).map(|i| json!({"topic": "a", "data": i})).collect::<Vec<_>>()})
                .to_string(),
            400,
            "bad_body",
        ),
        // Over the budget (1 MiB here): refused before it is parsed.
        (
            json!({"items": [{"topic": "a", "data": "y".repeat((1 << 20) + 10)}]}).to_string(),
            413,
            "message_too_large",
        ),
    ] {
        let (s, v) = srv.post_with_key("/api/publish", &body, None).await;
        assert_eq!((s, code_of(&v)), (status, code), "{v}");
    }
    let (_, h) = srv.get("/api/topics/a/history").await;
    assert_eq!(
        h["offset"], 0,
        "nothing of a refused batch was published: {h}"
    );
    // The healthy subscriber next to it is unaffected.
    srv.publish("healthy", r#"{"ok":true}"#).await;
    assert_eq!(next_json(&mut ws).await["data"]["ok"], true);
    srv.shutdown().await;
}

#[tokio::test]
async fn a_scoped_key_publishes_its_items_and_only_those() {
    const GAME: &str = "game-eu-secret-0123456789";
    let srv = TestServer::start(|c: &mut Config| {
        c.keys = vec![KeyConfig {
            name: "game-eu".into(),
            secret: GAME.into(),
            publish: vec!["game:*".into()],
            ..KeyConfig::default()
        }];
    })
    .await;
    let batch = json!({"items": [
        {"topic": "game:1", "data": 1},
        {"topic": "news", "data": 2},
    ]})
    .to_string();
    let (s, v) = srv.post_with_key("/api/publish", &batch, Some(GAME)).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["results"][0]["offset"], 1, "{v}");
    assert_eq!(v["results"][1]["error"]["code"], "no_publish_scope", "{v}");
    // No key, or an unknown one: the whole request is refused.
    let (s, v) = srv.post_with_key("/api/publish", &batch, None).await;
    assert_eq!((s, code_of(&v)), (401, "unauthorized"), "{v}");
    let (s, v) = srv
        .post_with_key("/api/publish", &batch, Some("nope-nope-nope-nope"))
        .await;
    assert_eq!(s, 403, "{v}");
    srv.shutdown().await;
}

fn code_of(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}
