//! The Redis broker: several crier nodes pointed at one Redis act as one server. Redis holds
//! each topic's stream (offset, epoch, history, idempotency keys); every node holds only its
//! own subscribers, in its local hub.
//!
//! Modelled on centrifuge's `broker_redis.go`, written for our seam:
//!
//! - **Publish** is one Lua script, so it is atomic across nodes: it answers a remembered
//!   idempotency key with the first receipt, else creates the epoch if the topic has none,
//!   `HINCRBY`s the offset, `XADD`s the publication to the topic's stream under the id
//!   `<offset>-0` (trimmed to the namespace's `history_size`, expiring with its
//!   `history_ttl`), remembers the key (`SET ... PX idempotency_window`) and `PUBLISH`es
//!   `offset:epoch:data` to the topic's channel. Offsets are therefore one contiguous
//!   sequence per topic, whichever node publishes.
//! - **Live delivery**: one Redis subscription per topic that has local subscribers (never
//!   per client), all on one pub/sub connection, dropped when the last local subscriber
//!   leaves. Subscribe and unsubscribe commands go through one ordered task, so an
//!   unsubscribe can never overtake the subscribe that follows it. Messages arrive in
//!   publish order (Redis runs scripts one at a time, one connection delivers them) and are
//!   handed to the hub's `deliver` under the topic's lock; an offset already delivered is
//!   dropped.
//! - **Subscribe with resume** is asynchronous ([`Broker::subscribe_async`]): the client
//!   first joins the topic as *pending* (live publications are buffered for it), then the
//!   node's Redis subscription is confirmed, then the position and history are read (one
//!   script, atomic). Everything published after that read reaches the node's pub/sub
//!   connection, hence the buffer. Under the topic's lock the acknowledgement, the replay,
//!   then the buffered publications past the read position are queued and the client joins
//!   the hub: no gap, no duplicate. If the node has not yet delivered everything up to the
//!   read position (messages in flight), the client stays pending in a catching-up phase
//!   and joins once the node's deliveries reach it.
//! - **History** (`GET /api/topics/{topic}/history`) is `XRANGE` from `<since+1>-0`.
//!   Entries carry Redis's own clock (`TIME`) so the age limit does not depend on the
//!   nodes' clocks agreeing.
//!
//! Keys (the topic is a hash tag, so one topic's keys share a Redis Cluster slot):
//! `crier:{T}:m` (hash: `o` offset, `e` epoch), `crier:{T}:s` (stream: `d` data, `t` ms),
//! `crier:{T}:i:<key>` (idempotency), channel `crier:{T}:c`.
//!
//! `crier:{T}:m` expires `redis_topic_ttl` after the last publish unless a node holding
//! subscribers of the topic refreshes it (every third of the TTL), so names that were only
//! subscribed to leave nothing behind for long; an expired topic restarts under a new epoch.
//! `crier:{T}:n` (cluster subscriber counts, written by `cluster_counts`) is summed by the
//! publish script for the receipt.
//!
//! Failures (`health`, `pubsub`): a monitor PINGs Redis every second; while it does not
//! answer, publishes and subscribes fail at once with 503. A lost pub/sub connection keeps
//! the clients: the node reconnects, subscribes again and fills the gap from history
//! (`fill_gaps`); only a gap history no longer holds closes a topic's subscribers.

mod health;
mod pubsub;
mod scripts;

pub use health::RedisHealth;

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use redis::aio::ConnectionManager;
use redis::{Script, Value};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use pubsub::{run_pubsub, Control};
use scripts::{
    channel, continues, key, parse_read, topic_of, unavailable, Entry, Read, PUBLISH, READ,
};

use super::stream::new_epoch;
use super::{
    Ack, Broker, BrokerError, History, PublishRequest, Receipt, StreamPosition, Subscribed,
};
use crate::client::{Client, Item};
use crate::config::Config;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::publication::Publication;
use crate::topic::TopicName;

/// A client that asked for a topic and has not joined the hub yet.
enum Pending {
    /// Waiting for the Redis subscription and the history read: live publications are
    /// kept for it (within its queue budget).
    Buffering(Vec<Arc<Publication>>, usize),
    /// Given everything up to this offset; the node has not delivered that far yet.
    CatchingUp(u64),
}

/// Publications that arrived while the topic's gap (a lost pub/sub connection) is being
/// filled from history: handed on, in order, once the gap is filled.
struct Recovering {
    buffered: Vec<(u64, Arc<str>, bytes::Bytes)>,
    bytes: usize,
}

/// Past this many buffered bytes per topic, a gap fill gives up and closes the topic's
/// subscribers (they resume from history on their own), so a slow history read never
/// lets the buffer grow without bound.
const RECOVERY_BUFFER_BYTES: usize = 8 << 20;

struct TopicState {
    /// Some while the node fills a gap in this topic's deliveries from history.
    recovering: Option<Recovering>,
    /// The epoch of what this node delivered: a message of another one means the stream
    /// restarted (Redis lost it), see `restart`.
    epoch: Option<Arc<str>>,
    /// The newest offset handed to the hub for this topic.
    last_delivered: u64,
    /// Local subscribers, joined and pending: the Redis subscription lives while > 0.
    locals: usize,
    pending: HashMap<u64, (Arc<Client>, Pending)>,
}

struct Topic {
    state: Mutex<TopicState>,
    ready: watch::Receiver<Option<Result<(), String>>>,
}

/// How often `fill_gaps` tries a failed history read (200 ms apart) before giving up.
const GAP_READ_ATTEMPTS: u32 = 25;

pub struct RedisBroker {
    client: redis::Client,
    cfg: Config,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    conn: ConnectionManager,
    publish_script: Script,
    read_script: Script,
    /// Topics with local subscribers. A leaf lock except for the control queue push.
    topics: Mutex<HashMap<TopicName, Arc<Topic>>>,
    /// Per client, the topics it entered and has not left (joined or pending), so a client
    /// that goes away leaves exactly those instead of scanning every topic. Bounded by
    /// `max_topics_per_connection` per client. A leaf lock.
    entered: Mutex<HashMap<u64, Vec<TopicName>>>,
    /// Bounded by the subscriptions in flight: each entry follows a topic gaining its first
    /// or losing its last local subscriber.
    control: mpsc::UnboundedSender<Control>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    health: Arc<RedisHealth>,
}

impl Drop for RedisBroker {
    fn drop(&mut self) {
        for t in self.tasks.lock().iter() {
            t.abort();
        }
    }
}
impl RedisBroker {
    /// Connects (one command connection, one pub/sub connection) and starts the task that
    /// serves the subscriptions.
    pub async fn connect(
        cfg: &Config,
        url: &str,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<RedisBroker>, redis::RedisError> {
        // The CA only means something to a TLS connection.
        let client = if cfg.redis_ca.is_empty() || !url.starts_with("rediss://") {
            redis::Client::open(url)?
        } else {
            let root = std::fs::read(&cfg.redis_ca).map_err(|e| {
                redis::RedisError::from((
                    redis::ErrorKind::InvalidClientConfig,
                    "cannot read redis_ca",
                    format!("{}: {e}", cfg.redis_ca),
                ))
            })?;
            let certs = redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(root),
            };
            redis::Client::build_with_tls(url, certs)?
        };
        // Start-up is bounded too: a Redis that never answers (or a TLS handshake that
        // never completes) fails the start instead of hanging it.
        let bounded = |what: &'static str| {
            move |_| redis::RedisError::from((redis::ErrorKind::IoError, what, String::new()))
        };
        let conn = tokio::time::timeout(
            cfg.redis_timeout * 3,
            client.get_connection_manager_with_config(
                redis::aio::ConnectionManagerConfig::new()
                    .set_response_timeout(cfg.redis_timeout)
                    .set_connection_timeout(cfg.redis_timeout)
                    // The crate's default backoff between reconnect attempts grows from
                    // 1 s to 60 s (and more with jitter): after Redis comes back a node
                    // would stay unable to publish for up to two minutes. Capped at 1 s,
                    // it is back within about 2 s.
                    .set_max_delay(1000)
                    .set_number_of_retries(2),
            ),
        )
        .await
        .map_err(bounded("no answer within 3 x redis_timeout"))??;
        let pubsub = tokio::time::timeout(cfg.redis_timeout, client.get_async_pubsub())
            .await
            .map_err(bounded("no pub/sub connection within redis_timeout"))??;
        let (control, rx) = mpsc::unbounded_channel();
        let timeout = cfg.redis_timeout;
        let node = format!("{:016x}", rand::random::<u64>());
        tracing::info!(node = %node, "joined redis as crier node {node}");
        let health = Arc::new(RedisHealth::new(node, timeout, metrics.clone()));
        let broker = Arc::new(RedisBroker {
            client: client.clone(),
            cfg: cfg.clone(),
            hub,
            metrics,
            conn,
            publish_script: Script::new(PUBLISH),
            read_script: Script::new(READ),
            topics: Mutex::new(HashMap::new()),
            entered: Mutex::new(HashMap::new()),
            control,
            tasks: Mutex::new(Vec::new()),
            health: health.clone(),
        });
        // Spawned once the broker exists: the task's first look at the topic table must
        // find it, or it would take the broker for gone and stop.
        let me = Arc::downgrade(&broker);
        let task = tokio::spawn(run_pubsub(client.clone(), pubsub, me, rx, timeout));
        let monitor = tokio::spawn(health::monitor(
            Arc::downgrade(&health),
            broker.conn.clone(),
        ));
        let keeper = tokio::spawn(keep_topics_alive(Arc::downgrade(&broker)));
        broker.tasks.lock().extend([task, monitor, keeper]);
        Ok(broker)
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// This process's random id among the nodes sharing the Redis, made at connect.
    pub fn node_id(&self) -> &str {
        self.health.node()
    }

    /// What `/readyz` and the metrics report about Redis.
    pub fn health(&self) -> Arc<RedisHealth> {
        self.health.clone()
    }

    /// The configured client (TLS roots included), for the node's other Redis users that
    /// need their own pub/sub connection (the boards' mirror).
    pub fn client(&self) -> redis::Client {
        self.client.clone()
    }

    /// A command connection to the same Redis (cheap: it is shared), for the node's other
    /// Redis users (cluster counts, boards).
    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    fn topic_ttl_ms(&self) -> u64 {
        (self.cfg.redis_topic_ttl.as_millis() as u64).max(1)
    }

    /// Fails at once while the health monitor knows Redis is down, rather than letting the
    /// request wait out `redis_timeout`.
    fn check_up(&self) -> Result<(), BrokerError> {
        match self.health.refuse() {
            Some(why) => Err(BrokerError::Unavailable(why)),
            None => Ok(()),
        }
    }

    /// A failed command: counted, and told apart when its outcome is unknown.
    fn failed(&self, e: redis::RedisError) -> BrokerError {
        self.health.record_error();
        unavailable(e)
    }

    /// A publication from the topic's channel: `offset:epoch:data`.
    fn on_message(&self, channel: &str, payload: &[u8]) {
        let Some(name) = topic_of(channel) else {
            return;
        };
        // The table's own name: the publication shares it instead of allocating one.
        let Some((name, topic)) = self
            .topics
            .lock()
            .get_key_value(name)
            .map(|(n, t)| (n.clone(), t.clone()))
        else {
            return;
        };
        let mut parts = payload.splitn(3, |&b| b == b':');
        let (Some(offset), Some(epoch), Some(data)) = (parts.next(), parts.next(), parts.next())
        else {
            tracing::warn!(channel, "malformed message on a crier channel");
            return;
        };
        let Some(offset) = std::str::from_utf8(offset)
            .ok()
            .and_then(|o| o.parse::<u64>().ok())
        else {
            return;
        };
        let epoch = String::from_utf8_lossy(epoch);
        let mut to_wake = Vec::new();
        let mut st = topic.state.lock();
        if let Some(rec) = &mut st.recovering {
            rec.bytes += data.len();
            if rec.bytes <= RECOVERY_BUFFER_BYTES {
                rec.buffered
                    .push((offset, epoch.into(), bytes::Bytes::copy_from_slice(data)));
                return;
            }
            tracing::warn!(
                topic = &*name,
                "gap fill too slow: closing the topic's subscribers"
            );
            st.recovering = None;
            self.give_up(&mut st, &name);
        }
        self.deliver_locked(&mut st, &name, offset, &epoch, data, &mut to_wake);
        drop(st);
        for c in to_wake {
            c.wake();
        }
    }

    /// Hands one publication of the topic's stream to its local subscribers (joined and
    /// pending), in offset order; the topic's lock is held by the caller.
    /// Per message: the epoch is compared in place and only copied when it changes.
    fn deliver_locked(
        &self,
        st: &mut TopicState,
        name: &TopicName,
        offset: u64,
        epoch: &str,
        data: &[u8],
        to_wake: &mut Vec<Arc<Client>>,
    ) {
        match &st.epoch {
            Some(e) if **e != *epoch => self.restart(st, name, epoch.into()),
            Some(_) => {}
            None => st.epoch = Some(epoch.into()),
        }
        if offset <= st.last_delivered {
            return;
        }
        let p = Arc::new(Publication::new(name.clone(), offset, data));
        st.last_delivered = offset;
        self.hub.deliver(&p, false, to_wake);
        let mut joined = Vec::new();
        for (id, (client, pending)) in st.pending.iter_mut() {
            match pending {
                Pending::Buffering(buf, bytes) => {
                    *bytes += p.cost();
                    if *bytes > client.budget() {
                        // The history read took longer than its queue could wait.
                        client.close(crate::close::DisconnectReason::SlowConsumer);
                    } else {
                        buf.push(p.clone());
                    }
                }
                Pending::CatchingUp(upto) => {
                    if offset > *upto {
                        let item = Item::publication(&p, p.wire(client.transport), false, true);
                        client.push(item, &self.metrics);
                    }
                    if offset >= *upto {
                        joined.push(*id);
                    }
                }
            }
        }
        for id in joined {
            if let Some((client, _)) = st.pending.remove(&id) {
                self.hub.join(&client, &p.topic, offset);
            }
        }
    }

    /// What this node delivered of the topic can no longer be continued exactly: its local
    /// subscribers, joined and pending, are closed and resume from history themselves (on
    /// any node), which tells them `recovered:false` if the gap is gone from history too.
    fn give_up(&self, st: &mut TopicState, name: &str) {
        let reason = crate::close::DisconnectReason::StreamRestarted;
        self.hub.restart(name, reason);
        for (client, _) in st.pending.values() {
            client.close(reason);
        }
    }

    /// The topic's stream restarted under a new epoch (Redis lost it: a restart without
    /// persistence, a flush). Offsets begin again at 1, so what this node delivered says
    /// nothing about them: every local subscriber is closed (they resume, and hear
    /// `recovered:false`) and delivery starts over. Never silent loss.
    fn restart(&self, st: &mut TopicState, name: &str, epoch: Arc<str>) {
        tracing::warn!(topic = name, %epoch, "topic stream restarted under a new epoch");
        self.give_up(st, name);
        st.epoch = Some(epoch);
        st.last_delivered = 0;
    }

    fn topic_names(&self) -> Vec<TopicName> {
        self.topics.lock().keys().cloned().collect()
    }

    /// The pub/sub connection was lost: every topic may miss publications until it is
    /// back. Clients stay connected; each topic buffers what arrives after the new
    /// subscription and, once subscribed again, fills the gap from history
    /// ([`Self::fill_gaps`]).
    fn lost_pubsub(&self) {
        self.health.set_subscribed(false);
        let topics: Vec<Arc<Topic>> = self.topics.lock().values().cloned().collect();
        for topic in topics {
            let mut st = topic.state.lock();
            if st.recovering.is_none() {
                st.recovering = Some(Recovering {
                    buffered: Vec::new(),
                    bytes: 0,
                });
            }
        }
    }

    /// Every topic subscribed again after a lost pub/sub connection: reads what was
    /// published meanwhile (after the last offset this node delivered) and delivers it,
    /// then what arrived during the read. If history no longer holds the gap (trimmed,
    /// expired, or Redis lost the stream), the topic's subscribers are closed and resume
    /// on their own, hearing `recovered:false`. One read per topic, bounded by its
    /// `history_size`.
    async fn fill_gaps(self: Arc<Self>) {
        let topics: Vec<(TopicName, Arc<Topic>)> = self
            .topics
            .lock()
            .iter()
            .map(|(n, t)| (n.clone(), t.clone()))
            .collect();
        for (name, topic) in topics {
            let (from, epoch) = {
                let st = topic.state.lock();
                if st.recovering.is_none() {
                    continue;
                }
                (st.last_delivered, st.epoch.clone())
            };
            let ns = self.cfg.namespace(&name);
            let read = match &epoch {
                Some(_) => Some(self.read_gap(&name, from + 1, ns.history_size).await),
                None => None,
            };
            let ttl_ms = ns.history_ttl.as_millis() as u64;
            let mut to_wake = Vec::new();
            let mut st = topic.state.lock();
            let Some(rec) = st.recovering.take() else {
                continue;
            };
            let filled = match (read, epoch) {
                (Some(Ok(read)), Some(epoch)) => {
                    let since = StreamPosition {
                        offset: from,
                        epoch,
                    };
                    match continues(&read, &since, ttl_ms) {
                        Some(entries) => {
                            for e in entries {
                                self.deliver_locked(
                                    &mut st,
                                    &name,
                                    e.offset,
                                    &read.epoch,
                                    &e.data,
                                    &mut to_wake,
                                );
                            }
                            true
                        }
                        None => false,
                    }
                }
                _ => false,
            };
            if !filled {
                tracing::warn!(topic = %name, "a gap in deliveries is not in history: closing the topic's subscribers");
                self.give_up(&mut st, &name);
                // Whatever comes next starts this node's deliveries of the topic afresh.
                st.epoch = None;
                st.last_delivered = 0;
            }
            for (offset, epoch, data) in rec.buffered {
                self.deliver_locked(&mut st, &name, offset, &epoch, &data, &mut to_wake);
            }
            drop(st);
            for c in to_wake {
                c.wake();
            }
        }
    }

    /// The history read of `fill_gaps`. The pub/sub connection often comes back before the
    /// command connection does (it reconnects on its own schedule): a failed read is tried
    /// again for a while, so a Redis restart does not close subscribers whose gap history
    /// still holds. Only an answer that lacks the gap closes them.
    async fn read_gap(&self, name: &str, from: u64, count: usize) -> Result<Read, BrokerError> {
        let mut attempt = 0;
        loop {
            match self.read(name, false, Some(from), count).await {
                Err(e) if attempt < GAP_READ_ATTEMPTS => {
                    attempt += 1;
                    tracing::debug!(topic = name, "reading a gap failed, trying again: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
                r => return r,
            }
        }
    }

    /// The topic's entry, created (and its Redis subscription asked for) on first use; the
    /// client is counted as a pending local subscriber.
    fn enter(&self, client: &Arc<Client>, name: &str) -> Result<Arc<Topic>, BrokerError> {
        let mut topics = self.topics.lock();
        if topics.len() >= self.cfg.max_topics && !topics.contains_key(name) {
            self.metrics.topics_refused.inc();
            return Err(BrokerError::TooManyTopics(crate::hub::TopicLimit::All(
                self.cfg.max_topics,
            )));
        }
        let topic = topics
            .entry(TopicName::from(name))
            .or_insert_with(|| {
                let (tx, rx) = watch::channel(None);
                let _ = self.control.send(Control::Subscribe(channel(name), tx));
                Arc::new(Topic {
                    state: Mutex::new(TopicState {
                        recovering: None,
                        epoch: None,
                        last_delivered: 0,
                        locals: 0,
                        pending: HashMap::new(),
                    }),
                    ready: rx,
                })
            })
            .clone();
        let mut st = topic.state.lock();
        st.locals += 1;
        st.pending.insert(
            client.id,
            (client.clone(), Pending::Buffering(Vec::new(), 0)),
        );
        drop(st);
        drop(topics);
        let mut entered = self.entered.lock();
        let names = entered.entry(client.id).or_default();
        if !names.iter().any(|n| &**n == name) {
            names.push(TopicName::from(name));
        }
        drop(entered);
        Ok(topic)
    }

    /// Takes one local subscriber (joined or pending) off the topic; the last one drops the
    /// node's Redis subscription.
    fn leave(&self, client: &Arc<Client>, name: &str) -> bool {
        {
            let mut entered = self.entered.lock();
            if let Some(names) = entered.get_mut(&client.id) {
                names.retain(|n| &**n != name);
                if names.is_empty() {
                    entered.remove(&client.id);
                }
            }
        }
        let mut topics = self.topics.lock();
        let Some(topic) = topics.get(name).cloned() else {
            return self.hub.leave(client, name);
        };
        let mut st = topic.state.lock();
        let held = self.hub.leave(client, name);
        let pending = st.pending.remove(&client.id).is_some();
        if held || pending {
            st.locals -= 1;
            if st.locals == 0 {
                topics.remove(name);
                let _ = self.control.send(Control::Unsubscribe(channel(name)));
            }
        }
        held
    }

    async fn read(
        &self,
        topic: &str,
        create: bool,
        from: Option<u64>,
        count: usize,
    ) -> Result<Read, BrokerError> {
        let epoch = if create { new_epoch() } else { "".into() };
        let from = from.map(|o| format!("{o}-0")).unwrap_or_default();
        let v: Value = self
            .timed(
                self.read_script
                    .key(key(topic, "m"))
                    .key(key(topic, "s"))
                    .arg(&*epoch)
                    .arg(from)
                    .arg(count.max(1))
                    .arg(self.topic_ttl_ms())
                    .invoke_async(&mut self.conn.clone()),
            )
            .await
            .map_err(|e| self.failed(e))?;
        parse_read(v).ok_or_else(|| BrokerError::Unavailable("redis: unexpected reply".into()))
    }

    /// A command's answer within `redis_timeout`. The response timeout alone is not
    /// enough: while the connection manager reconnects, a command waits for the reconnect
    /// attempt, with its backoff, before it is even sent. Redis down must fail fast (503),
    /// not hang the request. A command that timed out may still run later: callers treat
    /// it as sent.
    async fn timed<T>(
        &self,
        command: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> redis::RedisResult<T> {
        tokio::time::timeout(self.cfg.redis_timeout, command)
            .await
            .unwrap_or_else(|_| {
                Err(redis::RedisError::from((
                    redis::ErrorKind::IoError,
                    "timed out",
                )))
            })
    }

    fn pending_gone(&self, client: &Arc<Client>, name: &str) -> BrokerError {
        self.leave(client, name);
        if client.closed().is_some() {
            BrokerError::ClientClosed
        } else {
            BrokerError::Unavailable("subscription interrupted".into())
        }
    }
}

#[async_trait::async_trait]
impl Broker for RedisBroker {
    async fn publish(&self, req: PublishRequest<'_>) -> Result<Receipt, BrokerError> {
        if let Some(why) = self.health.refuse_publish() {
            return Err(BrokerError::Unavailable(why));
        }
        let ns = self.cfg.namespace(req.topic);
        let (idem_key, window) = match req.idempotency_key {
            Some(k) => (
                key(req.topic, &format!("i:{k}")),
                self.cfg.idempotency_window.as_millis().max(1),
            ),
            None => (key(req.topic, "m"), 0),
        };
        let (fresh, receipt, cluster): (u8, String, i64) = self
            .timed(
                self.publish_script
                    .key(key(req.topic, "m"))
                    .key(key(req.topic, "s"))
                    .key(idem_key)
                    .key(crate::broker::cluster_counts::key(req.topic))
                    .arg(req.data)
                    .arg(ns.history_size)
                    .arg(ns.history_ttl.as_millis().max(1) as u64)
                    .arg(channel(req.topic))
                    .arg(&*new_epoch())
                    .arg(window as u64)
                    .arg(self.topic_ttl_ms())
                    .invoke_async(&mut self.conn.clone()),
            )
            .await
            .map_err(|e| {
                if e.is_connection_refusal() {
                    self.failed(e)
                } else {
                    // Sent, perhaps: Redis may run the script after we stopped waiting.
                    self.health.record_error();
                    BrokerError::Unavailable(format!(
                        "redis did not confirm the publish ({e}): it may or may not have \
                         been published; retry with the same Idempotency-Key, which returns \
                         the first receipt if it was"
                    ))
                }
            })?;
        let (offset, epoch) = receipt
            .split_once(':')
            .and_then(|(o, e)| Some((o.parse().ok()?, e)))
            .ok_or_else(|| BrokerError::Unavailable("redis: unexpected receipt".into()))?;
        if fresh == 0 {
            self.metrics.idempotent_replays.inc();
        }
        Ok(Receipt {
            offset,
            epoch: epoch.into(),
            subscribers: usize::try_from(cluster)
                .unwrap_or_else(|_| self.hub.subscriber_count(req.topic)),
            duplicate: fresh == 0,
        })
    }

    /// Resume needs the Redis subscription and a history read: see
    /// [`Broker::subscribe_async`].
    fn subscribe(
        &self,
        _client: &Arc<Client>,
        _topic: &str,
        _since: Option<&StreamPosition>,
        _ack: Ack<'_>,
    ) -> Result<Subscribed, BrokerError> {
        Err(BrokerError::Unavailable(
            "the redis broker subscribes asynchronously".into(),
        ))
    }

    fn subscribe_waits(&self) -> bool {
        true
    }

    async fn subscribe_async(
        &self,
        client: &Arc<Client>,
        name: &str,
        since: Option<&StreamPosition>,
        ack: Ack<'_>,
    ) -> Result<Subscribed, BrokerError> {
        self.check_up()?;
        let already = self.hub.admit(client, name)?;
        if already {
            // Held: repeat the acknowledgement with the current position only.
            let read = self.read(name, true, None, 0).await?;
            let sub = Subscribed {
                position: StreamPosition {
                    offset: read.offset,
                    epoch: read.epoch,
                },
                recovered: None,
            };
            if let Some(bytes) = ack(&sub) {
                client.push(Item::control(bytes), &self.metrics);
            }
            return Ok(sub);
        }
        let topic = self.enter(client, name)?;
        let mut ready = topic.ready.clone();
        let confirmed = tokio::time::timeout(self.cfg.redis_timeout, async {
            ready.wait_for(|r| r.is_some()).await.ok().and_then(|r| {
                r.as_ref()
                    .map(|r| r.clone().map_err(BrokerError::Unavailable))
            })
        })
        .await
        .unwrap_or_else(|_| {
            Some(Err(BrokerError::Unavailable(
                "redis: subscribe timed out".into(),
            )))
        });
        match confirmed {
            Some(Ok(())) => {}
            Some(Err(e)) => {
                self.leave(client, name);
                return Err(e);
            }
            None => return Err(self.pending_gone(client, name)),
        }
        let ns = self.cfg.namespace(name);
        let read = match since {
            Some(s) => {
                self.read(name, true, Some(s.offset + 1), ns.history_size)
                    .await
            }
            None => self.read(name, true, None, 0).await,
        };
        let read = match read {
            Ok(r) => r,
            Err(e) => {
                self.leave(client, name);
                return Err(e);
            }
        };
        let position = StreamPosition {
            offset: read.offset,
            epoch: read.epoch.clone(),
        };
        let ttl_ms = ns.history_ttl.as_millis() as u64;
        let replay: Option<Vec<Arc<Publication>>> = since
            .and_then(|s| continues(&read, s, ttl_ms))
            .map(|entries| {
                entries
                    .into_iter()
                    .map(|e| Arc::new(Publication::new(TopicName::from(name), e.offset, &e.data)))
                    .collect()
            })
            .filter(|ps: &Vec<Arc<Publication>>| {
                let bytes: usize = ps.iter().map(|p| p.wire(client.transport).len()).sum();
                bytes <= client.budget() / 2
            });
        let sub = Subscribed {
            position,
            recovered: since.map(|_| replay.is_some()),
        };
        let mut st = topic.state.lock();
        let Some((_, Pending::Buffering(buffered, _))) = st.pending.remove(&client.id) else {
            drop(st);
            return Err(self.pending_gone(client, name));
        };
        match &st.epoch {
            // The stream restarted between the read and now (or before it): which side is
            // newer is unknown, so this subscriber starts again, like the others.
            Some(e) if *e != read.epoch => {
                client.close(crate::close::DisconnectReason::StreamRestarted);
                drop(st);
                return Err(self.pending_gone(client, name));
            }
            Some(_) => {}
            None => st.epoch = Some(read.epoch.clone()),
        }
        if let Some(bytes) = ack(&sub) {
            client.push(Item::control(bytes), &self.metrics);
        }
        for p in replay.iter().flatten() {
            client.push(
                Item::publication(p, p.wire(client.transport), false, false),
                &self.metrics,
            );
        }
        if st.last_delivered >= read.offset {
            for p in buffered.iter().filter(|p| p.offset > read.offset) {
                client.push(
                    Item::publication(p, p.wire(client.transport), false, true),
                    &self.metrics,
                );
            }
            let at = st.last_delivered;
            self.hub.join(client, &TopicName::from(name), at);
        } else {
            st.pending.insert(
                client.id,
                (client.clone(), Pending::CatchingUp(read.offset)),
            );
        }
        drop(st);
        self.metrics.record_resume(sub.recovered);
        if client.closed().is_some() {
            self.leave(client, name);
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
        // Subscriptions still pending are not in the hub yet.
        let entered = self.entered.lock().remove(&client.id).unwrap_or_default();
        for name in entered {
            self.leave(client, &name);
        }
    }

    async fn history(
        &self,
        topic: &str,
        since: Option<&StreamPosition>,
        limit: usize,
    ) -> Result<History, BrokerError> {
        let ttl_ms = self.cfg.namespace(topic).history_ttl.as_millis() as u64;
        let from = since.map(|s| s.offset + 1).unwrap_or(0);
        let read = self.read(topic, false, Some(from), limit).await?;
        let fresh = |e: &&Entry| read.now_ms.saturating_sub(e.ms) <= ttl_ms;
        let recovered = match since {
            None => true,
            Some(s) => {
                let epoch = if s.epoch.is_empty() {
                    read.epoch.clone()
                } else {
                    s.epoch.clone()
                };
                !read.epoch.is_empty()
                    && epoch == read.epoch
                    && s.offset <= read.offset
                    && (s.offset == read.offset
                        || read
                            .entries
                            .iter()
                            .find(|e| fresh(e))
                            .is_some_and(|e| e.offset == s.offset + 1))
            }
        };
        let entries: Vec<&Entry> = if recovered {
            read.entries.iter().filter(fresh).collect()
        } else {
            // Not recoverable: the page starts at the oldest publication kept.
            Vec::new()
        };
        let mut publications: Vec<Arc<Publication>> = entries
            .into_iter()
            .map(|e| Arc::new(Publication::new(TopicName::from(topic), e.offset, &e.data)))
            .collect();
        if !recovered && !read.epoch.is_empty() {
            let oldest = self.read(topic, false, Some(0), limit).await?;
            publications = oldest
                .entries
                .iter()
                .filter(|e| oldest.now_ms.saturating_sub(e.ms) <= ttl_ms)
                .map(|e| Arc::new(Publication::new(TopicName::from(topic), e.offset, &e.data)))
                .collect();
        }
        Ok(History {
            position: StreamPosition {
                offset: read.offset,
                epoch: read.epoch,
            },
            recovered,
            publications,
        })
    }
}

/// Refreshes the topic TTL of every topic this node holds subscribers of, every third of
/// it, so a topic someone listens to never expires between publishes. One pipeline of
/// `PEXPIRE`s per thousand topics; the table is bounded by `max_topics`.
async fn keep_topics_alive(me: std::sync::Weak<RedisBroker>) {
    let every = match me.upgrade() {
        Some(b) => (b.cfg.redis_topic_ttl / 3).max(std::time::Duration::from_millis(100)),
        None => return,
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(broker) = me.upgrade() else { return };
        if broker.health.refuse_publish().is_some() {
            continue;
        }
        let names = broker.topic_names();
        let ttl = broker.topic_ttl_ms();
        let mut conn = broker.conn.clone();
        let timeout = broker.cfg.redis_timeout;
        for chunk in names.chunks(1000) {
            let mut pipe = redis::pipe();
            for name in chunk {
                pipe.cmd("PEXPIRE").arg(key(name, "m")).arg(ttl).ignore();
            }
            let sent = tokio::time::timeout(timeout, pipe.query_async::<()>(&mut conn)).await;
            if !matches!(sent, Ok(Ok(()))) {
                broker.health.record_error();
                break;
            }
        }
    }
}
