//! `--mode presence`: N WebSocket clients join one presence topic (--topic, whose
//! `[[namespace]]` must have `presence = true`), spread over --target servers; how long
//! until every `subscribed` reply (each waits for its member to be written) and until every
//! server counts all N (`GET .../presence/stats`), the latency of stats and member-page
//! reads at that size, and how long until every server counts 0 once all have left. Server
//! CPU and memory per member are the caller's to read (scripts/bench-presence reads them
//! from /proc around the run).
//!
//! Use a namespace without `join_leave` for large N: with it, each join is told to every
//! member already there (N²/2 notices), which this mode does not read.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::report::Percentiles;
use super::subscriber::{self, new_histogram, Shared};
use super::BenchArgs;
use crier_protocol::http_client::HttpClient;

#[derive(Debug, Clone, Default, Serialize)]
pub struct PresenceReport {
    pub members: usize,
    pub servers: usize,
    pub connect_failed: usize,
    pub first_error: Option<String>,
    /// From the first connect to the last `subscribed` reply (each member written).
    pub join_secs: f64,
    /// From the first connect until every server's stats counted every member.
    pub visible_secs: f64,
    /// Sequential `GET /api/topics/{topic}/presence/stats` at N members, milliseconds.
    pub stats_ms: Percentiles,
    /// Sequential first pages (`limit=1000`) of the member list at N members, milliseconds.
    pub page_ms: Percentiles,
    /// From closing every connection until every server counted 0.
    pub leave_secs: f64,
    /// With --server-pid: that server's VmRSS before the first connect and once every
    /// server counted every member (connections and members: a WebSocket alone is ~4.5 KB).
    pub rss_before_kib: Option<u64>,
    pub rss_joined_kib: Option<u64>,
}

impl PresenceReport {
    pub fn failures(&self) -> Vec<String> {
        let mut f = Vec::new();
        if self.connect_failed > 0 {
            f.push(format!("{} members failed to join", self.connect_failed));
        }
        f
    }

    pub fn write_text(&self, s: &mut String, topic: &str) {
        use std::fmt::Write;
        let _ = writeln!(
            s,
            "crier bench --mode presence: {} members of {topic:?} over {} server(s)",
            self.members, self.servers
        );
        let _ = writeln!(
            s,
            "  joined (every subscribed reply) in {:.2} s; every server counts them after {:.2} s",
            self.join_secs, self.visible_secs
        );
        let _ = writeln!(
            s,
            "  stats at {} members: p50 {:.3} ms p99 {:.3} ms; a page of 1000: p50 {:.2} ms p99 {:.2} ms",
            self.members, self.stats_ms.p50, self.stats_ms.p99, self.page_ms.p50, self.page_ms.p99
        );
        let _ = writeln!(
            s,
            "  all left, every server counts 0 after {:.2} s",
            self.leave_secs
        );
        if let (Some(b), Some(a)) = (self.rss_before_kib, self.rss_joined_kib) {
            let _ = writeln!(
                s,
                "  --server-pid VmRSS {b} -> {a} KiB: {:.0} bytes per joined connection",
                (a.saturating_sub(b) * 1024) as f64 / self.members.max(1) as f64
            );
        }
        if let Some(e) = &self.first_error {
            let _ = writeln!(s, "  first error: {e}");
        }
    }
}

async fn clients(http: &HttpClient, base: &str, topic: &str) -> anyhow::Result<u64> {
    let (status, body) = http
        .get(&format!("{base}/api/topics/{topic}/presence/stats"))
        .await
        .context("presence stats")?;
    if !status.is_success() {
        bail!(
            "presence stats: {status} {}",
            String::from_utf8_lossy(&body)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&body).context("stats JSON")?;
    Ok(v["clients"].as_u64().unwrap_or(0))
}

/// Polls every server until each counts `n` members, or `timeout`.
async fn until_counted(
    http: &HttpClient,
    bases: &[String],
    topic: &str,
    n: u64,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    for base in bases {
        loop {
            if clients(http, base, topic).await? == n {
                break;
            }
            if Instant::now() > deadline {
                bail!("{base} did not count {n} members within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    Ok(())
}

pub async fn run(
    args: &BenchArgs,
    shared: Arc<Shared>,
    bases: Vec<String>,
) -> anyhow::Result<PresenceReport> {
    let http = HttpClient::new(None);
    let topic = &args.topic;
    let n = args.subscribers;
    let mut report = PresenceReport {
        members: n,
        servers: bases.len(),
        ..Default::default()
    };
    report.rss_before_kib = args.server_pid.and_then(super::rss_kib);
    let start = Instant::now();
    let gate = Arc::new(Semaphore::new(args.connect_concurrency));
    let mut joins = JoinSet::new();
    for i in 0..n {
        let shared = shared.clone();
        let gate = gate.clone();
        joins.spawn(async move {
            let _permit = gate.acquire_owned().await;
            subscriber::ws_open(&shared, i, None)
                .await
                .map(|(c, d, _)| (c, d))
        });
    }
    let mut held = Vec::with_capacity(n);
    while let Some(r) = joins.join_next().await {
        match r.context("join task")? {
            Ok(c) => held.push(c),
            Err(e) => {
                report.connect_failed += 1;
                report.first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    report.join_secs = start.elapsed().as_secs_f64();
    let members = held.len() as u64;
    until_counted(&http, &bases, topic, members, args.timeout).await?;
    report.visible_secs = start.elapsed().as_secs_f64();
    report.rss_joined_kib = args.server_pid.and_then(super::rss_kib);

    let mut stats = new_histogram();
    let mut pages = new_histogram();
    for i in 0..200 {
        let base = &bases[i % bases.len()];
        let t = Instant::now();
        clients(&http, base, topic).await?;
        let _ = stats.record(t.elapsed().as_micros() as u64);
        if i % 4 == 0 {
            let t = Instant::now();
            let (status, _) = http
                .get(&format!("{base}/api/topics/{topic}/presence?limit=1000"))
                .await
                .context("presence page")?;
            if !status.is_success() {
                bail!("presence page: {status}");
            }
            let _ = pages.record(t.elapsed().as_micros() as u64);
        }
    }
    report.stats_ms = Percentiles::from_us(&stats);
    report.page_ms = Percentiles::from_us(&pages);

    let left = Instant::now();
    drop(held);
    until_counted(&http, &bases, topic, 0, args.timeout).await?;
    report.leave_secs = left.elapsed().as_secs_f64();
    Ok(report)
}
