//! Subscriber tokens: JWTs checked with `jsonwebtoken` (signature, algorithm) and read by
//! us (claims), so every rule of docs/auth.md is in this file.
//!
//! The key is chosen by the token's `alg` (and `kid` for a JWKS), never the other way round:
//! an HS256 token is only ever checked against the HMAC secret, so a public key can never be
//! used as an HMAC secret (key confusion), and `none` or any other algorithm has no key at
//! all. Expiry is checked here, without leeway, so the connection's close timer and the
//! check agree to the second.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::Value;

use crate::topic::Patterns;

/// The longest token accepted: a grant is held for the connection's life.
pub const MAX_TOKEN_BYTES: usize = 8192;
/// The most `topics` patterns one token may carry.
pub const MAX_TOKEN_TOPICS: usize = 256;
/// The largest `info` claim kept, in bytes of JSON: a member's `info` travels with every
/// join, leave and presence read of each topic it holds.
pub const MAX_INFO_BYTES: usize = 1024;
/// The shortest HS256 secret accepted: RFC 7518 3.2 asks for at least the hash size.
pub const MIN_SECRET_BYTES: usize = 32;

/// What a valid token lets its holder do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub sub: Box<str>,
    /// Unix seconds.
    pub exp: u64,
    pub topics: Patterns,
    /// The `info` claim as compact JSON (at most `MAX_INFO_BYTES`): what presence shows
    /// of the member beside its `sub`.
    pub info: Option<std::sync::Arc<str>>,
}

impl Grant {
    pub fn allows(&self, topic: &str) -> bool {
        self.topics.matches(topic)
    }

    /// When the token expires, on the monotonic clock.
    pub fn deadline(&self) -> Instant {
        // Capped: an `exp` far in the future (u64::MAX) must not overflow the clock.
        const FAR: u64 = 10 * 365 * 24 * 3600;
        let left = self.exp.saturating_sub(unix_now()).min(FAR);
        Instant::now() + Duration::from_secs(left)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    /// Every reason a token is not accepted except its age; the text says which.
    #[error("{0}")]
    Bad(String),
    #[error("the token expired")]
    Expired,
}

fn bad(msg: impl Into<String>) -> TokenError {
    TokenError::Bad(msg.into())
}

/// The claims crier reads; others are ignored. Taken as any JSON here and checked by
/// `grant`: a signed token whose `exp` does not fit (a float, a negative number, past
/// 2^64) then says which claim is wrong, instead of failing to deserialize into the same
/// error as a forged signature.
#[derive(Deserialize)]
struct Claims {
    sub: Option<Value>,
    exp: Option<Value>,
    nbf: Option<Value>,
    topics: Option<Value>,
    info: Option<Value>,
}

/// The node's verification keys. Built once at startup: a key that does not parse stops
/// the server, rather than refusing every token later.
pub struct Verifier {
    hmac: Option<DecodingKey>,
    rsa: Vec<DecodingKey>,
    ec: Vec<DecodingKey>,
    /// JWKS keys by `kid`, with the algorithm their type allows.
    jwks: Vec<(String, Algorithm, DecodingKey)>,
    /// Per accepted algorithm, built once: a `Validation` holds a HashSet, and connecting
    /// clients are verified by the thousand (docs/BENCHMARKS.md, "Subscriber tokens").
    validations: [Validation; 3],
}

/// The algorithms accepted, in the order of `Verifier::validations`.
const ACCEPTED: [Algorithm; 3] = [Algorithm::HS256, Algorithm::RS256, Algorithm::ES256];

/// The crate checks the signature only; the claims are checked by `grant`, exactly.
fn signature_only(alg: Algorithm) -> Validation {
    let mut v = Validation::new(alg);
    v.required_spec_claims.clear();
    v.validate_exp = false;
    v.validate_nbf = false;
    v.validate_aud = false;
    v
}

impl Verifier {
    /// `secret` empty: no HS256. `public_keys`: PEM texts (RSA or P-256). `jwks`: a JWKS
    /// document. None when nothing is configured.
    pub fn new(
        secret: &str,
        public_keys: &[(String, String)],
        jwks: Option<&str>,
    ) -> anyhow::Result<Option<Verifier>> {
        let mut v = Verifier {
            hmac: None,
            rsa: Vec::new(),
            ec: Vec::new(),
            jwks: Vec::new(),
            validations: ACCEPTED.map(signature_only),
        };
        if !secret.is_empty() {
            anyhow::ensure!(
                secret.len() >= MIN_SECRET_BYTES,
                "jwt_secret must be at least {MIN_SECRET_BYTES} bytes (HS256 needs a 256-bit secret)"
            );
            v.hmac = Some(DecodingKey::from_secret(secret.as_bytes()));
        }
        for (name, pem) in public_keys {
            if let Ok(k) = DecodingKey::from_rsa_pem(pem.as_bytes()) {
                v.rsa.push(k);
            } else if let Ok(k) = DecodingKey::from_ec_pem(pem.as_bytes()) {
                v.ec.push(k);
            } else {
                anyhow::bail!("jwt_public_key {name}: not a PEM RSA or EC (P-256) public key");
            }
        }
        if let Some(text) = jwks {
            let set: JwkSet = serde_json::from_str(text)
                .map_err(|e| anyhow::anyhow!("jwt_jwks: not a JWKS document: {e}"))?;
            for jwk in &set.keys {
                let kid = jwk.common.key_id.clone().ok_or_else(|| {
                    anyhow::anyhow!("jwt_jwks: every key needs a \"kid\" to be chosen by")
                })?;
                let alg = match &jwk.algorithm {
                    jsonwebtoken::jwk::AlgorithmParameters::RSA(_) => Algorithm::RS256,
                    jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(p)
                        if p.curve == jsonwebtoken::jwk::EllipticCurve::P256 =>
                    {
                        Algorithm::ES256
                    }
                    _ => anyhow::bail!(
                        "jwt_jwks: key {kid:?} is neither RSA nor EC P-256 (RS256 and ES256 only)"
                    ),
                };
                let key = DecodingKey::from_jwk(jwk)
                    .map_err(|e| anyhow::anyhow!("jwt_jwks: key {kid:?}: {e}"))?;
                v.jwks.push((kid, alg, key));
            }
        }
        let any = v.hmac.is_some() || !v.rsa.is_empty() || !v.ec.is_empty() || !v.jwks.is_empty();
        Ok(any.then_some(v))
    }

    pub fn verify(&self, token: &str) -> Result<Grant, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(bad(format!(
                "the token is longer than {MAX_TOKEN_BYTES} bytes"
            )));
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| bad("the token is not a JWT (header.claims.signature, base64url)"))?;
        let keys: Vec<&DecodingKey> = match (header.alg, header.kid.as_deref()) {
            (Algorithm::HS256, _) => self.hmac.iter().collect(),
            (alg @ (Algorithm::RS256 | Algorithm::ES256), Some(kid))
                if self.jwks.iter().any(|(k, _, _)| k == kid) =>
            {
                self.jwks
                    .iter()
                    .filter(|(k, a, _)| k == kid && *a == alg)
                    .map(|(_, _, key)| key)
                    .collect()
            }
            (Algorithm::RS256, _) => self.rsa.iter().collect(),
            (Algorithm::ES256, _) => self.ec.iter().collect(),
            (other, _) => {
                return Err(bad(format!(
                    "algorithm {other:?} is not accepted (HS256, RS256 and ES256 are)"
                )))
            }
        };
        if keys.is_empty() {
            return Err(bad(format!(
                "no key for algorithm {:?} is configured",
                header.alg
            )));
        }
        let validation = &self.validations[ACCEPTED
            .iter()
            .position(|a| *a == header.alg)
            .expect("the match above passes only accepted algorithms")];
        let mut claims = None;
        // A JSON error comes only after a key's signature matched.
        let mut signed_but_not_json = false;
        for key in keys {
            match jsonwebtoken::decode::<Claims>(token, key, validation) {
                Ok(data) => {
                    claims = Some(data.claims);
                    break;
                }
                Err(e) => {
                    signed_but_not_json |=
                        matches!(e.kind(), ErrorKind::Json(_) | ErrorKind::Utf8(_))
                }
            }
        }
        let claims = claims.ok_or_else(|| {
            if signed_but_not_json {
                bad("the token's claims are not a JSON object")
            } else {
                bad("the token's signature does not match any configured key")
            }
        })?;
        grant(claims, unix_now())
    }
}

/// A NumericDate claim crier can compare: whole unix seconds that fit in a u64.
fn seconds(claim: &str, v: &Value) -> Result<u64, TokenError> {
    v.as_u64().ok_or_else(|| {
        bad(format!(
            "the token's \"{claim}\" claim is out of range: {v} is not a whole number of unix \
             seconds from 0 to {}",
            u64::MAX
        ))
    })
}

fn grant(c: Claims, now: u64) -> Result<Grant, TokenError> {
    let sub = match c.sub {
        Some(Value::String(s)) if !s.is_empty() && s.len() <= 256 => s,
        _ => return Err(bad("the token needs a \"sub\" claim of 1-256 bytes")),
    };
    let exp = c
        .exp
        .ok_or_else(|| bad("the token needs an \"exp\" claim (unix seconds)"))?;
    let exp = seconds("exp", &exp)?;
    if exp <= now {
        return Err(TokenError::Expired);
    }
    if let Some(nbf) = c.nbf {
        if seconds("nbf", &nbf)? > now {
            return Err(bad("the token is not valid yet (nbf)"));
        }
    }
    let topics: Vec<String> = match c.topics {
        None => Vec::new(),
        Some(Value::Array(items)) if items.len() > MAX_TOKEN_TOPICS => {
            return Err(bad(format!(
                "the token's \"topics\" has more than {MAX_TOKEN_TOPICS} patterns"
            )))
        }
        Some(Value::Array(items)) => items
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                _ => Err(bad("the token's \"topics\" must be a list of strings")),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(bad("the token's \"topics\" must be a list of strings")),
    };
    let topics = Patterns::parse(&topics).map_err(|e| bad(format!("\"topics\": {e}")))?;
    let info = match c.info {
        None | Some(Value::Null) => None,
        Some(v) => {
            let json = v.to_string();
            if json.len() > MAX_INFO_BYTES {
                return Err(bad(format!(
                    "the token's \"info\" claim is {} bytes of JSON: at most {MAX_INFO_BYTES}",
                    json.len()
                )));
            }
            Some(json.into())
        }
    };
    Ok(Grant {
        sub: sub.into(),
        exp,
        topics,
        info,
    })
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn fixture(name: &str) -> String {
        std::fs::read_to_string(format!(
            "{}/tests/fixtures/auth/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    }

    fn claims(exp_in: i64) -> serde_json::Value {
        json!({"sub": "alice", "exp": unix_now() as i64 + exp_in, "topics": ["chat:*", "user:42"]})
    }

    fn hs(claims: &serde_json::Value, secret: &str) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn hs_only() -> Verifier {
        Verifier::new(SECRET, &[], None).unwrap().unwrap()
    }

    fn with_public_keys() -> Verifier {
        let keys = [
            ("rsa".to_string(), fixture("rsa-public.pem")),
            ("ec".to_string(), fixture("ec-public.pem")),
        ];
        Verifier::new("", &keys, None).unwrap().unwrap()
    }

    #[test]
    fn hs256_grant() {
        let g = hs_only().verify(&hs(&claims(60), SECRET)).unwrap();
        assert_eq!(&*g.sub, "alice");
        assert!(g.allows("chat:lobby") && g.allows("user:42") && !g.allows("user:43"));
        assert!(g.deadline() > Instant::now() + Duration::from_secs(50));
        let forever = Grant {
            exp: u64::MAX,
            ..g.clone()
        };
        assert!(forever.deadline() > Instant::now() + Duration::from_secs(365 * 24 * 3600));
    }

    #[test]
    fn refuses_forged_expired_early_and_malformed() {
        let v = hs_only();
        let other = "another-secret-of-at-least-32-bytes!";
        assert!(matches!(
            v.verify(&hs(&claims(60), other)),
            Err(TokenError::Bad(_))
        ));
        assert_eq!(v.verify(&hs(&claims(-1), SECRET)), Err(TokenError::Expired));
        let early = json!({"sub": "a", "exp": unix_now() + 60, "nbf": unix_now() + 30});
        assert!(
            matches!(v.verify(&hs(&early, SECRET)), Err(TokenError::Bad(m)) if m.contains("nbf"))
        );
        for c in [
            json!({"exp": unix_now() + 60}),
            json!({"sub": "a"}),
            json!({"sub": "a", "exp": unix_now() + 60, "topics": ["a b"]}),
            json!({"sub": "a", "exp": unix_now() + 60, "topics": "chat:*"}),
        ] {
            assert!(
                matches!(v.verify(&hs(&c, SECRET)), Err(TokenError::Bad(_))),
                "{c}"
            );
        }
        // Signed, but `exp` or `nbf` does not fit: the claim is named, not the signature.
        for c in [
            json!({"sub": "a", "exp": 1e300}),
            json!({"sub": "a", "exp": -1}),
            json!({"sub": "a", "exp": 18446744073709551615.0 * 2.0}),
            json!({"sub": "a", "exp": unix_now() as f64 + 60.5}),
            json!({"sub": "a", "exp": "soon"}),
            json!({"sub": "a", "exp": unix_now() + 60, "nbf": -5}),
        ] {
            let e = v.verify(&hs(&c, SECRET)).unwrap_err();
            assert!(
                matches!(&e, TokenError::Bad(m) if m.contains("out of range") && !m.contains("signature")),
                "{c}: {e}"
            );
        }
        assert!(
            matches!(v.verify(&hs(&claims(60), other)), Err(TokenError::Bad(m)) if m.contains("signature"))
        );
        for junk in ["", "abc", "a.b.c", &"x".repeat(MAX_TOKEN_BYTES + 1)] {
            assert!(matches!(v.verify(junk), Err(TokenError::Bad(_))));
        }
        // A valid token with a flipped signature byte.
        let mut t = hs(&claims(60), SECRET).into_bytes();
        let last = t.len() - 2;
        t[last] = if t[last] == b'A' { b'B' } else { b'A' };
        assert!(v.verify(std::str::from_utf8(&t).unwrap()).is_err());
    }

    #[test]
    fn refuses_alg_none() {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let header = b64.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let body = b64.encode(claims(60).to_string());
        for t in [format!("{header}.{body}."), format!("{header}.{body}")] {
            assert!(
                matches!(hs_only().verify(&t), Err(TokenError::Bad(_))),
                "{t}"
            );
            assert!(with_public_keys().verify(&t).is_err());
        }
    }

    #[test]
    fn rs256_es256_and_key_confusion() {
        let v = with_public_keys();
        let rs = encode(
            &Header::new(Algorithm::RS256),
            &claims(60),
            &EncodingKey::from_rsa_pem(fixture("rsa-private.pem").as_bytes()).unwrap(),
        )
        .unwrap();
        assert_eq!(&*v.verify(&rs).unwrap().sub, "alice");
        let es = encode(
            &Header::new(Algorithm::ES256),
            &claims(60),
            &EncodingKey::from_ec_pem(fixture("ec-private.pem").as_bytes()).unwrap(),
        )
        .unwrap();
        assert_eq!(&*v.verify(&es).unwrap().sub, "alice");
        // Signed with a key that is not configured.
        let other = encode(
            &Header::new(Algorithm::RS256),
            &claims(60),
            &EncodingKey::from_rsa_pem(fixture("other-rsa-private.pem").as_bytes()).unwrap(),
        )
        .unwrap();
        assert!(v.verify(&other).is_err());
        // Key confusion: HS256 "signed" with the public key's PEM text as the secret.
        let confused = hs(&claims(60), &fixture("rsa-public.pem"));
        assert!(matches!(v.verify(&confused), Err(TokenError::Bad(m)) if m.contains("no key")));
        // With a secret too, the HS256 token is checked against the secret only.
        let keys = [("rsa".to_string(), fixture("rsa-public.pem"))];
        let both = Verifier::new(SECRET, &keys, None).unwrap().unwrap();
        assert!(both.verify(&confused).is_err());
        // HS384/RS512 and friends are refused outright.
        let hs384 = encode(
            &Header::new(Algorithm::HS384),
            &claims(60),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        assert!(
            matches!(both.verify(&hs384), Err(TokenError::Bad(m)) if m.contains("not accepted"))
        );
    }

    #[test]
    fn jwks_by_kid() {
        let v = Verifier::new("", &[], Some(&fixture("jwks.json")))
            .unwrap()
            .unwrap();
        let rsa = EncodingKey::from_rsa_pem(fixture("rsa-private.pem").as_bytes()).unwrap();
        let ec = EncodingKey::from_ec_pem(fixture("ec-private.pem").as_bytes()).unwrap();
        let token = |alg, kid: &str, key: &EncodingKey| {
            let mut header = Header::new(alg);
            header.kid = Some(kid.into());
            encode(&header, &claims(60), key).unwrap()
        };
        assert!(v.verify(&token(Algorithm::RS256, "rsa-1", &rsa)).is_ok());
        assert!(v.verify(&token(Algorithm::ES256, "ec-1", &ec)).is_ok());
        // The right key under the wrong kid, and an unknown kid.
        assert!(v.verify(&token(Algorithm::RS256, "ec-1", &rsa)).is_err());
        assert!(v.verify(&token(Algorithm::RS256, "rsa-2", &rsa)).is_err());
        assert!(Verifier::new("", &[], Some("{\"keys\":[{}]}")).is_err());
    }

    #[test]
    fn short_secret_and_bad_pem_stop_startup() {
        assert!(Verifier::new("short", &[], None).is_err());
        assert!(Verifier::new("", &[("x".into(), "not a key".into())], None).is_err());
        assert!(Verifier::new("", &[], None).unwrap().is_none());
    }
}
