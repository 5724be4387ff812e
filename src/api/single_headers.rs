//! Headers that must be sent once. With two `Authorization` or `Origin` headers a check that
//! reads the first and a proxy (or a later check) that reads the other disagree about who is
//! asking: a same-origin `Origin` followed by a foreign one once let a cross-site write
//! through. RFC 9110 lets a recipient refuse a singleton field sent twice; crier refuses
//! before any route runs, so no handler can pick one of two values.
//!
//! Two different `Content-Length`s never get here: hyper refuses them itself (a bare 400,
//! then it closes the connection), as request smuggling.

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use crate::error_code::ErrorCode;

/// Each single header (as looked up, and as told in the message) and the code a second one
/// gets. `Last-Event-ID` keeps the code it always had (`/sse` refused a second one first).
const SINGLE: &[(&str, &str, ErrorCode)] = &[
    ("authorization", "Authorization", ErrorCode::DuplicateHeader),
    ("origin", "Origin", ErrorCode::DuplicateHeader),
    ("content-type", "Content-Type", ErrorCode::DuplicateHeader),
    (
        "content-length",
        "Content-Length",
        ErrorCode::DuplicateHeader,
    ),
    ("host", "Host", ErrorCode::DuplicateHeader),
    (
        "idempotency-key",
        "Idempotency-Key",
        ErrorCode::DuplicateHeader,
    ),
    ("last-event-id", "Last-Event-ID", ErrorCode::BadLastEventId),
];

/// Layer on the whole router: `axum::middleware::from_fn(single_headers::refuse_repeats)`.
pub async fn refuse_repeats(req: Request, next: Next) -> Response {
    let headers = req.headers();
    for (name, shown, code) in SINGLE {
        if headers.get_all(*name).iter().nth(1).is_some() {
            return ApiError::new(*code, format!("more than one {shown} header: send it once"))
                .into_response();
        }
    }
    next.run(req).await
}
