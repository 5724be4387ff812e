//! One contract, every broker (issue 16): each case below runs unchanged against the
//! in-process broker with memory-only and with durable namespaces, the routed broker
//! (board topics local, the rest through Redis) and the Redis broker, each with its hub
//! and the one subscribe path (`crier::subscribe`), as a node runs them. A real
//! `redis-server` is started per case (tests/common/redis.rs: missing, it fails under
//! `CI=true` and is skipped otherwise, saying so). A bug found in one broker becomes a case
//! here, for all.
//!
//! What every broker promises: offsets 1, 2, 3... per topic in one epoch, delivered in
//! order; a resume replays exactly what follows its position or says `recovered:false`;
//! history pages; an idempotency key publishes once; a lost stream comes back in a new
//! epoch; retained state (where the broker keeps it); concurrent publishers share one
//! sequence; and the node's deliveries are contiguous or say they are not: a gap is filled
//! from history, a gap history no longer holds closes the subscribers (4004).

use std::sync::Arc;
use std::time::Duration;

use crate::common::redis::{self as redis_server, RedisServer};
use crate::common::within;
use bytes::Bytes;
use crier::broker::memory::MemoryBroker;
use crier::broker::redis::RedisBroker;
use crier::broker::routed::RoutedBroker;
use crier::broker::{
    Broker, BrokerError, BrokerSink, PublishRequest, Receipt, StreamPosition, Subscribed,
};
use crier::client::{Batch, Client};
use crier::close::DisconnectReason;
use crier::config::{Config, Namespace};
use crier::hub::{Hub, Wakeups};
use crier::metrics::{Metrics, Transport};
use crier::publication::Publication;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Memory,
    Durable,
    Routed,
    Redis,
}

/// A node's broker and hub, and what they run on.
struct Node {
    kind: Kind,
    broker: Arc<dyn Broker>,
    hub: Arc<Hub>,
    redis: Option<RedisServer>,
    memory: Option<Arc<MemoryBroker>>,
    _dir: tempfile::TempDir,
}

impl Node {
    /// The node of `kind` on the default settings changed by `tweak`; None when it needs
    /// Redis and Redis is not installed (skipped, see the module docs).
    async fn new(kind: Kind, tweak: impl FnOnce(&mut Config)) -> Option<Node> {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Config {
            data_dir: dir.path().to_path_buf(),
            ..Config::default()
        };
        tweak(&mut cfg);
        if kind == Kind::Durable {
            cfg.namespaces.push(Namespace {
                pattern: "*".into(),
                history_size: cfg.history_size,
                history_ttl: cfg.history_ttl,
                durable: true,
                presence: false,
                join_leave: false,
            });
        }
        let metrics = Arc::new(Metrics::new());
        let hub = Arc::new(Hub::new(cfg.max_topics_per_connection, metrics.clone()));
        let redis = match kind {
            Kind::Routed | Kind::Redis => {
                if !redis_server::available() {
                    return None;
                }
                Some(RedisServer::start())
            }
            Kind::Memory | Kind::Durable => None,
        };
        let (broker, memory): (Arc<dyn Broker>, _) = match kind {
            Kind::Memory | Kind::Durable => {
                let m = MemoryBroker::open(&cfg, hub.clone(), metrics).unwrap();
                (m.clone(), Some(m))
            }
            Kind::Redis | Kind::Routed => {
                let url = redis.as_ref().unwrap().url();
                let shared = RedisBroker::connect(&cfg, &url, hub.clone(), metrics.clone())
                    .await
                    .expect("connects to redis");
                if kind == Kind::Redis {
                    (shared, None)
                } else {
                    let local = Arc::new(MemoryBroker::new(&cfg, hub.clone(), metrics));
                    (Arc::new(RoutedBroker::new(local, shared)), None)
                }
            }
        };
        hub.attach(Arc::downgrade(&broker));
        Some(Node {
            kind,
            broker,
            hub,
            redis,
            memory,
            _dir: dir,
        })
    }

    /// Whether the broker keeps a state topic's newest publication (the Redis broker alone
    /// does not: board topics stay on each node's memory broker, see `routed.rs`).
    fn retains(&self) -> bool {
        self.kind != Kind::Redis
    }

    async fn publish(&self, topic: &str, data: &str) -> Receipt {
        self.broker
            .publish(PublishRequest {
                topic,
                data: data.as_bytes(),
                ..PublishRequest::default()
            })
            .await
            .expect("published")
    }

    async fn publish_state(&self, topic: &str, data: &str) -> Receipt {
        self.broker
            .publish(PublishRequest {
                topic,
                data: data.as_bytes(),
                retain: true,
                conflate: true,
                idempotency_key: None,
            })
            .await
            .expect("published")
    }

    async fn subscribe(
        &self,
        c: &Arc<Client>,
        topic: &str,
        since: Option<StreamPosition>,
    ) -> Result<Subscribed, BrokerError> {
        let ack = |s: &Subscribed| {
            Some(Bytes::from(format!(
                "ack {} {:?}",
                s.position.offset, s.recovered
            )))
        };
        crier::subscribe::subscribe(
            &self.hub,
            &*self.broker,
            c,
            topic,
            since.as_ref(),
            &ack,
            &Default::default(),
        )
        .await
    }

    fn unsubscribe(&self, c: &Arc<Client>, topic: &str) -> bool {
        crier::subscribe::unsubscribe(&self.hub, &*self.broker, c, topic)
    }

    /// Makes the broker lose the topic's stream, as an eviction (memory) or a Redis that
    /// lost its keys does. The topic must have no subscriber.
    async fn lose(&self, topic: &str) {
        match self.kind {
            Kind::Memory | Kind::Durable => {
                // The table holds 2 topics (see the case): two others evict the idle one.
                self.publish("evict-1", "1").await;
                self.publish("evict-2", "1").await;
            }
            Kind::Redis | Kind::Routed => {
                let url = self.redis.as_ref().unwrap().url();
                let mut conn = redis::Client::open(url)
                    .unwrap()
                    .get_multiplexed_async_connection()
                    .await
                    .unwrap();
                let _: () = redis::cmd("DEL")
                    .arg(format!("crier:{{{topic}}}:m"))
                    .arg(format!("crier:{{{topic}}}:s"))
                    .query_async(&mut conn)
                    .await
                    .unwrap();
            }
        }
    }

    async fn close(self) {
        if let Some(m) = &self.memory {
            m.close().await;
        }
    }
}

fn client() -> Arc<Client> {
    Arc::new(Client::new(Transport::Ws, 1 << 20))
}

/// What the client holds: "ack ..." for an acknowledgement, the offset for a publication.
fn drain(c: &Client, into: &mut Vec<String>) {
    if let Batch::Items(items) = c.take(usize::MAX, usize::MAX) {
        for i in items {
            into.push(match i.source {
                Some((_, offset)) => offset.to_string(),
                None => String::from_utf8_lossy(&i.bytes).into_owned(),
            });
        }
    }
}

/// Waits until the client holds `n` items (acknowledgements and publications) and returns
/// them; more than `n` fails.
async fn take(c: &Client, n: usize) -> Vec<String> {
    let mut got = Vec::new();
    within("the client gets what it is owed", async {
        while got.len() < n {
            drain(c, &mut got);
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await;
    // Nothing more is on its way.
    tokio::time::sleep(Duration::from_millis(50)).await;
    drain(c, &mut got);
    assert_eq!(got.len(), n, "{got:?}");
    got
}

fn offsets(from: u64, to: u64) -> Vec<String> {
    (from..=to).map(|o| o.to_string()).collect()
}

/// Offsets 1, 2, 3... per topic, in one epoch, delivered in order.
async fn publish_order_and_offsets(kind: Kind) {
    let Some(n) = Node::new(kind, |_| {}).await else {
        return;
    };
    let c = client();
    let s = n.subscribe(&c, "order", None).await.unwrap();
    assert_eq!((s.position.offset, s.recovered), (0, None));
    let mut epoch = None;
    for i in 1..=20u64 {
        let r = n.publish("order", &i.to_string()).await;
        assert_eq!(r.offset, i);
        assert!(!r.duplicate);
        assert_eq!(r.epoch.len(), 8);
        assert!(r
            .epoch
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_eq!(epoch.get_or_insert(r.epoch.clone()), &r.epoch, "one epoch");
    }
    assert_eq!(n.publish("other", "1").await.offset, 1, "per topic");
    let mut want = vec!["ack 0 None".to_string()];
    want.extend(offsets(1, 20));
    assert_eq!(take(&c, 21).await, want);
    // Subscribing again to a held topic repeats the acknowledgement only.
    let again = n.subscribe(&c, "order", None).await.unwrap();
    assert_eq!(again.position.offset, 20);
    assert_eq!(take(&c, 1).await, ["ack 20 None"]);
    assert!(n.unsubscribe(&c, "order"));
    assert!(!n.unsubscribe(&c, "order"));
    assert_eq!(n.hub.total_subscriptions(), 0);
    n.close().await;
}

/// A resume replays what follows its position, then goes live while publications keep
/// coming: every offset once, in order.
async fn resume_replays_then_goes_live(kind: Kind) {
    let Some(n) = Node::new(kind, |_| {}).await else {
        return;
    };
    let mut epoch = None;
    for i in 1..=5 {
        epoch = Some(n.publish("r", &i.to_string()).await.epoch);
    }
    let epoch = epoch.unwrap();
    let n = Arc::new(n);
    let flow = {
        let n = n.clone();
        tokio::spawn(async move {
            for i in 6..=40 {
                n.publish("r", &i.to_string()).await;
            }
        })
    };
    let c = client();
    let since = StreamPosition { offset: 2, epoch };
    let s = n.subscribe(&c, "r", Some(since)).await.unwrap();
    assert_eq!(s.recovered, Some(true));
    flow.await.unwrap();
    let got = take(&c, 39).await;
    assert_eq!(got[0], format!("ack {} Some(true)", s.position.offset));
    assert_eq!(got[1..], offsets(3, 40), "every offset once, in order");
    n.unsubscribe(&c, "r");
    Arc::into_inner(n).unwrap().close().await;
}

/// What cannot be replayed says `recovered:false` and still acknowledges the current
/// position: trimmed history, another epoch, a position from the future.
async fn an_unrecoverable_resume_says_so(kind: Kind) {
    let Some(n) = Node::new(kind, |c| c.history_size = 3).await else {
        return;
    };
    let mut epoch = None;
    for i in 1..=10 {
        epoch = Some(n.publish("u", &i.to_string()).await.epoch);
    }
    let epoch = epoch.unwrap();
    for (offset, other_epoch, why) in [
        (2, false, "trimmed"),
        (2, true, "another epoch"),
        (99, false, "from the future"),
    ] {
        let at = n
            .broker
            .history("u", None, 1)
            .await
            .unwrap()
            .position
            .offset;
        let since = StreamPosition {
            offset,
            epoch: if other_epoch {
                "0badbeef".into()
            } else {
                epoch.clone()
            },
        };
        let c = client();
        let s = n.subscribe(&c, "u", Some(since)).await.unwrap();
        assert_eq!((s.position.offset, s.recovered), (at, Some(false)), "{why}");
        assert_eq!(take(&c, 1).await, [format!("ack {at} Some(false)")]);
        n.publish("u", "0").await;
        assert_eq!(take(&c, 1).await, [(at + 1).to_string()], "then live");
        n.unsubscribe(&c, "u");
    }
    // The newest three are still there to resume from.
    let c = client();
    let s = n
        .subscribe(&c, "u", Some(StreamPosition { offset: 10, epoch }))
        .await
        .unwrap();
    assert_eq!(s.recovered, Some(true));
    assert_eq!(take(&c, 4).await[1..], offsets(11, 13));
    n.close().await;
}

/// History pages: the oldest kept first without a position, the page after one with it,
/// `recovered:false` and the oldest kept for a position it cannot continue; an unknown
/// topic has no stream (offset 0, no epoch) and reading it creates none.
async fn history_pages(kind: Kind) {
    let Some(n) = Node::new(kind, |_| {}).await else {
        return;
    };
    let mut epoch = None;
    for i in 1..=10 {
        epoch = Some(n.publish("h", &format!("{{\"i\":{i}}}")).await.epoch);
    }
    let epoch = epoch.unwrap();
    let page = |h: &crier::broker::History| -> Vec<u64> {
        h.publications.iter().map(|p| p.offset).collect()
    };
    let h = n.broker.history("h", None, 4).await.unwrap();
    assert_eq!(
        (h.position.offset, h.recovered, page(&h)),
        (10, true, vec![1, 2, 3, 4])
    );
    assert_eq!(&h.publications[0].data()[..], b"{\"i\":1}");
    let since = StreamPosition {
        offset: 4,
        epoch: epoch.clone(),
    };
    let h = n.broker.history("h", Some(&since), 4).await.unwrap();
    assert_eq!((h.recovered, page(&h)), (true, vec![5, 6, 7, 8]));
    let other = StreamPosition {
        offset: 4,
        epoch: "0badbeef".into(),
    };
    let h = n.broker.history("h", Some(&other), 3).await.unwrap();
    assert_eq!((h.recovered, page(&h)), (false, vec![1, 2, 3]));
    let h = n.broker.history("nobody", None, 10).await.unwrap();
    assert_eq!((h.position.offset, &*h.position.epoch), (0, ""));
    assert!(h.publications.is_empty());
    n.close().await;
}

/// Concurrent retries with one idempotency key publish once and share its receipt.
async fn an_idempotency_key_publishes_once(kind: Kind) {
    let Some(n) = Node::new(kind, |_| {}).await else {
        return;
    };
    let n = Arc::new(n);
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let n = n.clone();
        tasks.push(tokio::spawn(async move {
            n.broker
                .publish(PublishRequest {
                    topic: "k",
                    data: b"{\"x\":1}",
                    idempotency_key: Some("order-17"),
                    ..PublishRequest::default()
                })
                .await
                .unwrap()
        }));
    }
    let mut receipts = Vec::new();
    for t in tasks {
        receipts.push(t.await.unwrap());
    }
    assert!(receipts.iter().all(|r| r.offset == 1), "one offset");
    assert_eq!(receipts.iter().filter(|r| !r.duplicate).count(), 1);
    let h = n.broker.history("k", None, 10).await.unwrap();
    assert_eq!(h.publications.len(), 1);
    assert_eq!(
        n.publish("k", "2").await.offset,
        2,
        "another publish goes on"
    );
    Arc::into_inner(n).unwrap().close().await;
}

/// A stream the broker lost (evicted, or its Redis keys gone) comes back at offset 1 in a
/// new epoch, and a position in the old one resumes `recovered:false`.
async fn a_lost_stream_comes_back_in_a_new_epoch(kind: Kind) {
    let Some(n) = Node::new(kind, |c| {
        c.max_topics = 2;
        c.max_subscriber_topics = 1;
    })
    .await
    else {
        return;
    };
    n.publish("lost", "1").await;
    let old = n.publish("lost", "2").await;
    n.lose("lost").await;
    let fresh = n.publish("lost", "3").await;
    assert_eq!(fresh.offset, 1);
    assert_ne!(fresh.epoch, old.epoch);
    let c = client();
    let s = n
        .subscribe(
            &c,
            "lost",
            Some(StreamPosition {
                offset: 2,
                epoch: old.epoch.clone(),
            }),
        )
        .await
        .unwrap();
    assert_eq!(s.recovered, Some(false));
    assert_eq!((s.position.offset, &s.position.epoch), (1, &fresh.epoch));
    n.unsubscribe(&c, "lost");
    n.close().await;
}

/// A state topic's newest publication follows the acknowledgement of every new subscriber
/// and of a resume (a full recovery); unsent older states are replaced (conflated).
async fn retained_state_follows_the_acknowledgement(kind: Kind) {
    let Some(n) = Node::new(kind, |_| {}).await else {
        return;
    };
    if !n.retains() {
        eprintln!("{kind:?} keeps no retained state (board topics stay local): nothing to test");
        return;
    }
    let epoch = n.publish_state("board:x", "{\"v\":1}").await.epoch;
    n.publish_state("board:x", "{\"v\":2}").await;
    let c = client();
    let s = n.subscribe(&c, "board:x", None).await.unwrap();
    assert_eq!(s.position.offset, 2);
    assert_eq!(take(&c, 2).await, ["ack 2 None", "2"]);
    n.publish_state("board:x", "{\"v\":3}").await;
    n.publish_state("board:x", "{\"v\":4}").await;
    // Conflated in the queue: only the newest state waits.
    assert_eq!(take(&c, 1).await, ["4"]);
    let r = client();
    let s = n
        .subscribe(&r, "board:x", Some(StreamPosition { offset: 1, epoch }))
        .await
        .unwrap();
    assert_eq!(s.recovered, Some(true));
    assert_eq!(take(&r, 2).await, ["ack 4 Some(true)", "4"]);
    n.close().await;
}

/// Publishers on several tasks share one sequence, and a subscriber sees it in order.
async fn concurrent_publishers_share_one_sequence(kind: Kind) {
    let Some(n) = Node::new(kind, |_| {}).await else {
        return;
    };
    let n = Arc::new(n);
    let c = client();
    n.subscribe(&c, "cp", None).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let n = n.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            for _ in 0..25 {
                got.push(n.publish("cp", "{}").await.offset);
            }
            got
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        let got = t.await.unwrap();
        assert!(got.windows(2).all(|w| w[0] < w[1]), "each publisher's rise");
        all.extend(got);
    }
    all.sort_unstable();
    assert_eq!(all, (1..=100).collect::<Vec<u64>>());
    assert_eq!(take(&c, 101).await[1..], offsets(1, 100));
    n.unsubscribe(&c, "cp");
    Arc::into_inner(n).unwrap().close().await;
}

/// Hands the hub a publication as the broker would, as if the ones before it were lost on
/// the way (a pub/sub message that never came).
fn deliver_early(n: &Node, topic: &str, offset: u64, data: &str, epoch: &str) {
    let p = Arc::new(Publication::new(topic.into(), offset, data.as_bytes()));
    let mut wake = Wakeups::default();
    n.hub.deliver(&p, epoch, false, &mut wake);
    wake.wake();
}

/// A publication that arrives past the next offset opens a gap: the hub fills it from the
/// broker's history, and the subscriber gets every offset once, in order, unclosed.
async fn a_gap_is_filled_from_history(kind: Kind) {
    let Some(n) = Node::new(kind, |_| {}).await else {
        return;
    };
    let c = client();
    n.subscribe(&c, "g", None).await.unwrap();
    let mut epoch = None;
    for i in 1..=3 {
        epoch = Some(n.publish("g", &i.to_string()).await.epoch);
    }
    assert_eq!(take(&c, 4).await[1..], offsets(1, 3));
    // Offset 5 arrives first, 4 "lost"; then both are published for real.
    deliver_early(&n, "g", 5, "5", &epoch.unwrap());
    n.publish("g", "4").await;
    n.publish("g", "5").await;
    n.publish("g", "6").await;
    assert_eq!(take(&c, 3).await, offsets(4, 6));
    assert!(c.closed().is_none(), "the gap was in history");
    // A broker that says it may have missed something when it did not: nothing twice.
    n.hub.may_have_missed("g");
    n.publish("g", "7").await;
    assert_eq!(take(&c, 1).await, offsets(7, 7));
    n.unsubscribe(&c, "g");
    n.close().await;
}

/// A gap that history no longer holds is never silent: the topic's subscribers are closed
/// with 4004 `stream_restarted`, and their resume says `recovered:false`.
async fn a_gap_history_lost_is_announced(kind: Kind) {
    let Some(n) = Node::new(kind, |c| c.history_size = 2).await else {
        return;
    };
    let c = client();
    let first = n.subscribe(&c, "gl", None).await.unwrap();
    deliver_early(&n, "gl", 6, "6", &first.position.epoch);
    for i in 1..=6 {
        n.publish("gl", &i.to_string()).await;
    }
    within("the subscriber is told", async {
        while c.closed().is_none() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert_eq!(c.closed(), Some(DisconnectReason::StreamRestarted));
    crier::subscribe::remove_client(&n.hub, &*n.broker, &c);
    let back = client();
    let s = n
        .subscribe(&back, "gl", Some(first.position.clone()))
        .await
        .unwrap();
    assert_eq!((s.position.offset, s.recovered), (6, Some(false)));
    n.unsubscribe(&back, "gl");
    assert_eq!(n.hub.total_subscriptions(), 0);
    n.close().await;
}

macro_rules! contract {
    ($($case:ident),* $(,)?) => {
        $(
            mod $case {
                use super::Kind;
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn memory() {
                    super::$case(Kind::Memory).await
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn durable() {
                    super::$case(Kind::Durable).await
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn routed() {
                    super::$case(Kind::Routed).await
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn redis() {
                    super::$case(Kind::Redis).await
                }
            }
        )*
    };
}

contract!(
    publish_order_and_offsets,
    resume_replays_then_goes_live,
    an_unrecoverable_resume_says_so,
    history_pages,
    an_idempotency_key_publishes_once,
    a_lost_stream_comes_back_in_a_new_epoch,
    retained_state_follows_the_acknowledgement,
    concurrent_publishers_share_one_sequence,
    a_gap_is_filled_from_history,
    a_gap_history_lost_is_announced,
);
