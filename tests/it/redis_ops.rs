//! The Redis broker in production, against real `redis-server` processes: readiness and
//! metrics that follow Redis, publishes and subscribes that fail fast (and cleanly) while
//! it is down, clients that stay connected through an outage, topic keys that expire once
//! nobody uses them, and the other ways to reach Redis (Unix socket, TLS).

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::redis::RedisServer;
use crate::common::{next_json, send_json, within, TestServer};
use crier::http_client::HttpClient;
use serde_json::Value;

async fn node(url: &str, tweak: impl FnOnce(&mut crier::config::Config)) -> TestServer {
    let url = url.to_owned();
    TestServer::start(|c| {
        c.redis = url;
        c.redis_timeout = Duration::from_millis(300);
        tweak(c);
    })
    .await
}

async fn redis_conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("redis connection")
}

/// Polls `/readyz` until it answers `status`; returns its body.
async fn readyz_until(s: &TestServer, status: u16) -> Value {
    within(&format!("/readyz answers {status}"), async {
        loop {
            let (got, body) = s.get("/readyz").await;
            if got == status {
                return body;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// The value of one unlabelled metric line (`name value`).
async fn metric(s: &TestServer, name: &str) -> f64 {
    let (_, bytes) = HttpClient::new(None)
        .get(&s.url("/metrics"))
        .await
        .expect("metrics");
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} in /metrics"))
        .trim()
        .parse()
        .unwrap()
}

/// Redis SIGKILLed and restarted from its snapshot: `/readyz` and the metrics follow it;
/// while it is down a publish is refused (and nothing is published), an SSE subscribe is a
/// 503 and a WebSocket subscribe an error frame, never a silent subscription; the client
/// already subscribed stays connected and gets the next publication once Redis is back.
#[tokio::test]
async fn readiness_metrics_and_fail_fast_follow_redis() {
    crate::need_redis!();
    let mut redis = RedisServer::start();
    let s = node(&redis.url(), |_| {}).await;
    let body = readyz_until(&s, 200).await;
    assert_eq!(body["status"], "ready");
    let node_id = body["node"].as_str().expect("node id").to_owned();
    assert_eq!(node_id.len(), 16);
    assert!(node_id.bytes().all(|b| b.is_ascii_hexdigit()), "{node_id}");
    assert_eq!(metric(&s, "crier_redis_up").await, 1.0);

    let mut ws = s.ws("?topic=t").await;
    let v = next_json(&mut ws).await;
    assert_eq!(
        (v["op"].as_str(), v["offset"].as_u64()),
        (Some("subscribed"), Some(0))
    );
    for i in 1..=2u64 {
        let (status, r) = s.publish("t", &format!(r#"{{"i":{i}}}"#)).await;
        assert_eq!((status, r["offset"].as_u64()), (200, Some(i)), "{r}");
        assert_eq!(next_json(&mut ws).await["offset"], i);
    }
    // Snapshot what Redis holds, so the restart brings the topic back as it was.
    let _: () = redis::cmd("SAVE")
        .query_async(&mut redis_conn(&redis.url()).await)
        .await
        .unwrap();
    redis.kill();

    // The pub/sub connection may notice first; the health check within a second.
    let body = within("/readyz says redis is unreachable", async {
        loop {
            let body = readyz_until(&s, 503).await;
            if body["reasons"]
                .as_array()
                .unwrap()
                .contains(&"redis_unreachable".into())
            {
                return body;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(body["status"], "not_ready");
    assert_eq!(body["node"], node_id.as_str());
    let reasons = body["reasons"].as_array().unwrap();
    assert!(reasons.contains(&"redis_unreachable".into()), "{body}");
    assert_eq!(metric(&s, "crier_redis_up").await, 0.0);
    assert!(metric(&s, "crier_redis_errors_total").await >= 1.0);
    // /healthz stays liveness.
    assert_eq!(s.get("/healthz").await.0, 200);

    let (status, r) = s.publish("t", r#"{"i":"lost"}"#).await;
    assert_eq!(status, 503, "{r}");
    assert_eq!(r["error"]["code"], "store_unavailable");
    let (status, r) = s.get("/sse?topic=u").await;
    assert_eq!(status, 503, "{r}");
    assert_eq!(r["error"]["code"], "store_unavailable");
    send_json(&mut ws, r#"{"op":"subscribe","topic":"u","id":7}"#).await;
    let v = next_json(&mut ws).await;
    assert_eq!(
        (v["op"].as_str(), v["code"].as_str()),
        (Some("error"), Some("store_unavailable")),
        "{v}"
    );

    redis.restart();
    let body = readyz_until(&s, 200).await;
    assert_eq!(body["node"], node_id.as_str());
    assert_eq!(metric(&s, "crier_redis_up").await, 1.0);
    assert!(metric(&s, "crier_redis_reconnects_total").await >= 1.0);
    // The refused publish stored nothing: the next one takes offset 3, and the client,
    // connected all along, receives it.
    let (status, r) = s.publish("t", r#"{"i":3}"#).await;
    assert_eq!((status, r["offset"].as_u64()), (200, Some(3)), "{r}");
    let v = next_json(&mut ws).await;
    assert_eq!(
        (v["offset"].as_u64(), &v["data"]["i"]),
        (Some(3), &Value::from(3)),
        "{v}"
    );
    drop(ws);
    s.assert_clean().await;
}

/// Redis cuts the node's pub/sub connection (`CLIENT KILL TYPE pubsub`, as an output-buffer
/// limit would) while another node keeps publishing: the subscriber stays connected and
/// gets every offset exactly once, in order, the gap filled from history.
#[tokio::test]
async fn a_cut_pubsub_connection_keeps_clients_and_fills_the_gap() {
    crate::need_redis!();
    let redis = RedisServer::start();
    let a = node(&redis.url(), |_| {}).await;
    let b = node(&redis.url(), |_| {}).await;
    let mut ws = a.ws("?topic=g").await;
    assert_eq!(next_json(&mut ws).await["op"], "subscribed");
    let publisher = tokio::spawn({
        let url = b.url("/api/publish/g");
        async move {
            for i in 1..=60u64 {
                // As a publisher should: a 503 (Redis slow to answer on a loaded machine)
                // is retried with the same Idempotency-Key, which publishes at most once.
                let body = format!(r#"{{"i":{i}}}"#);
                let key = format!("cut-{i}");
                let mut attempts = 0;
                loop {
                    let (status, _, v) =
                        crate::common::http::publish_keyed(&url, &body, key.as_bytes()).await;
                    attempts += 1;
                    if status == 503 && attempts < 20 {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                    assert_eq!(status, 200, "{v}");
                    break;
                }
                if i % 20 == 0 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    });
    let mut conn = redis_conn(&redis.url()).await;
    let mut got = Vec::new();
    let mut killed = false;
    within("offsets 1..=60", async {
        while got.last() != Some(&60) {
            let v = next_json(&mut ws).await;
            let o = v["offset"].as_u64().expect("a publication, not a close");
            got.push(o);
            if o == 10 && !killed {
                let n: i64 = redis::cmd("CLIENT")
                    .arg("KILL")
                    .arg("TYPE")
                    .arg("pubsub")
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                assert!(n >= 1);
                killed = true;
            }
        }
    })
    .await;
    publisher.await.unwrap();
    assert_eq!(got, (1..=60).collect::<Vec<_>>());
    assert!(metric(&a, "crier_redis_reconnects_total").await >= 1.0);
}

/// What subscribers to fresh names leave in Redis expires: the meta key gets the topic
/// TTL, refreshed while a node holds a subscriber, and gone once nobody does. A publish
/// sets it too. `max_topics` bounds the node's topic table.
#[tokio::test]
async fn topic_keys_expire_once_nobody_uses_them() {
    crate::need_redis!();
    let redis = RedisServer::start();
    let s = node(&redis.url(), |c| {
        c.redis_topic_ttl = Duration::from_millis(1500);
        c.max_topics = 2;
    })
    .await;
    let conn = redis_conn(&redis.url()).await;
    let pttl = |k: &'static str| {
        let mut conn = conn.clone();
        async move {
            redis::cmd("PTTL")
                .arg(k)
                .query_async::<i64>(&mut conn)
                .await
                .unwrap()
        }
    };
    let mut ws = s.ws("?topic=fresh").await;
    assert_eq!(next_json(&mut ws).await["op"], "subscribed");
    let first = pttl("crier:{fresh}:m").await;
    assert!((1..=1500).contains(&first), "PTTL {first}");
    // Held by a subscriber: refreshed before it runs out, again and again.
    let mut lowest_seen = first;
    within("the TTL is refreshed three times", async {
        let mut refreshed = 0;
        while refreshed < 3 {
            let now = pttl("crier:{fresh}:m").await;
            assert!(now > 0, "a held topic expired");
            if now > lowest_seen {
                refreshed += 1;
            }
            lowest_seen = now;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    // A publish sets it as well.
    let (status, _) = s.publish("pub", "{}").await;
    assert_eq!(status, 200);
    let p = pttl("crier:{pub}:m").await;
    assert!((1..=1500).contains(&p), "PTTL {p}");
    // Node-wide topic budget: two topics held, a third is refused.
    send_json(&mut ws, r#"{"op":"subscribe","topic":"second"}"#).await;
    assert_eq!(next_json(&mut ws).await["op"], "subscribed");
    send_json(&mut ws, r#"{"op":"subscribe","topic":"third"}"#).await;
    let v = next_json(&mut ws).await;
    assert_eq!(
        (v["op"].as_str(), v["code"].as_str()),
        (Some("error"), Some("too_many_topics")),
        "{v}"
    );
    // Nobody holds it any more: it expires.
    drop(ws);
    s.assert_clean().await;
    within("the unused topic's key expires", async {
        while pttl("crier:{fresh}:m").await != -2 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

/// A redis-server of this test's own, for the transports the shared harness does not
/// start (a Unix socket, TLS). Killed on drop.
struct OwnRedis(Child);

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn own_redis(dir: &std::path::Path, args: &[&str]) -> OwnRedis {
    OwnRedis(
        Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("redis-server runs"),
    )
}

/// Publishes once and checks a WebSocket subscriber of the same node receives it.
async fn publish_and_receive(s: &TestServer) {
    assert_eq!(readyz_until(s, 200).await["status"], "ready");
    let mut ws = s.ws("?topic=x").await;
    assert_eq!(next_json(&mut ws).await["op"], "subscribed");
    let (status, r) = s.publish("x", r#"{"hello":1}"#).await;
    assert_eq!((status, r["offset"].as_u64()), (200, Some(1)), "{r}");
    let v = next_json(&mut ws).await;
    assert_eq!(v["data"]["hello"], 1, "{v}");
}

/// Waits (bounded) until `connect` succeeds against a freshly started server.
async fn started(url: &str) {
    let client = redis::Client::open(url).unwrap();
    within("redis-server accepts connections", async {
        while client.get_multiplexed_async_connection().await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn a_unix_socket_redis_works() {
    crate::need_redis!();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("redis.sock");
    let _redis = own_redis(
        dir.path(),
        &["--port", "0", "--unixsocket", sock.to_str().unwrap()],
    );
    let url = format!("redis+unix://{}", sock.display());
    started(&url).await;
    let s = node(&url, |_| {}).await;
    publish_and_receive(&s).await;
}

/// `rediss://` against a redis-server with TLS only, its certificate signed by a private CA
/// given as `redis_ca`. The certificates are made with the `openssl` command line.
#[tokio::test]
async fn a_tls_redis_works_with_a_private_ca() {
    crate::need_redis!();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let openssl = |args: &[&str]| {
        let ok = Command::new("openssl")
            .args(args)
            .current_dir(d)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("openssl runs")
            .success();
        assert!(ok, "openssl {args:?}");
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=crier test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    std::fs::write(
        d.join("ext.cnf"),
        "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
        "-out",
        "server.pem",
    ]);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let path = |f: &str| d.join(f).to_str().unwrap().to_owned();
    let _redis = own_redis(
        d,
        &[
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--tls-cert-file",
            &path("server.pem"),
            "--tls-key-file",
            &path("server.key"),
            "--tls-ca-cert-file",
            &path("ca.pem"),
            "--tls-auth-clients",
            "no",
        ],
    );
    let url = format!("rediss://127.0.0.1:{port}");
    let ca = path("ca.pem");
    let certs = || redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(std::fs::read(&ca).unwrap()),
    };
    let probe = redis::Client::build_with_tls(url.as_str(), certs()).unwrap();
    within("redis-server accepts TLS connections", async {
        while probe.get_multiplexed_async_connection().await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // Without the CA the server's certificate is not trusted: crier refuses to start.
    let data = tempfile::tempdir().unwrap();
    let cfg = crier::config::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: data.path().to_path_buf(),
        redis: url.clone(),
        redis_timeout: Duration::from_millis(500),
        ..crier::config::Config::default()
    };
    assert!(crier::server::Server::start(cfg).await.is_err());
    let s = node(&url, |c| c.redis_ca = ca.clone()).await;
    publish_and_receive(&s).await;
}

/// The receipt's `subscribers` is the cluster total from `crier:{T}:n` (fresh fields only,
/// stale ones removed), and this node's own count while no node writes that hash.
#[tokio::test]
async fn receipts_count_subscribers_across_nodes() {
    crate::need_redis!();
    let redis = RedisServer::start();
    let s = node(&redis.url(), |_| {}).await;
    let mut ws = s.ws("?topic=c").await;
    assert_eq!(next_json(&mut ws).await["op"], "subscribed");
    let (status, r) = s.publish("c", "{}").await;
    assert_eq!((status, r["subscribers"].as_u64()), (200, Some(1)), "{r}");

    let mut conn = redis_conn(&redis.url()).await;
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await.unwrap();
    let now_ms = secs * 1000 + micros / 1000;
    let _: () = redis::cmd("HSET")
        .arg("crier:{c}:n")
        .arg("node-a")
        .arg(format!("4:{}", now_ms + 60_000))
        .arg("node-b")
        .arg(format!("3:{}", now_ms + 60_000))
        .arg("dead-node")
        .arg("100:1")
        .query_async(&mut conn)
        .await
        .unwrap();
    let (status, r) = s.publish("c", "{}").await;
    assert_eq!((status, r["subscribers"].as_u64()), (200, Some(7)), "{r}");
    let dead: bool = redis::cmd("HEXISTS")
        .arg("crier:{c}:n")
        .arg("dead-node")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        !dead,
        "a stale field is removed by the publish that read it"
    );
}
