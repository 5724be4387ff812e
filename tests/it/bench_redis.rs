//! `crier bench` with several targets (issue 8): two real `crier serve --redis` nodes on one
//! real `redis-server`, subscribers spread over both, publications through one node or
//! round robin. Tiny counts: this checks the tool's bookkeeping across nodes, not speed.

use crate::common::redis::{node, RedisServer};
use crate::common::within;
use crier_bench::{run_with, BenchArgs};

async fn bench(flags: &[&str]) -> crier_bench::report::Report {
    let args = BenchArgs::from_flags(flags.iter().chain(&["--quiet", "--timeout", "30s"]))
        .expect("flags parse");
    within("the bench run", run_with(args))
        .await
        .expect("bench runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_spreads_subscribers_and_publications_over_two_redis_nodes() {
    crate::need_redis!();
    let redis = RedisServer::start();
    let (_a, a, _da) = node(&redis);
    let (_b, b, _db) = node(&redis);
    let (a, b) = (format!("http://{a}"), format!("http://{b}"));
    let both = format!("{a},{b}");

    // Fan-out, subscribers alternating a, b; publications through both nodes in turn: every
    // subscriber gets every offset once, in order, and each node's latency is its own.
    for (transport, via, topic) in [("ws", "rr", "mt-ws"), ("sse", "1", "mt-sse")] {
        let r = bench(&[
            "--target",
            &both,
            "--publish-via",
            via,
            "--transport",
            transport,
            "--topic",
            topic,
            "--subscribers",
            "20",
            "--messages",
            "50",
            "--publishers",
            "2",
        ])
        .await;
        let ctx = format!("{transport} via {via}: {r:?}");
        assert_eq!((r.connected, r.connect_failed), (20, 0), "{ctx}");
        assert_eq!(r.published, 50, "{ctx}");
        assert_eq!(r.delivered, 20 * 50, "{ctx}");
        assert_eq!(
            (r.lost, r.duplicates, r.out_of_order, r.unexpected),
            (0, 0, 0, 0),
            "{ctx}"
        );
        assert!(r.failures().is_empty(), "{:?}", r.failures());
        assert_eq!(r.targets, vec![a.clone(), b.clone()], "{ctx}");
        assert_eq!(r.publish_via, via);
        assert_eq!(r.per_target.len(), 2, "{ctx}");
        for (t, url) in r.per_target.iter().zip([&a, &b]) {
            assert_eq!((&t.url, t.subscribers), (url, 10), "{ctx}");
            assert_eq!(t.latency_ms.count, 10 * 50, "{ctx}");
        }
        assert!(r.to_text().contains("target 1"), "{}", r.to_text());
    }

    // Publications round robin over both nodes into three topics: the receipts' offsets are
    // one contiguous sequence per topic under one epoch, whichever node acknowledged them.
    let r = bench(&[
        "--publish-throughput",
        "--target",
        &both,
        "--publish-via",
        "rr",
        "--topic",
        "tp",
        "--topics",
        "3",
        "--messages",
        "90",
        "--concurrency",
        "4",
    ])
    .await;
    let t = r.throughput.as_ref().expect("throughput report");
    assert_eq!((t.acked, t.failed, t.servers), (90, 0, 2), "{t:?}");
    assert_eq!((t.offset_errors, t.epoch_changes), (0, 0), "{t:?}");

    // Scores round robin over both nodes and three boards: all acknowledged.
    let r = bench(&[
        "--mode",
        "scores",
        "--target",
        &both,
        "--publish-via",
        "rr",
        "--board",
        "sb",
        "--boards",
        "3",
        "--messages",
        "60",
        "--publishers",
        "2",
    ])
    .await;
    let s = r.scores.as_ref().expect("scores report");
    assert_eq!((s.scores_acked, s.requests_failed), (60, 0), "{s:?}");
    assert_eq!((s.boards, s.servers), (3, 2), "{s:?}");
    assert!(r.to_text().contains("3 boards"), "{}", r.to_text());

    // What several targets cannot do is refused up front, with a reason.
    for bad in [
        vec!["--target", &both, "--publish-via", "2"],
        vec!["--target", &both, "--mode", "board"],
        vec!["--target", &both, "--idle"],
        vec!["--target", "http://10.0.0.1:7700"],
    ] {
        let args = BenchArgs::from_flags(&bad).unwrap();
        let e = run_with(args).await.expect_err("refused");
        assert!(!e.to_string().is_empty(), "{bad:?}");
    }
}
