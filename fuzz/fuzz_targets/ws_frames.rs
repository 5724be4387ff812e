//! RFC 6455 frame decoder (`crier::ws::frame::Decoder`) fed hostile bytes in hostile chunk
//! sizes, exactly as `ws::connection` drives it: append a read, drain `next_frame` until it
//! wants more or fails, give the buffer back when idle.
#![no_main]

use crier::ws::frame::{Decoded, Decoder, Message, Role};
use libfuzzer_sys::fuzz_target;

/// Largest frame header: 2 + 8 (length) + 4 (mask).
const MAX_HEADER: usize = 14;

/// Input layout (hand-written so seeds stay readable): `max_message` as u16 LE (kept small
/// so the memory bound below means something), a flags byte (bit 0: decode as the client,
/// as the load tool does; bits 1-7: the fragment cap, 0 = none), `k` = a byte (mod 17), `k`
/// read sizes as u16 LE cycled over the data (0 = everything left; none = one read), then
/// the bytes the peer sends.
struct Input<'a> {
    max_message: usize,
    client: bool,
    max_fragments: Option<usize>,
    chunks: Vec<usize>,
    data: &'a [u8],
}

fn split(input: &[u8]) -> Option<Input<'_>> {
    let [m0, m1, flags, k, rest @ ..] = input else {
        return None;
    };
    let k = *k as usize % 17;
    if rest.len() < 2 * k {
        return None;
    }
    let (sizes, data) = rest.split_at(2 * k);
    Some(Input {
        max_message: u16::from_le_bytes([*m0, *m1]) as usize,
        client: flags & 1 != 0,
        max_fragments: Some((flags >> 1) as usize).filter(|&n| n > 0),
        chunks: sizes
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]) as usize)
            .collect(),
        data,
    })
}

fuzz_target!(|input: &[u8]| {
    let Some(input) = split(input) else {
        return;
    };
    let max_message = input.max_message;
    let role = if input.client {
        Role::Client
    } else {
        Role::Server
    };
    let mut d = Decoder::new(role, max_message);
    if let Some(n) = input.max_fragments {
        d = d.with_max_fragments(n);
    }
    // Frames of the message being assembled; never more than the cap.
    let mut fragments = 0usize;
    let mut rest = input.data;
    let mut fed = 0usize;
    let mut sizes = input.chunks.iter().cycle();
    while !rest.is_empty() {
        let n = match sizes.next() {
            Some(&0) | None => rest.len(),
            Some(&n) => n.min(rest.len()),
        };
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        fed += chunk.len();
        d.buffer_mut(chunk.len()).extend_from_slice(chunk);
        loop {
            match d.next_frame() {
                Ok(Some(Decoded::Fragment)) => {
                    fragments += 1;
                    let cap = input.max_fragments.unwrap_or(usize::MAX);
                    assert!(fragments < cap, "{fragments} fragments, cap {cap}");
                }
                Ok(Some(Decoded::Message(m))) => {
                    if matches!(m, Message::Text(_) | Message::Binary(_)) {
                        fragments = 0;
                    }
                    check(&m, max_message)
                }
                Ok(None) => break,
                // The connection answers with a close frame and stops reading.
                Err(_) => return,
            }
        }
        // Whatever is buffered came from the client; what is reserved is bounded by the
        // client's bytes plus one maximal frame (allocator growth at most doubles it).
        assert!(d.buffered() <= fed, "buffered {} > fed {fed}", d.buffered());
        let cap = d.buffer_mut(0).capacity();
        let bound = 4 * (fed + max_message + MAX_HEADER) + 4096;
        assert!(
            cap <= bound,
            "capacity {cap} > {bound} (fed {fed}, max {max_message})"
        );
        d.shrink_if_empty();
    }
});

fn check(m: &Message, max_message: usize) {
    match m {
        Message::Text(t) => {
            assert!(t.len() <= max_message);
            assert!(std::str::from_utf8(t).is_ok(), "text message is not UTF-8");
        }
        Message::Binary(b) => assert!(b.len() <= max_message),
        Message::Ping(p) | Message::Pong(p) => assert!(p.len() <= 125),
        Message::Close(code, reason) => {
            assert!(reason.len() <= 123);
            assert!(code.is_some() || reason.is_empty());
            assert!(
                std::str::from_utf8(reason).is_ok(),
                "close reason is not UTF-8"
            );
        }
    }
}
