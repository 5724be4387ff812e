//! `GET /sse?topic=...[&lastEventId=...]`: the same queue and hub as WebSocket, framed as
//! Server-Sent Events. The response body is a stream that drains the client's queue in
//! batches (several events per write) and sends a heartbeat comment every
//! `ping_interval`; hyper writes it through a `DeadlineStream`, so a stalled reader fails
//! its write and is dropped.
//!
//! Every event carries the client's position in all topics of the stream as its `id:`
//! (`event_id`), so a reconnecting `EventSource` resumes every topic from the one
//! `Last-Event-ID` it sends back. The id differs per client while a publication's bytes
//! are shared: the writer puts the small id line beside the shared bytes, never
//! re-encoding a publication per subscriber.
//!
//! A private topic needs a token allowing it (`?token=` or `Authorization: Bearer`,
//! docs/auth.md); the stream then ends at the token's `exp` with `: close token_expired`.

pub mod event_id;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures_util::stream;

use crate::api::error::ApiError;
use crate::broker::StreamPosition;
use crate::client::{Batch, Item};
use crate::close::DisconnectReason;
use crate::error_code::ErrorCode;
use crate::metrics::Transport;
use crate::state::{AppState, Registration};
use crate::topic::{topics_from_query, TopicError};
use event_id::IdVector;

const BATCH_BYTES: usize = 256 * 1024;
const BATCH_ITEMS: usize = 1024;
/// Pieces up to this size (id lines, small publications) are copied into one frame of the
/// batch: cheaper than a body frame, a chunk header and an iovec each. Larger publications
/// go to hyper as their own frame, the shared bytes themselves.
const COPY_MAX: usize = 1024;
/// What opens every `subscribed` event's bytes: how the writer tells one in the queue.
const SUBSCRIBED_EVENT: &[u8] = b"event: subscribed\n";

pub async fn subscribe(
    State(state): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    match open(&state, query.as_deref(), &headers).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

fn bad_id(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::BadLastEventId, message)
}

/// The id to resume from: the `Last-Event-ID` header (sent by `EventSource` itself on a
/// reconnect) wins over the `lastEventId` query parameter (for a first connection that
/// already knows its position).
fn last_event_id(query: Option<&str>, headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let mut values = headers.get_all("last-event-id").iter();
    if let Some(v) = values.next() {
        if values.next().is_some() {
            return Err(bad_id("more than one Last-Event-ID header"));
        }
        let v = v
            .to_str()
            .map_err(|_| bad_id("Last-Event-ID must be visible ASCII"))?;
        return Ok(Some(v.to_string()));
    }
    // The query was already read once for its topics; it is short (hyper bounds the
    // request head), so reading it again costs little.
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query.unwrap_or(""))
        .map_err(|e| ApiError::from(TopicError::BadQuery(e.to_string())))?;
    let mut found = None;
    for (k, v) in pairs {
        if k == "lastEventId" {
            if found.is_some() {
                return Err(bad_id("lastEventId given more than once"));
            }
            found = Some(v);
        }
    }
    Ok(found)
}

async fn open(
    state: &Arc<AppState>,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    // The WebSocket origin rule: a stream holds a connection slot, so another site's page
    // must not open streams through its visitors' browsers, even though without CORS it
    // could not read them.
    let access = crate::origin::check(headers, &state.cfg)?;
    let max_topics = state.cfg.max_topics_per_connection;
    let topics = topics_from_query(query, max_topics)?;
    if topics.is_empty() {
        return Err(TopicError::NoTopic.into());
    }
    // Every topic is checked before anything is opened: a stream is all its topics or
    // nothing, and a refused one leaves no subscription behind.
    let grant = state.auth.grant_from_request(query, headers)?;
    for t in &topics {
        state.auth.check_read(t, grant.as_ref())?;
    }
    // SSE has no way to send a fresh token: the stream ends when the token does, and the
    // client reconnects with a new one and its `Last-Event-ID`. Only the instant is kept,
    // never the token or its topics: every topic was checked above and cannot change.
    let expires = grant.as_ref().map(|g| g.deadline());
    let since: Vec<Option<StreamPosition>> = match last_event_id(query, headers)? {
        Some(id) => event_id::parse(&id, topics.len(), max_topics).map_err(bad_id)?,
        None => vec![None; topics.len()],
    };
    let reg = Registration::new(state, Transport::Sse)?;
    reg.client.push(
        Item::control(Bytes::from_static(b"retry: 2000\n\n")),
        &state.metrics,
    );
    let who = crate::auth::identity(grant.as_ref());
    let mut ids = IdVector::new(&topics, since.clone());
    for (i, (t, since)) in topics.iter().zip(&since).enumerate() {
        // The `subscribed` event is queued under the topic's lock, before the replay and
        // anything live; the writer gives it its id line when it goes out.
        let sub = crate::subscribe::subscribe(
            &state.hub,
            &*state.broker,
            &reg.client,
            t,
            since.as_ref(),
            &|sub| {
                Some(crate::framing::sse_event(
                    Some("subscribed"),
                    &crate::protocol::subscribed(t, sub, None),
                ))
            },
            &who,
        )
        .await?;
        ids.joined(i, &sub);
    }
    let stream = SseStream {
        reg,
        ids,
        heartbeat_due: Instant::now() + state.cfg.ping_interval,
        expires,
        frames: VecDeque::new(),
        frames_bytes: 0,
        done: false,
    };
    let body = Body::from_stream(stream::unfold(stream, |mut s| async move {
        let frame = s.next_frame().await?;
        Some((Ok::<Bytes, std::convert::Infallible>(frame), s))
    }));
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Tell nginx-style proxies not to buffer the stream.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    // Sites the operator listed may read the stream from their own pages (EventSource is a
    // CORS request).
    if access == crate::origin::Access::Listed {
        if let Some(origin) = headers.get(header::ORIGIN) {
            h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
            h.insert(header::VARY, HeaderValue::from_static("origin"));
        }
    }
    Ok(resp)
}

struct SseStream {
    reg: Registration,
    ids: IdVector,
    heartbeat_due: Instant,
    /// When the stream's token expires (None: opened without one).
    expires: Option<Instant>,
    /// The current batch, as body frames not yet handed to hyper.
    frames: VecDeque<Bytes>,
    /// Bytes in `frames`: held for the client outside its queue, so they count against
    /// its `queue_max_bytes` like the WebSocket writer's batch does.
    frames_bytes: usize,
    done: bool,
}

impl Drop for SseStream {
    fn drop(&mut self) {
        // Dropped by hyper when the client goes away or a write times out; a reason
        // recorded in the queue (slow consumer, shutdown) wins over "normal".
        self.reg.client.set_held(0);
        let reason = self.reg.client.closed().unwrap_or(DisconnectReason::Normal);
        self.reg
            .state()
            .metrics
            .record_disconnect(Transport::Sse, reason);
    }
}

/// Sleeps until `at`, or forever when there is no such instant.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

impl SseStream {
    async fn next_frame(&mut self) -> Option<Bytes> {
        if let Some(frame) = self.frames.pop_front() {
            self.frames_bytes -= frame.len();
            self.reg.client.set_held(self.frames_bytes);
            return Some(frame);
        }
        if self.done {
            return None;
        }
        let state = self.reg.state().clone();
        let client = self.reg.client.clone();
        loop {
            // Checked before each batch too: a stream that always has publications waiting
            // never reaches the select below, and must still end with its token.
            if self.expires.is_some_and(|at| Instant::now() >= at) && client.closed().is_none() {
                client.close(DisconnectReason::TokenExpired);
            }
            // Every event carries the whole id vector (up to a few KiB for a stream of
            // many topics): the batch's id lines, like its events, stay within BATCH_BYTES,
            // or tiny publications would make a frame far larger than the queue budget.
            let items = (BATCH_BYTES / self.ids.max_line_len()).clamp(1, BATCH_ITEMS);
            match client.take(BATCH_BYTES, items) {
                Batch::Items(items) => {
                    self.assemble(items);
                    let frame = self.frames.pop_front().expect("a batch makes frames");
                    self.frames_bytes -= frame.len();
                    client.set_held(self.frames_bytes);
                    return Some(frame);
                }
                Batch::Closed(reason) => {
                    self.done = true;
                    return Some(Bytes::from(format!(": close {}\n\n", reason.label())));
                }
                Batch::Empty => {}
            }
            tokio::select! {
                biased;
                _ = state.shutdown.cancelled(), if client.closed().is_none() => {
                    client.close(DisconnectReason::Shutdown);
                }
                _ = client.notified() => {}
                _ = sleep_until_some(self.expires), if client.closed().is_none() => {
                    client.close(DisconnectReason::TokenExpired);
                }
                _ = tokio::time::sleep_until(self.heartbeat_due.into()) => {
                    self.heartbeat_due = Instant::now() + state.cfg.ping_interval;
                    return Some(Bytes::from_static(b": heartbeat\n\n"));
                }
            }
        }
    }

    /// Turns a batch of queue items into body frames: each event's per-client `id:` line,
    /// then its shared bytes. Small pieces are copied together into one frame; large
    /// publications stay their own (shared) frame.
    fn assemble(&mut self, items: Vec<Item>) {
        let mut batch = crate::writer::Batch::default();
        let mut small = BytesMut::new();
        for mut item in items {
            let is_event = if let Some((topic, offset)) = item.source.take() {
                self.ids.publication(&topic, offset);
                true
            } else if item.bytes.starts_with(SUBSCRIBED_EVENT) {
                self.ids.subscribed_event();
                true
            } else {
                false
            };
            if is_event {
                self.ids.write_line(&mut small);
            }
            let bytes = batch.add(item);
            if bytes.len() <= COPY_MAX {
                small.extend_from_slice(&bytes);
            } else {
                if !small.is_empty() {
                    self.frames.push_back(small.split().freeze());
                }
                self.frames.push_back(bytes);
            }
        }
        if !small.is_empty() {
            self.frames.push_back(small.freeze());
        }
        self.frames_bytes = self.frames.iter().map(Bytes::len).sum();
        batch.wrote(self.frames_bytes);
        self.heartbeat_due = Instant::now() + self.reg.state().cfg.ping_interval;
        batch.report(&self.reg.state().metrics, Transport::Sse);
    }
}
