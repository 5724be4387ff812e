//! `GET /sse?topic=...[&lastEventId=...]`: the same queue and hub as WebSocket, framed as
//! Server-Sent Events. The response body is a stream that drains the client's queue in
//! batches (several events per write) and sends a heartbeat comment every
//! `ping_interval`.
//!
//! On a plain connection the stream leaves hyper once its request is answered
//! (`net::Takeover`): one small task writes the response head and then the chunked events
//! straight to the socket (`serve_raw`), like `/ws` after its upgrade, so an idle stream
//! holds no HTTP connection state and no read or write buffer. Under TLS (and for HTTP/1.0
//! or HEAD) hyper keeps the connection and writes the same events as a body stream through
//! a `DeadlineStream`. Either way a reader that stalls for `write_timeout` is dropped.
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
use std::future::Future;
use std::io::{self, IoSlice};
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, Version};
use axum::response::{IntoResponse, Response};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::stream;
use tokio::net::TcpStream;

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
    method: Method,
    version: Version,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    // A chunked stream on the raw socket needs HTTP/1.1, and a HEAD gets no body at all.
    let raw = method == Method::GET && version == Version::HTTP_11 && crate::net::can_take_over();
    match open(&state, query.as_deref(), &headers, raw).await {
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
    raw: bool,
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
        state.boards.watching(t);
        ids.joined(i, &sub);
    }
    let events = Events {
        reg,
        ids,
        heartbeat_due: Instant::now() + state.cfg.ping_interval,
        expires,
    };
    let mut h = HeaderMap::new();
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
    if raw {
        let head = response_head(&h);
        let task_state = state.clone();
        let run: crate::net::TakeoverFn = Box::new(move |tcp| {
            task_state.tracker.spawn(serve_raw(tcp, head, events));
        });
        if crate::net::Takeover::claim(run).is_ok() {
            // hyper's answer is discarded: `serve_raw` writes the head itself.
            let mut resp = Body::empty().into_response();
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return Ok(resp);
        }
        unreachable!("can_take_over said this task has a takeover slot");
    }
    let stream = SseStream {
        events,
        frames: VecDeque::new(),
        frames_bytes: 0,
        done: false,
    };
    let body = Body::from_stream(stream::unfold(stream, |mut s| async move {
        let frame = s.next_frame().await?;
        Some((Ok::<Bytes, std::convert::Infallible>(frame), s))
    }));
    let mut resp = body.into_response();
    resp.headers_mut().extend(h);
    Ok(resp)
}

/// The stream's status line and headers, written by `serve_raw` itself.
fn response_head(h: &HeaderMap) -> Bytes {
    let mut head = BytesMut::with_capacity(256);
    head.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    for (name, value) in h {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"transfer-encoding: chunked\r\n\r\n");
    head.freeze()
}

/// What both ways of writing a stream keep: the client, its position vector, and the
/// heartbeat and token deadlines.
struct Events {
    reg: Registration,
    ids: IdVector,
    heartbeat_due: Instant,
    /// When the stream's token expires (None: opened without one).
    expires: Option<Instant>,
}

/// What `Events::next_batch` found in the queue.
enum Next {
    /// Frames of one batch were appended (this many bytes).
    Frames(usize),
    /// One whole HTTP/1.1 chunk (size line, events, CRLF), asked for with `chunked` and
    /// made when every piece of the batch is small: one buffer, one iovec.
    Chunk(Bytes),
    Empty,
    /// The stream ends: its last words (`: close <reason>`).
    Closed(Bytes),
}

impl Events {
    /// Takes one batch from the queue and appends its body frames to `frames`, or, with
    /// `chunked`, makes it one whole chunk when it can (`Next::Chunk`).
    fn next_batch(&mut self, frames: &mut VecDeque<Bytes>, chunked: bool) -> Next {
        let client = &self.reg.client;
        // Checked before each batch too: a stream that always has publications waiting
        // never sleeps, and must still end with its token.
        if self.expires.is_some_and(|at| Instant::now() >= at) && client.closed().is_none() {
            client.close(DisconnectReason::TokenExpired);
        }
        // Every event carries the whole id vector (up to a few KiB for a stream of
        // many topics): the batch's id lines, like its events, stay within BATCH_BYTES,
        // or tiny publications would make a frame far larger than the queue budget.
        let items = (BATCH_BYTES / self.ids.max_line_len()).clamp(1, BATCH_ITEMS);
        match client.take(BATCH_BYTES, items) {
            Batch::Items(items) if chunked && items.iter().all(|i| i.bytes.len() <= COPY_MAX) => {
                Next::Chunk(self.assemble_chunk(items))
            }
            Batch::Items(items) => Next::Frames(self.assemble(items, frames)),
            Batch::Closed(reason) => {
                Next::Closed(Bytes::from(format!(": close {}\n\n", reason.label())))
            }
            Batch::Empty => Next::Empty,
        }
    }

    /// A batch of small items as one HTTP/1.1 chunk in one buffer: room for the size line
    /// is kept in front, filled in once the length is known, and what it did not need is
    /// cut off (no copy). In steady fan-out that is one allocation per delivery, where
    /// separate size-line, event and CRLF frames took four.
    fn assemble_chunk(&mut self, items: Vec<Item>) -> Bytes {
        /// Hex digits of a chunk size (at most 256 KiB plus id lines) and CRLF.
        const ROOM: usize = 10;
        let mut batch = crate::writer::Batch::default();
        let guess: usize = items.iter().map(|i| i.bytes.len()).sum::<usize>()
            + items.len() * self.ids.max_line_len();
        let mut buf = BytesMut::with_capacity(ROOM + guess + 2);
        buf.put_bytes(0, ROOM);
        for item in items {
            self.event_id(&item, &mut buf);
            buf.extend_from_slice(&batch.add(item));
        }
        let len = buf.len() - ROOM;
        let start = size_line_into(&mut buf[..ROOM], len);
        buf.advance(start);
        buf.extend_from_slice(b"\r\n");
        batch.wrote(buf.len());
        self.batch_done(batch);
        buf.freeze()
    }

    /// Writes the `id:` line of `item` (advancing the position vector) if it is an event
    /// that carries one: a publication, or a `subscribed` event.
    fn event_id(&mut self, item: &Item, out: &mut BytesMut) {
        if let Some((topic, offset)) = &item.source {
            self.ids.publication(topic, *offset);
        } else if item.bytes.starts_with(SUBSCRIBED_EVENT) {
            self.ids.subscribed_event();
        } else {
            return;
        }
        self.ids.write_line(out);
    }

    /// The heartbeat starts over after a batch, and the batch is counted.
    fn batch_done(&mut self, mut batch: crate::writer::Batch) {
        let state = self.reg.state();
        self.heartbeat_due = Instant::now() + state.cfg.ping_interval;
        batch.report(&state.metrics, Transport::Sse);
    }

    /// Turns a batch of queue items into body frames: each event's per-client `id:` line,
    /// then its shared bytes. Small pieces are copied together into one frame; large
    /// publications stay their own (shared) frame. Returns the bytes appended.
    fn assemble(&mut self, items: Vec<Item>, frames: &mut VecDeque<Bytes>) -> usize {
        let mut batch = crate::writer::Batch::default();
        let mut small = BytesMut::new();
        let mut total = 0;
        for item in items {
            self.event_id(&item, &mut small);
            let bytes = batch.add(item);
            if bytes.len() <= COPY_MAX {
                small.extend_from_slice(&bytes);
            } else {
                if !small.is_empty() {
                    total += small.len();
                    frames.push_back(small.split().freeze());
                }
                total += bytes.len();
                frames.push_back(bytes);
            }
        }
        if !small.is_empty() {
            total += small.len();
            frames.push_back(small.freeze());
        }
        batch.wrote(total);
        self.batch_done(batch);
        total
    }
}

/// Writes `len` as an HTTP/1.1 chunk-size line (lowercase hex, CRLF) right-aligned in
/// `room`, which must hold it (10 bytes hold any size below 4 GiB); returns where it
/// starts.
fn size_line_into(room: &mut [u8], mut len: usize) -> usize {
    let end = room.len() - 2;
    room[end..].copy_from_slice(b"\r\n");
    let mut start = end;
    loop {
        start -= 1;
        room[start] = b"0123456789abcdef"[len & 15];
        len >>= 4;
        if len == 0 {
            return start;
        }
    }
}

/// Most iovecs per `writev`.
const IOV: usize = 64;

/// One stream on its raw socket, after hyper has let go of it: the response head, then
/// each batch as one HTTP chunk, written with `writev` as the socket takes it; a heartbeat
/// comment when nothing went out for `ping_interval`. Waits on readiness, the queue and one
/// timer: between batches it holds no buffer. The peer sends nothing after its request:
/// what it does send is read into a small stack buffer and dropped, and its end of the
/// connection ends the stream. What it holds outside the queue (the batch being written)
/// counts against the client's budget, as on a WebSocket.
async fn serve_raw(tcp: TcpStream, head: Bytes, mut ev: Events) {
    let state = ev.reg.state().clone();
    let client = ev.reg.client.clone();
    let (ping_interval, write_timeout) = (state.cfg.ping_interval, state.cfg.write_timeout);
    let mut out = Out::default();
    out.push(head, Instant::now());
    let mut done = false;
    let mut shutdown_seen = false;
    let cancelled = state.shutdown.cancelled();
    tokio::pin!(cancelled);
    let timer = tokio::time::sleep_until(ev.heartbeat_due.into());
    tokio::pin!(timer);
    let mut armed = ev.heartbeat_due;
    let reason = loop {
        let mut failed = false;
        // Set when every round wrote all it took: more may be queued, and only a push to
        // an empty queue wakes this task.
        let mut unfinished = false;
        for _ in 0..8 {
            unfinished = false;
            if out.is_empty() && !done {
                let mut frames = VecDeque::new();
                match ev.next_batch(&mut frames, true) {
                    Next::Chunk(chunk) => {
                        if out.write_first(&tcp, chunk).is_err() {
                            failed = true;
                            break;
                        }
                        if !out.is_empty() {
                            // The socket is full: wait until it is writable.
                            break;
                        }
                        unfinished = true;
                        continue;
                    }
                    Next::Frames(len) => out.push_chunk(frames, len, Instant::now()),
                    Next::Closed(last) => {
                        let len = last.len();
                        out.push_chunk(VecDeque::from([last]), len, Instant::now());
                        out.push(Bytes::from_static(b"0\r\n\r\n"), Instant::now());
                        done = true;
                    }
                    Next::Empty => break,
                }
            }
            if out.is_empty() {
                break;
            }
            if out.flush(&tcp).is_err() {
                failed = true;
                break;
            }
            if !out.is_empty() {
                break;
            }
            unfinished = true;
        }
        client.set_held(out.bytes);
        if failed || (done && out.is_empty()) {
            break None;
        }
        let now = Instant::now();
        let write_deadline = out.started.map(|t| t + write_timeout);
        if write_deadline.is_some_and(|d| now >= d) {
            break Some(DisconnectReason::WriteTimeout);
        }
        if ev.expires.is_some_and(|at| now >= at) && client.closed().is_none() {
            client.close(DisconnectReason::TokenExpired);
            continue;
        }
        if now >= ev.heartbeat_due && !done {
            ev.heartbeat_due = now + ping_interval;
            if out.is_empty() {
                let beat = Bytes::from_static(b": heartbeat\n\n");
                let len = beat.len();
                out.push_chunk(VecDeque::from([beat]), len, now);
                continue;
            }
        }
        let mut deadline = ev.heartbeat_due;
        let expires = ev.expires.filter(|_| !done && client.closed().is_none());
        for d in [write_deadline, expires].into_iter().flatten() {
            deadline = deadline.min(d);
        }
        // Every batch pushes the heartbeat back, so the deadline moves later on every
        // delivery; re-arming the timer each time touched the runtime's timer wheel per
        // delivery. A later deadline waits for the armed one to fire (the loop above
        // then finds nothing due and arms the new one): at most one early wake-up per
        // `ping_interval`. An earlier one, or a fired timer, re-arms at once.
        if deadline < armed || armed <= now {
            timer.as_mut().reset(deadline.into());
            armed = deadline;
        }
        if unfinished && !done {
            // Let the worker's other tasks run, then go on with the queue.
            tokio::task::yield_now().await;
            continue;
        }
        // One poll over what the task waits on; readiness and the queue keep their
        // wakers in the socket's registration and the client, not in this future.
        let want_write = !out.is_empty();
        let want_queue = !done && out.is_empty();
        let woke = std::future::poll_fn(|cx| {
            if timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Wake::Timer);
            }
            if !shutdown_seen && !done && cancelled.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Wake::Shutdown);
            }
            if want_queue && client.poll_notified(cx).is_ready() {
                return Poll::Ready(Wake::Queue);
            }
            if want_write {
                if let Poll::Ready(r) = tcp.poll_write_ready(cx) {
                    return Poll::Ready(Wake::Ready(r));
                }
            }
            if let Poll::Ready(r) = tcp.poll_read_ready(cx) {
                return Poll::Ready(Wake::Input(r));
            }
            Poll::Pending
        })
        .await;
        match woke {
            Wake::Timer | Wake::Queue => {}
            Wake::Shutdown => {
                // The queue drains first, then the stream ends with `: close shutdown`.
                shutdown_seen = true;
                client.close(DisconnectReason::Shutdown);
            }
            Wake::Ready(r) => {
                if r.is_err() {
                    break None;
                }
            }
            Wake::Input(r) => {
                if r.is_err() || !discard_input(&tcp) {
                    break None;
                }
            }
        }
    };
    client.set_held(0);
    // A reason recorded in the queue (slow consumer, shutdown, token expiry) wins: a slow
    // consumer's stream usually ends at its write deadline, after its queue overflowed.
    let reason = client
        .closed()
        .or(reason)
        .unwrap_or(DisconnectReason::Normal);
    client.close(reason);
    state.metrics.record_disconnect(Transport::Sse, reason);
}

/// What woke a raw stream's task.
enum Wake {
    Timer,
    Shutdown,
    Queue,
    Ready(io::Result<()>),
    Input(io::Result<()>),
}

/// Reads and drops what the peer sent. False once it has closed its end (or failed).
fn discard_input(tcp: &TcpStream) -> bool {
    let mut sink = [0u8; 512];
    for _ in 0..8 {
        match tcp.try_read(&mut sink) {
            Ok(0) => return false,
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(_) => return false,
        }
    }
    true
}

/// What `serve_raw` has to write: whole frames, the first maybe partly written.
#[derive(Default)]
struct Out {
    frames: VecDeque<Bytes>,
    bytes: usize,
    /// When `frames` last went from empty to non-empty: all of it must be written within
    /// `write_timeout` of this.
    started: Option<Instant>,
}

impl Out {
    fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    fn push(&mut self, frame: Bytes, now: Instant) {
        if self.frames.is_empty() {
            self.started = Some(now);
        }
        self.bytes += frame.len();
        self.frames.push_back(frame);
    }

    /// One HTTP/1.1 chunk of `len` bytes made of `frames`.
    fn push_chunk(&mut self, frames: VecDeque<Bytes>, len: usize, now: Instant) {
        self.push(Bytes::from(format!("{len:x}\r\n")), now);
        for f in frames {
            self.push(f, now);
        }
        self.push(Bytes::from_static(b"\r\n"), now);
    }

    /// With nothing in `frames`: writes `chunk` straight away, keeping (under the write
    /// deadline from now) only what the socket does not take. A delivery the socket
    /// takes whole makes no `frames` buffer.
    fn write_first(&mut self, tcp: &TcpStream, chunk: Bytes) -> io::Result<()> {
        debug_assert!(self.is_empty());
        let written = match tcp.try_write(&chunk) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e),
        };
        if written < chunk.len() {
            self.push(chunk.slice(written..), Instant::now());
        }
        Ok(())
    }

    /// Writes as much as the socket takes now.
    fn flush(&mut self, tcp: &TcpStream) -> io::Result<()> {
        while !self.frames.is_empty() {
            let mut slices = [IoSlice::new(&[]); IOV];
            let n = self.frames.len().min(IOV);
            for (slot, b) in slices.iter_mut().zip(self.frames.iter()) {
                *slot = IoSlice::new(b);
            }
            match tcp.try_write_vectored(&slices[..n]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(mut written) => {
                    self.bytes -= written;
                    while written > 0 {
                        let front = self.frames.front_mut().expect("wrote more than queued");
                        if written >= front.len() {
                            written -= front.len();
                            self.frames.pop_front();
                        } else {
                            bytes::Buf::advance(front, written);
                            written = 0;
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        if self.frames.is_empty() {
            self.started = None;
            // Nothing kept between batches.
            self.frames = VecDeque::new();
        }
        Ok(())
    }
}

/// The stream as a hyper body (TLS, HTTP/1.0, HEAD).
struct SseStream {
    events: Events,
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
        let reg = &self.events.reg;
        reg.client.set_held(0);
        let reason = reg.client.closed().unwrap_or(DisconnectReason::Normal);
        reg.state()
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
            self.events.reg.client.set_held(self.frames_bytes);
            return Some(frame);
        }
        if self.done {
            return None;
        }
        let state = self.events.reg.state().clone();
        let client = self.events.reg.client.clone();
        loop {
            match self.events.next_batch(&mut self.frames, false) {
                Next::Frames(len) => {
                    self.frames_bytes = len;
                    let frame = self.frames.pop_front().expect("a batch makes frames");
                    self.frames_bytes -= frame.len();
                    client.set_held(self.frames_bytes);
                    return Some(frame);
                }
                Next::Closed(last) => {
                    self.done = true;
                    return Some(last);
                }
                // Not asked for here (hyper frames the chunks).
                Next::Chunk(chunk) => return Some(chunk),
                Next::Empty => {}
            }
            let expires = self.events.expires;
            tokio::select! {
                biased;
                _ = state.shutdown.cancelled(), if client.closed().is_none() => {
                    client.close(DisconnectReason::Shutdown);
                }
                _ = client.notified() => {}
                _ = sleep_until_some(expires), if client.closed().is_none() => {
                    client.close(DisconnectReason::TokenExpired);
                }
                _ = tokio::time::sleep_until(self.events.heartbeat_due.into()) => {
                    self.events.heartbeat_due = Instant::now() + state.cfg.ping_interval;
                    return Some(Bytes::from_static(b": heartbeat\n\n"));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::size_line_into;

    #[test]
    fn size_lines_are_what_format_writes() {
        for len in (0..5000).chain([0xffff, 0x10000, 0x4_0000, 0xffff_ffff]) {
            let mut room = [0u8; 10];
            let start = size_line_into(&mut room, len);
            assert_eq!(room[start..], *format!("{len:x}\r\n").as_bytes(), "{len}");
        }
    }
}
