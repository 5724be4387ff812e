//! What every handler and connection shares: settings, the hub, metrics, the shutdown
//! signal and the task tracker, plus the connection slot guard that makes cleanup
//! unconditional.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::Broker;
use crate::client::Client;
use crate::config::Config;
use crate::conn_limits::{ConnLimits, ConnSlot, CONN_SLOT};
use crate::error_code::{ErrorCode, Refusal};
use crate::hub::Hub;
use crate::leaderboard::policy::BoardPolicies;
use crate::leaderboard::service::Boards;
use crate::metrics::{Metrics, Transport};

pub struct AppState {
    pub cfg: Config,
    /// Where publications go and history comes from (offsets, epochs, resume reads).
    pub broker: Arc<dyn Broker>,
    /// The node's subscribers and its deliveries (the broker's sink); subscriptions go
    /// through `crate::subscribe` with both.
    pub hub: Arc<Hub>,
    pub metrics: Arc<Metrics>,
    /// Cancelled once on SIGTERM/Ctrl-C: listeners stop, connections drain and close.
    pub shutdown: CancellationToken,
    /// Every connection task, so shutdown can wait for them (bounded by drain_timeout).
    pub tracker: TaskTracker,
    pub boards: Arc<Boards>,
    /// Per-address and node-wide socket shares, taken at accept.
    pub limits: Arc<ConnLimits>,
    /// With `--redis`: what `/readyz` reports about it (None on a node alone).
    pub redis: Option<Arc<crate::broker::redis::RedisHealth>>,
    /// With `--redis`: cluster-wide subscriber counts (the Pusher channel API reads them).
    pub counts: Option<Arc<crate::broker::cluster_counts::ClusterCounts>>,
    /// Private topics and the keys that check subscriber tokens.
    pub auth: crate::auth::Auth,
    /// `[[board]]` policies and their per-player rate table.
    pub board_policies: BoardPolicies,
    /// Pusher Channels apps (`[[app]]`, `pusher_*`): none unless configured.
    pub pusher: Arc<crate::pusher::Apps>,
    /// The node's durable files by name (`crier.redb`, `history.redb`), for online
    /// backups (`api/backup.rs`); empty under `--redis`, where Redis holds the state.
    pub durable_files: Vec<(&'static str, crate::redb_file::WeakRedbFile)>,
    /// One backup at a time: each keeps a copy of its file on disk until it is sent.
    pub backup_slot: Arc<tokio::sync::Semaphore>,
    /// Every subscriber on this node, so shutdown reaches each through its own queue's
    /// wake-up (a connection keeps no shutdown waiter of its own).
    pub clients: Arc<Clients>,
    connections: AtomicUsize,
}

/// The node's subscribers, by slot: one pointer each (docs/BENCHMARKS.md, "Issue 20").
#[derive(Default)]
pub struct Clients {
    slots: Mutex<Slots>,
}

#[derive(Default)]
struct Slots {
    clients: Vec<Option<Weak<Client>>>,
    free: Vec<u32>,
}

impl Clients {
    fn insert(&self, client: &Arc<Client>) -> u32 {
        let mut s = self.slots.lock();
        let weak = Some(Arc::downgrade(client));
        if let Some(i) = s.free.pop() {
            s.clients[i as usize] = weak;
            i
        } else {
            s.clients.push(weak);
            u32::try_from(s.clients.len() - 1).expect("fewer than 2^32 connections")
        }
    }

    fn remove(&self, slot: u32) {
        let mut s = self.slots.lock();
        s.clients[slot as usize] = None;
        s.free.push(slot);
    }

    /// Closes every subscriber with `reason`: each drains its queue, then ends.
    pub fn close_all(&self, reason: crate::close::DisconnectReason) {
        let all: Vec<Arc<Client>> = self
            .slots
            .lock()
            .clients
            .iter()
            .filter_map(|w| w.as_ref()?.upgrade())
            .collect();
        for client in all {
            client.close(reason);
        }
    }
}

impl AppState {
    pub fn new(
        cfg: Config,
        metrics: Arc<Metrics>,
        broker: Arc<dyn Broker>,
        hub: Arc<Hub>,
        boards: Arc<Boards>,
        shutdown: CancellationToken,
    ) -> Self {
        let limits = Arc::new(ConnLimits::new(&cfg, &metrics));
        AppState {
            board_policies: BoardPolicies::new(Vec::new()),
            limits,
            cfg,
            broker,
            hub,
            metrics,
            shutdown,
            tracker: TaskTracker::new(),
            boards,
            redis: None,
            counts: None,
            auth: crate::auth::Auth::open(),
            pusher: Arc::default(),
            durable_files: Vec::new(),
            backup_slot: Arc::new(tokio::sync::Semaphore::new(1)),
            clients: Arc::default(),
            connections: AtomicUsize::new(0),
        }
    }

    /// With `--redis`: lets `/readyz` report the Redis connections' health.
    pub fn with_redis(mut self, health: Option<Arc<crate::broker::redis::RedisHealth>>) -> Self {
        self.redis = health;
        self
    }

    /// With `--redis`: the cluster-wide subscriber counts.
    pub fn with_counts(
        mut self,
        counts: Option<Arc<crate::broker::cluster_counts::ClusterCounts>>,
    ) -> Self {
        self.counts = counts;
        self
    }

    /// The access policy `Auth::from_config` built (`Server::start` always sets it).
    pub fn with_auth(mut self, auth: crate::auth::Auth) -> Self {
        self.auth = auth;
        self
    }

    /// The `[[board]]` policies `BoardPolicies::from_config` built (`Server::start` always
    /// sets them).
    pub fn with_board_policies(mut self, policies: BoardPolicies) -> Self {
        self.board_policies = policies;
        self
    }

    /// The Pusher apps `pusher::Apps::from_config` built (`Server::start` always sets them).
    pub fn with_pusher(mut self, apps: crate::pusher::Apps) -> Self {
        self.pusher = Arc::new(apps);
        self
    }

    /// The durable files an online backup may copy.
    pub fn with_durable_files(
        mut self,
        files: Vec<(&'static str, crate::redb_file::WeakRedbFile)>,
    ) -> Self {
        self.durable_files = files;
        self
    }

    pub fn connection_count(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }
}

/// A subscriber's slot on this node. Dropping it (on any path: clean close, error, panic,
/// failed upgrade) removes the client from every topic and frees the slot, so nothing a
/// client leaves behind depends on the way it left.
pub struct Registration {
    pub client: Arc<Client>,
    state: Arc<AppState>,
    /// The TCP connection's share of the per-IP and socket limits, kept until the
    /// subscriber ends (after the `Drop` below has unsubscribed it): an upgraded WebSocket
    /// no longer has an HTTP connection task holding it.
    _slot: Option<Arc<ConnSlot>>,
    /// Its place in `AppState::clients`.
    place: u32,
}

impl Registration {
    pub fn new(state: &Arc<AppState>, transport: Transport) -> Result<Self, Refusal> {
        if state.shutdown.is_cancelled() {
            return Err(Refusal::new(
                ErrorCode::ShuttingDown,
                "the node is shutting down",
            ));
        }
        let max = state.cfg.max_connections;
        if state
            .connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_err()
        {
            state.metrics.rejected_connections.inc();
            return Err(Refusal::new(
                ErrorCode::TooManyConnections,
                format!("this node already holds its maximum of {max} connections"),
            ));
        }
        state.metrics.connections(transport).inc();
        let client = Arc::new(Client::new(transport, state.cfg.queue_max_bytes));
        let place = state.clients.insert(&client);
        let reg = Registration {
            client,
            state: state.clone(),
            _slot: CONN_SLOT.try_with(Arc::clone).ok(),
            place,
        };
        // Checked again once it is in `clients`: a shutdown that began in between has
        // (or will have) closed it through there, or is seen here.
        if state.shutdown.is_cancelled() {
            reg.client.close(crate::close::DisconnectReason::Shutdown);
        }
        Ok(reg)
    }

    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        crate::subscribe::remove_client(&self.state.hub, &*self.state.broker, &self.client);
        // Looked up again rather than kept: one pointer less per connection.
        let transport = self.client.transport;
        self.state.metrics.connections(transport).dec();
        self.state.connections.fetch_sub(1, Ordering::AcqRel);
        self.state.clients.remove(self.place);
    }
}
