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
//!   per client), all on one pub/sub connection ([`Broker::subscribe_topic`] counts them;
//!   the first confirms the channel subscription, the last drops it). Subscribe and
//!   unsubscribe commands go through one ordered task, so an unsubscribe can never overtake
//!   the subscribe that follows it. Messages arrive in publish order (Redis runs scripts
//!   one at a time, one connection delivers them) and are handed to the hub, the broker's
//!   sink, which checks that each is the very next offset.
//! - **Subscribe with resume** is the node's one merge (`subscribe.rs`): this broker
//!   confirms the channel subscription, then reads the position and history in one script
//!   (atomic, [`Broker::replay`]); everything published after that read reaches the node's
//!   pub/sub connection.
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
//! the clients: the node reconnects, subscribes again and tells the hub that every topic
//! may have missed publications; the hub fills each gap from history (however often the
//! connection flaps), and only a gap history no longer holds closes a topic's
//! subscribers. A message in another epoch (Redis lost the stream) closes them too.

mod health;
mod presence;
mod presence_scripts;
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
    Broker, BrokerError, BrokerSink, History, Identity, PresencePage, PresenceStats,
    PublishRequest, Receipt, Replay, StreamPosition,
};
use crate::config::Config;
use crate::hub::Wakeups;
use crate::metrics::Metrics;
use crate::publication::Publication;
use crate::topic::TopicName;

/// A topic with local subscribers.
struct Topic {
    /// Local subscriptions: the node's channel subscription lives while > 0.
    locals: usize,
    /// Whether the channel subscription was confirmed.
    ready: watch::Receiver<Option<Result<(), String>>>,
}

pub struct RedisBroker {
    client: redis::Client,
    cfg: Config,
    hub: Arc<dyn BrokerSink>,
    metrics: Arc<Metrics>,
    conn: ConnectionManager,
    publish_script: Script,
    read_script: Script,
    /// Topics with local subscribers. A leaf lock except for the control queue push.
    topics: Mutex<HashMap<TopicName, Topic>>,
    /// Bounded by the subscriptions in flight: each entry follows a topic gaining its first
    /// or losing its last local subscriber.
    control: mpsc::UnboundedSender<Control>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    health: Arc<RedisHealth>,
    /// Presence for the whole cluster, kept in Redis (`presence.rs`).
    presence: Arc<presence::ClusterPresence>,
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
        hub: Arc<dyn BrokerSink>,
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
                    // One connection attempt per reconnect, no backoff between retries:
                    // every command issued while the manager reconnects waits for that
                    // reconnect, so retries with backoff (the crate's default, 1 s to 60 s)
                    // made publishes wait out `redis_timeout` for the first seconds of an
                    // outage whenever subscriptions and resumes kept the manager
                    // reconnecting (issue 15). A refused connection now answers at once;
                    // the health monitor probes a down Redis every 100 ms, so the node
                    // is back within about that once Redis answers.
                    .set_number_of_retries(0),
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
        let (presence, presence_tasks) =
            presence::ClusterPresence::start(cfg, conn.clone(), health.clone(), hub.clone())
                .await?;
        let broker = Arc::new(RedisBroker {
            client: client.clone(),
            cfg: cfg.clone(),
            hub,
            metrics,
            conn,
            publish_script: Script::new(PUBLISH),
            read_script: Script::new(READ),
            topics: Mutex::new(HashMap::new()),
            control,
            tasks: Mutex::new(Vec::new()),
            health: health.clone(),
            presence,
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
        broker.tasks.lock().extend(presence_tasks);
        Ok(broker)
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

    /// A publication from the topic's channel: `offset:epoch:data`, for the hub.
    fn on_message(&self, channel: &str, payload: &[u8]) {
        let Some(name) = topic_of(channel) else {
            return;
        };
        // The table's own name: the publication shares it instead of allocating one.
        let Some(name) = self
            .topics
            .lock()
            .get_key_value(name)
            .map(|(n, _)| n.clone())
        else {
            return;
        };
        if payload.first() == Some(&b'p') {
            self.presence.on_notice(&*self.hub, &name, payload);
            return;
        }
        let mut parts = payload.splitn(3, |&b| b == b':');
        let (Some(offset), Some(epoch), Some(data)) = (parts.next(), parts.next(), parts.next())
        else {
            tracing::warn!(channel, "malformed message on a crier channel");
            return;
        };
        let (Some(offset), Ok(epoch)) = (
            std::str::from_utf8(offset)
                .ok()
                .and_then(|o| o.parse::<u64>().ok()),
            std::str::from_utf8(epoch),
        ) else {
            return;
        };
        let p = Arc::new(Publication::new(name, offset, data));
        let mut wake = Wakeups::default();
        self.hub.deliver(&p, epoch, false, &mut wake);
        wake.wake();
    }

    fn topic_names(&self) -> Vec<TopicName> {
        self.topics.lock().keys().cloned().collect()
    }

    /// The pub/sub connection was lost: nothing published meanwhile arrives until it is
    /// back (`resubscribed`).
    fn lost_pubsub(&self) {
        self.health.set_subscribed(false);
    }

    /// Every topic is subscribed again after a lost pub/sub connection: each may have
    /// missed publications, which the hub reads from history.
    fn resubscribed(&self) {
        for name in self.topic_names() {
            self.hub.may_have_missed(&name);
        }
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

    async fn subscribe_topic(&self, name: &str) -> Result<(), BrokerError> {
        self.check_up()?;
        let mut ready = {
            let mut topics = self.topics.lock();
            if topics.len() >= self.cfg.max_topics && !topics.contains_key(name) {
                self.metrics.topics_refused.inc();
                return Err(BrokerError::TooManyTopics(crate::hub::TopicLimit::All(
                    self.cfg.max_topics,
                )));
            }
            let topic = topics.entry(TopicName::from(name)).or_insert_with(|| {
                let (tx, rx) = watch::channel(None);
                let _ = self.control.send(Control::Subscribe(channel(name), tx));
                Topic {
                    locals: 0,
                    ready: rx,
                }
            });
            topic.locals += 1;
            topic.ready.clone()
        };
        let confirmed = tokio::time::timeout(self.cfg.redis_timeout, async {
            match ready.wait_for(|r| r.is_some()).await {
                Ok(r) => r.clone().expect("waited for Some"),
                Err(_) => Err("subscription interrupted".into()),
            }
        })
        .await
        .unwrap_or_else(|_| Err("redis: subscribe timed out".into()));
        confirmed.map_err(|e| {
            self.unsubscribe_topic(name);
            BrokerError::Unavailable(e)
        })
    }

    fn unsubscribe_topic(&self, name: &str) {
        let mut topics = self.topics.lock();
        let Some(topic) = topics.get_mut(name) else {
            return;
        };
        topic.locals -= 1;
        if topic.locals == 0 {
            topics.remove(name);
            let _ = self.control.send(Control::Unsubscribe(channel(name)));
        }
    }

    async fn replay(
        &self,
        name: &str,
        since: Option<&StreamPosition>,
        max_bytes: usize,
    ) -> Result<Replay, BrokerError> {
        let ns = self.cfg.namespace(name);
        let read = match since {
            Some(s) => {
                self.read(name, true, Some(s.offset + 1), ns.history_size)
                    .await?
            }
            None => self.read(name, true, None, 0).await?,
        };
        let ttl_ms = ns.history_ttl.as_millis() as u64;
        let mut publications = Vec::new();
        let recovered = since.map(|s| {
            let Some(entries) = continues(&read, s, ttl_ms) else {
                return false;
            };
            let bytes: usize = entries.iter().map(|e| e.data.len() + 40).sum();
            if bytes > max_bytes {
                return false;
            }
            publications = entries
                .into_iter()
                .map(|e| Arc::new(Publication::new(TopicName::from(name), e.offset, &e.data)))
                .collect();
            true
        });
        Ok(Replay {
            position: StreamPosition {
                offset: read.offset,
                epoch: read.epoch,
            },
            recovered,
            publications,
            retained: None,
        })
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

    async fn presence_join(&self, topic: &str, client: u64, who: &Identity) {
        self.presence.join(topic, client, who).await
    }

    fn presence_leave(&self, topic: &str, client: u64) {
        self.presence.leave(topic, client)
    }

    async fn presence(
        &self,
        topic: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<PresencePage, BrokerError> {
        self.presence.members(topic, after, limit).await
    }

    async fn presence_stats(&self, topic: &str) -> Result<PresenceStats, BrokerError> {
        self.presence.stats(topic).await
    }

    fn member_id(&self, _topic: &str, client: u64) -> u64 {
        self.presence.member_id(client)
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
