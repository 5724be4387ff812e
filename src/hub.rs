//! The local registry: topic -> this node's subscribers, sharded by topic so unrelated
//! topics never contend. It knows nothing about offsets, epochs or history: the broker
//! assigns those and hands each publication here, in offset order, to be pushed into every
//! local subscriber's queue.
//!
//! An entry exists only while the topic has a local subscriber, so the registry holds no
//! more entries than there are subscriptions (each bounded by `max_topics_per_connection`).
//! A topic's lock is held only for non-blocking queue pushes; never across an `.await` or a
//! socket write. Callers that also hold a broker lock take it first (lock order: broker
//! stream lock -> hub topic lock -> client queue lock).
//!
//! `deliver` drops a publication whose offset is not past the last one delivered to the
//! topic: a broker fed by several sources (Redis pub/sub beside a history read) may hand
//! the same publication twice, and a subscriber must never see it twice.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use bytes::Bytes;
use indexmap::IndexMap;
use parking_lot::Mutex;

use crate::client::{Client, Item, Pushed};
use crate::metrics::Metrics;
use crate::publication::Publication;
use crate::topic::TopicName;

const SHARDS: usize = 64;

type Shard = Mutex<HashMap<TopicName, Arc<Mutex<Local>>>>;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum HubError {
    #[error("{0}")]
    TooManyTopics(TopicLimit),
    #[error("a connection may hold at most {0} topics")]
    TooManyTopicsPerConnection(usize),
    #[error("connection is closed")]
    ClientClosed,
}

/// Which budget refused a new topic (both answer `too_many_topics`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TopicLimit {
    #[error("the node already tracks {0} topics and none is idle")]
    All(usize),
    #[error(
        "the node already tracks {0} topics that only subscribers asked for (none published \
         to yet); subscribe to topics that are published to"
    )]
    SubscriberCreated(usize),
}

/// One topic's local subscribers.
struct Local {
    subscribers: IndexMap<u64, Arc<Client>>,
    /// The newest offset handed to these subscribers (see the module docs).
    last_delivered: u64,
}

pub struct Hub {
    shards: Box<[Shard]>,
    max_topics_per_connection: usize,
    metrics: Arc<Metrics>,
}

impl Hub {
    pub fn new(max_topics_per_connection: usize, metrics: Arc<Metrics>) -> Self {
        Hub {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
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

    /// Whether the client already holds `name`; refuses a new topic past the per-connection
    /// cap. A client's subscriptions change only from its own connection task (and the
    /// cleanup after it), so the answer stays true until `join`.
    pub fn admit(&self, client: &Client, name: &str) -> Result<bool, HubError> {
        let topics = client.topics.lock();
        let already = topics.iter().any(|t| &**t == name);
        if !already && topics.len() >= self.max_topics_per_connection {
            return Err(HubError::TooManyTopicsPerConnection(
                self.max_topics_per_connection,
            ));
        }
        Ok(already)
    }

    /// Adds the client to the topic's subscribers; `position` is the offset it has already
    /// been given everything up to (a new entry starts delivering after it). Returns false
    /// if it was already subscribed.
    pub fn join(&self, client: &Arc<Client>, name: &TopicName, position: u64) -> bool {
        // Under the shard lock, so a concurrent `remove_subscriber` cannot drop the entry
        // between finding it and adding to it.
        let mut shard = self.shard(name).lock();
        let local = shard.entry(name.clone()).or_insert_with(|| {
            Arc::new(Mutex::new(Local {
                subscribers: IndexMap::new(),
                last_delivered: position,
            }))
        });
        let added = local
            .lock()
            .subscribers
            .insert(client.id, client.clone())
            .is_none();
        drop(shard);
        if added {
            client.topics.lock().push(name.clone());
            self.metrics.subscriptions.inc();
        }
        added
    }

    /// Takes the client off one topic; returns whether it was subscribed.
    pub fn leave(&self, client: &Client, name: &str) -> bool {
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
            self.remove_subscriber(name, client.id);
            self.metrics.subscriptions.dec();
        }
        held
    }

    /// The topics the client holds (a snapshot; `leave` each to remove it everywhere).
    pub fn topics_of(&self, client: &Client) -> Vec<TopicName> {
        client.topics.lock().clone()
    }

    fn remove_subscriber(&self, name: &str, client_id: u64) {
        let mut shard = self.shard(name).lock();
        let Some(local) = shard.get(name) else {
            return;
        };
        let mut l = local.lock();
        l.subscribers.swap_remove(&client_id);
        if l.subscribers.is_empty() {
            drop(l);
            shard.remove(name);
        }
    }

    /// Pushes the publication to every local subscriber of its topic. Clients whose writer
    /// must be woken are added to `to_wake`, for the caller to wake once it has released
    /// its own locks (so the next publication does not wait behind 10,000 wake-ups).
    /// Returns the number of local subscribers.
    pub fn deliver(
        &self,
        p: &Arc<Publication>,
        conflate: bool,
        to_wake: &mut Vec<Arc<Client>>,
    ) -> usize {
        let Some(local) = self.shard(&p.topic).lock().get(&p.topic).cloned() else {
            return 0;
        };
        let mut l = local.lock();
        if p.offset <= l.last_delivered {
            return l.subscribers.len();
        }
        l.last_delivered = p.offset;
        let mut frames: [Option<Bytes>; 2] = [None, None];
        to_wake.reserve(l.subscribers.len());
        for client in l.subscribers.values() {
            let slot = &mut frames[client.transport as usize];
            let bytes = slot.get_or_insert_with(|| p.wire(client.transport)).clone();
            let item = Item::publication(p, bytes, conflate, true);
            if matches!(
                client.enqueue(item, &self.metrics),
                Pushed::Wake | Pushed::Overflowed
            ) {
                to_wake.push(client.clone());
            }
        }
        l.subscribers.len()
    }

    /// The broker saw the topic's stream restart (a new epoch: its history was lost):
    /// closes its local subscribers, who reconnect and resume (answered `recovered:false`),
    /// and delivers again from offset 1.
    pub fn restart(&self, name: &str, reason: crate::close::DisconnectReason) {
        let Some(local) = self.shard(name).lock().get(name).cloned() else {
            return;
        };
        let mut l = local.lock();
        l.last_delivered = 0;
        for c in l.subscribers.values() {
            c.close(reason);
        }
    }

    pub fn subscriber_count(&self, name: &str) -> usize {
        self.shard(name)
            .lock()
            .get(name)
            .map(|t| t.lock().subscribers.len())
            .unwrap_or(0)
    }

    fn all(&self) -> Vec<Arc<Mutex<Local>>> {
        self.shards
            .iter()
            .flat_map(|s| s.lock().values().cloned().collect::<Vec<_>>())
            .collect()
    }

    /// Total subscriptions across topics (for leak checks in tests and /healthz).
    pub fn total_subscriptions(&self) -> usize {
        self.all().iter().map(|t| t.lock().subscribers.len()).sum()
    }

    /// Every topic with local subscribers and how many (for cluster-wide counts).
    pub fn topic_counts(&self) -> Vec<(TopicName, usize)> {
        self.shards
            .iter()
            .flat_map(|s| {
                s.lock()
                    .iter()
                    .map(|(n, t)| (n.clone(), t.lock().subscribers.len()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Topics with at least one local subscriber.
    pub fn subscribed_topics(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    /// Closes every client (shutdown): each writer flushes what is queued, then closes.
    pub fn close_all(&self, reason: crate::close::DisconnectReason) {
        for t in self.all() {
            let clients: Vec<Arc<Client>> = t.lock().subscribers.values().cloned().collect();
            for c in clients {
                c.close(reason);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::Batch;
    use crate::metrics::Transport;

    fn drain(c: &Client) -> Vec<Item> {
        match c.take(usize::MAX, usize::MAX) {
            Batch::Items(items) => items,
            _ => vec![],
        }
    }

    fn publication(topic: &TopicName, offset: u64) -> Arc<Publication> {
        Arc::new(Publication::new(topic.clone(), offset, b"{}"))
    }

    #[test]
    fn delivers_in_order_and_never_twice() {
        let h = Hub::new(3, Arc::new(Metrics::new()));
        let t: TopicName = "t".into();
        let c = Arc::new(Client::new(Transport::Ws, 1 << 20));
        assert!(h.join(&c, &t, 4));
        assert!(!h.join(&c, &t, 4), "joining twice is counted once");
        let mut wake = Vec::new();
        // At or before the position the subscriber joined at: already given to it.
        assert_eq!(h.deliver(&publication(&t, 4), false, &mut wake), 1);
        assert!(wake.is_empty());
        for o in [5, 6, 6, 5, 7] {
            h.deliver(&publication(&t, o), false, &mut wake);
        }
        let got: Vec<u64> = drain(&c)
            .iter()
            .map(|i| i.source.as_ref().unwrap().1)
            .collect();
        assert_eq!(got, [5, 6, 7]);
        assert_eq!(
            wake.len(),
            1,
            "woken once, by the push into the empty queue"
        );
        assert_eq!(h.total_subscriptions(), 1);
        assert!(h.leave(&c, "t"));
        assert!(!h.leave(&c, "t"));
        assert_eq!(
            h.subscribed_topics(),
            0,
            "an entry lives only while subscribed"
        );
        assert_eq!(h.metrics().subscriptions.get(), 0);
    }

    #[test]
    fn per_connection_topic_cap() {
        let h = Hub::new(3, Arc::new(Metrics::new()));
        let c = Arc::new(Client::new(Transport::Ws, 1 << 20));
        for t in ["a", "b", "c"] {
            assert!(!h.admit(&c, t).unwrap());
            h.join(&c, &t.into(), 0);
        }
        assert!(h.admit(&c, "a").unwrap());
        assert_eq!(
            h.admit(&c, "d").unwrap_err(),
            HubError::TooManyTopicsPerConnection(3)
        );
        for t in h.topics_of(&c) {
            h.leave(&c, &t);
        }
        assert_eq!(h.total_subscriptions(), 0);
    }
}
