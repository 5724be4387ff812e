//! Clients that ask for topics nobody publishes to, and publishers whose JSON holds a raw
//! carriage return: the topic table stays open to publishers and boards, SSE events stay
//! whole, and a healthy subscriber alongside gets every publication.

use crate::common::*;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
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
    let metrics = srv.state().metrics.clone();
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
    assert_eq!(
        metrics.subscriber_topics.get() as usize,
        MAX_SUBSCRIBER_TOPICS
    );
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
    assert!(metrics.topics.get() as usize <= MAX_TOPICS);
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
        metrics.subscriber_topics.get() as usize == 0
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
    assert_eq!(metrics.subscriber_topics.get() as usize, 0);
    srv.shutdown().await;
}

/// Reads an SSE body the way the EventSource spec does (lines end at CR, LF or CRLF; data
/// lines joined with LF) until one unnamed event with data is complete; returns its data.
async fn next_eventsource_data(body: &mut hyper::body::Incoming, buf: &mut Vec<u8>) -> String {
    loop {
        let text = String::from_utf8_lossy(buf).replace("\r\n", "\n");
        let lines: Vec<&str> = text.split(['\r', '\n']).collect();
        let mut data: Vec<&str> = Vec::new();
        // Named events (`subscribed`) are not what `onmessage` sees: skipped.
        let mut named = false;
        // The last element is an unfinished line; blank lines end events.
        for (i, line) in lines[..lines.len() - 1].iter().enumerate() {
            if line.is_empty() {
                if !data.is_empty() && !named {
                    let out = data.join("\n");
                    *buf = lines[i + 1..].join("\n").into_bytes();
                    return out;
                }
                data.clear();
                named = false;
            } else if line.starts_with("event:") {
                named = true;
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push(v.strip_prefix(' ').unwrap_or(v));
            }
        }
        let frame = within("sse body frame", body.frame())
            .await
            .expect("stream open")
            .expect("body frame");
        if let Ok(bytes) = frame.into_data() {
            buf.extend_from_slice(&bytes);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_carriage_return_in_published_json_keeps_sse_events_whole() {
    let srv = TestServer::start(|_| {}).await;
    let mut healthy = srv.ws("?topic=t").await;
    assert_eq!(next_json(&mut healthy).await["op"], "subscribed");

    let client: Client<_, http_body_util::Empty<bytes::Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let resp = client
        .get(srv.url("/sse?topic=t").parse().unwrap())
        .await
        .expect("sse request");
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let hub = srv.state().hub.clone();
    wait_until("two subscribers", || hub.subscriber_count("t") == 2).await;

    let mut buf = Vec::new();
    for (i, payload) in [
        "{\"a\":1,\r\"b\":2}",
        "{\"a\":1,\r\n\"b\":2}",
        "{\r\r\"a\"\n:1,\"b\":2\n}",
    ]
    .into_iter()
    .enumerate()
    {
        let (s, body_json) = srv.publish("t", payload).await;
        assert_eq!(s, 200, "{body_json}");
        let offset = i as u64 + 1;
        let want = json!({"topic": "t", "offset": offset, "data": {"a": 1, "b": 2}});
        let data = next_eventsource_data(&mut body, &mut buf).await;
        let got: Value = serde_json::from_str(&data)
            .unwrap_or_else(|e| panic!("SSE data is not JSON ({e}): {data:?}"));
        assert_eq!(got, want);
        assert_eq!(next_json(&mut healthy).await, want);
    }
    drop((body, healthy));
    srv.assert_clean().await;
    srv.shutdown().await;
}
