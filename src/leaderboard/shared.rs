//! Boards shared by every node under `--redis`: Redis is the authority, every node keeps a
//! *mirror* of every board (the same in-memory [`Ranking`] one node uses), so reads,
//! snapshots, coalescing and the web page work unchanged.
//!
//! - **Writes are Lua scripts**, atomic across nodes. The score script applies a validated
//!   batch all-or-nothing by the one-node rules (`combine`, increment bounds checked for the
//!   whole batch first, each posted entry takes the next `seq`). The sorted set `bz` ranks
//!   with score = `-score` (order high) or `score` (low) and member = `seq` as 20 digits +
//!   player, so ascending (score, member) is better score first, then earlier achiever:
//!   the one-node tie rule, with `ZRANK` in O(log n). On a board with a `tiebreak` the
//!   member starts with the subscore as 21 sortable characters (`subkey`: sign class,
//!   biased binary exponent, mantissa; of `-subscore` for `high`), so equal scores order
//!   by subscore first; boards without one keep the member they always had. Scores cross the Lua boundary as
//!   text (Rust's shortest round-trip `{}`, Lua's `%.17g`): Lua truncates numbers in
//!   replies to integers, and `cjson` prints 14 digits.
//! - **Every write is an op** with the board's next version `v`: added to the stream `bl`
//!   (id `<v>-0`, about 10,000 kept) and published on `bc` as `v:epoch:op`. An op carries
//!   whole entries, not deltas, so applying one twice is harmless.
//! - **Mirrors**: one task per node receives every board's ops (one pattern subscription)
//!   and applies them in version order; a gap is filled from `bl`; a trimmed gap, an
//!   unknown board or another epoch (Redis lost the board) reloads the board (`HSCAN` in
//!   chunks, then the ops after the version read first). A lost pub/sub connection is
//!   reconnected with back-off, then every board catches up.
//! - **Read your writes**: the node that ran a write answers once its mirror reached the
//!   write's version (at most `redis_timeout` later), so a client reads its own write on
//!   the node it posted to. Other nodes follow within the pub/sub hop.
//!
//! - **Seasons**: the season (`sn`, `ss` start, `sa` anchor, ms) is in the board's hash; the
//!   close script takes the season number it closes and does nothing when Redis is past
//!   it, so however many nodes see the boundary, one closes it. It *renames* `bp` and `bz`
//!   to the archive's keys (O(1) in the board's size) and emits a `c` op, after which
//!   every mirror starts empty in the next season. A score batch runs in whichever season
//!   Redis holds when its script runs, and says which; a node first closes a season its
//!   own clock says is over, so a batch posted past the boundary lands in the new one.
//!
//! Keys (board B, hash tag `{board:B}`): `crier:{board:B}:bo` (hash: `opt` options JSON,
//! `seq` next seq, `v` op version, `e` epoch, `sn` `ss` `sa` season), `:bp` (hash: player
//! -> `score seq meta`, or `score seq/subscore meta` for a nonzero subscore), `:bz` (ranking), `:bl` (ops), channel `:bc`, `:ba` (hash: closed
//! season -> `started ended players order`) with `:s<n>p` / `:s<n>z` each; and the set
//! `crier:boards` of names.

use std::collections::HashSet;
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::ConnectionManager;
use redis::{Script, Value};
use serde::Deserialize;
use tokio::sync::{Notify, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;

use super::ranking::Entry;
use super::season::SeasonState;
use super::service::{Board, BoardError, BoardOptions, Boards, ScoreResult, ValidScore};
use super::storage::BoardStorage;
use super::store::{ArchivedSeason, StoredEntry};
use crate::broker::new_epoch;

/// Ops kept per board for mirrors that fell behind; one further behind reloads the board.
const KEPT_OPS: usize = 10_000;
/// Entries and ops read per round trip while loading, so a big board never arrives whole.
const CHUNK: usize = 1000;
const PATTERN: &str = "crier:{board:*}:bc";
const BOARDS: &str = "crier:boards";

/// Shared prologue: reads the board (creating it with ARGV[1] options and ARGV[2] epoch
/// when `create`), `emit(op)`, which records and publishes the next op, and `full()`:
/// whether the board is new and `crier:boards` already names ARGV[5] (`max_boards`)
/// boards. Every script takes the same first six ARGV: options, epoch, name, kept ops,
/// max boards, max players.
const PROLOGUE: &str = r#"
local bo, bz, bl, bc = KEYS[1], KEYS[3], KEYS[4], KEYS[5]
local meta = redis.call('HMGET', bo, 'opt', 'seq', 'v', 'e', 'sn', 'ss', 'sa')
local opt, seq, v, e = meta[1], tonumber(meta[2]), tonumber(meta[3]), meta[4]
local sn, ss, sa = tonumber(meta[5]) or 1, meta[6], meta[7]
local created = false
if not opt then
  opt, seq, v, e, created = ARGV[1], 1, 0, ARGV[2], true
end
if not ss then
  -- A new board (or one made before seasons): its first season starts now, on the clock
  -- of the node that made it (NOW, set before this prologue), else Redis's.
  if NOW then
    ss = NOW
  else
    local t = redis.call('TIME')
    ss = string.format('%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
  end
  sa = ss
end
local function emit(op)
  v = v + 1
  local id = string.format('%d', v)
  redis.call('XADD', bl, 'MAXLEN', '~', ARGV[4], id .. '-0', 'o', op)
  redis.call('PUBLISH', bc, id .. ':' .. e .. ':' .. op)
end
local function save()
  redis.call('HSET', bo, 'opt', opt, 'seq', string.format('%d', seq), 'v', string.format('%d', v), 'e', e,
    'sn', string.format('%d', sn), 'ss', ss, 'sa', sa)
  if created then redis.call('SADD', KEYS[6], ARGV[3]) end
end
local function full()
  return created and redis.call('SCARD', KEYS[6]) >= tonumber(ARGV[5])
end
-- A number as 21 characters whose byte order is the numbers' order (finite numbers).
local function subkey(x)
  if x == 0 then return '100000000000000000000' end
  local m, ex = math.frexp(math.abs(x))
  local mant = (m - 0.5) * 9007199254740992
  ex = ex + 1100
  if x < 0 then
    return '0' .. string.format('%04d%016.0f', 9999 - ex, 4503599627370495 - mant)
  end
  return '2' .. string.format('%04d%016.0f', ex, mant)
end
local tiebreak = nil
if opt ~= '' then tiebreak = cjson.decode(opt).tiebreak end
if tiebreak == cjson.null then tiebreak = nil end
-- An entry {score, seq, meta, player, subscore} from its `bp` text.
local function parse(p, s)
  local a = string.find(s, ' ', 1, true)
  local b = string.find(s, ' ', a + 1, true)
  local q = string.sub(s, a + 1, b - 1)
  local sub = 0
  local sl = string.find(q, '/', 1, true)
  if sl then
    sub = tonumber(string.sub(q, sl + 1))
    q = string.sub(q, 1, sl - 1)
  end
  return {tonumber(string.sub(s, 1, a - 1)), tonumber(q), string.sub(s, b + 1), p, sub}
end
-- The sorted-set member of an entry under a tiebreak (nil, 'high' or 'low').
local function member_tb(en, tb)
  local m = string.format('%020d', en[2]) .. en[4]
  if tb == 'high' then return subkey(-en[5]) .. m end
  if tb == 'low' then return subkey(en[5]) .. m end
  return m
end
local function member(en) return member_tb(en, tiebreak) end
"#;

/// KEYS: bo bp bz bl bc boards. ARGV: default options, new epoch, name, kept ops, max
/// boards, max players, then (player, score, meta or '', subscore or '') per entry, then
/// now (ms). Returns {2} for a new board past max boards, {5, i} when entry i posts a
/// subscore to a board without a tiebreak, {3, players, new} when the batch would add
/// players past max players, {0, i} when entry i (0-based) would take an increment total
/// out of range, else {1, v, e, then rank, score, changed per entry}. Every refusal is
/// made before anything is written.
const SCORES: &str = r#"
if full() then return {2} end
local bp = KEYS[2]
local o = cjson.decode(opt)
local high = o.order ~= 'low'
local mode = o.mode
local n = (#ARGV - 7) / 4
if not tiebreak then
  for i = 0, n - 1 do
    if ARGV[10 + 4 * i] ~= '' then return {5, i} end
  end
end
local cur = {}
local function get(p)
  local c = cur[p]
  if c == nil then
    local s = redis.call('HGET', bp, p)
    if s then c = parse(p, s) else c = false end
    cur[p] = c
  end
  return c
end
local function sub(i)
  local t = ARGV[10 + 4 * i]
  if t == '' then return 0 end
  local x = tonumber(t)
  if x == 0 then x = 0 end
  return x
end
local fresh, added = {}, 0
for i = 0, n - 1 do
  local p = ARGV[7 + 4 * i]
  if not fresh[p] and not get(p) then
    fresh[p] = true
    added = added + 1
  end
end
if added > 0 then
  local players = redis.call('HLEN', bp)
  if players + added > tonumber(ARGV[6]) then return {3, players, added} end
end
if mode == 'increment' then
  local sums, subs = {}, {}
  for i = 0, n - 1 do
    local p = ARGV[7 + 4 * i]
    local s, u = sums[p], subs[p]
    if s == nil then
      local c = get(p)
      if c then s, u = c[1], c[5] else s, u = 0, 0 end
    end
    s = s + tonumber(ARGV[8 + 4 * i])
    u = u + sub(i)
    sums[p], subs[p] = s, u
    if s > 1e15 or s < -1e15 or u > 1e15 or u < -1e15 then return {0, i} end
  end
end
local changed, order = {}, {}
for i = 0, n - 1 do
  local p, sc, m, su = ARGV[7 + 4 * i], tonumber(ARGV[8 + 4 * i]), ARGV[9 + 4 * i], sub(i)
  if sc == 0 then sc = 0 end
  local old = changed[p] or get(p)
  local new = nil
  if not old then
    new = {sc, seq, m, p, su}
  else
    local ns, nu, acc
    if mode == 'best' then
      local better
      if high then better = sc > old[1] else better = sc < old[1] end
      if sc == old[1] and tiebreak == 'high' then better = su > old[5] end
      if sc == old[1] and tiebreak == 'low' then better = su < old[5] end
      if better then ns, nu = sc, su else ns, nu = old[1], old[5] end
      acc = better
    elseif mode == 'latest' then
      ns, nu, acc = sc, su, true
    else
      ns, nu, acc = old[1] + sc, old[5] + su, true
      if ns == 0 then ns = 0 end
      if nu == 0 then nu = 0 end
    end
    local sch = ns ~= old[1] or nu ~= old[5]
    local mch = acc and m ~= '' and m ~= old[3]
    if sch or mch then
      new = {old[1], old[2], old[3], p, old[5]}
      if sch then new[1], new[2], new[5] = ns, seq, nu end
      if mch then new[3] = m end
    end
  end
  seq = seq + 1
  if new then
    if not changed[p] then order[#order + 1] = p end
    changed[p] = new
  end
end
local entries = {}
for _, p in ipairs(order) do
  local old, new = get(p), changed[p]
  if old then redis.call('ZREM', bz, member(old)) end
  local z = new[1]
  if high then z = -z end
  if z == 0 then z = 0 end
  local s = string.format('%.17g', new[1])
  local q = string.format('%d', new[2])
  redis.call('ZADD', bz, string.format('%.17g', z), member(new))
  if new[5] ~= 0 then
    local u = string.format('%.17g', new[5])
    redis.call('HSET', bp, p, s .. ' ' .. q .. '/' .. u .. ' ' .. new[3])
    entries[#entries + 1] = {p, s, q, new[3], u}
  else
    redis.call('HSET', bp, p, s .. ' ' .. q .. ' ' .. new[3])
    entries[#entries + 1] = {p, s, q, new[3]}
  end
end
if #entries > 0 then emit(cjson.encode({k = 's', e = entries})) end
save()
local out = {1, string.format('%d', v), e, string.format('%d', sn)}
for i = 0, n - 1 do
  local p = ARGV[7 + 4 * i]
  local en = changed[p] or get(p)
  out[#out + 1] = redis.call('ZRANK', bz, member(en)) + 1
  out[#out + 1] = string.format('%.17g', en[1])
  if changed[p] then out[#out + 1] = 1 else out[#out + 1] = 0 end
end
return out
"#;

/// KEYS: bo bp bz bl bc boards. ARGV: new options, new epoch, name, kept ops, max boards,
/// now (ms, the node's clock), new order. Returns {2} for a new board past max boards,
/// {0} when the order or tiebreak of a board with players would change, else {1, v, e}.
/// A changed schedule re-anchors the season at `now`.
const OPTIONS: &str = r#"
if full() then return {2} end
local old = cjson.decode(opt)
local new = cjson.decode(ARGV[1])
local function tb(o)
  if o.tiebreak == nil or o.tiebreak == cjson.null then return '' end
  return o.tiebreak
end
if not created and (old.order ~= ARGV[7] or tb(old) ~= tb(new)) and redis.call('ZCARD', bz) > 0 then
  return {0}
end
if not created and (old.reset ~= new.reset or old.timezone ~= new.timezone) then
  sa = ARGV[6]
end
opt = ARGV[1]
emit('{"k":"o","o":' .. opt .. ',"a":' .. sa .. '}')
save()
return {1, string.format('%d', v), e}
"#;

/// KEYS: bo bp bz bl bc boards. ARGV: (unused), (unused), name, kept ops, (unused),
/// (unused). Returns {0} for an unknown board, else {1, v, e}.
const RESET: &str = r#"
if created then return {0} end
redis.call('DEL', KEYS[2], bz)
emit('{"k":"r"}')
save()
return {1, string.format('%d', v), e}
"#;

/// KEYS: bo bp bz bl bc boards ba. ARGV: (unused), (unused), name, kept ops, (unused),
/// (unused), player, archive key prefix. Forgets the player in the current season and in
/// every kept closed season (their player counts drop by one). Returns {0} for an unknown
/// board, {4} for a player without an entry in any, else {1, v, e, closed seasons erased
/// from...}.
const DELETE: &str = r#"
if created then return {0} end
local p = ARGV[7]
local s = redis.call('HGET', KEYS[2], p)
local gone = {}
for _, n in ipairs(redis.call('HKEYS', KEYS[7])) do
  local hp = ARGV[8] .. n .. 'p'
  local a = redis.call('HGET', hp, p)
  if a then
    local f = {}
    for w in string.gmatch(redis.call('HGET', KEYS[7], n), '%S+') do f[#f + 1] = w end
    local tb = nil
    local sl = string.find(f[4], '/', 1, true)
    if sl then tb = string.sub(f[4], sl + 1) end
    redis.call('ZREM', ARGV[8] .. n .. 'z', member_tb(parse(p, a), tb))
    redis.call('HDEL', hp, p)
    redis.call('HSET', KEYS[7], n, f[1] .. ' ' .. f[2] .. ' ' .. string.format('%d', tonumber(f[3]) - 1) .. ' ' .. f[4])
    gone[#gone + 1] = n
  end
end
if not s and #gone == 0 then return {4} end
if s then
  redis.call('ZREM', bz, member(parse(p, s)))
  redis.call('HDEL', KEYS[2], p)
end
emit(cjson.encode({k = 'd', p = p}))
save()
local out = {1, string.format('%d', v), e}
for _, n in ipairs(gone) do out[#out + 1] = n end
return out
"#;

/// KEYS: bo bp bz bl bc boards ba. ARGV: (unused), (unused), name, kept ops, (unused),
/// (unused), season closed, its end, next start (= anchor), (unused), order, archive key
/// prefix, seasons kept. Returns {0} for an unknown board, {1, v, e} once closed, {3} when Redis is
/// past that season already (another node closed it).
const CLOSE: &str = r#"
if created then return {0} end
local closing = tonumber(ARGV[7])
if sn ~= closing then return {3} end
local players = redis.call('HLEN', KEYS[2])
local prefix = ARGV[12] .. string.format('%d', closing)
redis.call('DEL', prefix .. 'p', prefix .. 'z')
if players > 0 then
  redis.call('RENAME', KEYS[2], prefix .. 'p')
  redis.call('RENAME', bz, prefix .. 'z')
end
redis.call('DEL', KEYS[2], bz)
redis.call('HSET', KEYS[7], ARGV[7], ss .. ' ' .. ARGV[8] .. ' ' .. players .. ' ' .. ARGV[11])
local keep = tonumber(ARGV[13])
for _, n in ipairs(redis.call('HKEYS', KEYS[7])) do
  if tonumber(n) <= closing - keep then
    redis.call('HDEL', KEYS[7], n)
    redis.call('DEL', ARGV[12] .. n .. 'p', ARGV[12] .. n .. 'z')
  end
end
sn, ss, sa = closing + 1, ARGV[9], ARGV[9]
emit('{"k":"c","n":' .. string.format('%d', sn) .. ',"s":' .. ss .. '}')
save()
return {1, string.format('%d', v), e}
"#;

fn key(board: &str, what: &str) -> String {
    format!("crier:{{board:{board}}}:{what}")
}

fn board_of(channel: &str) -> Option<&str> {
    channel.strip_prefix("crier:{board:")?.strip_suffix("}:bc")
}

/// One op as the scripts write it.
#[derive(Deserialize)]
#[serde(tag = "k")]
enum Op {
    /// Changed entries, whole: [player, score, seq, meta or "", subscore (when not 0)].
    #[serde(rename = "s")]
    Scores { e: Vec<Vec<String>> },
    /// New options, and the season's anchor (changed with the schedule).
    #[serde(rename = "o")]
    Options { o: BoardOptions, a: Option<i64> },
    #[serde(rename = "r")]
    Reset,
    /// One player forgotten.
    #[serde(rename = "d")]
    Delete { p: String },
    /// The season closed: the board is empty in season `n`, started at `s`.
    #[serde(rename = "c")]
    Close { n: u64, s: i64 },
}

/// What a mirror needs to take an op.
enum Step {
    Applied,
    /// Versions between the mirror's and this op's are missing.
    Gap(u64),
    /// The board is unknown here or under another epoch.
    Reload,
}

pub struct Shared {
    conn: ConnectionManager,
    client: redis::Client,
    scores: Script,
    options: Script,
    reset: Script,
    delete: Script,
    close: Script,
    /// Woken whenever a mirror moves, for writers waiting to read their own write.
    applied: Notify,
    timeout: Duration,
    /// Options of a board created by its first score batch.
    default_options: String,
}

fn store_error(e: redis::RedisError) -> BoardError {
    tracing::warn!("leaderboard write through redis failed: {e}");
    // Refused before it was sent: nothing was applied. Anything else (a timeout, a
    // connection cut mid-command) may have run in Redis.
    if e.is_connection_refusal() {
        BoardError::Store(format!("redis: {e}"))
    } else {
        BoardError::Unconfirmed(format!("redis: {e}"))
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

fn num<T: std::str::FromStr>(v: &Value) -> Option<T> {
    text(v)?.parse().ok()
}

fn bad_reply() -> BoardError {
    BoardError::Store("redis: unexpected script reply".into())
}

/// An entry as stored in `bp`: `score seq meta`, or `score seq/subscore meta` (meta empty
/// when none).
fn parse_entry(player: &str, s: &str) -> Option<Entry> {
    let mut parts = s.splitn(3, ' ');
    let score = parts.next()?;
    let seq = parts.next()?;
    let meta = parts.next()?;
    entry_of(player, score, seq, meta)
}

/// An entry from its texts: score, `seq` or `seq/subscore`, meta (empty when none).
fn entry_of(player: &str, score: &str, seq: &str, meta: &str) -> Option<Entry> {
    let (seq, subscore) = match seq.split_once('/') {
        Some((q, u)) => (q, u.parse().ok()?),
        None => (seq, 0.0),
    };
    Some(Entry {
        player: player.into(),
        score: score.parse().ok()?,
        subscore,
        achieved: seq.parse().ok()?,
        meta: (!meta.is_empty()).then(|| meta.into()),
    })
}

/// Applies an op to a board; returns whether a live update is due (the top changed, or
/// a followed player's window may have).
fn apply(b: &mut Board, op: Op) -> bool {
    let visible = apply_op(b, op);
    b.top_dirty |= visible;
    b.needs_update()
}

fn apply_op(b: &mut Board, op: Op) -> bool {
    if !matches!(op, Op::Scores { .. }) {
        b.note_moved(0, u64::MAX);
    }
    match op {
        Op::Scores { e } => {
            let top = b.options.top as u64;
            let mut visible = false;
            for fields in e {
                let parsed = match fields.as_slice() {
                    [p, score, seq, meta] => entry_of(p, score, seq, meta),
                    [p, score, seq, meta, sub] => entry_of(p, score, &format!("{seq}/{sub}"), meta),
                    _ => None,
                };
                let Some(entry) = parsed else {
                    tracing::warn!(board = &*b.name, "malformed entry in a board op");
                    continue;
                };
                let player = entry.player.clone();
                let old_rank = b.ranking.rank(&player);
                b.ranking.insert(entry);
                let new_rank = b.ranking.rank(&player).expect("just inserted");
                visible |= new_rank <= top || old_rank.is_some_and(|r| r <= top);
                let other = old_rank.unwrap_or(b.ranking.len() as u64);
                b.note_moved(new_rank, other);
                b.note_touched(&player);
            }
            visible
        }
        Op::Options { o, a } => {
            if b.options.reorders(&o) {
                b.ranking = o.ranking();
            }
            b.schedule = o.schedule();
            b.options = o;
            if let Some(a) = a {
                b.season.anchor = a;
            }
            true
        }
        Op::Reset => {
            super::service::drop_elsewhere(b.ranking.take());
            true
        }
        Op::Delete { p } => {
            let len = b.ranking.len() as u64;
            let Some(rank) = b.ranking.rank(&p) else {
                return false;
            };
            b.ranking.remove(&p);
            b.note_moved(rank, len);
            b.note_touched(&p);
            rank <= b.options.top as u64
        }
        Op::Close { n, s } => {
            super::service::drop_elsewhere(b.ranking.take());
            b.season = SeasonState {
                number: n,
                started: s,
                anchor: s,
            };
            true
        }
    }
}

/// An archive's row in `ba`: `started ended players order`.
fn parse_archived(season: u64, meta: &str) -> Option<ArchivedSeason> {
    let mut parts = meta.split(' ');
    Some(ArchivedSeason {
        season,
        started: parts.next()?.parse().ok()?,
        ended: parts.next()?.parse().ok()?,
        players: parts.next()?.parse().ok()?,
        order: parts.next()?.to_string(),
    })
}

/// The ops of `bl` from version `from` on (at most `CHUNK`), as (version, op text).
fn parse_ops(v: Value) -> Vec<(u64, String)> {
    let Value::Array(items) = v else {
        return Vec::new();
    };
    items
        .into_iter()
        .filter_map(|item| {
            let Value::Array(parts) = item else {
                return None;
            };
            let id = text(parts.first()?)?;
            let version = id.strip_suffix("-0")?.parse().ok()?;
            let Value::Array(fields) = parts.get(1)? else {
                return None;
            };
            Some((version, text(fields.get(1)?)?))
        })
        .collect()
}

/// Writes are scripts on Redis; a write returns once this node's mirror shows it.
#[async_trait::async_trait]
impl BoardStorage for Shared {
    async fn put_options(
        &self,
        boards: &Boards,
        name: &str,
        options: BoardOptions,
    ) -> Result<BoardOptions, BoardError> {
        self.put_board(boards, name, options).await
    }

    /// The budget is held until Redis answers and the mirror shows the batch.
    async fn submit(
        &self,
        boards: &Boards,
        name: &str,
        scores: Vec<ValidScore>,
        max_players: usize,
        _budget: OwnedSemaphorePermit,
    ) -> Result<Vec<ScoreResult>, BoardError> {
        self.submit_scores(boards, name, &scores, max_players).await
    }

    async fn reset(&self, boards: &Boards, name: &str) -> Result<(), BoardError> {
        self.reset_board(boards, name).await
    }

    async fn delete_player(
        &self,
        boards: &Boards,
        name: &str,
        player: &str,
    ) -> Result<Vec<u64>, BoardError> {
        let mut inv = self.invocation(&self.delete, name);
        inv.key(key(name, "ba"));
        inv.arg("").arg("").arg(name).arg(KEPT_OPS).arg("").arg("");
        inv.arg(player).arg(key(name, "s"));
        let reply = self.run(inv).await?;
        match num::<u8>(reply.first().ok_or_else(bad_reply)?) {
            Some(0) => return Err(BoardError::NoBoard(name.into())),
            Some(4) => {
                return Err(BoardError::NoPlayer {
                    board: name.into(),
                    player: player.into(),
                })
            }
            _ => {}
        }
        let (v, epoch) = Self::version(&reply)?;
        let mut seasons: Vec<u64> = reply[3..].iter().filter_map(num).collect();
        seasons.sort_unstable();
        self.wait_mirror(boards, name, &epoch, v).await;
        Ok(seasons)
    }

    async fn close_season(&self, boards: &Boards, name: &str, now: i64) -> Result<(), BoardError> {
        self.close_board_season(boards, name, now).await
    }

    async fn seasons(&self, _: &Boards, name: &str) -> Result<Vec<ArchivedSeason>, BoardError> {
        let mut conn = self.conn.clone();
        let all: Vec<(u64, String)> = redis::cmd("HGETALL")
            .arg(key(name, "ba"))
            .query_async(&mut conn)
            .await
            .map_err(store_error)?;
        let mut out: Vec<ArchivedSeason> = all
            .into_iter()
            .filter_map(|(n, meta)| parse_archived(n, &meta))
            .collect();
        out.sort_by_key(|a| std::cmp::Reverse(a.season));
        Ok(out)
    }

    async fn season(
        &self,
        _: &Boards,
        name: &str,
        season: u64,
    ) -> Result<Option<(ArchivedSeason, Vec<StoredEntry>)>, BoardError> {
        let mut conn = self.conn.clone();
        let meta: Option<String> = redis::cmd("HGET")
            .arg(key(name, "ba"))
            .arg(season)
            .query_async(&mut conn)
            .await
            .map_err(store_error)?;
        let Some(info) = meta.and_then(|m| parse_archived(season, &m)) else {
            return Ok(None);
        };
        let mut entries = Vec::new();
        let mut cursor = 0u64;
        loop {
            let (next, flat): (u64, Vec<String>) = redis::cmd("HSCAN")
                .arg(key(name, &format!("s{season}p")))
                .arg(cursor)
                .arg("COUNT")
                .arg(CHUNK)
                .query_async(&mut conn)
                .await
                .map_err(store_error)?;
            for pair in flat.chunks_exact(2) {
                if let Some(e) = parse_entry(&pair[0], &pair[1]) {
                    entries.push(StoredEntry {
                        player: e.player.to_string(),
                        score: e.score,
                        subscore: e.subscore,
                        achieved: e.achieved,
                        meta: e.meta.map(|m| m.to_string()),
                    });
                }
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        Ok(Some((info, entries)))
    }

    /// Writes are answered by Redis as they come; the follower task stops with `Boards`.
    fn close(&self) {}
}

impl Shared {
    /// Subscribes to every board's ops, loads every board into `boards`, then keeps the
    /// mirrors following Redis on a task until `stop`.
    pub async fn start(
        self: &Arc<Self>,
        boards: &Arc<Boards>,
        stop: CancellationToken,
    ) -> anyhow::Result<tokio::task::JoinHandle<()>> {
        let shared = self.clone();
        let mut pubsub = shared.client.get_async_pubsub().await?;
        pubsub.psubscribe(PATTERN).await?;
        shared.load_all(boards).await?;
        let me = Arc::downgrade(boards);
        Ok(tokio::spawn(shared.clone().follow(me, pubsub, stop)))
    }

    pub fn new(
        conn: ConnectionManager,
        client: redis::Client,
        timeout: Duration,
        default_options: BoardOptions,
    ) -> Self {
        // `NOW`: where a script finds the node's clock, for the season of a board it creates.
        let script =
            |now: &str, body: &str| Script::new(&format!("local NOW = {now}\n{PROLOGUE}{body}"));
        Shared {
            conn,
            client,
            scores: script("ARGV[#ARGV]", SCORES),
            options: script("ARGV[6]", OPTIONS),
            reset: script("nil", RESET),
            delete: script("nil", DELETE),
            close: script("nil", CLOSE),
            applied: Notify::new(),
            timeout,
            default_options: serde_json::to_string(&default_options).expect("options"),
        }
    }

    fn invocation<'a>(&self, script: &'a Script, name: &str) -> redis::ScriptInvocation<'a> {
        let mut inv = script.prepare_invoke();
        for what in ["bo", "bp", "bz", "bl", "bc"] {
            inv.key(key(name, what));
        }
        inv.key(BOARDS);
        inv
    }

    async fn run(&self, inv: redis::ScriptInvocation<'_>) -> Result<Vec<Value>, BoardError> {
        let mut conn = self.conn.clone();
        // Bounded like the broker's commands: while the connection manager reconnects, a
        // command waits for the attempt before it is even sent, past any response timeout.
        let answer = tokio::time::timeout(self.timeout, inv.invoke_async::<Value>(&mut conn))
            .await
            .unwrap_or_else(|_| {
                Err(redis::RedisError::from((
                    redis::ErrorKind::IoError,
                    "timed out",
                )))
            });
        match answer {
            Ok(Value::Array(v)) => Ok(v),
            Ok(_) => Err(bad_reply()),
            Err(e) => Err(store_error(e)),
        }
    }

    pub async fn submit_scores(
        &self,
        boards: &Boards,
        name: &str,
        scores: &[ValidScore],
        max_players: usize,
    ) -> Result<Vec<ScoreResult>, BoardError> {
        // A season this node's clock says is over is closed first (once for the cluster),
        // so a batch posted past the boundary lands in the new season.
        let now = boards.clock().now_ms();
        let due = boards.get(name).is_some_and(|b| {
            let b = b.lock();
            b.persisted && b.ends().is_some_and(|end| now >= end)
        });
        if due {
            self.close_board_season(boards, name, now).await?;
        }
        let mut inv = self.invocation(&self.scores, name);
        inv.arg(&self.default_options)
            .arg(&*new_epoch())
            .arg(name)
            .arg(KEPT_OPS)
            .arg(boards.max_boards())
            .arg(max_players);
        for (player, score, meta, sub) in scores {
            inv.arg(player)
                .arg(format!("{score}"))
                .arg(meta.as_deref().unwrap_or(""))
                .arg(sub.map(|u| format!("{u}")).unwrap_or_default());
        }
        inv.arg(now);
        let reply = self.run(inv).await?;
        let status = num::<u8>(reply.first().ok_or_else(bad_reply)?);
        if status == Some(2) {
            return Err(BoardError::TooManyBoards(boards.max_boards()));
        }
        if status == Some(3) {
            let at = |k: usize| reply.get(k).and_then(num).ok_or_else(bad_reply);
            return Err(BoardError::TooManyPlayers {
                board: name.into(),
                players: at(1)?,
                new: at(2)?,
                max: max_players,
            });
        }
        if status == Some(5) {
            let i: usize = reply.get(1).and_then(num).ok_or_else(bad_reply)?;
            return Err(super::service::no_tiebreak(name, i));
        }
        if status == Some(0) {
            let i: usize = reply.get(1).and_then(num).ok_or_else(bad_reply)?;
            let player = &scores.get(i).ok_or_else(bad_reply)?.0;
            return Err(BoardError::Invalid(format!(
                "entry {i}: player {player:?}'s total would leave ±{:e}",
                super::service::MAX_ABS_SCORE
            )));
        }
        let (v, epoch) = Self::version(&reply)?;
        let season: u64 = reply.get(3).and_then(num).ok_or_else(bad_reply)?;
        let mut results = Vec::with_capacity(scores.len());
        for (i, (player, ..)) in scores.iter().enumerate() {
            let at = |k: usize| reply.get(4 + 3 * i + k).ok_or_else(bad_reply);
            results.push(ScoreResult {
                player: player.as_str().into(),
                rank: num(at(0)?).ok_or_else(bad_reply)?,
                score: num(at(1)?).ok_or_else(bad_reply)?,
                changed: num::<u8>(at(2)?) == Some(1),
                season,
            });
        }
        boards.metrics.scores.inc_by(results.len() as u64);
        self.wait_mirror(boards, name, &epoch, v).await;
        Ok(results)
    }

    pub async fn put_board(
        &self,
        boards: &Boards,
        name: &str,
        options: BoardOptions,
    ) -> Result<BoardOptions, BoardError> {
        let order = serde_json::to_value(options.order).expect("order");
        let mut inv = self.invocation(&self.options, name);
        inv.arg(serde_json::to_string(&options).expect("options"))
            .arg(&*new_epoch())
            .arg(name)
            .arg(KEPT_OPS)
            .arg(boards.max_boards())
            .arg(boards.clock().now_ms())
            .arg(order.as_str().unwrap_or("high"));
        let reply = self.run(inv).await?;
        let status = num::<u8>(reply.first().ok_or_else(bad_reply)?);
        if status == Some(2) {
            return Err(BoardError::TooManyBoards(boards.max_boards()));
        }
        if status == Some(0) {
            return Err(BoardError::Conflict(
                "the order or tiebreak of a board with players cannot change; reset it first"
                    .into(),
            ));
        }
        let (v, epoch) = Self::version(&reply)?;
        self.wait_mirror(boards, name, &epoch, v).await;
        Ok(options)
    }

    pub async fn reset_board(&self, boards: &Boards, name: &str) -> Result<(), BoardError> {
        let mut inv = self.invocation(&self.reset, name);
        inv.arg("").arg("").arg(name).arg(KEPT_OPS).arg("").arg("");
        let reply = self.run(inv).await?;
        if num::<u8>(reply.first().ok_or_else(bad_reply)?) == Some(0) {
            return Err(BoardError::NoBoard(name.into()));
        }
        let (v, epoch) = Self::version(&reply)?;
        self.wait_mirror(boards, name, &epoch, v).await;
        Ok(())
    }

    /// Closes the board's season if this node's mirror says it is over at `now`; the script
    /// does nothing when Redis is past that season (another node closed it first).
    async fn close_board_season(
        &self,
        boards: &Boards,
        name: &str,
        now: i64,
    ) -> Result<(), BoardError> {
        let Some(board) = boards.get(name) else {
            return Ok(());
        };
        let (closing, ended, next, players, order, keep) = {
            let b = board.lock();
            let Some(schedule) = b.schedule.clone() else {
                return Ok(());
            };
            let Some(ended) = b.ends().filter(|end| now >= *end) else {
                return Ok(());
            };
            (
                b.season.number,
                ended,
                b.season.next(&schedule, now),
                b.ranking.len(),
                b.options.archived_order(),
                b.options.keep(),
            )
        };
        let mut inv = self.invocation(&self.close, name);
        inv.key(key(name, "ba"));
        inv.arg("")
            .arg("")
            .arg(name)
            .arg(KEPT_OPS)
            .arg("")
            .arg("")
            .arg(closing)
            .arg(ended)
            .arg(next.started)
            .arg(players)
            .arg(order)
            .arg(key(name, "s"))
            .arg(keep);
        let reply = self.run(inv).await?;
        match num::<u8>(reply.first().ok_or_else(bad_reply)?) {
            Some(1) => {
                let (v, epoch) = Self::version(&reply)?;
                self.wait_mirror(boards, name, &epoch, v).await;
            }
            // Closed by another node: its op reaches this mirror through pub/sub.
            Some(3) | Some(0) => {}
            _ => return Err(bad_reply()),
        }
        Ok(())
    }

    fn version(reply: &[Value]) -> Result<(u64, String), BoardError> {
        let v = reply.get(1).and_then(num).ok_or_else(bad_reply)?;
        let e = reply.get(2).and_then(text).ok_or_else(bad_reply)?;
        Ok((v, e))
    }

    /// Waits (at most `redis_timeout`) until this node's mirror of the board holds version
    /// `v`, so the writer reads its own write here.
    async fn wait_mirror(&self, boards: &Boards, name: &str, epoch: &str, v: u64) {
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let notified = self.applied.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let reached = boards.get(name).is_some_and(|b| {
                let b = b.lock();
                *b.epoch != *epoch || b.mirror >= v
            });
            if reached {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                tracing::warn!(board = name, v, "mirror did not reach the write in time");
                return;
            }
        }
    }

    /// Loads every board named in `crier:boards` (in chunks).
    async fn load_all(&self, boards: &Boards) -> Result<(), redis::RedisError> {
        let mut conn = self.conn.clone();
        let mut names: HashSet<String> = boards.names().into_iter().collect();
        let mut cursor = 0u64;
        loop {
            let (next, chunk): (u64, Vec<String>) = redis::cmd("SSCAN")
                .arg(BOARDS)
                .arg(cursor)
                .arg("COUNT")
                .arg(CHUNK)
                .query_async(&mut conn)
                .await?;
            names.extend(chunk);
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        for name in names {
            self.catch_up(boards, &name).await?;
        }
        Ok(())
    }

    /// Brings one board's mirror up to Redis: the ops it missed, or a reload.
    async fn catch_up(&self, boards: &Boards, name: &str) -> Result<(), redis::RedisError> {
        let mut conn = self.conn.clone();
        let (v, e): (Option<u64>, Option<String>) = redis::cmd("HMGET")
            .arg(key(name, "bo"))
            .arg("v")
            .arg("e")
            .query_async(&mut conn)
            .await?;
        let mirror = boards.get(name).map(|b| {
            let b = b.lock();
            (b.mirror, b.epoch.clone())
        });
        match (mirror, v, e) {
            (Some((m, me)), Some(v), Some(e)) if *me == *e && m <= v => {
                if !self.fill(boards, name, m, u64::MAX).await? {
                    self.load(boards, name).await?;
                }
            }
            _ => self.load(boards, name).await?,
        }
        Ok(())
    }

    /// Applies the ops after version `from` up to `to` from `bl`. False when one is no
    /// longer there (trimmed) or the board moved under another epoch: reload it then.
    async fn fill(
        &self,
        boards: &Boards,
        name: &str,
        mut from: u64,
        to: u64,
    ) -> Result<bool, redis::RedisError> {
        let mut conn = self.conn.clone();
        while from < to {
            let end = if to == u64::MAX {
                "+".to_string()
            } else {
                format!("{to}-0")
            };
            let reply: Value = redis::cmd("XRANGE")
                .arg(key(name, "bl"))
                .arg(format!("{}-0", from + 1))
                .arg(end)
                .arg("COUNT")
                .arg(CHUNK)
                .query_async(&mut conn)
                .await?;
            let ops = parse_ops(reply);
            if ops.is_empty() {
                return Ok(to == u64::MAX);
            }
            let Some(board) = boards.get(name) else {
                return Ok(false);
            };
            for (v, op) in ops {
                if v != from + 1 {
                    return Ok(false);
                }
                let Ok(op) = serde_json::from_str::<Op>(&op) else {
                    return Ok(false);
                };
                let mut b = board.lock();
                if b.mirror != from {
                    return Ok(false);
                }
                if apply(&mut b, op) {
                    boards.dirty_mark(name);
                }
                b.mirror = v;
                b.next_seq = v;
                from = v;
            }
            self.applied.notify_waiters();
        }
        Ok(true)
    }

    /// Reads the board afresh: its options and version, its entries in chunks, then the
    /// ops written meanwhile (entries are whole, so one seen both ways is harmless, and a
    /// reset replayed clears what was read before it).
    async fn load(&self, boards: &Boards, name: &str) -> Result<(), redis::RedisError> {
        let mut conn = self.conn.clone();
        for _ in 0..3 {
            #[allow(clippy::type_complexity)]
            let (opt, v, e, sn, ss, sa): (
                Option<String>,
                Option<u64>,
                Option<String>,
                Option<u64>,
                Option<i64>,
                Option<i64>,
            ) = redis::cmd("HMGET")
                .arg(key(name, "bo"))
                .arg("opt")
                .arg("v")
                .arg("e")
                .arg("sn")
                .arg("ss")
                .arg("sa")
                .query_async(&mut conn)
                .await?;
            let (Some(opt), Some(v), Some(e)) = (opt, v, e) else {
                // Redis no longer has it (lost without persistence, or flushed).
                boards.remove(name);
                self.applied.notify_waiters();
                return Ok(());
            };
            let options: BoardOptions = serde_json::from_str(&opt).unwrap_or_default();
            let mut ranking = options.ranking();
            let mut cursor = 0u64;
            loop {
                let (next, flat): (u64, Vec<String>) = redis::cmd("HSCAN")
                    .arg(key(name, "bp"))
                    .arg(cursor)
                    .arg("COUNT")
                    .arg(CHUNK)
                    .query_async(&mut conn)
                    .await?;
                for pair in flat.chunks_exact(2) {
                    if let Some(entry) = parse_entry(&pair[0], &pair[1]) {
                        ranking.insert(entry);
                    }
                }
                cursor = next;
                if cursor == 0 {
                    break;
                }
            }
            let board = boards.get_or_mirror(name);
            {
                let mut b = board.lock();
                b.schedule = options.schedule();
                b.options = options;
                b.ranking = ranking;
                b.top_dirty = true;
                b.note_moved(0, u64::MAX);
                if let (Some(number), Some(started)) = (sn, ss) {
                    b.season = SeasonState {
                        number,
                        started,
                        anchor: sa.unwrap_or(started),
                    };
                }
                b.epoch = e.into();
                b.mirror = v;
                b.next_seq = v;
                b.persisted = true;
            }
            if self.fill(boards, name, v, u64::MAX).await? {
                boards.dirty_mark(name);
                self.applied.notify_waiters();
                return Ok(());
            }
        }
        tracing::warn!(
            board = name,
            "board kept changing while loading; retrying later"
        );
        Ok(())
    }

    /// One board op from pub/sub: `v:epoch:op`.
    async fn on_op(&self, boards: &Boards, name: &str, payload: &[u8]) {
        let text = String::from_utf8_lossy(payload);
        let mut parts = text.splitn(3, ':');
        let (Some(v), Some(epoch), Some(op)) = (parts.next(), parts.next(), parts.next()) else {
            return;
        };
        let Ok(v) = v.parse::<u64>() else { return };
        let step = match boards.get(name) {
            None => Step::Reload,
            Some(board) => {
                let mut b = board.lock();
                if *b.epoch != *epoch {
                    Step::Reload
                } else if v <= b.mirror {
                    Step::Applied
                } else if v > b.mirror + 1 {
                    Step::Gap(b.mirror)
                } else {
                    match serde_json::from_str::<Op>(op) {
                        Ok(op) => {
                            if matches!(op, Op::Delete { .. }) {
                                // Closed seasons forgot the player too.
                                boards.forget_archives(name);
                            }
                            if apply(&mut b, op) {
                                boards.dirty_mark(name);
                            }
                            b.mirror = v;
                            b.next_seq = v;
                            Step::Applied
                        }
                        Err(_) => Step::Reload,
                    }
                }
            }
        };
        let done = match step {
            Step::Applied => Ok(()),
            Step::Gap(from) => match self.fill(boards, name, from, v).await {
                Ok(true) => Ok(()),
                Ok(false) => self.load(boards, name).await,
                Err(e) => Err(e),
            },
            Step::Reload => self.load(boards, name).await,
        };
        if let Err(e) = done {
            tracing::warn!(board = name, "board mirror not updated: {e}");
        }
        self.applied.notify_waiters();
    }

    /// Follows every board's ops until `stop`; reconnects a lost pub/sub connection with
    /// back-off and then catches every board up.
    async fn follow(
        self: Arc<Self>,
        boards: Weak<Boards>,
        first: redis::aio::PubSub,
        stop: CancellationToken,
    ) {
        let mut next = Some(first);
        let mut backoff = Duration::from_millis(100);
        loop {
            let pubsub = match next.take() {
                Some(p) => p,
                None => {
                    let connect = async {
                        let mut p = self.client.get_async_pubsub().await?;
                        p.psubscribe(PATTERN).await?;
                        Ok::<_, redis::RedisError>(p)
                    };
                    let got = tokio::select! {
                        _ = stop.cancelled() => return,
                        r = tokio::time::timeout(self.timeout, connect) => r,
                    };
                    let Ok(Ok(p)) = got else {
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    };
                    let Some(b) = boards.upgrade() else { return };
                    if let Err(e) = self.load_all(&b).await {
                        tracing::warn!("board mirrors not caught up: {e}");
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                    backoff = Duration::from_millis(100);
                    tracing::info!("board mirrors caught up after reconnecting to redis");
                    p
                }
            };
            let mut messages = pubsub.into_on_message();
            loop {
                let msg = tokio::select! {
                    _ = stop.cancelled() => return,
                    m = messages.next() => m,
                };
                let Some(msg) = msg else { break };
                let Some(b) = boards.upgrade() else { return };
                if let Some(name) = board_of(msg.get_channel_name()) {
                    self.on_op(&b, name, msg.get_payload_bytes()).await;
                }
            }
            tracing::error!("the redis pub/sub connection of the boards was lost: reconnecting");
        }
    }
}
