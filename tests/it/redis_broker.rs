//! The Redis broker against a real `redis-server`: two brokers in one process, each with
//! its own hub, stand for two nodes. What the transports see is tested with two real
//! binaries in tests/it/redis_nodes.rs.

use std::sync::Arc;

use crate::common::redis::RedisServer;
use crate::common::{wait_until, within};
use bytes::Bytes;
use crier::broker::redis::RedisBroker;
use crier::broker::{Broker, PublishRequest, StreamPosition, Subscribed};
use crier::client::{Batch, Client};
use crier::config::Config;
use crier::hub::Hub;
use crier::metrics::{Metrics, Transport};

/// A node: the Redis broker and its hub, subscribed to through the one subscribe path.
struct Node {
    broker: Arc<RedisBroker>,
    hub: Arc<Hub>,
}

impl std::ops::Deref for Node {
    type Target = RedisBroker;
    fn deref(&self) -> &RedisBroker {
        &self.broker
    }
}

impl Node {
    async fn subscribe_async(
        &self,
        c: &Arc<Client>,
        topic: &str,
        since: Option<&StreamPosition>,
        ack: crier::broker::Ack<'_>,
    ) -> Result<Subscribed, crier::broker::BrokerError> {
        crier::subscribe::subscribe(
            &self.hub,
            &*self.broker,
            c,
            topic,
            since,
            ack,
            &Default::default(),
        )
        .await
    }

    fn unsubscribe(&self, c: &Arc<Client>, topic: &str) -> bool {
        crier::subscribe::unsubscribe(&self.hub, &*self.broker, c, topic)
    }

    /// Leaves every topic (without retiring the client, so a test may use it again).
    fn remove_client(&self, c: &Arc<Client>) {
        for t in self.hub.topics_of(c) {
            self.unsubscribe(c, &t);
        }
    }
}

async fn node(redis: &RedisServer, tweak: impl FnOnce(&mut Config)) -> Arc<Node> {
    let mut cfg = Config::default();
    tweak(&mut cfg);
    let metrics = Arc::new(Metrics::new());
    let hub = Arc::new(Hub::new(8, metrics.clone()));
    let broker = RedisBroker::connect(&cfg, &redis.url(), hub.clone(), metrics)
        .await
        .expect("connects to redis");
    hub.attach(Arc::downgrade(&broker));
    Arc::new(Node { broker, hub })
}

async fn publish(b: &Node, topic: &str, data: &str) -> crier::broker::Receipt {
    b.publish(PublishRequest {
        topic,
        data: data.as_bytes(),
        ..PublishRequest::default()
    })
    .await
    .expect("published")
}

/// The ack as a marker, so the tests can see where it sits in the queue.
fn ack(sub: &Subscribed) -> Option<Bytes> {
    Some(Bytes::from(format!(
        "ack {} {:?}",
        sub.position.offset, sub.recovered
    )))
}

/// What the client holds: "ack ..." for the acknowledgement, the offset for a publication.
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

fn client() -> Arc<Client> {
    Arc::new(Client::new(Transport::Ws, 1 << 20))
}

#[tokio::test]
async fn publications_through_either_node_reach_both_in_order() {
    crate::need_redis!();
    let redis = RedisServer::start();
    let (a, b) = (node(&redis, |_| {}).await, node(&redis, |_| {}).await);
    let (ca, cb) = (client(), client());
    a.subscribe_async(&ca, "t", None, &ack).await.unwrap();
    b.subscribe_async(&cb, "t", None, &ack).await.unwrap();
    for i in 1..=50u64 {
        let node = if i % 2 == 0 { &a } else { &b };
        assert_eq!(publish(node, "t", &i.to_string()).await.offset, i);
    }
    let want: Vec<String> = std::iter::once("ack 0 None".to_string())
        .chain((1..=50).map(|i| i.to_string()))
        .collect();
    for c in [&ca, &cb] {
        let mut got = Vec::new();
        within("both nodes deliver all 50", async {
            while got.len() < want.len() {
                drain(c, &mut got);
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        })
        .await;
        assert_eq!(got, want);
    }
    // The last local subscriber leaving drops the node's Redis subscription.
    assert!(a.unsubscribe(&ca, "t"));
    a.remove_client(&ca);
    b.remove_client(&cb);
    assert_eq!(a.hub.total_subscriptions() + b.hub.total_subscriptions(), 0);
    let conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    wait_until_async("no node subscribed any more", || {
        let mut conn = conn.clone();
        async move {
            let n: Vec<String> = redis::cmd("PUBSUB")
                .arg("CHANNELS")
                .query_async(&mut conn)
                .await
                .unwrap();
            n.is_empty()
        }
    })
    .await;
}

/// `wait_until` for a condition that needs a round trip.
async fn wait_until_async<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    within(what, async {
        while !cond().await {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn concurrent_publishes_through_two_nodes_get_contiguous_offsets() {
    crate::need_redis!();
    let redis = RedisServer::start();
    let (a, b) = (node(&redis, |_| {}).await, node(&redis, |_| {}).await);
    let mut tasks = Vec::new();
    for n in [a.clone(), b.clone()] {
        for _ in 0..4 {
            let n = n.clone();
            tasks.push(tokio::spawn(async move {
                let mut got = Vec::new();
                for _ in 0..25 {
                    got.push(publish(&n, "c", "{}").await.offset);
                }
                got
            }));
        }
    }
    let mut offsets = Vec::new();
    for t in tasks {
        let got = t.await.unwrap();
        assert!(
            got.windows(2).all(|w| w[0] < w[1]),
            "one publisher's offsets rise"
        );
        offsets.extend(got);
    }
    offsets.sort_unstable();
    assert_eq!(offsets, (1..=200).collect::<Vec<u64>>());
    let h = a.history("c", None, 1000).await.unwrap();
    assert_eq!(h.position.offset, 200);
    assert_eq!(
        h.publications.len(),
        100,
        "history_size keeps the newest 100"
    );
    assert_eq!(h.publications[0].offset, 101);
}

#[tokio::test]
async fn resume_on_the_other_node_replays_then_goes_live() {
    crate::need_redis!();
    let redis = RedisServer::start();
    let (a, b) = (node(&redis, |_| {}).await, node(&redis, |_| {}).await);
    let ca = client();
    let first = a.subscribe_async(&ca, "r", None, &ack).await.unwrap();
    let epoch = first.position.epoch.clone();
    for i in 1..=3 {
        publish(&a, "r", &i.to_string()).await;
    }
    let mut seen = Vec::new();
    within("node a delivers 3", async {
        while seen.len() < 4 {
            drain(&ca, &mut seen);
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await;
    // Cut: the client leaves node a at offset 3; 5 more are published meanwhile.
    a.remove_client(&ca);
    for i in 4..=8 {
        publish(&a, "r", &i.to_string()).await;
    }
    // It comes back on node b while publications keep flowing through node a.
    let cb = client();
    let since = StreamPosition {
        offset: 3,
        epoch: epoch.clone(),
    };
    let flow = {
        let a = a.clone();
        tokio::spawn(async move {
            for i in 9..=40 {
                publish(&a, "r", &i.to_string()).await;
            }
        })
    };
    let sub = b
        .subscribe_async(&cb, "r", Some(&since), &ack)
        .await
        .unwrap();
    assert_eq!(sub.recovered, Some(true));
    assert_eq!(sub.position.epoch, epoch, "one epoch across nodes");
    flow.await.unwrap();
    let mut got = Vec::new();
    within("node b replays then delivers live up to 40", async {
        while got.last().map(String::as_str) != Some("40") {
            drain(&cb, &mut got);
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await;
    assert_eq!(got[0], format!("ack {} Some(true)", sub.position.offset));
    let offsets: Vec<u64> = got[1..].iter().map(|s| s.parse().unwrap()).collect();
    assert_eq!(
        offsets,
        (4..=40).collect::<Vec<u64>>(),
        "every offset once, in order"
    );
    // Another epoch, or a position from the future: not recovered.
    let cc = client();
    for since in [
        StreamPosition {
            offset: 3,
            epoch: "0badbeef".into(),
        },
        StreamPosition {
            offset: 99,
            epoch: epoch.clone(),
        },
    ] {
        let s = b
            .subscribe_async(&cc, "r", Some(&since), &ack)
            .await
            .unwrap();
        assert_eq!((s.position.offset, s.recovered), (40, Some(false)));
        b.remove_client(&cc);
    }
    b.remove_client(&cb);
    wait_until("no subscriptions left", || b.hub.total_subscriptions() == 0).await;
}

#[tokio::test]
async fn an_idempotency_key_publishes_once_across_nodes() {
    crate::need_redis!();
    let redis = RedisServer::start();
    let (a, b) = (node(&redis, |_| {}).await, node(&redis, |_| {}).await);
    let mut tasks = Vec::new();
    for n in [a.clone(), b.clone(), a.clone(), b.clone()] {
        tasks.push(tokio::spawn(async move {
            n.publish(PublishRequest {
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
    assert!(receipts.iter().all(|r| r.offset == 1));
    assert_eq!(receipts.iter().filter(|r| !r.duplicate).count(), 1);
    let h = b.history("k", None, 10).await.unwrap();
    assert_eq!(h.publications.len(), 1);
    assert_eq!(&h.publications[0].data()[..], b"{\"x\":1}");
    // History of an unknown topic creates nothing.
    let h = a.history("nobody", None, 10).await.unwrap();
    assert_eq!((h.position.offset, &*h.position.epoch), (0, ""));
}

/// Redis loses a topic (a restart without persistence, here a flush): its offsets begin
/// again under a new epoch. The node's subscribers are closed, never left waiting for
/// offsets they will not recognize, and resuming says `recovered:false`.
#[tokio::test]
async fn a_stream_restarted_by_redis_closes_its_subscribers() {
    crate::need_redis!();
    let redis = RedisServer::start();
    let a = node(&redis, |_| {}).await;
    let c = client();
    a.subscribe_async(&c, "e", None, &ack).await.unwrap();
    let mut old = None;
    for i in 1..=3 {
        old = Some(publish(&a, "e", &i.to_string()).await);
    }
    let old = old.unwrap();
    let mut got = Vec::new();
    within("3 delivered", async {
        while got.len() < 4 {
            drain(&c, &mut got);
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await;
    let conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut conn.clone())
        .await
        .unwrap();
    let fresh = publish(&a, "e", "4").await;
    assert_eq!(fresh.offset, 1);
    assert_ne!(fresh.epoch, old.epoch);
    wait_until("the subscriber is closed", || c.closed().is_some()).await;
    a.remove_client(&c);
    let back = client();
    let s = a
        .subscribe_async(
            &back,
            "e",
            Some(&StreamPosition {
                offset: 3,
                epoch: old.epoch.clone(),
            }),
            &ack,
        )
        .await
        .unwrap();
    assert_eq!(s.recovered, Some(false));
    assert_eq!((s.position.offset, &s.position.epoch), (1, &fresh.epoch));
    a.remove_client(&back);
}

/// A stalled Redis (`DEBUG SLEEP`): publishes fail with `Unavailable` (503) after
/// `redis_timeout` instead of hanging, and succeed again once Redis answers.
#[tokio::test]
async fn a_stalled_redis_fails_publishes_instead_of_hanging() {
    crate::need_redis!();
    let redis = RedisServer::start();
    let a = node(&redis, |c| {
        c.redis_timeout = std::time::Duration::from_millis(200)
    })
    .await;
    publish(&a, "z", "1").await;
    let conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let sleeper = tokio::spawn(async move {
        let _: () = redis::cmd("DEBUG")
            .arg("SLEEP")
            .arg(2)
            .query_async(&mut conn.clone())
            .await
            .unwrap();
    });
    // The sleep has begun once a command of ours times out.
    let err = within("a publish fails while redis sleeps", async {
        loop {
            let r = a
                .publish(PublishRequest {
                    topic: "z",
                    data: b"2",
                    ..PublishRequest::default()
                })
                .await;
            match r {
                Err(e) => return e,
                Ok(_) => tokio::time::sleep(std::time::Duration::from_millis(5)).await,
            }
        }
    })
    .await;
    assert!(
        matches!(err, crier::broker::BrokerError::Unavailable(_)),
        "{err:?}"
    );
    sleeper.await.unwrap();
    within("publishing works again", async {
        while a
            .publish(PublishRequest {
                topic: "z",
                data: b"3",
                ..PublishRequest::default()
            })
            .await
            .is_err()
        {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// Redis cuts the node's pub/sub connection (`CLIENT KILL TYPE pubsub`, as an output-buffer
/// limit would): the node notices, reconnects by itself and fills the gap from history, so
/// its subscriber stays connected and gets what was published meanwhile, then live
/// publications, each once and in order.
#[tokio::test]
async fn a_pubsub_connection_cut_by_redis_is_detected_and_recovered() {
    crate::need_redis!();
    let redis = RedisServer::start();
    let (a, b) = (node(&redis, |_| {}).await, node(&redis, |_| {}).await);
    let c = client();
    let first = a.subscribe_async(&c, "p", None, &ack).await.unwrap();
    publish(&b, "p", "1").await;
    let mut got = Vec::new();
    within("1 delivered", async {
        while got.len() < 2 {
            drain(&c, &mut got);
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await;
    let conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut conn.clone())
        .await
        .unwrap();
    assert!(killed >= 1);
    // Published while the node's subscription may be down: it arrives from history.
    publish(&b, "p", "2").await;
    let health = a.health();
    wait_until("the node is subscribed again", || health.subscribed()).await;
    publish(&b, "p", "3").await;
    within("2 and 3 delivered", async {
        while got.last().map(String::as_str) != Some("3") {
            drain(&c, &mut got);
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(c.closed().is_none(), "the subscriber stayed connected");
    assert_eq!(
        got,
        [
            format!("ack {} None", first.position.offset),
            "1".into(),
            "2".into(),
            "3".into()
        ]
    );
    a.remove_client(&c);
}

/// Redis killed with SIGKILL mid-stream and restarted without persistence: while it is
/// down publishes fail (never a receipt for something not stored) and the node's
/// subscribers stay connected; once it is back the node reconnects by itself, finds the
/// stream gone and closes them (they resume and hear `recovered:false`), and the topic
/// continues under a new epoch.
#[tokio::test]
async fn redis_killed_and_restarted_without_persistence() {
    crate::need_redis!();
    let mut redis = RedisServer::start();
    let a = node(&redis, |c| {
        c.redis_timeout = std::time::Duration::from_millis(300)
    })
    .await;
    let c = client();
    a.subscribe_async(&c, "k", None, &ack).await.unwrap();
    let mut old = None;
    for i in 1..=3 {
        old = Some(publish(&a, "k", &i.to_string()).await);
    }
    let old = old.unwrap();
    redis.kill();
    let down = a
        .publish(PublishRequest {
            topic: "k",
            data: b"4",
            ..PublishRequest::default()
        })
        .await;
    assert!(
        matches!(down, Err(crier::broker::BrokerError::Unavailable(_))),
        "{down:?}"
    );
    let health = a.health();
    wait_until("the node sees redis down", || !health.subscribed()).await;
    assert!(c.closed().is_none(), "kept while redis is down");
    redis.restart();
    wait_until("the subscriber is closed", || c.closed().is_some()).await;
    a.remove_client(&c);
    let fresh = within("publishing works again", async {
        loop {
            let r = a
                .publish(PublishRequest {
                    topic: "k",
                    data: b"5",
                    ..PublishRequest::default()
                })
                .await;
            match r {
                Ok(r) => return r,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        }
    })
    .await;
    assert_eq!(fresh.offset, 1);
    assert_ne!(fresh.epoch, old.epoch, "the lost stream has a new epoch");
    let back = client();
    let since = StreamPosition {
        offset: 3,
        epoch: old.epoch.clone(),
    };
    let sub = within("the node subscribes again", async {
        loop {
            match a.subscribe_async(&back, "k", Some(&since), &ack).await {
                Ok(s) => return s,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        }
    })
    .await;
    assert_eq!(sub.recovered, Some(false));
    assert_eq!(
        (sub.position.offset, &sub.position.epoch),
        (1, &fresh.epoch)
    );
    publish(&a, "k", "6").await;
    let mut got = Vec::new();
    within("live again after the restart", async {
        while got.last().map(String::as_str) != Some("2") {
            drain(&back, &mut got);
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await;
    assert_eq!(got, ["ack 1 Some(false)".to_string(), "2".into()]);
    a.remove_client(&back);
}
