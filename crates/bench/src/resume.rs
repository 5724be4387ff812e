//! `--mode resume-storm` (or `--resume-storm`): what a reconnect storm costs once every
//! client resumes from its position (issue 7).
//!
//! 0. One warm-up publication, so the topic exists with a history (an empty memory topic
//!    is dropped with its last subscriber and returns under a new epoch).
//! 1. `--subscribers` clients (`--transport ws` or `sse`) subscribe `--topic` and note
//!    the position of the `subscribed` reply (WebSocket) or event (SSE): offset and epoch.
//! 2. Every client is cut at once: the socket is reset (SO_LINGER 0), as a lost network
//!    would leave it, with no close handshake.
//! 3. `--messages` publications are posted (over `--publishers` connections) while
//!    nobody is subscribed.
//! 4. Every client reconnects at once (`--connect-concurrency` handshakes in flight) and
//!    subscribes with `since` = its noted position (SSE: a `Last-Event-ID` header
//!    `EPOCH:OFFSET`, as a browser's EventSource sends it). A client has *caught up* when it has
//!    every offset from its position to the last acknowledged one; with `--server-pid`
//!    the server's VmRSS is sampled every 10 ms from just before the storm until the last
//!    client caught up, and its peak reported.
//!
//! The server must keep at least `--messages` publications of the topic (`history_size`,
//! default 100, and `history_ttl`), or the clients are rightly answered `recovered:false`.
//! The run fails if a client fails to reconnect, is answered `recovered:false`, does not
//! catch up within `--timeout`, or sees a gap, a duplicate or an out-of-order offset.

use crate::stop::{Seat, Stop};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::subscriber::Conn;
use anyhow::{bail, Context};
use bytes::BytesMut;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::envelope::{self, Frame};
use super::offsets::{OffsetTracker, Tally};
use super::report::Percentiles;
use super::subscriber::{
    self, fill, new_histogram, wait_readable, Filled, Shared, SseEvent, SseReader,
};
use super::{BenchArgs, BenchTransport};
use crier_protocol::frame::{self, Decoder, Message};
use crier_protocol::http_client::HttpClient;

/// How often the server's RSS is read during the storm.
const RSS_SAMPLE: Duration = Duration::from_millis(10);
const READ_BUF: usize = 64 * 1024;

#[derive(Debug, Clone, Default, Serialize)]
pub struct ResumeReport {
    pub clients: usize,
    /// Subscribed in step 1.
    pub subscribed: usize,
    /// The position the clients noted (the first client's; all are the same unless
    /// someone else publishes to the topic meanwhile).
    pub since_offset: u64,
    pub epoch: Option<String>,
    /// Publications posted while the clients were away, and how many were acknowledged.
    pub publications: u64,
    pub published: u64,
    pub publish_errors: u64,
    pub first_publish_error: Option<String>,
    /// The last acknowledged offset: what every client must reach.
    pub target_offset: u64,
    /// `subscribers` in the last publish receipt: 0 once the server has seen every cut.
    pub subscribers_at_last_publish: Option<u64>,
    pub reconnected: usize,
    pub reconnect_failed: usize,
    pub first_reconnect_error: Option<String>,
    pub recovered: usize,
    pub not_recovered: usize,
    pub caught_up: usize,
    pub timed_out: bool,
    /// From the start of the storm until the last client caught up, milliseconds.
    pub all_caught_up_ms: f64,
    /// Per client, from the start of the storm until it caught up.
    pub catch_up_ms: Percentiles,
    /// Per client: connect, handshake and the `subscribed` reply.
    pub reconnect_ms: Percentiles,
    pub expected_deliveries: u64,
    pub received_deliveries: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    pub unexpected: u64,
    /// The server's own count of the storm's resumes (`crier_resumes_total` on
    /// `/metrics`, after minus before): recovered and not recovered. None when the
    /// server does not export it.
    pub server_resumes_recovered: Option<u64>,
    pub server_resumes_not_recovered: Option<u64>,
    /// Server VmRSS just before the storm and its peak during it (with --server-pid).
    pub rss_before_kib: Option<u64>,
    pub rss_peak_kib: Option<u64>,
}

impl ResumeReport {
    pub fn failures(&self) -> Vec<String> {
        let mut f = Vec::new();
        for (n, what) in [
            (
                self.clients.saturating_sub(self.subscribed),
                "clients failed to subscribe",
            ),
            (self.publish_errors as usize, "publications failed"),
            (self.reconnect_failed, "clients failed to reconnect"),
            (self.not_recovered, "clients were answered recovered:false"),
            (
                self.reconnected
                    .saturating_sub(self.caught_up + self.not_recovered),
                "resumed clients did not catch up",
            ),
        ] {
            if n > 0 {
                f.push(format!("{n} {what}"));
            }
        }
        for (n, what) in [
            (self.lost, "lost"),
            (self.duplicates, "duplicated"),
            (self.out_of_order, "out of order"),
        ] {
            if n > 0 {
                f.push(format!("{n} deliveries {what}"));
            }
        }
        f
    }

    pub fn write_text(&self, s: &mut String) {
        use std::fmt::Write as _;
        let _ = writeln!(
            s,
            "  subscribe    {} of {} at offset {} epoch {}",
            self.subscribed,
            self.clients,
            self.since_offset,
            self.epoch.as_deref().unwrap_or("-")
        );
        let _ = writeln!(
            s,
            "  away         all cut; {} of {} publications acknowledged (to offset {}), {} failed; subscribers at the last one: {}",
            self.published,
            self.publications,
            self.target_offset,
            self.publish_errors,
            self.subscribers_at_last_publish
                .map_or("-".to_string(), |n| n.to_string())
        );
        if let Some(e) = &self.first_publish_error {
            let _ = writeln!(s, "               first error: {e}");
        }
        let r = &self.reconnect_ms;
        let _ = writeln!(
            s,
            "  reconnect    {} ok, {} failed (per client p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms); recovered {}, not recovered {}",
            self.reconnected, self.reconnect_failed, r.p50, r.p99, r.max, self.recovered, self.not_recovered
        );
        if let Some(e) = &self.first_reconnect_error {
            let _ = writeln!(s, "               first error: {e}");
        }
        let c = &self.catch_up_ms;
        let _ = writeln!(
            s,
            "  caught up    {} clients, all in {:.0} ms{} (per client p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms)",
            self.caught_up,
            self.all_caught_up_ms,
            if self.timed_out { " (timed out)" } else { "" },
            c.p50,
            c.p90,
            c.p99,
            c.max
        );
        let _ = writeln!(
            s,
            "  integrity    {} received of {} expected; lost {}, duplicates {}, out of order {}, unexpected {}",
            self.received_deliveries,
            self.expected_deliveries,
            self.lost,
            self.duplicates,
            self.out_of_order,
            self.unexpected
        );
        if let (Some(r), Some(n)) = (
            self.server_resumes_recovered,
            self.server_resumes_not_recovered,
        ) {
            let _ = writeln!(
                s,
                "  server       counted {r} resumes recovered, {n} not recovered (crier_resumes_total)"
            );
        }
        if self.rss_before_kib.is_some() {
            let kib = |v: Option<u64>| v.map_or("-".to_string(), |v| format!("{v} KiB"));
            let _ = writeln!(
                s,
                "  memory       server RSS {} before the storm, peak {} during it",
                kib(self.rss_before_kib),
                kib(self.rss_peak_kib)
            );
        }
    }
}

/// A `subscribed` reply, parsed in full: once per connection, so serde's cost is nothing.
#[derive(Debug, Deserialize)]
struct Subscribed {
    offset: u64,
    epoch: Option<String>,
    recovered: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct ErrorReply {
    code: Option<String>,
    message: Option<String>,
}

/// Sends `{"op":"subscribe","topic":..,"since":..}` and reads up to its reply.
async fn subscribe(
    stream: &mut Conn,
    decoder: &mut Decoder,
    topic: &str,
    since: Option<(u64, &str)>,
) -> anyhow::Result<Subscribed> {
    let cmd = match since {
        Some((offset, epoch)) => serde_json::json!({
            "op": "subscribe", "topic": topic, "id": 1,
            "since": {"offset": offset, "epoch": epoch},
        }),
        None => serde_json::json!({"op": "subscribe", "topic": topic, "id": 1}),
    };
    let text = serde_json::to_vec(&cmd)?;
    stream
        .write_all(&frame::encode_masked(frame::OP_TEXT, &text, rand::random()))
        .await?;
    loop {
        while let Some(msg) = decoder.next_message()? {
            match msg {
                Message::Text(t) => {
                    let v: serde_json::Value = serde_json::from_slice(&t)
                        .with_context(|| format!("reply {:?}", String::from_utf8_lossy(&t)))?;
                    match v["op"].as_str() {
                        Some("subscribed") => return Ok(serde_json::from_value(v)?),
                        Some("error") => {
                            let e: ErrorReply = serde_json::from_value(v)?;
                            bail!(
                                "subscribe refused: {} {}",
                                e.code.unwrap_or_default(),
                                e.message.unwrap_or_default()
                            );
                        }
                        _ => {}
                    }
                }
                Message::Close(code, reason) => bail!(
                    "closed before subscribing: {code:?} {}",
                    String::from_utf8_lossy(&reason)
                ),
                _ => {}
            }
        }
        let n = tokio::io::AsyncReadExt::read_buf(stream, decoder.buffer_mut(4096)).await?;
        if n == 0 {
            bail!("connection closed before the subscribed reply");
        }
    }
}

/// `Last-Event-ID` of a one-topic SSE stream at `offset` in `epoch` (docs/protocol.md,
/// "Resuming a stream": one `EPOCH:OFFSET` entry per topic).
pub fn last_event_id(epoch: &str, offset: u64) -> String {
    format!("{epoch}:{offset}")
}

/// Reads an SSE stream until its `subscribed` event, feeding publications that follow
/// it in the same read to `on_pub`. Gives up when `stop` is cancelled.
async fn sse_until_subscribed(
    stream: &mut Conn,
    reader: &mut SseReader,
    first: Vec<u8>,
    stop: &Stop,
    mut on_pub: impl FnMut(u64),
) -> anyhow::Result<Subscribed> {
    let mut raw = first;
    let mut sub: Option<Subscribed> = None;
    loop {
        let mut bad = None;
        let mut closed = false;
        let ended = reader.feed(&raw, |ev| match ev {
            SseEvent::Data(d) if d.starts_with(b"{\"op\":") => {
                if sub.is_none() {
                    match serde_json::from_slice::<Subscribed>(d) {
                        Ok(s) => sub = Some(s),
                        Err(e) => bad = Some(e),
                    }
                }
            }
            SseEvent::Data(d) => {
                if let (Some(_), Some(del)) = (&sub, envelope::delivery(d)) {
                    on_pub(del.offset);
                }
            }
            SseEvent::Close => closed = true,
            SseEvent::Other => {}
        });
        if let Some(e) = bad {
            bail!("unreadable subscribed event: {e}");
        }
        if let Some(s) = sub {
            return Ok(s);
        }
        if ended || closed {
            bail!("the stream ended before its subscribed event");
        }
        raw.clear();
        let n = tokio::select! {
            _ = stop.cancelled() => bail!("stopped before the subscribed event"),
            n = tokio::io::AsyncReadExt::read_buf(stream, &mut raw) => n?,
        };
        if n == 0 {
            bail!("connection closed before the subscribed event");
        }
    }
}

/// One client's first connection: its socket and noted position.
async fn first_subscribe(
    shared: &Shared,
    i: usize,
    transport: BenchTransport,
) -> anyhow::Result<(Conn, u64, Option<String>)> {
    match transport {
        BenchTransport::Ws => {
            let (mut stream, mut decoder) = subscriber::ws_upgrade(shared, i, None, "/ws").await?;
            let sub = subscribe(&mut stream, &mut decoder, &shared.topic, None).await?;
            Ok((stream, sub.offset, sub.epoch))
        }
        BenchTransport::Sse => {
            let target = format!("/sse?topic={}", shared.topic);
            let (mut stream, chunked, first) =
                subscriber::sse_request(shared, i, &target, "").await?;
            let mut reader = SseReader::new(chunked);
            let sub =
                sse_until_subscribed(&mut stream, &mut reader, first, &shared.stop, |_| {}).await?;
            Ok((stream, sub.offset, sub.epoch))
        }
    }
}

/// Resets the connection, as a dropped network leaves it: no close frame, no FIN.
fn cut(stream: Conn) {
    let _ = socket2::SockRef::from(stream.tcp()).set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// How one resumed client ended.
#[derive(Debug, Default)]
struct Resumed {
    tracker: OffsetTracker,
    /// Expected offsets: `since+1 ..= target`.
    expected: u64,
    connected: bool,
    error: Option<String>,
    recovered: Option<bool>,
    caught_up_at: Option<Duration>,
    reconnect: Option<Duration>,
}

/// A resumed client's bookkeeping while it reads.
struct Catching<'a> {
    r: &'a mut Resumed,
    target: u64,
    storm_start: Instant,
    /// Told once per client: caught up, or finished without (failed, not recovered,
    /// closed).
    tx: &'a mpsc::UnboundedSender<()>,
    done: bool,
    fresh: u64,
}

impl Catching<'_> {
    fn record(&mut self, offset: u64) {
        if self.r.tracker.record(offset) {
            self.fresh += 1;
        }
    }

    /// After a read's publications: counts them and notes the catch-up once.
    fn settle(&mut self, shared: &Shared) {
        shared.delivered.fetch_add(self.fresh, Ordering::Relaxed);
        self.fresh = 0;
        if !self.done && self.r.tracker.has_all_through(self.target) {
            self.done = true;
            self.r.caught_up_at = Some(self.storm_start.elapsed());
            let _ = self.tx.send(());
        }
    }

    fn finish(&mut self) {
        if !self.done {
            self.done = true;
            let _ = self.tx.send(());
        }
    }
}

/// An open resumed connection, past its `subscribed` reply.
enum Open {
    Ws(Conn, Decoder),
    Sse(Conn, SseReader),
}

#[allow(clippy::too_many_arguments)]
async fn resume_one(
    shared: Arc<Shared>,
    sem: Arc<Semaphore>,
    transport: BenchTransport,
    i: usize,
    since: u64,
    epoch: String,
    target: u64,
    storm_start: Instant,
    tx: mpsc::UnboundedSender<()>,
) -> Resumed {
    let mut r = Resumed {
        tracker: OffsetTracker::new(since),
        expected: target.saturating_sub(since),
        ..Default::default()
    };
    let permit = sem.acquire_owned().await.expect("semaphore open");
    let t0 = Instant::now();
    let mut early = Vec::new();
    let opened = async {
        match transport {
            BenchTransport::Ws => {
                let (mut stream, mut decoder) =
                    subscriber::ws_upgrade(&shared, i, None, "/ws").await?;
                let sub = subscribe(
                    &mut stream,
                    &mut decoder,
                    &shared.topic,
                    Some((since, &epoch)),
                )
                .await?;
                anyhow::Ok((Open::Ws(stream, decoder), sub))
            }
            BenchTransport::Sse => {
                let target = format!("/sse?topic={}", shared.topic);
                let header = format!("Last-Event-ID: {}\r\n", last_event_id(&epoch, since));
                let (mut stream, chunked, first) =
                    subscriber::sse_request(&shared, i, &target, &header).await?;
                let mut reader = SseReader::new(chunked);
                let sub =
                    sse_until_subscribed(&mut stream, &mut reader, first, &shared.stop, |o| {
                        early.push(o)
                    })
                    .await?;
                anyhow::Ok((Open::Sse(stream, reader), sub))
            }
        }
    }
    .await;
    drop(permit);
    let (open, sub) = match opened {
        Ok(v) => v,
        Err(e) => {
            r.error = Some(format!("{e:#}"));
            let _ = tx.send(());
            return r;
        }
    };
    r.connected = true;
    r.reconnect = Some(t0.elapsed());
    r.recovered = sub.recovered;
    let mut c = Catching {
        r: &mut r,
        target,
        storm_start,
        tx: &tx,
        done: false,
        fresh: 0,
    };
    if sub.recovered != Some(true) {
        // Nothing will be replayed: the client is done (and counted as a failure).
        c.finish();
        return r;
    }
    for o in early {
        c.record(o);
    }
    c.settle(&shared);
    match open {
        Open::Ws(stream, decoder) => ws_catch_up(stream, decoder, &shared, &mut c).await,
        Open::Sse(stream, reader) => sse_catch_up(stream, reader, &shared, &mut c).await,
    }
    c.finish();
    r
}

/// Reads a resumed WebSocket until the run stops or the server closes it.
async fn ws_catch_up(
    mut stream: Conn,
    mut decoder: Decoder,
    shared: &Shared,
    c: &mut Catching<'_>,
) {
    let mask = rand::random::<[u8; 4]>();
    let mut pending = decoder.buffered() > 0;
    let mut seat = Seat::default();
    'outer: loop {
        if !pending {
            match wait_readable(&mut stream, &shared.stop, &mut seat).await {
                Ok(true) => {}
                Ok(false) | Err(()) => break,
            }
        }
        loop {
            if !pending {
                match fill(&mut stream, decoder.buffer_mut(READ_BUF)) {
                    Filled::Data => {}
                    Filled::Drained => break,
                    Filled::Closed => break 'outer,
                }
            }
            pending = false;
            let mut pong = None;
            let mut closed = false;
            loop {
                match decoder.next_message() {
                    Ok(Some(Message::Text(t))) => {
                        if let Frame::Publication(d) = envelope::classify(&t) {
                            c.record(d.offset);
                        }
                    }
                    Ok(Some(Message::Ping(p))) => pong = Some(p),
                    Ok(Some(Message::Close(..))) | Err(_) => {
                        closed = true;
                        break;
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                }
            }
            c.settle(shared);
            if closed {
                break 'outer;
            }
            if let Some(p) = pong {
                let f = frame::encode_masked(frame::OP_PONG, &p, mask);
                if stream.write_all(&f).await.is_err() {
                    break 'outer;
                }
            }
        }
        decoder.shrink_if_empty();
    }
}

/// Reads a resumed SSE stream until the run stops or the server ends it.
async fn sse_catch_up(
    mut stream: Conn,
    mut reader: SseReader,
    shared: &Shared,
    c: &mut Catching<'_>,
) {
    let mut raw = BytesMut::new();
    let mut seat = Seat::default();
    'outer: loop {
        match wait_readable(&mut stream, &shared.stop, &mut seat).await {
            Ok(true) => {}
            Ok(false) | Err(()) => break,
        }
        loop {
            raw.reserve(READ_BUF);
            match fill(&mut stream, &mut raw) {
                Filled::Data => {}
                Filled::Drained => break,
                Filled::Closed => break 'outer,
            }
            let mut closed = false;
            let ended = reader.feed(&raw, |ev| match ev {
                SseEvent::Data(d) => {
                    if let Some(del) = envelope::delivery(d) {
                        c.record(del.offset);
                    }
                }
                SseEvent::Close => closed = true,
                SseEvent::Other => {}
            });
            raw.clear();
            c.settle(shared);
            if ended || closed {
                break 'outer;
            }
        }
        if raw.capacity() > READ_BUF {
            raw = BytesMut::new();
        }
    }
}

/// The value of the sample `series` (name and labels, as exported) in an OpenMetrics /
/// Prometheus text exposition.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// `crier_resumes_total` by result: (recovered, not recovered).
async fn server_resumes(client: &HttpClient, base: &str) -> Option<(u64, u64)> {
    let (status, body) = client.get(&format!("{base}/metrics")).await.ok()?;
    if !status.is_success() {
        return None;
    }
    let text = String::from_utf8_lossy(&body);
    let get = |result: &str| {
        metric_value(
            &text,
            &format!("crier_resumes_total{{result=\"{result}\"}}"),
        )
        .map(|v| v as u64)
    };
    // A labelled family is exported only once something was counted; a server with
    // history (its gauges are always there) and no sample has counted 0.
    if !text.contains("crier_history_publications") {
        return None;
    }
    Some((
        get("recovered").unwrap_or(0),
        get("not_recovered").unwrap_or(0),
    ))
}

/// A publish receipt (`POST /api/publish/{topic}`): the fields the storm checks.
#[derive(Debug, Deserialize)]
pub(crate) struct Receipt {
    pub offset: u64,
    pub epoch: Option<String>,
    pub subscribers: Option<u64>,
}

/// Posts `n` publications to `url` over `publishers` connections; returns (acknowledged,
/// failed, first error, highest acknowledged offset, subscribers in that receipt).
async fn publish_all(
    client: &HttpClient,
    url: &str,
    n: u64,
    size: usize,
    publishers: usize,
) -> (u64, u64, Option<String>, u64, Option<u64>) {
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut set = JoinSet::new();
    for _ in 0..publishers {
        let (client, url, next) = (client.clone(), url.to_string(), next.clone());
        set.spawn(async move {
            let (mut ok, mut failed, mut first) = (0u64, 0u64, None::<String>);
            let mut top: (u64, Option<u64>) = (0, None);
            loop {
                let seq = next.fetch_add(1, Ordering::Relaxed);
                if seq >= n {
                    break;
                }
                let body = envelope::payload(seq, subscriber::unix_us(), size);
                let res =
                    tokio::time::timeout(Duration::from_secs(30), client.post(&url, body)).await;
                let err = match res {
                    Ok(Ok((s, b))) if s.is_success() => {
                        match serde_json::from_slice::<Receipt>(&b) {
                            Ok(rc) => {
                                if rc.offset > top.0 {
                                    top = (rc.offset, rc.subscribers);
                                }
                                None
                            }
                            Err(e) => Some(format!("unreadable receipt: {e}")),
                        }
                    }
                    Ok(Ok((s, b))) => Some(format!("{s}: {}", String::from_utf8_lossy(&b))),
                    Ok(Err(e)) => Some(format!("{e:#}")),
                    Err(_) => Some("publish timed out after 30 s".into()),
                };
                match err {
                    None => ok += 1,
                    Some(e) => {
                        failed += 1;
                        first.get_or_insert(e);
                    }
                }
            }
            (ok, failed, first, top)
        });
    }
    let (mut ok, mut failed, mut first, mut top) = (0, 0, None, (0u64, None));
    while let Some(r) = set.join_next().await {
        let Ok((o, f, e, t)) = r else {
            failed += 1;
            continue;
        };
        ok += o;
        failed += f;
        if first.is_none() {
            first = e;
        }
        if t.0 > top.0 {
            top = t;
        }
    }
    (ok, failed, first, top.0, top.1)
}

/// The whole storm; see the module docs.
pub async fn run(
    args: &BenchArgs,
    shared: Arc<Shared>,
    hidden: bool,
) -> anyhow::Result<ResumeReport> {
    let n = args.subscribers;
    let mut rep = ResumeReport {
        clients: n,
        publications: args.messages,
        ..Default::default()
    };

    // 0. One publication first, so the topic exists with a history: a memory topic with
    //    neither history nor subscribers is dropped when the last subscriber leaves, and
    //    comes back under a new epoch (a position in it cannot be resumed).
    let client = crate::http_client(args)?;
    let url = format!(
        "{}/api/publish/{}",
        args.url.trim_end_matches('/'),
        shared.topic
    );
    let (_, failed, first, _, _) = publish_all(&client, &url, 1, args.payload, 1).await;
    if failed > 0 {
        bail!(
            "the warm-up publication failed: {}",
            first.unwrap_or_default()
        );
    }

    // 1. Everyone subscribes and notes its position.
    let sem = Arc::new(Semaphore::new(args.connect_concurrency));
    let mut set = JoinSet::new();
    for i in 0..n {
        let (shared, sem, transport) = (shared.clone(), sem.clone(), args.transport);
        set.spawn(async move {
            let _permit = sem.acquire_owned().await.expect("semaphore open");
            (i, first_subscribe(&shared, i, transport).await)
        });
    }
    let pb = super::progress(n as u64, "subscribe", hidden);
    let deadline = tokio::time::Instant::now() + args.timeout;
    let mut clients: Vec<(usize, Conn, u64, String)> = Vec::with_capacity(n);
    let mut first_error = None;
    loop {
        match tokio::time::timeout_at(deadline, set.join_next()).await {
            Ok(Some(Ok((i, Ok((stream, offset, epoch)))))) => {
                let Some(epoch) = epoch else {
                    bail!("the server's subscribed reply has no epoch: it does not support resume");
                };
                clients.push((i, stream, offset, epoch));
            }
            Ok(Some(Ok((_, Err(e))))) => {
                first_error.get_or_insert(format!("{e:#}"));
            }
            Ok(Some(Err(e))) => {
                first_error.get_or_insert(e.to_string());
            }
            Ok(None) => break,
            Err(_) => {
                first_error
                    .get_or_insert(format!("subscribing timed out after {:?}", args.timeout));
                set.abort_all();
                break;
            }
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    rep.subscribed = clients.len();
    if clients.is_empty() {
        bail!(
            "no client could subscribe: {}",
            first_error.unwrap_or_default()
        );
    }
    rep.first_reconnect_error = first_error.map(|e| format!("first subscribe: {e}"));
    rep.since_offset = clients[0].2;
    rep.epoch = Some(clients[0].3.clone());

    // 2. Everyone is cut at once.
    let positions: Vec<(usize, u64, String)> = clients
        .into_iter()
        .map(|(i, stream, offset, epoch)| {
            cut(stream);
            (i, offset, epoch)
        })
        .collect();

    // 3. Publications while nobody is there.
    let (ok, failed, first, target, subs) =
        publish_all(&client, &url, args.messages, args.payload, args.publishers).await;
    rep.published = ok;
    rep.publish_errors = failed;
    rep.first_publish_error = first;
    rep.target_offset = target.max(rep.since_offset);
    rep.subscribers_at_last_publish = subs;

    // 4. The storm.
    let base = args.url.trim_end_matches('/');
    let resumes_before = server_resumes(&client, base).await;
    let stop = CancellationToken::new();
    let rss = args.server_pid.map(|pid| {
        let stop = stop.clone();
        let before = super::rss_kib(pid);
        let task = tokio::spawn(async move {
            let mut peak = before;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(RSS_SAMPLE) => {}
                }
                if let Some(v) = super::rss_kib(pid) {
                    peak = Some(peak.map_or(v, |p: u64| p.max(v)));
                }
            }
            super::rss_kib(pid).map_or(peak, |v| Some(peak.map_or(v, |p| p.max(v))))
        });
        (before, task)
    });
    let (tx, mut rx) = mpsc::unbounded_channel();
    let storm_start = Instant::now();
    let mut tasks = JoinSet::new();
    for (i, since, epoch) in positions {
        tasks.spawn(resume_one(
            shared.clone(),
            sem.clone(),
            args.transport,
            i,
            since,
            epoch,
            rep.target_offset,
            storm_start,
            tx.clone(),
        ));
    }
    drop(tx);
    let total = rep.subscribed;
    let pb = super::progress(total as u64, "catch up", hidden);
    let deadline = tokio::time::Instant::now() + args.timeout;
    let mut finished = 0;
    while finished < total {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(())) => {
                finished += 1;
                pb.inc(1);
            }
            Ok(None) => break,
            Err(_) => {
                rep.timed_out = true;
                break;
            }
        }
    }
    pb.finish_and_clear();
    stop.cancel();
    shared.stop.cancel();
    if let Some((before, task)) = rss {
        rep.rss_before_kib = before;
        rep.rss_peak_kib = task.await.ok().flatten();
    }

    if let (Some(b), Some(a)) = (resumes_before, server_resumes(&client, base).await) {
        rep.server_resumes_recovered = Some(a.0.saturating_sub(b.0));
        rep.server_resumes_not_recovered = Some(a.1.saturating_sub(b.1));
    }
    let mut catch_up = new_histogram();
    let mut reconnect = new_histogram();
    let mut tally = Tally::default();
    while let Some(r) = tasks.join_next().await {
        let r = r.context("resumed client panicked")?;
        if !r.connected {
            rep.reconnect_failed += 1;
            if rep.first_reconnect_error.is_none() {
                rep.first_reconnect_error = r.error;
            }
            continue;
        }
        rep.reconnected += 1;
        if let Some(d) = r.reconnect {
            reconnect.saturating_record(d.as_micros().max(1) as u64);
        }
        if r.recovered != Some(true) {
            rep.not_recovered += 1;
            continue;
        }
        rep.recovered += 1;
        if let Some(at) = r.caught_up_at {
            rep.caught_up += 1;
            catch_up.saturating_record(at.as_micros().max(1) as u64);
            rep.all_caught_up_ms = rep.all_caught_up_ms.max(at.as_secs_f64() * 1000.0);
        }
        tally += r.tracker.tally(r.expected);
    }
    rep.catch_up_ms = Percentiles::from_us(&catch_up);
    rep.reconnect_ms = Percentiles::from_us(&reconnect);
    rep.expected_deliveries = tally.expected;
    rep.received_deliveries = tally.received;
    rep.lost = tally.lost;
    rep.duplicates = tally.duplicates;
    rep.out_of_order = tally.out_of_order;
    rep.unexpected = tally.unexpected;
    Ok(rep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clean_storm_has_no_failures_and_each_kind_of_trouble_is_named() {
        let clean = ResumeReport {
            clients: 10,
            subscribed: 10,
            reconnected: 10,
            recovered: 10,
            caught_up: 10,
            ..Default::default()
        };
        assert!(clean.failures().is_empty(), "{:?}", clean.failures());
        let mut text = String::new();
        clean.write_text(&mut text);
        assert!(text.contains("caught up    10 clients"), "{text}");

        let bad = ResumeReport {
            reconnect_failed: 1,
            reconnected: 9,
            recovered: 7,
            not_recovered: 1,
            caught_up: 6,
            lost: 3,
            ..clean
        };
        let f = bad.failures();
        assert!(
            f.contains(&"1 clients failed to reconnect".to_string()),
            "{f:?}"
        );
        assert!(f.contains(&"1 clients were answered recovered:false".to_string()));
        assert!(f.contains(&"2 resumed clients did not catch up".to_string()));
        assert!(f.contains(&"3 deliveries lost".to_string()));
    }

    #[test]
    fn metric_samples_are_found_by_series() {
        let text = "# TYPE crier_resumes counter\n\
                    crier_resumes_total{result=\"recovered\"} 12\n\
                    crier_resumes_total{result=\"not_recovered\"} 3 1700000000\n\
                    crier_resumes_total_x 9\n# EOF\n";
        let get = |s| metric_value(text, s);
        assert_eq!(get("crier_resumes_total{result=\"recovered\"}"), Some(12.0));
        assert_eq!(
            get("crier_resumes_total{result=\"not_recovered\"}"),
            Some(3.0)
        );
        assert_eq!(get("crier_resumes_total"), None);
        assert_eq!(get("crier_missing"), None);
    }

    #[test]
    fn replies_parse() {
        let s: Subscribed = serde_json::from_str(
            r#"{"op":"subscribed","topic":"t","offset":57,"epoch":"9f1c2a7b","recovered":true,"id":1}"#,
        )
        .unwrap();
        assert_eq!(
            (s.offset, s.epoch.as_deref(), s.recovered),
            (57, Some("9f1c2a7b"), Some(true))
        );
        let r: Receipt = serde_json::from_str(
            r#"{"topic":"t","offset":58,"epoch":"9f1c2a7b","subscribers":0,"duplicate":false}"#,
        )
        .unwrap();
        assert_eq!((r.offset, r.subscribers), (58, Some(0)));
    }
}
