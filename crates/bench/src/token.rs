//! Subscriber tokens for `--token` / `--token-secret`: each subscriber sends one as
//! `?token=`, as a browser would. With a secret the tool mints one per subscriber (its own
//! `sub`), so the server verifies N different tokens, not one it could have cached. They
//! are minted before the connect clock starts.
//!
//! A small HS256 encoder over `hmac` + `sha2` rather than the server's JWT library: the tool
//! stays independent of the server's code (a token the tool signs and the server accepts is
//! a check of both), and minting 10,000 takes a few milliseconds.

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// What each subscriber puts in `?token=`.
#[derive(Debug)]
pub enum Tokens {
    /// The same token for everyone (`--token`).
    Fixed(String),
    /// One per subscriber, minted with `--token-secret` before the clock starts, so the
    /// connect times measure the server, not the tool's HMAC.
    PerSubscriber(Vec<String>),
}

impl Tokens {
    /// `n` tokens signed with `secret`: sub `bench-{i}`, topics `[topic]`, `exp`.
    pub fn minted(secret: &str, topic: &str, exp: u64, n: usize) -> Tokens {
        let key = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
        Tokens::PerSubscriber(
            (0..n.max(1))
                .map(|i| {
                    let claims = serde_json::json!({
                        "sub": format!("bench-{i}"),
                        "topics": [topic],
                        "exp": exp,
                    });
                    hs256(&key, &claims)
                })
                .collect(),
        )
    }

    /// The token of subscriber `i`.
    pub fn for_subscriber(&self, i: usize) -> &str {
        match self {
            Tokens::Fixed(t) => t,
            Tokens::PerSubscriber(all) => &all[i % all.len()],
        }
    }

    /// `&token=...` for a query string (a JWT is base64url and dots: nothing to escape).
    pub fn query_param(&self, i: usize) -> String {
        format!("&token={}", self.for_subscriber(i))
    }
}

/// A compact HS256 JWT of `claims`.
pub fn hs256(key: &Hmac<Sha256>, claims: &serde_json::Value) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut out = b64.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    out.push('.');
    b64.encode_string(claims.to_string(), &mut out);
    let mut mac = key.clone();
    mac.update(out.as_bytes());
    let sig = mac.finalize().into_bytes();
    out.push('.');
    b64.encode_string(sig, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7515 appendix A.1: the HS256 example, byte for byte.
    #[test]
    fn rfc7515_a1_signature() {
        let key = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode("AyM1SysPpbyDfgZld3umj1qzKObwVMkoqQ-EstJQLr_T-1qS0gZH75aKtMN3Yj0iPS4hcgUuTwjAzZr1Z9CAow")
            .unwrap();
        let input = "eyJ0eXAiOiJKV1QiLA0KICJhbGciOiJIUzI1NiJ9.eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ";
        let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
        mac.update(input.as_bytes());
        let sig =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        assert_eq!(sig, "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk");
    }

    #[test]
    fn one_token_per_subscriber() {
        let t = Tokens::minted(
            "0123456789abcdef0123456789abcdef",
            "private:x",
            2_000_000_000,
            4,
        );
        let (a, b) = (t.for_subscriber(1), t.for_subscriber(2));
        assert_ne!(a, b);
        assert_eq!(a.split('.').count(), 3);
        assert!(t.query_param(3).starts_with("&token=eyJ"));
        assert_eq!(Tokens::Fixed("x.y.z".into()).query_param(0), "&token=x.y.z");
    }
}
