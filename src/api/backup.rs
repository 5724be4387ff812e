//! Online backup (docs/operations.md, "Backup and restore"): `GET /api/backup` lists the
//! node's durable files and `GET /api/backup/{file}` answers a consistent copy of one,
//! taken while the node keeps serving. `crier backup` fetches them all.
//!
//! The copy is made by `redb_file::backup` inside one read transaction, into a file beside
//! the live one (so on the same disk, and never in memory), which is unlinked as soon as it
//! is open and streamed from the open handle: the disk space comes back when the download
//! ends or the client goes, and a crash mid-copy leaves a `.backup-*` file that the next
//! start removes. One backup runs at a time per node, so at most one extra copy of the
//! largest file sits on the disk.
//!
//! It reads every durable topic, private ones included, so it always needs a key: a node
//! without publisher keys (writes open, for development) refuses it rather than hand its
//! data to anyone who asks.

use std::path::Path;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::Json;
use tokio_util::io::ReaderStream;

use super::error::ApiError;
use crate::error_code::ErrorCode;
use crate::state::AppState;

/// Names of the copies being written or sent: `.backup-<file>-<pid>-<n>`.
const PREFIX: &str = ".backup-";

fn admit(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let keys = &state.auth.publishers;
    if keys.is_empty() {
        return Err(ApiError::new(
            ErrorCode::BackupNeedsKey,
            "a backup reads every durable file, private topics included, so it needs a \
             publisher key, and this node has none: set publisher_keys (or a [[key]] with \
             admin = true)",
        ));
    }
    super::auth::authorize(keys, headers, super::auth::Scope::Admin)?;
    Ok(())
}

/// `{"files":["crier.redb","history.redb"]}`: what `GET /api/backup/{file}` can copy on
/// this node (none under `--redis`: Redis holds the state).
pub async fn list(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    admit(&state, &headers)?;
    let files: Vec<&str> = state.durable_files.iter().map(|(n, _)| *n).collect();
    Ok(Json(serde_json::json!({ "files": files })))
}

/// A consistent copy of one durable file as of the request, as `application/octet-stream`.
pub async fn file(
    State(state): State<Arc<AppState>>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    admit(&state, &headers)?;
    let Some((name, live)) = state
        .durable_files
        .iter()
        .find(|(n, _)| *n == name)
        .cloned()
    else {
        let known: Vec<&str> = state.durable_files.iter().map(|(n, _)| *n).collect();
        return Err(ApiError::new(
            ErrorCode::NoDurableFile,
            format!(
                "this node keeps no durable file {name:?}; it keeps {known:?} (under --redis \
                 the state is in Redis: back up Redis)"
            ),
        ));
    };
    let Ok(permit) = state.backup_slot.clone().try_acquire_owned() else {
        return Err(ApiError::new(
            ErrorCode::BackupInProgress,
            "another backup of this node is being taken or sent; retry when it is done",
        )
        .retry_after(5));
    };
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let copy = state
        .cfg
        .data_dir
        .join(format!("{PREFIX}{name}-{}-{n}", std::process::id()));
    let started = std::time::Instant::now();
    let made = {
        let copy = copy.clone();
        tokio::task::spawn_blocking(move || {
            let made = crate::redb_file::backup::copy_to(&live, &copy);
            if made.is_err() {
                let _ = std::fs::remove_file(&copy);
            }
            made
        })
        .await
    };
    let copied = match made {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::error!(file = name, error = %e, "online backup failed");
            return Err(ApiError::new(
                ErrorCode::Unavailable,
                format!("the backup of {name} failed: {e}"),
            ));
        }
        Err(e) => {
            let _ = std::fs::remove_file(&copy);
            return Err(ApiError::new(
                ErrorCode::Internal,
                format!("the backup task failed: {e}"),
            ));
        }
    };
    let opened = tokio::fs::File::open(&copy).await;
    // Unlinked at once: the open handle keeps it readable, and nothing is left behind
    // whether the download finishes, fails or is abandoned.
    let _ = std::fs::remove_file(&copy);
    let f = opened.map_err(|e| {
        ApiError::new(
            ErrorCode::Unavailable,
            format!("reading the copy of {name}: {e}"),
        )
    })?;
    let len = f.metadata().await.map(|m| m.len()).unwrap_or(0);
    tracing::info!(
        file = name,
        bytes = len,
        tables = copied.tables,
        entries = copied.entries,
        took_ms = started.elapsed().as_millis() as u64,
        "online backup copied; sending it"
    );
    let stream = ReaderStream::with_capacity(f, 64 * 1024);
    // The permit lives as long as the body: the next backup waits for this one's copy to
    // be sent (or dropped) and its disk space to come back.
    let body = Body::from_stream(futures_util::StreamExt::map(stream, move |chunk| {
        let _held = &permit;
        chunk
    }));
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, len.to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}\""),
            ),
        ],
        body,
    )
        .into_response())
}

/// Removes copies a crash left in `data_dir` (called at start, before serving).
pub fn remove_stale_copies(data_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(data_dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with(PREFIX) {
            match std::fs::remove_file(e.path()) {
                Ok(()) => {
                    tracing::info!(path = %e.path().display(), "removed a backup copy left by a crash")
                }
                Err(err) => {
                    tracing::warn!(path = %e.path().display(), error = %err, "could not remove a stale backup copy")
                }
            }
        }
    }
}
