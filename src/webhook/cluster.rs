//! Under `--redis`: `topic_occupied` and `topic_vacated` once per cluster, not once per
//! node. Each node records in Redis which topics it holds (after its own vacate grace), and
//! one Lua script per transition decides, atomically, whether the cluster changed:
//!
//! - a node that takes a topic from no fresh holder to one sends `topic_occupied`;
//! - a node that removes the topic's last fresh holder (itself) sends `topic_vacated`;
//! - a node that dies stops refreshing its holds (every 2 s, fresh for 5 s, by Redis's
//!   clock); every node sweeps once a second, and the one whose sweep finds a topic with no
//!   fresh holder left sends its `topic_vacated`, within about 6 s of the death.
//!
//! The same heartbeat idea as `broker::cluster_counts`, but its own keys, all under the
//! `{crier:wh}` hash tag (one slot): `{crier:wh}:t:TOPIC`, a hash node → expiry (ms), and
//! `{crier:wh}:live`, a sorted set topic → its latest expiry, which the sweep reads in
//! order. A Redis that cannot be reached delays transitions: a failed enter is made again
//! by the next heartbeat, a failed leave goes stale and is swept.
//!
//! Transitions are recorded by the hub under its locks ([`Cluster::want`]: the latest wish
//! per topic, bounded by the node's topics) and carried to Redis in order by one task.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use indexmap::IndexMap;
use parking_lot::Mutex;
use redis::aio::ConnectionManager;
use redis::Script;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::topic::TopicName;

const HEARTBEAT: Duration = Duration::from_secs(2);
const SWEEP: Duration = Duration::from_secs(1);
/// Keys per script call, so one call never runs long inside Redis.
const CHUNK: usize = 256;
const PREFIX: &str = "{crier:wh}:t:";
const LIVE: &str = "{crier:wh}:live";

/// Shared by the scripts below: a node holds a topic (fresh for 5 s). Returns 0 (no
/// cluster change), 1 (occupied) or 2 (vacated, by holders that died unswept, then
/// occupied).
const ENTER_FN: &str = r#"
local function now_ms()
  local t = redis.call('TIME')
  return t[1] * 1000 + math.floor(t[2] / 1000)
end
local function enter(h, live, node, topic, now)
  local exp = now + 5000
  local all = redis.call('HGETALL', h)
  local mine, fresh, stale = nil, 0, 0
  for j = 1, #all, 2 do
    local e = tonumber(all[j + 1]) or 0
    if all[j] == node then
      mine = e
    elseif e >= now then
      fresh = fresh + 1
    else
      redis.call('HDEL', h, all[j])
      stale = stale + 1
    end
  end
  redis.call('HSET', h, node, exp)
  redis.call('PEXPIRE', h, 3600000)
  local s = tonumber(redis.call('ZSCORE', live, topic) or '0')
  if s < exp then redis.call('ZADD', live, exp, topic) end
  if fresh > 0 or mine then return 0 end
  if stale > 0 then return 2 end
  return 1
end
"#;

/// KEYS: `{crier:wh}:t:T` per topic, then `{crier:wh}:live`. ARGV[1]: node id, ARGV[i+1]:
/// KEYS[i]'s topic. Returns each topic's `enter`.
const ENTER: &str = r#"
local live = KEYS[#KEYS]
local now = now_ms()
local out = {}
for i = 1, #KEYS - 1 do
  out[i] = enter(KEYS[i], live, ARGV[1], ARGV[i + 1], now)
end
return out
"#;

/// KEYS[1]: `{crier:wh}:t:T`, KEYS[2]: `{crier:wh}:live`. ARGV: node id, topic. Returns 1
/// when this node was the topic's last fresh holder (vacated), else 0.
const LEAVE: &str = r#"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local had = redis.call('HDEL', KEYS[1], ARGV[1])
local all = redis.call('HGETALL', KEYS[1])
local fresh = 0
for j = 1, #all, 2 do
  if (tonumber(all[j + 1]) or 0) >= now then
    fresh = fresh + 1
  else
    redis.call('HDEL', KEYS[1], all[j])
  end
end
if fresh == 0 then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], ARGV[2])
  return had
end
return 0
"#;

/// KEYS[1]: `{crier:wh}:live`. ARGV[1]: the topic key prefix. Topics whose latest expiry
/// passed: those with no fresh holder left are removed and returned (vacated, by this
/// node's sweep only); the others get their real latest expiry back.
const SWEEP_SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 256)
local out = {}
for _, topic in ipairs(due) do
  local h = ARGV[1] .. topic
  local all = redis.call('HGETALL', h)
  local latest = 0
  for j = 1, #all, 2 do
    local e = tonumber(all[j + 1]) or 0
    if e >= now then
      if e > latest then latest = e end
    else
      redis.call('HDEL', h, all[j])
    end
  end
  if latest == 0 then
    redis.call('DEL', h)
    redis.call('ZREM', KEYS[1], topic)
    out[#out + 1] = topic
  else
    redis.call('ZADD', KEYS[1], latest, topic)
  end
end
return out
"#;

/// What the cluster decided about a topic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    Occupied,
    Vacated,
}

pub struct Cluster {
    /// The latest local wish per topic (true: held), in the order topics first changed.
    wants: Mutex<IndexMap<TopicName, bool>>,
    ready: Notify,
}

impl Cluster {
    /// Starts the task that carries transitions to Redis; `on_change` hears the cluster's.
    pub fn spawn(
        conn: ConnectionManager,
        node: String,
        stop: CancellationToken,
        on_change: impl Fn(&str, Change) + Send + Sync + 'static,
    ) -> Arc<Cluster> {
        let this = Arc::new(Cluster {
            wants: Mutex::new(IndexMap::new()),
            ready: Notify::new(),
        });
        tokio::spawn(run(this.clone(), conn, node, stop, Box::new(on_change)));
        this
    }

    /// This node now holds the topic (`true`) or no longer does, after its grace. Called
    /// under hub locks: records and returns.
    pub fn want(&self, topic: &str, held: bool) {
        self.wants.lock().insert(topic.into(), held);
        self.ready.notify_one();
    }
}

type OnChange = Box<dyn Fn(&str, Change) + Send + Sync>;

async fn run(
    this: Arc<Cluster>,
    mut conn: ConnectionManager,
    node: String,
    stop: CancellationToken,
    on_change: OnChange,
) {
    let enter = Script::new(&format!("{ENTER_FN}{ENTER}"));
    let leave = Script::new(LEAVE);
    let sweep = Script::new(SWEEP_SCRIPT);
    // What Redis was last told this node holds.
    let mut held: HashSet<TopicName> = HashSet::new();
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sweeping = tokio::time::interval(SWEEP);
    sweeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = this.ready.notified() => {
                let wants = std::mem::take(&mut *this.wants.lock());
                let mut enters = Vec::new();
                for (topic, want) in wants {
                    if want && held.insert(topic.clone()) {
                        enters.push(topic);
                    } else if !want && held.remove(&topic) {
                        let r: Result<i64, _> = leave
                            .key(format!("{PREFIX}{topic}"))
                            .key(LIVE)
                            .arg(&node)
                            .arg(&*topic)
                            .invoke_async(&mut conn)
                            .await;
                        match r {
                            Ok(1) => on_change(&topic, Change::Vacated),
                            Ok(_) => {}
                            // Its hold goes stale and is swept.
                            Err(e) => tracing::debug!("webhook leave not recorded: {e}"),
                        }
                    }
                }
                enter_all(&enter, &mut conn, &node, &enters, &on_change).await;
            }
            _ = heartbeat.tick() => {
                let all: Vec<TopicName> = held.iter().cloned().collect();
                enter_all(&enter, &mut conn, &node, &all, &on_change).await;
            }
            _ = sweeping.tick() => {
                match sweep.key(LIVE).arg(PREFIX).invoke_async::<Vec<String>>(&mut conn).await {
                    Ok(gone) => {
                        for t in gone {
                            on_change(&t, Change::Vacated);
                        }
                    }
                    Err(e) => tracing::debug!("webhook sweep failed: {e}"),
                }
            }
        }
    }
}

/// Records that this node holds `topics` (new ones and the heartbeat alike) and reports the
/// cluster changes it made.
async fn enter_all(
    enter: &Script,
    conn: &mut ConnectionManager,
    node: &str,
    topics: &[TopicName],
    on_change: &OnChange,
) {
    for chunk in topics.chunks(CHUNK) {
        let mut inv = enter.prepare_invoke();
        inv.arg(node);
        for t in chunk {
            inv.key(format!("{PREFIX}{t}")).arg(&**t);
        }
        inv.key(LIVE);
        match inv.invoke_async::<Vec<i64>>(conn).await {
            Ok(codes) => {
                for (t, code) in chunk.iter().zip(codes) {
                    if code == 2 {
                        on_change(t, Change::Vacated);
                    }
                    if code >= 1 {
                        on_change(t, Change::Occupied);
                    }
                }
            }
            // The next heartbeat enters them again.
            Err(e) => tracing::debug!("webhook holds not recorded: {e}"),
        }
    }
}
