//! The in-process broker: offsets, epochs and history kept in this process, handed to the
//! local hub. (Skeleton: delegates to the hub; history and resume come next.)

use std::sync::Arc;

use super::{
    Ack, Broker, BrokerError, History, PublishRequest, Receipt, StreamPosition, Subscribed,
};
use crate::client::Client;
use crate::hub::{Hub, PublishOptions};

pub struct MemoryBroker {
    hub: Arc<Hub>,
}

impl MemoryBroker {
    pub fn new(hub: Arc<Hub>) -> Self {
        MemoryBroker { hub }
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }
}

#[async_trait::async_trait]
impl Broker for MemoryBroker {
    async fn publish(&self, req: PublishRequest<'_>) -> Result<Receipt, BrokerError> {
        let r = self.hub.publish(
            req.topic,
            req.data,
            PublishOptions {
                retain: req.retain,
                conflate: req.conflate,
            },
        )?;
        Ok(Receipt {
            offset: r.offset,
            epoch: r.epoch,
            subscribers: r.subscribers,
            duplicate: false,
        })
    }

    fn subscribe(
        &self,
        client: &Arc<Client>,
        topic: &str,
        since: Option<&StreamPosition>,
        ack: Ack<'_>,
    ) -> Result<Subscribed, BrokerError> {
        let recovered = since.map(|_| false);
        let pos = self.hub.subscribe(client, topic, |p| {
            ack(&Subscribed {
                position: StreamPosition {
                    offset: p.offset,
                    epoch: p.epoch.clone(),
                },
                recovered,
            })
        })?;
        Ok(Subscribed {
            position: StreamPosition {
                offset: pos.offset,
                epoch: pos.epoch,
            },
            recovered,
        })
    }

    fn unsubscribe(&self, client: &Arc<Client>, topic: &str) -> bool {
        self.hub.unsubscribe(client, topic)
    }

    fn remove_client(&self, client: &Arc<Client>) {
        self.hub.remove_client(client)
    }

    async fn history(
        &self,
        _topic: &str,
        _since: Option<&StreamPosition>,
        _limit: usize,
    ) -> Result<History, BrokerError> {
        Err(BrokerError::Unavailable(
            "history is not implemented yet".into(),
        ))
    }
}
