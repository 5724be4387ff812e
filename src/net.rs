//! Deadlines hyper does not enforce by itself.
//!
//! `DeadlineStream`: a TCP stream whose writes fail after `write_timeout` without progress.
//! hyper has no write deadline of its own, so without this an SSE client that stops
//! reading would pin its connection (and fd) forever once its kernel buffer filled.
//!
//! `TimedBody`: a request body with a total read deadline (hyper's `header_read_timeout`
//! covers only the head).

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{sleep, Sleep};

pub struct DeadlineStream {
    inner: TcpStream,
    write_timeout: Duration,
    /// Armed while a write is pending; boxed so an idle stream carries only a pointer.
    deadline: Option<Pin<Box<Sleep>>>,
}

impl DeadlineStream {
    pub fn new(inner: TcpStream, write_timeout: Duration) -> Self {
        DeadlineStream {
            inner,
            write_timeout,
            deadline: None,
        }
    }

    pub fn into_inner(self) -> TcpStream {
        self.inner
    }

    fn poll_guarded<T>(
        &mut self,
        cx: &mut Context<'_>,
        op: impl FnOnce(Pin<&mut TcpStream>, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match op(Pin::new(&mut self.inner), cx) {
            Poll::Ready(r) => {
                self.deadline = None;
                Poll::Ready(r)
            }
            Poll::Pending => {
                let timeout = self.write_timeout;
                let d = self
                    .deadline
                    .get_or_insert_with(|| Box::pin(sleep(timeout)));
                ready!(d.as_mut().poll(cx));
                self.deadline = None;
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "write made no progress within write_timeout",
                )))
            }
        }
    }
}

use std::future::Future;

impl AsyncRead for DeadlineStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for DeadlineStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_guarded(cx, |s, cx| s.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.poll_guarded(cx, |s, cx| s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_guarded(cx, |s, cx| s.poll_flush(cx))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A request body that fails once `body_read_timeout` has passed since its request's head
/// arrived: a client trickling a byte at a time (slowloris on the body) would otherwise hold
/// its connection, its buffers and a handler for as long as it liked. A total deadline
/// rather than one per read, or one byte every few seconds would never trip it.
pub struct TimedBody<B> {
    inner: B,
    deadline: tokio::time::Instant,
    /// Made only once a read has to wait: most bodies arrive whole with their head.
    timer: Option<Pin<Box<Sleep>>>,
}

/// The error a `TimedBody` ends with; `read_body` answers it with 408.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within body_read_timeout")]
pub struct BodyTimeout;

impl<B> TimedBody<B> {
    pub fn new(inner: B, timeout: Duration) -> Self {
        TimedBody {
            inner,
            deadline: tokio::time::Instant::now() + timeout,
            timer: None,
        }
    }
}

impl<B> hyper::body::Body for TimedBody<B>
where
    B: hyper::body::Body + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = B::Data;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(frame.map(|f| f.map_err(Into::into))),
            Poll::Pending => {
                let deadline = this.deadline;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                ready!(timer.as_mut().poll(cx));
                Poll::Ready(Some(Err(Box::new(BodyTimeout))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}
