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

/// `--mode follow`: watchers each following their own player see the scores posted on
/// them, on a seeded `latest` board (a small run: 300 players, 60 watchers, 400 posts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_mode_reaches_each_players_own_window() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_path_buf(),
        board_update_interval: std::time::Duration::from_millis(20),
        ..Config::default()
    };
    let server = Server::start(cfg).await.unwrap();
    let url = format!("http://{}", server.addr);
    let args = BenchArgs::from_flags([
        "--url",
        &url,
        "--mode",
        "follow",
        "--board",
        "fol",
        "--players",
        "300",
        "--subscribers",
        "60",
        "--messages",
        "400",
        "--rate",
        "400",
        "--timeout",
        "20s",
        "--server-pid",
        &std::process::id().to_string(),
        "--quiet",
    ])
    .unwrap();
    let r = run_with(args).await.unwrap();
    assert_eq!((r.connected, r.connect_failed), (60, 0), "{r:?}");
    let f = r.follow.as_ref().expect("follow report");
    assert_eq!(
        (f.posts_ok, f.post_errors, f.players),
        (400, 0, 300),
        "{f:?}"
    );
    assert!(f.followed_posts > 20, "{f:?}");
    assert_eq!(f.seen_first_hand + f.superseded, f.followed_posts, "{f:?}");
    assert_eq!(f.latency_ms.count, f.seen_first_hand, "{f:?}");
    assert!(
        f.deliveries >= f.seen_first_hand && f.deliveries_per_sec > 0.0,
        "{f:?}"
    );
    assert!(
        f.server_cpu_cores.is_some() && f.rss_end_kib.is_some(),
        "{f:?}"
    );
    // Every window caught up after the posts (the neighbours' ones included).
    assert!(f.settled_ms.is_some(), "{f:?}");
    assert!(
        !f.timed_out && r.failures().is_empty(),
        "{:?}",
        r.failures()
    );
    let (_, b) = crate::common::http::get(server.addr, "/api/boards/fol").await;
    assert_eq!(
        (b["players"].as_u64(), b["mode"].as_str()),
        (Some(300), Some("latest"))
    );
    assert!(r.to_text().contains("own window"), "{}", r.to_text());
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
        "empty-continuation",
        "trickle-publish",
        "trickle-publish-chunked",
        "trickle-scores",
        "trickle-scores-chunked",
    ];
    for kind in kinds {
        let topic = format!("atk-{kind}");
        let mut flags = vec![
            "--url",
            url.as_str(),
            "--topic",
            &topic,
            "--subscribers",
            "50",
            "--messages",
            "20",
            // 20 publications in half a second: the checks count them, not their pace,
            // and the attack runs from before the first to after the last.
            "--rate",
            "40",
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
        let with_baseline = kind == "slowloris" || kind == "empty-continuation";
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
            k if k.starts_with("trickle-") => assert!(a.connections >= 2, "{a:?}"),
            "topic-flood" => assert!(
                a.topics_subscribed + a.error_codes.values().sum::<u64>() > 0
                    || a.ended_by_server > 0,
                "{a:?}"
            ),
            // Every frame counts against the command rate: both are closed at once.
            "empty-continuation" => assert_eq!(a.ended_by_server, 2, "{a:?}"),
            _ => {}
        }
        assert!(a.cpu_secs.is_some(), "{kind}: {a:?}");
        assert_eq!(a.baseline.is_some(), with_baseline, "{kind}");
        if let Some(b) = &a.baseline {
            assert_eq!((b.lost, b.delivered), (0, 50 * 20), "{b:?}");
            assert!(b.p99_ratio.is_some(), "{b:?}");
            assert!(b.server_cpu_cores.is_some(), "{b:?}");
            assert!(a.cpu_ms_per_attacker.is_some(), "{a:?}");
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
                subscore: 0.0,
                achieved: 1,
                meta: meta.map(Into::into),
            },
        )
    };
    let envelope = |first| {
        let data = serde_json::json!({
            "board": "b",
            "version": 2,
            "top": ranked(&[first, entry("second", None)], false),
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

fn history_server_config(dir: &std::path::Path) -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.to_path_buf(),
        // A namespace whose history cannot hold a 30-publication gap.
        namespaces: vec![crier::config::Namespace {
            pattern: "short:*".into(),
            history_size: 5,
            history_ttl: std::time::Duration::from_secs(300),
            durable: false,
            presence: false,
            join_leave: false,
        }],
        ..Config::default()
    }
}

/// `--resume-storm` (issue 7): every cut client comes back with its position and gets
/// exactly the publications it missed; a gap the history cannot serve fails the run with
/// every client counted as not recovered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_storm_catches_every_client_up_and_reports_an_unservable_gap() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(history_server_config(dir.path()))
        .await
        .unwrap();
    let url = format!("http://{}", server.addr);
    let pid = std::process::id().to_string();
    let storm = |topic: &'static str| {
        BenchArgs::from_flags([
            "--url",
            &url,
            "--resume-storm",
            "--topic",
            topic,
            "--subscribers",
            "50",
            "--messages",
            "30",
            "--server-pid",
            &pid,
            "--timeout",
            "30s",
            "--quiet",
        ])
        .unwrap()
    };

    let r = run_with(storm("storm")).await.unwrap();
    let s = r.resume.as_ref().expect("resume report");
    assert_eq!(
        (s.subscribed, s.published, s.publish_errors),
        (50, 30, 0),
        "{s:?}"
    );
    assert_eq!(s.target_offset, s.since_offset + 30, "{s:?}");
    assert_eq!(
        (s.reconnected, s.recovered, s.caught_up),
        (50, 50, 50),
        "{s:?}"
    );
    assert_eq!(s.not_recovered, 0, "{s:?}");
    assert_eq!(
        (s.expected_deliveries, s.received_deliveries),
        (50 * 30, 50 * 30),
        "{s:?}"
    );
    assert_eq!(
        (s.lost, s.duplicates, s.out_of_order, s.unexpected),
        (0, 0, 0, 0),
        "{s:?}"
    );
    assert!(!s.timed_out);
    // The server counted the same resumes.
    assert_eq!(
        (s.server_resumes_recovered, s.server_resumes_not_recovered),
        (Some(50), Some(0)),
        "{s:?}"
    );
    assert_eq!(s.catch_up_ms.count, 50);
    assert!(s.all_caught_up_ms >= s.catch_up_ms.p50, "{s:?}");
    let (before, peak) = (s.rss_before_kib.unwrap(), s.rss_peak_kib.unwrap());
    assert!(peak >= before, "{s:?}");
    assert!(r.failures().is_empty(), "{:?}", r.failures());
    assert!(
        r.to_text().contains("caught up    50 clients"),
        "{}",
        r.to_text()
    );

    // Only 5 publications kept: a 30-publication gap cannot be replayed.
    let r = run_with(storm("short:storm")).await.unwrap();
    let s = r.resume.as_ref().unwrap();
    assert_eq!(
        (s.reconnected, s.recovered, s.not_recovered),
        (50, 0, 50),
        "{s:?}"
    );
    assert_eq!(s.caught_up, 0);
    assert_eq!(
        (s.server_resumes_recovered, s.server_resumes_not_recovered),
        (Some(0), Some(50)),
        "{s:?}"
    );
    assert!(
        r.failures()
            .contains(&"50 clients were answered recovered:false".to_string()),
        "{:?}",
        r.failures()
    );
    server.shutdown().await;
}

/// `--publish-throughput` (issue 7): every publication acknowledged once, spread round
/// robin over the topics, offsets contiguous per topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_throughput_counts_acknowledged_publications_over_many_topics() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(history_server_config(dir.path()))
        .await
        .unwrap();
    let url = format!("http://{}", server.addr);
    for (topics, topic) in [("1", "tp-one"), ("10", "tp")] {
        let args = BenchArgs::from_flags([
            "--url",
            &url,
            "--publish-throughput",
            "--topic",
            topic,
            "--topics",
            topics,
            "--messages",
            "200",
            "--concurrency",
            "8",
            "--quiet",
        ])
        .unwrap();
        let r = run_with(args).await.unwrap();
        let t = r.throughput.as_ref().expect("throughput report");
        assert_eq!((t.acked, t.failed), (200, 0), "{t:?}");
        assert_eq!((t.offset_errors, t.epoch_changes), (0, 0), "{t:?}");
        assert_eq!(t.ack_ms.count, 200);
        assert!(t.per_sec > 0.0);
        assert!(r.failures().is_empty(), "{:?}", r.failures());
    }
    // The server holds what the tool says it published: 200 on tp-one, 20 on each tp.N.
    let http = crier::http_client::HttpClient::new(None);
    for (topic, offset) in [("tp-one", 200), ("tp.0", 20), ("tp.9", 20)] {
        let (status, body) = http
            .get(&format!("{url}/api/topics/{topic}/history?limit=1"))
            .await
            .unwrap();
        assert!(status.is_success(), "{status}");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["offset"], offset, "{topic}: {v}");
    }
    server.shutdown().await;
}

/// `--resume-storm --transport sse`: the clients resume with a `Last-Event-ID` header, as
/// a browser's EventSource does, and each gets exactly the publications it missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_storm_over_sse_resumes_with_last_event_id() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(history_server_config(dir.path()))
        .await
        .unwrap();
    let url = format!("http://{}", server.addr);
    let args = BenchArgs::from_flags([
        "--url",
        &url,
        "--resume-storm",
        "--transport",
        "sse",
        "--topic",
        "sse-storm",
        "--subscribers",
        "40",
        "--messages",
        "25",
        "--timeout",
        "30s",
        "--quiet",
    ])
    .unwrap();
    let r = run_with(args).await.unwrap();
    let s = r.resume.as_ref().expect("resume report");
    assert_eq!(r.transport, "sse");
    assert_eq!((s.subscribed, s.published), (40, 25), "{s:?}");
    assert_eq!(
        (s.reconnected, s.recovered, s.caught_up),
        (40, 40, 40),
        "{s:?}"
    );
    assert_eq!(
        (s.expected_deliveries, s.received_deliveries),
        (40 * 25, 40 * 25),
        "{s:?}"
    );
    assert_eq!((s.lost, s.duplicates, s.out_of_order), (0, 0, 0), "{s:?}");
    assert!(r.failures().is_empty(), "{:?}", r.failures());
    server.shutdown().await;
}

/// The load tool is a crate of its own that only the binary wires in (src/main.rs): the
/// server library must never name it, so it is never linked into anything but `crier`.
#[test]
fn the_server_library_never_names_the_load_tool() {
    fn walk(dir: &std::path::Path, hits: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, hits);
            } else if path.extension().is_some_and(|e| e == "rs")
                && !path.ends_with("src/main.rs")
                && std::fs::read_to_string(&path)
                    .unwrap()
                    .contains("crier_bench")
            {
                hits.push(path.display().to_string());
            }
        }
    }
    let mut hits = Vec::new();
    walk(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut hits,
    );
    assert!(hits.is_empty(), "the library names crier_bench in {hits:?}");
    let main = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/main.rs"));
    assert!(main.unwrap().contains("crier_bench::run"));
}

/// `--token-secret` / `--token` (issue 9): every subscriber sends `?token=` (one minted per
/// subscriber with a secret), connects and gets every message of a private topic. The
/// tool's own HS256 encoder is checked against the server's verifier.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_options_connect_every_subscriber_to_a_private_topic() {
    const SECRET: &str = "bench-secret-of-at-least-32-bytes!";
    let exp = crier::auth::token::unix_now() + 600;
    let minted = crier_bench::token::Tokens::minted(SECRET, "private:bench", exp, 100);
    let verifier = crier::auth::Verifier::new(SECRET, &[], None)
        .unwrap()
        .unwrap();
    for i in [0, 7] {
        let g = verifier.verify(minted.for_subscriber(i)).unwrap();
        assert_eq!((&*g.sub, g.exp), (format!("bench-{i}").as_str(), exp));
        assert!(g.allows("private:bench") && !g.allows("private:other"));
    }

    let dir = tempfile::tempdir().unwrap();
    let cfg = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_path_buf(),
        private_topics: vec!["private:*".into()],
        jwt_secret: SECRET.into(),
        ..Config::default()
    };
    let server = Server::start(cfg).await.unwrap();
    let url = format!("http://{}", server.addr);
    let fixed = minted.for_subscriber(99).to_string();
    for (flag, value, kind) in [
        ("--token-secret", SECRET, "minted"),
        ("--token", fixed.as_str(), "fixed"),
    ] {
        let args = BenchArgs::from_flags([
            "--url",
            &url,
            "--topic",
            "private:bench",
            "--subscribers",
            "40",
            "--messages",
            "20",
            flag,
            value,
            "--timeout",
            "30s",
            "--quiet",
        ])
        .unwrap();
        let r = run_with(args).await.unwrap();
        assert_eq!(r.tokens, kind);
        assert_eq!((r.connected, r.connect_failed), (40, 0), "{kind}: {r:?}");
        assert_eq!((r.lost, r.delivered), (0, 40 * 20), "{kind}: {r:?}");
        assert_eq!(r.connect_ms.count, 40);
        assert!(r.connect_total_ms > 0.0);
        assert!(r.to_text().contains(&format!("(tokens: {kind})")));
        assert!(r.failures().is_empty(), "{:?}", r.failures());
    }
    // Tokens belong to fanout; other modes refuse them rather than ignore them.
    let args = BenchArgs::from_flags(["--url", &url, "--mode", "scores", "--token", "x"]).unwrap();
    let e = run_with(args).await.unwrap_err().to_string();
    assert!(e.contains("fanout only"), "{e}");
    server.shutdown().await;
}

/// The tokens of `--token-secret` are really checked: minted with another secret, every
/// subscriber of a private topic is refused at the handshake and the run reports it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_secret_of_another_server_is_refused_at_the_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_path_buf(),
        private_topics: vec!["private:*".into()],
        jwt_secret: "the-servers-secret-of-at-least-32-bytes".into(),
        ..Config::default()
    };
    let server = Server::start(cfg).await.unwrap();
    let url = format!("http://{}", server.addr);
    let args = BenchArgs::from_flags([
        "--url",
        &url,
        "--topic",
        "private:bench",
        "--subscribers",
        "10",
        "--idle",
        "--hold",
        "0s",
        "--token-secret",
        "another-secret-of-at-least-32-bytes!",
        "--quiet",
    ])
    .unwrap();
    let r = run_with(args).await.unwrap();
    assert_eq!((r.connected, r.connect_failed), (0, 10), "{r:?}");
    let e = r.first_connect_error.as_deref().unwrap_or_default();
    assert!(e.contains("401") && e.contains("bad_token"), "{e}");
    server.shutdown().await;
}

/// The many-topics scenario (issue 20): one subscriber per topic, then several per topic,
/// publications at a steady rate round robin over the topics; every subscriber gets
/// exactly its topic's publications, and --server-pid gives CPU per publication.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_topics_deliver_each_topic_to_its_subscribers() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_path_buf(),
        ..Config::default()
    };
    let server = Server::start(cfg).await.unwrap();
    let url = format!("http://{}", server.addr);
    let pid = std::process::id().to_string();
    for (subscribers, topics, messages) in [(200u64, 200u64, 1000u64), (60, 20, 410)] {
        let (s, t, m) = (
            subscribers.to_string(),
            topics.to_string(),
            messages.to_string(),
        );
        let args = BenchArgs::from_flags([
            "--url",
            &url,
            "--topic",
            &format!("many{topics}"),
            "--subscribers",
            &s,
            "--topics",
            &t,
            "--messages",
            &m,
            "--rate",
            "2000",
            "--server-pid",
            &pid,
            "--timeout",
            "30s",
            "--quiet",
        ])
        .unwrap();
        let r = run_with(args).await.unwrap();
        let ctx = format!("{subscribers} on {topics}: {r:?}");
        assert_eq!(
            (r.connected, r.connect_failed),
            (subscribers as usize, 0),
            "{ctx}"
        );
        assert_eq!(
            (r.published, r.topics),
            (messages, topics as usize),
            "{ctx}"
        );
        // Each subscriber expects its topic's share: messages x subscribers / topics here.
        let expected = messages * subscribers / topics;
        assert_eq!(r.expected_deliveries, expected, "{ctx}");
        assert_eq!(r.delivered, expected, "{ctx}");
        assert_eq!(
            (r.lost, r.duplicates, r.out_of_order, r.unexpected),
            (0, 0, 0, 0),
            "{ctx}"
        );
        assert!(!r.timed_out, "{ctx}");
        assert_eq!(r.latency_ms.count, expected, "{ctx}");
        assert!(r.latency_ms.p99 > 0.0, "{ctx}");
        assert!(r.server_cpu_us_per_publication.is_some(), "{ctx}");
        let text = r.to_text();
        assert!(text.contains("us per publication"), "{text}");
        assert!(text.contains(&format!("topics       {topics}")), "{text}");
        assert!(r.failures().is_empty(), "{:?}", r.failures());
    }
    server.shutdown().await;
}

/// `--mode pusher` (fanout and --idle) and `--mode pusher-api` against crier's Pusher
/// door: every subscriber gets every event, the API counts its acknowledged events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pusher_modes_run_against_the_pusher_door() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_path_buf(),
        pusher_app_id: "7".into(),
        pusher_key: "bench-key".into(),
        pusher_secret: "bench-secret".into(),
        ..Config::default()
    })
    .await
    .unwrap();
    let url = format!("http://{}", server.addr);
    let run = |mode: &'static str, extra: &'static [&'static str]| {
        let mut flags = vec![
            "--url",
            url.as_str(),
            "--mode",
            mode,
            "--pusher-app",
            "7:bench-key:bench-secret",
            "--topic",
            "bench-channel",
            "--subscribers",
            "20",
            "--messages",
            "30",
            "--publishers",
            "4",
            "--timeout",
            "20s",
            "--quiet",
        ];
        flags.extend_from_slice(extra);
        let args = BenchArgs::from_flags(flags).unwrap();
        async move { run_with(args).await.unwrap() }
    };
    let r = run("pusher", &[]).await;
    let p = r.pusher.as_ref().expect("pusher report");
    assert_eq!(
        (p.connected, p.deliveries, p.events_failed),
        (20, 600, 0),
        "{p:?}"
    );
    assert_eq!(p.latency_ms.count, 600);
    assert!(r.failures().is_empty(), "{:?}", r.failures());
    let r = run("pusher-api", &[]).await;
    let p = r.pusher.as_ref().expect("pusher report");
    assert_eq!((p.deliveries, p.ack_ms.count), (600, 30), "{p:?}");
    assert!(p.api_events_per_sec > 0.0);
    let r = run("pusher", &["--idle", "--hold", "0s"]).await;
    let p = r.pusher.as_ref().expect("pusher report");
    assert_eq!((p.scenario.as_str(), p.connected), ("idle", 20), "{p:?}");
    // A wrong secret: every event is refused, and the report says so.
    let args = BenchArgs::from_flags([
        "--url",
        &url,
        "--mode",
        "pusher-api",
        "--pusher-app",
        "7:bench-key:wrong",
        "--subscribers",
        "1",
        "--messages",
        "3",
        "--timeout",
        "1s",
        "--quiet",
    ])
    .unwrap();
    let r = run_with(args).await.unwrap();
    assert_eq!(r.pusher.as_ref().unwrap().events_failed, 3);
    assert!(!r.failures().is_empty());
    server.shutdown().await;
}

/// The many-topics scenario over SSE (issue 20): each SSE subscriber starts at its own
/// topic's offset (one topic already holds a publication), gets exactly its topic's
/// publications, and --server-pid gives CPU per publication.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_topics_over_sse_deliver_each_topic_to_its_subscribers() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_path_buf(),
        ..Config::default()
    };
    let server = Server::start(cfg).await.unwrap();
    let url = format!("http://{}", server.addr);
    // An earlier publication: that topic's subscribers start after it, not at 0.
    crate::common::http::publish(server.addr, "ssemany.3", &serde_json::json!({"x": 1})).await;
    let pid = std::process::id().to_string();
    let args = BenchArgs::from_flags([
        "--url",
        &url,
        "--transport",
        "sse",
        "--topic",
        "ssemany",
        "--subscribers",
        "200",
        "--topics",
        "100",
        "--messages",
        "1000",
        "--rate",
        "2000",
        "--server-pid",
        &pid,
        "--timeout",
        "30s",
        "--quiet",
    ])
    .unwrap();
    let r = run_with(args).await.unwrap();
    assert_eq!((r.connected, r.connect_failed), (200, 0), "{r:?}");
    assert_eq!((r.published, r.topics), (1000, 100), "{r:?}");
    assert_eq!(r.transport, "sse", "{r:?}");
    let expected = 1000 * 200 / 100;
    assert_eq!(r.expected_deliveries, expected, "{r:?}");
    assert_eq!(r.delivered, expected, "{r:?}");
    assert_eq!(
        (r.lost, r.duplicates, r.out_of_order, r.unexpected),
        (0, 0, 0, 0),
        "{r:?}"
    );
    assert!(!r.timed_out, "{r:?}");
    assert_eq!(r.latency_ms.count, expected, "{r:?}");
    assert!(r.server_cpu_us_per_publication.is_some(), "{r:?}");
    assert!(r.failures().is_empty(), "{:?}", r.failures());
    server.shutdown().await;
}
