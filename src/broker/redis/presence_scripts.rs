//! The Lua scripts of the cluster's presence (`presence.rs`). Each join, leave, re-write
//! and reap of a topic is one script: it changes the topic's members and publishes the
//! notice in one step, so every node hears a topic's joins and leaves in the order Redis
//! ran them, and a member is removed (and its leave announced) once however many nodes
//! try.
//!
//! Keys of a topic T (one hash tag, one Redis Cluster slot): `crier:{T}:pm` (hash:
//! member id -> stored member), `crier:{T}:pu` (hash: user -> its connections, so `users`
//! is `HLEN`), `crier:{T}:pz` (sorted set of member ids, all score 0: pages in id order),
//! `crier:{T}:pn:<node>` (set: the member ids a node wrote). Every one expires
//! `KEY_TTL` after the last write or refresh by a node holding members there.
//!
//! A stored member is `<node: 16 hex><tail>`; the tail is what a notice carries:
//! `-` (anonymous) or `+<len>:<user>`, then `<client id>:<info JSON or nothing>`. A
//! notice, published on the topic's channel, is `p` + `j`/`l` + `1` (the user's first
//! join / last leave) or `0` + the tail: publications start with a digit, so the two
//! never mix.

/// Shared by the scripts that change members. KEYS: pm, pu, pz, pn:<node>.
const PRELUDE: &str = r#"
local function parse(v)
  local node = string.sub(v, 1, 16)
  local user = false
  if string.sub(v, 17, 17) == '+' then
    local c = string.find(v, ':', 18, true)
    local n = tonumber(string.sub(v, 18, c - 1))
    user = string.sub(v, c + 1, c + n)
  end
  return node, user
end
local function expire(ttl)
  for i = 1, 4 do redis.call('PEXPIRE', KEYS[i], ttl) end
end
-- Adds (or takes over) the member; announces a new one. Returns 0 (already a member), 1
-- (new), 2 (new, and the user's first connection in the topic).
local function join(f, v, channel, announce, ttl)
  local old = redis.call('HGET', KEYS[1], f)
  redis.call('HSET', KEYS[1], f, v)
  redis.call('SADD', KEYS[4], f)
  if old then
    -- Already a member (written again after a failure, or by a node that was taken for
    -- dead and came back under a new id): the new owner keeps it, nobody is told.
    expire(ttl)
    return 0
  end
  redis.call('ZADD', KEYS[3], 0, f)
  local node, user = parse(v)
  local first = '0'
  if user and redis.call('HINCRBY', KEYS[2], user, 1) == 1 then first = '1' end
  expire(ttl)
  if announce == '1' then
    redis.call('PUBLISH', channel, 'pj' .. first .. string.sub(v, 17))
  end
  if first == '1' then return 2 end
  return 1
end
-- Removes the member if `owner` (a node id) still owns it; announces its leave. Returns
-- `1` (the user's last connection in the topic) or `0`, then the removed member's tail;
-- or false.
local function remove(f, owner, channel, announce)
  redis.call('SREM', KEYS[4], f)
  local v = redis.call('HGET', KEYS[1], f)
  if not v then return false end
  local node, user = parse(v)
  if node ~= owner then return false end
  redis.call('HDEL', KEYS[1], f)
  redis.call('ZREM', KEYS[3], f)
  local last = '0'
  if user and redis.call('HINCRBY', KEYS[2], user, -1) <= 0 then
    redis.call('HDEL', KEYS[2], user)
    last = '1'
  end
  if announce == '1' then
    redis.call('PUBLISH', channel, 'pl' .. last .. string.sub(v, 17))
  end
  return last .. string.sub(v, 17)
end
"#;

/// ARGV: member id, stored member, channel, announce (`1`/`0`), key TTL (ms). Returns
/// `join`'s 0, 1 or 2.
const JOIN: &str = r#"
return join(ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5])
"#;

/// ARGV: member id, node, channel, announce. Returns 0 (not this node's member), 1
/// (removed), 2 (removed, and it was the user's last connection in the topic).
const LEAVE: &str = r#"
local t = remove(ARGV[1], ARGV[2], ARGV[3], ARGV[4])
if not t then return 0 end
if string.sub(t, 1, 1) == '1' then return 2 end
return 1
"#;

/// A dead node's members, up to ARGV[4] of them per call (KEYS[4]: its set). ARGV: dead
/// node, channel, announce, count. Returns how many ids it took off the set (the caller
/// calls again until that is less than the count), then `1`/`0` (the user's last
/// connection) and the tail of each member it removed (this call alone removed them:
/// their webhooks are the caller's to send).
const REAP: &str = r#"
local ids = redis.call('SPOP', KEYS[4], tonumber(ARGV[4]))
local out = {tostring(#ids)}
for _, f in ipairs(ids) do
  local t = remove(f, ARGV[1], ARGV[2], ARGV[3])
  if t then out[#out + 1] = t end
end
return out
"#;

/// Makes the node's members of the topic exactly the ones given (what the node holds),
/// announcing the difference. ARGV: node, channel, announce, key TTL, then member id and
/// stored member pairs. Returns the users' edges it made, for the webhooks (a join or
/// leave whose own write failed is made here, and only here): `j` (first join) or `l`
/// (last leave), then the member's tail.
const SYNC: &str = r#"
local want = {}
local edges = {}
for i = 5, #ARGV, 2 do want[ARGV[i]] = true end
for _, f in ipairs(redis.call('SMEMBERS', KEYS[4])) do
  if not want[f] then
    local t = remove(f, ARGV[1], ARGV[2], ARGV[3])
    if t and string.sub(t, 1, 1) == '1' then edges[#edges + 1] = 'l' .. string.sub(t, 2) end
  end
end
for i = 5, #ARGV, 2 do
  local v = redis.call('HGET', KEYS[1], ARGV[i])
  if v ~= ARGV[i + 1] then
    if join(ARGV[i], ARGV[i + 1], ARGV[2], ARGV[3], ARGV[4]) == 2 then
      edges[#edges + 1] = 'j' .. string.sub(ARGV[i + 1], 17)
    end
  end
end
return edges
"#;

/// A page of members in id order. KEYS: pm, pz. ARGV: the id after which to start (or
/// empty), count. Returns the stored members.
pub const PAGE: &str = r#"
local from = '-'
if ARGV[1] ~= '' then from = '(' .. ARGV[1] end
local ids = redis.call('ZRANGEBYLEX', KEYS[2], from, '+', 'LIMIT', 0, tonumber(ARGV[2]))
if #ids == 0 then return {} end
local vs = redis.call('HMGET', KEYS[1], unpack(ids))
local out = {}
for i, v in ipairs(vs) do
  if v then out[#out + 1] = ids[i]; out[#out + 1] = v end
end
return out
"#;

/// The node is alive. KEYS: `crier:pnodes` (node -> its last heartbeat, Redis's clock).
/// ARGV: node, register (`1`: a new id), key TTL. Returns 0 when the node was not
/// registered (taken for dead and reaped, or Redis lost its data) and did not ask to be:
/// the node then registers under a new id and writes its members again.
pub const HEARTBEAT: &str = r#"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local known = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not known and ARGV[2] ~= '1' then return 0 end
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"#;

/// Claims one dead node for this caller to reap. KEYS: `crier:pnodes`, `crier:preap`
/// (node -> when it may be claimed: a claim is a lease, so a reaper that dies mid-way is
/// followed by another). ARGV: dead after (ms), lease (ms), key TTL. Nodes silent for the
/// dead time move from the first to the second. Returns a node id, or false.
pub const CLAIM: &str = r#"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[1]), 'LIMIT', 0, 16)
for _, n in ipairs(dead) do
  redis.call('ZREM', KEYS[1], n)
  redis.call('ZADD', KEYS[2], now, n)
end
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 1)
if #due == 0 then return false end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), due[1])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return due[1]
"#;

pub fn join() -> String {
    format!("{PRELUDE}{JOIN}")
}

pub fn leave() -> String {
    format!("{PRELUDE}{LEAVE}")
}

pub fn reap() -> String {
    format!("{PRELUDE}{REAP}")
}

pub fn sync() -> String {
    format!("{PRELUDE}{SYNC}")
}
