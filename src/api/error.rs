//! One JSON error shape for every HTTP failure: `{"error":{"code":"...","message":"..."}}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::broker::BrokerError;
use crate::hub::HubError;
use crate::topic::BAD_TOPIC_MESSAGE;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
    pub fn bad_topic() -> Self {
        Self::bad_request("bad_topic", BAD_TOPIC_MESSAGE)
    }
    pub fn too_many_connections(max: usize) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_connections",
            format!("this node already holds its maximum of {max} connections"),
        )
    }
    pub fn shutting_down() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the node is shutting down",
        )
    }
    pub fn too_large(max: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "message_too_large",
            format!("the body is larger than max_message_bytes ({max})"),
        )
    }
    pub fn body_timeout() -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            "the request body did not arrive within body_read_timeout",
        )
    }
    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl From<HubError> for ApiError {
    fn from(e: HubError) -> Self {
        match e {
            HubError::TooManyTopics(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_topics",
                e.to_string(),
            ),
            HubError::TooManyTopicsPerConnection(_) => {
                Self::bad_request("too_many_topics", e.to_string())
            }
            HubError::ClientClosed => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "closed", e.to_string())
            }
        }
    }
}

impl From<BrokerError> for ApiError {
    fn from(e: BrokerError) -> Self {
        match e {
            BrokerError::TooManyTopics(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_topics",
                e.to_string(),
            ),
            BrokerError::TooManyTopicsPerConnection(_) => {
                Self::bad_request("too_many_topics", e.to_string())
            }
            BrokerError::ClientClosed => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "closed", e.to_string())
            }
            BrokerError::Unavailable(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                e.to_string(),
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": {"code": self.code, "message": self.message}});
        (self.status, Json(body)).into_response()
    }
}
