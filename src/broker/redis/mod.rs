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
//! Not yet here (docs/redis-status.md): retained state topics (leaderboards), failure
//! handling (Redis down, a pub/sub connection cut: today a node stops delivering),
//! cluster-wide subscriber counts.

mod pubsub;
mod scripts;

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

struct TopicState {
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

pub struct RedisBroker {
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
        let client = redis::Client::open(url)?;
        let conn = client
            .get_connection_manager_with_config(
                redis::aio::ConnectionManagerConfig::new()
                    .set_response_timeout(cfg.redis_timeout)
                    .set_connection_timeout(cfg.redis_timeout),
            )
            .await?;
        let pubsub = client.get_async_pubsub().await?;
        let (control, rx) = mpsc::unbounded_channel();
        let timeout = cfg.redis_timeout;
        let broker = Arc::new(RedisBroker {
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
        });
        // Spawned once the broker exists: the task's first look at the topic table must
        // find it, or it would take the broker for gone and stop.
        let me = Arc::downgrade(&broker);
        let task = tokio::spawn(run_pubsub(client, pubsub, me, rx, timeout));
        broker.tasks.lock().push(task);
        Ok(broker)
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// A publication from the topic's channel: `offset:epoch:data`.
    fn on_message(&self, channel: &str, payload: &[u8]) {
        let Some(name) = topic_of(channel) else {
            return;
        };
        let Some(topic) = self.topics.lock().get(name).cloned() else {
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
        let p = Arc::new(Publication::new(TopicName::from(name), offset, data));
        let mut to_wake = Vec::new();
        let epoch = String::from_utf8_lossy(epoch);
        let mut st = topic.state.lock();
        match &st.epoch {
            Some(e) if **e != *epoch => self.restart(&mut st, name, epoch.into()),
            Some(_) => {}
            None => st.epoch = Some(epoch.into()),
        }
        if offset <= st.last_delivered {
            return;
        }
        st.last_delivered = offset;
        self.hub.deliver(&p, false, &mut to_wake);
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
        drop(st);
        for c in to_wake {
            c.wake();
        }
    }

    /// The topic's stream restarted under a new epoch (Redis lost it: a restart without
    /// persistence, a flush). Offsets begin again at 1, so what this node delivered says
    /// nothing about them: every local subscriber is closed (they resume, and hear
    /// `recovered:false`) and delivery starts over. Never silent loss.
    fn restart(&self, st: &mut TopicState, name: &str, epoch: Arc<str>) {
        tracing::warn!(topic = name, %epoch, "topic stream restarted under a new epoch");
        let reason = crate::close::DisconnectReason::Shutdown;
        self.hub.restart(name, reason);
        for (client, _) in st.pending.values() {
            client.close(reason);
        }
        st.epoch = Some(epoch);
        st.last_delivered = 0;
    }

    fn topic_names(&self) -> Vec<TopicName> {
        self.topics.lock().keys().cloned().collect()
    }

    /// The pub/sub connection was lost: every topic may have missed publications, so every
    /// local subscriber is closed and resumes from history.
    fn lost_pubsub(&self) {
        let topics: Vec<(TopicName, Arc<Topic>)> = self
            .topics
            .lock()
            .iter()
            .map(|(n, t)| (n.clone(), t.clone()))
            .collect();
        let reason = crate::close::DisconnectReason::Shutdown;
        for (name, topic) in topics {
            let st = topic.state.lock();
            self.hub.restart(&name, reason);
            for (client, _) in st.pending.values() {
                client.close(reason);
            }
        }
    }

    /// The topic's entry, created (and its Redis subscription asked for) on first use; the
    /// client is counted as a pending local subscriber.
    fn enter(&self, client: &Arc<Client>, name: &str) -> Arc<Topic> {
        let mut topics = self.topics.lock();
        let topic = topics
            .entry(TopicName::from(name))
            .or_insert_with(|| {
                let (tx, rx) = watch::channel(None);
                let _ = self.control.send(Control::Subscribe(channel(name), tx));
                Arc::new(Topic {
                    state: Mutex::new(TopicState {
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
        topic
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
            .read_script
            .key(key(topic, "m"))
            .key(key(topic, "s"))
            .arg(&*epoch)
            .arg(from)
            .arg(count.max(1))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        parse_read(v).ok_or_else(|| BrokerError::Unavailable("redis: unexpected reply".into()))
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
        let ns = self.cfg.namespace(req.topic);
        let (idem_key, window) = match req.idempotency_key {
            Some(k) => (
                key(req.topic, &format!("i:{k}")),
                self.cfg.idempotency_window.as_millis().max(1),
            ),
            None => (key(req.topic, "m"), 0),
        };
        let (fresh, receipt): (u8, String) = self
            .publish_script
            .key(key(req.topic, "m"))
            .key(key(req.topic, "s"))
            .key(idem_key)
            .arg(req.data)
            .arg(ns.history_size)
            .arg(ns.history_ttl.as_millis().max(1) as u64)
            .arg(channel(req.topic))
            .arg(&*new_epoch())
            .arg(window as u64)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
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
            subscribers: self.hub.subscriber_count(req.topic),
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
        let topic = self.enter(client, name);
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
                client.close(crate::close::DisconnectReason::Shutdown);
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
