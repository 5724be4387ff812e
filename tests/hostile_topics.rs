//! Clients that ask for topics nobody publishes to: the topic table stays open to
//! publishers and boards, and a healthy subscriber alongside gets every publication.

mod common;

use common::*;
use serde_json::{json, Value};

const MAX_TOPICS: usize = 200;
const MAX_SUBSCRIBER_TOPICS: usize = 100;

/// Subscribes to fresh names until the server refuses; returns how many were accepted and
/// the refusal's error frame.
async fn subscribe_until_refused(ws: &mut Ws, prefix: &str) -> (usize, Value) {
    for i in 0..1000 {
        send_json(
            ws,
            &format!(r#"{{"op":"subscribe","topic":"{prefix}-{i}","id":{i}}}"#),
        )
        .await;
        let reply = next_json(ws).await;
        if reply["op"] != "subscribed" {
            return (i, reply);
        }
    }
    panic!("never refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_filling_the_topic_table_cannot_starve_publishers() {
    let srv = TestServer::start(|c| {
        c.max_topics = MAX_TOPICS;
        c.max_subscriber_topics = MAX_SUBSCRIBER_TOPICS;
        c.board_update_interval = std::time::Duration::from_millis(10);
    })
    .await;
    let hub = srv.state().hub.clone();
    let mut healthy = srv.ws("?topic=news").await;
    assert_eq!(next_json(&mut healthy).await["op"], "subscribed");
    let (s, _) = srv.publish("news", r#"{"n":0}"#).await;
    assert_eq!(s, 200);
    assert_eq!(next_json(&mut healthy).await["data"]["n"], 0);

    // Attackers: 64 fresh names each (max_topics_per_connection) until the subscribers'
    // budget is gone. Whoever is refused gets an error frame and stays connected.
    let mut attackers = Vec::new();
    let mut accepted = 0;
    let mut refusals = Vec::new();
    for a in 0..3 {
        let mut ws = srv.ws("").await;
        let (n, refusal) = subscribe_until_refused(&mut ws, &format!("junk{a}")).await;
        assert_eq!(refusal["op"], "error", "{refusal}");
        assert_eq!(refusal["code"], "too_many_topics", "{refusal}");
        accepted += n;
        refusals.push(refusal["message"].as_str().unwrap().to_string());
        attackers.push(ws);
    }
    assert_eq!(accepted, MAX_SUBSCRIBER_TOPICS);
    assert!(
        refusals[2].contains(&format!(
            "{MAX_SUBSCRIBER_TOPICS} topics that only subscribers"
        )),
        "{refusals:?}"
    );
    assert_eq!(hub.subscriber_topic_count(), MAX_SUBSCRIBER_TOPICS);
    // The attackers still work: a ping is answered.
    send_json(&mut attackers[0], r#"{"op":"ping","id":7}"#).await;
    assert_eq!(next_json(&mut attackers[0]).await["op"], "pong");

    // Publishers keep creating topics: three times the table, interleaved with the topic
    // the healthy client watches, which must receive every publication in order.
    for i in 0..(3 * MAX_TOPICS) {
        let (s, body) = srv.publish(&format!("fresh-{i}"), r#"{"x":1}"#).await;
        assert_eq!((s, body["offset"].as_u64()), (200, Some(1)), "{body}");
        if i % 10 == 0 {
            let n = i / 10 + 1;
            let (s, body) = srv.publish("news", &format!(r#"{{"n":{n}}}"#)).await;
            assert_eq!(s, 200, "{body}");
            let got = next_json(&mut healthy).await;
            assert_eq!(got["data"]["n"], n);
            assert_eq!(got["offset"].as_u64(), Some(n as u64 + 1));
        }
    }
    assert!(hub.topic_count() <= MAX_TOPICS);
    assert!(srv.state().metrics.topics_evicted.get() >= (2 * MAX_TOPICS) as u64);

    // A new board still gets its topic, and a watcher gets its retained snapshot.
    let (s, body) = srv
        .post_with_key(
            "/api/boards/arena/scores",
            &json!({"player": "ann", "score": 5}).to_string(),
            None,
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let metrics = srv.state().metrics.clone();
    wait_until("the board update is published", || {
        metrics.board_updates.get() >= 1
    })
    .await;
    let mut watcher = srv.ws("?topic=board:arena").await;
    assert_eq!(next_json(&mut watcher).await["op"], "subscribed");
    let snap = next_json(&mut watcher).await;
    assert_eq!(snap["topic"], "board:arena");
    assert_eq!(snap["data"]["top"][0]["player"], "ann");

    // A fresh name for a healthy client is refused with the documented error frame; an
    // existing (published) topic is not.
    send_json(
        &mut watcher,
        r#"{"op":"subscribe","topic":"brand-new","id":1}"#,
    )
    .await;
    let refusal = next_json(&mut watcher).await;
    assert_eq!(
        (&refusal["op"], &refusal["code"], &refusal["id"]),
        (&json!("error"), &json!("too_many_topics"), &json!(1))
    );
    send_json(&mut watcher, r#"{"op":"subscribe","topic":"news","id":2}"#).await;
    assert_eq!(next_json(&mut watcher).await["op"], "subscribed");
    // SSE asking for a fresh name gets 503 with the JSON error shape.
    let (s, body) = srv.get("/sse?topic=another-new-one").await;
    assert_eq!(s, 503);
    assert_eq!(body["error"]["code"], "too_many_topics");

    // The attackers leave: their topics go with them, nothing is left to evict later.
    drop(attackers);
    wait_until("subscriber-created topics removed", || {
        hub.subscriber_topic_count() == 0
    })
    .await;
    send_json(
        &mut watcher,
        r#"{"op":"subscribe","topic":"brand-new","id":3}"#,
    )
    .await;
    assert_eq!(next_json(&mut watcher).await["op"], "subscribed");

    let (s, _) = srv.publish("news", r#"{"n":"last"}"#).await;
    assert_eq!(s, 200);
    assert_eq!(next_json(&mut healthy).await["data"]["n"], "last");
    drop((healthy, watcher));
    srv.assert_clean().await;
    assert_eq!(hub.subscriber_topic_count(), 0);
    srv.shutdown().await;
}
