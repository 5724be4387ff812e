//! A publish body (`api::publish::parse_json`) through the envelope (`Publication::new`) to
//! both wire formats. What a WebSocket or an EventSource subscriber decodes must be JSON
//! carrying the published value; the SSE stream must hold no bare CR, which EventSource
//! reads as a line end.
//!
//! `CRIER_FUZZ_ALLOW_SSE_CR=1` skips inputs whose SSE encoding holds a CR, so that a long
//! run can cover the other checks while that known bug (issue 6, finding 5) is open.
#![no_main]

use std::collections::HashMap;
use std::sync::OnceLock;

use crier::metrics::Transport;
use crier::publication::Publication;
use crier::ws::frame::{Decoder, Message, Role};
use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;
use serde_json::Value;

fn allow_cr() -> bool {
    static ALLOW: OnceLock<bool> = OnceLock::new();
    *ALLOW.get_or_init(|| std::env::var_os("CRIER_FUZZ_ALLOW_SSE_CR").is_some_and(|v| v == "1"))
}

fuzz_target!(|input: &[u8]| {
    // First 8 bytes: the offset (also the SSE `id:`); the rest: the body.
    let (offset, body) = match input.split_first_chunk::<8>() {
        Some((o, rest)) => (u64::from_le_bytes(*o), rest),
        None => (0, input),
    };
    let data = match crier::api::publish::parse_json(body) {
        Ok(d) => d,
        Err(e) => {
            assert_eq!(e.status.as_u16(), 400);
            assert_eq!(e.code.as_str(), "bad_json");
            return;
        }
    };
    let text = data.get();
    assert!(!text.is_empty());
    let expected: Option<Value> = serde_json::from_str(text).ok();

    let p = Publication::new("fuzz:topic".into(), offset, text.as_bytes());
    check_envelope(p.envelope(), offset, text, expected.as_ref(), true);

    // WebSocket: one unmasked text frame holding exactly the envelope.
    let ws = p.wire(Transport::Ws);
    let mut d = Decoder::new(Role::Client, ws.len());
    d.buffer_mut(ws.len()).extend_from_slice(&ws);
    match d.next_message() {
        Ok(Some(Message::Text(t))) => assert_eq!(&t[..], &p.envelope()[..]),
        other => panic!("ws frame decodes to {other:?}"),
    }
    assert_eq!(d.buffered(), 0);

    // SSE: exactly one event, as an EventSource parses it.
    let sse = p.wire(Transport::Sse);
    if sse.contains(&b'\r') {
        if allow_cr() {
            return;
        }
        panic!(
            "SSE event holds a bare CR: {:?}",
            String::from_utf8_lossy(&sse)
        );
    }
    assert!(
        sse.ends_with(b"\n\n"),
        "event does not end with a blank line"
    );
    let events = event_source(&sse);
    assert_eq!(events.len(), 1, "one publication, {} events", events.len());
    let (id, ev_data) = &events[0];
    assert_eq!(id.as_deref(), Some(offset.to_string().as_str()));
    // Line ends inside the JSON may change (CRLF -> LF); the value may not.
    check_envelope(ev_data.as_bytes(), offset, text, expected.as_ref(), false);
});

/// The envelope is `{"topic":..,"offset":..,"data":<body>}`; with `verbatim` the data text
/// must be byte-identical to the body, otherwise equal as a JSON value.
fn check_envelope(env: &[u8], offset: u64, text: &str, expected: Option<&Value>, verbatim: bool) {
    let fields: HashMap<String, &RawValue> = serde_json::from_slice(env).unwrap_or_else(|e| {
        panic!(
            "envelope is not JSON ({e}): {:?}",
            String::from_utf8_lossy(env)
        )
    });
    assert_eq!(fields.len(), 3);
    assert_eq!(fields["topic"].get(), "\"fuzz:topic\"");
    assert_eq!(fields["offset"].get(), offset.to_string());
    let got = fields["data"].get();
    if verbatim {
        assert_eq!(got, text);
    }
    if let Some(expected) = expected {
        let v: Value = serde_json::from_str(got).expect("data parsed once, parses again");
        assert_eq!(&v, expected);
    }
}

/// The WHATWG EventSource stream parser, reduced to `id` and `data`: lines end at CRLF, LF
/// or a lone CR; a blank line dispatches; `data` lines join with LF.
fn event_source(stream: &[u8]) -> Vec<(Option<String>, String)> {
    let text = std::str::from_utf8(stream).expect("SSE is UTF-8");
    let mut events = Vec::new();
    let mut id = None;
    let mut data = String::new();
    let mut has_data = false;
    let mut rest = text;
    while !rest.is_empty() {
        let end = rest.find(['\r', '\n']).unwrap_or(rest.len());
        let line = &rest[..end];
        rest = &rest[end..];
        if let Some(r) = rest.strip_prefix("\r\n") {
            rest = r;
        } else if !rest.is_empty() {
            rest = &rest[1..];
        }
        if line.is_empty() {
            if has_data {
                if data.ends_with('\n') {
                    data.pop();
                }
                events.push((id.clone(), std::mem::take(&mut data)));
                has_data = false;
            }
            continue;
        }
        let (field, value) = match line.find(':') {
            Some(0) => continue, // comment
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(' ').unwrap_or(v))
            }
            None => (line, ""),
        };
        match field {
            "data" => {
                data.push_str(value);
                data.push('\n');
                has_data = true;
            }
            "id" => id = Some(value.to_string()),
            _ => {}
        }
    }
    events
}
