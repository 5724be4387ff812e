//! Subscriber tokens: `auth::Verifier::verify` with every kind of key configured (HS256
//! secret, RSA and EC PEM keys, a JWKS), on any text, and on claims the fuzzer writes that
//! are then properly signed, so the claim rules are reached past the signature.
//!
//! Input: one byte picks the mode, the rest is the token (mode 0) or the claims JSON to
//! sign with the secret (mode 1, HS256) or with the test RSA key (mode 2, RS256).
#![no_main]

use crier::auth::token::{unix_now, TokenError, Verifier, MAX_TOKEN_BYTES, MAX_TOKEN_TOPICS};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use libfuzzer_sys::fuzz_target;

const SECRET: &str = "fuzz-secret-of-at-least-thirty-two-bytes";

fn verifier() -> &'static Verifier {
    static V: std::sync::OnceLock<Verifier> = std::sync::OnceLock::new();
    V.get_or_init(|| {
        let keys = [
            ("rsa".to_string(), include_str!("../../tests/fixtures/auth/rsa-public.pem").to_string()),
            ("ec".to_string(), include_str!("../../tests/fixtures/auth/ec-public.pem").to_string()),
        ];
        let jwks = include_str!("../../tests/fixtures/auth/jwks.json");
        Verifier::new(SECRET, &keys, Some(jwks)).unwrap().unwrap()
    })
}

fuzz_target!(|input: &[u8]| {
    let [mode, rest @ ..] = input else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let v = verifier();
    let token = match mode % 3 {
        0 => text.to_string(),
        m => {
            let Ok(claims) = serde_json::from_str::<serde_json::Value>(text) else {
                return;
            };
            let (alg, key) = if m == 1 {
                (Algorithm::HS256, EncodingKey::from_secret(SECRET.as_bytes()))
            } else {
                let pem = include_str!("../../tests/fixtures/auth/rsa-private.pem");
                (Algorithm::RS256, EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap())
            };
            let Ok(t) = encode(&Header::new(alg), &claims, &key) else {
                return;
            };
            // What a correctly signed token with these claims must give.
            let now = unix_now();
            let c = claims.as_object();
            let sub_ok = c
                .and_then(|c| c.get("sub"))
                .and_then(|s| s.as_str())
                .is_some_and(|s| (1..=256).contains(&s.len()));
            let exp = c.and_then(|c| c.get("exp")).and_then(|e| e.as_u64());
            let result = v.verify(&t);
            if t.len() > MAX_TOKEN_BYTES || !sub_ok || exp.is_none() {
                assert!(result.is_err(), "accepted claims {claims}");
            }
            if let Some(exp) = exp {
                if exp + 1 < now && sub_ok && t.len() <= MAX_TOKEN_BYTES {
                    assert!(result.is_err(), "an expired token was accepted: {claims}");
                }
            }
            t
        }
    };
    match v.verify(&token) {
        Ok(g) => {
            assert!(token.len() <= MAX_TOKEN_BYTES);
            assert!((1..=256).contains(&g.sub.len()));
            assert!(g.exp + 1 >= unix_now(), "expired grant");
            assert!(g.topics.len() <= MAX_TOKEN_TOPICS);
            // Only the three accepted algorithms ever pass.
            let header = jsonwebtoken::decode_header(&token).unwrap();
            assert!(matches!(header.alg, Algorithm::HS256 | Algorithm::RS256 | Algorithm::ES256));
        }
        Err(TokenError::Bad(m)) => assert!(!m.is_empty()),
        Err(TokenError::Expired) => {}
    }
});
