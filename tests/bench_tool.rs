//! `crier bench` against a real in-process server: every subscriber gets every message,
//! once, in order, over both transports.

use crier::bench::{run_with, BenchArgs};
use crier::config::Config;
use crier::server::Server;

async fn bench(server: &Server, transport: &str, topic: &str) -> crier::bench::report::Report {
    let url = format!("http://{}", server.addr);
    let args = BenchArgs::from_flags([
        "--url",
        url.as_str(),
        "--transport",
        transport,
        "--topic",
        topic,
        "--subscribers",
        "50",
        "--messages",
        "200",
        "--publishers",
        "4",
        "--timeout",
        "30s",
        "--quiet",
    ])
    .unwrap();
    run_with(args).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_and_sse_deliver_everything_once_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_path_buf(),
        ..Config::default()
    };
    let server = Server::start(cfg).await.unwrap();

    for (transport, topic) in [("ws", "bench-ws"), ("sse", "bench-sse")] {
        let r = bench(&server, transport, topic).await;
        assert_eq!(r.connected, 50, "{transport}: {r:?}");
        assert_eq!(r.connect_failed, 0, "{transport}: {r:?}");
        assert_eq!(r.published, 200, "{transport}: {r:?}");
        assert_eq!(r.expected_deliveries, 50 * 200, "{transport}: {r:?}");
        assert_eq!(r.received_deliveries, 50 * 200, "{transport}: {r:?}");
        assert_eq!(r.delivered, 50 * 200, "{transport}: {r:?}");
        assert_eq!(
            (r.lost, r.duplicates, r.out_of_order, r.unexpected),
            (0, 0, 0, 0),
            "{transport}: {r:?}"
        );
        assert!(!r.timed_out, "{transport}");
        assert_eq!(r.latency_ms.count, 50 * 200, "{transport}");
        assert!(r.deliveries_per_sec > 0.0);
        assert!(r.failures().is_empty(), "{:?}", r.failures());
    }

    // The same topic again: subscribers start from the topic's current offset, not 0.
    let again = bench(&server, "ws", "bench-ws").await;
    assert_eq!((again.lost, again.delivered), (0, 50 * 200));

    server.shutdown().await;
}

/// The leaderboard modes: durable score ingest, and a new leader reaching every watcher.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaderboard_modes_ingest_and_reach_every_watcher() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_path_buf(),
        ..Config::default()
    };
    let server = Server::start(cfg).await.unwrap();
    let url = format!("http://{}", server.addr);

    let args = BenchArgs::from_flags([
        "--url",
        &url,
        "--mode",
        "scores",
        "--board",
        "lb",
        "--messages",
        "2000",
        "--batch",
        "100",
        "--publishers",
        "4",
        "--players",
        "500",
        "--quiet",
    ])
    .unwrap();
    let r = run_with(args).await.unwrap();
    let sc = r.scores.as_ref().expect("scores report");
    assert_eq!((sc.requests, sc.requests_failed), (20, 0), "{sc:?}");
    assert_eq!(sc.scores_acked, 2000, "{sc:?}");
    assert_eq!(sc.request_ms.count, 20);
    assert!(sc.scores_per_sec > 0.0);
    assert!(r.failures().is_empty(), "{:?}", r.failures());

    // One score per request, concurrently (group commit).
    let args = BenchArgs::from_flags([
        "--url",
        &url,
        "--mode",
        "scores",
        "--board",
        "lb",
        "--messages",
        "200",
        "--publishers",
        "16",
        "--quiet",
    ])
    .unwrap();
    let r = run_with(args).await.unwrap();
    let sc = r.scores.as_ref().unwrap();
    assert_eq!((sc.scores_acked, sc.requests_failed), (200, 0), "{sc:?}");

    // 20 watchers x 10 new leaders, on the board that already has 2,200 scores.
    let args = BenchArgs::from_flags([
        "--url",
        &url,
        "--mode",
        "board",
        "--board",
        "lb",
        "--subscribers",
        "20",
        "--messages",
        "10",
        "--rate",
        "20",
        "--timeout",
        "20s",
        "--quiet",
    ])
    .unwrap();
    let r = run_with(args).await.unwrap();
    assert_eq!((r.connected, r.connect_failed), (20, 0), "{r:?}");
    let b = r.board.as_ref().expect("board report");
    assert_eq!((b.posts_ok, b.post_errors), (10, 0), "{b:?}");
    assert_eq!(b.pairs, 200, "{b:?}");
    assert_eq!(b.never_seen, 0, "{b:?}");
    assert_eq!(b.seen_first_hand + b.seen_later, 200, "{b:?}");
    assert!(
        b.seen_first_hand > 0 && b.latency_ms.count == b.seen_first_hand,
        "{b:?}"
    );
    assert!(!b.timed_out);
    assert!(r.failures().is_empty(), "{:?}", r.failures());

    // A board that does not exist yet is created first; watchers start from its snapshot.
    let args = BenchArgs::from_flags([
        "--url",
        &url,
        "--mode",
        "board",
        "--board",
        "fresh",
        "--subscribers",
        "5",
        "--messages",
        "3",
        "--rate",
        "10",
        "--quiet",
    ])
    .unwrap();
    let r = run_with(args).await.unwrap();
    let b = r.board.as_ref().unwrap();
    assert_eq!((b.pairs, b.never_seen, b.post_errors), (15, 0, 0), "{b:?}");

    server.shutdown().await;
}
