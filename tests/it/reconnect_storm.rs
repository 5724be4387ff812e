//! A reconnect storm: 1,000 subscribers, half WebSocket and half SSE, on three topics, each
//! cut abruptly three times at random moments while a publisher keeps publishing to all
//! three. Every client comes back with its positions (`since` on WebSocket, the event id on
//! SSE), and at the end every client holds every offset of every topic exactly once, in
//! order. Publishing goes on until the last client has been cut for the last time, so
//! every cut and every resume races live publications.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::eventsource;
use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use rand::{Rng, SeedableRng};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

const CLIENTS: usize = 1000;
const CUTS: usize = 3;
const TOPICS: [&str; 3] = ["storm-a", "storm-b", "storm-c"];
/// How long one client may wait for its next message before the test fails.
const STALL: Duration = Duration::from_secs(30);
/// A connection lives this long (at random, in ms) before it is cut.
const LIFETIME_MS: std::ops::Range<u64> = 50..2500;
/// The publishers' pace: one publication per topic per this (and per round trip), until
/// every client has been cut `CUTS` times. The bound keeps a broken test from running
/// forever.
const ROUND: Duration = Duration::from_millis(2);
const MAX_ROUNDS: u64 = 2000;

/// What every client needs to know: how far each topic went once publishing stopped.
type Final = tokio::sync::watch::Receiver<Option<Vec<u64>>>;

/// Where one client stands: per topic, the epoch and the last offset it received.
#[derive(Clone)]
struct Positions {
    epochs: Vec<String>,
    last: Vec<u64>,
}

impl Positions {
    /// Records a publication; it must be the very next offset of its topic.
    fn record(&mut self, client: usize, v: &Value) {
        let topic = v["topic"].as_str().expect("a topic");
        let offset = v["offset"].as_u64().expect("an offset");
        let i = TOPICS
            .iter()
            .position(|t| *t == topic)
            .expect("a storm topic");
        assert_eq!(
            offset,
            self.last[i] + 1,
            "client {client}, {topic}: every offset once, in order"
        );
        self.last[i] = offset;
    }

    fn done(&self, last: Option<&Vec<u64>>) -> bool {
        last.is_some_and(|l| *l == self.last)
    }
}

fn source_ip(client: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (client % 4) as u8))
}

/// When this connection is cut: None for the last one, which reads to the end.
fn cut_at(round: usize, rng: &mut impl Rng) -> Option<tokio::time::Instant> {
    (round < CUTS)
        .then(|| tokio::time::Instant::now() + Duration::from_millis(rng.gen_range(LIFETIME_MS)))
}

/// What a connection's reading loop waits for next.
enum Next<T> {
    Message(T),
    Cut,
    FinalKnown,
}

/// Waits for the next message, the cut (once subscribed) or the final offsets.
async fn next_or<T>(
    client: usize,
    msg: impl std::future::Future<Output = Option<T>>,
    cut: Option<tokio::time::Instant>,
    subscribed: bool,
    fin: &mut Final,
) -> Next<T> {
    let cut_armed = cut.is_some() && subscribed;
    let deadline = cut.unwrap_or_else(tokio::time::Instant::now);
    // Also when the final offsets came after the caller looked (they are not seen yet):
    // the caller must look again, or a client already holding them waits for a message
    // that never comes.
    let final_open = fin.borrow().is_none() || fin.has_changed().unwrap_or(false);
    tokio::select! {
        m = tokio::time::timeout(STALL, msg) => Next::Message(
            m.unwrap_or_else(|_| panic!("client {client} stalled"))
                .unwrap_or_else(|| panic!("client {client}: stream ended")),
        ),
        _ = tokio::time::sleep_until(deadline), if cut_armed => Next::Cut,
        _ = fin.changed(), if final_open => Next::FinalKnown,
    }
}

async fn ws_client(
    addr: SocketAddr,
    client: usize,
    mut at: Positions,
    mut rng: impl Rng,
    cuts: Arc<AtomicUsize>,
    mut fin: Final,
) -> Positions {
    for round in 0..=CUTS {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(source_ip(client), 0)).unwrap();
        let tcp = socket.connect(addr).await.expect("connect");
        let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}/ws"), tcp)
            .await
            .expect("ws handshake");
        for (i, t) in TOPICS.iter().enumerate() {
            let cmd = format!(
                r#"{{"op":"subscribe","topic":"{t}","since":{{"offset":{},"epoch":"{}"}},"id":{i}}}"#,
                at.last[i], at.epochs[i]
            );
            ws.send(Message::Text(cmd.into())).await.expect("ws send");
        }
        let cut = cut_at(round, &mut rng);
        let mut acks = 0;
        loop {
            if cut.is_none() && acks == TOPICS.len() && at.done(fin.borrow().as_ref()) {
                break;
            }
            let msg = match next_or(client, ws.next(), cut, acks == TOPICS.len(), &mut fin).await {
                Next::Message(m) => m.expect("ws message"),
                Next::Cut => break,
                Next::FinalKnown => continue,
            };
            let Message::Text(text) = msg else { continue };
            let v: Value = serde_json::from_str(&text).unwrap();
            if v["op"] == "subscribed" {
                assert_eq!(v["recovered"], true, "ws client {client}: {v}");
                acks += 1;
            } else {
                at.record(client, &v);
            }
        }
        // Abrupt: the socket goes away without a close frame.
        drop(ws);
        if cut.is_some() {
            cuts.fetch_add(1, Ordering::Relaxed);
        }
    }
    at
}

async fn sse_client(
    addr: SocketAddr,
    client: usize,
    mut at: Positions,
    mut rng: impl Rng,
    cuts: Arc<AtomicUsize>,
    mut fin: Final,
) -> Positions {
    let query = TOPICS
        .iter()
        .map(|t| format!("topic={t}"))
        .collect::<Vec<_>>()
        .join("&");
    // A first connection that already knows its positions passes them in the query.
    let first: Vec<String> = (0..TOPICS.len())
        .map(|i| format!("{}:{}", at.epochs[i], at.last[i]))
        .collect();
    let mut last_id: Option<String> = None;
    for round in 0..=CUTS {
        let mut q = format!("?{query}");
        let headers: Vec<(&str, &str)> = match &last_id {
            None => {
                q.push_str(&format!("&lastEventId={}", first.join("%2C")));
                vec![]
            }
            Some(id) => vec![("last-event-id", id.as_str())],
        };
        let mut es = eventsource::open(addr, Some(source_ip(client)), &q, &headers)
            .await
            .unwrap_or_else(|(s, b)| panic!("sse client {client} refused: {s} {b}"));
        let cut = cut_at(round, &mut rng);
        let mut acks = 0;
        loop {
            if cut.is_none() && acks == TOPICS.len() && at.done(fin.borrow().as_ref()) {
                break;
            }
            let e = match next_or(client, es.next(), cut, acks == TOPICS.len(), &mut fin).await {
                Next::Message(e) => e,
                Next::Cut => break,
                Next::FinalKnown => continue,
            };
            let v = e.json();
            if e.event.as_deref() == Some("subscribed") {
                assert_eq!(v["recovered"], true, "sse client {client}: {v}");
                acks += 1;
            } else {
                at.record(client, &v);
            }
        }
        last_id = es.last_id.clone();
        drop(es);
        if cut.is_some() {
            cuts.fetch_add(1, Ordering::Relaxed);
        }
    }
    at
}

/// A counter or gauge from the server's `/metrics`.
async fn metric(http: &crier::http_client::HttpClient, base: &str, line: &str) -> u64 {
    let (status, body) = http.get(&format!("{base}/metrics")).await.unwrap();
    assert_eq!(status, 200);
    let text = String::from_utf8_lossy(&body).to_string();
    text.lines()
        .find_map(|l| l.strip_prefix(line)?.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_clients_cut_three_times_each_miss_nothing() {
    // The real binary: the server gets its own process and runtime, as in production,
    // instead of sharing two test threads with a thousand clients.
    let dir = tempfile::tempdir().unwrap();
    let (_proc, addr) = serve_binary(dir.path(), "127.0.0.1:0", &["--history-size", "10000"]);
    let addr: SocketAddr = addr.parse().unwrap();
    let base = format!("http://{addr}");
    let http = crier::http_client::HttpClient::new(None);
    // The topics exist before anyone subscribes: every client starts from offset 0 of a
    // known epoch, so "every offset" means 1..=last for everyone.
    let mut epochs = Vec::new();
    for t in TOPICS {
        let url = format!("{base}/api/publish/{t}");
        let (status, body) = http.post(&url, r#"{"n":1}"#).await.unwrap();
        assert_eq!(status, 200);
        let body: Value = serde_json::from_slice(&body).unwrap();
        epochs.push(body["epoch"].as_str().unwrap().to_string());
    }
    let start = Positions {
        epochs,
        last: vec![0; TOPICS.len()],
    };

    let (final_tx, final_rx) = tokio::sync::watch::channel(None);
    let cuts = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for client in 0..CLIENTS {
        let rng = rand::rngs::StdRng::seed_from_u64(client as u64);
        let (at, cuts, fin) = (start.clone(), cuts.clone(), final_rx.clone());
        clients.push(tokio::spawn(async move {
            if client % 2 == 0 {
                ws_client(addr, client, at, rng, cuts, fin).await
            } else {
                sse_client(addr, client, at, rng, cuts, fin).await
            }
        }));
    }

    // One publisher per topic keeps going until every client has been cut CUTS times:
    // every cut and every resume happens while publications flow.
    let mut publishers = Vec::new();
    for t in TOPICS {
        let (url, cuts) = (format!("{base}/api/publish/{t}"), cuts.clone());
        publishers.push(tokio::spawn(async move {
            let http = crier::http_client::HttpClient::new(None);
            let mut last = 1;
            while cuts.load(Ordering::Relaxed) < CLIENTS * CUTS {
                assert!(last < MAX_ROUNDS, "the clients never finished their cuts");
                last += 1;
                let (status, body) = http.post(&url, format!(r#"{{"n":{last}}}"#)).await.unwrap();
                assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
                tokio::time::sleep(ROUND).await;
            }
            last
        }));
    }
    let mut last = Vec::new();
    for p in publishers {
        last.push(p.await.unwrap());
    }
    eprintln!("{CLIENTS} clients cut {CUTS} times each while {last:?} publications went out");
    final_tx.send(Some(last.clone())).unwrap();
    for c in clients {
        let at = c.await.expect("client task");
        assert!(at.done(Some(&last)), "a client ended early");
    }

    let resumes = r#"crier_resumes_total{result=""#;
    assert_eq!(
        metric(&http, &base, &format!(r#"{resumes}not_recovered"}}"#)).await,
        0
    );
    assert_eq!(
        metric(&http, &base, &format!(r#"{resumes}recovered"}}"#)).await,
        (CLIENTS * (CUTS + 1) * TOPICS.len()) as u64
    );
    // Every cut connection was noticed and cleaned up.
    within("no connection or subscription left", async {
        while metric(&http, &base, "crier_subscriptions ").await > 0
            || metric(&http, &base, r#"crier_connections{transport="ws"} "#).await > 0
            || metric(&http, &base, r#"crier_connections{transport="sse"} "#).await > 0
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}
