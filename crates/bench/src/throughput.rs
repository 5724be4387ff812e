//! `--mode publish-throughput` (or `--publish-throughput`): acknowledged publications per
//! second over HTTP (issue 7: durable history, one topic and 1,000 topics).
//!
//! `--concurrency` (alias of `--publishers`) tasks share one keep-alive HTTP client, so
//! the server sees that many connections, each with one request in flight. Publication
//! `k` goes to topic `k mod --topics`: `--topic` itself when `--topics 1`, else
//! `--topic.0` ..= `--topic.(K-1)`. Point `--topic` into a `durable = true` namespace to
//! measure durable history (a 200 then means the publication is fsynced), into a memory
//! one for the in-memory path.
//!
//! Every receipt is checked: per topic, the acknowledged offsets must be contiguous with
//! no repeat, under one epoch. Anything else fails the run.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use tokio::task::JoinSet;

use super::envelope;
use super::report::Percentiles;
use super::resume::Receipt;
use super::subscriber::{new_histogram, unix_us};
use super::BenchArgs;

#[derive(Debug, Clone, Default, Serialize)]
pub struct ThroughputReport {
    pub topics: usize,
    /// Servers the publications went to, round robin (--target with --publish-via rr).
    pub servers: usize,
    /// Concurrent publishers (keep-alive connections, one request in flight each).
    pub concurrency: usize,
    pub publications: u64,
    pub payload_bytes: usize,
    pub acked: u64,
    pub failed: u64,
    pub first_error: Option<String>,
    /// From the first request to the last answer.
    pub secs: f64,
    /// Acknowledged publications per second.
    pub per_sec: f64,
    /// Request latency (send to full answer), milliseconds.
    pub ack_ms: Percentiles,
    /// Acknowledged offsets repeated or skipped within a topic.
    pub offset_errors: u64,
    /// Receipts whose epoch differs from the first one of their topic.
    pub epoch_changes: u64,
}

impl ThroughputReport {
    pub fn failures(&self) -> Vec<String> {
        let mut f = Vec::new();
        for (n, what) in [
            (self.failed, "publications failed"),
            (
                self.offset_errors,
                "acknowledged offsets repeated or skipped",
            ),
            (self.epoch_changes, "receipts changed epoch"),
        ] {
            if n > 0 {
                f.push(format!("{n} {what}"));
            }
        }
        f
    }

    pub fn write_text(&self, s: &mut String, url: &str, topic: &str) {
        use std::fmt::Write as _;
        let _ = writeln!(
            s,
            "crier bench --mode publish-throughput: {} x {} bytes to {} topic{} ({:?}{}) on {}{}, {} concurrent publishers",
            self.publications,
            self.payload_bytes,
            self.topics,
            if self.topics == 1 { "" } else { "s" },
            topic,
            if self.topics == 1 { "" } else { ".N" },
            url,
            if self.servers > 1 {
                format!(" and {} more servers round robin", self.servers - 1)
            } else {
                String::new()
            },
            self.concurrency
        );
        let _ = writeln!(
            s,
            "  acked        {} of {} in {:.2} s: {:.0} publications/s; {} failed",
            self.acked, self.publications, self.secs, self.per_sec, self.failed
        );
        if let Some(e) = &self.first_error {
            let _ = writeln!(s, "               first error: {e}");
        }
        let l = &self.ack_ms;
        let _ = writeln!(
            s,
            "  request      p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} requests)",
            l.p50, l.p90, l.p99, l.max, l.count
        );
        let _ = writeln!(
            s,
            "  receipts     offsets repeated or skipped {}, epoch changes {}",
            self.offset_errors, self.epoch_changes
        );
    }
}

/// The topic names of a run: `--topic` alone, or `--topic.0` ..= `--topic.(K-1)`.
pub fn topic_names(topic: &str, k: usize) -> Vec<String> {
    if k == 1 {
        vec![topic.to_string()]
    } else {
        (0..k).map(|i| format!("{topic}.{i}")).collect()
    }
}

/// Repeated or skipped offsets in a topic's acknowledged offsets (any order).
pub fn offset_errors(offsets: &mut [u64]) -> u64 {
    offsets.sort_unstable();
    offsets
        .windows(2)
        .map(|w| match w[1] - w[0] {
            1 => 0,
            0 => 1,
            gap => gap - 1,
        })
        .sum()
}

/// What one publisher task collected.
struct Part {
    hist: hdrhistogram::Histogram<u64>,
    /// (topic index, offset, epoch) of every acknowledged publication.
    acked: Vec<(u32, u64, Option<Box<str>>)>,
    failed: u64,
    first: Option<String>,
    last: Instant,
}

pub async fn run(args: &BenchArgs) -> anyhow::Result<ThroughputReport> {
    anyhow::ensure!(
        (1..=100_000).contains(&args.topics),
        "--topics must be 1-100000"
    );
    let names = topic_names(&args.topic, args.topics);
    anyhow::ensure!(
        names
            .iter()
            .all(|t| crier_protocol::names::is_valid_topic(t)),
        "--topic with its .N suffix must be 1-128 bytes of A-Z a-z 0-9 _ - . : @"
    );
    let bases = args.publish_bases()?;
    // Publication k goes to topic k mod K; with --publish-via rr, through server
    // (k + k / K) mod S.
    let urls: Arc<Vec<String>> = Arc::new(
        names
            .iter()
            .map(|t| format!("{}/api/publish/{t}", bases[0]))
            .collect(),
    );
    let servers: Arc<Vec<String>> = Arc::new(bases);
    let shared_names = Arc::new(names.clone());
    let client = crate::http_client(args)?;
    let total = args.messages;
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut set = JoinSet::new();
    for _ in 0..args.publishers {
        let (client, urls, next) = (client.clone(), urls.clone(), next.clone());
        let (servers, names) = (servers.clone(), shared_names.clone());
        let size = args.payload;
        set.spawn(async move {
            let mut part = Part {
                hist: new_histogram(),
                acked: Vec::new(),
                failed: 0,
                first: None,
                last: start,
            };
            loop {
                let seq = next.fetch_add(1, Ordering::Relaxed);
                if seq >= total {
                    break;
                }
                let topic = (seq % urls.len() as u64) as usize;
                let body = envelope::payload(seq, unix_us(), size);
                let other;
                let url = if servers.len() == 1 {
                    &urls[topic]
                } else {
                    // Skip by seq / K so a K that is a multiple of S does not pin topics.
                    let k = names.len() as u64;
                    let s = &servers[((seq + seq / k) % servers.len() as u64) as usize];
                    other = format!("{s}/api/publish/{}", &names[topic]);
                    &other
                };
                let t0 = Instant::now();
                let res =
                    tokio::time::timeout(Duration::from_secs(30), client.post(url, body)).await;
                part.last = Instant::now();
                let err = match res {
                    Ok(Ok((s, b))) if s.is_success() => {
                        match serde_json::from_slice::<Receipt>(&b) {
                            Ok(r) => {
                                part.acked
                                    .push((topic as u32, r.offset, r.epoch.map(Into::into)));
                                part.hist
                                    .saturating_record((part.last - t0).as_micros().max(1) as u64);
                                None
                            }
                            Err(e) => Some(format!("unreadable receipt: {e}")),
                        }
                    }
                    Ok(Ok((s, b))) => Some(format!("{s}: {}", String::from_utf8_lossy(&b))),
                    Ok(Err(e)) => Some(format!("{e:#}")),
                    Err(_) => Some("publish timed out after 30 s".into()),
                };
                if let Some(e) = err {
                    part.failed += 1;
                    part.first.get_or_insert(e);
                }
            }
            part
        });
    }
    let mut rep = ThroughputReport {
        topics: args.topics,
        servers: servers.len(),
        concurrency: args.publishers,
        publications: total,
        payload_bytes: args.payload,
        ..Default::default()
    };
    let mut hist = new_histogram();
    let mut end = start;
    let mut per_topic: Vec<Vec<u64>> = vec![Vec::new(); names.len()];
    let mut epochs: Vec<Option<Box<str>>> = vec![None; names.len()];
    while let Some(p) = set.join_next().await {
        let p = p.context("publisher panicked")?;
        let _ = hist.add(&p.hist);
        rep.failed += p.failed;
        if rep.first_error.is_none() {
            rep.first_error = p.first;
        }
        end = end.max(p.last);
        for (t, offset, epoch) in p.acked {
            per_topic[t as usize].push(offset);
            let first = &mut epochs[t as usize];
            match (first.as_ref(), epoch) {
                (None, e) => *first = e,
                (Some(a), Some(b)) if **a != *b => rep.epoch_changes += 1,
                _ => {}
            }
        }
    }
    rep.acked = per_topic.iter().map(|o| o.len() as u64).sum();
    rep.offset_errors = per_topic.iter_mut().map(|o| offset_errors(o)).sum();
    rep.secs = (end - start).as_secs_f64();
    rep.per_sec = super::report::rate_per_sec(rep.acked, end - start);
    rep.ack_ms = Percentiles::from_us(&hist);
    Ok(rep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_offset_checks() {
        assert_eq!(topic_names("t", 1), vec!["t"]);
        assert_eq!(topic_names("d:t", 3), vec!["d:t.0", "d:t.1", "d:t.2"]);
        assert_eq!(offset_errors(&mut []), 0);
        assert_eq!(offset_errors(&mut [3, 1, 2]), 0);
        assert_eq!(offset_errors(&mut [1, 2, 2, 3]), 1, "a repeat");
        assert_eq!(offset_errors(&mut [1, 4, 5]), 2, "2 and 3 skipped");
    }

    #[test]
    fn failures_are_named() {
        let ok = ThroughputReport {
            acked: 10,
            publications: 10,
            ..Default::default()
        };
        assert!(ok.failures().is_empty());
        let mut text = String::new();
        ok.write_text(&mut text, "http://127.0.0.1:1", "t");
        assert!(text.contains("acked        10 of 10"), "{text}");
        let bad = ThroughputReport {
            failed: 2,
            offset_errors: 1,
            ..ok
        };
        assert_eq!(bad.failures().len(), 2, "{:?}", bad.failures());
    }
}
