//! Writes need intent: a request that changes anything must say it sends JSON and must not
//! come from another site's page.
//!
//! Without publisher keys (the default) the write endpoints are open, so any page a visitor
//! opens could otherwise publish, post scores or reset boards through the visitor's browser:
//! an HTML form or a `no-cors` fetch may POST cross-site, but only with a "simple" content
//! type (`application/x-www-form-urlencoded`, `multipart/form-data`, `text/plain`), and a
//! page that sets `Content-Type: application/json` cross-origin must first pass a CORS
//! preflight, which crier never grants. Requiring that content type therefore shuts the
//! door on blind cross-site writes; the origin rule (`crate::origin`) refuses what a browser
//! labels cross-site as well, for browsers and paths the first check would miss.
//!
//! Both run as a layer on every route, before the handler, so the body is never read and
//! an endpoint added later cannot forget them.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use crate::error_code::ErrorCode;
use crate::state::AppState;

/// Route layer: `axum::middleware::from_fn_with_state(state, intent::require)`.
pub async fn require(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if writes(req.method()) {
        if let Err(e) = crate::origin::check(req.headers(), &state.cfg)
            .map_err(ApiError::from)
            .and_then(|_| json_content_type(req.headers()))
        {
            return e.into_response();
        }
    }
    next.run(req).await
}

/// Every method but the safe ones may change something.
fn writes(m: &Method) -> bool {
    !matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// `application/json`, any case, parameters such as `charset=utf-8` allowed; a body-less
/// write (reset) needs it too, because a bare form post has no body to tell it apart by.
pub fn json_content_type(h: &HeaderMap) -> Result<(), ApiError> {
    let is_json = h
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<mime::Mime>().ok())
        .is_some_and(|m| m.essence_str() == mime::APPLICATION_JSON.essence_str());
    if is_json {
        Ok(())
    } else {
        Err(ApiError::new(
            ErrorCode::UnsupportedMediaType,
            "write endpoints take Content-Type: application/json",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(ct: Option<&str>) -> bool {
        let mut h = HeaderMap::new();
        if let Some(ct) = ct {
            h.insert(header::CONTENT_TYPE, ct.parse().unwrap());
        }
        json_content_type(&h).is_ok()
    }

    #[test]
    fn only_json_is_intent() {
        assert!(ok(Some("application/json")));
        assert!(ok(Some("application/json; charset=utf-8")));
        assert!(ok(Some("Application/JSON;charset=UTF-8")));
        for bad in [
            None,
            Some(""),
            Some("application/x-www-form-urlencoded"),
            Some("multipart/form-data; boundary=x"),
            Some("text/plain"),
            Some("text/plain; a=application/json"),
            Some("application/jsonp"),
            Some("application/json-seq"),
            Some("application/problem+json"),
            Some("application"),
        ] {
            assert!(!ok(bad), "{bad:?}");
        }
    }

    #[test]
    fn safe_methods_are_not_writes() {
        assert!(!writes(&Method::GET));
        assert!(!writes(&Method::HEAD));
        assert!(!writes(&Method::OPTIONS));
        assert!(writes(&Method::POST));
        assert!(writes(&Method::PUT));
        assert!(writes(&Method::DELETE));
        assert!(writes(&Method::PATCH));
    }
}
