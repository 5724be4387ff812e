//! How each transport frames a payload: a WebSocket text frame, or an SSE event's lines.
//! A leaf, so the publication can frame itself once per transport (and share the bytes
//! with every subscriber) without knowing the transports, and the transports frame their
//! replies with the same functions.
//!
//! An SSE event's `id:` line is not part of these bytes: it differs per client (it carries
//! the client's position in every topic of its stream), so the SSE writer puts it beside
//! the shared bytes instead of re-encoding them per subscriber.

use bytes::{BufMut, Bytes, BytesMut};
use crier_protocol::frame;

/// `payload` as one unmasked WebSocket text frame (the server's side).
pub fn ws_text(payload: &[u8]) -> Bytes {
    frame::encode(frame::OP_TEXT, payload)
}

/// One event: an optional `event:` name, then `payload` as `data:` lines, then the blank
/// line that dispatches it.
///
/// Published data is embedded verbatim and may hold line breaks (only as JSON
/// whitespace: inside strings JSON escapes them). EventSource ends a line at CR, LF or
/// CRLF alike, so a lone CR left inside a `data:` line would cut the JSON in two. Each
/// line, by any of the three endings, gets its own `data:` prefix instead; EventSource
/// joins them back with LF, which is the same JSON whitespace.
pub fn sse_event(name: Option<&str>, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(payload.len() + 16 + name.map_or(0, |n| n.len() + 8));
    if let Some(name) = name {
        out.put_slice(b"event: ");
        out.put_slice(name.as_bytes());
        out.put_u8(b'\n');
    }
    let mut rest = payload;
    loop {
        let end = rest
            .iter()
            .position(|&b| b == b'\n' || b == b'\r')
            .unwrap_or(rest.len());
        out.put_slice(b"data: ");
        out.put_slice(&rest[..end]);
        out.put_u8(b'\n');
        rest = match rest[end..] {
            [] => break,
            [b'\r', b'\n', ..] => &rest[end + 2..],
            _ => &rest[end + 1..],
        };
    }
    out.put_u8(b'\n');
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_multiline_payloads() {
        let e = sse_event(None, b"{\n\"a\":1\r\n}");
        assert_eq!(&e[..], b"data: {\ndata: \"a\":1\ndata: }\n\n");
        let e = sse_event(Some("subscribed"), b"{}");
        assert_eq!(&e[..], b"event: subscribed\ndata: {}\n\n");
    }

    #[test]
    fn a_text_frame_carries_the_payload_after_its_header() {
        let ws = ws_text(b"{\"a\":1}");
        assert_eq!(ws[0], 0x81);
        assert_eq!(&ws[2..], b"{\"a\":1}");
    }
}
