//! The one subscribe path, for every broker and every transport: a WebSocket `subscribe`
//! (and the topics of its URL), an SSE stream's topics, and their unsubscribes and cleanup
//! all come here.
//!
//! A subscription is acknowledged, replayed from `since` and handed over to live
//! publications with no gap and no duplicate, whichever broker feeds the node:
//!
//! 1. the broker takes the node's interest in the topic ([`Broker::subscribe_topic`]):
//!    from then on every publication of it reaches the hub (Redis: the node's channel
//!    subscription is confirmed);
//! 2. the client *joins* the topic in the hub, which keeps what the topic receives for it;
//! 3. the broker reads the position, the replay after `since` and the retained state at one
//!    instant ([`Broker::replay`]): everything after that instant reaches the hub, hence
//!    step 2 came first;
//! 4. under the topic's hub lock, [`Hub::merge`] queues the acknowledgement, the replay and
//!    what the client kept past the read position, and the client becomes a subscriber.
//!
//! 5. the broker adds the client to the topic's members ([`Broker::presence_join`]; only
//!    in `presence` namespaces), after the merge, so a join announced to the topic
//!    follows the joiner's own acknowledgement. Every leave (unsubscribe, a connection
//!    gone) takes it out again ([`Broker::presence_leave`]).
//!
//! `recovered:false` (the replay cannot be served: trimmed, expired, another epoch, more
//! than half the client's queue) still acknowledges with the current position and the
//! retained state. Modelled on centrifuge's `handleSubscribe` and its buffered recovery
//! merge; see docs/architecture.md.

use std::sync::Arc;

use crate::broker::{Ack, Broker, BrokerError, Identity, StreamPosition, Subscribed};
use crate::client::{Client, Item};
use crate::hub::Hub;

/// Subscribes `client` to `topic` (see the module docs), as the member `who` of a
/// presence topic. A topic it already holds gets the acknowledgement again, with the
/// current position, and nothing else.
pub async fn subscribe(
    hub: &Hub,
    broker: &dyn Broker,
    client: &Arc<Client>,
    topic: &str,
    since: Option<&StreamPosition>,
    ack: Ack<'_>,
    who: &Identity,
) -> Result<Subscribed, BrokerError> {
    if hub.admit(client, topic)? {
        let read = broker.replay(topic, None, 0).await?;
        let sub = Subscribed {
            position: read.position,
            recovered: None,
        };
        if let Some(bytes) = ack(&sub) {
            client.push(Item::control(bytes), hub.metrics());
        }
        return Ok(sub);
    }
    broker.subscribe_topic(topic).await?;
    if let Err(e) = hub.enter(client, topic) {
        broker.unsubscribe_topic(topic);
        return Err(e.into());
    }
    // A replay may take half the client's queue: the rest is for what follows it.
    let read = match broker.replay(topic, since, client.budget() / 2).await {
        Ok(r) => r,
        Err(e) => {
            unsubscribe(hub, broker, client, topic);
            return Err(e);
        }
    };
    let sub = Subscribed {
        position: read.position.clone(),
        recovered: read.recovered,
    };
    if hub.merge(client, topic, &read, ack(&sub)).is_err() {
        unsubscribe(hub, broker, client, topic);
        return Err(if client.closed().is_some() {
            BrokerError::ClientClosed
        } else {
            BrokerError::Unavailable("subscription interrupted".into())
        });
    }
    hub.metrics().record_resume(sub.recovered);
    broker.presence_join(topic, client.id, who).await;
    if let Some(ev) = hub.events() {
        let id = broker.member_id(topic, client.id);
        ev.member_joined(topic, id, who.user.as_deref(), who.info.as_deref());
    }
    // A leave that ran while the join waited (a broker that waits: the connection went
    // away) found no member to remove: take it out now. A leave after this check finds it.
    if !hub.holds(client, topic) {
        broker.presence_leave(topic, client.id);
        if let Some(ev) = hub.events() {
            ev.member_left(topic, broker.member_id(topic, client.id));
        }
    }
    Ok(sub)
}

/// Takes the client off the topic (joined or joining); returns whether it held it.
pub fn unsubscribe(hub: &Hub, broker: &dyn Broker, client: &Client, topic: &str) -> bool {
    let held = hub.leave(client, topic);
    if held {
        broker.presence_leave(topic, client.id);
        if let Some(ev) = hub.events() {
            ev.member_left(topic, broker.member_id(topic, client.id));
        }
        broker.unsubscribe_topic(topic);
    }
    held
}

/// The client's connection is gone: it leaves every topic it holds, and any subscribe of
/// it still in flight is refused from now on. Idempotent.
pub fn remove_client(hub: &Hub, broker: &dyn Broker, client: &Client) {
    for topic in hub.retire(client) {
        unsubscribe(hub, broker, client, &topic);
    }
}

/// The broker's unit tests subscribe through here: the one path, on the broker's test
/// harness (`broker/testing.rs`), which sits below it.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::Arc;

    use bytes::Bytes;

    use crate::broker::testing::TestBroker;
    use crate::broker::{Ack, BrokerError, StreamPosition, Subscribed};
    use crate::client::Client;

    /// The one subscribe path on a memory broker and its hub, run in place: the
    /// in-process broker never waits, so each call completes on its first poll.
    pub(crate) trait Subscribing {
        fn subscribe(
            &self,
            c: &Arc<Client>,
            topic: &str,
            since: Option<&StreamPosition>,
            ack: Ack<'_>,
        ) -> Result<Subscribed, BrokerError>;
        fn unsubscribe(&self, c: &Arc<Client>, topic: &str) -> bool;
        fn remove_client(&self, c: &Arc<Client>);
    }

    impl Subscribing for TestBroker {
        fn subscribe(
            &self,
            c: &Arc<Client>,
            topic: &str,
            since: Option<&StreamPosition>,
            ack: Ack<'_>,
        ) -> Result<Subscribed, BrokerError> {
            let anonymous = crate::broker::Identity::default();
            let fut = super::subscribe(&self.hub, &self.broker, c, topic, since, ack, &anonymous);
            let mut fut = std::pin::pin!(fut);
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            match std::future::Future::poll(fut.as_mut(), &mut cx) {
                std::task::Poll::Ready(r) => r,
                std::task::Poll::Pending => panic!("the memory broker never waits"),
            }
        }

        fn unsubscribe(&self, c: &Arc<Client>, topic: &str) -> bool {
            super::unsubscribe(&self.hub, &self.broker, c, topic)
        }

        /// Leaves every topic the client holds; unlike a connection's cleanup it does not
        /// retire the client, so a test can subscribe it again.
        fn remove_client(&self, c: &Arc<Client>) {
            for t in self.hub.topics_of(c) {
                super::unsubscribe(&self.hub, &self.broker, c, &t);
            }
        }
    }

    pub(crate) fn sub(
        b: &TestBroker,
        c: &Arc<Client>,
        topic: &str,
    ) -> Result<Subscribed, BrokerError> {
        b.subscribe(c, topic, None, &|_| None)
    }

    pub(crate) fn resume(
        b: &TestBroker,
        c: &Arc<Client>,
        topic: &str,
        since: StreamPosition,
    ) -> Subscribed {
        b.subscribe(c, topic, Some(&since), &|s| {
            Some(Bytes::from(format!(
                "ack {} {:?}",
                s.position.offset, s.recovered
            )))
        })
        .unwrap()
    }
}
