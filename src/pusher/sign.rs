//! Pusher's signatures, all HMAC-SHA256 with the app's secret, compared in constant time
//! (`ring::hmac::verify`):
//!
//! - a private or presence subscription's `auth`: `KEY:hex(HMAC(secret,
//!   "SOCKET_ID:CHANNEL[:CHANNEL_DATA]"))`, made by the app's auth endpoint;
//! - an HTTP API call: `auth_signature` = hex(HMAC(secret, "METHOD\nPATH\nQUERY")) where
//!   QUERY is every other parameter, keys lowercased, sorted, `k=v` joined by `&`, with
//!   `auth_key`, `auth_timestamp` (within `MAX_SKEW_SECS` of now), `auth_version=1.0` and,
//!   for a body, `body_md5` (hex MD5 of the body).

use md5::{Digest, Md5};
use ring::hmac;

/// How far `auth_timestamp` may be from the server's clock (Pusher's own limit).
pub const MAX_SKEW_SECS: u64 = 600;

fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(b"0123456789abcdef"[(b >> 4) as usize]));
        out.push(char::from(b"0123456789abcdef"[(b & 15) as usize]));
    }
    out
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 || s.len() > 128 {
        return None;
    }
    let digit = |c: u8| char::from(c).to_digit(16);
    s.as_bytes()
        .chunks(2)
        .map(|p| Some((digit(p[0])? * 16 + digit(p[1])?) as u8))
        .collect()
}

/// hex(HMAC-SHA256(secret, message)): what an app's auth endpoint and SDK compute.
pub fn sign(secret: &[u8], message: &[u8]) -> String {
    hex(hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, secret), message).as_ref())
}

/// Whether `signature_hex` is HMAC-SHA256(secret, message), in constant time.
pub fn verify(secret: &[u8], message: &[u8], signature_hex: &str) -> bool {
    let Some(tag) = unhex(&signature_hex.to_ascii_lowercase()) else {
        return false;
    };
    hmac::verify(&hmac::Key::new(hmac::HMAC_SHA256, secret), message, &tag).is_ok()
}

/// Checks a subscription's `auth` (`KEY:SIGNATURE`) for `socket_id` and `channel`, with
/// the presence `channel_data` when there is one.
pub fn check_channel_auth(
    app: &super::App,
    socket_id: &str,
    channel: &str,
    channel_data: Option<&str>,
    auth: &str,
) -> bool {
    let Some((key, signature)) = auth.split_once(':') else {
        return false;
    };
    let mut message = format!("{socket_id}:{channel}");
    if let Some(data) = channel_data {
        message.push(':');
        message.push_str(data);
    }
    key == app.key && verify(app.secret(), message.as_bytes(), signature)
}

/// Checks a `pusher:signin`'s `auth` (`KEY:SIGNATURE`) of `user_data` for `socket_id`:
/// the signature is over `SOCKET_ID::user::USER_DATA`, as the SDKs' `authenticateUser`
/// makes it.
pub fn check_user_auth(app: &super::App, socket_id: &str, user_data: &str, auth: &str) -> bool {
    let Some((key, signature)) = auth.split_once(':') else {
        return false;
    };
    let message = format!("{socket_id}::user::{user_data}");
    key == app.key && verify(app.secret(), message.as_bytes(), signature)
}

/// Why an HTTP API call's signature was refused: said to the caller (401).
#[derive(Debug, PartialEq, Eq)]
pub struct Refused(pub String);

/// Checks the signature of `METHOD path?query` with `body` against `app`, at `now`
/// (Unix seconds). `query` is the parameters as decoded from the URL, in any order.
pub fn check_request(
    app: &super::App,
    method: &str,
    path: &str,
    query: &[(String, String)],
    body: &[u8],
    now: u64,
) -> Result<(), Refused> {
    let get = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let refuse = |m: &str| Err(Refused(m.to_string()));
    let Some(signature) = get("auth_signature") else {
        return refuse("auth_signature is missing");
    };
    if get("auth_key") != Some(app.key.as_str()) {
        return refuse("auth_key is not this app's key");
    }
    if get("auth_version") != Some("1.0") {
        return refuse("auth_version must be 1.0");
    }
    let Some(ts) = get("auth_timestamp").and_then(|t| t.parse::<u64>().ok()) else {
        return refuse("auth_timestamp is missing or not a number");
    };
    if ts.abs_diff(now) > MAX_SKEW_SECS {
        return Err(Refused(format!(
            "auth_timestamp is more than {MAX_SKEW_SECS} s from the server's time ({now}): \
             check the clock"
        )));
    }
    if !body.is_empty() && get("body_md5") != Some(hex(&Md5::digest(body)).as_str()) {
        return refuse("body_md5 is missing or does not match the body");
    }
    let mut params: Vec<(String, &str)> = query
        .iter()
        .filter(|(k, _)| k != "auth_signature")
        .map(|(k, v)| (k.to_ascii_lowercase(), v.as_str()))
        .collect();
    params.sort();
    let mut message = format!("{method}\n{path}\n");
    for (i, (k, v)) in params.iter().enumerate() {
        if i > 0 {
            message.push('&');
        }
        message.push_str(k);
        message.push('=');
        message.push_str(v);
    }
    if verify(app.secret(), message.as_bytes(), signature) {
        Ok(())
    } else {
        refuse("invalid signature: sign METHOD\\nPATH\\nQUERY with the app's secret")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AppConfig, Config};

    fn app() -> std::sync::Arc<super::super::App> {
        let cfg = Config {
            apps: vec![AppConfig {
                id: "3".into(),
                key: "278d425bdf160c739803".into(),
                secret: "7ad3773142a6692b25b8".into(),
                ..AppConfig::default()
            }],
            ..Config::default()
        };
        super::super::Apps::from_config(&cfg)
            .unwrap()
            .by_id("3")
            .unwrap()
            .clone()
    }

    /// The example of Pusher's documentation (channels/library_auth_reference/auth-signatures).
    #[test]
    fn channel_auth_matches_the_documented_example() {
        let a = app();
        let auth =
            "278d425bdf160c739803:58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4";
        assert!(check_channel_auth(
            &a,
            "1234.1234",
            "private-foobar",
            None,
            auth
        ));
        assert!(!check_channel_auth(
            &a,
            "1234.1235",
            "private-foobar",
            None,
            auth
        ));
        assert!(!check_channel_auth(
            &a,
            "1234.1234",
            "private-foobar",
            None,
            "x:zz"
        ));
        let data = r#"{"user_id":10,"user_info":{"name":"Mr. Channels"}}"#;
        let sig = sign(
            a.secret(),
            format!("1234.1234:presence-foobar:{data}").as_bytes(),
        );
        let auth = format!("{}:{sig}", a.key);
        assert!(check_channel_auth(
            &a,
            "1234.1234",
            "presence-foobar",
            Some(data),
            &auth
        ));
        assert!(!check_channel_auth(
            &a,
            "1234.1234",
            "presence-foobar",
            Some("{}"),
            &auth
        ));
    }

    #[test]
    fn user_auth_is_over_socket_user_and_data() {
        let a = app();
        let data = r#"{"id":"u1"}"#;
        let sig = sign(a.secret(), format!("1.2::user::{data}").as_bytes());
        let auth = format!("{}:{sig}", a.key);
        assert!(check_user_auth(&a, "1.2", data, &auth));
        assert!(!check_user_auth(&a, "1.3", data, &auth));
        assert!(!check_user_auth(&a, "1.2", r#"{"id":"u2"}"#, &auth));
        assert!(!check_user_auth(&a, "1.2", data, &format!("other:{sig}")));
        assert!(!check_user_auth(&a, "1.2", data, "nocolon"));
    }

    /// The example of Pusher's documentation (channels/library_auth_reference/rest-api).
    #[test]
    fn request_signature_matches_the_documented_example() {
        let a = app();
        let body = br#"{"name":"foo","channels":["project-3"],"data":"{\"some\":\"data\"}"}"#;
        let q = |ts: &str, sig: &str| -> Vec<(String, String)> {
            [
                ("auth_key", "278d425bdf160c739803"),
                ("auth_timestamp", ts),
                ("auth_version", "1.0"),
                ("body_md5", "ec365a775a4cd0599faeb73354201b6f"),
                ("auth_signature", sig),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
        };
        let sig = "da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c";
        let path = "/apps/3/events";
        let ok = q("1353088179", sig);
        assert_eq!(
            check_request(&a, "POST", path, &ok, body, 1353088179),
            Ok(())
        );
        assert!(check_request(&a, "POST", path, &ok, body, 1353088179 + 601).is_err());
        assert!(check_request(&a, "POST", path, &ok, b"{}", 1353088179).is_err());
        let bad = q("1353088179", &sig.replace('d', "e"));
        assert!(check_request(&a, "POST", path, &bad, body, 1353088179).is_err());
    }
}
