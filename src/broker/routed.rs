//! Under `--redis` the node's broker is split by topic: `board:*` topics are *derived*
//! state (every node mirrors every board from Redis and shows its own watchers snapshots of
//! its own mirror), so they stay on a node-local memory broker, retained and conflated as on
//! one node; every other topic goes through Redis to every node. Both brokers share the
//! node's hub. Sending board snapshots through Redis instead would publish each one N
//! times (once per node) into one stream.

use std::sync::Arc;

use super::{
    Ack, Broker, BrokerError, History, PublishRequest, Receipt, StreamPosition, Subscribed,
};
use crate::client::Client;
use crate::hub::Hub;

pub struct RoutedBroker {
    local: Arc<dyn Broker>,
    shared: Arc<dyn Broker>,
    /// The hub both brokers share: a leaving client's topics are read from it, so that
    /// each topic is left through the broker that holds it.
    hub: Arc<Hub>,
}

impl RoutedBroker {
    pub fn new(local: Arc<dyn Broker>, shared: Arc<dyn Broker>, hub: Arc<Hub>) -> Self {
        RoutedBroker { local, shared, hub }
    }

    fn broker_for(&self, topic: &str) -> &dyn Broker {
        if topic.starts_with("board:") {
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

    fn subscribe(
        &self,
        client: &Arc<Client>,
        topic: &str,
        since: Option<&StreamPosition>,
        ack: Ack<'_>,
    ) -> Result<Subscribed, BrokerError> {
        self.broker_for(topic).subscribe(client, topic, since, ack)
    }

    async fn subscribe_async(
        &self,
        client: &Arc<Client>,
        topic: &str,
        since: Option<&StreamPosition>,
        ack: Ack<'_>,
    ) -> Result<Subscribed, BrokerError> {
        self.broker_for(topic)
            .subscribe_async(client, topic, since, ack)
            .await
    }

    fn subscribe_waits(&self) -> bool {
        self.local.subscribe_waits() || self.shared.subscribe_waits()
    }

    fn unsubscribe(&self, client: &Arc<Client>, topic: &str) -> bool {
        self.broker_for(topic).unsubscribe(client, topic)
    }

    /// Each held topic through the broker that holds it: either broker's own
    /// `remove_client` walks every topic the hub lists for the client, and would take the
    /// other broker's topics out of the hub behind its back (a Redis topic's node
    /// subscription never dropped; a board topic's subscriber never counted out, so its
    /// entry would never leave the memory broker's table). Then both, for what is not in
    /// the hub (the Redis broker's pending subscriptions).
    fn remove_client(&self, client: &Arc<Client>) {
        for name in self.hub.topics_of(client) {
            self.broker_for(&name).unsubscribe(client, &name);
        }
        self.shared.remove_client(client);
        self.local.remove_client(client);
    }

    async fn history(
        &self,
        topic: &str,
        since: Option<&StreamPosition>,
        limit: usize,
    ) -> Result<History, BrokerError> {
        self.broker_for(topic).history(topic, since, limit).await
    }
}
