//! Where a node's boards are made durable, behind one trait: the node's own redb file
//! (`service::LocalStore`, group commit through `store.rs`) or Redis, shared by every node
//! (`shared::Shared`). `Boards` validates, budgets and ranks the same way over either and
//! hands each write to its storage; only the storage knows how a write becomes durable
//! and when the board's mirror shows it.

use tokio::sync::OwnedSemaphorePermit;

use super::service::{BoardError, BoardOptions, Boards, ScoreResult, ValidScore};
use super::store::{ArchivedSeason, StoredEntry};

/// A board write that returns once it is durable and `boards` shows it (on this node).
#[async_trait::async_trait]
pub trait BoardStorage: Send + Sync {
    /// Creates the board or changes its options; the sort order of a board with players
    /// cannot change (`BoardError::Conflict`).
    async fn put_options(
        &self,
        boards: &Boards,
        name: &str,
        options: BoardOptions,
    ) -> Result<BoardOptions, BoardError>;

    /// Applies a validated batch all-or-nothing. `budget` is the batch's share of the bytes
    /// that may wait for the disk, held until the write is resolved.
    async fn submit(
        &self,
        boards: &Boards,
        name: &str,
        scores: Vec<ValidScore>,
        max_players: usize,
        budget: OwnedSemaphorePermit,
    ) -> Result<Vec<ScoreResult>, BoardError>;

    /// Empties a board that exists, keeping its options and clock.
    async fn reset(&self, boards: &Boards, name: &str) -> Result<(), BoardError>;

    /// Forgets one player's entry in the current season and in every closed season the
    /// board keeps (`NoBoard`, `NoPlayer` when there is none to forget); returns the
    /// closed seasons it was erased from.
    async fn delete_player(
        &self,
        boards: &Boards,
        name: &str,
        player: &str,
    ) -> Result<Vec<u64>, BoardError>;

    /// Closes the board's season if it is still due at `now` (ms): its entries become the
    /// archive, the board starts empty in the next season. Once per boundary, whoever
    /// calls (a score past the end, the season task, every node under Redis).
    async fn close_season(&self, boards: &Boards, name: &str, now: i64) -> Result<(), BoardError>;

    /// The board's closed seasons kept, newest first.
    async fn seasons(&self, boards: &Boards, name: &str)
        -> Result<Vec<ArchivedSeason>, BoardError>;

    /// One closed season with its entries, if kept.
    async fn season(
        &self,
        boards: &Boards,
        name: &str,
        season: u64,
    ) -> Result<Option<(ArchivedSeason, Vec<StoredEntry>)>, BoardError>;

    /// Takes no more writes; what was accepted is still made durable (`Boards::close`
    /// then waits for the storage's tasks).
    fn close(&self);

    /// Unit tests: the local store's writer, to inject failed commits.
    #[cfg(test)]
    fn local_writer(&self) -> Option<super::store::StoreWriter> {
        None
    }
}
