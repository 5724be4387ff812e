//! The socket under a WebSocket connection: plain TCP, or TLS (rustls) over TCP. The
//! connection loop (`connection`) works on readiness and non-blocking `try_*` calls so
//! that an idle connection holds no buffer; this gives TLS the same shape. rustls keeps
//! its own bounded buffers (64 KiB of records to send at most): what `try_write_vectored`
//! accepts is encrypted at once and goes out as the socket takes it, and
//! `pending_write` tells the loop to wait for the socket while records remain.

use std::io::{self, IoSlice, Read, Write};
use std::task::{Context, Poll};

use bytes::BufMut;
use tokio::net::TcpStream;

pub enum WsStream {
    Plain(TcpStream),
    /// Boxed: rustls's state is a few KiB, and plain connections should not pay for it.
    Tls(Box<TlsWs>),
}

pub struct TlsWs {
    tcp: TcpStream,
    tls: rustls::ServerConnection,
    /// rustls holds decrypted bytes not yet read: readable without waiting on the socket.
    plaintext_ready: bool,
}

impl WsStream {
    pub fn tls(tcp: TcpStream, tls: rustls::ServerConnection) -> WsStream {
        // hyper may have left decrypted bytes in rustls (a pipelined first frame).
        let plaintext_ready = true;
        WsStream::Tls(Box::new(TlsWs {
            tcp,
            tls,
            plaintext_ready,
        }))
    }

    /// `readable` as a poll: the waker is kept in the socket's registration, so the
    /// connection's future holds no waiter for it.
    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            WsStream::Plain(s) => s.poll_read_ready(cx),
            WsStream::Tls(t) if t.plaintext_ready => Poll::Ready(Ok(())),
            WsStream::Tls(t) => t.tcp.poll_read_ready(cx),
        }
    }

    /// `writable` as a poll (see `poll_read_ready`).
    pub fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            WsStream::Plain(s) => s.poll_write_ready(cx),
            WsStream::Tls(t) => t.tcp.poll_write_ready(cx),
        }
    }

    pub async fn readable(&self) -> io::Result<()> {
        match self {
            WsStream::Plain(s) => s.readable().await,
            WsStream::Tls(t) if t.plaintext_ready => Ok(()),
            WsStream::Tls(t) => t.tcp.readable().await,
        }
    }

    pub async fn writable(&self) -> io::Result<()> {
        match self {
            WsStream::Plain(s) => s.writable().await,
            WsStream::Tls(t) => t.tcp.writable().await,
        }
    }

    /// TLS records are waiting for room in the socket (nothing to do for plain TCP).
    pub fn pending_write(&self) -> bool {
        match self {
            WsStream::Plain(_) => false,
            WsStream::Tls(t) => t.tls.wants_write(),
        }
    }

    /// Sends what records the socket takes now; Err(WouldBlock) when some remain.
    pub fn flush_pending(&mut self) -> io::Result<()> {
        match self {
            WsStream::Plain(_) => Ok(()),
            WsStream::Tls(t) => t.flush_records(),
        }
    }

    pub fn try_write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            // One frame (a steady fan-out's usual write): `write`, which the kernel serves
            // without importing an iovec array (`vfs_writev` was ~5% of the server's CPU
            // in a 10,000-subscriber fan-out profile).
            WsStream::Plain(s) if bufs.len() == 1 => s.try_write(&bufs[0]),
            WsStream::Plain(s) => s.try_write_vectored(bufs),
            WsStream::Tls(t) => t.try_write_vectored(bufs),
        }
    }

    pub fn try_read_buf<B: BufMut>(&mut self, buf: &mut B) -> io::Result<usize> {
        match self {
            WsStream::Plain(s) => s.try_read_buf(buf),
            WsStream::Tls(t) => t.try_read_buf(buf),
        }
    }
}

/// `std::io` over the non-blocking `try_*` calls, for rustls's `read_tls`/`write_tls`.
struct Try<'a>(&'a TcpStream);

impl Read for Try<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

impl Write for Try<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.0.try_write_vectored(bufs)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Largest plaintext read at once: one TLS record.
const RECORD: usize = 16 * 1024;

impl TlsWs {
    fn flush_records(&mut self) -> io::Result<()> {
        while self.tls.wants_write() {
            if self.tls.write_tls(&mut Try(&self.tcp))? == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
        }
        Ok(())
    }

    fn try_write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        // Older records first; new plaintext only once they are out, so rustls's buffer
        // never grows past one batch.
        self.flush_records()?;
        let n = self.tls.writer().write_vectored(bufs)?;
        if n == 0 && bufs.iter().any(|b| !b.is_empty()) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        match self.flush_records() {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => Err(e),
            _ => Ok(n),
        }
    }

    fn try_read_buf<B: BufMut>(&mut self, buf: &mut B) -> io::Result<usize> {
        let mut chunk = [0u8; RECORD];
        loop {
            let room = buf.remaining_mut().min(RECORD);
            if room == 0 {
                return Ok(0);
            }
            match self.tls.reader().read(&mut chunk[..room]) {
                Ok(n) => {
                    // Ok(0): the peer sent close_notify, a clean end.
                    buf.put_slice(&chunk[..n]);
                    self.plaintext_ready = n > 0;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            self.plaintext_ready = false;
            if self.tls.read_tls(&mut Try(&self.tcp))? == 0 {
                return Ok(0);
            }
            if let Err(e) = self.tls.process_new_packets() {
                // The alert rustls queued tells the peer why.
                let _ = self.flush_records();
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
            // Key updates and alerts the peer's records asked for.
            let _ = self.flush_records();
        }
    }
}
