//! A publication, encoded once. The envelope JSON is built a single time, then framed once
//! per transport; every subscriber's queue gets a clone of the same `Bytes` (a refcount
//! bump), so fan-out cost does not grow with the message size.

use std::fmt::Write;
use std::sync::OnceLock;
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};

use crate::metrics::Transport;
use crate::topic::TopicName;
use crate::ws::frame;

pub struct Publication {
    pub topic: TopicName,
    pub offset: u64,
    pub published_at: Instant,
    envelope: Bytes,
    ws: OnceLock<Bytes>,
    sse: OnceLock<Bytes>,
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
        env.put_slice(data);
        env.put_u8(b'}');
        Publication {
            topic,
            offset,
            published_at: Instant::now(),
            envelope: env.freeze(),
            ws: OnceLock::new(),
            sse: OnceLock::new(),
        }
    }

    pub fn envelope(&self) -> &Bytes {
        &self.envelope
    }

    /// The bytes a subscriber of `transport` receives, built on first use and then shared.
    pub fn wire(&self, transport: Transport) -> Bytes {
        match transport {
            Transport::Ws => self
                .ws
                .get_or_init(|| frame::encode(frame::OP_TEXT, &self.envelope))
                .clone(),
            Transport::Sse => self
                .sse
                .get_or_init(|| sse_event(self.offset, &self.envelope))
                .clone(),
        }
    }
}

/// One SSE event: `id:` is the offset. Published data is embedded verbatim and may hold
/// newlines, so each line gets its own `data:` prefix, which EventSource joins
/// back with a newline.
pub fn sse_event(id: u64, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(payload.len() + 32);
    out.put_slice(b"id: ");
    write!(out, "{id}").expect("writing to BytesMut");
    out.put_u8(b'\n');
    for line in payload.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        out.put_slice(b"data: ");
        out.put_slice(line);
        out.put_u8(b'\n');
    }
    out.put_u8(b'\n');
    out.freeze()
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
        let v: serde_json::Value = serde_json::from_slice(p.envelope()).unwrap();
        assert_eq!(v["offset"], 42);
        assert_eq!(
            &p.wire(Transport::Sse)[..],
            &b"id: 42\ndata: {\"topic\":\"scores\",\"offset\":42,\"data\":{\"a\": [1, 2.50]}}\n\n"
                [..]
        );
        // The same Bytes is handed out every time: no per-subscriber encoding.
        assert_eq!(
            p.wire(Transport::Ws).as_ptr(),
            p.wire(Transport::Ws).as_ptr()
        );
    }

    #[test]
    fn sse_splits_multiline_payloads() {
        let e = sse_event(1, b"{\n\"a\":1\r\n}");
        assert_eq!(&e[..], b"id: 1\ndata: {\ndata: \"a\":1\ndata: }\n\n");
    }
}
