//! A redb database file that outlives its own I/O errors.
//!
//! After a failed write redb refuses every later transaction (`PreviousIo`) until the
//! database is opened again; opening repairs the file to its last durable commit. A
//! writer that hit a full disk or a transient I/O error therefore marks the file broken,
//! and its next transaction reopens it first, so clearing the disk is enough: no restart.
//! Both durable stores (leaderboards, topic history) keep their file this way, and write
//! it through one [`group_commit`] writer.

pub mod backup;
pub mod group_commit;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;
use redb::Database;

/// Cloning gives another handle on the same open file: the writer thread owns one, and
/// the online backup (`backup`) reads through another, so a reopen after an I/O error is
/// seen by both.
#[derive(Clone)]
pub struct RedbFile(Arc<Inner>);

struct Inner {
    /// `None` only between closing after an I/O error and a successful reopen. Only the
    /// one thread writing ever takes the write lock.
    db: RwLock<Option<Database>>,
    broken: AtomicBool,
    path: PathBuf,
}

impl std::fmt::Debug for RedbFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbFile")
            .field("path", &self.0.path)
            .field("broken", &self.0.broken)
            .finish()
    }
}

impl RedbFile {
    /// Opens the file, creating it if needed. A file left by an unclean shutdown is
    /// repaired first, which walks the whole database.
    pub fn create(path: &Path) -> Result<RedbFile, redb::DatabaseError> {
        let db = Database::create(path)?;
        Ok(RedbFile(Arc::new(Inner {
            db: RwLock::new(Some(db)),
            broken: AtomicBool::new(false),
            path: path.to_owned(),
        })))
    }

    pub fn path(&self) -> &Path {
        &self.0.path
    }

    /// Runs `f` on the open database; `None` while it is closed after an error that a
    /// reopen could not repair yet. The read lock is held only for the call, so keep `f`
    /// to beginning a transaction.
    pub fn with_db<T>(&self, f: impl FnOnce(&Database) -> T) -> Option<T> {
        self.0.db.read().as_ref().map(f)
    }

    /// Remembers that redb must be reopened before the next write (call it when a
    /// transaction failed inside redb, not for a caller's logical mistake).
    pub fn mark_broken(&self) {
        self.0.broken.store(true, Ordering::Release);
    }

    pub fn is_broken(&self) -> bool {
        self.0.broken.load(Ordering::Acquire)
    }

    /// Closes and opens the file again if it was marked broken. On error it stays closed
    /// and broken, and the next call tries again.
    pub fn reopen_if_broken(&self) -> Result<(), redb::DatabaseError> {
        if !self.is_broken() {
            return Ok(());
        }
        let mut db = self.0.db.write();
        // The old handle must be gone first: it holds the file lock.
        drop(db.take());
        *db = Some(Database::create(&self.0.path)?);
        drop(db);
        self.0.broken.store(false, Ordering::Release);
        tracing::info!(path = %self.0.path.display(), "database reopened after an I/O error");
        Ok(())
    }
}
