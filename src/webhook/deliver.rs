//! One task per URL: takes a batch from the URL's queue, signs it and POSTs it until the
//! receiver takes it (a 2xx), refuses it (a 4xx: counted and logged, not retried) or the
//! node stops. Timeouts, connection errors and other answers are retried with exponential
//! backoff and full jitter, from 100 ms up to 30 s, for as long as the node lives (at least
//! once), while new events wait in the bounded queue. One task per URL, so a slow or dead
//! receiver delays only its own deliveries, never fan-out or another URL.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use prometheus_client::metrics::counter::Counter;
use rand::Rng;
use tokio_util::sync::CancellationToken;

use super::batch::{body, Queue};
use super::events::now_ms;
use super::sign::Signer;
use crate::metrics::{Metrics, WebhookLabel};

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// The most of a receiver's answer read (then dropped), so the connection can be reused.
const MAX_ANSWER: usize = 64 * 1024;

/// One URL's counters, fetched once.
#[derive(Clone)]
pub struct Counters {
    pub queued: Counter,
    pub delivered: Counter,
    pub dropped: Counter,
    pub refused: Counter,
    pub retried: Counter,
}

impl Counters {
    pub fn new(metrics: &Metrics, url: &str) -> Self {
        let c = |outcome| {
            metrics
                .webhook_events
                .get_or_create(&WebhookLabel {
                    url: url.to_string(),
                    outcome,
                })
                .clone()
        };
        Counters {
            queued: c("queued"),
            delivered: c("delivered"),
            dropped: c("dropped"),
            refused: c("refused"),
            retried: c("retried"),
        }
    }
}

pub struct Target {
    pub url: String,
    /// A Pusher app's webhook (docs/pusher.md): signed with `X-Pusher-Key` and
    /// `X-Pusher-Signature` (hex HMAC-SHA256 of the body with the app's secret) instead of
    /// crier's headers.
    pub pusher: Option<PusherSigning>,
    pub queue: Queue,
    pub counters: Counters,
    /// Drops not yet logged (one line per 10 s at most).
    pub unlogged_drops: AtomicU64,
}

pub struct PusherSigning {
    pub key: String,
    pub secret: ring::hmac::Key,
}

pub struct Settings {
    pub signer: Signer,
    pub batch_max: usize,
    pub linger: Duration,
    pub timeout: Duration,
}

enum Outcome {
    Delivered,
    Refused(u16),
    Retry(String),
}

pub async fn run(target: Arc<Target>, settings: Arc<Settings>, stop: CancellationToken) {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let mut seq: u64 = 0;
    let mut last_drop_log = Instant::now() - Duration::from_secs(10);
    loop {
        let batch = tokio::select! {
            _ = stop.cancelled() => return,
            b = target.queue.next_batch(settings.batch_max, settings.linger) => b,
        };
        seq += 1;
        let delivery = format!("{}-{seq}", std::process::id());
        let payload = Bytes::from(body(now_ms(), &batch));
        let mut backoff = FIRST_BACKOFF;
        loop {
            log_drops(&target, &mut last_drop_log);
            let outcome = tokio::select! {
                _ = stop.cancelled() => return,
                o = post(&client, &target, &settings, &delivery, payload.clone()) => o,
            };
            match outcome {
                Outcome::Delivered => {
                    target.counters.delivered.inc_by(batch.len() as u64);
                    break;
                }
                Outcome::Refused(status) => {
                    target.counters.refused.inc_by(batch.len() as u64);
                    tracing::warn!(
                        url = %target.url,
                        status,
                        events = batch.len(),
                        "webhook receiver refused a delivery (4xx): not retried"
                    );
                    break;
                }
                Outcome::Retry(why) => {
                    target.counters.retried.inc_by(batch.len() as u64);
                    let wait = rand::thread_rng().gen_range(Duration::ZERO..=backoff);
                    tracing::debug!(url = %target.url, %why, ?wait, "webhook delivery failed, retrying");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(wait) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}

/// At most one line per 10 s about events dropped from a full queue.
fn log_drops(target: &Target, last: &mut Instant) {
    if last.elapsed() < Duration::from_secs(10) {
        return;
    }
    let n = target.unlogged_drops.swap(0, Ordering::Relaxed);
    if n > 0 {
        *last = Instant::now();
        tracing::warn!(
            url = %target.url,
            dropped = n,
            "webhook queue full: oldest events dropped (webhook_queue_max)"
        );
    }
}

async fn post(
    client: &Client<HttpConnector, Full<Bytes>>,
    target: &Target,
    settings: &Settings,
    delivery: &str,
    payload: Bytes,
) -> Outcome {
    let url = target.url.as_str();
    let timestamp = now_ms() / 1000;
    let builder = hyper::Request::post(url)
        .header("content-type", "application/json")
        .header("user-agent", concat!("crier/", env!("CARGO_PKG_VERSION")));
    let builder = match &target.pusher {
        Some(p) => {
            let tag = ring::hmac::sign(&p.secret, &payload);
            let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
            builder
                .header("x-pusher-key", p.key.as_str())
                .header("x-pusher-signature", hex)
        }
        None => builder
            .header("x-crier-timestamp", timestamp.to_string())
            .header(
                "x-crier-signature",
                settings.signer.sign(timestamp, &payload),
            )
            .header("x-crier-delivery", delivery),
    };
    let req = match builder.body(Full::new(payload)) {
        Ok(r) => r,
        // The URL was checked at start; a request that cannot be built never will be.
        Err(e) => return Outcome::Refused(0).tap_log(url, &e.to_string()),
    };
    let answer = async {
        let res = client.request(req).await.map_err(|e| e.to_string())?;
        let status = res.status();
        let _ = Limited::new(res.into_body(), MAX_ANSWER).collect().await;
        Ok::<_, String>(status)
    };
    match tokio::time::timeout(settings.timeout, answer).await {
        Err(_) => Outcome::Retry("timed out".into()),
        Ok(Err(e)) => Outcome::Retry(e),
        Ok(Ok(s)) if s.is_success() => Outcome::Delivered,
        Ok(Ok(s)) if s.is_client_error() => Outcome::Refused(s.as_u16()),
        Ok(Ok(s)) => Outcome::Retry(format!("status {s}")),
    }
}

impl Outcome {
    fn tap_log(self, url: &str, why: &str) -> Self {
        tracing::warn!(url, why, "webhook request cannot be built");
        self
    }
}
