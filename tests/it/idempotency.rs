//! Idempotent publish: a retry with the same `Idempotency-Key` (per topic, within
//! `idempotency_window`) gets the first receipt back and publishes nothing, even when the
//! retries race the first request.

use std::time::Duration;

use crate::common::http::publish_keyed;
use crate::common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_gets_the_first_receipt_and_publishes_nothing() {
    let srv = TestServer::start(|_| {}).await;
    let url = srv.url("/api/publish/orders");
    let mut ws = srv.ws("?topic=orders").await;
    assert_eq!(next_json(&mut ws).await["op"], "subscribed");

    let (s, replayed, first) = publish_keyed(&url, r#"{"n":1}"#, b"order-1").await;
    assert_eq!(
        (s, replayed, &first["duplicate"]),
        (200, None, &json!(false))
    );
    for _ in 0..3 {
        let (s, replayed, again) = publish_keyed(&url, r#"{"n":1}"#, b"order-1").await;
        assert_eq!((s, replayed.as_deref()), (200, Some("true")));
        assert_eq!(
            (&again["offset"], &again["epoch"], &again["duplicate"]),
            (&first["offset"], &first["epoch"], &json!(true))
        );
    }
    // Another key, or the same key on another topic, is a new publication.
    let (_, _, other) = publish_keyed(&url, r#"{"n":2}"#, b"order-2").await;
    assert_eq!(other["offset"], 2);
    let (_, _, elsewhere) =
        publish_keyed(&srv.url("/api/publish/other"), r#"{"n":1}"#, b"order-1").await;
    assert_eq!(elsewhere["duplicate"], false);

    // The subscriber saw each publication once.
    assert_eq!(next_json(&mut ws).await["offset"], 1);
    assert_eq!(next_json(&mut ws).await["offset"], 2);
    srv.publish("orders", r#"{"n":3}"#).await;
    assert_eq!(next_json(&mut ws).await["offset"], 3);
    assert_eq!(srv.state().metrics.idempotent_replays.get(), 3);
    drop(ws);
    srv.assert_clean().await;
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_retries_make_one_publication() {
    let srv = TestServer::start(|_| {}).await;
    let url = srv.url("/api/publish/race");
    let mut ws = srv.ws("?topic=race").await;
    assert_eq!(next_json(&mut ws).await["op"], "subscribed");
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { publish_keyed(&url, r#"{"once":true}"#, b"the-key").await })
        })
        .collect();
    let mut receipts = Vec::new();
    for t in tasks {
        let (s, _, body) = t.await.unwrap();
        assert_eq!(s, 200, "{body}");
        receipts.push(body);
    }
    assert!(receipts
        .iter()
        .all(|r| r["offset"] == 1 && r["epoch"] == receipts[0]["epoch"]));
    assert_eq!(
        receipts.iter().filter(|r| r["duplicate"] == false).count(),
        1
    );
    // Exactly one publication reached the subscriber: the next one is offset 2.
    assert_eq!(next_json(&mut ws).await["offset"], 1);
    srv.publish("race", "2").await;
    assert_eq!(next_json(&mut ws).await["offset"], 2);
    drop(ws);
    srv.assert_clean().await;
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_forgotten_after_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let (_proc, addr) = serve_binary(
        dir.path(),
        "127.0.0.1:0",
        &["--idempotency-window", "300ms"],
    );
    let url = format!("http://{addr}/api/publish/w");
    let (_, _, first) = publish_keyed(&url, "1", b"k").await;
    assert_eq!(first["offset"], 1);
    let (_, _, again) = publish_keyed(&url, "1", b"k").await;
    assert_eq!(
        (&again["offset"], &again["duplicate"]),
        (&json!(1), &json!(true))
    );
    // Past the window the key means nothing any more: polled, not slept-and-hoped.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (s, _, r) = publish_keyed(&url, "1", b"k").await;
        assert_eq!(s, 200);
        if r["duplicate"] == false {
            assert_eq!(r["offset"], 2, "published once more, after the window");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the key was never forgotten"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_keys_are_refused_and_publish_nothing() {
    let srv = TestServer::start(|_| {}).await;
    let url = srv.url("/api/publish/k");
    let long = vec![b'a'; 129];
    for key in [&b""[..], b"has space", &long, b"tab\there", b"\xc3\xa9"] {
        let (s, _, body) = publish_keyed(&url, "1", key).await;
        assert_eq!(
            (s, &body["error"]["code"]),
            (400, &json!("bad_idempotency_key")),
            "{key:?}: {body}"
        );
    }
    let (s, _, body) = publish_keyed(&url, "1", &[b'a'; 128]).await;
    assert_eq!(
        (s, &body["offset"]),
        (200, &json!(1)),
        "nothing was published before"
    );
    srv.shutdown().await;
}
