//! The local registry: topic -> subscribers, sharded by topic so unrelated topics never
//! contend. A topic's own mutex orders everything about it: offsets are assigned, fan-out
//! pushes and subscribe acknowledgements are queued under it, so each subscriber sees
//! offsets in order and its `subscribed` reply before any publication after it. The lock
//! is held only for non-blocking queue pushes; never across an `.await` or a socket write.
//!
//! The table is bounded (`max_topics`), and anyone who can open a socket can ask for a
//! topic by subscribing to a fresh name, so the table has two budgets:
//!
//! - A topic that exists only because someone subscribed to it (never published to, so it
//!   holds no offsets worth keeping) counts against `max_subscriber_topics`, a part of
//!   `max_topics`. Subscribers alone can therefore never take the rest of the table, which
//!   stays free for topics that publishers and boards write to. Such a topic is removed the
//!   moment its last subscriber leaves: it holds nothing, so it costs no eviction later.
//! - A topic that was published to keeps its offsets while idle (no subscriber, nothing
//!   retained), so a publisher sees them continue; idle topics sit in a FIFO queue and a
//!   creation at the cap evicts the oldest one. The queue uses lazy deletion: a topic is
//!   queued once when it turns idle and an entry found stale (the topic got a subscriber or
//!   retained state since) is dropped when popped. Each entry is pushed by one idle
//!   transition and popped once, so eviction costs amortized O(1) per topic, never a scan
//!   of the table, and the queue never holds more entries than there are topics.
//!
//! An evicted topic that comes back restarts its offsets in a new epoch, which the epoch in
//! every position and publish receipt makes visible.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
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

/// Who asks for a topic that does not exist yet: decides which budget it counts against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Creator {
    Publisher,
    Subscriber,
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
    /// Published to at least once: counts against `max_topics` only, and its offsets are
    /// kept while idle. Otherwise it counts against `max_subscriber_topics` too.
    published: bool,
    /// Has an entry in the idle queue (which may be stale by now).
    queued: bool,
    /// Set when removed from the table (always under its shard lock): a holder of a stale
    /// `Arc<Topic>` must look the topic up again. A live topic is always in the table.
    dead: bool,
}

impl TopicState {
    fn idle(&self) -> bool {
        self.subscribers.is_empty() && self.retained.is_none()
    }
}

/// What a topic needs after a change, done once its lock is released.
enum Settled {
    Kept,
    /// Never published and now unused: nothing in it is worth keeping.
    Unused,
}

pub struct Hub {
    shards: Box<[Shard]>,
    /// Idle published topics, oldest first (lazy deletion, see the module docs). The lock is
    /// a leaf: nothing else is locked while it is held.
    idle: Mutex<VecDeque<Arc<Topic>>>,
    topic_count: AtomicUsize,
    /// Topics that exist only because of subscriptions (never published to).
    subscriber_topics: AtomicUsize,
    max_topics: usize,
    max_subscriber_topics: usize,
    max_topics_per_connection: usize,
    metrics: Arc<Metrics>,
}

impl Hub {
    /// Subscriber-created topics get half the table unless
    /// [`with_max_subscriber_topics`](Self::with_max_subscriber_topics) says otherwise.
    pub fn new(max_topics: usize, max_topics_per_connection: usize, metrics: Arc<Metrics>) -> Self {
        Hub {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            idle: Mutex::new(VecDeque::new()),
            topic_count: AtomicUsize::new(0),
            subscriber_topics: AtomicUsize::new(0),
            max_topics,
            max_subscriber_topics: max_topics / 2,
            max_topics_per_connection,
            metrics,
        }
    }

    /// Caps topics that only subscribers asked for; never more than `max_topics`.
    pub fn with_max_subscriber_topics(mut self, max: usize) -> Self {
        self.max_subscriber_topics = max.min(self.max_topics);
        self
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    fn shard(&self, topic: &str) -> &Shard {
        let mut h = DefaultHasher::new();
        topic.hash(&mut h);
        &self.shards[(h.finish() as usize) % SHARDS]
    }

    fn topic(&self, name: &str, by: Creator) -> Result<Arc<Topic>, HubError> {
        if let Some(t) = self.shard(name).lock().get(name) {
            return Ok(t.clone());
        }
        self.reserve(by)?;
        // One allocation of the name, shared by the table key, the topic and its subscribers.
        let name: TopicName = name.into();
        let mut created = false;
        let t = self
            .shard(&name)
            .lock()
            .entry(name.clone())
            .or_insert_with(|| {
                created = true;
                Arc::new(Topic {
                    name,
                    epoch: new_epoch(),
                    state: Mutex::new(TopicState {
                        last_offset: 0,
                        subscribers: IndexMap::new(),
                        retained: None,
                        published: by == Creator::Publisher,
                        queued: false,
                        dead: false,
                    }),
                })
            })
            .clone();
        if created {
            self.metrics.topics.inc();
        } else {
            // Someone created it meanwhile: give the place back.
            self.release(by);
        }
        Ok(t)
    }

    /// Takes a place in the table for a new topic, evicting idle topics if it is full.
    fn reserve(&self, by: Creator) -> Result<(), HubError> {
        if by == Creator::Subscriber
            && !try_take(&self.subscriber_topics, self.max_subscriber_topics)
        {
            // Evicting would not help: no topic of this budget is ever idle.
            self.metrics.topics_refused.inc();
            return Err(HubError::TooManyTopics(TopicLimit::SubscriberCreated(
                self.max_subscriber_topics,
            )));
        }
        // Each round evicts a topic, so this ends after at most as many rounds as topics.
        while !try_take(&self.topic_count, self.max_topics) {
            if !self.evict_oldest_idle() {
                if by == Creator::Subscriber {
                    self.subscriber_topics.fetch_sub(1, Ordering::Relaxed);
                }
                self.metrics.topics_refused.inc();
                return Err(HubError::TooManyTopics(TopicLimit::All(self.max_topics)));
            }
        }
        Ok(())
    }

    fn release(&self, by: Creator) {
        self.topic_count.fetch_sub(1, Ordering::Relaxed);
        if by == Creator::Subscriber {
            self.subscriber_topics.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Drops the oldest idle topic; false if none is idle. Stale queue entries met on the
    /// way are discarded (each was pushed by one idle transition, hence amortized O(1)).
    fn evict_oldest_idle(&self) -> bool {
        loop {
            let Some(topic) = self.idle.lock().pop_front() else {
                return false;
            };
            let evicted = self.unlink(&topic, |st| {
                st.queued = false;
                st.idle()
            });
            if evicted {
                self.metrics.topics_evicted.inc();
                return true;
            }
        }
    }

    /// Takes a live topic out of the table if `removable` (run under the shard lock, which
    /// a concurrent lookup needs, and the topic lock) says so; true if it did.
    fn unlink(&self, topic: &Topic, removable: impl FnOnce(&mut TopicState) -> bool) -> bool {
        let mut shard = self.shard(&topic.name).lock();
        let mut st = topic.state.lock();
        if !removable(&mut st) || st.dead {
            return false;
        }
        st.dead = true;
        drop(st);
        shard.remove(&topic.name);
        drop(shard);
        self.topic_count.fetch_sub(1, Ordering::Relaxed);
        self.metrics.topics.dec();
        true
    }

    /// Called under the topic lock after every change: queues a published topic that turned
    /// idle, or reports a never-published one that nobody uses any more.
    fn settle(&self, topic: &Arc<Topic>, st: &mut TopicState) -> Settled {
        if st.dead || !st.idle() {
            return Settled::Kept;
        }
        if !st.published {
            return Settled::Unused;
        }
        if !st.queued {
            st.queued = true;
            self.idle.lock().push_back(topic.clone());
        }
        Settled::Kept
    }

    /// Removes a never-published topic if it is still unused (rechecked under the shard
    /// lock, which a concurrent subscribe needs to find it).
    fn remove_unused(&self, topic: &Arc<Topic>) {
        if self.unlink(topic, |st| !st.published && st.idle()) {
            self.subscriber_topics.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Runs `f` on the topic's locked state, retrying if the topic was removed meanwhile.
    fn with_topic<R>(
        &self,
        name: &str,
        by: Creator,
        mut f: impl FnMut(&Topic, &mut TopicState) -> R,
    ) -> Result<R, HubError> {
        loop {
            let topic = self.topic(name, by)?;
            let mut st = topic.state.lock();
            if st.dead {
                continue;
            }
            let r = f(&topic, &mut st);
            let settled = self.settle(&topic, &mut st);
            drop(st);
            if let Settled::Unused = settled {
                self.remove_unused(&topic);
            }
            return Ok(r);
        }
    }

    /// Takes one subscriber off a topic, then lets the topic settle.
    fn leave(&self, name: &str, client_id: u64) {
        let Some(topic) = self.shard(name).lock().get(name).cloned() else {
            return;
        };
        let mut st = topic.state.lock();
        st.subscribers.swap_remove(&client_id);
        let settled = self.settle(&topic, &mut st);
        drop(st);
        if let Settled::Unused = settled {
            self.remove_unused(&topic);
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
        let receipt = self.with_topic(name, Creator::Publisher, |topic, st| {
            if !st.published {
                // From now on its offsets matter: it leaves the subscribers' budget.
                st.published = true;
                self.subscriber_topics.fetch_sub(1, Ordering::Relaxed);
            }
            st.last_offset += 1;
            let publication = Arc::new(Publication::new(topic.name.clone(), st.last_offset, data));
            let mut frames: [Option<Bytes>; 2] = [None, None];
            to_wake.reserve(st.subscribers.len());
            for client in st.subscribers.values() {
                let slot = &mut frames[client.transport as usize];
                let bytes = slot
                    .get_or_insert_with(|| publication.wire(client.transport))
                    .clone();
                let item = Item::publication(&publication, bytes, opts.conflate, true);
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
        let mut held_name = None;
        let pos = self.with_topic(name, Creator::Subscriber, |topic, st| {
            held_name = Some(topic.name.clone());
            let pos = Position {
                offset: st.last_offset,
                epoch: topic.epoch.clone(),
            };
            if let Some(bytes) = ack(&pos) {
                client.push(Item::control(bytes), &self.metrics);
            }
            if !already {
                st.subscribers.insert(client.id, client.clone());
                if let Some((p, conflate)) = &st.retained {
                    client.push(
                        Item::publication(p, p.wire(client.transport), *conflate, false),
                        &self.metrics,
                    );
                }
            }
            pos
        })?;
        if let (false, Some(name)) = (already, held_name) {
            client.topics.lock().push(name);
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
            self.leave(name, client.id);
            self.metrics.subscriptions.dec();
        }
        held
    }

    /// Removes the client from every topic it holds. Idempotent.
    pub fn remove_client(&self, client: &Arc<Client>) {
        let topics = std::mem::take(&mut *client.topics.lock());
        for name in &topics {
            self.leave(name, client.id);
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

    /// Topics that exist only because of subscriptions (never published to).
    pub fn subscriber_topic_count(&self) -> usize {
        self.subscriber_topics.load(Ordering::Relaxed)
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

/// Adds one to `counter` unless it already is `max`.
fn try_take(counter: &AtomicUsize, max: usize) -> bool {
    counter
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
            (n < max).then_some(n + 1)
        })
        .is_ok()
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

    fn ws_client() -> Arc<Client> {
        Arc::new(Client::new(Transport::Ws, 1 << 20))
    }

    fn exists(h: &Hub, name: &str) -> bool {
        h.shard(name).lock().contains_key(name)
    }

    fn idle_len(h: &Hub) -> usize {
        h.idle.lock().len()
    }

    /// The counters agree with the table, and the idle queue is no longer than the table.
    fn check_counts(h: &Hub) {
        let topics: Vec<Arc<Topic>> = h
            .shards
            .iter()
            .flat_map(|s| s.lock().values().cloned().collect::<Vec<_>>())
            .collect();
        let unpublished = topics.iter().filter(|t| !t.state.lock().published).count();
        assert_eq!(h.topic_count(), topics.len());
        assert_eq!(h.subscriber_topic_count(), unpublished);
        assert_eq!(h.metrics().topics.get() as usize, topics.len());
        assert!(idle_len(h) <= topics.len());
        for t in &topics {
            let st = t.state.lock();
            assert!(!st.dead);
            // Every idle published topic can be found by eviction.
            assert!(!(st.published && st.idle()) || st.queued);
            assert!(
                st.published || !st.idle(),
                "unused topic {} left behind",
                t.name
            );
        }
    }

    #[test]
    fn caps_and_cleanup() {
        let h = hub(2).with_max_subscriber_topics(2);
        let c = ws_client();
        h.subscribe(&c, "a", |_| None).unwrap();
        h.subscribe(&c, "a", |_| None).unwrap(); // twice is fine, counted once
        h.subscribe(&c, "b", |_| None).unwrap();
        assert_eq!(
            h.subscribe(&c, "c", |_| None).unwrap_err(),
            HubError::TooManyTopics(TopicLimit::SubscriberCreated(2))
        );
        assert_eq!(h.total_subscriptions(), 2);
        assert!(h.unsubscribe(&c, "a"));
        assert!(!h.unsubscribe(&c, "a"));
        // "a" was never published to: it left with its last subscriber, making room for "c".
        assert!(!exists(&h, "a"));
        h.subscribe(&c, "c", |_| None).unwrap();
        let d = ws_client();
        for t in ["x", "y", "z"] {
            let _ = h.subscribe(&d, t, |_| None);
        }
        check_counts(&h);
        h.remove_client(&c);
        h.remove_client(&d);
        assert_eq!(h.total_subscriptions(), 0);
        assert_eq!(h.metrics().subscriptions.get(), 0);
        assert_eq!(h.topic_count(), 0);
        assert_eq!(h.metrics().topics.get(), 0);
        check_counts(&h);
    }

    #[test]
    fn subscribers_cannot_starve_publishers() {
        let h = hub(10); // subscribers may create 5 topics
        let clients: Vec<_> = (0..4).map(|_| ws_client()).collect();
        let mut refused = 0;
        for (i, c) in clients.iter().enumerate() {
            for j in 0..3 {
                match h.subscribe(c, &format!("fresh-{i}-{j}"), |_| None) {
                    Ok(_) => {}
                    Err(e) => {
                        assert_eq!(e, HubError::TooManyTopics(TopicLimit::SubscriberCreated(5)));
                        refused += 1;
                    }
                }
            }
        }
        assert_eq!(refused, 12 - 5);
        assert_eq!(h.subscriber_topic_count(), 5);
        // Subscribing to a topic that exists needs no new place.
        let fan = ws_client();
        h.subscribe(&fan, "fresh-0-0", |_| None).unwrap();
        // Publishers get the other half, and idle topics make room for new ones forever.
        for i in 0..100 {
            let r = h
                .publish(&format!("news-{i}"), b"1", PublishOptions::default())
                .unwrap();
            assert_eq!(r.offset, 1);
        }
        assert_eq!(h.topic_count(), 10);
        // A retained (board) topic still gets its place.
        let board = PublishOptions {
            retain: true,
            conflate: true,
        };
        h.publish("board:x", b"{}", board).unwrap();
        // Publishing to a subscriber-created topic moves it to the publishers' side.
        h.publish("fresh-0-0", b"2", PublishOptions::default())
            .unwrap();
        assert_eq!(h.subscriber_topic_count(), 4);
        check_counts(&h);
        for c in clients.iter().chain([&fan]) {
            h.remove_client(c);
        }
        assert_eq!(h.subscriber_topic_count(), 0);
        check_counts(&h);
    }

    #[test]
    fn eviction_pops_the_oldest_idle_topic_without_scanning() {
        let h = hub(4);
        for t in ["a", "b", "c", "d"] {
            h.publish(t, b"1", PublishOptions::default()).unwrap();
        }
        assert_eq!(idle_len(&h), 4);
        // Idle topics keep their offsets until evicted.
        assert_eq!(
            h.publish("a", b"2", PublishOptions::default())
                .unwrap()
                .offset,
            2
        );
        assert_eq!(idle_len(&h), 4, "an idle topic is queued once");
        let b_epoch = h
            .publish("b", b"2", PublishOptions::default())
            .unwrap()
            .epoch;

        // Full: "e" evicts exactly the oldest idle topic, one queue entry examined.
        h.publish("e", b"1", PublishOptions::default()).unwrap();
        assert!(!exists(&h, "a"));
        assert_eq!(idle_len(&h), 4);
        assert_eq!(h.metrics().topics_evicted.get(), 1);

        // "b" gets a subscriber: its queue entry goes stale and is skipped (and dropped) on
        // the next eviction, which takes "c".
        let c = ws_client();
        h.subscribe(&c, "b", |_| None).unwrap();
        h.publish("f", b"1", PublishOptions::default()).unwrap();
        assert!(exists(&h, "b") && !exists(&h, "c"));
        assert_eq!(idle_len(&h), 3, "d, e, f");
        // Idle again: queued again, behind the others.
        h.unsubscribe(&c, "b");
        assert_eq!(idle_len(&h), 4);
        let r = h.publish("b", b"3", PublishOptions::default()).unwrap();
        assert_eq!((r.offset, &r.epoch), (3, &b_epoch), "b kept its offsets");
        for t in ["g", "h", "i"] {
            h.publish(t, b"1", PublishOptions::default()).unwrap();
        }
        assert!(exists(&h, "b") && !exists(&h, "d") && !exists(&h, "f"));
        h.publish("j", b"1", PublishOptions::default()).unwrap();
        assert!(!exists(&h, "b"));
        // An evicted topic comes back in a new epoch, offsets restarting.
        let r = h.publish("b", b"4", PublishOptions::default()).unwrap();
        assert_eq!(r.offset, 1);
        assert_ne!(r.epoch, b_epoch);
        check_counts(&h);
    }

    #[test]
    fn a_full_table_with_nothing_idle_refuses_at_once() {
        let h = hub(3);
        let retained = PublishOptions {
            retain: true,
            conflate: true,
        };
        for t in ["board:a", "board:b", "board:c"] {
            h.publish(t, b"{}", retained).unwrap();
        }
        // Retained topics are not idle; their stale queue entries (none here) cost nothing.
        assert_eq!(idle_len(&h), 0);
        assert_eq!(
            h.publish("x", b"1", PublishOptions::default()).unwrap_err(),
            HubError::TooManyTopics(TopicLimit::All(3))
        );
        assert_eq!(h.metrics().topics_refused.get(), 1);
        // Dropping the retained state makes a topic idle and evictable.
        h.publish("board:b", b"{}", PublishOptions::default())
            .unwrap();
        h.publish("x", b"1", PublishOptions::default()).unwrap();
        assert!(!exists(&h, "board:b"));
        check_counts(&h);
    }

    #[test]
    fn concurrent_churn_keeps_the_counts_true() {
        let h = Arc::new(hub(24).with_max_subscriber_topics(8));
        let threads: Vec<_> = (0..4u64)
            .map(|k| {
                let h = h.clone();
                std::thread::spawn(move || {
                    let c = Arc::new(Client::new(Transport::Ws, usize::MAX / 2));
                    for i in 0..3000u64 {
                        let name = format!("t{}", (i * 7 + k * 13) % 40);
                        match (i + k) % 4 {
                            0 | 1 => {
                                let _ = h.subscribe(&c, &name, |_| None);
                            }
                            2 => {
                                h.unsubscribe(&c, &name);
                            }
                            _ => {
                                let _ = h.publish(&name, b"1", PublishOptions::default());
                            }
                        }
                        if i % 500 == 0 {
                            drain(&c);
                        }
                    }
                    h.remove_client(&c);
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(h.total_subscriptions(), 0);
        assert_eq!(h.metrics().subscriptions.get(), 0);
        assert_eq!(h.subscriber_topic_count(), 0);
        check_counts(&h);
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
