//! The broker: the one place where a publication gets its offset and epoch, where history
//! is kept, and from where publications reach the local hub. The API talks to a broker,
//! never to the hub directly, so a second implementation (Redis, for many nodes) can take
//! the place of the in-process one without the API or the transports noticing.
//!
//! Dependencies run one way: `api` -> `broker` -> `hub` -> transports (`ws`, `sse`).
//!
//! Modelled on centrifuge's `Broker` interface (publish with history, history reads,
//! stream positions with an epoch); see docs/architecture.md.

mod budget;
pub mod cluster_counts;
pub mod durable;
mod durable_topics;
mod history;
mod idempotency;
pub mod memory;
mod publish;
pub mod redis;
pub mod routed;
mod stream;
mod table;
#[cfg(test)]
mod testing;

use std::sync::Arc;

pub use stream::new_epoch;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::client::Client;
use crate::hub::TopicLimit;
use crate::publication::Publication;

/// Where a topic's stream stands: the offset of its newest publication, in an epoch. A
/// topic's epoch changes whenever its history could have been lost (an evicted topic, a
/// restart of memory-only history), so an offset from an older epoch is never mistaken
/// for one of the current stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamPosition {
    pub offset: u64,
    pub epoch: Arc<str>,
}

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

/// What a broker does. Implementations: [`memory::MemoryBroker`] (one node); a Redis one
/// for many nodes must fit the same methods.
#[async_trait::async_trait]
pub trait Broker: Send + Sync {
    /// Assigns the next offset, keeps the publication in history and hands it to every
    /// local subscriber, in offset order. Returns once it is as durable as the topic's
    /// namespace promises.
    async fn publish(&self, req: PublishRequest<'_>) -> Result<Receipt, BrokerError>;

    /// Adds a local subscriber. The acknowledgement built by `ack`, then (with `since`) the
    /// replay of every publication after `since`, then live publications are queued with
    /// no gap and no duplicate between them.
    fn subscribe(
        &self,
        client: &Arc<Client>,
        topic: &str,
        since: Option<&StreamPosition>,
        ack: Ack<'_>,
    ) -> Result<Subscribed, BrokerError>;

    /// `subscribe` for a broker that must wait before a subscriber can join (the Redis
    /// broker: its node's subscription to the topic, then a history read), with the same
    /// guarantees. Callers that can wait call this one; the default is the synchronous
    /// `subscribe`, so the in-process broker needs nothing more.
    async fn subscribe_async(
        &self,
        client: &Arc<Client>,
        topic: &str,
        since: Option<&StreamPosition>,
        ack: Ack<'_>,
    ) -> Result<Subscribed, BrokerError> {
        self.subscribe(client, topic, since, ack)
    }

    /// Whether `subscribe_async` may wait: callers that cannot wait in place (a
    /// WebSocket connection's command loop) then run it as a task, in command order.
    fn subscribe_waits(&self) -> bool {
        false
    }

    /// Returns whether the client was subscribed.
    fn unsubscribe(&self, client: &Arc<Client>, topic: &str) -> bool;

    /// Removes the client from every topic it holds. Idempotent.
    fn remove_client(&self, client: &Arc<Client>);

    /// Publications after `since` (or the oldest kept), at most `limit`.
    async fn history(
        &self,
        topic: &str,
        since: Option<&StreamPosition>,
        limit: usize,
    ) -> Result<History, BrokerError>;
}
