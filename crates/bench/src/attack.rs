//! `crier bench --attack KIND --attackers N`: hostile clients next to the healthy
//! steady-rate load, so one invocation says what an attack costs the people it is not aimed
//! at (healthy loss and p99, compared with a `--baseline` run without it) and what it costs
//! the server (RSS growth per attacking socket, read from `--server-pid`).
//!
//! Attackers come from their own loopback addresses (127.0.0.9 downwards), never from the
//! healthy subscribers' 127.0.0.2.., so per-IP limits can tell them apart, exactly as they
//! would tell an attacker from a NAT full of real users. The server refusing or closing an
//! attacker is the expected good outcome, not an error of the tool: each attacker's ending
//! (close code, HTTP status, EOF, or still open at the end) is reported, and only the
//! healthy side decides whether the run passed.
//!
//! Everything is bounded: attackers stop when the healthy run ends (or when the server's RSS
//! passes `--attack-max-rss-mib`, so an unfixed server cannot take the machine with it),
//! each final read is capped in time and bytes, and `conn-flood` opens a bounded total.

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use base64::Engine;
use bytes::BytesMut;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

mod trickle;

use super::report::Percentiles;
use super::subscriber::read_head;
use crier_protocol::frame::{self, Decoder, Message, Role};

/// What the attacking sockets do. Each kind is one finding of issue #6 made repeatable.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttackKind {
    /// Upgraded /ws socket, 4 KiB SO_RCVBUF, sends empty masked pings (89 80 00 00 00 00
    /// repeated) in 64 KiB writes as fast as it can and never reads: pongs pile up.
    PingFlood,
    /// Upgraded /ws socket, 4 KiB SO_RCVBUF, sends {"op":"ping"} and {"op":"subscribe"}
    /// commands in 64 KiB writes as fast as it can and never reads: replies pile up.
    CommandFlood,
    /// Upgraded /ws socket subscribing fresh topic names (256 unanswered at most) up to its
    /// per-connection limit and then asking for more: fills the topic table.
    TopicFlood,
    /// Plain TCP sending an HTTP request head one byte per second, never finishing it.
    Slowloris,
    /// POST /api/publish/x, Content-Type application/json, Content-Length 65536, then the
    /// body one byte (a JSON space) per second.
    SlowBody,
    /// Opens /ws connections (upgrade request, read the answer, reset) one after another as
    /// fast as it can, at most 20,000 per attacker.
    ConnFlood,
    /// Upgraded /ws socket declaring a 2^62-byte binary frame (64-bit length), then sending
    /// its payload 64 bytes per second.
    BigFrame,
    /// Upgraded /ws socket sending a text frame without FIN (`{"op":`), then empty masked
    /// continuation frames without FIN (00 80 + mask, 6 bytes each) in 64 KiB writes as
    /// fast as it can, never finishing the message (issue 15, finding 3).
    EmptyContinuation,
    /// POST /api/publish/x, Content-Length 44,000 (under the default 64 KiB limit), then
    /// the body one byte per TCP segment (TCP_NODELAY), a byte every millisecond; after the
    /// server's answer (408 at `body_read_timeout`) again on a new connection (issue 15).
    TricklePublish,
    /// The same, `Transfer-Encoding: chunked`: one 1-byte chunk per segment.
    TricklePublishChunked,
    /// As trickle-publish, on POST /api/boards/trickle/scores.
    TrickleScores,
    /// As trickle-publish-chunked, on POST /api/boards/trickle/scores.
    TrickleScoresChunked,
}

impl AttackKind {
    pub fn name(self) -> &'static str {
        match self {
            AttackKind::PingFlood => "ping-flood",
            AttackKind::CommandFlood => "command-flood",
            AttackKind::TopicFlood => "topic-flood",
            AttackKind::Slowloris => "slowloris",
            AttackKind::SlowBody => "slow-body",
            AttackKind::ConnFlood => "conn-flood",
            AttackKind::BigFrame => "big-frame",
            AttackKind::EmptyContinuation => "empty-continuation",
            AttackKind::TricklePublish => "trickle-publish",
            AttackKind::TricklePublishChunked => "trickle-publish-chunked",
            AttackKind::TrickleScores => "trickle-scores",
            AttackKind::TrickleScoresChunked => "trickle-scores-chunked",
        }
    }
}

/// The receive buffer of the never-reading flooders: small, so the server's replies back
/// up into the server at once instead of into the tool's kernel buffers.
const FLOOD_RCVBUF: u32 = 4096;
/// One write of a flooder.
const FLOOD_WRITE: usize = 64 * 1024;
/// The pace of the slow attacks.
const SLOW_TICK: Duration = Duration::from_secs(1);
/// Payload bytes `big-frame` sends per tick.
const BIG_FRAME_CHUNK: usize = 64;
/// Connections one `conn-flood` attacker opens at most.
pub const CONN_FLOOD_MAX: u64 = 20_000;
/// Unanswered subscribe commands of one `topic-flood` attacker.
const TOPIC_FLOOD_WINDOW: u64 = 256;
/// Connect + upgrade of one attacker.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// At the end, how long to listen for the server's last words (close frame, status, EOF),
/// with nothing arriving / at most, and how many bytes to read at most.
const DRAIN_QUIET: Duration = Duration::from_millis(300);
const DRAIN_MAX: Duration = Duration::from_secs(2);
const DRAIN_BYTES: u64 = 16 * 1024 * 1024;
/// How often the server's RSS is sampled during the attack.
const RSS_SAMPLE: Duration = Duration::from_millis(100);
/// After the attackers are gone: time the server gets to give memory back before the
/// "after" reading.
const SETTLE: Duration = Duration::from_secs(1);

/// Attacker source addresses: 127.0.0.9, .8, ... (`k` of them, at most 4), so they never
/// share an address with the healthy subscribers (127.0.0.2 ..= 127.0.0.(1 + healthy)).
pub fn attacker_sources(k: usize, healthy: usize) -> anyhow::Result<Vec<IpAddr>> {
    anyhow::ensure!(
        (1..=4).contains(&k),
        "--attack-source-ips must be 1-4 (127.0.0.9 down to 127.0.0.6)"
    );
    anyhow::ensure!(
        healthy + k <= 8,
        "--source-ips {healthy} + --attack-source-ips {k} overlap: healthy subscribers use \
         127.0.0.2 upwards, attackers 127.0.0.9 downwards"
    );
    Ok((0..k)
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9 - i as u8)))
        .collect())
}

/// How one attacker ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
enum Ending {
    /// Still attacking when the run ended.
    #[default]
    Open,
    /// `conn-flood`: flooded until the end (or its bound); see the connection counts.
    Flooded,
    /// The server sent a WebSocket close frame (with this code, if any).
    Close(Option<u16>),
    /// The server answered with an HTTP status instead of an upgrade / a 2xx.
    Status(u16),
    /// The server closed the TCP connection without a close frame or status.
    Eof,
    /// The connection was reset (or failed) under the attacker.
    Reset,
    /// The server sent something the tool could not decode.
    Garbage,
    /// The TCP connect itself failed.
    ConnectFailed,
}

impl Ending {
    fn label(&self) -> String {
        match self {
            Ending::Open => "still open at the end".into(),
            Ending::Flooded => "flooded until the end".into(),
            Ending::Close(Some(c)) => format!("closed by the server: close {c}"),
            Ending::Close(None) => "closed by the server: close frame without code".into(),
            Ending::Status(s) => format!("refused by the server: HTTP {s}"),
            Ending::Eof => "closed by the server: EOF without close frame".into(),
            Ending::Reset => "connection reset".into(),
            Ending::Garbage => "undecodable answer".into(),
            Ending::ConnectFailed => "connect failed".into(),
        }
    }

    fn by_server(&self) -> bool {
        !matches!(self, Ending::Open | Ending::Flooded | Ending::ConnectFailed)
    }
}

/// What one attacker did.
#[derive(Debug, Default)]
struct AttackerResult {
    ending: Ending,
    /// Seconds from the attack's start until the server ended it.
    ended_after: Option<f64>,
    connections: u64,
    upgraded: u64,
    statuses: BTreeMap<u16, u64>,
    errors: u64,
    first_error: Option<String>,
    subscribed: u64,
    error_codes: BTreeMap<String, u64>,
}

/// The attack part of a report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AttackReport {
    pub kind: String,
    pub attackers: usize,
    pub sources: Vec<String>,
    /// Attackers that got going (connected and, for WebSocket kinds, upgraded or refused).
    pub started: usize,
    /// From the first attacker starting to the last one stopping.
    pub secs: f64,
    /// How the attackers ended: label -> count.
    pub endings: BTreeMap<String, usize>,
    /// Attackers the server refused or closed (close frame, HTTP status, EOF or reset).
    pub ended_by_server: usize,
    /// When the server ended them, seconds after the attack started.
    pub ended_after_secs: Percentiles,
    /// Bytes the attackers wrote.
    pub bytes_sent: u64,
    /// conn-flood: connections opened, upgraded (101), refused by status, failed.
    pub connections: u64,
    pub upgraded: u64,
    pub refused: BTreeMap<String, u64>,
    pub connect_errors: u64,
    pub first_error: Option<String>,
    /// topic-flood: `subscribed` replies, and error frames by code.
    pub topics_subscribed: u64,
    pub error_codes: BTreeMap<String, u64>,
    /// Server VmRSS (KiB) with the healthy subscribers connected before the attack, its
    /// highest reading during the attack, and one second after the attackers are gone.
    pub rss_before_kib: Option<u64>,
    pub rss_peak_kib: Option<u64>,
    pub rss_after_kib: Option<u64>,
    /// (peak - before) / attackers, and (after - before) / attackers, in bytes.
    pub bytes_per_attacker_peak: Option<f64>,
    pub bytes_per_attacker_after: Option<f64>,
    /// The attack was cut short because the server's RSS passed this many KiB.
    pub rss_limit_kib: Option<u64>,
    pub rss_limit_hit: bool,
    /// Server CPU time (user + system, seconds) from the attack's start until its attackers
    /// are gone (`secs`), healthy load included.
    pub cpu_secs: Option<f64>,
    /// With `--baseline`: (cpu_secs - the baseline's CPU per second x secs) / attackers, in
    /// milliseconds: what one attacking socket cost the server beyond the healthy load.
    pub cpu_ms_per_attacker: Option<f64>,
    /// The same healthy load without the attack, run first (`--baseline`).
    pub baseline: Option<BaselineReport>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct BaselineReport {
    pub latency_ms: Percentiles,
    /// Server CPU per second (cores busy) while the baseline published.
    pub server_cpu_cores: Option<f64>,
    pub expected_deliveries: u64,
    pub delivered: u64,
    pub lost: u64,
    pub subscribers_closed: usize,
    /// Healthy p99 during the attack / p99 of the baseline.
    pub p99_ratio: Option<f64>,
}

impl AttackReport {
    /// The attack lines of the text report.
    pub fn write_text(&self, s: &mut String) {
        use std::fmt::Write as _;
        let _ = writeln!(
            s,
            "  attack       {} x {} ({} started) from {} for {:.1} s, {} bytes sent",
            self.kind,
            self.attackers,
            self.started,
            self.sources.join(", "),
            self.secs,
            self.bytes_sent
        );
        for (label, n) in &self.endings {
            let _ = writeln!(s, "               {n} {label}");
        }
        if self.ended_after_secs.count > 0 {
            let t = &self.ended_after_secs;
            let _ = writeln!(
                s,
                "               ended by the server after p50 {:.2} s, max {:.2} s",
                t.p50, t.max
            );
        }
        if self.connections > 0 {
            let _ = writeln!(
                s,
                "               {} connections: {} upgraded, refused {:?}, {} failed",
                self.connections, self.upgraded, self.refused, self.connect_errors
            );
        }
        if self.topics_subscribed > 0 || !self.error_codes.is_empty() {
            let _ = writeln!(
                s,
                "               {} topics subscribed, error frames {:?}",
                self.topics_subscribed, self.error_codes
            );
        }
        if let Some(e) = &self.first_error {
            let _ = writeln!(s, "               first error: {e}");
        }
        let kib = |v: Option<u64>| v.map_or("-".to_string(), |v| format!("{v} KiB"));
        let per = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0} bytes"));
        let _ = writeln!(
            s,
            "  memory       server RSS {} before, {} peak, {} after: {} per attacker at peak, {} after{}",
            kib(self.rss_before_kib),
            kib(self.rss_peak_kib),
            kib(self.rss_after_kib),
            per(self.bytes_per_attacker_peak),
            per(self.bytes_per_attacker_after),
            if self.rss_limit_hit {
                " (attack stopped early: --attack-max-rss-mib reached)"
            } else {
                ""
            }
        );
        if let Some(cpu) = self.cpu_secs {
            let _ = writeln!(
                s,
                "  cpu          server {cpu:.2} s in {:.1} s of attack ({:.2} cores){}",
                self.secs,
                cpu / self.secs.max(1e-9),
                match (&self.baseline, self.cpu_ms_per_attacker) {
                    (Some(b), Some(ms)) => format!(
                        ", baseline {:.2} cores: {ms:.2} ms per attacker",
                        b.server_cpu_cores.unwrap_or_default()
                    ),
                    _ => String::new(),
                }
            );
        }
        if let Some(b) = &self.baseline {
            let _ = writeln!(
                s,
                "  baseline     no attack: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms, lost {}; attacked p99 / baseline p99 = {}",
                b.latency_ms.p50,
                b.latency_ms.p99,
                b.latency_ms.max,
                b.lost,
                b.p99_ratio.map_or("-".to_string(), |r| format!("{r:.2}x"))
            );
        }
    }
}

/// What every attacker shares.
struct Ctx {
    kind: AttackKind,
    addr: SocketAddr,
    host: String,
    sources: Vec<IpAddr>,
    key: Option<String>,
    stop: CancellationToken,
    start: Instant,
    bytes_sent: AtomicU64,
    /// A per-run prefix, so topic-flood names are fresh on every run against one server.
    nonce: u32,
}

impl Ctx {
    fn since_start(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }
}

/// A running attack; `finish` stops it and reports.
pub struct Running {
    ctx: Arc<Ctx>,
    attackers: usize,
    started: usize,
    tasks: JoinSet<AttackerResult>,
    sampler: Option<tokio::task::JoinHandle<Option<u64>>>,
    sampler_done: CancellationToken,
    limit_hit: Arc<AtomicBool>,
    rss_limit_kib: Option<u64>,
    rss_before: Option<u64>,
    cpu_before: Option<f64>,
    server_pid: Option<u32>,
}

/// Settings of one attack (from the bench flags).
pub struct Plan {
    pub kind: AttackKind,
    pub attackers: usize,
    pub sources: Vec<IpAddr>,
    pub key: Option<String>,
    pub server_pid: Option<u32>,
    pub rss_limit_kib: u64,
}

/// Starts the attackers and returns once each has got going (or failed to), so the
/// healthy publications that follow all meet the attack in full swing.
pub async fn start(plan: Plan, addr: SocketAddr) -> anyhow::Result<Running> {
    anyhow::ensure!(
        addr.is_ipv4(),
        "--attack needs an IPv4 loopback server address (attackers bind 127.0.0.6-9)"
    );
    let rss_before = plan.server_pid.and_then(super::rss_kib);
    let cpu_before = plan.server_pid.and_then(super::cpu_secs);
    let ctx = Arc::new(Ctx {
        kind: plan.kind,
        addr,
        host: addr.to_string(),
        sources: plan.sources,
        key: plan.key,
        stop: CancellationToken::new(),
        start: Instant::now(),
        bytes_sent: AtomicU64::new(0),
        nonce: rand::random(),
    });
    let (ready_tx, mut ready_rx) = mpsc::channel::<()>(plan.attackers.max(1));
    let mut tasks = JoinSet::new();
    for i in 0..plan.attackers {
        let (ctx, ready) = (ctx.clone(), ready_tx.clone());
        tasks.spawn(async move { attacker(ctx, i, ready).await });
    }
    drop(ready_tx);
    let mut started = 0;
    let deadline = tokio::time::Instant::now() + OPEN_TIMEOUT + Duration::from_secs(1);
    while started < plan.attackers {
        match tokio::time::timeout_at(deadline, ready_rx.recv()).await {
            Ok(Some(())) => started += 1,
            _ => break,
        }
    }

    let sampler_done = CancellationToken::new();
    let limit_hit = Arc::new(AtomicBool::new(false));
    let sampler = plan.server_pid.map(|pid| {
        let (done, stop, hit) = (sampler_done.clone(), ctx.stop.clone(), limit_hit.clone());
        let limit = plan.rss_limit_kib;
        tokio::spawn(async move {
            let mut peak: Option<u64> = None;
            loop {
                if let Some(v) = super::rss_kib(pid) {
                    peak = Some(peak.map_or(v, |p| p.max(v)));
                    if v > limit && !hit.swap(true, Ordering::Relaxed) {
                        stop.cancel();
                    }
                }
                tokio::select! {
                    _ = done.cancelled() => break,
                    _ = tokio::time::sleep(RSS_SAMPLE) => {}
                }
            }
            peak
        })
    });
    Ok(Running {
        ctx,
        attackers: plan.attackers,
        started,
        tasks,
        sampler,
        sampler_done,
        limit_hit,
        rss_limit_kib: plan.server_pid.map(|_| plan.rss_limit_kib),
        rss_before,
        cpu_before,
        server_pid: plan.server_pid,
    })
}

impl Running {
    /// Stops the attackers, collects how each ended, and reads the server's memory.
    pub async fn finish(mut self) -> AttackReport {
        self.ctx.stop.cancel();
        let mut results = Vec::with_capacity(self.attackers);
        while let Some(r) = self.tasks.join_next().await {
            results.push(r.unwrap_or_else(|e| AttackerResult {
                ending: Ending::Garbage,
                first_error: Some(format!("attacker task failed: {e}")),
                ..Default::default()
            }));
        }
        let secs = self.ctx.since_start();
        let cpu_after = self.server_pid.and_then(super::cpu_secs);
        self.sampler_done.cancel();
        let peak = match self.sampler.take() {
            Some(h) => h.await.ok().flatten(),
            None => None,
        };
        let after = match self.server_pid {
            Some(pid) => {
                tokio::time::sleep(SETTLE).await;
                super::rss_kib(pid)
            }
            None => None,
        };
        let per = |v: Option<u64>| match (self.rss_before, v) {
            (Some(b), Some(a)) => super::report::bytes_per_connection(b, a, self.attackers),
            _ => None,
        };
        let mut rep = AttackReport {
            kind: self.ctx.kind.name().to_string(),
            attackers: self.attackers,
            sources: self.ctx.sources.iter().map(|s| s.to_string()).collect(),
            started: self.started,
            secs,
            bytes_sent: self.ctx.bytes_sent.load(Ordering::Relaxed),
            rss_before_kib: self.rss_before,
            rss_peak_kib: peak,
            rss_after_kib: after,
            bytes_per_attacker_peak: per(peak),
            bytes_per_attacker_after: per(after),
            rss_limit_kib: self.rss_limit_kib,
            rss_limit_hit: self.limit_hit.load(Ordering::Relaxed),
            cpu_secs: self.cpu_before.zip(cpu_after).map(|(b, a)| a - b),
            ..Default::default()
        };
        let mut ended = super::subscriber::new_histogram();
        for r in results {
            *rep.endings.entry(r.ending.label()).or_default() += 1;
            if r.ending.by_server() {
                rep.ended_by_server += 1;
            }
            if let Some(t) = r.ended_after {
                ended.saturating_record((t * 1e6).max(1.0) as u64);
            }
            rep.connections += r.connections;
            rep.upgraded += r.upgraded;
            for (s, n) in r.statuses {
                *rep.refused.entry(s.to_string()).or_default() += n;
            }
            rep.connect_errors += r.errors;
            if rep.first_error.is_none() {
                rep.first_error = r.first_error;
            }
            rep.topics_subscribed += r.subscribed;
            for (c, n) in r.error_codes {
                *rep.error_codes.entry(c).or_default() += n;
            }
        }
        // Percentiles::from_us gives milliseconds; recorded in µs of seconds -> scale back.
        let p = Percentiles::from_us(&ended);
        rep.ended_after_secs = Percentiles {
            count: p.count,
            p50: p.p50 / 1000.0,
            p90: p.p90 / 1000.0,
            p99: p.p99 / 1000.0,
            max: p.max / 1000.0,
        };
        rep
    }
}

async fn attacker(ctx: Arc<Ctx>, i: usize, ready: mpsc::Sender<()>) -> AttackerResult {
    let mut ready = Some(ready);
    let opened = tokio::select! {
        _ = ctx.stop.cancelled() => None,
        r = tokio::time::timeout(OPEN_TIMEOUT, open(&ctx, i)) => Some(r),
    };
    let signal = |ready: &mut Option<mpsc::Sender<()>>| {
        if let Some(tx) = ready.take() {
            let _ = tx.try_send(());
        }
    };
    let opened = match opened {
        None => {
            signal(&mut ready);
            return AttackerResult::default();
        }
        Some(Err(_)) => {
            signal(&mut ready);
            return AttackerResult {
                ending: Ending::ConnectFailed,
                first_error: Some(format!("no answer within {OPEN_TIMEOUT:?}")),
                ..Default::default()
            };
        }
        Some(Ok(o)) => o,
    };
    signal(&mut ready);
    let (stream, rest) = match opened {
        Opened::Ready(s, rest) => (s, rest),
        Opened::Flood => return conn_flood(&ctx, i).await,
        Opened::Ended(mut r) => {
            r.ended_after = r.ending.by_server().then(|| ctx.since_start());
            return r;
        }
    };
    match ctx.kind {
        AttackKind::PingFlood => {
            let frames = repeat_to(&[0x89, 0x80, 0, 0, 0, 0], FLOOD_WRITE);
            flood(&ctx, stream, rest, frames).await
        }
        AttackKind::CommandFlood => {
            let mut one = Vec::new();
            one.extend_from_slice(&masked_text(br#"{"op":"ping"}"#));
            one.extend_from_slice(&masked_text(
                format!(r#"{{"op":"subscribe","topic":"cf-{i}"}}"#).as_bytes(),
            ));
            flood(&ctx, stream, rest, repeat_to(&one, FLOOD_WRITE)).await
        }
        AttackKind::TopicFlood => topic_flood(&ctx, i, stream, rest).await,
        AttackKind::BigFrame => {
            let mut head = vec![0x82, 0xFF];
            head.extend_from_slice(&(1u64 << 62).to_be_bytes());
            head.extend_from_slice(&rand::random::<[u8; 4]>());
            slow(
                &ctx,
                stream,
                rest,
                head,
                vec![0u8; BIG_FRAME_CHUNK],
                Answer::Ws,
            )
            .await
        }
        AttackKind::Slowloris => {
            let head = format!(
                "GET /healthz HTTP/1.1\r\nHost: {}\r\nX-Slowloris: ",
                ctx.host
            );
            // The first byte now, then one a second; a header that never ends.
            let mut bytes = head.into_bytes();
            let first = bytes.remove(0);
            slow_bytes(&ctx, stream, vec![first], bytes).await
        }
        AttackKind::SlowBody => {
            let auth = ctx
                .key
                .as_ref()
                .map(|k| format!("Authorization: Bearer {k}\r\n"))
                .unwrap_or_default();
            let head = format!(
                "POST /api/publish/x HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
                 Content-Length: 65536\r\n{auth}\r\n",
                ctx.host
            );
            slow(
                &ctx,
                stream,
                rest,
                head.into_bytes(),
                b" ".to_vec(),
                Answer::Http,
            )
            .await
        }
        AttackKind::EmptyContinuation => {
            let mut stream = stream;
            let mut first = masked_text(br#"{"op":"#);
            first[0] &= 0x7F; // no FIN: a message the continuations never finish
            if stream.write_all(&first).await.is_err() {
                return AttackerResult {
                    ending: Ending::Reset,
                    ended_after: Some(ctx.since_start()),
                    ..Default::default()
                };
            }
            ctx.bytes_sent
                .fetch_add(first.len() as u64, Ordering::Relaxed);
            let mut empty = vec![frame::OP_CONT, 0x80];
            empty.extend_from_slice(&rand::random::<[u8; 4]>());
            flood(&ctx, stream, rest, repeat_to(&empty, FLOOD_WRITE)).await
        }
        AttackKind::ConnFlood => unreachable!("handled by open"),
        AttackKind::TricklePublish
        | AttackKind::TricklePublishChunked
        | AttackKind::TrickleScores
        | AttackKind::TrickleScoresChunked => trickle::attack(&ctx, i, stream).await,
    }
}

enum Opened {
    /// Connected (and upgraded, for the WebSocket kinds); bytes read past the answer.
    Ready(TcpStream, Vec<u8>),
    /// `conn-flood` opens its own connections.
    Flood,
    /// Refused before the attack began.
    Ended(AttackerResult),
}

async fn open(ctx: &Ctx, i: usize) -> Opened {
    let (rcvbuf, upgrade) = match ctx.kind {
        AttackKind::ConnFlood => return Opened::Flood,
        AttackKind::PingFlood | AttackKind::CommandFlood => (Some(FLOOD_RCVBUF), true),
        AttackKind::TopicFlood | AttackKind::BigFrame | AttackKind::EmptyContinuation => {
            (None, true)
        }
        AttackKind::Slowloris | AttackKind::SlowBody => (None, false),
        AttackKind::TricklePublish
        | AttackKind::TricklePublishChunked
        | AttackKind::TrickleScores
        | AttackKind::TrickleScoresChunked => (None, false),
    };
    let mut stream = match connect(ctx, i, rcvbuf).await {
        Ok(s) => s,
        Err(e) => {
            return Opened::Ended(AttackerResult {
                ending: Ending::ConnectFailed,
                errors: 1,
                first_error: Some(format!("connect: {e}")),
                ..Default::default()
            })
        }
    };
    if !upgrade {
        return Opened::Ready(stream, Vec::new());
    }
    match upgrade_ws(&mut stream, ctx).await {
        Ok(rest) => Opened::Ready(stream, rest),
        Err(ending) => Opened::Ended(AttackerResult {
            ending,
            ..Default::default()
        }),
    }
}

/// A TCP connection from the `i`-th attacker address.
async fn connect(ctx: &Ctx, i: usize, rcvbuf: Option<u32>) -> io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    if let Some(n) = rcvbuf {
        socket.set_recv_buffer_size(n)?;
    }
    socket.bind(SocketAddr::new(ctx.sources[i % ctx.sources.len()], 0))?;
    let stream = socket.connect(ctx.addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Upgrades to WebSocket on `/ws` (no topic). Returns the bytes read past the 101, or how
/// the server refused.
async fn upgrade_ws(stream: &mut TcpStream, ctx: &Ctx) -> Result<Vec<u8>, Ending> {
    let key = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 16]>());
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n",
        ctx.host
    );
    if stream.write_all(req.as_bytes()).await.is_err() {
        return Err(Ending::Reset);
    }
    match read_head(stream).await {
        Ok((head, rest)) => match status_code(&head) {
            Some(101) => Ok(rest),
            Some(s) => Err(Ending::Status(s)),
            None => Err(Ending::Garbage),
        },
        Err(e) => Err(io_ending(&e)),
    }
}

fn status_code(head: &str) -> Option<u16> {
    head.lines().next()?.split(' ').nth(1)?.parse().ok()
}

fn io_ending(e: &anyhow::Error) -> Ending {
    if e.to_string().contains("closed before") {
        Ending::Eof
    } else {
        Ending::Reset
    }
}

/// `frame` repeated to about `len` bytes (whole frames only).
fn repeat_to(frame: &[u8], len: usize) -> Vec<u8> {
    let n = (len / frame.len()).max(1);
    frame.repeat(n)
}

fn masked_text(payload: &[u8]) -> Vec<u8> {
    frame::encode_masked(frame::OP_TEXT, payload, rand::random()).to_vec()
}

/// Writes `buf` again and again, never reading, until the run stops or a write fails.
async fn flood(ctx: &Ctx, mut stream: TcpStream, rest: Vec<u8>, buf: Vec<u8>) -> AttackerResult {
    let mut r = AttackerResult::default();
    let failed = loop {
        tokio::select! {
            biased;
            _ = ctx.stop.cancelled() => break false,
            w = stream.write_all(&buf) => match w {
                Ok(()) => {
                    ctx.bytes_sent.fetch_add(buf.len() as u64, Ordering::Relaxed);
                }
                Err(_) => break true,
            }
        }
    };
    if failed {
        r.ended_after = Some(ctx.since_start());
    }
    let mut l = Listener::new(Answer::Ws, rest);
    r.ending = last_words(&mut stream, &mut l, failed).await;
    if !failed && r.ending.by_server() {
        r.ended_after = Some(ctx.since_start());
    }
    r
}

/// What the server's answer looks like.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Answer {
    Ws,
    Http,
}

/// Accumulates what the server sends and says whether it ended the attack.
struct Listener {
    answer: Answer,
    decoder: Decoder,
    http: Vec<u8>,
}

impl Listener {
    fn new(answer: Answer, rest: Vec<u8>) -> Self {
        let mut l = Listener {
            answer,
            decoder: Decoder::new(Role::Client, 1 << 20),
            http: Vec::new(),
        };
        l.feed(&rest);
        l
    }

    fn feed(&mut self, data: &[u8]) {
        match self.answer {
            Answer::Ws => self.decoder.buffer_mut(data.len()).extend_from_slice(data),
            Answer::Http => {
                if self.http.len() < 4096 {
                    self.http.extend_from_slice(data);
                }
            }
        }
    }

    /// The server's verdict, if it has given one.
    fn verdict(&mut self) -> Option<Ending> {
        match self.answer {
            Answer::Ws => loop {
                match self.decoder.next_message() {
                    Ok(Some(Message::Close(code, _))) => return Some(Ending::Close(code)),
                    Ok(Some(_)) => {}
                    Ok(None) => {
                        self.decoder.shrink_if_empty();
                        return None;
                    }
                    Err(_) => return Some(Ending::Garbage),
                }
            },
            Answer::Http => {
                let line_end = self.http.windows(2).position(|w| w == b"\r\n")?;
                let line = String::from_utf8_lossy(&self.http[..line_end]);
                Some(status_code(&line).map_or(Ending::Garbage, Ending::Status))
            }
        }
    }
}

/// After the attack: reads what the server still sends (bounded in time and bytes) to find
/// out whether, and how, it ended the connection. `failed`: a write already failed, so the
/// server has closed; wait longer for its words.
async fn last_words(stream: &mut TcpStream, l: &mut Listener, failed: bool) -> Ending {
    if let Some(v) = l.verdict() {
        return v;
    }
    let start = Instant::now();
    let mut total = 0u64;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    loop {
        let left = DRAIN_MAX.saturating_sub(start.elapsed());
        let wait = if failed { left } else { left.min(DRAIN_QUIET) };
        if wait.is_zero() || total > DRAIN_BYTES {
            return if failed { Ending::Reset } else { Ending::Open };
        }
        buf.clear();
        match tokio::time::timeout(wait, stream.read_buf(&mut buf)).await {
            Err(_) => return if failed { Ending::Reset } else { Ending::Open },
            Ok(Ok(0)) => return Ending::Eof,
            Ok(Err(_)) => return Ending::Reset,
            Ok(Ok(n)) => {
                total += n as u64;
                l.feed(&buf[..n]);
                if let Some(v) = l.verdict() {
                    return v;
                }
            }
        }
    }
}

/// Sends `first` now and then `tick` every second, listening for the server's answer.
async fn slow(
    ctx: &Ctx,
    stream: TcpStream,
    rest: Vec<u8>,
    first: Vec<u8>,
    tick: Vec<u8>,
    answer: Answer,
) -> AttackerResult {
    let chunks = std::iter::once(first).chain(std::iter::repeat(tick));
    slow_chunks(ctx, stream, rest, chunks, answer).await
}

/// Slowloris: `first` now, then `head` byte by byte, then `a` for ever, one a second.
async fn slow_bytes(ctx: &Ctx, stream: TcpStream, first: Vec<u8>, head: Vec<u8>) -> AttackerResult {
    let chunks = std::iter::once(first)
        .chain(head.into_iter().map(|b| vec![b]))
        .chain(std::iter::repeat(b"a".to_vec()));
    slow_chunks(ctx, stream, Vec::new(), chunks, Answer::Http).await
}

async fn slow_chunks(
    ctx: &Ctx,
    mut stream: TcpStream,
    rest: Vec<u8>,
    mut chunks: impl Iterator<Item = Vec<u8>>,
    answer: Answer,
) -> AttackerResult {
    let mut r = AttackerResult::default();
    let mut l = Listener::new(answer, rest);
    if let Some(v) = l.verdict() {
        r.ending = v;
        r.ended_after = Some(ctx.since_start());
        return r;
    }
    let mut tick = tokio::time::interval(SLOW_TICK);
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        tokio::select! {
            biased;
            _ = ctx.stop.cancelled() => {
                r.ending = last_words(&mut stream, &mut l, false).await;
                if r.ending.by_server() {
                    r.ended_after = Some(ctx.since_start());
                }
                return r;
            }
            n = stream.read_buf(&mut buf) => {
                let ending = match n {
                    Ok(0) => Some(Ending::Eof),
                    Err(_) => Some(Ending::Reset),
                    Ok(n) => {
                        l.feed(&buf[..n]);
                        buf.clear();
                        l.verdict()
                    }
                };
                if let Some(e) = ending {
                    r.ending = e;
                    r.ended_after = Some(ctx.since_start());
                    return r;
                }
            }
            _ = tick.tick() => {
                let Some(chunk) = chunks.next() else { continue };
                let w = tokio::time::timeout(SLOW_TICK, stream.write_all(&chunk)).await;
                match w {
                    Ok(Ok(())) => {
                        ctx.bytes_sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    }
                    Ok(Err(_)) => {
                        r.ended_after = Some(ctx.since_start());
                        r.ending = last_words(&mut stream, &mut l, true).await;
                        return r;
                    }
                    // The server stopped reading: that is its answer to pace, keep going.
                    Err(_) => {}
                }
            }
        }
    }
}

/// Subscribes fresh topics, at most `TOPIC_FLOOD_WINDOW` unanswered, reading the replies.
async fn topic_flood(ctx: &Ctx, i: usize, stream: TcpStream, rest: Vec<u8>) -> AttackerResult {
    let mut r = AttackerResult::default();
    let (mut rd, mut wr) = stream.into_split();
    let sent = AtomicU64::new(0);
    let replied = AtomicU64::new(0);
    let room = Notify::new();
    let writer = async {
        let mut n = 0u64;
        loop {
            while sent.load(Ordering::Relaxed) - replied.load(Ordering::Relaxed)
                >= TOPIC_FLOOD_WINDOW
            {
                room.notified().await;
            }
            let mut batch = Vec::with_capacity(64 * 64);
            for _ in 0..64 {
                let cmd = format!(
                    r#"{{"op":"subscribe","topic":"tf{:08x}-{i}-{n}"}}"#,
                    ctx.nonce
                );
                batch.extend_from_slice(&masked_text(cmd.as_bytes()));
                n += 1;
            }
            if wr.write_all(&batch).await.is_err() {
                return;
            }
            ctx.bytes_sent
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            sent.fetch_add(64, Ordering::Relaxed);
        }
    };
    let mut subscribed = 0u64;
    let mut codes: BTreeMap<String, u64> = BTreeMap::new();
    let reader = async {
        let mut decoder = Decoder::new(Role::Client, 1 << 20);
        decoder.buffer_mut(rest.len()).extend_from_slice(&rest);
        loop {
            loop {
                match decoder.next_message() {
                    Ok(Some(Message::Text(t))) => {
                        let v: serde_json::Value = serde_json::from_slice(&t).unwrap_or_default();
                        match v["op"].as_str() {
                            Some("subscribed") => subscribed += 1,
                            Some("error") => {
                                let code = v["code"].as_str().unwrap_or("?").to_string();
                                *codes.entry(code).or_default() += 1;
                            }
                            _ => continue,
                        }
                        replied.fetch_add(1, Ordering::Relaxed);
                        room.notify_one();
                    }
                    Ok(Some(Message::Close(code, _))) => return Ending::Close(code),
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(_) => return Ending::Garbage,
                }
            }
            match rd.read_buf(decoder.buffer_mut(64 * 1024)).await {
                Ok(0) => return Ending::Eof,
                Ok(_) => {}
                Err(_) => return Ending::Reset,
            }
        }
    };
    let ending = tokio::select! {
        biased;
        _ = ctx.stop.cancelled() => None,
        e = reader => Some(e),
        _ = writer => None,
    };
    r.ending = match ending {
        Some(e) => {
            r.ended_after = Some(ctx.since_start());
            e
        }
        None => match rd.reunite(wr) {
            Ok(mut s) => {
                let failed = !ctx.stop.is_cancelled();
                let mut l = Listener::new(Answer::Ws, Vec::new());
                let e = last_words(&mut s, &mut l, failed).await;
                if e.by_server() {
                    r.ended_after = Some(ctx.since_start());
                }
                e
            }
            Err(_) => Ending::Reset,
        },
    };
    r.subscribed = subscribed;
    r.error_codes = codes;
    r
}

/// Opens /ws connections one after another (upgrade request, read the answer, reset with
/// SO_LINGER 0 so neither side keeps a TIME_WAIT), until the run stops or the bound.
async fn conn_flood(ctx: &Ctx, i: usize) -> AttackerResult {
    let mut r = AttackerResult {
        ending: Ending::Flooded,
        ..Default::default()
    };
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        ctx.host
    );
    while r.connections < CONN_FLOOD_MAX && !ctx.stop.is_cancelled() {
        let one = async {
            let mut s = connect(ctx, i, None).await?;
            s.set_zero_linger()?;
            s.write_all(req.as_bytes()).await?;
            let (head, _) = read_head(&mut s)
                .await
                .map_err(|e| io::Error::other(format!("{e:#}")))?;
            Ok::<_, io::Error>(status_code(&head))
        };
        let outcome = tokio::select! {
            biased;
            _ = ctx.stop.cancelled() => break,
            o = tokio::time::timeout(OPEN_TIMEOUT, one) => o,
        };
        r.connections += 1;
        ctx.bytes_sent
            .fetch_add(req.len() as u64, Ordering::Relaxed);
        match outcome {
            Ok(Ok(Some(101))) => r.upgraded += 1,
            Ok(Ok(Some(s))) => *r.statuses.entry(s).or_default() += 1,
            Ok(Ok(None)) => {
                r.errors += 1;
                r.first_error.get_or_insert("unparsable answer".into());
            }
            Ok(Err(e)) => {
                r.errors += 1;
                r.first_error.get_or_insert(e.to_string());
                // Refused or reset: do not spin on a failing connect.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(_) => {
                r.errors += 1;
                r.first_error
                    .get_or_insert(format!("no answer within {OPEN_TIMEOUT:?}"));
            }
        }
        tokio::task::yield_now().await;
    }
    r
}

/// The `--baseline` part: the healthy figures of the run without the attack.
pub fn baseline_of(base: &super::report::Report, attacked_p99: f64) -> BaselineReport {
    BaselineReport {
        latency_ms: base.latency_ms,
        server_cpu_cores: base.server_cpu_cores,
        expected_deliveries: base.expected_deliveries,
        delivered: base.delivered,
        lost: base.lost,
        subscribers_closed: base.subscribers_closed,
        p99_ratio: (base.latency_ms.p99 > 0.0).then(|| attacked_p99 / base.latency_ms.p99),
    }
}

impl AttackReport {
    /// Sets `baseline` and, from its CPU per second, what each attacker cost beyond it.
    pub fn compare_with(&mut self, base: &super::report::Report, attacked_p99: f64) {
        let b = baseline_of(base, attacked_p99);
        self.cpu_ms_per_attacker = match (self.cpu_secs, b.server_cpu_cores) {
            (Some(cpu), Some(cores)) if self.attackers > 0 => {
                Some((cpu - cores * self.secs) / self.attackers as f64 * 1000.0)
            }
            _ => None,
        };
        self.baseline = Some(b);
    }
}

/// Checks the attack flags before anything connects.
pub fn plan(args: &super::BenchArgs, kind: AttackKind) -> anyhow::Result<Plan> {
    anyhow::ensure!(
        (1..=5000).contains(&args.attackers),
        "--attackers must be 1-5000"
    );
    anyhow::ensure!(
        !args.idle,
        "--attack runs next to publications; it cannot be combined with --idle"
    );
    let sources = attacker_sources(args.attack_source_ips, args.source_ips)
        .context("choosing attacker addresses")?;
    Ok(Plan {
        kind,
        attackers: args.attackers,
        sources,
        key: args.key.clone(),
        server_pid: args.server_pid,
        rss_limit_kib: args.attack_max_rss_mib.saturating_mul(1024),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attacker_addresses_never_meet_the_healthy_ones() {
        let a = attacker_sources(1, 4).unwrap();
        assert_eq!(a, vec![IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9))]);
        let a = attacker_sources(4, 4).unwrap();
        assert_eq!(a.last(), Some(&IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6))));
        assert!(attacker_sources(4, 5).is_err());
        assert!(attacker_sources(0, 0).is_err());
        assert!(attacker_sources(5, 0).is_err());
    }

    #[test]
    fn answers_are_read_as_verdicts() {
        let mut l = Listener::new(Answer::Http, b"HTTP/1.1 408 Request Timeout\r\n".to_vec());
        assert_eq!(l.verdict(), Some(Ending::Status(408)));
        let mut l = Listener::new(Answer::Http, b"HTTP/1.1 4".to_vec());
        assert_eq!(l.verdict(), None);
        let mut close = frame::encode(frame::OP_PONG, b"").to_vec();
        close.extend_from_slice(&frame::encode(
            frame::OP_CLOSE,
            &frame::close_payload(1009, ""),
        ));
        let mut l = Listener::new(Answer::Ws, close);
        assert_eq!(l.verdict(), Some(Ending::Close(Some(1009))));
        assert!(Ending::Close(None).by_server() && Ending::Eof.by_server());
        assert!(!Ending::Open.by_server() && !Ending::ConnectFailed.by_server());
        assert_eq!(repeat_to(&[1, 2, 3], 10).len(), 9);
        assert_eq!(
            status_code("HTTP/1.1 101 Switching Protocols\r\n"),
            Some(101)
        );
    }
}
