//! The subscribers of the load tool: raw `TcpStream`s (or rustls over them, for an
//! `https://` server: see `Conn`), the WebSocket handshake written by hand, frames read with the server's own `ws::frame::Decoder` (role Client), SSE read
//! through a small chunked-transfer decoder. One task per subscriber; each waits for
//! readiness with no buffer, then reads up to 64 KiB at a time, so 10,000 idle subscribers
//! cost the tool almost nothing and busy ones one syscall per 64 KiB.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use base64::Engine;
use bytes::BytesMut;
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll, Waker};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;

use super::envelope::{self, Frame};
use super::offsets::OffsetTracker;
use super::stop::{Seat, Stop};
use crier_protocol::frame::{self, Decoder, Message, Role};

/// Bytes per read in a burst (`READ_SMALL` otherwise).
const READ_BUF: usize = 64 * 1024;
/// Largest message the tool accepts.
const MAX_MESSAGE: usize = 16 * 1024 * 1024;
/// Largest HTTP response head.
const MAX_HEAD: usize = 16 * 1024;
/// Latency histograms are sharded so subscriber tasks on different threads rarely meet.
pub const HIST_SHARDS: usize = 32;

pub fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Topic `i` of `k` named after `base`: `base` itself when `k` is 1, else `base.(i % k)`.
pub fn topic_name(base: &str, k: usize, i: usize) -> String {
    if k <= 1 {
        base.to_string()
    } else {
        format!("{base}.{}", i % k)
    }
}

/// How many of `n` publications sent round robin over `k` topics go to topic `t`.
pub fn per_topic(n: u64, k: usize, t: usize) -> u64 {
    let k = k.max(1) as u64;
    n / k + u64::from((t as u64 % k) < n % k)
}

pub fn new_histogram() -> Histogram<u64> {
    // 1 µs .. 1 hour, 3 significant digits.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// What every subscriber task shares.
pub struct Shared {
    /// The first target; the only one unless `--target` names several.
    pub addr: SocketAddr,
    pub host: String,
    /// Every target (`--target A,B,C`): subscriber `i` connects to `targets[i % n]`.
    pub targets: Vec<SocketAddr>,
    pub topic: String,
    /// Topics the subscribers spread over (see `topic_of`); 1 means `topic` alone.
    pub topics: usize,
    pub sources: Vec<IpAddr>,
    pub stop: Stop,
    /// New (non-duplicate) deliveries over all subscribers, for progress and completion.
    pub delivered: AtomicU64,
    pub latency: Box<[Mutex<Histogram<u64>>]>,
    /// `?token=` of each subscriber (`--token`, `--token-secret`), or none.
    pub tokens: Option<crate::token::Tokens>,
    /// TLS towards an `https://` server: every subscriber connection is `wss://` (or SSE
    /// over HTTPS). None for `http://`.
    pub tls: Option<TlsTarget>,
    /// `--mode follow`: subscriber `i` subscribes `{topic}@p{i}` (its own player).
    pub follow: bool,
}

/// How subscribers reach an `https://` server: the client configuration (the public roots
/// plus `--ca-file`) and the name its certificate must hold (the URL's host).
#[derive(Clone)]
pub struct TlsTarget {
    pub connector: tokio_rustls::TlsConnector,
    pub name: rustls_pki_types::ServerName<'static>,
}

/// One subscriber connection: plain TCP, or TLS over it.
///
/// Both are read the same way (`wait_readable`, then `fill` until it drains), so the
/// subscriber loops hold no read buffer while idle either way. A TLS connection's idle
/// cost on the tool's side is rustls's session state and buffers.
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Conn {
    /// The TCP socket under the connection (socket options, readiness).
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Plain(s) => s,
            Conn::Tls(s) => s.get_ref().0,
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl Shared {
    pub fn new(addr: SocketAddr, topic: String, sources: Vec<IpAddr>) -> Self {
        Self::with_targets(vec![addr], topic, sources)
    }

    /// Subscribers spread round robin over `targets` (at most `HIST_SHARDS`, at least one).
    pub fn with_targets(targets: Vec<SocketAddr>, topic: String, sources: Vec<IpAddr>) -> Self {
        assert!((1..=HIST_SHARDS).contains(&targets.len()));
        let addr = targets[0];
        Shared {
            addr,
            host: addr.to_string(),
            targets,
            topic,
            topics: 1,
            sources,
            stop: Stop::new(),
            delivered: AtomicU64::new(0),
            latency: (0..HIST_SHARDS)
                .map(|_| Mutex::new(new_histogram()))
                .collect(),
            tokens: None,
            tls: None,
            follow: false,
        }
    }

    pub fn merged_latency(&self) -> Histogram<u64> {
        let mut all = new_histogram();
        for h in self.latency.iter() {
            let _ = all.add(&*h.lock());
        }
        all
    }

    /// The topic of subscriber `i`: `topic`, or with several topics `topic.(i % topics)`,
    /// the names publications go to round robin (many-topics fan-out).
    pub fn topic_of(&self, i: usize) -> String {
        if self.follow {
            return format!("{}@p{i}", self.topic);
        }
        topic_name(&self.topic, self.topics, i)
    }

    /// `&token=...` of subscriber `i`, or nothing.
    pub fn token_param(&self, i: usize) -> String {
        self.tokens
            .as_ref()
            .map_or_else(String::new, |t| t.query_param(i))
    }

    /// The target subscriber `i` connects to.
    pub fn target(&self, i: usize) -> SocketAddr {
        self.targets[i % self.targets.len()]
    }

    /// The latency shard of subscriber `i`. With several targets each target owns its own
    /// shards, so per-target latency costs the hot path nothing: it is a merge at the end.
    pub fn shard(&self, i: usize) -> &Mutex<Histogram<u64>> {
        let n = self.targets.len();
        let per = HIST_SHARDS / n;
        &self.latency[(i % n) * per + (i / n) % per]
    }

    /// The latency of the subscribers of target `t` (see `shard`).
    pub fn target_latency(&self, t: usize) -> Histogram<u64> {
        let per = HIST_SHARDS / self.targets.len();
        let mut all = new_histogram();
        for h in &self.latency[t * per..(t + 1) * per] {
            let _ = all.add(&*h.lock());
        }
        all
    }
}

/// How one subscriber ended.
#[derive(Debug, Default)]
pub struct SubResult {
    pub tracker: OffsetTracker,
    pub last_rx: Option<Instant>,
    /// The server closed the connection (close frame, SSE close comment, EOF or error).
    pub closed: bool,
    pub close_code: Option<u16>,
}

/// Opens a TCP connection from the `i`-th source address (127.0.0.2, .3, ...).
pub async fn connect_tcp(shared: &Shared, i: usize, rcvbuf: Option<u32>) -> io::Result<TcpStream> {
    let target = shared.target(i);
    let socket = if target.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(n) = rcvbuf {
        socket.set_recv_buffer_size(n)?;
    }
    if !shared.sources.is_empty() {
        let src = shared.sources[i % shared.sources.len()];
        socket.bind(SocketAddr::new(src, 0))?;
    }
    let stream = socket.connect(target).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Opens subscriber `i`'s connection: TCP from its source address, then the TLS
/// handshake when the server is `https://`.
pub async fn connect(shared: &Shared, i: usize, rcvbuf: Option<u32>) -> anyhow::Result<Conn> {
    let tcp = connect_tcp(shared, i, rcvbuf).await.context("connect")?;
    match &shared.tls {
        None => Ok(Conn::Plain(tcp)),
        Some(t) => {
            let tls = t
                .connector
                .connect(t.name.clone(), tcp)
                .await
                .context("TLS handshake")?;
            Ok(Conn::Tls(Box::new(tls)))
        }
    }
}

/// Reads an HTTP response head (up to the blank line). Returns the head and what followed.
pub(crate) async fn read_head<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> anyhow::Result<(String, Vec<u8>)> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        if let Some(end) = envelope::find(&buf, b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Ok((String::from_utf8_lossy(&buf).into_owned(), rest));
        }
        if buf.len() > MAX_HEAD {
            bail!("response head over {MAX_HEAD} bytes");
        }
        let mut chunk = [0u8; 2048];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed before the response head");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn status_line(head: &str) -> &str {
    head.lines().next().unwrap_or("")
}

/// Connects from the `i`-th source address and upgrades `target` (e.g. `/ws?topic=t`) to
/// a WebSocket. Returns the stream and a client decoder holding anything read past the
/// 101 response.
pub async fn ws_upgrade(
    shared: &Shared,
    i: usize,
    rcvbuf: Option<u32>,
    target: &str,
) -> anyhow::Result<(Conn, Decoder)> {
    let mut stream = connect(shared, i, rcvbuf).await?;
    let key = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 16]>());
    let req = format!(
        "GET {target} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n",
        shared.target(i)
    );
    stream.write_all(req.as_bytes()).await?;
    let (head, rest) = read_head(&mut stream).await?;
    let status = status_line(&head);
    if !status.starts_with("HTTP/1.1 101") {
        let body = String::from_utf8_lossy(&rest);
        bail!("upgrade refused: {status} {}", body.trim());
    }
    let accept = crier_protocol::handshake::accept_key(key.as_bytes());
    if !head.contains(&accept) {
        bail!("wrong Sec-WebSocket-Accept");
    }
    let mut decoder = Decoder::new(Role::Client, MAX_MESSAGE);
    decoder.buffer_mut(rest.len()).extend_from_slice(&rest);
    Ok((stream, decoder))
}

/// Connects, upgrades to WebSocket and waits for the `subscribed` reply. Returns the
/// stream, the decoder (holding anything read past the reply) and the subscribed offset.
pub async fn ws_open(
    shared: &Shared,
    i: usize,
    rcvbuf: Option<u32>,
) -> anyhow::Result<(Conn, Decoder, u64)> {
    let target = format!("/ws?topic={}{}", shared.topic_of(i), shared.token_param(i));
    let (mut stream, mut decoder) = ws_upgrade(shared, i, rcvbuf, &target).await?;
    loop {
        while let Some(msg) = decoder.next_message()? {
            match msg {
                Message::Text(t) => {
                    if let Frame::Subscribed(offset) = envelope::classify(&t) {
                        decoder.shrink_if_empty();
                        return Ok((stream, decoder, offset));
                    }
                }
                Message::Close(code, reason) => bail!(
                    "closed before subscribing: {code:?} {}",
                    String::from_utf8_lossy(&reason)
                ),
                _ => {}
            }
        }
        let n = stream.read_buf(decoder.buffer_mut(4096)).await?;
        if n == 0 {
            bail!("connection closed before the subscribed reply");
        }
    }
}

/// Reads publications until `stop`, the server closing, or an error.
pub async fn ws_run(
    mut stream: Conn,
    mut decoder: Decoder,
    start: u64,
    shared: Arc<Shared>,
    i: usize,
) -> SubResult {
    let mut r = SubResult {
        tracker: OffsetTracker::new(start),
        ..Default::default()
    };
    let shard = shared.shard(i);
    let mask = rand::random::<[u8; 4]>();
    // Anything that arrived with the subscribed reply.
    let mut pending = decoder.buffered() > 0;
    let mut seat = Seat::default();
    let mut room = READ_SMALL;
    'outer: loop {
        if !pending {
            match wait_readable(&mut stream, &shared.stop, &mut seat).await {
                Ok(true) => {}
                Ok(false) => break,
                Err(()) => {
                    r.closed = true;
                    break;
                }
            }
        }
        loop {
            if !pending {
                let before = decoder.buffered();
                match fill(&mut stream, decoder.buffer_mut(room)) {
                    Filled::Data => {}
                    Filled::Drained => break,
                    Filled::Closed => {
                        r.closed = true;
                        break 'outer;
                    }
                }
                if decoder.buffered() - before >= room {
                    room = READ_BUF;
                }
            }
            pending = false;
            let now_us = unix_us();
            let mut fresh = 0u64;
            let mut pong = None;
            {
                let mut hist = shard.lock();
                loop {
                    match decoder.next_message() {
                        Ok(Some(Message::Text(t))) => {
                            if let Frame::Publication(d) = envelope::classify(&t) {
                                if r.tracker.record(d.offset) {
                                    fresh += 1;
                                }
                                if let Some(sent) = d.sent_us {
                                    hist.saturating_record(now_us.saturating_sub(sent).max(1));
                                }
                            }
                        }
                        Ok(Some(Message::Ping(p))) => pong = Some(p),
                        Ok(Some(Message::Close(code, _))) => {
                            r.closed = true;
                            r.close_code = code;
                        }
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err(_) => {
                            r.closed = true;
                            break;
                        }
                    }
                }
            }
            if fresh > 0 {
                shared.delivered.fetch_add(fresh, Ordering::Relaxed);
                r.last_rx = Some(Instant::now());
            }
            if r.closed {
                break 'outer;
            }
            if let Some(p) = pong {
                let f = frame::encode_masked(frame::OP_PONG, &p, mask);
                if stream.write_all(&f).await.is_err() {
                    r.closed = true;
                    break 'outer;
                }
            }
        }
        if decoder.buffered() == 0 {
            room = READ_SMALL;
        }
        decoder.shrink_if_empty();
    }
    r
}

/// What `fill` got from a subscriber socket.
pub(crate) enum Filled {
    /// Bytes were appended to the buffer.
    Data,
    /// Nothing more right now: wait for readability again.
    Drained,
    /// EOF or an error: the server closed the connection.
    Closed,
}

/// Waits until the connection has something to read, holding no buffer meanwhile. False
/// when the run is stopping; an error when the socket failed.
pub(crate) async fn wait_readable(
    stream: &mut Conn,
    stop: &Stop,
    seat: &mut Seat,
) -> Result<bool, ()> {
    if let Conn::Tls(t) = stream {
        // Plaintext rustls already decrypted (a record larger than the last read) is
        // readable now, whatever the socket says.
        match t.get_mut().1.process_new_packets() {
            Ok(state) if state.plaintext_bytes_to_read() > 0 => return Ok(true),
            Ok(_) => {}
            Err(_) => return Err(()),
        }
    }
    let tcp = stream.tcp();
    let readable = tcp.readable();
    tokio::pin!(readable);
    std::future::poll_fn(|cx| {
        if stop.poll_stopped(seat, cx).is_ready() {
            return Poll::Ready(Ok(false));
        }
        readable
            .as_mut()
            .poll(cx)
            .map(|r| r.map(|_| true).map_err(|_| ()))
    })
    .await
}

/// One non-blocking read into `buf`.
pub(crate) fn fill(stream: &mut Conn, buf: &mut BytesMut) -> Filled {
    let read = match stream {
        Conn::Plain(s) => return fill_plain(s, buf),
        // One poll of the TLS read: rustls reads the socket until it would block and
        // decrypts what came. Pending means the socket drained (its readiness is cleared,
        // so `wait_readable` then waits for more).
        Conn::Tls(s) => {
            let mut cx = TaskContext::from_waker(Waker::noop());
            match std::pin::pin!(s.read_buf(buf)).as_mut().poll(&mut cx) {
                Poll::Ready(r) => r,
                Poll::Pending => return Filled::Drained,
            }
        }
    };
    match read {
        Ok(0) => Filled::Closed,
        Ok(_) => Filled::Data,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Filled::Drained,
        Err(_) => Filled::Closed,
    }
}

/// `fill` on plain TCP, in one system call per arrival. A read that leaves room in the
/// buffer drained the socket (TCP hands over everything queued, up to the room given), so
/// it also clears the socket's readiness: reading again only to hear `WouldBlock` would be
/// a second syscall for every delivery, paid on the cores the server under test uses.
/// (tokio clears readiness only if no new event came since it was seen, so data arriving
/// meanwhile is not missed.)
fn fill_plain(s: &TcpStream, buf: &mut BytesMut) -> Filled {
    let mut got = 0;
    let read = s.try_io(tokio::io::Interest::READABLE, || {
        let room = buf.spare_capacity_mut();
        let n = socket2::SockRef::from(s).recv(room)?;
        got = n;
        if n > 0 && n < room.len() {
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(n)
        }
    });
    if got > 0 {
        // SAFETY: `recv` initialized the first `got` bytes of the spare capacity.
        unsafe { buf.set_len(buf.len() + got) };
        return Filled::Data;
    }
    match read {
        Ok(_) => Filled::Closed,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Filled::Drained,
        Err(_) => Filled::Closed,
    }
}

/// Room for one read while messages trickle in: a small allocation, from the allocator's
/// thread cache. A read that fills it (a burst) switches the subscriber to `READ_BUF`.
const READ_SMALL: usize = 4096;

/// Decodes `Transfer-Encoding: chunked`.
#[derive(Debug, Default)]
pub struct Dechunker {
    state: ChunkState,
    size_line: Vec<u8>,
}

#[derive(Debug, Default, PartialEq)]
enum ChunkState {
    #[default]
    Size,
    Data(usize),
    /// The CRLF after a chunk's data: bytes of it still to skip.
    DataEnd(usize),
    Done,
}

impl Dechunker {
    /// Appends the payload bytes in `input` to `out`. Returns true once the last chunk ended.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> anyhow::Result<bool> {
        while !input.is_empty() {
            match self.state {
                ChunkState::Done => return Ok(true),
                ChunkState::Size => {
                    let nl = input.iter().position(|&b| b == b'\n');
                    let take = nl.map_or(input.len(), |p| p + 1);
                    self.size_line.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    if nl.is_some() {
                        let line = std::str::from_utf8(&self.size_line)?.trim();
                        let hex = line.split(';').next().unwrap_or("").trim();
                        let size = usize::from_str_radix(hex, 16)
                            .with_context(|| format!("bad chunk size {line:?}"))?;
                        self.size_line.clear();
                        self.state = if size == 0 {
                            ChunkState::Done
                        } else {
                            ChunkState::Data(size)
                        };
                    } else if self.size_line.len() > 1024 {
                        bail!("chunk size line too long");
                    }
                }
                ChunkState::Data(left) => {
                    let n = left.min(input.len());
                    out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    self.state = if n == left {
                        ChunkState::DataEnd(2)
                    } else {
                        ChunkState::Data(left - n)
                    };
                }
                ChunkState::DataEnd(left) => {
                    let n = left.min(input.len());
                    input = &input[n..];
                    self.state = if n == left {
                        ChunkState::Size
                    } else {
                        ChunkState::DataEnd(left - n)
                    };
                }
            }
        }
        Ok(self.state == ChunkState::Done)
    }
}

/// What one SSE event is.
#[derive(Debug, PartialEq, Eq)]
pub enum SseEvent<'a> {
    Data(&'a [u8]),
    /// `: close <reason>`: the server ended the stream.
    Close,
    Other,
}

/// Splits complete events (ending in a blank line) off the front of `buf`; calls `f` for
/// each. Only the first `data:` line is used (crier's envelopes are one line).
pub fn sse_events(buf: &mut Vec<u8>, mut f: impl FnMut(SseEvent<'_>)) {
    let mut pos = 0;
    while let Some(end) = envelope::find(&buf[pos..], b"\n\n") {
        let event = &buf[pos..pos + end];
        let mut kind = SseEvent::Other;
        for line in event.split(|&b| b == b'\n') {
            if let Some(d) = line.strip_prefix(b"data:") {
                kind = SseEvent::Data(d.strip_prefix(b" ").unwrap_or(d));
                break;
            }
            if line.starts_with(b": close") {
                kind = SseEvent::Close;
                break;
            }
        }
        f(kind);
        pos += end + 2;
    }
    buf.drain(..pos);
}

/// The body of an SSE response as events: de-chunks when needed and splits events off.
#[derive(Debug, Default)]
pub struct SseReader {
    chunked: bool,
    dechunk: Dechunker,
    events: Vec<u8>,
}

impl SseReader {
    pub fn new(chunked: bool) -> Self {
        SseReader {
            chunked,
            ..Default::default()
        }
    }

    /// Feeds body bytes; calls `f` for each complete event. Returns true once the body
    /// ended (last chunk, or bad chunking).
    pub fn feed(&mut self, raw: &[u8], f: impl FnMut(SseEvent<'_>)) -> bool {
        let ended = if self.chunked {
            self.dechunk.feed(raw, &mut self.events).unwrap_or(true)
        } else {
            self.events.extend_from_slice(raw);
            false
        };
        sse_events(&mut self.events, f);
        if self.events.is_empty() && self.events.capacity() > 4096 {
            self.events = Vec::new();
        }
        ended
    }
}

/// Opens an SSE stream. The server subscribes before it answers, so a 200 means the
/// subscriber is in place. Returns the stream, whether the body is chunked, and any body
/// bytes already read.
pub async fn sse_open(shared: &Shared, i: usize) -> anyhow::Result<(Conn, bool, Vec<u8>)> {
    let target = format!("/sse?topic={}{}", shared.topic_of(i), shared.token_param(i));
    sse_request(shared, i, &target, "").await
}

/// `sse_open` for any `target`, with `headers` (each line ending in CRLF) added to the
/// request, e.g. `Last-Event-ID`.
pub async fn sse_request(
    shared: &Shared,
    i: usize,
    target: &str,
    headers: &str,
) -> anyhow::Result<(Conn, bool, Vec<u8>)> {
    let mut stream = connect(shared, i, None).await?;
    let req = format!(
        "GET {target} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n{headers}\r\n",
        shared.target(i)
    );
    stream.write_all(req.as_bytes()).await?;
    let (head, rest) = read_head(&mut stream).await?;
    let status = status_line(&head);
    if !status.starts_with("HTTP/1.1 200") {
        bail!(
            "SSE refused: {status} {}",
            String::from_utf8_lossy(&rest).trim()
        );
    }
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    Ok((stream, chunked, rest))
}

/// SSE has no `subscribed` reply, so the start offset of each topic is learnt from a
/// WebSocket subscribe (nothing is published while subscribers connect, so it is every
/// subscriber's start on that topic). One probe per topic, `concurrency` at a time;
/// index `t` is topic `topic_of(t)`.
pub async fn sse_starts(shared: &Arc<Shared>, concurrency: usize) -> anyhow::Result<Vec<u64>> {
    let mut starts = vec![0u64; shared.topics];
    let mut set = tokio::task::JoinSet::new();
    let mut next = 0;
    while next < shared.topics || !set.is_empty() {
        while next < shared.topics && set.len() < concurrency {
            let (shared, t) = (shared.clone(), next);
            set.spawn(async move { (t, ws_open(&shared, t, None).await.map(|o| o.2)) });
            next += 1;
        }
        if let Some(done) = set.join_next().await {
            let (t, offset) = done.context("offset probe task")?;
            starts[t] = offset.with_context(|| {
                format!(
                    "probing the offset of {} over WebSocket",
                    shared.topic_of(t)
                )
            })?;
        }
    }
    Ok(starts)
}

pub async fn sse_run(
    mut stream: Conn,
    chunked: bool,
    first: Vec<u8>,
    start: u64,
    shared: Arc<Shared>,
    i: usize,
) -> SubResult {
    let mut r = SubResult {
        tracker: OffsetTracker::new(start),
        ..Default::default()
    };
    let shard = shared.shard(i);
    let mut dechunk = Dechunker::default();
    let mut events: Vec<u8> = Vec::new();
    let mut raw = BytesMut::new();
    raw.extend_from_slice(&first);
    let mut pending = !raw.is_empty();
    let mut seat = Seat::default();
    let mut room = READ_SMALL;
    'outer: loop {
        if !pending {
            match wait_readable(&mut stream, &shared.stop, &mut seat).await {
                Ok(true) => {}
                Ok(false) => break,
                Err(()) => {
                    r.closed = true;
                    break;
                }
            }
        }
        loop {
            if !pending {
                raw.reserve(room);
                match fill(&mut stream, &mut raw) {
                    Filled::Data => {}
                    Filled::Drained => break,
                    Filled::Closed => {
                        r.closed = true;
                        break 'outer;
                    }
                }
                if raw.len() >= room {
                    room = READ_BUF;
                }
            }
            pending = false;
            let ended = if chunked {
                dechunk.feed(&raw, &mut events).unwrap_or(true)
            } else {
                events.extend_from_slice(&raw);
                false
            };
            raw.clear();
            let now_us = unix_us();
            let mut fresh = 0u64;
            {
                let mut hist = shard.lock();
                sse_events(&mut events, |ev| match ev {
                    SseEvent::Data(env) => {
                        if let Some(d) = envelope::delivery(env) {
                            if r.tracker.record(d.offset) {
                                fresh += 1;
                            }
                            if let Some(sent) = d.sent_us {
                                hist.saturating_record(now_us.saturating_sub(sent).max(1));
                            }
                        }
                    }
                    SseEvent::Close => r.closed = true,
                    SseEvent::Other => {}
                });
            }
            if fresh > 0 {
                shared.delivered.fetch_add(fresh, Ordering::Relaxed);
                r.last_rx = Some(Instant::now());
            }
            if ended || r.closed {
                r.closed = true;
                break 'outer;
            }
        }
        if raw.is_empty() && raw.capacity() > 0 {
            raw = BytesMut::new();
            room = READ_SMALL;
        }
        if events.is_empty() && events.capacity() > 4096 {
            events = Vec::new();
        }
    }
    r
}

/// After the run: has the server closed this never-read WebSocket? Reads what is queued
/// (which lets the server finish writing) until a close frame, EOF or error (closed), or
/// until `quiet` passes with nothing arriving (still open). Returns (closed, close code).
pub async fn stalled_check(
    mut stream: Conn,
    quiet: Duration,
    deadline: Instant,
) -> (bool, Option<u16>) {
    let mut decoder = Decoder::new(Role::Client, MAX_MESSAGE);
    loop {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .min(quiet);
        if left.is_zero() {
            return (false, None);
        }
        match tokio::time::timeout(left, stream.read_buf(decoder.buffer_mut(READ_BUF))).await {
            Err(_) => return (false, None),
            Ok(Ok(0)) | Ok(Err(_)) => return (true, None),
            Ok(Ok(_)) => loop {
                match decoder.next_message() {
                    Ok(Some(Message::Close(code, _))) => return (true, code),
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(_) => return (true, None),
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publications_split_round_robin_over_topics() {
        assert_eq!(topic_name("t", 1, 7), "t");
        assert_eq!(topic_name("t", 3, 7), "t.1");
        assert_eq!(per_topic(10, 1, 0), 10);
        // 10 over 3 topics: seq 0,3,6,9 / 1,4,7 / 2,5,8.
        assert_eq!(
            (0..3).map(|t| per_topic(10, 3, t)).collect::<Vec<_>>(),
            [4, 3, 3]
        );
        assert_eq!((0..5).map(|t| per_topic(2, 5, t)).sum::<u64>(), 2);
    }

    #[test]
    fn each_target_owns_its_latency_shards() {
        let addrs: Vec<SocketAddr> = (1..=3)
            .map(|p| SocketAddr::from(([127, 0, 0, 1], p)))
            .collect();
        let shared = Shared::with_targets(addrs, "t".into(), Vec::new());
        for i in 0..300 {
            assert_eq!(shared.target(i).port() as usize, i % 3 + 1);
            shared.shard(i).lock().record(1 + (i % 3) as u64).unwrap();
        }
        for t in 0..3 {
            let h = shared.target_latency(t);
            assert_eq!(
                (h.len(), h.min(), h.max()),
                (100, t as u64 + 1, t as u64 + 1)
            );
        }
        assert_eq!(shared.merged_latency().len(), 300);
        let one = Shared::new(
            SocketAddr::from(([127, 0, 0, 1], 1)),
            "t".into(),
            Vec::new(),
        );
        assert!(std::ptr::eq(one.shard(33), &one.latency[1]));
    }

    #[test]
    fn dechunk_in_pieces() {
        let body = b"d\r\nretry: 2000\n\n\r\n5;ext=1\r\nhello\r\n0\r\n\r\n";
        for split in 1..body.len() {
            let mut d = Dechunker::default();
            let mut out = Vec::new();
            let mut done = false;
            for piece in body.chunks(split) {
                done = d.feed(piece, &mut out).unwrap();
            }
            assert!(done);
            assert_eq!(out, b"retry: 2000\n\nhello", "split {split}");
        }
        assert!(Dechunker::default()
            .feed(b"zz\r\n", &mut Vec::new())
            .is_err());
    }

    #[test]
    fn sse_event_split() {
        let mut buf = b"retry: 2000\n\nid: 1\ndata: {\"offset\":1}\n\n: heartbeat\n\n: close slow_consumer\n\nid: 2\ndata: {\"off".to_vec();
        let mut seen = Vec::new();
        sse_events(&mut buf, |e| {
            seen.push(match e {
                SseEvent::Data(d) => String::from_utf8_lossy(d).into_owned(),
                SseEvent::Close => "CLOSE".into(),
                SseEvent::Other => "-".into(),
            })
        });
        assert_eq!(seen, vec!["-", "{\"offset\":1}", "-", "CLOSE"]);
        assert_eq!(buf, b"id: 2\ndata: {\"off");
    }
}
