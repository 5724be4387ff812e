//! Durable, crash-safe leaderboard store on [redb], with group commit.
//!
//! # Layout
//!
//! One redb file, `crier.redb`, inside the store directory:
//!
//! * `meta`: `&str -> u64`; `format` = [`FORMAT_VERSION`] (so a later layout change is
//!   detected instead of misread) and `log_seq`, the next log record number.
//! * `boards`: board name -> `[next_seq: u64 LE][options: UTF-8 JSON text]`.
//! * `entries/<board>`: one table per board, player -> `[score: f64 LE][achieved: u64 LE]
//!   [tag: bit 0 = meta follows, bit 1 = subscore follows][subscore: f64 LE, if tagged]
//!   [meta: UTF-8 JSON text]`. Entries with subscore 0 are written without it (tag 0 or
//!   1), exactly as before subscores existed, so older files read unchanged.
//! * `log`: `(board, log_seq)` -> the entries one commit put on that board, not yet
//!   checkpointed into `entries/<board>`.
//! * `seasons`: board -> `[season: u64 LE][started ms: i64 LE][anchor ms: i64 LE]`, the
//!   board's current season (a board without a row is in season 1).
//! * `archive`: `(board, season)` -> `[started: i64 LE][ended: i64 LE][players: u64 LE]
//!   [order: UTF-8]`, one row per closed season kept; its entries are the table
//!   `season/<board>/<season>` (same layout as `entries/<board>`). Closing a season folds
//!   the board's log into `entries/<board>` and *renames* that table: O(1) in the board's
//!   size, however many players it held.
//!
//! # Why an entry log
//!
//! Scores land on random players of possibly huge boards. Inserting one into a large
//! B-tree dirties one 4 KiB leaf, which a copy-on-write commit rewrites: ~20k entries/s in
//! 1,000-entry batches on the reference VM versus ~170k/s for ascending keys. So commits
//! append each board's entries as a single log record (one dirtied leaf per board per
//! commit), and a checkpoint (past [`DEFAULT_CHECKPOINT_ENTRIES`], on open, or on demand)
//! moves the log into the board tables in bulk, where many entries share each leaf. [`Store::load`]
//! overlays the pending log, so readers never see the difference.
//!
//! A table per board keeps a board's entries contiguous and makes `ResetBoard` /
//! `DeleteBoard` a `delete_table` (plus dropping the board's few pending log records),
//! which frees the board's pages without deleting each key — cheap even for a board with
//! a million entries.
//!
//! # Durability
//!
//! [`Store::commit`] applies a slice of ops in ONE write transaction with
//! [`Durability::Immediate`] (fsync before returning): either every op of the call is
//! durable, or none is applied. Checkpoints are transactions of their own and change no
//! logical content, so a crash at any point loses nothing acknowledged.
//!
//! [`StoreWriter`] is the group-commit front end, on the writer both durable stores share
//! ([`crate::redb_file::group_commit`]): one thread owns the store, callers send their ops
//! through a bounded queue and await an acknowledgement. Everything waiting in the queue
//! (up to [`MAX_GROUP_OPS`] ops) is committed in a single transaction, then every caller of
//! that group is acknowledged. Callers' ops are applied in queue (arrival) order, so one
//! caller's successive commits are applied in order.
//!
//! A caller that keeps state derived from its queued ops (the leaderboard service computes
//! each score against the not yet durable result of the scores queued before it) needs two
//! more things, which [`StoreWriter::reserve`] gives it:
//!
//! * a completion callback run *by the writer thread*, in queue order, before the next group
//!   is formed, so the caller can apply a commit's effect to its own state in exactly the
//!   order the commits reached the disk (acknowledgements wake tasks in any order);
//! * a [`Guard`]: an op list computed on top of a write that then failed must not reach the
//!   disk either (an `increment` of +10 queued behind a failed +10 carries the total 20).
//!   The failed write's callback bumps the guard's generation; the writer refuses every
//!   queued request whose generation is stale with [`StoreError::Aborted`].
//!
//! # I/O errors
//!
//! After a failed write redb refuses every later transaction (`PreviousIo`) until the
//! database is opened again. A failed commit therefore marks the store broken, and the next
//! commit first reopens the file (redb repairs it to the last durable commit), so a full
//! disk that is cleared, or a transient I/O error, does not need a restart.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::redb_file::group_commit::{self, Committer, GroupCommit, Limits};
use crate::redb_file::RedbFile;
use redb::{
    Database, Durability, ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction,
};

/// File name of the database inside the store directory.
pub const DB_FILE: &str = "crier.redb";
/// On-disk layout version written to the `meta` table.
pub const FORMAT_VERSION: u64 = 1;
/// Upper bound on the number of ops the [`StoreWriter`] puts into one transaction. A single
/// request larger than this is still committed whole (alone).
pub const MAX_GROUP_OPS: usize = 65_536;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const BOARDS: TableDefinition<&str, &[u8]> = TableDefinition::new("boards");
/// Entries committed but not yet checkpointed: (board, log_seq) -> log record.
const LOG: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("log");
const ENTRIES_PREFIX: &str = "entries/";
/// A board's current season: board -> [season][started][anchor].
const SEASONS: TableDefinition<&str, &[u8]> = TableDefinition::new("seasons");
/// Closed seasons kept: (board, season) -> [started][ended][players][order].
const ARCHIVE: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("archive");
const SEASON_PREFIX: &str = "season/";

/// One player's best entry on a board, as persisted.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StoredEntry {
    pub player: String,
    pub score: f64,
    /// The tie-break between equal scores (0 on boards without one).
    #[serde(default)]
    pub subscore: f64,
    pub achieved: u64,
    /// Raw JSON text, opaque to the store.
    pub meta: Option<String>,
}

/// A whole board as loaded at start-up.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredBoard {
    pub name: String,
    /// JSON text of the board options; opaque to the store.
    pub options: String,
    pub next_seq: u64,
    /// The current season: (number, started ms, anchor ms); `None` for a board stored
    /// before seasons (it is in season 1).
    pub season: Option<(u64, i64, i64)>,
    /// Sorted by player name (byte order).
    pub entries: Vec<StoredEntry>,
}

/// A closed season as archived.
#[derive(Clone, Debug, PartialEq)]
pub struct ArchivedSeason {
    pub season: u64,
    pub started: i64,
    pub ended: i64,
    pub players: u64,
    /// The board's sort order then (`high` / `low`, or `high/low` with a tiebreak: order/
    /// tiebreak, see `BoardOptions::archived_order`), so the archive ranks as it did.
    pub order: String,
}

/// One mutation. Ops of a commit are applied in order.
#[derive(Clone, Debug)]
pub enum StoreOp {
    /// Create the board (with `next_seq` 0 and no entries) or replace its options (keeping
    /// `next_seq` and entries).
    PutBoard { board: String, options: String },
    /// Upsert one player's entry. The board must exist.
    PutEntry { board: String, entry: StoredEntry },
    /// Forget one player's entry (a player who asked to be forgotten); a player without
    /// one is a no-op. The board must exist. Logged as a tombstone (an empty value) that
    /// load, checkpoint and season close apply as a removal.
    DeleteEntry { board: String, player: String },
    /// Forget one player's entry in every closed season the board keeps (a player who
    /// asked to be forgotten): removed from each archive table, whose player count drops
    /// by one. A player in none is a no-op. The board must exist.
    ForgetArchived { board: String, player: String },
    /// Set the board's logical clock. The board must exist.
    SetSeq { board: String, next_seq: u64 },
    /// Delete all entries, keep the board, its options and `next_seq`. The board must exist.
    ResetBoard { board: String },
    /// Delete the board with its entries. Idempotent: deleting a missing board is a no-op.
    DeleteBoard { board: String },
    /// Set the board's current season (number, start, anchor; see `season.rs`).
    SetSeason {
        board: String,
        season: u64,
        started: i64,
        anchor: i64,
    },
    /// Close the current season: its entries become the archive `closed.season` (the
    /// board starts empty, keeping options and `next_seq`), the board's season becomes
    /// `next`, and archives older than the newest `keep` are deleted. The board must exist.
    CloseSeason {
        board: String,
        closed: ArchivedSeason,
        next: (u64, i64, i64),
        keep: u64,
    },
}

impl StoreOp {
    pub fn board(&self) -> &str {
        match self {
            StoreOp::PutBoard { board, .. }
            | StoreOp::PutEntry { board, .. }
            | StoreOp::DeleteEntry { board, .. }
            | StoreOp::ForgetArchived { board, .. }
            | StoreOp::SetSeq { board, .. }
            | StoreOp::ResetBoard { board }
            | StoreOp::DeleteBoard { board }
            | StoreOp::SetSeason { board, .. }
            | StoreOp::CloseSeason { board, .. } => board,
        }
    }
}

/// Store errors. `Clone` (sources are behind `Arc`) because a failed group commit hands the
/// same error to every caller of the group.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("creating store directory {}: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: Arc<std::io::Error>,
    },
    #[error("{context}: {source}")]
    Db {
        context: String,
        #[source]
        source: Arc<redb::Error>,
    },
    /// An op referred to a board that does not exist (no `PutBoard` before it). A logical
    /// error of the caller: the [`StoreWriter`] isolates it to the offending caller.
    #[error("unknown board {board:?}")]
    UnknownBoard { board: String },
    #[error("corrupt record in table {table:?}, key {key:?}: {detail}")]
    Corrupt {
        table: String,
        key: String,
        detail: String,
    },
    #[error("unsupported store format version {found} (this build reads {FORMAT_VERSION})")]
    UnsupportedFormat { found: u64 },
    /// The [`StoreWriter`] task is gone (all work it had was finished or it failed).
    #[error("store writer is shut down")]
    Closed,
    /// The blocking commit panicked; the outcome of the group is unknown.
    #[error("store writer commit failed: {0}")]
    WriterFailed(String),
    /// The request's [`Guard`] no longer held when its turn came: it was computed on top of
    /// a write that failed, so it was not applied.
    #[error("not applied: an earlier write it depended on failed")]
    Aborted,
    /// The database is closed after an I/O error and could not be opened again yet.
    #[error("the database at {} is not open after an earlier error", path.display())]
    NotOpen { path: PathBuf },
}

impl StoreError {
    fn db(context: impl Into<String>, e: impl Into<redb::Error>) -> Self {
        StoreError::Db {
            context: context.into(),
            source: Arc::new(e.into()),
        }
    }

    /// A caller's mistake (as opposed to an I/O or database failure).
    fn is_logical(&self) -> bool {
        matches!(self, StoreError::UnknownBoard { .. })
    }
}

trait Ctx<T> {
    fn ctx(self, context: &str) -> Result<T, StoreError>;
    fn with_ctx(self, context: impl FnOnce() -> String) -> Result<T, StoreError>;
}

impl<T, E: Into<redb::Error>> Ctx<T> for Result<T, E> {
    fn ctx(self, context: &str) -> Result<T, StoreError> {
        self.map_err(|e| StoreError::db(context, e))
    }
    fn with_ctx(self, context: impl FnOnce() -> String) -> Result<T, StoreError> {
        self.map_err(|e| StoreError::db(context(), e))
    }
}

fn entries_table_name(board: &str) -> String {
    format!("{ENTRIES_PREFIX}{board}")
}

/// Board names hold no `/`, so `season/<board>/<n>` never collides.
fn season_table_name(board: &str, season: u64) -> String {
    format!("{SEASON_PREFIX}{board}/{season}")
}

fn encode_season(season: u64, started: i64, anchor: i64) -> [u8; 24] {
    let mut v = [0u8; 24];
    v[..8].copy_from_slice(&season.to_le_bytes());
    v[8..16].copy_from_slice(&started.to_le_bytes());
    v[16..].copy_from_slice(&anchor.to_le_bytes());
    v
}

fn decode_season(name: &str, bytes: &[u8]) -> Result<(u64, i64, i64), StoreError> {
    if bytes.len() != 24 {
        return Err(StoreError::Corrupt {
            table: "seasons".into(),
            key: name.into(),
            detail: "record is not 24 bytes".into(),
        });
    }
    let n = |r: std::ops::Range<usize>| bytes[r].try_into().expect("8 bytes");
    Ok((
        u64::from_le_bytes(n(0..8)),
        i64::from_le_bytes(n(8..16)),
        i64::from_le_bytes(n(16..24)),
    ))
}

fn encode_archived(a: &ArchivedSeason) -> Vec<u8> {
    let mut v = Vec::with_capacity(24 + a.order.len());
    v.extend_from_slice(&a.started.to_le_bytes());
    v.extend_from_slice(&a.ended.to_le_bytes());
    v.extend_from_slice(&a.players.to_le_bytes());
    v.extend_from_slice(a.order.as_bytes());
    v
}

fn decode_archived(board: &str, season: u64, bytes: &[u8]) -> Result<ArchivedSeason, StoreError> {
    let corrupt = |detail: &str| StoreError::Corrupt {
        table: "archive".into(),
        key: format!("{board}/{season}"),
        detail: detail.into(),
    };
    if bytes.len() < 24 {
        return Err(corrupt("record shorter than 24 bytes"));
    }
    let n = |r: std::ops::Range<usize>| bytes[r].try_into().expect("8 bytes");
    Ok(ArchivedSeason {
        season,
        started: i64::from_le_bytes(n(0..8)),
        ended: i64::from_le_bytes(n(8..16)),
        players: u64::from_le_bytes(n(16..24)),
        order: std::str::from_utf8(&bytes[24..])
            .map_err(|_| corrupt("order is not UTF-8"))?
            .to_owned(),
    })
}

// ---- record encoding -------------------------------------------------------------------

fn encode_board(next_seq: u64, options: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + options.len());
    v.extend_from_slice(&next_seq.to_le_bytes());
    v.extend_from_slice(options.as_bytes());
    v
}

fn decode_board(name: &str, bytes: &[u8]) -> Result<(u64, String), StoreError> {
    let corrupt = |detail: &str| StoreError::Corrupt {
        table: "boards".into(),
        key: name.into(),
        detail: detail.into(),
    };
    if bytes.len() < 8 {
        return Err(corrupt("record shorter than 8 bytes"));
    }
    let next_seq = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    let options = std::str::from_utf8(&bytes[8..])
        .map_err(|_| corrupt("options are not UTF-8"))?
        .to_owned();
    Ok((next_seq, options))
}

fn encode_entry(e: &StoredEntry) -> Vec<u8> {
    let meta_len = e.meta.as_ref().map_or(0, String::len);
    let mut v = Vec::with_capacity(25 + meta_len);
    v.extend_from_slice(&e.score.to_le_bytes());
    v.extend_from_slice(&e.achieved.to_le_bytes());
    let sub = e.subscore != 0.0;
    v.push(u8::from(e.meta.is_some()) | (u8::from(sub) << 1));
    if sub {
        v.extend_from_slice(&e.subscore.to_le_bytes());
    }
    if let Some(m) = &e.meta {
        v.extend_from_slice(m.as_bytes());
    }
    v
}

fn decode_entry(board: &str, player: &str, bytes: &[u8]) -> Result<StoredEntry, StoreError> {
    let corrupt = |detail: &str| StoreError::Corrupt {
        table: entries_table_name(board),
        key: player.into(),
        detail: detail.into(),
    };
    if bytes.len() < 17 {
        return Err(corrupt("record shorter than 17 bytes"));
    }
    let score = f64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    let achieved = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    let tag = bytes[16];
    if tag > 3 {
        return Err(corrupt("bad meta tag"));
    }
    let mut rest = &bytes[17..];
    let mut subscore = 0.0;
    if tag & 2 != 0 {
        let sub = rest
            .get(..8)
            .ok_or_else(|| corrupt("subscore shorter than 8 bytes"))?;
        subscore = f64::from_le_bytes(sub.try_into().expect("8 bytes"));
        rest = &rest[8..];
    }
    let meta = match tag & 1 {
        0 if rest.is_empty() => None,
        0 => return Err(corrupt("bytes after an entry without meta")),
        _ => Some(
            std::str::from_utf8(rest)
                .map_err(|_| corrupt("meta is not UTF-8"))?
                .to_owned(),
        ),
    };
    Ok(StoredEntry {
        player: player.to_owned(),
        score,
        subscore,
        achieved,
        meta,
    })
}

// ---- entry log encoding ----------------------------------------------------------------
//
// A log record holds the entries one commit put on one board:
// repeated [player len: u32 LE][player][value len: u32 LE][encode_entry value].

fn encode_log_entry(buf: &mut Vec<u8>, e: &StoredEntry) {
    let value = encode_entry(e);
    buf.extend_from_slice(&(e.player.len() as u32).to_le_bytes());
    buf.extend_from_slice(e.player.as_bytes());
    buf.extend_from_slice(&(value.len() as u32).to_le_bytes());
    buf.extend_from_slice(&value);
}

/// Appends a tombstone for `player` to a log record: an empty value, which no entry
/// encodes to (`encode_entry` writes at least 17 bytes).
fn encode_log_tombstone(buf: &mut Vec<u8>, player: &str) {
    buf.extend_from_slice(&(player.len() as u32).to_le_bytes());
    buf.extend_from_slice(player.as_bytes());
    buf.extend_from_slice(&0u32.to_le_bytes());
}

/// Calls `f(player, value)` for each entry of a log record, in order; an empty value is a
/// tombstone (`StoreOp::DeleteEntry`).
fn for_each_log_entry(
    board: &str,
    seq: u64,
    rec: &[u8],
    mut f: impl FnMut(&str, &[u8]) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let corrupt = || StoreError::Corrupt {
        table: "log".into(),
        key: format!("({board:?}, {seq})"),
        detail: "truncated or malformed log record".into(),
    };
    // Returns the length-prefixed field at `*pos` and advances past it.
    let field = |pos: &mut usize| -> Option<(usize, usize)> {
        let len_bytes = rec.get(*pos..*pos + 4)?;
        let len = u32::from_le_bytes(len_bytes.try_into().ok()?) as usize;
        let start = *pos + 4;
        rec.get(start..start + len)?;
        *pos = start + len;
        Some((start, start + len))
    };
    let mut pos = 0;
    while pos < rec.len() {
        let (p0, p1) = field(&mut pos).ok_or_else(corrupt)?;
        let (v0, v1) = field(&mut pos).ok_or_else(corrupt)?;
        let player = std::str::from_utf8(&rec[p0..p1]).map_err(|_| corrupt())?;
        f(player, &rec[v0..v1])?;
    }
    Ok(())
}

// ---- Store -----------------------------------------------------------------------------

/// Default for [`Store::set_checkpoint_threshold`].
pub const DEFAULT_CHECKPOINT_ENTRIES: u64 = 131_072;

/// The durable store: a redb database in `<dir>/crier.redb`. Synchronous; use it from a
/// blocking context or through [`StoreWriter`].
pub struct Store {
    /// Reopened after a failed commit (see the module docs).
    file: RedbFile,
    /// Entries in the log, not yet checkpointed into the per-board tables.
    logged: AtomicU64,
    checkpoint_threshold: u64,
    checkpoints: AtomicU64,
    /// Unit tests: how many of the next commits fail as if the disk did.
    #[cfg(test)]
    pub(crate) fail_commits: AtomicU64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.file.path())
            .field("logged", &self.logged)
            .finish()
    }
}

impl Store {
    /// Opens (creating `dir` and the database file if needed) the store, and checkpoints
    /// any entry log left from the previous run. After an unclean shutdown redb first
    /// repairs the file, which walks the whole database.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::CreateDir {
            path: dir.to_owned(),
            source: Arc::new(e),
        })?;
        let path = dir.join(DB_FILE);
        let file = RedbFile::create(&path).with_ctx(|| format!("opening {}", path.display()))?;
        let store = Store {
            file,
            logged: AtomicU64::new(0),
            checkpoint_threshold: DEFAULT_CHECKPOINT_ENTRIES,
            checkpoints: AtomicU64::new(0),
            #[cfg(test)]
            fail_commits: AtomicU64::new(0),
        };
        store.init()?;
        store.checkpoint()?;
        Ok(store)
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// The database file, for an online backup.
    pub fn file(&self) -> &RedbFile {
        &self.file
    }

    /// Number of logged entries after which [`Store::commit`] (and the [`StoreWriter`],
    /// after acknowledging) folds the entry log into the per-board tables. Larger values
    /// amortize the page writes of a checkpoint over more entries, at the price of a longer
    /// pause per checkpoint. 0 checkpoints after every commit.
    pub fn set_checkpoint_threshold(&mut self, entries: u64) {
        self.checkpoint_threshold = entries;
    }

    /// Entries committed to the log and not yet checkpointed.
    pub fn logged_entries(&self) -> u64 {
        self.logged.load(Ordering::Relaxed)
    }

    /// Checkpoints done since open (including the one in [`Store::open`] if it had work).
    pub fn checkpoints(&self) -> u64 {
        self.checkpoints.load(Ordering::Relaxed)
    }

    fn needs_checkpoint(&self) -> bool {
        let logged = self.logged.load(Ordering::Relaxed);
        logged > 0 && logged >= self.checkpoint_threshold
    }

    fn begin_write(&self, context: &str) -> Result<WriteTransaction, StoreError> {
        self.file
            .with_db(Database::begin_write)
            .ok_or_else(|| StoreError::NotOpen {
                path: self.file.path().to_owned(),
            })?
            .ctx(context)
    }

    fn reopen_if_broken(&self) -> Result<(), StoreError> {
        self.file
            .reopen_if_broken()
            .with_ctx(|| format!("reopening {}", self.file.path().display()))
    }

    /// Remembers that the database must be reopened if `e` came from redb (not from a
    /// caller's mistake).
    fn note_failure(&self, e: &StoreError) {
        if matches!(e, StoreError::Db { .. }) {
            self.file.mark_broken();
        }
    }

    /// Creates the fixed tables and checks / stamps the format version.
    fn init(&self) -> Result<(), StoreError> {
        let txn = self.begin_write("init: begin write")?;
        {
            let mut meta = txn.open_table(META).ctx("init: open meta")?;
            let found = meta
                .get("format")
                .ctx("init: read format")?
                .map(|v| v.value());
            match found {
                Some(FORMAT_VERSION) => {}
                Some(found) => return Err(StoreError::UnsupportedFormat { found }),
                None => {
                    meta.insert("format", FORMAT_VERSION)
                        .ctx("init: write format")?;
                }
            }
            txn.open_table(BOARDS).ctx("init: open boards")?;
            txn.open_table(LOG).ctx("init: open log")?;
            txn.open_table(SEASONS).ctx("init: open seasons")?;
            txn.open_table(ARCHIVE).ctx("init: open archive")?;
        }
        txn.commit().ctx("init: commit")
    }

    /// Reads every board with its options, clock and entries (for start-up). Boards are
    /// sorted by name, entries by player.
    pub fn load(&self) -> Result<Vec<StoredBoard>, StoreError> {
        let txn = self
            .file
            .with_db(Database::begin_read)
            .ok_or_else(|| StoreError::NotOpen {
                path: self.file.path().to_owned(),
            })?
            .ctx("load: begin read")?;
        let boards = txn.open_table(BOARDS).ctx("load: open boards")?;
        let log = txn.open_table(LOG).ctx("load: open log")?;
        let seasons = txn.open_table(SEASONS).ctx("load: open seasons")?;
        let mut out = Vec::new();
        for row in boards.iter().ctx("load: iterate boards")? {
            let (k, v) = row.ctx("load: read board")?;
            let name = k.value().to_owned();
            let (next_seq, options) = decode_board(&name, v.value())?;
            let table_name = entries_table_name(&name);
            let mut entries = Vec::new();
            match txn.open_table(TableDefinition::<&str, &[u8]>::new(&table_name)) {
                Ok(table) => {
                    entries.reserve(table.len().ctx("load: table length")? as usize);
                    for row in table
                        .iter()
                        .with_ctx(|| format!("load: iterate {table_name}"))?
                    {
                        let (k, v) = row.with_ctx(|| format!("load: read {table_name}"))?;
                        entries.push(decode_entry(&name, k.value(), v.value())?);
                    }
                }
                Err(redb::TableError::TableDoesNotExist(_)) => {}
                Err(e) => return Err(StoreError::db(format!("load: open {table_name}"), e)),
            }
            // Overlay the not yet checkpointed entries of this board (later ones win).
            let mut logged = std::collections::BTreeMap::new();
            for row in log
                .range((name.as_str(), 0)..=(name.as_str(), u64::MAX))
                .ctx("load: read log")?
            {
                let (k, v) = row.ctx("load: read log")?;
                for_each_log_entry(&name, k.value().1, v.value(), |player, value| {
                    let e = match value {
                        [] => None,
                        v => Some(decode_entry(&name, player, v)?),
                    };
                    logged.insert(player.to_owned(), e);
                    Ok(())
                })?;
            }
            if !logged.is_empty() {
                let mut merged: std::collections::BTreeMap<String, StoredEntry> =
                    entries.into_iter().map(|e| (e.player.clone(), e)).collect();
                for (player, e) in logged {
                    match e {
                        Some(e) => merged.insert(player, e),
                        None => merged.remove(&player),
                    };
                }
                entries = merged.into_values().collect();
            }
            let season = match seasons.get(name.as_str()).ctx("load: read season")? {
                Some(v) => Some(decode_season(&name, v.value())?),
                None => None,
            };
            out.push(StoredBoard {
                name,
                options,
                next_seq,
                season,
                entries,
            });
        }
        Ok(out)
    }

    /// Applies `ops` in order in ONE write transaction with [`Durability::Immediate`];
    /// returns once it is durable. On error nothing of `ops` is applied. May checkpoint
    /// afterwards (see [`Store::set_checkpoint_threshold`]); a failed checkpoint is only
    /// logged, since the commit itself is durable.
    pub fn commit(&self, ops: &[StoreOp]) -> Result<(), StoreError> {
        self.commit_iter(ops.iter())?;
        self.checkpoint_if_needed();
        Ok(())
    }

    fn checkpoint_if_needed(&self) {
        if self.needs_checkpoint() {
            if let Err(e) = self.checkpoint() {
                tracing::warn!(error = %e, "store checkpoint failed; entries stay in the log");
            }
        }
    }

    fn commit_iter<'a>(&self, ops: impl Iterator<Item = &'a StoreOp>) -> Result<(), StoreError> {
        self.reopen_if_broken()?;
        #[cfg(test)]
        if self
            .fail_commits
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
        {
            let e = StoreError::db(
                "commit",
                redb::Error::Io(std::io::Error::other("injected failure")),
            );
            self.note_failure(&e);
            return Err(e);
        }
        let result = (|| {
            let mut txn = self.begin_write("commit: begin write")?;
            txn.set_durability(Durability::Immediate);
            // On error `txn` is dropped uncommitted, which aborts it.
            let logged = apply(&txn, ops)?;
            txn.commit().ctx("commit")?;
            Ok(logged)
        })();
        match result {
            Ok(logged) => {
                self.logged.fetch_add(logged, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.note_failure(&e);
                Err(e)
            }
        }
    }

    /// Folds the entry log into the per-board entry tables and empties it, in one durable
    /// transaction. Returns the number of entries moved. Done automatically by
    /// [`Store::open`], [`Store::commit`] and [`StoreWriter`] past the threshold.
    pub fn checkpoint(&self) -> Result<u64, StoreError> {
        self.reopen_if_broken()?;
        let moved = self.checkpoint_once();
        if let Err(e) = &moved {
            self.note_failure(e);
        }
        moved
    }

    fn checkpoint_once(&self) -> Result<u64, StoreError> {
        let mut txn = self.begin_write("checkpoint: begin write")?;
        txn.set_durability(Durability::Immediate);
        let mut moved = 0u64;
        {
            let log = txn.open_table(LOG).ctx("checkpoint: open log")?;
            if log.is_empty().ctx("checkpoint: read log")? {
                return Ok(0);
            }
            let mut current: Option<(String, EntriesTable<'_>)> = None;
            for row in log.iter().ctx("checkpoint: iterate log")? {
                let (k, v) = row.ctx("checkpoint: read log")?;
                let (board, seq) = k.value();
                let table = match &mut current {
                    Some((name, table)) if name == board => table,
                    _ => {
                        current = None;
                        let table_name = entries_table_name(board);
                        let table = txn
                            .open_table(TableDefinition::<&str, &[u8]>::new(&table_name))
                            .with_ctx(|| format!("checkpoint: open {table_name}"))?;
                        &mut current.insert((board.to_owned(), table)).1
                    }
                };
                for_each_log_entry(board, seq, v.value(), |player, value| {
                    if value.is_empty() {
                        table.remove(player).ctx("checkpoint: delete entry")?;
                    } else {
                        table.insert(player, value).ctx("checkpoint: write entry")?;
                    }
                    moved += 1;
                    Ok(())
                })?;
            }
        }
        txn.delete_table(LOG).ctx("checkpoint: clear log")?;
        txn.open_table(LOG).ctx("checkpoint: recreate log")?;
        txn.commit().ctx("checkpoint: commit")?;
        self.logged.store(0, Ordering::Relaxed);
        self.checkpoints.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(entries = moved, "store checkpoint");
        Ok(moved)
    }

    /// Commits several callers' op lists in one transaction. If that fails with a logical
    /// error (a caller's mistake), falls back to one transaction per caller so only the
    /// offending caller fails, and with it every later caller sharing its guard (their ops
    /// were computed on top of its). Returns per-caller results and the number of
    /// transactions committed. Does not checkpoint.
    fn commit_group(
        &self,
        groups: &[Vec<StoreOp>],
        guards: &[Option<Arc<AtomicU64>>],
    ) -> (Vec<Result<(), StoreError>>, u64) {
        match self.commit_iter(groups.iter().flatten()) {
            Ok(()) => (vec![Ok(()); groups.len()], 1),
            Err(e) if e.is_logical() && groups.len() > 1 => {
                let mut txns = 0;
                let mut failed_guards: Vec<&Arc<AtomicU64>> = Vec::new();
                let results = groups
                    .iter()
                    .zip(guards)
                    .map(|(ops, guard)| {
                        if let Some(g) = guard {
                            if failed_guards.iter().any(|f| Arc::ptr_eq(f, g)) {
                                return Err(StoreError::Aborted);
                            }
                        }
                        let r = self.commit_iter(ops.iter());
                        txns += u64::from(r.is_ok());
                        if let (Err(_), Some(g)) = (&r, guard) {
                            failed_guards.push(g);
                        }
                        r
                    })
                    .collect();
                (results, txns)
            }
            Err(e) => (vec![Err(e); groups.len()], 0),
        }
    }
}

type EntriesTable<'txn> = redb::Table<'txn, &'static str, &'static [u8]>;

/// Applies ops to an open write transaction; returns the number of entries logged.
///
/// Board-level ops go straight to the `boards` table (small, so cheap). Entries are not
/// inserted into the board's table — one random insert into a large B-tree dirties (and
/// rewrites) one 4 KiB leaf per entry — but appended to the `log` table as one record per
/// board per commit, keyed `(board, log_seq)`. [`Store::checkpoint`] later moves them in
/// bulk, when many entries share each dirtied leaf. Reset/Delete drop the board's pending
/// log records along with its table, so the log never holds entries older than a reset.
fn apply<'a>(
    txn: &WriteTransaction,
    ops: impl Iterator<Item = &'a StoreOp>,
) -> Result<u64, StoreError> {
    let mut boards = txn.open_table(BOARDS).ctx("commit: open boards")?;
    let mut log = txn.open_table(LOG).ctx("commit: open log")?;
    // Entries of this commit per board, encoded as one log record each.
    let mut pending: std::collections::BTreeMap<&str, (u64, Vec<u8>)> = Default::default();

    fn board_exists(
        boards: &redb::Table<'_, &'static str, &'static [u8]>,
        board: &str,
    ) -> Result<bool, StoreError> {
        Ok(boards.get(board).ctx("commit: read board")?.is_some())
    }

    for op in ops {
        match op {
            StoreOp::PutBoard { board, options } => {
                let next_seq = match boards.get(board.as_str()).ctx("commit: read board")? {
                    Some(v) => decode_board(board, v.value())?.0,
                    None => 0,
                };
                boards
                    .insert(board.as_str(), encode_board(next_seq, options).as_slice())
                    .ctx("commit: write board")?;
            }
            StoreOp::SetSeq { board, next_seq } => {
                let options = match boards.get(board.as_str()).ctx("commit: read board")? {
                    Some(v) => decode_board(board, v.value())?.1,
                    None => {
                        return Err(StoreError::UnknownBoard {
                            board: board.clone(),
                        })
                    }
                };
                boards
                    .insert(board.as_str(), encode_board(*next_seq, &options).as_slice())
                    .ctx("commit: write board")?;
            }
            StoreOp::PutEntry { board, entry } => {
                // A board with pending entries exists: only Delete removes a board, and it
                // also drops the board's pending entries.
                if !pending.contains_key(board.as_str()) && !board_exists(&boards, board)? {
                    return Err(StoreError::UnknownBoard {
                        board: board.clone(),
                    });
                }
                let (n, buf) = pending.entry(board.as_str()).or_default();
                encode_log_entry(buf, entry);
                *n += 1;
            }
            StoreOp::DeleteEntry { board, player } => {
                if !pending.contains_key(board.as_str()) && !board_exists(&boards, board)? {
                    return Err(StoreError::UnknownBoard {
                        board: board.clone(),
                    });
                }
                let (n, buf) = pending.entry(board.as_str()).or_default();
                encode_log_tombstone(buf, player);
                *n += 1;
            }
            StoreOp::ForgetArchived { board, player } => {
                if !pending.contains_key(board.as_str()) && !board_exists(&boards, board)? {
                    return Err(StoreError::UnknownBoard {
                        board: board.clone(),
                    });
                }
                forget_archived(txn, board, player)?;
            }
            StoreOp::ResetBoard { board } | StoreOp::DeleteBoard { board } => {
                let delete = matches!(op, StoreOp::DeleteBoard { .. });
                if !delete && !board_exists(&boards, board)? {
                    return Err(StoreError::UnknownBoard {
                        board: board.clone(),
                    });
                }
                pending.remove(board.as_str());
                log.retain_in((board.as_str(), 0)..=(board.as_str(), u64::MAX), |_, _| {
                    false
                })
                .ctx("commit: drop logged entries")?;
                let table_name = entries_table_name(board);
                txn.delete_table(TableDefinition::<&str, &[u8]>::new(&table_name))
                    .with_ctx(|| format!("commit: delete {table_name}"))?;
                if delete {
                    boards.remove(board.as_str()).ctx("commit: delete board")?;
                    txn.open_table(SEASONS)
                        .ctx("commit: open seasons")?
                        .remove(board.as_str())
                        .ctx("commit: delete season")?;
                    prune_archives(txn, board, u64::MAX)?;
                }
            }
            StoreOp::SetSeason {
                board,
                season,
                started,
                anchor,
            } => {
                if !board_exists(&boards, board)? {
                    return Err(StoreError::UnknownBoard {
                        board: board.clone(),
                    });
                }
                txn.open_table(SEASONS)
                    .ctx("commit: open seasons")?
                    .insert(
                        board.as_str(),
                        encode_season(*season, *started, *anchor).as_slice(),
                    )
                    .ctx("commit: write season")?;
            }
            StoreOp::CloseSeason {
                board,
                closed,
                next,
                keep,
            } => {
                if !board_exists(&boards, board)? {
                    return Err(StoreError::UnknownBoard {
                        board: board.clone(),
                    });
                }
                let table_name = entries_table_name(board);
                {
                    // The season's entries: the board's table plus its log, and what
                    // this commit put on it so far.
                    let mut table = txn
                        .open_table(TableDefinition::<&str, &[u8]>::new(&table_name))
                        .with_ctx(|| format!("commit: open {table_name}"))?;
                    let mut fold = |seq: u64, rec: &[u8]| {
                        for_each_log_entry(board, seq, rec, |player, value| {
                            if value.is_empty() {
                                table.remove(player).ctx("commit: fold tombstone")?;
                            } else {
                                table.insert(player, value).ctx("commit: fold entry")?;
                            }
                            Ok(())
                        })
                    };
                    for row in log
                        .extract_from_if(
                            (board.as_str(), 0)..=(board.as_str(), u64::MAX),
                            |_, _| true,
                        )
                        .ctx("commit: take logged entries")?
                    {
                        let (k, v) = row.ctx("commit: read log")?;
                        fold(k.value().1, v.value())?;
                    }
                    if let Some((_, rec)) = pending.remove(board.as_str()) {
                        fold(u64::MAX, &rec)?;
                    }
                }
                let archived = season_table_name(board, closed.season);
                txn.delete_table(TableDefinition::<&str, &[u8]>::new(&archived))
                    .with_ctx(|| format!("commit: clear {archived}"))?;
                txn.rename_table(
                    TableDefinition::<&str, &[u8]>::new(&table_name),
                    TableDefinition::<&str, &[u8]>::new(&archived),
                )
                .with_ctx(|| format!("commit: archive {table_name}"))?;
                txn.open_table(ARCHIVE)
                    .ctx("commit: open archive")?
                    .insert(
                        (board.as_str(), closed.season),
                        encode_archived(closed).as_slice(),
                    )
                    .ctx("commit: write archive")?;
                txn.open_table(SEASONS)
                    .ctx("commit: open seasons")?
                    .insert(
                        board.as_str(),
                        encode_season(next.0, next.1, next.2).as_slice(),
                    )
                    .ctx("commit: write season")?;
                let oldest_kept = closed.season.saturating_sub(keep.saturating_sub(1));
                prune_archives(txn, board, oldest_kept)?;
            }
        }
    }

    let mut logged = 0;
    if !pending.is_empty() {
        let mut meta = txn.open_table(META).ctx("commit: open meta")?;
        let mut seq = meta
            .get("log_seq")
            .ctx("commit: read log_seq")?
            .map_or(0, |v| v.value());
        for (board, (n, rec)) in &pending {
            log.insert((*board, seq), rec.as_slice())
                .ctx("commit: append log")?;
            seq += 1;
            logged += n;
        }
        meta.insert("log_seq", seq).ctx("commit: write log_seq")?;
    }
    Ok(logged)
}

/// Removes `player` from every archive of `board` holding it, and counts them one player
/// fewer. Archive tables hold all their entries (a close folds the log first), so this is
/// one lookup per kept season.
fn forget_archived(txn: &WriteTransaction, board: &str, player: &str) -> Result<(), StoreError> {
    let mut archive = txn.open_table(ARCHIVE).ctx("commit: open archive")?;
    let kept: Vec<(u64, ArchivedSeason)> = archive
        .range((board, 0)..=(board, u64::MAX))
        .ctx("commit: read archive")?
        .map(|row| {
            let (k, v) = row.ctx("commit: read archive")?;
            let n = k.value().1;
            Ok((n, decode_archived(board, n, v.value())?))
        })
        .collect::<Result<_, StoreError>>()?;
    for (n, mut info) in kept {
        let name = season_table_name(board, n);
        let removed = match txn.open_table(TableDefinition::<&str, &[u8]>::new(&name)) {
            Ok(mut table) => table
                .remove(player)
                .with_ctx(|| format!("commit: forget in {name}"))?
                .is_some(),
            Err(redb::TableError::TableDoesNotExist(_)) => false,
            Err(e) => return Err(StoreError::db(format!("commit: open {name}"), e)),
        };
        if removed {
            info.players = info.players.saturating_sub(1);
            archive
                .insert((board, n), encode_archived(&info).as_slice())
                .ctx("commit: write archive")?;
        }
    }
    Ok(())
}

/// Deletes the board's archives numbered below `below`, rows and tables.
fn prune_archives(txn: &WriteTransaction, board: &str, below: u64) -> Result<(), StoreError> {
    if below == 0 {
        return Ok(());
    }
    let mut archive = txn.open_table(ARCHIVE).ctx("commit: open archive")?;
    let old: Vec<u64> = archive
        .extract_from_if((board, 0)..=(board, below - 1), |_, _| true)
        .ctx("commit: prune archive")?
        .map(|row| row.map(|(k, _)| k.value().1))
        .collect::<Result<_, _>>()
        .ctx("commit: prune archive")?;
    for n in old {
        let name = season_table_name(board, n);
        txn.delete_table(TableDefinition::<&str, &[u8]>::new(&name))
            .with_ctx(|| format!("commit: delete {name}"))?;
    }
    Ok(())
}

impl Store {
    /// The board's closed seasons kept, newest first.
    pub fn seasons(&self, board: &str) -> Result<Vec<ArchivedSeason>, StoreError> {
        let txn = self.begin_read("seasons")?;
        let archive = txn.open_table(ARCHIVE).ctx("seasons: open archive")?;
        let mut out = Vec::new();
        for row in archive
            .range((board, 0)..=(board, u64::MAX))
            .ctx("seasons: read archive")?
            .rev()
        {
            let (k, v) = row.ctx("seasons: read archive")?;
            out.push(decode_archived(board, k.value().1, v.value())?);
        }
        Ok(out)
    }

    /// The closed seasons (oldest first) whose archive holds `player`.
    pub fn archived_in(&self, board: &str, player: &str) -> Result<Vec<u64>, StoreError> {
        let txn = self.begin_read("archived_in")?;
        let archive = txn.open_table(ARCHIVE).ctx("archived_in: open archive")?;
        let mut out = Vec::new();
        for row in archive
            .range((board, 0)..=(board, u64::MAX))
            .ctx("archived_in: read archive")?
        {
            let n = row.ctx("archived_in: read archive")?.0.value().1;
            let name = season_table_name(board, n);
            match txn.open_table(TableDefinition::<&str, &[u8]>::new(&name)) {
                Ok(table) => {
                    if table.get(player).ctx("archived_in: read")?.is_some() {
                        out.push(n);
                    }
                }
                Err(redb::TableError::TableDoesNotExist(_)) => {}
                Err(e) => return Err(StoreError::db(format!("archived_in: open {name}"), e)),
            }
        }
        Ok(out)
    }

    /// One closed season with its entries (by player), if it is kept.
    pub fn season(
        &self,
        board: &str,
        season: u64,
    ) -> Result<Option<(ArchivedSeason, Vec<StoredEntry>)>, StoreError> {
        let txn = self.begin_read("season")?;
        let archive = txn.open_table(ARCHIVE).ctx("season: open archive")?;
        let Some(meta) = archive.get((board, season)).ctx("season: read archive")? else {
            return Ok(None);
        };
        let meta = decode_archived(board, season, meta.value())?;
        let name = season_table_name(board, season);
        let mut entries = Vec::new();
        match txn.open_table(TableDefinition::<&str, &[u8]>::new(&name)) {
            Ok(table) => {
                entries.reserve(table.len().ctx("season: table length")? as usize);
                for row in table
                    .iter()
                    .with_ctx(|| format!("season: iterate {name}"))?
                {
                    let (k, v) = row.with_ctx(|| format!("season: read {name}"))?;
                    entries.push(decode_entry(board, k.value(), v.value())?);
                }
            }
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(StoreError::db(format!("season: open {name}"), e)),
        }
        Ok(Some((meta, entries)))
    }

    fn begin_read(&self, context: &str) -> Result<redb::ReadTransaction, StoreError> {
        self.file
            .with_db(Database::begin_read)
            .ok_or_else(|| StoreError::NotOpen {
                path: self.file.path().to_owned(),
            })?
            .ctx(&format!("{context}: begin read"))
    }
}

// ---- StoreWriter (group commit) ----------------------------------------------------------

/// One caller's ops, committed together (with other callers') unless its guard failed.
pub struct Request {
    ops: Vec<StoreOp>,
    guard: Option<Guard>,
}

/// A condition on a queued request: commit it only if `generation` still holds the value it
/// had when the request was computed. Whoever owns the generation bumps it when a write the
/// later ones were computed on top of fails (see the module docs).
#[derive(Clone, Debug)]
pub struct Guard {
    pub generation: Arc<AtomicU64>,
    pub expected: u64,
}

impl Guard {
    fn holds(&self) -> bool {
        self.generation.load(Ordering::Acquire) == self.expected
    }
}

/// A reserved place in the writer's queue (see [`StoreWriter::reserve`]). Sending is
/// synchronous, so it can happen under the caller's own lock, which makes the queue order
/// equal the order in which the caller computed its requests.
pub struct Slot(group_commit::Slot<Request, StoreError>);

impl Slot {
    /// Queues `ops`; `on_done` later gets the outcome (see [`StoreWriter::reserve`]).
    pub fn send(
        self,
        ops: Vec<StoreOp>,
        guard: Option<Guard>,
        on_done: impl FnOnce(Result<(), StoreError>) + Send + 'static,
    ) {
        self.0.send(Request { ops, guard }, on_done);
    }
}

#[derive(Default, Debug)]
struct Counters {
    transactions: AtomicU64,
    groups: AtomicU64,
    requests: AtomicU64,
    ops: AtomicU64,
    failed_requests: AtomicU64,
}

/// Snapshot of a [`StoreWriter`]'s counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Write transactions committed (durably).
    pub transactions: u64,
    /// Groups formed (one commit attempt each, plus per-caller retries after a logical error).
    pub groups: u64,
    /// Caller requests processed (acknowledged with Ok or an error).
    pub requests: u64,
    /// Ops processed.
    pub ops: u64,
    /// Requests acknowledged with an error.
    pub failed_requests: u64,
    /// Checkpoints of the entry log into the board tables (see [`Store::checkpoint`]).
    pub checkpoints: u64,
    /// Entries in the log awaiting a checkpoint.
    pub logged_entries: u64,
}

/// Group-commit handle: cheap to clone; all clones feed one writer thread
/// ([`crate::redb_file::group_commit`]) that owns the [`Store`]. The thread ends (after
/// committing everything already sent) once every handle is dropped.
#[derive(Clone)]
pub struct StoreWriter {
    inner: Arc<GroupCommit<Request, StoreError>>,
    counters: Arc<Counters>,
    /// For reading stats only; all writes go through the writer thread.
    store: Arc<Store>,
}

impl std::fmt::Debug for StoreWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreWriter")
            .field("stats", &self.stats())
            .finish()
    }
}

impl StoreWriter {
    /// Starts the writer thread; the task returned ends once it has stopped. `capacity`
    /// bounds the number of queued requests (callers wait when it is full); it is raised
    /// to at least 1.
    pub fn spawn(
        store: Store,
        capacity: usize,
    ) -> Result<(StoreWriter, tokio::task::JoinHandle<()>), StoreError> {
        let counters = Arc::new(Counters::default());
        let store = Arc::new(store);
        let limits = Limits {
            capacity,
            max_requests: usize::MAX,
            max_weight: MAX_GROUP_OPS,
        };
        let committer = Writer {
            store: store.clone(),
            counters: counters.clone(),
        };
        let inner = GroupCommit::spawn("crier-boards", limits, committer)
            .map_err(|e| StoreError::WriterFailed(format!("starting the writer: {e}")))?;
        let handle = tokio::spawn(inner.stopped());
        Ok((
            StoreWriter {
                inner: Arc::new(inner),
                counters,
                store,
            },
            handle,
        ))
    }

    /// Resolves once `ops` are durable on disk (or with the commit error, in which case none
    /// of them were applied). `ops` are committed together in one transaction, possibly with
    /// other callers' ops. An empty `ops` resolves immediately.
    ///
    /// Cancel safety: if this future is dropped after the request was queued, the ops are
    /// still committed; dropped while waiting for queue capacity, nothing is sent.
    pub async fn commit(&self, ops: Vec<StoreOp>) -> Result<(), StoreError> {
        if ops.is_empty() {
            return Ok(());
        }
        self.inner
            .commit(Request { ops, guard: None })
            .await
            .unwrap_or(Err(StoreError::Closed))
    }

    /// Waits for room in the queue and reserves it, for a caller that must compute its ops
    /// under its own (synchronous) lock and queue them before releasing it; waiting for
    /// room must happen before taking such a lock.
    ///
    /// The request sent through the [`Slot`] is committed like [`StoreWriter::commit`]'s,
    /// unless its [`Guard`] no longer holds when its group is committed (then
    /// [`StoreError::Aborted`]). `on_done` runs on the writer thread right after the commit
    /// (or refusal), strictly in queue order and before the next group is taken, so it
    /// must be quick and must not block; it runs even if the caller has gone away. An
    /// empty op list is queued and answered in order like any other.
    pub async fn reserve(&self) -> Result<Slot, StoreError> {
        self.inner
            .reserve()
            .await
            .map(Slot)
            .ok_or(StoreError::Closed)
    }

    /// The store, for reads beside the writer (redb reads never wait for a write).
    pub(crate) fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Number of write transactions committed so far.
    pub fn commits(&self) -> u64 {
        self.counters.transactions.load(Ordering::Relaxed)
    }

    pub fn stats(&self) -> WriterStats {
        let c = &self.counters;
        WriterStats {
            transactions: c.transactions.load(Ordering::Relaxed),
            groups: c.groups.load(Ordering::Relaxed),
            requests: c.requests.load(Ordering::Relaxed),
            ops: c.ops.load(Ordering::Relaxed),
            failed_requests: c.failed_requests.load(Ordering::Relaxed),
            checkpoints: self.store.checkpoints(),
            logged_entries: self.store.logged_entries(),
        }
    }
}

/// The store's side of the group commit.
struct Writer {
    store: Arc<Store>,
    counters: Arc<Counters>,
}

impl Committer for Writer {
    type Request = Request;
    type Error = StoreError;

    fn weight(r: &Request) -> usize {
        r.ops.len()
    }

    fn commit(&mut self, batch: Vec<Request>) -> Vec<Result<(), StoreError>> {
        let counters = &self.counters;
        let mut results: Vec<Option<Result<(), StoreError>>> = Vec::with_capacity(batch.len());
        let (mut ops, mut guards, mut taken) = (Vec::new(), Vec::new(), Vec::new());
        let mut n_ops = 0;
        for (i, r) in batch.into_iter().enumerate() {
            // A stale guard means an earlier write of the same owner failed, and its
            // callback (which bumped the generation) already ran: refuse it, in order.
            if r.guard.as_ref().is_some_and(|g| !g.holds()) {
                counters.requests.fetch_add(1, Ordering::Relaxed);
                counters.failed_requests.fetch_add(1, Ordering::Relaxed);
                results.push(Some(Err(StoreError::Aborted)));
            } else {
                n_ops += r.ops.len();
                ops.push(r.ops);
                guards.push(r.guard.map(|g| g.generation));
                taken.push(i);
                results.push(None);
            }
        }
        if !ops.is_empty() {
            let (group, txns) = self.store.commit_group(&ops, &guards);
            counters.transactions.fetch_add(txns, Ordering::Relaxed);
            let failed = group.iter().filter(|r| r.is_err()).count() as u64;
            if let Some(Err(e)) = group.iter().find(|r| r.is_err()) {
                tracing::warn!(error = %e, failed, group = ops.len(), "store group commit failed");
            }
            counters.groups.fetch_add(1, Ordering::Relaxed);
            counters
                .requests
                .fetch_add(ops.len() as u64, Ordering::Relaxed);
            counters.ops.fetch_add(n_ops as u64, Ordering::Relaxed);
            counters
                .failed_requests
                .fetch_add(failed, Ordering::Relaxed);
            for (i, r) in taken.into_iter().zip(group) {
                results[i] = Some(r);
            }
        }
        results
            .into_iter()
            .map(|r| r.expect("every request answered"))
            .collect()
    }

    fn panicked(message: String) -> StoreError {
        StoreError::WriterFailed(message)
    }

    /// Checkpoint after acknowledging, so only callers arriving meanwhile wait for it
    /// (their requests queue up and form the next, larger group).
    fn answered(&mut self) {
        if self.store.needs_checkpoint() {
            if let Err(e) = self.store.checkpoint() {
                tracing::warn!(error = %e, "store checkpoint failed; entries stay in the log");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(player: &str, score: f64, achieved: u64, meta: Option<&str>) -> StoredEntry {
        StoredEntry {
            player: player.into(),
            score,
            subscore: 0.0,
            achieved,
            meta: meta.map(Into::into),
        }
    }

    fn put_board(board: &str, options: &str) -> StoreOp {
        StoreOp::PutBoard {
            board: board.into(),
            options: options.into(),
        }
    }

    fn put_entry(board: &str, e: StoredEntry) -> StoreOp {
        StoreOp::PutEntry {
            board: board.into(),
            entry: e,
        }
    }

    fn open(dir: &Path, checkpoint_threshold: u64) -> Store {
        let mut store = Store::open(dir).unwrap();
        store.set_checkpoint_threshold(checkpoint_threshold);
        store
    }

    #[test]
    fn round_trip_reset_delete_with_log() {
        round_trip_reset_delete(u64::MAX); // entries stay in the log until reopen
    }

    #[test]
    fn round_trip_reset_delete_checkpoint_every_commit() {
        round_trip_reset_delete(0);
    }

    fn round_trip_reset_delete(threshold: u64) {
        let dir = tempfile::tempdir().unwrap();
        let store_dir = dir.path().join("nested/store");
        {
            let store = open(&store_dir, threshold);
            assert_eq!(store.load().unwrap(), vec![]);
            store
                .commit(&[
                    put_board("alpha", r#"{"order":"desc"}"#),
                    put_board("beta", "{}"),
                    put_board("gamma", "{}"),
                    put_entry("alpha", entry("zoe", 12.5, 7, None)),
                    put_entry("alpha", entry("adam", -3.0, 8, Some(r#"{"lvl":3}"#))),
                    put_entry("beta", entry("bob", 1.0, 1, Some(""))),
                    put_entry("alpha", entry("zoe", 13.5, 9, Some("{}"))), // upsert
                    StoreOp::SetSeq {
                        board: "alpha".into(),
                        next_seq: 10,
                    },
                    put_entry("gamma", entry("g", 1.0, 1, None)),
                ])
                .unwrap();
            // Replace options: keeps seq and entries.
            store
                .commit(&[put_board("alpha", r#"{"order":"asc"}"#)])
                .unwrap();
            // Loads from the live store (log overlay or tables) match, too.
            assert_eq!(store.load().unwrap().len(), 3);
        }
        let store = open(&store_dir, threshold);
        assert_eq!(store.logged_entries(), 0, "open checkpoints");
        let expected = vec![
            StoredBoard {
                name: "alpha".into(),
                options: r#"{"order":"asc"}"#.into(),
                next_seq: 10,
                season: None,
                entries: vec![
                    entry("adam", -3.0, 8, Some(r#"{"lvl":3}"#)),
                    entry("zoe", 13.5, 9, Some("{}")),
                ],
            },
            StoredBoard {
                name: "beta".into(),
                options: "{}".into(),
                next_seq: 0,
                season: None,
                entries: vec![entry("bob", 1.0, 1, Some(""))],
            },
            StoredBoard {
                name: "gamma".into(),
                options: "{}".into(),
                next_seq: 0,
                season: None,
                entries: vec![entry("g", 1.0, 1, None)],
            },
        ];
        assert_eq!(store.load().unwrap(), expected);

        // Reset keeps board, options and seq; entries can be added again in the same txn.
        // Delete removes everything; deleting a missing board is a no-op.
        store
            .commit(&[
                put_entry("alpha", entry("eve", 1.0, 11, None)),
                StoreOp::ResetBoard {
                    board: "alpha".into(),
                },
                put_entry("alpha", entry("carl", 2.0, 12, None)),
                StoreOp::DeleteBoard {
                    board: "beta".into(),
                },
                StoreOp::DeleteBoard {
                    board: "nope".into(),
                },
                StoreOp::ResetBoard {
                    board: "gamma".into(),
                },
            ])
            .unwrap();
        let loaded_live = store.load().unwrap();
        drop(store);
        let store = open(&store_dir, threshold);
        let loaded = store.load().unwrap();
        assert_eq!(loaded, loaded_live);
        assert_eq!(
            loaded,
            vec![
                StoredBoard {
                    name: "alpha".into(),
                    options: r#"{"order":"asc"}"#.into(),
                    next_seq: 10,
                    season: None,
                    entries: vec![entry("carl", 2.0, 12, None)],
                },
                StoredBoard {
                    name: "gamma".into(),
                    options: "{}".into(),
                    next_seq: 0,
                    season: None,
                    entries: vec![],
                },
            ]
        );

        // Re-creating a deleted board starts empty with seq 0.
        store.commit(&[put_board("beta", "{}")]).unwrap();
        let beta = store.load().unwrap().into_iter().find(|b| b.name == "beta");
        assert_eq!(
            beta,
            Some(StoredBoard {
                name: "beta".into(),
                options: "{}".into(),
                next_seq: 0,
                season: None,
                entries: vec![],
            })
        );
    }

    /// Entries spread over checkpointed tables and the log, with resets in between, load
    /// exactly as if applied directly.
    #[test]
    fn log_and_checkpoint_interleave() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), u64::MAX);
        store
            .commit(&[put_board("a", "{}"), put_board("b", "{}")])
            .unwrap();
        store
            .commit(&[
                put_entry("a", entry("p1", 1.0, 1, None)),
                put_entry("a", entry("p2", 2.0, 2, None)),
                put_entry("b", entry("q1", 1.0, 1, None)),
            ])
            .unwrap();
        assert_eq!(store.checkpoint().unwrap(), 3);
        assert_eq!(store.logged_entries(), 0);
        store
            .commit(&[
                put_entry("a", entry("p2", 20.0, 3, Some("{}"))), // log overrides table
                put_entry("a", entry("p0", 0.5, 4, None)),
                put_entry("b", entry("q2", 2.0, 2, None)),
            ])
            .unwrap();
        store
            .commit(&[put_entry("a", entry("p2", 21.0, 5, None))]) // later log record wins
            .unwrap();
        assert_eq!(store.logged_entries(), 4);
        let a = vec![
            entry("p0", 0.5, 4, None),
            entry("p1", 1.0, 1, None),
            entry("p2", 21.0, 5, None),
        ];
        let b = vec![entry("q1", 1.0, 1, None), entry("q2", 2.0, 2, None)];
        let entries = |s: &Store| -> Vec<Vec<StoredEntry>> {
            s.load().unwrap().into_iter().map(|b| b.entries).collect()
        };
        assert_eq!(entries(&store), vec![a.clone(), b.clone()]);

        // Reset drops both the checkpointed and the logged entries of that board only.
        store
            .commit(&[StoreOp::ResetBoard { board: "b".into() }])
            .unwrap();
        assert_eq!(entries(&store), vec![a.clone(), vec![]]);
        assert_eq!(store.checkpoint().unwrap(), 3);
        assert_eq!(entries(&store), vec![a.clone(), vec![]]);
        store
            .commit(&[
                put_entry("b", entry("q3", 3.0, 3, None)),
                StoreOp::DeleteBoard { board: "a".into() },
            ])
            .unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(entries(&store), vec![vec![entry("q3", 3.0, 3, None)]]);
        assert_eq!(store.checkpoint().unwrap(), 0);
    }

    #[test]
    fn delete_entry_forgets_a_player_in_the_log_the_table_and_the_archive() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let del = |p: &str| StoreOp::DeleteEntry {
            board: "a".into(),
            player: p.into(),
        };
        let players = |s: &Store| -> Vec<String> {
            s.load().unwrap()[0]
                .entries
                .iter()
                .map(|e| e.player.clone())
                .collect()
        };
        store
            .commit(&[
                put_board("a", "{}"),
                put_entry("a", entry("p1", 1.0, 1, None)),
                put_entry("a", entry("p2", 2.0, 2, None)),
                put_entry("a", entry("p3", 3.0, 3, None)),
            ])
            .unwrap();
        // Checkpointed p1 deleted from the log; p2 deleted then put again in one commit,
        // p3 put then deleted in one commit; a player never seen is a no-op.
        assert_eq!(store.checkpoint().unwrap(), 3);
        store
            .commit(&[
                del("p1"),
                del("p2"),
                put_entry("a", entry("p2", 5.0, 4, None)),
                put_entry("a", entry("p4", 4.0, 5, None)),
                del("p4"),
                del("nobody"),
            ])
            .unwrap();
        assert_eq!(players(&store), ["p2", "p3"]);
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(players(&store), ["p2", "p3"]);
        // The tombstones reach the table at the checkpoint.
        store.checkpoint().unwrap();
        assert_eq!(players(&store), ["p2", "p3"]);
        assert_eq!(store.load().unwrap()[0].entries[0].score, 5.0);
        // A tombstone still in the log when the season closes is applied to the archive.
        store.commit(&[del("p3")]).unwrap();
        store
            .commit(&[StoreOp::CloseSeason {
                board: "a".into(),
                closed: ArchivedSeason {
                    season: 1,
                    started: 0,
                    ended: 10,
                    players: 1,
                    order: "high".into(),
                },
                next: (2, 10, 0),
                keep: 10,
            }])
            .unwrap();
        let (_, archived) = store.season("a", 1).unwrap().unwrap();
        let names: Vec<_> = archived.iter().map(|e| e.player.as_str()).collect();
        assert_eq!(names, ["p2"]);
        // A missing board is refused like a put.
        let err = store
            .commit(&[StoreOp::DeleteEntry {
                board: "missing".into(),
                player: "p".into(),
            }])
            .unwrap_err();
        assert!(matches!(err, StoreError::UnknownBoard { .. }), "{err}");
    }

    #[test]
    fn entries_round_trip_with_and_without_subscore() {
        let plain = entry("p", 1.5, 7, Some("{\"a\":1}"));
        // Written exactly as before subscores existed: old files and new ones agree.
        let bytes = encode_entry(&plain);
        assert_eq!(bytes.len(), 17 + 7);
        assert_eq!(bytes[16], 1);
        assert_eq!(decode_entry("b", "p", &bytes).unwrap(), plain);
        for meta in [None, Some("{\"a\":1}")] {
            let e = StoredEntry {
                subscore: -2.25,
                ..entry("p", 1.5, 7, meta)
            };
            assert_eq!(decode_entry("b", "p", &encode_entry(&e)).unwrap(), e);
        }
        assert!(decode_entry(
            "b",
            "p",
            &[0; 17].iter().chain(&[9]).copied().collect::<Vec<_>>()
        )
        .is_err());
        let mut cut = encode_entry(&StoredEntry {
            subscore: 1.0,
            ..entry("p", 1.0, 1, None)
        });
        cut.truncate(20);
        assert!(decode_entry("b", "p", &cut).is_err());
    }

    #[test]
    fn commit_is_all_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.commit(&[put_board("a", "{}")]).unwrap();
        let before = store.load().unwrap();
        for bad in [
            put_entry("missing", entry("p", 1.0, 1, None)),
            StoreOp::SetSeq {
                board: "missing".into(),
                next_seq: 3,
            },
            StoreOp::ResetBoard {
                board: "missing".into(),
            },
        ] {
            let err = store
                .commit(&[
                    put_entry("a", entry("p", 1.0, 1, None)),
                    put_board("b", "{}"),
                    bad,
                ])
                .unwrap_err();
            assert!(
                matches!(&err, StoreError::UnknownBoard { board } if board == "missing"),
                "{err}"
            );
            assert_eq!(store.load().unwrap(), before);
        }
        // An entry for a board deleted earlier in the same commit is rejected too.
        let err = store
            .commit(&[
                StoreOp::DeleteBoard { board: "a".into() },
                put_entry("a", entry("p", 1.0, 1, None)),
            ])
            .unwrap_err();
        assert!(matches!(err, StoreError::UnknownBoard { .. }));
        assert_eq!(store.load().unwrap(), before);
    }

    #[test]
    fn second_open_of_same_dir_fails_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let _store = Store::open(dir.path()).unwrap();
        let err = Store::open(dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::Db { .. }), "{err}");
        assert!(err.to_string().contains("crier.redb"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn group_commit_many_concurrent_callers() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 100); // checkpoint after each group of >= 100
        store.commit(&[put_board("b", "{}")]).unwrap();
        let (writer, task) = StoreWriter::spawn(store, 1024).unwrap();

        const N: u64 = 1000;
        let mut calls = tokio::task::JoinSet::new();
        for i in 0..N {
            let w = writer.clone();
            calls.spawn(async move {
                w.commit(vec![put_entry(
                    "b",
                    entry(&format!("p{i:04}"), i as f64, i, None),
                )])
                .await
            });
        }
        while let Some(r) = calls.join_next().await {
            r.unwrap().unwrap();
        }
        // The writer checkpoints right after acknowledging a group; wait for it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while writer.stats().checkpoints == 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let stats = writer.stats();
        assert_eq!(stats.requests, N);
        assert_eq!(stats.ops, N);
        assert_eq!(stats.failed_requests, 0);
        assert!(stats.checkpoints >= 1, "{stats:?}");
        assert_eq!(writer.commits(), stats.transactions);
        assert!(
            stats.transactions < N / 10,
            "expected grouping, got {stats:?}"
        );
        eprintln!("group commit: {stats:?}");

        drop(writer);
        task.await.unwrap();
        let store = Store::open(dir.path()).unwrap();
        let boards = store.load().unwrap();
        assert_eq!(boards.len(), 1);
        let entries = &boards[0].entries;
        assert_eq!(entries.len() as u64, N);
        for (i, e) in entries.iter().enumerate() {
            assert_eq!(e, &entry(&format!("p{i:04}"), i as f64, i as u64, None));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_caller_fails_alone_and_shutdown_commits_queued_work() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.commit(&[put_board("b", "{}")]).unwrap();
        let (writer, task) = StoreWriter::spawn(store, 4).unwrap();

        // Fire many requests (one of them bad) without awaiting in between, so they group.
        let mut calls = Vec::new();
        for i in 0..50u64 {
            let board = if i == 25 { "missing" } else { "b" };
            let w = writer.clone();
            let ops = vec![put_entry(board, entry(&format!("p{i:02}"), 1.0, i, None))];
            calls.push(tokio::spawn(async move { w.commit(ops).await }));
        }
        for (i, c) in calls.into_iter().enumerate() {
            let r = c.await.unwrap();
            if i == 25 {
                assert!(matches!(r, Err(StoreError::UnknownBoard { .. })), "{r:?}");
            } else {
                r.unwrap();
            }
        }
        assert_eq!(writer.stats().failed_requests, 1);
        writer.commit(vec![]).await.unwrap();

        // Graceful shutdown: queued requests still commit after the last handle drops.
        let w2 = writer.clone();
        let late = tokio::spawn(async move {
            w2.commit(vec![StoreOp::SetSeq {
                board: "b".into(),
                next_seq: 99,
            }])
            .await
        });
        drop(writer);
        late.await.unwrap().unwrap();
        task.await.unwrap();

        let store = Store::open(dir.path()).unwrap();
        let b = &store.load().unwrap()[0];
        assert_eq!(b.next_seq, 99);
        assert_eq!(b.entries.len(), 49);
        assert!(b.entries.iter().all(|e| e.player != "p25"));
    }
}
