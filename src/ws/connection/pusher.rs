//! A WebSocket connection speaking the Pusher protocol (`Mode::Pusher`, docs/pusher.md):
//! the same task, budget, frame rate, deadlines and queue as a crier connection; only its
//! messages differ. Channels are topics of the app's own space (`App::topic`), subscribed
//! through the one subscribe path; the hub frames each publication for Pusher
//! (`Publication::wire(Transport::Pusher)`) once for every subscriber.

use std::sync::Arc;
use std::time::Instant;

use super::{subscribe_error, Connection};
use crate::broker::{Identity, PublishRequest};
use crate::client::Item;
use crate::close::DisconnectReason;
use crate::pusher::messages::{self, code, Data, Incoming};
use crate::pusher::{sign, AppSlot};
use crate::rate::{Rate, TokenBucket};
use crate::subscribe;
use crate::ws::frame;

/// Client events a connection may send per second (Pusher's limit), bursts of as many.
const CLIENT_EVENTS: Rate = Rate {
    per_second: 10.0,
    burst: 10.0,
};

/// The most users a presence subscription's `subscription_succeeded` lists (Pusher's
/// limit of a presence channel); past it the hash is cut, `count` stays true. Keeps the
/// frame (at most 100 × `MAX_CHANNEL_DATA`) well inside a client's queue.
pub const MAX_PRESENCE_HASH: usize = 100;

/// Longest `channel_data` of a presence subscription (user id and info), which the node
/// keeps for as long as the member stays.
pub const MAX_CHANNEL_DATA: usize = 2048;

/// A Pusher connection's app (its share of the app's connections) and its own limits.
pub struct Session {
    slot: AppSlot,
    /// The user this connection is on each presence channel it subscribed (the `user_id`
    /// of its client events there); at most `max_topics_per_connection` entries.
    users: Vec<(String, Arc<str>)>,
    /// The user this connection signed in as (`pusher:signin`), once accepted.
    signed_in: Option<Arc<str>>,
    client_events: TokenBucket,
    /// `crier_pusher_connections{app}`, given back on drop.
    gauge: prometheus_client::metrics::gauge::Gauge,
}

impl Session {
    pub fn new(slot: AppSlot, metrics: &crate::metrics::Metrics) -> Box<Session> {
        let gauge = metrics
            .pusher_connections
            .get_or_create(&crate::metrics::AppLabel {
                app: slot.0.id.clone(),
            })
            .clone();
        gauge.inc();
        Box::new(Session {
            slot,
            users: Vec::new(),
            signed_in: None,
            client_events: TokenBucket::full(CLIENT_EVENTS, Instant::now()),
            gauge,
        })
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// The close code a Pusher client gets for `reason`: 4000-4099 do not reconnect,
/// 4100-4199 reconnect after a pause, 4200-4299 at once, 4300-4399 with backoff.
pub fn close_code(reason: DisconnectReason) -> u16 {
    match reason {
        DisconnectReason::Normal => 1000,
        DisconnectReason::Shutdown => code::RECONNECT,
        DisconnectReason::NoPong => code::PONG_NOT_RECEIVED,
        DisconnectReason::TooManyCommands => code::RATE_LIMITED,
        // Pusher's "unauthorized": pusher-js does not reconnect on its own.
        DisconnectReason::Terminated => code::UNAUTHORIZED,
        DisconnectReason::ProtocolError
        | DisconnectReason::BadUtf8
        | DisconnectReason::MessageTooLarge
        | DisconnectReason::TooManyFragments => reason.code(),
        _ => code::RETRY_LATER,
    }
}

/// The user id of a `pusher:signin`'s `user_data`: a JSON object with a string `id`
/// (what pusher-js requires too), at most `MAX_CHANNEL_DATA` bytes.
fn signin_user(user_data: &str) -> Result<Arc<str>, String> {
    #[derive(serde::Deserialize)]
    struct UserData {
        id: serde_json::Value,
    }
    if user_data.len() > MAX_CHANNEL_DATA {
        return Err(format!("user_data is over {MAX_CHANNEL_DATA} bytes"));
    }
    let d: UserData = serde_json::from_str(user_data).map_err(|e| format!("bad user_data: {e}"))?;
    match d.id {
        serde_json::Value::String(id) if crate::topic::is_valid_pusher_user_id(&id) => {
            Ok(id.into())
        }
        _ => Err(format!(
            "user_data.id must be a string of 1-{} bytes of A-Z a-z 0-9 _ - = @ , . ;",
            crate::topic::MAX_PUSHER_USER_ID
        )),
    }
}

/// A presence subscription's `channel_data`: `{"user_id":..,"user_info":..}`.
fn presence_identity(channel_data: &str) -> Result<Identity, String> {
    #[derive(serde::Deserialize)]
    struct ChannelData<'a> {
        user_id: serde_json::Value,
        #[serde(borrow)]
        user_info: Option<&'a serde_json::value::RawValue>,
    }
    if channel_data.len() > MAX_CHANNEL_DATA {
        return Err(format!("channel_data is over {MAX_CHANNEL_DATA} bytes"));
    }
    let d: ChannelData =
        serde_json::from_str(channel_data).map_err(|e| format!("bad channel_data: {e}"))?;
    let user = match d.user_id {
        serde_json::Value::String(s) if !s.is_empty() && s.len() <= 128 => s,
        serde_json::Value::Number(n) => n.to_string(),
        _ => return Err("channel_data.user_id must be a string (1-128 bytes) or a number".into()),
    };
    Ok(Identity {
        user: Some(user.into()),
        info: d.user_info.map(|i| i.get().into()),
    })
}

fn is_private(channel: &str) -> bool {
    channel.starts_with("private-") || channel.starts_with("presence-")
}

impl Connection {
    fn pusher_reply(&self, json: Vec<u8>) {
        self.reply(json);
    }

    fn pusher_error(&self, code: Option<u16>, message: &str) {
        self.pusher_reply(messages::error(code, message));
    }

    pub(super) fn pusher_command(&mut self, text: &[u8]) {
        let msg = match messages::parse(text) {
            Ok(m) => m,
            Err(messages::Bad(code, message)) => return self.pusher_error(code, &message),
        };
        match msg {
            Incoming::Ping => self.pusher_reply(messages::pong()),
            Incoming::Pong => {}
            Incoming::Subscribe {
                channel,
                auth,
                channel_data,
            } => self.pusher_subscribe(channel, auth, channel_data),
            Incoming::Signin { auth, user_data } => self.pusher_signin(&auth, user_data),
            // A signed-in connection keeps its user channel: the app's sends and
            // `terminate_connections` reach it through it.
            Incoming::Unsubscribe { channel }
                if crate::topic::pusher_user_of(&channel).is_some() => {}
            Incoming::Unsubscribe { channel } => {
                let Some(topic) = self.pusher_topic(&channel) else {
                    return;
                };
                if let Some(s) = self.pusher.as_mut() {
                    s.users.retain(|(c, _)| *c != channel);
                }
                let (state, client) = (self.reg.state().clone(), self.reg.client.clone());
                self.in_order(async move {
                    subscribe::unsubscribe(&state.hub, &*state.broker, &client, &topic);
                });
            }
            Incoming::ClientEvent {
                event,
                channel,
                data,
            } => self.pusher_client_event(event, channel, data),
        }
    }

    /// The topic a channel of this connection's app is (a leaderboard's for `board@NAME`).
    fn pusher_topic(&self, channel: &str) -> Option<String> {
        let session = self.pusher.as_ref()?;
        Some(crate::topic::watched_topic(channel).unwrap_or_else(|| session.slot.0.topic(channel)))
    }

    /// `pusher:signin`: the signature checked in constant time, then the connection joins
    /// its user's channel (`#server-to-user-ID`) and gets `pusher:signin_success`. Once per
    /// connection; a refusal is `pusher:error` 4009 and the connection stays.
    fn pusher_signin(&mut self, auth: &str, user_data: String) {
        let Some(session) = self.pusher.as_ref() else {
            return;
        };
        if session.signed_in.is_some() {
            return self.pusher_error(
                Some(code::UNAUTHORIZED),
                "this connection is signed in already",
            );
        }
        let app = session.slot.0.clone();
        let socket_id = crate::publication::socket_id(self.reg.client.id);
        if !sign::check_user_auth(&app, &socket_id, &user_data, auth) {
            let msg = format!(
                "invalid signature for pusher:signin: expected {}:HMAC-SHA256 of \
                 \"{socket_id}::user::USER_DATA\" with the app's secret",
                app.key
            );
            return self.pusher_error(Some(code::UNAUTHORIZED), &msg);
        }
        let user = match signin_user(&user_data) {
            Ok(u) => u,
            Err(msg) => return self.pusher_error(Some(code::UNAUTHORIZED), &msg),
        };
        if let Some(s) = self.pusher.as_mut() {
            s.signed_in = Some(user.clone());
        }
        let topic = app.user_topic(&user);
        let (state, client) = (self.state().clone(), self.reg.client.clone());
        self.in_order(async move {
            let (hub, broker) = (&state.hub, &*state.broker);
            let no_ack = |_: &_| None;
            let who = crate::broker::Identity::default();
            let reply =
                match subscribe::subscribe(hub, broker, &client, &topic, None, &no_ack, &who).await
                {
                    Ok(_) => messages::signin_success(&user_data),
                    Err(e) => {
                        if subscribe_error(&e, None).is_none() {
                            return; // the client is gone
                        }
                        messages::error(None, &format!("pusher:signin not completed: {e}"))
                    }
                };
            client.push(
                Item::control(frame::encode(frame::OP_TEXT, &reply)),
                &state.metrics,
            );
        });
    }

    fn pusher_subscribe(
        &mut self,
        channel: String,
        auth: Option<String>,
        channel_data: Option<String>,
    ) {
        let Some(session) = self.pusher.as_ref() else {
            return;
        };
        let app = session.slot.0.clone();
        if let Some(user) = crate::topic::pusher_user_of(&channel) {
            if session.signed_in.as_deref() != Some(user) {
                let msg = format!("{channel} is the channel of a user this connection is not signed in as (pusher:signin)");
                self.pusher_reply(messages::subscription_error(&channel, 403, &msg));
                return self.pusher_error(Some(code::UNAUTHORIZED), &msg);
            }
        }
        let socket_id = crate::publication::socket_id(self.reg.client.id);
        let presence = channel.starts_with("presence-");
        let mut who = Identity::default();
        if is_private(&channel) {
            let data = channel_data.as_deref().filter(|_| presence);
            let signed = auth
                .as_deref()
                .is_some_and(|a| sign::check_channel_auth(&app, &socket_id, &channel, data, a));
            if !signed {
                let msg = format!(
                    "invalid signature for {channel}: expected {}:HMAC-SHA256 of \
                     \"{socket_id}:{channel}{}\" with the app's secret",
                    app.key,
                    if presence { ":CHANNEL_DATA" } else { "" }
                );
                self.pusher_reply(messages::subscription_error(&channel, 401, &msg));
                return self.pusher_error(Some(code::UNAUTHORIZED), &msg);
            }
            if presence {
                match presence_identity(data.unwrap_or("")) {
                    Ok(w) => {
                        let user = w.user.clone().expect("a presence identity has a user");
                        let limit = self.reg.state().cfg.max_topics_per_connection;
                        if let Some(s) = self.pusher.as_mut() {
                            s.users.retain(|(c, _)| *c != channel);
                            if s.users.len() < limit {
                                s.users.push((channel.clone(), user));
                            }
                        }
                        who = w;
                    }
                    Err(msg) => {
                        self.pusher_reply(messages::subscription_error(&channel, 400, &msg));
                        return self.pusher_error(Some(code::UNAUTHORIZED), &msg);
                    }
                }
            }
        }
        let Some(topic) = self.pusher_topic(&channel) else {
            return;
        };
        // A watched crier topic (`board@NAME`) is read as crier reads it: a private one
        // needs a token, which a Pusher connection never has.
        if let Err(e) = self.reg.state().auth.check_read(&topic, None) {
            // A friends view's set the topic rules refuse is the request's fault (400);
            // anything else is access (403).
            let status = if e.code == crate::error_code::ErrorCode::BadTopic {
                400
            } else {
                403
            };
            self.pusher_reply(messages::subscription_error(&channel, status, &e.message));
            return self.pusher_error(Some(code::UNAUTHORIZED), &e.message);
        }
        let cache = messages::is_cache_channel(&channel);
        let (state, client) = (self.reg.state().clone(), self.reg.client.clone());
        self.in_order(async move {
            let succeeded = |data: &str| {
                frame::encode(
                    frame::OP_TEXT,
                    &messages::subscription_succeeded(&channel, data),
                )
            };
            let ack = |_: &_| (!presence).then(|| succeeded("{}"));
            let (hub, broker) = (&state.hub, &*state.broker);
            let result = subscribe::subscribe(hub, broker, &client, &topic, None, &ack, &who).await;
            if result.is_ok() {
                state.boards.watching(&topic);
            }
            // Nothing was ever published (or it is gone with the topic): the retained
            // event a cache channel would give does not exist.
            if cache && result.as_ref().is_ok_and(|s| s.position.offset == 0) {
                if let Some(ev) = hub.events() {
                    ev.cache_miss(&topic);
                }
                let miss = messages::cache_miss(&channel);
                client.push(
                    Item::control(frame::encode(frame::OP_TEXT, &miss)),
                    &state.metrics,
                );
            }
            if let Err(e) = result {
                // None: the client is gone, nobody to tell.
                if subscribe_error(&e, None).is_some() {
                    let err = messages::subscription_error(&channel, 503, &e.to_string());
                    client.push(
                        Item::control(frame::encode(frame::OP_TEXT, &err)),
                        &state.metrics,
                    );
                }
                return;
            }
            if presence {
                let hash = presence_hash(&state, &topic).await;
                client.push(Item::control(succeeded(&hash)), &state.metrics);
            }
        });
    }

    fn pusher_client_event(&mut self, event: String, channel: String, data: String) {
        let Some(session) = self.pusher.as_mut() else {
            return;
        };
        let app = session.slot.0.clone();
        if !app.client_events {
            return self.pusher_error(
                Some(code::UNAUTHORIZED),
                "client events are not enabled for this app (enable_client_events)",
            );
        }
        if !is_private(&channel) {
            return self.pusher_error(
                Some(code::UNAUTHORIZED),
                "client events go on private- and presence- channels only",
            );
        }
        if !session.client_events.take(CLIENT_EVENTS, Instant::now()) {
            return self.pusher_error(
                Some(code::RATE_LIMITED),
                "more than 10 client events per second: this one was dropped",
            );
        }
        let topic = app.topic(&channel);
        if !self.reg.state().hub.holds(&self.reg.client, &topic) {
            return self.pusher_error(
                Some(code::UNAUTHORIZED),
                &format!("subscribe to {channel} before sending client events on it"),
            );
        }
        let socket_id = crate::publication::socket_id(self.reg.client.id);
        let user = session
            .users
            .iter()
            .find(|(c, _)| *c == channel)
            .map(|(_, u)| u.clone());
        let json = messages::event(
            &event,
            &channel,
            &Data::Json(&data),
            Some(&socket_id),
            user.as_deref(),
        );
        let (state, client) = (self.reg.state().clone(), self.reg.client.clone());
        self.in_order(async move {
            let req = PublishRequest {
                topic: &topic,
                data: &json,
                retain: messages::is_cache_channel(&channel),
                ..PublishRequest::default()
            };
            let published = state.broker.publish(req).await;
            if published.is_ok() {
                let label = crate::metrics::AppEventLabel {
                    app: app.id.clone(),
                    source: "client",
                };
                state.metrics.pusher_events.get_or_create(&label).inc();
            }
            if let (Ok(_), Some(ev)) = (&published, state.hub.events()) {
                ev.client_event(&topic, &event, &data, &socket_id, user.as_deref());
            }
            if let Err(e) = published {
                let err = messages::error(None, &format!("client event not sent: {e}"));
                client.push(
                    Item::control(frame::encode(frame::OP_TEXT, &err)),
                    &state.metrics,
                );
            }
        });
    }
}

/// `{"presence":{"ids":[..],"hash":{id:info},"count":n}}` of a presence topic, read
/// after the subscriber joined (so it is among them), one user per distinct user id.
async fn presence_hash(state: &Arc<crate::state::AppState>, topic: &str) -> String {
    let mut hash = serde_json::Map::new();
    let mut after = None;
    while hash.len() < MAX_PRESENCE_HASH {
        let Ok(page) = state.broker.presence(topic, after, 100).await else {
            break;
        };
        for m in &page.members {
            if let Some(user) = &m.user {
                let info = m
                    .info
                    .as_deref()
                    .and_then(|i| serde_json::from_str(i).ok())
                    .unwrap_or(serde_json::Value::Null);
                hash.entry(user.to_string()).or_insert(info);
            }
        }
        match page.next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    let count = state
        .broker
        .presence_stats(topic)
        .await
        .map_or(hash.len(), |s| s.users);
    let ids: Vec<&String> = hash.keys().collect();
    serde_json::json!({"presence": {"ids": ids, "hash": hash, "count": count}}).to_string()
}
