//! Who may read what (docs/auth.md). Subscribers prove access to private topics with a
//! signed token (`token`); publishers use keys (`keys`, asked for by `api::auth`). Public
//! topics need nothing, and a node with no `private_topics` never looks at a token it is
//! not given. Refusals are `Refusal`s (a code and a message); the edges answer them.

pub mod keys;
pub mod mint;
pub mod token;

use axum::http::{header, HeaderMap};

use crate::config::Config;
use crate::error_code::{ErrorCode, Refusal};
pub use crate::topic::{Patterns, TopicPattern};
pub use token::{Grant, TokenError, Verifier};

/// The node's access policy, built once from the settings: who may read which topics, and
/// which keys may write.
pub struct Auth {
    /// Topics that need a token allowing them.
    pub private: Patterns,
    verifier: Option<Verifier>,
    /// Publisher keys, flat and scoped.
    pub publishers: keys::Publishers,
}

/// The auth settings (`publisher_keys`, `[[key]]`, `private_topics`, `jwt_secret`) as
/// `Config::resolve` cannot judge them, without reading any file; `server::check_config`
/// runs it before anything starts.
pub fn check_config(cfg: &Config) -> anyhow::Result<()> {
    keys::Publishers::from_config(cfg).map_err(anyhow::Error::msg)?;
    Patterns::parse(&cfg.private_topics).map_err(|e| anyhow::anyhow!("private_topics: {e}"))?;
    anyhow::ensure!(
        cfg.jwt_secret.is_empty() || cfg.jwt_secret.len() >= token::MIN_SECRET_BYTES,
        "jwt_secret must be at least {} bytes (HS256 needs a 256-bit secret)",
        token::MIN_SECRET_BYTES
    );
    Ok(())
}

impl Auth {
    pub fn from_config(cfg: &Config) -> anyhow::Result<Auth> {
        check_config(cfg)?;
        let publishers = keys::Publishers::from_config(cfg).map_err(anyhow::Error::msg)?;
        let private = Patterns::parse(&cfg.private_topics)
            .map_err(|e| anyhow::anyhow!("private_topics: {e}"))?;
        let mut pems = Vec::new();
        for path in &cfg.jwt_public_key {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("jwt_public_key {path}: {e}"))?;
            pems.push((path.clone(), text));
        }
        let jwks = match cfg.jwt_jwks.as_str() {
            "" => None,
            path => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("jwt_jwks {path}: {e}"))?,
            ),
        };
        let verifier = Verifier::new(&cfg.jwt_secret, &pems, jwks.as_deref())?;
        anyhow::ensure!(
            private.is_empty() || verifier.is_some(),
            "private_topics need a way to check tokens: set jwt_secret, jwt_public_key or jwt_jwks"
        );
        Ok(Auth {
            private,
            verifier,
            publishers,
        })
    }

    /// Everything public, no keys: what a node without auth settings runs with.
    pub fn open() -> Auth {
        Auth {
            private: Patterns::default(),
            verifier: None,
            publishers: keys::Publishers::default(),
        }
    }

    pub fn is_private(&self, topic: &str) -> bool {
        !self.private.is_empty() && self.private.matches(topic)
    }

    pub fn verify(&self, token: &str) -> Result<Grant, TokenError> {
        match &self.verifier {
            Some(v) => v.verify(token),
            None => Err(TokenError::Bad(
                "this server checks no tokens (no jwt_secret, jwt_public_key or jwt_jwks)".into(),
            )),
        }
    }

    /// Ok when `topic` is public or `grant` allows it.
    pub fn check_read(&self, topic: &str, grant: Option<&Grant>) -> Result<(), Refusal> {
        if !self.is_private(topic) {
            return Ok(());
        }
        match grant {
            Some(g) if g.allows(topic) => Ok(()),
            Some(g) => Err(Refusal::new(
                ErrorCode::TopicForbidden,
                format!(
                    "topic {topic:?} is private and the token of {:?} does not allow it",
                    g.sub
                ),
            )),
            None => Err(Refusal::new(
                ErrorCode::TokenRequired,
                format!(
                    "topic {topic:?} is private: send a token allowing it (?token=, \
                     Authorization: Bearer, or a WebSocket auth command)"
                ),
            )),
        }
    }

    /// The request's token (`?token=` or `Authorization: Bearer`), verified; None when
    /// neither is given, or when this node checks no tokens (a public node ignores them).
    /// A token that is given and fails is refused even for public topics: a client should
    /// learn at once that its token is bad, not when it first needs it.
    pub fn grant_from_request(
        &self,
        query: Option<&str>,
        headers: &HeaderMap,
    ) -> Result<Option<Grant>, Refusal> {
        if self.verifier.is_none() {
            return Ok(None);
        }
        let Some(token) = token_from_request(query, headers)? else {
            return Ok(None);
        };
        self.verify(&token).map(Some).map_err(Refusal::from)
    }
}

/// Who a connection holding `grant` is, as presence shows it: the token's `sub` and
/// `info` claim, or an anonymous member without a token.
pub fn identity(grant: Option<&Grant>) -> crate::broker::Identity {
    grant.map_or_else(Default::default, |g| crate::broker::Identity {
        user: Some(g.sub.as_ref().into()),
        info: g.info.clone(),
    })
}

/// The credential of an `Authorization` header: None without one, `Some(None)` when it is
/// not `Bearer <credential>`. Publisher keys and subscriber tokens both travel this way.
pub fn bearer(headers: &HeaderMap) -> Option<Option<&str>> {
    let value = headers.get(header::AUTHORIZATION)?;
    Some(
        value
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim),
    )
}

/// `?token=` (what browsers can send on `/ws` and `/sse`) or `Authorization: Bearer`.
pub fn token_from_request(
    query: Option<&str>,
    headers: &HeaderMap,
) -> Result<Option<String>, Refusal> {
    let mut found = None;
    if let Some(q) = query.filter(|q| q.contains("token=")) {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(q)
            .map_err(|e| Refusal::new(ErrorCode::BadQuery, format!("bad query string: {e}")))?;
        for (k, v) in pairs {
            if k == "token" {
                if found.is_some() {
                    return Err(Refusal::new(
                        ErrorCode::BadToken,
                        "token given more than once",
                    ));
                }
                found = Some(v);
            }
        }
    }
    if let Some(given) = bearer(headers) {
        let bearer = given.ok_or_else(|| {
            Refusal::new(
                ErrorCode::BadToken,
                "Authorization must be \"Bearer <token>\"",
            )
        })?;
        if found.is_some() {
            return Err(Refusal::new(
                ErrorCode::BadToken,
                "send the token once: in ?token= or in Authorization, not both",
            ));
        }
        found = Some(bearer.to_string());
    }
    Ok(found)
}

impl From<TokenError> for Refusal {
    fn from(e: TokenError) -> Self {
        match e {
            TokenError::Expired => Refusal::new(ErrorCode::TokenExpired, e.to_string()),
            TokenError::Bad(m) => Refusal::new(ErrorCode::BadToken, m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn token_from_query_or_header_once() {
        let mut h = HeaderMap::new();
        assert_eq!(token_from_request(Some("topic=a"), &h).unwrap(), None);
        assert_eq!(
            token_from_request(Some("topic=a&token=t%2Bx"), &h).unwrap(),
            Some("t+x".into())
        );
        assert!(token_from_request(Some("token=a&token=b"), &h).is_err());
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        assert_eq!(token_from_request(None, &h).unwrap(), Some("abc".into()));
        assert!(token_from_request(Some("token=a"), &h).is_err());
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert!(token_from_request(None, &h).is_err());
    }

    #[test]
    fn private_needs_a_grant_that_allows() {
        let auth = Auth {
            private: Patterns::parse(&["private:*"]).unwrap(),
            verifier: None,
            publishers: keys::Publishers::default(),
        };
        assert!(auth.check_read("news", None).is_ok());
        let e = auth.check_read("private:a", None).unwrap_err();
        assert_eq!(e.code, ErrorCode::TokenRequired);
        let g = Grant {
            sub: "alice".into(),
            exp: u64::MAX,
            topics: Patterns::parse(&["private:a"]).unwrap(),
            info: None,
        };
        assert!(auth.check_read("private:a", Some(&g)).is_ok());
        let e = auth.check_read("private:b", Some(&g)).unwrap_err();
        assert_eq!(e.code, ErrorCode::TopicForbidden);
    }
}
