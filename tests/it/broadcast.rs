//! Fan-out over real sockets: every subscriber, WebSocket or SSE, gets every publication
//! exactly once and in offset order, and the registry is empty once they are gone.

use crate::common::*;
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_subscriber_gets_every_publication_once_in_order() {
    let srv = TestServer::start(|_| {}).await;
    const WS: usize = 25;
    const SSE: usize = 25;
    const MESSAGES: u64 = 300;

    let mut ws_clients = Vec::new();
    for _ in 0..WS {
        let mut ws = srv.ws("?topic=scores").await;
        let ack = next_json(&mut ws).await;
        assert_eq!(ack["op"], "subscribed");
        assert_eq!(ack["topic"], "scores");
        assert_eq!(ack["offset"], 0);
        ws_clients.push(ws);
    }
    let mut sse_clients = Vec::new();
    for _ in 0..SSE {
        sse_clients.push(Sse::connect(srv.addr, "?topic=scores").await);
    }
    wait_until("all subscribed", || {
        srv.state().hub.subscriber_count("scores") == WS + SSE
    })
    .await;

    let publisher = {
        let url = srv.url("/api/publish/scores");
        tokio::spawn(async move {
            let http = crier::http_client::HttpClient::new(None);
            for i in 1..=MESSAGES {
                let (status, body) = http
                    .post(&url, format!("{{\"n\":{i},\"text\":\"line\\nbreak\"}}"))
                    .await
                    .unwrap();
                assert_eq!(status, 200);
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                assert_eq!(v["offset"], i);
            }
        })
    };

    let mut readers = Vec::new();
    for mut ws in ws_clients {
        readers.push(tokio::spawn(async move {
            for i in 1..=MESSAGES {
                let m = next_json(&mut ws).await;
                assert_eq!(m["topic"], "scores");
                assert_eq!(m["offset"], i, "ws offsets in order, no gap, no duplicate");
                assert_eq!(m["data"]["n"], i);
                assert_eq!(m["data"]["text"], "line\nbreak");
            }
            ws
        }));
    }
    let mut sse_readers = Vec::new();
    for mut sse in sse_clients {
        sse_readers.push(tokio::spawn(async move {
            for i in 1..=MESSAGES {
                let (id, m) = sse.next_event().await.expect("sse event");
                assert_eq!(id, Some(i));
                assert_eq!(m["offset"], i);
                assert_eq!(m["data"]["n"], i);
            }
            sse
        }));
    }
    publisher.await.unwrap();
    let mut ws_clients = Vec::new();
    for r in readers {
        ws_clients.push(r.await.unwrap());
    }
    for r in sse_readers {
        r.await.unwrap();
    }
    // Nothing more than what was published arrives: a ping round-trip proves the queue is empty.
    for ws in ws_clients.iter_mut() {
        send_json(ws, r#"{"op":"ping","id":"end"}"#).await;
        let m = next_json(ws).await;
        assert_eq!(m["op"], "pong");
        assert_eq!(m["id"], "end");
    }
    let metrics = &srv.state().metrics;
    assert_eq!(metrics.publications.get(), MESSAGES);

    // Half leave cleanly with a close frame, half just drop the TCP connection.
    for (i, mut ws) in ws_clients.into_iter().enumerate() {
        if i % 2 == 0 {
            ws.send(Message::Close(None)).await.unwrap();
            let _ = expect_close(&mut ws).await;
        } else {
            drop(ws);
        }
    }
    srv.assert_clean().await;
    srv.shutdown().await;
}

#[tokio::test]
async fn in_band_subscribe_unsubscribe_and_ids() {
    let srv = TestServer::start(|_| {}).await;
    let mut ws = srv.ws("").await;
    send_json(&mut ws, r#"{"op":"subscribe","topic":"a","id":1}"#).await;
    let ack = next_json(&mut ws).await;
    assert_eq!(
        (
            ack["op"].as_str(),
            ack["topic"].as_str(),
            ack["id"].as_i64()
        ),
        (Some("subscribed"), Some("a"), Some(1))
    );
    assert!(ack["epoch"].is_string());
    srv.publish("a", r#"{"x":1}"#).await;
    assert_eq!(next_json(&mut ws).await["data"]["x"], 1);

    // Re-subscribing acknowledges again and reports the current offset, without doubling delivery.
    send_json(&mut ws, r#"{"op":"subscribe","topic":"a","id":"again"}"#).await;
    let ack = next_json(&mut ws).await;
    assert_eq!(
        (ack["offset"].as_u64(), ack["id"].as_str()),
        (Some(1), Some("again"))
    );
    srv.publish("a", r#"{"x":2}"#).await;
    assert_eq!(next_json(&mut ws).await["offset"], 2);
    send_json(&mut ws, r#"{"op":"ping"}"#).await;
    assert_eq!(next_json(&mut ws).await["op"], "pong");

    send_json(&mut ws, r#"{"op":"unsubscribe","topic":"a","id":3}"#).await;
    assert_eq!(next_json(&mut ws).await["op"], "unsubscribed");
    let (_, receipt) = srv.publish("a", r#"{"x":3}"#).await;
    assert_eq!(receipt["subscribers"], 0);
    send_json(&mut ws, r#"{"op":"ping","id":4}"#).await;
    assert_eq!(
        next_json(&mut ws).await["op"],
        "pong",
        "nothing from topic a after unsubscribing"
    );
    assert_eq!(srv.state().hub.total_subscriptions(), 0);
    drop(ws);
    srv.assert_clean().await;
}
