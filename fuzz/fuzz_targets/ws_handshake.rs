//! The WebSocket upgrade checks (`ws::handshake::check_headers`, `origin::check`) on hostile
//! header maps, and `accept_key` on hostile keys. Everything refused must be a 4xx with a code;
//! everything accepted must yield a key whose accept value is a valid header.
#![no_main]

use crier::config::Config;
use crier::ws::handshake::{accept_key, check_headers};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;

/// Input layout, an HTTP header block so that seeds are real handshakes: the first line is
/// the operator's `--allowed-origin` list (comma-separated), every further line is one
/// `name: value` header (lines hyper would refuse are skipped, as hyper never passes them
/// on). The whole input is also hashed by `accept_key`.
fn headers(input: &[u8]) -> (Vec<String>, HeaderMap) {
    let mut lines = input.split(|&b| b == b'\n');
    let allowed = lines
        .next()
        .map(|l| {
            String::from_utf8_lossy(l)
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    let mut h = HeaderMap::new();
    for line in lines.take(100) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        let value = value.trim_ascii();
        let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        else {
            continue;
        };
        h.append(name, value);
    }
    (allowed, h)
}

fuzz_target!(|input: &[u8]| {
    let (allowed_origins, h) = headers(input);
    match check_headers(&h) {
        Ok(key) => {
            assert!(!key.is_empty());
            assert_eq!(key, key.trim());
            assert_eq!(
                h.get("sec-websocket-version").and_then(|v| v.to_str().ok()),
                Some("13")
            );
            check_accept(key.as_bytes());
        }
        Err(e) => {
            assert!(e.status.is_client_error(), "status {}", e.status);
            assert!(!e.code.as_str().is_empty() && !e.message.is_empty());
        }
    }

    // origin::check_config refuses malformed origins at start, so only valid ones get here.
    let cfg = Config {
        allowed_origins: allowed_origins
            .into_iter()
            .filter(|o| crier::origin::Origin::parse(o).is_some())
            .collect(),
        ..Config::default()
    };
    let verdict = crier::origin::check(&h, &cfg);
    if let Err(e) = &verdict {
        let status = e.code.status().expect("an HTTP code");
        assert_eq!(status.as_u16(), 403, "{}", e.code);
    }
    let cross_site = h
        .get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"cross-site"));
    match h.get("origin") {
        None if !cross_site => assert!(
            verdict.is_ok(),
            "a request without Origin is not a browser's"
        ),
        Some(o) if o.to_str().is_err() => assert!(verdict.is_err()),
        _ => {}
    }

    check_accept(input);
});

/// `prepare` puts the accept value in a header with `expect`: it must always be valid.
fn check_accept(key: &[u8]) {
    let accept = accept_key(key);
    assert_eq!(accept.len(), 28);
    assert!(HeaderValue::from_str(&accept).is_ok());
}
