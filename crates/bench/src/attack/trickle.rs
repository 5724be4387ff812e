//! The trickled-body kinds (issue 15, finding 1): a request body sent one byte per TCP
//! segment. Each byte reaches the server as its own read; a server that keeps what each
//! read hands it as a separate buffer grows by a read buffer per byte (~4 KB), so the
//! figure to watch is RSS per attacking socket, next to the healthy subscribers' p99.
//!
//! An attacker sends the head, then a byte (plain) or a 1-byte chunk (chunked) every
//! `GAP`, listening all the while; when the server answers (408 at `body_read_timeout`,
//! 413, or a close), it starts again on a new connection, until the run ends.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{connect, last_words, Answer, AttackKind, AttackerResult, Ctx, Ending, Listener};

/// The declared body: the 44 KB of the finding, under the default 64 KiB limit, so the
/// server must read it rather than refuse it by its length.
pub const BODY: usize = 44_000;
/// Between two segments: one byte per millisecond (the timer's grain), so the server reads
/// each byte on its own even with many attackers.
const GAP: Duration = Duration::from_millis(1);

fn route(kind: AttackKind) -> (&'static str, bool) {
    match kind {
        AttackKind::TricklePublish => ("/api/publish/x", false),
        AttackKind::TricklePublishChunked => ("/api/publish/x", true),
        AttackKind::TrickleScores => ("/api/boards/trickle/scores", false),
        AttackKind::TrickleScoresChunked => ("/api/boards/trickle/scores", true),
        other => unreachable!("{other:?} is not a trickle kind"),
    }
}

pub(super) async fn attack(ctx: &Ctx, i: usize, first: TcpStream) -> AttackerResult {
    let (path, chunked) = route(ctx.kind);
    let auth = ctx
        .key
        .as_ref()
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    let framing = if chunked {
        "Transfer-Encoding: chunked".to_string()
    } else {
        format!("Content-Length: {BODY}")
    };
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n{framing}\r\n{auth}\r\n",
        ctx.host
    );
    let segment: &[u8] = if chunked { b"1\r\n \r\n" } else { b" " };
    let mut r = AttackerResult::default();
    let mut stream = Some(first);
    loop {
        let s = match stream.take() {
            Some(s) => s,
            None => match connect(ctx, i, None).await {
                Ok(s) => s,
                Err(e) => {
                    r.errors += 1;
                    r.first_error.get_or_insert(format!("reconnect: {e}"));
                    return r;
                }
            },
        };
        r.connections += 1;
        match round(ctx, s, head.as_bytes(), segment, chunked).await {
            None => {
                r.ending = Ending::Open;
                return r;
            }
            Some(ending) => {
                if let Ending::Status(code) = ending {
                    *r.statuses.entry(code).or_default() += 1;
                }
                r.ending = ending;
                r.ended_after = Some(ctx.since_start());
                if ctx.stop.is_cancelled() {
                    return r;
                }
            }
        }
    }
}

/// One request: its head, then the body a segment at a time until the server answers (its
/// ending) or the run stops (None).
async fn round(
    ctx: &Ctx,
    mut stream: TcpStream,
    head: &[u8],
    segment: &[u8],
    chunked: bool,
) -> Option<Ending> {
    let mut l = Listener::new(Answer::Http, Vec::new());
    if stream.write_all(head).await.is_err() {
        return Some(last_words(&mut stream, &mut l, true).await);
    }
    ctx.bytes_sent
        .fetch_add(head.len() as u64, Ordering::Relaxed);
    let mut tick = tokio::time::interval(GAP);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut buf = BytesMut::with_capacity(4096);
    let mut sent = 0usize;
    loop {
        tokio::select! {
            biased;
            _ = ctx.stop.cancelled() => {
                let e = last_words(&mut stream, &mut l, false).await;
                return e.by_server().then_some(e);
            }
            n = stream.read_buf(&mut buf) => {
                match n {
                    Ok(0) => return Some(Ending::Eof),
                    Err(_) => return Some(Ending::Reset),
                    Ok(n) => {
                        l.feed(&buf[..n]);
                        buf.clear();
                        if let Some(v) = l.verdict() {
                            return Some(v);
                        }
                    }
                }
            }
            _ = tick.tick(), if sent < BODY => {
                let last = sent + 1 == BODY;
                let w = if chunked && last {
                    stream.write_all(b"1\r\n \r\n0\r\n\r\n").await
                } else {
                    stream.write_all(segment).await
                };
                if w.is_err() {
                    return Some(last_words(&mut stream, &mut l, true).await);
                }
                sent += 1;
                ctx.bytes_sent
                    .fetch_add(segment.len() as u64, Ordering::Relaxed);
            }
        }
    }
}
