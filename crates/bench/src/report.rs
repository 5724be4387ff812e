//! The result of one `crier bench` run: plain numbers, printed as text or as one JSON
//! object. The arithmetic lives here, apart from the networking, so it can be tested.

use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::attack::AttackReport;
use super::board::{BoardReport, ScoresReport};
use super::offsets::Tally;
use super::resume::ResumeReport;
use super::throughput::ThroughputReport;

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Percentiles {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    /// From a histogram of microseconds, in milliseconds.
    pub fn from_us(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Percentiles::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Percentiles {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            max: ms(h.max()),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct StalledReport {
    pub opened: usize,
    /// Closed by the server by the end of the run (close frame, EOF or reset).
    pub disconnected: usize,
    /// Close codes seen in the server's close frames, e.g. 4001 (slow_consumer).
    pub close_codes: Vec<u16>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct IdleReport {
    pub hold_secs: f64,
    pub rss_before_kib: Option<u64>,
    pub rss_after_kib: Option<u64>,
    /// (after - before) / connected subscribers, in bytes.
    pub bytes_per_connection: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// fanout, scores or board.
    pub mode: String,
    pub url: String,
    /// --target: every server of the run (empty for one).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<String>,
    /// --publish-via: the target index publications went through, or `rr`.
    pub publish_via: String,
    /// With several targets: each one's subscribers and their publish-to-receive latency.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub per_target: Vec<TargetReport>,
    pub transport: String,
    pub topic: String,
    /// What subscribers sent as `?token=`: none, fixed (--token) or minted (one per
    /// subscriber, --token-secret).
    pub tokens: String,
    pub subscribers: usize,
    pub connected: usize,
    pub connect_failed: usize,
    pub first_connect_error: Option<String>,
    /// From the first connect to the last `subscribed` reply.
    pub connect_total_ms: f64,
    /// Per connection: connect + handshake + `subscribed` reply (milliseconds).
    pub connect_ms: Percentiles,
    pub messages: u64,
    pub published: u64,
    pub publish_errors: u64,
    pub first_publish_error: Option<String>,
    pub payload_bytes: usize,
    /// 0 for a burst.
    pub rate: f64,
    pub publish_secs: f64,
    pub expected_deliveries: u64,
    pub received_deliveries: u64,
    /// Distinct expected offsets received, summed over subscribers.
    pub delivered: u64,
    /// From the first publish to the last delivery.
    pub delivery_secs: f64,
    pub deliveries_per_sec: f64,
    pub lost: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    pub unexpected: u64,
    /// Healthy subscribers the server closed during the run.
    pub subscribers_closed: usize,
    pub timed_out: bool,
    /// Publish-to-receive latency, milliseconds.
    pub latency_ms: Percentiles,
    /// With --server-pid: the server's CPU per second (cores busy) from the first publish
    /// until the deliveries were in.
    pub server_cpu_cores: Option<f64>,
    /// Fanout: topics the subscribers spread over (`--topics`; 1 is --topic alone).
    pub topics: usize,
    /// Fanout with --server-pid: the server's CPU time (user + system) from the first
    /// publish until the deliveries were in, divided by the publications (microseconds).
    pub server_cpu_us_per_publication: Option<f64>,
    pub stalled: Option<StalledReport>,
    pub idle: Option<IdleReport>,
    /// --mode scores.
    pub scores: Option<ScoresReport>,
    /// --mode board.
    pub board: Option<BoardReport>,
    /// --mode follow.
    pub follow: Option<super::follow::FollowReport>,
    /// --attack.
    pub attack: Option<AttackReport>,
    /// --mode resume-storm.
    pub resume: Option<ResumeReport>,
    /// --mode publish-throughput.
    pub throughput: Option<ThroughputReport>,
    /// --mode presence.
    pub presence: Option<super::presence::PresenceReport>,
    /// --mode pusher and pusher-api.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pusher: Option<super::pusher::PusherReport>,
}

/// One server of a multi-target fanout run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TargetReport {
    pub url: String,
    /// Subscribers sent to this target (connected or not).
    pub subscribers: usize,
    /// Publish-to-receive of this target's subscribers (count = their deliveries).
    pub latency_ms: Percentiles,
}

/// Deliveries per second over `elapsed`; 0 when nothing can be said.
pub fn rate_per_sec(count: u64, elapsed: Duration) -> f64 {
    let s = elapsed.as_secs_f64();
    if s <= 0.0 {
        0.0
    } else {
        count as f64 / s
    }
}

/// Bytes per connection from two VmRSS readings in KiB.
pub fn bytes_per_connection(before_kib: u64, after_kib: u64, connections: usize) -> Option<f64> {
    if connections == 0 {
        return None;
    }
    Some((after_kib as f64 - before_kib as f64) * 1024.0 / connections as f64)
}

impl Report {
    pub fn apply_tally(&mut self, t: &Tally) {
        self.expected_deliveries = t.expected;
        self.received_deliveries = t.received;
        self.delivered = t.delivered;
        self.lost = t.lost;
        self.duplicates = t.duplicates;
        self.out_of_order = t.out_of_order;
        self.unexpected = t.unexpected;
    }

    /// Why this run counts as failed, if it does: connections that failed, or (outside a
    /// stalled run) any loss, duplicate or out-of-order delivery.
    pub fn failures(&self) -> Vec<String> {
        let mut f = Vec::new();
        if self.connect_failed > 0 {
            f.push(format!("{} connections failed", self.connect_failed));
        }
        if self.publish_errors > 0 {
            f.push(format!("{} publications failed", self.publish_errors));
        }
        if let Some(r) = &self.resume {
            return r.failures();
        }
        if let Some(t) = &self.throughput {
            return t.failures();
        }
        if let Some(p) = &self.presence {
            return p.failures();
        }
        if let Some(p) = &self.pusher {
            return p.failures();
        }
        if let Some(sc) = &self.scores {
            if sc.requests_failed > 0 {
                f.push(format!("{} score requests failed", sc.requests_failed));
            }
            return f;
        }
        if let Some(fo) = &self.follow {
            f.extend(fo.failures());
            return f;
        }
        if let Some(b) = &self.board {
            if b.post_errors > 0 {
                f.push(format!("{} leader posts failed", b.post_errors));
            }
            if b.never_seen > 0 {
                f.push(format!(
                    "{} (watcher, post) pairs never saw the leader",
                    b.never_seen
                ));
            }
            return f;
        }
        if let Some(a) = &self.attack {
            // Attackers being refused or closed is the server doing its job; the healthy
            // subscribers losing anything, or being closed, is the attack succeeding.
            if self.subscribers_closed > 0 {
                f.push(format!(
                    "{} healthy subscribers closed during the attack",
                    self.subscribers_closed
                ));
            }
            if let Some(b) = &a.baseline {
                if b.lost > 0 {
                    f.push(format!("{} deliveries lost in the baseline run", b.lost));
                }
            }
        }
        if self.stalled.as_ref().is_none_or(|s| s.opened == 0) {
            for (n, what) in [
                (self.lost, "lost"),
                (self.duplicates, "duplicated"),
                (self.out_of_order, "out of order"),
            ] {
                if n > 0 {
                    f.push(format!("{n} deliveries {what}"));
                }
            }
        }
        f
    }

    fn publish_via_text(&self) -> String {
        match self.publish_via.as_str() {
            "rr" => "every target, round robin".to_string(),
            i => format!("target {i}"),
        }
    }

    pub fn to_text(&self) -> String {
        let mut s = String::new();
        if let Some(t) = &self.throughput {
            t.write_text(&mut s, &self.url, &self.topic);
            return s;
        }
        if let Some(p) = &self.presence {
            p.write_text(&mut s, &self.topic);
            return s;
        }
        if let Some(p) = &self.pusher {
            p.write_text(&mut s, &self.url);
            return s;
        }
        if let Some(r) = &self.resume {
            let _ = writeln!(
                s,
                "crier bench --mode resume-storm: {} {} clients of {} topic {:?}, {} publications x {} bytes while away",
                self.subscribers, self.transport, self.url, self.topic, self.messages, self.payload_bytes
            );
            r.write_text(&mut s);
            return s;
        }
        if let Some(sc) = &self.scores {
            let _ = writeln!(
                s,
                "crier bench --mode scores: {} on {}{}, {} scores in batches of {} over {} connections, {} players",
                if sc.boards > 1 {
                    format!("{} boards {:?}.N", sc.boards, sc.board)
                } else {
                    format!("board {:?}", sc.board)
                },
                self.url,
                if sc.servers > 1 {
                    format!(" and {} more servers round robin", sc.servers - 1)
                } else {
                    String::new()
                },
                sc.scores,
                sc.batch,
                sc.publishers,
                sc.players
            );
            let _ = writeln!(
                s,
                "  ingest       {} scores acknowledged (durable) in {:.2} s: {:.0} scores/s, {:.0} requests/s; {} of {} requests failed",
                sc.scores_acked, sc.secs, sc.scores_per_sec, sc.requests_per_sec, sc.requests_failed, sc.requests
            );
            if let Some(e) = &sc.first_error {
                let _ = writeln!(s, "               first error: {e}");
            }
            let l = &sc.request_ms;
            let _ = writeln!(
                s,
                "  request      p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} requests)",
                l.p50, l.p90, l.p99, l.max, l.count
            );
            return s;
        }
        let _ = writeln!(
            s,
            "crier bench: {} {} subscribers on {} topic {:?}{}",
            self.subscribers,
            self.transport,
            self.url,
            self.topic,
            match self.tokens.as_str() {
                "" | "none" => String::new(),
                t => format!(" (tokens: {t})"),
            }
        );
        let _ = writeln!(
            s,
            "  connect      {} ok, {} failed in {:.0} ms (per connection p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms)",
            self.connected,
            self.connect_failed,
            self.connect_total_ms,
            self.connect_ms.p50,
            self.connect_ms.p99,
            self.connect_ms.max
        );
        if let Some(e) = &self.first_connect_error {
            let _ = writeln!(s, "               first error: {e}");
        }
        if let Some(fo) = &self.follow {
            fo.text(&mut s);
            return s;
        }
        if let Some(b) = &self.board {
            let _ = writeln!(
                s,
                "  posts        {} of {} new leaders at {}/s, {} failed (POST p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms)",
                b.posts_ok, b.posts, b.rate, b.post_errors, b.post_ms.p50, b.post_ms.p99, b.post_ms.max
            );
            if let Some(e) = &b.first_post_error {
                let _ = writeln!(s, "               first error: {e}");
            }
            let _ = writeln!(
                s,
                "  seen         {} (watcher, post) pairs: {} first-hand, {} only via a later leader, {} never{}; {} updates, {} watchers closed",
                b.pairs,
                b.seen_first_hand,
                b.seen_later,
                b.never_seen,
                if b.timed_out { " (timed out)" } else { "" },
                b.updates,
                b.watchers_closed
            );
            let l = &b.latency_ms;
            let _ = writeln!(
                s,
                "  latency      POST answered -> watcher sees leader: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} samples, {} before the answer)",
                l.p50, l.p90, l.p99, l.max, l.count, b.before_return
            );
            return s;
        }
        if let Some(idle) = &self.idle {
            let kib = |v: Option<u64>| v.map_or("-".to_string(), |v| format!("{v} KiB"));
            let _ = writeln!(
                s,
                "  idle         held {:.0} s; server RSS {} -> {}; {} per connection",
                idle.hold_secs,
                kib(idle.rss_before_kib),
                kib(idle.rss_after_kib),
                idle.bytes_per_connection
                    .map_or("-".to_string(), |b| format!("{b:.0} bytes"))
            );
            return s;
        }
        let mode = if self.rate > 0.0 {
            format!("steady {}/s", self.rate)
        } else {
            "burst".to_string()
        };
        let _ = writeln!(
            s,
            "  publish      {} of {} messages x {} bytes ({mode}) in {:.2} s, {} failed",
            self.published,
            self.messages,
            self.payload_bytes,
            self.publish_secs,
            self.publish_errors
        );
        if let Some(e) = &self.first_publish_error {
            let _ = writeln!(s, "               first error: {e}");
        }
        let _ = writeln!(
            s,
            "  deliveries   {} received of {} expected in {:.3} s: {:.0} deliveries/s{}",
            self.received_deliveries,
            self.expected_deliveries,
            self.delivery_secs,
            self.deliveries_per_sec,
            if self.timed_out { " (timed out)" } else { "" }
        );
        let _ = writeln!(
            s,
            "  integrity    lost {}, duplicates {}, out of order {}, unexpected {}, subscribers closed {}",
            self.lost, self.duplicates, self.out_of_order, self.unexpected, self.subscribers_closed
        );
        let l = &self.latency_ms;
        let _ = writeln!(
            s,
            "  latency      p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} samples)",
            l.p50, l.p90, l.p99, l.max, l.count
        );
        if self.topics > 1 {
            let _ = writeln!(
                s,
                "  topics       {} ({}.0 ..= {}.{}), publications round robin",
                self.topics,
                self.topic,
                self.topic,
                self.topics - 1
            );
        }
        if let (Some(cores), Some(us)) = (self.server_cpu_cores, self.server_cpu_us_per_publication)
        {
            let _ = writeln!(
                s,
                "  server CPU   {cores:.2} cores busy, {us:.1} us per publication"
            );
        }
        if !self.per_target.is_empty() {
            let _ = writeln!(s, "  publishing   through {}", self.publish_via_text());
        }
        for (i, t) in self.per_target.iter().enumerate() {
            let l = &t.latency_ms;
            let _ = writeln!(
                s,
                "  target {i:<5} {} ({} subscribers): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} samples)",
                t.url, t.subscribers, l.p50, l.p99, l.max, l.count
            );
        }
        if let Some(st) = &self.stalled {
            let _ = writeln!(
                s,
                "  stalled      {} opened, {} disconnected by the server (close codes {:?})",
                st.opened, st.disconnected, st.close_codes
            );
        }
        if let Some(a) = &self.attack {
            a.write_text(&mut s);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_and_memory_math() {
        assert_eq!(rate_per_sec(2_000_000, Duration::from_secs(2)), 1_000_000.0);
        assert_eq!(rate_per_sec(5, Duration::ZERO), 0.0);
        assert_eq!(
            rate_per_sec(1500, Duration::from_millis(500)).round(),
            3000.0
        );
        assert_eq!(bytes_per_connection(1000, 1010, 10), Some(1024.0));
        assert_eq!(bytes_per_connection(1000, 990, 10), Some(-1024.0));
        assert_eq!(bytes_per_connection(1, 2, 0), None);
    }

    #[test]
    fn percentiles_in_ms() {
        let mut h = Histogram::<u64>::new(3).unwrap();
        for us in 1..=1000u64 {
            h.record(us * 100).unwrap();
        }
        let p = Percentiles::from_us(&h);
        assert_eq!(p.count, 1000);
        assert!((p.p50 - 50.0).abs() < 0.1, "{p:?}");
        assert!((p.p99 - 99.0).abs() < 0.1, "{p:?}");
        assert!((p.max - 100.0).abs() < 0.1, "{p:?}");
        assert_eq!(
            Percentiles::from_us(&Histogram::new(3).unwrap()),
            Percentiles::default()
        );
    }

    #[test]
    fn failure_rules() {
        let mut r = Report::default();
        assert!(r.failures().is_empty());
        r.apply_tally(&Tally {
            expected: 10,
            received: 9,
            delivered: 9,
            lost: 1,
            ..Default::default()
        });
        assert_eq!(r.failures(), vec!["1 deliveries lost".to_string()]);
        // A stalled run tolerates integrity errors (stalled clients are meant to lose)...
        r.stalled = Some(StalledReport {
            opened: 2,
            ..Default::default()
        });
        assert!(r.failures().is_empty());
        // ...but never failed connections.
        r.connect_failed = 1;
        assert_eq!(r.failures().len(), 1);
        let text = r.to_text();
        assert!(text.contains("lost 1"), "{text}");
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["lost"], 1);
    }
}
