//! Presence for the whole cluster under `--redis` (docs/scaling.md, "Presence"): one view
//! of each presence topic's members in Redis, read the same from every node, and joins and
//! leaves announced on the topic's channel, so every node's subscribers hear them in the
//! same order (the scripts are in `presence_scripts.rs`).
//!
//! - **Member ids** are unique across the cluster: the node claims a 24-bit tag in Redis at
//!   start (`SET NX`) and a member's id is `tag << 40 | local client id`. The wire shows it
//!   as the decimal string it always was.
//! - **Writes** go through one task per node, in the order they were made, batched into
//!   one pipeline (up to `BATCH` scripts): a join waits for its write (so a subscriber
//!   that reads presence after its acknowledgement finds itself), a leave never waits.
//! - **The node's own record** (`broker::presence::Presence`, quiet) is the truth about
//!   this node's members: a write that failed (Redis down) marks the node's view dirty,
//!   and the next heartbeat that reaches Redis writes every topic again (`SYNC`: the
//!   difference is announced). So members who joined or left while Redis was down are
//!   written within about a second of Redis answering again.
//! - **Liveness**: every `HEARTBEAT` (1 s) the node stamps its id with Redis's clock; one
//!   silent for `DEAD_AFTER` (5 s) is claimed by one survivor (a lease in `crier:preap`),
//!   which removes its members topic by topic, each removal announced once by the script
//!   that makes it. A node that finds it was taken for dead (a stall, a partition) takes
//!   a new id and writes its members again; a restarted node has a new id anyway, so its
//!   fresh members are never reaped.
//! - **Bounds**: members per topic are the cluster's subscriptions of it; every key
//!   expires `KEY_TTL` after the last refresh by a node holding members there
//!   (`REFRESH`), so a dead cluster's keys go too.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use redis::aio::ConnectionManager;
use redis::Script;
use tokio::sync::{mpsc, oneshot};

use super::health::RedisHealth;
use super::presence_scripts as lua;
use super::scripts::{channel, key};
use crate::broker::presence::{notice, Presence, MAX_PAGE_BYTES};
use crate::broker::{BrokerError, Identity, Member, PresencePage, PresenceStats};
use crate::config::Config;
use crate::hub::{BrokerSink, MemberChange, Wakeups};
use crate::topic::TopicName;

/// How often the node says it is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// A node silent this long (by Redis's clock) is dead: its members are removed.
pub const DEAD_AFTER: Duration = Duration::from_secs(5);
/// How long a survivor's claim on a dead node lasts before another may take it over.
const LEASE: Duration = Duration::from_secs(10);
/// Every presence key expires this long after the last write or refresh.
const KEY_TTL: Duration = Duration::from_secs(60);
/// How often a node refreshes the keys of the topics it holds members of.
const REFRESH: Duration = Duration::from_secs(15);
/// Scripts per pipeline.
const BATCH: usize = 256;
/// Joins and leaves waiting for Redis. Past it (Redis slow or away while clients churn)
/// an op is not queued: the node's own record has it, and the next heartbeat writes every
/// topic again (`resync`, whose script announces what changed), so a client cycling its
/// subscriptions cannot make the queue grow.
const OPS_MAX: usize = 16_384;
/// A dead node's members removed per script call (one call never runs long in Redis).
const REAP_CHUNK: usize = 500;
/// Local client ids take the low 40 bits of a member id.
const LOCAL_BITS: u32 = 40;

const NODES: &str = "crier:pnodes";
const REAPING: &str = "crier:preap";

fn node_topics(node: &str) -> String {
    format!("crier:pnode:{node}")
}

fn tag_key(tag: u64) -> String {
    format!("crier:ptag:{tag:06x}")
}

fn new_node() -> Arc<str> {
    format!("{:016x}", rand::random::<u64>()).into()
}

/// The four keys the member scripts take (see `presence_scripts.rs`).
fn member_keys(topic: &str, node: &str) -> [String; 4] {
    [
        key(topic, "pm"),
        key(topic, "pu"),
        key(topic, "pz"),
        key(topic, &format!("pn:{node}")),
    ]
}

/// A member's field: its id as 16 hex digits, so Redis's byte order is id order.
fn field(id: u64) -> String {
    format!("{id:016x}")
}

/// What a stored member and a notice carry after the node id (`presence_scripts.rs`).
fn tail(m: &Member) -> String {
    let mut s = String::with_capacity(32 + m.info.as_ref().map_or(0, |i| i.len()));
    match &m.user {
        Some(u) => s.push_str(&format!("+{}:{u}", u.len())),
        None => s.push('-'),
    }
    s.push_str(&format!("{}:", m.client));
    if let Some(i) = &m.info {
        s.push_str(i);
    }
    s
}

fn parse_tail(t: &[u8]) -> Option<Member> {
    let (user, rest) = match t.first()? {
        b'-' => (None, &t[1..]),
        b'+' => {
            let colon = t.iter().position(|&b| b == b':')?;
            let len: usize = std::str::from_utf8(&t[1..colon]).ok()?.parse().ok()?;
            let user = t.get(colon + 1..colon + 1 + len)?;
            (
                Some(Arc::from(std::str::from_utf8(user).ok()?)),
                &t[colon + 1 + len..],
            )
        }
        _ => return None,
    };
    let colon = rest.iter().position(|&b| b == b':')?;
    let client = std::str::from_utf8(&rest[..colon]).ok()?.parse().ok()?;
    let info = &rest[colon + 1..];
    let info = if info.is_empty() {
        None
    } else {
        Some(Arc::from(std::str::from_utf8(info).ok()?))
    };
    Some(Member { client, user, info })
}

/// A notice as the scripts publish it: `p`, `j`/`l`, `1`/`0` (the user's first join / last
/// leave), the member's tail.
fn read_notice(topic: &str, payload: &[u8]) -> Option<crate::hub::Notice> {
    let change = match payload.get(1)? {
        b'j' => MemberChange::Join,
        b'l' => MemberChange::Leave,
        _ => return None,
    };
    let edge = *payload.get(2)? == b'1';
    let m = parse_tail(payload.get(3..)?)?;
    // Anonymous members are nobody's first or last (the scripts never say so either).
    let edge = edge && m.user.is_some();
    Some(notice(topic, change, &m, edge))
}

enum Op {
    Join {
        topic: TopicName,
        field: String,
        tail: String,
        done: oneshot::Sender<()>,
    },
    Leave {
        topic: TopicName,
        field: String,
        /// For the user's last leave (`TopicEvents::user_edge`).
        user: Option<Arc<str>>,
    },
}

struct Scripts {
    join: Script,
    leave: Script,
    reap: Script,
    sync: Script,
    page: Script,
    heartbeat: Script,
    claim: Script,
}

pub(super) struct ClusterPresence {
    cfg: Config,
    /// Some namespace has presence: when none does, nothing runs.
    any: bool,
    /// This node's own members, by local client id.
    local: Presence,
    /// This run's tag, already shifted.
    tag: u64,
    /// This node's id in the presence keys; a new one if it was taken for dead.
    node: Mutex<Arc<str>>,
    /// A churning client waits behind its own earlier leaves (each subscribe waits for
    /// its join), but only for 2 × `redis_timeout` when Redis is slow: so the queue is
    /// also capped ([`OPS_MAX`]), past which the heartbeat's resync takes over.
    ops: mpsc::Sender<Op>,
    /// A write failed: every topic is written again at the next heartbeat that can.
    dirty: AtomicBool,
    conn: ConnectionManager,
    health: Arc<RedisHealth>,
    scripts: Scripts,
    timeout: Duration,
    /// The node's hub: who hears of the dead nodes' members this node removes (webhooks).
    hub: Arc<dyn BrokerSink>,
}

impl ClusterPresence {
    /// Claims this run's tag and starts the writer and the reaper (none when no namespace
    /// has presence).
    pub(super) async fn start(
        cfg: &Config,
        conn: ConnectionManager,
        health: Arc<RedisHealth>,
        hub: Arc<dyn BrokerSink>,
    ) -> Result<(Arc<ClusterPresence>, Vec<tokio::task::JoinHandle<()>>), redis::RedisError> {
        let any = cfg.presence_anywhere();
        let node = new_node();
        let mut tag = 0;
        if any {
            let mut c = conn.clone();
            for _ in 0..32 {
                let t = rand::random::<u64>() & 0xff_ffff;
                let got: Option<String> = redis::cmd("SET")
                    .arg(tag_key(t))
                    .arg(&*node)
                    .arg("NX")
                    .arg("PX")
                    .arg(KEY_TTL.as_millis() as u64)
                    .query_async(&mut c)
                    .await?;
                if got.is_some() {
                    tag = t << LOCAL_BITS;
                    hub.member_tag(tag);
                    break;
                }
            }
        }
        let (ops, rx) = mpsc::channel(OPS_MAX);
        let this = Arc::new(ClusterPresence {
            any,
            local: Presence::quiet(cfg, hub.clone()),
            hub,
            tag,
            node: Mutex::new(node),
            ops,
            dirty: AtomicBool::new(false),
            conn,
            health,
            scripts: Scripts {
                join: Script::new(&lua::join()),
                leave: Script::new(&lua::leave()),
                reap: Script::new(&lua::reap()),
                sync: Script::new(&lua::sync()),
                page: Script::new(lua::PAGE),
                heartbeat: Script::new(lua::HEARTBEAT),
                claim: Script::new(lua::CLAIM),
            },
            timeout: cfg.redis_timeout,
            cfg: cfg.clone(),
        });
        if !any {
            return Ok((this, Vec::new()));
        }
        this.register().await;
        let me = Arc::downgrade(&this);
        let tasks = vec![tokio::spawn(write(me.clone(), rx)), tokio::spawn(reap(me))];
        Ok((this, tasks))
    }

    /// The member id of a local client: unique across the cluster.
    pub(super) fn member_id(&self, client: u64) -> u64 {
        self.tag | (client & ((1 << LOCAL_BITS) - 1))
    }

    fn node(&self) -> Arc<str> {
        self.node.lock().clone()
    }

    fn member(&self, client: u64, who: &Identity) -> Member {
        Member {
            client: self.member_id(client),
            user: who.user.clone(),
            info: who.info.clone(),
        }
    }

    pub(super) async fn join(&self, topic: &str, client: u64, who: &Identity) {
        if !self.any || !self.local.join(topic, client, who) {
            return;
        }
        let m = self.member(client, who);
        let (done, wait) = oneshot::channel();
        let op = Op::Join {
            topic: topic.into(),
            field: field(m.client),
            tail: tail(&m),
            done,
        };
        if let Err(e) = self.ops.try_send(op) {
            if matches!(e, mpsc::error::TrySendError::Full(_)) {
                self.dirty.store(true, Ordering::Release);
            }
            return;
        }
        if tokio::time::timeout(self.timeout * 2, wait).await.is_err() {
            // Not written in time: the heartbeat writes the topic again.
            self.dirty.store(true, Ordering::Release);
        }
    }

    pub(super) fn leave(&self, topic: &str, client: u64) {
        if !self.any {
            return;
        }
        let Some(m) = self.local.leave(topic, client) else {
            return;
        };
        let op = Op::Leave {
            topic: topic.into(),
            field: field(self.member_id(client)),
            user: m.user,
        };
        if let Err(mpsc::error::TrySendError::Full(_)) = self.ops.try_send(op) {
            self.dirty.store(true, Ordering::Release);
        }
    }

    fn check_up(&self) -> Result<(), BrokerError> {
        match self.health.refuse_publish() {
            Some(why) => Err(BrokerError::Unavailable(format!(
                "presence is kept in redis, which is unavailable: {why}"
            ))),
            None => Ok(()),
        }
    }

    fn failed(&self, e: redis::RedisError) -> BrokerError {
        self.health.record_error();
        BrokerError::Unavailable(format!("presence is kept in redis: {e}"))
    }

    async fn timed<T>(
        &self,
        f: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, BrokerError> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(r) => r.map_err(|e| self.failed(e)),
            Err(_) => Err(self.failed(redis::RedisError::from((
                redis::ErrorKind::IoError,
                "timed out",
            )))),
        }
    }

    pub(super) async fn members(
        &self,
        topic: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<PresencePage, BrokerError> {
        self.check_up()?;
        let got: Vec<Vec<u8>> = self
            .timed(
                self.scripts
                    .page
                    .key(key(topic, "pm"))
                    .key(key(topic, "pz"))
                    .arg(after.map(field).unwrap_or_default())
                    .arg(limit + 1)
                    .invoke_async(&mut self.conn.clone()),
            )
            .await?;
        let mut members = Vec::new();
        let mut bytes = 0;
        let mut more = false;
        for pair in got.chunks(2) {
            let Some(m) = pair.get(1).and_then(|v| v.get(16..)).and_then(parse_tail) else {
                continue;
            };
            bytes += 42
                + m.user.as_ref().map_or(0, |u| u.len())
                + m.info.as_ref().map_or(0, |i| i.len());
            if members.len() == limit || (!members.is_empty() && bytes > MAX_PAGE_BYTES) {
                more = true;
                break;
            }
            members.push(m);
        }
        let next = more.then(|| members.last().map(|m| m.client)).flatten();
        Ok(PresencePage { members, next })
    }

    pub(super) async fn stats(&self, topic: &str) -> Result<PresenceStats, BrokerError> {
        self.check_up()?;
        let (clients, users): (usize, usize) = self
            .timed(
                redis::pipe()
                    .hlen(key(topic, "pm"))
                    .hlen(key(topic, "pu"))
                    .query_async(&mut self.conn.clone()),
            )
            .await?;
        Ok(PresenceStats { clients, users })
    }

    /// A notice from the topic's channel (`p...`): framed as one node frames it, for the
    /// node's subscribers.
    pub(super) fn on_notice(&self, hub: &dyn BrokerSink, topic: &str, payload: &[u8]) {
        let Some(n) = read_notice(topic, payload) else {
            tracing::warn!(topic, "malformed presence notice");
            return;
        };
        let mut wake = Wakeups::default();
        hub.announce(topic, &n, &mut wake);
        wake.wake();
    }

    fn join_leave(&self, topic: &str) -> &'static str {
        if self.cfg.presence(topic).join_leave {
            "1"
        } else {
            "0"
        }
    }

    /// Sends a batch of writes as one pipeline; Err: it may not have been applied. Ok:
    /// each op's script answer, in order (2: the user's first join or last leave).
    async fn send(&self, batch: &[Op]) -> redis::RedisResult<Vec<i64>> {
        let node = self.node();
        let ttl = KEY_TTL.as_millis() as u64;
        let mut pipe = redis::pipe();
        // EVALSHA needs the scripts loaded (a restarted Redis forgot them).
        pipe.cmd("SCRIPT").arg("LOAD").arg(lua::join()).ignore();
        pipe.cmd("SCRIPT").arg("LOAD").arg(lua::leave()).ignore();
        for op in batch {
            match op {
                Op::Join {
                    topic, field, tail, ..
                } => {
                    pipe.sadd(node_topics(&node), &**topic).ignore();
                    pipe.pexpire(node_topics(&node), ttl as i64).ignore();
                    let mut inv = self.scripts.join.prepare_invoke();
                    for k in member_keys(topic, &node) {
                        inv.key(k);
                    }
                    inv.arg(field)
                        .arg(format!("{node}{tail}"))
                        .arg(channel(topic))
                        .arg(self.join_leave(topic))
                        .arg(ttl);
                    pipe.invoke_script(&inv);
                }
                Op::Leave { topic, field, .. } => {
                    let mut inv = self.scripts.leave.prepare_invoke();
                    for k in member_keys(topic, &node) {
                        inv.key(k);
                    }
                    inv.arg(field)
                        .arg(&*node)
                        .arg(channel(topic))
                        .arg(self.join_leave(topic));
                    pipe.invoke_script(&inv);
                    // The node's last member of the topic: no longer one to reap. A
                    // join made after this look is written after it, and adds it back.
                    if self.local.stats(topic).clients == 0 {
                        pipe.srem(node_topics(&node), &**topic).ignore();
                    }
                }
            }
        }
        tokio::time::timeout(
            self.timeout,
            pipe.query_async::<Vec<i64>>(&mut self.conn.clone()),
        )
        .await
        .unwrap_or_else(|_| Err((redis::ErrorKind::IoError, "timed out").into()))
    }

    /// The users' first joins and last leaves this node's writes made (the scripts answer
    /// 2 for them), for the webhooks: only the writing node tells them, so once per cluster.
    fn tell_edges(&self, batch: &[Op], answers: &[i64]) {
        let Some(events) = self.hub.events() else {
            return;
        };
        for (op, answer) in batch.iter().zip(answers) {
            if *answer != 2 {
                continue;
            }
            match op {
                Op::Join { topic, tail, .. } => {
                    if let Some(user) = parse_tail(tail.as_bytes()).and_then(|m| m.user) {
                        events.user_edge(topic, &user, true);
                    }
                }
                Op::Leave { topic, user, .. } => {
                    if let Some(user) = user {
                        events.user_edge(topic, user, false);
                    }
                }
            }
        }
    }

    /// The users' first joins and last leaves a re-write made (`j`/`l` + the member's
    /// tail): joins and leaves whose own write failed, told to the webhooks once, here.
    fn tell_sync_edges(&self, topic: &str, edges: &[Vec<u8>]) {
        let Some(events) = self.hub.events() else {
            return;
        };
        for e in edges {
            let Some((kind, tail)) = e.split_first() else {
                continue;
            };
            if let Some(user) = parse_tail(tail).and_then(|m| m.user) {
                events.user_edge(topic, &user, *kind == b'j');
            }
        }
    }

    /// Registers this node's id (a new one after it was taken for dead).
    async fn register(&self) -> bool {
        let node = self.node();
        let r: Result<i64, _> = self
            .timed(
                self.scripts
                    .heartbeat
                    .key(NODES)
                    .arg(&*node)
                    .arg(1)
                    .arg(KEY_TTL.as_millis() as u64)
                    .invoke_async(&mut self.conn.clone()),
            )
            .await;
        r.is_ok()
    }

    /// Says the node is alive; a node that finds it was taken for dead (or Redis lost its
    /// data) takes a new id and writes its members again.
    async fn heartbeat(&self) -> Result<(), BrokerError> {
        let node = self.node();
        let ttl = KEY_TTL.as_millis() as u64;
        let mut pipe = redis::pipe();
        pipe.invoke_script(
            self.scripts
                .heartbeat
                .key(NODES)
                .arg(&*node)
                .arg(0)
                .arg(ttl),
        );
        pipe.cmd("SET")
            .arg(tag_key(self.tag >> LOCAL_BITS))
            .arg(&*node)
            .arg("PX")
            .arg(ttl)
            .ignore();
        // Scripts are loaded by the first EVALSHA's failure otherwise: load it first.
        let load = redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(lua::HEARTBEAT)
            .to_owned();
        let mut c = self.conn.clone();
        self.timed(load.query_async::<String>(&mut c)).await?;
        let (known,): (i64,) = self.timed(pipe.query_async(&mut c)).await?;
        if known == 0 {
            let fresh = new_node();
            tracing::warn!(
                old = %node,
                new = %fresh,
                "this node was taken for dead by the cluster's presence (or redis lost its \
                 data): writing its members again under a new id"
            );
            *self.node.lock() = fresh;
            if !self.register().await {
                return Err(BrokerError::Unavailable("redis: register failed".into()));
            }
            self.dirty.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Writes every topic's members again (`SYNC`), and the node's topic set.
    async fn resync(&self) -> Result<(), BrokerError> {
        let node = self.node();
        let ttl = KEY_TTL.as_millis() as u64;
        let mut c = self.conn.clone();
        let held: Vec<String> = self
            .timed(
                redis::cmd("SMEMBERS")
                    .arg(node_topics(&node))
                    .query_async(&mut c),
            )
            .await?;
        let mut topics: HashSet<TopicName> = self.local.topics().into_iter().collect();
        topics.extend(held.iter().map(|t| TopicName::from(t.as_str())));
        let mut count = 0;
        for topic in topics {
            let page = self.local.members(&topic, None, usize::MAX);
            let mut inv = self.scripts.sync.prepare_invoke();
            for k in member_keys(&topic, &node) {
                inv.key(k);
            }
            inv.arg(&*node)
                .arg(channel(&topic))
                .arg(self.join_leave(&topic))
                .arg(ttl);
            for m in page.members {
                let m = Member {
                    client: self.member_id(m.client),
                    ..m
                };
                inv.arg(field(m.client)).arg(format!("{node}{}", tail(&m)));
            }
            let edges: Vec<Vec<u8>> = self.timed(inv.invoke_async(&mut c)).await?;
            self.tell_sync_edges(&topic, &edges);
            let mut pipe = redis::pipe();
            if self.local.stats(&topic).clients > 0 {
                pipe.sadd(node_topics(&node), &*topic).ignore();
                pipe.pexpire(node_topics(&node), ttl as i64).ignore();
            } else {
                pipe.srem(node_topics(&node), &*topic).ignore();
            }
            self.timed(pipe.query_async::<()>(&mut c)).await?;
            count += 1;
        }
        tracing::info!(topics = count, "presence written to redis again");
        Ok(())
    }

    /// Keeps the keys of the topics this node holds members of from expiring.
    async fn refresh(&self) -> Result<(), BrokerError> {
        let node = self.node();
        let ttl = KEY_TTL.as_millis() as i64;
        let mut c = self.conn.clone();
        for chunk in self.local.topics().chunks(BATCH) {
            let mut pipe = redis::pipe();
            pipe.pexpire(node_topics(&node), ttl).ignore();
            for t in chunk {
                for k in member_keys(t, &node) {
                    pipe.pexpire(k, ttl).ignore();
                }
            }
            self.timed(pipe.query_async::<()>(&mut c)).await?;
        }
        Ok(())
    }

    /// Claims dead nodes one at a time and removes their members, announcing each leave.
    async fn reap_dead(&self) -> Result<(), BrokerError> {
        let mut c = self.conn.clone();
        for _ in 0..16 {
            let dead: Option<String> = self
                .timed(
                    self.scripts
                        .claim
                        .key(NODES)
                        .key(REAPING)
                        .arg(DEAD_AFTER.as_millis() as u64)
                        .arg(LEASE.as_millis() as u64)
                        .arg(KEY_TTL.as_millis() as u64)
                        .invoke_async(&mut c),
                )
                .await?;
            let Some(dead) = dead else { return Ok(()) };
            let topics: Vec<String> = self
                .timed(
                    redis::cmd("SMEMBERS")
                        .arg(node_topics(&dead))
                        .query_async(&mut c),
                )
                .await?;
            let mut gone = 0;
            for topic in &topics {
                loop {
                    let mut inv = self.scripts.reap.prepare_invoke();
                    for k in member_keys(topic, &dead) {
                        inv.key(k);
                    }
                    inv.arg(&dead)
                        .arg(channel(topic))
                        .arg(self.join_leave(topic))
                        .arg(REAP_CHUNK);
                    let got: Vec<String> = self.timed(inv.invoke_async(&mut c)).await?;
                    let popped: usize = got.first().and_then(|n| n.parse().ok()).unwrap_or(0);
                    let events = self.hub.events();
                    for t in got.iter().skip(1) {
                        // `1`/`0` (the user's last connection), then the tail.
                        let last = t.starts_with('1');
                        let Some(m) = t.get(1..).and_then(|t| parse_tail(t.as_bytes())) else {
                            continue;
                        };
                        gone += 1;
                        if let Some(ev) = &events {
                            ev.member_removed(
                                topic,
                                m.client,
                                m.user.as_deref(),
                                m.info.as_deref(),
                            );
                            if let (true, Some(user)) = (last, &m.user) {
                                ev.user_edge(topic, user, false);
                            }
                        }
                    }
                    if popped < REAP_CHUNK {
                        break;
                    }
                }
            }
            let mut pipe = redis::pipe();
            pipe.del(node_topics(&dead)).ignore();
            pipe.zrem(REAPING, &dead).ignore();
            self.timed(pipe.query_async::<()>(&mut c)).await?;
            tracing::info!(
                node = %dead,
                topics = topics.len(),
                members = gone,
                "a node's presence was removed: it was silent for {:?}",
                DEAD_AFTER
            );
        }
        Ok(())
    }
}

/// The node's one writer: batches of joins and leaves in order, the heartbeat, and the
/// writes again after a failure.
async fn write(me: Weak<ClusterPresence>, mut rx: mpsc::Receiver<Op>) {
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_refresh = Instant::now();
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        tokio::select! {
            n = rx.recv_many(&mut batch, BATCH) => {
                if n == 0 {
                    return;
                }
                let Some(this) = me.upgrade() else { return };
                match this.send(&batch).await {
                    Ok(answers) => this.tell_edges(&batch, &answers),
                    Err(e) => {
                        // Re-written by the resync, which tells the user edges it
                        // makes to the webhooks. One this write made before it failed
                        // in flight is not told (the clients' notices still go out).
                        tracing::debug!("presence not written: {e}");
                        this.health.record_error();
                        this.dirty.store(true, Ordering::Release);
                    }
                }
                for op in batch.drain(..) {
                    if let Op::Join { done, .. } = op {
                        let _ = done.send(());
                    }
                }
            }
            _ = tick.tick() => {
                let Some(this) = me.upgrade() else { return };
                if this.heartbeat().await.is_err() {
                    this.dirty.store(true, Ordering::Release);
                    continue;
                }
                if this.dirty.swap(false, Ordering::AcqRel) {
                    if let Err(e) = this.resync().await {
                        tracing::debug!("presence not written again yet: {e}");
                        this.dirty.store(true, Ordering::Release);
                    }
                }
                if last_refresh.elapsed() >= REFRESH && this.refresh().await.is_ok() {
                    last_refresh = Instant::now();
                }
            }
        }
    }
}

/// Every node looks for dead nodes every heartbeat; one claims each.
async fn reap(me: Weak<ClusterPresence>) {
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(this) = me.upgrade() else { return };
        if this.health.refuse_publish().is_some() {
            continue;
        }
        if let Err(e) = this.reap_dead().await {
            tracing::debug!("dead nodes' presence not reaped yet: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tail_reads_back() {
        for m in [
            Member {
                client: 7,
                user: Some("a:l\"ice".into()),
                info: Some(r#"{"n":1,"s":"x:y"}"#.into()),
            },
            Member {
                client: u64::MAX,
                user: None,
                info: None,
            },
            Member {
                client: 1,
                user: Some("".into()),
                info: None,
            },
        ] {
            assert_eq!(parse_tail(tail(&m).as_bytes()), Some(m));
        }
        assert_eq!(parse_tail(b"+9:ab1:"), None);
        assert_eq!(parse_tail(b"x"), None);
    }

    #[test]
    fn a_notice_from_redis_is_framed_as_one_node_frames_it() {
        let n = read_notice("lobby:a", br#"pj1+5:alice7:{"n":1}"#).unwrap();
        assert_eq!(
            &n.ws[2..],
            br#"{"topic":"lobby:a","join":{"client":"7","user":"alice","info":{"n":1}}}"#
        );
        let e = n.member.unwrap();
        assert_eq!(
            (e.kind, e.client, e.user_first, e.user_last),
            (MemberChange::Join, 7, true, false)
        );
        let n = read_notice("lobby:a", b"pl1-9:").unwrap();
        let e = n.member.unwrap();
        assert_eq!(
            (e.kind, e.client, e.user.as_deref(), e.user_last),
            (MemberChange::Leave, 9, None, false)
        );
        assert!(read_notice("lobby:a", b"px0-9:").is_none());
        assert!(read_notice("lobby:a", b"pj").is_none());
    }

    #[test]
    fn member_ids_keep_their_tag_and_sort_as_fields() {
        assert_eq!(field(0xab << LOCAL_BITS | 5), "0000ab0000000005");
        assert!(field(9) < field(10) && field(255) < field(256));
    }
}
