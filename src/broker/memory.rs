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
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::watch;

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
}

impl StreamState {
    fn idle(&self) -> bool {
        self.subscribers == 0 && self.retained.is_none()
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
    #[allow(dead_code)] // built by the durable path
    Pending(watch::Receiver<Option<u64>>),
}

/// One entry of the node-wide history FIFO.
struct Kept {
    stream: Arc<Stream>,
    what: KeptKind,
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
                st.idle()
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
    fn enter(&self, stream: &Arc<Stream>, what: KeptKind, bytes: usize) {
        let live = self.kept_live.fetch_add(1, Ordering::Relaxed) + 1;
        self.history_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.metrics.history_bytes.inc_by(bytes as i64);
        let mut kept = self.kept.lock();
        kept.push_back(Kept {
            stream: stream.clone(),
            what,
        });
        if kept.len() > 2 * live + 1024 {
            // Halves the FIFO at least: amortized O(1) per entry.
            kept.retain(Kept::live);
        }
    }

    /// Evicts the oldest kept items of any topic until history fits `history_max_bytes`.
    /// Called with no lock held.
    fn enforce_budget(&self) {
        let max = self.cfg.history_max_bytes;
        while self.history_bytes.load(Ordering::Relaxed) > max {
            let Some(k) = self.kept.lock().pop_front() else {
                return;
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
        self.enter(stream, KeptKind::Key(seq), key.len() + KEY_COST);
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
                self.enter(stream, KeptKind::Publication(p.offset), p.cost());
            } else {
                stream.trimmed.store(p.offset, Ordering::Release);
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
            if !st.published {
                // From now on its offsets matter: it leaves the subscribers' budget.
                st.published = true;
                self.subscriber_topics.fetch_sub(1, Ordering::Relaxed);
                self.metrics.subscriber_topics.dec();
            }
            // Durable namespaces (`ns.durable`) take the same steps, with the commit to
            // the history log between the assignment and `commit`; until that log is
            // plugged in here they are kept in memory like the others.
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
        loop {
            match self.try_publish(&req) {
                Ok(r) => return Ok(r),
                Err(Attempt::Failed(e)) => return Err(e),
                // The first publish with this key settles the key (published, or forgotten
                // after a failure), so each wait ends and the next attempt answers.
                Err(Attempt::Wait(mut rx)) => {
                    let _ = rx.wait_for(|v| v.is_some()).await;
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
        let Some(stream) = self.lookup(topic) else {
            return Ok(History {
                position: StreamPosition {
                    offset: 0,
                    epoch: "".into(),
                },
                recovered: since.is_none(),
                publications: Vec::new(),
            });
        };
        let mut st = stream.state.lock();
        if stream.dead.load(Ordering::Acquire) {
            return Ok(History {
                position: StreamPosition {
                    offset: 0,
                    epoch: "".into(),
                },
                recovered: since.is_none(),
                publications: Vec::new(),
            });
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
        Ok(History {
            position: StreamPosition {
                offset: st.last_offset,
                epoch: stream.epoch.clone(),
            },
            recovered,
            publications: st.history.range(start..).take(limit).cloned().collect(),
        })
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
