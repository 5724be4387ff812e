//! Reading a request body into memory, with a bound that holds however the client cuts it.
//!
//! hyper hands a body over as the pieces it read off the socket, each a slice of its
//! connection's read buffer. Collecting those pieces (`axum::body::to_bytes`) keeps every
//! slice, and every slice pins the whole buffer it came from: a body sent one byte per TCP
//! segment held a fresh ~8 KiB buffer per byte, so one 44 KB publish grew the server by
//! ~170 MB. Here each piece is copied into one buffer and dropped at once, so hyper reuses
//! its read buffer and a request holds at most its limit plus that buffer (issue 15).

use axum::body::{Body, Bytes, HttpBody};
use http_body_util::BodyExt;

use super::error::ApiError;
use crate::error_code::ErrorCode;

/// The first allocation for a body that arrives in pieces; it then doubles, up to the limit
/// (or the declared length), so a trickled body costs at most twice what was sent.
const FIRST_CAPACITY: usize = 1024;

/// Reads a body of at most `max` bytes. A declared `Content-Length` over `max` is answered
/// 413 before any body byte is read (and before hyper sends `100 Continue`); a chunked body
/// gets 413 as soon as what arrived passes `max`. The server's `TimedBody` deadline
/// (`body_read_timeout`) ends a body that does not arrive in time with 408.
pub async fn read_body(mut body: Body, max: usize) -> Result<Bytes, ApiError> {
    let hint = body.size_hint();
    if hint.lower() > max as u64 {
        return Err(ApiError::too_large(max));
    }
    // What the buffer may grow to: the declared length when there is one.
    let cap = hint.exact().map_or(max, |n| n as usize);
    let mut buf: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(read_error)?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers carry nothing we read
        };
        if data.len() > max - buf.len() {
            return Err(ApiError::too_large(max));
        }
        if data.len() > buf.capacity() - buf.len() {
            let want = (buf.len() + data.len())
                .max(buf.capacity() * 2)
                .max(FIRST_CAPACITY)
                .min(cap.max(buf.len() + data.len()));
            buf.reserve_exact(want - buf.len());
        }
        buf.extend_from_slice(&data);
        // `data` is dropped here, releasing hyper's read buffer for its next read.
    }
    Ok(Bytes::from(buf))
}

/// The body stream failed: past the deadline (408), or the connection broke (400).
fn read_error(e: axum::Error) -> ApiError {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(c) = cause {
        if c.is::<crate::net::BodyTimeout>() {
            return ApiError::body_timeout();
        }
        cause = c.source();
    }
    ApiError::new(ErrorCode::BadBody, format!("could not read the body: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::stream;

    fn pieces(parts: Vec<&'static [u8]>) -> Body {
        Body::from_stream(stream::iter(parts.into_iter().map(Ok::<_, std::io::Error>)))
    }

    #[tokio::test]
    async fn pieces_are_joined_up_to_the_limit() {
        let b = read_body(pieces(vec![b"{\"a\"", b":", b"1}"]), 7)
            .await
            .unwrap();
        assert_eq!(&b[..], b"{\"a\":1}");
        let e = read_body(pieces(vec![b"{\"a\"", b":", b"10}"]), 7)
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::MessageTooLarge);
        assert!(read_body(Body::empty(), 0).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_declared_length_over_the_limit_is_refused_unread() {
        let e = read_body(Body::from(vec![b' '; 8]), 7).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::MessageTooLarge);
        assert_eq!(e.message, ApiError::too_large(7).message);
    }

    #[tokio::test]
    async fn a_trickle_grows_the_buffer_geometrically_within_the_limit() {
        let one: Vec<&'static [u8]> = vec![b" "; 5000];
        let b = read_body(pieces(one), 5000).await.unwrap();
        assert_eq!(b.len(), 5000);
        let e = read_body(pieces(vec![b" "; 5001]), 5000).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::MessageTooLarge);
    }
}
