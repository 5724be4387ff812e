//! Prometheus metrics, all prefixed `crier_`. Hot-path updates are single atomic adds; the
//! delivery-latency histogram is observed once per socket write batch, not per message.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::close::DisconnectReason;
use crate::sharded_metrics::{ShardedCounter, ShardedHistogram};

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Transport {
    Ws,
    Sse,
    /// A WebSocket speaking the Pusher Channels protocol (`/app/{key}`, src/pusher/).
    Pusher,
}

impl EncodeLabelValue for Transport {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        encoder.write_str(self.name())
    }
}

impl Transport {
    pub const ALL: [Transport; 3] = [Transport::Ws, Transport::Sse, Transport::Pusher];

    pub fn name(self) -> &'static str {
        match self {
            Transport::Ws => "ws",
            Transport::Sse => "sse",
            Transport::Pusher => "pusher",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabel {
    pub transport: Transport,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub transport: Transport,
    pub reason: &'static str,
}

/// Why a TCP connection was refused at accept time (see `conn_limits::Refusal`).
/// How a resume ended (`crier_resumes_total`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResumeLabel {
    pub result: &'static str,
}

/// One webhook URL and what happened to its events (`crier_webhook_events_total`):
/// `queued`, `delivered`, `dropped` (queue full), `refused` (a 4xx answer), and
/// `retried` (events in a POST that failed and is sent again).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WebhookLabel {
    pub url: String,
    pub outcome: &'static str,
}

/// A Pusher app (`crier_pusher_connections`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AppLabel {
    pub app: String,
}

/// A Pusher app's events by where they came from (`crier_pusher_events_total`): `api`
/// (one per channel of a trigger) or `client` (client events).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AppEventLabel {
    pub app: String,
    pub source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabel {
    pub reason: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub connections: Family<TransportLabel, Gauge>,
    pub subscriptions: Gauge,
    pub topics: Gauge,
    pub topics_evicted: Counter,
    pub topics_refused: Counter,
    pub subscriber_topics: Gauge,
    pub history_bytes: Gauge,
    pub history_publications: Gauge,
    pub history_evicted: Counter,
    pub resumes: Family<ResumeLabel, Counter>,
    pub idempotent_replays: Counter,
    pub durable_commits: Counter,
    pub durable_commit_seconds: Histogram,
    pub publications: Counter,
    pub deliveries: Family<TransportLabel, ShardedCounter>,
    pub bytes_out: Family<TransportLabel, ShardedCounter>,
    pub disconnects: Family<ReasonLabel, Counter>,
    pub slow_consumer_disconnects: Counter,
    pub queue_full_drops: Counter,
    pub conflated: Counter,
    pub delivery_latency: ShardedHistogram,
    pub rejected_connections: Counter,
    pub scores: Counter,
    pub board_updates: Counter,
    /// Its label sets are created by `ConnLimits::new`, so dashboards see zeros.
    pub refused_connections: Family<RefusalLabel, Counter>,
    pub sockets: Gauge,
    pub tracked_ips: Gauge,
    pub accept_errors: Counter,
    pub redis_up: Gauge,
    pub redis_reconnects: Counter,
    pub redis_errors: Counter,
    pub webhook_events: Family<WebhookLabel, Counter>,
    pub pusher_connections: Family<AppLabel, Gauge>,
    pub pusher_events: Family<AppEventLabel, Counter>,
    /// Handles into the families above, fetched once so the write path does no lookup.
    per_transport: [PerTransport; 3],
}

#[derive(Clone, Default)]
struct PerTransport {
    deliveries: ShardedCounter,
    bytes_out: ShardedCounter,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("crier");
        let m = Metrics {
            connections: Family::default(),
            subscriptions: Gauge::default(),
            topics: Gauge::default(),
            topics_evicted: Counter::default(),
            topics_refused: Counter::default(),
            subscriber_topics: Gauge::default(),
            history_bytes: Gauge::default(),
            history_publications: Gauge::default(),
            history_evicted: Counter::default(),
            resumes: Family::default(),
            idempotent_replays: Counter::default(),
            durable_commits: Counter::default(),
            durable_commit_seconds: Histogram::new([
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0,
            ]),
            publications: Counter::default(),
            deliveries: Family::default(),
            bytes_out: Family::default(),
            disconnects: Family::default(),
            slow_consumer_disconnects: Counter::default(),
            queue_full_drops: Counter::default(),
            conflated: Counter::default(),
            delivery_latency: ShardedHistogram::new(&[
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
            rejected_connections: Counter::default(),
            scores: Counter::default(),
            board_updates: Counter::default(),
            refused_connections: Family::default(),
            sockets: Gauge::default(),
            tracked_ips: Gauge::default(),
            accept_errors: Counter::default(),
            redis_up: Gauge::default(),
            redis_reconnects: Counter::default(),
            redis_errors: Counter::default(),
            webhook_events: Family::default(),
            pusher_connections: Family::default(),
            pusher_events: Family::default(),
            registry: Registry::default(),
            per_transport: Default::default(),
        };
        registry.register(
            "connections",
            "Open subscriber connections",
            m.connections.clone(),
        );
        registry.register(
            "subscriptions",
            "Topic subscriptions held by connections",
            m.subscriptions.clone(),
        );
        registry.register("topics", "Topics tracked by this node", m.topics.clone());
        registry.register(
            "topics_evicted",
            "Idle topics dropped to make room for a new one (their offsets restart in a new epoch)",
            m.topics_evicted.clone(),
        );
        registry.register(
            "topics_refused",
            "New topics refused because max_topics or max_subscriber_topics was reached",
            m.topics_refused.clone(),
        );
        registry.register(
            "subscriber_topics",
            "Topics that exist only because clients subscribed (never published to)",
            m.subscriber_topics.clone(),
        );
        registry.register(
            "history_bytes",
            "Bytes of topic history (and remembered idempotency keys) kept, against history_max_bytes",
            m.history_bytes.clone(),
        );
        registry.register(
            "history_publications",
            "Publications kept in topic history",
            m.history_publications.clone(),
        );
        registry.register(
            "history_evicted",
            "Publications dropped from history by its count, age or byte limits, or with their topic",
            m.history_evicted.clone(),
        );
        registry.register(
            "resumes",
            "Subscriptions with a resume position, by result (recovered, not_recovered)",
            m.resumes.clone(),
        );
        registry.register(
            "idempotent_replays",
            "Publishes answered with an earlier receipt because of a repeated Idempotency-Key",
            m.idempotent_replays.clone(),
        );
        registry.register(
            "durable_commits",
            "Transactions committed (each one fsync) by the durable history log",
            m.durable_commits.clone(),
        );
        registry.register(
            "durable_commit_seconds",
            "Time of one durable history commit (a group of publications, fsync included)",
            m.durable_commit_seconds.clone(),
        );
        registry.register(
            "publications",
            "Publications accepted",
            m.publications.clone(),
        );
        registry.register(
            "deliveries",
            "Publications written to subscriber sockets",
            m.deliveries.clone(),
        );
        registry.register(
            "bytes_out",
            "Bytes written to subscriber sockets",
            m.bytes_out.clone(),
        );
        registry.register(
            "disconnects",
            "Closed subscriber connections by reason",
            m.disconnects.clone(),
        );
        registry.register(
            "slow_consumer_disconnects",
            "Clients disconnected because their queue passed queue_max_bytes",
            m.slow_consumer_disconnects.clone(),
        );
        registry.register(
            "queue_full_drops",
            "Queued messages dropped with a slow consumer's queue",
            m.queue_full_drops.clone(),
        );
        registry.register(
            "conflated",
            "State updates replaced in a queue by a newer one before being sent",
            m.conflated.clone(),
        );
        registry.register(
            "delivery_latency_seconds",
            "From publish to socket write, per write batch (its oldest message)",
            m.delivery_latency.clone(),
        );
        registry.register(
            "rejected_connections",
            "Subscriber connections refused because max_connections was reached",
            m.rejected_connections.clone(),
        );
        registry.register(
            "scores",
            "Leaderboard scores accepted (durable)",
            m.scores.clone(),
        );
        registry.register(
            "board_updates",
            "Leaderboard live updates published",
            m.board_updates.clone(),
        );
        registry.register(
            "refused_connections",
            "TCP connections refused at accept, by reason (max_sockets, per_ip, connect_rate)",
            m.refused_connections.clone(),
        );
        registry.register(
            "sockets",
            "Open TCP connections of any kind (subscribers and plain HTTP)",
            m.sockets.clone(),
        );
        registry.register(
            "tracked_ips",
            "Client addresses in the per-IP connection table",
            m.tracked_ips.clone(),
        );
        registry.register(
            "accept_errors",
            "Failed accept calls (EMFILE and friends), each followed by a back-off",
            m.accept_errors.clone(),
        );
        registry.register(
            "redis_up",
            "1 while Redis answers this node's health checks and its pub/sub connection is subscribed (0 without --redis)",
            m.redis_up.clone(),
        );
        registry.register(
            "redis_reconnects",
            "Times a lost Redis connection (commands or pub/sub) was made again",
            m.redis_reconnects.clone(),
        );
        registry.register(
            "redis_errors",
            "Redis commands that failed or timed out (publishes, reads, health checks)",
            m.redis_errors.clone(),
        );
        registry.register(
            "webhook_events",
            "Webhook events per URL and outcome: queued, delivered, dropped (queue full), \
             refused (4xx), retried",
            m.webhook_events.clone(),
        );
        registry.register(
            "pusher_connections",
            "Open Pusher protocol connections per app (docs/pusher.md)",
            m.pusher_connections.clone(),
        );
        registry.register(
            "pusher_events",
            "Events published per Pusher app: source api (one per channel of a trigger) or \
             client (client events)",
            m.pusher_events.clone(),
        );
        // Pre-create label sets so dashboards see zeros rather than missing series.
        for transport in Transport::ALL {
            let _ = m.connections.get_or_create(&TransportLabel { transport });
            let _ = m.deliveries.get_or_create(&TransportLabel { transport });
            for reason in DisconnectReason::ALL {
                let _ = m.disconnects.get_or_create(&ReasonLabel {
                    transport,
                    reason: reason.label(),
                });
            }
        }
        let per_transport = Transport::ALL.map(|transport| PerTransport {
            deliveries: m
                .deliveries
                .get_or_create(&TransportLabel { transport })
                .clone(),
            bytes_out: m
                .bytes_out
                .get_or_create(&TransportLabel { transport })
                .clone(),
        });
        Metrics {
            registry,
            per_transport,
            ..m
        }
    }

    pub fn connections(&self, transport: Transport) -> Gauge {
        self.connections
            .get_or_create(&TransportLabel { transport })
            .clone()
    }

    /// A subscribe that asked to resume: whether every publication after its position was
    /// replayed. Nothing is recorded for a subscribe without a position.
    pub fn record_resume(&self, recovered: Option<bool>) {
        if let Some(r) = recovered {
            let result = if r { "recovered" } else { "not_recovered" };
            self.resumes.get_or_create(&ResumeLabel { result }).inc();
        }
    }

    pub fn record_disconnect(&self, transport: Transport, reason: DisconnectReason) {
        self.disconnects
            .get_or_create(&ReasonLabel {
                transport,
                reason: reason.label(),
            })
            .inc();
        if reason == DisconnectReason::SlowConsumer {
            self.slow_consumer_disconnects.inc();
        }
        crate::refusal_log::disconnect(reason);
    }

    pub fn record_write(
        &self,
        transport: Transport,
        messages: u64,
        bytes: u64,
        oldest: Option<std::time::Instant>,
    ) {
        let t = &self.per_transport[transport as usize];
        if messages > 0 {
            t.deliveries.inc_by(messages);
        }
        t.bytes_out.inc_by(bytes);
        if let Some(at) = oldest {
            self.delivery_latency.observe(at.elapsed());
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
