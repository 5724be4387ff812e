//! Webhooks (docs/webhooks.md): the node POSTs signed batches of events to each
//! `webhook_url` when a topic is occupied or vacated and when a presence member joins or
//! leaves.
//!
//! The hub and the subscribe path report transitions through `hub::TopicEvents`, under
//! their locks: [`Webhooks`] only turns them into event JSON and pushes it onto each URL's
//! bounded queue (`batch.rs`), and one task per URL delivers (`deliver.rs`), so nothing a
//! receiver does reaches fan-out. Modules: `events` (the JSON), `occupancy` (the vacate
//! grace), `batch` (the queue and the body), `sign` (the HMAC), `deliver` (POST and retry).
//!
//! On a node alone a topic is occupied while the node holds a subscriber of it; under
//! `--redis`, while any node does (`cluster.rs`: once per cluster). Either way a topic
//! left is let go only after `webhook_vacate_grace` (`occupancy.rs`). Member events are
//! sent by the node the member joined or left.
//!
//! A Pusher app's `webhooks` URLs (`[[app]]`, docs/pusher.md) get that app's channels only,
//! in Pusher's format and signing (`channel_occupied`, `channel_vacated`, `member_added` /
//! `member_removed` once per user, `client_event`, `cache_miss`), on the same queues,
//! delivery tasks and occupancy (grace, once per cluster).

pub mod batch;
pub mod cluster;
pub mod deliver;
pub mod events;
pub mod occupancy;
pub mod sign;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::hub::TopicEvents;
use crate::metrics::Metrics;
use crate::topic::TopicName;
use deliver::{Counters, PusherSigning, Settings, Target};
use events::Filter;
use occupancy::Occupancy;

/// A member's identity, kept from its join to its leave (only when `member_left` is sent):
/// `(user, info)`.
type Who = (Option<Arc<str>>, Option<Arc<str>>);

pub struct Webhooks {
    cfg: Config,
    filter: Filter,
    /// `webhook_url`s: every event, crier's format.
    targets: Vec<Arc<Target>>,
    /// Pusher apps with webhooks: `(topic prefix, URLs)`.
    apps: Vec<(String, Vec<Arc<Target>>)>,
    /// Connections per user of each Pusher presence channel with webhooks: member_added
    /// on a user's first, member_removed on its last (bounded like `members`).
    users: Mutex<HashMap<(TopicName, Arc<str>), u32>>,
    occupancy: Occupancy,
    /// The members of presence topics, for their `member_left` (bounded by presence's
    /// own bound: one per subscription of a presence topic).
    members: Mutex<HashMap<(TopicName, u64), Who>>,
    /// Under `--redis`: where the cluster decides occupied and vacated.
    cluster: OnceLock<Arc<cluster::Cluster>>,
}

/// Each URL as the HTTP client will read it, and a secret given too short (again for a
/// `Config` built by hand).
pub fn check_config(cfg: &Config) -> anyhow::Result<()> {
    anyhow::ensure!(
        cfg.webhook_secret.is_empty() || cfg.webhook_secret.len() >= 32,
        "webhook_secret must be at least 32 bytes (it signs each webhook delivery)"
    );
    let app_urls = cfg.apps.iter().flat_map(|a| a.webhooks.iter());
    for url in cfg.webhook_urls.iter().chain(app_urls) {
        let uri: hyper::Uri = url
            .parse()
            .map_err(|e| anyhow::anyhow!("webhook_url {url:?}: {e}"))?;
        anyhow::ensure!(
            uri.scheme_str() == Some("http") && uri.host().is_some(),
            "webhook_url {url:?}: must be an http:// URL with a host"
        );
    }
    Ok(())
}

/// At start: webhooks need their secret (checked here rather than with each setting, so
/// `webhook_url` alone still resolves for `crier config check` of one key).
pub fn check_start(cfg: &Config) -> anyhow::Result<()> {
    anyhow::ensure!(
        cfg.webhook_urls.is_empty() || cfg.webhook_secret.len() >= 32,
        "webhook_url is set but webhook_secret is not: give a secret of at least 32 bytes \
         (it signs each delivery)"
    );
    Ok(())
}

impl Webhooks {
    /// Starts one delivery task per URL and the grace timer; None without `webhook_url`.
    pub fn spawn(
        cfg: &Config,
        metrics: &Metrics,
        stop: CancellationToken,
    ) -> Option<Arc<Webhooks>> {
        let has_apps = cfg.apps.iter().any(|a| !a.webhooks.is_empty());
        if cfg.webhook_urls.is_empty() && !has_apps {
            return None;
        }
        let settings = Arc::new(Settings {
            signer: sign::Signer::new(cfg.webhook_secret.as_bytes()),
            batch_max: cfg.webhook_batch_max,
            linger: cfg.webhook_linger,
            timeout: cfg.webhook_timeout,
        });
        let targets: Vec<Arc<Target>> = cfg
            .webhook_urls
            .iter()
            .map(|url| {
                Arc::new(Target {
                    url: url.clone(),
                    pusher: None,
                    queue: batch::Queue::new(cfg.webhook_queue_max),
                    counters: Counters::new(metrics, url),
                    unlogged_drops: Default::default(),
                })
            })
            .collect();
        let apps: Vec<(String, Vec<Arc<Target>>)> = cfg
            .apps
            .iter()
            .filter(|a| !a.webhooks.is_empty())
            .map(|a| {
                let urls = a
                    .webhooks
                    .iter()
                    .map(|url| {
                        Arc::new(Target {
                            url: url.clone(),
                            pusher: Some(PusherSigning {
                                key: a.key.clone(),
                                secret: ring::hmac::Key::new(
                                    ring::hmac::HMAC_SHA256,
                                    a.secret.as_bytes(),
                                ),
                            }),
                            queue: batch::Queue::new(cfg.webhook_queue_max),
                            counters: Counters::new(metrics, url),
                            unlogged_drops: Default::default(),
                        })
                    })
                    .collect();
                (crate::topic::pusher_topic(&a.id, ""), urls)
            })
            .collect();
        for t in targets.iter().chain(apps.iter().flat_map(|(_, t)| t)) {
            tokio::spawn(deliver::run(t.clone(), settings.clone(), stop.clone()));
        }
        let this = Arc::new(Webhooks {
            cfg: cfg.clone(),
            filter: Filter::new(&cfg.webhook_events),
            targets,
            apps,
            users: Mutex::new(HashMap::new()),
            occupancy: Occupancy::new(cfg.webhook_vacate_grace, cfg.max_topics),
            members: Mutex::new(HashMap::new()),
            cluster: OnceLock::new(),
        });
        tokio::spawn(grace_timer(this.clone(), stop));
        Some(this)
    }

    /// Under `--redis` (before the node serves): topics are occupied and vacated once per
    /// cluster, decided in Redis over `conn`; `node` is this node's id there.
    pub fn share(
        self: &Arc<Self>,
        conn: redis::aio::ConnectionManager,
        node: String,
        stop: CancellationToken,
    ) {
        if !self.tracks_topics() {
            return;
        }
        let me = Arc::downgrade(self);
        let c = cluster::Cluster::spawn(conn, node, stop, move |topic, change| {
            if let Some(me) = me.upgrade() {
                me.announce(topic, change == cluster::Change::Occupied);
            }
        });
        let _ = self.cluster.set(c);
    }

    /// This node's view changed, after the grace: the cluster decides, or it is the news.
    fn held(&self, topic: &str, held: bool) {
        match self.cluster.get() {
            Some(c) => c.want(topic, held),
            None => self.announce(topic, held),
        }
    }

    fn announce(&self, topic: &str, occupied: bool) {
        let app = self.pusher_app(topic);
        // A user's own channel (`pusher:signin`) is not announced, as Pusher.
        let app = app.filter(|(_, c)| !c.starts_with(crate::topic::PUSHER_USER_CHANNEL));
        if let Some((targets, channel)) = app {
            let name = if occupied {
                "channel_occupied"
            } else {
                "channel_vacated"
            };
            Self::emit_to(targets, events::pusher(name, channel, ""));
        }
        if occupied && self.filter.occupied {
            self.emit(events::topic("topic_occupied", topic));
        } else if !occupied && self.filter.vacated {
            self.emit(events::topic("topic_vacated", topic));
        }
    }

    /// Occupancy is followed for crier's events or any Pusher app's.
    fn tracks_topics(&self) -> bool {
        self.filter.topics() || !self.apps.is_empty()
    }

    /// The webhook URLs of the Pusher app whose channel `topic` is, and the channel.
    fn pusher_app<'a>(&self, topic: &'a str) -> Option<(&[Arc<Target>], &'a str)> {
        self.apps.iter().find_map(|(prefix, targets)| {
            topic
                .strip_prefix(prefix.as_str())
                .map(|channel| (targets.as_slice(), channel))
        })
    }

    /// A Pusher presence channel's user count moved by `delta`: its new count.
    fn count_user(&self, topic: &str, user: &Arc<str>, delta: i32) -> u32 {
        let mut users = self.users.lock();
        let key = (TopicName::from(topic), user.clone());
        let n = users.entry(key.clone()).or_insert(0);
        *n = n.saturating_add_signed(delta);
        let now = *n;
        if now == 0 {
            users.remove(&key);
        }
        now
    }

    /// Queues one event for every URL of `targets`.
    fn emit_to(targets: &[Arc<Target>], json: String) {
        for t in targets {
            t.counters.queued.inc();
            if t.queue.push(json.clone()) > 0 {
                t.counters.dropped.inc();
                t.unlogged_drops.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Queues one event for every `webhook_url`.
    fn emit(&self, json: String) {
        for t in &self.targets {
            t.counters.queued.inc();
            if t.queue.push(json.clone()) > 0 {
                t.counters.dropped.inc();
                t.unlogged_drops.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

async fn grace_timer(this: Arc<Webhooks>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(this.occupancy.tick());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        for topic in this.occupancy.due(Instant::now()) {
            this.held(&topic, false);
        }
    }
}

impl TopicEvents for Webhooks {
    fn occupied(&self, topic: &str) {
        if self.tracks_topics() && self.occupancy.occupied(topic) {
            self.held(topic, true);
        }
    }

    fn vacated(&self, topic: &str) {
        if self.tracks_topics() && self.occupancy.vacated(topic, Instant::now()) {
            self.held(topic, false);
        }
    }

    fn member_joined(&self, topic: &str, client: u64, user: Option<&str>, info: Option<&str>) {
        let pusher = self.pusher_app(topic);
        if !(self.filter.members() || pusher.is_some()) || !self.cfg.presence(topic).members {
            return;
        }
        // Under `--redis` the cluster counts a user's connections (`user_edge`).
        let local = self.cluster.get().is_none();
        if let (Some((targets, channel)), Some(user), true) = (pusher, user, local) {
            if self.count_user(topic, &Arc::from(user), 1) == 1 {
                let user_id = serde_json::to_string(user).expect("a string serializes");
                let extra = format!(r#","user_id":{user_id}"#);
                Self::emit_to(targets, events::pusher("member_added", channel, &extra));
            }
        }
        if self.filter.left || pusher.is_some() {
            self.members.lock().insert(
                (topic.into(), client),
                (user.map(Arc::from), info.map(Arc::from)),
            );
        }
        if self.filter.joined {
            self.emit(events::member("member_joined", topic, client, user, info));
        }
    }

    fn member_left(&self, topic: &str, client: u64) {
        let pusher = self.pusher_app(topic);
        if !(self.filter.left || pusher.is_some()) || !self.cfg.presence(topic).members {
            return;
        }
        let key = (TopicName::from(topic), client);
        let Some((user, info)) = self.members.lock().remove(&key) else {
            return;
        };
        let local = self.cluster.get().is_none();
        if let (Some((targets, channel)), Some(user), true) = (pusher, &user, local) {
            if self.count_user(topic, user, -1) == 0 {
                let user_id = serde_json::to_string(&**user).expect("a string serializes");
                let extra = format!(r#","user_id":{user_id}"#);
                Self::emit_to(targets, events::pusher("member_removed", channel, &extra));
            }
        }
        if !self.filter.left {
            return;
        }
        self.emit(events::member(
            "member_left",
            topic,
            client,
            user.as_deref(),
            info.as_deref(),
        ));
    }

    fn client_event(
        &self,
        topic: &str,
        event: &str,
        data: &str,
        socket_id: &str,
        user: Option<&str>,
    ) {
        let Some((targets, channel)) = self.pusher_app(topic) else {
            return;
        };
        let text = |s: &str| serde_json::to_string(s).expect("a string serializes");
        let mut extra = format!(
            r#","event":{},"data":{},"socket_id":"{socket_id}""#,
            text(event),
            text(data)
        );
        if let Some(u) = user {
            extra.push_str(&format!(r#","user_id":{}"#, text(u)));
        }
        Self::emit_to(targets, events::pusher("client_event", channel, &extra));
    }

    fn cache_miss(&self, topic: &str) {
        if let Some((targets, channel)) = self.pusher_app(topic) {
            Self::emit_to(targets, events::pusher("cache_miss", channel, ""));
        }
    }

    fn user_edge(&self, topic: &str, user: &str, added: bool) {
        let Some((targets, channel)) = self.pusher_app(topic) else {
            return;
        };
        if !self.cfg.presence(topic).members {
            return;
        }
        let user_id = serde_json::to_string(user).expect("a string serializes");
        let extra = format!(r#","user_id":{user_id}"#);
        let name = if added {
            "member_added"
        } else {
            "member_removed"
        };
        Self::emit_to(targets, events::pusher(name, channel, &extra));
    }

    fn member_removed(&self, topic: &str, client: u64, user: Option<&str>, info: Option<&str>) {
        if !self.filter.left || !self.cfg.presence(topic).members {
            return;
        }
        self.emit(events::member("member_left", topic, client, user, info));
    }
}
