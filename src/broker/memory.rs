//! The in-process broker: every topic's stream kept in this process, publications handed
//! to the local hub. This file holds the `MemoryBroker` type and the `Broker` impl that
//! ties the parts together; the parts sit beside it, in the order a publication meets
//! them:
//!
//! - `table.rs`: the topic table: its caps, its two budgets, idle topics' eviction.
//! - `publish.rs`: one publish attempt: the offset, then `commit` (hub, history, retained).
//! - `durable_topics.rs`: the same through the history log (`durable.rs`) for durable
//!   namespaces, and their rebuild at start-up.
//! - `idempotency.rs`: remembered `Idempotency-Key`s and the first receipt they replay.
//! - `stream.rs`: one topic's stream (epoch, offsets, history, retained) and the resume rule.
//! - `history.rs`: the per-namespace count and age limits of a stream's history.
//! - `budget.rs`: the node-wide history byte budget, one FIFO over every topic.
//!
//! A stream's own mutex orders everything about it: offsets are assigned, history kept and
//! publications handed to the hub (the broker's sink) under it, so the hub receives them
//! in offset order, and a subscriber's replay is read under it at one instant
//! ([`Broker::replay`]); the merge of the two is the subscribe path's (`subscribe.rs`), as
//! for every broker. The node's interest in a topic (`subscribe_topic`) is a count on its stream: a
//! topic with local subscribers is never idle, so never evicted, and one that only
//! subscribers asked for counts against their budget. The lock is held only for
//! non-blocking work (queue pushes); never across an `.await` or a socket write. Lock
//! order: shard lock -> stream lock -> hub locks -> client queue lock; the idle and
//! history queues are leaves (nothing is locked under them).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

use parking_lot::Mutex;

use super::budget::Kept;
use super::durable::{DurableError, DurableLog, HISTORY_FILE};
pub use super::idempotency::{KeyState, MAX_KEYS_PER_TOPIC};
use super::presence::Presence;
use super::publish::Attempt;
use super::stream::new_epoch;
use super::stream::Stream;
use super::table::{Creator, Settled, Shard, SHARDS};
use super::{
    Broker, BrokerError, BrokerSink, History, Identity, PresencePage, PresenceStats,
    PublishRequest, Receipt, Replay, StreamPosition,
};
use crate::config::Config;
use crate::metrics::Metrics;

pub struct MemoryBroker {
    pub(super) cfg: Config,
    /// Where publications go on this node: the hub, one call per topic per publication.
    pub(super) sink: Arc<dyn BrokerSink>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) shards: Box<[Shard]>,
    /// Idle published topics, oldest first (lazy deletion, see the module docs).
    pub(super) idle: Mutex<VecDeque<Arc<Stream>>>,
    pub(super) topic_count: AtomicUsize,
    /// Topics that exist only because of subscriptions (never published to).
    pub(super) subscriber_topics: AtomicUsize,
    pub(super) max_topics: usize,
    pub(super) max_subscriber_topics: usize,
    /// Published `board:*` topics: outside `max_topics` (see `table.rs`).
    pub(super) board_topics: AtomicUsize,
    /// Everything kept in history, oldest first, for the node-wide byte budget.
    pub(super) kept: Mutex<VecDeque<Kept>>,
    /// Live entries of `kept` (the rest are stale).
    pub(super) kept_live: AtomicUsize,
    pub(super) history_bytes: AtomicUsize,
    /// The epoch a topic gets when it is created. It changes only when a topic that was
    /// published to leaves the table (eviction), and with every process. So a topic that
    /// existed only for its subscribers, left with the last of them and came back gets the
    /// same epoch: nothing of it was lost, and a client that saw offset 0 resumes exactly.
    /// A topic whose publications were lost always comes back in an epoch no earlier
    /// position names. A leaf lock.
    pub(super) fresh_epoch: Mutex<Arc<str>>,
    /// The durable history log, open when a namespace is `durable`.
    pub(super) log: Option<Arc<DurableLog>>,
    /// This broker, for the log's commit callbacks (set by [`MemoryBroker::open`]).
    pub(super) me: Weak<MemoryBroker>,
    /// The node's members of presence topics (`presence.rs`).
    pub(super) presence: Presence,
}

impl MemoryBroker {
    pub fn new(cfg: &Config, sink: Arc<dyn BrokerSink>, metrics: Arc<Metrics>) -> Self {
        MemoryBroker {
            cfg: cfg.clone(),
            sink: sink.clone(),
            metrics,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            idle: Mutex::new(VecDeque::new()),
            topic_count: AtomicUsize::new(0),
            subscriber_topics: AtomicUsize::new(0),
            max_topics: cfg.max_topics,
            max_subscriber_topics: cfg.max_subscriber_topics.min(cfg.max_topics),
            board_topics: AtomicUsize::new(0),
            kept: Mutex::new(VecDeque::new()),
            kept_live: AtomicUsize::new(0),
            history_bytes: AtomicUsize::new(0),
            fresh_epoch: Mutex::new(new_epoch()),
            log: None,
            me: Weak::new(),
            presence: Presence::new(cfg, sink.clone()),
        }
    }

    /// The broker a server runs: when a namespace is `durable`, opens the history log in
    /// `<data_dir>/history.redb` and rebuilds every durable topic the previous run left
    /// (same epoch, offsets continuing, the newest history within the namespace limits,
    /// idempotency keys within `idempotency_window`).
    pub fn open(
        cfg: &Config,
        sink: Arc<dyn BrokerSink>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<MemoryBroker>, DurableError> {
        let (log, recovered) = if cfg.namespaces.iter().any(|n| n.durable) {
            let (log, recovered) = DurableLog::open(&cfg.data_dir.join(HISTORY_FILE))?;
            let m = metrics.clone();
            log.set_commit_observer(Box::new(move |took, _| {
                m.durable_commits.inc();
                m.durable_commit_seconds.observe(took.as_secs_f64());
            }));
            (Some(log), recovered)
        } else {
            (None, Vec::new())
        };
        let broker = Arc::new_cyclic(|me| {
            let mut b = MemoryBroker::new(cfg, sink, metrics);
            b.log = log;
            b.me = me.clone();
            b
        });
        let n = recovered.len();
        for t in recovered {
            broker.restore(t);
        }
        broker.enforce_budget();
        if n > 0 {
            tracing::info!(topics = n, "durable topics restored");
        }
        Ok(broker)
    }

    /// The durable history file (`history.redb`), when a namespace is `durable`.
    pub fn history_file(&self) -> Option<crate::redb_file::RedbFile> {
        self.log.as_ref().map(|l| l.file().clone())
    }

    /// Commits what the history log holds and stops it (graceful shutdown).
    pub async fn close(&self) {
        if let Some(log) = &self.log {
            log.close().await;
        }
    }

    pub fn topic_count(&self) -> usize {
        self.topic_count.load(Ordering::Relaxed)
    }

    /// Published `board:*` topics, which `topic_count` leaves out.
    pub fn board_topic_count(&self) -> usize {
        self.board_topics.load(Ordering::Relaxed)
    }

    /// Topics that exist only because of subscriptions (never published to).
    pub fn subscriber_topic_count(&self) -> usize {
        self.subscriber_topics.load(Ordering::Relaxed)
    }

    /// Bytes counted against `history_max_bytes`.
    pub fn history_bytes(&self) -> usize {
        self.history_bytes.load(Ordering::Relaxed)
    }
}

#[async_trait::async_trait]
impl Broker for MemoryBroker {
    async fn publish(&self, req: PublishRequest<'_>) -> Result<Receipt, BrokerError> {
        if let Some(log) = &self.log {
            if self.cfg.namespace(req.topic).durable {
                return self.publish_durable(log, &req).await;
            }
        }
        loop {
            match self.try_publish(&req) {
                Ok(r) => return Ok(r),
                Err(Attempt::Failed(e)) => return Err(e),
                // The first publish with this key settles the key (published, or forgotten
                // after a failure), so each wait ends and the next attempt answers. A key
                // left pending by a first publish that is gone would otherwise be retried
                // forever: that answers `store_unavailable` instead.
                Err(Attempt::Wait(mut rx)) => {
                    if rx.wait_for(|v| v.is_some()).await.is_err() {
                        return self.publish_once(
                            &req,
                            "the first publish with this idempotency key was lost",
                        );
                    }
                }
            }
        }
    }

    async fn subscribe_topic(&self, topic: &str) -> Result<(), BrokerError> {
        self.with_stream(topic, Creator::Subscriber, |_, st| st.subscribers += 1)
    }

    fn unsubscribe_topic(&self, topic: &str) {
        let Some(stream) = self.lookup(topic) else {
            return;
        };
        let mut st = stream.state.lock();
        if stream.dead.load(Ordering::Acquire) {
            // A subscribed stream is never removed: nothing to count out.
            return;
        }
        debug_assert!(
            st.subscribers > 0,
            "one unsubscribe_topic per subscribe_topic"
        );
        st.subscribers = st.subscribers.saturating_sub(1);
        let settled = self.settle(&stream, &mut st);
        drop(st);
        if let Settled::Unused = settled {
            self.remove_unused(&stream);
        }
    }

    async fn replay(
        &self,
        topic: &str,
        since: Option<&StreamPosition>,
        max_bytes: usize,
    ) -> Result<Replay, BrokerError> {
        self.with_stream(topic, Creator::Subscriber, |stream, st| {
            self.trim_expired(stream, st, Instant::now());
            let position = StreamPosition {
                offset: st.last_offset,
                epoch: stream.epoch.clone(),
            };
            let mut publications = Vec::new();
            let recovered = since.map(|since| {
                // Stops at the budget: a resume from far back in a long history
                // (history_size may be 1,000,000) costs at most a budget's worth of work
                // under the stream lock, however often a client asks.
                let mut bytes = 0usize;
                let start = stream.resume_point(st, since).filter(|&start| {
                    st.history.range(start..).all(|p| {
                        bytes += p.envelope().len();
                        bytes <= max_bytes
                    })
                });
                if let Some(start) = start {
                    publications.extend(st.history.range(start..).cloned());
                }
                start.is_some()
            });
            Replay {
                position,
                recovered,
                publications,
                retained: st.retained.clone(),
            }
        })
    }

    async fn history(
        &self,
        topic: &str,
        since: Option<&StreamPosition>,
        limit: usize,
    ) -> Result<History, BrokerError> {
        // Reading creates nothing: an unknown topic has no stream (and no epoch: "").
        let unknown = || History {
            position: StreamPosition {
                offset: 0,
                epoch: "".into(),
            },
            recovered: since.is_none(),
            publications: Vec::new(),
        };
        // A stream found dead was removed meanwhile: look again (each retry follows a
        // removal, so this ends).
        loop {
            let Some(stream) = self.lookup(topic) else {
                return Ok(unknown());
            };
            let mut st = stream.state.lock();
            if stream.dead.load(Ordering::Acquire) {
                continue;
            }
            self.trim_expired(&stream, &mut st, Instant::now());
            // An empty epoch in `since` means "the current one".
            let since = since.map(|s| StreamPosition {
                offset: s.offset,
                epoch: if s.epoch.is_empty() {
                    stream.epoch.clone()
                } else {
                    s.epoch.clone()
                },
            });
            let (recovered, start) = match &since {
                None => (true, 0),
                Some(s) => match stream.resume_point(&st, s) {
                    Some(start) => (true, start),
                    None => (false, 0),
                },
            };
            return Ok(History {
                position: StreamPosition {
                    offset: st.last_offset,
                    epoch: stream.epoch.clone(),
                },
                recovered,
                publications: st.history.range(start..).take(limit).cloned().collect(),
            });
        }
    }

    async fn presence_join(&self, topic: &str, client: u64, who: &Identity) {
        self.presence.join(topic, client, who);
    }

    fn presence_leave(&self, topic: &str, client: u64) {
        self.presence.leave(topic, client);
    }

    async fn presence(
        &self,
        topic: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<PresencePage, BrokerError> {
        Ok(self.presence.members(topic, after, limit))
    }

    async fn presence_stats(&self, topic: &str) -> Result<PresenceStats, BrokerError> {
        Ok(self.presence.stats(topic))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::testing::*;
    use crate::client::Client;
    use crate::metrics::Transport;
    use crate::subscribe::testing::*;

    #[test]
    fn resume_replays_then_goes_live_and_refuses_what_it_cannot_serve() {
        let b = broker(10);
        let epoch = publish(&b, "t", "1").epoch;
        for i in 2..=5 {
            publish(&b, "t", &i.to_string());
        }
        let c = ws_client();
        let s = resume(
            &b,
            &c,
            "t",
            StreamPosition {
                offset: 2,
                epoch: epoch.clone(),
            },
        );
        assert_eq!((s.position.offset, s.recovered), (5, Some(true)));
        publish(&b, "t", "6");
        let got = drain(&c);
        assert_eq!(&got[0].bytes[..], b"ack 5 Some(true)");
        assert_eq!(offsets(&got), [3, 4, 5, 6]);
        assert!(got[1].published_at.is_none() && got[4].published_at.is_some());
        b.remove_client(&c);
        for (since, why) in [
            (
                StreamPosition {
                    offset: 2,
                    epoch: "0badbeef".into(),
                },
                "other epoch",
            ),
            (
                StreamPosition {
                    offset: 7,
                    epoch: epoch.clone(),
                },
                "from the future",
            ),
        ] {
            let s = resume(&b, &c, "t", since);
            assert_eq!((s.position.offset, s.recovered), (6, Some(false)), "{why}");
            assert_eq!(drain(&c).len(), 1, "{why}: the ack only");
            b.remove_client(&c);
        }
        // A replay larger than half the client's queue is refused, not half sent.
        let small = Arc::new(Client::new(Transport::Ws, 200));
        let s = resume(
            &b,
            &small,
            "t",
            StreamPosition {
                offset: 0,
                epoch: epoch.clone(),
            },
        );
        assert_eq!(s.recovered, Some(false));
        b.remove_client(&small);
        assert_eq!(
            b.metrics
                .resumes
                .get_or_create(&crate::metrics::ResumeLabel {
                    result: "recovered"
                })
                .get(),
            1
        );
        check_counts(&b);
    }

    #[test]
    fn a_state_topic_recovers_with_its_snapshot() {
        let b = broker(10);
        let epoch = publish_state(&b, "board:x", "{\"v\":1}").epoch;
        publish_state(&b, "board:x", "{\"v\":2}");
        let c = ws_client();
        let s = resume(&b, &c, "board:x", StreamPosition { offset: 1, epoch });
        assert_eq!(s.recovered, Some(true));
        assert_eq!(offsets(&drain(&c)), [2], "the snapshot follows");
        b.remove_client(&c);
        let s = resume(
            &b,
            &c,
            "board:x",
            StreamPosition {
                offset: 1,
                epoch: "00000000".into(),
            },
        );
        assert_eq!(s.recovered, Some(false));
        assert_eq!(offsets(&drain(&c)), [2], "the snapshot follows");
        b.remove_client(&c);
        assert_eq!(b.history_bytes(), 0, "state topics keep no history");
        check_counts(&b);
    }
}
