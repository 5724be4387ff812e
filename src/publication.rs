//! A publication, encoded once. The envelope JSON is built a single time, then framed once
//! per transport (`crate::framing`, below it: a publication knows the frames, never the
//! transports); every subscriber's queue gets a clone of the same `Bytes` (a refcount
//! bump), so fan-out cost does not grow with the message size.

use std::fmt::Write;
use std::sync::OnceLock;
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};

use crate::framing;
use crate::metrics::Transport;
use crate::topic::TopicName;

pub struct Publication {
    pub topic: TopicName,
    pub offset: u64,
    pub published_at: Instant,
    envelope: Bytes,
    /// Where the published JSON sits inside `envelope`: history reads and the durable log
    /// take it from there instead of keeping a second copy.
    data_start: usize,
    ws: OnceLock<Bytes>,
    sse: OnceLock<Bytes>,
    pusher: OnceLock<Bytes>,
    /// The client a Pusher publication skips (the HTTP API's `socket_id`, a client event's
    /// sender), when that socket is on this node.
    exclude: Option<u64>,
    /// Not an event: the app ended the connections of the user whose channel this is
    /// (`TERMINATE_MARK`); the hub closes each subscriber instead of delivering it.
    terminate: bool,
}

/// Where a Pusher publication's data names the socket it skips: the data is
/// `{"x":"SOCKET_ID",...rest}`, and Pusher clients receive `{...rest}`. Carried in the data
/// so it crosses Redis like any publication.
const EXCLUDE_MARK: &[u8] = b"{\"x\":\"";

/// The data of a Pusher user channel's publication that ends its subscribers' connections
/// (`POST /apps/{id}/users/{user}/terminate_connections`). Carried as a publication so it
/// reaches the user's connections on every node; no client or API call can publish data
/// that starts so (their events are built by `pusher::messages::event`).
pub const TERMINATE_MARK: &[u8] = b"{\"crier:terminate\":true}";

/// This node's part of every socket id it hands out (`CLIENT.NODE`), random per start: an
/// exclusion names one socket of one node run, never another node's client of the same id.
pub fn node_nonce() -> u32 {
    static NONCE: OnceLock<u32> = OnceLock::new();
    *NONCE.get_or_init(|| rand::random::<u32>() >> 1)
}

/// The Pusher socket id of client `id` on this node.
pub fn socket_id(id: u64) -> String {
    format!("{id}.{}", node_nonce())
}

/// The client a `{"x":"ID.NONCE",` mark excludes, when NONCE is this node's.
fn excluded_client(data: &[u8]) -> Option<u64> {
    let rest = data.strip_prefix(EXCLUDE_MARK)?;
    let end = rest.iter().position(|&b| b == b'"')?;
    let (id, nonce) = std::str::from_utf8(&rest[..end]).ok()?.split_once('.')?;
    (nonce.parse::<u32>().ok()? == node_nonce())
        .then(|| id.parse().ok())
        .flatten()
}

/// A Pusher publication's data with its exclusion mark, if any, taken out.
fn without_mark(data: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    let Some(rest) = data.strip_prefix(EXCLUDE_MARK) else {
        return data.into();
    };
    let Some(end) = rest.iter().position(|&b| b == b'"') else {
        return data.into();
    };
    let after = rest[end + 1..]
        .strip_prefix(b",")
        .unwrap_or(&rest[end + 1..]);
    let mut out = Vec::with_capacity(after.len() + 1);
    out.push(b'{');
    out.extend_from_slice(after);
    out.into()
}

/// The Pusher message of a publication of `topic` that no Pusher app published (a
/// leaderboard's): event `crier:publication` on the channel the topic is watched as, the
/// data as a JSON string (Pusher's `data` is a string).
fn pusher_wrap(topic: &str, data: &[u8]) -> Vec<u8> {
    let channel = crate::topic::watch_channel(topic);
    let data = serde_json::to_string(&String::from_utf8_lossy(data)).expect("a string encodes");
    format!("{{\"event\":\"crier:publication\",\"channel\":\"{channel}\",\"data\":{data}}}")
        .into_bytes()
}

impl Publication {
    /// `data` must be valid JSON (checked by the caller); it is embedded byte for byte.
    pub fn new(topic: TopicName, offset: u64, data: &[u8]) -> Self {
        let mut env = BytesMut::with_capacity(data.len() + topic.len() + 40);
        env.put_slice(b"{\"topic\":\"");
        env.put_slice(topic.as_bytes()); // validated charset: no escaping needed
        env.put_slice(b"\",\"offset\":");
        write!(env, "{offset}").expect("writing to BytesMut");
        env.put_slice(b",\"data\":");
        let data_start = env.len();
        env.put_slice(data);
        env.put_u8(b'}');
        Publication {
            offset,
            published_at: Instant::now(),
            envelope: env.freeze(),
            data_start,
            ws: OnceLock::new(),
            sse: OnceLock::new(),
            pusher: OnceLock::new(),
            exclude: if topic.starts_with(crate::topic::PUSHER_PREFIX) {
                excluded_client(data)
            } else {
                None
            },
            terminate: topic.starts_with(crate::topic::PUSHER_PREFIX) && data == TERMINATE_MARK,
            topic,
        }
    }

    /// Whether client `id` receives this publication (not the socket it excludes; nobody
    /// receives a termination).
    pub fn reaches(&self, id: u64) -> bool {
        !self.terminate && self.exclude != Some(id)
    }

    /// Whether this publication ends its subscribers' connections (`TERMINATE_MARK`).
    pub fn terminates(&self) -> bool {
        self.terminate
    }

    pub fn envelope(&self) -> &Bytes {
        &self.envelope
    }

    /// The published JSON, verbatim (a view into the envelope, no copy).
    pub fn data(&self) -> Bytes {
        self.envelope
            .slice(self.data_start..self.envelope.len() - 1)
    }

    /// What keeping this publication costs, for the node-wide history budget: the envelope
    /// and the three framed copies it may grow (WebSocket, SSE, Pusher), plus bookkeeping.
    pub fn cost(&self) -> usize {
        4 * self.envelope.len() + 160
    }

    /// The bytes a subscriber of `transport` receives: the envelope as a WebSocket text
    /// frame or an unnamed SSE event, framed on first use and then shared. They are the
    /// same for every subscriber: anything per-client (the SSE `id:` line) is written
    /// beside them by the SSE writer.
    pub fn wire(&self, transport: Transport) -> Bytes {
        match transport {
            Transport::Ws => self.ws.get_or_init(|| framing::ws_text(&self.envelope)),
            Transport::Sse => self
                .sse
                .get_or_init(|| framing::sse_event(None, &self.envelope)),
            Transport::Pusher => self.pusher.get_or_init(|| {
                let data = &self.envelope[self.data_start..self.envelope.len() - 1];
                if self.topic.starts_with(crate::topic::PUSHER_PREFIX) {
                    framing::ws_text(&without_mark(data))
                } else {
                    framing::ws_text(&pusher_wrap(&self.topic, data))
                }
            }),
        }
        .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_embeds_data_verbatim() {
        let p = Publication::new("scores".into(), 42, br#"{"a": [1, 2.50]}"#);
        assert_eq!(
            &p.envelope()[..],
            br#"{"topic":"scores","offset":42,"data":{"a": [1, 2.50]}}"#
        );
        assert_eq!(&p.data()[..], br#"{"a": [1, 2.50]}"#);
        let v: serde_json::Value = serde_json::from_slice(p.envelope()).unwrap();
        assert_eq!(v["offset"], 42);
        // No `id:` line: that one is per client, written by the SSE writer.
        assert_eq!(
            &p.wire(Transport::Sse)[..],
            &b"data: {\"topic\":\"scores\",\"offset\":42,\"data\":{\"a\": [1, 2.50]}}\n\n"[..]
        );
        // The same Bytes is handed out every time: no per-subscriber encoding.
        for t in Transport::ALL {
            assert_eq!(p.wire(t).as_ptr(), p.wire(t).as_ptr());
        }
    }

    /// Reads an event the way the EventSource spec does: lines end at CR, LF or CRLF, and
    /// the `data` fields are joined with LF.
    fn eventsource_data(event: &[u8]) -> String {
        let text = std::str::from_utf8(event).unwrap().replace("\r\n", "\n");
        let data: Vec<&str> = text
            .split(['\r', '\n'])
            .filter_map(|l| l.strip_prefix("data: "))
            .collect();
        data.join("\n")
    }

    #[test]
    fn line_breaks_of_every_kind_keep_the_json_whole() {
        let e = framing::sse_event(None, b"{\"a\":1,\r\"b\":2}");
        assert_eq!(&e[..], b"data: {\"a\":1,\ndata: \"b\":2}\n\n");
        for payload in [
            &b"{\"a\":1,\r\"b\":2}"[..],
            b"\r{\r\n\"a\"\n:\r\r[1,\n\n2]\r\n}\r",
            b"{\"s\":\"x\\r\\ny\"}\n",
            b"1",
        ] {
            let p = Publication::new("t".into(), 1, payload);
            let got = eventsource_data(&p.wire(Transport::Sse));
            let want: serde_json::Value = serde_json::from_slice(p.envelope()).unwrap();
            assert_eq!(
                serde_json::from_str::<serde_json::Value>(&got).unwrap(),
                want
            );
            assert!(!got.contains('\r'));
        }
    }

    #[test]
    fn a_pusher_publication_is_its_data_without_the_exclusion_mark() {
        let plain = br#"{"event":"e","channel":"c","data":"1"}"#;
        let p = Publication::new("pusher/app/c".into(), 1, plain);
        assert_eq!(&p.wire(Transport::Pusher)[2..], &plain[..]);
        assert!(p.reaches(7));
        let marked = format!(
            r#"{{"x":"{}","event":"e","channel":"c","data":"1"}}"#,
            socket_id(7)
        );
        let p = Publication::new("pusher/app/c".into(), 2, marked.as_bytes());
        assert_eq!(&p.wire(Transport::Pusher)[2..], &plain[..]);
        assert!(!p.reaches(7) && p.reaches(8));
        // Another node's socket 7 is not this node's client 7.
        let other = br#"{"x":"7.4294967295","event":"e","channel":"c","data":"1"}"#;
        assert!(Publication::new("pusher/app/c".into(), 3, other).reaches(7));
        // A leaderboard's publication, watched from a Pusher client.
        let b = Publication::new("board:arena".into(), 1, br#"{"top":[]}"#);
        let v: serde_json::Value = serde_json::from_slice(&b.wire(Transport::Pusher)[2..]).unwrap();
        assert_eq!(v["channel"], "board@arena");
        assert_eq!(v["data"], r#"{"top":[]}"#);
    }

    #[test]
    fn a_websocket_subscriber_gets_one_text_frame_of_the_envelope() {
        let p = Publication::new("t".into(), 1, b"{\"a\":1}");
        let ws = p.wire(Transport::Ws);
        assert_eq!(&ws[2..], &p.envelope()[..]);
    }
}
