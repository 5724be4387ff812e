//! The topic table: which topics exist, sharded by name, and the caps that bound it.
//!
//! The table is bounded (`max_topics`), and anyone who can open a socket can ask for a
//! topic by subscribing to a fresh name, so the table has two budgets:
//!
//! - A topic that exists only because someone subscribed to it (never published to, so it
//!   holds no offsets worth keeping) counts against `max_subscriber_topics`, a part of
//!   `max_topics`. Subscribers alone can therefore never take the rest of the table, which
//!   stays free for topics that publishers and boards write to. Such a topic is removed the
//!   moment its last subscriber leaves: it holds nothing, so it costs no eviction later.
//! - A topic that was published to keeps its offsets and history while idle (no
//!   subscriber, nothing retained), so a publisher sees them continue and a client can
//!   resume; idle topics sit in a FIFO queue and a creation at the cap evicts the oldest
//!   one. The queue uses lazy deletion: a topic is queued once when it turns idle and an
//!   entry found stale (the topic got a subscriber or retained state since) is dropped when
//!   popped. Each entry is pushed by one idle transition and popped once, so eviction costs
//!   amortized O(1) per topic, never a scan of the table.
//!
//! Published `board:*` topics are outside `max_topics` altogether. Each holds its board's
//! retained snapshot, so it is never idle and never evicted: counted in `max_topics`, 1,100
//! boards on a table of 1,000 would leave publishers nothing, for good. Only the leaderboard
//! service publishes them (the publish API refuses the names), one per board, so they are
//! bounded by the boards it holds (`max_boards`, or what the store held at start when a
//! restart lowered it) and need no cap of their own here: they are counted apart
//! (`board_topics`). A `board:*` topic that only has subscribers (no such board, or not
//! published yet) is a subscriber topic like any other, and leaves both subscriber budgets
//! the moment its board publishes.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::memory::MemoryBroker;
use super::stream::{new_epoch, Stream, StreamState};
use super::BrokerError;
use crate::hub::TopicLimit;
use crate::topic::TopicName;

pub(super) const SHARDS: usize = 64;
pub(super) type Shard = Mutex<HashMap<TopicName, Arc<Stream>>>;

/// Who asks for a topic that does not exist yet: decides which budget it counts against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Creator {
    Publisher,
    Subscriber,
}

/// Whether a published topic of this name counts against the boards' budget rather than
/// `max_topics` (see the module docs).
pub(super) fn is_board_topic(name: &str) -> bool {
    crate::topic::is_board_topic(name)
}

/// What a stream needs after a change, done once its lock is released.
pub(super) enum Settled {
    Kept,
    /// Never published and now unused: nothing in it is worth keeping.
    Unused,
}

impl MemoryBroker {
    pub(super) fn shard(&self, topic: &str) -> &Shard {
        let mut h = DefaultHasher::new();
        topic.hash(&mut h);
        &self.shards[(h.finish() as usize) % SHARDS]
    }

    pub(super) fn lookup(&self, name: &str) -> Option<Arc<Stream>> {
        self.shard(name).lock().get(name).cloned()
    }

    pub(super) fn stream(&self, name: &str, by: Creator) -> Result<Arc<Stream>, BrokerError> {
        if let Some(s) = self.lookup(name) {
            return Ok(s);
        }
        self.reserve(name, by)?;
        // One allocation of the name, shared by the table key, the stream and subscribers.
        let name: TopicName = name.into();
        let mut created = false;
        let s = self
            .shard(&name)
            .lock()
            .entry(name.clone())
            .or_insert_with(|| {
                created = true;
                let ns = self.cfg.namespace(&name);
                Arc::new(Stream::new(
                    name,
                    self.fresh_epoch.lock().clone(),
                    ns,
                    0,
                    by == Creator::Publisher,
                    0,
                ))
            })
            .clone();
        if created {
            self.metrics.topics.inc();
            if by == Creator::Subscriber {
                self.metrics.subscriber_topics.inc();
            }
        } else {
            // Someone created it meanwhile: give the place back.
            self.release(&s.name, by);
        }
        Ok(s)
    }

    /// Takes a place in the table for a new topic, evicting idle topics if it is full. A
    /// board's topic takes none (see the module docs).
    pub(super) fn reserve(&self, name: &str, by: Creator) -> Result<(), BrokerError> {
        if by == Creator::Publisher && is_board_topic(name) {
            self.board_topics.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        if by == Creator::Subscriber
            && !try_take(&self.subscriber_topics, self.max_subscriber_topics)
        {
            // Evicting would not help: no topic of this budget is ever idle.
            self.metrics.topics_refused.inc();
            return Err(BrokerError::TooManyTopics(TopicLimit::SubscriberCreated(
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
                return Err(BrokerError::TooManyTopics(TopicLimit::All(self.max_topics)));
            }
        }
        Ok(())
    }

    pub(super) fn release(&self, name: &str, by: Creator) {
        if by == Creator::Publisher && is_board_topic(name) {
            self.board_topics.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        self.topic_count.fetch_sub(1, Ordering::Relaxed);
        if by == Creator::Subscriber {
            self.subscriber_topics.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Drops the oldest idle topic; false if none is idle. Stale queue entries met on the
    /// way are discarded (each was pushed by one idle transition, hence amortized O(1)).
    pub(super) fn evict_oldest_idle(&self) -> bool {
        loop {
            let Some(stream) = self.idle.lock().pop_front() else {
                return false;
            };
            let evicted = self.unlink(&stream, |st| {
                st.queued = false;
                st.evictable()
            });
            if evicted {
                self.metrics.topics_evicted.inc();
                self.rotate_fresh_epoch();
                return true;
            }
        }
    }

    /// A published topic left the table: topics created from now on must not share an
    /// epoch with any position handed out before (see `MemoryBroker::fresh_epoch`).
    fn rotate_fresh_epoch(&self) {
        let mut e = self.fresh_epoch.lock();
        let mut next = new_epoch();
        while next == *e {
            next = new_epoch();
        }
        *e = next;
    }

    /// Takes a live stream out of the table if `removable` (run under the shard lock, which
    /// a concurrent lookup needs, and the stream lock) says so; true if it did. Its history
    /// and keys go with it.
    pub(super) fn unlink(
        &self,
        stream: &Stream,
        removable: impl FnOnce(&mut StreamState) -> bool,
    ) -> bool {
        let mut shard = self.shard(&stream.name).lock();
        let mut st = stream.state.lock();
        if !removable(&mut st) || stream.dead.load(Ordering::Acquire) {
            return false;
        }
        stream.dead.store(true, Ordering::Release);
        shard.remove(&stream.name);
        drop(shard);
        let n = st.history.len();
        self.trim_history(stream, &mut st, n);
        let n = st.keys.order.len();
        self.forget_keys(stream, &mut st, n);
        if let (true, true, Some(log)) = (stream.ns.durable, st.published, &self.log) {
            // A topic of this name made later has a new epoch: nothing of this one stays.
            // (A never-published one has nothing on disk: no write for a subscriber alone.)
            log.forget(&stream.name);
        }
        let board = st.published && is_board_topic(&stream.name);
        drop(st);
        if board {
            self.board_topics.fetch_sub(1, Ordering::Relaxed);
        } else {
            self.topic_count.fetch_sub(1, Ordering::Relaxed);
        }
        self.metrics.topics.dec();
        true
    }

    /// The first publish to a topic a subscriber created: from now on its offsets matter,
    /// so it leaves the subscribers' budget (and a board's topic leaves `max_topics` for
    /// the boards' count). Under the stream lock.
    pub(super) fn mark_published(&self, stream: &Stream, st: &mut StreamState) {
        if st.published {
            return;
        }
        st.published = true;
        self.subscriber_topics.fetch_sub(1, Ordering::Relaxed);
        self.metrics.subscriber_topics.dec();
        if is_board_topic(&stream.name) {
            self.topic_count.fetch_sub(1, Ordering::Relaxed);
            self.board_topics.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Called under the stream lock after every change: queues a published topic that
    /// turned idle, or reports a never-published one that nobody uses any more.
    pub(super) fn settle(&self, stream: &Arc<Stream>, st: &mut StreamState) -> Settled {
        if stream.dead.load(Ordering::Acquire) || !st.idle() {
            return Settled::Kept;
        }
        if !st.published {
            return Settled::Unused;
        }
        if !st.queued {
            st.queued = true;
            self.idle.lock().push_back(stream.clone());
        }
        Settled::Kept
    }

    /// Removes a never-published topic if it is still unused (rechecked under the shard
    /// lock, which a concurrent subscribe needs to find it).
    pub(super) fn remove_unused(&self, stream: &Arc<Stream>) {
        if self.unlink(stream, |st| !st.published && st.idle()) {
            self.subscriber_topics.fetch_sub(1, Ordering::Relaxed);
            self.metrics.subscriber_topics.dec();
        }
    }

    /// Runs `f` on the stream's locked state, retrying if the stream was removed meanwhile.
    pub(super) fn with_stream<R>(
        &self,
        name: &str,
        by: Creator,
        mut f: impl FnMut(&Arc<Stream>, &mut StreamState) -> R,
    ) -> Result<R, BrokerError> {
        loop {
            let stream = self.stream(name, by)?;
            let mut st = stream.state.lock();
            if stream.dead.load(Ordering::Acquire) {
                continue;
            }
            let r = f(&stream, &mut st);
            let settled = self.settle(&stream, &mut st);
            drop(st);
            if let Settled::Unused = settled {
                self.remove_unused(&stream);
            }
            return Ok(r);
        }
    }
}

/// Adds one to `counter` unless it already is `max`.
pub(super) fn try_take(counter: &AtomicUsize, max: usize) -> bool {
    counter
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
            (n < max).then_some(n + 1)
        })
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::testing::*;
    use crate::broker::PublishRequest;
    use crate::client::Client;
    use crate::metrics::Transport;
    use crate::subscribe::testing::*;

    #[test]
    fn caps_and_cleanup() {
        let b = broker_with(|c| {
            c.max_topics = 2;
            c.max_subscriber_topics = 2;
        });
        let c = ws_client();
        sub(&b, &c, "a").unwrap();
        sub(&b, &c, "a").unwrap(); // twice is fine, counted once
        sub(&b, &c, "b").unwrap();
        assert_eq!(
            sub(&b, &c, "c").unwrap_err(),
            BrokerError::TooManyTopics(TopicLimit::SubscriberCreated(2))
        );
        assert_eq!(b.hub.total_subscriptions(), 2);
        assert!(b.unsubscribe(&c, "a"));
        assert!(!b.unsubscribe(&c, "a"));
        // "a" was never published to: it left with its last subscriber, making room for "c".
        assert!(!exists(&b, "a"));
        sub(&b, &c, "c").unwrap();
        let d = ws_client();
        for t in ["x", "y", "z"] {
            let _ = sub(&b, &d, t);
        }
        check_counts(&b);
        b.remove_client(&c);
        b.remove_client(&d);
        assert_eq!(b.hub.total_subscriptions(), 0);
        assert_eq!(b.metrics.subscriptions.get(), 0);
        assert_eq!(b.topic_count(), 0);
        check_counts(&b);
    }

    #[test]
    fn subscribers_cannot_starve_publishers() {
        let b = broker(10); // subscribers may create 5 topics
        let clients: Vec<_> = (0..4).map(|_| ws_client()).collect();
        let mut refused = 0;
        for (i, c) in clients.iter().enumerate() {
            for j in 0..3 {
                if let Err(e) = sub(&b, c, &format!("fresh-{i}-{j}")) {
                    assert_eq!(
                        e,
                        BrokerError::TooManyTopics(TopicLimit::SubscriberCreated(5))
                    );
                    refused += 1;
                }
            }
        }
        assert_eq!(refused, 12 - 5);
        assert_eq!(b.subscriber_topic_count(), 5);
        let fan = ws_client();
        sub(&b, &fan, "fresh-0-0").unwrap();
        for i in 0..100 {
            assert_eq!(publish(&b, &format!("news-{i}"), "1").offset, 1);
        }
        assert_eq!(b.topic_count(), 10);
        publish_state(&b, "board:x", "{}");
        publish(&b, "fresh-0-0", "2");
        assert_eq!(b.subscriber_topic_count(), 4);
        check_counts(&b);
        for c in clients.iter().chain([&fan]) {
            b.remove_client(c);
        }
        assert_eq!(b.subscriber_topic_count(), 0);
        check_counts(&b);
    }

    /// A topic that only ever had subscribers holds nothing when it leaves, so it comes back
    /// in the same epoch and a client that saw offset 0 resumes exactly; once a published
    /// topic has been lost, topics come back in an epoch no earlier position names.
    #[test]
    fn only_losing_a_published_topic_changes_the_epoch_of_new_topics() {
        let b = broker(2);
        let c = ws_client();
        let first = sub(&b, &c, "quiet").unwrap().position;
        assert_eq!(first.offset, 0);
        b.remove_client(&c);
        assert_eq!(
            b.topic_count(),
            0,
            "the unused topic left with its subscriber"
        );
        for d in ["1", "2", "3"] {
            publish(&b, "quiet", d);
        }
        let c = ws_client();
        let back = resume(&b, &c, "quiet", first.clone());
        assert_eq!(back.recovered, Some(true));
        assert_eq!(back.position.epoch, first.epoch);
        assert_eq!(back.position.offset, 3);
        b.remove_client(&c);

        // "quiet" is idle with offsets 1..3; two new topics evict it.
        publish(&b, "x", "1");
        publish(&b, "y", "1");
        assert_eq!(b.metrics.topics_evicted.get(), 1);
        let c = ws_client();
        let after = resume(&b, &c, "quiet", first.clone());
        assert_eq!(after.recovered, Some(false), "its publications were lost");
        assert_ne!(after.position.epoch, first.epoch);
        check_counts(&b);
    }

    #[test]
    fn eviction_pops_the_oldest_idle_topic_without_scanning() {
        let b = broker(4);
        for t in ["a", "b", "c", "d"] {
            publish(&b, t, "1");
        }
        assert_eq!(idle_len(&b), 4);
        assert_eq!(publish(&b, "a", "2").offset, 2);
        assert_eq!(idle_len(&b), 4, "an idle topic is queued once");
        let b_epoch = publish(&b, "b", "2").epoch;

        publish(&b, "e", "1");
        assert!(!exists(&b, "a"));
        assert_eq!(idle_len(&b), 4);
        assert_eq!(b.metrics.topics_evicted.get(), 1);

        let c = ws_client();
        sub(&b, &c, "b").unwrap();
        publish(&b, "f", "1");
        assert!(exists(&b, "b") && !exists(&b, "c"));
        assert_eq!(idle_len(&b), 3, "d, e, f");
        b.unsubscribe(&c, "b");
        assert_eq!(idle_len(&b), 4);
        let r = publish(&b, "b", "3");
        assert_eq!((r.offset, &r.epoch), (3, &b_epoch), "b kept its offsets");
        for t in ["g", "h", "i"] {
            publish(&b, t, "1");
        }
        assert!(exists(&b, "b") && !exists(&b, "d") && !exists(&b, "f"));
        publish(&b, "j", "1");
        assert!(!exists(&b, "b"));
        // An evicted topic comes back in a new epoch, offsets restarting.
        let r = publish(&b, "b", "4");
        assert_eq!(r.offset, 1);
        assert_ne!(r.epoch, b_epoch);
        check_counts(&b);
    }

    #[test]
    fn a_full_table_with_nothing_idle_refuses_at_once() {
        let b = broker(3);
        for t in ["state:a", "state:b", "state:c"] {
            publish_state(&b, t, "{}");
        }
        assert_eq!(idle_len(&b), 0);
        assert_eq!(
            b.publish_now(PublishRequest {
                topic: "x",
                data: b"1",
                ..PublishRequest::default()
            })
            .unwrap_err(),
            BrokerError::TooManyTopics(TopicLimit::All(3))
        );
        assert_eq!(b.metrics.topics_refused.get(), 1);
        // Dropping the retained state makes a topic idle and evictable.
        publish(&b, "state:b", "{}");
        publish(&b, "x", "1");
        assert!(!exists(&b, "state:b"));
        check_counts(&b);
    }

    /// Issue 15: board topics are retained, so never idle; counted in `max_topics` they
    /// would fill it for good. Outside it, any number of boards leaves publishers and
    /// subscribers their whole budgets.
    #[test]
    fn board_topics_never_take_the_table() {
        let b = broker(4); // subscribers may create 2 topics
        let watcher = ws_client();
        // A watcher waiting for a board that has not published yet: a subscriber topic.
        sub(&b, &watcher, "board:late").unwrap();
        assert_eq!((b.topic_count(), b.subscriber_topic_count()), (1, 1));
        for i in 0..100 {
            publish_state(&b, &format!("board:b{i}"), "{}");
        }
        assert_eq!(b.board_topic_count(), 100);
        assert_eq!(b.topic_count(), 1);
        publish_state(&b, "board:late", "{}");
        assert_eq!(
            (
                b.topic_count(),
                b.subscriber_topic_count(),
                b.board_topic_count()
            ),
            (0, 0, 101),
            "its board published: it left both budgets of the table"
        );
        check_counts(&b);
        for t in ["a", "b", "c", "d", "e", "f"] {
            assert_eq!(publish(&b, t, "1").offset, 1);
        }
        assert_eq!(b.topic_count(), 4);
        assert_eq!(
            b.metrics.topics_evicted.get(),
            2,
            "only idle published topics"
        );
        let c = ws_client();
        sub(&b, &c, "fresh-1").unwrap();
        sub(&b, &c, "fresh-2").unwrap();
        assert_eq!(
            sub(&b, &c, "fresh-3").unwrap_err(),
            BrokerError::TooManyTopics(TopicLimit::SubscriberCreated(2))
        );
        assert_eq!(b.board_topic_count(), 101, "no board topic was evicted");
        let late = drain(&watcher);
        assert_eq!(late.len(), 1, "the late board reached its watcher");
        check_counts(&b);
        b.remove_client(&c);
        b.remove_client(&watcher);
        check_counts(&b);
    }

    #[test]
    fn concurrent_churn_keeps_the_counts_true() {
        let b = Arc::new(broker_with(|c| {
            c.max_topics = 24;
            c.max_subscriber_topics = 8;
            c.history_size = 5;
            c.history_max_bytes = 20_000;
        }));
        let threads: Vec<_> = (0..4u64)
            .map(|k| {
                let b = b.clone();
                std::thread::spawn(move || {
                    let c = Arc::new(Client::new(Transport::Ws, usize::MAX / 2));
                    for i in 0..3000u64 {
                        let name = format!("t{}", (i * 7 + k * 13) % 40);
                        match (i + k) % 4 {
                            0 | 1 => {
                                let _ = sub(&b, &c, &name);
                            }
                            2 => {
                                b.unsubscribe(&c, &name);
                            }
                            _ => {
                                let _ = b.publish_now(PublishRequest {
                                    topic: &name,
                                    data: b"1",
                                    idempotency_key: (i % 8 == 3).then_some("k"),
                                    ..PublishRequest::default()
                                });
                            }
                        }
                        if i % 500 == 0 {
                            drain(&c);
                        }
                    }
                    b.remove_client(&c);
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(b.hub.total_subscriptions(), 0);
        assert_eq!(b.metrics.subscriptions.get(), 0);
        assert_eq!(b.subscriber_topic_count(), 0);
        assert!(b.history_bytes() <= 20_000);
        check_counts(&b);
    }
}
