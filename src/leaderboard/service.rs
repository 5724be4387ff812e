//! The leaderboard service: boards in memory (ranking), made durable by the store's group
//! commit, and shown live through the hub as retained, conflated `board:{name}` topics.
//!
//! # Writes: what is shown is what is durable
//!
//! Every write (score batch, options, reset) goes through the same three steps:
//!
//! 1. Wait for room in the store writer's queue ([`StoreWriter::reserve`]), holding no lock.
//! 2. Under the board's lock, compute the write against the board's *pending view* (the
//!    durable board plus every write queued before this one, see [`Pending`]), record it in
//!    that view, and queue its store ops. Queueing under the lock makes the queue order the
//!    order in which writes were computed on top of each other, and the writer commits in
//!    queue order, so apply order equals commit order.
//! 3. The writer calls the write's completion on its own task, in queue order, right after
//!    the fsync: on success it applies the write to the durable ranking, which is the only
//!    one ever read or published, then acknowledges. On failure it drops the whole pending
//!    view (every later queued write of the board was computed on top of the failed one)
//!    and bumps the board's guard generation, so the writer refuses those later writes
//!    instead of committing them. Memory then equals the disk again.
//!
//! Why not a per-board async mutex held across the commit: it would serialise a board's
//! writes to one fsync each, while the pending view lets any number of concurrent posts to
//! one board share one group commit. The lock held in step 2 is a plain `parking_lot`
//! mutex, never held across an `.await`: the queue send is synchronous because room was
//! reserved in step 1.
//!
//! A board that no commit has created yet is invisible (404) until one does.
//!
//! The update task publishes dirty boards with a leading-and-trailing throttle: a change
//! after a quiet spell goes out at once, and any number of changes within
//! `board_update_interval` after it coalesce into one update carrying the newest state.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::{oneshot, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::ranking::{combine, Entry, Ranking, Rules, ScoreMode, SortOrder};
use super::season::{
    check_season_options, rfc3339, Schedule, SeasonState, WallClock, DEFAULT_KEEP_SEASONS,
};
use super::shared::Shared;
use super::storage::BoardStorage;
use super::store::{ArchivedSeason, Guard, Store, StoreError, StoreOp, StoreWriter, StoredEntry};
use crate::auth::TopicPattern;
use crate::broker::cluster_counts::ClusterCounts;
use crate::broker::{Broker, PublishRequest};
use crate::config::BoardPolicyConfig;
use crate::config::{Config, MAX_BOARD_TOP};
use crate::hub::Hub;
use crate::metrics::Metrics;

/// Scores beyond ±1e15 are refused: every integer up to there is exact in an f64, so
/// increments never lose precision silently.
pub const MAX_ABS_SCORE: f64 = 1e15;
pub const MAX_PLAYER_LEN: usize = 128;
pub const MAX_META_BYTES: usize = 512;
pub const MAX_BATCH: usize = 1000;
pub use crier_protocol::names::MAX_BOARD_NAME;
/// Bytes of score data that may wait for the disk at once (in the store writer's queue and
/// in the boards' pending views). The queue is also bounded in requests, but a request
/// can carry a 1 MiB batch; past this budget posts wait for commits before being read
/// into the queue, so a slow disk costs clients latency, not the server memory.
pub const MAX_QUEUED_SCORE_BYTES: usize = 64 << 20;
/// Bookkeeping per queued score beyond its player and meta text (entry, op, map slot).
const QUEUED_SCORE_OVERHEAD: usize = 160;
/// How often watcher counts are compared with what was last shown (and the followed
/// players' topics looked up).
const WATCHER_CHECK: Duration = Duration::from_secs(1);
/// Topics that just got a follower or a friends view watcher, held for the update task
/// (beyond it, the next watcher check finds them).
const MAX_JOINED: usize = 10_000;
/// Neighbours shown above and below a followed player (`board:{b}@{player}`).
pub const WINDOW: usize = 5;
/// Windows recomputed per update for followed players who only shifted (someone passed
/// them or left): a score on a busy board shifts every rank between its old and new place,
/// so with random scores nearly every window is stale after each update. The players whose
/// own entry changed always go out in the next update; the shifted ones are refreshed in
/// FIFO order at this many per update (10,000 per second at the default 50 ms), which
/// keeps the board's lock, and so its posters, free of a pass over every follower.
const SHIFTED_PER_UPDATE: usize = 500;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BoardOptions {
    pub order: SortOrder,
    pub mode: ScoreMode,
    pub top: usize,
    /// Equal scores are ordered by the posted `subscore`, higher (`high`) or lower (`low`)
    /// first, before who reached the score first; none: scores carry no subscore.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tiebreak: Option<SortOrder>,
    /// The season schedule: a cron expression (`0 0 * * MON`); none means one endless
    /// season (`season.rs`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reset: Option<String>,
    /// The IANA zone `reset` is read in; UTC when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// Closed seasons kept ([`DEFAULT_KEEP_SEASONS`] when absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_seasons: Option<usize>,
}

impl Default for BoardOptions {
    fn default() -> Self {
        BoardOptions {
            order: SortOrder::High,
            mode: ScoreMode::Best,
            top: 10,
            tiebreak: None,
            reset: None,
            timezone: None,
            keep_seasons: None,
        }
    }
}

impl BoardOptions {
    /// The parsed schedule; options are checked before they are stored, so a stored
    /// schedule that no longer parses (never expected) counts as none.
    pub fn schedule(&self) -> Option<Schedule> {
        let reset = self.reset.as_deref()?;
        Schedule::parse(reset, self.timezone.as_deref()).ok()
    }

    pub fn keep(&self) -> usize {
        self.keep_seasons.unwrap_or(DEFAULT_KEEP_SEASONS)
    }

    pub fn rules(&self) -> Rules {
        Rules {
            order: self.order,
            tiebreak: self.tiebreak,
            mode: self.mode,
        }
    }

    /// An empty ranking ordered by these options.
    pub fn ranking(&self) -> Ranking {
        Ranking::with_tiebreak(self.order, self.tiebreak)
    }

    /// Whether going from `self` to `new` would reorder the entries (`order` or
    /// `tiebreak` changes), which a board with players refuses.
    pub fn reorders(&self, new: &BoardOptions) -> bool {
        self.order != new.order || self.tiebreak != new.tiebreak
    }

    /// How an archive records the ranking rules: `high`, `low`, or with a tie-break
    /// `high/low` (order/tiebreak).
    pub fn archived_order(&self) -> String {
        let name = |o: SortOrder| match o {
            SortOrder::High => "high",
            SortOrder::Low => "low",
        };
        match self.tiebreak {
            None => name(self.order).into(),
            Some(t) => format!("{}/{}", name(self.order), name(t)),
        }
    }
}

/// The ranking an archive's `order` text (see [`BoardOptions::archived_order`]) describes.
pub fn archived_ranking(order: &str) -> Ranking {
    let parse = |s: &str| match s {
        "low" => SortOrder::Low,
        _ => SortOrder::High,
    };
    let mut parts = order.splitn(2, '/');
    let o = parse(parts.next().unwrap_or(""));
    Ranking::with_tiebreak(o, parts.next().map(parse))
}

/// One score as posted.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoreInput {
    pub player: Option<String>,
    pub score: Option<serde_json::Number>,
    /// Breaks ties between equal scores, on boards with a `tiebreak` only.
    pub subscore: Option<serde_json::Number>,
    pub meta: Option<Box<RawValue>>,
}

#[derive(Debug, Serialize, Clone)]
pub struct ScoreResult {
    pub player: Arc<str>,
    pub rank: u64,
    #[serde(serialize_with = "score_json")]
    pub score: f64,
    /// Whether this post changed the player's stored entry (a worse score in `best` mode
    /// does not).
    pub changed: bool,
    /// The season the batch landed in (told once per answer, not per entry).
    #[serde(skip)]
    pub season: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum BoardError {
    #[error("{0}")]
    Invalid(String),
    #[error("no board named {0:?}")]
    NoBoard(String),
    #[error("no player {player:?} on board {board:?}")]
    NoPlayer { board: String, player: String },
    #[error("{0}")]
    Conflict(String),
    /// A subscore posted to a board without a tiebreak.
    #[error("{0}")]
    NoTiebreak(String),
    #[error("the score store failed: {0}")]
    Store(String),
    /// Under Redis: the write was sent but not confirmed (a stalled Redis, a cut
    /// connection), so Redis may still apply it.
    #[error("the score store did not confirm the write: {0}")]
    Unconfirmed(String),
    /// A new board past `max_boards`: nothing was created.
    #[error(
        "the node holds max_boards ({0}) boards: no new board can be created; \
         existing boards keep working"
    )]
    TooManyBoards(usize),
    /// The batch would add players past the board's cap: nothing of it was applied.
    #[error(
        "board {board:?} holds {players} players and this batch adds {new}, past its \
         max_players_per_board ({max}); nothing of the batch was applied, and its players \
         already on the board can still post"
    )]
    TooManyPlayers {
        board: String,
        players: usize,
        new: usize,
        max: usize,
    },
}

#[derive(Serialize)]
pub struct RankedEntry<'a> {
    pub rank: u64,
    pub player: &'a str,
    #[serde(serialize_with = "score_json")]
    pub score: f64,
    /// Shown on boards with a `tiebreak` only.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "subscore_json"
    )]
    pub subscore: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meta: Option<&'a RawValue>,
}

/// Whole scores are written as JSON integers (`300`, not `300.0`), as a game posted them.
fn score_json<S: serde::Serializer>(score: &f64, s: S) -> Result<S::Ok, S::Error> {
    if score.fract() == 0.0 && score.abs() <= MAX_ABS_SCORE {
        s.serialize_i64(*score as i64)
    } else {
        s.serialize_f64(*score)
    }
}

fn subscore_json<S: serde::Serializer>(sub: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
    score_json(&sub.unwrap_or_default(), s)
}

/// Entries as the API shows them; `subscore` says whether the board has a tie-break (so
/// each entry shows its subscore).
pub fn ranked(list: &[(u64, Entry)], subscore: bool) -> Vec<RankedEntry<'_>> {
    list.iter()
        .map(|(rank, e)| RankedEntry {
            rank: *rank,
            player: &e.player,
            score: e.score,
            subscore: subscore.then_some(e.subscore),
            // Stored meta was validated as JSON on the way in.
            meta: e.meta.as_deref().and_then(|m| serde_json::from_str(m).ok()),
        })
        .collect()
}

pub(super) struct Board {
    pub(super) name: Arc<str>,
    topic: String,
    /// Durable options, ranking and clock: exactly what the store holds (once `persisted`).
    pub(super) options: BoardOptions,
    pub(super) ranking: Ranking,
    /// The next `achieved` seq; under Redis the mirrored op version instead, so no node
    /// shows a snapshot version below it.
    pub(super) next_seq: u64,
    /// Strictly increases with every update published while the process runs.
    version: u64,
    last_published: Option<Instant>,
    shown_watchers: usize,
    /// Whether the store knows this board. Until a commit that creates it succeeds, the
    /// board is invisible and every write to it carries the create op.
    pub(super) persisted: bool,
    pending: Pending,
    /// Under Redis: the version of the last op this mirror applied, and the board's epoch
    /// in Redis (another one means Redis lost the board). Unused on one node.
    pub(super) mirror: u64,
    pub(super) epoch: Arc<str>,
    /// The durable current season, and the durable options' schedule.
    pub(super) season: SeasonState,
    pub(super) schedule: Option<Schedule>,
    /// Whether the top (or the counts) changed since the last snapshot.
    pub(super) top_dirty: bool,
    /// Players followed on this node (`board:{b}@{player}` has local subscribers), with a
    /// hash of the window last published (`None`: none yet).
    watched: HashMap<Arc<str>, Option<u64>>,
    /// Friends views watched on this node, by topic (`friends.rs`).
    friends: HashMap<Arc<str>, super::friends::Watch>,
    /// The ranks whose entries changed since the windows were last published: only the
    /// windows overlapping them are recomputed.
    pub(super) moved: Option<(u64, u64)>,
    /// Followed players whose own entry changed since the last update: their windows go
    /// out first, all of them (at most one per followed player).
    touched: HashSet<Arc<str>>,
    /// Followed players whose window may have shifted, in the order found, not yet
    /// recomputed (at most one per followed player; see [`SHIFTED_PER_UPDATE`]).
    shifted: VecDeque<Arc<str>>,
    shifted_set: HashSet<Arc<str>>,
}

/// What the writes queued but not yet committed will make of a board: the view new writes
/// are computed against. Holds only what those writes change, so its size is bounded by
/// the writer's queue (at most one entry per player).
struct Pending {
    /// Bumped when a write of this board fails; queued writes computed before that carry
    /// the old value and are refused by the writer (see [`Guard`]).
    generation: Arc<AtomicU64>,
    /// Id of the next write; ids say which write last touched a pending item.
    next_write: u64,
    next_seq: u64,
    options: Option<(u64, BoardOptions)>,
    /// The schedule of the queued options (meaningful while `options` is set).
    schedule: Option<Schedule>,
    /// A queued season change (a close, a new schedule's anchor): the view's season.
    season: Option<(u64, SeasonState)>,
    /// A queued reset (or season close): durable entries are not part of the view.
    reset: Option<u64>,
    entries: HashMap<Arc<str>, (u64, Entry)>,
    /// Players whose deletion is queued (by write id): not in the view unless `entries`
    /// has them again. They still count in `view_len` until the delete is durable, which
    /// only makes the player cap stricter meanwhile.
    deleted: HashMap<Arc<str>, u64>,
    /// Players in `entries` the durable ranking does not hold, kept while no reset is
    /// queued (and recounted when the reset applies): the view's size in O(1), which the
    /// player cap is checked against.
    fresh: usize,
}

impl Pending {
    fn new(generation: Arc<AtomicU64>, next_seq: u64) -> Self {
        Pending {
            generation,
            next_write: 0,
            next_seq,
            options: None,
            schedule: None,
            season: None,
            reset: None,
            entries: HashMap::new(),
            deleted: HashMap::new(),
            fresh: 0,
        }
    }
}

impl Board {
    fn new(name: Arc<str>, options: BoardOptions, next_seq: u64, now: i64) -> Self {
        Board {
            topic: crate::topic::board_topic(&name),
            name,
            ranking: options.ranking(),
            schedule: options.schedule(),
            season: SeasonState::first(now),
            top_dirty: true,
            watched: HashMap::new(),
            friends: HashMap::new(),
            moved: None,
            touched: HashSet::new(),
            shifted: VecDeque::new(),
            shifted_set: HashSet::new(),
            options,
            next_seq,
            version: next_seq,
            last_published: None,
            shown_watchers: 0,
            persisted: false,
            pending: Pending::new(Arc::new(AtomicU64::new(0)), next_seq),
            mirror: 0,
            epoch: "".into(),
        }
    }

    fn view_options(&self) -> &BoardOptions {
        self.pending
            .options
            .as_ref()
            .map_or(&self.options, |(_, o)| o)
    }

    fn view_schedule(&self) -> Option<&Schedule> {
        if self.pending.options.is_some() {
            self.pending.schedule.as_ref()
        } else {
            self.schedule.as_ref()
        }
    }

    fn view_season(&self) -> SeasonState {
        self.pending.season.map_or(self.season, |(_, s)| s)
    }

    /// Whether the view's season is over at `now`: a write must close it first.
    fn close_due(&self, now: i64) -> bool {
        self.view_season()
            .ends(self.view_schedule())
            .is_some_and(|end| now >= end)
    }

    /// When the current (durable) season ends, if it has a schedule.
    pub(super) fn ends(&self) -> Option<i64> {
        self.season.ends(self.schedule.as_ref())
    }

    /// Notes that the entries between ranks `a` and `b` (either order) changed.
    pub(super) fn note_moved(&mut self, a: u64, b: u64) {
        let (lo, hi) = (a.min(b), a.max(b));
        self.moved = Some(self.moved.map_or((lo, hi), |(l, h)| (l.min(lo), h.max(hi))));
    }

    /// Notes that `player`'s own entry changed (a score, a delete): if they are followed
    /// here, their window goes out with the next update, ahead of the shifted ones.
    pub(super) fn note_touched(&mut self, player: &str) {
        if let Some((p, _)) = self.watched.get_key_value(player) {
            let p = p.clone();
            self.touched.insert(p);
        }
    }

    /// Whether a live update is due after a change: the top moved, or a followed player's
    /// window may have (or still waits in the shifted queue).
    pub(super) fn needs_update(&self) -> bool {
        self.top_dirty
            || (self.moved.is_some() && !(self.watched.is_empty() && self.friends.is_empty()))
            || !(self.watched.is_empty() || (self.touched.is_empty() && self.shifted.is_empty()))
    }

    fn view_entry(&self, player: &str) -> Option<&Entry> {
        match self.pending.entries.get(player) {
            Some((_, e)) => Some(e),
            None if self.pending.reset.is_some() => None,
            None if self.pending.deleted.contains_key(player) => None,
            None => self.ranking.get(player),
        }
    }

    /// Players the pending view holds: with a reset queued, those queued after it; else
    /// the durable ranking plus the queued players it does not hold yet.
    fn view_len(&self) -> usize {
        if self.pending.reset.is_some() {
            self.pending.entries.len()
        } else {
            self.ranking.len() + self.pending.fresh
        }
    }

    /// Records a computed entry in the pending view.
    fn pend(&mut self, id: u64, e: Entry) {
        if self.pending.reset.is_none()
            && !self.pending.entries.contains_key(&e.player)
            && self.ranking.get(&e.player).is_none()
        {
            self.pending.fresh += 1;
        }
        self.pending.entries.insert(e.player.clone(), (id, e));
    }

    fn view_is_empty(&self) -> bool {
        self.pending.entries.is_empty() && (self.pending.reset.is_some() || self.ranking.is_empty())
    }

    /// Starts a write: its id and the guard its store ops are queued with.
    fn begin_write(&mut self) -> (u64, Guard) {
        let id = self.pending.next_write;
        self.pending.next_write += 1;
        let guard = Guard {
            generation: self.pending.generation.clone(),
            expected: self.pending.generation.load(Ordering::Acquire),
        };
        (id, guard)
    }

    /// The store ops a write must carry in front of its own: the board's creation while no
    /// commit has created it yet.
    fn create_ops(&self, ops: &mut Vec<StoreOp>) {
        if !self.persisted {
            ops.push(StoreOp::PutBoard {
                board: self.name.to_string(),
                options: serde_json::to_string(&self.options).expect("options serialize"),
            });
            ops.push(StoreOp::SetSeason {
                board: self.name.to_string(),
                season: self.season.number,
                started: self.season.started,
                anchor: self.season.anchor,
            });
        }
    }

    /// A queued write failed. If it was computed against the current view (not itself a
    /// casualty of an earlier failure), every later queued write was computed on top of it:
    /// drop the view back to the durable board and make the writer refuse those writes.
    /// Earlier writes have all been resolved (the writer answers in order), so the durable
    /// board is exactly what the disk holds.
    fn fail(&mut self, guard: &Guard) {
        if self.pending.generation.load(Ordering::Acquire) == guard.expected {
            self.pending.generation.fetch_add(1, Ordering::AcqRel);
            let generation = self.pending.generation.clone();
            let next_write = self.pending.next_write;
            self.pending = Pending::new(generation, self.next_seq);
            self.pending.next_write = next_write;
        }
    }
}

/// One write's effect on the durable board, applied when its commit succeeded.
enum Write {
    Scores {
        /// The entries this batch changed, as committed.
        entries: Vec<Entry>,
        next_seq: u64,
        /// Every posted player (in post order) with whether the batch changed its entry.
        posted: Vec<(Arc<str>, bool)>,
        /// The season the batch was computed in.
        season: u64,
    },
    /// New options, and the season state they set (a changed schedule re-anchors it).
    Options(BoardOptions, Option<SeasonState>),
    Reset,
    /// One player forgotten.
    Delete(Arc<str>),
    /// The season closed: the board starts empty in this one.
    Close(SeasonState),
}

/// What a successful write reports back.
enum Applied {
    Scores(Vec<ScoreResult>),
    Done,
}

/// Boards whose live update is due; shared with the store writer's completions.
#[derive(Default)]
struct Dirty {
    names: Mutex<HashSet<Arc<str>>>,
    wake: Notify,
}

impl Dirty {
    fn mark(&self, name: &str) {
        if self.names.lock().insert(name.into()) {
            self.wake.notify_one();
        }
    }
}

pub struct Boards {
    /// By name, so that the list pages in name order from a cursor.
    boards: RwLock<BTreeMap<Arc<str>, Arc<Mutex<Board>>>>,
    dirty: Arc<Dirty>,
    /// Where writes are made durable: the local redb store, or Redis under `--redis`.
    storage: Arc<dyn BoardStorage>,
    /// [`MAX_QUEUED_SCORE_BYTES`], held by each queued score batch until it is resolved.
    queued_bytes: Arc<Semaphore>,
    /// Subscriber counts (watchers) only; updates go out through the broker.
    hub: Arc<Hub>,
    broker: Arc<dyn Broker>,
    pub(super) metrics: Arc<Metrics>,
    /// Under Redis: the cluster-wide watcher counts.
    counts: Option<Arc<ClusterCounts>>,
    interval: Duration,
    default_top: usize,
    /// New boards are refused past it (boards already stored are kept).
    max_boards: usize,
    /// Players per board unless its `[[board]]` table says otherwise.
    max_players: usize,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    stop: CancellationToken,
    /// The local store's file (`crier.redb`), for online backups; None under `--redis`.
    local_file: Option<crate::redb_file::WeakRedbFile>,
    /// The wall clock season boundaries are judged by (injectable: `season.rs`).
    clock: Arc<WallClock>,
    /// `[[board]]` tables' `reset` / `timezone` / `keep_seasons`, first match wins: the
    /// defaults of boards their pattern matches.
    season_defaults: Vec<(TopicPattern, BoardPolicyConfig)>,
    /// Wakes the season task when a schedule changes.
    season_wake: Notify,
    /// Follow and friends topics a local subscriber just joined (`watching`), at most
    /// [`MAX_JOINED`]: their first window goes out with the next update.
    joined: Mutex<HashSet<Arc<str>>>,
    /// The closed seasons read last, loaded whole (a few, bounded by `ARCHIVES_CACHED`).
    archives: Mutex<Vec<Arc<Archive>>>,
    /// Bumped when a player is erased from archives: a season loaded across the bump may
    /// still hold them, so it is not cached.
    archives_gen: AtomicU64,
}

/// Closed seasons kept loaded for reads; each is loaded from the store on a miss.
const ARCHIVES_CACHED: usize = 4;

/// A closed season, loaded for reads.
pub struct Archive {
    pub board: Arc<str>,
    pub info: ArchivedSeason,
    pub ranking: Ranking,
}

/// The `[[board]]` tables that set a schedule, for [`Boards`]'s defaults.
fn season_defaults(cfg: &Config) -> Vec<(TopicPattern, BoardPolicyConfig)> {
    cfg.board_policies
        .iter()
        .filter_map(|p| Some((TopicPattern::parse(&p.pattern).ok()?, p.clone())))
        .collect()
}

impl Boards {
    /// The local store's file, for an online backup (None under `--redis`).
    pub fn local_file(&self) -> Option<crate::redb_file::WeakRedbFile> {
        self.local_file.clone()
    }

    /// Opens the store in `data_dir`, loads every board and publishes each one's snapshot
    /// so the first watcher gets it at once.
    pub async fn open(
        cfg: &Config,
        hub: Arc<Hub>,
        broker: Arc<dyn Broker>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<Boards>> {
        let clock = Arc::new(WallClock::new());
        let dir = cfg.data_dir.clone();
        let (store, stored) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let store = Store::open(&dir)?;
            let boards = store.load()?;
            Ok((store, boards))
        })
        .await??;
        let mut boards = BTreeMap::new();
        for sb in stored {
            let options: BoardOptions = serde_json::from_str(&sb.options).unwrap_or_default();
            let name: Arc<str> = sb.name.into();
            let mut board = Board::new(name.clone(), options, sb.next_seq, clock.now_ms());
            if let Some((number, started, anchor)) = sb.season {
                board.season = SeasonState {
                    number,
                    started,
                    anchor,
                };
            }
            board.persisted = true;
            for e in sb.entries {
                board.ranking.insert(Entry {
                    player: e.player.into(),
                    score: e.score,
                    subscore: e.subscore,
                    achieved: e.achieved,
                    meta: e.meta.map(Into::into),
                });
            }
            boards.insert(name, Arc::new(Mutex::new(board)));
        }
        let local_file = store.file().downgrade();
        let (writer, writer_task) = StoreWriter::spawn(store, 4096)?;
        let this = Arc::new(Boards {
            dirty: Arc::new(Dirty {
                names: Mutex::new(boards.keys().cloned().collect()),
                wake: Notify::new(),
            }),
            boards: RwLock::new(boards),
            storage: Arc::new(LocalStore {
                writer: Mutex::new(Some(writer)),
            }),
            queued_bytes: Arc::new(Semaphore::new(MAX_QUEUED_SCORE_BYTES)),
            hub,
            broker,
            metrics,
            interval: cfg.board_update_interval,
            default_top: cfg.board_top,
            max_boards: cfg.max_boards,
            max_players: cfg.max_players_per_board,
            tasks: Mutex::new(vec![writer_task]),
            stop: shutdown.child_token(),
            counts: None,
            local_file: Some(local_file),
            clock,
            season_defaults: season_defaults(cfg),
            season_wake: Notify::new(),
            joined: Mutex::new(HashSet::new()),
            archives: Mutex::new(Vec::new()),
            archives_gen: AtomicU64::new(0),
        });
        let updater = tokio::spawn(this.clone().update_loop());
        let seasons = tokio::spawn(this.clone().season_loop());
        this.tasks.lock().extend([updater, seasons]);
        Ok(this)
    }

    /// Boards shared through Redis (see `shared.rs`): no local store; every board is
    /// loaded from Redis and mirrored here before this returns.
    #[allow(clippy::too_many_arguments)]
    pub async fn open_shared(
        cfg: &Config,
        hub: Arc<Hub>,
        broker: Arc<dyn Broker>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
        conn: redis::aio::ConnectionManager,
        client: redis::Client,
        counts: Arc<ClusterCounts>,
    ) -> anyhow::Result<Arc<Boards>> {
        let defaults = BoardOptions {
            top: cfg.board_top,
            ..BoardOptions::default()
        };
        let shared = Arc::new(Shared::new(conn, client, cfg.redis_timeout, defaults));
        let this = Arc::new(Boards {
            dirty: Arc::new(Dirty::default()),
            boards: RwLock::new(BTreeMap::new()),
            storage: shared.clone(),
            queued_bytes: Arc::new(Semaphore::new(MAX_QUEUED_SCORE_BYTES)),
            hub,
            broker,
            metrics,
            counts: Some(counts),
            interval: cfg.board_update_interval,
            default_top: cfg.board_top,
            max_boards: cfg.max_boards,
            max_players: cfg.max_players_per_board,
            tasks: Mutex::new(Vec::new()),
            stop: shutdown.child_token(),
            local_file: None,
            clock: Arc::new(WallClock::new()),
            season_defaults: season_defaults(cfg),
            season_wake: Notify::new(),
            joined: Mutex::new(HashSet::new()),
            archives: Mutex::new(Vec::new()),
            archives_gen: AtomicU64::new(0),
        });
        let follower = shared.start(&this, this.stop.clone()).await?;
        let updater = tokio::spawn(this.clone().update_loop());
        let seasons = tokio::spawn(this.clone().season_loop());
        this.tasks.lock().extend([follower, updater, seasons]);
        Ok(this)
    }

    /// `max_players_per_board` of the node: the cap of boards no `[[board]]` table sets.
    pub fn max_players(&self) -> usize {
        self.max_players
    }

    pub(super) fn max_boards(&self) -> usize {
        self.max_boards
    }

    /// Watchers of a board's topic: on every node under Redis, else on this one.
    fn watchers(&self, topic: &str) -> usize {
        match &self.counts {
            Some(c) => c.total(topic),
            None => self.hub.subscriber_count(topic),
        }
    }

    pub(super) fn names(&self) -> Vec<String> {
        self.boards.read().keys().map(|n| n.to_string()).collect()
    }

    pub(super) fn remove(&self, name: &str) {
        self.boards.write().remove(name);
    }

    pub(super) fn dirty_mark(&self, name: &str) {
        self.dirty.mark(name);
    }

    /// A board's mirror, created empty (and invisible until loaded) if needed.
    pub(super) fn get_or_mirror(&self, name: &str) -> Arc<Mutex<Board>> {
        let mut boards = self.boards.write();
        boards
            .entry(name.into())
            .or_insert_with(|| {
                let name: Arc<str> = name.into();
                let now = self.clock.now_ms();
                Arc::new(Mutex::new(Board::new(
                    name,
                    BoardOptions::default(),
                    1,
                    now,
                )))
            })
            .clone()
    }

    /// Stops publishing and lets the store writer commit what it holds, then waits for it.
    pub async fn close(&self) {
        self.stop.cancel();
        self.storage.close();
        let tasks = std::mem::take(&mut *self.tasks.lock());
        for t in tasks {
            let _ = t.await;
        }
    }

    pub fn validate_name(name: &str) -> Result<(), BoardError> {
        if crier_protocol::names::is_valid_board(name) {
            Ok(())
        } else {
            Err(BoardError::Invalid(format!(
                "board name must be 1-{MAX_BOARD_NAME} bytes of A-Z a-z 0-9 _ - ., and not . or .."
            )))
        }
    }

    pub(super) fn get(&self, name: &str) -> Option<Arc<Mutex<Board>>> {
        self.boards.read().get(name).cloned()
    }

    /// A board a commit has created, for reads and resets; others do not exist yet.
    fn get_persisted(&self, name: &str) -> Result<Arc<Mutex<Board>>, BoardError> {
        self.get(name)
            .filter(|b| b.lock().persisted)
            .ok_or_else(|| BoardError::NoBoard(name.into()))
    }

    /// The board, created in memory (with the default options) if needed. A new board stays
    /// invisible until a write creating it is durable; if that write fails, it is left
    /// with the defaults, so a later write does not durably create it with options whose
    /// write failed. Past `max_boards` a new board is refused; the count holds every board
    /// in memory, so boards a restart loaded over a lowered cap stay, and only new ones
    /// are refused.
    fn get_or_create(&self, name: &str) -> Result<Arc<Mutex<Board>>, BoardError> {
        if let Some(b) = self.get(name) {
            return Ok(b);
        }
        let mut boards = self.boards.write();
        if let Some(b) = boards.get(name) {
            return Ok(b.clone());
        }
        if boards.len() >= self.max_boards {
            return Err(BoardError::TooManyBoards(self.max_boards));
        }
        let options = self.with_defaults(
            name,
            BoardOptions {
                top: self.default_top,
                ..BoardOptions::default()
            },
        );
        let name: Arc<str> = name.into();
        let b = Arc::new(Mutex::new(Board::new(
            name.clone(),
            options,
            1,
            self.clock.now_ms(),
        )));
        boards.insert(name, b.clone());
        Ok(b)
    }

    fn check_options(o: &BoardOptions) -> Result<(), BoardError> {
        if !(1..=MAX_BOARD_TOP).contains(&o.top) {
            return Err(BoardError::Invalid(format!(
                "top must be between 1 and {MAX_BOARD_TOP}"
            )));
        }
        check_season_options(o.reset.as_deref(), o.timezone.as_deref(), o.keep_seasons)
            .map_err(BoardError::Invalid)
    }

    /// The season options a board's `[[board]]` table gives where `o` sets none.
    fn with_defaults(&self, name: &str, mut o: BoardOptions) -> BoardOptions {
        let table = self.season_defaults.iter().find(|(p, _)| p.matches(name));
        if let Some((_, t)) = table {
            if o.reset.is_none() {
                o.reset = t.reset.clone();
                o.timezone = o.timezone.or_else(|| t.timezone.clone());
            }
            o.keep_seasons = o.keep_seasons.or(t.keep_seasons);
            o.tiebreak = o.tiebreak.or(match t.tiebreak.as_deref() {
                Some("low") => Some(SortOrder::Low),
                Some(_) => Some(SortOrder::High),
                None => None,
            });
        }
        o
    }

    /// The wall clock seasons run on; tests move it (`WallClock::set`).
    pub fn clock(&self) -> &Arc<WallClock> {
        &self.clock
    }

    /// Creates a board or changes its options. The sort order of a board that has players
    /// cannot change (their ranks would all move); reset it first.
    pub async fn put_board(
        &self,
        name: &str,
        options: BoardOptions,
    ) -> Result<BoardOptions, BoardError> {
        Self::validate_name(name)?;
        let options = self.with_defaults(name, options);
        Self::check_options(&options)?;
        let options = self.storage.put_options(self, name, options).await?;
        self.season_wake.notify_one();
        Ok(options)
    }

    /// Applies a batch of scores all-or-nothing and returns each player's new rank once the
    /// batch is durable. A batch that would take the board past `max_players` players is
    /// refused whole; one that adds nobody always fits, so a board over a cap lowered
    /// since keeps taking its players' scores.
    pub async fn submit(
        &self,
        name: &str,
        inputs: Vec<ScoreInput>,
        max_players: usize,
    ) -> Result<Vec<ScoreResult>, BoardError> {
        Self::validate_name(name)?;
        if inputs.is_empty() {
            return Err(BoardError::Invalid("no scores given".into()));
        }
        if inputs.len() > MAX_BATCH {
            return Err(BoardError::Invalid(format!(
                "at most {MAX_BATCH} scores per request"
            )));
        }
        let mut scores = Vec::with_capacity(inputs.len());
        for (i, input) in inputs.into_iter().enumerate() {
            scores.push(validate(i, input)?);
        }
        // Both copies of the batch (queued ops and pending view) count; held until resolved.
        let cost: usize = scores
            .iter()
            .map(|(p, _, m, _)| {
                2 * (p.len() + m.as_ref().map_or(0, |m| m.len())) + QUEUED_SCORE_OVERHEAD
            })
            .sum();
        let budget = self
            .queued_bytes
            .clone()
            .acquire_many_owned(cost.min(MAX_QUEUED_SCORE_BYTES) as u32)
            .await
            .expect("the budget semaphore is never closed");
        self.storage
            .submit(self, name, scores, max_players, budget)
            .await
    }

    /// Empties a board, keeping its options and clock.
    pub async fn reset(&self, name: &str) -> Result<(), BoardError> {
        Self::validate_name(name)?;
        self.storage.reset(self, name).await
    }

    /// Forgets one player's entry, durably, in the current season (the top and the
    /// followers of the windows it leaves are updated like after a score) and in every
    /// closed season the board keeps; returns those closed seasons.
    pub async fn delete_player(&self, name: &str, player: &str) -> Result<Vec<u64>, BoardError> {
        Self::validate_name(name)?;
        let erased = self.storage.delete_player(self, name, player).await;
        self.forget_archives(name);
        erased
    }

    /// Drops the board's loaded closed seasons (a player was erased from them); reads load
    /// them again.
    pub(super) fn forget_archives(&self, name: &str) {
        let mut cache = self.archives.lock();
        self.archives_gen.fetch_add(1, Ordering::AcqRel);
        cache.retain(|a| &*a.board != name);
    }

    /// Queues a write's ops (the caller holds the board's lock, see the module docs) with
    /// its completion, and returns what the caller awaits after releasing the lock. The
    /// completion runs even if the caller has gone away, so memory follows the disk
    /// whether or not anyone waits for the answer. `budget` is given back once the write
    /// is resolved and its data dropped.
    #[allow(clippy::too_many_arguments)]
    fn queue(
        &self,
        slot: super::store::Slot,
        board: &Arc<Mutex<Board>>,
        id: u64,
        guard: Guard,
        ops: Vec<StoreOp>,
        write: Write,
        budget: Option<OwnedSemaphorePermit>,
    ) -> impl std::future::Future<Output = Result<Applied, BoardError>> {
        let (tx, rx) = oneshot::channel();
        let board = board.clone();
        let dirty = self.dirty.clone();
        let metrics = self.metrics.clone();
        slot.send(ops, Some(guard.clone()), move |result| {
            let outcome = match result {
                Ok(()) => {
                    let (name, applied, visible) = apply(&mut board.lock(), id, write);
                    if let Applied::Scores(r) = &applied {
                        metrics.scores.inc_by(r.len() as u64);
                    }
                    if visible {
                        dirty.mark(&name);
                    }
                    Ok(applied)
                }
                Err(e) => {
                    board.lock().fail(&guard);
                    Err(store_error(e))
                }
            };
            drop(budget);
            let _ = tx.send(outcome); // the caller may have gone away
        });
        async move {
            rx.await
                .unwrap_or_else(|_| Err(store_error(StoreError::Closed)))
        }
    }

    /// A read-only view of one board under its lock.
    pub fn with_board<R>(
        &self,
        name: &str,
        f: impl FnOnce(BoardView<'_>) -> R,
    ) -> Result<R, BoardError> {
        Self::validate_name(name)?;
        let board = self.get_persisted(name)?;
        let b = board.lock();
        let watchers = self.watchers(&b.topic);
        Ok(f(BoardView {
            name: &b.name,
            options: &b.options,
            ranking: &b.ranking,
            version: b.version,
            watchers,
            season: b.season,
            ends: b.ends(),
        }))
    }

    /// One page of the board list, in name order: at most `limit` boards named after
    /// `after` that a commit has created and `readable` lets the caller see, and whether
    /// more follow. The board map is read in bounded chunks (its lock is never held while a
    /// board's is), so a page costs O(limit + boards skipped) and a reader never holds up
    /// writers for the whole list.
    pub fn page(
        &self,
        after: Option<&str>,
        limit: usize,
        readable: impl Fn(&str) -> bool,
    ) -> (Vec<serde_json::Value>, bool) {
        use std::ops::Bound;
        let limit = limit.max(1);
        let chunk = limit.saturating_add(1).min(1024);
        let mut out = Vec::new();
        let mut from: Option<Arc<str>> = after.map(Arc::from);
        loop {
            let batch: Vec<(Arc<str>, Arc<Mutex<Board>>)> = {
                let boards = self.boards.read();
                let start = match &from {
                    Some(n) => Bound::Excluded(n.clone()),
                    None => Bound::Unbounded,
                };
                boards
                    .range((start, Bound::Unbounded))
                    .take(chunk)
                    .map(|(n, b)| (n.clone(), b.clone()))
                    .collect()
            };
            let Some((last, _)) = batch.last() else {
                return (out, false);
            };
            from = Some(last.clone());
            let end = batch.len() < chunk;
            for (name, board) in batch {
                if !readable(&name) {
                    continue;
                }
                let b = board.lock();
                if !b.persisted {
                    continue;
                }
                if out.len() == limit {
                    return (out, true);
                }
                let mut row = serde_json::json!({
                    "name": &*b.name,
                    "players": b.ranking.len(),
                    "watchers": self.watchers(&b.topic),
                    "order": b.options.order,
                    "mode": b.options.mode,
                    "top": b.options.top,
                });
                if let Some(t) = b.options.tiebreak {
                    row["tiebreak"] = serde_json::json!(t);
                }
                out.push(row);
            }
            if end {
                return (out, false);
            }
        }
    }

    /// The board's closed seasons kept, newest first, with its current season.
    pub async fn seasons(
        &self,
        name: &str,
    ) -> Result<(Vec<ArchivedSeason>, serde_json::Value), BoardError> {
        let current = self.with_board(name, |b| b.season_json())?;
        Ok((self.storage.seasons(self, name).await?, current))
    }

    /// A closed season, loaded whole for reads (the last few stay loaded); `None` when the
    /// board does not keep it.
    pub async fn season(
        &self,
        name: &str,
        season: u64,
    ) -> Result<Option<Arc<Archive>>, BoardError> {
        self.with_board(name, |_| ())?;
        let cached = self
            .archives
            .lock()
            .iter()
            .find(|a| &*a.board == name && a.info.season == season)
            .cloned();
        if let Some(a) = cached {
            return Ok(Some(a));
        }
        let generation = self.archives_gen.load(Ordering::Acquire);
        let Some((info, entries)) = self.storage.season(self, name, season).await? else {
            return Ok(None);
        };
        let mut ranking = archived_ranking(&info.order);
        for e in entries {
            ranking.insert(Entry {
                player: e.player.into(),
                score: e.score,
                subscore: e.subscore,
                achieved: e.achieved,
                meta: e.meta.map(Into::into),
            });
        }
        let archive = Arc::new(Archive {
            board: name.into(),
            info,
            ranking,
        });
        let mut cache = self.archives.lock();
        if self.archives_gen.load(Ordering::Acquire) != generation {
            return Ok(Some(archive));
        }
        cache.retain(|a| !(&*a.board == name && a.info.season == season));
        if cache.len() >= ARCHIVES_CACHED {
            cache.remove(0);
        }
        cache.push(archive.clone());
        Ok(Some(archive))
    }

    /// Closes every season whose end has come, at the boundary or as soon as the node runs
    /// again after it (a node down at a boundary closes on start). A score posted past the
    /// end closes the season itself first, so whichever comes first does it, once.
    async fn season_loop(self: Arc<Self>) {
        const MAX_NAP: Duration = Duration::from_secs(60);
        loop {
            let now = self.clock.now_ms();
            let mut nap = MAX_NAP;
            let boards: Vec<(Arc<str>, Option<i64>)> = self
                .boards
                .read()
                .iter()
                .map(|(n, b)| {
                    let b = b.lock();
                    (
                        n.clone(),
                        b.persisted
                            .then(|| b.view_season().ends(b.view_schedule()))
                            .flatten(),
                    )
                })
                .collect();
            for (name, ends) in boards {
                let Some(ends) = ends else { continue };
                if ends > now {
                    nap = nap.min(Duration::from_millis((ends - now) as u64));
                    continue;
                }
                if let Err(e) = self.storage.close_season(&self, &name, now).await {
                    tracing::warn!("board {name}: closing season failed, retried in 1 s: {e}");
                    nap = nap.min(Duration::from_secs(1));
                }
            }
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = self.clock.changed() => {}
                _ = self.season_wake.notified() => {}
                _ = tokio::time::sleep(nap) => {}
            }
        }
    }

    /// Every board (tests).
    #[cfg(test)]
    fn list(&self) -> Vec<serde_json::Value> {
        self.page(None, usize::MAX, |_| true).0
    }

    /// A local subscriber just joined `topic` (called by the transports after a
    /// subscribe): a followed player's window or a friends view then goes out with the
    /// next update, within `board_update_interval`, instead of at the next watcher check
    /// (up to a second later). Other topics cost a parse.
    pub fn watching(&self, topic: &str) {
        if crate::topic::player_topic_parts(topic).is_none()
            && crate::topic::friends_topic_parts(topic).is_none()
        {
            return;
        }
        {
            let mut joined = self.joined.lock();
            if joined.len() >= MAX_JOINED {
                return;
            }
            joined.insert(Arc::from(topic));
        }
        self.dirty.wake.notify_one();
    }

    /// Adds the topics `watching` noted to their boards' followed players and views, so
    /// the next update computes their first window (one not yet followed has no window
    /// last sent, so it is computed whatever moved).
    fn add_joined(&self) {
        let joined = std::mem::take(&mut *self.joined.lock());
        for topic in joined {
            let (board, player, friends) =
                if let Some((b, p)) = crate::topic::player_topic_parts(&topic) {
                    (b, Some(p), None)
                } else if let Some((b, ps)) = crate::topic::friends_topic_parts(&topic) {
                    if crate::topic::check_friends(&topic, b, &ps).is_err() {
                        continue;
                    }
                    (b, None, Some(ps))
                } else {
                    continue;
                };
            let Some(board) = self.get(board) else {
                continue;
            };
            let mut b = board.lock();
            let mut added = false;
            if let Some(p) = player {
                if !b.watched.contains_key(p) {
                    b.watched.insert(Arc::from(p), None);
                    added = true;
                }
            }
            if let Some(ps) = friends {
                if !b.friends.contains_key(&*topic) {
                    let players = ps.into_iter().map(Arc::from).collect();
                    let watch = super::friends::Watch {
                        players,
                        last: None,
                    };
                    b.friends.insert(topic.clone(), watch);
                    added = true;
                }
            }
            if added && b.persisted {
                b.note_moved(0, 0);
                let name = b.name.clone();
                drop(b);
                self.dirty.names.lock().insert(name);
            }
        }
    }

    async fn update_loop(self: Arc<Self>) {
        let mut next_watcher_check = Instant::now() + WATCHER_CHECK;
        loop {
            self.add_joined();
            let now = Instant::now();
            if now >= next_watcher_check {
                self.check_watchers();
                next_watcher_check = now + WATCHER_CHECK;
            }
            let mut wake_at = next_watcher_check;
            let dirty: Vec<Arc<str>> = self.dirty.names.lock().iter().cloned().collect();
            for name in dirty {
                let Some(board) = self.get(&name) else {
                    self.dirty.names.lock().remove(&name);
                    continue;
                };
                let due = board
                    .lock()
                    .last_published
                    .map_or(now, |t| t + self.interval);
                if due <= now {
                    self.dirty.names.lock().remove(&name);
                    self.publish(&board).await;
                    if board.lock().needs_update() {
                        // Shifted windows left for the next update.
                        self.dirty.names.lock().insert(name);
                        wake_at = wake_at.min(now + self.interval);
                    }
                } else {
                    wake_at = wake_at.min(due);
                }
            }
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = self.dirty.wake.notified() => {}
                _ = tokio::time::sleep_until(wake_at.into()) => {}
            }
        }
    }

    fn check_watchers(&self) {
        // The followed players, by board: the `board:{b}@{player}` topics this node's
        // clients subscribed to (bounded by the subscriptions, so by their budgets).
        let mut followed: HashMap<String, Vec<String>> = HashMap::new();
        // The friends views, by board: (topic, players), checked at subscribe.
        let mut friends: HashMap<String, Vec<super::friends::Named>> = HashMap::new();
        for (topic, count) in self.hub.topic_counts() {
            if count == 0 {
                continue;
            }
            if let Some((board, players)) = crate::topic::friends_topic_parts(&topic) {
                if crate::topic::check_friends(&topic, board, &players).is_ok() {
                    let players = players.into_iter().map(Arc::from).collect();
                    friends
                        .entry(board.to_string())
                        .or_default()
                        .push((topic.to_string(), players));
                }
                continue;
            }
            if let Some((board, player)) = crate::topic::player_topic_parts(&topic) {
                followed
                    .entry(board.to_string())
                    .or_default()
                    .push(player.to_string());
            }
        }
        let boards: Vec<Arc<Mutex<Board>>> = self.boards.read().values().cloned().collect();
        for board in boards {
            let (name, changed) = {
                let mut b = board.lock();
                let mut changed = b.persisted && self.watchers(&b.topic) != b.shown_watchers;
                b.top_dirty |= changed;
                let players = followed.remove(&*b.name).unwrap_or_default();
                if players.len() != b.watched.len()
                    || players.iter().any(|p| !b.watched.contains_key(p.as_str()))
                {
                    let mut watched = HashMap::with_capacity(players.len());
                    for p in players {
                        let last = b.watched.get(p.as_str()).copied().flatten();
                        watched.insert(Arc::from(p), last);
                    }
                    // New followers get their window now: every window is looked at.
                    b.watched = watched;
                    // Nothing queued for a player no longer followed here.
                    let Board {
                        watched,
                        touched,
                        shifted,
                        shifted_set,
                        ..
                    } = &mut *b;
                    touched.retain(|p| watched.contains_key(p));
                    shifted.retain(|p| watched.contains_key(p));
                    shifted_set.retain(|p| watched.contains_key(p));
                    b.note_moved(0, u64::MAX);
                    changed |= b.persisted && !b.watched.is_empty();
                }
                let views = friends.remove(&*b.name).unwrap_or_default();
                if views.len() != b.friends.len()
                    || views
                        .iter()
                        .any(|(t, _)| !b.friends.contains_key(t.as_str()))
                {
                    let mut kept = std::mem::take(&mut b.friends);
                    for (topic, players) in views {
                        let last = kept.remove(topic.as_str()).and_then(|w| w.last);
                        let watch = super::friends::Watch { players, last };
                        b.friends.insert(Arc::from(topic), watch);
                    }
                    // New views get their ranking now.
                    b.note_moved(0, u64::MAX);
                    changed |= b.persisted && !b.friends.is_empty();
                }
                (b.name.clone(), changed)
            };
            if changed {
                self.dirty.names.lock().insert(name);
            }
        }
    }

    /// Builds the board's snapshot (when the top changed) and the followed players'
    /// windows that changed under its lock, then publishes them outside the lock.
    async fn publish(&self, board: &Mutex<Board>) {
        let (windows, top) = {
            let mut b = board.lock();
            b.version = (b.version + 1).max(b.next_seq);
            b.last_published = Some(Instant::now());
            let moved = b.moved;
            let mut windows = player_windows(&mut b);
            windows.extend(friend_views(&mut b, moved));
            let top = if std::mem::take(&mut b.top_dirty) {
                Some(self.snapshot(&mut b))
            } else {
                None
            };
            (windows, top)
        };
        for (topic, json) in top.into_iter().chain(windows) {
            self.publish_one(&topic, &json).await;
        }
    }

    /// The board's live top as its topic's `data` (the caller holds the board's lock).
    fn snapshot(&self, b: &mut Board) -> (String, Vec<u8>) {
        {
            b.shown_watchers = self.watchers(&b.topic);
            let top = b.ranking.top(b.options.top);
            let ends = b.ends();
            let json = serde_json::to_vec(&Update {
                board: &b.name,
                version: b.version,
                players: b.ranking.len(),
                watchers: b.shown_watchers,
                order: b.options.order,
                tiebreak: b.options.tiebreak,
                mode: b.options.mode,
                season: b.season.number,
                next_reset: ends.map(rfc3339),
                top: ranked(&top, b.options.tiebreak.is_some()),
            })
            .expect("snapshot serializes");
            (b.topic.clone(), json)
        }
    }

    async fn publish_one(&self, topic: &str, json: &[u8]) {
        let published = self
            .broker
            .publish(PublishRequest {
                topic,
                data: json,
                retain: true,
                conflate: true,
                idempotency_key: None,
            })
            .await;
        match published {
            Ok(_) => {
                self.metrics.board_updates.inc();
            }
            Err(e) => tracing::warn!("board update for {topic} not published: {e}"),
        }
    }
}

/// The node's own store: its redb file, written through the group-commit writer, each
/// write computed against its board's pending view (see the module docs).
pub struct LocalStore {
    /// Taken by `close`: the writer commits what it holds and stops once every handle
    /// is gone.
    writer: Mutex<Option<StoreWriter>>,
}

impl LocalStore {
    fn writer(&self) -> Result<StoreWriter, BoardError> {
        self.writer
            .lock()
            .clone()
            .ok_or_else(|| BoardError::Store("the server is shutting down".into()))
    }
}

#[async_trait::async_trait]
impl BoardStorage for LocalStore {
    async fn put_options(
        &self,
        boards: &Boards,
        name: &str,
        options: BoardOptions,
    ) -> Result<BoardOptions, BoardError> {
        let writer = self.writer()?;
        let slot = writer.reserve().await.map_err(store_error)?;
        let board = boards.get_or_create(name)?;
        let now = boards.clock.now_ms();
        let done = {
            let mut b = board.lock();
            if b.view_options().reorders(&options) && !b.view_is_empty() {
                return Err(BoardError::Conflict(
                    "the order or tiebreak of a board with players cannot change; reset it first"
                        .into(),
                ));
            }
            let (id, guard) = b.begin_write();
            let schedule = options.schedule();
            let old = b.view_options();
            // A new schedule ends the season at its next boundary from now on.
            let season =
                (old.reset != options.reset || old.timezone != options.timezone).then(|| {
                    SeasonState {
                        anchor: now,
                        ..b.view_season()
                    }
                });
            b.pending.options = Some((id, options.clone()));
            b.pending.schedule = schedule;
            let mut ops = vec![
                StoreOp::PutBoard {
                    board: name.into(),
                    options: serde_json::to_string(&options).expect("options"),
                },
                // A board created by this write gets the clock memory has, not 0.
                StoreOp::SetSeq {
                    board: name.into(),
                    next_seq: b.pending.next_seq,
                },
            ];
            let set = season.or((!b.persisted).then(|| b.view_season()));
            if let Some(s) = set {
                ops.push(StoreOp::SetSeason {
                    board: name.into(),
                    season: s.number,
                    started: s.started,
                    anchor: s.anchor,
                });
            }
            if let Some(s) = season {
                b.pending.season = Some((id, s));
            }
            let write = Write::Options(options.clone(), season);
            boards.queue(slot, &board, id, guard, ops, write, None)
        };
        done.await?;
        Ok(options)
    }

    async fn submit(
        &self,
        boards: &Boards,
        name: &str,
        scores: Vec<ValidScore>,
        max_players: usize,
        budget: OwnedSemaphorePermit,
    ) -> Result<Vec<ScoreResult>, BoardError> {
        let writer = self.writer()?;
        // The moment this batch is scored at: past its board's season end, the season is
        // closed first, by a write queued just ahead of the batch (a second slot).
        let now = boards.clock.now_ms();
        let due = boards.get(name).is_some_and(|b| b.lock().close_due(now));
        let mut close_slot = match due {
            true => Some(writer.reserve().await.map_err(store_error)?),
            false => None,
        };
        let slot = writer.reserve().await.map_err(store_error)?;
        if boards.get(name).is_none() {
            // Refused before the board is made: a board held in memory for a batch that
            // cannot apply would count against max_boards for nothing.
            check_players(name, 0, new_players(|_| None, &scores), max_players)?;
        }
        let board = boards.get_or_create(name)?;
        let done = {
            let mut b = board.lock();
            if b.close_due(now) {
                if let Some(close) = close_slot.take() {
                    // Awaited through the batch: a failed close fails the batch with it.
                    drop(queue_close(boards, close, &board, &mut b, now));
                }
            }
            let options = b.view_options().clone();
            check_subscores(name, &options, &scores)?;
            let season = b.view_season().number;
            let new = new_players(|p| b.view_entry(p), &scores);
            check_players(name, b.view_len(), new, max_players)?;
            // The batch's own result so far, on top of the pending view.
            let mut batch: HashMap<Arc<str>, Entry> = HashMap::new();
            if options.mode == ScoreMode::Increment {
                check_increments(|p| batch_entry(&b, &batch, p), &scores)?;
            }
            let mut seq = b.pending.next_seq;
            let mut posted = Vec::with_capacity(scores.len());
            for (player, score, meta, sub) in &scores {
                let old = batch_entry(&b, &batch, player);
                let new = combine(
                    options.rules(),
                    old,
                    player,
                    *score,
                    sub.unwrap_or(0.0),
                    seq,
                    meta.clone(),
                );
                seq += 1;
                let key = match new {
                    Some(e) => {
                        let key = e.player.clone();
                        batch.insert(key.clone(), e);
                        key
                    }
                    None => old.map_or_else(|| Arc::from(player.as_str()), |e| e.player.clone()),
                };
                posted.push(key);
            }
            let (id, guard) = b.begin_write();
            let mut ops = Vec::with_capacity(batch.len() + 2);
            b.create_ops(&mut ops);
            for e in batch.values() {
                ops.push(StoreOp::PutEntry {
                    board: name.into(),
                    entry: stored(e),
                });
            }
            ops.push(StoreOp::SetSeq {
                board: name.into(),
                next_seq: seq,
            });
            b.pending.next_seq = seq;
            for e in batch.values() {
                b.pend(id, e.clone());
            }
            let posted = posted
                .into_iter()
                .map(|p| {
                    let changed = batch.contains_key(&p);
                    (p, changed)
                })
                .collect();
            let write = Write::Scores {
                entries: batch.into_values().collect(),
                next_seq: seq,
                posted,
                season,
            };
            boards.queue(slot, &board, id, guard, ops, write, Some(budget))
        };
        match done.await? {
            Applied::Scores(results) => Ok(results),
            Applied::Done => unreachable!("a score write reports scores"),
        }
    }

    async fn reset(&self, boards: &Boards, name: &str) -> Result<(), BoardError> {
        let writer = self.writer()?;
        let slot = writer.reserve().await.map_err(store_error)?;
        let board = boards.get_persisted(name)?;
        let done = {
            let mut b = board.lock();
            let (id, guard) = b.begin_write();
            b.pending.reset = Some(id);
            b.pending.entries.clear();
            b.pending.fresh = 0;
            let ops = vec![StoreOp::ResetBoard { board: name.into() }];
            boards.queue(slot, &board, id, guard, ops, Write::Reset, None)
        };
        done.await?;
        Ok(())
    }

    async fn delete_player(
        &self,
        boards: &Boards,
        name: &str,
        player: &str,
    ) -> Result<Vec<u64>, BoardError> {
        let writer = self.writer()?;
        let slot = writer.reserve().await.map_err(store_error)?;
        let board = boards.get_persisted(name)?;
        // Which closed seasons hold the player, read before the write (the write erases
        // the player from every archive whatever this found). A board still in its first
        // season has none, and its delete is queued without a wait, right as it is asked.
        let archived = if board.lock().view_season().number > 1 {
            let store = writer.store().clone();
            let (n, p) = (name.to_string(), player.to_string());
            tokio::task::spawn_blocking(move || store.archived_in(&n, &p))
                .await
                .map_err(|e| BoardError::Store(e.to_string()))?
                .map_err(store_error)?
        } else {
            Vec::new()
        };
        let done = {
            let mut b = board.lock();
            let key = b.view_entry(player).map(|e| e.player.clone());
            if key.is_none() && archived.is_empty() {
                return Err(BoardError::NoPlayer {
                    board: name.into(),
                    player: player.into(),
                });
            }
            let (id, guard) = b.begin_write();
            let mut ops = Vec::with_capacity(2);
            if let Some(key) = &key {
                if b.pending.entries.remove(player).is_some()
                    && b.pending.reset.is_none()
                    && b.ranking.get(player).is_none()
                {
                    b.pending.fresh -= 1; // a queued new player, gone from the view again
                }
                b.pending.deleted.insert(key.clone(), id);
                ops.push(StoreOp::DeleteEntry {
                    board: name.into(),
                    player: player.into(),
                });
            }
            ops.push(StoreOp::ForgetArchived {
                board: name.into(),
                player: player.into(),
            });
            let key = key.unwrap_or_else(|| Arc::from(player));
            boards.queue(slot, &board, id, guard, ops, Write::Delete(key), None)
        };
        done.await?;
        Ok(archived)
    }

    async fn close_season(&self, boards: &Boards, name: &str, now: i64) -> Result<(), BoardError> {
        let writer = self.writer()?;
        let slot = writer.reserve().await.map_err(store_error)?;
        let board = boards.get_persisted(name)?;
        let done = {
            let mut b = board.lock();
            if !b.close_due(now) {
                return Ok(()); // closed meanwhile (by a score past the boundary)
            }
            queue_close(boards, slot, &board, &mut b, now)
        };
        done.await.map(drop)
    }

    async fn seasons(&self, _: &Boards, name: &str) -> Result<Vec<ArchivedSeason>, BoardError> {
        let store = self.writer()?.store().clone();
        let name = name.to_string();
        tokio::task::spawn_blocking(move || store.seasons(&name))
            .await
            .map_err(|e| BoardError::Store(e.to_string()))?
            .map_err(store_error)
    }

    async fn season(
        &self,
        _: &Boards,
        name: &str,
        season: u64,
    ) -> Result<Option<(ArchivedSeason, Vec<StoredEntry>)>, BoardError> {
        let store = self.writer()?.store().clone();
        let name = name.to_string();
        tokio::task::spawn_blocking(move || store.season(&name, season))
            .await
            .map_err(|e| BoardError::Store(e.to_string()))?
            .map_err(store_error)
    }

    fn close(&self) {
        self.writer.lock().take();
    }

    #[cfg(test)]
    fn local_writer(&self) -> Option<StoreWriter> {
        self.writer.lock().clone()
    }
}

/// The windows of `b`'s followed players that changed since they were last published, as
/// (topic, data). Only windows overlapping the ranks that moved are looked at; of those,
/// only ones whose content differs from the last published go out.
fn player_windows(b: &mut Board) -> Vec<(String, Vec<u8>)> {
    let n = WINDOW as u64;
    // The windows the moved ranks may have changed join the shifted queue (once each).
    if let Some((lo, hi)) = b.moved.take() {
        let all = lo == 0 && hi == u64::MAX;
        let stale: Vec<Arc<str>> = b
            .watched
            .iter()
            .filter(|(p, last)| {
                !b.shifted_set.contains(&***p)
                    && !b.touched.contains(&***p)
                    && (all
                        || last.is_none()
                        || b.ranking
                            .rank(p)
                            .is_none_or(|r| r + n >= lo && r.saturating_sub(n) <= hi))
            })
            .map(|(p, _)| p.clone())
            .collect();
        for p in stale {
            b.shifted_set.insert(p.clone());
            if b.watched.get(&p).is_some_and(|last| last.is_none()) {
                b.shifted.push_front(p); // a new follower: their first window is next
            } else {
                b.shifted.push_back(p);
            }
        }
    }
    // The players whose own entry changed first, then a bounded slice of the shifted.
    let mut due: Vec<Arc<str>> = b.touched.drain().collect();
    let limit = due.len() + SHIFTED_PER_UPDATE;
    while due.len() < limit {
        let Some(p) = b.shifted.pop_front() else {
            break;
        };
        b.shifted_set.remove(&p);
        due.push(p);
    }
    let mut out = Vec::new();
    for player in due {
        if !b.watched.contains_key(&player) {
            continue; // no longer followed here
        }
        let rank = b.ranking.rank(&player);
        let around = b.ranking.around(&player, WINDOW).unwrap_or_default();
        let hash = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            // The window without its version: an unchanged window is not sent again.
            rank.hash(&mut h);
            for (r, e) in &around {
                (
                    r,
                    &e.player,
                    e.score.to_bits(),
                    e.subscore.to_bits(),
                    &e.meta,
                )
                    .hash(&mut h);
            }
            h.finish()
        };
        let last = b.watched.get_mut(&player).expect("followed");
        if *last == Some(hash) {
            continue;
        }
        *last = Some(hash);
        let sub = b.options.tiebreak.is_some();
        let entry = around.iter().find(|(_, e)| e.player == player);
        let json = serde_json::to_vec(&Window {
            board: &b.name,
            player: &player,
            version: b.version,
            season: b.season.number,
            players: b.ranking.len(),
            entry: entry.map(|e| ranked(std::slice::from_ref(e), sub).remove(0)),
            around: ranked(&around, sub),
        })
        .expect("window serializes");
        out.push((crate::topic::player_topic(&b.name, &player), json));
    }
    out
}

/// The friends views of `b` that changed since they were last published, as (topic,
/// data): only those whose players may have moved are recomputed (`friends.rs`).
fn friend_views(b: &mut Board, moved: Option<(u64, u64)>) -> Vec<(String, Vec<u8>)> {
    use super::friends::{content_hash, entries, may_have_changed, View};
    let Some(moved) = moved else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (topic, w) in b.friends.iter_mut() {
        if !may_have_changed(w, &b.ranking, moved) {
            continue;
        }
        let (found, missing) = entries(&b.ranking, &w.players);
        let hash = content_hash(&found, &missing);
        if w.last == Some(hash) {
            continue;
        }
        w.last = Some(hash);
        let view = View::new(
            &b.name,
            b.ranking.tiebreak().is_some(),
            b.version,
            b.season.number,
            b.ranking.len(),
            &w.players,
            &found,
            missing,
        );
        let json = serde_json::to_vec(&view).expect("friends view serializes");
        out.push((topic.to_string(), json));
    }
    out
}

/// A followed player's live window (`board:{b}@{player}`): their entry (`null` while they
/// have no score) and up to [`WINDOW`] entries above and below.
#[derive(Serialize)]
struct Window<'a> {
    board: &'a str,
    player: &'a str,
    version: u64,
    season: u64,
    players: usize,
    entry: Option<RankedEntry<'a>>,
    around: Vec<RankedEntry<'a>>,
}

/// Queues the close of `b`'s current (view) season at `now`, which is at or past its end:
/// the entries the view holds become the archive, the view starts empty in the next
/// season. The caller holds the board's lock.
fn queue_close(
    boards: &Boards,
    slot: super::store::Slot,
    board: &Arc<Mutex<Board>>,
    b: &mut Board,
    now: i64,
) -> impl std::future::Future<Output = Result<Applied, BoardError>> {
    let schedule = b
        .view_schedule()
        .expect("a due close has a schedule")
        .clone();
    let current = b.view_season();
    let ended = current.ends(Some(&schedule)).unwrap_or(now);
    let next = current.next(&schedule, now);
    let options = b.view_options().clone();
    let closed = ArchivedSeason {
        season: current.number,
        started: current.started,
        ended,
        players: b.view_len() as u64,
        order: options.archived_order(),
    };
    let (id, guard) = b.begin_write();
    let mut ops = Vec::with_capacity(3);
    b.create_ops(&mut ops);
    ops.push(StoreOp::CloseSeason {
        board: b.name.to_string(),
        closed,
        next: (next.number, next.started, next.anchor),
        keep: options.keep() as u64,
    });
    b.pending.reset = Some(id);
    b.pending.entries.clear();
    b.pending.fresh = 0;
    b.pending.season = Some((id, next));
    boards.queue(slot, board, id, guard, ops, Write::Close(next), None)
}

/// A live update's `data`, fields in the documented order (a struct, not `json!`, which
/// would sort the keys and build a value tree per update).
#[derive(Serialize)]
struct Update<'a> {
    board: &'a str,
    version: u64,
    players: usize,
    watchers: usize,
    order: SortOrder,
    #[serde(skip_serializing_if = "Option::is_none")]
    tiebreak: Option<SortOrder>,
    mode: ScoreMode,
    season: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_reset: Option<String>,
    top: Vec<RankedEntry<'a>>,
}

pub struct BoardView<'a> {
    pub name: &'a str,
    pub options: &'a BoardOptions,
    pub ranking: &'a Ranking,
    pub version: u64,
    pub watchers: usize,
    pub season: SeasonState,
    /// When the season ends (the next reset), if the board has a schedule.
    pub ends: Option<i64>,
}

impl BoardView<'_> {
    /// `season` as the API shows it: number, start, end (RFC 3339, UTC).
    pub fn season_json(&self) -> serde_json::Value {
        season_json(self.season, self.ends)
    }
}

pub fn season_json(s: SeasonState, ends: Option<i64>) -> serde_json::Value {
    let mut v = serde_json::json!({
        "number": s.number,
        "started": rfc3339(s.started),
    });
    if let Some(e) = ends {
        v["ends"] = rfc3339(e).into();
    }
    v
}

fn stored(e: &Entry) -> StoredEntry {
    StoredEntry {
        player: e.player.to_string(),
        score: e.score,
        subscore: e.subscore,
        achieved: e.achieved,
        meta: e.meta.as_deref().map(String::from),
    }
}

/// Rankings at least this big are freed on the dropper thread, smaller ones in place.
const DROP_ELSEWHERE_MIN: usize = 16_384;

/// Frees a ranking a reset or season close emptied off the caller's thread: on the store
/// writer (or a Redis mirror under the board's lock) freeing a million entries took ~250 ms,
/// during which every board's posters waited. One dropper thread, started on first use,
/// behind a small bounded queue; when it is full the ranking is freed in place (slow, as
/// before, never unbounded).
pub(super) fn drop_elsewhere(old: Ranking) {
    use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
    static DROPPER: std::sync::OnceLock<Option<SyncSender<Ranking>>> = std::sync::OnceLock::new();
    if old.len() < DROP_ELSEWHERE_MIN {
        return;
    }
    let tx = DROPPER.get_or_init(|| {
        let (tx, rx) = sync_channel::<Ranking>(4);
        std::thread::Builder::new()
            .name("crier-board-drop".into())
            .spawn(move || rx.into_iter().for_each(drop))
            .ok()
            .map(|_| tx)
    });
    if let Some(tx) = tx {
        if let Err(TrySendError::Full(old) | TrySendError::Disconnected(old)) = tx.try_send(old) {
            drop(old);
        }
    }
}

/// Applies a committed write to the durable board (on the writer thread, in commit order).
/// Returns the board's name, the write's results and whether the live top changed.
fn apply(b: &mut Board, id: u64, write: Write) -> (Arc<str>, Applied, bool) {
    b.persisted = true;
    let top = b.options.top as u64;
    let (applied, visible) = match write {
        Write::Scores {
            entries,
            next_seq,
            posted,
            season,
        } => {
            let mut visible = false;
            for e in entries {
                let old_rank = b.ranking.rank(&e.player);
                let pending = b.pending.entries.get(&e.player).map(|(w, _)| *w);
                if old_rank.is_none() && pending.is_some() && b.pending.reset.is_none() {
                    // Durable now: no longer a player only the view holds.
                    b.pending.fresh -= 1;
                }
                if pending == Some(id) {
                    b.pending.entries.remove(&e.player);
                }
                let player = e.player.clone();
                b.ranking.insert(e);
                let new_rank = b.ranking.rank(&player).expect("just inserted");
                visible |= new_rank <= top || old_rank.is_some_and(|r| r <= top);
                // A new player pushes everyone below down one.
                let other = old_rank.unwrap_or(b.ranking.len() as u64);
                b.note_moved(new_rank, other);
                b.note_touched(&player);
            }
            b.next_seq = b.next_seq.max(next_seq);
            let results = posted
                .into_iter()
                .map(|(player, changed)| {
                    let score = b.ranking.get(&player).expect("posted players exist").score;
                    let rank = b.ranking.rank(&player).expect("posted players exist");
                    ScoreResult {
                        player,
                        rank,
                        score,
                        changed,
                        season,
                    }
                })
                .collect();
            (Applied::Scores(results), visible)
        }
        Write::Options(options, season) => {
            if b.options.reorders(&options) {
                // Only queued on a board whose view was empty, so nothing is lost.
                b.ranking = options.ranking();
            }
            b.schedule = options.schedule();
            b.options = options;
            if b.pending.options.as_ref().is_some_and(|(w, _)| *w == id) {
                b.pending.options = None;
                b.pending.schedule = None;
            }
            if let Some(s) = season {
                b.season = s;
                if b.pending.season.is_some_and(|(w, _)| w == id) {
                    b.pending.season = None;
                }
            }
            (Applied::Done, true)
        }
        Write::Delete(player) => {
            let top = b.options.top as u64;
            let len = b.ranking.len() as u64;
            let rank = b.ranking.rank(&player);
            if rank.is_some() {
                b.ranking.remove(&player);
                if b.pending.reset.is_none() && b.pending.entries.contains_key(&player) {
                    // Posted again after the delete: a player the ranking no longer holds.
                    b.pending.fresh += 1;
                }
            }
            if b.pending.deleted.get(&player) == Some(&id) {
                b.pending.deleted.remove(&player);
            }
            // Everyone below moves up one; the player's own window empties.
            if let Some(r) = rank {
                b.note_moved(r, len);
                b.note_touched(&player);
            }
            (Applied::Done, rank.is_some_and(|r| r <= top))
        }
        w @ (Write::Reset | Write::Close(_)) => {
            drop_elsewhere(b.ranking.take());
            if let Write::Close(next) = w {
                b.season = next;
                if b.pending.season.is_some_and(|(w, _)| w == id) {
                    b.pending.season = None;
                }
            }
            if b.pending.reset == Some(id) {
                b.pending.reset = None;
            }
            if b.pending.reset.is_none() {
                // The ranking is empty: every queued player is one it does not hold.
                b.pending.fresh = b.pending.entries.len();
            }
            (Applied::Done, true)
        }
    };
    if !matches!(applied, Applied::Scores(_)) {
        b.note_moved(0, u64::MAX);
    }
    b.top_dirty |= visible;
    let due = b.needs_update();
    (b.name.clone(), applied, due)
}

/// A player's entry as this batch sees it: its own earlier change, else the pending view.
fn batch_entry<'a>(
    b: &'a Board,
    batch: &'a HashMap<Arc<str>, Entry>,
    player: &str,
) -> Option<&'a Entry> {
    batch.get(player).or_else(|| b.view_entry(player))
}

fn store_error(e: StoreError) -> BoardError {
    tracing::error!("leaderboard store write failed: {e}");
    BoardError::Store(e.to_string())
}

#[doc(hidden)]
/// (player, score, meta, subscore if posted).
pub type ValidScore = (String, f64, Option<Arc<str>>, Option<f64>);

#[doc(hidden)] // pub for fuzz/fuzz_targets/score_batch.rs
pub fn validate(i: usize, input: ScoreInput) -> Result<ValidScore, BoardError> {
    let bad = |what: String| BoardError::Invalid(format!("entry {i}: {what}"));
    let player = input
        .player
        .ok_or_else(|| bad("missing \"player\"".into()))?;
    if player.is_empty() || player.len() > MAX_PLAYER_LEN || player.chars().any(char::is_control) {
        return Err(bad(format!(
            "player must be 1-{MAX_PLAYER_LEN} bytes without control characters"
        )));
    }
    let score = input
        .score
        .ok_or_else(|| bad(format!("missing \"score\" for player {player:?}")))?;
    let score = score
        .as_f64()
        .filter(|s| s.is_finite() && s.abs() <= MAX_ABS_SCORE)
        .ok_or_else(|| {
            bad(format!(
                "score for player {player:?} must be a finite number within ±{MAX_ABS_SCORE:e}"
            ))
        })?;
    let subscore = match input.subscore {
        None => None,
        Some(n) => Some(
            n.as_f64()
                .filter(|s| s.is_finite() && s.abs() <= MAX_ABS_SCORE)
                .ok_or_else(|| {
                    bad(format!(
                        "subscore for player {player:?} must be a finite number within \
                         ±{MAX_ABS_SCORE:e}"
                    ))
                })?,
        ),
    };
    let meta = match input.meta {
        None => None,
        Some(m) => {
            let text = m.get();
            if !text.starts_with('{') {
                return Err(bad(format!(
                    "meta for player {player:?} must be a JSON object"
                )));
            }
            if text.len() > MAX_META_BYTES {
                return Err(bad(format!(
                    "meta for player {player:?} is over {MAX_META_BYTES} bytes"
                )));
            }
            Some(Arc::from(text))
        }
    };
    Ok((player, score, meta, subscore))
}

/// A `subscore` is posted only to a board with a `tiebreak`: elsewhere it would be
/// dropped silently, and the game would believe its ties were broken.
pub(super) fn check_subscores(
    board: &str,
    options: &BoardOptions,
    scores: &[ValidScore],
) -> Result<(), BoardError> {
    if options.tiebreak.is_some() {
        return Ok(());
    }
    match scores.iter().position(|s| s.3.is_some()) {
        None => Ok(()),
        Some(i) => Err(no_tiebreak(board, i)),
    }
}

/// Entry `i` posted a subscore to `board`, which has no tiebreak.
pub(super) fn no_tiebreak(board: &str, i: usize) -> BoardError {
    BoardError::NoTiebreak(format!(
        "entry {i}: board {board:?} has no tiebreak, so it takes no subscore; set its \
         option \"tiebreak\" (\"high\" or \"low\") while it is empty"
    ))
}

/// The distinct players of a batch that `current` does not hold: the players it would add.
fn new_players<'a>(current: impl Fn(&str) -> Option<&'a Entry>, scores: &[ValidScore]) -> usize {
    let mut seen: HashSet<&str> = HashSet::new();
    scores
        .iter()
        .filter(|(p, ..)| current(p).is_none() && seen.insert(p))
        .count()
}

/// A batch adding `new` players to a board of `players` fits under `max`; one adding
/// nobody always does.
pub(super) fn check_players(
    board: &str,
    players: usize,
    new: usize,
    max: usize,
) -> Result<(), BoardError> {
    if new == 0 || players.saturating_add(new) <= max {
        return Ok(());
    }
    Err(BoardError::TooManyPlayers {
        board: board.into(),
        players,
        new,
        max,
    })
}

/// In `increment` mode the sums must stay in range too; checked before anything is applied
/// so the batch stays all-or-nothing.
#[doc(hidden)] // pub for fuzz/fuzz_targets/score_batch.rs
pub fn check_increments<'a>(
    current: impl Fn(&str) -> Option<&'a Entry>,
    scores: &[ValidScore],
) -> Result<(), BoardError> {
    let mut sums: HashMap<&str, (f64, f64)> = HashMap::new();
    for (i, (player, delta, _, sub)) in scores.iter().enumerate() {
        let sum = sums
            .entry(player)
            .or_insert_with(|| current(player).map_or((0.0, 0.0), |e| (e.score, e.subscore)));
        sum.0 += delta;
        sum.1 += sub.unwrap_or(0.0);
        if sum.0.abs() > MAX_ABS_SCORE || sum.1.abs() > MAX_ABS_SCORE {
            return Err(BoardError::Invalid(format!(
                "entry {i}: player {player:?}'s total would leave ±{MAX_ABS_SCORE:e}"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn open(dir: &std::path::Path) -> Arc<Boards> {
        let cfg = Config {
            data_dir: dir.to_path_buf(),
            ..Config::default()
        };
        let metrics = Arc::new(Metrics::new());
        let hub = Arc::new(Hub::new(100, metrics.clone()));
        let broker = Arc::new(crate::broker::memory::MemoryBroker::new(
            &cfg,
            hub.clone(),
            metrics.clone(),
        ));
        Boards::open(&cfg, hub, broker, metrics, CancellationToken::new())
            .await
            .unwrap()
    }

    /// A score that shifts every rank: the mover's own window goes out in the next update,
    /// first; the shifted ones follow in slices of at most SHIFTED_PER_UPDATE, each once.
    #[test]
    fn the_movers_window_goes_first_and_the_shifted_follow_in_bounded_slices() {
        let mut b = Board::new("t".into(), BoardOptions::default(), 1, 0);
        let n = 4 * SHIFTED_PER_UPDATE;
        for i in 0..n {
            let p = format!("p{i}");
            b.ranking
                .submit(&p, i as f64, ScoreMode::Latest, i as u64, None);
            b.watched.insert(Arc::from(p), None);
        }
        b.note_moved(0, u64::MAX);
        let mut first = 0;
        loop {
            let w = player_windows(&mut b);
            if w.is_empty() {
                break;
            }
            assert!(w.len() <= SHIFTED_PER_UPDATE, "{}", w.len());
            first += w.len();
        }
        assert_eq!(first, n, "every follower's first window");
        // The last player jumps to first place: every rank in between shifts.
        b.ranking
            .submit("p0", 1e9, ScoreMode::Latest, n as u64, None);
        b.note_moved(1, n as u64);
        b.note_touched("p0");
        let w = player_windows(&mut b);
        assert_eq!(w[0].0, crate::topic::player_topic("t", "p0"));
        assert!(w.len() <= 1 + SHIFTED_PER_UPDATE, "{}", w.len());
        let mut seen: HashSet<String> = w.into_iter().map(|(t, _)| t).collect();
        let mut updates = 1;
        while !b.shifted.is_empty() {
            for (t, _) in player_windows(&mut b) {
                assert!(seen.insert(t), "a window sent twice");
            }
            updates += 1;
        }
        assert_eq!(seen.len(), n, "every shifted window, once");
        assert_eq!(updates, n.div_ceil(SHIFTED_PER_UPDATE));
    }

    /// Makes the next `n` store commits fail as a full disk would.
    fn fail_commits(boards: &Boards, n: u64) {
        let writer = boards.storage.local_writer().unwrap();
        writer.store().fail_commits.store(n, Ordering::SeqCst);
    }

    fn score(player: &str, score: i64) -> ScoreInput {
        serde_json::from_value(serde_json::json!({"player": player, "score": score})).unwrap()
    }

    /// The board as every reader sees it: (player, score) by rank, or None if it is absent.
    fn shown(boards: &Boards, name: &str) -> Option<Vec<(String, f64)>> {
        boards
            .with_board(name, |b| {
                b.ranking
                    .top(usize::MAX)
                    .into_iter()
                    .map(|(_, e)| (e.player.to_string(), e.score))
                    .collect()
            })
            .ok()
    }

    fn increment() -> BoardOptions {
        BoardOptions {
            mode: ScoreMode::Increment,
            ..BoardOptions::default()
        }
    }

    /// The issue's example: +10 fails, +10 is retried; memory and disk hold 10, not 20.
    #[tokio::test]
    async fn failed_commit_leaves_memory_equal_to_disk() {
        let dir = tempfile::tempdir().unwrap();
        let boards = open(dir.path()).await;
        boards.put_board("inc", increment()).await.unwrap();
        fail_commits(&boards, 1);
        let err = boards
            .submit("inc", vec![score("p", 10)], 100)
            .await
            .unwrap_err();
        assert!(matches!(err, BoardError::Store(_)), "{err}");
        assert_eq!(shown(&boards, "inc"), Some(vec![]));
        let r = boards
            .submit("inc", vec![score("p", 10)], 100)
            .await
            .unwrap();
        assert_eq!((r[0].score, r[0].rank, r[0].changed), (10.0, 1, true));
        assert_eq!(shown(&boards, "inc"), Some(vec![("p".into(), 10.0)]));
        boards.close().await;
        let boards = open(dir.path()).await;
        assert_eq!(shown(&boards, "inc"), Some(vec![("p".into(), 10.0)]));
        boards.close().await;
    }

    /// Many concurrent increments to one player while group commits fail now and then:
    /// writes queued behind a failed one were computed on top of it and must fail too, so
    /// the total shown, and the total on disk, is exactly the number of acknowledged +1s.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_queued_behind_a_failed_commit_are_not_committed() {
        let dir = tempfile::tempdir().unwrap();
        let boards = open(dir.path()).await;
        boards.put_board("inc", increment()).await.unwrap();
        let mut acked = 0u64;
        let mut failed = 0u64;
        for round in 0..5u64 {
            let mut calls = tokio::task::JoinSet::new();
            for _ in 0..20 {
                let b = boards.clone();
                calls.spawn(async move {
                    let mut results = Vec::new();
                    for _ in 0..20 {
                        results.push(b.submit("inc", vec![score("p", 1)], 100).await);
                    }
                    results
                });
            }
            // Fail one commit once some of this round's posts went through.
            let start = boards.metrics.scores.get();
            let b = boards.clone();
            let injector = tokio::spawn(async move {
                while b.metrics.scores.get() < start + 50 + round * 40 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                fail_commits(&b, 1);
            });
            while let Some(r) = calls.join_next().await {
                for r in r.unwrap() {
                    match r {
                        Ok(_) => acked += 1,
                        Err(BoardError::Store(_)) => failed += 1,
                        Err(e) => panic!("{e}"),
                    }
                }
            }
            injector.await.unwrap();
            let total = shown(&boards, "inc").unwrap()[0].1;
            assert_eq!(total, acked as f64, "round {round}: {failed} failed");
            assert_eq!(
                boards.queued_bytes.available_permits(),
                MAX_QUEUED_SCORE_BYTES,
                "every resolved write gave its queue budget back"
            );
        }
        assert!(failed >= 5, "every round's failure hit someone");
        boards.close().await;
        let boards = open(dir.path()).await;
        assert_eq!(
            shown(&boards, "inc").unwrap()[0].1,
            acked as f64,
            "disk holds exactly the acknowledged increments"
        );
        boards.close().await;
    }

    /// A score posted while a delete of its player is queued (not yet durable) starts a new
    /// entry, not one on top of the deleted; a failed delete changes nothing.
    #[tokio::test]
    async fn a_score_queued_behind_a_delete_starts_a_new_entry() {
        let dir = tempfile::tempdir().unwrap();
        let boards = open(dir.path()).await;
        boards.put_board("inc", increment()).await.unwrap();
        boards
            .submit("inc", vec![score("p", 10), score("q", 1)], 100)
            .await
            .unwrap();
        fail_commits(&boards, 1);
        let err = boards.delete_player("inc", "p").await.unwrap_err();
        assert!(matches!(err, BoardError::Store(_)), "{err}");
        let both = vec![("p".into(), 10.0), ("q".into(), 1.0)];
        assert_eq!(shown(&boards, "inc"), Some(both));
        // Both queued before either is durable: the delete first (polled first).
        let (deleted, posted) = tokio::join!(
            boards.delete_player("inc", "p"),
            boards.submit("inc", vec![score("p", 5)], 100)
        );
        deleted.unwrap();
        assert_eq!(posted.unwrap()[0].score, 5.0);
        let after = vec![("p".into(), 5.0), ("q".into(), 1.0)];
        assert_eq!(shown(&boards, "inc"), Some(after.clone()));
        let err = boards.delete_player("inc", "nobody").await.unwrap_err();
        assert!(matches!(err, BoardError::NoPlayer { .. }), "{err}");
        boards.close().await;
        let boards = open(dir.path()).await;
        assert_eq!(shown(&boards, "inc"), Some(after));
        boards.delete_player("inc", "q").await.unwrap();
        assert_eq!(shown(&boards, "inc"), Some(vec![("p".into(), 5.0)]));
        boards.close().await;
    }

    #[tokio::test]
    async fn failed_reset_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let boards = open(dir.path()).await;
        boards
            .submit("b", vec![score("a", 3), score("b", 5)], 100)
            .await
            .unwrap();
        let before = shown(&boards, "b");
        assert_eq!(before.as_ref().map(Vec::len), Some(2));
        fail_commits(&boards, 1);
        let err = boards.reset("b").await.unwrap_err();
        assert!(matches!(err, BoardError::Store(_)), "{err}");
        assert_eq!(shown(&boards, "b"), before);
        // The board still takes scores on top of its entries, and resets for real.
        let r = boards.submit("b", vec![score("c", 4)], 100).await.unwrap();
        assert_eq!(r[0].rank, 2);
        boards.close().await;
        let boards = open(dir.path()).await;
        assert_eq!(shown(&boards, "b").unwrap().len(), 3);
        boards.reset("b").await.unwrap();
        assert_eq!(shown(&boards, "b"), Some(vec![]));
        boards.close().await;
    }

    #[tokio::test]
    async fn failed_put_board_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let boards = open(dir.path()).await;
        boards.submit("b", vec![score("a", 3)], 100).await.unwrap();
        let opts = |b: &Boards, name: &str| b.with_board(name, |v| v.options.clone()).ok();
        let before = opts(&boards, "b");
        fail_commits(&boards, 2);
        let changed = BoardOptions {
            top: 3,
            ..increment()
        };
        assert!(boards.put_board("b", changed).await.is_err());
        assert_eq!(opts(&boards, "b"), before);
        // A board whose creating write failed does not exist, and is later created with
        // the defaults, not with the options of the failed write.
        let low = BoardOptions {
            order: SortOrder::Low,
            ..increment()
        };
        assert!(boards.put_board("new", low).await.is_err());
        assert!(matches!(
            boards.with_board("new", |_| ()),
            Err(BoardError::NoBoard(_))
        ));
        assert!(!boards.list().iter().any(|b| b["name"] == "new"));
        boards
            .submit("new", vec![score("x", 1)], 100)
            .await
            .unwrap();
        assert_eq!(
            opts(&boards, "new"),
            Some(BoardOptions {
                top: Config::default().board_top,
                ..BoardOptions::default()
            })
        );
        boards.close().await;
    }

    /// `view_len` counted the slow way: every player the pending view shows.
    fn view_len_slow(b: &Board) -> usize {
        let mut players: HashSet<Arc<str>> = HashSet::new();
        if b.pending.reset.is_none() {
            players.extend(b.ranking.top(usize::MAX).into_iter().map(|(_, e)| e.player));
        }
        players.extend(b.pending.entries.keys().cloned());
        players.len()
    }

    /// The player cap is checked against `view_len`, an O(1) count kept through queued
    /// writes, commits, failed commits and resets: it must always equal the slow count,
    /// and no board ever holds more players than the cap, whatever interleaves.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_view_count_stays_exact_and_the_cap_holds() {
        use rand::Rng;
        const CAP: usize = 20;
        let dir = tempfile::tempdir().unwrap();
        let boards = open(dir.path()).await;
        let check = |boards: &Boards| {
            let board = boards.get("race").unwrap();
            let b = board.lock();
            assert_eq!(b.view_len(), view_len_slow(&b));
            assert!(b.view_len() <= CAP && b.ranking.len() <= CAP);
        };
        let mut calls = tokio::task::JoinSet::new();
        for t in 0..6u64 {
            let b = boards.clone();
            calls.spawn(async move {
                let mut refused = 0;
                for i in 0..60u64 {
                    let (batch, reset, fail) = {
                        let mut rng = rand::thread_rng();
                        let n = rng.gen_range(1..4);
                        let batch: Vec<ScoreInput> = (0..n)
                            .map(|_| score(&format!("p{}", rng.gen_range(0..30)), 1))
                            .collect();
                        (batch, rng.gen_ratio(1, 25), rng.gen_ratio(1, 30))
                    };
                    if fail {
                        fail_commits(&b, 1);
                    }
                    let r = if reset && i > 0 {
                        b.reset("race").await.map(|_| ())
                    } else {
                        b.submit("race", batch, CAP).await.map(|_| ())
                    };
                    match r {
                        Ok(()) => {}
                        Err(BoardError::TooManyPlayers { max, .. }) => {
                            assert_eq!(max, CAP);
                            refused += 1;
                        }
                        Err(BoardError::Store(_) | BoardError::NoBoard(_)) => {}
                        Err(e) => panic!("task {t}: {e}"),
                    }
                }
                refused
            });
        }
        let mut refused = 0;
        loop {
            if boards.get("race").is_some() {
                check(&boards);
            }
            match tokio::time::timeout(Duration::from_millis(1), calls.join_next()).await {
                Ok(Some(r)) => refused += r.unwrap(),
                Ok(None) => break,
                Err(_) => {}
            }
        }
        check(&boards);
        let board = boards.get("race").unwrap();
        let b = board.lock();
        assert!(b.pending.entries.is_empty() && b.pending.fresh == 0);
        assert!(refused > 0, "the cap was reached at least once");
    }

    #[tokio::test]
    async fn pages_skip_unreadable_and_uncreated_boards_and_cross_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let boards = open(dir.path()).await;
        for i in 0..1500 {
            boards
                .submit(&format!("b{i:04}"), vec![score("p", 1)], 100)
                .await
                .unwrap();
        }
        // In memory, not created durably: never listed.
        fail_commits(&boards, 1);
        assert!(boards
            .submit("b0000x", vec![score("p", 1)], 100)
            .await
            .is_err());
        let odd = |n: &str| n.ends_with(['1', '3', '5', '7', '9']);
        let mut seen = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let (page, more) = boards.page(cursor.as_deref(), 7, |n| odd(n));
            assert!(page.len() <= 7);
            seen.extend(page.iter().map(|b| b["name"].as_str().unwrap().to_string()));
            if !more {
                break;
            }
            assert_eq!(page.len(), 7, "a page followed by more is full");
            cursor = seen.last().cloned();
        }
        let want: Vec<String> = (0..1500)
            .map(|i| format!("b{i:04}"))
            .filter(|n| odd(n))
            .collect();
        assert_eq!(seen, want);
        // Nothing readable past the first chunk of the map: one page, no more.
        let (page, more) = boards.page(None, 1000, |n| n == "b1499");
        assert_eq!((page.len(), more), (1, false));
        let (page, more) = boards.page(Some("b1499"), 10, |_| true);
        assert!(page.is_empty() && !more);
        boards.close().await;
    }
}
