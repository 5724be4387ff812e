//! The node's one pub/sub connection: the task that owns it, its incoming messages and the
//! ordered SUBSCRIBE/UNSUBSCRIBE queue, and its reconnection.

use std::sync::Weak;

use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};

use super::scripts::channel;
use super::RedisBroker;
/// The longest pause between two attempts to make the pub/sub connection: a node whose
/// Redis is back listens again (and takes subscriptions again) within about this.
const MAX_BACKOFF: std::time::Duration = std::time::Duration::from_secs(1);

/// Subscribe and unsubscribe, in the order the topic table asked for them.
pub(super) enum Control {
    Subscribe(String, watch::Sender<Option<Result<(), String>>>),
    Unsubscribe(String),
}

/// Serves the node's one pub/sub connection: incoming messages, and subscribe and
/// unsubscribe in the order the topic table asked for them. When the connection is lost
/// (Redis down, `CLIENT KILL TYPE pubsub`, an output-buffer limit), whatever was published
/// meanwhile never arrives: the connection is made again with backoff, every topic still in
/// the table subscribed again, and the hub told that each may have missed publications (it
/// fills the gap from history). Local subscribers stay connected throughout.
pub(super) async fn run_pubsub(
    client: redis::Client,
    first: redis::aio::PubSub,
    me: Weak<RedisBroker>,
    mut rx: mpsc::UnboundedReceiver<Control>,
    timeout: std::time::Duration,
) {
    let mut next = Some(first);
    let mut first_time = true;
    let mut backoff = std::time::Duration::from_millis(100);
    loop {
        let pubsub = match next.take() {
            Some(p) => p,
            None => match tokio::time::timeout(timeout, client.get_async_pubsub()).await {
                Ok(Ok(p)) => p,
                _ => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            },
        };
        let (mut sink, mut stream) = pubsub.split();
        let Some(names) = me.upgrade().map(|b| b.topic_names()) else {
            return;
        };
        let mut resubscribed = true;
        for name in names {
            if sink.subscribe(channel(&name)).await.is_err() {
                resubscribed = false;
                break;
            }
        }
        if resubscribed {
            backoff = std::time::Duration::from_millis(100);
            if let Some(broker) = me.upgrade() {
                broker.health.set_subscribed(true);
                if !first_time {
                    tracing::info!("redis pub/sub connection back: filling gaps from history");
                    // Before any message of the new connection is handed on: the hub holds
                    // what arrives from now on until its history read is in.
                    broker.resubscribed();
                }
            }
            first_time = false;
            loop {
                tokio::select! {
                    msg = stream.next() => {
                        let Some(msg) = msg else { break };
                        let Some(broker) = me.upgrade() else { return };
                        broker.on_message(msg.get_channel_name(), msg.get_payload_bytes());
                    }
                    c = rx.recv() => match c {
                        None => return,
                        Some(Control::Subscribe(ch, done)) => {
                            let r = sink.subscribe(&ch).await.map_err(|e| e.to_string());
                            let _ = done.send(Some(r));
                        }
                        Some(Control::Unsubscribe(ch)) => {
                            if let Err(e) = sink.unsubscribe(&ch).await {
                                tracing::warn!("redis unsubscribe {ch}: {e}");
                            }
                        }
                    },
                }
            }
        }
        tracing::error!("the redis pub/sub connection was lost: reconnecting");
        let Some(broker) = me.upgrade() else { return };
        broker.lost_pubsub();
        drop(broker);
        if !resubscribed {
            // Redis took the connection but refused SUBSCRIBE (a full output buffer, an
            // ACL, a Redis still loading): reconnecting at once would spin.
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}
