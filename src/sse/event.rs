//! SSE event framing. An event's `id:` line is not part of these bytes: it differs per
//! client (it carries the client's position in every topic of its stream), so the SSE
//! writer puts it beside the shared bytes instead of re-encoding them per subscriber.

use bytes::{BufMut, Bytes, BytesMut};

/// One event: an optional `event:` name, then `payload` as `data:` lines, then the blank
/// line that dispatches it.
///
/// Published data is embedded verbatim and may hold line breaks (only as JSON
/// whitespace: inside strings JSON escapes them). EventSource ends a line at CR, LF or
/// CRLF alike, so a lone CR left inside a `data:` line would cut the JSON in two. Each
/// line, by any of the three endings, gets its own `data:` prefix instead; EventSource
/// joins them back with LF, which is the same JSON whitespace.
pub fn encode(name: Option<&str>, payload: &[u8]) -> Bytes {
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
    use crate::metrics::Transport;
    use crate::publication::Publication;

    #[test]
    fn splits_multiline_payloads() {
        let e = encode(None, b"{\n\"a\":1\r\n}");
        assert_eq!(&e[..], b"data: {\ndata: \"a\":1\ndata: }\n\n");
        let e = encode(Some("subscribed"), b"{}");
        assert_eq!(&e[..], b"event: subscribed\ndata: {}\n\n");
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
        let e = encode(None, b"{\"a\":1,\r\"b\":2}");
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
}
