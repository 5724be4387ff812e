//! Webhooks (issue 17) against real receivers over 127.0.0.1: a receiver in this test
//! checking every signature (HMAC-SHA256 of `timestamp.body`), the occupied/vacated
//! grace, member events, a receiver down for 10 s (503, then refusing connections) that
//! gets every event afterwards, a receiver that never answers next to a healthy
//! subscriber, the queue bound, two nodes over redis-server (once per cluster, and a
//! SIGKILLed node's topics vacated by a survivor), and the docs' Node, Python and Go
//! receivers (docs/examples/webhooks/) accepting real deliveries and refusing a tampered
//! one.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use crier::config::{Config, Namespace};
use crier::metrics::WebhookLabel;
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::common::auth::{hs256, now};
use crate::common::{next_json, topic_command, wait_until, within, TestServer, Ws};

const SECRET: &str = "webhook-tests-secret-of-32-bytes!!!";
const JWT: &str = "webhook-tests-jwt-secret-32-bytes!!!!";

/// A receiver as the docs describe one: checks the signature and the timestamp's skew,
/// answers `status` (200 by default), and keeps the events of the deliveries it took.
#[derive(Default)]
struct Receiver {
    status: AtomicU16,
    events: Mutex<Vec<Value>>,
    /// Deliveries answered with a 2xx, and any that failed the check.
    taken: AtomicUsize,
    bad: AtomicUsize,
}

impl Receiver {
    fn events(&self) -> Vec<Value> {
        self.events.lock().clone()
    }

    /// `(name, topic)` of each event taken, in order.
    fn names(&self) -> Vec<(String, String)> {
        self.events()
            .iter()
            .map(|e| {
                (
                    e["name"].as_str().unwrap().to_string(),
                    e["topic"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    async fn wait_for(&self, what: &str, cond: impl Fn(&[(String, String)]) -> bool) {
        wait_until(what, || cond(&self.names())).await;
    }
}

fn signature(secret: &[u8], timestamp: &str, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(timestamp.as_bytes());
    ctx.update(b".");
    ctx.update(body);
    let hex: String = ctx
        .sign()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256={hex}")
}

async fn receive(State(r): State<Arc<Receiver>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let status = match r.status.load(Ordering::SeqCst) {
        0 => 200,
        s => s,
    };
    let ts = headers
        .get("x-crier-timestamp")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let sig = headers
        .get("x-crier-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let skew = ts.parse::<i64>().map_or(i64::MAX, |t| (t - now()).abs());
    if sig != signature(SECRET.as_bytes(), ts, &body) || skew > 300 {
        r.bad.fetch_add(1, Ordering::SeqCst);
        return StatusCode::UNAUTHORIZED;
    }
    if status != 200 {
        return StatusCode::from_u16(status).unwrap();
    }
    let v: Value = serde_json::from_slice(&body).expect("the body is JSON");
    assert!(v["time_ms"].as_u64().is_some(), "{v}");
    r.events
        .lock()
        .extend(v["events"].as_array().expect("events").iter().cloned());
    r.taken.fetch_add(1, Ordering::SeqCst);
    StatusCode::OK
}

/// Serves `r` on `listener` until `stop`.
fn serve(listener: TcpListener, r: Arc<Receiver>, stop: CancellationToken) {
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(receive))
        .with_state(r);
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
            .unwrap();
    });
}

async fn receiver() -> (Arc<Receiver>, String, SocketAddr, CancellationToken) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let r = Arc::new(Receiver::default());
    let stop = CancellationToken::new();
    serve(listener, r.clone(), stop.clone());
    (r, format!("http://{addr}/hook"), addr, stop)
}

fn webhooks(c: &mut Config, url: &str) {
    c.webhook_urls = vec![url.to_string()];
    c.webhook_secret = SECRET.into();
    c.webhook_vacate_grace = Duration::from_millis(300);
    c.webhook_linger = Duration::from_millis(5);
    c.namespaces.push(Namespace {
        pattern: "room:*".into(),
        history_size: 10,
        history_ttl: Duration::from_secs(60),
        durable: false,
        presence: true,
        join_leave: false,
    });
    c.jwt_secret = JWT.into();
}

async fn subscribe(ws: &mut Ws, topic: &str) {
    topic_command(ws, "subscribe", topic).await;
}

async fn unsubscribe(ws: &mut Ws, topic: &str) {
    topic_command(ws, "unsubscribe", topic).await;
}

fn pair(name: &str, topic: &str) -> (String, String) {
    (name.to_string(), topic.to_string())
}

fn counter(server: &TestServer, url: &str, outcome: &'static str) -> u64 {
    server
        .state()
        .metrics
        .webhook_events
        .get_or_create(&WebhookLabel {
            url: url.to_string(),
            outcome,
        })
        .get()
}

#[tokio::test]
async fn occupied_then_vacated_after_the_grace_without_flapping() {
    let (r, url, _, _stop) = receiver().await;
    let server = TestServer::start(|c| webhooks(c, &url)).await;
    let mut ws = server.ws("").await;
    subscribe(&mut ws, "match:1").await;
    r.wait_for("occupied", |n| !n.is_empty()).await;
    // A page reload: gone and back well within the grace.
    drop(ws);
    let mut ws = server.ws("").await;
    subscribe(&mut ws, "match:1").await;
    let held = Instant::now();
    // A second subscriber and its leave change nothing either.
    let mut other = server.ws("").await;
    subscribe(&mut other, "match:1").await;
    unsubscribe(&mut other, "match:1").await;
    drop(ws);
    r.wait_for("vacated", |n| n.len() >= 2).await;
    assert!(
        held.elapsed() >= Duration::from_millis(300),
        "after the grace"
    );
    assert_eq!(
        r.names(),
        [
            pair("topic_occupied", "match:1"),
            pair("topic_vacated", "match:1")
        ],
        "one occupy, one vacate: the reload did not flap"
    );
    assert_eq!(r.bad.load(Ordering::SeqCst), 0);
    // The receiver records a batch before it answers; the node counts it on the answer.
    wait_until("the node counted both deliveries", || {
        counter(&server, &url, "delivered") >= 2
    })
    .await;
    assert_eq!(counter(&server, &url, "delivered"), 2);
    drop(other);
    server.assert_clean().await;
}

#[tokio::test]
async fn members_join_and_leave_with_their_user_and_info() {
    let (r, url, _, _stop) = receiver().await;
    let server = TestServer::start(|c| {
        webhooks(c, &url);
        c.webhook_events = vec!["member_joined".into(), "member_left".into()];
    })
    .await;
    let token = hs256(
        &json!({"sub": "alice", "exp": now() + 600, "info": {"name": "Alice"}}),
        JWT,
    );
    let mut alice = server.ws(&format!("?token={token}")).await;
    subscribe(&mut alice, "room:1").await;
    let mut anon = server.ws("").await;
    subscribe(&mut anon, "room:1").await;
    // Not a presence topic: no member events (and topic events are filtered out).
    subscribe(&mut anon, "plain").await;
    unsubscribe(&mut anon, "room:1").await;
    drop(alice);
    r.wait_for("two joins and two leaves", |n| n.len() >= 4)
        .await;
    let ev = r.events();
    let names: Vec<&str> = ev.iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "member_joined",
            "member_joined",
            "member_left",
            "member_left"
        ]
    );
    assert!(ev.iter().all(|e| e["topic"] == "room:1"));
    assert_eq!(ev[0]["user"], "alice");
    assert_eq!(ev[0]["info"], json!({"name": "Alice"}));
    assert!(ev[1]["user"].is_null() && ev[1]["info"].is_null());
    assert_eq!(
        ev[2]["client"], ev[1]["client"],
        "the anonymous one left first"
    );
    assert_eq!(ev[3]["user"], "alice", "a leave carries the member too");
    assert_eq!(ev[3]["info"], json!({"name": "Alice"}));
    drop(anon);
    server.assert_clean().await;
}

/// Every event made while the receiver is down (503 for 5 s, then no listener at all for
/// 5 s) reaches it afterwards, each exactly once: only deliveries it answered 2xx count,
/// and those are never sent again.
#[tokio::test]
async fn a_receiver_down_for_ten_seconds_gets_every_event_afterwards() {
    let (r, url, addr, stop) = receiver().await;
    let server = TestServer::start(|c| {
        webhooks(c, &url);
        c.webhook_vacate_grace = Duration::ZERO;
        c.webhook_batch_max = 7;
    })
    .await;
    r.status.store(503, Ordering::SeqCst);
    let down = Instant::now();
    let mut ws = server.ws("").await;
    for i in 0..20 {
        subscribe(&mut ws, &format!("down:{i}")).await;
        unsubscribe(&mut ws, &format!("down:{i}")).await;
    }
    wait_until("a delivery was refused with 503 and retried", || {
        counter(&server, &url, "retried") > 0
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5).saturating_sub(down.elapsed())).await;
    // Now refusing connections: the listener is closed.
    stop.cancel();
    for i in 20..30 {
        subscribe(&mut ws, &format!("down:{i}")).await;
        unsubscribe(&mut ws, &format!("down:{i}")).await;
    }
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(down.elapsed())).await;
    assert!(r.names().is_empty(), "nothing taken while down");
    // Back, on the same port.
    let listener = TcpListener::bind(addr).await.unwrap();
    r.status.store(200, Ordering::SeqCst);
    serve(listener, r.clone(), CancellationToken::new());
    // The next retry may be a whole backoff away: after 10 s of failures its ceiling is
    // about 13 s (100 ms doubling, full jitter), so wait past the longest backoff (30 s).
    tokio::time::timeout(Duration::from_secs(40), async {
        while r.names().len() < 60 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("every event delivered within one longest backoff after the outage");
    let mut seen: HashMap<(String, String), usize> = HashMap::new();
    for n in r.names() {
        *seen.entry(n).or_default() += 1;
    }
    for i in 0..30 {
        let t = format!("down:{i}");
        assert_eq!(seen.get(&pair("topic_occupied", &t)), Some(&1), "{t}");
        assert_eq!(seen.get(&pair("topic_vacated", &t)), Some(&1), "{t}");
    }
    assert_eq!(r.names().len(), 60, "none twice");
    // The receiver records a batch before it answers; the node counts it on the answer.
    wait_until("the node counted every delivery", || {
        counter(&server, &url, "delivered") >= 60
    })
    .await;
    assert_eq!(counter(&server, &url, "delivered"), 60);
    assert_eq!(counter(&server, &url, "dropped"), 0);
    assert_eq!(r.bad.load(Ordering::SeqCst), 0);
}

/// A receiver that takes the connection and never answers: its deliveries wait, its
/// queue keeps only the newest `webhook_queue_max` events (the rest dropped and counted),
/// and a subscriber next to it gets every publication at once.
#[tokio::test]
async fn a_dead_receiver_slows_nothing_and_its_queue_drops_the_oldest() {
    let hole = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hole_addr = hole.local_addr().unwrap();
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = held.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = hole.accept().await {
            keep.lock().push(s);
        }
    });
    let url = format!("http://{hole_addr}/hook");
    let server = TestServer::start(|c| {
        webhooks(c, &url);
        c.webhook_vacate_grace = Duration::ZERO;
        c.webhook_batch_max = 1;
        c.webhook_queue_max = 5;
        c.webhook_timeout = Duration::from_secs(60);
    })
    .await;
    let mut healthy = server.ws("").await;
    subscribe(&mut healthy, "news").await;
    let mut churn = server.ws("").await;
    let started = Instant::now();
    for i in 0..50 {
        subscribe(&mut churn, &format!("churn:{i}")).await;
        unsubscribe(&mut churn, &format!("churn:{i}")).await;
        let (s, _) = server.publish("news", &format!(r#"{{"n":{i}}}"#)).await;
        assert_eq!(s, 200);
        let v = within("the healthy subscriber's publication", async {
            loop {
                let v = next_json(&mut healthy).await;
                if v.get("data").is_some() {
                    return v;
                }
            }
        })
        .await;
        assert_eq!(v["data"]["n"], i);
    }
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "fan-out kept its pace: {:?}",
        started.elapsed()
    );
    // 1 occupied + 1 vacated for news' neighbours: 100 events, one in flight, 5 queued.
    let queued = counter(&server, &url, "queued");
    let dropped = counter(&server, &url, "dropped");
    assert_eq!(queued, 101, "news occupied + 50 churn topics x 2");
    assert!(
        (95..=96).contains(&dropped),
        "all but the one in flight and the newest 5: {dropped}"
    );
    assert_eq!(counter(&server, &url, "delivered"), 0);
}

#[tokio::test]
async fn a_short_secret_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_path_buf(),
        webhook_urls: vec!["http://127.0.0.1:9/hook".into()],
        webhook_secret: "short".into(),
        ..Config::default()
    };
    // Config::resolve checks it; Server::start on a hand-built config does too.
    let err = crier::server::Server::start(cfg).await.err();
    assert!(
        err.is_some_and(|e| format!("{e:#}").contains("at least 32 bytes")),
        "a short secret stops the start"
    );
    // And no secret at all.
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_path_buf(),
        webhook_urls: vec!["http://127.0.0.1:9/hook".into()],
        ..Config::default()
    };
    let err = crier::server::Server::start(cfg).await.err();
    assert!(
        err.is_some_and(|e| format!("{e:#}").contains("webhook_secret is not")),
        "no secret stops the start"
    );
    // The binary says so too, before it listens.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_crier"))
        .args(["serve", "--listen", "127.0.0.1:0", "--webhook-url"])
        .arg("http://127.0.0.1:9/hook")
        .args(["--webhook-secret", "too-short"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("webhook_secret must be at least 32 bytes"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("too-short"),
        "the secret is never printed: {stderr}"
    );
}

/// `crier serve --redis ... --webhook-url ...`, the real binary.
fn cluster_node(
    redis: &crate::common::redis::RedisServer,
    url: &str,
) -> (crate::common::Proc, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let (proc, addr) = crate::common::serve_binary(
        dir.path(),
        "127.0.0.1:0",
        &[
            "--redis",
            &redis.url(),
            "--webhook-url",
            url,
            "--webhook-secret",
            SECRET,
            "--webhook-vacate-grace",
            "200ms",
            "--webhook-linger",
            "5ms",
        ],
    );
    (proc, addr, dir)
}

/// Two nodes on one redis-server: a topic held on both is occupied and vacated once for
/// the cluster, and the topics of a node killed with SIGKILL are vacated, once, by the
/// survivor's sweep.
#[tokio::test]
async fn two_nodes_occupy_and_vacate_once_per_cluster() {
    crate::need_redis!();
    let redis = crate::common::redis::RedisServer::start();
    let (r, url, _, _stop) = receiver().await;
    let (_a, a, _da) = cluster_node(&redis, &url);
    let (mut b_proc, b, _db) = cluster_node(&redis, &url);

    let mut on_a = crate::common::http::ws(&a, "").await;
    subscribe(&mut on_a, "lobby").await;
    r.wait_for("occupied", |n| !n.is_empty()).await;
    let mut on_b = crate::common::http::ws(&b, "").await;
    subscribe(&mut on_b, "lobby").await;
    drop(on_a);
    // No event can be awaited here: give node A well past its 200 ms grace to (wrongly)
    // report the topic vacated while B still holds it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    drop(on_b);
    r.wait_for("vacated", |n| n.len() >= 2).await;
    assert_eq!(
        r.names(),
        [
            pair("topic_occupied", "lobby"),
            pair("topic_vacated", "lobby")
        ]
    );

    // Only B holds the arena; B dies without a word.
    let mut on_b = crate::common::http::ws(&b, "").await;
    subscribe(&mut on_b, "arena").await;
    r.wait_for("arena occupied", |n| n.len() >= 3).await;
    let killed = Instant::now();
    let _ = b_proc.0.kill();
    let _ = b_proc.0.wait();
    drop(on_b);
    let deadline = Instant::now() + Duration::from_secs(20);
    while r.names().len() < 4 {
        assert!(
            Instant::now() < deadline,
            "the dead node's topic was never vacated"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = killed.elapsed();
    assert!(
        took < Duration::from_secs(9),
        "vacated {took:?} after the kill"
    );
    assert_eq!(
        r.names()[2..],
        [
            pair("topic_occupied", "arena"),
            pair("topic_vacated", "arena")
        ]
    );
    // A sweep runs every second on the survivor: give it three more to (wrongly) repeat it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(r.names().len(), 4, "once per cluster: {:?}", r.names());
    assert_eq!(r.bad.load(Ordering::SeqCst), 0);
    eprintln!("a SIGKILLed node's topic was vacated {took:?} after the kill");
}

/// Two nodes on one redis-server with a presence namespace: the members of a node killed
/// with SIGKILL get their `member_left`, once, from the survivor that removed them
/// (scaling.md, "Presence"), with the user and info their `member_joined` carried.
#[tokio::test]
async fn a_dead_nodes_members_get_their_member_left_once() {
    crate::need_redis!();
    let redis = crate::common::redis::RedisServer::start();
    let (r, url, _, _stop) = receiver().await;
    let node = |dir: &tempfile::TempDir| {
        let cfg = dir.path().join("crier.toml");
        std::fs::write(
            &cfg,
            "[[namespace]]\npattern = \"room:*\"\npresence = true\n",
        )
        .unwrap();
        crate::common::serve_binary(
            dir.path(),
            "127.0.0.1:0",
            &[
                "--redis",
                &redis.url(),
                "--config",
                cfg.to_str().unwrap(),
                "--webhook-url",
                &url,
                "--webhook-secret",
                SECRET,
                "--webhook-linger",
                "5ms",
            ],
        )
    };
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (_a, a) = node(&da);
    let (mut b_proc, b) = node(&db);
    let members = |name: &str| -> Vec<Value> {
        r.events()
            .into_iter()
            .filter(|e| e["name"] == name && e["topic"] == "room:x")
            .collect()
    };
    let mut on_b = Vec::new();
    for _ in 0..2 {
        let mut w = crate::common::http::ws(&b, "").await;
        subscribe(&mut w, "room:x").await;
        on_b.push(w);
    }
    wait_until("two member_joined", || members("member_joined").len() == 2).await;

    let killed = Instant::now();
    let _ = b_proc.0.kill();
    let _ = b_proc.0.wait();
    drop(on_b);
    let deadline = Instant::now() + Duration::from_secs(20);
    while members("member_left").len() < 2 {
        assert!(
            Instant::now() < deadline,
            "the dead node's members never left"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "a SIGKILLed node's members got member_left {:?} after the kill",
        killed.elapsed()
    );
    let client = |e: &Value| e["client"].as_str().unwrap().to_string();
    let mut joined: Vec<String> = members("member_joined").iter().map(client).collect();
    let mut left: Vec<String> = members("member_left").iter().map(client).collect();
    joined.sort();
    left.sort();
    assert_eq!(joined, left);
    // Once: a member joining on the survivor afterwards is reported after them, and no
    // second member_left came with it.
    let mut on_a = crate::common::http::ws(&a, "").await;
    subscribe(&mut on_a, "room:x").await;
    wait_until("the survivor's member_joined", || {
        members("member_joined").len() == 3
    })
    .await;
    assert_eq!(members("member_left").len(), 2, "{:?}", r.names());
    assert_eq!(r.bad.load(Ordering::SeqCst), 0);
}

/// One of the docs' receivers (examples/webhooks/), run for real: its stdout lines (the
/// events it took) and its port.
struct Example {
    child: crate::common::Proc,
    port: u16,
    lines: std::sync::mpsc::Receiver<String>,
}

fn example(lang: &str) -> Option<Example> {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let (bin, install, args): (&str, &str, &[&str]) = match lang {
        "node" => (
            "node",
            "apt-get install -y nodejs",
            &["examples/webhooks/verify.mjs"],
        ),
        "python" => (
            "python3",
            "apt-get install -y python3",
            &["examples/webhooks/verify.py"],
        ),
        _ => (
            "go",
            "apt-get install -y golang-go",
            &["run", "examples/webhooks/verify.go"],
        ),
    };
    let bin = crate::common::tools::require(bin, install)?;
    let mut child = Command::new(bin)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(args)
        .arg("0")
        .env("CRIER_WEBHOOK_SECRET", SECRET)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the example starts");
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(l);
        }
    });
    let (ptx, prx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(p) = l.strip_prefix("listening on ") {
                let _ = ptx.send(p.trim().parse::<u16>().unwrap());
            } else {
                eprintln!("example: {l}");
            }
        }
    });
    // `go run` compiles first: allow it a minute on a shared machine.
    let port = prx
        .recv_timeout(Duration::from_secs(120))
        .unwrap_or_else(|_| panic!("the {lang} example logs its port"));
    Some(Example {
        child: crate::common::Proc(child),
        port,
        lines,
    })
}

/// POSTs `body` to the example with the given timestamp and signature; its status.
async fn post_signed(port: u16, timestamp: &str, signature: &str, body: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let req = format!(
        "POST /hook HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n\
         x-crier-timestamp: {timestamp}\r\nx-crier-signature: {signature}\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    within("the example answers", s.read_to_end(&mut out))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out);
    text.split(' ').nth(1).unwrap().parse().unwrap()
}

/// The example's next stdout line, without blocking the runtime the server runs on.
async fn next_line(ex: &Example, lang: &str) -> String {
    within(&format!("{lang}: an event printed"), async {
        loop {
            if let Ok(l) = ex.lines.try_recv() {
                return l;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

async fn example_takes_deliveries_and_refuses_tampering(lang: &str) {
    let Some(ex) = example(lang) else {
        return;
    };
    let url = format!("http://127.0.0.1:{}/hook", ex.port);
    let server = TestServer::start(|c| webhooks(c, &url)).await;
    let mut ws = server.ws("").await;
    subscribe(&mut ws, "game:7").await;
    drop(ws);
    let mut got = Vec::new();
    while got.len() < 2 {
        let line = next_line(&ex, lang).await;
        got.push(serde_json::from_str::<Value>(&line).expect("one JSON event per line"));
    }
    assert_eq!(got[0]["name"], "topic_occupied", "{lang}");
    assert_eq!(got[1]["name"], "topic_vacated", "{lang}");
    assert!(got.iter().all(|e| e["topic"] == "game:7"));
    let url_label = url.clone();
    // The receiver prints an event before it answers; the counter moves once crier has
    // the answer.
    wait_until("the receiver's 2xx counted", || {
        counter(&server, &url_label, "delivered") >= 2
    })
    .await;
    assert_eq!(
        counter(&server, &url_label, "delivered"),
        2,
        "{lang}: answered 2xx"
    );

    // A delivery signed as crier signs, then tampered with, replayed, or too old.
    let ts = now().to_string();
    let body = r#"{"time_ms":1,"events":[{"name":"topic_occupied","topic":"x","time_ms":1}]}"#;
    let sig = signature(SECRET.as_bytes(), &ts, body.as_bytes());
    let tampered = body.replace("\"x\"", "\"y\"");
    assert_eq!(
        post_signed(ex.port, &ts, &sig, &tampered).await,
        401,
        "{lang}: tampered"
    );
    assert_eq!(
        post_signed(ex.port, &ts, &sig, body).await,
        204,
        "{lang}: genuine"
    );
    assert_eq!(
        post_signed(ex.port, &ts, &sig, body).await,
        409,
        "{lang}: replayed"
    );
    let old = (now() - 3600).to_string();
    let old_sig = signature(SECRET.as_bytes(), &old, body.as_bytes());
    assert_eq!(
        post_signed(ex.port, &old, &old_sig, body).await,
        400,
        "{lang}: too old"
    );
    let line = next_line(&ex, lang).await;
    assert_eq!(serde_json::from_str::<Value>(&line).unwrap()["topic"], "x");
    assert!(
        ex.lines.try_recv().is_err(),
        "{lang}: only the genuine one printed"
    );
    drop(ex.child);
}

#[tokio::test]
async fn node_example_verifies_deliveries() {
    example_takes_deliveries_and_refuses_tampering("node").await;
}

#[tokio::test]
async fn python_example_verifies_deliveries() {
    example_takes_deliveries_and_refuses_tampering("python").await;
}

#[tokio::test]
async fn go_example_verifies_deliveries() {
    example_takes_deliveries_and_refuses_tampering("go").await;
}

/// docs/BENCHMARKS.md, "Webhooks": events/s from the hub's hook to a local receiver that
/// checks every signature, for the default batch (100) and for one event per POST.
/// `cargo test --test it webhook_throughput -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, run by hand"]
async fn webhook_throughput() {
    const N: usize = 100_000;
    for batch in [100, 1] {
        let n = if batch == 1 { N / 10 } else { N };
        let (r, url, _, _stop) = receiver().await;
        let server = TestServer::start(|c| {
            webhooks(c, &url);
            c.webhook_vacate_grace = Duration::ZERO;
            c.webhook_batch_max = batch;
            c.webhook_linger = Duration::from_millis(1);
            c.webhook_queue_max = N;
        })
        .await;
        let events = server.state().hub.events().unwrap().clone();
        let started = Instant::now();
        for i in 0..n / 2 {
            let t = format!("bench:{i}");
            events.occupied(&t);
            events.vacated(&t);
        }
        let queued = started.elapsed();
        let deadline = Instant::now() + Duration::from_secs(300);
        while r.events.lock().len() < n {
            assert!(Instant::now() < deadline, "all delivered");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let took = started.elapsed();
        assert_eq!(r.bad.load(Ordering::SeqCst), 0);
        println!(
            "batch {batch}: {n} events in {took:?} ({:.0} events/s, {:.0} POSTs/s; queued in {queued:?}), dropped {}",
            n as f64 / took.as_secs_f64(),
            r.taken.load(Ordering::SeqCst) as f64 / took.as_secs_f64(),
            counter(&server, &url, "dropped")
        );
    }
}
