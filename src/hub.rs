//! The local registry: topic -> subscribers, sharded by topic so unrelated topics never
//! contend. A topic's own mutex orders everything about it: offsets are assigned, fan-out
//! pushes and subscribe acknowledgements are queued under it, so each subscriber sees
//! offsets in order and its `subscribed` reply before any publication after it. The lock
//! is held only for non-blocking queue pushes; never across an `.await` or a socket write.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use indexmap::IndexMap;
use parking_lot::Mutex;

use crate::client::{Client, Item, Pushed};
use crate::metrics::Metrics;
#[cfg(test)]
use crate::metrics::Transport;
use crate::publication::Publication;
use crate::topic::TopicName;

const SHARDS: usize = 64;

type Shard = Mutex<HashMap<TopicName, Arc<Topic>>>;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum HubError {
    #[error("the node already tracks {0} topics and none is idle")]
    TooManyTopics(usize),
    #[error("a connection may hold at most {0} topics")]
    TooManyTopicsPerConnection(usize),
    #[error("connection is closed")]
    ClientClosed,
}

/// How a topic treats its latest publication.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PublishOptions {
    /// Keep the latest publication and give it to each new subscriber first.
    pub retain: bool,
    /// In a slow subscriber's queue, a newer publication replaces an unsent older one.
    pub conflate: bool,
}

#[derive(Debug, Clone)]
pub struct Receipt {
    pub offset: u64,
    pub epoch: Arc<str>,
    pub subscribers: usize,
}

#[derive(Debug, Clone)]
pub struct Position {
    pub offset: u64,
    pub epoch: Arc<str>,
}

struct Topic {
    name: TopicName,
    epoch: Arc<str>,
    state: Mutex<TopicState>,
}

struct TopicState {
    last_offset: u64,
    subscribers: IndexMap<u64, Arc<Client>>,
    retained: Option<(Arc<Publication>, bool)>,
    /// Set when evicted: a holder of a stale `Arc<Topic>` must look the topic up again.
    dead: bool,
}

pub struct Hub {
    shards: Box<[Shard]>,
    topic_count: AtomicUsize,
    max_topics: usize,
    max_topics_per_connection: usize,
    metrics: Arc<Metrics>,
}

impl Hub {
    pub fn new(max_topics: usize, max_topics_per_connection: usize, metrics: Arc<Metrics>) -> Self {
        Hub {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            topic_count: AtomicUsize::new(0),
            max_topics,
            max_topics_per_connection,
            metrics,
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    fn shard(&self, topic: &str) -> &Shard {
        let mut h = DefaultHasher::new();
        topic.hash(&mut h);
        &self.shards[(h.finish() as usize) % SHARDS]
    }

    fn topic(&self, name: &str) -> Result<Arc<Topic>, HubError> {
        if let Some(t) = self.shard(name).lock().get(name) {
            return Ok(t.clone());
        }
        if self.topic_count.load(Ordering::Relaxed) >= self.max_topics {
            self.evict_idle();
            if self.topic_count.load(Ordering::Relaxed) >= self.max_topics {
                return Err(HubError::TooManyTopics(self.max_topics));
            }
        }
        let mut shard = self.shard(name).lock();
        let t = shard.entry(name.into()).or_insert_with(|| {
            self.topic_count.fetch_add(1, Ordering::Relaxed);
            self.metrics.topics.inc();
            Arc::new(Topic {
                name: name.into(),
                epoch: new_epoch(),
                state: Mutex::new(TopicState {
                    last_offset: 0,
                    subscribers: IndexMap::new(),
                    retained: None,
                    dead: false,
                }),
            })
        });
        Ok(t.clone())
    }

    /// Drops topics nobody subscribes to and that retain nothing. Their offsets restart in a
    /// new epoch if they come back, which the epoch in every position makes visible.
    fn evict_idle(&self) {
        for shard in self.shards.iter() {
            let mut shard = shard.lock();
            shard.retain(|_, t| {
                let mut st = t.state.lock();
                let idle = st.subscribers.is_empty() && st.retained.is_none();
                if idle {
                    st.dead = true;
                    self.topic_count.fetch_sub(1, Ordering::Relaxed);
                    self.metrics.topics.dec();
                }
                !idle
            });
        }
    }

    /// Runs `f` on the topic's locked state, retrying if the topic was evicted meanwhile.
    fn with_topic<R>(
        &self,
        name: &str,
        mut f: impl FnMut(&Topic, &mut TopicState) -> R,
    ) -> Result<R, HubError> {
        loop {
            let topic = self.topic(name)?;
            let mut st = topic.state.lock();
            if !st.dead {
                return Ok(f(&topic, &mut st));
            }
        }
    }

    /// Assigns the next offset and hands the publication to every subscriber's queue.
    /// `data` must be valid JSON.
    pub fn publish(
        &self,
        name: &str,
        data: &[u8],
        opts: PublishOptions,
    ) -> Result<Receipt, HubError> {
        let mut to_wake: Vec<Arc<Client>> = Vec::new();
        let receipt = self.with_topic(name, |topic, st| {
            st.last_offset += 1;
            let publication = Arc::new(Publication::new(topic.name.clone(), st.last_offset, data));
            let conflate = opts.conflate.then(|| topic.name.clone());
            let mut frames: [Option<Bytes>; 2] = [None, None];
            to_wake.reserve(st.subscribers.len());
            for client in st.subscribers.values() {
                let slot = &mut frames[client.transport as usize];
                let bytes = slot
                    .get_or_insert_with(|| publication.wire(client.transport))
                    .clone();
                let item = Item {
                    bytes,
                    published_at: Some(publication.published_at),
                    conflate: conflate.clone(),
                };
                if matches!(
                    client.enqueue(item, &self.metrics),
                    Pushed::Wake | Pushed::Overflowed
                ) {
                    to_wake.push(client.clone());
                }
            }
            st.retained = opts.retain.then(|| (publication.clone(), opts.conflate));
            self.metrics.publications.inc();
            Receipt {
                offset: st.last_offset,
                epoch: topic.epoch.clone(),
                subscribers: st.subscribers.len(),
            }
        })?;
        // Waking schedules each writer task: done after the topic lock is released so the
        // next publication of this topic does not wait behind 10,000 wake-ups.
        for client in to_wake {
            client.wake();
        }
        Ok(receipt)
    }

    /// Adds the client to the topic. Under the topic lock, `ack` may build a reply that is
    /// queued before anything published later, then the retained publication (if any).
    /// Subscribing twice is not an error: the client is simply acknowledged again.
    pub fn subscribe(
        &self,
        client: &Arc<Client>,
        name: &str,
        ack: impl Fn(&Position) -> Option<Bytes>,
    ) -> Result<Position, HubError> {
        let already = {
            let topics = client.topics.lock();
            let already = topics.iter().any(|t| &**t == name);
            if !already && topics.len() >= self.max_topics_per_connection {
                return Err(HubError::TooManyTopicsPerConnection(
                    self.max_topics_per_connection,
                ));
            }
            already
        };
        let pos = self.with_topic(name, |topic, st| {
            let pos = Position {
                offset: st.last_offset,
                epoch: topic.epoch.clone(),
            };
            if let Some(bytes) = ack(&pos) {
                client.push(
                    Item {
                        bytes,
                        published_at: None,
                        conflate: None,
                    },
                    &self.metrics,
                );
            }
            if !already {
                st.subscribers.insert(client.id, client.clone());
                if let Some((p, conflate)) = &st.retained {
                    client.push(
                        Item {
                            bytes: p.wire(client.transport),
                            published_at: None,
                            conflate: conflate.then(|| topic.name.clone()),
                        },
                        &self.metrics,
                    );
                }
            }
            pos
        })?;
        if !already {
            client.topics.lock().push(name.into());
            self.metrics.subscriptions.inc();
        }
        if client.closed().is_some() {
            // Closed concurrently (or by this very push): undo so nothing is left behind.
            self.remove_client(client);
            return Err(HubError::ClientClosed);
        }
        Ok(pos)
    }

    /// Returns whether the client was subscribed.
    pub fn unsubscribe(&self, client: &Arc<Client>, name: &str) -> bool {
        let held = {
            let mut topics = client.topics.lock();
            match topics.iter().position(|t| &**t == name) {
                Some(i) => {
                    topics.swap_remove(i);
                    true
                }
                None => false,
            }
        };
        if held {
            if let Some(topic) = self.shard(name).lock().get(name).cloned() {
                topic.state.lock().subscribers.swap_remove(&client.id);
            }
            self.metrics.subscriptions.dec();
        }
        held
    }

    /// Removes the client from every topic it holds. Idempotent.
    pub fn remove_client(&self, client: &Arc<Client>) {
        let topics = std::mem::take(&mut *client.topics.lock());
        for name in &topics {
            if let Some(topic) = self.shard(name).lock().get(&**name).cloned() {
                topic.state.lock().subscribers.swap_remove(&client.id);
            }
            self.metrics.subscriptions.dec();
        }
    }

    pub fn subscriber_count(&self, name: &str) -> usize {
        self.shard(name)
            .lock()
            .get(name)
            .map(|t| t.state.lock().subscribers.len())
            .unwrap_or(0)
    }

    /// Total subscriptions across topics (for leak checks in tests and /healthz).
    pub fn total_subscriptions(&self) -> usize {
        let topics: Vec<Arc<Topic>> = self
            .shards
            .iter()
            .flat_map(|s| s.lock().values().cloned().collect::<Vec<_>>())
            .collect();
        topics
            .iter()
            .map(|t| t.state.lock().subscribers.len())
            .sum()
    }

    pub fn topic_count(&self) -> usize {
        self.topic_count.load(Ordering::Relaxed)
    }

    /// Closes every client (shutdown): each writer flushes what is queued, then closes.
    pub fn close_all(&self, reason: crate::close::DisconnectReason) {
        let topics: Vec<Arc<Topic>> = self
            .shards
            .iter()
            .flat_map(|s| s.lock().values().cloned().collect::<Vec<_>>())
            .collect();
        for t in topics {
            let clients: Vec<Arc<Client>> = t.state.lock().subscribers.values().cloned().collect();
            for c in clients {
                c.close(reason);
            }
        }
    }
}

fn new_epoch() -> Arc<str> {
    format!("{:08x}", rand::random::<u32>()).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::Batch;

    fn hub(max_topics: usize) -> Hub {
        Hub::new(max_topics, 3, Arc::new(Metrics::new()))
    }

    fn drain(c: &Client) -> Vec<Bytes> {
        match c.take(usize::MAX, usize::MAX) {
            Batch::Items(items) => items.into_iter().map(|i| i.bytes).collect(),
            _ => vec![],
        }
    }

    #[test]
    fn offsets_are_per_topic_and_gapless() {
        let h = hub(10);
        assert_eq!(
            h.publish("a", b"1", PublishOptions::default())
                .unwrap()
                .offset,
            1
        );
        assert_eq!(
            h.publish("a", b"2", PublishOptions::default())
                .unwrap()
                .offset,
            2
        );
        assert_eq!(
            h.publish("b", b"3", PublishOptions::default())
                .unwrap()
                .offset,
            1
        );
    }

    #[test]
    fn ack_then_retained_then_live_in_order() {
        let h = hub(10);
        let opts = PublishOptions {
            retain: true,
            conflate: true,
        };
        h.publish("board:x", b"{\"v\":1}", opts).unwrap();
        let c = Arc::new(Client::new(Transport::Sse, 1 << 20));
        let pos = h
            .subscribe(&c, "board:x", |p| {
                Some(Bytes::from(format!("ack{}", p.offset)))
            })
            .unwrap();
        assert_eq!(pos.offset, 1);
        h.publish("board:x", b"{\"v\":2}", opts).unwrap();
        // Unsent state v1 is conflated into v2: the subscriber gets the ack, then the newest.
        let got = drain(&c);
        assert_eq!(got.len(), 2);
        assert_eq!(&got[0][..], b"ack1");
        assert!(std::str::from_utf8(&got[1]).unwrap().contains("\"v\":2"));
        h.publish("board:x", b"{\"v\":3}", opts).unwrap();
        let got = drain(&c);
        assert_eq!(got.len(), 1);
        assert!(std::str::from_utf8(&got[0]).unwrap().contains("\"v\":3"));
    }

    #[test]
    fn caps_and_cleanup() {
        let h = hub(2);
        let c = Arc::new(Client::new(Transport::Ws, 1 << 20));
        h.subscribe(&c, "a", |_| None).unwrap();
        h.subscribe(&c, "a", |_| None).unwrap(); // twice is fine, counted once
        h.subscribe(&c, "b", |_| None).unwrap();
        assert_eq!(
            h.subscribe(&c, "c", |_| None).unwrap_err(),
            HubError::TooManyTopics(2)
        );
        assert_eq!(h.total_subscriptions(), 2);
        assert!(h.unsubscribe(&c, "a"));
        assert!(!h.unsubscribe(&c, "a"));
        // "a" is idle now and gets evicted to make room for "c".
        h.subscribe(&c, "c", |_| None).unwrap();
        let d = Arc::new(Client::new(Transport::Ws, 1 << 20));
        for t in ["x", "y", "z"] {
            let _ = h.subscribe(&d, t, |_| None);
        }
        h.remove_client(&c);
        h.remove_client(&d);
        assert_eq!(h.total_subscriptions(), 0);
        assert_eq!(h.metrics().subscriptions.get(), 0);
    }

    #[test]
    fn per_connection_topic_cap() {
        let h = hub(100);
        let c = Arc::new(Client::new(Transport::Ws, 1 << 20));
        for t in ["a", "b", "c"] {
            h.subscribe(&c, t, |_| None).unwrap();
        }
        assert_eq!(
            h.subscribe(&c, "d", |_| None).unwrap_err(),
            HubError::TooManyTopicsPerConnection(3)
        );
    }
}
