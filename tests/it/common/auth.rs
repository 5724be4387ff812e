//! Subscriber tokens for the tests: HS256 JWTs minted with `jsonwebtoken`, as an
//! application backend would (docs/auth.md), and the test keys in tests/fixtures/auth.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// `claims` signed HS256 with `secret`.
pub fn hs256(claims: &Value, secret: &str) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// A token for `sub` allowing `topics`, valid for `ttl` seconds (negative: expired).
pub fn mint(secret: &str, sub: &str, topics: &[&str], ttl: i64) -> String {
    hs256(
        &json!({"sub": sub, "exp": now() + ttl, "topics": topics}),
        secret,
    )
}

/// The path of a test key or JWKS file.
pub fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/auth/{name}", env!("CARGO_MANIFEST_DIR"))
}
