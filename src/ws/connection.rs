//! One WebSocket client after the upgrade: a single task that reads commands, drains the
//! client's queue into as few `writev` calls as possible, pings, and enforces the pong and
//! write deadlines. It waits on socket readiness rather than on a read into a buffer, so an
//! idle connection holds no read or write buffer at all (see docs/BENCHMARKS.md for the
//! per-connection memory this buys).

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf, Bytes};
use tokio::net::TcpStream;

use super::frame::{self, Decoder, FrameError, Message, Role};
use crate::client::{Item, Taken};
use crate::close::DisconnectReason;
use crate::metrics::Transport;
use crate::protocol::{self, Parsed};
use crate::state::{AppState, Registration};

/// Most bytes and frames taken from the queue for one batch of writes.
const BATCH_BYTES: usize = 256 * 1024;
const BATCH_ITEMS: usize = 1024;
/// iovecs per `writev` call (Linux allows 1024).
const IOV: usize = 128;
/// How long to wait for the peer's close frame after sending ours.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

pub async fn run(stream: TcpStream, leftover: Bytes, reg: Registration, state: Arc<AppState>) {
    let mut conn = Connection {
        stream,
        decoder: Decoder::new(Role::Server, state.cfg.max_message_bytes),
        out: VecDeque::new(),
        batch: BatchStats::default(),
        front_partial: false,
        closing: None,
        peer_closed: false,
        reg,
        state,
    };
    if !leftover.is_empty() {
        conn.decoder
            .buffer_mut(leftover.len())
            .extend_from_slice(&leftover);
    }
    // `leftover` shares hyper's whole read buffer (8 KiB+): holding it for the
    // connection's life would double an idle connection's memory.
    drop(leftover);
    let reason = conn.drive().await;
    conn.state.metrics.record_disconnect(Transport::Ws, reason);
    tracing::debug!(
        client = conn.reg.client.id,
        reason = reason.label(),
        "websocket closed"
    );
}

#[derive(Default)]
struct BatchStats {
    messages: u64,
    bytes: u64,
    oldest: Option<Instant>,
}

struct Connection {
    stream: TcpStream,
    decoder: Decoder,
    /// Whole frames being written; the first may be partly written already.
    out: VecDeque<Bytes>,
    batch: BatchStats,
    /// The front frame of `out` is partly written: it must finish before anything else.
    front_partial: bool,
    /// Set once our close frame is queued in `out`.
    closing: Option<DisconnectReason>,
    peer_closed: bool,
    reg: Registration,
    state: Arc<AppState>,
}

impl Connection {
    async fn drive(&mut self) -> DisconnectReason {
        let cfg = &self.state.cfg;
        let (ping_interval, pong_timeout, write_timeout) =
            (cfg.ping_interval, cfg.pong_timeout, cfg.write_timeout);
        let shutdown = self.state.shutdown.clone();
        let client = self.reg.client.clone();
        let mut next_ping = Instant::now() + ping_interval;
        let mut pong_deadline: Option<Instant> = None;
        let mut last_progress = Instant::now();
        let mut close_deadline: Option<Instant> = None;
        let timer = tokio::time::sleep_until(next_ping.into());
        tokio::pin!(timer);
        // Re-arming a timer touches the runtime's timer wheel: only do it when the
        // deadline actually moves, not on every wake-up.
        let mut armed = next_ping;
        let mut shutdown_seen = false;

        // Bytes that arrived with the upgrade request.
        if self.decoder.buffered() > 0 {
            self.process_input();
        }
        loop {
            // Write what can go now; when a batch drains, look at the queue again before
            // sleeping (in a burst the next publications are already there). Bounded so a
            // busy connection still gets to its reads and timers.
            for _ in 0..8 {
                if self.out.is_empty() && self.closing.is_none() {
                    self.refill();
                }
                if self.out.is_empty() {
                    break;
                }
                match self.flush() {
                    Ok(true) => last_progress = Instant::now(),
                    Ok(false) => {}
                    Err(_) => return self.closing.unwrap_or(DisconnectReason::Normal),
                }
                if !self.out.is_empty() || self.closing.is_some() {
                    break;
                }
            }
            if let Some(reason) = self.closing {
                if self.out.is_empty() {
                    if self.peer_closed || reason.peer_is_gone() {
                        return reason;
                    }
                    close_deadline.get_or_insert_with(|| Instant::now() + CLOSE_GRACE);
                }
            }
            // While closing, a stuck write only delays the inevitable: give it CLOSE_GRACE.
            let write_deadline = last_progress
                + if self.closing.is_some() {
                    write_timeout.min(CLOSE_GRACE)
                } else {
                    write_timeout
                };
            let mut deadline = next_ping;
            for d in [
                pong_deadline,
                close_deadline,
                (!self.out.is_empty()).then_some(write_deadline),
            ]
            .into_iter()
            .flatten()
            {
                deadline = deadline.min(d);
            }
            if deadline != armed {
                timer.as_mut().reset(deadline.into());
                armed = deadline;
            }

            tokio::select! {
                biased;
                _ = shutdown.cancelled(), if !shutdown_seen && self.closing.is_none() => {
                    // The queue drains first, then `refill` sees Closed(Shutdown) and closes.
                    shutdown_seen = true;
                    client.close(DisconnectReason::Shutdown);
                }
                r = self.stream.readable() => {
                    if r.is_err() {
                        return self.closing.unwrap_or(DisconnectReason::Normal);
                    }
                    match self.read() {
                        Ok(true) => {
                            pong_deadline = None;
                            self.process_input();
                        }
                        Ok(false) => {}
                        Err(_) => return self.closing.unwrap_or(DisconnectReason::Normal),
                    }
                    if self.peer_closed && self.closing.is_some() && self.out.is_empty() {
                        return self.closing.unwrap_or(DisconnectReason::Normal);
                    }
                }
                r = self.stream.writable(), if !self.out.is_empty() => {
                    if r.is_err() {
                        return self.closing.unwrap_or(DisconnectReason::Normal);
                    }
                }
                _ = client.notified(), if self.closing.is_none() => {
                    // A close (slow consumer) must not wait behind a stuck write.
                    if let Some(reason) = client.closed().filter(|r| *r != DisconnectReason::Shutdown) {
                        self.begin_close(reason);
                    }
                }
                _ = &mut timer => {
                    let now = Instant::now();
                    if close_deadline.is_some_and(|d| now >= d) {
                        return self.closing.unwrap_or(DisconnectReason::Normal);
                    }
                    if !self.out.is_empty() && now >= write_deadline {
                        return self.closing.unwrap_or(DisconnectReason::WriteTimeout);
                    }
                    if pong_deadline.is_some_and(|d| now >= d) {
                        self.begin_close(DisconnectReason::NoPong);
                        let _ = self.flush();
                        return DisconnectReason::NoPong;
                    }
                    if now >= next_ping {
                        if self.closing.is_none() {
                            self.out.push_back(frame::encode(frame::OP_PING, b""));
                            pong_deadline.get_or_insert(now + pong_timeout);
                        }
                        next_ping = now + ping_interval;
                    }
                }
            }
        }
    }

    /// Moves queued frames into `out`; a closed queue turns into our close frame.
    fn refill(&mut self) {
        let (out, batch) = (&mut self.out, &mut self.batch);
        let taken = self.reg.client.take_each(BATCH_BYTES, BATCH_ITEMS, |item| {
            if let Some(at) = item.published_at {
                batch.messages += 1;
                batch.oldest = Some(batch.oldest.map_or(at, |o| o.min(at)));
            }
            out.push_back(item.bytes);
        });
        if let Taken::Closed(reason) = taken {
            self.begin_close(reason);
        }
    }

    fn begin_close(&mut self, reason: DisconnectReason) {
        if self.closing.is_some() {
            return;
        }
        self.closing = Some(reason);
        self.reg.client.close(reason);
        if reason == DisconnectReason::SlowConsumer {
            // It is not reading: drop the in-flight batch too, keeping only a partly
            // written frame so the close frame still lands on a frame boundary.
            self.out.truncate(usize::from(self.front_partial));
        }
        let payload = frame::close_payload(reason.code(), reason.label());
        self.out.push_back(frame::encode(frame::OP_CLOSE, &payload));
    }

    /// Writes as much of `out` as the socket takes now. Ok(true) if anything was written.
    fn flush(&mut self) -> io::Result<bool> {
        let mut progressed = false;
        while !self.out.is_empty() {
            let mut slices = [IoSlice::new(&[]); IOV];
            let n = self.out.len().min(IOV);
            for (slot, b) in slices.iter_mut().zip(self.out.iter()) {
                *slot = IoSlice::new(b);
            }
            match self.stream.try_write_vectored(&slices[..n]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(mut written) => {
                    progressed = true;
                    self.batch.bytes += written as u64;
                    while written > 0 {
                        let front = self.out.front_mut().expect("wrote more than queued");
                        if written >= front.len() {
                            written -= front.len();
                            self.out.pop_front();
                            self.front_partial = false;
                        } else {
                            front.advance(written);
                            written = 0;
                            self.front_partial = true;
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        if self.out.is_empty() {
            let b = std::mem::take(&mut self.batch);
            if b.bytes > 0 {
                self.state
                    .metrics
                    .record_write(Transport::Ws, b.messages, b.bytes, b.oldest);
            }
            if self.out.capacity() > 16 {
                self.out = VecDeque::new();
            }
        }
        Ok(progressed)
    }

    /// Reads what the socket has. Ok(true) if bytes arrived; Err on EOF or error.
    fn read(&mut self) -> io::Result<bool> {
        let mut got = false;
        // Bounded per wake-up so one chatty client cannot monopolise the task.
        for _ in 0..16 {
            let buf = self.decoder.buffer_mut(4096);
            match self.stream.try_read_buf(buf) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(_) => got = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(got)
    }

    fn process_input(&mut self) {
        loop {
            if self.closing.is_some() && self.peer_closed {
                break;
            }
            match self.decoder.next_message() {
                Ok(None) => break,
                Ok(Some(Message::Text(text))) => {
                    if self.closing.is_none() {
                        self.command(&text);
                    }
                }
                Ok(Some(Message::Binary(_))) => {
                    self.reply(protocol::error(
                        "unsupported_data",
                        "commands are JSON text frames",
                        None,
                    ));
                }
                Ok(Some(Message::Ping(p))) => {
                    if self.closing.is_none() {
                        self.out.push_back(frame::encode(frame::OP_PONG, &p));
                    }
                }
                Ok(Some(Message::Pong(_))) => {}
                Ok(Some(Message::Close(..))) => {
                    self.peer_closed = true;
                    self.begin_close(DisconnectReason::Normal);
                }
                Err(e) => {
                    let reason = match e {
                        FrameError::TooLarge(_) => DisconnectReason::MessageTooLarge,
                        FrameError::BadUtf8 => DisconnectReason::BadUtf8,
                        FrameError::Protocol(_) => DisconnectReason::ProtocolError,
                    };
                    self.begin_close(reason);
                    // The stream is unparseable from here on; ignore the rest.
                    self.decoder = Decoder::new(Role::Server, 0);
                    break;
                }
            }
        }
        self.decoder.shrink_if_empty();
    }

    fn command(&mut self, text: &[u8]) {
        let hub = &self.state.hub;
        let client = &self.reg.client;
        match protocol::parse(text) {
            Parsed::Subscribe(topic, id) => {
                let result = hub.subscribe(client, &topic, |pos| {
                    Some(frame::encode(
                        frame::OP_TEXT,
                        &protocol::subscribed(&topic, pos, id),
                    ))
                });
                if let Err(e) = result {
                    let code = match e {
                        crate::hub::HubError::TooManyTopics(_)
                        | crate::hub::HubError::TooManyTopicsPerConnection(_) => "too_many_topics",
                        crate::hub::HubError::ClientClosed => return,
                    };
                    self.reply(protocol::error(code, &e.to_string(), id));
                }
            }
            Parsed::Unsubscribe(topic, id) => {
                hub.unsubscribe(client, &topic);
                self.reply(protocol::unsubscribed(&topic, id));
            }
            Parsed::Ping(id) => self.reply(protocol::pong(id)),
            Parsed::Error(code, message, id) => self.reply(protocol::error(code, &message, id)),
        }
    }

    /// Replies go through the client's queue so they stay in order with publications.
    fn reply(&self, json: Vec<u8>) {
        let item = Item {
            bytes: frame::encode(frame::OP_TEXT, &json),
            published_at: None,
            conflate: None,
        };
        self.reg.client.push(item, &self.state.metrics);
    }
}
