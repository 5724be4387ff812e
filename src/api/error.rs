//! One JSON error shape for every HTTP failure: `{"error":{"code":"...","message":"..."}}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::auth::TokenError;
use crate::broker::BrokerError;
use crate::error_code::{ErrorCode, Refusal};
use crate::hub::HubError;
use crate::topic::{TopicError, BAD_TOPIC_MESSAGE};

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub message: String,
    /// Sent as `Retry-After` (seconds) when set.
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// An error answered with its code's own status.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        debug_assert!(code.status().is_some(), "{code} has no HTTP status");
        Self::with_status(
            code.status().unwrap_or(StatusCode::BAD_REQUEST),
            code,
            message,
        )
    }
    /// For the few codes answered with more than one status (`too_many_topics`) and for
    /// the framework's own refusals, whose status is given.
    pub fn with_status(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }
    /// The same error, telling the client to wait `secs` seconds (`Retry-After`).
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }
    pub fn bad_topic() -> Self {
        Self::new(ErrorCode::BadTopic, BAD_TOPIC_MESSAGE)
    }
    pub fn too_large(max: usize) -> Self {
        Self::new(
            ErrorCode::MessageTooLarge,
            format!("the body is larger than max_message_bytes ({max})"),
        )
    }
    pub fn body_timeout() -> Self {
        Self::new(
            ErrorCode::BodyTimeout,
            "the request body did not arrive within body_read_timeout",
        )
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }
}

/// The domain's refusals (auth, origin, board policies, admission) keep their code,
/// message and `Retry-After`; the status is the code's.
impl From<Refusal> for ApiError {
    fn from(r: Refusal) -> Self {
        ApiError {
            retry_after: r.retry_after,
            ..Self::new(r.code, r.message)
        }
    }
}

impl From<TokenError> for ApiError {
    fn from(e: TokenError) -> Self {
        Refusal::from(e).into()
    }
}

impl From<TopicError> for ApiError {
    fn from(e: TopicError) -> Self {
        match e {
            TopicError::BadName => Self::bad_topic(),
            TopicError::BadQuery(_) => Self::new(ErrorCode::BadQuery, e.to_string()),
            TopicError::NoTopic => Self::new(ErrorCode::BadTopic, e.to_string()),
            // The client asked for too much: 400, unlike the node's own topic limit (503).
            TopicError::TooMany(_) => Self::with_status(
                StatusCode::BAD_REQUEST,
                ErrorCode::TooManyTopics,
                e.to_string(),
            ),
        }
    }
}

impl From<HubError> for ApiError {
    fn from(e: HubError) -> Self {
        match e {
            HubError::TooManyTopics(_) => Self::new(ErrorCode::TooManyTopics, e.to_string()),
            HubError::TooManyTopicsPerConnection(_) => Self::with_status(
                StatusCode::BAD_REQUEST,
                ErrorCode::TooManyTopics,
                e.to_string(),
            ),
            HubError::ClientClosed => Self::new(ErrorCode::Closed, e.to_string()),
        }
    }
}

impl From<BrokerError> for ApiError {
    fn from(e: BrokerError) -> Self {
        match e {
            BrokerError::TooManyTopics(_) => Self::new(ErrorCode::TooManyTopics, e.to_string()),
            BrokerError::TooManyTopicsPerConnection(_) => Self::with_status(
                StatusCode::BAD_REQUEST,
                ErrorCode::TooManyTopics,
                e.to_string(),
            ),
            BrokerError::ClientClosed => Self::new(ErrorCode::Closed, e.to_string()),
            BrokerError::Unavailable(_) => Self::new(ErrorCode::StoreUnavailable, e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        crate::refusal_log::http(self.code, &self.message);
        let body =
            serde_json::json!({"error": {"code": self.code.as_str(), "message": self.message}});
        let mut resp = (self.status, Json(body)).into_response();
        // RFC 6750 3: a 401 names the scheme, and for a token that was sent, what is wrong.
        let challenge = match self.code {
            ErrorCode::Unauthorized | ErrorCode::TokenRequired => Some("Bearer"),
            ErrorCode::BadToken => Some("Bearer error=\"invalid_token\""),
            ErrorCode::TokenExpired => {
                Some("Bearer error=\"invalid_token\", error_description=\"the token expired\"")
            }
            _ => None,
        };
        if let Some(c) = challenge {
            resp.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static(c),
            );
        }
        if let Some(secs) = self.retry_after {
            resp.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(secs),
            );
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_401_names_the_bearer_scheme() {
        let resp = ApiError::new(ErrorCode::TokenExpired, "x").into_response();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        let c = resp.headers()[axum::http::header::WWW_AUTHENTICATE]
            .to_str()
            .unwrap();
        assert!(c.starts_with("Bearer error=\"invalid_token\""), "{c}");
        let resp = ApiError::new(ErrorCode::Forbidden, "x").into_response();
        assert!(!resp
            .headers()
            .contains_key(axum::http::header::WWW_AUTHENTICATE));
    }
}
