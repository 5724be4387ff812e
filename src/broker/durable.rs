//! Durable topic history: publications of `durable = true` namespaces, kept in
//! `<data_dir>/history.redb` so that after a crash (kill -9 included) a topic comes back
//! with the same epoch, its offsets continue, and clients resume without loss.
//!
//! # Layout
//!
//! * `meta`: `&str -> u64`; `format` = [`FORMAT_VERSION`].
//! * `publications`: `(topic, offset)` -> `[published_ms: u64 LE][key len: u8, 0 = none]
//!   [idempotency key][data: the publication's JSON]`. Keys are 1..=128 bytes.
//! * `topics`: topic -> `[epoch len: u8][epoch][last_offset: u64 LE][first_kept: u64 LE]`.
//!   A topic whose publications were all trimmed keeps its row, so its epoch and offsets
//!   still continue after a restart.
//!
//! # Group commit
//!
//! The shared group-commit writer ([`crate::redb_file::group_commit`]) owns the file.
//! Appends wait in its bounded queue ([`DurableLog::reserve`] waits for room, outside the
//! caller's locks; [`AppendSlot::append`] never blocks, so the broker appends under its
//! topic lock and the queue order is the offset order). The writer takes everything
//! waiting (up to [`MAX_BATCH_RECORDS`] / [`MAX_BATCH_BYTES`]) into ONE write transaction
//! with [`Durability::Immediate`] (fsync), commits, then runs every callback in append
//! order before it takes the next batch: one fsync acknowledges many publications.
//!
//! # No gap, even after a failure
//!
//! The writer commits a record only if it continues its topic (`offset == last + 1` in
//! the same epoch; a new epoch starts the topic afresh). When a batch fails (full disk,
//! I/O error), every record in it gets `Err`, and so does every later record of the same
//! topics that was queued on top of them: the broker rolls its offsets back and the next
//! publication reuses the failed offset. What reached the disk is always contiguous.
//! After a failure the file is reopened before the next batch (see [`crate::redb_file`]),
//! so a disk that is cleared needs no restart.
//!
//! # Trims and forgets
//!
//! [`DurableLog::trim`] and [`DurableLog::forget`] are synchronous and never wait for the
//! queue: they are noted per topic (at most a forget and a trim each, so bounded by the
//! number of topics) with the append sequence number at which they were made, and the
//! writer applies them in the next transaction exactly between the appends made before and
//! after them. That keeps "forget, then recreate with a new epoch" and "trim, then append"
//! right without a queue slot for each.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::redb_file::group_commit::{Committer, GroupCommit, Limits, Slot};
use crate::redb_file::RedbFile;
use crate::topic::TopicName;
use bytes::Bytes;
use parking_lot::Mutex;
use redb::{Database, Durability, ReadableTable, TableDefinition, WriteTransaction};

/// File name of the history database inside the data directory.
pub const HISTORY_FILE: &str = "history.redb";
/// On-disk layout version written to the `meta` table.
pub const FORMAT_VERSION: u64 = 1;
/// Most records one transaction takes.
pub const MAX_BATCH_RECORDS: usize = 1024;
/// Most data bytes one transaction takes (a single larger record still goes alone).
pub const MAX_BATCH_BYTES: usize = 4 << 20;
/// Newest records per topic that [`DurableLog::open`] hands back; the broker's namespace
/// limits are usually far below.
pub const MAX_RECOVERED_PER_TOPIC: usize = 100_000;
/// Appends that may wait for the writer; [`DurableLog::reserve`] waits beyond it.
pub const QUEUE_CAPACITY: usize = 4096;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const PUBLICATIONS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("publications");
const TOPICS: TableDefinition<&str, &[u8]> = TableDefinition::new("topics");

/// Errors of the durable log. `Clone` (sources behind `Arc`) because a failed batch hands
/// the same error to each of its records.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DurableError {
    #[error("creating {}: {source}", path.display())]
    CreateDir {
        path: std::path::PathBuf,
        #[source]
        source: Arc<std::io::Error>,
    },
    #[error("{context}: {source}")]
    Db {
        context: String,
        #[source]
        source: Arc<redb::Error>,
    },
    #[error("corrupt history record {key}: {detail}")]
    Corrupt { key: String, detail: String },
    #[error("unsupported history format version {found} (this build reads {FORMAT_VERSION})")]
    UnsupportedFormat { found: u64 },
    /// The record did not continue its topic: an earlier write it follows failed.
    #[error("not written: topic {topic:?} expects offset {expected}, got {offset} (an earlier write failed)")]
    NotContiguous {
        topic: TopicName,
        offset: u64,
        expected: u64,
    },
    /// The database is closed after an I/O error and could not be opened again yet.
    #[error("the history database is not open after an earlier error")]
    NotOpen,
    #[error("the history log is closed")]
    Closed,
    /// The writer failed without an answer from the database (a bug): nothing of the
    /// batch is known to be written.
    #[error("the history writer failed: {0}")]
    WriterFailed(String),
}

impl DurableError {
    fn db(context: impl Into<String>, e: impl Into<redb::Error>) -> Self {
        DurableError::Db {
            context: context.into(),
            source: Arc::new(e.into()),
        }
    }
}

trait Ctx<T> {
    fn ctx(self, context: &str) -> Result<T, DurableError>;
}

impl<T, E: Into<redb::Error>> Ctx<T> for Result<T, E> {
    fn ctx(self, context: &str) -> Result<T, DurableError> {
        self.map_err(|e| DurableError::db(context, e))
    }
}

/// One publication to store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub topic: TopicName,
    pub epoch: Arc<str>,
    pub offset: u64,
    /// The publication's JSON, verbatim.
    pub data: Bytes,
    pub published_ms: u64,
    pub idempotency_key: Option<Box<str>>,
}

/// A durable topic as the previous run left it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveredTopic {
    pub topic: TopicName,
    pub epoch: Arc<str>,
    pub last_offset: u64,
    /// Oldest first, the newest at most [`MAX_RECOVERED_PER_TOPIC`]; may be empty (all
    /// trimmed) while `last_offset` is not 0.
    pub records: Vec<Record>,
}

/// Gets an append's outcome, on the writer thread, in append order, after the fsync.
pub type Done = Box<dyn FnOnce(Result<(), DurableError>) + Send>;

/// Sees each committed transaction: how long the commit took and how many records it held.
pub type CommitObserver = Box<dyn Fn(Duration, usize) + Send + Sync>;

/// One queued append: the record and its place among appends (for side ops).
struct Append {
    seq: u64,
    rec: Record,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SideKind {
    /// Delete offsets `..= keep_after`.
    Trim(u64),
    Forget,
}

#[derive(Clone, Copy, Debug)]
struct SideOp {
    /// Applied after every append with a smaller sequence number, before the others.
    at: u64,
    kind: SideKind,
}

/// Keeps a topic's pending side ops minimal: everything before the last forget is moot,
/// and consecutive trims merge into the later one.
fn push_side(ops: &mut Vec<SideOp>, op: SideOp) {
    match op.kind {
        SideKind::Forget => {
            ops.clear();
            ops.push(op);
        }
        SideKind::Trim(k) => match ops.last_mut() {
            Some(SideOp {
                at,
                kind: SideKind::Trim(prev),
            }) => {
                *prev = (*prev).max(k);
                *at = (*at).max(op.at);
            }
            _ => ops.push(op),
        },
    }
}

#[derive(Default)]
struct Counters {
    commits: AtomicU64,
    records: AtomicU64,
    failed: AtomicU64,
}

/// Snapshot of the writer's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogStats {
    /// Transactions committed (each one fsync).
    pub commits: u64,
    /// Records committed.
    pub records: u64,
    /// Records answered with an error.
    pub failed: u64,
}

struct Shared {
    /// The next append's sequence number. Held while sending, so that the queue's order is
    /// the sequence order and a side op's `at` splits the queue exactly.
    next_seq: Mutex<u64>,
    side: Mutex<HashMap<TopicName, Vec<SideOp>>>,
    counters: Counters,
    observer: OnceLock<CommitObserver>,
    #[cfg(test)]
    fail_commits: AtomicU64,
    /// Unit tests: held to keep the writer from taking a batch, so appends pile up.
    #[cfg(test)]
    gate: Mutex<()>,
}

/// The durable history log (see the module docs). Shared as `Arc<DurableLog>`.
pub struct DurableLog {
    /// Closed by [`DurableLog::close`]; the writer stops once every queued slot is sent
    /// and the queue is drained. Woken (with nothing queued) so noted trims/forgets reach
    /// the disk without waiting for an append.
    writer: GroupCommit<Append, DurableError>,
    shared: Arc<Shared>,
    /// The file the writer owns, for online backups (`redb_file::backup`).
    file: RedbFile,
}

/// A reserved place in the log's bounded queue.
pub struct AppendSlot {
    slot: Slot<Append, DurableError>,
    shared: Arc<Shared>,
}

impl AppendSlot {
    /// Queues `rec`; `done` later gets the outcome (see the module docs). Never blocks:
    /// meant to be called under the topic lock that assigned `rec.offset`, so appends of a
    /// topic are queued in offset order.
    pub fn append(self, rec: Record, done: Done) {
        let mut next = self.shared.next_seq.lock();
        let seq = *next;
        *next += 1;
        self.slot.send(Append { seq, rec }, done);
    }
}

impl DurableLog {
    /// Opens (creating the parent directory and the file if needed) the log at `path`
    /// (normally `<data_dir>/history.redb`), returns every durable topic as it was left,
    /// and starts the writer thread.
    pub fn open(path: &Path) -> Result<(Arc<DurableLog>, Vec<RecoveredTopic>), DurableError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| DurableError::CreateDir {
                path: dir.to_owned(),
                source: Arc::new(e),
            })?;
        }
        let file = RedbFile::create(path)
            .map_err(|e| DurableError::db(format!("opening {}", path.display()), e))?;
        init(&file)?;
        let (topics, recovered) = load(&file)?;
        let shared = Arc::new(Shared {
            next_seq: Mutex::new(0),
            side: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            observer: OnceLock::new(),
            #[cfg(test)]
            fail_commits: AtomicU64::new(0),
            #[cfg(test)]
            gate: Mutex::new(()),
        });
        let backup_handle = file.clone();
        let writer = Writer {
            file,
            shared: shared.clone(),
            topics,
            received_next: 0,
        };
        let limits = Limits {
            capacity: QUEUE_CAPACITY,
            max_requests: MAX_BATCH_RECORDS,
            max_weight: MAX_BATCH_BYTES,
        };
        let writer = GroupCommit::spawn("crier-history", limits, writer).map_err(|e| {
            DurableError::CreateDir {
                path: path.to_owned(),
                source: Arc::new(e),
            }
        })?;
        let log = Arc::new(DurableLog {
            writer,
            shared,
            file: backup_handle,
        });
        Ok((log, recovered))
    }

    /// The history file, for an online backup.
    pub fn file(&self) -> &RedbFile {
        &self.file
    }

    /// Waits for room in the queue (call it before taking any lock).
    pub async fn reserve(&self) -> Result<AppendSlot, DurableError> {
        let slot = self.writer.reserve().await.ok_or(DurableError::Closed)?;
        Ok(AppendSlot {
            slot,
            shared: self.shared.clone(),
        })
    }

    /// Drops the topic's publications up to `keep_after` from the file, with the next
    /// commit (the topic's epoch and last offset stay).
    pub fn trim(&self, topic: &str, keep_after: u64) {
        self.note(topic, SideKind::Trim(keep_after));
    }

    /// Drops all of the topic (it was evicted): a topic of that name made later starts
    /// from its first append, in its new epoch.
    pub fn forget(&self, topic: &str) {
        self.note(topic, SideKind::Forget);
        self.writer.wake();
    }

    fn note(&self, topic: &str, kind: SideKind) {
        let at = *self.shared.next_seq.lock();
        let mut side = self.shared.side.lock();
        let ops = match side.get_mut(topic) {
            Some(ops) => ops,
            None => side.entry(TopicName::from(topic)).or_default(),
        };
        push_side(ops, SideOp { at, kind });
    }

    /// Commits everything queued (and noted), then stops the writer. Later reserves get
    /// [`DurableError::Closed`].
    pub async fn close(&self) {
        // The writer applies pending trims/forgets as it stops, even with nothing queued.
        self.writer.close();
        self.writer.stopped().await;
    }

    /// Calls `f` after each committed transaction (for the commit-time histogram). Only
    /// the first observer set is kept.
    pub fn set_commit_observer(&self, f: CommitObserver) {
        let _ = self.shared.observer.set(f);
    }

    pub fn stats(&self) -> LogStats {
        let c = &self.shared.counters;
        LogStats {
            commits: c.commits.load(Ordering::Relaxed),
            records: c.records.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
        }
    }

    /// Unit tests: the next `n` transactions fail as if the disk did.
    #[cfg(test)]
    pub(crate) fn fail_next_commits(&self, n: u64) {
        self.shared.fail_commits.store(n, Ordering::Release);
    }
}

impl Drop for DurableLog {
    fn drop(&mut self) {
        // The writer drains the queue and stops by itself.
        self.writer.close();
    }
}

// ---- encoding ---------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq, Eq)]
struct TopicState {
    epoch: Arc<str>,
    last_offset: u64,
    first_kept: u64,
}

fn encode_topic(s: &TopicState) -> Vec<u8> {
    let mut v = Vec::with_capacity(17 + s.epoch.len());
    v.push(s.epoch.len() as u8);
    v.extend_from_slice(s.epoch.as_bytes());
    v.extend_from_slice(&s.last_offset.to_le_bytes());
    v.extend_from_slice(&s.first_kept.to_le_bytes());
    v
}

fn decode_topic(topic: &str, b: &[u8]) -> Result<TopicState, DurableError> {
    let corrupt = || DurableError::Corrupt {
        key: format!("topics/{topic:?}"),
        detail: "malformed topic record".into(),
    };
    let n = *b.first().ok_or_else(corrupt)? as usize;
    if b.len() != 1 + n + 16 {
        return Err(corrupt());
    }
    let epoch = std::str::from_utf8(&b[1..1 + n]).map_err(|_| corrupt())?;
    let u = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
    Ok(TopicState {
        epoch: epoch.into(),
        last_offset: u(1 + n),
        first_kept: u(9 + n),
    })
}

fn encode_publication(r: &Record) -> Vec<u8> {
    let key = r.idempotency_key.as_deref().unwrap_or("");
    let mut v = Vec::with_capacity(9 + key.len() + r.data.len());
    v.extend_from_slice(&r.published_ms.to_le_bytes());
    // Keys are 1..=128 visible ASCII (checked by the API); a longer one is not kept
    // rather than stored truncated.
    let key = if key.len() <= u8::MAX as usize {
        key
    } else {
        ""
    };
    v.push(key.len() as u8);
    v.extend_from_slice(key.as_bytes());
    v.extend_from_slice(&r.data);
    v
}

fn decode_publication(
    topic: &TopicName,
    epoch: &Arc<str>,
    offset: u64,
    b: &[u8],
) -> Result<Record, DurableError> {
    let corrupt = || DurableError::Corrupt {
        key: format!("publications/({topic:?}, {offset})"),
        detail: "malformed publication record".into(),
    };
    if b.len() < 9 {
        return Err(corrupt());
    }
    let published_ms = u64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
    let n = b[8] as usize;
    let key = b.get(9..9 + n).ok_or_else(corrupt)?;
    let key = std::str::from_utf8(key).map_err(|_| corrupt())?;
    Ok(Record {
        topic: topic.clone(),
        epoch: epoch.clone(),
        offset,
        data: Bytes::copy_from_slice(&b[9 + n..]),
        published_ms,
        idempotency_key: (n > 0).then(|| key.into()),
    })
}

// ---- open ---------------------------------------------------------------------------------

fn begin_write(file: &RedbFile, context: &str) -> Result<WriteTransaction, DurableError> {
    file.with_db(Database::begin_write)
        .ok_or(DurableError::NotOpen)?
        .ctx(context)
}

/// Creates the tables and checks / stamps the format version.
fn init(file: &RedbFile) -> Result<(), DurableError> {
    let txn = begin_write(file, "init: begin write")?;
    {
        let mut meta = txn.open_table(META).ctx("init: open meta")?;
        let found = meta
            .get("format")
            .ctx("init: read format")?
            .map(|v| v.value());
        match found {
            Some(FORMAT_VERSION) => {}
            Some(found) => return Err(DurableError::UnsupportedFormat { found }),
            None => {
                meta.insert("format", FORMAT_VERSION)
                    .ctx("init: write format")?;
            }
        }
        txn.open_table(PUBLICATIONS)
            .ctx("init: open publications")?;
        txn.open_table(TOPICS).ctx("init: open topics")?;
    }
    txn.commit().ctx("init: commit")
}

type Loaded = (HashMap<TopicName, TopicState>, Vec<RecoveredTopic>);

fn load(file: &RedbFile) -> Result<Loaded, DurableError> {
    let txn = file
        .with_db(Database::begin_read)
        .ok_or(DurableError::NotOpen)?
        .ctx("load: begin read")?;
    let topics = txn.open_table(TOPICS).ctx("load: open topics")?;
    let pubs = txn
        .open_table(PUBLICATIONS)
        .ctx("load: open publications")?;
    let mut states = HashMap::new();
    let mut out = Vec::new();
    for row in topics.iter().ctx("load: iterate topics")? {
        let (k, v) = row.ctx("load: read topic")?;
        let topic: TopicName = k.value().into();
        let state = decode_topic(&topic, v.value())?;
        let mut records = Vec::new();
        let range = pubs
            .range((&*topic, 0)..=(&*topic, u64::MAX))
            .ctx("load: read publications")?;
        for row in range.rev().take(MAX_RECOVERED_PER_TOPIC) {
            let (k, v) = row.ctx("load: read publication")?;
            records.push(decode_publication(
                &topic,
                &state.epoch,
                k.value().1,
                v.value(),
            )?);
        }
        records.reverse();
        out.push(RecoveredTopic {
            topic: topic.clone(),
            epoch: state.epoch.clone(),
            last_offset: state.last_offset,
            records,
        });
        states.insert(topic, state);
    }
    Ok((states, out))
}

type PublicationsTable<'txn> = redb::Table<'txn, (&'static str, u64), &'static [u8]>;

fn drop_range(
    pubs: &mut PublicationsTable<'_>,
    topic: &str,
    upto: u64,
) -> Result<(), DurableError> {
    pubs.retain_in((topic, 0)..=(topic, upto), |_, _| false)
        .ctx("commit: delete publications")
}

// ---- writer -------------------------------------------------------------------------------

struct Writer {
    file: RedbFile,
    shared: Arc<Shared>,
    /// Every topic's state as committed: the file's `topics` table.
    topics: HashMap<TopicName, TopicState>,
    /// One past the sequence number of the last append taken from the queue.
    received_next: u64,
}

/// One append of a batch; `refused` once it is.
struct Pending {
    seq: u64,
    rec: Record,
    refused: Option<DurableError>,
}

impl Committer for Writer {
    type Request = Append;
    type Error = DurableError;

    fn weight(a: &Append) -> usize {
        a.rec.data.len()
    }

    fn commit(&mut self, batch: Vec<Append>) -> Vec<Result<(), DurableError>> {
        if let Some(last) = batch.last() {
            self.received_next = last.seq + 1;
        }
        let batch = batch
            .into_iter()
            .map(|Append { seq, rec }| Pending {
                seq,
                rec,
                refused: None,
            })
            .collect();
        self.commit_batch(batch)
    }

    fn panicked(message: String) -> DurableError {
        DurableError::WriterFailed(message)
    }

    fn forming(&mut self) {
        #[cfg(test)]
        drop(self.shared.gate.lock());
    }

    /// Senders are gone: apply what was noted since the last batch.
    fn finish(&mut self) {
        self.commit_batch(Vec::new());
    }
}

impl Writer {
    /// Takes the side ops whose place is within what was received.
    fn take_side_ops(&self) -> Vec<(u64, TopicName, SideKind)> {
        let mut side = self.shared.side.lock();
        let mut out = Vec::new();
        side.retain(|topic, ops| {
            ops.retain(|op| {
                if op.at <= self.received_next {
                    out.push((op.at, topic.clone(), op.kind));
                    false
                } else {
                    true
                }
            });
            !ops.is_empty()
        });
        out.sort_by_key(|(at, _, _)| *at);
        out
    }

    /// Puts side ops of a failed transaction back, before any noted since.
    fn restore_side_ops(&self, ops: Vec<(u64, TopicName, SideKind)>) {
        let mut side = self.shared.side.lock();
        for (at, topic, kind) in ops.into_iter().rev() {
            let list = side.entry(topic).or_default();
            let later = std::mem::take(list);
            push_side(list, SideOp { at, kind });
            for op in later {
                push_side(list, op);
            }
        }
    }

    /// Commits the batch with the side ops due; one outcome per record, in order.
    fn commit_batch(&mut self, mut batch: Vec<Pending>) -> Vec<Result<(), DurableError>> {
        let side = self.take_side_ops();
        if batch.is_empty() && side.is_empty() {
            return Vec::new();
        }
        let started = Instant::now();
        let result = self.transaction(&mut batch, &side);
        let counters = &self.shared.counters;
        let outcome = match result {
            Ok(None) => None, // nothing to change: no commit, no fsync
            Ok(Some((topics, written))) => {
                for (topic, state) in topics {
                    match state {
                        Some(s) => self.topics.insert(topic, s),
                        None => self.topics.remove(&topic),
                    };
                }
                counters.commits.fetch_add(1, Ordering::Relaxed);
                counters.records.fetch_add(written, Ordering::Relaxed);
                if let Some(observe) = self.shared.observer.get() {
                    observe(started.elapsed(), written as usize);
                }
                None
            }
            Err(e) => {
                tracing::error!(error = %e, records = batch.len(), "history commit failed");
                if matches!(e, DurableError::Db { .. }) {
                    self.file.mark_broken();
                }
                self.restore_side_ops(side);
                Some(e)
            }
        };
        batch
            .into_iter()
            .map(|p| match (&outcome, p.refused) {
                (Some(e), _) => {
                    counters.failed.fetch_add(1, Ordering::Relaxed);
                    Err(e.clone())
                }
                (None, Some(e)) => {
                    counters.failed.fetch_add(1, Ordering::Relaxed);
                    Err(e)
                }
                (None, None) => Ok(()),
            })
            .collect()
    }

    /// Writes the batch and the side ops in one durable transaction. Returns the topic
    /// states it changed (None: removed) and the number of records written; `None` when
    /// nothing changed (side ops of unknown topics, refused records), so nothing was
    /// committed: a trim or forget that touches nothing costs no fsync.
    #[allow(clippy::type_complexity)]
    fn transaction(
        &self,
        batch: &mut [Pending],
        side: &[(u64, TopicName, SideKind)],
    ) -> Result<Option<(HashMap<TopicName, Option<TopicState>>, u64)>, DurableError> {
        self.file
            .reopen_if_broken()
            .map_err(|e| DurableError::db("reopening history", e))?;
        #[cfg(test)]
        if self
            .shared
            .fail_commits
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(DurableError::db(
                "commit",
                redb::Error::Io(std::io::Error::other("injected failure")),
            ));
        }
        let mut txn = begin_write(&self.file, "commit: begin write")?;
        txn.set_durability(Durability::Immediate);
        let mut changed: HashMap<TopicName, Option<TopicState>> = HashMap::new();
        let mut written = 0;
        {
            let mut pubs = txn.open_table(PUBLICATIONS).ctx("commit: open")?;
            let mut side = side.iter().peekable();
            let current =
                |changed: &HashMap<TopicName, Option<TopicState>>, t: &str| match changed.get(t) {
                    Some(s) => s.clone(),
                    None => self.topics.get(t).cloned(),
                };
            for i in 0..=batch.len() {
                let seq = batch.get(i).map_or(u64::MAX, |p| p.seq);
                while let Some((_, topic, kind)) = side.next_if(|(at, _, _)| *at <= seq) {
                    let Some(mut state) = current(&changed, topic) else {
                        continue;
                    };
                    match kind {
                        SideKind::Forget => {
                            drop_range(&mut pubs, topic, u64::MAX)?;
                            changed.insert(topic.clone(), None);
                        }
                        SideKind::Trim(keep_after) => {
                            let keep_after = (*keep_after).min(state.last_offset);
                            if keep_after >= state.first_kept {
                                drop_range(&mut pubs, topic, keep_after)?;
                                state.first_kept = keep_after + 1;
                                changed.insert(topic.clone(), Some(state));
                            }
                        }
                    }
                }
                let Some(p) = batch.get_mut(i) else { break };
                let rec = &p.rec;
                let state = match current(&changed, &rec.topic) {
                    Some(s) if s.epoch == rec.epoch => {
                        if rec.offset != s.last_offset + 1 {
                            p.refused = Some(DurableError::NotContiguous {
                                topic: rec.topic.clone(),
                                offset: rec.offset,
                                expected: s.last_offset + 1,
                            });
                            continue;
                        }
                        TopicState {
                            last_offset: rec.offset,
                            ..s
                        }
                    }
                    other => {
                        // A new incarnation starts at offset 1. A later offset here means
                        // the records before it failed (the topic's first commit, say):
                        // writing it would leave a gap the broker has already rolled back.
                        if rec.offset != 1 {
                            p.refused = Some(DurableError::NotContiguous {
                                topic: rec.topic.clone(),
                                offset: rec.offset,
                                expected: 1,
                            });
                            continue;
                        }
                        // A new incarnation of the topic: nothing of an older one stays.
                        if other.is_some() {
                            drop_range(&mut pubs, &rec.topic, u64::MAX)?;
                        }
                        TopicState {
                            epoch: rec.epoch.clone(),
                            last_offset: rec.offset,
                            first_kept: rec.offset,
                        }
                    }
                };
                pubs.insert(
                    (&*rec.topic, rec.offset),
                    encode_publication(rec).as_slice(),
                )
                .ctx("commit: write publication")?;
                changed.insert(rec.topic.clone(), Some(state));
                written += 1;
            }
        }
        if changed.is_empty() {
            // Dropping the transaction aborts it.
            return Ok(None);
        }
        {
            let mut topics = txn.open_table(TOPICS).ctx("commit: open topics")?;
            for (topic, state) in &changed {
                match state {
                    Some(s) => {
                        topics
                            .insert(&**topic, encode_topic(s).as_slice())
                            .ctx("commit: write topic")?;
                    }
                    None => {
                        topics.remove(&**topic).ctx("commit: delete topic")?;
                    }
                }
            }
        }
        txn.commit().ctx("commit")?;
        Ok(Some((changed, written)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::oneshot;

    fn rec(topic: &str, epoch: &str, offset: u64) -> Record {
        Record {
            topic: topic.into(),
            epoch: epoch.into(),
            offset,
            data: Bytes::from(format!(r#"{{"n":{offset}}}"#)),
            published_ms: 1_000 + offset,
            idempotency_key: (offset % 2 == 0).then(|| format!("key-{offset}").into()),
        }
    }

    /// Queues `r` and returns a receiver of its outcome.
    async fn queue(log: &DurableLog, r: Record) -> oneshot::Receiver<Result<(), DurableError>> {
        let (tx, rx) = oneshot::channel();
        log.reserve().await.unwrap().append(
            r,
            Box::new(move |res| {
                let _ = tx.send(res);
            }),
        );
        rx
    }

    async fn append(log: &DurableLog, r: Record) -> Result<(), DurableError> {
        queue(log, r).await.await.unwrap()
    }

    fn reopen(path: &Path) -> (Arc<DurableLog>, HashMap<String, RecoveredTopic>) {
        let (log, topics) = DurableLog::open(path).unwrap();
        let topics = topics
            .into_iter()
            .map(|t| (t.topic.to_string(), t))
            .collect();
        (log, topics)
    }

    #[tokio::test]
    async fn append_and_reopen_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested").join(HISTORY_FILE);
        let (log, topics) = reopen(&path);
        assert!(topics.is_empty());
        for i in 1..=5 {
            append(&log, rec("a", "0000000a", i)).await.unwrap();
        }
        for i in 1..=3 {
            append(&log, rec("b:x", "0000000b", i)).await.unwrap();
        }
        log.close().await;
        assert!(matches!(log.reserve().await, Err(DurableError::Closed)));
        drop(log);

        let (_log, topics) = reopen(&path);
        assert_eq!(topics.len(), 2);
        let a = &topics["a"];
        assert_eq!((&*a.epoch, a.last_offset), ("0000000a", 5));
        assert_eq!(
            a.records,
            (1..=5).map(|i| rec("a", "0000000a", i)).collect::<Vec<_>>()
        );
        let b = &topics["b:x"];
        assert_eq!((&*b.epoch, b.last_offset), ("0000000b", 3));
        assert_eq!(b.records.len(), 3);
    }

    /// Callbacks run in append order, across topics, each after its commit.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn callbacks_run_in_append_order() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = DurableLog::open(&dir.path().join(HISTORY_FILE)).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut expected = Vec::new();
        let mut last = None;
        for i in 0..500u64 {
            let topic = format!("t{}", i % 7);
            let offset = i / 7 + 1;
            expected.push((topic.clone(), offset));
            let seen = seen.clone();
            let (tx, rx) = oneshot::channel();
            log.reserve().await.unwrap().append(
                rec(&topic, "e", offset),
                Box::new(move |r| {
                    r.unwrap();
                    seen.lock().push((topic, offset));
                    let _ = tx.send(());
                }),
            );
            last = Some(rx);
        }
        last.unwrap().await.unwrap();
        assert_eq!(*seen.lock(), expected);
        assert_eq!(log.stats().records, 500);
    }

    /// Many concurrent appenders share transactions: fewer commits than records.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appends_are_group_committed() {
        const TASKS: u64 = 64;
        const EACH: u64 = 20;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(HISTORY_FILE);
        let (log, _) = DurableLog::open(&path).unwrap();
        // The first batch waits until every appender has queued a record, so grouping is
        // certain even on a disk whose fsync costs nothing.
        let gate = log.shared.gate.lock();
        let mut tasks = tokio::task::JoinSet::new();
        for t in 0..TASKS {
            let log = log.clone();
            tasks.spawn(async move {
                for i in 1..=EACH {
                    append(&log, rec(&format!("topic-{t}"), "e", i))
                        .await
                        .unwrap();
                }
            });
        }
        // (The test's own thread is not a runtime worker: the appenders run meanwhile.)
        while *log.shared.next_seq.lock() < TASKS {
            std::thread::yield_now();
        }
        drop(gate);
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
        let stats = log.stats();
        assert_eq!(stats.records, TASKS * EACH);
        assert_eq!(stats.failed, 0);
        assert!(
            stats.commits <= TASKS * EACH - (TASKS - 1),
            "expected group commit, got {stats:?}"
        );
        eprintln!("group commit: {stats:?}");
        log.close().await;
        drop(log);
        let (_log, topics) = reopen(&path);
        assert_eq!(topics.len() as u64, TASKS);
        for t in topics.values() {
            assert_eq!(t.last_offset, EACH);
            let offsets: Vec<u64> = t.records.iter().map(|r| r.offset).collect();
            assert_eq!(offsets, (1..=EACH).collect::<Vec<_>>());
        }
    }

    #[tokio::test]
    async fn trim_and_forget_reach_the_file_in_their_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(HISTORY_FILE);
        let (log, _) = DurableLog::open(&path).unwrap();
        for t in ["a", "b", "c", "d"] {
            for i in 1..=10 {
                append(&log, rec(t, "old", i)).await.unwrap();
            }
        }
        log.trim("a", 4);
        log.trim("a", 6); // merges with the first
        log.trim("d", 1_000); // past the end: keeps the position, drops every record
                              // b is evicted and recreated in a new epoch; its old records must not survive and
                              // the new one must not be forgotten.
        log.forget("b");
        append(&log, rec("b", "new", 1)).await.unwrap();
        // c is evicted and not recreated.
        log.forget("c");
        // Nothing on disk to change: no transaction (a subscriber-only topic's removal
        // must not cost an fsync).
        let (records_before, commits_before) = (log.stats().records, log.stats().commits);
        log.forget("never-published");
        log.trim("never-published", 5);
        append(&log, rec("e", "e", 1)).await.unwrap(); // commits the forgets above
        assert_eq!(log.stats().records, records_before + 1);
        let commits_mid = log.stats().commits;
        assert!(commits_mid <= commits_before + 2);
        log.forget("never-published-either");
        log.close().await;
        assert_eq!(log.stats().commits, commits_mid, "a no-op forget committed");
        drop(log);

        let (log, topics) = reopen(&path);
        let offsets =
            |t: &str| -> Vec<u64> { topics[t].records.iter().map(|r| r.offset).collect() };
        assert_eq!(offsets("a"), (7..=10).collect::<Vec<_>>());
        assert_eq!(topics["a"].last_offset, 10);
        assert_eq!(offsets("b"), vec![1]);
        assert_eq!(&*topics["b"].epoch, "new");
        assert!(!topics.contains_key("c"));
        assert_eq!(offsets("d"), Vec::<u64>::new());
        assert_eq!((&*topics["d"].epoch, topics["d"].last_offset), ("old", 10));
        // The offsets of a fully trimmed topic continue.
        append(&log, rec("d", "old", 11)).await.unwrap();
        let err = append(&log, rec("d", "old", 13)).await.unwrap_err();
        assert!(
            matches!(err, DurableError::NotContiguous { expected: 12, .. }),
            "{err}"
        );
    }

    /// A failed commit answers every record of the batch, and every record queued on top
    /// of them, with an error; the file is reopened and the failed offsets are reused.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failed_commit_fails_every_waiting_record_and_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(HISTORY_FILE);
        let (log, _) = DurableLog::open(&path).unwrap();
        append(&log, rec("t", "e", 1)).await.unwrap();
        append(&log, rec("u", "e", 1)).await.unwrap();
        log.fail_next_commits(1);
        let mut waiting = Vec::new();
        for i in 2..=40 {
            waiting.push(queue(&log, rec("t", "e", i)).await);
        }
        for rx in waiting {
            let r = rx.await.unwrap();
            assert!(
                matches!(
                    r,
                    Err(DurableError::Db { .. } | DurableError::NotContiguous { .. })
                ),
                "{r:?}"
            );
        }
        assert_eq!(log.stats().failed, 39);
        // The broker rolled back: offset 2 again, now on a reopened file.
        append(&log, rec("t", "e", 2)).await.unwrap();
        append(&log, rec("u", "e", 2)).await.unwrap();
        log.close().await;
        drop(log);
        let (_log, topics) = reopen(&path);
        assert_eq!(topics["t"].last_offset, 2);
        assert_eq!(
            topics["t"].records,
            vec![rec("t", "e", 1), rec("t", "e", 2)]
        );
        assert_eq!(topics["u"].last_offset, 2);
    }

    /// A topic's first commit fails while its next record waits: that record would start
    /// the topic at offset 2 (a gap), on disk and, through its callback, at subscribers.
    /// The same after a forget, in the new epoch. It must be refused like any record
    /// queued on top of a failed one.
    #[tokio::test]
    async fn a_new_topic_whose_first_commit_failed_does_not_start_at_a_gap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(HISTORY_FILE);
        let (log, _) = DurableLog::open(&path).unwrap();
        append(&log, rec("old", "e1", 1)).await.unwrap();
        log.fail_next_commits(1);
        assert!(append(&log, rec("new", "e", 1)).await.is_err());
        let err = append(&log, rec("new", "e", 2)).await.unwrap_err();
        assert!(
            matches!(err, DurableError::NotContiguous { expected: 1, .. }),
            "{err}"
        );
        log.forget("old");
        let err = append(&log, rec("old", "e2", 2)).await.unwrap_err();
        assert!(
            matches!(err, DurableError::NotContiguous { expected: 1, .. }),
            "{err}"
        );
        // The rolled-back offsets are reused.
        append(&log, rec("new", "e", 1)).await.unwrap();
        append(&log, rec("old", "e2", 1)).await.unwrap();
        log.close().await;
        drop(log);
        let (_log, topics) = reopen(&path);
        assert_eq!(topics["new"].records, vec![rec("new", "e", 1)]);
        assert_eq!(topics["old"].records, vec![rec("old", "e2", 1)]);
    }

    /// Trims and forgets noted while a commit fails are kept for the next one.
    #[tokio::test]
    async fn side_ops_survive_a_failed_commit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(HISTORY_FILE);
        let (log, _) = DurableLog::open(&path).unwrap();
        for i in 1..=5 {
            append(&log, rec("a", "e", i)).await.unwrap();
            append(&log, rec("b", "e", i)).await.unwrap();
        }
        log.trim("a", 3);
        log.forget("b");
        log.fail_next_commits(1);
        assert!(append(&log, rec("a", "e", 6)).await.is_err());
        append(&log, rec("a", "e", 6)).await.unwrap();
        log.close().await;
        drop(log);
        let (_log, topics) = reopen(&path);
        let offsets: Vec<u64> = topics["a"].records.iter().map(|r| r.offset).collect();
        assert_eq!(offsets, vec![4, 5, 6]);
        assert!(!topics.contains_key("b"));
    }

    #[test]
    fn second_open_of_the_same_file_fails_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(HISTORY_FILE);
        let _first = DurableLog::open(&path).unwrap();
        let err = DurableLog::open(&path)
            .err()
            .expect("second open must fail");
        assert!(matches!(err, DurableError::Db { .. }), "{err}");
    }
}
