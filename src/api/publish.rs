//! `POST /api/publish/{topic}`: validate, hand to the broker, report the offset. The content
//! type and origin were already checked by the `api::intent` layer, before the body.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::value::RawValue;

use super::auth::{authorize, Scope};
/// Where the board routes have always found it.
pub use super::body::read_body;
use super::error::ApiError;
use crate::broker::PublishRequest;
use crate::error_code::ErrorCode;
use crate::state::AppState;
use crate::topic;

pub async fn publish(
    State(state): State<Arc<AppState>>,
    Path(topic_name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    authorize(
        &state.auth.publishers,
        &headers,
        Scope::Publish(&topic_name),
    )?;
    if !topic::is_valid(&topic_name) {
        return Err(ApiError::bad_topic());
    }
    if topic::is_board_topic(&topic_name) {
        return Err(ApiError::new(
            ErrorCode::ReservedTopic,
            "board:* topics are written by the leaderboard API (POST /api/boards/{board}/scores)",
        ));
    }
    let max = state.cfg.max_message_bytes;
    let bytes = read_body(body, max).await?;
    let data = parse_json(&bytes)?;
    let idempotency_key = idempotency_key(&headers)?;
    let receipt = state
        .broker
        .publish(PublishRequest {
            topic: &topic_name,
            data: data.get().as_bytes(),
            idempotency_key: idempotency_key.as_deref(),
            ..PublishRequest::default()
        })
        .await?;
    let mut resp = Json(serde_json::json!({
        "topic": topic_name,
        "offset": receipt.offset,
        "epoch": &*receipt.epoch,
        "subscribers": receipt.subscribers,
        "duplicate": receipt.duplicate,
    }))
    .into_response();
    if receipt.duplicate {
        resp.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(resp)
}

/// Validates one JSON value; its text (outer whitespace trimmed) is embedded verbatim.
pub fn parse_json(bytes: &[u8]) -> Result<&RawValue, ApiError> {
    serde_json::from_slice::<&RawValue>(bytes).map_err(|e| {
        ApiError::new(
            ErrorCode::BadJson,
            format!("the body is not one JSON value: {e}"),
        )
    })
}

/// The longest `Idempotency-Key` accepted.
pub const MAX_IDEMPOTENCY_KEY: usize = 128;

/// The optional `Idempotency-Key` header: 1-128 visible ASCII characters.
pub fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    match v.to_str() {
        Ok(k)
            if !k.is_empty()
                && k.len() <= MAX_IDEMPOTENCY_KEY
                && k.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            Ok(Some(k.to_string()))
        }
        _ => Err(ApiError::new(
            ErrorCode::BadIdempotencyKey,
            format!("Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY} visible ASCII characters"),
        )),
    }
}
