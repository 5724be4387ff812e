//! Deadlines hyper does not enforce by itself.
//!
//! `DeadlineStream`: a TCP stream whose writes fail after `write_timeout` without progress.
//! hyper has no write deadline of its own, so without this an SSE client that stops
//! reading would pin its connection (and fd) forever once its kernel buffer filled.
//!
//! `TimedBody`: a request body with a total read deadline (hyper's `header_read_timeout`
//! covers only the head).
//!
//! `TAKEOVER`: a plain connection's hand-off from hyper to a handler that serves the rest
//! of it on the raw socket (an SSE stream), so a long-lived stream keeps none of hyper's
//! per-connection state and buffers.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{sleep, Sleep};

/// What a handler running in a plain HTTP connection's task leaves for that task: once
/// `claim`ed, hyper's remaining writes on the socket are discarded (the handler writes its
/// own response head) and the connection task hands the raw socket to `run` as soon as
/// hyper yields, instead of serving another request. Only plain connections carry one
/// (`TAKEOVER.try_with` fails under TLS, where the handler stays on hyper).
#[derive(Default)]
pub struct Takeover {
    run: std::sync::Mutex<Option<TakeoverFn>>,
    claimed: std::sync::atomic::AtomicBool,
}

/// What serves a taken-over socket (it spawns its own task).
pub type TakeoverFn = Box<dyn FnOnce(TcpStream) + Send>;

tokio::task_local! {
    /// The plain connection this task serves (set by the server's accept loop).
    pub static TAKEOVER: Takeover;
}

impl Takeover {
    /// From a handler in a plain connection's task: the socket goes to `run` once the
    /// handler's (discarded) response is done. False outside such a task.
    pub fn claim(run: TakeoverFn) -> Result<(), TakeoverFn> {
        let mut run = Some(run);
        let done = TAKEOVER.try_with(|t| {
            *t.run.lock().unwrap_or_else(|e| e.into_inner()) = run.take();
            t.claimed.store(true, std::sync::atomic::Ordering::Relaxed);
        });
        match (done, run) {
            (Ok(()), _) => Ok(()),
            (Err(_), Some(run)) => Err(run),
            (Err(_), None) => unreachable!("run is only taken when the slot exists"),
        }
    }

    /// A plain connection's task: is the socket claimed?
    pub fn claimed(&self) -> bool {
        self.claimed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A plain connection's task: what serves the claimed socket.
    pub fn take(&self) -> Option<TakeoverFn> {
        self.run.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// Whether this task serves a plain connection whose socket a handler may claim.
pub fn can_take_over() -> bool {
    TAKEOVER.try_with(|_| ()).is_ok()
}

/// Inside a claimed connection's task: hyper's writes go nowhere.
fn discarding() -> bool {
    TAKEOVER.try_with(Takeover::claimed).unwrap_or(false)
}

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
        discarded: T,
        op: impl FnOnce(Pin<&mut TcpStream>, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if discarding() {
            return Poll::Ready(Ok(discarded));
        }
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
        self.poll_guarded(cx, buf.len(), |s, cx| s.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let len = bufs.iter().map(|b| b.len()).sum();
        self.poll_guarded(cx, len, |s, cx| s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_guarded(cx, (), |s, cx| s.poll_flush(cx))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if discarding() {
            return Poll::Ready(Ok(()));
        }
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
