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
            topic,
            offset,
            published_at: Instant::now(),
            envelope: env.freeze(),
            data_start,
            ws: OnceLock::new(),
            sse: OnceLock::new(),
        }
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
    /// and the two framed copies it may grow (WebSocket, SSE), plus bookkeeping.
    pub fn cost(&self) -> usize {
        3 * self.envelope.len() + 160
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
        for t in [Transport::Ws, Transport::Sse] {
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
    fn a_websocket_subscriber_gets_one_text_frame_of_the_envelope() {
        let p = Publication::new("t".into(), 1, b"{\"a\":1}");
        let ws = p.wire(Transport::Ws);
        assert_eq!(&ws[2..], &p.envelope()[..]);
    }
}
