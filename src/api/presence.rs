//! `GET /api/topics/{topic}/presence` (a page of members) and
//! `GET /api/topics/{topic}/presence/stats` (`{"clients":N,"users":M}`): who is
//! subscribed to a topic of a `presence = true` namespace, for readers that poll. Like
//! history reads: no key, and a private topic needs a token allowing it. A topic whose
//! namespace keeps no presence answers `presence_disabled` (404), so a misconfigured
//! client hears so instead of reading an always-empty list.

use std::sync::Arc;

use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::error::ApiError;
use crate::error_code::ErrorCode;
use crate::protocol::MAX_PRESENCE_PAGE;
use crate::state::AppState;
use crate::topic;

const DEFAULT_LIMIT: usize = 100;

/// Ok when the topic's namespace keeps members (WebSocket `presence` reads ask too).
pub fn check_enabled(state: &AppState, topic: &str) -> Result<(), ApiError> {
    if state.cfg.presence(topic).members {
        return Ok(());
    }
    Err(ApiError::new(
        ErrorCode::PresenceDisabled,
        format!(
            "topic {topic:?} keeps no presence: its [[namespace]] needs presence = true \
             (docs/configuration.md)"
        ),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PresenceQuery {
    limit: Option<usize>,
    cursor: Option<String>,
    /// Read by `Auth::grant_from_request`; named here so the query may carry it.
    #[allow(dead_code)]
    token: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StatsQuery {
    #[allow(dead_code)]
    token: Option<String>,
}

/// The topic checked and its reader allowed, before anything is read.
fn admit(
    state: &AppState,
    topic_name: &str,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Result<(), ApiError> {
    if !topic::is_valid(topic_name) {
        return Err(ApiError::bad_topic());
    }
    let grant = state.auth.grant_from_request(query, headers)?;
    state.auth.check_read(topic_name, grant.as_ref())?;
    check_enabled(state, topic_name)
}

fn bad_query(why: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        ErrorCode::BadQuery,
        format!("bad presence query ({why}); use limit=1-{MAX_PRESENCE_PAGE}&cursor=NEXT_CURSOR"),
    )
}

/// One page of members in client-id order: `limit` (default 100, 1-1000) members after
/// `cursor`, and the `next_cursor` of the next page (absent on the last). A cursor is a
/// client id, so a member is on at most one page however members come and go meanwhile.
pub async fn members(
    State(state): State<Arc<AppState>>,
    Path(topic_name): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let q: PresenceQuery =
        serde_urlencoded::from_str(query.as_deref().unwrap_or("")).map_err(bad_query)?;
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_PRESENCE_PAGE).contains(&limit) {
        return Err(bad_query(format!("limit must be 1-{MAX_PRESENCE_PAGE}")));
    }
    let after = match q.cursor.as_deref().map(str::parse::<u64>) {
        None => None,
        Some(Ok(n)) => Some(n),
        Some(Err(_)) => {
            return Err(bad_query(
                "cursor must be the next_cursor of the previous page",
            ))
        }
    };
    admit(&state, &topic_name, query.as_deref(), &headers)?;
    let page = state.broker.presence(&topic_name, after, limit).await?;
    let mut body = format!(r#"{{"topic":"{topic_name}","members":["#);
    for (i, m) in page.members.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        m.write_json(&mut body);
    }
    body.push(']');
    if let Some(next) = page.next {
        body.push_str(&format!(r#","next_cursor":"{next}""#));
    }
    body.push('}');
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// `{"topic":"t","clients":N,"users":M}`: connections, and distinct token `sub`s among
/// them (anonymous connections count as clients only). O(1).
pub async fn stats(
    State(state): State<Arc<AppState>>,
    Path(topic_name): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let _: StatsQuery =
        serde_urlencoded::from_str(query.as_deref().unwrap_or("")).map_err(bad_query)?;
    admit(&state, &topic_name, query.as_deref(), &headers)?;
    let s = state.broker.presence_stats(&topic_name).await?;
    let body = format!(
        r#"{{"topic":"{topic_name}","clients":{},"users":{}}}"#,
        s.clients, s.users
    );
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}
