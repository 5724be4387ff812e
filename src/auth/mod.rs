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
    /// `[[board]]` patterns in order with their `follow_own_only`: the first match decides
    /// whether `board:{b}@{p}` needs a token whose `sub` is `p`. Kept here (not with the
    /// other board policies) so every edge that checks a read (WS, SSE, history, Pusher)
    /// checks it through `check_read`.
    own_only: Vec<(TopicPattern, bool)>,
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
        let mut own_only = Vec::new();
        for b in &cfg.board_policies {
            let pattern =
                TopicPattern::parse(&b.pattern).map_err(|e| anyhow::anyhow!("[[board]] {e}"))?;
            own_only.push((pattern, b.follow_own_only));
        }
        anyhow::ensure!(
            !own_only.iter().any(|(_, o)| *o) || verifier.is_some(),
            "[[board]] follow_own_only needs a way to check tokens: set jwt_secret, \
             jwt_public_key or jwt_jwks"
        );
        Ok(Auth {
            private,
            verifier,
            publishers,
            own_only,
        })
    }

    /// Everything public, no keys: what a node without auth settings runs with.
    pub fn open() -> Auth {
        Auth {
            private: Patterns::default(),
            verifier: None,
            publishers: keys::Publishers::default(),
            own_only: Vec::new(),
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

    /// The player whose token alone may follow `topic`: a `board:{b}@{p}` topic of a
    /// board whose first matching `[[board]]` table has `follow_own_only`.
    fn own_only_player<'t>(&self, topic: &'t str) -> Option<&'t str> {
        if self.own_only.is_empty() {
            return None;
        }
        let (board, player) = crate::topic::player_topic_parts(topic)?;
        let (_, own) = self.own_only.iter().find(|(p, _)| p.matches(board))?;
        own.then_some(player)
    }

    /// A friends view (`board:{b}:friends@a@b`) must name a board and 1-`MAX_FRIENDS`
    /// distinct players, and is read like its board (a token allowing `board:{b}` when
    /// that is private; patterns need not name the view's own topic); on a
    /// `follow_own_only` board it shows others' entries only to one of its players (the
    /// token's `sub` among them).
    fn check_friends(
        &self,
        topic: &str,
        board: &str,
        players: &[&str],
        grant: Option<&Grant>,
    ) -> Result<(), Refusal> {
        crate::topic::check_friends(topic, board, players)
            .map_err(|m| Refusal::new(ErrorCode::BadTopic, m))?;
        self.check_read(&crate::topic::board_topic(board), grant)?;
        let own_only = self
            .own_only
            .iter()
            .find(|(p, _)| p.matches(board))
            .is_some_and(|(_, own)| *own);
        if !own_only {
            return Ok(());
        }
        match grant {
            Some(g) if players.contains(&&*g.sub) => Ok(()),
            Some(g) => Err(Refusal::new(
                ErrorCode::TopicForbidden,
                format!(
                    "{topic:?}: this board lets a player watch only rankings they are in, \
                     and {:?} is not among these players",
                    g.sub
                ),
            )),
            None => Err(Refusal::new(
                ErrorCode::TokenRequired,
                format!(
                    "{topic:?}: this board lets a player watch only rankings they are in: \
                     send a token whose sub is one of these players"
                ),
            )),
        }
    }

    /// Ok when `topic` is public or `grant` allows it, and, for a followed player on a
    /// `follow_own_only` board, when `grant` is that player's (`sub`).
    pub fn check_read(&self, topic: &str, grant: Option<&Grant>) -> Result<(), Refusal> {
        if let Some((board, players)) = crate::topic::friends_topic_parts(topic) {
            return self.check_friends(topic, board, &players, grant);
        }
        if let Some(player) = self.own_only_player(topic) {
            match grant {
                Some(g) if *g.sub == *player => {}
                Some(g) => {
                    return Err(Refusal::new(
                        ErrorCode::TopicForbidden,
                        format!(
                            "{topic:?} follows {player:?}, and this board lets a player \
                             follow only their own entry: the token is {:?}'s",
                            g.sub
                        ),
                    ))
                }
                None => {
                    return Err(Refusal::new(
                        ErrorCode::TokenRequired,
                        format!(
                            "{topic:?} follows {player:?}, and this board lets a player \
                             follow only their own entry: send a token whose sub is {player:?}"
                        ),
                    ))
                }
            }
        }
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
            own_only: Vec::new(),
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

    #[test]
    fn follow_own_only_takes_the_players_own_token_first_match_wins() {
        let grant = |sub: &str, topics: &[&str]| Grant {
            sub: sub.into(),
            exp: u64::MAX,
            topics: Patterns::parse(topics).unwrap(),
            info: None,
        };
        let auth = Auth {
            private: Patterns::parse(&["board:vip*"]).unwrap(),
            verifier: None,
            publishers: keys::Publishers::default(),
            own_only: vec![
                (TopicPattern::parse("arena-open").unwrap(), false),
                (TopicPattern::parse("arena*").unwrap(), true),
                (TopicPattern::parse("vip*").unwrap(), true),
            ],
        };
        let (p42, p7) = (grant("p42", &[]), grant("p7", &[]));
        let code = |t: &str, g: Option<&Grant>| auth.check_read(t, g).err().map(|e| e.code);
        assert_eq!(code("board:arena@p42", Some(&p42)), None);
        assert_eq!(
            code("board:arena@p42", Some(&p7)),
            Some(ErrorCode::TopicForbidden)
        );
        assert_eq!(
            code("board:arena@p42", None),
            Some(ErrorCode::TokenRequired)
        );
        // The board's top, a table without the option that matches first, other boards.
        assert_eq!(code("board:arena", None), None);
        assert_eq!(code("board:arena-open@p42", None), None);
        assert_eq!(code("board:cup@p42", None), None);
        // A private board wants both: the player's own token, allowing the topic.
        assert_eq!(
            code("board:vip1@p42", Some(&p42)),
            Some(ErrorCode::TopicForbidden)
        );
        let vip = grant("p42", &["board:vip*"]);
        assert_eq!(code("board:vip1@p42", Some(&vip)), None);

        // Friends views: read like their board, plus the player's own rule.
        let bad = Some(ErrorCode::BadTopic);
        assert_eq!(code("board:cup:friends@a@b", None), None);
        assert_eq!(code("board:cup:friends@a@@b", None), bad);
        assert_eq!(code("board:cup:friends@a@a", None), bad);
        assert_eq!(
            code("board:arena:friends@p42@p7", None),
            Some(ErrorCode::TokenRequired)
        );
        assert_eq!(code("board:arena:friends@p42@p7", Some(&p7)), None);
        assert_eq!(
            code("board:arena:friends@p1@p2", Some(&p7)),
            Some(ErrorCode::TopicForbidden)
        );
        // A token allowing the private board reads its views (own rule aside).
        let vip1 = grant("p42", &["board:vip1"]);
        assert_eq!(code("board:vip1:friends@p42@p7", Some(&vip1)), None);
        assert_eq!(
            code("board:vip2:friends@p42@p7", Some(&vip1)),
            Some(ErrorCode::TopicForbidden)
        );
        assert_eq!(
            code("board:vip1:friends@p42", None),
            Some(ErrorCode::TokenRequired)
        );
    }
}
