//! The broker: the one place where a publication gets its offset and epoch, where history
//! is kept, and from where publications reach this node. It works per node, never per
//! client: it publishes, reads history, and keeps the node's interest in topics
//! ([`Broker::subscribe_topic`]); what it receives comes back through one [`BrokerSink`],
//! which the hub implements. Clients, their acknowledgements and the merge of replay and
//! live publications live above it, written once for every broker (`subscribe.rs`).
//! So a second implementation (Redis, for many nodes) takes the place of the in-process
//! one without the API, the transports or the merge noticing.
//!
//! Dependencies run one way: `api`/transports -> `subscribe` -> `broker` -> `hub` (as
//! the sink) -> client queues. The broker holds the sink as `Arc<dyn BrokerSink>` (one
//! call per topic per publication) and never names the hub's type; what the two exchange
//! (`StreamPosition`, `Replay`, `BrokerSink`, `Wakeups`) is the hub's, re-exported here.
//!
//! Modelled on centrifuge's `Broker` interface and `BrokerEventHandler` (publish with
//! history, history reads, node-level subscribe, events back through a handler, stream
//! positions with an epoch); see docs/architecture.md.

mod budget;
pub mod cluster_counts;
pub mod durable;
mod durable_topics;
mod history;
mod idempotency;
pub mod memory;
pub mod presence;
mod publish;
pub mod redis;
pub mod routed;
mod stream;
mod table;
#[cfg(test)]
pub(crate) mod testing;

use std::sync::{Arc, Weak};

pub use stream::new_epoch;

use bytes::Bytes;

pub use crate::hub::{
    BrokerSink, MemberChange, MemberEvent, Notice, Replay, StreamPosition, Wakeups,
};
use crate::hub::{GapSource, TopicLimit};
use crate::publication::Publication;
pub use presence::{Identity, Member, PresencePage, PresenceStats};

/// One publication to make.
#[derive(Clone, Copy, Debug, Default)]
pub struct PublishRequest<'a> {
    pub topic: &'a str,
    /// Valid JSON (checked by the caller); embedded byte for byte.
    pub data: &'a [u8],
    /// Keep the latest publication and give it to each new subscriber first (state
    /// topics: leaderboards).
    pub retain: bool,
    /// In a slow subscriber's queue, a newer publication replaces an unsent older one.
    pub conflate: bool,
    /// A retry carrying the same key (per topic, within `idempotency_window`) gets the
    /// first receipt back and publishes nothing.
    pub idempotency_key: Option<&'a str>,
}

#[derive(Clone, Debug)]
pub struct Receipt {
    pub offset: u64,
    pub epoch: Arc<str>,
    pub subscribers: usize,
    /// True when this answers a retry of an earlier publication (same idempotency key).
    pub duplicate: bool,
}

/// The answer to a subscription: the topic's position when the subscriber joined (every
/// publication after it reaches the subscriber), and, when a resume position was given,
/// whether everything after it was replayed.
#[derive(Clone, Debug)]
pub struct Subscribed {
    pub position: StreamPosition,
    /// None: no resume was asked for. Some(true): every publication after the given
    /// position was queued, in order, right after the acknowledgement. Some(false): they
    /// could not be (too old, evicted, another epoch); the retained state follows if the
    /// topic has one.
    pub recovered: Option<bool>,
}

/// A page of a topic's history.
#[derive(Clone)]
pub struct History {
    pub position: StreamPosition,
    /// False when publications after the asked position are no longer kept (or the epoch
    /// differs): the page then starts at the oldest one kept.
    pub recovered: bool,
    pub publications: Vec<Arc<Publication>>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerError {
    #[error("{0}")]
    TooManyTopics(TopicLimit),
    #[error("a connection may hold at most {0} topics")]
    TooManyTopicsPerConnection(usize),
    #[error("connection is closed")]
    ClientClosed,
    /// The history store failed: nothing was published.
    #[error("history store unavailable: {0}")]
    Unavailable(String),
}

impl From<crate::hub::HubError> for BrokerError {
    fn from(e: crate::hub::HubError) -> Self {
        use crate::hub::HubError;
        match e {
            HubError::TooManyTopics(l) => BrokerError::TooManyTopics(l),
            HubError::TooManyTopicsPerConnection(n) => BrokerError::TooManyTopicsPerConnection(n),
            HubError::ClientClosed => BrokerError::ClientClosed,
        }
    }
}

/// Builds the acknowledgement queued for a subscriber before anything published after it.
pub type Ack<'a> = &'a (dyn Fn(&Subscribed) -> Option<Bytes> + Sync);

/// What a broker does, per node. Implementations: [`memory::MemoryBroker`] (one node,
/// memory and durable namespaces), [`redis::RedisBroker`] (many nodes over one Redis),
/// [`routed::RoutedBroker`] (board topics local, the rest through Redis). The contract
/// every one of them meets is tested once, against all (tests/it/broker_contract.rs).
#[async_trait::async_trait]
pub trait Broker: Send + Sync {
    /// Assigns the next offset, keeps the publication in history and hands it to every
    /// node subscribed to the topic (this one through its sink), in offset order. Returns
    /// once it is as durable as the topic's namespace promises.
    async fn publish(&self, req: PublishRequest<'_>) -> Result<Receipt, BrokerError>;

    /// Publications after `since` (or the oldest kept), at most `limit`.
    async fn history(
        &self,
        topic: &str,
        since: Option<&StreamPosition>,
        limit: usize,
    ) -> Result<History, BrokerError>;

    /// One more local subscription of the topic: once this returns, every publication of
    /// the topic reaches the sink (Redis: the node's one subscription to the topic's
    /// channel is confirmed; memory: the topic is kept in the table, counted against the
    /// subscribers' budget if nobody published to it). Each success is matched by one
    /// `unsubscribe_topic`; the last one drops the node's interest.
    async fn subscribe_topic(&self, topic: &str) -> Result<(), BrokerError>;

    /// One local subscription of the topic fewer (see `subscribe_topic`).
    fn unsubscribe_topic(&self, topic: &str);

    /// The position, the replay after `since` (all of it within `max_bytes` of encoded
    /// publications, or none: `recovered:false`) and the retained state, read at one
    /// instant of the stream.
    async fn replay(
        &self,
        topic: &str,
        since: Option<&StreamPosition>,
        max_bytes: usize,
    ) -> Result<Replay, BrokerError>;

    /// The connection `client` joined `topic`: a member from now on if the topic's
    /// namespace has `presence` (and its join announced with `join_leave`); otherwise
    /// nothing. Called by the one subscribe path once the client is a subscriber.
    async fn presence_join(&self, topic: &str, client: u64, who: &Identity);

    /// The connection `client` left `topic` (unsubscribed or gone); nothing if it was
    /// no member. Never waits, like `unsubscribe_topic`.
    fn presence_leave(&self, topic: &str, client: u64);

    /// Up to `limit` of the topic's members after the client id `after`, in client-id
    /// order. The caller checks that the topic has presence.
    async fn presence(
        &self,
        topic: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<PresencePage, BrokerError>;

    /// The topic's member counts, O(1).
    async fn presence_stats(&self, topic: &str) -> Result<PresenceStats, BrokerError>;

    /// The id presence shows for the local connection `client` in `topic` (and webhooks
    /// send): unique across the cluster under `--redis`, the client id itself on one node.
    fn member_id(&self, _topic: &str, client: u64) -> u64 {
        client
    }
}

/// The hub reads a gap in its deliveries through a `Weak` handle on the node's broker
/// (`Hub::attach`): it never keeps the broker alive, and stops once the broker is gone.
#[async_trait::async_trait]
impl<B: Broker + ?Sized + 'static> GapSource for Weak<B> {
    async fn replay(
        &self,
        topic: &str,
        since: &StreamPosition,
        max_bytes: usize,
    ) -> Option<Result<Replay, String>> {
        let broker = self.upgrade()?;
        let read = broker.replay(topic, Some(since), max_bytes).await;
        Some(read.map_err(|e| e.to_string()))
    }
}
