//! The Lua scripts (publish, read) and the key names and reply parsing around them: every
//! byte the broker sends to or reads from Redis for a topic's stream is shaped here.

use std::sync::Arc;

use bytes::Bytes;
use redis::Value;

use crate::broker::{BrokerError, StreamPosition};
/// KEYS: meta, stream, idempotency key (the meta again when none), cluster counts.
/// ARGV: data, history_size, history_ttl ms, channel, new epoch, idempotency window ms (0:
/// none), topic ttl ms. Returns {fresh 0/1, "offset:epoch", cluster subscribers or -1 when
/// no node counts them}.
pub(super) const PUBLISH: &str = r#"
local now = redis.call('TIME')
local ms = now[1] * 1000 + math.floor(now[2] / 1000)
local function subscribers()
  local fields = redis.call('HGETALL', KEYS[4])
  if #fields == 0 then return -1 end
  local n = 0
  for i = 1, #fields, 2 do
    local c, exp = string.match(fields[i + 1], '^(%d+):(%d+)$')
    if c and tonumber(exp) >= ms then
      n = n + tonumber(c)
    else
      redis.call('HDEL', KEYS[4], fields[i])
    end
  end
  return n
end
if ARGV[6] ~= '0' then
  local prev = redis.call('GET', KEYS[3])
  if prev then return {0, prev, subscribers()} end
end
local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch then
  epoch = ARGV[5]
  redis.call('HSET', KEYS[1], 'e', epoch)
  redis.call('DEL', KEYS[2])
end
local offset = redis.call('HINCRBY', KEYS[1], 'o', 1)
redis.call('PEXPIRE', KEYS[1], ARGV[7])
if ARGV[2] ~= '0' then
  redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[2], offset .. '-0', 'd', ARGV[1], 't', ms)
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
local receipt = offset .. ':' .. epoch
if ARGV[6] ~= '0' then
  redis.call('SET', KEYS[3], receipt, 'PX', ARGV[6])
end
redis.call('PUBLISH', ARGV[4], receipt .. ':' .. ARGV[1])
return {1, receipt, subscribers()}
"#;

/// ARGV[1]: the epoch to create when the topic has none ('' creates nothing); ARGV[2]: the
/// first stream id to read ('' reads nothing); ARGV[3]: at most this many entries; ARGV[4]:
/// the topic ttl (ms) a subscriber's read (one that may create) sets on the meta, so names
/// only subscribed to leave nothing behind for longer.
pub(super) const READ: &str = r#"
local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch then
  if ARGV[1] == '' then
    epoch = ''
  else
    epoch = ARGV[1]
    redis.call('HSET', KEYS[1], 'e', epoch)
  end
end
if ARGV[1] ~= '' then
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
local offset = redis.call('HGET', KEYS[1], 'o') or '0'
local now = redis.call('TIME')
local entries = {}
if ARGV[2] ~= '' then
  entries = redis.call('XRANGE', KEYS[2], ARGV[2], '+', 'COUNT', ARGV[3])
end
return {epoch, offset, now[1] * 1000 + math.floor(now[2] / 1000), entries}
"#;

pub(super) fn key(topic: &str, what: &str) -> String {
    format!("crier:{{{topic}}}:{what}")
}

pub(super) fn channel(topic: &str) -> String {
    key(topic, "c")
}

pub(super) fn topic_of(channel: &str) -> Option<&str> {
    channel.strip_prefix("crier:{")?.strip_suffix("}:c")
}

pub(super) fn unavailable(e: redis::RedisError) -> BrokerError {
    BrokerError::Unavailable(format!("redis: {e}"))
}

/// One history entry read back: its offset, its data, its age stamp (Redis ms).
pub(super) struct Entry {
    pub(super) offset: u64,
    pub(super) data: Bytes,
    pub(super) ms: u64,
}

/// The answer of the read script.
pub(super) struct Read {
    pub(super) epoch: Arc<str>,
    pub(super) offset: u64,
    pub(super) now_ms: u64,
    pub(super) entries: Vec<Entry>,
}

pub(super) fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

pub(super) fn as_str(v: &Value) -> Option<&str> {
    match v {
        Value::BulkString(b) => std::str::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

pub(super) fn parse_read(v: Value) -> Option<Read> {
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
pub(super) fn continues(read: &Read, since: &StreamPosition, ttl_ms: u64) -> Option<Vec<Entry>> {
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
