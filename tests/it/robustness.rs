//! Clients that stall, go silent, lie or send garbage: each gets its documented error or
//! close code, and nobody else notices.

use std::time::Duration;

use crate::common::*;
use crier::close::DisconnectReason;
use crier::metrics::{ReasonLabel, Transport};
use futures_util::SinkExt;
use tokio::io::AsyncReadExt;
use tokio_tungstenite::tungstenite::Message;

fn disconnects(srv: &TestServer, transport: Transport, reason: DisconnectReason) -> u64 {
    srv.state()
        .metrics
        .disconnects
        .get_or_create(&ReasonLabel {
            transport,
            reason: reason.label(),
        })
        .get()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_reader_is_cut_off_as_slow_consumer_and_others_get_everything() {
    let srv = TestServer::start(|c| c.queue_max_bytes = 128 * 1024).await;
    let mut healthy = Vec::new();
    for _ in 0..5 {
        let mut ws = srv.ws("?topic=t").await;
        next_json(&mut ws).await;
        healthy.push(ws);
    }
    // Never reads, with a small receive window so the kernel buffers fill fast.
    let mut stalled = raw_ws(srv.addr, "?topic=t", Some(4096)).await;
    wait_until("6 subscribers", || {
        srv.state().hub.subscriber_count("t") == 6
    })
    .await;

    // Publish until the stalled client is cut off (its kernel buffers fill first, then its
    // queue), bounded; the healthy ones must get every message meanwhile.
    let pad = "x".repeat(4000);
    let (tx, rx) = tokio::sync::watch::channel(0u64);
    let readers: Vec<_> = healthy
        .into_iter()
        .map(|mut ws| {
            let mut rx = rx.clone();
            tokio::spawn(async move {
                let mut i = 0;
                loop {
                    let total = *rx.borrow_and_update();
                    if total != 0 && i == total {
                        return i;
                    }
                    if i < total || total == 0 {
                        tokio::select! {
                            m = next_json(&mut ws) => {
                                i += 1;
                                assert_eq!(m["offset"], i);
                            }
                            _ = rx.changed() => {}
                        }
                    } else {
                        rx.changed().await.unwrap();
                    }
                }
            })
        })
        .collect();
    let mut published = 0u64;
    while srv.state().hub.subscriber_count("t") == 6 {
        assert!(published < 20_000, "stalled client never cut off");
        for _ in 0..50 {
            published += 1;
            let (status, _) = srv
                .publish("t", &format!("{{\"i\":{published},\"pad\":\"{pad}\"}}"))
                .await;
            assert_eq!(status, 200);
        }
    }
    for _ in 0..20 {
        published += 1;
        srv.publish("t", &format!("{{\"i\":{published}}}")).await;
    }
    tx.send(published).unwrap();
    for r in readers {
        assert_eq!(
            r.await.unwrap(),
            published,
            "healthy clients got everything"
        );
    }
    assert_eq!(
        disconnects(&srv, Transport::Ws, DisconnectReason::SlowConsumer),
        1
    );
    assert_eq!(srv.state().metrics.slow_consumer_disconnects.get(), 1);
    assert!(srv.state().metrics.queue_full_drops.get() > 0);
    // Its socket is closed (the 4001 close frame is best effort: its buffers are full).
    read_to_end(&mut stalled).await;
    srv.assert_clean().await;
}

#[tokio::test]
async fn silent_client_is_closed_after_ping_interval_plus_pong_timeout() {
    let srv = TestServer::start(|c| {
        c.ping_interval = Duration::from_millis(150);
        c.pong_timeout = Duration::from_millis(150);
    })
    .await;
    // A tungstenite client answers pings as it reads: it must survive many intervals.
    let mut alive = srv.ws("?topic=t").await;
    next_json(&mut alive).await;
    let alive_task = tokio::spawn(async move {
        let mut pings = 0;
        while pings < 6 {
            match within("ping", futures_util::StreamExt::next(&mut alive)).await {
                Some(Ok(Message::Ping(_))) => pings += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
        alive
    });
    // Taken before the handshake: the server's clock starts once it has answered it, which
    // a loaded machine may take a few ms to let this side see.
    let started = tokio::time::Instant::now();
    let mut silent = raw_ws(srv.addr, "?topic=t", None).await;
    // The silent one reads (so the socket is not stalled) but never answers.
    let mut got = Vec::new();
    let _ = within("silent closed", silent.read_to_end(&mut got)).await;
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(300),
        "closed after interval + timeout, not before ({elapsed:?})"
    );
    let close = [0x88u8, 0x09, 0x0F, 0xA2]; // close, len 9 ("no_pong" + code), code 4002
    assert!(
        got.windows(4).any(|w| w == close),
        "4002 close frame: {got:?}"
    );
    wait_until("no_pong counted", || {
        disconnects(&srv, Transport::Ws, DisconnectReason::NoPong) == 1
    })
    .await;

    // The live one saw six pings (about 0.9 s) and is still subscribed and served.
    let mut alive = alive_task.await.unwrap();
    srv.publish("t", "1").await;
    assert_eq!(next_json(&mut alive).await["data"], 1);
    assert_eq!(srv.state().hub.subscriber_count("t"), 1);
    assert_eq!(
        disconnects(&srv, Transport::Ws, DisconnectReason::NoPong),
        1
    );
}

#[tokio::test]
async fn bad_commands_get_error_frames_and_the_connection_lives_on() {
    let srv = TestServer::start(|c| c.max_topics_per_connection = 2).await;
    let mut other = srv.ws("?topic=t").await;
    next_json(&mut other).await;
    let mut ws = srv.ws("").await;
    for (frame, code) in [
        ("not json", "bad_json"),
        ("[1,2]", "bad_json"),
        (r#"{"op":"bogus","id":9}"#, "unknown_op"),
        (r#"{"topic":"t"}"#, "unknown_op"),
        (r#"{"op":"subscribe","topic":"bad topic!"}"#, "bad_topic"),
        (r#"{"op":"subscribe"}"#, "bad_topic"),
    ] {
        send_json(&mut ws, frame).await;
        let m = next_json(&mut ws).await;
        assert_eq!(m["op"], "error", "{frame}");
        assert_eq!(m["code"], code, "{frame}");
        assert!(m["message"].as_str().is_some_and(|s| !s.is_empty()));
    }
    ws.send(Message::Binary(vec![1, 2, 3].into()))
        .await
        .unwrap();
    assert_eq!(next_json(&mut ws).await["code"], "unsupported_data");
    send_json(&mut ws, r#"{"op":"subscribe","topic":"a"}"#).await;
    send_json(&mut ws, r#"{"op":"subscribe","topic":"b"}"#).await;
    send_json(&mut ws, r#"{"op":"subscribe","topic":"c","id":5}"#).await;
    assert_eq!(next_json(&mut ws).await["op"], "subscribed");
    assert_eq!(next_json(&mut ws).await["op"], "subscribed");
    let m = next_json(&mut ws).await;
    assert_eq!(
        (m["code"].as_str(), m["id"].as_i64()),
        (Some("too_many_topics"), Some(5))
    );
    // Still subscribed and served, and the other client saw nothing of it.
    srv.publish("a", "\"hi\"").await;
    assert_eq!(next_json(&mut ws).await["data"], "hi");
    srv.publish("t", "\"other\"").await;
    assert_eq!(next_json(&mut other).await["data"], "other");
}

#[tokio::test]
async fn oversize_message_closes_1009_and_others_are_untouched() {
    let srv = TestServer::start(|c| {
        c.max_message_bytes = 1024;
        c.queue_max_bytes = 64 * 1024;
    })
    .await;
    let mut other = srv.ws("?topic=t").await;
    next_json(&mut other).await;
    let mut ws = srv.ws("?topic=t").await;
    next_json(&mut ws).await;
    send_json(
        &mut ws,
        &format!("{{\"op\":\"ping\",\"pad\":\"{}\"}}", "x".repeat(2000)),
    )
    .await;
    assert_eq!(expect_close(&mut ws).await, 1009);
    let (status, body) = srv.publish("t", &format!("\"{}\"", "y".repeat(2000))).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (413, Some("message_too_large"))
    );
    srv.publish("t", "2").await;
    assert_eq!(next_json(&mut other).await["data"], 2);
    wait_until("disconnect counted", || {
        disconnects(&srv, Transport::Ws, DisconnectReason::MessageTooLarge) == 1
    })
    .await;
}

#[tokio::test]
async fn http_errors_are_json_with_codes() {
    let srv = TestServer::start(|c| {
        c.publisher_keys = vec!["sekret".into()];
        c.allowed_origins = vec!["https://game.example".into()];
    })
    .await;
    let mut ws = srv.ws("?topic=t").await;
    next_json(&mut ws).await;
    let (s, b) = srv.post_with_key("/api/publish/t", "1", None).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );
    let (s, b) = srv
        .post_with_key("/api/publish/t", "1", Some("wrong"))
        .await;
    assert_eq!((s, b["error"]["code"].as_str()), (403, Some("forbidden")));
    let (s, b) = srv
        .post_with_key("/api/publish/bad%20topic", "1", Some("sekret"))
        .await;
    assert_eq!((s, b["error"]["code"].as_str()), (400, Some("bad_topic")));
    let (s, b) = srv
        .post_with_key("/api/publish/t", "{oops", Some("sekret"))
        .await;
    assert_eq!((s, b["error"]["code"].as_str()), (400, Some("bad_json")));
    let (s, b) = srv
        .post_with_key("/api/publish/t", "{\"ok\":true}", Some("sekret"))
        .await;
    assert_eq!((s, b["offset"].as_u64()), (200, Some(1)));
    assert_eq!(
        next_json(&mut ws).await["data"]["ok"],
        true,
        "only the good publication arrived"
    );

    // Origin: a foreign page is refused before the upgrade; same-origin and listed ones pass.
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let attempt = |origin: &'static str| {
        let mut req = format!("ws://{}/ws?topic=t", srv.addr)
            .into_client_request()
            .unwrap();
        req.headers_mut().insert("origin", origin.parse().unwrap());
        tokio_tungstenite::connect_async(req)
    };
    match attempt("https://evil.example").await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 403),
        other => panic!("expected 403, got {:?}", other.map(|_| ())),
    }
    assert!(attempt("https://game.example").await.is_ok());
    let same: &'static str = Box::leak(format!("http://{}", srv.addr).into_boxed_str());
    assert!(attempt(same).await.is_ok());

    // Bad query topics and SSE without topics are refused with 400.
    let (s, b) = srv.get("/sse").await;
    assert_eq!((s, b["error"]["code"].as_str()), (400, Some("bad_topic")));
    let (s, b) = srv.get("/sse?topic=a%20b").await;
    assert_eq!((s, b["error"]["code"].as_str()), (400, Some("bad_topic")));
    let (s, b) = srv.get("/ws").await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (426, Some("upgrade_required"))
    );
    let (s, b) = srv.get("/nope").await;
    assert_eq!((s, b["error"]["code"].as_str()), (404, Some("not_found")));
}

#[tokio::test]
async fn connection_cap_refuses_with_503() {
    let srv = TestServer::start(|c| c.max_connections = 2).await;
    let _a = srv.ws("?topic=t").await;
    let _b = Sse::connect(srv.addr, "?topic=t").await;
    match tokio_tungstenite::connect_async(format!("ws://{}/ws?topic=t", srv.addr)).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 503),
        other => panic!("expected 503, got {:?}", other.map(|_| ())),
    }
    let (s, b) = srv.get("/sse?topic=t").await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (503, Some("too_many_connections"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_flushes_then_closes_1001_and_ends_sse() {
    let srv = TestServer::start(|_| {}).await;
    let mut ws = srv.ws("?topic=t").await;
    next_json(&mut ws).await;
    let mut sse = Sse::connect(srv.addr, "?topic=t").await;
    wait_until("2 subscribers", || {
        srv.state().hub.subscriber_count("t") == 2
    })
    .await;
    for i in 1..=50 {
        srv.publish("t", &i.to_string()).await;
    }
    let addr = srv.addr;
    srv.shutdown().await;
    for i in 1..=50 {
        assert_eq!(
            next_json(&mut ws).await["data"],
            i,
            "queued messages are flushed before the close"
        );
    }
    assert_eq!(expect_close(&mut ws).await, 1001);
    for i in 1..=50u64 {
        assert_eq!(sse.next_event().await.expect("event").0, Some(i));
    }
    assert!(sse.next_event().await.is_none(), "SSE stream ends");
    assert!(sse.comments.iter().any(|c| c == "close shutdown"));
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no longer accepting"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_sse_reader_is_dropped_and_leaves_nothing_behind() {
    let srv = TestServer::start(|c| {
        c.queue_max_bytes = 64 * 1024;
        c.write_timeout = Duration::from_millis(500);
    })
    .await;
    let mut healthy = Sse::connect(srv.addr, "?topic=t").await;
    // An SSE client that sends its request and then never reads, with a tiny window.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket.connect(srv.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(
        &mut stalled,
        format!("GET /sse?topic=t HTTP/1.1\r\nHost: {}\r\n\r\n", srv.addr).as_bytes(),
    )
    .await
    .unwrap();
    wait_until("2 subscribers", || {
        srv.state().hub.subscriber_count("t") == 2
    })
    .await;
    let pad = "x".repeat(4000);
    let mut published = 0u64;
    let reader = tokio::spawn(async move {
        let mut n = 0u64;
        while let Some((id, _)) = healthy.next_event().await {
            n += 1;
            assert_eq!(id, Some(n), "healthy SSE client gets every event in order");
        }
        n
    });
    while srv.state().hub.subscriber_count("t") == 2 {
        assert!(published < 20_000, "stalled SSE client never dropped");
        for _ in 0..50 {
            published += 1;
            assert_eq!(
                srv.publish("t", &format!("{{\"i\":{published},\"pad\":\"{pad}\"}}"))
                    .await
                    .0,
                200
            );
        }
    }
    assert_eq!(
        disconnects(&srv, Transport::Sse, DisconnectReason::SlowConsumer),
        1
    );
    assert_eq!(srv.state().metrics.connections(Transport::Sse).get(), 1);
    srv.shutdown().await;
    assert_eq!(
        reader.await.unwrap(),
        published,
        "the healthy one got all {published} before shutdown"
    );
}

/// Publishes `n` publications of about 400 bytes to `t`, 100 per batch request.
async fn publish_batches(srv: &TestServer, n: u64) {
    let pad = "x".repeat(380);
    let mut i = 0;
    while i < n {
        let items: Vec<String> = (i..(i + 100).min(n))
            .map(|k| format!(r#"{{"topic":"t","data":{{"i":{k},"pad":"{pad}"}}}}"#))
            .collect();
        i += items.len() as u64;
        let body = format!(r#"{{"items":[{}]}}"#, items.join(","));
        let (status, v) = srv.post_with_key("/api/publish", &body, None).await;
        assert_eq!(status, 200, "{v}");
    }
}

/// A reader that pauses while hundreds of publications pile up in its queue, then reads,
/// gets every one, in order: the writer drains a deep queue a bounded round at a time
/// (and wakes itself for the rest), over WebSocket and SSE alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_pauses_gets_a_deep_queue_whole_and_in_order() {
    // About 5 MB: more than the kernel's socket buffers take (they grow to 4 MiB on
    // loopback), so thousands wait in each queue, within a budget raised for them.
    const N: u64 = 12_000;
    let srv = TestServer::start(|c| c.queue_max_bytes = 16 << 20).await;
    // Reads nothing until every publication is in.
    let mut ws = raw_ws(srv.addr, "?topic=t", None).await;
    let mut sse = Sse::connect(srv.addr, "?topic=t").await;
    wait_until("2 subscribers", || {
        srv.state().hub.subscriber_count("t") == 2
    })
    .await;
    publish_batches(&srv, N).await;
    assert!(
        srv.state()
            .metrics
            .encode()
            .contains("crier_queue_full_drops_total 0"),
        "nothing overflowed"
    );

    let mut decoder = crier::ws::frame::Decoder::new(crier::ws::frame::Role::Client, 1 << 20);
    let mut next = 1;
    while next <= N {
        let frame = loop {
            if let Some(f) = decoder.next_message().expect("the server's frames decode") {
                break f;
            }
            let n = within("a frame", ws.read_buf(decoder.buffer_mut(64 * 1024)))
                .await
                .unwrap();
            assert!(n > 0, "the server closed the socket at offset {next}");
        };
        let crier::ws::frame::Message::Text(t) = frame else {
            continue;
        };
        let v: serde_json::Value = serde_json::from_slice(&t).unwrap();
        if v["op"] == "subscribed" {
            continue;
        }
        assert_eq!(
            (v["offset"].as_u64(), &v["data"]["i"]),
            (Some(next), &(next - 1).into())
        );
        next += 1;
    }
    for want in 1..=N {
        let (id, v) = sse.next_event().await.expect("the stream goes on");
        assert_eq!((id, &v["offset"]), (Some(want), &want.into()), "{v}");
    }
    drop((ws, sse));
    srv.assert_clean().await;
}
