//! Cluster-wide subscriber counts under `--redis`: each node writes its own local count of
//! every topic it holds into the topic's hash `crier:{T}:n` (field = node id, value =
//! `COUNT:EXPIRES_MS`, expiry by Redis's clock so the nodes' clocks never matter), and reads
//! back the sum of the fresh fields. A node that dies stops counting within 5 s without
//! anyone having to notice it died: its fields simply go stale and are removed by the next
//! reader.
//!
//! Why a heartbeat hash and not `PUBSUB NUMSUB`: Redis knows only one subscription per node
//! per topic (never per client), and board topics are not subscribed in Redis at all.
//!
//! Totals are cached and refreshed every second for the topics this node was asked about in
//! the last 10 s, so a read (a board snapshot, `GET /api/boards`) never waits on
//! Redis. With Redis down, a total falls back to the local count.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use redis::aio::ConnectionManager;
use redis::Script;
use tokio_util::sync::CancellationToken;

use crate::hub::BrokerSink;
use crate::topic::TopicName;

/// How often totals are read (and changed local counts written).
const REFRESH: Duration = Duration::from_secs(1);
/// How often every held topic's field is written again, well inside its 5 s freshness.
const HEARTBEAT: Duration = Duration::from_secs(2);
/// A topic asked about is kept fresh this long after the last question.
const ASKED_FOR: Duration = Duration::from_secs(10);
/// Topics asked about but not held, at most: the rest are answered with the local count.
const MAX_ASKED: usize = 10_000;
/// Keys per script call, so one call never runs long inside Redis.
const CHUNK: usize = 256;

/// KEYS: `crier:{T}:n` per topic. ARGV[1]: node id; ARGV[i+1]: KEYS[i]'s local count.
const WRITE: &str = r#"
local t = redis.call('TIME')
local exp = string.format('%d', t[1] * 1000 + math.floor(t[2] / 1000) + 5000)
for i, k in ipairs(KEYS) do
  local c = ARGV[i + 1]
  if c == '0' then
    redis.call('HDEL', k, ARGV[1])
  else
    redis.call('HSET', k, ARGV[1], c .. ':' .. exp)
    redis.call('PEXPIRE', k, 10000)
  end
end
return 1
"#;

/// KEYS: `crier:{T}:n` per topic. Returns the sum of each key's fresh fields; removes
/// stale ones on the way (the publish script sums a topic's the same way for its receipt).
const READ: &str = r#"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local out = {}
for i, k in ipairs(KEYS) do
  local all = redis.call('HGETALL', k)
  local sum = 0
  for j = 1, #all, 2 do
    local v = all[j + 1]
    local c = string.find(v, ':', 1, true)
    local n, e = nil, nil
    if c then
      n = tonumber(string.sub(v, 1, c - 1))
      e = tonumber(string.sub(v, c + 1))
    end
    if n and e and e >= now then
      sum = sum + n
    else
      redis.call('HDEL', k, all[j])
    end
  end
  out[i] = sum
end
return out
"#;

pub fn key(topic: &str) -> String {
    format!("crier:{{{topic}}}:n")
}

pub struct ClusterCounts {
    hub: Arc<dyn BrokerSink>,
    /// For the answers that must be current (`now`, `occupied`), read straight from Redis.
    conn: ConnectionManager,
    totals: Mutex<HashMap<TopicName, usize>>,
    asked: Mutex<HashMap<TopicName, Instant>>,
    /// Whether the last refresh reached Redis; if not, totals fall back to local counts.
    fresh: AtomicBool,
}

impl ClusterCounts {
    pub fn spawn(
        conn: ConnectionManager,
        node: String,
        hub: Arc<dyn BrokerSink>,
        stop: CancellationToken,
    ) -> Arc<ClusterCounts> {
        let this = Arc::new(ClusterCounts {
            hub,
            conn: conn.clone(),
            totals: Mutex::new(HashMap::new()),
            asked: Mutex::new(HashMap::new()),
            fresh: AtomicBool::new(false),
        });
        tokio::spawn(run(this.clone(), conn, node, stop));
        this
    }

    /// The cluster total of the topic's subscribers, as of the last refresh (at most ~1 s
    /// old); the local count while Redis is unreachable, and for a topic until the refresh
    /// after it was first asked about.
    pub fn total(&self, topic: &str) -> usize {
        {
            let mut asked = self.asked.lock();
            if asked.len() < MAX_ASKED || asked.contains_key(topic) {
                asked.insert(topic.into(), Instant::now());
            }
        }
        let local = self.hub.subscriber_count(topic);
        if !self.fresh.load(Ordering::Acquire) {
            return local;
        }
        // Never below this node's own count: the total read up to a second ago may not
        // include a subscriber that just joined here (a fresh board page counts itself).
        self.totals
            .lock()
            .get(topic)
            .copied()
            .unwrap_or(local)
            .max(local)
    }
}

impl ClusterCounts {
    /// The cluster total of one topic read from Redis now (the Pusher channel API answers a
    /// single question, so a cached total that starts at the local count would be wrong
    /// on the first ask); never below the local count, and the local count if Redis fails.
    pub async fn now(&self, topic: &str) -> usize {
        let local = self.hub.subscriber_count(topic);
        let mut conn = self.conn.clone();
        match Script::new(READ)
            .key(key(topic))
            .invoke_async::<Vec<usize>>(&mut conn)
            .await
        {
            Ok(v) => v.first().copied().unwrap_or(0).max(local),
            Err(e) => {
                tracing::debug!("cluster count not read: {e}");
                local
            }
        }
    }

    /// Every topic starting with `prefix` that has a subscriber on some live node, with its
    /// cluster total: the count keys found by `SCAN` (at most `limit` of them), summed like
    /// `now`, joined with this node's own topics. With Redis down, this node's topics only.
    pub async fn occupied(&self, prefix: &str, limit: usize) -> Vec<(TopicName, usize)> {
        let mut out: HashMap<TopicName, usize> = self
            .hub
            .topic_counts()
            .into_iter()
            .filter(|(t, n)| t.starts_with(prefix) && *n > 0)
            .collect();
        let mut conn = self.conn.clone();
        let pattern = format!("crier:{{{}*}}:n", glob_escape(prefix));
        let mut topics: Vec<TopicName> = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let r: redis::RedisResult<(u64, Vec<String>)> = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await;
            let (next, keys) = match r {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!("cluster topics not listed: {e}");
                    return out.into_iter().collect();
                }
            };
            topics.extend(keys.iter().filter_map(|k| {
                let t = k.strip_prefix("crier:{")?.strip_suffix("}:n")?;
                Some(TopicName::from(t))
            }));
            cursor = next;
            if cursor == 0 || topics.len() >= limit {
                break;
            }
        }
        topics.truncate(limit);
        let read = Script::new(READ);
        for chunk in topics.chunks(CHUNK) {
            let mut inv = read.prepare_invoke();
            for t in chunk {
                inv.key(key(t));
            }
            match inv.invoke_async::<Vec<usize>>(&mut conn).await {
                Ok(sums) => {
                    for (t, n) in chunk.iter().zip(sums) {
                        if n > 0 {
                            let e = out.entry(t.clone()).or_insert(0);
                            *e = (*e).max(n);
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!("cluster counts not read: {e}");
                    break;
                }
            }
        }
        out.into_iter().collect()
    }
}

/// `prefix` as a literal inside a Redis glob pattern.
fn glob_escape(prefix: &str) -> String {
    let mut s = String::with_capacity(prefix.len());
    for c in prefix.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            s.push('\\');
        }
        s.push(c);
    }
    s
}

async fn run(
    this: Arc<ClusterCounts>,
    mut conn: ConnectionManager,
    node: String,
    stop: CancellationToken,
) {
    let write = Script::new(WRITE);
    let read = Script::new(READ);
    // What this node last wrote per topic, to write changes at once and the rest on the
    // heartbeat.
    let mut written: HashMap<TopicName, usize> = HashMap::new();
    let mut last_heartbeat = Instant::now() - HEARTBEAT;
    let mut tick = tokio::time::interval(REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        let heartbeat = now >= last_heartbeat + HEARTBEAT;
        let local: HashMap<TopicName, usize> = this.hub.topic_counts().into_iter().collect();
        let mut writes: Vec<(TopicName, usize)> = local
            .iter()
            .filter(|(t, n)| heartbeat || written.get(*t) != Some(n))
            .map(|(t, n)| (t.clone(), *n))
            .collect();
        writes.extend(
            written
                .keys()
                .filter(|t| !local.contains_key(*t))
                .map(|t| (t.clone(), 0)),
        );
        let mut ok = true;
        for chunk in writes.chunks(CHUNK) {
            let mut inv = write.prepare_invoke();
            inv.arg(&node);
            for (t, n) in chunk {
                inv.key(key(t)).arg(n.to_string());
            }
            if let Err(e) = inv.invoke_async::<i64>(&mut conn).await {
                tracing::debug!("cluster counts not written: {e}");
                ok = false;
                break;
            }
        }
        if ok {
            written = local;
            if heartbeat {
                last_heartbeat = now;
            }
        }
        // Only totals someone reads (board watchers; receipts sum in the publish script):
        // reading every held topic would cost Redis one HGETALL per topic per second.
        let wanted: Vec<TopicName> = {
            let mut asked = this.asked.lock();
            asked.retain(|_, at| now.duration_since(*at) < ASKED_FOR);
            asked.keys().cloned().collect()
        };
        let mut totals = HashMap::with_capacity(wanted.len());
        for chunk in wanted.chunks(CHUNK) {
            let mut inv = read.prepare_invoke();
            for t in chunk {
                inv.key(key(t));
            }
            match inv.invoke_async::<Vec<u64>>(&mut conn).await {
                Ok(sums) => {
                    for (t, n) in chunk.iter().zip(sums) {
                        totals.insert(t.clone(), n as usize);
                    }
                }
                Err(e) => {
                    tracing::debug!("cluster counts not read: {e}");
                    ok = false;
                    break;
                }
            }
        }
        if ok {
            *this.totals.lock() = totals;
        }
        this.fresh.store(ok, Ordering::Release);
    }
}
