//! The node's side of delivery: topic -> this node's subscribers, sharded by topic so
//! unrelated topics never contend, and the sink every broker hands its publications to
//! ([`BrokerSink`]). An entry exists only while the topic has a local subscriber (joined or
//! joining), so the registry holds no more entries than there are subscriptions (each
//! bounded by `max_topics_per_connection`).
//!
//! **No silent gap.** Per topic the hub knows the epoch and the newest offset it delivered,
//! and takes a publication only if it is the very next one: an offset already delivered is
//! dropped (a broker fed by two sources, Redis pub/sub beside a history read, may hand one
//! over twice), and an offset past the next one opens a *gap*. The hub then fills it from
//! the broker's history ([`Hub::attach`] names it, as a [`GapSource`]), holding what arrives meanwhile
//! (at most `FILL_BUFFER_BYTES` per topic), and delivers the history read and then what it
//! held, again through the same check; a gap history no longer holds, or a topic whose
//! stream restarted under a new epoch, closes the topic's subscribers with 4004
//! `stream_restarted`, and they resume (hearing `recovered:false` if the history is gone).
//! A broker that lost its own source (Redis pub/sub) says the topic *may have missed*
//! publications, and the hub checks against history the same way. One fill runs per topic
//! at a time; a loss reported while it reads makes it read again once it is done, so
//! every report is followed by a read that started after it, however often they come.
//!
//! **Joining.** A subscriber first *joins*: it is held beside the topic's subscribers and
//! keeps the publications the topic receives meanwhile, while the subscribe path
//! (`subscribe.rs`) reads its position and replay from the broker. [`Hub::merge`] then queues its acknowledgement, the
//! replay and whatever it still lacks up to the topic's position, and it becomes a
//! subscriber; if it is ahead of the topic (a read newer than the deliveries), it skips
//! what it already has. The first join sets the topic's position to its read, which may be
//! ahead of the deliveries too: offsets up to it can still arrive late, and a joiner whose
//! read was older takes them as they come (`Local::seen` tells late from lost). Nothing of
//! this depends on which broker feeds the hub.
//!
//! A topic's lock is held only for non-blocking queue pushes; never across an `.await` or
//! a socket write. Lock order: broker locks (a memory stream lock) -> client topic list ->
//! hub shard lock -> hub topic lock -> client queue lock.
//!
//! The hub sits below the broker: what they exchange (`sink.rs`: the sink, the gap source,
//! positions and replays) is the hub's, and the broker implements or carries it.

mod events;
mod sink;

pub use events::TopicEvents;
pub use sink::{
    BrokerSink, GapSource, MemberChange, MemberEvent, Notice, Replay, StreamPosition, Wakeups,
};

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use indexmap::IndexMap;
use parking_lot::Mutex;

use crate::client::{Client, Item, Pushed};
use crate::close::DisconnectReason;
use crate::metrics::{Metrics, Transport};
use crate::publication::Publication;
use crate::topic::TopicName;

const SHARDS: usize = 64;

/// What a topic may hold while a gap is filled; past it the fill gives up and closes the
/// topic's subscribers (they resume from history on their own), so a slow history read
/// never lets the buffer grow without bound.
pub const FILL_BUFFER_BYTES: usize = 8 << 20;
/// Most bytes of history one fill reads; a larger gap closes the topic's subscribers.
const FILL_READ_BYTES: usize = 8 << 20;
/// A fill's history read that fails (Redis reconnecting) is tried again this often, this
/// far apart, before the fill gives up.
const FILL_READ_ATTEMPTS: u32 = 25;
const FILL_READ_PAUSE: Duration = Duration::from_millis(200);

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

/// A subscriber that has not joined yet.
struct Joiner {
    client: Arc<Client>,
    state: Joining,
}

enum Joining {
    /// Its position is being read: keeps what the topic receives meanwhile (within the
    /// client's queue budget), with each publication's `conflate`.
    Buffering {
        held: Vec<(Arc<Publication>, bool)>,
        bytes: usize,
    },
    /// Given everything up to this offset, but not at the topic's position: ahead of it
    /// (its read was newer than the deliveries), or behind it with the rest still to
    /// arrive (see `Local::seen`). Takes each next offset as it comes, and joins once it
    /// holds the topic's position.
    CatchingUp(u64),
}

/// A gap being filled: what arrived since it opened.
struct Fill {
    /// Which fill this is: a fill task whose fill was given up (and maybe replaced) stops.
    id: u64,
    held: Vec<(Arc<Publication>, bool)>,
    bytes: usize,
    /// A loss was reported while the history was being read: read again afterwards.
    again: bool,
}

/// One topic's local subscribers and where this node's delivery of it stands.
struct Local {
    /// Each has been given every publication up to `last`.
    subscribers: IndexMap<u64, Arc<Client>>,
    joining: Vec<Joiner>,
    /// The stream's epoch, from the first delivery or read; None after a restart.
    epoch: Option<Arc<str>>,
    /// The topic's position: every subscriber has everything up to it. None until the
    /// first subscriber joins, which sets it to its read position, and that may be ahead
    /// of what pub/sub has handed over yet (Redis answers a read on another connection):
    /// offsets up to it can still arrive *late*, and a joiner whose read was older needs
    /// them.
    last: Option<u64>,
    /// The newest offset the topic handed on (to subscribers or joiners). Offsets past it
    /// and up to `last` are still to arrive late; a joiner that lacks one at or below it
    /// missed it for good.
    seen: Option<u64>,
    fill: Option<Fill>,
    fills: u64,
    /// A loss was reported before anyone had joined: the first join checks history.
    unsure: bool,
    /// The entry left its shard: a fill still holding it stops.
    removed: bool,
}

impl Local {
    fn new() -> Self {
        Local {
            subscribers: IndexMap::new(),
            joining: Vec::new(),
            epoch: None,
            last: None,
            seen: None,
            fill: None,
            fills: 0,
            unsure: false,
            removed: false,
        }
    }

    fn is_empty(&self) -> bool {
        self.subscribers.is_empty() && self.joining.is_empty()
    }

    fn open_fill(&mut self, first: Option<(Arc<Publication>, bool)>) {
        // A joiner behind the topic waits for late offsets up to `last`; a loss may have
        // taken some, and the fill reads only past `last`: it starts again instead.
        if let Some(last) = self.last {
            self.joining.retain(|j| match j.state {
                Joining::CatchingUp(pos) if pos < last => {
                    j.client.close(DisconnectReason::StreamRestarted);
                    false
                }
                _ => true,
            });
        }
        self.fills += 1;
        let bytes = first.as_ref().map_or(0, |(p, _)| p.cost());
        self.fill = Some(Fill {
            id: self.fills,
            held: first.into_iter().collect(),
            bytes,
            again: false,
        });
    }
}

/// Where a hub reads gaps from, and the runtime its fills run on.
struct Source {
    hub: Weak<Hub>,
    gaps: Arc<dyn GapSource>,
    runtime: tokio::runtime::Handle,
}

pub struct Hub {
    shards: Box<[Shard]>,
    max_topics_per_connection: usize,
    metrics: Arc<Metrics>,
    source: OnceLock<Source>,
    /// Who hears of topics occupied and vacated (webhooks), if anyone.
    events: OnceLock<std::sync::Arc<dyn TopicEvents>>,
    /// What this node's member ids add to its client ids (`BrokerSink::member_tag`): a
    /// presence notice about one of them is not told to that client in Pusher's words.
    member_tag: std::sync::atomic::AtomicU64,
}

impl Hub {
    pub fn new(max_topics_per_connection: usize, metrics: Arc<Metrics>) -> Self {
        Hub {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            max_topics_per_connection,
            metrics,
            source: OnceLock::new(),
            events: OnceLock::new(),
            member_tag: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Names where this hub fills gaps from: the node's broker, as a `Weak` handle
    /// (called once the broker exists, on the runtime the fills run on). Without it a gap
    /// closes the topic's subscribers.
    pub fn attach(self: &Arc<Self>, gaps: impl GapSource + 'static) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let _ = self.source.set(Source {
            hub: Arc::downgrade(self),
            gaps: Arc::new(gaps),
            runtime,
        });
    }

    /// Sets who hears of topic and member transitions (once, before serving).
    pub fn set_events(&self, events: Arc<dyn TopicEvents>) {
        let _ = self.events.set(events);
    }

    /// Who hears of topic and member transitions, if anyone (the subscribe path reports
    /// presence joins and leaves here).
    pub fn events(&self) -> Option<&Arc<dyn TopicEvents>> {
        self.events.get()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    fn shard(&self, topic: &str) -> &Shard {
        let mut h = DefaultHasher::new();
        topic.hash(&mut h);
        &self.shards[(h.finish() as usize) % SHARDS]
    }

    fn local(&self, topic: &str) -> Option<Arc<Mutex<Local>>> {
        self.shard(topic).lock().get(topic).cloned()
    }

    /// Whether the client already holds `name`; refuses a new topic past the per-connection
    /// cap. A client's subscriptions change only from its own connection task (and the
    /// cleanup after it), so the answer stays true until `enter`.
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

    /// Starts the client's join of the topic: from now on it keeps what the topic receives,
    /// until [`Hub::merge`]. Refused once the client was retired (its connection is gone),
    /// past the per-connection cap, or if it holds the topic already.
    pub(crate) fn enter(&self, client: &Arc<Client>, name: &str) -> Result<(), HubError> {
        // Under the client's topic list, so `retire` either sees the topic or is seen.
        let mut topics = client.topics.lock();
        if client.retired.load(Ordering::Acquire) {
            return Err(HubError::ClientClosed);
        }
        if topics.len() >= self.max_topics_per_connection {
            return Err(HubError::TooManyTopicsPerConnection(
                self.max_topics_per_connection,
            ));
        }
        if topics.iter().any(|t| &**t == name) {
            return Err(HubError::ClientClosed);
        }
        // Under the shard lock, so a concurrent `leave` cannot drop the entry between
        // finding it and adding to it.
        let mut shard = self.shard(name).lock();
        // The entry's own name when there is one: every subscriber of a topic shares it.
        let name = match shard.get_key_value(name) {
            Some((n, _)) => n.clone(),
            None => TopicName::from(name),
        };
        let local = shard.entry(name.clone()).or_insert_with(|| {
            if let Some(ev) = self.events.get() {
                ev.occupied(&name);
            }
            Arc::new(Mutex::new(Local::new()))
        });
        local.lock().joining.push(Joiner {
            client: client.clone(),
            state: Joining::Buffering {
                held: Vec::new(),
                bytes: 0,
            },
        });
        drop(shard);
        // Room for exactly one more: most clients hold one topic, and a `Vec`'s first
        // growth would keep four slots (64 B) on every one of them (docs/BENCHMARKS.md).
        topics.reserve_exact(1);
        topics.push(name);
        self.metrics.subscriptions.inc();
        Ok(())
    }

    /// Completes the client's join (see the module docs): queues `ack`, the replay and the
    /// retained state, then what it still lacks up to the topic's position, and makes it a
    /// subscriber. Err when it can no longer join: it left or was closed meanwhile, the
    /// stream restarted between its read and now, or what it kept has a hole (its
    /// connection is then closed with 4004 and it resumes). The caller then `leave`s.
    pub(crate) fn merge(
        &self,
        client: &Arc<Client>,
        name: &str,
        replay: &Replay,
        ack: Option<Bytes>,
    ) -> Result<(), ()> {
        let local = self.local(name).ok_or(())?;
        let mut wake = Wakeups::default();
        let mut l = local.lock();
        let i = l
            .joining
            .iter()
            .position(|j| j.client.id == client.id)
            .ok_or(())?;
        let Joining::Buffering { held, .. } = l.joining.swap_remove(i).state else {
            unreachable!("a joiner buffers until it merges")
        };
        let epoch = &replay.position.epoch;
        let at = replay.position.offset;
        if l.epoch.as_ref().is_some_and(|e| e != epoch) {
            // The stream restarted between the read and now (or before it): which side is
            // newer is unknown, so this subscriber starts again, like the others did.
            client.close(DisconnectReason::StreamRestarted);
            return Err(());
        }
        // What it still lacks once the replay is queued.
        enum Plan {
            /// Nobody had joined: its position becomes the topic's.
            Establish,
            /// These from what it kept, after which it holds everything up to the offset:
            /// the topic's position (it joins), or not yet (it catches up).
            Meet(Vec<(Arc<Publication>, bool)>, u64),
        }
        let plan = match l.last {
            None => Plan::Establish,
            Some(last) => {
                let mut pos = at;
                let mut tail = Vec::new();
                for (p, conflate) in &held {
                    if p.offset == pos + 1 && p.offset <= last {
                        pos = p.offset;
                        tail.push((p.clone(), *conflate));
                    }
                }
                if pos < last && l.seen.is_some_and(|seen| pos < seen) {
                    // The topic handed on an offset it lacks while it joined: only a
                    // lost delivery does this; rare, never silent.
                    tracing::warn!(
                        topic = name,
                        "a joining subscriber missed publications: closing it"
                    );
                    client.close(DisconnectReason::StreamRestarted);
                    return Err(());
                }
                Plan::Meet(tail, pos)
            }
        };
        if let Some(bytes) = ack {
            client.push(Item::control(bytes), &self.metrics);
        }
        for p in &replay.publications {
            let item = Item::publication(p, p.wire(client.transport), false, false);
            client.push(item, &self.metrics);
        }
        if let Some((p, conflate)) = &replay.retained {
            let item = Item::publication(p, p.wire(client.transport), *conflate, false);
            client.push(item, &self.metrics);
        }
        match plan {
            Plan::Establish => {
                l.epoch = Some(epoch.clone());
                l.last = Some(at);
                l.subscribers.insert(client.id, client.clone());
                // What reached it while joining, past its position, goes through the
                // contiguous path (a hole in it opens a gap, filled from history).
                let had_fill = l.fill.is_some();
                for (p, conflate) in &held {
                    if p.offset > at {
                        self.step(&mut l, p, epoch, *conflate, &mut wake);
                    }
                }
                if std::mem::take(&mut l.unsure) && l.fill.is_none() {
                    l.open_fill(None);
                }
                if !had_fill && l.fill.is_some() {
                    self.spawn_fill(name.into(), &local);
                }
            }
            Plan::Meet(tail, pos) => {
                for (p, conflate) in tail {
                    if !p.reaches(client.id) {
                        continue;
                    }
                    let item = Item::publication(&p, p.wire(client.transport), conflate, true);
                    client.push(item, &self.metrics);
                }
                if Some(pos) == l.last {
                    l.subscribers.insert(client.id, client.clone());
                } else {
                    l.joining.push(Joiner {
                        client: client.clone(),
                        state: Joining::CatchingUp(pos),
                    });
                }
            }
        }
        drop(l);
        wake.wake();
        if client.closed().is_some() {
            // Closed concurrently (or by these very pushes): the caller undoes the join.
            return Err(());
        }
        Ok(())
    }

    /// Takes the client off one topic (joined or joining); returns whether it held it.
    /// Each topic a client held is left once, whichever way it goes.
    pub fn leave(&self, client: &Client, name: &str) -> bool {
        let mut topics = client.topics.lock();
        let Some(i) = topics.iter().position(|t| &**t == name) else {
            return false;
        };
        topics.swap_remove(i);
        let mut shard = self.shard(name).lock();
        if let Some(local) = shard.get(name) {
            let mut l = local.lock();
            l.subscribers.swap_remove(&client.id);
            l.joining.retain(|j| j.client.id != client.id);
            if l.is_empty() {
                l.removed = true;
                drop(l);
                shard.remove(name);
                if let Some(ev) = self.events.get() {
                    ev.vacated(name);
                }
            }
        }
        drop(shard);
        drop(topics);
        self.metrics.subscriptions.dec();
        true
    }

    /// The client's connection is gone: no topic may be entered from now on; returns the
    /// topics it holds, for the caller to `leave` each.
    pub(crate) fn retire(&self, client: &Client) -> Vec<TopicName> {
        let topics = client.topics.lock();
        client.retired.store(true, Ordering::Release);
        topics.clone()
    }

    /// Whether the client holds the topic (joined or joining).
    pub fn holds(&self, client: &Client, name: &str) -> bool {
        client.topics.lock().iter().any(|t| &**t == name)
    }

    /// The topics the client holds (a snapshot; `leave` each to remove it everywhere).
    pub fn topics_of(&self, client: &Client) -> Vec<TopicName> {
        client.topics.lock().clone()
    }

    /// One publication, under the topic's lock: the very next offset is fanned out to the
    /// subscribers (the same encoded bytes for all) and handed to the joiners; see the
    /// module docs for everything else. Returns the number of subscribers.
    fn step(
        &self,
        l: &mut Local,
        p: &Arc<Publication>,
        epoch: &str,
        conflate: bool,
        wake: &mut Wakeups,
    ) -> usize {
        match &l.epoch {
            Some(e) if **e != *epoch => {
                tracing::warn!(
                    topic = &*p.topic,
                    epoch,
                    "topic stream restarted under a new epoch"
                );
                self.start_over(l);
                l.epoch = Some(epoch.into());
                // Nobody is left to give it to: the next subscriber starts from a read.
                return 0;
            }
            Some(_) => {}
            None => l.epoch = Some(epoch.into()),
        }
        let Some(last) = l.last else {
            // Nobody has joined yet: only joiners keep it.
            l.seen = l.seen.max(Some(p.offset));
            self.hand_to_joiners(l, p, conflate, wake);
            return 0;
        };
        if let Some(fill) = &mut l.fill {
            fill.bytes += p.cost();
            if fill.bytes <= FILL_BUFFER_BYTES {
                fill.held.push((p.clone(), conflate));
                return l.subscribers.len();
            }
            tracing::warn!(
                topic = &*p.topic,
                "gap fill too slow: closing the topic's subscribers"
            );
            self.start_over(l);
            return 0;
        }
        if p.offset <= last {
            // Subscribers have it. A late one (see `last`) is the next for a joiner behind.
            if l.seen.is_none_or(|seen| p.offset > seen) {
                l.seen = Some(p.offset);
                if !l.joining.is_empty() {
                    self.hand_to_joiners(l, p, conflate, wake);
                }
            }
            return l.subscribers.len();
        }
        if p.offset > last + 1 {
            tracing::info!(
                topic = &*p.topic,
                from = last + 1,
                to = p.offset - 1,
                "a gap in deliveries: filling it from history"
            );
            l.open_fill(Some((p.clone(), conflate)));
            return l.subscribers.len();
        }
        l.last = Some(p.offset);
        l.seen = Some(p.offset);
        let mut frames: [Option<Bytes>; 3] = [None, None, None];
        wake.reserve(l.subscribers.len());
        for client in l.subscribers.values() {
            if p.terminates() {
                client.close(DisconnectReason::Terminated);
                continue;
            }
            if !p.reaches(client.id) {
                continue;
            }
            let slot = &mut frames[client.transport as usize];
            let bytes = slot.get_or_insert_with(|| p.wire(client.transport)).clone();
            let item = Item::publication(p, bytes, conflate, true);
            if matches!(
                client.enqueue(item, &self.metrics),
                Pushed::Wake | Pushed::Overflowed
            ) {
                wake.add(client);
            }
        }
        if !l.joining.is_empty() {
            self.hand_to_joiners(l, p, conflate, wake);
        }
        l.subscribers.len()
    }

    /// A publication the topic took, for each joiner: kept while it reads its position,
    /// queued if it is catching up and it is the next one it needs (joining once it holds
    /// the topic's position). A catching-up joiner that sees a hole is closed.
    fn hand_to_joiners(
        &self,
        l: &mut Local,
        p: &Arc<Publication>,
        conflate: bool,
        wake: &mut Wakeups,
    ) {
        let last = l.last;
        // Indices (ascending) of joiners that leave `joining`: true when they join.
        let mut done = Vec::new();
        for (i, j) in l.joining.iter_mut().enumerate() {
            match &mut j.state {
                Joining::Buffering { held, bytes } => {
                    *bytes += p.cost();
                    if *bytes > j.client.budget() {
                        // Its read took longer than its queue could wait.
                        j.client.close(DisconnectReason::SlowConsumer);
                    } else {
                        held.push((p.clone(), conflate));
                    }
                }
                Joining::CatchingUp(pos) => {
                    if p.offset == *pos + 1 {
                        *pos = p.offset;
                        let item = Item::publication(p, p.wire(j.client.transport), conflate, true);
                        if p.reaches(j.client.id)
                            && matches!(
                                j.client.enqueue(item, &self.metrics),
                                Pushed::Wake | Pushed::Overflowed
                            )
                        {
                            wake.add(&j.client);
                        }
                    } else if p.offset > *pos + 1 {
                        tracing::warn!(
                            topic = &*p.topic,
                            "a joining subscriber missed publications: closing it"
                        );
                        j.client.close(DisconnectReason::StreamRestarted);
                        done.push((i, false));
                        continue;
                    }
                    if Some(*pos) == last {
                        done.push((i, true));
                    }
                }
            }
        }
        for (i, joins) in done.into_iter().rev() {
            let j = l.joining.swap_remove(i);
            if joins {
                l.subscribers.insert(j.client.id, j.client);
            }
        }
    }

    /// What this node delivered of the topic can no longer be continued exactly: its
    /// subscribers, joined and joining, are closed (4004) and resume from history
    /// themselves, which tells them `recovered:false` if the history is gone too. Each
    /// leaves the entry when its connection cleans up.
    fn start_over(&self, l: &mut Local) {
        let reason = DisconnectReason::StreamRestarted;
        for c in l.subscribers.values() {
            c.close(reason);
        }
        for j in &l.joining {
            j.client.close(reason);
        }
        l.subscribers.clear();
        l.joining.clear();
        l.epoch = None;
        l.last = None;
        l.seen = None;
        l.fill = None;
        l.unsure = false;
    }

    fn spawn_fill(&self, name: TopicName, local: &Arc<Mutex<Local>>) {
        match self.source.get() {
            Some(src) => {
                let task = fill(src.hub.clone(), src.gaps.clone(), name, local.clone());
                src.runtime.spawn(task);
            }
            None => {
                tracing::warn!(
                    topic = &*name,
                    "no history to fill a gap from: closing the topic's subscribers"
                );
                self.start_over(&mut local.lock());
            }
        }
    }

    /// The fill's read is back: delivers the history after the gap and then what arrived
    /// meanwhile, through the contiguous path. Returns whether to read again (a loss was
    /// reported during the read, or what arrived meanwhile opened another gap).
    fn fill_apply(
        &self,
        name: &str,
        local: &Arc<Mutex<Local>>,
        id: u64,
        from: &StreamPosition,
        read: Result<Replay, String>,
    ) -> bool {
        let mut wake = Wakeups::default();
        let mut l = local.lock();
        if l.removed || l.fill.as_ref().is_none_or(|f| f.id != id) {
            return false;
        }
        let fill = l.fill.take().expect("checked above");
        let filled = match read {
            Ok(r) => {
                let continues = r.recovered == Some(true)
                    && r.position.epoch == from.epoch
                    && r.publications
                        .iter()
                        .zip(from.offset + 1..)
                        .all(|(p, o)| p.offset == o)
                    && from.offset + r.publications.len() as u64 == r.position.offset;
                continues.then_some(r)
            }
            Err(e) => {
                tracing::warn!(topic = name, "reading a gap from history failed: {e}");
                None
            }
        };
        let again = match filled {
            Some(r) => {
                for p in &r.publications {
                    self.step(&mut l, p, &from.epoch, false, &mut wake);
                }
                for (p, conflate) in &fill.held {
                    self.step(&mut l, p, &from.epoch, *conflate, &mut wake);
                }
                if fill.again && l.fill.is_none() && l.last.is_some() {
                    l.open_fill(None);
                }
                l.fill.is_some()
            }
            None => {
                tracing::warn!(
                    topic = name,
                    "a gap in deliveries is not in history: closing the topic's subscribers"
                );
                self.start_over(&mut l);
                false
            }
        };
        drop(l);
        wake.wake();
        again
    }

    /// A fill that cannot make progress: the topic's subscribers are told (4004).
    fn fill_give_up(&self, name: &str, local: &Arc<Mutex<Local>>, id: u64) {
        let mut l = local.lock();
        if !l.removed && l.fill.as_ref().is_some_and(|f| f.id == id) {
            tracing::warn!(
                topic = name,
                "history never reached a gap: closing the topic's subscribers"
            );
            self.start_over(&mut l);
        }
    }

    pub fn subscriber_count(&self, name: &str) -> usize {
        self.local(name)
            .map(|t| t.lock().subscribers.len())
            .unwrap_or(0)
    }

    /// Local subscriptions of the topic, joined and joining.
    pub fn local_count(&self, name: &str) -> usize {
        self.local(name)
            .map(|t| {
                let l = t.lock();
                l.subscribers.len() + l.joining.len()
            })
            .unwrap_or(0)
    }

    fn all(&self) -> Vec<Arc<Mutex<Local>>> {
        self.shards
            .iter()
            .flat_map(|s| s.lock().values().cloned().collect::<Vec<_>>())
            .collect()
    }

    /// Total subscriptions across topics, joined and joining (for leak checks in tests and
    /// /healthz).
    pub fn total_subscriptions(&self) -> usize {
        self.all()
            .iter()
            .map(|t| {
                let l = t.lock();
                l.subscribers.len() + l.joining.len()
            })
            .sum()
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
    pub fn close_all(&self, reason: DisconnectReason) {
        for t in self.all() {
            let clients: Vec<Arc<Client>> = {
                let l = t.lock();
                l.subscribers
                    .values()
                    .cloned()
                    .chain(l.joining.iter().map(|j| j.client.clone()))
                    .collect()
            };
            for c in clients {
                c.close(reason);
            }
        }
    }
}

impl BrokerSink for Hub {
    fn deliver(
        &self,
        p: &Arc<Publication>,
        epoch: &str,
        conflate: bool,
        wake: &mut Wakeups,
    ) -> usize {
        let Some(local) = self.local(&p.topic) else {
            return 0;
        };
        let mut l = local.lock();
        let had_fill = l.fill.is_some();
        let n = self.step(&mut l, p, epoch, conflate, wake);
        if !had_fill && l.fill.is_some() {
            drop(l);
            self.spawn_fill(p.topic.clone(), &local);
        }
        n
    }

    fn may_have_missed(&self, topic: &str) {
        let Some(local) = self.local(topic) else {
            return;
        };
        let mut l = local.lock();
        if let Some(fill) = &mut l.fill {
            fill.again = true;
        } else if l.last.is_none() {
            l.unsure = true;
        } else {
            l.open_fill(None);
            drop(l);
            self.spawn_fill(topic.into(), &local);
        }
    }

    fn restarted(&self, topic: &str) {
        if let Some(local) = self.local(topic) {
            tracing::warn!(topic, "topic stream restarted under a new epoch");
            self.start_over(&mut local.lock());
        }
    }

    fn announce(&self, topic: &str, notice: &Notice, wake: &mut Wakeups) {
        let Some(local) = self.local(topic) else {
            return;
        };
        let l = local.lock();
        // Pusher's words for it, framed once (when some Pusher client is told).
        let mut pusher: Option<Option<Bytes>> = None;
        let tag = self.member_tag.load(std::sync::atomic::Ordering::Relaxed);
        for client in l.subscribers.values() {
            let bytes = match client.transport {
                Transport::Ws => notice.ws.clone(),
                Transport::Sse => notice.sse.clone(),
                // Pusher presence: a user's first join and last leave, never told to the
                // member itself.
                Transport::Pusher => {
                    let Some(m) = &notice.member else { continue };
                    if m.client == tag | client.id {
                        continue;
                    }
                    match pusher.get_or_insert_with(|| m.pusher_frame(topic)) {
                        Some(b) => b.clone(),
                        None => continue,
                    }
                }
            };
            if matches!(
                client.enqueue(Item::control(bytes), &self.metrics),
                Pushed::Wake | Pushed::Overflowed
            ) {
                wake.add(client);
            }
        }
    }

    fn subscriber_count(&self, topic: &str) -> usize {
        Hub::subscriber_count(self, topic)
    }

    fn topic_counts(&self) -> Vec<(TopicName, usize)> {
        Hub::topic_counts(self)
    }

    fn events(&self) -> Option<Arc<dyn TopicEvents>> {
        Hub::events(self).cloned()
    }

    fn member_tag(&self, tag: u64) {
        self.member_tag
            .store(tag, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Fills the topic's gap from the broker's history until nothing is left to read (see the
/// module docs). One task per topic at a time; it stops when the topic's entry goes, or
/// the broker does.
async fn fill(hub: Weak<Hub>, gaps: Arc<dyn GapSource>, name: TopicName, local: Arc<Mutex<Local>>) {
    let hub_ref = hub.clone();
    let mut stalls = 0;
    loop {
        let (id, from) = {
            let mut l = local.lock();
            let (Some(epoch), Some(last)) = (l.epoch.clone(), l.last) else {
                return;
            };
            if l.removed {
                return;
            }
            let Some(fill) = &mut l.fill else { return };
            fill.again = false;
            (
                fill.id,
                StreamPosition {
                    offset: last,
                    epoch,
                },
            )
        };
        let mut attempt = 0;
        let read = loop {
            let Some(read) = gaps.replay(&name, &from, FILL_READ_BYTES).await else {
                return;
            };
            match read {
                Err(e) if attempt < FILL_READ_ATTEMPTS && !local.lock().removed => {
                    // The pub/sub connection often comes back before the command connection
                    // does: a failed read is tried again for a while, so a Redis restart
                    // does not close subscribers whose gap history still holds.
                    attempt += 1;
                    tracing::debug!(topic = &*name, "reading a gap failed, trying again: {e}");
                    tokio::time::sleep(FILL_READ_PAUSE).await;
                }
                r => break r,
            }
        };
        let progress = read.as_ref().is_ok_and(|r| r.position.offset > from.offset);
        let Some(hub) = hub.upgrade() else { return };
        if !hub.fill_apply(&name, &local, id, &from, read) {
            return;
        }
        drop(hub);
        if !progress {
            // History is not past the gap yet (a broker always keeps a publication before
            // it hands it over, so this is brief): read again a little later, a bounded
            // number of times, then give up like a read that failed.
            stalls += 1;
            if stalls > FILL_READ_ATTEMPTS {
                if let Some(hub) = hub_ref.upgrade() {
                    hub.fill_give_up(&name, &local, id);
                }
                return;
            }
            tokio::time::sleep(FILL_READ_PAUSE).await;
        } else {
            stalls = 0;
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

    fn replay_at(offset: u64) -> Replay {
        Replay {
            position: StreamPosition {
                offset,
                epoch: "e".into(),
            },
            recovered: None,
            publications: Vec::new(),
            retained: None,
        }
    }

    fn deliver(h: &Hub, t: &TopicName, o: u64) -> usize {
        let mut wake = Wakeups::default();
        let n = h.deliver(&publication(t, o), "e", false, &mut wake);
        wake.wake();
        n
    }

    /// Two WebSocket clients and an SSE one, each with a 1 MiB queue.
    fn three_clients() -> (Arc<Client>, Arc<Client>, Arc<Client>) {
        let c = |t| Arc::new(Client::new(t, 1 << 20));
        (c(Transport::Ws), c(Transport::Ws), c(Transport::Sse))
    }

    fn got(c: &Client) -> Vec<u64> {
        drain(c)
            .iter()
            .filter_map(|i| i.source.as_ref().map(|s| s.1))
            .collect()
    }

    #[test]
    fn delivers_in_order_and_never_twice() {
        let h = Hub::new(3, Arc::new(Metrics::new()));
        let t: TopicName = "t".into();
        let c = Arc::new(Client::new(Transport::Ws, 1 << 20));
        h.enter(&c, "t").unwrap();
        assert_eq!(
            h.enter(&c, "t").unwrap_err(),
            HubError::ClientClosed,
            "entering twice is refused"
        );
        h.merge(&c, "t", &replay_at(4), None).unwrap();
        // At or before the position the subscriber joined at: already given to it.
        assert_eq!(deliver(&h, &t, 4), 1);
        for o in [5, 6, 6, 5, 7] {
            deliver(&h, &t, o);
        }
        assert_eq!(got(&c), [5, 6, 7]);
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

    /// A hub with no broker to read a gap from closes the topic's subscribers: never a
    /// silent gap.
    #[test]
    fn a_gap_without_history_closes_the_subscribers() {
        let h = Hub::new(3, Arc::new(Metrics::new()));
        let t: TopicName = "t".into();
        let c = Arc::new(Client::new(Transport::Ws, 1 << 20));
        h.enter(&c, "t").unwrap();
        h.merge(&c, "t", &replay_at(0), None).unwrap();
        deliver(&h, &t, 1);
        deliver(&h, &t, 3);
        assert_eq!(c.closed(), Some(DisconnectReason::StreamRestarted));
        assert!(h.leave(&c, "t"));
        assert_eq!(h.subscribed_topics(), 0);
    }

    /// A joiner behind the topic gets what it lacks from what it kept; one ahead skips
    /// what it already has; a new epoch closes everyone.
    #[test]
    fn joiners_meet_the_topic_with_no_gap_and_no_duplicate() {
        let h = Hub::new(3, Arc::new(Metrics::new()));
        let t: TopicName = "t".into();
        let (a, b, c) = three_clients();
        h.enter(&a, "t").unwrap();
        h.merge(&a, "t", &replay_at(2), None).unwrap();
        h.enter(&b, "t").unwrap();
        h.enter(&c, "t").unwrap();
        for o in [3, 4] {
            deliver(&h, &t, o);
        }
        // b read offset 3 (behind the topic at 4); c read offset 6 (ahead).
        h.merge(&b, "t", &replay_at(3), None).unwrap();
        h.merge(&c, "t", &replay_at(6), None).unwrap();
        for o in 5..=7 {
            deliver(&h, &t, o);
        }
        assert_eq!(got(&a), [3, 4, 5, 6, 7]);
        assert_eq!(got(&b), [4, 5, 6, 7]);
        assert_eq!(got(&c), [7]);
        assert_eq!(h.subscriber_count("t"), 3);
        let mut wake = Wakeups::default();
        h.deliver(&publication(&t, 1), "other", false, &mut wake);
        for x in [&a, &b, &c] {
            assert_eq!(x.closed(), Some(DisconnectReason::StreamRestarted));
            assert!(h.leave(x, "t"));
        }
        assert_eq!(h.total_subscriptions(), 0);
    }

    /// Two joiners before anyone has joined; the first to merge read a position the
    /// deliveries have not reached yet (its read was later, and pub/sub lags the command
    /// connection). The other read an earlier position: what lies between the two still
    /// arrives late, and it must get it, whenever it merges (seen in a reconnect storm on
    /// two nodes: it was closed with 4004 as if it had missed them).
    #[test]
    fn a_joiner_behind_a_first_join_ahead_of_the_deliveries_misses_nothing() {
        let h = Hub::new(3, Arc::new(Metrics::new()));
        let t: TopicName = "t".into();
        let (a, b, c) = three_clients();
        for x in [&a, &b, &c] {
            h.enter(x, "t").unwrap();
        }
        deliver(&h, &t, 3);
        // a read 6: 4..=6 are published, not delivered yet.
        h.merge(&a, "t", &replay_at(6), None).unwrap();
        // b read 3 and merges before 4 arrives: it waits for 4..=6.
        h.merge(&b, "t", &replay_at(3), None).unwrap();
        deliver(&h, &t, 4);
        // c read 2, kept 3 and 4, merges before 5 arrives.
        h.merge(&c, "t", &replay_at(2), None).unwrap();
        for o in 5..=8 {
            deliver(&h, &t, o);
        }
        assert_eq!(got(&a), [7, 8]);
        assert_eq!(got(&b), [4, 5, 6, 7, 8]);
        assert_eq!(got(&c), [3, 4, 5, 6, 7, 8]);
        for x in [&a, &b, &c] {
            assert_eq!(x.closed(), None);
        }
        assert_eq!(h.subscriber_count("t"), 3);
    }

    /// A joiner behind the topic whose missing publications are skipped (a lost delivery)
    /// is closed, never continued past the hole.
    #[test]
    fn a_joiner_behind_that_sees_a_hole_is_closed() {
        let h = Hub::new(3, Arc::new(Metrics::new()));
        let t: TopicName = "t".into();
        let (a, b) = (
            Arc::new(Client::new(Transport::Ws, 1 << 20)),
            Arc::new(Client::new(Transport::Ws, 1 << 20)),
        );
        h.enter(&a, "t").unwrap();
        h.enter(&b, "t").unwrap();
        h.merge(&a, "t", &replay_at(6), None).unwrap();
        h.merge(&b, "t", &replay_at(3), None).unwrap();
        deliver(&h, &t, 4);
        deliver(&h, &t, 6);
        assert_eq!(b.closed(), Some(DisconnectReason::StreamRestarted));
        assert_eq!(a.closed(), None);
        assert_eq!(h.subscriber_count("t"), 1);
    }

    #[test]
    fn per_connection_topic_cap_and_retire() {
        let h = Hub::new(3, Arc::new(Metrics::new()));
        let c = Arc::new(Client::new(Transport::Ws, 1 << 20));
        for t in ["a", "b", "c"] {
            assert!(!h.admit(&c, t).unwrap());
            h.enter(&c, t).unwrap();
        }
        assert!(h.admit(&c, "a").unwrap());
        assert_eq!(
            h.admit(&c, "d").unwrap_err(),
            HubError::TooManyTopicsPerConnection(3)
        );
        for t in h.retire(&c) {
            assert!(h.leave(&c, &t));
        }
        assert_eq!(h.enter(&c, "a").unwrap_err(), HubError::ClientClosed);
        assert_eq!(h.total_subscriptions(), 0);
    }
}
