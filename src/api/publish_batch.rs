//! `POST /api/publish`: a batch of publications in one request (issue 17, "Also"; like
//! Centrifugo's `batch` and Pusher's `batch_events`). Each item is checked and published on
//! its own, in the order given, and gets its own receipt or error: one bad item does not
//! refuse the others. What refuses the whole request is what would refuse any publish
//! (no or a wrong key, a cross-site request, a body over its budget, not a batch).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use super::auth::{authorize, Scope};
use super::body::read_body;
use super::error::ApiError;
use super::publish::MAX_IDEMPOTENCY_KEY;
use crate::broker::PublishRequest;
use crate::error_code::ErrorCode;
use crate::state::AppState;
use crate::topic;

/// Most items in one batch.
pub const MAX_BATCH_ITEMS: usize = 100;

/// The body budget of a batch: 1 MiB, or one item at `max_message_bytes` plus room for its
/// topic and key when that is larger. Each item's `data` is bounded by `max_message_bytes`
/// besides.
pub fn body_budget(max_message_bytes: usize) -> usize {
    (1 << 20).max(max_message_bytes.saturating_add(4096))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Batch<'a> {
    #[serde(borrow)]
    items: Vec<Item<'a>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Item<'a> {
    topic: String,
    #[serde(borrow)]
    data: &'a RawValue,
    #[serde(default)]
    idempotency_key: Option<String>,
}

pub async fn publish_batch(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    // A missing or unknown key refuses the request before its body is read; a key whose
    // scope does not cover an item's topic refuses that item only (below).
    if let Err(r) = authorize(&state.auth.publishers, &headers, Scope::Publish("")) {
        if r.code != ErrorCode::NoPublishScope {
            return Err(r.into());
        }
    }
    let budget = body_budget(state.cfg.max_message_bytes);
    let bytes = read_body(body, budget).await.map_err(|mut e| {
        if e.code == ErrorCode::MessageTooLarge {
            e.message = format!("the batch is larger than its body budget ({budget} bytes)");
        }
        e
    })?;
    // serde reads a struct from a JSON array too (positionally): `[[{...}]]` would pass as
    // a batch, and `[{...}]` would fail with a message about maps and sequences.
    if bytes.trim_ascii_start().first() == Some(&b'[') {
        return Err(ApiError::new(
            ErrorCode::BadJson,
            "the body is a JSON array; a batch is an object: {\"items\":[{\"topic\":..,\"data\":..},..]}",
        ));
    }
    let batch: Batch = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::new(
            ErrorCode::BadJson,
            format!("the body is not a batch {{\"items\":[{{\"topic\":..,\"data\":..}},..]}}: {e}"),
        )
    })?;
    if batch.items.is_empty() || batch.items.len() > MAX_BATCH_ITEMS {
        return Err(ApiError::new(
            ErrorCode::BadBody,
            format!(
                "a batch holds 1-{MAX_BATCH_ITEMS} items, this one {}",
                batch.items.len()
            ),
        ));
    }
    let mut results = Vec::with_capacity(batch.items.len());
    for item in &batch.items {
        results.push(match publish_one(&state, &headers, item).await {
            Ok(receipt) => receipt,
            Err(e) => json!({
                "topic": item.topic,
                "error": {"code": e.code.as_str(), "message": e.message},
            }),
        });
    }
    Ok(Json(json!({ "results": results })).into_response())
}

/// One item: the same checks, in the same order, as `POST /api/publish/{topic}`.
async fn publish_one(
    state: &AppState,
    headers: &HeaderMap,
    item: &Item<'_>,
) -> Result<Value, ApiError> {
    authorize(&state.auth.publishers, headers, Scope::Publish(&item.topic))?;
    if !topic::is_valid(&item.topic) {
        return Err(ApiError::bad_topic());
    }
    if topic::is_board_topic(&item.topic) {
        return Err(ApiError::new(
            ErrorCode::ReservedTopic,
            "board:* topics are written by the leaderboard API (POST /api/boards/{board}/scores)",
        ));
    }
    let data = item.data.get();
    let max = state.cfg.max_message_bytes;
    if data.len() > max {
        return Err(ApiError::new(
            ErrorCode::MessageTooLarge,
            format!(
                "the item's data is {} bytes, over max_message_bytes ({max})",
                data.len()
            ),
        ));
    }
    if let Some(k) = &item.idempotency_key {
        if k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY || !k.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(ApiError::new(
                ErrorCode::BadIdempotencyKey,
                format!("idempotency_key must be 1-{MAX_IDEMPOTENCY_KEY} visible ASCII characters"),
            ));
        }
    }
    let receipt = state
        .broker
        .publish(PublishRequest {
            topic: &item.topic,
            data: data.as_bytes(),
            idempotency_key: item.idempotency_key.as_deref(),
            ..PublishRequest::default()
        })
        .await?;
    Ok(json!({
        "topic": item.topic,
        "offset": receipt.offset,
        "epoch": &*receipt.epoch,
        "subscribers": receipt.subscribers,
        "duplicate": receipt.duplicate,
    }))
}
