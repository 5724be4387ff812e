//! Which browser pages may use crier: one policy for WebSocket upgrades, SSE streams and the
//! write endpoints.
//!
//! A browser names the page that makes a request in `Origin` (and, in current browsers, how
//! that page relates to the target in `Sec-Fetch-Site`). A request with neither comes from a
//! program, not from a page, and passes: programs are not the confused deputies this guards
//! against. A page passes when its origin is one of the service's public origins
//! (`public_origins`), one of the other sites it trusts (`allowed_origins`), or, with nothing
//! configured for it, when it equals the `Host` it asked for *and* that Host is an IP literal
//! or `localhost`.
//!
//! Why not simply "Origin equals Host": a DNS-rebinding page at `http://evil.example` that
//! re-points `evil.example` to crier's address sends `Origin: http://evil.example` *and*
//! `Host: evil.example`, so that rule lets it in. Rebinding always needs a DNS name, so an IP
//! literal or `localhost` (which browsers resolve to loopback themselves) is safe to trust;
//! a deployment behind a domain states its public origin instead.
//!
//! What it cannot do: a same-origin GET carries no Origin (and over plain http no
//! `Sec-Fetch-Site`), so a rebinding page's EventSource and API reads pass like the real
//! page's. WebSocket upgrades and writes always carry Origin, so those are refused.
//!
//! Origins and hosts are compared normalised (scheme and host lower case, default ports 80
//! and 443 filled in), so `Host: example.com:80` matches `Origin: http://example.com`.

use std::net::IpAddr;

use axum::http::uri::Authority;
use axum::http::{header, HeaderMap, Uri};

use crate::config::Config;
use crate::error_code::{ErrorCode, Refusal};

/// A normalised web origin: scheme, lower-case host (IPv6 in brackets) and explicit port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub scheme: &'static str,
    pub host: String,
    pub port: u16,
}

impl Origin {
    /// Parses a configured origin: `scheme://host[:port]`, a trailing `/` tolerated.
    /// `null`, paths, queries, user info and schemes other than http/https are not origins.
    pub fn parse(s: &str) -> Option<Origin> {
        let s = s.trim();
        Self::parse_serialized(s.strip_suffix('/').unwrap_or(s))
    }

    /// Parses an `Origin` header: a serialized origin, `scheme://host[:port]` and nothing
    /// after it, not even a `/` (RFC 6454 7.1). A browser never sends anything else, so
    /// anything else did not come from one and is not trusted as one.
    pub fn parse_header(s: &str) -> Option<Origin> {
        Self::parse_serialized(s)
    }

    fn parse_serialized(s: &str) -> Option<Origin> {
        let uri: Uri = s.parse().ok()?;
        let scheme = match uri.scheme()?.as_str() {
            x if x.eq_ignore_ascii_case("http") => "http",
            x if x.eq_ignore_ascii_case("https") => "https",
            _ => return None,
        };
        let rest = &s[scheme.len() + "://".len()..];
        if rest.contains(['/', '?', '#']) || rest.trim() != rest {
            return None;
        }
        let (host, port) = host_port(uri.authority()?, scheme)?;
        Some(Origin { scheme, host, port })
    }

    /// The origin a request for `host` (a `Host` header value) would have under `scheme`.
    pub fn from_host(host: &str, scheme: &'static str) -> Option<Origin> {
        let authority: Authority = host.trim().parse().ok()?;
        let (host, port) = host_port(&authority, scheme)?;
        Some(Origin { scheme, host, port })
    }

    /// True when no DNS lookup stands between the browser and this host, so a rebinding
    /// attack cannot produce it.
    pub fn is_rebinding_safe(&self) -> bool {
        self.host == "localhost" || self.host.trim_matches(['[', ']']).parse::<IpAddr>().is_ok()
    }
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}:{}", self.scheme, self.host, self.port)
    }
}

fn host_port(a: &Authority, scheme: &str) -> Option<(String, u16)> {
    if a.as_str().contains('@') || a.host().is_empty() {
        return None;
    }
    let port = match &a.as_str()[a.host().len()..] {
        "" if scheme == "https" => 443,
        "" => 80,
        explicit => explicit.strip_prefix(':')?.parse().ok()?,
    };
    Some((a.host().to_ascii_lowercase(), port))
}

/// Why a page passed; SSE uses it to answer CORS for the sites the operator listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No Origin and no cross-site `Sec-Fetch-Site`: a program, not a page.
    NotBrowser,
    /// The page came from the same origin it is calling.
    SameOrigin,
    /// The page's origin is listed in `public_origins` or `allowed_origins`.
    Listed,
}

/// The one origin rule for every endpoint that opens a stream or writes (module docs).
pub fn check(headers: &HeaderMap, cfg: &Config) -> Result<Access, Refusal> {
    let cross_site = headers
        .get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"cross-site"));
    let host_header = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let Some(origin) = headers.get(header::ORIGIN) else {
        // Programs send neither header; a same-origin GET (an EventSource on the page
        // itself) sends no Origin either, and `none` means the user typed the URL.
        return if cross_site {
            Err(cross_site_refused())
        } else {
            Ok(Access::NotBrowser)
        };
    };
    if headers.get_all(header::ORIGIN).iter().nth(1).is_some() {
        // api::single_headers refuses this first; never pick one of two here either.
        return Err(origin_refused());
    }
    let Some(origin) = origin.to_str().ok().and_then(Origin::parse_header) else {
        return Err(origin_refused());
    };
    if listed(&origin, cfg) {
        return Ok(Access::Listed);
    }
    let host = host_header.and_then(|h| Origin::from_host(h, origin.scheme));
    match host {
        Some(host) if host == origin && host.is_rebinding_safe() => {
            if cross_site {
                Err(cross_site_refused())
            } else {
                Ok(Access::SameOrigin)
            }
        }
        _ => Err(origin_refused()),
    }
}

fn listed(origin: &Origin, cfg: &Config) -> bool {
    cfg.public_origins
        .iter()
        .chain(&cfg.allowed_origins)
        .any(|o| Origin::parse(o).as_ref() == Some(origin))
}

/// `allowed_origins` and `public_origins` as `Config::resolve` cannot judge them: each must
/// be an origin. `server::check_config` runs it before anything starts.
pub fn check_config(cfg: &Config) -> anyhow::Result<()> {
    for (name, list) in [
        ("allowed_origins", &cfg.allowed_origins),
        ("public_origins", &cfg.public_origins),
    ] {
        for o in list {
            anyhow::ensure!(
                Origin::parse(o).is_some(),
                "{name}: {o:?} must be scheme://host[:port] with scheme http or https \
                 and no path"
            );
        }
    }
    Ok(())
}

/// The default trusts only pages opened by IP address or localhost; a node that listens
/// beyond loopback with no public origin is probably reached by a domain name, whose pages
/// would all get 403. Say so at start rather than leave the operator to find out.
pub fn startup_warning(cfg: &Config) -> Option<String> {
    (!cfg.listen.ip().is_loopback() && cfg.public_origins.is_empty()).then(|| {
        format!(
            "listening on {} with no public origin: browser pages reached through a domain \
             name will get 403 origin_not_allowed on /ws, /sse and writes; set \
             --public-origin (e.g. https://crier.example)",
            cfg.listen
        )
    })
}

fn origin_refused() -> Refusal {
    Refusal::new(
        ErrorCode::OriginNotAllowed,
        "pages from this Origin may not use this endpoint (the operator lists the service's own \
         origin with --public-origin and other trusted sites with --allowed-origin)",
    )
}

fn cross_site_refused() -> Refusal {
    Refusal::new(
        ErrorCode::CrossSiteRequest,
        "cross-site browser requests are refused (Sec-Fetch-Site: cross-site)",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(s: &str) -> Option<String> {
        Origin::parse(s).map(|o| o.to_string())
    }

    #[test]
    fn origins_are_normalised() {
        assert_eq!(
            o("http://Example.COM").as_deref(),
            Some("http://example.com:80")
        );
        assert_eq!(
            o("HTTPS://example.com").as_deref(),
            Some("https://example.com:443")
        );
        assert_eq!(
            o("https://example.com:443/").as_deref(),
            Some("https://example.com:443")
        );
        assert_eq!(
            o("http://127.0.0.1:7700").as_deref(),
            Some("http://127.0.0.1:7700")
        );
        assert_eq!(o("http://[::1]:7700").as_deref(), Some("http://[::1]:7700"));
        assert_eq!(
            o("http://example.com:8080").as_deref(),
            Some("http://example.com:8080")
        );
    }

    #[test]
    fn non_origins_are_refused() {
        for bad in [
            "null",
            "",
            "example.com",
            "ftp://example.com",
            "http://",
            "http://example.com/path",
            "http://example.com?x=1",
            "http://user@example.com",
            "http://example.com:",
            "http://example.com:99999",
            "http://exa mple.com",
        ] {
            assert_eq!(o(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_header_origin_has_nothing_after_the_port() {
        let h = |s: &str| Origin::parse_header(s).map(|o| o.to_string());
        assert_eq!(
            h("http://127.0.0.1:7700").as_deref(),
            Some("http://127.0.0.1:7700")
        );
        assert_eq!(
            h("https://example.com").as_deref(),
            Some("https://example.com:443")
        );
        for bad in [
            "http://127.0.0.1:7700/",
            "https://example.com/",
            "http://example.com/path",
            "http://example.com?",
            "http://example.com#",
            " http://example.com",
            "http://example.com ",
            "http://a.example, http://b.example",
        ] {
            assert_eq!(h(bad), None, "{bad:?}");
        }
        // Configuration still takes the trailing slash people write.
        assert!(Origin::parse("https://example.com/").is_some());
    }

    #[test]
    fn hosts_take_the_scheme_default_port() {
        let h = |host: &str, scheme| Origin::from_host(host, scheme).map(|o| o.to_string());
        assert_eq!(h("example.com:80", "http"), o("http://example.com"));
        assert_eq!(h("example.com", "https"), o("https://example.com:443"));
        assert_ne!(h("example.com:80", "https"), o("https://example.com"));
        assert_eq!(h("LOCALHOST:7700", "http"), o("http://localhost:7700"));
        assert_eq!(h("[::1]:7700", "http"), o("http://[::1]:7700"));
        assert_eq!(h("user@example.com", "http"), None);
    }

    #[test]
    fn only_literals_and_localhost_are_rebinding_safe() {
        let safe = |s: &str| Origin::parse(s).unwrap().is_rebinding_safe();
        assert!(safe("http://127.0.0.1:7700"));
        assert!(safe("http://10.1.2.3"));
        assert!(safe("http://[::1]:7700"));
        assert!(safe("http://localhost:7700"));
        assert!(!safe("http://evil.example"));
        assert!(!safe("http://localhost.evil.example"));
    }

    #[test]
    fn warns_only_beyond_loopback_without_public_origin() {
        let mut cfg = Config::default();
        assert_eq!(startup_warning(&cfg), None);
        cfg.listen = "0.0.0.0:7700".parse().unwrap();
        assert!(startup_warning(&cfg).is_some_and(|w| w.contains("--public-origin")));
        cfg.public_origins = vec!["https://crier.example".into()];
        assert_eq!(startup_warning(&cfg), None);
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    fn verdict(pairs: &[(&'static str, &str)], cfg: &Config) -> Result<Access, &'static str> {
        check(&headers(pairs), cfg).map_err(|e| e.code.as_str())
    }

    #[test]
    fn the_policy() {
        let none = Config::default();
        let listed = Config {
            public_origins: vec!["https://crier.example".into()],
            allowed_origins: vec!["https://game.example/".into()],
            ..Config::default()
        };
        // Programs pass; a cross-site fetch without Origin does not.
        assert_eq!(verdict(&[], &none), Ok(Access::NotBrowser));
        assert_eq!(
            verdict(&[("sec-fetch-site", "cross-site")], &none),
            Err("cross_site_request")
        );
        assert_eq!(
            verdict(&[("sec-fetch-site", "none")], &none),
            Ok(Access::NotBrowser)
        );
        assert_eq!(
            verdict(&[("sec-fetch-site", "same-origin")], &none),
            Ok(Access::NotBrowser)
        );
        // Same origin on an IP literal or localhost, default ports normalised.
        let same = [
            ("host", "127.0.0.1:7700"),
            ("origin", "http://127.0.0.1:7700"),
        ];
        assert_eq!(verdict(&same, &none), Ok(Access::SameOrigin));
        let same = [("host", "127.0.0.1:80"), ("origin", "http://127.0.0.1")];
        assert_eq!(verdict(&same, &none), Ok(Access::SameOrigin));
        let same = [
            ("host", "localhost:7700"),
            ("origin", "http://localhost:7700"),
        ];
        assert_eq!(verdict(&same, &none), Ok(Access::SameOrigin));
        // DNS rebinding: Origin equals Host, but Host is a name nobody listed.
        let rebind = [
            ("host", "evil.example:7700"),
            ("origin", "http://evil.example:7700"),
        ];
        assert_eq!(verdict(&rebind, &none), Err("origin_not_allowed"));
        assert_eq!(verdict(&rebind, &listed), Err("origin_not_allowed"));
        // Foreign, null and mismatched-scheme origins.
        let foreign = [
            ("host", "127.0.0.1:7700"),
            ("origin", "http://evil.example"),
        ];
        assert_eq!(verdict(&foreign, &none), Err("origin_not_allowed"));
        let null = [("host", "127.0.0.1:7700"), ("origin", "null")];
        assert_eq!(verdict(&null, &none), Err("origin_not_allowed"));
        let scheme = [
            ("host", "127.0.0.1:443"),
            ("origin", "http://127.0.0.1:443"),
        ];
        assert_eq!(verdict(&scheme, &none), Ok(Access::SameOrigin));
        // Listed origins pass whatever the Host (a reverse proxy may rewrite it), with the
        // default port written or not, even when the browser calls them cross-site.
        for origin in [
            "https://crier.example",
            "https://crier.example:443",
            "https://game.example",
        ] {
            let h = [
                ("host", "10.0.0.5:7700"),
                ("origin", origin),
                ("sec-fetch-site", "cross-site"),
            ];
            assert_eq!(verdict(&h, &listed), Ok(Access::Listed), "{origin}");
        }
        let wrong_scheme = [
            ("host", "crier.example"),
            ("origin", "http://crier.example"),
        ];
        assert_eq!(verdict(&wrong_scheme, &listed), Err("origin_not_allowed"));
    }

    #[test]
    fn settings_must_be_origins() {
        let mut cfg = Config {
            public_origins: vec!["https://crier.example".into()],
            allowed_origins: vec!["http://127.0.0.1:8080".into()],
            ..Config::default()
        };
        assert!(check_config(&cfg).is_ok());
        for bad in ["crier.example", "https://crier.example/app", "null"] {
            cfg.public_origins = vec![bad.into()];
            let e = check_config(&cfg).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("public_origins: {bad:?} must be")),
                "{e}"
            );
        }
    }
}
