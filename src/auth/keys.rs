//! Scoped publisher keys (`[[key]]` tables, docs/configuration.md). A flat
//! `publisher_keys` key can do everything, which is too much to hand a game server that
//! should only post to its own board: a scoped key lists what it may touch, so a leaked
//! key costs only its scope. A key's `name` shows in errors and logs; its secret never does.

use std::fmt;

use axum::http::HeaderMap;
use subtle::ConstantTimeEq;

use crate::config::Config;
pub use crate::config::KeyConfig;
use crate::error_code::{ErrorCode, Refusal};
use crate::topic::Patterns;

/// The shortest secret a `[[key]]` may have: guessing 128 bits over HTTP is hopeless.
pub const MIN_SECRET_BYTES: usize = 16;
/// The longest key name: it is repeated in every error and log line about the key.
pub const MAX_NAME_BYTES: usize = 64;

/// A checked `[[key]]`: patterns parsed once, so a request only matches.
#[derive(Clone)]
pub struct ScopedKey {
    pub name: Box<str>,
    secret: Box<str>,
    pub publish: Patterns,
    pub boards: Patterns,
    pub reset: Patterns,
    pub admin: bool,
}

/// Without the secret: `Config` is printed in debug logs.
impl fmt::Debug for ScopedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScopedKey")
            .field("name", &self.name)
            .field("secret", &"<hidden>")
            .field("publish", &self.publish)
            .field("boards", &self.boards)
            .field("reset", &self.reset)
            .field("admin", &self.admin)
            .finish()
    }
}

impl TryFrom<KeyConfig> for ScopedKey {
    type Error = String;

    /// Errors name the key (never its secret) and the field.
    fn try_from(c: KeyConfig) -> Result<ScopedKey, String> {
        if c.name.is_empty() || c.name.len() > MAX_NAME_BYTES || !crate::topic::is_valid(&c.name) {
            return Err(format!(
                "[[key]] name {:?} must be 1-{MAX_NAME_BYTES} bytes of A-Z a-z 0-9 _ - . : @",
                c.name
            ));
        }
        let name = &c.name;
        if c.secret.len() < MIN_SECRET_BYTES {
            return Err(format!(
                "[[key]] {name:?}: secret must be at least {MIN_SECRET_BYTES} bytes"
            ));
        }
        if c.secret.trim() != c.secret || c.secret.chars().any(char::is_control) {
            // A Bearer header cannot carry these, so the key could never be used.
            return Err(format!(
                "[[key]] {name:?}: secret must not contain spaces at its ends or control \
                 characters"
            ));
        }
        let scope = |field: &str, list: &[String]| {
            Patterns::parse(list).map_err(|e| format!("[[key]] {name:?}: {field}: {e}"))
        };
        Ok(ScopedKey {
            publish: scope("publish", &c.publish)?,
            boards: scope("boards", &c.boards)?,
            reset: scope("reset", &c.reset)?,
            admin: c.admin,
            secret: c.secret.into(),
            name: c.name.into(),
        })
    }
}

/// Names and secrets unique, and no secret equal to a flat key (which would make the
/// key's scope depend on which list is searched first).
pub fn check_keys(keys: &[ScopedKey], flat: &[String]) -> Result<(), String> {
    for (i, k) in keys.iter().enumerate() {
        for other in &keys[..i] {
            if other.name == k.name {
                return Err(format!("[[key]] name {:?} is used twice", k.name));
            }
            if other.secret == k.secret {
                return Err(format!(
                    "[[key]] {:?} and {:?} have the same secret",
                    other.name, k.name
                ));
            }
        }
        if flat.iter().any(|f| **f == *k.secret) {
            return Err(format!(
                "[[key]] {:?} has the secret of a publisher_keys entry",
                k.name
            ));
        }
    }
    Ok(())
}

/// The node's publisher keys, checked once before the server starts: flat
/// `publisher_keys` and `[[key]]` tables.
#[derive(Clone, Default)]
pub struct Publishers {
    flat: Vec<String>,
    scoped: Vec<ScopedKey>,
}

/// Without the secrets.
impl fmt::Debug for Publishers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Publishers")
            .field("flat", &self.flat.len())
            .field("scoped", &self.scoped)
            .finish()
    }
}

impl Publishers {
    /// Every `[[key]]` table parsed, then `check_keys`; errors name the key, never its
    /// secret.
    pub fn from_config(cfg: &Config) -> Result<Publishers, String> {
        let scoped = cfg
            .keys
            .iter()
            .cloned()
            .map(ScopedKey::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        check_keys(&scoped, &cfg.publisher_keys)?;
        Ok(Publishers {
            flat: cfg.publisher_keys.clone(),
            scoped,
        })
    }

    /// Whether any `[[key]]` table exists.
    /// No key at all: writes are open (development).
    pub fn is_empty(&self) -> bool {
        self.flat.is_empty() && self.scoped.is_empty()
    }

    pub fn has_scoped(&self) -> bool {
        !self.scoped.is_empty()
    }
}

/// What a write asks for, and of which topic or board.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope<'a> {
    Publish(&'a str),
    /// Scores, and creating or configuring the board.
    Boards(&'a str),
    Reset(&'a str),
    /// `GET /metrics`.
    Admin,
}

impl Scope<'_> {
    fn allowed(&self, key: &ScopedKey) -> bool {
        match *self {
            Scope::Publish(t) => key.publish.matches(t),
            Scope::Boards(b) => key.boards.matches(b),
            Scope::Reset(b) => key.reset.matches(b),
            Scope::Admin => key.admin,
        }
    }

    fn refusal(&self, key: &ScopedKey) -> Refusal {
        let name = &key.name;
        match *self {
            Scope::Publish(t) => Refusal::new(
                ErrorCode::NoPublishScope,
                format!(
                    "key {name:?} may not publish to {t:?} (publish scope: {})",
                    key.publish
                ),
            ),
            Scope::Boards(b) => Refusal::new(
                ErrorCode::NoBoardsScope,
                format!(
                    "key {name:?} may not post scores to or configure board {b:?} \
                     (boards scope: {})",
                    key.boards
                ),
            ),
            Scope::Reset(b) => Refusal::new(
                ErrorCode::NoResetScope,
                format!(
                    "key {name:?} may not reset board {b:?} (reset scope: {})",
                    key.reset
                ),
            ),
            Scope::Admin => Refusal::new(
                ErrorCode::NoAdminScope,
                format!("key {name:?} may not read /metrics (it is not an admin key)"),
            ),
        }
    }
}

/// Who made a request that passed the key check.
#[derive(Clone, Copy, Debug)]
pub enum Caller<'a> {
    /// No keys are configured: writes are open.
    Open,
    /// A flat `publisher_keys` key: every scope.
    Flat,
    /// A `[[key]]` whose scope covers the request.
    Scoped(&'a ScopedKey),
}

impl Caller<'_> {
    /// The key's name for logs and policy messages.
    pub fn describe(&self) -> String {
        match self {
            Caller::Open => "no key (writes are open)".into(),
            Caller::Flat => "a publisher_keys key".into(),
            Caller::Scoped(k) => format!("key {:?}", k.name),
        }
    }
}

/// Checks the request's `Authorization: Bearer` key against every flat and scoped key,
/// then the scope. No keys configured: open, as before scoped keys existed.
pub fn authorize<'a>(
    keys: &'a Publishers,
    headers: &HeaderMap,
    scope: Scope<'_>,
) -> Result<Caller<'a>, Refusal> {
    if keys.flat.is_empty() && keys.scoped.is_empty() {
        return Ok(Caller::Open);
    }
    let Some(given) = super::bearer(headers) else {
        return Err(Refusal::new(
            ErrorCode::Unauthorized,
            "this endpoint needs Authorization: Bearer <publisher key>",
        ));
    };
    // Not a Bearer header: matches no key, so it is refused as an unknown key.
    let given = given.unwrap_or("").as_bytes();
    // Every key is compared in full, matched or not, so timing tells nothing about which
    // key (or which prefix) is close.
    let mut flat = subtle::Choice::from(0);
    for k in &keys.flat {
        flat |= k.as_bytes().ct_eq(given);
    }
    let mut found = None;
    for k in &keys.scoped {
        if bool::from(k.secret.as_bytes().ct_eq(given)) {
            found = Some(k);
        }
    }
    if bool::from(flat) {
        return Ok(Caller::Flat);
    }
    let Some(key) = found else {
        return Err(Refusal::new(
            ErrorCode::Forbidden,
            "the publisher key is not valid",
        ));
    };
    if scope.allowed(key) {
        Ok(Caller::Scoped(key))
    } else {
        tracing::debug!(key = %key.name, ?scope, "a scoped key was refused outside its scope");
        Err(scope.refusal(key))
    }
}

/// `GET /metrics`: open unless `[[key]]` tables exist, since scraping was open before
/// scoped keys and an unscoped setup must not change.
pub fn require_admin(keys: &Publishers, headers: &HeaderMap) -> Result<(), Refusal> {
    if keys.scoped.is_empty() {
        return Ok(());
    }
    authorize(keys, headers, Scope::Admin).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn key(name: &str, secret: &str, publish: &[&str], admin: bool) -> KeyConfig {
        KeyConfig {
            name: name.into(),
            secret: secret.into(),
            publish: publish.iter().map(|s| s.to_string()).collect(),
            boards: vec!["arena".into()],
            admin,
            ..KeyConfig::default()
        }
    }

    fn bearer(k: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            axum::http::header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {k}")).unwrap(),
        );
        h
    }

    #[test]
    fn scopes_flat_and_open() {
        let mut cfg = Config::default();
        let open = Publishers::from_config(&cfg).unwrap();
        assert!(matches!(
            authorize(&open, &HeaderMap::new(), Scope::Publish("x")),
            Ok(Caller::Open)
        ));
        cfg.keys = vec![key("game-eu", "0123456789abcdef", &["game:*"], false)];
        cfg.publisher_keys = vec!["flat-key".into()];
        let cfg = Publishers::from_config(&cfg).unwrap();
        assert!(!format!("{cfg:?}").contains("flat-key"));
        let e = authorize(&cfg, &HeaderMap::new(), Scope::Admin).unwrap_err();
        assert_eq!(e.code, ErrorCode::Unauthorized);
        let h = bearer("0123456789abcdef");
        assert!(authorize(&cfg, &h, Scope::Publish("game:1")).is_ok());
        assert!(authorize(&cfg, &h, Scope::Boards("arena")).is_ok());
        let e = authorize(&cfg, &h, Scope::Publish("chat:1")).unwrap_err();
        assert_eq!(e.code, ErrorCode::NoPublishScope);
        assert_eq!(
            e.message,
            "key \"game-eu\" may not publish to \"chat:1\" (publish scope: game:*)"
        );
        assert!(!e.message.contains("0123456789abcdef"));
        let e = authorize(&cfg, &h, Scope::Reset("arena")).unwrap_err();
        assert_eq!(e.code, ErrorCode::NoResetScope);
        assert!(e.message.contains("reset scope: none"), "{}", e.message);
        assert_eq!(
            authorize(&cfg, &h, Scope::Admin).unwrap_err().code,
            ErrorCode::NoAdminScope
        );
        assert!(matches!(
            authorize(&cfg, &bearer("flat-key"), Scope::Reset("any")),
            Ok(Caller::Flat)
        ));
        let e = authorize(&cfg, &bearer("0123456789abcdeX"), Scope::Admin).unwrap_err();
        assert_eq!(e.code, ErrorCode::Forbidden);
    }

    #[test]
    fn bad_tables_are_named() {
        let bad = |c: KeyConfig| ScopedKey::try_from(c).unwrap_err();
        let ok = KeyConfig {
            name: "k".into(),
            secret: "0123456789abcdef".into(),
            ..KeyConfig::default()
        };
        assert!(bad(KeyConfig {
            name: "a b".into(),
            ..ok.clone()
        })
        .contains("name"));
        assert!(bad(KeyConfig {
            secret: "short".into(),
            ..ok.clone()
        })
        .contains("at least 16 bytes"));
        let e = bad(KeyConfig {
            publish: vec!["a*b".into()],
            ..ok.clone()
        });
        assert!(e.contains("\"k\": publish"), "{e}");
        let k: ScopedKey = ok.clone().try_into().unwrap();
        assert!(format!("{k:?}").contains("<hidden>"));
        assert!(check_keys(&[k.clone(), k.clone()], &[]).is_err());
        let mut other = k.clone();
        other.name = "other".into();
        let e = check_keys(&[k.clone(), other], &[]).unwrap_err();
        assert!(e.contains("same secret") && !e.contains("0123"), "{e}");
        assert!(check_keys(&[k], &["0123456789abcdef".into()]).is_err());
        let cfg = Config {
            keys: vec![ok.clone(), ok],
            ..Config::default()
        };
        let e = Publishers::from_config(&cfg).unwrap_err();
        assert_eq!(e, "[[key]] name \"k\" is used twice");
    }
}
