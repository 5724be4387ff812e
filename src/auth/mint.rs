//! `crier token`: signs a subscriber token, for development and for trying private topics
//! without writing a backend first. Production tokens come from the application's backend
//! (docs/auth.md shows Node, Python and Go); this command exists so the first private topic
//! can be tried from a shell.
//!
//! Every rule the server applies when it reads a token (`token.rs`) is applied here before
//! signing, so a token this command prints is never one the server would refuse for its
//! claims: the error comes now, with the flag to change, not later as a 401.

use std::path::PathBuf;
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

use super::token::{unix_now, MAX_TOKEN_BYTES, MAX_TOKEN_TOPICS, MIN_SECRET_BYTES};
use crate::topic::Patterns;

#[derive(clap::Args, Debug, Clone)]
pub struct TokenArgs {
    /// HS256 secret: the server's jwt_secret (at least 32 bytes).
    #[arg(long, env = "CRIER_JWT_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    /// Sign with this PEM private key (PKCS#8) instead of a secret: RS256 for an RSA key,
    /// ES256 for an EC P-256 key. The server needs the matching public key
    /// (--jwt-public-key) or a JWKS holding it (then give --kid).
    #[arg(long, value_name = "FILE")]
    pub private_key: Option<PathBuf>,
    /// Who the token is for (the `sub` claim, 1-256 bytes).
    #[arg(long)]
    pub sub: String,
    /// A topic, or a pattern ending in `*` (`private:*`), the holder may read; repeatable.
    /// None: the token proves who the holder is but opens no private topic.
    #[arg(long = "topic", value_name = "PATTERN")]
    pub topics: Vec<String>,
    /// How long the token is valid (`exp` = now + this), e.g. 90s, 15m, 1h, 7days.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
    /// Not valid until this long from now (`nbf`), e.g. 10s.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub nbf: Option<Duration>,
    /// The `kid` header: which key of the server's JWKS (--jwt-jwks) checks the token.
    #[arg(long)]
    pub kid: Option<String>,
}

/// The claims crier reads (docs/auth.md), plus `iat` for the application's own records.
#[derive(Serialize, Debug)]
struct Claims<'a> {
    sub: &'a str,
    exp: u64,
    iat: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    nbf: Option<u64>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    topics: &'a [String],
}

impl TokenArgs {
    /// Parses `crier token` flags from a list (tests and embedding); the environment is
    /// read as on the command line (CRIER_JWT_SECRET).
    pub fn from_flags<I, T>(flags: I) -> anyhow::Result<Self>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        use clap::{Args, FromArgMatches};
        let cmd = <TokenArgs as Args>::augment_args(clap::Command::new("token"));
        let matches = cmd.try_get_matches_from(
            std::iter::once(std::ffi::OsString::from("token"))
                .chain(flags.into_iter().map(Into::into)),
        )?;
        Ok(TokenArgs::from_arg_matches(&matches)?)
    }
}

/// The signed token, with `now` as the issue time (unix seconds).
pub fn mint(args: &TokenArgs, now: u64) -> anyhow::Result<String> {
    let (alg, key) = signing_key(args)?;
    anyhow::ensure!(
        !args.sub.is_empty() && args.sub.len() <= 256,
        "--sub must be 1-256 bytes"
    );
    anyhow::ensure!(
        args.topics.len() <= MAX_TOKEN_TOPICS,
        "at most {MAX_TOKEN_TOPICS} --topic patterns fit in a token"
    );
    Patterns::parse(&args.topics).map_err(|e| anyhow::anyhow!("--topic: {e}"))?;
    anyhow::ensure!(!args.ttl.is_zero(), "--ttl must be more than 0s");
    let exp = now
        .checked_add(args.ttl.as_secs().max(1))
        .filter(|&e| e <= i64::MAX as u64)
        .ok_or_else(|| anyhow::anyhow!("--ttl is too long"))?;
    let nbf = match args.nbf {
        None => None,
        Some(d) => Some(
            now.checked_add(d.as_secs())
                .filter(|&n| n < exp)
                .ok_or_else(|| anyhow::anyhow!("--nbf must be shorter than --ttl"))?,
        ),
    };
    let claims = Claims {
        sub: &args.sub,
        exp,
        iat: now,
        nbf,
        topics: &args.topics,
    };
    let mut header = Header::new(alg);
    header.kid = args.kid.clone();
    let token = jsonwebtoken::encode(&header, &claims, &key)
        .map_err(|e| anyhow::anyhow!("signing with {alg:?}: {e}"))?;
    anyhow::ensure!(
        token.len() <= MAX_TOKEN_BYTES,
        "the token would be {} bytes; the server accepts at most {MAX_TOKEN_BYTES}: use fewer or \
         shorter --topic patterns (a pattern such as user:42:* covers many names)",
        token.len()
    );
    Ok(token)
}

/// `crier token`: prints the token, and nothing else, so `$(crier token ...)` works.
pub fn run(args: &TokenArgs) -> anyhow::Result<()> {
    println!("{}", mint(args, unix_now())?);
    Ok(())
}

/// The algorithm follows the key, as on the server: a secret signs HS256, an RSA key
/// RS256, a P-256 key ES256.
fn signing_key(args: &TokenArgs) -> anyhow::Result<(Algorithm, EncodingKey)> {
    match (&args.secret, &args.private_key) {
        (Some(_), Some(_)) => {
            anyhow::bail!("give --secret (or CRIER_JWT_SECRET) or --private-key, not both")
        }
        (None, None) => anyhow::bail!(
            "give --secret (or set CRIER_JWT_SECRET) to sign HS256, or --private-key FILE to \
             sign RS256/ES256"
        ),
        (Some(secret), None) => {
            anyhow::ensure!(
                secret.len() >= MIN_SECRET_BYTES,
                "--secret must be at least {MIN_SECRET_BYTES} bytes, as the server's jwt_secret \
                 (HS256 needs a 256-bit secret); this one is {} bytes",
                secret.len()
            );
            Ok((
                Algorithm::HS256,
                EncodingKey::from_secret(secret.as_bytes()),
            ))
        }
        (None, Some(path)) => {
            let pem = std::fs::read(path)
                .map_err(|e| anyhow::anyhow!("--private-key {}: {e}", path.display()))?;
            // The crate would take a public key here and fail only when signing, obscurely.
            anyhow::ensure!(
                !String::from_utf8_lossy(&pem).contains("PUBLIC KEY-----"),
                "--private-key {}: this is a public key; sign with the private key (the server \
                 holds the public one, --jwt-public-key)",
                path.display()
            );
            if let Ok(key) = EncodingKey::from_rsa_pem(&pem) {
                return Ok((Algorithm::RS256, key));
            }
            if let Ok(key) = EncodingKey::from_ec_pem(&pem) {
                return Ok((Algorithm::ES256, key));
            }
            anyhow::bail!(
                "--private-key {}: not a PEM RSA or EC P-256 private key (PKCS#8, \
                 \"-----BEGIN PRIVATE KEY-----\")",
                path.display()
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::token::{TokenError, Verifier};

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn args(flags: &[&str]) -> anyhow::Result<TokenArgs> {
        TokenArgs::from_flags(flags.iter().copied())
    }

    fn fixture(name: &str) -> String {
        format!("{}/tests/fixtures/auth/{name}", env!("CARGO_MANIFEST_DIR"))
    }

    #[test]
    fn hs256_token_verifies_with_its_claims() {
        let a = args(&[
            "--secret",
            SECRET,
            "--sub",
            "alice",
            "--topic",
            "private:*",
            "--topic",
            "user:42",
            "--ttl",
            "10m",
        ])
        .unwrap();
        let now = unix_now();
        let token = mint(&a, now).unwrap();
        let g = Verifier::new(SECRET, &[], None)
            .unwrap()
            .unwrap()
            .verify(&token)
            .unwrap();
        assert_eq!(&*g.sub, "alice");
        assert_eq!(g.exp, now + 600);
        assert!(g.allows("private:x") && g.allows("user:42") && !g.allows("user:43"));
    }

    #[test]
    fn rs256_and_es256_follow_the_key() {
        let keys = [
            (
                "rsa".to_string(),
                std::fs::read_to_string(fixture("rsa-public.pem")).unwrap(),
            ),
            (
                "ec".to_string(),
                std::fs::read_to_string(fixture("ec-public.pem")).unwrap(),
            ),
        ];
        let v = Verifier::new("", &keys, None).unwrap().unwrap();
        for (file, alg) in [("rsa-private.pem", "RS256"), ("ec-private.pem", "ES256")] {
            let key = fixture(file);
            let a = args(&["--private-key", &key, "--sub", "bob", "--topic", "a"]).unwrap();
            let token = mint(&a, unix_now()).unwrap();
            let header = jsonwebtoken::decode_header(&token).unwrap();
            assert_eq!(format!("{:?}", header.alg), alg);
            assert_eq!(&*v.verify(&token).unwrap().sub, "bob");
        }
    }

    #[test]
    fn nbf_and_kid_are_written() {
        let a = args(&[
            "--secret", SECRET, "--sub", "a", "--nbf", "30s", "--kid", "k1",
        ])
        .unwrap();
        let token = mint(&a, unix_now()).unwrap();
        assert_eq!(
            jsonwebtoken::decode_header(&token).unwrap().kid.as_deref(),
            Some("k1")
        );
        let v = Verifier::new(SECRET, &[], None).unwrap().unwrap();
        assert!(matches!(v.verify(&token), Err(TokenError::Bad(m)) if m.contains("nbf")));
    }

    #[test]
    fn refuses_what_the_server_would() {
        let err = |flags: &[&str]| {
            mint(&args(flags).unwrap(), unix_now())
                .unwrap_err()
                .to_string()
        };
        assert!(err(&["--secret", "short", "--sub", "a"]).contains("at least 32 bytes"));
        assert!(err(&["--sub", "a"]).contains("--secret"));
        let key = fixture("rsa-private.pem");
        assert!(
            err(&["--secret", SECRET, "--private-key", &key, "--sub", "a"]).contains("not both")
        );
        assert!(err(&["--secret", SECRET, "--sub", ""]).contains("--sub"));
        assert!(err(&["--secret", SECRET, "--sub", "a", "--topic", "a b"]).contains("--topic"));
        assert!(err(&["--secret", SECRET, "--sub", "a", "--ttl", "0s"]).contains("--ttl"));
        assert!(
            err(&["--secret", SECRET, "--sub", "a", "--ttl", "1m", "--nbf", "2m"])
                .contains("--nbf")
        );
        let public = fixture("rsa-public.pem");
        assert!(err(&["--private-key", &public, "--sub", "a"]).contains("private key"));
        assert!(
            err(&["--private-key", "/nonexistent.pem", "--sub", "a"]).contains("/nonexistent.pem")
        );
        let many: Vec<String> = (0..300).map(|i| format!("t{i}")).collect();
        let mut flags = vec!["--secret", SECRET, "--sub", "a"];
        for t in &many {
            flags.extend(["--topic", t]);
        }
        assert!(err(&flags).contains("at most 256"));
        let long: Vec<String> = (0..200).map(|i| format!("{i:0>100}")).collect();
        let mut flags = vec!["--secret", SECRET, "--sub", "a"];
        for t in &long {
            flags.extend(["--topic", t]);
        }
        assert!(err(&flags).contains("8192"));
    }
}
