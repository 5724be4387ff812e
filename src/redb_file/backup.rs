//! Online backup: a consistent copy of a live redb file, taken while the node serves.
//!
//! redb has no backup call, but a read transaction is a snapshot: everything committed
//! before it began, nothing after, however long it is held and whatever the writer does
//! meanwhile. So the copy reads every table inside one read transaction and writes it into
//! a new database file. Since every acknowledged write is committed before it is
//! acknowledged, the copy holds everything acknowledged before the backup began, in the
//! order it was acknowledged (a prefix of the node's history), which is exactly what a
//! restore must give back.
//!
//! The copy is written in chunks, each its own transaction, through a small cache, so
//! memory stays bounded whatever the file's size; the caller learns from `Ok` that the
//! last commit has reached the disk.

use std::path::Path;

use redb::{
    Database, Key, ReadTransaction, ReadableTable, TableDefinition, TableError, TableHandle, Value,
};

use super::RedbFile;

/// Entries and bytes one write transaction of the copy takes before it commits.
const CHUNK_ENTRIES: u64 = 65_536;
const CHUNK_BYTES: u64 = 32 << 20;
/// The copy's page cache.
const COPY_CACHE_BYTES: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("the database is not open after an earlier I/O error; retry later")]
    NotOpen,
    #[error("creating {}: {source}", path.display())]
    Create {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{context}: {source}")]
    Db {
        context: String,
        #[source]
        source: Box<redb::Error>,
    },
    /// A table whose key and value types [`copy_table`] does not list: a store added a
    /// table of a new shape without teaching the backup to copy it.
    #[error("table {0:?} has key/value types the backup does not know")]
    UnknownTable(String),
}

fn db(context: impl Into<String>) -> impl FnOnce(redb::Error) -> BackupError {
    let context = context.into();
    move |source| BackupError::Db {
        context,
        source: Box::new(source),
    }
}

/// What a copy holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Copied {
    pub tables: usize,
    pub entries: u64,
}

/// Copies `file` as of now into a new database at `dest` (which must not exist). Blocking:
/// call it from a blocking thread.
pub fn copy_to(file: &RedbFile, dest: &Path) -> Result<Copied, BackupError> {
    let snapshot = file
        .with_db(Database::begin_read)
        .ok_or(BackupError::NotOpen)?
        .map_err(|e| db("beginning the read transaction")(e.into()))?;
    let out_file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(dest)
        .map_err(|source| BackupError::Create {
            path: dest.to_owned(),
            source,
        })?;
    // A small cache: the copy is written once and never read back, and redb's default
    // (1 GiB) would let a backup grow the node's memory by as much as it writes.
    let out = Database::builder()
        .set_cache_size(COPY_CACHE_BYTES)
        .create_file(out_file)
        .map_err(|e| db(format!("creating {}", dest.display()))(e.into()))?;
    let mut copied = Copied::default();
    let tables: Vec<String> = snapshot
        .list_tables()
        .map_err(|e| db("listing tables")(e.into()))?
        .map(|t| t.name().to_owned())
        .collect();
    if snapshot
        .list_multimap_tables()
        .map_err(|e| db("listing tables")(e.into()))?
        .next()
        .is_some()
    {
        return Err(BackupError::UnknownTable("(a multimap table)".into()));
    }
    for name in &tables {
        copied.entries += copy_table(&snapshot, &out, name)?;
        copied.tables += 1;
    }
    // Every chunk is committed durably already; this last commit also covers a file
    // with no table at all.
    let txn = out
        .begin_write()
        .map_err(|e| db("finishing the copy")(e.into()))?;
    txn.commit()
        .map_err(|e| db("finishing the copy")(e.into()))?;
    Ok(copied)
}

/// Copies one table, trying each key/value shape the stores use (redb refuses to open a
/// table under another shape, so exactly one matches).
fn copy_table(snapshot: &ReadTransaction, out: &Database, name: &str) -> Result<u64, BackupError> {
    if let Some(n) = copy_as::<&str, u64>(snapshot, out, name)? {
        return Ok(n);
    }
    if let Some(n) = copy_as::<&str, &[u8]>(snapshot, out, name)? {
        return Ok(n);
    }
    if let Some(n) = copy_as::<(&str, u64), &[u8]>(snapshot, out, name)? {
        return Ok(n);
    }
    Err(BackupError::UnknownTable(name.into()))
}

/// `None`: the table has another shape.
fn copy_as<K: Key + 'static, V: Value + 'static>(
    snapshot: &ReadTransaction,
    out: &Database,
    name: &str,
) -> Result<Option<u64>, BackupError> {
    let def = TableDefinition::<K, V>::new(name);
    let table = match snapshot.open_table(def) {
        Ok(t) => t,
        Err(TableError::TableTypeMismatch { .. }) => return Ok(None),
        Err(e) => return Err(db(format!("opening table {name:?}"))(e.into())),
    };
    let context = || format!("copying table {name:?}");
    let mut entries = 0u64;
    let mut rows = table.iter().map_err(|e| db(context())(e.into()))?;
    loop {
        // One write transaction per chunk, so a large table never sits in memory at once.
        let txn = out.begin_write().map_err(|e| db(context())(e.into()))?;
        let mut done = true;
        {
            let mut dest = txn.open_table(def).map_err(|e| db(context())(e.into()))?;
            let (mut n, mut bytes) = (0u64, 0u64);
            for row in rows.by_ref() {
                let (k, v) = row.map_err(|e| db(context())(e.into()))?;
                bytes += (K::as_bytes(&k.value()).as_ref().len()
                    + V::as_bytes(&v.value()).as_ref().len()) as u64;
                dest.insert(k.value(), v.value())
                    .map_err(|e| db(context())(e.into()))?;
                n += 1;
                if n >= CHUNK_ENTRIES || bytes >= CHUNK_BYTES {
                    done = false;
                    break;
                }
            }
            entries += n;
        }
        txn.commit().map_err(|e| db(context())(e.into()))?;
        if done {
            return Ok(Some(entries));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::ReadableTableMetadata;

    const A: TableDefinition<&str, u64> = TableDefinition::new("a");
    const B: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("b");
    const C: TableDefinition<&str, &[u8]> = TableDefinition::new("c");

    #[test]
    fn a_copy_is_the_snapshot_of_when_it_began_in_every_table() {
        let dir = tempfile::tempdir().unwrap();
        let file = RedbFile::create(&dir.path().join("live.redb")).unwrap();
        file.with_db(|db| {
            let txn = db.begin_write().unwrap();
            {
                let mut a = txn.open_table(A).unwrap();
                a.insert("x", 7).unwrap();
                let mut b = txn.open_table(B).unwrap();
                // More than one chunk.
                for i in 0..(CHUNK_ENTRIES + 10) {
                    b.insert(("t", i), &i.to_le_bytes()[..]).unwrap();
                }
                let mut c = txn.open_table(C).unwrap();
                c.insert("k", &b"v"[..]).unwrap();
            }
            txn.commit().unwrap();
        })
        .unwrap();
        let dest = dir.path().join("copy.redb");
        let copied = copy_to(&file, &dest).unwrap();
        assert_eq!(copied.tables, 3);
        assert_eq!(copied.entries, 1 + CHUNK_ENTRIES + 10 + 1);
        // A write after the copy is not in it; the copy opens as a database of its own.
        file.with_db(|db| {
            let txn = db.begin_write().unwrap();
            txn.open_table(A).unwrap().insert("later", 1).unwrap();
            txn.commit().unwrap();
        })
        .unwrap();
        let copy = Database::create(&dest).unwrap();
        let r = copy.begin_read().unwrap();
        let a = r.open_table(A).unwrap();
        assert_eq!(a.get("x").unwrap().unwrap().value(), 7);
        assert!(a.get("later").unwrap().is_none());
        let b = r.open_table(B).unwrap();
        assert_eq!(b.len().unwrap(), CHUNK_ENTRIES + 10);
        assert_eq!(
            b.get(("t", CHUNK_ENTRIES + 9)).unwrap().unwrap().value(),
            &(CHUNK_ENTRIES + 9).to_le_bytes()[..]
        );
        assert_eq!(
            r.open_table(C).unwrap().get("k").unwrap().unwrap().value(),
            b"v"
        );
    }

    #[test]
    fn an_existing_destination_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let file = RedbFile::create(&dir.path().join("live.redb")).unwrap();
        let dest = dir.path().join("copy.redb");
        std::fs::write(&dest, b"keep").unwrap();
        let err = copy_to(&file, &dest).unwrap_err();
        assert!(matches!(err, BackupError::Create { .. }), "{err}");
        assert_eq!(std::fs::read(&dest).unwrap(), b"keep");
    }
}
