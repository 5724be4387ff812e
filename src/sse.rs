//! `GET /sse?topic=...`: the same queue and hub as WebSocket, framed as Server-Sent Events.
//! The response body is a stream that drains the client's queue into one chunk per wake-up
//! (several events per write) and sends a heartbeat comment every `ping_interval`; hyper
//! writes it through a `DeadlineStream`, so a stalled reader fails its write and is dropped.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures_util::stream;

use crate::api::error::ApiError;
use crate::client::{Batch, Item};
use crate::close::DisconnectReason;
use crate::metrics::Transport;
use crate::state::{AppState, Registration};
use crate::topic::{topics_from_query, TopicError};

const BATCH_BYTES: usize = 256 * 1024;
const BATCH_ITEMS: usize = 1024;

pub async fn subscribe(
    State(state): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    match open(&state, query.as_deref(), &headers) {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

fn open(
    state: &Arc<AppState>,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    // The WebSocket origin rule: a stream holds a connection slot, so another site's page
    // must not open streams through its visitors' browsers, even though without CORS it
    // could not read them.
    let access = crate::origin::check(headers, &state.cfg)?;
    let topics = topics_from_query(query, state.cfg.max_topics_per_connection)?;
    if topics.is_empty() {
        return Err(TopicError::NoTopic.into());
    }
    let reg = Registration::new(state, Transport::Sse)?;
    reg.client.push(
        Item::control(Bytes::from_static(b"retry: 2000\n\n")),
        &state.metrics,
    );
    for t in &topics {
        state.broker.subscribe(&reg.client, t, None, &|_| None)?;
    }
    let stream = SseStream {
        reg,
        heartbeat_due: Instant::now() + state.cfg.ping_interval,
        done: false,
    };
    let body = Body::from_stream(stream::unfold(stream, |mut s| async move {
        let chunk = s.next_chunk().await?;
        Some((Ok::<Bytes, std::convert::Infallible>(chunk), s))
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
    heartbeat_due: Instant,
    done: bool,
}

impl Drop for SseStream {
    fn drop(&mut self) {
        // Dropped by hyper when the client goes away or a write times out; a reason
        // recorded in the queue (slow consumer, shutdown) wins over "normal".
        let reason = self.reg.client.closed().unwrap_or(DisconnectReason::Normal);
        self.reg
            .state()
            .metrics
            .record_disconnect(Transport::Sse, reason);
    }
}

impl SseStream {
    async fn next_chunk(&mut self) -> Option<Bytes> {
        if self.done {
            return None;
        }
        let state = self.reg.state().clone();
        let client = self.reg.client.clone();
        loop {
            match client.take(BATCH_BYTES, BATCH_ITEMS) {
                Batch::Items(items) => return Some(self.chunk(items)),
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
                _ = tokio::time::sleep_until(self.heartbeat_due.into()) => {
                    self.heartbeat_due = Instant::now() + state.cfg.ping_interval;
                    return Some(Bytes::from_static(b": heartbeat\n\n"));
                }
            }
        }
    }

    fn chunk(&mut self, items: Vec<Item>) -> Bytes {
        let mut messages = 0;
        let mut oldest: Option<Instant> = None;
        let out = if items.len() == 1 {
            let item = items.into_iter().next().expect("one item");
            if let Some(at) = item.published_at {
                messages = 1;
                oldest = Some(at);
            }
            item.bytes
        } else {
            let mut buf = BytesMut::with_capacity(items.iter().map(|i| i.bytes.len()).sum());
            for item in items {
                if let Some(at) = item.published_at {
                    messages += 1;
                    oldest = Some(oldest.map_or(at, |o| o.min(at)));
                }
                buf.extend_from_slice(&item.bytes);
            }
            buf.freeze()
        };
        self.heartbeat_due = Instant::now() + self.reg.state().cfg.ping_interval;
        self.reg
            .state()
            .metrics
            .record_write(Transport::Sse, messages, out.len() as u64, oldest);
        out
    }
}
