//! The Pusher protocol's messages (version 7): what a client sends, parsed into
//! [`Incoming`], and what the server sends, encoded once as JSON. A message is
//! `{"event":NAME,"channel":CHANNEL,"data":DATA}`; the server's `data` is a JSON string
//! (pusher-js parses it), a client's may be an object.

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::topic::is_valid_pusher_channel;

/// The protocol versions spoken (pusher-js sends 7).
pub const PROTOCOLS: std::ops::RangeInclusive<u32> = 5..=7;

/// Longest client event name, as Pusher (and longest HTTP API event name).
pub const MAX_EVENT_NAME: usize = 200;

/// Pusher's error codes (docs/pusher.md); the 4000s close the connection with that code.
pub mod code {
    /// The app key is unknown.
    pub const UNKNOWN_APP: u16 = 4001;
    /// The protocol version is not spoken.
    pub const BAD_PROTOCOL: u16 = 4007;
    /// A subscription's auth is missing or wrong, or a client event is not allowed.
    pub const UNAUTHORIZED: u16 = 4009;
    /// The app or the node is at its connection limit: retry later.
    pub const OVER_CAPACITY: u16 = 4100;
    /// Reconnect now (the node is shutting down).
    pub const RECONNECT: u16 = 4200;
    /// No pong to the server's ping.
    pub const PONG_NOT_RECEIVED: u16 = 4201;
    /// Closed after an error the client may retry after a while (slow consumer, a stalled
    /// write, a stream restarted).
    pub const RETRY_LATER: u16 = 4300;
    /// More frames per second than allowed (client events count).
    pub const RATE_LIMITED: u16 = 4301;
}

/// A client's message.
#[derive(Debug, PartialEq)]
pub enum Incoming {
    Ping,
    Pong,
    Subscribe {
        channel: String,
        auth: Option<String>,
        channel_data: Option<String>,
    },
    Unsubscribe {
        channel: String,
    },
    /// `pusher:signin`: `auth` = `KEY:HMAC(secret, "SOCKET_ID::user::USER_DATA")` from the
    /// app's user authentication endpoint.
    Signin {
        auth: String,
        user_data: String,
    },
    /// `client-*` on `channel`, with its `data` as sent.
    ClientEvent {
        event: String,
        channel: String,
        data: String,
    },
}

#[derive(Deserialize)]
struct Raw<'a> {
    #[serde(borrow)]
    event: std::borrow::Cow<'a, str>,
    channel: Option<String>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct SigninData {
    auth: String,
    user_data: String,
}

#[derive(Deserialize)]
struct SubscribeData {
    channel: String,
    auth: Option<String>,
    channel_data: Option<String>,
}

/// What a message that cannot be taken gets: a `pusher:error` with this code and text.
#[derive(Debug, PartialEq, Eq)]
pub struct Bad(pub Option<u16>, pub String);

fn bad(message: impl Into<String>) -> Bad {
    Bad(None, message.into())
}

fn channel_ok(channel: &str) -> Result<(), Bad> {
    if is_valid_pusher_channel(channel) {
        Ok(())
    } else {
        Err(bad(format!(
            "invalid channel name {channel:?}: 1-164 bytes of A-Z a-z 0-9 _ - = @ , . ;"
        )))
    }
}

/// `data` of a subscribe or signin, either an object or a string holding one (clients
/// differ).
fn object_data<T: serde::de::DeserializeOwned>(
    event: &str,
    data: Option<&RawValue>,
) -> Result<T, Bad> {
    let raw = data.ok_or_else(|| bad(format!("{event} needs data")))?;
    let parsed = match serde_json::from_str::<String>(raw.get()) {
        Ok(text) => serde_json::from_str(&text),
        Err(_) => serde_json::from_str(raw.get()),
    };
    parsed.map_err(|e| bad(format!("{event} data: {e}")))
}

fn subscribe_data(data: Option<&RawValue>) -> Result<SubscribeData, Bad> {
    object_data("pusher:subscribe", data)
}

pub fn parse(text: &[u8]) -> Result<Incoming, Bad> {
    let raw: Raw = serde_json::from_slice(text).map_err(|e| {
        bad(format!(
            "not a Pusher message ({{\"event\":..,\"data\":..}}): {e}"
        ))
    })?;
    match &*raw.event {
        "pusher:ping" => Ok(Incoming::Ping),
        "pusher:pong" => Ok(Incoming::Pong),
        "pusher:subscribe" => {
            let d = subscribe_data(raw.data)?;
            channel_ok(&d.channel)?;
            Ok(Incoming::Subscribe {
                channel: d.channel,
                auth: d.auth,
                channel_data: d.channel_data,
            })
        }
        "pusher:unsubscribe" => {
            let d = subscribe_data(raw.data)?;
            channel_ok(&d.channel)?;
            Ok(Incoming::Unsubscribe { channel: d.channel })
        }
        "pusher:signin" => {
            let d: SigninData = object_data("pusher:signin", raw.data)?;
            Ok(Incoming::Signin {
                auth: d.auth,
                user_data: d.user_data,
            })
        }
        e if e.starts_with("client-") => {
            if e.len() > MAX_EVENT_NAME {
                return Err(bad(format!(
                    "event names are at most {MAX_EVENT_NAME} bytes"
                )));
            }
            let channel = raw
                .channel
                .ok_or_else(|| bad("a client event needs a channel"))?;
            channel_ok(&channel)?;
            let data = raw.data.map_or("{}", |d| d.get()).to_string();
            Ok(Incoming::ClientEvent {
                event: e.to_string(),
                channel,
                data,
            })
        }
        other => Err(bad(format!("unknown event {other:?}"))),
    }
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).expect("a string encodes")
}

/// `pusher:connection_established`: the socket id and how long the client may stay
/// silent before it pings (seconds).
pub fn connection_established(socket_id: &str, activity_timeout: u64) -> Vec<u8> {
    let data = format!(r#"{{"socket_id":"{socket_id}","activity_timeout":{activity_timeout}}}"#);
    format!(
        r#"{{"event":"pusher:connection_established","data":{}}}"#,
        json_string(&data)
    )
    .into_bytes()
}

/// `pusher:signin_success`: the `user_data` the connection signed in with, as a string
/// (pusher-js parses it and subscribes to the user's channel).
pub fn signin_success(user_data: &str) -> Vec<u8> {
    let data = serde_json::json!({ "user_data": user_data }).to_string();
    format!(
        r#"{{"event":"pusher:signin_success","data":{}}}"#,
        json_string(&data)
    )
    .into_bytes()
}

pub fn pong() -> Vec<u8> {
    br#"{"event":"pusher:pong","data":"{}"}"#.to_vec()
}

pub fn error(code: Option<u16>, message: &str) -> Vec<u8> {
    let code = code.map_or("null".to_string(), |c| c.to_string());
    format!(
        r#"{{"event":"pusher:error","data":{{"code":{code},"message":{}}}}}"#,
        json_string(message)
    )
    .into_bytes()
}

/// A refused subscription (as Soketi and Reverb send it; pusher-js emits it on the
/// channel): `status` is the HTTP-like reason (401 auth, 403 not allowed, 503 full).
pub fn subscription_error(channel: &str, status: u16, message: &str) -> Vec<u8> {
    format!(
        r#"{{"event":"pusher:subscription_error","channel":"{channel}","data":{{"type":"AuthError","error":{},"status":{status}}}}}"#,
        json_string(message)
    )
    .into_bytes()
}

/// `pusher_internal:subscription_succeeded`; `data` is the JSON the client gets as a
/// string (`{}`, or the presence members).
pub fn subscription_succeeded(channel: &str, data: &str) -> Vec<u8> {
    format!(
        r#"{{"event":"pusher_internal:subscription_succeeded","channel":"{channel}","data":{}}}"#,
        json_string(data)
    )
    .into_bytes()
}

/// An event as the hub fans it out on a channel's topic (`Publication::wire`):
/// `{"x":"SOCKET",` marks the socket it skips (taken out before anyone receives it).
/// `data` is sent as a string; a client event's object data is sent as it came. A client
/// event on a presence channel names its sender's `user_id`.
pub fn event(
    event: &str,
    channel: &str,
    data: &Data<'_>,
    exclude: Option<&str>,
    user: Option<&str>,
) -> Vec<u8> {
    let mut out = String::with_capacity(64 + event.len() + channel.len());
    out.push('{');
    if let Some(socket) = exclude {
        out.push_str(&format!(r#""x":"{socket}","#));
    }
    out.push_str(&format!(
        r#""event":{},"channel":"{channel}","data":"#,
        json_string(event)
    ));
    match data {
        Data::Text(s) => out.push_str(&json_string(s)),
        Data::Json(raw) => out.push_str(raw),
    }
    if let Some(u) = user {
        out.push_str(r#","user_id":"#);
        out.push_str(&json_string(u));
    }
    out.push('}');
    out.into_bytes()
}

/// An event's data: a string (the HTTP API's), or JSON as a client sent it.
pub enum Data<'a> {
    Text(&'a str),
    Json(&'a str),
}

/// A cache channel (`cache-`, `private-cache-`, `presence-cache-`, also encrypted): its
/// last event is retained and given to each new subscriber, or `pusher:cache_miss`.
pub fn is_cache_channel(channel: &str) -> bool {
    [
        "cache-",
        "private-cache-",
        "private-encrypted-cache-",
        "presence-cache-",
    ]
    .iter()
    .any(|p| channel.starts_with(p))
}

/// `pusher:cache_miss`: a cache channel with no event to give yet.
pub fn cache_miss(channel: &str) -> Vec<u8> {
    format!(r#"{{"event":"pusher:cache_miss","channel":"{channel}","data":"{{}}"}}"#).into_bytes()
}

/// A socket id as a server SDK sends it: `DIGITS.DIGITS`.
pub fn is_socket_id(s: &str) -> bool {
    s.len() <= 41
        && s.split_once('.').is_some_and(|(a, b)| {
            !a.is_empty()
                && !b.is_empty()
                && a.bytes().all(|c| c.is_ascii_digit())
                && b.bytes().all(|c| c.is_ascii_digit())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_pusher_js_sends() {
        assert_eq!(
            parse(br#"{"event":"pusher:ping","data":{}}"#),
            Ok(Incoming::Ping)
        );
        assert_eq!(
            parse(br#"{"event":"pusher:subscribe","data":{"auth":"","channel":"my-channel"}}"#),
            Ok(Incoming::Subscribe {
                channel: "my-channel".into(),
                auth: Some(String::new()),
                channel_data: None
            })
        );
        assert_eq!(
            parse(br#"{"event":"pusher:unsubscribe","data":"{\"channel\":\"a\"}"}"#),
            Ok(Incoming::Unsubscribe {
                channel: "a".into()
            })
        );
        assert!(parse(br#"{"event":"pusher:subscribe","data":{"channel":"a b"}}"#).is_err());
        assert!(parse(b"nope").is_err());
        assert!(parse(br#"{"event":"other"}"#).is_err());
        assert_eq!(
            parse(
                br#"{"event":"pusher:signin","data":{"auth":"k:s","user_data":"{\"id\":\"1\"}"}}"#
            ),
            Ok(Incoming::Signin {
                auth: "k:s".into(),
                user_data: r#"{"id":"1"}"#.into()
            })
        );
        assert!(parse(br#"{"event":"pusher:signin","data":{"auth":"k:s"}}"#).is_err());
        match parse(br#"{"event":"client-x","channel":"private-a","data":{"k":1}}"#) {
            Ok(Incoming::ClientEvent { data, .. }) => assert_eq!(data, r#"{"k":1}"#),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn frames_are_json_with_string_data() {
        let v: serde_json::Value =
            serde_json::from_slice(&connection_established("1.2", 120)).unwrap();
        let d: serde_json::Value = serde_json::from_str(v["data"].as_str().unwrap()).unwrap();
        assert_eq!(d["socket_id"], "1.2");
        let e = event("my-event", "c", &Data::Text("{\"a\":1}"), Some("1.2"), None);
        assert!(e.starts_with(br#"{"x":"1.2","event":"my-event""#));
        let v: serde_json::Value = serde_json::from_slice(&e).unwrap();
        assert_eq!(v["data"], "{\"a\":1}");
        assert!(is_socket_id("123.456") && !is_socket_id("1.2.3") && !is_socket_id(".1"));
    }
}
