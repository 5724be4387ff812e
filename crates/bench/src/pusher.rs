//! `--mode pusher` and `--mode pusher-api`: the same load against any Pusher Channels
//! server (crier's `/app/{key}` door, Sockudo, Soketi), so one tool measures both sides of
//! a comparison (docs/BENCHMARKS.md, "Pusher"). It speaks only the public protocol:
//! subscribers are Pusher protocol 7 WebSocket clients (`pusher:subscribe` to --topic as a
//! channel), events go through the signed HTTP API (`POST /apps/{id}/events`, signed as the
//! SDKs sign it).
//!
//! - `--mode pusher`: N subscribers, --messages events at --rate (0: as fast as the
//!   --publishers go); deliveries/s and publish-to-receive latency (each event's data
//!   carries its send time, `{"t":UNIX_US,"p":"..."}`). With `--idle`: the N subscribers
//!   are held for --hold and the server's RSS (--server-pid) read before, while held, and
//!   5 s after they all closed (what the server keeps).
//! - `--mode pusher-api`: acknowledged HTTP API events per second with --publishers
//!   keep-alive connections in flight, with N subscribers receiving them (loss checked).

use crate::stop::Seat;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use hmac::{Hmac, Mac};
use md5::{Digest, Md5};
use parking_lot::Mutex;
use serde::Serialize;
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::report::Percentiles;
use crate::subscriber::{
    fill, new_histogram, unix_us, wait_readable, ws_upgrade, Conn, Filled, Shared,
};
use crate::{BenchArgs, BenchMode};
use crier_protocol::frame::{self, Decoder, Message};
use crier_protocol::http_client::HttpClient;

/// A Pusher app as `--pusher-app ID:KEY:SECRET` names it.
#[derive(Clone, Debug)]
pub struct PusherApp {
    pub id: String,
    pub key: String,
    pub secret: String,
}

impl PusherApp {
    pub fn parse(s: &str) -> anyhow::Result<PusherApp> {
        let mut parts = s.splitn(3, ':');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(id), Some(key), Some(secret))
                if !id.is_empty() && !key.is_empty() && !secret.is_empty() =>
            {
                Ok(PusherApp {
                    id: id.into(),
                    key: key.into(),
                    secret: secret.into(),
                })
            }
            _ => bail!("--pusher-app takes ID:KEY:SECRET"),
        }
    }
}

/// What a Pusher run measured.
#[derive(Serialize, Debug, Default, Clone)]
pub struct PusherReport {
    /// fanout, idle or api.
    pub scenario: String,
    pub app_id: String,
    pub channel: String,
    pub subscribers: usize,
    pub connected: usize,
    pub connect_failed: usize,
    pub first_connect_error: Option<String>,
    pub connect_secs: f64,
    /// Events sent through the HTTP API, and how many it refused or failed.
    pub events: u64,
    pub events_failed: u64,
    pub expected_deliveries: u64,
    pub deliveries: u64,
    /// Deliveries over the time from the first event sent to the last delivery.
    pub deliveries_per_sec: f64,
    pub latency_ms: Percentiles,
    /// pusher-api: acknowledged events per second, and each call's answer time.
    pub api_events_per_sec: f64,
    pub ack_ms: Percentiles,
    /// idle (with --server-pid): server VmRSS before connecting, while holding the
    /// subscribers, and 5 s after they all closed, in KiB.
    pub rss_before_kib: Option<u64>,
    pub rss_held_kib: Option<u64>,
    pub rss_after_close_kib: Option<u64>,
    pub bytes_per_connection: Option<f64>,
    pub bytes_kept_after_close_per_connection: Option<f64>,
}

impl PusherReport {
    pub fn failures(&self) -> Vec<String> {
        let mut f = Vec::new();
        if self.connect_failed > 0 {
            f.push(format!(
                "{} subscribers failed to connect: {}",
                self.connect_failed,
                self.first_connect_error.as_deref().unwrap_or("")
            ));
        }
        if self.events_failed > 0 {
            f.push(format!("{} events failed", self.events_failed));
        }
        if self.deliveries < self.expected_deliveries {
            f.push(format!(
                "{} of {} deliveries lost",
                self.expected_deliveries - self.deliveries,
                self.expected_deliveries
            ));
        }
        f
    }

    pub fn write_text(&self, s: &mut String, url: &str) {
        use std::fmt::Write;
        let _ = writeln!(
            s,
            "crier bench --mode pusher ({}): {} of {} Pusher subscribers of channel {:?} (app {}) on {url} in {:.2} s",
            self.scenario, self.connected, self.subscribers, self.channel, self.app_id, self.connect_secs
        );
        if self.scenario == "idle" {
            let kib = |v: Option<u64>| v.map_or("-".into(), |v| v.to_string());
            let _ = writeln!(
                s,
                "  server VmRSS {} -> {} KiB held, {} KiB 5 s after close: {} bytes per connection, {} still kept per connection",
                kib(self.rss_before_kib),
                kib(self.rss_held_kib),
                kib(self.rss_after_close_kib),
                self.bytes_per_connection.map_or("-".into(), |b| format!("{b:.0}")),
                self.bytes_kept_after_close_per_connection.map_or("-".into(), |b| format!("{b:.0}")),
            );
            return;
        }
        let _ = writeln!(
            s,
            "  {} events ({} failed), {}/{} deliveries, {:.0} deliveries/s",
            self.events,
            self.events_failed,
            self.deliveries,
            self.expected_deliveries,
            self.deliveries_per_sec
        );
        let l = &self.latency_ms;
        let _ = writeln!(
            s,
            "  publish-to-receive ms: p50 {:.2} p90 {:.2} p99 {:.2} max {:.2}",
            l.p50, l.p90, l.p99, l.max
        );
        if self.scenario == "api" {
            let a = &self.ack_ms;
            let _ = writeln!(
                s,
                "  HTTP API: {:.0} acknowledged events/s; answer ms p50 {:.2} p99 {:.2} max {:.2}",
                self.api_events_per_sec, a.p50, a.p99, a.max
            );
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `POST /apps/{id}/events` of `body`, signed as the SDKs sign it: the URL to post to.
pub fn signed_events_url(base: &str, app: &PusherApp, body: &[u8]) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let path = format!("/apps/{}/events", app.id);
    let md5 = hex(&Md5::digest(body));
    let query = format!(
        "auth_key={}&auth_timestamp={now}&auth_version=1.0&body_md5={md5}",
        app.key
    );
    let mut mac =
        Hmac::<Sha256>::new_from_slice(app.secret.as_bytes()).expect("HMAC takes any key");
    mac.update(format!("POST\n{path}\n{query}").as_bytes());
    let sig = hex(&mac.finalize().into_bytes());
    format!("{base}{path}?{query}&auth_signature={sig}")
}

/// The send time an event's data carries (`{"t":US,...}`, as a JSON string inside the
/// frame, `{\"t\":US` on the wire, or as an object if a server unpacks it).
fn sent_us(frame: &[u8]) -> Option<u64> {
    let at = crate::envelope::find(frame, br#"\"t\":"#)
        .map(|i| i + 6)
        .or_else(|| crate::envelope::find(frame, br#""t":"#).map(|i| i + 4))?;
    let digits = &frame[at..];
    let end = digits
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(digits.len());
    std::str::from_utf8(&digits[..end]).ok()?.parse().ok()
}

/// Opens subscriber `i`: the upgrade at `/app/KEY`, `pusher:connection_established`, then
/// `pusher:subscribe` to the channel and its `subscription_succeeded`.
async fn open(shared: &Shared, i: usize, key: &str) -> anyhow::Result<(Conn, Decoder)> {
    let target = format!("/app/{key}?protocol=7&client=js&version=8.4.0&flash=false");
    let (mut stream, mut decoder) = ws_upgrade(shared, i, None, &target).await?;
    let mask = rand::random::<[u8; 4]>();
    let mut subscribed_sent = false;
    loop {
        while let Some(msg) = decoder.next_message()? {
            match msg {
                Message::Text(t) => {
                    let has = |s: &str| crate::envelope::find(&t, s.as_bytes()).is_some();
                    if has("pusher_internal:subscription_succeeded") {
                        decoder.shrink_if_empty();
                        return Ok((stream, decoder));
                    }
                    if has("pusher:connection_established") && !subscribed_sent {
                        let sub = format!(
                            r#"{{"event":"pusher:subscribe","data":{{"auth":"","channel":"{}"}}}}"#,
                            shared.topic
                        );
                        let f = frame::encode_masked(frame::OP_TEXT, sub.as_bytes(), mask);
                        stream.write_all(&f).await?;
                        subscribed_sent = true;
                    } else if has("pusher:error") || has("pusher:subscription_error") {
                        bail!("refused: {}", String::from_utf8_lossy(&t));
                    }
                }
                Message::Ping(p) => {
                    let f = frame::encode_masked(frame::OP_PONG, &p, mask);
                    stream.write_all(&f).await?;
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
            bail!("connection closed before subscribing");
        }
    }
}

/// Reads events until `stop` or the server closing: counts `bench` events and records
/// their latency. Answers WebSocket pings and `pusher:ping`.
async fn run_sub(mut stream: Conn, mut decoder: Decoder, shared: Arc<Shared>, i: usize) {
    let shard = shared.shard(i);
    let mask = rand::random::<[u8; 4]>();
    let mut pending = decoder.buffered() > 0;
    let mut seat = Seat::default();
    'outer: loop {
        if !pending {
            match wait_readable(&mut stream, &shared.stop, &mut seat).await {
                Ok(true) => {}
                _ => break,
            }
        }
        loop {
            if !pending {
                match fill(&mut stream, decoder.buffer_mut(64 * 1024)) {
                    Filled::Data => {}
                    Filled::Drained => break,
                    Filled::Closed => break 'outer,
                }
            }
            pending = false;
            let now_us = unix_us();
            let mut fresh = 0u64;
            let mut replies = Vec::new();
            {
                let mut hist = shard.lock();
                loop {
                    match decoder.next_message() {
                        Ok(Some(Message::Text(t))) => {
                            if crate::envelope::find(&t, br#""event":"bench""#).is_some() {
                                fresh += 1;
                                if let Some(sent) = sent_us(&t) {
                                    hist.saturating_record(now_us.saturating_sub(sent).max(1));
                                }
                            } else if crate::envelope::find(&t, b"pusher:ping").is_some() {
                                replies.push(frame::encode_masked(
                                    frame::OP_TEXT,
                                    br#"{"event":"pusher:pong","data":{}}"#,
                                    mask,
                                ));
                            }
                        }
                        Ok(Some(Message::Ping(p))) => {
                            replies.push(frame::encode_masked(frame::OP_PONG, &p, mask))
                        }
                        Ok(Some(Message::Close(..))) | Err(_) => break 'outer,
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                    }
                }
            }
            if fresh > 0 {
                shared.delivered.fetch_add(fresh, Ordering::Relaxed);
            }
            for r in replies {
                if stream.write_all(&r).await.is_err() {
                    break 'outer;
                }
            }
        }
        decoder.shrink_if_empty();
    }
}

/// Opens the N subscribers (at most --connect-concurrency at once), each then reading in
/// its own task until `shared.stop`.
async fn open_all(
    args: &BenchArgs,
    shared: &Arc<Shared>,
    app: &PusherApp,
    report: &mut PusherReport,
    readers: &mut JoinSet<()>,
) {
    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(args.connect_concurrency));
    let mut opening = JoinSet::new();
    for i in 0..args.subscribers {
        let (shared, gate, key) = (shared.clone(), gate.clone(), app.key.clone());
        let timeout = args.timeout;
        opening.spawn(async move {
            let _permit = gate.acquire_owned().await;
            let r = tokio::time::timeout(timeout, open(&shared, i, &key)).await;
            (i, r.unwrap_or_else(|_| Err(anyhow::anyhow!("timed out"))))
        });
    }
    while let Some(done) = opening.join_next().await {
        match done {
            Ok((i, Ok((stream, decoder)))) => {
                report.connected += 1;
                readers.spawn(run_sub(stream, decoder, shared.clone(), i));
            }
            Ok((_, Err(e))) => {
                report.connect_failed += 1;
                report.first_connect_error.get_or_insert(format!("{e:#}"));
            }
            Err(e) => {
                report.connect_failed += 1;
                report.first_connect_error.get_or_insert(e.to_string());
            }
        }
    }
    report.connect_secs = started.elapsed().as_secs_f64();
}

/// Sends --messages events through the HTTP API with --publishers in flight, paced at
/// --rate when it is set. Returns (sent, failed, answer times in µs, when the first left).
async fn publish(
    args: &BenchArgs,
    base: &str,
    app: &PusherApp,
) -> (u64, u64, Histogram<u64>, Instant) {
    let http = Arc::new(HttpClient::new(None));
    let next = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let acks = Arc::new(Mutex::new(new_histogram()));
    let pad = "x".repeat(args.payload.saturating_sub(30));
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..args.publishers {
        let (http, next, failed, acks) = (http.clone(), next.clone(), failed.clone(), acks.clone());
        let (base, app, pad) = (base.to_string(), app.clone(), pad.clone());
        let (total, rate, channel) = (args.messages, args.rate, args.topic.clone());
        tasks.spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    break;
                }
                if rate > 0.0 {
                    let at = start + Duration::from_secs_f64(n as f64 / rate);
                    tokio::time::sleep_until(at.into()).await;
                }
                let data = format!(r#"{{"t":{},"p":"{pad}"}}"#, unix_us());
                let body = serde_json::json!({"name": "bench", "channel": channel, "data": data})
                    .to_string();
                let url = signed_events_url(&base, &app, body.as_bytes());
                let sent = Instant::now();
                match http.post(&url, body).await {
                    Ok((status, _)) if status.is_success() => {
                        acks.lock()
                            .saturating_record(sent.elapsed().as_micros().max(1) as u64);
                    }
                    _ => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let acks = acks.lock().clone();
    (args.messages, failed.load(Ordering::Relaxed), acks, start)
}

/// `--mode pusher` (fanout or --idle) and `--mode pusher-api`.
pub async fn run(
    args: &BenchArgs,
    shared: Arc<Shared>,
    base: &str,
) -> anyhow::Result<PusherReport> {
    let app = PusherApp::parse(&args.pusher_app)?;
    let scenario = match (args.mode, args.idle) {
        (BenchMode::PusherApi, _) => "api",
        (_, true) => "idle",
        _ => "fanout",
    };
    let mut report = PusherReport {
        scenario: scenario.into(),
        app_id: app.id.clone(),
        channel: args.topic.clone(),
        subscribers: args.subscribers,
        ..Default::default()
    };
    let pid = args.server_pid;
    report.rss_before_kib = pid.and_then(crate::rss_kib);
    let mut readers = JoinSet::new();
    open_all(args, &shared, &app, &mut report, &mut readers).await;
    if scenario == "idle" {
        tokio::time::sleep(args.hold).await;
        report.rss_held_kib = pid.and_then(crate::rss_kib);
        shared.stop.cancel();
        readers.shutdown().await;
        if pid.is_some() {
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        report.rss_after_close_kib = pid.and_then(crate::rss_kib);
        let per = |after: Option<u64>| {
            crate::report::bytes_per_connection(report.rss_before_kib?, after?, report.connected)
        };
        report.bytes_per_connection = per(report.rss_held_kib);
        report.bytes_kept_after_close_per_connection = per(report.rss_after_close_kib);
        return Ok(report);
    }
    let (sent, failed, acks, start) = publish(args, base, &app).await;
    let published = start.elapsed();
    report.events = sent;
    report.events_failed = failed;
    report.expected_deliveries = (sent - failed) * report.connected as u64;
    report.ack_ms = Percentiles::from_us(&acks);
    report.api_events_per_sec = (sent - failed) as f64 / published.as_secs_f64().max(1e-9);
    let deadline = Instant::now() + args.timeout;
    let mut last = shared.delivered.load(Ordering::Relaxed);
    let mut last_at = Instant::now();
    while last < report.expected_deliveries && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
        let now = shared.delivered.load(Ordering::Relaxed);
        if now != last {
            (last, last_at) = (now, Instant::now());
        }
    }
    report.deliveries = last;
    report.deliveries_per_sec = last as f64 / last_at.duration_since(start).as_secs_f64().max(1e-9);
    let mut all = new_histogram();
    for h in shared.latency.iter() {
        all.add(&*h.lock()).context("merging latency")?;
    }
    report.latency_ms = Percentiles::from_us(&all);
    shared.stop.cancel();
    readers.shutdown().await;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_send_time_from_a_string_or_object_data() {
        let s = br#"{"event":"bench","channel":"c","data":"{\"t\":1234,\"p\":\"x\"}"}"#;
        assert_eq!(sent_us(s), Some(1234));
        let o = br#"{"event":"bench","channel":"c","data":{"t":99,"p":"x"}}"#;
        assert_eq!(sent_us(o), Some(99));
        assert!(PusherApp::parse("1:k").is_err());
        assert_eq!(PusherApp::parse("1:k:s:t").unwrap().secret, "s:t");
    }
}
