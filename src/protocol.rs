//! Client commands and the server's replies (docs/protocol.md). Replies are small and
//! rare next to publications, so plain serde is fine here.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::auth::Grant;
use crate::broker::{PresencePage, PresenceStats, StreamPosition, Subscribed};
use crate::error_code::ErrorCode;

#[derive(Deserialize)]
pub struct Command<'a> {
    #[serde(borrow)]
    pub op: Option<&'a RawValue>,
    pub topic: Option<String>,
    #[serde(borrow)]
    pub id: Option<&'a RawValue>,
    /// Resume position: `{"offset":41,"epoch":"9f1c2a7b"}`.
    #[serde(borrow)]
    pub since: Option<&'a RawValue>,
    /// `auth` and `refresh`: a JWT. Borrowed when it has no escapes (a JWT never does).
    #[serde(borrow)]
    pub token: Option<Cow<'a, str>>,
    /// `presence`: the most members in the reply (1-1000, default 1000).
    pub limit: Option<u64>,
    /// `presence`: the `next_cursor` of the previous reply.
    #[serde(borrow)]
    pub cursor: Option<&'a RawValue>,
}

#[derive(Serialize)]
struct Reply<'a> {
    op: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    topic: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    epoch: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    recovered: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sub: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exp: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a RawValue>,
}

impl<'a> Reply<'a> {
    fn op(op: &'static str, id: Option<&'a RawValue>) -> Self {
        Reply {
            op,
            topic: None,
            offset: None,
            epoch: None,
            recovered: None,
            code: None,
            message: None,
            sub: None,
            exp: None,
            id,
        }
    }
    fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("reply serializes")
    }
}

pub fn subscribed(topic: &str, sub: &Subscribed, id: Option<&RawValue>) -> Vec<u8> {
    Reply {
        topic: Some(topic),
        offset: Some(sub.position.offset),
        epoch: Some(&sub.position.epoch),
        recovered: sub.recovered,
        ..Reply::op("subscribed", id)
    }
    .encode()
}

pub fn unsubscribed(topic: &str, id: Option<&RawValue>) -> Vec<u8> {
    Reply {
        topic: Some(topic),
        ..Reply::op("unsubscribed", id)
    }
    .encode()
}

/// The answer to `auth` (`op` "authed") or `refresh` (`op` "refreshed"): who the token
/// names and until when, never the token itself.
pub fn authed(op: &'static str, grant: &Grant, id: Option<&RawValue>) -> Vec<u8> {
    Reply {
        sub: Some(&grant.sub),
        exp: Some(grant.exp),
        ..Reply::op(op, id)
    }
    .encode()
}

pub fn pong(id: Option<&RawValue>) -> Vec<u8> {
    Reply::op("pong", id).encode()
}

pub fn error(code: ErrorCode, message: &str, id: Option<&RawValue>) -> Vec<u8> {
    Reply {
        code: Some(code.as_str()),
        message: Some(message),
        ..Reply::op("error", id)
    }
    .encode()
}

/// The most members one `presence` reply (or HTTP page) holds, and its default size.
pub const MAX_PRESENCE_PAGE: usize = 1000;

/// The answer to `presence`: `{"op":"presence","topic":"t","members":[...],"next_cursor":"N"}`
/// (`next_cursor` only when more members follow: send it back as `cursor`).
pub fn presence(topic: &str, page: &PresencePage, id: Option<&RawValue>) -> Vec<u8> {
    // Topic names need no escaping (topic.rs charset).
    let mut out = format!(r#"{{"op":"presence","topic":"{topic}","members":["#);
    for (i, m) in page.members.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        m.write_json(&mut out);
    }
    out.push(']');
    if let Some(next) = page.next {
        out.push_str(&format!(r#","next_cursor":"{next}""#));
    }
    if let Some(id) = id {
        out.push_str(r#","id":"#);
        out.push_str(id.get());
    }
    out.push('}');
    out.into_bytes()
}

/// The answer to `presence_stats`: `{"op":"presence_stats","topic":"t","clients":N,"users":M}`.
pub fn presence_stats(topic: &str, stats: &PresenceStats, id: Option<&RawValue>) -> Vec<u8> {
    let mut out = format!(
        r#"{{"op":"presence_stats","topic":"{topic}","clients":{},"users":{}"#,
        stats.clients, stats.users
    );
    if let Some(id) = id {
        out.push_str(r#","id":"#);
        out.push_str(id.get());
    }
    out.push('}');
    out.into_bytes()
}

/// A `presence` read: the topic, the cursor (a client id) and the page size.
pub struct PresenceRead {
    pub topic: String,
    pub after: Option<u64>,
    pub limit: usize,
}

/// What a text frame asks for, or the error reply it earns.
pub enum Parsed<'a> {
    Subscribe(String, Option<StreamPosition>, Option<&'a RawValue>),
    Unsubscribe(String, Option<&'a RawValue>),
    Presence(PresenceRead, Option<&'a RawValue>),
    PresenceStats(String, Option<&'a RawValue>),
    Ping(Option<&'a RawValue>),
    /// `auth` with its token (not yet verified).
    Auth(Cow<'a, str>, Option<&'a RawValue>),
    /// `refresh` with its token (not yet verified).
    Refresh(Cow<'a, str>, Option<&'a RawValue>),
    /// An `auth` or `refresh` without a token string: a failed one (error, then close 4501).
    NoToken(&'static str, Option<&'a RawValue>),
    Error(ErrorCode, String, Option<&'a RawValue>),
}

pub fn parse(text: &[u8]) -> Parsed<'_> {
    let cmd: Command = match serde_json::from_slice(text) {
        Ok(c) => c,
        Err(e) => {
            return Parsed::Error(
                ErrorCode::BadJson,
                format!("command is not a JSON object: {e}"),
                None,
            )
        }
    };
    let id = cmd.id.filter(|v| {
        let s = v.get();
        s.starts_with('"') || s.starts_with('-') || s.as_bytes()[0].is_ascii_digit()
    });
    let op = cmd
        .op
        .and_then(|o| serde_json::from_str::<&str>(o.get()).ok());
    let topic = || match &cmd.topic {
        Some(t) if crate::topic::is_valid(t) => Ok(t.clone()),
        _ => Err(Parsed::Error(
            ErrorCode::BadTopic,
            crate::topic::BAD_TOPIC_MESSAGE.to_string(),
            id,
        )),
    };
    match op {
        Some("subscribe") => {
            let since = match cmd
                .since
                .map(|v| serde_json::from_str::<StreamPosition>(v.get()))
            {
                None => None,
                Some(Ok(p)) if p.epoch.len() <= 64 => Some(p),
                Some(_) => {
                    return Parsed::Error(
                        ErrorCode::BadSince,
                        "since must be {\"offset\":N,\"epoch\":\"...\"} as received in a \
                         publication or subscribed reply"
                            .into(),
                        id,
                    )
                }
            };
            topic()
                .map(|t| Parsed::Subscribe(t, since, id))
                .unwrap_or_else(|e| e)
        }
        Some("unsubscribe") => topic()
            .map(|t| Parsed::Unsubscribe(t, id))
            .unwrap_or_else(|e| e),
        Some("presence") => {
            let topic = match topic() {
                Ok(t) => t,
                Err(e) => return e,
            };
            let limit = match cmd.limit {
                None => MAX_PRESENCE_PAGE,
                Some(n) if (1..=MAX_PRESENCE_PAGE as u64).contains(&n) => n as usize,
                Some(_) => {
                    return Parsed::Error(
                        ErrorCode::BadQuery,
                        format!("limit must be 1-{MAX_PRESENCE_PAGE}"),
                        id,
                    )
                }
            };
            let after = match cmd.cursor {
                None => None,
                Some(c) => match serde_json::from_str::<&str>(c.get())
                    .ok()
                    .and_then(|s| s.parse::<u64>().ok())
                {
                    Some(n) => Some(n),
                    None => {
                        return Parsed::Error(
                            ErrorCode::BadQuery,
                            "cursor must be the \"next_cursor\" of the previous presence reply".into(),
                            id,
                        )
                    }
                },
            };
            Parsed::Presence(PresenceRead { topic, after, limit }, id)
        }
        Some("presence_stats") => topic()
            .map(|t| Parsed::PresenceStats(t, id))
            .unwrap_or_else(|e| e),
        Some("ping") => Parsed::Ping(id),
        Some("auth") => match cmd.token {
            Some(t) => Parsed::Auth(t, id),
            None => Parsed::NoToken("auth", id),
        },
        Some("refresh") => match cmd.token {
            Some(t) => Parsed::Refresh(t, id),
            None => Parsed::NoToken("refresh", id),
        },
        Some(other) => Parsed::Error(
            ErrorCode::UnknownOp,
            format!("unknown op {other:?}: use subscribe, unsubscribe, presence, presence_stats, ping, auth or refresh"),
            id,
        ),
        None => Parsed::Error(
            ErrorCode::UnknownOp,
            "missing \"op\": use subscribe, unsubscribe, presence, presence_stats, ping, auth or refresh".into(),
            id,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commands_and_errors() {
        assert!(
            matches!(parse(br#"{"op":"subscribe","topic":"a","id":1}"#), Parsed::Subscribe(t, None, Some(_)) if t == "a")
        );
        assert!(
            matches!(parse(br#"{"op":"unsubscribe","topic":"a"}"#), Parsed::Unsubscribe(t, None) if t == "a")
        );
        assert!(matches!(
            parse(br#"{"op":"ping","id":"x"}"#),
            Parsed::Ping(Some(_))
        ));
        assert!(matches!(
            parse(b"nope"),
            Parsed::Error(ErrorCode::BadJson, _, None)
        ));
        assert!(matches!(
            parse(b"[1]"),
            Parsed::Error(ErrorCode::BadJson, _, None)
        ));
        assert!(matches!(
            parse(br#"{"op":"bogus","id":7}"#),
            Parsed::Error(ErrorCode::UnknownOp, _, Some(_))
        ));
        assert!(matches!(
            parse(br#"{"op":"subscribe","topic":"a b"}"#),
            Parsed::Error(ErrorCode::BadTopic, _, None)
        ));
        assert!(matches!(
            parse(br#"{"op":"subscribe"}"#),
            Parsed::Error(ErrorCode::BadTopic, _, None)
        ));
    }

    #[test]
    fn since_is_a_position_or_bad_since() {
        match parse(br#"{"op":"subscribe","topic":"a","since":{"offset":41,"epoch":"9f1c2a7b"}}"#) {
            Parsed::Subscribe(t, Some(p), None) => {
                assert_eq!((t.as_str(), p.offset, &*p.epoch), ("a", 41, "9f1c2a7b"))
            }
            _ => panic!("a valid since"),
        }
        let long = format!(
            r#"{{"op":"subscribe","topic":"a","since":{{"offset":1,"epoch":"{}"}}}}"#,
            "e".repeat(65)
        );
        for bad in [
            r#"{"op":"subscribe","topic":"a","since":{"offset":-1,"epoch":"x"}}"#,
            r#"{"op":"subscribe","topic":"a","since":{"offset":1}}"#,
            r#"{"op":"subscribe","topic":"a","since":41}"#,
            r#"{"op":"subscribe","topic":"a","since":{"offset":"1","epoch":"x"},"id":3}"#,
            &long,
        ] {
            assert!(
                matches!(
                    parse(bad.as_bytes()),
                    Parsed::Error(ErrorCode::BadSince, _, _)
                ),
                "{bad}"
            );
        }
        let sub = Subscribed {
            position: StreamPosition {
                offset: 57,
                epoch: "9f1c2a7b".into(),
            },
            recovered: Some(false),
        };
        assert_eq!(
            String::from_utf8(subscribed("t", &sub, None)).unwrap(),
            r#"{"op":"subscribed","topic":"t","offset":57,"epoch":"9f1c2a7b","recovered":false}"#
        );
    }

    #[test]
    fn auth_and_refresh_carry_a_token_and_replies_never_do() {
        let t = "eyJhbGciOiJIUzI1NiJ9.e30.sig";
        let cmd = format!(r#"{{"op":"auth","token":"{t}","id":1}}"#);
        assert!(matches!(parse(cmd.as_bytes()), Parsed::Auth(ref x, Some(_)) if x == t));
        let cmd = format!(r#"{{"op":"refresh","token":"{t}"}}"#);
        assert!(matches!(parse(cmd.as_bytes()), Parsed::Refresh(ref x, None) if x == t));
        assert!(matches!(
            parse(br#"{"op":"refresh","id":2}"#),
            Parsed::NoToken("refresh", Some(_))
        ));
        assert!(matches!(
            parse(br#"{"op":"auth","token":7}"#),
            Parsed::Error(ErrorCode::BadJson, _, None)
        ));
        let grant = Grant {
            sub: "alice".into(),
            exp: 1767225600,
            topics: crate::auth::Patterns::default(),
            info: None,
        };
        let id: &RawValue = serde_json::from_str("4").unwrap();
        assert_eq!(
            String::from_utf8(authed("authed", &grant, Some(id))).unwrap(),
            r#"{"op":"authed","sub":"alice","exp":1767225600,"id":4}"#
        );
    }

    #[test]
    fn replies_echo_id() {
        let id: &RawValue = serde_json::from_str("17").unwrap();
        assert_eq!(pong(Some(id)), br#"{"op":"pong","id":17}"#);
        let e = String::from_utf8(error(ErrorCode::UnknownOp, "m", None)).unwrap();
        assert_eq!(e, r#"{"op":"error","code":"unknown_op","message":"m"}"#);
    }
}
