//! What passes between the node's broker and its hub, owned by the hub so the hub never
//! depends on the broker: the broker hands publications to a [`BrokerSink`] (the hub) and
//! is read for gaps through a [`GapSource`]; both speak in [`StreamPosition`]s and
//! [`Replay`]s. The broker module re-exports these, so its callers keep their paths.

use std::sync::Arc;
use std::task::Waker;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::client::Client;
use crate::publication::Publication;
use crate::topic::TopicName;

/// Where a topic's stream stands: the offset of its newest publication, in an epoch. A
/// topic's epoch changes whenever its history could have been lost (an evicted topic, a
/// restart of memory-only history), so an offset from an older epoch is never mistaken
/// for one of the current stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamPosition {
    pub offset: u64,
    pub epoch: Arc<str>,
}

/// What a subscriber joining now is given before live publications: the topic's position,
/// and, when it resumes from `since`, every publication after it if they can all be
/// served, plus the retained state of a state topic.
#[derive(Clone)]
pub struct Replay {
    pub position: StreamPosition,
    /// None: no `since` was given. Some(true): `publications` are everything after `since`
    /// up to `position`, in order. Some(false): they cannot be served (trimmed, expired,
    /// another epoch, from the future, or larger than `max_bytes`); `publications` is empty.
    pub recovered: Option<bool>,
    pub publications: Vec<Arc<Publication>>,
    /// A state topic's newest publication and whether it conflates: given to every new
    /// subscriber after the replay.
    pub retained: Option<(Arc<Publication>, bool)>,
}

/// Writers to wake once the caller has released its locks (so the next publication does
/// not wait behind 10,000 wake-ups). Opaque to brokers: they only carry it.
#[derive(Default)]
pub struct Wakeups(Vec<Waker>);

impl Wakeups {
    /// The client's writer, to be woken by `wake`.
    pub(super) fn add(&mut self, client: &Client) {
        if let Some(w) = client.take_wake() {
            self.0.push(w);
        }
    }

    pub(super) fn reserve(&mut self, n: usize) {
        self.0.reserve(n);
    }

    pub fn wake(self) {
        for w in self.0 {
            w.wake();
        }
    }
}

/// What a topic's local subscribers are told that is not a publication: no offset, not
/// in history, never replayed (presence joins and leaves). Framed once per transport and
/// shared by every subscriber, like a publication.
pub struct Notice {
    /// A WebSocket text frame.
    pub ws: Bytes,
    /// An SSE event (named, without an `id:` line: it moves no position).
    pub sse: Bytes,
    /// The presence change this notice tells, for protocols that frame it their own way
    /// (Pusher's `member_added` / `member_removed` need the user's first join and last
    /// leave). None for notices that are no presence change.
    pub member: Option<Arc<MemberEvent>>,
}

/// A presence join or leave, as data (docs/protocol.md, "Presence").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberEvent {
    pub kind: MemberChange,
    /// The member's client id: unique across the cluster under `--redis`.
    pub client: u64,
    /// The token's `sub`; None for an anonymous connection.
    pub user: Option<Arc<str>>,
    /// The token's `info` claim, JSON text.
    pub info: Option<Arc<str>>,
    /// On a join: this connection is the user's first in the topic (across the cluster
    /// under `--redis`). Always false for anonymous members and on leaves.
    pub user_first: bool,
    /// On a leave: this connection was the user's last in the topic (across the cluster
    /// under `--redis`). Always false for anonymous members and on joins.
    pub user_last: bool,
}

impl MemberEvent {
    /// Pusher's `pusher_internal:member_added` / `member_removed` on the channel of a
    /// Pusher presence topic, for a user's first join or last leave (None otherwise).
    pub fn pusher_frame(&self, topic: &str) -> Option<Bytes> {
        let channel = crate::topic::pusher_channel(topic)?;
        let user = self.user.as_deref()?;
        let user = serde_json::to_string(user).expect("a string serializes");
        let (event, data) = match self.kind {
            MemberChange::Join if self.user_first => {
                let info = self.info.as_deref().unwrap_or("null");
                (
                    "pusher_internal:member_added",
                    format!(r#"{{"user_id":{user},"user_info":{info}}}"#),
                )
            }
            MemberChange::Leave if self.user_last => (
                "pusher_internal:member_removed",
                format!(r#"{{"user_id":{user}}}"#),
            ),
            _ => return None,
        };
        let data = serde_json::to_string(&data).expect("a string serializes");
        // Pusher channel names need no escaping (topic.rs charset).
        let json = format!(r#"{{"event":"{event}","channel":"{channel}","data":{data}}}"#);
        Some(crate::framing::ws_text(json.as_bytes()))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberChange {
    Join,
    Leave,
}

/// What a broker hands its node: publications in offset order per topic, and what it
/// knows about their continuity. Implemented by the hub; a broker never sees a client.
/// Called once per topic per publication (never per subscriber).
pub trait BrokerSink: Send + Sync {
    /// One publication of the topic's stream in `epoch`, handed over in offset order. The
    /// sink checks that it is the very next offset: a duplicate is dropped, a gap is
    /// filled from the broker's history (or the subscribers are told). Writers to wake
    /// are collected in `wake`, for the broker to wake once it has released its locks.
    /// Returns the number of local subscribers it reached.
    fn deliver(
        &self,
        p: &Arc<Publication>,
        epoch: &str,
        conflate: bool,
        wake: &mut Wakeups,
    ) -> usize;

    /// The topic's deliveries may have missed publications (the broker's connection to its
    /// source was lost and is back): the sink checks against history.
    fn may_have_missed(&self, topic: &str);

    /// The topic's stream restarted under a new epoch (its history was lost): what the
    /// node delivered says nothing about the new offsets, so its subscribers start over.
    fn restarted(&self, topic: &str);

    /// A notice for the topic's joined local subscribers (not those still joining: they
    /// read the state it describes after their acknowledgement). Writers to wake are
    /// collected in `wake`, as for `deliver`.
    fn announce(&self, topic: &str, notice: &Notice, wake: &mut Wakeups);

    /// This node's subscribers of the topic (for a receipt's and the cluster's counts).
    fn subscriber_count(&self, topic: &str) -> usize;

    /// Every topic with local subscribers and how many (for cluster-wide counts).
    fn topic_counts(&self) -> Vec<(TopicName, usize)>;

    /// Who hears of member transitions on this node (webhooks), for the members a broker
    /// removes itself (a dead node's, under `--redis`).
    fn events(&self) -> Option<Arc<dyn super::TopicEvents>> {
        None
    }

    /// What this node's member ids add to its client ids (`tag << 40` under `--redis`,
    /// none on a node alone): tells the hub which member a notice is about.
    fn member_tag(&self, _tag: u64) {}
}

/// Where the hub reads a gap in its deliveries from: the node's broker, seen only through
/// its replay. The broker module implements it for a `Weak` handle on any broker, so the
/// hub never keeps the broker alive.
#[async_trait::async_trait]
pub trait GapSource: Send + Sync {
    /// The topic's replay after `since`, within `max_bytes` of encoded publications (see
    /// `Broker::replay`). None: the source is gone (shutdown), the fill stops.
    async fn replay(
        &self,
        topic: &str,
        since: &StreamPosition,
        max_bytes: usize,
    ) -> Option<Result<Replay, String>>;
}
