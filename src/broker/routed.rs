//! Under `--redis` the node's broker is split by topic: `board:*` topics are *derived*
//! state (every node mirrors every board from Redis and shows its own watchers snapshots of
//! its own mirror), so they stay on a node-local memory broker, retained and conflated as on
//! one node; every other topic goes through Redis to every node. Both brokers feed the
//! node's hub, and each topic's subscriptions go to the broker that holds it. Sending
//! board snapshots through Redis instead would publish each one N times (once per node)
//! into one stream.

use std::sync::Arc;

use super::{
    Broker, BrokerError, History, Identity, PresencePage, PresenceStats, PublishRequest, Receipt,
    Replay, StreamPosition,
};

pub struct RoutedBroker {
    local: Arc<dyn Broker>,
    shared: Arc<dyn Broker>,
}

impl RoutedBroker {
    pub fn new(local: Arc<dyn Broker>, shared: Arc<dyn Broker>) -> Self {
        RoutedBroker { local, shared }
    }

    fn broker_for(&self, topic: &str) -> &dyn Broker {
        if crate::topic::is_board_topic(topic) {
            &*self.local
        } else {
            &*self.shared
        }
    }
}

#[async_trait::async_trait]
impl Broker for RoutedBroker {
    async fn publish(&self, req: PublishRequest<'_>) -> Result<Receipt, BrokerError> {
        self.broker_for(req.topic).publish(req).await
    }

    async fn history(
        &self,
        topic: &str,
        since: Option<&StreamPosition>,
        limit: usize,
    ) -> Result<History, BrokerError> {
        self.broker_for(topic).history(topic, since, limit).await
    }

    async fn subscribe_topic(&self, topic: &str) -> Result<(), BrokerError> {
        self.broker_for(topic).subscribe_topic(topic).await
    }

    fn unsubscribe_topic(&self, topic: &str) {
        self.broker_for(topic).unsubscribe_topic(topic)
    }

    async fn replay(
        &self,
        topic: &str,
        since: Option<&StreamPosition>,
        max_bytes: usize,
    ) -> Result<Replay, BrokerError> {
        self.broker_for(topic).replay(topic, since, max_bytes).await
    }

    async fn presence_join(&self, topic: &str, client: u64, who: &Identity) {
        self.broker_for(topic)
            .presence_join(topic, client, who)
            .await
    }

    fn presence_leave(&self, topic: &str, client: u64) {
        self.broker_for(topic).presence_leave(topic, client)
    }

    async fn presence(
        &self,
        topic: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<PresencePage, BrokerError> {
        self.broker_for(topic).presence(topic, after, limit).await
    }

    async fn presence_stats(&self, topic: &str) -> Result<PresenceStats, BrokerError> {
        self.broker_for(topic).presence_stats(topic).await
    }

    fn member_id(&self, topic: &str, client: u64) -> u64 {
        self.broker_for(topic).member_id(topic, client)
    }
}
