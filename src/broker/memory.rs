//! The in-process broker: each topic's stream (epoch, offsets, history, retained state,
//! idempotency keys) kept in this process, publications handed to the local hub.
//!
//! A stream's own mutex orders everything about it: offsets are assigned, history kept,
//! publications handed to the hub and subscribers acknowledged and replayed under it, so a
//! subscriber sees its `subscribed` reply, then the replay, then live publications, with
//! no gap and no duplicate. The lock is held only for non-blocking work (queue pushes);
//! never across an `.await` or a socket write. Lock order: stream lock -> hub topic lock ->
//! client queue lock; the idle and history queues are leaves (nothing is locked under them).
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
//! An evicted topic that comes back starts a new stream with a new epoch, so an old
//! position is never mistaken for one of the new stream.
//!
//! History has per-namespace count and age limits (applied to a topic whenever it is
//! touched) and one node-wide byte budget, `history_max_bytes`, shared with remembered
//! idempotency keys. Every kept publication and key is also entered in one node-wide FIFO;
//! past the budget the oldest entries of any topic leave first. Entries whose publication
//! already left (by the count or age limit) are stale and skipped when popped; the FIFO is
//! compacted whenever it is more than twice the live entries, so it stays proportional to
//! what is kept and every entry is handled O(1) times.

use std::collections::{HashMap, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use tokio::sync::{oneshot, watch};

use super::durable::{DurableError, DurableLog, Record, RecoveredTopic, HISTORY_FILE};

use super::{
    Ack, Broker, BrokerError, History, PublishRequest, Receipt, StreamPosition, Subscribed,
};
use crate::client::{Client, Item};
use crate::config::{Config, Namespace};
use crate::hub::{Hub, TopicLimit};
use crate::metrics::{Metrics, ResumeLabel};
use crate::publication::Publication;
use crate::topic::TopicName;

const SHARDS: usize = 64;

/// Remembered idempotency keys per topic; the oldest is forgotten first past it.
pub const MAX_KEYS_PER_TOPIC: usize = 10_000;

/// What a remembered key costs against `history_max_bytes`, beside its own length.
const KEY_COST: usize = 96;

type Shard = Mutex<HashMap<TopicName, Arc<Stream>>>;

/// Who asks for a topic that does not exist yet: decides which budget it counts against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Creator {
    Publisher,
    Subscriber,
}

struct Stream {
    name: TopicName,
    epoch: Arc<str>,
    /// The topic's history settings, looked up once when the stream is created.
    ns: Namespace,
    state: Mutex<StreamState>,
    /// The newest offset that left history (history only ever loses its oldest
    /// publications): a node-wide FIFO entry at or below it is stale. Read without the lock.
    trimmed: AtomicU64,
    /// The same for idempotency keys, by their sequence number.
    keys_trimmed: AtomicU64,
    /// Set (under the shard and stream locks) when the stream leaves the table: a holder of
    /// a stale `Arc<Stream>` must look the topic up again, and its FIFO entries are stale.
    dead: AtomicBool,
}

struct StreamState {
    /// The newest offset handed to subscribers (and, for durable topics, on disk).
    last_offset: u64,
    /// The newest offset given out. Equal to `last_offset` except on the durable path,
    /// where an offset is assigned before its commit and delivered after it.
    assigned: u64,
    /// Local subscribers (kept in step with the hub under this lock).
    subscribers: usize,
    retained: Option<(Arc<Publication>, bool)>,
    /// Oldest first, offsets contiguous up to `last_offset`.
    history: VecDeque<Arc<Publication>>,
    keys: Keys,
    /// Published to at least once: counts against `max_topics` only, and its offsets are
    /// kept while idle. Otherwise it counts against `max_subscriber_topics` too.
    published: bool,
    /// Has an entry in the idle queue (which may be stale by now).
    queued: bool,
    /// Durable path: bumped when a commit fails and `assigned` is rolled back, so the
    /// failures of the publications queued on top of it (same generation) roll nothing
    /// back a second time.
    generation: u64,
}

impl StreamState {
    fn idle(&self) -> bool {
        self.subscribers == 0 && self.retained.is_none()
    }

    /// Idle with no durable publication waiting for its commit: the commit's callback
    /// needs the stream it was assigned in.
    fn evictable(&self) -> bool {
        self.idle() && self.assigned == self.last_offset
    }

    /// A state topic (retained, like a leaderboard) keeps no history: its newest
    /// publication is the whole state.
    fn state_topic(&self) -> bool {
        self.retained.is_some()
    }
}

/// A topic's remembered idempotency keys, oldest first.
#[derive(Default)]
struct Keys {
    order: VecDeque<(u64, Arc<str>, Instant)>,
    map: HashMap<Arc<str>, KeyState>,
    next_seq: u64,
}

/// What a remembered key answers.
#[derive(Clone)]
pub enum KeyState {
    /// Published: a retry gets this offset back.
    Done(u64),
    /// The first publish with this key is still waiting for its commit (durable topics);
    /// a retry waits for the offset it is given (None: it failed, so the retry publishes).
    Pending(watch::Receiver<Option<u64>>),
}

/// One entry of the node-wide history FIFO.
struct Kept {
    stream: Arc<Stream>,
    what: KeptKind,
    at: Instant,
}

#[derive(Clone, Copy)]
enum KeptKind {
    Publication(u64),
    Key(u64),
}

impl Kept {
    fn live(&self) -> bool {
        !self.stream.dead.load(Ordering::Acquire)
            && match self.what {
                KeptKind::Publication(o) => o > self.stream.trimmed.load(Ordering::Acquire),
                KeptKind::Key(s) => s > self.stream.keys_trimmed.load(Ordering::Acquire),
            }
    }

    fn expired(&self, now: Instant, idempotency_window: Duration) -> bool {
        let ttl = match self.what {
            KeptKind::Publication(_) => self.stream.ns.history_ttl,
            KeptKind::Key(_) => idempotency_window,
        };
        expired(self.at, ttl, now)
    }
}

/// What a stream needs after a change, done once its lock is released.
enum Settled {
    Kept,
    /// Never published and now unused: nothing in it is worth keeping.
    Unused,
}

/// Why a publish attempt did not finish under the stream lock.
enum Attempt {
    Failed(BrokerError),
    /// A publish with the same key is in flight: wait for it, then look again.
    Wait(watch::Receiver<Option<u64>>),
}

impl From<BrokerError> for Attempt {
    fn from(e: BrokerError) -> Self {
        Attempt::Failed(e)
    }
}

pub struct MemoryBroker {
    cfg: Config,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    shards: Box<[Shard]>,
    /// Idle published topics, oldest first (lazy deletion, see the module docs).
    idle: Mutex<VecDeque<Arc<Stream>>>,
    topic_count: AtomicUsize,
    /// Topics that exist only because of subscriptions (never published to).
    subscriber_topics: AtomicUsize,
    max_topics: usize,
    max_subscriber_topics: usize,
    /// Everything kept in history, oldest first, for the node-wide byte budget.
    kept: Mutex<VecDeque<Kept>>,
    /// Live entries of `kept` (the rest are stale).
    kept_live: AtomicUsize,
    history_bytes: AtomicUsize,
    /// The durable history log, open when a namespace is `durable`.
    log: Option<Arc<DurableLog>>,
    /// This broker, for the log's commit callbacks (set by [`MemoryBroker::open`]).
    me: Weak<MemoryBroker>,
}

/// What a durable publication's commit callback needs of its request.
struct Pending {
    stream: Arc<Stream>,
    publication: Arc<Publication>,
    retain: bool,
    conflate: bool,
    key: Option<Box<str>>,
    /// Wakes retries with the same key (dropped on failure, so they publish themselves).
    key_tx: Option<watch::Sender<Option<u64>>>,
    generation: u64,
    answer: oneshot::Sender<Result<Receipt, BrokerError>>,
}

impl MemoryBroker {
    pub fn new(cfg: &Config, hub: Arc<Hub>, metrics: Arc<Metrics>) -> Self {
        MemoryBroker {
            cfg: cfg.clone(),
            hub,
            metrics,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            idle: Mutex::new(VecDeque::new()),
            topic_count: AtomicUsize::new(0),
            subscriber_topics: AtomicUsize::new(0),
            max_topics: cfg.max_topics,
            max_subscriber_topics: cfg.max_subscriber_topics.min(cfg.max_topics),
            kept: Mutex::new(VecDeque::new()),
            kept_live: AtomicUsize::new(0),
            history_bytes: AtomicUsize::new(0),
            log: None,
            me: Weak::new(),
        }
    }

    /// The broker a server runs: when a namespace is `durable`, opens the history log in
    /// `<data_dir>/history.redb` and rebuilds every durable topic the previous run left
    /// (same epoch, offsets continuing, the newest history within the namespace limits,
    /// idempotency keys within `idempotency_window`).
    pub fn open(
        cfg: &Config,
        hub: Arc<Hub>,
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
            let mut b = MemoryBroker::new(cfg, hub, metrics);
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

    /// Commits what the history log holds and stops it (graceful shutdown).
    pub async fn close(&self) {
        if let Some(log) = &self.log {
            log.close().await;
        }
    }

    /// Rebuilds one durable topic from the log at start-up.
    fn restore(&self, t: RecoveredTopic) {
        let Some(log) = &self.log else { return };
        let ns = self.cfg.namespace(&t.topic);
        if !ns.durable {
            // No longer durable: its stored history has no reader any more.
            log.forget(&t.topic);
            return;
        }
        if self.reserve(Creator::Publisher).is_err() {
            tracing::warn!(topic = %t.topic, "durable topic not restored: max_topics reached");
            return;
        }
        let stream = Arc::new(Stream {
            ns,
            name: t.topic.clone(),
            epoch: t.epoch.clone(),
            state: Mutex::new(StreamState {
                last_offset: t.last_offset,
                assigned: t.last_offset,
                subscribers: 0,
                retained: None,
                history: VecDeque::new(),
                keys: Keys::default(),
                published: true,
                queued: false,
                generation: 0,
            }),
            trimmed: AtomicU64::new(t.records.first().map_or(t.last_offset, |r| r.offset - 1)),
            keys_trimmed: AtomicU64::new(0),
            dead: AtomicBool::new(false),
        });
        self.shard(&t.topic)
            .lock()
            .insert(t.topic.clone(), stream.clone());
        self.metrics.topics.inc();
        let now = Instant::now();
        let now_ms = unix_ms();
        let mut st = stream.state.lock();
        for r in t.records {
            // Age carried over from the wall clock; `None` only right after a boot, when
            // the record is certainly older than any limit.
            let Some(at) =
                now.checked_sub(Duration::from_millis(now_ms.saturating_sub(r.published_ms)))
            else {
                continue;
            };
            let mut p = Publication::new(stream.name.clone(), r.offset, &r.data);
            p.published_at = at;
            let p = Arc::new(p);
            if let Some(key) = &r.idempotency_key {
                if !expired(at, self.cfg.idempotency_window, now) {
                    self.remember_key(&stream, &mut st, key, KeyState::Done(r.offset), at);
                }
            }
            if stream.ns.history_size > 0 {
                self.metrics.history_publications.inc();
                self.enter(&stream, KeptKind::Publication(p.offset), p.cost(), at);
                st.history.push_back(p);
            }
        }
        // History must stay contiguous up to `last_offset`: drop what precedes a hole
        // (records skipped above).
        let contiguous_from = st
            .history
            .iter()
            .rev()
            .zip((1..=t.last_offset).rev())
            .take_while(|(p, o)| p.offset == *o)
            .count();
        let n = st.history.len() - contiguous_from;
        self.trim_history(&stream, &mut st, n);
        self.trim_expired(&stream, &mut st, now);
        self.settle(&stream, &mut st);
    }

    /// Tells the durable log that the stream's history now starts after `upto`.
    fn log_trim(&self, stream: &Stream, upto: u64) {
        if let (true, Some(log)) = (stream.ns.durable, &self.log) {
            log.trim(&stream.name, upto);
        }
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    pub fn topic_count(&self) -> usize {
        self.topic_count.load(Ordering::Relaxed)
    }

    /// Topics that exist only because of subscriptions (never published to).
    pub fn subscriber_topic_count(&self) -> usize {
        self.subscriber_topics.load(Ordering::Relaxed)
    }

    /// Bytes counted against `history_max_bytes`.
    pub fn history_bytes(&self) -> usize {
        self.history_bytes.load(Ordering::Relaxed)
    }

    fn shard(&self, topic: &str) -> &Shard {
        let mut h = DefaultHasher::new();
        topic.hash(&mut h);
        &self.shards[(h.finish() as usize) % SHARDS]
    }

    fn lookup(&self, name: &str) -> Option<Arc<Stream>> {
        self.shard(name).lock().get(name).cloned()
    }

    fn stream(&self, name: &str, by: Creator) -> Result<Arc<Stream>, BrokerError> {
        if let Some(s) = self.lookup(name) {
            return Ok(s);
        }
        self.reserve(by)?;
        // One allocation of the name, shared by the table key, the stream and subscribers.
        let name: TopicName = name.into();
        let mut created = false;
        let s = self
            .shard(&name)
            .lock()
            .entry(name.clone())
            .or_insert_with(|| {
                created = true;
                Arc::new(Stream {
                    ns: self.cfg.namespace(&name),
                    name,
                    epoch: new_epoch(),
                    state: Mutex::new(StreamState {
                        last_offset: 0,
                        assigned: 0,
                        subscribers: 0,
                        retained: None,
                        history: VecDeque::new(),
                        keys: Keys::default(),
                        published: by == Creator::Publisher,
                        queued: false,
                        generation: 0,
                    }),
                    trimmed: AtomicU64::new(0),
                    keys_trimmed: AtomicU64::new(0),
                    dead: AtomicBool::new(false),
                })
            })
            .clone();
        if created {
            self.metrics.topics.inc();
            if by == Creator::Subscriber {
                self.metrics.subscriber_topics.inc();
            }
        } else {
            // Someone created it meanwhile: give the place back.
            self.release(by);
        }
        Ok(s)
    }

    /// Takes a place in the table for a new topic, evicting idle topics if it is full.
    fn reserve(&self, by: Creator) -> Result<(), BrokerError> {
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
            let Some(stream) = self.idle.lock().pop_front() else {
                return false;
            };
            let evicted = self.unlink(&stream, |st| {
                st.queued = false;
                st.evictable()
            });
            if evicted {
                self.metrics.topics_evicted.inc();
                return true;
            }
        }
    }

    /// Takes a live stream out of the table if `removable` (run under the shard lock, which
    /// a concurrent lookup needs, and the stream lock) says so; true if it did. Its history
    /// and keys go with it.
    fn unlink(&self, stream: &Stream, removable: impl FnOnce(&mut StreamState) -> bool) -> bool {
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
        drop(st);
        self.topic_count.fetch_sub(1, Ordering::Relaxed);
        self.metrics.topics.dec();
        true
    }

    /// Called under the stream lock after every change: queues a published topic that
    /// turned idle, or reports a never-published one that nobody uses any more.
    fn settle(&self, stream: &Arc<Stream>, st: &mut StreamState) -> Settled {
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
    fn remove_unused(&self, stream: &Arc<Stream>) {
        if self.unlink(stream, |st| !st.published && st.idle()) {
            self.subscriber_topics.fetch_sub(1, Ordering::Relaxed);
            self.metrics.subscriber_topics.dec();
        }
    }

    /// Runs `f` on the stream's locked state, retrying if the stream was removed meanwhile.
    fn with_stream<R>(
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

    /// Drops the `n` oldest publications of the stream's history.
    fn trim_history(&self, stream: &Stream, st: &mut StreamState, n: usize) {
        let mut bytes = 0;
        let mut last = None;
        for p in st.history.drain(..n) {
            bytes += p.cost();
            last = Some(p.offset);
        }
        if let Some(o) = last {
            stream.trimmed.store(o, Ordering::Release);
            self.log_trim(stream, o);
            self.history_bytes.fetch_sub(bytes, Ordering::Relaxed);
            self.kept_live.fetch_sub(n, Ordering::Relaxed);
            self.metrics.history_bytes.dec_by(bytes as i64);
            self.metrics.history_publications.dec_by(n as i64);
            self.metrics.history_evicted.inc_by(n as u64);
        }
    }

    /// Applies the namespace's count and age limits.
    fn trim_expired(&self, stream: &Stream, st: &mut StreamState, now: Instant) {
        let over = st.history.len().saturating_sub(stream.ns.history_size);
        let old = st
            .history
            .iter()
            .skip(over)
            .take_while(|p| expired(p.published_at, stream.ns.history_ttl, now))
            .count();
        if over + old > 0 {
            self.trim_history(stream, st, over + old);
        }
    }

    /// Forgets the `n` oldest idempotency keys of the stream.
    fn forget_keys(&self, stream: &Stream, st: &mut StreamState, n: usize) {
        let mut bytes = 0;
        let mut last = None;
        for (seq, key, _) in st.keys.order.drain(..n) {
            st.keys.map.remove(&key);
            bytes += key.len() + KEY_COST;
            last = Some(seq);
        }
        if let Some(seq) = last {
            stream.keys_trimmed.store(seq, Ordering::Release);
            self.history_bytes.fetch_sub(bytes, Ordering::Relaxed);
            self.kept_live.fetch_sub(n, Ordering::Relaxed);
            self.metrics.history_bytes.dec_by(bytes as i64);
        }
    }

    fn expire_keys(&self, stream: &Stream, st: &mut StreamState, now: Instant) {
        let window = self.cfg.idempotency_window;
        let old = st
            .keys
            .order
            .iter()
            .take_while(|(_, _, at)| expired(*at, window, now))
            .count();
        if old > 0 {
            self.forget_keys(stream, st, old);
        }
    }

    /// Enters one kept item in the node-wide FIFO (called under its stream lock, so a
    /// stream's entries are in its own order), compacting the FIFO when stale entries
    /// outnumber live ones.
    fn enter(&self, stream: &Arc<Stream>, what: KeptKind, bytes: usize, at: Instant) {
        let live = self.kept_live.fetch_add(1, Ordering::Relaxed) + 1;
        self.history_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.metrics.history_bytes.inc_by(bytes as i64);
        let mut kept = self.kept.lock();
        kept.push_back(Kept {
            stream: stream.clone(),
            what,
            at,
        });
        if kept.len() > 2 * live + 1024 {
            // Halves the FIFO at least: amortized O(1) per entry.
            kept.retain(Kept::live);
        }
    }

    /// Evicts the oldest kept items of any topic until history fits `history_max_bytes`,
    /// and past that, while the oldest item has outlived its age limit: so the expired
    /// history of topics nobody touches any more is freed as publishing goes on, not only
    /// under byte pressure. (The FIFO is in publish order across namespaces, so an item
    /// with a short limit behind one with a long limit waits for it: memory stays bounded
    /// by the budget either way, and reads apply the age limit exactly.) Each round pops
    /// one entry, so the work is bounded by what was entered. Called with no lock held.
    fn enforce_budget(&self) {
        let max = self.cfg.history_max_bytes;
        let window = self.cfg.idempotency_window;
        let now = Instant::now();
        loop {
            let k = {
                let mut kept = self.kept.lock();
                let Some(front) = kept.front() else {
                    return;
                };
                let over = self.history_bytes.load(Ordering::Relaxed) > max;
                if !over && front.live() && !front.expired(now, window) {
                    return;
                }
                kept.pop_front().expect("front exists")
            };
            if !k.live() {
                continue;
            }
            let stream = &k.stream;
            let mut st = stream.state.lock();
            if stream.dead.load(Ordering::Acquire) {
                continue;
            }
            match k.what {
                KeptKind::Publication(offset) => {
                    let n = st.history.iter().take_while(|p| p.offset <= offset).count();
                    self.trim_history(stream, &mut st, n);
                }
                KeptKind::Key(seq) => {
                    let n = st.keys.order.iter().take_while(|k| k.0 <= seq).count();
                    self.forget_keys(stream, &mut st, n);
                }
            }
        }
    }

    /// Remembers a key's answer, forgetting the topic's oldest past `MAX_KEYS_PER_TOPIC`.
    fn remember_key(
        &self,
        stream: &Arc<Stream>,
        st: &mut StreamState,
        key: &str,
        state: KeyState,
        now: Instant,
    ) {
        if let Some(s) = st.keys.map.get_mut(key) {
            *s = state;
            return;
        }
        if st.keys.order.len() >= MAX_KEYS_PER_TOPIC {
            self.forget_keys(stream, st, 1);
        }
        st.keys.next_seq += 1;
        let seq = st.keys.next_seq;
        let key: Arc<str> = key.into();
        st.keys.order.push_back((seq, key.clone(), now));
        st.keys.map.insert(key.clone(), state);
        self.enter(stream, KeptKind::Key(seq), key.len() + KEY_COST, now);
    }

    /// After its offset was assigned (and, for durable topics, committed): hands the
    /// publication to the hub, keeps it in history or as the retained state, and answers
    /// its idempotency key. Runs under the stream lock, in offset order. Returns the number
    /// of local subscribers it reached.
    fn commit(
        &self,
        stream: &Arc<Stream>,
        st: &mut StreamState,
        p: &Arc<Publication>,
        req: &PublishRequest<'_>,
        to_wake: &mut Vec<Arc<Client>>,
    ) -> usize {
        let now = Instant::now();
        st.last_offset = p.offset;
        let reached = self.hub.deliver(p, req.conflate, to_wake);
        if req.retain {
            st.retained = Some((p.clone(), req.conflate));
            // A state topic's newest publication is all a subscriber needs.
            let n = st.history.len();
            self.trim_history(stream, st, n);
        } else {
            st.retained = None;
            if stream.ns.history_size > 0 {
                st.history.push_back(p.clone());
                self.metrics.history_publications.inc();
                self.enter(stream, KeptKind::Publication(p.offset), p.cost(), now);
            } else {
                stream.trimmed.store(p.offset, Ordering::Release);
                self.log_trim(stream, p.offset);
            }
            self.trim_expired(stream, st, now);
        }
        if let Some(key) = req.idempotency_key {
            self.remember_key(stream, st, key, KeyState::Done(p.offset), now);
        }
        self.metrics.publications.inc();
        reached
    }

    /// One publish attempt, entirely under the stream lock (memory topics).
    fn try_publish(&self, req: &PublishRequest<'_>) -> Result<Receipt, Attempt> {
        let mut to_wake: Vec<Arc<Client>> = Vec::new();
        let result = self.with_stream(req.topic, Creator::Publisher, |stream, st| {
            let now = Instant::now();
            self.expire_keys(stream, st, now);
            if let Some(key) = req.idempotency_key {
                match st.keys.map.get(key) {
                    Some(KeyState::Done(offset)) => {
                        self.metrics.idempotent_replays.inc();
                        return Ok(Receipt {
                            offset: *offset,
                            epoch: stream.epoch.clone(),
                            subscribers: st.subscribers,
                            duplicate: true,
                        });
                    }
                    Some(KeyState::Pending(rx)) => return Err(Attempt::Wait(rx.clone())),
                    None => {}
                }
            }
            if stream.ns.durable && self.log.is_some() {
                // Its offsets are assigned by the log's commit order (`publish_durable`).
                return Err(Attempt::Failed(BrokerError::Unavailable(
                    "a durable topic is published through the async path only".into(),
                )));
            }
            self.mark_published(st);
            // Durable namespaces take the same steps with the log's commit between the
            // assignment and `commit` (`publish_durable`).
            st.assigned += 1;
            let p = Arc::new(Publication::new(stream.name.clone(), st.assigned, req.data));
            let reached = self.commit(stream, st, &p, req, &mut to_wake);
            Ok(Receipt {
                offset: p.offset,
                epoch: stream.epoch.clone(),
                subscribers: reached,
                duplicate: false,
            })
        });
        // Waking schedules each writer task: done after the stream lock is released so the
        // next publication of this topic does not wait behind 10,000 wake-ups.
        for client in to_wake {
            client.wake();
        }
        self.enforce_budget();
        result?
    }

    fn mark_published(&self, st: &mut StreamState) {
        if !st.published {
            // From now on its offsets matter: it leaves the subscribers' budget.
            st.published = true;
            self.subscriber_topics.fetch_sub(1, Ordering::Relaxed);
            self.metrics.subscriber_topics.dec();
        }
    }

    /// Publishes to a durable topic: the offset is assigned and the record appended under
    /// the stream lock (so the log holds the topic in offset order), then the publisher
    /// waits for the commit. The commit's callback (`settle_durable`, on the log's writer
    /// thread, in offset order) delivers, keeps history and answers.
    async fn publish_durable(
        &self,
        log: &DurableLog,
        req: &PublishRequest<'_>,
    ) -> Result<Receipt, BrokerError> {
        let unavailable = |e: DurableError| BrokerError::Unavailable(e.to_string());
        let mut gone = false;
        loop {
            // Waiting for queue room happens here, before any lock.
            let mut slot = Some(log.reserve().await.map_err(unavailable)?);
            let (answer, answered) = oneshot::channel();
            let mut answer = Some(answer);
            let attempt = self.with_stream(req.topic, Creator::Publisher, |stream, st| {
                let now = Instant::now();
                self.expire_keys(stream, st, now);
                if let Some(key) = req.idempotency_key {
                    match st.keys.map.get(key) {
                        Some(KeyState::Done(offset)) => {
                            self.metrics.idempotent_replays.inc();
                            return Ok(Some(Receipt {
                                offset: *offset,
                                epoch: stream.epoch.clone(),
                                subscribers: st.subscribers,
                                duplicate: true,
                            }));
                        }
                        Some(KeyState::Pending(rx)) => return Err(Attempt::Wait(rx.clone())),
                        None => {}
                    }
                }
                self.mark_published(st);
                st.assigned += 1;
                let p = Arc::new(Publication::new(stream.name.clone(), st.assigned, req.data));
                let key_tx = req.idempotency_key.map(|key| {
                    let (tx, rx) = watch::channel(None);
                    self.remember_key(stream, st, key, KeyState::Pending(rx), now);
                    tx
                });
                let rec = Record {
                    topic: stream.name.clone(),
                    epoch: stream.epoch.clone(),
                    offset: p.offset,
                    data: p.data(),
                    published_ms: unix_ms(),
                    idempotency_key: req.idempotency_key.map(Into::into),
                };
                let pending = Pending {
                    stream: stream.clone(),
                    publication: p,
                    retain: req.retain,
                    conflate: req.conflate,
                    key: req.idempotency_key.map(Into::into),
                    key_tx,
                    generation: st.generation,
                    answer: answer.take().expect("called once per stream lookup"),
                };
                let me = self.me.clone();
                slot.take().expect("called once per stream lookup").append(
                    rec,
                    Box::new(move |result| match me.upgrade() {
                        Some(broker) => broker.settle_durable(pending, result),
                        None => {
                            let _ = pending
                                .answer
                                .send(Err(BrokerError::Unavailable("shutting down".into())));
                        }
                    }),
                );
                Ok(None)
            })?;
            match attempt {
                Ok(Some(duplicate)) => return Ok(duplicate),
                Ok(None) => {
                    return answered.await.unwrap_or_else(|_| {
                        Err(BrokerError::Unavailable("history log stopped".into()))
                    })
                }
                Err(Attempt::Failed(e)) => return Err(e),
                Err(Attempt::Wait(_)) if gone => {
                    return Err(BrokerError::Unavailable(
                        "the first publish with this idempotency key was lost".into(),
                    ))
                }
                // A failed first publish forgets its key before it lets the waiters go,
                // so the next attempt publishes; a key still pending after its publish is
                // gone (the log stopped) is an error, not a busy loop.
                Err(Attempt::Wait(mut rx)) => {
                    gone = rx.wait_for(|v| v.is_some()).await.is_err();
                }
            }
        }
    }

    /// A durable publication's commit outcome, on the log's writer thread in offset
    /// order: on success deliver and keep it like a memory publication; on failure roll
    /// the topic's offsets back to the last committed one (once per failure: everything
    /// queued on top of the failed record fails too) and forget its key.
    fn settle_durable(&self, p: Pending, result: Result<(), DurableError>) {
        let stream = &p.stream;
        let mut to_wake = Vec::new();
        let mut st = stream.state.lock();
        let answer = match result {
            Ok(()) => {
                let req = PublishRequest {
                    topic: &stream.name,
                    data: &[],
                    retain: p.retain,
                    conflate: p.conflate,
                    idempotency_key: p.key.as_deref(),
                };
                let reached = self.commit(stream, &mut st, &p.publication, &req, &mut to_wake);
                if let Some(tx) = &p.key_tx {
                    tx.send_replace(Some(p.publication.offset));
                }
                Ok(Receipt {
                    offset: p.publication.offset,
                    epoch: stream.epoch.clone(),
                    subscribers: reached,
                    duplicate: false,
                })
            }
            Err(e) => {
                if st.generation == p.generation {
                    st.generation += 1;
                    st.assigned = st.last_offset;
                }
                if let Some(key) = &p.key {
                    self.drop_pending_key(&mut st, key);
                }
                tracing::warn!(topic = %stream.name, offset = p.publication.offset, error = %e,
                    "durable publication failed");
                Err(BrokerError::Unavailable(e.to_string()))
            }
        };
        self.settle(stream, &mut st);
        drop(st);
        for client in to_wake {
            client.wake();
        }
        self.enforce_budget();
        let _ = p.answer.send(answer);
    }

    /// Forgets a key whose first publication failed, so a retry publishes.
    fn drop_pending_key(&self, st: &mut StreamState, key: &str) {
        if !matches!(st.keys.map.get(key), Some(KeyState::Pending(_))) {
            return;
        }
        st.keys.map.remove(key);
        if let Some(i) = st.keys.order.iter().position(|(_, k, _)| &**k == key) {
            st.keys.order.remove(i);
            let bytes = key.len() + KEY_COST;
            self.history_bytes.fetch_sub(bytes, Ordering::Relaxed);
            self.kept_live.fetch_sub(1, Ordering::Relaxed);
            self.metrics.history_bytes.dec_by(bytes as i64);
        }
    }

    /// Publishes without waiting (memory topics): for callers outside async code.
    pub fn publish_now(&self, req: PublishRequest<'_>) -> Result<Receipt, BrokerError> {
        match self.try_publish(&req) {
            Ok(r) => Ok(r),
            Err(Attempt::Failed(e)) => Err(e),
            Err(Attempt::Wait(_)) => Err(BrokerError::Unavailable(
                "a publish with this idempotency key is still in progress".into(),
            )),
        }
    }

    /// Whether `since` can be served from history, and from which index of it.
    fn resume_point(
        &self,
        stream: &Stream,
        st: &StreamState,
        since: &StreamPosition,
    ) -> Option<usize> {
        if since.epoch != stream.epoch || since.offset > st.last_offset {
            return None;
        }
        if since.offset == st.last_offset || st.state_topic() {
            return Some(st.history.len());
        }
        let first = st.history.front()?.offset;
        (first <= since.offset + 1).then(|| (since.offset + 1 - first) as usize)
    }

    fn leave(&self, client: &Arc<Client>, name: &str) -> bool {
        let Some(stream) = self.lookup(name) else {
            return self.hub.leave(client, name);
        };
        let mut st = stream.state.lock();
        let held = self.hub.leave(client, name);
        if held && !stream.dead.load(Ordering::Acquire) {
            st.subscribers -= 1;
        }
        let settled = self.settle(&stream, &mut st);
        drop(st);
        if let Settled::Unused = settled {
            self.remove_unused(&stream);
        }
        held
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
                        return match self.try_publish(&req) {
                            Ok(r) => Ok(r),
                            Err(Attempt::Failed(e)) => Err(e),
                            Err(Attempt::Wait(_)) => Err(BrokerError::Unavailable(
                                "the first publish with this idempotency key was lost".into(),
                            )),
                        };
                    }
                }
            }
        }
    }

    fn subscribe(
        &self,
        client: &Arc<Client>,
        topic: &str,
        since: Option<&StreamPosition>,
        ack: Ack<'_>,
    ) -> Result<Subscribed, BrokerError> {
        let already = self.hub.admit(client, topic)?;
        let sub = self.with_stream(topic, Creator::Subscriber, |stream, st| {
            self.trim_expired(stream, st, Instant::now());
            let position = StreamPosition {
                offset: st.last_offset,
                epoch: stream.epoch.clone(),
            };
            let mut replay = None;
            // Subscribing again to a held topic repeats the acknowledgement only: the
            // client already has everything since it joined.
            let recovered = match since {
                Some(since) if !already => {
                    let budget = client.budget() / 2;
                    replay = self.resume_point(stream, st, since).filter(|&start| {
                        let bytes: usize = st
                            .history
                            .range(start..)
                            .map(|p| p.wire(client.transport).len())
                            .sum();
                        bytes <= budget
                    });
                    Some(replay.is_some())
                }
                _ => None,
            };
            let sub = Subscribed {
                position,
                recovered,
            };
            if let Some(bytes) = ack(&sub) {
                client.push(Item::control(bytes), &self.metrics);
            }
            if !already {
                if let Some(start) = replay {
                    for p in st.history.range(start..) {
                        let item = Item::publication(p, p.wire(client.transport), false, false);
                        client.push(item, &self.metrics);
                    }
                }
                if let Some((p, conflate)) = &st.retained {
                    let item = Item::publication(p, p.wire(client.transport), *conflate, false);
                    client.push(item, &self.metrics);
                }
                if self.hub.join(client, &stream.name, st.last_offset) {
                    st.subscribers += 1;
                }
            }
            sub
        })?;
        if let Some(r) = sub.recovered {
            let result = if r { "recovered" } else { "not_recovered" };
            self.metrics
                .resumes
                .get_or_create(&ResumeLabel { result })
                .inc();
        }
        if client.closed().is_some() {
            // Closed concurrently (or by this very push): undo so nothing is left behind.
            self.remove_client(client);
            return Err(BrokerError::ClientClosed);
        }
        Ok(sub)
    }

    fn unsubscribe(&self, client: &Arc<Client>, topic: &str) -> bool {
        self.leave(client, topic)
    }

    fn remove_client(&self, client: &Arc<Client>) {
        for name in self.hub.topics_of(client) {
            self.leave(client, &name);
        }
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
                Some(s) => match self.resume_point(&stream, &st, s) {
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
}

fn expired(at: Instant, ttl: Duration, now: Instant) -> bool {
    now.saturating_duration_since(at) >= ttl
}

/// Adds one to `counter` unless it already is `max`.
fn try_take(counter: &AtomicUsize, max: usize) -> bool {
    counter
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
            (n < max).then_some(n + 1)
        })
        .is_ok()
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// 8 lowercase hex characters, fresh for every stream.
pub fn new_epoch() -> Arc<str> {
    format!("{:08x}", rand::random::<u32>()).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::Batch;
    use crate::metrics::Transport;
    use bytes::Bytes;

    fn broker_with(tweak: impl FnOnce(&mut Config)) -> MemoryBroker {
        let mut cfg = Config::default();
        tweak(&mut cfg);
        let metrics = Arc::new(Metrics::new());
        let hub = Arc::new(Hub::new(3, metrics.clone()));
        MemoryBroker::new(&cfg, hub, metrics)
    }

    fn broker(max_topics: usize) -> MemoryBroker {
        broker_with(|c| {
            c.max_topics = max_topics;
            c.max_subscriber_topics = max_topics / 2;
        })
    }

    fn publish(b: &MemoryBroker, topic: &str, data: &str) -> Receipt {
        b.publish_now(PublishRequest {
            topic,
            data: data.as_bytes(),
            ..PublishRequest::default()
        })
        .unwrap()
    }

    fn publish_state(b: &MemoryBroker, topic: &str, data: &str) -> Receipt {
        b.publish_now(PublishRequest {
            topic,
            data: data.as_bytes(),
            retain: true,
            conflate: true,
            idempotency_key: None,
        })
        .unwrap()
    }

    fn sub(b: &MemoryBroker, c: &Arc<Client>, topic: &str) -> Result<Subscribed, BrokerError> {
        b.subscribe(c, topic, None, &|_| None)
    }

    fn resume(b: &MemoryBroker, c: &Arc<Client>, topic: &str, since: StreamPosition) -> Subscribed {
        b.subscribe(c, topic, Some(&since), &|s| {
            Some(Bytes::from(format!(
                "ack {} {:?}",
                s.position.offset, s.recovered
            )))
        })
        .unwrap()
    }

    fn drain(c: &Client) -> Vec<Item> {
        match c.take(usize::MAX, usize::MAX) {
            Batch::Items(items) => items,
            _ => vec![],
        }
    }

    fn offsets(items: &[Item]) -> Vec<u64> {
        items
            .iter()
            .filter_map(|i| i.source.as_ref().map(|s| s.1))
            .collect()
    }

    fn ws_client() -> Arc<Client> {
        Arc::new(Client::new(Transport::Ws, 1 << 20))
    }

    fn exists(b: &MemoryBroker, name: &str) -> bool {
        b.lookup(name).is_some()
    }

    fn idle_len(b: &MemoryBroker) -> usize {
        b.idle.lock().len()
    }

    /// The counters agree with the table, and the queues are no longer than what they track.
    fn check_counts(b: &MemoryBroker) {
        let streams: Vec<Arc<Stream>> = b
            .shards
            .iter()
            .flat_map(|s| s.lock().values().cloned().collect::<Vec<_>>())
            .collect();
        let unpublished = streams.iter().filter(|t| !t.state.lock().published).count();
        assert_eq!(b.topic_count(), streams.len());
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
            assert_eq!(st.subscribers, b.hub.subscriber_count(&t.name));
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

    #[test]
    fn offsets_are_per_topic_and_gapless() {
        let b = broker(10);
        assert_eq!(publish(&b, "a", "1").offset, 1);
        assert_eq!(publish(&b, "a", "2").offset, 2);
        assert_eq!(publish(&b, "b", "3").offset, 1);
        let e = publish(&b, "a", "4").epoch;
        assert_eq!(e.len(), 8);
        assert!(e
            .bytes()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
    }

    #[test]
    fn ack_then_retained_then_live_in_order() {
        let b = broker(10);
        publish_state(&b, "board:x", "{\"v\":1}");
        let c = Arc::new(Client::new(Transport::Sse, 1 << 20));
        let s = b
            .subscribe(&c, "board:x", None, &|s| {
                Some(Bytes::from(format!("ack{}", s.position.offset)))
            })
            .unwrap();
        assert_eq!(s.position.offset, 1);
        publish_state(&b, "board:x", "{\"v\":2}");
        // Unsent state v1 is conflated into v2: the subscriber gets the ack, then the newest.
        let got = drain(&c);
        assert_eq!(got.len(), 2);
        assert_eq!(&got[0].bytes[..], b"ack1");
        assert!(std::str::from_utf8(&got[1].bytes)
            .unwrap()
            .contains("\"v\":2"));
        publish_state(&b, "board:x", "{\"v\":3}");
        assert_eq!(offsets(&drain(&c)), [3]);
        b.remove_client(&c);
        check_counts(&b);
    }

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
        for t in ["board:a", "board:b", "board:c"] {
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
        publish(&b, "board:b", "{}");
        publish(&b, "x", "1");
        assert!(!exists(&b, "board:b"));
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

    #[test]
    fn history_keeps_the_namespace_count() {
        let b = broker_with(|c| {
            c.history_size = 3;
            c.namespaces.push(Namespace {
                pattern: "chat:*".into(),
                history_size: 5,
                history_ttl: Duration::from_secs(60),
                durable: false,
            });
        });
        for i in 0..10 {
            publish(&b, "plain", &i.to_string());
            publish(&b, "chat:1", &i.to_string());
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let h = rt.block_on(b.history("plain", None, 100)).unwrap();
        let got: Vec<u64> = h.publications.iter().map(|p| p.offset).collect();
        assert_eq!(got, [8, 9, 10]);
        assert_eq!(&h.publications[0].data()[..], b"7");
        let h = rt.block_on(b.history("chat:1", None, 100)).unwrap();
        assert_eq!(h.publications.len(), 5);
        assert_eq!(b.metrics.history_evicted.get(), 7 + 5);
        assert_eq!(b.metrics.history_publications.get(), 8);
        check_counts(&b);
    }

    #[test]
    fn history_ages_out() {
        let b = broker_with(|c| c.history_ttl = Duration::from_millis(30));
        let r = publish(&b, "t", "1");
        publish(&b, "t", "2");
        let since = StreamPosition {
            offset: 0,
            epoch: r.epoch.clone(),
        };
        let c = ws_client();
        assert_eq!(resume(&b, &c, "t", since.clone()).recovered, Some(true));
        assert_eq!(offsets(&drain(&c)), [1, 2]);
        b.remove_client(&c);
        std::thread::sleep(Duration::from_millis(40));
        let s = resume(&b, &c, "t", since);
        assert_eq!(s.recovered, Some(false));
        assert_eq!(
            s.position.offset, 2,
            "the current position is still reported"
        );
        assert!(offsets(&drain(&c)).is_empty());
        assert_eq!(b.history_bytes(), 0);
        b.remove_client(&c);
        check_counts(&b);
    }

    #[test]
    fn the_byte_cap_evicts_the_oldest_history_of_any_topic() {
        let one = Publication::new("a".into(), 1, b"\"xxxxxxxxxx\"").cost();
        let b = broker_with(|c| c.history_max_bytes = 4 * one);
        for t in ["a", "b", "a", "c", "a", "b"] {
            publish(&b, t, "\"xxxxxxxxxx\"");
        }
        // Six kept, four fit: a:1 and b:1 (the two oldest) left, whatever their topic.
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let kept = |t: &str| -> Vec<u64> {
            let h = rt.block_on(b.history(t, None, 100)).unwrap();
            h.publications.iter().map(|p| p.offset).collect()
        };
        assert_eq!(kept("a"), [2, 3]);
        assert_eq!(kept("b"), [2]);
        assert_eq!(kept("c"), [1]);
        assert_eq!(b.history_bytes(), 4 * one);
        assert_eq!(b.metrics.history_evicted.get(), 2);
        // Resuming from before the evicted part is refused, after it works.
        let epoch = publish(&b, "c", "\"xxxxxxxxxx\"").epoch;
        let c = ws_client();
        let s = resume(
            &b,
            &c,
            "a",
            StreamPosition {
                offset: 0,
                epoch: kept_epoch(&rt, &b, "a"),
            },
        );
        assert_eq!(s.recovered, Some(false));
        b.remove_client(&c);
        let s = resume(&b, &c, "c", StreamPosition { offset: 1, epoch });
        assert_eq!(s.recovered, Some(true));
        assert_eq!(offsets(&drain(&c)), [2]);
        b.remove_client(&c);
        check_counts(&b);
    }

    fn kept_epoch(rt: &tokio::runtime::Runtime, b: &MemoryBroker, t: &str) -> Arc<str> {
        rt.block_on(b.history(t, None, 1)).unwrap().position.epoch
    }

    #[test]
    fn expired_history_of_untouched_topics_is_freed_by_later_publishing() {
        let b = broker_with(|c| {
            c.history_ttl = Duration::from_millis(20);
            c.idempotency_window = Duration::from_millis(20);
        });
        for i in 0..5 {
            b.publish_now(PublishRequest {
                topic: "quiet",
                data: b"1",
                idempotency_key: Some(&format!("k{i}")),
                ..PublishRequest::default()
            })
            .unwrap();
        }
        assert!(b.history_bytes() > 0);
        std::thread::sleep(Duration::from_millis(30));
        // "quiet" is never touched again; another topic's publication frees its history.
        publish(&b, "busy", "1");
        let busy = Publication::new("busy".into(), 1, b"1").cost();
        assert_eq!(b.history_bytes(), busy);
        assert_eq!(b.metrics.history_publications.get(), 1);
        check_counts(&b);
    }

    #[test]
    fn stale_fifo_entries_stay_bounded() {
        // A small count limit trims locally; the node-wide FIFO must not keep the trimmed
        // entries forever.
        let b = broker_with(|c| c.history_size = 1);
        for i in 0..20_000 {
            publish(&b, "t", &i.to_string());
        }
        assert!(b.kept.lock().len() <= 2 + 1025, "one publication kept");
        check_counts(&b);
    }

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
                .get_or_create(&ResumeLabel {
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

    fn set_key(b: &MemoryBroker, topic: &str, key: &str, state: Option<KeyState>) {
        let s = b.lookup(topic).unwrap();
        let mut st = s.state.lock();
        match state {
            Some(state) => b.remember_key(&s, &mut st, key, state, Instant::now()),
            None => {
                let n = st.keys.order.len();
                b.forget_keys(&s, &mut st, n);
            }
        }
    }

    #[tokio::test]
    async fn retries_wait_for_a_pending_first_publish() {
        let b = Arc::new(broker(10));
        publish(&b, "t", "1");
        let keyed = |b: Arc<MemoryBroker>| async move {
            b.publish(PublishRequest {
                topic: "t",
                data: b"2",
                idempotency_key: Some("k"),
                ..PublishRequest::default()
            })
            .await
        };
        // Settled while (or before) the retry waits: it gets the first receipt.
        let (tx, rx) = watch::channel(None);
        set_key(&b, "t", "k", Some(KeyState::Pending(rx)));
        let retry = tokio::spawn(keyed(b.clone()));
        set_key(&b, "t", "k", Some(KeyState::Done(1)));
        tx.send_replace(Some(1));
        let r = retry.await.unwrap().unwrap();
        assert_eq!((r.offset, r.duplicate), (1, true));

        // The first publish failed and its key was forgotten: the retry publishes.
        let (tx, rx) = watch::channel(None);
        set_key(&b, "t", "k", None);
        set_key(&b, "t", "k", Some(KeyState::Pending(rx)));
        let retry = tokio::spawn(keyed(b.clone()));
        set_key(&b, "t", "k", None);
        drop(tx);
        let r = retry.await.unwrap().unwrap();
        assert_eq!((r.offset, r.duplicate), (2, false));

        // A key left pending by a first publish that is gone: an error, not a busy loop.
        let (tx, rx) = watch::channel(None);
        set_key(&b, "t", "j", Some(KeyState::Pending(rx)));
        drop(tx);
        let e = b
            .publish(PublishRequest {
                topic: "t",
                data: b"3",
                idempotency_key: Some("j"),
                ..PublishRequest::default()
            })
            .await
            .unwrap_err();
        assert!(matches!(e, BrokerError::Unavailable(_)));
        check_counts(&b);
    }

    #[test]
    fn idempotent_retries_get_the_first_receipt() {
        let b = broker_with(|c| c.idempotency_window = Duration::from_millis(50));
        let keyed = |key: &'static str, data: &'static str| {
            b.publish_now(PublishRequest {
                topic: "t",
                data: data.as_bytes(),
                idempotency_key: Some(key),
                ..PublishRequest::default()
            })
            .unwrap()
        };
        let first = keyed("k1", "1");
        let again = keyed("k1", "2");
        assert_eq!(
            (again.offset, &again.epoch, again.duplicate),
            (1, &first.epoch, true)
        );
        assert_eq!(keyed("k2", "3").offset, 2);
        assert_eq!(b.metrics.idempotent_replays.get(), 1);
        check_counts(&b);
        std::thread::sleep(Duration::from_millis(60));
        let late = keyed("k1", "4");
        assert_eq!(
            (late.offset, late.duplicate),
            (3, false),
            "the window passed"
        );
        check_counts(&b);
    }
}

#[cfg(test)]
mod durable_tests {
    use super::*;
    use crate::config::Namespace;

    fn durable_broker(dir: &std::path::Path) -> Arc<MemoryBroker> {
        let mut cfg = Config {
            data_dir: dir.to_path_buf(),
            ..Config::default()
        };
        cfg.namespaces.push(Namespace {
            pattern: "d:*".into(),
            history_size: 10_000,
            history_ttl: Duration::from_secs(3600),
            durable: true,
        });
        let metrics = Arc::new(Metrics::new());
        let hub = Arc::new(Hub::new(3, metrics.clone()));
        MemoryBroker::open(&cfg, hub, metrics).unwrap()
    }

    async fn publish(b: &MemoryBroker, n: u64) -> Result<Receipt, BrokerError> {
        let data = format!(r#"{{"n":{n}}}"#);
        b.publish(PublishRequest {
            topic: "d:t",
            data: data.as_bytes(),
            ..PublishRequest::default()
        })
        .await
    }

    async fn offsets(b: &MemoryBroker) -> Vec<u64> {
        let h = b.history("d:t", None, 100_000).await.unwrap();
        h.publications.iter().map(|p| p.offset).collect()
    }

    /// A failed commit fails the publications queued on top of it too, rolls the topic
    /// back once, and the next publications reuse the offsets: memory and disk stay
    /// contiguous, and the epoch stays.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failed_commits_leave_no_gap_in_memory_or_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let b = durable_broker(dir.path());
        let epoch = publish(&b, 0).await.unwrap().epoch;
        let mut ok = 1u64;
        for round in 0..3u64 {
            b.log.as_ref().unwrap().fail_next_commits(1);
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..20 {
                let b = b.clone();
                tasks.spawn(async move { publish(&b, 100 * (round + 1) + i).await });
            }
            let mut failed = 0;
            while let Some(r) = tasks.join_next().await {
                match r.unwrap() {
                    Ok(r) => {
                        assert_eq!(r.epoch, epoch);
                        ok += 1;
                    }
                    Err(BrokerError::Unavailable(_)) => failed += 1,
                    Err(e) => panic!("{e}"),
                }
            }
            assert!(failed >= 1, "the injected failure hit nobody");
            let r = publish(&b, 1000 + round).await.unwrap();
            ok += 1;
            assert_eq!(
                r.offset, ok,
                "offsets continue right after the last committed"
            );
        }
        assert_eq!(offsets(&b).await, (1..=ok).collect::<Vec<_>>());
        b.close().await;
        drop(b);

        let b = durable_broker(dir.path());
        assert_eq!(offsets(&b).await, (1..=ok).collect::<Vec<_>>());
        let r = publish(&b, 9999).await.unwrap();
        assert_eq!((r.offset, &r.epoch), (ok + 1, &epoch));
        b.close().await;
    }

    /// A keyed publication whose commit failed is forgotten with its key: the retry
    /// publishes (once), and concurrent retries of it share one publication.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_keyed_publish_lets_its_retry_publish_once() {
        let dir = tempfile::tempdir().unwrap();
        let b = durable_broker(dir.path());
        publish(&b, 0).await.unwrap();
        let keyed = |b: Arc<MemoryBroker>| async move {
            b.publish(PublishRequest {
                topic: "d:t",
                data: b"{}",
                idempotency_key: Some("k"),
                ..PublishRequest::default()
            })
            .await
        };
        let bytes_before = b.history_bytes();
        b.log.as_ref().unwrap().fail_next_commits(1);
        let e = keyed(b.clone()).await.unwrap_err();
        assert!(matches!(e, BrokerError::Unavailable(_)), "{e}");
        assert_eq!(
            b.history_bytes(),
            bytes_before,
            "the failed key is not kept"
        );
        let retries: Vec<_> = (0..8).map(|_| tokio::spawn(keyed(b.clone()))).collect();
        let mut firsts = 0;
        for r in retries {
            let r = r.await.unwrap().unwrap();
            assert_eq!(r.offset, 2);
            firsts += usize::from(!r.duplicate);
        }
        assert_eq!(firsts, 1);
        assert_eq!(offsets(&b).await, vec![1, 2]);
        b.close().await;
    }

    /// An evicted durable topic is forgotten on disk too: it comes back in a new epoch.
    #[tokio::test]
    async fn an_evicted_durable_topic_is_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let b = durable_broker(dir.path());
        let first = publish(&b, 1).await.unwrap();
        let stream = b.lookup("d:t").unwrap();
        assert!(b.unlink(&stream, |st| st.evictable()));
        b.close().await;
        drop(b);
        let b = durable_broker(dir.path());
        assert!(b.lookup("d:t").is_none());
        let again = publish(&b, 2).await.unwrap();
        assert_eq!(again.offset, 1);
        assert_ne!(again.epoch, first.epoch);
        b.close().await;
    }
}
