//! The leaderboard service: boards in memory (ranking), made durable by the store's group
//! commit, and shown live through the hub as retained, conflated `board:{name}` topics.
//!
//! A score post is validated whole, applied to the ranking under the board's lock, then
//! committed (with everything else waiting) in one durable transaction; only then is it
//! acknowledged and the board marked dirty. The update task publishes dirty boards with a
//! leading-and-trailing throttle: a change after a quiet spell goes out at once, and any
//! number of changes within `board_update_interval` after it coalesce into one update
//! carrying the newest state.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::ranking::{Entry, Ranking, ScoreMode, SortOrder};
use super::store::{Store, StoreOp, StoreWriter, StoredEntry};
use crate::config::{Config, MAX_BOARD_TOP};
use crate::hub::{Hub, PublishOptions};
use crate::metrics::Metrics;

/// Scores beyond ±1e15 are refused: every integer up to there is exact in an f64, so
/// increments never lose precision silently.
pub const MAX_ABS_SCORE: f64 = 1e15;
pub const MAX_PLAYER_LEN: usize = 128;
pub const MAX_META_BYTES: usize = 512;
pub const MAX_BATCH: usize = 1000;
pub const MAX_BOARD_NAME: usize = 64;
/// How often watcher counts are compared with what was last shown.
const WATCHER_CHECK: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BoardOptions {
    pub order: SortOrder,
    pub mode: ScoreMode,
    pub top: usize,
}

impl Default for BoardOptions {
    fn default() -> Self {
        BoardOptions {
            order: SortOrder::High,
            mode: ScoreMode::Best,
            top: 10,
        }
    }
}

/// One score as posted.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoreInput {
    pub player: Option<String>,
    pub score: Option<serde_json::Number>,
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
    #[error("the score store failed: {0}")]
    Store(String),
}

#[derive(Serialize)]
pub struct RankedEntry<'a> {
    pub rank: u64,
    pub player: &'a str,
    #[serde(serialize_with = "score_json")]
    pub score: f64,
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

pub fn ranked(list: &[(u64, Entry)]) -> Vec<RankedEntry<'_>> {
    list.iter()
        .map(|(rank, e)| RankedEntry {
            rank: *rank,
            player: &e.player,
            score: e.score,
            // Stored meta was validated as JSON on the way in.
            meta: e.meta.as_deref().and_then(|m| serde_json::from_str(m).ok()),
        })
        .collect()
}

struct Board {
    name: Arc<str>,
    topic: String,
    options: BoardOptions,
    ranking: Ranking,
    next_seq: u64,
    /// Strictly increases with every update published while the process runs.
    version: u64,
    last_published: Option<Instant>,
    shown_watchers: usize,
    /// Whether the store knows this board yet. Until a commit that creates it succeeds,
    /// every write to it carries the create op, so concurrent first writes never race it.
    persisted: bool,
}

impl Board {
    fn new(name: Arc<str>, options: BoardOptions, next_seq: u64) -> Self {
        Board {
            topic: format!("board:{name}"),
            name,
            ranking: Ranking::new(options.order),
            options,
            next_seq,
            version: next_seq,
            last_published: None,
            shown_watchers: 0,
            persisted: false,
        }
    }
}

pub struct Boards {
    boards: RwLock<HashMap<Arc<str>, Arc<Mutex<Board>>>>,
    dirty: Mutex<HashSet<Arc<str>>>,
    wake: Notify,
    writer: Mutex<Option<StoreWriter>>,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    interval: Duration,
    default_top: usize,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    stop: CancellationToken,
}

impl Boards {
    /// Opens the store in `data_dir`, loads every board and publishes each one's snapshot
    /// so the first watcher gets it at once.
    pub async fn open(
        cfg: &Config,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<Boards>> {
        let dir = cfg.data_dir.clone();
        let (store, stored) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let store = Store::open(&dir)?;
            let boards = store.load()?;
            Ok((store, boards))
        })
        .await??;
        let mut boards = HashMap::new();
        for sb in stored {
            let options: BoardOptions = serde_json::from_str(&sb.options).unwrap_or_default();
            let name: Arc<str> = sb.name.into();
            let mut board = Board::new(name.clone(), options, sb.next_seq);
            board.persisted = true;
            for e in sb.entries {
                board.ranking.insert(Entry {
                    player: e.player.into(),
                    score: e.score,
                    achieved: e.achieved,
                    meta: e.meta.map(Into::into),
                });
            }
            boards.insert(name, Arc::new(Mutex::new(board)));
        }
        let (writer, writer_task) = StoreWriter::spawn(store, 4096);
        let this = Arc::new(Boards {
            dirty: Mutex::new(boards.keys().cloned().collect()),
            boards: RwLock::new(boards),
            wake: Notify::new(),
            writer: Mutex::new(Some(writer)),
            hub,
            metrics,
            interval: cfg.board_update_interval,
            default_top: cfg.board_top,
            tasks: Mutex::new(vec![writer_task]),
            stop: shutdown.child_token(),
        });
        let updater = tokio::spawn(this.clone().update_loop());
        this.tasks.lock().push(updater);
        Ok(this)
    }

    /// Stops publishing and lets the store writer commit what it holds, then waits for it.
    pub async fn close(&self) {
        self.stop.cancel();
        self.writer.lock().take();
        let tasks = std::mem::take(&mut *self.tasks.lock());
        for t in tasks {
            let _ = t.await;
        }
    }

    fn writer(&self) -> Result<StoreWriter, BoardError> {
        self.writer
            .lock()
            .clone()
            .ok_or_else(|| BoardError::Store("the server is shutting down".into()))
    }

    pub fn validate_name(name: &str) -> Result<(), BoardError> {
        let ok = !name.is_empty()
            && name.len() <= MAX_BOARD_NAME
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        if ok {
            Ok(())
        } else {
            Err(BoardError::Invalid(format!(
                "board name must be 1-{MAX_BOARD_NAME} bytes of A-Z a-z 0-9 _ - ."
            )))
        }
    }

    fn get(&self, name: &str) -> Option<Arc<Mutex<Board>>> {
        self.boards.read().get(name).cloned()
    }

    /// Returns the board and whether this call created it.
    fn get_or_create(
        &self,
        name: &str,
        options: Option<BoardOptions>,
    ) -> (Arc<Mutex<Board>>, bool) {
        if let Some(b) = self.get(name) {
            return (b, false);
        }
        let mut boards = self.boards.write();
        if let Some(b) = boards.get(name) {
            return (b.clone(), false);
        }
        let name: Arc<str> = name.into();
        let options = options.unwrap_or(BoardOptions {
            top: self.default_top,
            ..BoardOptions::default()
        });
        let b = Arc::new(Mutex::new(Board::new(name.clone(), options, 1)));
        boards.insert(name, b.clone());
        (b, true)
    }

    fn check_options(o: &BoardOptions) -> Result<(), BoardError> {
        if !(1..=MAX_BOARD_TOP).contains(&o.top) {
            return Err(BoardError::Invalid(format!(
                "top must be between 1 and {MAX_BOARD_TOP}"
            )));
        }
        Ok(())
    }

    /// Creates a board or changes its options. The sort order of a board that has players
    /// cannot change (their ranks would all move); reset it first.
    pub async fn put_board(
        &self,
        name: &str,
        options: BoardOptions,
    ) -> Result<BoardOptions, BoardError> {
        Self::validate_name(name)?;
        Self::check_options(&options)?;
        let (board, _) = self.get_or_create(name, Some(options));
        {
            let mut b = board.lock();
            if b.options.order != options.order {
                if !b.ranking.is_empty() {
                    return Err(BoardError::Conflict(
                        "the sort order of a board with players cannot change; reset it first"
                            .into(),
                    ));
                }
                b.ranking = Ranking::new(options.order);
            }
            b.options = options;
        }
        let ops = vec![StoreOp::PutBoard {
            board: name.into(),
            options: serde_json::to_string(&options).expect("options"),
        }];
        self.commit(ops).await?;
        self.mark_dirty(name);
        Ok(options)
    }

    /// Applies a batch of scores all-or-nothing and returns each player's new rank once the
    /// batch is durable.
    pub async fn submit(
        &self,
        name: &str,
        inputs: Vec<ScoreInput>,
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
        let (board, _) = self.get_or_create(name, None);
        let (ops, results, visible_change) = {
            let mut b = board.lock();
            let mode = b.options.mode;
            if mode == ScoreMode::Increment {
                check_increments(&b.ranking, &scores)?;
            }
            let top = b.options.top as u64;
            let mut ops = Vec::with_capacity(scores.len() + 2);
            if !b.persisted {
                ops.push(StoreOp::PutBoard {
                    board: name.into(),
                    options: serde_json::to_string(&b.options).expect("options serialize"),
                });
            }
            let mut visible_change = false;
            let mut changed_players: HashSet<Arc<str>> = HashSet::new();
            for (player, score, meta) in &scores {
                let seq = b.next_seq;
                b.next_seq += 1;
                let s = b.ranking.submit(player, *score, mode, seq, meta.clone());
                if s.changed {
                    visible_change |= s.new_rank <= top || s.old_rank.is_some_and(|r| r <= top);
                    changed_players.insert(s.entry.player.clone());
                }
            }
            for p in &changed_players {
                if let Some(e) = b.ranking.get(p) {
                    ops.push(StoreOp::PutEntry {
                        board: name.into(),
                        entry: stored(e),
                    });
                }
            }
            ops.push(StoreOp::SetSeq {
                board: name.into(),
                next_seq: b.next_seq,
            });
            let results: Vec<ScoreResult> = scores
                .iter()
                .map(|(player, _, _)| {
                    let e = b.ranking.get(player).expect("just submitted");
                    ScoreResult {
                        player: e.player.clone(),
                        rank: b.ranking.rank(player).expect("just submitted"),
                        score: e.score,
                        changed: changed_players.contains(player.as_str()),
                    }
                })
                .collect();
            (ops, results, visible_change)
        };
        self.commit(ops).await?;
        board.lock().persisted = true;
        self.metrics.scores.inc_by(results.len() as u64);
        if visible_change {
            self.mark_dirty(name);
        }
        Ok(results)
    }

    pub async fn reset(&self, name: &str) -> Result<(), BoardError> {
        Self::validate_name(name)?;
        let board = self
            .get(name)
            .ok_or_else(|| BoardError::NoBoard(name.into()))?;
        board.lock().ranking.clear();
        self.commit(vec![StoreOp::ResetBoard { board: name.into() }])
            .await?;
        self.mark_dirty(name);
        Ok(())
    }

    async fn commit(&self, ops: Vec<StoreOp>) -> Result<(), BoardError> {
        self.writer()?.commit(ops).await.map_err(|e| {
            // The in-memory ranking already shows this batch; it was never acknowledged,
            // and a restart reloads exactly what is durable.
            tracing::error!("leaderboard store commit failed: {e}");
            BoardError::Store(e.to_string())
        })
    }

    fn mark_dirty(&self, name: &str) {
        if self.dirty.lock().insert(name.into()) {
            self.wake.notify_one();
        }
    }

    /// A read-only view of one board under its lock.
    pub fn with_board<R>(
        &self,
        name: &str,
        f: impl FnOnce(BoardView<'_>) -> R,
    ) -> Result<R, BoardError> {
        Self::validate_name(name)?;
        let board = self
            .get(name)
            .ok_or_else(|| BoardError::NoBoard(name.into()))?;
        let b = board.lock();
        let watchers = self.hub.subscriber_count(&b.topic);
        Ok(f(BoardView {
            name: &b.name,
            options: b.options,
            ranking: &b.ranking,
            version: b.version,
            watchers,
        }))
    }

    pub fn list(&self) -> Vec<serde_json::Value> {
        let boards: Vec<Arc<Mutex<Board>>> = self.boards.read().values().cloned().collect();
        let mut out: Vec<serde_json::Value> = boards
            .iter()
            .map(|b| {
                let b = b.lock();
                serde_json::json!({
                    "name": &*b.name,
                    "players": b.ranking.len(),
                    "watchers": self.hub.subscriber_count(&b.topic),
                    "order": b.options.order,
                    "mode": b.options.mode,
                    "top": b.options.top,
                })
            })
            .collect();
        out.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        out
    }

    async fn update_loop(self: Arc<Self>) {
        let mut next_watcher_check = Instant::now() + WATCHER_CHECK;
        loop {
            let now = Instant::now();
            if now >= next_watcher_check {
                self.check_watchers();
                next_watcher_check = now + WATCHER_CHECK;
            }
            let mut wake_at = next_watcher_check;
            let dirty: Vec<Arc<str>> = self.dirty.lock().iter().cloned().collect();
            for name in dirty {
                let Some(board) = self.get(&name) else {
                    self.dirty.lock().remove(&name);
                    continue;
                };
                let due = board
                    .lock()
                    .last_published
                    .map_or(now, |t| t + self.interval);
                if due <= now {
                    self.dirty.lock().remove(&name);
                    self.publish(&board);
                } else {
                    wake_at = wake_at.min(due);
                }
            }
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep_until(wake_at.into()) => {}
            }
        }
    }

    fn check_watchers(&self) {
        let boards: Vec<Arc<Mutex<Board>>> = self.boards.read().values().cloned().collect();
        for board in boards {
            let (name, changed) = {
                let b = board.lock();
                (
                    b.name.clone(),
                    self.hub.subscriber_count(&b.topic) != b.shown_watchers,
                )
            };
            if changed {
                self.dirty.lock().insert(name);
            }
        }
    }

    /// Builds the board's snapshot under its lock, then publishes it outside the lock.
    fn publish(&self, board: &Mutex<Board>) {
        let (topic, json) = {
            let mut b = board.lock();
            b.version = (b.version + 1).max(b.next_seq);
            b.last_published = Some(Instant::now());
            b.shown_watchers = self.hub.subscriber_count(&b.topic);
            let top = b.ranking.top(b.options.top);
            let json = serde_json::to_vec(&Update {
                board: &b.name,
                version: b.version,
                players: b.ranking.len(),
                watchers: b.shown_watchers,
                order: b.options.order,
                mode: b.options.mode,
                top: ranked(&top),
            })
            .expect("snapshot serializes");
            (b.topic.clone(), json)
        };
        match self.hub.publish(
            &topic,
            &json,
            PublishOptions {
                retain: true,
                conflate: true,
            },
        ) {
            Ok(_) => {
                self.metrics.board_updates.inc();
            }
            Err(e) => tracing::warn!("board update for {topic} not published: {e}"),
        }
    }
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
    mode: ScoreMode,
    top: Vec<RankedEntry<'a>>,
}

pub struct BoardView<'a> {
    pub name: &'a str,
    pub options: BoardOptions,
    pub ranking: &'a Ranking,
    pub version: u64,
    pub watchers: usize,
}

fn stored(e: &Entry) -> StoredEntry {
    StoredEntry {
        player: e.player.to_string(),
        score: e.score,
        achieved: e.achieved,
        meta: e.meta.as_deref().map(String::from),
    }
}

#[doc(hidden)]
pub type ValidScore = (String, f64, Option<Arc<str>>);

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
    Ok((player, score, meta))
}

/// In `increment` mode the sums must stay in range too; checked before anything is applied
/// so the batch stays all-or-nothing.
#[doc(hidden)] // pub for fuzz/fuzz_targets/score_batch.rs
pub fn check_increments(ranking: &Ranking, scores: &[ValidScore]) -> Result<(), BoardError> {
    let mut sums: HashMap<&str, f64> = HashMap::new();
    for (i, (player, delta, _)) in scores.iter().enumerate() {
        let sum = sums
            .entry(player)
            .or_insert_with(|| ranking.get(player).map_or(0.0, |e| e.score));
        *sum += delta;
        if sum.abs() > MAX_ABS_SCORE {
            return Err(BoardError::Invalid(format!(
                "entry {i}: player {player:?}'s total would leave ±{MAX_ABS_SCORE:e}"
            )));
        }
    }
    Ok(())
}
