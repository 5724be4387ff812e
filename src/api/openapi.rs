//! `GET /api/openapi.json`: the OpenAPI 3 description of every HTTP endpoint.
//!
//! The document is hand-written JSON embedded in the binary rather than derived from the
//! handlers: it has to describe responses that come from layers and limits outside any
//! handler (415, 408, 429, the JSON fallback), and a derive macro on every handler would
//! tie the description to their signatures instead of to what goes over the wire.
//! tests/it/openapi.rs keeps it true: its paths and methods equal the router's, every
//! documented operation answers, and real responses validate against its schemas;
//! `scripts/schemathesis` fuzzes the real server with it.

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};

/// The document, as served.
pub const DOCUMENT: &str = include_str!("openapi.json");

pub async fn document() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        DOCUMENT,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_is_openapi_3_for_this_version() {
        let doc: serde_json::Value = serde_json::from_str(DOCUMENT).expect("valid JSON");
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
        assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
    }
}
