//! What the node tells the outside about its topics (webhooks, `crate::webhook`): a topic
//! gaining its first local subscriber or losing its last, and a presence member joining
//! or leaving. Owned by the hub, like its sink, so the hub and the subscribe path can call
//! it without naming who listens.
//!
//! Every call is made under a hub lock (`occupied` / `vacated` under the topic's shard
//! lock, so a topic's transitions reach the listener in the order they happened), so an
//! implementation must only record and return: no `.await`, no I/O, leaf locks only.

/// Listens to topic and member transitions on this node.
pub trait TopicEvents: Send + Sync {
    /// The topic's local subscriptions went from 0 to 1.
    fn occupied(&self, topic: &str);
    /// The topic's local subscriptions went from 1 to 0.
    fn vacated(&self, topic: &str);
    /// A connection joined a topic's presence (called for every topic: the listener
    /// picks the presence ones). `info` is JSON text.
    fn member_joined(&self, topic: &str, client: u64, user: Option<&str>, info: Option<&str>);
    /// A connection left a topic (called for every leave: the listener knows which were
    /// members).
    fn member_left(&self, topic: &str, client: u64);
    /// A Pusher client event was published on the topic (`data` is JSON text).
    fn client_event(
        &self,
        _topic: &str,
        _event: &str,
        _data: &str,
        _socket_id: &str,
        _user: Option<&str>,
    ) {
    }
    /// A Pusher cache channel's topic had no event for a new subscriber.
    fn cache_miss(&self, _topic: &str) {}
    /// A member of another node left because that node died (under `--redis`, told once,
    /// by the survivor that removed it): the listener never saw it join, so it is given
    /// whole. Called outside any hub lock.
    fn member_removed(&self, _topic: &str, _client: u64, _user: Option<&str>, _info: Option<&str>) {
    }
    /// Under `--redis`: a user's first connection joined the topic's presence (`added`)
    /// or its last one left, counted over the cluster. Told once per cluster: by the node
    /// whose write made it so, or by the survivor that reaped a dead node's member.
    /// Called outside any hub lock.
    fn user_edge(&self, _topic: &str, _user: &str, _added: bool) {}
}
