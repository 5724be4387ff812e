//! The Pusher Channels HTTP API (docs/pusher.md), what the server SDKs (`pusher` on npm and
//! PyPI, and the others) call: `POST /apps/{id}/events` and `/batch_events`, `GET
//! /apps/{id}/channels`, `/channels/{name}` and `/channels/{name}/users`. Every call is
//! signed with the app's secret (`pusher::sign::check_request`: key, timestamp within
//! 600 s, version, body MD5, signature in constant time) and refused with 401 otherwise;
//! an unknown app is 404, a malformed body 400, data over `max_message_bytes` 413. Nothing
//! is published unless the whole call is valid.
//!
//! An event is published to each channel's topic as the exact message Pusher clients get
//! (`pusher::messages::event`), so the hub frames nothing per subscriber; `socket_id`
//! rides along as the mark the hub skips that socket by.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{Method, Uri};
use axum::Json;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use super::body::read_body;
use super::error::ApiError;
use crate::broker::PublishRequest;
use crate::error_code::ErrorCode;
use crate::pusher::messages::{self, Data, MAX_EVENT_NAME};
use crate::pusher::{sign, App};
use crate::state::AppState;
use crate::topic::is_valid_pusher_channel;

/// Channels one event may go to, and events one batch may hold (Pusher's limits).
pub const MAX_CHANNELS: usize = 100;
pub const MAX_BATCH: usize = 10;

/// Channels one listing reads from Redis at most, so one call never walks an unbounded
/// key space.
const MAX_LISTED: usize = 10_000;

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The app of `id`, once the request's signature is checked.
fn signed_app(
    state: &AppState,
    id: &str,
    method: &Method,
    uri: &Uri,
    query: Option<&str>,
    body: &[u8],
) -> Result<Arc<App>, ApiError> {
    let Some(app) = state.pusher.by_id(id) else {
        return Err(ApiError::new(
            ErrorCode::NoApp,
            format!("no Pusher app with id {id:?}"),
        ));
    };
    let params: Vec<(String, String)> = serde_urlencoded::from_str(query.unwrap_or(""))
        .map_err(|e| ApiError::new(ErrorCode::BadQuery, format!("bad query string: {e}")))?;
    sign::check_request(app, method.as_str(), uri.path(), &params, body, now())
        .map_err(|sign::Refused(m)| ApiError::new(ErrorCode::BadSignature, m))?;
    Ok(app.clone())
}

#[derive(Deserialize)]
struct Event<'a> {
    name: String,
    #[serde(borrow)]
    data: &'a RawValue,
    channel: Option<String>,
    channels: Option<Vec<String>>,
    socket_id: Option<String>,
}

/// An event checked whole: its channels, name, data and the socket it skips.
struct Checked<'a> {
    channels: Vec<String>,
    name: String,
    data: std::borrow::Cow<'a, str>,
    socket_id: Option<String>,
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::BadJson, message)
}

fn check_event<'a>(e: Event<'a>, max_data: usize) -> Result<Checked<'a>, ApiError> {
    let channels = match (e.channel, e.channels) {
        (Some(c), None) => vec![c],
        (None, Some(cs)) => cs,
        _ => return Err(bad("give either channel or channels")),
    };
    if channels.is_empty() || channels.len() > MAX_CHANNELS {
        return Err(bad(format!("an event goes to 1-{MAX_CHANNELS} channels")));
    }
    if let Some(c) = channels.iter().find(|c| !is_valid_pusher_channel(c)) {
        return Err(bad(format!(
            "invalid channel name {c:?}: 1-164 bytes of A-Z a-z 0-9 _ - = @ , . ;"
        )));
    }
    if e.name.is_empty() || e.name.len() > MAX_EVENT_NAME {
        return Err(bad(format!("name must be 1-{MAX_EVENT_NAME} bytes")));
    }
    if let Some(s) = &e.socket_id {
        if !messages::is_socket_id(s) {
            return Err(bad("socket_id must be DIGITS.DIGITS"));
        }
    }
    // Pusher's data is a string; other JSON is taken as its text.
    let data = match serde_json::from_str::<std::borrow::Cow<'a, str>>(e.data.get()) {
        Ok(s) => s,
        Err(_) => e.data.get().into(),
    };
    if data.len() > max_data {
        return Err(ApiError::new(
            ErrorCode::MessageTooLarge,
            format!("data is over max_message_bytes ({max_data} bytes)"),
        ));
    }
    Ok(Checked {
        channels,
        name: e.name,
        data,
        socket_id: e.socket_id,
    })
}

async fn publish(state: &AppState, app: &App, e: &Checked<'_>) -> Result<(), ApiError> {
    for channel in &e.channels {
        let json = messages::event(
            &e.name,
            channel,
            &Data::Text(&e.data),
            e.socket_id.as_deref(),
            None,
        );
        state
            .broker
            .publish(PublishRequest {
                topic: &app.topic(channel),
                data: &json,
                retain: messages::is_cache_channel(channel),
                ..PublishRequest::default()
            })
            .await?;
        let label = crate::metrics::AppEventLabel {
            app: app.id.clone(),
            source: "api",
        };
        state.metrics.pusher_events.get_or_create(&label).inc();
    }
    Ok(())
}

/// The body budget of one event: its data plus room for the rest of the JSON.
fn body_max(state: &AppState) -> usize {
    state.cfg.max_message_bytes * 2 + 16 * 1024
}

pub async fn events(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    RawQuery(query): RawQuery,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let bytes = read_body(body, body_max(&state)).await?;
    let app = signed_app(&state, &id, &method, &uri, query.as_deref(), &bytes)?;
    let event: Event = serde_json::from_slice(&bytes)
        .map_err(|e| bad(format!("the body is not a Pusher event: {e}")))?;
    let event = check_event(event, state.cfg.max_message_bytes)?;
    publish(&state, &app, &event).await?;
    Ok(Json(json!({})))
}

pub async fn batch_events(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    RawQuery(query): RawQuery,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let bytes = read_body(body, MAX_BATCH * body_max(&state)).await?;
    let app = signed_app(&state, &id, &method, &uri, query.as_deref(), &bytes)?;
    #[derive(Deserialize)]
    struct Batch<'a> {
        #[serde(borrow)]
        batch: Vec<Event<'a>>,
    }
    let batch: Batch = serde_json::from_slice(&bytes)
        .map_err(|e| bad(format!("the body is not a Pusher batch: {e}")))?;
    if batch.batch.len() > MAX_BATCH {
        return Err(bad(format!("a batch holds at most {MAX_BATCH} events")));
    }
    let max = state.cfg.max_message_bytes;
    let checked = batch
        .batch
        .into_iter()
        .map(|e| {
            let c = check_event(e, max)?;
            if c.channels.len() != 1 {
                return Err(bad("each batch event names one channel"));
            }
            Ok(c)
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    for e in &checked {
        publish(&state, &app, e).await?;
    }
    Ok(Json(
        json!({ "batch": checked.iter().map(|_| json!({})).collect::<Vec<_>>() }),
    ))
}

#[derive(Default)]
struct InfoQuery {
    filter_by_prefix: Option<String>,
    info: Option<String>,
}

fn info_query(query: Option<&str>) -> InfoQuery {
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_str(query.unwrap_or("")).unwrap_or_default();
    let get = |k: &str| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    InfoQuery {
        filter_by_prefix: get("filter_by_prefix"),
        info: get("info"),
    }
}

fn wants(info: &InfoQuery, attribute: &str) -> bool {
    info.info
        .as_deref()
        .is_some_and(|i| i.split(',').any(|a| a.trim() == attribute))
}

/// `GET /apps/{id}/channels`: the app's occupied channels (`filter_by_prefix`;
/// `info=user_count` for presence channels), across the cluster under `--redis`.
pub async fn channels(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    RawQuery(query): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let app = signed_app(&state, &id, &method, &uri, query.as_deref(), b"")?;
    let q = info_query(query.as_deref());
    let prefix = app.topic_prefix();
    let user_count = wants(&q, "user_count");
    if user_count
        && !q
            .filter_by_prefix
            .as_deref()
            .is_some_and(|p| p.starts_with("presence-"))
    {
        return Err(ApiError::new(
            ErrorCode::BadQuery,
            "info=user_count needs filter_by_prefix=presence-",
        ));
    }
    let topics = match &state.counts {
        Some(counts) => {
            let scope = format!("{prefix}{}", q.filter_by_prefix.as_deref().unwrap_or(""));
            counts.occupied(&scope, MAX_LISTED).await
        }
        None => state.hub.topic_counts(),
    };
    let mut out = serde_json::Map::new();
    for (topic, _) in topics {
        let Some(channel) = topic.strip_prefix(&prefix) else {
            continue;
        };
        // Users' own channels are not listed (as Pusher).
        if channel.starts_with(crate::topic::PUSHER_USER_CHANNEL) {
            continue;
        }
        if q.filter_by_prefix
            .as_deref()
            .is_some_and(|p| !channel.starts_with(p))
        {
            continue;
        }
        let mut attrs = serde_json::Map::new();
        if user_count {
            let users = state.broker.presence_stats(&topic).await?.users;
            attrs.insert("user_count".into(), users.into());
        }
        out.insert(channel.to_string(), Value::Object(attrs));
    }
    Ok(Json(json!({ "channels": out })))
}

fn channel_of(channel: &str) -> Result<(), ApiError> {
    if is_valid_pusher_channel(channel) {
        Ok(())
    } else {
        Err(ApiError::new(
            ErrorCode::BadTopic,
            "invalid channel name: 1-164 bytes of A-Z a-z 0-9 _ - = @ , . ;",
        ))
    }
}

/// `GET /apps/{id}/channels/{name}`: occupied, and on request `subscription_count` and
/// (presence) `user_count`, across the cluster under `--redis`.
pub async fn channel(
    State(state): State<Arc<AppState>>,
    Path((id, name)): Path<(String, String)>,
    method: Method,
    uri: Uri,
    RawQuery(query): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let app = signed_app(&state, &id, &method, &uri, query.as_deref(), b"")?;
    channel_of(&name)?;
    let q = info_query(query.as_deref());
    let topic = app.topic(&name);
    let count = match &state.counts {
        Some(counts) => counts.now(&topic).await,
        None => state.hub.subscriber_count(&topic),
    };
    let mut out = json!({ "occupied": count > 0 });
    if wants(&q, "subscription_count") {
        out["subscription_count"] = count.into();
    }
    if wants(&q, "user_count") {
        if !name.starts_with("presence-") {
            return Err(ApiError::new(
                ErrorCode::BadQuery,
                "user_count is for presence- channels",
            ));
        }
        out["user_count"] = state.broker.presence_stats(&topic).await?.users.into();
    }
    Ok(Json(out))
}

/// `GET /apps/{id}/channels/{name}/users`: a presence channel's user ids.
pub async fn users(
    State(state): State<Arc<AppState>>,
    Path((id, name)): Path<(String, String)>,
    method: Method,
    uri: Uri,
    RawQuery(query): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let app = signed_app(&state, &id, &method, &uri, query.as_deref(), b"")?;
    channel_of(&name)?;
    if !name.starts_with("presence-") {
        return Err(ApiError::new(
            ErrorCode::BadQuery,
            "users are listed for presence- channels only",
        ));
    }
    let topic = app.topic(&name);
    let mut ids: Vec<String> = Vec::new();
    let mut after = None;
    loop {
        let page = state.broker.presence(&topic, after, 100).await?;
        for m in &page.members {
            if let Some(u) = &m.user {
                if !ids.iter().any(|i| **i == **u) {
                    ids.push(u.to_string());
                }
            }
        }
        match page.next {
            Some(n) if ids.len() < 10_000 => after = Some(n),
            _ => break,
        }
    }
    let users: Vec<Value> = ids.into_iter().map(|id| json!({ "id": id })).collect();
    Ok(Json(json!({ "users": users })))
}

/// `POST /apps/{id}/users/{user_id}/terminate_connections`: closes every connection signed
/// in as the user (`pusher:signin`), on every node under `--redis`: a termination mark
/// (`publication::TERMINATE_MARK`) published on the user's channel, which the hub turns
/// into a close (Pusher code 4009) of each subscriber instead of a delivery.
pub async fn terminate_connections(
    State(state): State<Arc<AppState>>,
    Path((id, user)): Path<(String, String)>,
    method: Method,
    uri: Uri,
    RawQuery(query): RawQuery,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let bytes = read_body(body, 16 * 1024).await?;
    let app = signed_app(&state, &id, &method, &uri, query.as_deref(), &bytes)?;
    if !crate::topic::is_valid_pusher_user_id(&user) {
        return Err(ApiError::new(
            ErrorCode::BadTopic,
            format!(
                "invalid user id: 1-{} bytes of A-Z a-z 0-9 _ - = @ , . ;",
                crate::topic::MAX_PUSHER_USER_ID
            ),
        ));
    }
    state
        .broker
        .publish(PublishRequest {
            topic: &app.user_topic(&user),
            data: crate::publication::TERMINATE_MARK,
            ..PublishRequest::default()
        })
        .await?;
    Ok(Json(json!({})))
}
