//! One WebSocket client after the upgrade: a single task that reads commands, drains the
//! client's queue into as few `writev` calls as possible, pings, and enforces the pong and
//! write deadlines. It waits on socket readiness rather than on a read into a buffer, so an
//! idle connection holds no read or write buffer at all (see docs/BENCHMARKS.md for the
//! per-connection memory this buys).
//!
//! What a hostile client can make this task hold is bounded by one budget,
//! `queue_max_bytes`: queued publications and replies, the batch being written, one pending
//! pong (only the newest unanswered ping is answered once the socket backs up, as RFC 6455
//! 5.5.3 allows) and the decoder's partial frame and message. Reading stops while the
//! outgoing side is full, so a client that sends without reading pushes back on itself
//! instead of on the server's memory. Deadlines are checked on every wake-up, so a socket
//! that is always readable cannot starve them.
//!
//! What a client can make this task compute is bounded too: every frame it sends (each
//! command, ping, pong and fragment, an empty continuation as much as a full one) takes a
//! token of `max_commands_per_second`, also while a close is under way, and a message may
//! arrive in at most `max_fragments_per_message` frames.

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice};
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use bytes::{Buf, BufMut, Bytes};
use serde_json::value::RawValue;

use super::frame::{self, Decoded, Decoder, FrameError, Message, Role};
use super::handshake::Mode;
use crate::auth::Grant;
use crate::broker::BrokerError;
use crate::client::{Client, Item, Taken};
use crate::close::DisconnectReason;
use crate::error_code::ErrorCode;
use crate::protocol::{self, Parsed};
use crate::rate::{Rate, TokenBucket};
use crate::state::{AppState, Registration};
use crate::subscribe;
use crate::writer::Batch;
use crate::ws::stream::WsStream;

mod pusher;
pub use pusher::Session as PusherSession;

/// Most bytes and frames taken from the queue for one batch of writes. A batch must be
/// written whole within `write_timeout`, so this also sets the slowest reader tolerated:
/// 256 KiB per 10 s by default.
const BATCH_BYTES: usize = 256 * 1024;
const BATCH_ITEMS: usize = 1024;
/// iovecs per `writev` call (Linux allows 1024).
const IOV: usize = 128;
/// One read; at most `READS_PER_WAKE` of them per wake-up so one chatty client cannot
/// monopolise the task (or the budget) before its timers and writes get a turn.
const READ_CHUNK: usize = 4096;
const READS_PER_WAKE: usize = 16;
/// Pongs written as they come (each one answering its own ping) per batch of writes; past
/// this, only the newest ping gets a pong once the batch has gone out.
const PONGS_PER_BATCH: usize = 16;
/// How long to wait for the peer's close frame after sending ours.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// `max_commands_per_second`, with bursts of twice as many: the rate of a client's frames.
fn command_rate(state: &AppState) -> Rate {
    let per_second = f64::from(state.cfg.max_commands_per_second);
    Rate {
        per_second,
        burst: 2.0 * per_second,
    }
}
/// The connection's task. Not an `async fn`: the future is the `Task` below, written out
/// by hand so that an idle connection's task holds exactly its fields (an `async` state
/// machine kept the arguments, the loop's locals and a shutdown waiter beside them; see
/// docs/BENCHMARKS.md, "Issue 20").
pub fn run(
    stream: WsStream,
    leftover: Bytes,
    reg: Registration,
    state: Arc<AppState>,
    mode: Mode,
    grant: Option<Grant>,
    pusher: Option<Box<PusherSession>>,
) -> impl Future<Output = ()> + Send {
    let now = Instant::now();
    let next_ping = now + state.cfg.ping_interval;
    // `reg` holds the same state: one pointer to it is enough.
    debug_assert!(Arc::ptr_eq(reg.state(), &state));
    let mut conn = Connection {
        stream,
        decoder: None,
        busy: None,
        closing: None,
        peer_closed: false,
        broken: false,
        mode,
        commands: TokenBucket::full(command_rate(&state), now),
        reg,
        next_ping: Tick::new(next_ping),
        pong_deadline: None,
        chain: None,
        authed: grant.map(Authed::new),
        pusher,
    };
    drop(state);
    if !leftover.is_empty() {
        conn.decoder()
            .buffer_mut(leftover.len())
            .extend_from_slice(&leftover);
    }
    // `leftover` shares hyper's whole read buffer (8 KiB+): holding it for the
    // connection's life would double an idle connection's memory.
    drop(leftover);
    // Bytes that arrived with the upgrade request.
    if conn.decoder.as_ref().is_some_and(|d| d.buffered() > 0) {
        conn.process_input();
    }
    Task {
        conn,
        timer: tokio::time::sleep_until(next_ping.into()),
    }
}

/// The connection's future: the connection and its one timer (the earliest of its
/// deadlines: next ping, pong, write, close grace, token expiry).
struct Task {
    conn: Connection,
    timer: tokio::time::Sleep,
}

impl Future for Task {
    type Output = ();

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<()> {
        // SAFETY: `timer` is never moved out of the pinned `Task` (it is only reached
        // through this pinned reference), and `conn` is not structurally pinned.
        let this = unsafe { self.get_unchecked_mut() };
        let timer = unsafe { std::pin::Pin::new_unchecked(&mut this.timer) };
        let conn = &mut this.conn;
        let Poll::Ready(reason) = conn.poll_drive(timer, cx) else {
            return Poll::Pending;
        };
        conn.reg.client.set_held(0);
        let transport = conn.reg.client.transport;
        conn.reg
            .state()
            .metrics
            .record_disconnect(transport, reason);
        tracing::debug!(
            client = conn.reg.client.id,
            reason = reason.label(),
            "websocket closed"
        );
        Poll::Ready(())
    }
}

/// What an idle connection keeps: every field here is paid 10,000 times over at 10,000
/// idle connections, so what only matters while writing (or closing) is in `Busy`,
/// allocated then and freed once the task goes back to waiting with nothing in flight.
struct Connection {
    stream: WsStream,
    /// Made when bytes arrive, dropped when they are all parsed and no message is in
    /// progress: an idle connection's future carries a pointer, not a decoder.
    decoder: Option<Box<Decoder>>,
    /// The writing side while it has something in flight (see `Busy`).
    busy: Option<Box<Busy>>,
    /// Set once our close frame is queued in `out`.
    closing: Option<DisconnectReason>,
    /// The peer's close frame was read, or it is no longer waited for (a framing error, or
    /// frames over the budget while closing): nothing more is read.
    peer_closed: bool,
    /// A framing error was seen: only the peer's close frame is still of interest.
    broken: bool,
    mode: Mode,
    /// Every frame the client sends takes a token (`command_rate`).
    commands: TokenBucket,
    reg: Registration,
    /// When the next ping goes out.
    next_ping: Tick,
    /// The oldest unanswered ping must be answered by then (any input counts).
    pong_deadline: Option<Tick>,
    /// The latest topic command that had to wait (a subscribe under Redis waits for it): each
    /// next one awaits it first, so a connection's commands on topics take effect, and are
    /// answered, in the order they were sent.
    chain: Option<tokio::task::JoinHandle<()>>,
    /// The verified token (handshake, `auth` or `refresh`). Boxed: most connections have
    /// none, and an idle connection's size is what 10k of them cost (docs/BENCHMARKS.md).
    authed: Option<Box<Authed>>,
    /// A Pusher protocol connection's app and state (`Mode::Pusher`); boxed for the same
    /// reason as `authed`.
    pusher: Option<Box<PusherSession>>,
}

/// The writing side of a connection while frames are in flight or a close is under way.
#[derive(Default)]
struct Busy {
    /// Whole frames being written; the first may be partly written already.
    out: VecDeque<Bytes>,
    /// Bytes in `out` not yet written.
    out_bytes: usize,
    /// When `out` last went from empty to non-empty: all of it must be written within
    /// `write_timeout` of this. A trickle of progress does not extend the deadline.
    batch_started: Option<Instant>,
    /// The pong for the newest ping that arrived while `out` was busy.
    pending_pong: Option<Bytes>,
    /// Pongs in `out` since it last drained.
    pongs_in_out: usize,
    /// Accounting of the batch in `out`, reported once it has been written whole.
    batch: Batch,
    /// The front frame of `out` is partly written: it must finish before anything else.
    front_partial: bool,
    /// Once our close is written: the peer's close is awaited until then.
    close_deadline: Option<Instant>,
}

impl Busy {
    /// The socket took the first `written` bytes of `out`.
    fn wrote(&mut self, mut written: usize) {
        self.batch.wrote(written);
        self.out_bytes -= written;
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
}

/// An instant in 8 bytes where an `Instant` takes 16 (and `Option<Tick>` still 8): time
/// since a process-wide origin, in nanoseconds plus one. Every idle connection keeps two.
#[derive(Clone, Copy)]
struct Tick(std::num::NonZeroU64);

impl Tick {
    fn origin() -> Instant {
        static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        *ORIGIN.get_or_init(Instant::now)
    }

    fn new(at: Instant) -> Tick {
        let nanos = at.saturating_duration_since(Tick::origin()).as_nanos();
        let nanos = u64::try_from(nanos).unwrap_or(u64::MAX - 1);
        Tick(std::num::NonZeroU64::MIN.saturating_add(nanos))
    }

    fn instant(self) -> Instant {
        Tick::origin() + std::time::Duration::from_nanos(self.0.get() - 1)
    }
}

/// Frames `write_direct` takes for one write from the stack. A publication is one frame,
/// and in steady fan-out a wake-up finds one or two; a deeper queue goes out in a
/// `refill` batch.
const DIRECT: usize = 16;

/// What `write_direct` did.
enum Direct {
    /// All written, and the queue is empty (or nothing was queued).
    Drained,
    /// The socket took part: the rest is in `out`, waiting for the socket to be writable.
    Blocked,
    /// Frames wait in `out` to be written now: a deep queue's batch, or our close.
    Pending,
}

/// What woke the connection's task.
enum Wake {
    Timer,
    Queue,
    Writable(io::Result<()>),
    Readable(io::Result<()>),
}

/// A grant and its expiry on the monotonic clock, computed once: the deadline is looked
/// at on every wake-up, and reading the wall clock each time would cost a syscall.
struct Authed {
    grant: Grant,
    deadline: Instant,
}

impl Authed {
    fn new(grant: Grant) -> Box<Authed> {
        Box::new(Authed {
            deadline: grant.deadline(),
            grant,
        })
    }
}

impl Connection {
    fn state(&self) -> &Arc<AppState> {
        self.reg.state()
    }

    /// The writing side, made on first use.
    fn busy(&mut self) -> &mut Busy {
        self.busy.get_or_insert_with(Box::default)
    }

    fn out_is_empty(&self) -> bool {
        self.busy.as_ref().is_none_or(|b| b.out.is_empty())
    }

    /// Drives the connection until it ends. Shutdown needs no waiter of its own here: it
    /// closes every client (`state::Clients`), which wakes this task through its queue.
    fn poll_drive(
        &mut self,
        mut timer: std::pin::Pin<&mut tokio::time::Sleep>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<DisconnectReason> {
        // The client is reached through `self.reg` at each use, not through a clone of
        // its `Arc`: the fan-out thread has just written the client's cache lines, and a
        // clone and drop per wake-up were two more atomic writes to one of them.
        let budget = self.reg.client.budget();
        loop {
            // Write what can go now; when a batch drains, look at the queue again before
            // sleeping (in a burst the next publications are already there). Bounded so a
            // busy connection still gets to its reads and timers.
            let now = Instant::now();
            // A round that wrote all it took leaves `unfinished` set: the queue may hold
            // more than the rounds took, and only a push to an empty queue wakes this task.
            let mut unfinished = false;
            for _ in 0..8 {
                unfinished = false;
                if self.out_is_empty() && self.closing.is_none() {
                    if self.busy.as_ref().is_none_or(|b| b.pending_pong.is_none()) {
                        match self.write_direct(now) {
                            Ok(Direct::Drained | Direct::Blocked) => break,
                            Ok(Direct::Pending) => {}
                            Err(_) => {
                                return Poll::Ready(
                                    self.closing.unwrap_or(DisconnectReason::Normal),
                                )
                            }
                        }
                    } else {
                        self.refill(now);
                    }
                }
                if self.out_is_empty() {
                    break;
                }
                if self.flush().is_err() {
                    return Poll::Ready(self.closing.unwrap_or(DisconnectReason::Normal));
                }
                if !self.out_is_empty() || self.closing.is_some() {
                    break;
                }
                unfinished = true;
            }
            if unfinished {
                // Every round wrote all it took: more may be queued, and no push will wake
                // this task for it, so it wakes itself, after letting the worker's other
                // tasks run.
                cx.waker().wake_by_ref();
            }
            if let Some(reason) = self.closing {
                if self.out_is_empty() {
                    if self.peer_closed || reason.peer_is_gone() || reason.stops_reading() {
                        return Poll::Ready(reason);
                    }
                    self.busy()
                        .close_deadline
                        .get_or_insert_with(|| Instant::now() + CLOSE_GRACE);
                }
            }
            let held = self.held();
            self.reg.client.set_held(held);

            // Deadlines are checked here, on every wake-up, not only when the timer wins
            // the select below: a socket that is always readable must not starve them.
            // (`now` is from the top of this round: the writes above take microseconds.)
            let cfg = &self.reg.state().cfg;
            let busy = self.busy.as_deref();
            let close_deadline = busy.and_then(|b| b.close_deadline);
            // While closing, a stuck write only delays the inevitable: give it CLOSE_GRACE.
            let write_deadline = busy.and_then(|b| b.batch_started).map(|t| {
                t + if self.closing.is_some() {
                    cfg.write_timeout.min(CLOSE_GRACE)
                } else {
                    cfg.write_timeout
                }
            });
            if close_deadline.is_some_and(|d| now >= d) {
                return Poll::Ready(self.closing.unwrap_or(DisconnectReason::Normal));
            }
            if write_deadline.is_some_and(|d| now >= d) {
                return Poll::Ready(self.closing.unwrap_or(DisconnectReason::WriteTimeout));
            }
            let pong_deadline = self.pong_deadline.map(Tick::instant);
            if pong_deadline.is_some_and(|d| now >= d) {
                self.begin_close(DisconnectReason::NoPong);
                let _ = self.flush();
                return Poll::Ready(DisconnectReason::NoPong);
            }
            let token_deadline = self.authed.as_ref().map(|a| a.deadline);
            if self.closing.is_none() && token_deadline.is_some_and(|d| now >= d) {
                // No `refresh` came in time: the client's access ends with its token.
                self.begin_close(DisconnectReason::TokenExpired);
                continue;
            }
            let next_ping = self.next_ping.instant();
            if now >= next_ping {
                let (ping_interval, pong_timeout) = (cfg.ping_interval, cfg.pong_timeout);
                if self.closing.is_none() {
                    self.push_out(frame::encode(frame::OP_PING, b""), now);
                    self.pong_deadline
                        .get_or_insert(Tick::new(now + pong_timeout));
                }
                self.next_ping = Tick::new(now + ping_interval);
                continue;
            }

            let mut deadline = next_ping;
            // A refresh moves the token's deadline; it joins the others only until our
            // close is queued.
            let token_deadline = token_deadline.filter(|_| self.closing.is_none());
            for d in [
                pong_deadline,
                close_deadline,
                write_deadline,
                token_deadline,
            ]
            .into_iter()
            .flatten()
            {
                deadline = deadline.min(d);
            }
            // Re-arming a timer touches the runtime's timer wheel: only do it when the
            // deadline actually moves, not on every wake-up.
            if timer.deadline() != deadline.into() {
                timer.as_mut().reset(deadline.into());
            }
            // Back-pressure: while what waits to go out (plus one more read) would not fit
            // the budget, stop reading; the client's own commands then pile up in its
            // socket, not here. Only while something is waiting, or nothing would ever
            // free the budget.
            let queued = self.reg.client.queued_bytes();
            let outgoing = held - self.decoder_held() + queued;
            let read_paused =
                self.closing.is_none() && outgoing > 0 && held + queued + READ_CHUNK > budget;
            let want_read = !(read_paused
                || self
                    .closing
                    .is_some_and(|r| self.peer_closed || r.stops_reading()));

            // One poll over everything the task waits on. Readiness and the queue keep
            // their wakers in the socket's registration and the client: only the timer
            // takes room in this future.
            let want_write = !self.out_is_empty() || self.stream.pending_write();
            let open = self.closing.is_none();
            let woke = if timer.as_mut().poll(cx).is_ready() {
                Wake::Timer
            } else if open && self.reg.client.poll_notified(cx).is_ready() {
                Wake::Queue
            } else if let Some(r) = want_write
                .then(|| self.stream.poll_write_ready(cx))
                .and_then(|p| match p {
                    Poll::Ready(r) => Some(r),
                    Poll::Pending => None,
                })
            {
                Wake::Writable(r)
            } else if let Some(r) =
                want_read
                    .then(|| self.stream.poll_read_ready(cx))
                    .and_then(|p| match p {
                        Poll::Ready(r) => Some(r),
                        Poll::Pending => None,
                    })
            {
                Wake::Readable(r)
            } else {
                // Going back to waiting: nothing in flight keeps no writing side.
                if self.busy.as_ref().is_some_and(|b| {
                    b.out.is_empty() && b.pending_pong.is_none() && self.closing.is_none()
                }) {
                    self.busy = None;
                }
                return Poll::Pending;
            };
            match woke {
                Wake::Timer => {}
                Wake::Queue => {
                    // A close (slow consumer) must not wait behind a stuck write. Shutdown
                    // waits: the queue drains first, then `refill` sees Closed(Shutdown).
                    if let Some(reason) = self
                        .reg
                        .client
                        .closed()
                        .filter(|r| *r != DisconnectReason::Shutdown)
                    {
                        self.begin_close(reason);
                    }
                }
                Wake::Writable(r) => {
                    if r.is_err() {
                        return Poll::Ready(self.closing.unwrap_or(DisconnectReason::Normal));
                    }
                    // TLS records of frames already taken from `out` (none for plain TCP).
                    match self.stream.flush_pending() {
                        Err(e) if e.kind() != io::ErrorKind::WouldBlock => {
                            return Poll::Ready(self.closing.unwrap_or(DisconnectReason::Normal));
                        }
                        _ => {}
                    }
                }
                Wake::Readable(r) => {
                    if r.is_err() {
                        return Poll::Ready(self.closing.unwrap_or(DisconnectReason::Normal));
                    }
                    let got = match self.read() {
                        Ok(got) => got,
                        Err(_) => {
                            return Poll::Ready(self.closing.unwrap_or(DisconnectReason::Normal))
                        }
                    };
                    if got > 0 {
                        self.pong_deadline = None;
                        self.process_input();
                        // Before any answer to this input goes out, so a peer that sees
                        // the answer knows its bytes are counted.
                        self.reg.client.set_held(self.held());
                    }
                    if self.peer_closed && self.closing.is_some() && self.out_is_empty() {
                        return Poll::Ready(self.closing.unwrap_or(DisconnectReason::Normal));
                    }
                    if got == READ_CHUNK * READS_PER_WAKE {
                        // The socket has more: let other tasks on this worker run before
                        // the next round, or a flood would hold the thread.
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                }
            }
        }
    }

    /// What this task holds for the client outside its queue.
    fn held(&self) -> usize {
        self.busy.as_ref().map_or(0, |b| {
            b.out_bytes + b.pending_pong.as_ref().map_or(0, Bytes::len)
        }) + self.decoder_held()
    }

    /// The decoder, made on first use: control-frame sized once the input was found
    /// broken (only the peer's close is still read).
    fn decoder(&mut self) -> &mut Decoder {
        if self.decoder.is_none() {
            let d = if self.broken {
                Decoder::new(Role::Server, 125).with_max_fragments(1)
            } else {
                let cfg = &self.state().cfg;
                Decoder::new(Role::Server, cfg.max_message_bytes)
                    .with_max_fragments(cfg.max_fragments_per_message)
            };
            self.decoder = Some(Box::new(d));
        }
        self.decoder.as_mut().expect("made above")
    }

    /// What the decoder holds for the peer (none without a decoder).
    fn decoder_held(&self) -> usize {
        self.decoder.as_ref().map_or(0, |d| d.held())
    }

    /// Appends a whole frame to `out`, starting the write clock if `out` was idle.
    fn push_out(&mut self, frame: Bytes, now: Instant) {
        let busy = self.busy();
        if busy.out.is_empty() {
            busy.batch_started = Some(now);
        }
        busy.out_bytes += frame.len();
        busy.out.push_back(frame);
    }

    /// With nothing in flight: takes up to `DIRECT` queued frames and writes them at once,
    /// from the stack. In steady fan-out each wake-up finds one publication and the socket
    /// takes it whole, so no writing side (`Busy`, its `out` buffer) is made and freed
    /// per delivery; only what the socket leaves is moved into one, under the write
    /// deadline from `now`. A deeper queue (a burst, a replay) goes into `out` with the
    /// rest of a `refill` batch instead, for one `writev` of many frames. A closed queue
    /// turns into our close frame (in `out`).
    fn write_direct(&mut self, now: Instant) -> io::Result<Direct> {
        let mut frames: [Bytes; DIRECT] = Default::default();
        let mut n = 0;
        let mut batch = Batch::default();
        let taken = self.reg.client.take_each(BATCH_BYTES, DIRECT, |item| {
            frames[n] = batch.add(item);
            n += 1;
        });
        let more = match taken {
            Taken::Some { more } => more,
            Taken::Empty => return Ok(Direct::Drained),
            Taken::Closed(reason) => {
                self.begin_close(reason);
                return Ok(Direct::Pending);
            }
        };
        let frames = &mut frames[..n];
        let mut written = 0;
        if !more {
            let total: usize = frames.iter().map(Bytes::len).sum();
            let mut slices = [IoSlice::new(&[]); DIRECT];
            for (slot, f) in slices.iter_mut().zip(frames.iter()) {
                *slot = IoSlice::new(f);
            }
            written = match self.stream.try_write_vectored(&slices[..n]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(w) => w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => return Err(e),
            };
            if written == total {
                batch.wrote(written);
                batch.report(&self.reg.state().metrics, self.reg.client.transport);
                return Ok(Direct::Drained);
            }
        }
        // Into the writing side, under the write deadline from `now`: a deep queue's first
        // frames, which the rest of a batch joins, or what the socket left.
        let busy = self.busy();
        busy.batch = batch;
        busy.batch_started = Some(now);
        for f in frames.iter_mut() {
            busy.out_bytes += f.len();
            busy.out.push_back(std::mem::take(f));
        }
        if more {
            self.refill(now);
            return Ok(Direct::Pending);
        }
        busy.wrote(written);
        Ok(Direct::Blocked)
    }

    /// Moves queued frames into `out` (a pending pong first); a closed queue turns into
    /// our close frame. Makes no writing side for an empty queue.
    fn refill(&mut self, now: Instant) {
        if let Some(pong) = self.busy.as_mut().and_then(|b| b.pending_pong.take()) {
            self.busy().pongs_in_out += 1;
            self.push_out(pong, now);
        }
        let client = &self.reg.client;
        let busy = &mut self.busy;
        let was_empty = busy.as_ref().is_none_or(|b| b.out.is_empty());
        let taken = client.take_each(BATCH_BYTES, BATCH_ITEMS, |item| {
            let b = busy.get_or_insert_with(Box::default);
            // The shared bytes themselves go to `writev`: no copy per client.
            let bytes = b.batch.add(item);
            b.out_bytes += bytes.len();
            b.out.push_back(bytes);
        });
        if let Some(b) = self.busy.as_mut() {
            if was_empty && !b.out.is_empty() {
                b.batch_started = Some(now);
            }
        }
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
        let code = match self.mode {
            Mode::Pusher => pusher::close_code(reason),
            _ => reason.code(),
        };
        let busy = self.busy();
        busy.pending_pong = None;
        if reason == DisconnectReason::SlowConsumer {
            // It is not reading: drop the in-flight batch too, keeping only a partly
            // written frame so the close frame still lands on a frame boundary.
            busy.out.truncate(usize::from(busy.front_partial));
            busy.out_bytes = busy.out.iter().map(Bytes::len).sum();
        }
        let payload = frame::close_payload(code, reason.label());
        let close = frame::encode(frame::OP_CLOSE, &payload);
        // The closing write gets its own (shorter) deadline, counted from now.
        busy.batch_started = Some(Instant::now());
        busy.out_bytes += close.len();
        busy.out.push_back(close);
    }

    /// Writes as much of `out` as the socket takes now.
    fn flush(&mut self) -> io::Result<()> {
        let Some(busy) = self.busy.as_deref_mut() else {
            return Ok(());
        };
        while !busy.out.is_empty() {
            let mut slices = [IoSlice::new(&[]); IOV];
            let n = busy.out.len().min(IOV);
            for (slot, b) in slices.iter_mut().zip(busy.out.iter()) {
                *slot = IoSlice::new(b);
            }
            match self.stream.try_write_vectored(&slices[..n]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(written) => busy.wrote(written),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        if busy.out.is_empty() {
            busy.batch_started = None;
            busy.pongs_in_out = 0;
            busy.batch
                .report(&self.reg.state().metrics, self.reg.client.transport);
            // An idle connection keeps no batch buffer.
            busy.out = VecDeque::new();
        }
        Ok(())
    }

    /// Reads what the socket has, up to `READS_PER_WAKE` chunks. Ok(bytes read); Err on
    /// EOF or error.
    fn read(&mut self) -> io::Result<usize> {
        let mut got = 0;
        for _ in 0..READS_PER_WAKE {
            self.decoder();
            let decoder = self.decoder.as_mut().expect("made just above");
            let buf = decoder.buffer_mut(READ_CHUNK);
            // Never more than one chunk per read: the spare capacity may be far larger.
            let mut limited = (&mut *buf).limit(READ_CHUNK);
            match self.stream.try_read_buf(&mut limited) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(got)
    }

    fn process_input(&mut self) {
        let now = Instant::now();
        loop {
            if self.closing.is_some() && self.peer_closed {
                break;
            }
            let next = self.decoder.as_mut().map_or(Ok(None), |d| d.next_frame());
            let decoded = match next {
                Ok(None) => break,
                Ok(Some(d)) => d,
                Err(_) if self.broken => {
                    // Still garbage after a framing error: the peer is not going to send
                    // a close we can read, so stop waiting for one.
                    self.peer_closed = true;
                    break;
                }
                Err(e) => {
                    let reason = match e {
                        FrameError::TooLarge(_) => DisconnectReason::MessageTooLarge,
                        FrameError::BadUtf8 => DisconnectReason::BadUtf8,
                        FrameError::Protocol(_) => DisconnectReason::ProtocolError,
                        FrameError::TooManyFragments(_) => DisconnectReason::TooManyFragments,
                    };
                    // Answers to what came before the bad frame go out first (one batch).
                    self.refill(Instant::now());
                    self.begin_close(reason);
                    // What is buffered is unparseable; a fresh decoder (control-frame
                    // sized) can still read the peer's close reply that follows ours.
                    // (`decoder` makes it once `broken` is set.)
                    self.decoder = None;
                    self.broken = true;
                    break;
                }
            };
            let msg = match decoded {
                Decoded::Message(Message::Close(..)) => {
                    self.peer_closed = true;
                    self.begin_close(DisconnectReason::Normal);
                    continue;
                }
                Decoded::Message(m) => Some(m),
                Decoded::Fragment => None,
            };
            // Every other frame costs a token, whatever it carries: an empty continuation
            // or an unsolicited pong costs a decode like a command does.
            if !self.commands.take(command_rate(self.reg.state()), now) {
                if self.closing.is_some() {
                    // Frames past the budget while our close waits for the peer's: stop
                    // reading instead of decoding them until the grace period ends.
                    self.peer_closed = true;
                } else {
                    self.too_many_commands();
                }
                break;
            }
            let Some(msg) = msg.filter(|_| self.closing.is_none()) else {
                continue;
            };
            match (msg, self.mode) {
                (Message::Ping(p), _) => self.pong(&p, now),
                (Message::Pong(_), _) => {}
                (Message::Text(text), Mode::Commands) => self.command(&text),
                (Message::Binary(_), Mode::Commands) => {
                    self.reply(protocol::error(
                        ErrorCode::UnsupportedData,
                        "commands are JSON text frames",
                        None,
                    ));
                }
                (Message::Text(text), Mode::Pusher) => self.pusher_command(&text),
                (Message::Binary(_), Mode::Pusher) => {
                    self.reply(crate::pusher::messages::error(
                        None,
                        "Pusher messages are JSON text frames",
                    ));
                }
                (Message::Text(data), Mode::Echo) => self.echo(frame::OP_TEXT, &data),
                (Message::Binary(data), Mode::Echo) => self.echo(frame::OP_BINARY, &data),
                (Message::Close(..), _) => unreachable!("handled above"),
            }
        }
        if self.decoder.as_ref().is_some_and(|d| d.is_idle()) {
            self.decoder = None;
        }
    }

    /// Answers each ping while a batch has room for a few pongs; past that keeps only the
    /// newest pong until the batch has been written, so a ping flood against a socket
    /// that does not read holds at most `PONGS_PER_BATCH + 1` of them.
    fn pong(&mut self, payload: &[u8], now: Instant) {
        let pong = frame::encode(frame::OP_PONG, payload);
        let busy = self.busy();
        if busy.pongs_in_out < PONGS_PER_BATCH {
            busy.pongs_in_out += 1;
            self.push_out(pong, now);
        } else {
            busy.pending_pong = Some(pong);
        }
    }

    /// Over the frame rate: the replies earned so far (one batch), one error frame,
    /// then close 4500.
    fn too_many_commands(&mut self) {
        // Replies to the commands that were within the limit go out first.
        self.refill(Instant::now());
        let rate = self.reg.state().cfg.max_commands_per_second;
        let msg = format!(
            "more than {rate} frames per second (max_commands_per_second: commands, pings, \
             pongs and fragments all count)"
        );
        let err = match self.mode {
            Mode::Pusher => crate::pusher::messages::error(
                Some(crate::pusher::messages::code::RATE_LIMITED),
                &msg,
            ),
            _ => protocol::error(ErrorCode::TooManyCommands, &msg, None),
        };
        let err = frame::encode(frame::OP_TEXT, &err);
        self.push_out(err, Instant::now());
        self.begin_close(DisconnectReason::TooManyCommands);
    }

    fn echo(&mut self, opcode: u8, data: &[u8]) {
        let item = Item::control(frame::encode(opcode, data));
        self.reg.client.push(item, &self.reg.state().metrics);
    }

    fn command(&mut self, text: &[u8]) {
        let parsed = protocol::parse(text);
        let read = match &parsed {
            Parsed::Subscribe(topic, _, id) => Some((topic, *id)),
            Parsed::Presence(r, id) => Some((&r.topic, *id)),
            Parsed::PresenceStats(topic, id) => Some((topic, *id)),
            _ => None,
        };
        if let Some((topic, id)) = read {
            // Checked here, before any broker (or its chained task) sees the topic: the
            // hub and brokers never learn about tokens. Presence needs what reading the
            // topic needs.
            let grant = self.authed.as_ref().map(|a| &a.grant);
            if let Err(e) = self.reg.state().auth.check_read(topic, grant) {
                self.reply(protocol::error(e.code, &e.message, id));
                return;
            }
            if !matches!(parsed, Parsed::Subscribe(..)) {
                if let Err(e) = crate::api::presence::check_enabled(self.reg.state(), topic) {
                    self.reply(protocol::error(e.code, &e.message, id));
                    return;
                }
            }
        }
        match parsed {
            Parsed::Presence(read, id) => {
                let (state, client) = (self.reg.state().clone(), self.reg.client.clone());
                let id = id.map(|id| id.to_owned());
                self.in_order(async move {
                    let page = state
                        .broker
                        .presence(&read.topic, read.after, read.limit)
                        .await;
                    let json = match page {
                        Ok(page) => protocol::presence(&read.topic, &page, id.as_deref()),
                        Err(e) => match subscribe_error(&e, id.as_deref()) {
                            Some(json) => json,
                            None => return,
                        },
                    };
                    client.push(
                        Item::control(frame::encode(frame::OP_TEXT, &json)),
                        &state.metrics,
                    );
                });
            }
            Parsed::PresenceStats(topic, id) => {
                let (state, client) = (self.reg.state().clone(), self.reg.client.clone());
                let id = id.map(|id| id.to_owned());
                self.in_order(async move {
                    let json = match state.broker.presence_stats(&topic).await {
                        Ok(stats) => protocol::presence_stats(&topic, &stats, id.as_deref()),
                        Err(e) => match subscribe_error(&e, id.as_deref()) {
                            Some(json) => json,
                            None => return,
                        },
                    };
                    client.push(
                        Item::control(frame::encode(frame::OP_TEXT, &json)),
                        &state.metrics,
                    );
                });
            }
            Parsed::Subscribe(topic, since, id) => {
                let (state, client) = (self.reg.state().clone(), self.reg.client.clone());
                let who = crate::auth::identity(self.authed.as_ref().map(|a| &a.grant));
                let id = id.map(|id| id.to_owned());
                self.in_order(async move {
                    let id = id.as_deref();
                    let ack = |sub: &_| {
                        Some(frame::encode(
                            frame::OP_TEXT,
                            &protocol::subscribed(&topic, sub, id),
                        ))
                    };
                    let (hub, broker) = (&state.hub, &*state.broker);
                    let since = since.as_ref();
                    let result =
                        subscribe::subscribe(hub, broker, &client, &topic, since, &ack, &who).await;
                    if result.is_ok() {
                        state.boards.watching(&topic);
                    }
                    if let Err(e) = result {
                        if let Some(json) = subscribe_error(&e, id) {
                            let item = Item::control(frame::encode(frame::OP_TEXT, &json));
                            client.push(item, &state.metrics);
                        }
                    }
                });
            }
            Parsed::Unsubscribe(topic, id) => {
                let (state, client) = (self.reg.state().clone(), self.reg.client.clone());
                let id = id.map(|id| id.to_owned());
                self.in_order(async move {
                    subscribe::unsubscribe(&state.hub, &*state.broker, &client, &topic);
                    let json = protocol::unsubscribed(&topic, id.as_deref());
                    let item = Item::control(frame::encode(frame::OP_TEXT, &json));
                    client.push(item, &state.metrics);
                });
            }
            Parsed::Ping(id) => self.reply(protocol::pong(id)),
            Parsed::Auth(token, id) => self.auth(&token, id),
            Parsed::Refresh(token, id) => self.refresh(&token, id),
            Parsed::NoToken(op, id) => self.auth_failed(
                ErrorCode::BadToken,
                &format!("{op} needs a \"token\" string"),
                id,
            ),
            Parsed::Error(code, message, id) => self.reply(protocol::error(code, &message, id)),
        }
    }

    /// `auth`: the connection's first grant. A second one is refused (the client meant
    /// `refresh`, whose same-`sub` rule an `auth` would otherwise bypass).
    fn auth(&mut self, token: &str, id: Option<&RawValue>) {
        if self.authed.is_some() {
            let msg = "already authenticated: use refresh";
            return self.auth_failed(ErrorCode::BadToken, msg, id);
        }
        match self.reg.state().auth.verify(token) {
            Ok(grant) => {
                self.reply(protocol::authed("authed", &grant, id));
                self.authed = Some(Authed::new(grant));
            }
            Err(e) => self.token_refused(e, id),
        }
    }

    /// `refresh`: a new token for the same `sub` replaces the grant (and its deadline).
    /// Private topics held that the new grant does not allow are left, each with an
    /// `unsubscribed` frame, before the `refreshed` reply.
    fn refresh(&mut self, token: &str, id: Option<&RawValue>) {
        let Some(old_sub) = self.authed.as_ref().map(|a| a.grant.sub.clone()) else {
            let msg = "refresh needs a token held already: send auth first";
            return self.auth_failed(ErrorCode::BadToken, msg, id);
        };
        let grant = match self.reg.state().auth.verify(token) {
            Ok(g) => g,
            Err(e) => return self.token_refused(e, id),
        };
        if grant.sub != old_sub {
            let msg = format!(
                "refresh must keep the same sub: this connection is {old_sub:?}, the token names {:?}",
                grant.sub
            );
            return self.auth_failed(ErrorCode::BadToken, &msg, id);
        }
        let reply = protocol::authed("refreshed", &grant, id);
        // Subscribes still in flight were allowed by the old grant: drop what the new one
        // refuses only once they have landed.
        let (state, client) = (self.reg.state().clone(), self.reg.client.clone());
        let new = grant.clone();
        self.in_order(async move {
            leave_refused(&state, &client, &new);
            let item = Item::control(frame::encode(frame::OP_TEXT, &reply));
            client.push(item, &state.metrics);
        });
        self.authed = Some(Authed::new(grant));
    }

    fn token_refused(&mut self, e: crate::auth::TokenError, id: Option<&RawValue>) {
        let e = crate::api::error::ApiError::from(e);
        self.auth_failed(e.code, &e.message, id);
    }

    /// A failed `auth` or `refresh`: the replies earned so far (one batch), the error
    /// frame, then close 4501. Closing bounds what a client can make the server verify.
    fn auth_failed(&mut self, code: ErrorCode, message: &str, id: Option<&RawValue>) {
        self.refill(Instant::now());
        let err = frame::encode(frame::OP_TEXT, &protocol::error(code, message, id));
        self.push_out(err, Instant::now());
        self.begin_close(DisconnectReason::BadToken);
    }

    /// Runs a topic command in the order the commands came: at once when nothing before
    /// it is still running and it does not wait (the in-process broker never does: its
    /// reply is queued before the next command is read), otherwise as a task after the
    /// previous one (see `chain`).
    fn in_order(&mut self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        if self.chain.as_ref().is_some_and(|c| c.is_finished()) {
            self.chain = None;
        }
        let mut task = Box::pin(task);
        if self.chain.is_none() {
            // One poll in place: a command that completes without waiting costs no task.
            // One that waits is spawned as it is: its first poll by the runtime registers
            // a real waker.
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            if task.as_mut().poll(&mut cx).is_ready() {
                return;
            }
        }
        let prev = self.chain.take();
        self.chain = Some(tokio::spawn(async move {
            if let Some(prev) = prev {
                let _ = prev.await;
            }
            task.await;
        }));
    }

    /// Replies go through the client's queue so they stay in order with publications.
    fn reply(&self, json: Vec<u8>) {
        let item = Item::control(frame::encode(frame::OP_TEXT, &json));
        self.reg.client.push(item, &self.reg.state().metrics);
    }
}

/// Unsubscribes `client` from the topics it holds that `grant` may not read (private ones
/// it does not allow, followed players of `follow_own_only` boards that are not its `sub`),
/// telling it with an `unsubscribed` frame for each.
fn leave_refused(state: &AppState, client: &Arc<Client>, grant: &Grant) {
    let refused: Vec<_> = client
        .topics
        .lock()
        .iter()
        .filter(|t| state.auth.check_read(t, Some(grant)).is_err())
        .cloned()
        .collect();
    for topic in refused {
        if crate::subscribe::unsubscribe(&state.hub, &*state.broker, client, &topic) {
            let json = protocol::unsubscribed(&topic, None);
            client.push(
                Item::control(frame::encode(frame::OP_TEXT, &json)),
                &state.metrics,
            );
        }
    }
}

/// The error frame answering a failed subscribe (none when the client is gone).
fn subscribe_error(e: &BrokerError, id: Option<&serde_json::value::RawValue>) -> Option<Vec<u8>> {
    let code = match e {
        BrokerError::TooManyTopics(_) | BrokerError::TooManyTopicsPerConnection(_) => {
            ErrorCode::TooManyTopics
        }
        BrokerError::Unavailable(_) => ErrorCode::StoreUnavailable,
        BrokerError::ClientClosed => return None,
    };
    Some(protocol::error(code, &e.to_string(), id))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// tokio allocates a task as one cell (header, future, trailer: 96 bytes beside the
    /// future) aligned to 128 bytes: a tracked connection future of at most 288 bytes
    /// makes a 384-byte task. One byte more costs every idle connection 128.
    #[test]
    fn an_idle_connection_task_fits_384_bytes() {
        use tokio_util::task::task_tracker::TrackedFuture;
        let size = std::mem::size_of::<TrackedFuture<Task>>();
        assert!(size <= 288, "the connection's future grew to {size} bytes");
        assert_eq!(std::mem::size_of::<Option<Tick>>(), 8);
    }

    /// Every idle connection carries the grant slot: it must stay one pointer.
    #[test]
    fn grant_slot_is_one_pointer() {
        assert_eq!(
            std::mem::size_of::<Option<Box<Authed>>>(),
            std::mem::size_of::<usize>()
        );
    }
}
