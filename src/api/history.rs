//! `GET /api/topics/{topic}/history`: a page of a topic's kept publications, for readers
//! that poll instead of holding a connection. Reading needs no key (like `/sse`) and
//! creates nothing: an unknown topic answers an empty page.

use std::sync::Arc;

use axum::extract::{Path, RawQuery, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::error::ApiError;
use crate::broker::StreamPosition;
use crate::state::AppState;
use crate::topic;

/// The largest page.
pub const MAX_LIMIT: usize = 1000;
const DEFAULT_LIMIT: usize = 100;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryQuery {
    since: Option<u64>,
    epoch: Option<String>,
    limit: Option<usize>,
}

pub async fn history(
    State(state): State<Arc<AppState>>,
    Path(topic_name): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<Page>, ApiError> {
    if !topic::is_valid(&topic_name) {
        return Err(ApiError::bad_topic());
    }
    let q: HistoryQuery = serde_urlencoded::from_str(query.as_deref().unwrap_or(""))
        .map_err(|e| bad_query(format!("{e}")))?;
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(bad_query(format!("limit must be 1-{MAX_LIMIT}")));
    }
    let epoch = match q.epoch {
        Some(e) if is_epoch(&e) => Some(e),
        Some(_) => {
            return Err(bad_query(
                "epoch must be 1-64 characters of A-Z a-z 0-9".into(),
            ))
        }
        None => None,
    };
    if epoch.is_some() && q.since.is_none() {
        return Err(bad_query("epoch needs since".into()));
    }
    // An empty epoch asks the broker for the topic's current one.
    let since = q.since.map(|offset| StreamPosition {
        offset,
        epoch: epoch.as_deref().unwrap_or("").into(),
    });
    let page = state
        .broker
        .history(&topic_name, since.as_ref(), limit)
        .await?;
    let more = page
        .publications
        .last()
        .is_some_and(|p| p.offset < page.position.offset);
    let mut publications = Vec::with_capacity(page.publications.len());
    for p in &page.publications {
        // Kept as the validated JSON it was published as: embedded verbatim again.
        let data = RawValue::from_string(String::from_utf8_lossy(&p.data()).into_owned())
            .map_err(|e| ApiError::internal(format!("kept publication is not JSON: {e}")))?;
        publications.push(Entry {
            offset: p.offset,
            data,
        });
    }
    let epoch = (!page.position.epoch.is_empty()).then(|| page.position.epoch.to_string());
    Ok(Json(Page {
        topic: topic_name,
        epoch,
        offset: page.position.offset,
        recovered: page.recovered,
        more,
        publications,
    }))
}

#[derive(Serialize)]
pub struct Page {
    topic: String,
    /// None for a topic this node does not hold.
    epoch: Option<String>,
    offset: u64,
    recovered: bool,
    more: bool,
    publications: Vec<Entry>,
}

#[derive(Serialize)]
struct Entry {
    offset: u64,
    data: Box<RawValue>,
}

fn bad_query(why: String) -> ApiError {
    ApiError::bad_request(
        "bad_query",
        format!("bad history query ({why}); use since=OFFSET&epoch=EPOCH&limit=1-{MAX_LIMIT}"),
    )
}

fn is_epoch(e: &str) -> bool {
    (1..=64).contains(&e.len()) && e.bytes().all(|b| b.is_ascii_alphanumeric())
}
