//! The framework's own refusals in the one JSON error shape.
//!
//! axum answers some bad requests before any handler runs: a query or path that does not
//! parse (400, plain text), a known path with the wrong method (405, empty body). The
//! embedded web assets answer 404 in plain text too. Clients and the OpenAPI document
//! promise `{"error":{"code","message"}}` for every failure, so this layer rewrites any
//! error response that is not already JSON, keeping its status and headers (`Allow`).

use axum::body::to_bytes;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use crate::error_code::ErrorCode;

/// Framework rejections are one short sentence; anything longer is cut, never buffered.
const MAX_MESSAGE: usize = 1024;

pub async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) || is_json(&resp) {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = to_bytes(body, MAX_MESSAGE)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let message = if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("request refused")
            .to_owned()
    } else {
        text
    };
    let mut out = ApiError::with_status(status, code(status), message).into_response();
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().append(name, value.clone());
        }
    }
    out
}

fn is_json(resp: &Response) -> bool {
    resp.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v: &HeaderValue| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

fn code(status: StatusCode) -> ErrorCode {
    match status {
        StatusCode::BAD_REQUEST => ErrorCode::BadRequest,
        StatusCode::NOT_FOUND => ErrorCode::NotFound,
        StatusCode::METHOD_NOT_ALLOWED => ErrorCode::MethodNotAllowed,
        StatusCode::REQUEST_TIMEOUT => ErrorCode::BodyTimeout,
        StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::MessageTooLarge,
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ErrorCode::UnsupportedMediaType,
        StatusCode::UNPROCESSABLE_ENTITY => ErrorCode::BadRequest,
        StatusCode::TOO_MANY_REQUESTS => ErrorCode::TooManyRequests,
        StatusCode::SERVICE_UNAVAILABLE => ErrorCode::Unavailable,
        s if s.is_server_error() => ErrorCode::Internal,
        _ => ErrorCode::BadRequest,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;

    async fn rewrite(resp: Response) -> (StatusCode, Option<String>, serde_json::Value) {
        let out = json_errors(resp).await;
        let status = out.status();
        let allow = out
            .headers()
            .get(header::ALLOW)
            .map(|v| v.to_str().unwrap().to_owned());
        let body = to_bytes(out.into_body(), 4096).await.unwrap();
        (status, allow, serde_json::from_slice(&body).unwrap())
    }

    #[tokio::test]
    async fn plain_text_rejection_becomes_json_with_its_message() {
        let resp = (
            StatusCode::BAD_REQUEST,
            "Failed to deserialize query string",
        )
            .into_response();
        let (status, _, body) = rewrite(resp).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"]["code"], "bad_request");
        assert_eq!(
            body["error"]["message"],
            "Failed to deserialize query string"
        );
    }

    #[tokio::test]
    async fn empty_405_keeps_allow_and_gets_a_message() {
        let resp = Response::builder()
            .status(StatusCode::METHOD_NOT_ALLOWED)
            .header(header::ALLOW, "GET,HEAD")
            .body(Body::empty())
            .unwrap();
        let (status, allow, body) = rewrite(resp).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(allow.as_deref(), Some("GET,HEAD"));
        assert_eq!(body["error"]["code"], "method_not_allowed");
        assert_eq!(body["error"]["message"], "Method Not Allowed");
    }

    #[tokio::test]
    async fn json_errors_and_successes_pass_untouched() {
        let err = ApiError::bad_topic().into_response();
        let (_, _, body) = rewrite(err).await;
        assert_eq!(body["error"]["code"], "bad_topic");
        let ok = json_errors((StatusCode::OK, "plain").into_response()).await;
        let body = to_bytes(ok.into_body(), 64).await.unwrap();
        assert_eq!(&body[..], b"plain");
    }
}
