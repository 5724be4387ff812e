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

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use bytes::Bytes;
use futures_util::StreamExt;
use parking_lot::Mutex;
use redis::aio::ConnectionManager;
use redis::{Script, Value};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

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

const PUBLISH: &str = r#"
local now = redis.call('TIME')
local ms = now[1] * 1000 + math.floor(now[2] / 1000)
if ARGV[6] ~= '0' then
  local prev = redis.call('GET', KEYS[3])
  if prev then return {0, prev} end
end
local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch then
  epoch = ARGV[5]
  redis.call('HSET', KEYS[1], 'e', epoch)
end
local offset = redis.call('HINCRBY', KEYS[1], 'o', 1)
if ARGV[2] ~= '0' then
  redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[2], offset .. '-0', 'd', ARGV[1], 't', ms)
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
local receipt = offset .. ':' .. epoch
if ARGV[6] ~= '0' then
  redis.call('SET', KEYS[3], receipt, 'PX', ARGV[6])
end
redis.call('PUBLISH', ARGV[4], receipt .. ':' .. ARGV[1])
return {1, receipt}
"#;

/// ARGV[1]: the epoch to create when the topic has none ('' creates nothing); ARGV[2]: the
/// first stream id to read ('' reads nothing); ARGV[3]: at most this many entries.
const READ: &str = r#"
local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch then
  if ARGV[1] == '' then
    epoch = ''
  else
    epoch = ARGV[1]
    redis.call('HSET', KEYS[1], 'e', epoch)
  end
end
local offset = redis.call('HGET', KEYS[1], 'o') or '0'
local now = redis.call('TIME')
local entries = {}
if ARGV[2] ~= '' then
  entries = redis.call('XRANGE', KEYS[2], ARGV[2], '+', 'COUNT', ARGV[3])
end
return {epoch, offset, now[1] * 1000 + math.floor(now[2] / 1000), entries}
"#;

fn key(topic: &str, what: &str) -> String {
    format!("crier:{{{topic}}}:{what}")
}

fn channel(topic: &str) -> String {
    key(topic, "c")
}

fn topic_of(channel: &str) -> Option<&str> {
    channel.strip_prefix("crier:{")?.strip_suffix("}:c")
}

fn unavailable(e: redis::RedisError) -> BrokerError {
    BrokerError::Unavailable(format!("redis: {e}"))
}

/// Subscribe and unsubscribe, in the order the topic table asked for them.
enum Control {
    Subscribe(String, watch::Sender<Option<Result<(), String>>>),
    Unsubscribe(String),
}

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
    /// Whether the pub/sub connection is up with every topic of the table subscribed. A
    /// topic's own `ready` says its first SUBSCRIBE was confirmed, possibly on a connection
    /// since lost: a subscriber must also see this, or it would be told "live" while
    /// nothing reaches the node.
    pubsub_up: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for RedisBroker {
    fn drop(&mut self) {
        for t in self.tasks.lock().iter() {
            t.abort();
        }
    }
}

/// One history entry read back: its offset, its data, its age stamp (Redis ms).
struct Entry {
    offset: u64,
    data: Bytes,
    ms: u64,
}

/// The answer of the read script.
struct Read {
    epoch: Arc<str>,
    offset: u64,
    now_ms: u64,
    entries: Vec<Entry>,
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
                    .set_connection_timeout(cfg.redis_timeout)
                    // The crate's default backoff between reconnect attempts grows from
                    // 1 s to 60 s (and more with jitter): after Redis comes back a node
                    // would stay unable to publish for up to two minutes. Capped at 1 s,
                    // it is back within about 2 s.
                    .set_max_delay(1000),
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
            pubsub_up: watch::Sender::new(true),
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
        // First, so a subscriber arriving from now on waits for the new connection; one
        // that arrived before is pending or joined, and closed below.
        self.pubsub_up.send_replace(false);
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
            .timed(
                self.read_script
                    .key(key(topic, "m"))
                    .key(key(topic, "s"))
                    .arg(&*epoch)
                    .arg(from)
                    .arg(count.max(1))
                    .invoke_async(&mut self.conn.clone()),
            )
            .await?;
        parse_read(v).ok_or_else(|| BrokerError::Unavailable("redis: unexpected reply".into()))
    }

    /// A command's answer within `redis_timeout`. The response timeout alone is not
    /// enough: while the connection manager reconnects, a command waits for the reconnect
    /// attempt, with its backoff, before it is even sent. Redis down must fail fast (503),
    /// not hang the request.
    async fn timed<T>(
        &self,
        command: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, BrokerError> {
        match tokio::time::timeout(self.cfg.redis_timeout, command).await {
            Ok(r) => r.map_err(unavailable),
            Err(_) => Err(BrokerError::Unavailable("redis: timed out".into())),
        }
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

/// Serves the node's one pub/sub connection: incoming messages, and subscribe and
/// unsubscribe in the order the topic table asked for them. When the connection is lost
/// (Redis down, `CLIENT KILL TYPE pubsub`, an output-buffer limit), whatever was published
/// meanwhile never arrives: every local subscriber is closed (it resumes, on this node or
/// another, from history), then the connection is made again with backoff and every topic
/// still in the table subscribed again.
async fn run_pubsub(
    client: redis::Client,
    first: redis::aio::PubSub,
    me: Weak<RedisBroker>,
    mut rx: mpsc::UnboundedReceiver<Control>,
    timeout: std::time::Duration,
) {
    let mut next = Some(first);
    let mut backoff = std::time::Duration::from_millis(100);
    loop {
        let pubsub = match next.take() {
            Some(p) => p,
            None => match tokio::time::timeout(timeout, client.get_async_pubsub()).await {
                Ok(Ok(p)) => p,
                _ => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
                    continue;
                }
            },
        };
        let (mut sink, mut stream) = pubsub.split();
        let Some(names) = me.upgrade().map(|b| b.topic_names()) else {
            return;
        };
        let mut resubscribed = true;
        for name in names {
            if sink.subscribe(channel(&name)).await.is_err() {
                resubscribed = false;
                break;
            }
        }
        if resubscribed {
            backoff = std::time::Duration::from_millis(100);
            if let Some(broker) = me.upgrade() {
                broker.pubsub_up.send_replace(true);
            }
            loop {
                tokio::select! {
                    msg = stream.next() => {
                        let Some(msg) = msg else { break };
                        let Some(broker) = me.upgrade() else { return };
                        broker.on_message(msg.get_channel_name(), msg.get_payload_bytes());
                    }
                    c = rx.recv() => match c {
                        None => return,
                        Some(Control::Subscribe(ch, done)) => {
                            let r = sink.subscribe(&ch).await.map_err(|e| e.to_string());
                            let _ = done.send(Some(r));
                        }
                        Some(Control::Unsubscribe(ch)) => {
                            if let Err(e) = sink.unsubscribe(&ch).await {
                                tracing::warn!("redis unsubscribe {ch}: {e}");
                            }
                        }
                    },
                }
            }
        }
        tracing::error!("the redis pub/sub connection was lost: reconnecting");
        let Some(broker) = me.upgrade() else { return };
        broker.lost_pubsub();
    }
}

fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

fn as_str(v: &Value) -> Option<&str> {
    match v {
        Value::BulkString(b) => std::str::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

fn parse_read(v: Value) -> Option<Read> {
    let Value::Array(parts) = v else { return None };
    let [epoch, offset, now, entries] = &parts[..] else {
        return None;
    };
    let Value::Array(raw) = entries else {
        return None;
    };
    let mut out = Vec::with_capacity(raw.len());
    for e in raw {
        let Value::Array(e) = e else { return None };
        let [id, Value::Array(fields)] = &e[..] else {
            return None;
        };
        let offset = as_str(id)?.strip_suffix("-0")?.parse().ok()?;
        let (mut data, mut ms) = (None, 0);
        for kv in fields.chunks(2) {
            match (as_str(&kv[0])?, &kv.get(1)?) {
                ("d", Value::BulkString(b)) => data = Some(Bytes::copy_from_slice(b)),
                ("t", v) => ms = as_u64(v)?,
                _ => {}
            }
        }
        out.push(Entry {
            offset,
            data: data?,
            ms,
        });
    }
    Some(Read {
        epoch: as_str(epoch)?.into(),
        offset: as_u64(offset)?,
        now_ms: as_u64(now)?,
        entries: out,
    })
}

/// Whether `entries` (read from `since + 1`, within the age limit) continue `since`
/// exactly up to the current position.
fn continues(read: &Read, since: &StreamPosition, ttl_ms: u64) -> Option<Vec<Entry>> {
    if since.epoch != read.epoch || since.offset > read.offset {
        return None;
    }
    let fresh: Vec<Entry> = read
        .entries
        .iter()
        .filter(|e| read.now_ms.saturating_sub(e.ms) <= ttl_ms)
        .map(|e| Entry {
            offset: e.offset,
            data: e.data.clone(),
            ms: e.ms,
        })
        .collect();
    let contiguous = fresh
        .iter()
        .zip(since.offset + 1..)
        .all(|(e, want)| e.offset == want);
    let complete = fresh.len() as u64 == read.offset - since.offset;
    (contiguous && complete).then_some(fresh)
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
            .timed(
                self.publish_script
                    .key(key(req.topic, "m"))
                    .key(key(req.topic, "s"))
                    .key(idem_key)
                    .arg(req.data)
                    .arg(ns.history_size)
                    .arg(ns.history_ttl.as_millis().max(1) as u64)
                    .arg(channel(req.topic))
                    .arg(&*new_epoch())
                    .arg(window as u64)
                    .invoke_async(&mut self.conn.clone()),
            )
            .await?;
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
        // The topic's SUBSCRIBE may have been confirmed on a connection lost since (an old
        // subscriber still closing keeps the topic in the table): what is published until
        // the node listens again would never reach this subscriber.
        let mut up = self.pubsub_up.subscribe();
        let listening = tokio::time::timeout(self.cfg.redis_timeout, async {
            up.wait_for(|u| *u).await.is_ok()
        })
        .await;
        if listening != Ok(true) {
            self.leave(client, name);
            return Err(BrokerError::Unavailable(
                "redis: the pub/sub connection is down".into(),
            ));
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
