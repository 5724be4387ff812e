//! RFC 6455 framing, both directions. Hand-written rather than tungstenite because crier
//! needs two things tungstenite does not offer: a publication's frame is built once and the
//! same `Bytes` is written to every subscriber, and an idle connection holds no read buffer
//! at all (tungstenite keeps a 128 KiB one per socket). The load tool reuses the decoder.

use bytes::{Buf, BufMut, Bytes, BytesMut};

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Largest header: 2 bytes + 8 bytes of length + 4 bytes of mask.
const MAX_HEADER: usize = 14;

/// Builds one unmasked (server-to-client) frame: header and payload in a single buffer so a
/// subscriber's write needs one iovec per message.
pub fn encode(opcode: u8, payload: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(MAX_HEADER + payload.len());
    put_header(&mut buf, opcode, payload.len(), None);
    buf.put_slice(payload);
    buf.freeze()
}

/// Builds one masked (client-to-server) frame, as RFC 6455 requires of clients.
pub fn encode_masked(opcode: u8, payload: &[u8], mask: [u8; 4]) -> Bytes {
    let mut buf = BytesMut::with_capacity(MAX_HEADER + payload.len());
    put_header(&mut buf, opcode, payload.len(), Some(mask));
    let start = buf.len();
    buf.put_slice(payload);
    apply_mask(&mut buf[start..], mask);
    buf.freeze()
}

/// A close frame carrying `code` and a short reason.
pub fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut p = Vec::with_capacity(2 + reason.len());
    p.extend_from_slice(&code.to_be_bytes());
    p.extend_from_slice(&reason.as_bytes()[..reason.len().min(123)]);
    p
}

fn put_header(buf: &mut BytesMut, opcode: u8, len: usize, mask: Option<[u8; 4]>) {
    buf.put_u8(0x80 | opcode);
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    if len < 126 {
        buf.put_u8(mask_bit | len as u8);
    } else if len <= u16::MAX as usize {
        buf.put_u8(mask_bit | 126);
        buf.put_u16(len as u16);
    } else {
        buf.put_u8(mask_bit | 127);
        buf.put_u64(len as u64);
    }
    if let Some(m) = mask {
        buf.put_slice(&m);
    }
}

/// Close codes a peer may send (RFC 6455 7.4): 1004-1006 and 1015 are reserved for
/// local use, 1016-2999 for future protocol versions, and nothing outside 1000-4999 exists.
pub fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

pub fn apply_mask(data: &mut [u8], mask: [u8; 4]) {
    // Word-at-a-time XOR: command frames are small, but the load tool unmasks nothing and
    // a client flooding large frames should not cost a byte loop.
    let word = u32::from_ne_bytes(mask);
    let mut chunks = data.chunks_exact_mut(4);
    for c in &mut chunks {
        let v = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) ^ word;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    let done = data.len() - data.len() % 4;
    for (i, b) in data[done..].iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
}

/// What one frame amounted to (`Decoder::next_frame`).
#[derive(Debug, PartialEq)]
pub enum Decoded {
    /// A control frame, or the data frame that completed a message.
    Message(Message),
    /// A data frame taken into a message still being assembled (a first frame without FIN,
    /// or a continuation before the last). It carries nothing the caller can use yet, but
    /// it cost a decode: callers that budget a peer's frames count it.
    Fragment,
}

/// A complete message (fragments joined) or a control frame.
#[derive(Debug, PartialEq)]
pub enum Message {
    Text(Bytes),
    Binary(Bytes),
    Ping(Bytes),
    Pong(Bytes),
    /// Close code (if any) and reason.
    Close(Option<u16>, Bytes),
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("message larger than {0} bytes")]
    TooLarge(usize),
    #[error("text message is not UTF-8")]
    BadUtf8,
    /// A message needed more frames than the decoder's fragment cap.
    #[error("message in more than {0} fragments")]
    TooManyFragments(usize),
}

/// Which side's frames this decoder reads: servers require masked frames, clients forbid them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Server,
    Client,
}

/// Incremental decoder. Feed it bytes with `buffer_mut`, take messages with `next_message`
/// (or frame by frame with `next_frame`). Holds no allocation while idle: `shrink_if_empty`
/// gives the buffer back between bursts.
pub struct Decoder {
    role: Role,
    max_message: usize,
    /// Most frames one message may arrive in (`with_max_fragments`).
    max_fragments: usize,
    buf: BytesMut,
    /// Opcode and data of a fragmented message in progress.
    partial: Option<(u8, BytesMut)>,
    /// Frames the message in `partial` has arrived in so far.
    fragments: usize,
    /// How much of a fragmented text message is known to be UTF-8 (always on a character
    /// boundary), so each fragment is checked once and bad text fails at its fragment.
    utf8_checked: usize,
}

impl Decoder {
    /// A decoder of messages up to `max_message` bytes, in any number of fragments (see
    /// `with_max_fragments`).
    pub fn new(role: Role, max_message: usize) -> Self {
        Decoder {
            role,
            max_message,
            max_fragments: usize::MAX,
            buf: BytesMut::new(),
            partial: None,
            fragments: 0,
            utf8_checked: 0,
        }
    }

    /// Caps the frames one message may arrive in (its first frame and every continuation,
    /// `max_fragments` >= 1; 1 allows no fragmentation). Empty continuations hold no bytes,
    /// so `max_message` alone would let a message that never ends cost a decode per 6-byte
    /// frame for ever. The frame that would go past the cap fails at its header with
    /// `FrameError::TooManyFragments`: the cap's last frame without FIN already does, as
    /// that message cannot end in time.
    pub fn with_max_fragments(mut self, max_fragments: usize) -> Self {
        self.max_fragments = max_fragments.max(1);
        self
    }

    /// The read buffer, with at least `want` bytes of spare capacity.
    pub fn buffer_mut(&mut self, want: usize) -> &mut BytesMut {
        if self.buf.capacity() - self.buf.len() < want {
            self.buf.reserve(want);
        }
        &mut self.buf
    }

    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Bytes this decoder holds for its peer (unparsed input and a fragmented message in
    /// progress): they count against the connection's budget.
    pub fn held(&self) -> usize {
        self.buf.len() + self.partial.as_ref().map_or(0, |(_, d)| d.len())
    }

    /// Nothing buffered and no message in progress: the decoder can be dropped and a new
    /// one made for the next bytes without losing anything.
    pub fn is_idle(&self) -> bool {
        self.buf.is_empty() && self.partial.is_none()
    }

    /// Frees the read buffer when nothing is pending, so idle connections cost no buffer.
    pub fn shrink_if_empty(&mut self) {
        if self.buf.is_empty() && self.partial.is_none() && self.buf.capacity() > 0 {
            self.buf = BytesMut::new();
        }
    }

    /// The next complete message or control frame; fragments are joined on the way.
    pub fn next_message(&mut self) -> Result<Option<Message>, FrameError> {
        loop {
            match self.next_frame()? {
                None => return Ok(None),
                Some(Decoded::Message(m)) => return Ok(Some(m)),
                Some(Decoded::Fragment) => {}
            }
        }
    }

    /// Decodes one frame, or None when more bytes are needed. A peer's frames can be
    /// budgeted one by one with this: `next_message` would decode any number of fragments
    /// in one call.
    pub fn next_frame(&mut self) -> Result<Option<Decoded>, FrameError> {
        let Some((fin, opcode, payload)) = self.read_frame()? else {
            return Ok(None);
        };
        self.interpret(fin, opcode, payload).map(Some)
    }

    /// What one raw frame means, given the message in progress.
    fn interpret(&mut self, fin: bool, opcode: u8, payload: Bytes) -> Result<Decoded, FrameError> {
        let message = |m| Ok(Decoded::Message(m));
        match opcode {
            OP_CLOSE => {
                if payload.len() == 1 {
                    return Err(FrameError::Protocol("close payload of one byte"));
                }
                if payload.len() >= 2 {
                    let code = u16::from_be_bytes([payload[0], payload[1]]);
                    if !close_code_allowed(code) {
                        return Err(FrameError::Protocol("close code not allowed on the wire"));
                    }
                    let reason = payload.slice(2..);
                    if std::str::from_utf8(&reason).is_err() {
                        return Err(FrameError::BadUtf8);
                    }
                    return message(Message::Close(Some(code), reason));
                }
                message(Message::Close(None, Bytes::new()))
            }
            OP_PING => message(Message::Ping(payload)),
            OP_PONG => message(Message::Pong(payload)),
            OP_TEXT | OP_BINARY => {
                if self.partial.is_some() {
                    return Err(FrameError::Protocol("new message inside a fragmented one"));
                }
                if fin {
                    return self.finish(opcode, payload).map(Decoded::Message);
                }
                let data = BytesMut::from(&payload[..]);
                self.utf8_checked = 0;
                if opcode == OP_TEXT {
                    self.check_utf8_prefix(&data)?;
                }
                self.partial = Some((opcode, data));
                self.fragments = 1;
                Ok(Decoded::Fragment)
            }
            OP_CONT => {
                let Some((op, mut data)) = self.partial.take() else {
                    return Err(FrameError::Protocol("continuation without a message"));
                };
                if data.len() + payload.len() > self.max_message {
                    return Err(FrameError::TooLarge(self.max_message));
                }
                data.extend_from_slice(&payload);
                self.fragments += 1;
                if fin {
                    self.fragments = 0;
                    return self.finish(op, data.freeze()).map(Decoded::Message);
                }
                if op == OP_TEXT {
                    self.check_utf8_prefix(&data)?;
                }
                self.partial = Some((op, data));
                Ok(Decoded::Fragment)
            }
            _ => Err(FrameError::Protocol("unknown opcode")),
        }
    }

    /// Checks the unchecked part of an unfinished text message; a sequence cut at its end
    /// may still be completed by the next fragment.
    fn check_utf8_prefix(&mut self, data: &[u8]) -> Result<(), FrameError> {
        match std::str::from_utf8(&data[self.utf8_checked..]) {
            Ok(_) => self.utf8_checked = data.len(),
            Err(e) if e.error_len().is_none() => self.utf8_checked += e.valid_up_to(),
            Err(_) => return Err(FrameError::BadUtf8),
        }
        Ok(())
    }

    fn finish(&self, opcode: u8, data: Bytes) -> Result<Message, FrameError> {
        if opcode == OP_TEXT {
            if std::str::from_utf8(&data).is_err() {
                return Err(FrameError::BadUtf8);
            }
            Ok(Message::Text(data))
        } else {
            Ok(Message::Binary(data))
        }
    }

    /// One raw frame (unmasked payload), or None when more bytes are needed.
    fn read_frame(&mut self) -> Result<Option<(bool, u8, Bytes)>, FrameError> {
        let b = &self.buf[..];
        if b.len() < 2 {
            return Ok(None);
        }
        let fin = b[0] & 0x80 != 0;
        if b[0] & 0x70 != 0 {
            return Err(FrameError::Protocol("reserved bits set"));
        }
        let opcode = b[0] & 0x0F;
        let masked = b[1] & 0x80 != 0;
        match (self.role, masked) {
            (Role::Server, false) => return Err(FrameError::Protocol("client frame not masked")),
            (Role::Client, true) => return Err(FrameError::Protocol("server frame masked")),
            _ => {}
        }
        let (len, mut pos) = match b[1] & 0x7F {
            126 => {
                if b.len() < 4 {
                    return Ok(None);
                }
                (u16::from_be_bytes([b[2], b[3]]) as u64, 4)
            }
            127 => {
                if b.len() < 10 {
                    return Ok(None);
                }
                let len = u64::from_be_bytes(b[2..10].try_into().expect("8 bytes"));
                if len >> 63 != 0 {
                    // RFC 6455 5.2: the most significant bit MUST be 0. A malformed frame,
                    // not a large one.
                    return Err(FrameError::Protocol("64-bit length with the top bit set"));
                }
                (len, 10)
            }
            n => (n as u64, 2),
        };
        let control = opcode & 0x8 != 0;
        if control && (len > 125 || !fin) {
            return Err(FrameError::Protocol(
                "control frame fragmented or over 125 bytes",
            ));
        }
        // A data frame is judged as soon as its header is in, with what its message holds
        // already: nothing of a message that cannot fit is ever buffered, and the frame that
        // takes a message past the fragment cap (a frame without FIN at the cap already: its
        // message could not end in time) is refused before its payload. Frames that break
        // the rules (a continuation of nothing, a message inside a message) are left to
        // `interpret`, as protocol errors.
        let (so_far, nth) = match (&self.partial, opcode) {
            (Some((_, data)), OP_CONT) => (data.len() as u64, self.fragments + 1),
            (None, OP_TEXT | OP_BINARY) => (0, 1),
            _ => (0, 0),
        };
        if nth > 0 && nth + usize::from(!fin) > self.max_fragments {
            return Err(FrameError::TooManyFragments(self.max_fragments));
        }
        if len + so_far > self.max_message as u64 {
            return Err(FrameError::TooLarge(self.max_message));
        }
        let mask = if masked {
            if b.len() < pos + 4 {
                return Ok(None);
            }
            let m = [b[pos], b[pos + 1], b[pos + 2], b[pos + 3]];
            pos += 4;
            Some(m)
        } else {
            None
        };
        let len = len as usize;
        if b.len() < pos + len {
            // The buffer grows only with bytes that actually arrive: a header declaring a
            // large frame costs nothing until its payload is sent.
            return Ok(None);
        }
        self.buf.advance(pos);
        let mut payload = self.buf.split_to(len);
        if let Some(m) = mask {
            apply_mask(&mut payload, m);
        }
        Ok(Some((fin, opcode, payload.freeze())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(d: &mut Decoder, bytes: &[u8]) {
        d.buffer_mut(bytes.len()).extend_from_slice(bytes);
    }

    #[test]
    fn round_trip_sizes() {
        for len in [0usize, 1, 125, 126, 65535, 65536, 100_000] {
            let payload: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            let frame = encode_masked(OP_TEXT, &payload, [1, 2, 3, 4]);
            let mut d = Decoder::new(Role::Server, 1 << 20);
            // Byte-by-byte feeding exercises every "need more" branch.
            if len < 200 {
                for b in frame.iter() {
                    assert!(matches!(d.next_message(), Ok(None)));
                    feed(&mut d, &[*b]);
                }
            } else {
                feed(&mut d, &frame);
            }
            assert_eq!(
                d.next_message().unwrap(),
                Some(Message::Text(Bytes::from(payload.clone())))
            );
            let server = encode(OP_BINARY, &payload);
            let mut c = Decoder::new(Role::Client, 1 << 20);
            feed(&mut c, &server);
            assert_eq!(
                c.next_message().unwrap(),
                Some(Message::Binary(Bytes::from(payload)))
            );
        }
    }

    #[test]
    fn fragments_join_and_controls_interleave() {
        let mut d = Decoder::new(Role::Server, 1024);
        let mut first = encode_masked(OP_TEXT, b"hel", [9; 4]).to_vec();
        first[0] &= 0x7F; // not FIN
        feed(&mut d, &first);
        feed(&mut d, &encode_masked(OP_PING, b"p", [7; 4]));
        feed(&mut d, &encode_masked(OP_CONT, b"lo", [5; 4]));
        assert_eq!(
            d.next_message().unwrap(),
            Some(Message::Ping(Bytes::from_static(b"p")))
        );
        assert_eq!(
            d.next_message().unwrap(),
            Some(Message::Text(Bytes::from_static(b"hello")))
        );
        assert_eq!(d.next_message().unwrap(), None);
    }

    #[test]
    fn violations() {
        let mut d = Decoder::new(Role::Server, 1024);
        feed(&mut d, &encode(OP_TEXT, b"x"));
        assert!(matches!(d.next_message(), Err(FrameError::Protocol(_))));
        let mut d = Decoder::new(Role::Server, 16);
        feed(&mut d, &encode_masked(OP_TEXT, &[b'a'; 17], [1; 4]));
        assert_eq!(d.next_message(), Err(FrameError::TooLarge(16)));
        let mut d = Decoder::new(Role::Server, 1024);
        feed(&mut d, &encode_masked(OP_TEXT, &[0xff, 0xfe], [1; 4]));
        assert_eq!(d.next_message(), Err(FrameError::BadUtf8));
        let mut d = Decoder::new(Role::Server, 1024);
        feed(&mut d, &encode_masked(OP_PING, &[0; 126], [1; 4]));
        assert!(matches!(d.next_message(), Err(FrameError::Protocol(_))));
        let mut d = Decoder::new(Role::Server, 1024);
        feed(
            &mut d,
            &encode_masked(OP_CLOSE, &close_payload(1000, "bye"), [3; 4]),
        );
        assert_eq!(
            d.next_message().unwrap(),
            Some(Message::Close(Some(1000), Bytes::from_static(b"bye")))
        );
    }

    #[test]
    fn close_codes_that_never_appear_on_the_wire_are_protocol_errors() {
        for code in [
            0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
        ] {
            let mut d = Decoder::new(Role::Server, 1024);
            feed(
                &mut d,
                &encode_masked(OP_CLOSE, &close_payload(code, ""), [3; 4]),
            );
            assert!(
                matches!(d.next_message(), Err(FrameError::Protocol(_))),
                "code {code}"
            );
        }
        for code in [
            1000, 1001, 1002, 1003, 1007, 1011, 1012, 1014, 3000, 3999, 4000, 4999,
        ] {
            let mut d = Decoder::new(Role::Server, 1024);
            feed(
                &mut d,
                &encode_masked(OP_CLOSE, &close_payload(code, ""), [3; 4]),
            );
            assert_eq!(
                d.next_message().unwrap(),
                Some(Message::Close(Some(code), Bytes::new())),
                "code {code}"
            );
        }
    }

    #[test]
    fn length_with_top_bit_is_a_protocol_error_not_too_large() {
        let mut d = Decoder::new(Role::Server, 1024);
        let mut f = vec![0x82, 0x80 | 127];
        f.extend_from_slice(&(1u64 << 63 | 5).to_be_bytes());
        f.extend_from_slice(&[1, 2, 3, 4]);
        feed(&mut d, &f);
        assert!(matches!(d.next_message(), Err(FrameError::Protocol(_))));
    }

    #[test]
    fn a_declared_length_reserves_nothing() {
        let mut d = Decoder::new(Role::Server, 16 * 1024 * 1024);
        let mut f = vec![0x82, 0x80 | 127];
        f.extend_from_slice(&(16u64 * 1024 * 1024).to_be_bytes());
        f.extend_from_slice(&[1, 2, 3, 4, 0, 0]);
        feed(&mut d, &f);
        assert_eq!(d.next_message(), Ok(None));
        assert!(d.buf.capacity() < 64 * 1024, "{}", d.buf.capacity());
        assert_eq!(d.held(), f.len());
    }

    #[test]
    fn an_oversized_continuation_is_refused_at_its_header() {
        let mut d = Decoder::new(Role::Server, 100);
        let mut first = encode_masked(OP_TEXT, &[b'a'; 60], [9; 4]).to_vec();
        first[0] &= 0x7F;
        feed(&mut d, &first);
        assert_eq!(d.next_message(), Ok(None));
        assert_eq!(d.held(), 60);
        // Only the header of a 60-byte continuation: 60 + 60 > 100 already.
        feed(&mut d, &[0x80, 0x80 | 60, 1, 2, 3, 4]);
        assert_eq!(d.next_message(), Err(FrameError::TooLarge(100)));
    }

    #[test]
    fn bad_utf8_fails_at_its_fragment_and_split_characters_pass() {
        let frag = |op: u8, fin: bool, p: &[u8]| {
            let mut f = encode_masked(op, p, [5; 4]).to_vec();
            if !fin {
                f[0] &= 0x7F;
            }
            f
        };
        // "é" (C3 A9) split across fragments is fine.
        let mut d = Decoder::new(Role::Server, 1024);
        feed(&mut d, &frag(OP_TEXT, false, b"caf\xC3"));
        feed(&mut d, &frag(OP_CONT, true, b"\xA9"));
        assert_eq!(
            d.next_message().unwrap(),
            Some(Message::Text(Bytes::from("café")))
        );
        // Invalid bytes fail before the message is complete.
        let mut d = Decoder::new(Role::Server, 1024);
        feed(&mut d, &frag(OP_TEXT, false, b"ok"));
        feed(&mut d, &frag(OP_CONT, false, b"\xFF"));
        assert_eq!(d.next_message(), Err(FrameError::BadUtf8));
        // Binary fragments are not text.
        let mut d = Decoder::new(Role::Server, 1024);
        feed(&mut d, &frag(OP_BINARY, false, b"\xFF"));
        assert_eq!(d.next_message(), Ok(None));
    }

    fn fragment(op: u8, fin: bool, p: &[u8]) -> Vec<u8> {
        let mut f = encode_masked(op, p, [5; 4]).to_vec();
        if !fin {
            f[0] &= 0x7F;
        }
        f
    }

    #[test]
    fn each_frame_is_one_step() {
        let mut d = Decoder::new(Role::Server, 1024);
        feed(&mut d, &fragment(OP_TEXT, false, b"a"));
        feed(&mut d, &fragment(OP_CONT, false, b""));
        feed(&mut d, &encode_masked(OP_PONG, b"", [1; 4]));
        feed(&mut d, &fragment(OP_CONT, true, b"b"));
        assert_eq!(d.next_frame(), Ok(Some(Decoded::Fragment)));
        assert_eq!(d.next_frame(), Ok(Some(Decoded::Fragment)));
        assert_eq!(
            d.next_frame(),
            Ok(Some(Decoded::Message(Message::Pong(Bytes::new()))))
        );
        assert_eq!(
            d.next_frame(),
            Ok(Some(Decoded::Message(Message::Text(Bytes::from("ab")))))
        );
        assert_eq!(d.next_frame(), Ok(None));
    }

    #[test]
    fn fragments_past_the_cap_fail_at_the_header() {
        let mut d = Decoder::new(Role::Server, 1024).with_max_fragments(3);
        // Two messages of exactly three fragments, a ping inside one (not a fragment).
        for _ in 0..2 {
            feed(&mut d, &fragment(OP_TEXT, false, b"x"));
            feed(&mut d, &encode_masked(OP_PING, b"", [1; 4]));
            feed(&mut d, &fragment(OP_CONT, false, b""));
            feed(&mut d, &fragment(OP_CONT, true, b"y"));
            assert_eq!(d.next_message(), Ok(Some(Message::Ping(Bytes::new()))));
            assert_eq!(d.next_message(), Ok(Some(Message::Text(Bytes::from("xy")))));
        }
        // A third fragment without FIN leaves the message needing a fourth: refused on its
        // header, before its 100 payload bytes come.
        feed(&mut d, &fragment(OP_BINARY, false, b""));
        feed(&mut d, &fragment(OP_CONT, false, b""));
        feed(&mut d, &[0x00, 0x80 | 100, 1, 2, 3, 4]);
        assert_eq!(d.next_frame(), Ok(Some(Decoded::Fragment)));
        assert_eq!(d.next_frame(), Ok(Some(Decoded::Fragment)));
        assert_eq!(d.next_frame(), Err(FrameError::TooManyFragments(3)));

        // 1 (or 0, taken as 1) allows no fragmentation; a plain decoder allows any number.
        let mut d = Decoder::new(Role::Server, 1024).with_max_fragments(0);
        feed(&mut d, &fragment(OP_TEXT, true, b"whole"));
        feed(&mut d, &fragment(OP_TEXT, false, b"a"));
        assert_eq!(
            d.next_message(),
            Ok(Some(Message::Text(Bytes::from("whole"))))
        );
        assert_eq!(d.next_message(), Err(FrameError::TooManyFragments(1)));
        // A continuation of nothing stays a protocol error.
        let mut d = Decoder::new(Role::Server, 1024).with_max_fragments(1);
        feed(&mut d, &fragment(OP_CONT, false, b""));
        assert!(matches!(d.next_message(), Err(FrameError::Protocol(_))));
        let mut d = Decoder::new(Role::Server, 1024);
        feed(&mut d, &fragment(OP_TEXT, false, b"a"));
        for _ in 0..10_000 {
            feed(&mut d, &fragment(OP_CONT, false, b""));
        }
        feed(&mut d, &fragment(OP_CONT, true, b"b"));
        assert_eq!(d.next_message(), Ok(Some(Message::Text(Bytes::from("ab")))));
    }

    #[test]
    fn mask_matches_bytewise() {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let mut a: Vec<u8> = (0..37).collect();
        let b: Vec<u8> = a.iter().enumerate().map(|(i, x)| x ^ mask[i % 4]).collect();
        apply_mask(&mut a, mask);
        assert_eq!(a, b);
    }
}
