//! Publisher keys. Game servers and backends publish; browsers only subscribe, so the keys
//! guard every write endpoint and nothing else.

use axum::http::{header, HeaderMap};

use super::error::ApiError;
use crate::config::Config;
use crate::error_code::ErrorCode;

pub fn require_publisher(cfg: &Config, headers: &HeaderMap) -> Result<(), ApiError> {
    if cfg.publisher_keys.is_empty() {
        return Ok(());
    }
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(ApiError::new(
            ErrorCode::Unauthorized,
            "this endpoint needs Authorization: Bearer <publisher key>",
        ));
    };
    let key = value
        .to_str()
        .ok()
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .unwrap_or("");
    // Compare every key in full so timing does not reveal a matching prefix.
    let ok = cfg.publisher_keys.iter().fold(false, |acc, k| {
        acc | constant_time_eq(k.as_bytes(), key.as_bytes())
    });
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(
            ErrorCode::Forbidden,
            "the publisher key is not valid",
        ))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
