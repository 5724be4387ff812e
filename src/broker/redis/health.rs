//! Whether this node can reach Redis right now, as the load balancer (`/readyz`), the
//! metrics and the write path see it.
//!
//! One task PINGs Redis every second on the command connection (every 100 ms while it is
//! down), each PING bounded by `redis_timeout`. Its last answer is the truth the write path
//! acts on: while it says down, publishes and subscribes fail at once with 503 instead of
//! each waiting out `redis_timeout` on a dead or stalled server, and once a probe is
//! answered they go through again. A single slow command does not flip the
//! state (that would flap under load); a PING that fails or stalls does, and the next one
//! that answers flips it back. The pub/sub task reports separately whether its connection
//! is subscribed, since either half down means this node cannot serve a topic correctly.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;

use crate::metrics::Metrics;

const PING_EVERY: Duration = Duration::from_secs(1);
/// While Redis does not answer: how often it is tried again, so that publishes (refused at
/// once meanwhile) succeed again within about this once it does.
const PROBE_EVERY: Duration = Duration::from_millis(100);

pub struct RedisHealth {
    node: String,
    timeout: Duration,
    start: Instant,
    /// Milliseconds since `start` of the last PING answered (0: the connection made at
    /// start, which counts as one).
    last_pong_ms: AtomicU64,
    /// The last PING answered (false from the first failed or stalled one).
    up: AtomicBool,
    /// The pub/sub connection is established and every local topic is subscribed on it.
    subscribed: AtomicBool,
    metrics: Arc<Metrics>,
}

impl RedisHealth {
    pub(super) fn new(node: String, timeout: Duration, metrics: Arc<Metrics>) -> Self {
        metrics.redis_up.set(1);
        RedisHealth {
            node,
            timeout,
            start: Instant::now(),
            // `connect` just talked to Redis on both connections.
            last_pong_ms: AtomicU64::new(0),
            up: AtomicBool::new(true),
            subscribed: AtomicBool::new(true),
            metrics,
        }
    }

    /// This process's id among the nodes sharing the Redis (random per start).
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Whether commands can be sent now: the last PING was answered, and recently (a
    /// monitor that stopped answering itself must not keep the node ready).
    pub fn commands_up(&self) -> bool {
        let last = self.last_pong_ms.load(Ordering::Relaxed);
        let now = self.start.elapsed().as_millis() as u64;
        let stale = (PING_EVERY + 2 * self.timeout).as_millis() as u64;
        self.up.load(Ordering::Relaxed) && now.saturating_sub(last) <= stale
    }

    pub fn subscribed(&self) -> bool {
        self.subscribed.load(Ordering::Relaxed)
    }

    /// Why this node cannot serve Redis-backed topics now; empty when it can.
    pub fn reasons(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if !self.commands_up() {
            out.push("redis_unreachable");
        }
        if !self.subscribed() {
            out.push("redis_pubsub_down");
        }
        out
    }

    /// The error a publish gets while Redis is known to be down, without trying it. The
    /// pub/sub connection does not matter to a publish: Redis fans it out to every node,
    /// and this node fills its own gap once it is subscribed again.
    pub(super) fn refuse_publish(&self) -> Option<String> {
        (!self.commands_up()).then(|| {
            "redis is unreachable (it did not answer this node's last health check)".into()
        })
    }

    /// The error a subscribe gets while this node cannot serve it: without a pub/sub
    /// connection the subscriber would wait for publications that cannot arrive yet.
    pub(super) fn refuse(&self) -> Option<String> {
        if let Some(why) = self.refuse_publish() {
            Some(why)
        } else if !self.subscribed() {
            Some("this node's redis pub/sub connection is down; it is reconnecting".into())
        } else {
            None
        }
    }

    /// A command that failed (any: publish, read, PING).
    pub(super) fn record_error(&self) {
        self.metrics.redis_errors.inc();
    }

    pub(super) fn set_subscribed(&self, yes: bool) {
        let was = self.subscribed.swap(yes, Ordering::Relaxed);
        if yes && !was {
            self.metrics.redis_reconnects.inc();
        }
        self.publish_gauge();
    }

    fn set_up(&self, yes: bool) {
        if yes {
            let now = self.start.elapsed().as_millis() as u64;
            self.last_pong_ms.store(now, Ordering::Relaxed);
        }
        let was = self.up.swap(yes, Ordering::Relaxed);
        if yes && !was {
            self.metrics.redis_reconnects.inc();
            tracing::info!(node = %self.node, "redis answers again");
        } else if !yes && was {
            tracing::error!(node = %self.node, "redis does not answer: failing fast until it does");
        }
        self.publish_gauge();
    }

    fn publish_gauge(&self) {
        let up = self.up.load(Ordering::Relaxed) && self.subscribed();
        self.metrics.redis_up.set(up as i64);
    }
}

/// PINGs every second (every `PROBE_EVERY` while Redis does not answer) until the broker is
/// gone. The connection manager reconnects by itself on the next command after an error,
/// so the PING is also what brings a lost command connection back when no request is
/// coming.
pub(super) async fn monitor(health: Weak<RedisHealth>, mut conn: ConnectionManager) {
    let mut wait = PING_EVERY;
    loop {
        tokio::time::sleep(wait).await;
        let Some(h) = health.upgrade() else { return };
        let timeout = h.timeout;
        drop(h);
        let cmd = redis::cmd("PING");
        let ping = cmd.query_async::<String>(&mut conn);
        let ok = matches!(tokio::time::timeout(timeout, ping).await, Ok(Ok(_)));
        let Some(h) = health.upgrade() else { return };
        if !ok {
            h.record_error();
        }
        h.set_up(ok);
        wait = if ok { PING_EVERY } else { PROBE_EVERY };
    }
}
