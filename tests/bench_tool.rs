//! `crier bench` against a real in-process server: every subscriber gets every message,
//! once, in order, over both transports.

use crier::config::Config;
use crier::server::Server;
use crier_bench::{run_with, BenchArgs};

async fn bench(server: &Server, transport: &str, topic: &str) -> crier_bench::report::Report {
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

/// `--attack`: every kind runs briefly next to 50 healthy subscribers. Checks the tool, not
/// the server: it completes, reports how each attacker ended, and the healthy side lost
/// nothing. The server's own RSS guard (`--attack-max-rss-mib`) keeps a server without the
/// issue-6 fixes (ping flood: GBs) from taking this test process down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_attack_kind_runs_next_to_a_healthy_load() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_path_buf(),
        ..Config::default()
    };
    // A small queue ends a never-reading flooder sooner, so the server (sharing this
    // process's two worker threads with the tool) stays responsive on a busy machine.
    let cfg = Config {
        queue_max_bytes: 64 * 1024,
        ..cfg
    };
    let server = Server::start(cfg).await.unwrap();
    let url = format!("http://{}", server.addr);
    let pid = std::process::id().to_string();
    let kinds = [
        "ping-flood",
        "command-flood",
        "topic-flood",
        "slowloris",
        "slow-body",
        "conn-flood",
        "big-frame",
    ];
    for kind in kinds {
        let topic = format!("atk-{kind}");
        let mut flags = vec![
            "--url",
            &url,
            "--topic",
            &topic,
            "--subscribers",
            "50",
            "--messages",
            "20",
            "--rate",
            "10",
            "--timeout",
            "20s",
            "--attack",
            kind,
            "--attackers",
            "2",
            "--attack-source-ips",
            "2",
            "--server-pid",
            &pid,
            "--attack-max-rss-mib",
            "256",
            "--quiet",
        ];
        let with_baseline = kind == "slowloris";
        if with_baseline {
            flags.push("--baseline");
        }
        let args = BenchArgs::from_flags(flags).unwrap();
        let r = tokio::time::timeout(std::time::Duration::from_secs(90), run_with(args))
            .await
            .unwrap_or_else(|_| panic!("{kind}: the tool did not finish"))
            .unwrap();
        assert_eq!((r.connected, r.connect_failed), (50, 0), "{kind}: {r:?}");
        assert_eq!(r.published, 20, "{kind}: {r:?}");
        assert_eq!(
            (r.lost, r.duplicates, r.out_of_order, r.delivered),
            (0, 0, 0, 50 * 20),
            "{kind}: {r:?}"
        );
        assert!(r.failures().is_empty(), "{kind}: {:?}", r.failures());
        let a = r.attack.as_ref().expect("attack report");
        assert_eq!(
            (a.kind.as_str(), a.attackers, a.started),
            (kind, 2, 2),
            "{a:?}"
        );
        assert_eq!(a.sources, ["127.0.0.9", "127.0.0.8"], "{a:?}");
        assert_eq!(a.endings.values().sum::<usize>(), 2, "{kind}: {a:?}");
        assert!(a.bytes_sent > 0, "{kind}: {a:?}");
        assert!(
            a.rss_before_kib.is_some() && a.rss_peak_kib.is_some(),
            "{a:?}"
        );
        match kind {
            "conn-flood" => assert!(a.connections > 0, "{a:?}"),
            "topic-flood" => assert!(
                a.topics_subscribed + a.error_codes.values().sum::<u64>() > 0
                    || a.ended_by_server > 0,
                "{a:?}"
            ),
            _ => {}
        }
        assert_eq!(a.baseline.is_some(), with_baseline, "{kind}");
        if let Some(b) = &a.baseline {
            assert_eq!((b.lost, b.delivered), (0, 50 * 20), "{b:?}");
            assert!(b.p99_ratio.is_some(), "{b:?}");
        }
        let text = r.to_text();
        assert!(text.contains(&format!("attack       {kind} x 2")), "{text}");
    }
    server.shutdown().await;
}

/// The load tool finds a board's leader by a byte search over the envelope (no JSON parse
/// per frame); this checks it against the server's own serialization of a board's top.
#[test]
fn bench_reads_the_leader_of_the_servers_board_serialization() {
    use crier::leaderboard::ranking::Entry;
    use crier::leaderboard::service::ranked;
    let entry = |player: &str, meta: Option<&str>| {
        (
            1u64,
            Entry {
                player: player.into(),
                score: 42.0,
                achieved: 1,
                meta: meta.map(Into::into),
            },
        )
    };
    let envelope = |first| {
        let data = serde_json::json!({
            "board": "b",
            "version": 2,
            "top": ranked(&[first, entry("second", None)]),
        });
        format!(r#"{{"topic":"board:b","offset":7,"data":{data}}}"#)
    };
    let env = envelope(entry("bl-1-4", None));
    let p = crier_bench::board::leader(env.as_bytes()).unwrap();
    assert!(matches!(p, std::borrow::Cow::Borrowed(_)), "{p:?}");
    assert_eq!(&*p, b"bl-1-4");
    let env = envelope(entry("bl-1-5", Some(r#"{"player":"not me"}"#)));
    assert_eq!(
        &*crier_bench::board::leader(env.as_bytes()).unwrap(),
        b"bl-1-5"
    );
}
