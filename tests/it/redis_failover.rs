//! What issue 8 promises when Redis or a node misbehaves, checked with real processes: real
//! `redis-server`s (tests/it/common/redis.rs), real `crier serve --redis` nodes, real clients
//! over loopback. Every client here follows its topics the way an application does: it
//! remembers the last offset it got, and when its connection ends (the server closed it,
//! the node died, it cut it itself) it connects again, to the same node or another, with
//! that position. Each client asserts on every publication that it is the very next offset
//! and on every `subscribed` that it is `recovered:true` in the same epoch, so "every
//! acknowledged offset exactly once, in order" holds when each ends at the last
//! acknowledged offset.
//!
//! The tests run one at a time (two cores, several processes each) and each is bounded by
//! `LIMIT`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::http::get;
use crate::common::redis::RedisServer;
use crate::common::{eventsource, spawn_logged, within, Proc};
use crier::http_client::HttpClient;
use futures_util::{SinkExt, StreamExt};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// How long one test may run before it fails.
const LIMIT: Duration = Duration::from_secs(180);
/// How long a connected client may wait for its next message before the test fails.
const STALL: Duration = Duration::from_secs(30);
/// The pause before a client tries again after a refusal (a dead node, Redis down).
const RETRY: Duration = Duration::from_millis(50);
/// The publishers' pace, and the bound that stops a broken test's publisher.
const ROUND: Duration = Duration::from_millis(3);
const MAX_ROUNDS: usize = 5000;

/// Each test starts two or three processes and hundreds of clients on a shared two-core
/// machine: one at a time keeps them from starving each other into false stalls.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn bounded(what: &str, f: impl std::future::Future<Output = ()>) {
    let _one = ONE_AT_A_TIME.lock().await;
    tokio::time::timeout(LIMIT, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: did not finish within {LIMIT:?}"));
}

struct Node {
    proc: Proc,
    addr: SocketAddr,
    /// Every line it logs.
    logs: std::sync::mpsc::Receiver<String>,
    _dir: tempfile::TempDir,
}

/// A `crier serve --redis` node. Heartbeats every second keep an SSE stream that waits for
/// publications from looking stalled to the test's reader.
fn node(redis: &RedisServer, extra: &[&str]) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_crier"));
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .args(["--redis", &redis.url(), "--ping-interval", "1s"])
        .args(extra);
    let (proc, addr, logs) = spawn_logged(cmd);
    Node {
        proc,
        addr: addr.parse().unwrap(),
        logs,
        _dir: dir,
    }
}

impl Node {
    /// How many of the lines it logged so far contain `what`.
    fn logged(&self, what: &str) -> usize {
        self.logs.try_iter().filter(|l| l.contains(what)).count()
    }
}

/// POST /api/publish/TOPIC: the status and JSON body, or None when the node did not answer
/// (it is dead, or died during the request).
async fn post(
    http: &HttpClient,
    addr: SocketAddr,
    topic: &str,
    body: &str,
) -> Option<(u16, Value)> {
    let (status, bytes) = http
        .post(
            &format!("http://{addr}/api/publish/{topic}"),
            body.to_string(),
        )
        .await
        .ok()?;
    Some((
        status.as_u16(),
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    ))
}

/// A publish that must be acknowledged: its offset and epoch.
async fn publish(http: &HttpClient, addr: SocketAddr, topic: &str, body: &str) -> (u64, String) {
    let (status, v) = post(http, addr, topic, body).await.expect("node answers");
    assert_eq!(status, 200, "{v}");
    (
        v["offset"].as_u64().unwrap(),
        v["epoch"].as_str().unwrap().to_string(),
    )
}

async fn redis_conn(redis: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Waits until the node holds no client connection and no subscription. (Its `tasks`
/// count includes this request's own connection and the publishers' idle keep-alive ones.)
async fn assert_node_clean(addr: SocketAddr) {
    let deadline = Instant::now() + crate::common::WAIT;
    loop {
        let (status, h) = get(addr, "/healthz").await;
        assert_eq!(status, 200, "{h}");
        if h["connections"] == 0 && h["subscriptions"] == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the node is left with connections or subscriptions: {h}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until no node subscribes to any crier channel in Redis.
async fn assert_no_redis_subscription(redis: &RedisServer) {
    let mut conn = redis_conn(redis).await;
    within("no crier channel left subscribed in Redis", async {
        loop {
            let channels: Vec<String> = redis::cmd("PUBSUB")
                .arg("CHANNELS")
                .arg("crier:*")
                .query_async(&mut conn)
                .await
                .unwrap();
            if channels.is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// Where one client stands: per topic, the epoch and the last offset it received.
#[derive(Clone, Debug)]
struct Positions {
    epochs: Vec<String>,
    last: Vec<u64>,
    /// The server ended the last connection with 4004 `stream_restarted` (the SSE close
    /// comment says the same): the resume that follows may be `recovered:false`, which
    /// announces the loss. Without it, `recovered:false` is a silent gap made visible.
    announced: bool,
    /// Resumes answered `recovered:false` after an announced loss.
    lost: usize,
}

impl Positions {
    /// Records a publication; it must be the very next offset of its topic.
    fn record(&mut self, client: usize, topics: &[String], v: &Value) {
        let topic = v["topic"].as_str().unwrap_or_else(|| panic!("{v}"));
        let offset = v["offset"].as_u64().expect("an offset");
        let i = topics.iter().position(|t| t == topic).expect("its topic");
        assert_eq!(
            offset,
            self.last[i] + 1,
            "client {client}, {topic}: every offset once, in order"
        );
        self.last[i] = offset;
    }

    /// A `subscribed` reply to a resume: recovered, in the epoch the client knows; or,
    /// right after a 4004 close, `recovered:false`, after which the client goes on from
    /// the position it is given.
    fn resumed(&mut self, client: usize, topics: &[String], v: &Value) {
        let i = topics
            .iter()
            .position(|t| v["topic"] == t.as_str())
            .unwrap_or_else(|| panic!("{v}"));
        if v["recovered"] == false && self.announced {
            self.lost += 1;
            self.epochs[i] = v["epoch"].as_str().unwrap().to_string();
            self.last[i] = v["offset"].as_u64().unwrap();
            return;
        }
        assert_eq!(v["recovered"], true, "client {client}: {v}");
        assert_eq!(v["epoch"], self.epochs[i].as_str(), "client {client}: {v}");
        assert!(v["offset"].as_u64().unwrap() >= self.last[i], "{v}");
    }

    fn done(&self, fin: Option<&Vec<u64>>) -> bool {
        fin.is_some_and(|f| *f == self.last)
    }

    /// The SSE id that resumes every topic from here.
    fn event_id(&self) -> String {
        self.epochs
            .iter()
            .zip(&self.last)
            .map(|(e, o)| format!("{e}:{o}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Counts over all clients, for the tests to wait on.
#[derive(Default)]
struct Stats {
    /// Connections that got the `subscribed` of every topic.
    settled: AtomicUsize,
    /// Connections the client cut itself.
    cuts: AtomicUsize,
}

/// One client and how it behaves.
#[derive(Clone)]
struct Follower {
    id: usize,
    sse: bool,
    nodes: Arc<Vec<SocketAddr>>,
    topics: Arc<Vec<String>>,
    /// The node of its first connection.
    node: usize,
    /// Whether it goes to a random node after a cut or a close; either way a refusal moves
    /// it to the next node.
    roam: bool,
    /// How long each of its first connections lives before it cuts it abruptly (counted
    /// from the last `subscribed`); later ones live until the server ends them or the end.
    lifetimes: Vec<Duration>,
    stats: Arc<Stats>,
    /// The last offset of every topic, once publishing is over.
    fin: watch::Receiver<Option<Vec<u64>>>,
}

/// What a client did, for the tests' assertions.
struct Outcome {
    at: Positions,
    /// Connections the server ended (a close frame, the end of the stream, a reset).
    server_closes: usize,
}

/// How one connection ended.
enum End {
    /// The client holds every final offset.
    Done,
    /// The client cut it (its lifetime ran out).
    Cut,
    /// The server ended it after it was accepted.
    Closed,
    /// It was not accepted: the node is down, or refused the subscription (Redis down).
    Refused,
}

/// What a connection's reading loop waits for next.
enum Next<T> {
    Message(Option<T>),
    /// Nothing for `STALL`: the caller panics with where it stands.
    Stalled,
    Cut,
    FinalKnown,
}

/// The next message, the cut (once every topic is acknowledged), or the final offsets.
async fn next_or<T>(
    msg: impl std::future::Future<Output = Option<T>>,
    cut: Option<Instant>,
    settled: bool,
    fin: &mut watch::Receiver<Option<Vec<u64>>>,
) -> Next<T> {
    let cut_armed = cut.is_some() && settled;
    let deadline = cut.unwrap_or_else(Instant::now);
    // Also when the final offsets came after the caller looked (they are not seen yet):
    // the caller must look again, or a client already holding them waits for a message
    // that never comes.
    let final_open = fin.borrow().is_none() || fin.has_changed().unwrap_or(false);
    tokio::select! {
        m = tokio::time::timeout(STALL, msg) => match m {
            Ok(m) => Next::Message(m),
            Err(_) => Next::Stalled,
        },
        _ = tokio::time::sleep_until(deadline), if cut_armed => Next::Cut,
        _ = fin.changed(), if final_open => Next::FinalKnown,
    }
}

/// Follows its topics across cuts, closes and dead nodes until it holds the final offsets.
async fn follow(mut f: Follower, mut at: Positions, seed: u64) -> Outcome {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let deadline = Instant::now() + LIMIT;
    let mut node = f.node;
    let mut lifetimes = std::mem::take(&mut f.lifetimes).into_iter();
    let mut lifetime = lifetimes.next();
    let mut server_closes = 0;
    loop {
        assert!(Instant::now() < deadline, "client {} never finished", f.id);
        let end = if f.sse {
            sse_session(&mut f, &mut at, node, lifetime).await
        } else {
            ws_session(&mut f, &mut at, node, lifetime).await
        };
        match end {
            End::Done => return Outcome { at, server_closes },
            End::Cut | End::Closed => {
                if matches!(end, End::Cut) {
                    f.stats.cuts.fetch_add(1, Ordering::Relaxed);
                    lifetime = lifetimes.next();
                } else {
                    server_closes += 1;
                }
                if f.roam {
                    node = rng.gen_range(0..f.nodes.len());
                }
            }
            End::Refused => {
                node = (node + 1) % f.nodes.len();
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}

/// Client connections come from 127.0.0.2..=5, as from several machines.
fn source_ip(client: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (client % 4) as u8))
}

async fn ws_session(
    f: &mut Follower,
    at: &mut Positions,
    node: usize,
    lifetime: Option<Duration>,
) -> End {
    let addr = f.nodes[node];
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source_ip(f.id), 0)).unwrap();
    let Ok(Ok(tcp)) = tokio::time::timeout(STALL, socket.connect(addr)).await else {
        return End::Refused;
    };
    let handshake = tokio_tungstenite::client_async(format!("ws://{addr}/ws"), tcp);
    let Ok(Ok((mut ws, _))) = tokio::time::timeout(STALL, handshake).await else {
        return End::Refused;
    };
    for (i, t) in f.topics.iter().enumerate() {
        let cmd = json!({"op":"subscribe","topic":t,"id":i,
            "since":{"offset":at.last[i],"epoch":at.epochs[i]}});
        if ws
            .send(Message::Text(cmd.to_string().into()))
            .await
            .is_err()
        {
            return End::Refused;
        }
    }
    let n = f.topics.len();
    let mut acks = 0;
    let mut cut = None;
    loop {
        if acks == n && lifetime.is_none() && at.done(f.fin.borrow().as_ref()) {
            return End::Done;
        }
        let msg = match next_or(ws.next(), cut, acks == n, &mut f.fin).await {
            Next::Stalled => panic!(
                "client {} (WebSocket) stalled on node {node}: {acks} of {n} topics \
                 acknowledged, at {at:?}, final {:?}",
                f.id,
                f.fin.borrow()
            ),
            Next::Cut => return End::Cut, // dropped without a close frame: abrupt
            Next::FinalKnown => continue,
            Next::Message(Some(Ok(m))) => m,
            Next::Message(None | Some(Err(_))) => return End::Closed,
        };
        let text = match msg {
            Message::Text(t) => t,
            Message::Close(frame) => {
                eprintln!("client {} closed by node {node}: {frame:?}", f.id);
                at.announced = frame.is_some_and(|f| u16::from(f.code) == 4004);
                return End::Closed;
            }
            _ => continue,
        };
        let v: Value = serde_json::from_str(&text).unwrap();
        match v["op"].as_str() {
            None => at.record(f.id, &f.topics, &v),
            Some("subscribed") => {
                at.resumed(f.id, &f.topics, &v);
                acks += 1;
                if acks == n {
                    at.announced = false;
                    f.stats.settled.fetch_add(1, Ordering::Relaxed);
                    cut = lifetime.map(|d| Instant::now() + d);
                }
            }
            Some("error") => {
                // Redis is down or stalled (or the connection is being closed): a clear
                // refusal, and the client tries again.
                assert!(
                    v["code"] == "store_unavailable" || v["code"] == "closed",
                    "client {}: {v}",
                    f.id
                );
                return End::Refused;
            }
            Some(_) => panic!("client {}: unexpected {v}", f.id),
        }
    }
}

async fn sse_session(
    f: &mut Follower,
    at: &mut Positions,
    node: usize,
    lifetime: Option<Duration>,
) -> End {
    let addr = f.nodes[node];
    let query = format!(
        "?{}",
        f.topics
            .iter()
            .map(|t| format!("topic={t}"))
            .collect::<Vec<_>>()
            .join("&")
    );
    let id = at.event_id();
    let mut es = match eventsource::try_open(
        addr,
        Some(source_ip(f.id)),
        &query,
        &[("last-event-id", &id)],
    )
    .await
    {
        Ok(es) => es,
        Err(eventsource::Refused::Io(_)) => return End::Refused,
        Err(eventsource::Refused::Status(status, v)) => {
            // Redis down or stalled, or the node closed the stream while subscribing it
            // (its pub/sub connection was lost meanwhile): a clear 503, and it tries again.
            let code = v["error"]["code"].as_str().unwrap_or_default();
            assert!(
                status == 503 && (code == "store_unavailable" || code == "closed"),
                "client {}: {status} {v}",
                f.id
            );
            return End::Refused;
        }
    };
    let n = f.topics.len();
    let mut acks = 0;
    let mut cut = None;
    loop {
        if acks == n && lifetime.is_none() && at.done(f.fin.borrow().as_ref()) {
            return End::Done;
        }
        let e = match next_or(es.next(), cut, acks == n, &mut f.fin).await {
            Next::Stalled => panic!(
                "client {} (SSE) stalled on node {node}: {acks} of {n} topics acknowledged, \
                 at {at:?}, final {:?}",
                f.id,
                f.fin.borrow()
            ),
            Next::Cut => return End::Cut,
            Next::FinalKnown => continue,
            Next::Message(Some(e)) => e,
            Next::Message(None) => {
                eprintln!("client {} closed by node {node}: {:?}", f.id, es.comments);
                at.announced = es.comments.iter().any(|c| c == "close stream_restarted");
                return End::Closed;
            }
        };
        let v = e.json();
        if e.event.as_deref() == Some("subscribed") {
            at.resumed(f.id, &f.topics, &v);
            acks += 1;
            if acks == n {
                at.announced = false;
                f.stats.settled.fetch_add(1, Ordering::Relaxed);
                cut = lifetime.map(|d| Instant::now() + d);
            }
        } else {
            at.record(f.id, &f.topics, &v);
        }
    }
}

/// Starts `count` followers of `topics` (even ids WebSocket, odd ones SSE), all from offset
/// 0 of the topics' epochs; `setup` adjusts each.
fn spawn_followers(
    count: usize,
    nodes: &[SocketAddr],
    topics: &[&str],
    epochs: &[String],
    stats: &Arc<Stats>,
    fin: &watch::Receiver<Option<Vec<u64>>>,
    mut setup: impl FnMut(&mut Follower),
) -> Vec<tokio::task::JoinHandle<Outcome>> {
    let nodes = Arc::new(nodes.to_vec());
    let topics: Arc<Vec<String>> = Arc::new(topics.iter().map(|t| t.to_string()).collect());
    let start = Positions {
        epochs: epochs.to_vec(),
        last: vec![0; topics.len()],
        announced: false,
        lost: 0,
    };
    (0..count)
        .map(|id| {
            let mut f = Follower {
                id,
                sse: id % 2 == 1,
                nodes: nodes.clone(),
                topics: topics.clone(),
                node: 0,
                roam: false,
                lifetimes: Vec::new(),
                stats: stats.clone(),
                fin: fin.clone(),
            };
            setup(&mut f);
            tokio::spawn(follow(f, start.clone(), id as u64))
        })
        .collect()
}

/// Waits until `stats.settled` reaches `n`.
async fn settled(stats: &Stats, n: usize) {
    within("the clients are subscribed", async {
        while stats.settled.load(Ordering::Relaxed) < n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// Sends the final offsets and collects every client, which must end holding them.
async fn finish(
    fin_tx: watch::Sender<Option<Vec<u64>>>,
    last: Vec<u64>,
    clients: Vec<tokio::task::JoinHandle<Outcome>>,
) -> Vec<Outcome> {
    fin_tx.send(Some(last.clone())).unwrap();
    let mut out = Vec::new();
    for c in clients {
        let o = c.await.expect("client task");
        assert_eq!(o.at.last, last, "every acknowledged offset");
        out.push(o);
    }
    out
}

/// Publishes to `topic` through `through(round)` every `ROUND` until `stop` says so; what
/// is not acknowledged is allowed only when `may_fail` says so. Keeps the highest
/// acknowledged offset in `acked`; returns how many were not acknowledged.
async fn steady_publisher(
    nodes: Vec<SocketAddr>,
    topic: &'static str,
    through: impl Fn(usize) -> usize + Send + 'static,
    may_fail: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
) -> usize {
    let http = HttpClient::new(None);
    let mut failed = 0;
    for round in 0.. {
        assert!(round < MAX_ROUNDS, "the publisher was never stopped");
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let addr = nodes[through(round)];
        match post(&http, addr, topic, &format!(r#"{{"round":{round}}}"#)).await {
            Some((200, v)) => {
                acked.fetch_max(v["offset"].as_u64().unwrap(), Ordering::Relaxed);
            }
            other => {
                assert!(may_fail.load(Ordering::Relaxed), "{other:?}");
                failed += 1;
            }
        }
        tokio::time::sleep(ROUND).await;
    }
    failed
}

/// Redis SIGKILLed mid-stream and restarted on its own files (AOF, `appendfsync always`):
/// what was acknowledged before the kill keeps its offsets and epoch; publishes fail with
/// 503 while it is down; the clients of both nodes (whether their node closes them or not)
/// resume `recovered:true` with every missed offset once, in order; the topic continues at
/// the next offset in the same epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_with_persistence_loses_nothing() {
    crate::need_redis!();
    bounded("redis restart with AOF", async {
        let mut redis =
            RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
        let fast = ["--redis-timeout", "500ms"];
        let (a, b) = (node(&redis, &fast), node(&redis, &fast));
        let nodes = [a.addr, b.addr];
        let http = HttpClient::new(None);
        let (first, epoch) = publish(&http, b.addr, "p", r#"{"i":1}"#).await;
        assert_eq!(first, 1);

        let stats = Arc::new(Stats::default());
        let (fin_tx, fin) = watch::channel(None);
        let clients = spawn_followers(
            20,
            &nodes,
            &["p"],
            std::slice::from_ref(&epoch),
            &stats,
            &fin,
            |f| {
                f.node = f.id % 2;
                f.roam = true;
            },
        );
        settled(&stats, 20).await;
        for i in 2..=10u64 {
            let (o, e) = publish(
                &http,
                nodes[i as usize % 2],
                "p",
                &format!(r#"{{"i":{i}}}"#),
            )
            .await;
            assert_eq!((o, e.as_str()), (i, epoch.as_str()));
        }

        redis.kill();
        for n in nodes {
            let (status, v) = post(&http, n, "p", r#"{"i":"down"}"#).await.unwrap();
            assert_eq!(status, 503, "{v}");
            assert_eq!(v["error"]["code"], "store_unavailable", "{v}");
        }
        // An outage of a couple of seconds: the nodes' reconnect backoff grows meanwhile,
        // and the clients keep being refused (503 or an error frame) and trying again.
        tokio::time::sleep(Duration::from_secs(2)).await;
        redis.restart();

        // The node's command connection comes back by itself; the acknowledged stream is
        // where it was: the next publish is offset 11 of the same epoch.
        let (o, e) = within("publishing works again", async {
            loop {
                match post(&http, b.addr, "p", r#"{"i":11}"#).await {
                    Some((200, v)) => {
                        return (
                            v["offset"].as_u64().unwrap(),
                            v["epoch"].as_str().unwrap().to_string(),
                        )
                    }
                    Some((503, _)) => tokio::time::sleep(RETRY).await,
                    other => panic!("{other:?}"),
                }
            }
        })
        .await;
        assert_eq!((o, e.as_str()), (11, epoch.as_str()));
        // Node a fails fast until its own health check sees Redis again (on a loaded
        // machine, a while after node b took a publish): the publishes below go to both.
        within("node a is ready again", async {
            while get(a.addr, "/readyz").await.0 != 200 {
                tokio::time::sleep(RETRY).await;
            }
        })
        .await;
        let (status, h) = get(
            a.addr,
            &format!("/api/topics/p/history?since=0&epoch={epoch}"),
        )
        .await;
        assert_eq!(status, 200, "{h}");
        assert_eq!(h["recovered"], true, "{h}");
        let offsets: Vec<u64> = h["publications"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["offset"].as_u64().unwrap())
            .collect();
        assert_eq!(offsets, (1..=11).collect::<Vec<u64>>());

        let mut last = 11;
        for i in 12..=30u64 {
            let (o, _) = publish(
                &http,
                nodes[i as usize % 2],
                "p",
                &format!(r#"{{"i":{i}}}"#),
            )
            .await;
            assert_eq!(o, i);
            last = o;
            tokio::time::sleep(ROUND).await;
        }
        finish(fin_tx, vec![last], clients).await;
        assert_no_redis_subscription(&redis).await;
    })
    .await;
}

/// Node b SIGKILLed while a publisher streams through both nodes and 300 clients (200
/// WebSocket, 100 SSE) follow the topic on both: b's clients come back to node a with
/// their position and resume; every client ends with every acknowledged offset exactly
/// once, in order; node a (and Redis) hold nothing of theirs after they close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_under_load_loses_nothing() {
    crate::need_redis!();
    bounded("node killed under load", async {
        const CLIENTS: usize = 300;
        let redis = RedisServer::start();
        let (a, mut b) = (node(&redis, &[]), node(&redis, &[]));
        let nodes = vec![a.addr, b.addr];
        let http = HttpClient::new(None);
        let (_, epoch) = publish(&http, a.addr, "load", r#"{"round":"first"}"#).await;

        let stats = Arc::new(Stats::default());
        let (fin_tx, fin) = watch::channel(None);
        // 200 WebSocket and 100 SSE clients, half of each kind on each node.
        let clients = spawn_followers(CLIENTS, &nodes, &["load"], &[epoch], &stats, &fin, |f| {
            f.sse = f.id % 3 == 1;
            f.node = f.id % 2;
        });
        let on_b = (0..CLIENTS).filter(|i| i % 2 == 1).count();
        settled(&stats, CLIENTS).await;

        let killed = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let publisher = tokio::spawn(steady_publisher(
            nodes.clone(),
            "load",
            {
                let killed = killed.clone();
                move |round| usize::from(round % 2 == 1 && !killed.load(Ordering::Relaxed))
            },
            killed.clone(),
            stop.clone(),
            acked.clone(),
        ));
        // Mid-stream: some publications have gone out through both nodes.
        within("publications flow", async {
            while acked.load(Ordering::Relaxed) < 60 {
                assert!(!publisher.is_finished());
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        killed.store(true, Ordering::Relaxed);
        let _ = b.proc.0.kill(); // SIGKILL
        let _ = b.proc.0.wait();
        settled(&stats, CLIENTS + on_b).await;
        // Publishing goes on a little while everyone is back, then stops.
        let now = stats.settled.load(Ordering::Relaxed);
        assert_eq!(now, CLIENTS + on_b, "only node b's clients reconnect");
        tokio::time::sleep(Duration::from_millis(200)).await;
        stop.store(true, Ordering::Relaxed);
        let failed = publisher.await.unwrap();
        let (last, _) = publish(&http, a.addr, "load", r#"{"round":"last"}"#).await;
        eprintln!("{CLIENTS} clients, node b killed, {last} publications, {failed} refused");

        let outcomes = finish(fin_tx, vec![last], clients).await;
        for (id, o) in outcomes.iter().enumerate() {
            let want = usize::from(id % 2 == 1);
            assert_eq!(
                o.server_closes, want,
                "client {id}: only node b's clients lost it"
            );
        }
        assert_node_clean(a.addr).await;
        assert_no_redis_subscription(&redis).await;
    })
    .await;
}

/// Redis cuts the pub/sub connections (`CLIENT KILL TYPE pubsub`) while the other node
/// keeps publishing: the node's clients are closed and resume, on either node, without
/// loss. Then an output-buffer limit cut (`client-output-buffer-limit pubsub 1kb`, then a
/// burst of 20 KB publications) is detected and recovered the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_connections_cut_by_redis_lose_nothing() {
    crate::need_redis!();
    bounded("pub/sub cut by redis", async {
        const CLIENTS: usize = 40;
        let redis = RedisServer::start();
        let (a, b) = (node(&redis, &[]), node(&redis, &[]));
        let nodes = vec![a.addr, b.addr];
        let http = HttpClient::new(None);
        let (_, epoch) = publish(&http, b.addr, "q", r#"{"round":"first"}"#).await;
        let stats = Arc::new(Stats::default());
        let (fin_tx, fin) = watch::channel(None);
        let clients = spawn_followers(CLIENTS, &nodes, &["q"], &[epoch], &stats, &fin, |f| {
            f.node = 0;
            f.roam = true;
        });
        settled(&stats, CLIENTS).await;
        let stop = Arc::new(AtomicBool::new(false));
        let publisher = tokio::spawn(steady_publisher(
            nodes.clone(),
            "q",
            |_| 1,
            Arc::new(AtomicBool::new(false)),
            stop.clone(),
            Arc::new(AtomicU64::new(0)),
        ));

        let mut conn = redis_conn(&redis).await;
        let killed: i64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("pubsub")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(killed >= 1);
        back_listening(&a).await;

        // Past 1 KB of unsent output Redis drops a subscriber connection; a 20 KB message
        // overflows its 16 KB reply buffer at once.
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("client-output-buffer-limit")
            .arg("pubsub 1kb 1kb 1")
            .query_async(&mut conn)
            .await
            .unwrap();
        let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(20 * 1024));
        let burst: Vec<_> = (0..8)
            .map(|_| {
                let (http, big, b) = (http.clone(), big.clone(), b.addr);
                tokio::spawn(async move { publish(&http, b, "q", &big).await })
            })
            .collect();
        for p in burst {
            p.await.unwrap();
        }
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("client-output-buffer-limit")
            .arg("pubsub 32mb 8mb 60")
            .query_async(&mut conn)
            .await
            .unwrap();
        back_listening(&a).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop.store(true, Ordering::Relaxed);
        publisher.await.unwrap();
        let (last, _) = publish(&http, a.addr, "q", r#"{"round":"last"}"#).await;

        let outcomes = finish(fin_tx, vec![last], clients).await;
        // Each cut is healed from history: the node keeps its clients connected.
        for (id, o) in outcomes.iter().enumerate() {
            assert_eq!(
                o.server_closes, 0,
                "client {id} was closed: the gap is in history"
            );
        }
        for n in nodes {
            assert_node_clean(n).await;
        }
        assert_no_redis_subscription(&redis).await;
    })
    .await;
}

/// Waits until the node has lost its pub/sub connection and listens again (it logs both).
async fn back_listening(node: &Node) {
    within("the node listens again", async {
        let mut back = 0;
        while back == 0 {
            back += node.logged("pub/sub connection back");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// Whether Redis answers a PING within 200 ms.
async fn redis_answers(port: u16) -> bool {
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    let ping = async {
        s.write_all(b"PING\r\n").await.ok()?;
        let mut buf = [0u8; 7];
        s.read_exact(&mut buf).await.ok()?;
        Some(buf)
    };
    matches!(
        tokio::time::timeout(Duration::from_millis(200), ping).await,
        Ok(Some(b)) if &b == b"+PONG\r\n"
    )
}

/// Reads a WebSocket until `want` says a message is the awaited one; publications on the
/// way go to `at`.
async fn ws_until(ws: &mut crate::common::Ws, mut want: impl FnMut(&Message) -> bool) -> Message {
    within("the awaited websocket message", async {
        loop {
            let m = ws.next().await.expect("open").expect("ws message");
            if want(&m) {
                return m;
            }
        }
    })
    .await
}

/// A stalled Redis (`DEBUG SLEEP 3`) does not block what the node does alone: a connected
/// WebSocket client gets its pongs (frame and command), new WebSocket connections are
/// accepted, board pages and /healthz answer, an SSE stream of a Redis topic and a publish
/// get a clear 503 (`store_unavailable`, after `redis_timeout`) instead of hanging. After
/// the stall publishing works and the subscriber has lost nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_redis_does_not_block_local_work() {
    crate::need_redis!();
    bounded("stalled redis", async {
        let redis = RedisServer::start();
        let a = node(&redis, &["--redis-timeout", "500ms"]);
        let http = HttpClient::new(None);
        let (_, epoch) = publish(&http, a.addr, "s", r#"{"i":1}"#).await;
        let (status, v) = {
            let (s, b) = http
                .post(
                    &format!("http://{}/api/boards/arena/scores", a.addr),
                    r#"{"player":"ann","score":7}"#,
                )
                .await
                .unwrap();
            (s.as_u16(), String::from_utf8_lossy(&b).to_string())
        };
        assert_eq!(status, 200, "{v}");
        let (mut w, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", a.addr))
            .await
            .unwrap();
        let sub = json!({"op":"subscribe","topic":"s","since":{"offset":0,"epoch":epoch}});
        w.send(Message::Text(sub.to_string().into())).await.unwrap();
        let mut got = Vec::new();
        let mut record = |m: &Message| {
            if let Message::Text(t) = m {
                let v: Value = serde_json::from_str(t).unwrap();
                if let Some(o) = v["offset"].as_u64().filter(|_| v["op"].is_null()) {
                    got.push(o);
                }
                return got.last() == Some(&1);
            }
            false
        };
        ws_until(&mut w, &mut record).await;

        let mut conn = redis_conn(&redis).await;
        let sleeper = tokio::spawn(async move {
            let _: () = redis::cmd("DEBUG")
                .arg("SLEEP")
                .arg(3)
                .query_async(&mut conn)
                .await
                .unwrap();
        });
        within("redis stalls", async {
            while redis_answers(redis.port).await {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;

        // What needs no Redis answers at once.
        w.send(Message::Ping(b"still there?".to_vec().into()))
            .await
            .unwrap();
        let pong = ws_until(&mut w, |m| matches!(m, Message::Pong(_))).await;
        assert_eq!(pong, Message::Pong(b"still there?".to_vec().into()));
        w.send(Message::Text(r#"{"op":"ping","id":7}"#.into()))
            .await
            .unwrap();
        let reply = ws_until(
            &mut w,
            |m| matches!(m, Message::Text(t) if t.contains("pong")),
        )
        .await;
        let reply: Value = serde_json::from_str(reply.to_text().unwrap()).unwrap();
        assert_eq!(reply, json!({"op":"pong","id":7}));
        let (mut fresh, _) = within(
            "a new websocket is accepted",
            tokio_tungstenite::connect_async(format!("ws://{}/ws", a.addr)),
        )
        .await
        .unwrap();
        fresh
            .send(Message::Text(r#"{"op":"ping","id":8}"#.into()))
            .await
            .unwrap();
        let reply = ws_until(&mut fresh, |m| matches!(m, Message::Text(_))).await;
        assert_eq!(
            serde_json::from_str::<Value>(reply.to_text().unwrap()).unwrap(),
            json!({"op":"pong","id":8})
        );
        for path in ["/healthz", "/api/boards/arena", "/boards/arena"] {
            let (status, _) = HttpClient::new(None)
                .get(&format!("http://{}{path}", a.addr))
                .await
                .unwrap();
            assert_eq!(status.as_u16(), 200, "{path}");
        }
        let (_, board) = get(a.addr, "/api/boards/arena").await;
        assert!(board.to_string().contains("ann"), "{board}");
        assert!(
            !redis_answers(redis.port).await,
            "all of that during the stall"
        );

        // What needs Redis fails fast and clearly.
        let (status, v) = post(&http, a.addr, "s", r#"{"i":"stalled"}"#)
            .await
            .unwrap();
        assert_eq!(
            (status, &v["error"]["code"]),
            (503, &json!("store_unavailable")),
            "{v}"
        );
        match eventsource::open(a.addr, None, "?topic=s", &[]).await {
            Err((status, v)) => {
                assert_eq!(
                    (status, &v["error"]["code"]),
                    (503, &json!("store_unavailable")),
                    "{v}"
                )
            }
            Ok(_) => panic!("an SSE stream of a Redis topic opened while Redis slept"),
        }
        assert!(
            !redis_answers(redis.port).await,
            "the stall outlasted the checks"
        );
        sleeper.await.unwrap();

        // After the stall: publishing works, and the subscriber got every offset once, in
        // order (the publish that timed out may have run when Redis woke: it is delivered
        // like any other).
        let last = within("publishing works again", async {
            loop {
                match post(&http, a.addr, "s", r#"{"i":"after"}"#).await {
                    Some((200, v)) => return v["offset"].as_u64().unwrap(),
                    _ => tokio::time::sleep(RETRY).await,
                }
            }
        })
        .await;
        let mut got2 = Vec::new();
        let mut record2 = |m: &Message| {
            if let Message::Text(t) = m {
                let v: Value = serde_json::from_str(t).unwrap();
                if let Some(o) = v["offset"].as_u64().filter(|_| v["op"].is_null()) {
                    got2.push(o);
                    return o == last;
                }
            }
            false
        };
        ws_until(&mut w, &mut record2).await;
        got.extend(got2);
        assert_eq!(got, (1..=last).collect::<Vec<u64>>());
    })
    .await;
}

/// The reconnect storm of tests/it/reconnect_storm.rs on two nodes: 200 clients (half
/// WebSocket, half SSE) on three topics, each cut abruptly twice at random moments, each
/// connection to a random node of the two, while publishers publish through random nodes.
/// Every client ends with every offset of every topic once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_storm_across_two_nodes_loses_nothing() {
    crate::need_redis!();
    bounded("storm on two nodes", async {
        const CLIENTS: usize = 200;
        const CUTS: usize = 2;
        const TOPICS: [&str; 3] = ["storm-a", "storm-b", "storm-c"];
        let redis = RedisServer::start();
        let opts = ["--history-size", "10000"];
        let (a, b) = (node(&redis, &opts), node(&redis, &opts));
        let nodes = vec![a.addr, b.addr];
        let http = HttpClient::new(None);
        let mut epochs = Vec::new();
        for t in TOPICS {
            epochs.push(publish(&http, a.addr, t, r#"{"n":1}"#).await.1);
        }
        let stats = Arc::new(Stats::default());
        let (fin_tx, fin) = watch::channel(None);
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        let clients = spawn_followers(CLIENTS, &nodes, &TOPICS, &epochs, &stats, &fin, |f| {
            f.node = rng.gen_range(0..2);
            f.roam = true;
            f.lifetimes = (0..CUTS)
                .map(|_| Duration::from_millis(rng.gen_range(50..2000)))
                .collect();
        });
        let stop = Arc::new(AtomicBool::new(false));
        let mut publishers = Vec::new();
        for (i, t) in TOPICS.into_iter().enumerate() {
            let seed = 100 + i as u64;
            let through = move |round: usize| {
                let mut r = rand::rngs::StdRng::seed_from_u64(seed + round as u64);
                r.gen_range(0..2)
            };
            publishers.push(tokio::spawn(steady_publisher(
                nodes.clone(),
                t,
                through,
                Arc::new(AtomicBool::new(false)),
                stop.clone(),
                Arc::new(AtomicU64::new(0)),
            )));
        }
        within("every client is cut twice", async {
            while stats.cuts.load(Ordering::Relaxed) < CLIENTS * CUTS {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        stop.store(true, Ordering::Relaxed);
        let mut last = Vec::new();
        for (p, t) in publishers.into_iter().zip(TOPICS) {
            p.await.unwrap();
            // The last offset is one everybody must reach: acknowledged, published last.
            last.push(publish(&http, nodes[0], t, r#"{"n":"last"}"#).await.0);
        }
        eprintln!("{CLIENTS} clients cut {CUTS} times each across two nodes; {last:?}");
        let outcomes = finish(fin_tx, last, clients).await;
        assert!(outcomes.iter().all(|o| o.server_closes == 0));
        for n in nodes {
            assert_node_clean(n).await;
        }
        assert_no_redis_subscription(&redis).await;
    })
    .await;
}

/// A subscriber that arrives on a node whose pub/sub connection was cut and is not back
/// yet (Redis refuses the reconnection: `maxclients`) while the topic is still in the
/// node's table (an old subscriber of it is closing): it must not be acknowledged as live
/// before the node listens again, or what is published meanwhile never reaches it. Then
/// the node gets back by itself, without hammering Redis meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_arriving_while_the_pubsub_connection_is_down_misses_nothing() {
    crate::need_redis!();
    bounded("subscribe during a pub/sub outage", async {
        let redis = RedisServer::start();
        let (a, b) = (node(&redis, &[]), node(&redis, &[]));
        let http = HttpClient::new(None);
        let (_, epoch) = publish(&http, b.addr, "r", r#"{"i":1}"#).await;
        // The old subscriber never answers the close it will get: it keeps the topic in
        // node a's table for the close grace period.
        let _old = crate::common::raw_ws(a.addr, "?topic=r", None).await;
        let (mut watcher, _) =
            tokio_tungstenite::connect_async(format!("ws://{}/ws?topic=r", a.addr))
                .await
                .unwrap();
        let v = crate::common::next_json(&mut watcher).await;
        assert_eq!(v["op"], "subscribed", "{v}");

        let mut conn = redis_conn(&redis).await;
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxclients")
            .arg(1)
            .query_async(&mut conn)
            .await
            .unwrap();
        let killed: i64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("pubsub")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(killed >= 1);
        // The node noticed. It keeps its subscribers (the watcher): it fills their gap
        // from history once it listens again.
        let mut lost_before = 0;
        within("node a notices the lost pub/sub connection", async {
            while lost_before == 0 {
                lost_before += a.logged("pub/sub connection was lost");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;

        let stats = Arc::new(Stats::default());
        let (fin_tx, fin) = watch::channel(None);
        let clients = spawn_followers(
            2,
            &[a.addr],
            &["r"],
            std::slice::from_ref(&epoch),
            &stats,
            &fin,
            |f| {
                f.node = 0;
            },
        );
        // Whatever node a answers them (nothing yet, an error, or an early `subscribed`),
        // publications go on through node b meanwhile.
        let wait = Instant::now() + Duration::from_millis(500);
        while stats.settled.load(Ordering::Relaxed) < 2 && Instant::now() < wait {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for i in 2..=3 {
            publish(&http, b.addr, "r", &format!(r#"{{"i":{i}}}"#)).await;
        }
        // Meanwhile node a retries with backoff, not in a tight loop.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let lost = a.logged("pub/sub connection was lost") + lost_before;
        assert!(
            lost < 20,
            "node a retried its pub/sub connection {lost} times in 0.5 s"
        );

        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxclients")
            .arg(10000)
            .query_async(&mut conn)
            .await
            .unwrap();
        let mut last = 3;
        for i in 4..=20 {
            last = publish(&http, b.addr, "r", &format!(r#"{{"i":{i}}}"#))
                .await
                .0;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        finish(fin_tx, vec![last], clients).await;
        // The watcher connected all along got every offset once, in order, never closed.
        let mut expect = 2;
        within("the watcher catches up", async {
            while expect <= last {
                let v = crate::common::next_json(&mut watcher).await;
                assert_eq!(v["offset"], expect, "{v}");
                expect += 1;
            }
        })
        .await;
    })
    .await;
}

/// How long the flap storm lasts: `CRIER_FLAP_SECS` (30 is the storm of issue 15), 10 s by
/// default so that both flap tests fit CI's time budget.
fn flap_duration() -> Duration {
    let secs = std::env::var("CRIER_FLAP_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    Duration::from_secs(secs)
}

/// Publishes to `topic` 200 times a second (one every 5 ms) through the nodes in turn
/// until `stop`; every publish must be acknowledged. Returns the last acknowledged offset.
async fn paced_publisher(
    nodes: Vec<SocketAddr>,
    topic: &'static str,
    stop: Arc<AtomicBool>,
) -> u64 {
    let http = HttpClient::new(None);
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = 0;
    for round in 0usize.. {
        assert!(round < 200 * 600, "the publisher was never stopped");
        if stop.load(Ordering::Relaxed) {
            break;
        }
        tick.tick().await;
        let body = format!(r#"{{"round":{round}}}"#);
        let (offset, _) = publish(&http, nodes[round % nodes.len()], topic, &body).await;
        assert!(offset > last, "offsets grow");
        last = offset;
    }
    last
}

/// Kills every pub/sub connection Redis has (`CLIENT KILL TYPE pubsub`) every 0-15 ms
/// until `until`; returns how many kills found a connection to kill.
async fn kill_pubsub_repeatedly(redis: &RedisServer, until: Instant) -> u64 {
    let mut conn = redis_conn(redis).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(15);
    let mut killed = 0;
    while Instant::now() < until {
        let n: i64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("pubsub")
            .query_async(&mut conn)
            .await
            .unwrap();
        killed += u64::from(n > 0);
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..=15))).await;
    }
    killed
}

/// Issue 15, finding 7: `nodes` nodes, subscribers on each (WebSocket and SSE), 200
/// acknowledged publications a second through the nodes in turn, while every node's
/// pub/sub connection is killed every 0-15 ms (`flap_duration`, 10 s by default, 30 s
/// with `CRIER_FLAP_SECS=30`). Every subscriber gets every acknowledged offset exactly
/// once, in order, or is told it lost some (closed 4004, then `recovered:false`).
async fn flap(nodes_n: usize) {
    let redis = RedisServer::start();
    let opts = ["--history-size", "100000"];
    let nodes: Vec<Node> = (0..nodes_n).map(|_| node(&redis, &opts)).collect();
    let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.addr).collect();
    let http = HttpClient::new(None);
    let (_, epoch) = publish(&http, addrs[0], "flap", r#"{"round":"first"}"#).await;
    let stats = Arc::new(Stats::default());
    let (fin_tx, fin) = watch::channel(None);
    let clients = spawn_followers(
        2 * nodes_n,
        &addrs,
        &["flap"],
        &[epoch],
        &stats,
        &fin,
        |f| {
            f.node = f.id / 2;
        },
    );
    settled(&stats, 2 * nodes_n).await;
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = tokio::spawn(paced_publisher(addrs.clone(), "flap", stop.clone()));
    let killed = kill_pubsub_repeatedly(&redis, Instant::now() + flap_duration()).await;
    stop.store(true, Ordering::Relaxed);
    let mut last = publisher.await.unwrap();
    // The storm is over: the nodes listen again, and one more publication must reach
    // everybody.
    for n in &nodes {
        back_listening(n).await;
    }
    last = last.max(
        publish(&http, addrs[0], "flap", r#"{"round":"last"}"#)
            .await
            .0,
    );
    let outcomes = finish(fin_tx, vec![last], clients).await;
    let closes: usize = outcomes.iter().map(|o| o.server_closes).sum();
    let lost: usize = outcomes.iter().map(|o| o.at.lost).sum();
    eprintln!(
        "{nodes_n} node(s): {last} publications, {killed} pub/sub kills, {closes} closes, \
         {lost} announced losses"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_pubsub_connection_loses_nothing_on_one_node() {
    crate::need_redis!();
    bounded("flapping pub/sub, one node", flap(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_pubsub_connection_loses_nothing_on_three_nodes() {
    crate::need_redis!();
    bounded("flapping pub/sub, three nodes", flap(3)).await;
}

/// One publish during the outage test: when it was sent (since the test's start), how
/// long its answer took, and its status (None: the node did not answer).
struct Sent {
    at: Duration,
    took: Duration,
    status: Option<u16>,
}

/// Publishes to `topic` 200 times a second, each request on its own task (so a slow
/// answer never delays the next), through the nodes in turn, until `stop`.
async fn timed_publisher(
    nodes: Vec<SocketAddr>,
    topic: &'static str,
    start: Instant,
    stop: Arc<AtomicBool>,
) -> Vec<Sent> {
    let http = HttpClient::new(None);
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    let mut requests = tokio::task::JoinSet::new();
    for round in 0usize.. {
        assert!(round < 200 * 600, "the publisher was never stopped");
        if stop.load(Ordering::Relaxed) {
            break;
        }
        tick.tick().await;
        let (http, addr) = (http.clone(), nodes[round % nodes.len()]);
        requests.spawn(async move {
            let at = start.elapsed();
            let body = format!(r#"{{"round":{round}}}"#);
            let status = post(&http, addr, topic, &body).await.map(|(s, _)| s);
            Sent {
                at,
                took: start.elapsed() - at,
                status,
            }
        });
    }
    let mut sent = Vec::new();
    while let Some(s) = requests.join_next().await {
        sent.push(s.unwrap());
    }
    sent.sort_by_key(|s| s.at);
    sent
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Issue 15, finding 8: three nodes, 80 subscribers that keep cutting and resuming across
/// them, 200 publications a second, and Redis killed for 2 s (then restarted from its
/// AOF). While it is down every publish gets its 503 at once (a refused connection is an
/// answer: nothing waits out `redis_timeout`, 2 s here), and once it is back publishes
/// succeed again within a second. The figures are printed (docs/scaling.md quotes them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_fail_fast_while_redis_is_down_and_succeed_once_it_is_back() {
    crate::need_redis!();
    bounded("fail fast during an outage", async {
        const CLIENTS: usize = 80;
        let mut redis = RedisServer::start_with_aof();
        let opts = ["--history-size", "100000"];
        let nodes: Vec<Node> = (0..3).map(|_| node(&redis, &opts)).collect();
        let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.addr).collect();
        let http = HttpClient::new(None);
        let (_, epoch) = publish(&http, addrs[0], "down", r#"{"round":"first"}"#).await;
        let stats = Arc::new(Stats::default());
        let (fin_tx, fin) = watch::channel(None);
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        let clients = spawn_followers(CLIENTS, &addrs, &["down"], &[epoch], &stats, &fin, |f| {
            f.node = f.id % 3;
            f.roam = true;
            f.lifetimes = (0..6)
                .map(|_| Duration::from_millis(rng.gen_range(100..1500)))
                .collect();
        });
        settled(&stats, CLIENTS).await;
        let start = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let publisher = tokio::spawn(timed_publisher(addrs.clone(), "down", start, stop.clone()));
        tokio::time::sleep(Duration::from_secs(2)).await;
        let killed_at = start.elapsed();
        redis.kill();
        tokio::time::sleep(Duration::from_secs(2)).await;
        redis.restart();
        let back_at = start.elapsed();
        tokio::time::sleep(Duration::from_secs(3)).await;
        stop.store(true, Ordering::Relaxed);
        let sent = publisher.await.unwrap();

        let during: Vec<&Sent> = sent
            .iter()
            .filter(|s| s.at >= killed_at + Duration::from_millis(20) && s.at < back_at)
            .collect();
        // Every publish sent while Redis was down, whatever it got: how long it waited.
        let mut waited: Vec<Duration> = during.iter().map(|s| s.took).collect();
        waited.sort();
        let refused = during.iter().filter(|s| s.status == Some(503)).count();
        let first_ok = sent
            .iter()
            .filter(|s| s.at >= back_at && s.status == Some(200))
            .map(|s| s.at + s.took - back_at)
            .min()
            .expect("publishes succeed after the outage");
        let (p50, p99, max) = (
            percentile(&waited, 0.5),
            percentile(&waited, 0.99),
            *waited.last().unwrap(),
        );
        eprintln!(
            "outage: {refused} of {} publishes refused; answered after p50 {p50:?}, p99 \
             {p99:?}, max {max:?}; first success {first_ok:?} after redis answered",
            during.len()
        );
        // Bounds far from the figures measured (docs/scaling.md) but far below what the
        // bug cost: publishes waited out redis_timeout (2 s) for the first seconds. The p99
        // bound leaves room for a CI machine whose 2 cores also run the browser tests.
        assert_eq!(
            refused,
            during.len(),
            "every publish during the outage gets its 503"
        );
        assert!(p99 < Duration::from_millis(1000), "p99 {p99:?}");
        assert!(first_ok < Duration::from_millis(1500), "{first_ok:?}");
        let last = publish(&http, addrs[0], "down", r#"{"round":"last"}"#)
            .await
            .0;
        finish(fin_tx, vec![last], clients).await;
    })
    .await;
}
