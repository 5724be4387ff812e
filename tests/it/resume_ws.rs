//! WebSocket resume: a subscriber that comes back with its position gets every missed
//! publication once, in order, then live ones; when the gap cannot be replayed it is told
//! so (`recovered:false`) with the current position, and a state topic's snapshot follows.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::common::*;
use serde_json::{json, Value};

/// Subscribes with a command (and a resume position, if any); returns the reply.
async fn subscribe(ws: &mut Ws, topic: &str, since: Option<(u64, &str)>) -> Value {
    let since = since
        .map(|(o, e)| format!(r#","since":{{"offset":{o},"epoch":"{e}"}}"#))
        .unwrap_or_default();
    send_json(
        ws,
        &format!(r#"{{"op":"subscribe","topic":"{topic}"{since},"id":1}}"#),
    )
    .await;
    let reply = next_json(ws).await;
    assert_eq!(reply["op"], "subscribed", "{reply}");
    reply
}

fn epoch(v: &Value) -> String {
    v["epoch"].as_str().expect("an epoch").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_subscriber_resumes_with_exactly_what_it_missed() {
    let srv = TestServer::start(|_| {}).await;
    let mut ws = srv.ws("").await;
    let reply = subscribe(&mut ws, "t", None).await;
    assert_eq!(reply["offset"], 0);
    assert!(reply.get("recovered").is_none(), "no since, no recovered");
    let e = epoch(&reply);
    assert_eq!(e.len(), 8);
    for i in 1..=3 {
        let (s, body) = srv.publish("t", &format!(r#"{{"n":{i}}}"#)).await;
        assert_eq!((s, body["epoch"].as_str()), (200, Some(&*e)));
    }
    let mut last = 0;
    for i in 1..=3 {
        let m = next_json(&mut ws).await;
        assert_eq!(
            (m["offset"].as_u64(), &m["data"]["n"]),
            (Some(i), &json!(i))
        );
        last = i;
    }

    // Cut: the TCP socket goes away without a close frame.
    drop(ws);
    let state = srv.state().clone();
    wait_until("the cut subscriber is gone", || {
        state.hub.subscriber_count("t") == 0
    })
    .await;
    const N: u64 = 20;
    for i in 4..4 + N {
        assert_eq!(srv.publish("t", &format!(r#"{{"n":{i}}}"#)).await.0, 200);
    }

    let mut ws = srv.ws("").await;
    let reply = subscribe(&mut ws, "t", Some((last, &e))).await;
    assert_eq!(
        (
            &reply["recovered"],
            &reply["offset"],
            &reply["epoch"],
            &reply["id"]
        ),
        (&json!(true), &json!(3 + N), &json!(e), &json!(1))
    );
    for i in 4..4 + N {
        let m = next_json(&mut ws).await;
        assert_eq!(
            (m["topic"].as_str(), m["offset"].as_u64()),
            (Some("t"), Some(i))
        );
        assert_eq!(m["data"]["n"], i);
    }
    // Then live, with no gap and no duplicate.
    srv.publish("t", r#"{"n":"live"}"#).await;
    let m = next_json(&mut ws).await;
    assert_eq!(
        (m["offset"].as_u64(), &m["data"]["n"]),
        (Some(4 + N), &json!("live"))
    );
    let recovered = srv
        .state()
        .metrics
        .resumes
        .get_or_create(&crier::metrics::ResumeLabel {
            result: "recovered",
        })
        .get();
    assert_eq!(recovered, 1);
    drop(ws);
    srv.assert_clean().await;
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_while_publishing_continues_see_every_offset_once() {
    let srv = TestServer::start(|c| c.history_size = 2000).await;
    const TOTAL: u64 = 400;
    let published = Arc::new(AtomicU64::new(0));
    let rounds = Arc::new(AtomicU64::new(0));
    let publisher = {
        let url = srv.url("/api/publish/race");
        let published = published.clone();
        let rounds = rounds.clone();
        tokio::spawn(async move {
            let http = crier::http_client::HttpClient::new(None);
            for i in 1..=TOTAL {
                // Paced by the subscriber's reconnects, so several of them surely happen
                // while publications keep flowing.
                wait_until("the subscriber reconnects", || {
                    rounds.load(Ordering::Relaxed) >= i / 50
                })
                .await;
                let (s, _) = http.post(&url, format!(r#"{{"i":{i}}}"#)).await.unwrap();
                assert_eq!(s, 200);
                published.store(i, Ordering::Relaxed);
            }
        })
    };
    let mut seen: Vec<u64> = Vec::new();
    let mut position: Option<(u64, String)> = None;
    // Cut after every few messages until the publisher is done, then read to the end.
    let mut round = 0u64;
    loop {
        round += 1;
        rounds.store(round, Ordering::Relaxed);
        let mut ws = srv.ws("").await;
        let reply = subscribe(
            &mut ws,
            "race",
            position.as_ref().map(|(o, e)| (*o, e.as_str())),
        )
        .await;
        if position.is_some() {
            assert_eq!(reply["recovered"], true, "{reply}");
        } else {
            // Joined with nothing: from here on every offset is expected.
            seen.extend(1..=reply["offset"].as_u64().unwrap());
        }
        let e = epoch(&reply);
        let done = published.load(Ordering::Relaxed) == TOTAL;
        let take = if done {
            usize::MAX
        } else {
            5 + (round as usize % 7)
        };
        let mut n = 0;
        // The publisher may finish while this round waits: TOTAL is the last there is.
        while n < take && seen.last() != Some(&TOTAL) {
            let m = next_json(&mut ws).await;
            let offset = m["offset"].as_u64().unwrap();
            assert_eq!(m["data"]["i"], offset);
            seen.push(offset);
            n += 1;
        }
        position = Some((*seen.last().unwrap_or(&0), e));
        drop(ws); // cut, no close frame
        if done || seen.last() == Some(&TOTAL) {
            break;
        }
    }
    publisher.await.unwrap();
    assert!(
        round >= TOTAL / 50,
        "the resume raced the publisher several times"
    );
    let want: Vec<u64> = (1..=TOTAL).collect();
    assert_eq!(seen, want, "every offset exactly once, in order");
    srv.assert_clean().await;
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn positions_that_cannot_be_served_are_refused_explicitly() {
    let srv = TestServer::start(|c| {
        c.history_size = 5;
        c.max_topics = 6;
        c.max_subscriber_topics = 3;
        c.board_update_interval = std::time::Duration::from_millis(10);
    })
    .await;
    let mut ws = srv.ws("").await;

    // Too old: only the last 5 of 10 are kept.
    let mut e = String::new();
    for i in 1..=10 {
        let (_, body) = srv.publish("old", &format!("{i}")).await;
        e = body["epoch"].as_str().unwrap().to_string();
    }
    let reply = subscribe(&mut ws, "old", Some((2, &e))).await;
    assert_eq!(
        (&reply["recovered"], &reply["offset"], &reply["epoch"]),
        (&json!(false), &json!(10), &json!(e))
    );
    // Nothing is replayed: the next message is the next live publication.
    srv.publish("old", "11").await;
    assert_eq!(next_json(&mut ws).await["offset"], 11);
    // Within what is kept, the same topic resumes.
    let mut again = srv.ws("").await;
    let reply = subscribe(&mut again, "old", Some((6, &e))).await;
    assert_eq!(reply["recovered"], true);
    let offsets: Vec<Value> = {
        let mut v = Vec::new();
        for _ in 7..=11 {
            v.push(next_json(&mut again).await["offset"].clone());
        }
        v
    };
    assert_eq!(offsets, (7..=11).map(|i| json!(i)).collect::<Vec<_>>());
    drop(again);

    // Another epoch (made up): refused, with the current position.
    let reply = subscribe(&mut ws, "other", None).await;
    assert_eq!(reply["offset"], 0);
    let mut w2 = srv.ws("").await;
    let reply = subscribe(&mut w2, "old", Some((11, "0badbeef"))).await;
    assert_eq!(
        (&reply["recovered"], &reply["offset"], &reply["epoch"]),
        (&json!(false), &json!(11), &json!(e))
    );
    drop(w2);

    // A topic evicted (idle, table full) and recreated: a new epoch, offsets restart.
    let (_, body) = srv.publish("gone", "1").await;
    let gone_epoch = body["epoch"].as_str().unwrap().to_string();
    for i in 0..8 {
        srv.publish(&format!("filler-{i}"), "1").await;
    }
    let (_, body) = srv.publish("gone", "2").await;
    assert_eq!(body["offset"], 1, "recreated: {body}");
    assert_ne!(body["epoch"], json!(gone_epoch));
    let mut w3 = srv.ws("").await;
    let reply = subscribe(&mut w3, "gone", Some((1, &gone_epoch))).await;
    assert_eq!(
        (&reply["recovered"], &reply["offset"], &reply["epoch"]),
        (&json!(false), &json!(1), &body["epoch"])
    );
    drop(w3);

    // A leaderboard: its snapshot follows either answer.
    srv.post_first_score("arena", "ann", 5).await;
    let mut w4 = srv.ws("").await;
    let reply = subscribe(&mut w4, "board:arena", Some((1, "00000000"))).await;
    assert_eq!(reply["recovered"], false);
    let board_epoch = epoch(&reply);
    let board_offset = reply["offset"].as_u64().unwrap();
    let snap = next_json(&mut w4).await;
    assert_eq!(snap["topic"], "board:arena");
    assert_eq!(snap["data"]["top"][0]["player"], "ann");
    drop(w4);
    let mut w5 = srv.ws("").await;
    let reply = subscribe(&mut w5, "board:arena", Some((board_offset, &board_epoch))).await;
    assert_eq!(
        reply["recovered"], true,
        "the newest state is a full recovery"
    );
    let snap = next_json(&mut w5).await;
    assert_eq!(snap["data"]["top"][0]["player"], "ann");
    drop(w5);

    let metrics = srv.state().metrics.clone();
    assert!(
        metrics
            .resumes
            .get_or_create(&crier::metrics::ResumeLabel {
                result: "not_recovered"
            })
            .get()
            >= 4
    );
    drop(ws);
    srv.assert_clean().await;
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_evicted_by_the_byte_cap_is_not_recovered() {
    let srv = TestServer::start(|c| c.history_max_bytes = 4096).await;
    let (_, body) = srv
        .publish("first", r#""aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa""#)
        .await;
    let e = body["epoch"].as_str().unwrap().to_string();
    // Other topics' publications push the oldest history (any topic's) out.
    for i in 0..40 {
        srv.publish(
            &format!("other-{}", i % 3),
            r#""bbbbbbbbbbbbbbbbbbbbbbbbbbbbbb""#,
        )
        .await;
    }
    assert!(srv.state().metrics.history_bytes.get() <= 4096);
    assert!(srv.state().metrics.history_evicted.get() > 0);
    let mut ws = srv.ws("").await;
    let reply = subscribe(&mut ws, "first", Some((0, &e))).await;
    assert_eq!(
        (&reply["recovered"], &reply["offset"], &reply["epoch"]),
        (&json!(false), &json!(1), &json!(e))
    );
    // Malformed positions are refused with bad_since, and the connection stays usable.
    send_json(
        &mut ws,
        r#"{"op":"subscribe","topic":"first","since":{"offset":-1},"id":9}"#,
    )
    .await;
    let err = next_json(&mut ws).await;
    assert_eq!(
        (&err["op"], &err["code"], &err["id"]),
        (&json!("error"), &json!("bad_since"), &json!(9))
    );
    drop(ws);
    srv.assert_clean().await;
    srv.shutdown().await;
}
