//! What the broker's unit tests share: a broker on the default config and the hub it
//! delivers to, publishing, reading a client's queue, and a check that every counter
//! agrees with the table. Subscribing goes through the one subscribe path, whose harness
//! lives with it (`subscribe.rs`, `testing`), above the broker.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::idempotency::KEY_COST;
use super::memory::MemoryBroker;
use super::stream::Stream;
use super::{PublishRequest, Receipt};
use crate::client::{Batch, Client, Item};
use crate::config::Config;
use crate::hub::Hub;
use crate::metrics::{Metrics, Transport};

/// A memory broker and the hub it delivers to (the broker itself sees only a sink).
pub(crate) struct TestBroker {
    pub(crate) broker: MemoryBroker,
    pub(crate) hub: Arc<Hub>,
}

impl std::ops::Deref for TestBroker {
    type Target = MemoryBroker;
    fn deref(&self) -> &MemoryBroker {
        &self.broker
    }
}

pub(crate) fn broker_with(tweak: impl FnOnce(&mut Config)) -> TestBroker {
    let mut cfg = Config::default();
    tweak(&mut cfg);
    let metrics = Arc::new(Metrics::new());
    let hub = Arc::new(Hub::new(3, metrics.clone()));
    TestBroker {
        broker: MemoryBroker::new(&cfg, hub.clone(), metrics),
        hub,
    }
}

pub(crate) fn broker(max_topics: usize) -> TestBroker {
    broker_with(|c| {
        c.max_topics = max_topics;
        c.max_subscriber_topics = max_topics / 2;
    })
}

pub(crate) fn publish(b: &MemoryBroker, topic: &str, data: &str) -> Receipt {
    b.publish_now(PublishRequest {
        topic,
        data: data.as_bytes(),
        ..PublishRequest::default()
    })
    .unwrap()
}

pub(crate) fn publish_state(b: &MemoryBroker, topic: &str, data: &str) -> Receipt {
    b.publish_now(PublishRequest {
        topic,
        data: data.as_bytes(),
        retain: true,
        conflate: true,
        idempotency_key: None,
    })
    .unwrap()
}

pub(crate) fn drain(c: &Client) -> Vec<Item> {
    match c.take(usize::MAX, usize::MAX) {
        Batch::Items(items) => items,
        _ => vec![],
    }
}

pub(crate) fn offsets(items: &[Item]) -> Vec<u64> {
    items
        .iter()
        .filter_map(|i| i.source.as_ref().map(|s| s.1))
        .collect()
}

pub(crate) fn ws_client() -> Arc<Client> {
    Arc::new(Client::new(Transport::Ws, 1 << 20))
}

pub(crate) fn exists(b: &MemoryBroker, name: &str) -> bool {
    b.lookup(name).is_some()
}

pub(crate) fn idle_len(b: &MemoryBroker) -> usize {
    b.idle.lock().len()
}

/// The counters agree with the table, and the queues are no longer than what they track.
pub(crate) fn check_counts(b: &TestBroker) {
    let streams: Vec<Arc<Stream>> = b
        .shards
        .iter()
        .flat_map(|s| s.lock().values().cloned().collect::<Vec<_>>())
        .collect();
    let unpublished = streams.iter().filter(|t| !t.state.lock().published).count();
    let boards = streams
        .iter()
        .filter(|t| t.state.lock().published && t.name.starts_with("board:"))
        .count();
    assert_eq!(b.board_topic_count(), boards);
    assert_eq!(b.topic_count() + boards, streams.len());
    assert_eq!(b.subscriber_topic_count(), unpublished);
    assert_eq!(b.metrics.subscriber_topics.get() as usize, unpublished);
    assert_eq!(b.metrics.topics.get() as usize, streams.len());
    assert!(idle_len(b) <= streams.len());
    let mut bytes = 0;
    let mut live = 0;
    for t in &streams {
        let st = t.state.lock();
        assert!(!t.dead.load(Ordering::Relaxed));
        // Every idle published topic can be found by eviction.
        assert!(!(st.published && st.idle()) || st.queued);
        assert!(
            st.published || !st.idle(),
            "unused topic {} left behind",
            t.name
        );
        assert_eq!(st.subscribers, b.hub.local_count(&t.name));
        // History is contiguous and ends at the newest offset.
        for (i, p) in st.history.iter().enumerate() {
            assert_eq!(
                p.offset,
                st.last_offset + 1 + i as u64 - st.history.len() as u64
            );
        }
        bytes += st.history.iter().map(|p| p.cost()).sum::<usize>();
        bytes += st
            .keys
            .order
            .iter()
            .map(|k| k.1.len() + KEY_COST)
            .sum::<usize>();
        live += st.history.len() + st.keys.order.len();
    }
    assert_eq!(b.history_bytes(), bytes);
    assert_eq!(b.metrics.history_bytes.get() as usize, bytes);
    assert_eq!(b.kept_live.load(Ordering::Relaxed), live);
    assert!(b.kept.lock().len() <= 2 * live + 1025);
}
