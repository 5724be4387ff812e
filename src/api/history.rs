//! `GET /api/topics/{topic}/history`: a page of a topic's kept publications, for readers
//! that poll instead of holding a connection. Reading needs no key (like `/sse`) and
//! creates nothing: an unknown topic answers an empty page. A private topic needs a
//! token allowing it, as on `/sse`.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::error::ApiError;
use crate::broker::StreamPosition;
use crate::error_code::ErrorCode;
use crate::state::AppState;
use crate::topic;

/// The largest page, in publications.
pub const MAX_LIMIT: usize = 1000;
/// The largest page, in bytes of publications (at least one is always sent).
pub const MAX_PAGE_BYTES: usize = 256 * 1024;
const DEFAULT_LIMIT: usize = 100;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryQuery {
    since: Option<u64>,
    epoch: Option<String>,
    limit: Option<usize>,
    /// Read by `Auth::grant_from_request`; named here so the query may carry it.
    #[allow(dead_code)]
    token: Option<String>,
}

pub async fn history(
    State(state): State<Arc<AppState>>,
    Path(topic_name): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if !topic::is_valid(&topic_name) {
        return Err(ApiError::bad_topic());
    }
    let q: HistoryQuery = serde_urlencoded::from_str(query.as_deref().unwrap_or(""))
        .map_err(|e| bad_query(format!("{e}")))?;
    let grant = state.auth.grant_from_request(query.as_deref(), &headers)?;
    state.auth.check_read(&topic_name, grant.as_ref())?;
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
    // A page also stops at MAX_PAGE_BYTES of data (after at least one publication), so one
    // request pins a bounded share of history however large the publications are.
    let mut bytes = 0;
    let taken = page
        .publications
        .iter()
        .take_while(|p| {
            let first = bytes == 0;
            bytes += p.envelope().len();
            first || bytes <= MAX_PAGE_BYTES
        })
        .count();
    let publications = &page.publications[..taken];
    let more = publications
        .last()
        .is_some_and(|p| p.offset < page.position.offset);
    // The body is written from the kept envelopes' data without copying it: each
    // publication's JSON is a slice of its envelope, framed by small pieces of text. The
    // topic name's charset and the epoch's (hex) need no escaping.
    let epoch = if page.position.epoch.is_empty() {
        "null".to_string()
    } else {
        format!("\"{}\"", page.position.epoch)
    };
    let mut chunks: Vec<Bytes> = Vec::with_capacity(2 * publications.len() + 2);
    chunks.push(Bytes::from(format!(
        r#"{{"topic":"{topic_name}","epoch":{epoch},"offset":{},"recovered":{},"more":{more},"publications":["#,
        page.position.offset, page.recovered
    )));
    for (i, p) in publications.iter().enumerate() {
        let sep = if i == 0 { "" } else { "," };
        chunks.push(Bytes::from(format!(
            r#"{sep}{{"offset":{},"data":"#,
            p.offset
        )));
        chunks.push(p.data());
        chunks.push(Bytes::from_static(b"}"));
    }
    chunks.push(Bytes::from_static(b"]}"));
    let body = Body::from_stream(futures_util::stream::iter(
        chunks.into_iter().map(Ok::<_, std::convert::Infallible>),
    ));
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

fn bad_query(why: String) -> ApiError {
    ApiError::new(
        ErrorCode::BadQuery,
        format!("bad history query ({why}); use since=OFFSET&epoch=EPOCH&limit=1-{MAX_LIMIT}"),
    )
}

fn is_epoch(e: &str) -> bool {
    (1..=64).contains(&e.len()) && e.bytes().all(|b| b.is_ascii_alphanumeric())
}
