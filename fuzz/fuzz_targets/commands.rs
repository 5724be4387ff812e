//! Client commands on `/ws` (`crier::protocol::parse`) from hostile text, and the reply each
//! earns: every reply must be one JSON object that echoes the command's `id` unchanged.
#![no_main]

use crier::broker::{StreamPosition, Subscribed};
use crier::protocol::{self, Parsed};
use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;
use std::collections::HashMap;

fuzz_target!(|data: &[u8]| {
    let mut resumed = None;
    let (reply, id, op) = match protocol::parse(data) {
        Parsed::Subscribe(topic, since, id) => {
            assert!(crier::topic::is_valid(&topic));
            resumed = since.map(|_| true);
            let sub = Subscribed {
                position: StreamPosition {
                    offset: 7,
                    epoch: "9f1c2a7b".into(),
                },
                recovered: resumed,
            };
            (protocol::subscribed(&topic, &sub, id), id, "subscribed")
        }
        Parsed::Unsubscribe(topic, id) => {
            assert!(crier::topic::is_valid(&topic));
            (protocol::unsubscribed(&topic, id), id, "unsubscribed")
        }
        Parsed::Ping(id) => (protocol::pong(id), id, "pong"),
        Parsed::Auth(_, id) | Parsed::Refresh(_, id) => {
            let grant = crier::auth::Grant {
                sub: "alice".into(),
                exp: 1767225600,
                topics: crier::auth::Patterns::default(),
            };
            (protocol::authed("authed", &grant, id), id, "authed")
        }
        Parsed::NoToken(op, id) => {
            let message = format!("{op} needs a \"token\" string");
            let code = crier::error_code::ErrorCode::BadToken;
            (protocol::error(code, &message, id), id, "error")
        }
        Parsed::Error(code, message, id) => {
            assert!(!code.as_str().is_empty() && !message.is_empty());
            (protocol::error(code, &message, id), id, "error")
        }
    };
    // Checked as raw JSON text: an id such as `1e400` is valid JSON (and echoed verbatim)
    // even though it does not fit an f64.
    let v: HashMap<String, &RawValue> = serde_json::from_slice(&reply).expect("reply is JSON");
    assert_eq!(v["op"].get(), format!("\"{op}\""));
    // `recovered` answers a `since`, and only then.
    assert_eq!(v.contains_key("recovered"), resumed.is_some());
    match id {
        Some(id) => {
            let s = id.get();
            assert!(s.starts_with('"') || s.starts_with('-') || s.as_bytes()[0].is_ascii_digit());
            assert_eq!(v["id"].get(), s);
        }
        None => assert!(!v.contains_key("id")),
    }
});
