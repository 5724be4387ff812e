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
