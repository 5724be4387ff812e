//! Hostile WebSocket clients (issue #6, items 1 and 7): each attack runs next to a healthy
//! subscriber that must keep receiving every publication, and gets its documented answer.

use std::net::SocketAddr;
use std::time::Duration;

use crate::common::*;
use crier::http_client::HttpClient;
use crier::ws::frame::{self, Decoder, Message as Frame, Role};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// A subscriber to `t` on `addr` that must see publications `{"i":0..n}` in order, each
/// with the next offset after the one its `subscribed` reply named.
async fn healthy(addr: SocketAddr, n: u64) -> tokio::task::JoinHandle<()> {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws?topic=t"))
        .await
        .expect("healthy client connects");
    let subscribed = next_json(&mut ws).await;
    assert_eq!(subscribed["op"], "subscribed");
    let start = subscribed["offset"]
        .as_u64()
        .expect("subscribed names an offset");
    tokio::spawn(async move {
        for i in 0..n {
            let m = next_json(&mut ws).await;
            assert_eq!(m["data"]["i"], i, "healthy client missed or reordered: {m}");
            assert_eq!(m["offset"], start + 1 + i, "healthy client's offsets: {m}");
        }
    })
}

/// Publishes `{"i":0..n}` to `t`, a few milliseconds apart so they span the attack.
async fn publish_all(addr: SocketAddr, n: u64) {
    let http = HttpClient::new(None);
    for i in 0..n {
        let (status, body) = http
            .post(
                &format!("http://{addr}/api/publish/t"),
                format!("{{\"i\":{i}}}"),
            )
            .await
            .expect("publish");
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Frames the server sent, read until it closes the socket. Its close frame is answered
/// with one, as a client does: the server then ends the connection at once, instead of
/// waiting out its close grace (2 s) for an answer that never comes.
async fn server_frames(stream: &mut TcpStream) -> Vec<Frame> {
    let mut d = Decoder::new(Role::Client, 1 << 20);
    let mut frames = Vec::new();
    let mut decoding = true;
    let mut chunk = [0u8; 8192];
    loop {
        let n = within("socket closed by server", stream.read(&mut chunk))
            .await
            .unwrap_or(0);
        if n == 0 {
            return frames;
        }
        d.buffer_mut(n).extend_from_slice(&chunk[..n]);
        while decoding {
            match d.next_message() {
                Ok(Some(Frame::Close(code, reason))) => {
                    frames.push(Frame::Close(code, reason));
                    let answer = frame::close_payload(code.unwrap_or(1000), "");
                    let _ = stream.write_all(&masked(frame::OP_CLOSE, &answer)).await;
                }
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(_) => decoding = false,
            }
        }
    }
}

fn close_code(frames: &[Frame]) -> Option<u16> {
    frames.iter().find_map(|f| match f {
        Frame::Close(code, _) => *code,
        _ => None,
    })
}

fn masked(opcode: u8, payload: &[u8]) -> Vec<u8> {
    frame::encode_masked(opcode, payload, [0x11, 0x22, 0x33, 0x44]).to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_flood_from_a_socket_that_never_reads_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    // The command limit is raised so this test exercises the pong/budget/deadline path
    // rather than the rate limit (tested below).
    let (proc, addr) = serve_binary(
        dir.path(),
        "127.0.0.1:0",
        &[
            "--write-timeout",
            "1s",
            "--max-commands-per-second",
            "100000000",
        ],
    );
    let pid = proc.0.id();
    let addr: SocketAddr = addr.parse().unwrap();
    let rss_before = vm_rss_kib(pid);
    let n = 300;
    let subscriber = healthy(addr, n).await;

    let attacker = raw_ws(addr, "", Some(4096)).await;
    let (mut rd, mut wr) = attacker.into_split();
    let flood = tokio::spawn(async move {
        let pings = b"\x89\x80\0\0\0\0".repeat(10_000);
        let mut sent = 0u64;
        // 16 MB of pings (2.7 million frames): 5 MB of pongs, which the old server queued
        // without bound, one allocation each (the pong count below catches that). The
        // server now answers a few per batch and keeps only the newest beyond that, so its
        // output stays tiny and it never needs to cut this socket off on its own.
        while sent < 16_000_000 && wr.write_all(&pings).await.is_ok() {
            sent += pings.len() as u64;
        }
        (sent, wr)
    });
    let watch = tokio::spawn(async move {
        let mut max = 0;
        loop {
            max = max.max(vm_rss_kib(pid));
            if flood_done() {
                return max;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    publish_all(addr, n).await;
    within("healthy client got everything", subscriber)
        .await
        .unwrap();
    let (sent, wr) = tokio::time::timeout(Duration::from_secs(120), flood)
        .await
        .expect("the server keeps reading the flood")
        .unwrap();
    FLOOD_DONE.store(true, std::sync::atomic::Ordering::SeqCst);
    let max_rss = watch.await.unwrap();
    let rss_after = vm_rss_kib(pid);
    eprintln!(
        "ping flood: {sent} bytes of pings, RSS {rss_before} KiB before, max {max_rss} KiB, \
         {rss_after} KiB after"
    );
    assert!(sent >= 16_000_000);
    assert!(max_rss < 200 * 1024, "server grew to {max_rss} KiB");
    // What it was sent is a few pongs per batch, not one per ping.
    drop(wr);
    let mut rest = Vec::new();
    let _ = within("attacker sees EOF", rd.read_to_end(&mut rest)).await;
    assert!(
        (rest.len() as u64) < sent / 3 / 10,
        "{} bytes of pongs for {} pings",
        rest.len(),
        sent / 6
    );
    assert!(rest.starts_with(b"\x8a\x00"), "pongs come back");
    // Still serving.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws?topic=u"))
        .await
        .unwrap();
    assert_eq!(next_json(&mut ws).await["op"], "subscribed");
}

static FLOOD_DONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
fn flood_done() -> bool {
    FLOOD_DONE.load(std::sync::atomic::Ordering::SeqCst)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_flood_gets_an_error_frame_then_close_4500() {
    let srv = TestServer::start(|_| {}).await;
    let n = 100;
    let subscriber = healthy(srv.addr, n).await;
    let mut attacker = raw_ws(srv.addr, "", None).await;
    // Far more than the default burst (2 x 100), in one write, as fast as TCP allows.
    let mut flood = Vec::new();
    for i in 0..2_000 {
        let cmd = match i % 3 {
            0 => format!(r#"{{"op":"subscribe","topic":"x{}"}}"#, i % 50),
            1 => format!(r#"{{"op":"unsubscribe","topic":"x{}"}}"#, i % 50),
            _ => r#"{"op":"ping"}"#.to_string(),
        };
        flood.extend_from_slice(&masked(frame::OP_TEXT, cmd.as_bytes()));
        // WebSocket pings count too: a ping flood at the defaults ends the same way.
        flood.extend_from_slice(&masked(frame::OP_PING, b""));
    }
    let (_, frames) = tokio::join!(publish_all(srv.addr, n), async {
        attacker.write_all(&flood).await.unwrap();
        let frames = server_frames(&mut attacker).await;
        frames
    });
    within("healthy client got everything", subscriber)
        .await
        .unwrap();
    let errors: Vec<serde_json::Value> = frames
        .iter()
        .filter_map(|f| match f {
            Frame::Text(t) => serde_json::from_slice(t).ok(),
            _ => None,
        })
        .filter(|v: &serde_json::Value| v["op"] == "error")
        .collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0]["code"], "too_many_commands");
    assert_eq!(close_code(&frames), Some(4500));
    // The burst was answered, the rest was not.
    let replies = frames
        .iter()
        .filter(|f| matches!(f, Frame::Text(_) | Frame::Pong(_)))
        .count();
    assert!((100..2_000).contains(&replies), "{replies} replies");
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc6455_violations_close_with_1002() {
    let srv = TestServer::start(|_| {}).await;
    let n = 40;
    let subscriber = healthy(srv.addr, n).await;
    let publisher = tokio::spawn(publish_all(srv.addr, n));

    // Close codes that must never appear on the wire.
    for code in [999u16, 1005, 1006, 1015, 2000, 5000] {
        let mut s = raw_ws(srv.addr, "", None).await;
        s.write_all(&masked(frame::OP_CLOSE, &frame::close_payload(code, "")))
            .await
            .unwrap();
        assert_eq!(
            close_code(&server_frames(&mut s).await),
            Some(1002),
            "close code {code}"
        );
    }
    // A registered code is echoed as a normal close.
    let mut s = raw_ws(srv.addr, "", None).await;
    s.write_all(&masked(frame::OP_CLOSE, &frame::close_payload(1001, "")))
        .await
        .unwrap();
    assert_eq!(close_code(&server_frames(&mut s).await), Some(1000));

    // A 64-bit length with the top bit set is malformed (1002), not "too large" (1009).
    let mut s = raw_ws(srv.addr, "", None).await;
    let mut f = vec![0x81, 0x80 | 127];
    f.extend_from_slice(&(1u64 << 63).to_be_bytes());
    f.extend_from_slice(&[1, 2, 3, 4]);
    s.write_all(&f).await.unwrap();
    assert_eq!(close_code(&server_frames(&mut s).await), Some(1002));

    // After a protocol error (an unmasked frame) the client's close reply is read as one:
    // the server ends the connection after it, not after a timeout.
    let mut s = raw_ws(srv.addr, "", None).await;
    s.write_all(&frame::encode(frame::OP_TEXT, b"{}"))
        .await
        .unwrap();
    let mut head = [0u8; 2];
    within("close frame", s.read_exact(&mut head))
        .await
        .unwrap();
    assert_eq!(head[0], 0x80 | frame::OP_CLOSE);
    let mut body = vec![0u8; head[1] as usize];
    s.read_exact(&mut body).await.unwrap();
    assert_eq!(u16::from_be_bytes([body[0], body[1]]), 1002);
    s.write_all(&masked(frame::OP_CLOSE, &frame::close_payload(1002, "")))
        .await
        .unwrap();
    assert!(read_to_end(&mut s).await.is_empty());

    within("publisher", publisher).await.unwrap();
    within("healthy client got everything", subscriber)
        .await
        .unwrap();
    srv.shutdown().await;
}

/// Sends a raw upgrade request and returns the response head.
async fn handshake(addr: SocketAddr, key: Option<&str>, version: Option<&str>) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "GET /ws?topic=t HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    );
    if let Some(k) = key {
        req += &format!("Sec-WebSocket-Key: {k}\r\n");
    }
    if let Some(v) = version {
        req += &format!("Sec-WebSocket-Version: {v}\r\n");
    }
    req += "\r\n";
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = within("handshake answer", s.read(&mut buf)).await.unwrap();
    String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase()
}

#[tokio::test]
async fn bad_handshakes_are_refused_with_the_right_status() {
    let srv = TestServer::start(|_| {}).await;
    let good = "dGhlIHNhbXBsZSBub25jZQ==";
    let r = handshake(srv.addr, Some(good), Some("8")).await;
    assert!(r.starts_with("http/1.1 426"), "{r}");
    assert!(r.contains("sec-websocket-version: 13"), "{r}");
    assert!(r.contains("\"bad_version\""), "{r}");
    let r = handshake(srv.addr, Some(good), None).await;
    assert!(r.starts_with("http/1.1 426"), "{r}");
    assert!(r.contains("sec-websocket-version: 13"), "{r}");
    for key in [
        "short",
        "aGVsbG8gd29ybGQgaGVsbG8gd29ybGQ=",
        "dGhlIHNhbXBsZSBub25jZQ",
    ] {
        let r = handshake(srv.addr, Some(key), Some("13")).await;
        assert!(r.starts_with("http/1.1 400"), "{key}: {r}");
        assert!(r.contains("\"bad_handshake\""), "{r}");
    }
    let r = handshake(srv.addr, None, Some("13")).await;
    assert!(r.starts_with("http/1.1 400"), "{r}");
    let r = handshake(srv.addr, Some(good), Some("13")).await;
    assert!(r.starts_with("http/1.1 101"), "{r}");
    srv.shutdown().await;
}

#[tokio::test]
async fn echo_endpoint_echoes_only_when_enabled() {
    let srv = TestServer::start(|_| {}).await;
    let (s, b) = srv.get("/echo").await;
    assert_eq!((s, b["error"]["code"].as_str()), (404, Some("not_found")));
    srv.shutdown().await;

    let srv = TestServer::start(|c| c.echo_endpoint = true).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/echo", srv.addr))
        .await
        .unwrap();
    ws.send(Message::Text("héllo".into())).await.unwrap();
    ws.send(Message::Binary(vec![0u8, 1, 2, 255].into()))
        .await
        .unwrap();
    let big = "z".repeat(60_000);
    ws.send(Message::Text(big.clone().into())).await.unwrap();
    let mut got = Vec::new();
    while got.len() < 3 {
        match within("echo", ws.next()).await.unwrap().unwrap() {
            Message::Ping(_) | Message::Pong(_) => {}
            m => got.push(m),
        }
    }
    assert_eq!(got[0], Message::Text("héllo".into()));
    assert_eq!(got[1], Message::Binary(vec![0u8, 1, 2, 255].into()));
    assert_eq!(got[2], Message::Text(big.into()));
    // The same limits as /ws: a message over max_message_bytes closes with 1009.
    ws.send(Message::Binary(vec![7u8; 70_000].into()))
        .await
        .unwrap();
    assert_eq!(expect_close(&mut ws).await, 1009);
    srv.shutdown().await;
}

fn disconnects(srv: &TestServer, reason: crier::close::DisconnectReason) -> u64 {
    srv.state()
        .metrics
        .disconnects
        .get_or_create(&crier::metrics::ReasonLabel {
            transport: crier::metrics::Transport::Ws,
            reason: reason.label(),
        })
        .get()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_message_counts_against_the_same_budget_as_the_queue() {
    let srv = TestServer::start(|c| {
        c.max_message_bytes = 150_000;
        c.queue_max_bytes = 200_000;
    })
    .await;
    let n = 20;
    let subscriber = healthy(srv.addr, n).await;
    let mut s = raw_ws(srv.addr, "?topic=big", None).await;
    let mut head = [0u8; 2];
    within("subscribed", s.read_exact(&mut head)).await.unwrap();
    let mut body = vec![0u8; head[1] as usize];
    s.read_exact(&mut body).await.unwrap();
    // The first 140 kB fragment of a text message, then a ping: its pong says the server
    // has taken the fragment in (and counted it).
    let mut first = masked(frame::OP_TEXT, &vec![b' '; 140_000]);
    first[0] &= 0x7F;
    s.write_all(&first).await.unwrap();
    s.write_all(&masked(frame::OP_PING, b"p")).await.unwrap();
    let mut pong = [0u8; 3];
    within("pong", s.read_exact(&mut pong)).await.unwrap();
    assert_eq!(pong, [0x8A, 1, b'p']);
    // 70 kB on its own fits the 200 kB budget; beside the 140 kB held, it does not.
    let big = format!("\"{}\"", "y".repeat(70_000));
    let (status, _) = srv.publish("big", &big).await;
    assert_eq!(status, 200);
    let frames = server_frames(&mut s).await;
    assert_eq!(close_code(&frames), Some(4001));
    assert!(!frames.iter().any(|f| matches!(f, Frame::Text(_))));
    publish_all(srv.addr, n).await;
    within("healthy client got everything", subscriber)
        .await
        .unwrap();
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickle_of_reading_does_not_extend_the_write_deadline() {
    let srv = TestServer::start(|c| {
        c.write_timeout = Duration::from_secs(1);
        c.queue_max_bytes = 32 * 1024 * 1024;
    })
    .await;
    let n = 20;
    let subscriber = healthy(srv.addr, n).await;
    let mut s = raw_ws(srv.addr, "?topic=flood", Some(4096)).await;
    wait_until("subscribed", || {
        srv.state().hub.subscriber_count("flood") == 1
    })
    .await;
    // More than the kernel buffers hold, all of it within the queue budget: only the write
    // deadline can end this client.
    let pad = format!("\"{}\"", "z".repeat(60_000));
    for _ in 0..150 {
        let (status, _) = srv.publish("flood", &pad).await;
        assert_eq!(status, 200);
    }
    // Reads a byte every 20 ms: progress, but nowhere near a batch per write_timeout.
    let trickle = async {
        let mut byte = [0u8; 1];
        loop {
            match s.read(&mut byte).await {
                Ok(1) => tokio::time::sleep(Duration::from_millis(20)).await,
                _ => return,
            }
        }
    };
    let cut_off = wait_until("closed for write_timeout", || {
        disconnects(&srv, crier::close::DisconnectReason::WriteTimeout) == 1
    });
    // (What the kernel already buffered for it takes the trickle minutes to read, so the
    // server's side is what is watched.)
    let (_, ()) = tokio::join!(publish_all(srv.addr, n), async {
        tokio::select! {
            () = cut_off => {}
            () = trickle => panic!("the socket ended without a write_timeout close"),
        }
    });
    within("healthy client got everything", subscriber)
        .await
        .unwrap();
    assert_eq!(srv.state().hub.subscriber_count("flood"), 0);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_write_deadline_fires_while_the_socket_is_always_readable() {
    let srv = TestServer::start(|c| {
        c.write_timeout = Duration::from_secs(1);
        c.queue_max_bytes = 32 * 1024 * 1024;
        c.max_commands_per_second = 100_000_000;
    })
    .await;
    let n = 20;
    let subscriber = healthy(srv.addr, n).await;
    let s = raw_ws(srv.addr, "?topic=flood", Some(4096)).await;
    wait_until("subscribed", || {
        srv.state().hub.subscriber_count("flood") == 1
    })
    .await;
    let (_rd, mut wr) = s.into_split();
    // Pings without end, never reading: the server always has input waiting.
    let flood = tokio::spawn(async move {
        let pings = b"\x89\x80\0\0\0\0".repeat(10_000);
        while wr.write_all(&pings).await.is_ok() {}
    });
    // Enough to fill the kernel buffers, so a write batch stalls.
    let pad = format!("\"{}\"", "z".repeat(60_000));
    for _ in 0..150 {
        let (status, _) = srv.publish("flood", &pad).await;
        assert_eq!(status, 200);
    }
    publish_all(srv.addr, n).await;
    wait_until("closed for write_timeout despite the flood", || {
        disconnects(&srv, crier::close::DisconnectReason::WriteTimeout) == 1
    })
    .await;
    within("flood ends once the server closed", flood)
        .await
        .unwrap();
    within("healthy client got everything", subscriber)
        .await
        .unwrap();
    srv.shutdown().await;
}

// Issue 15, finding 3: frames that carry nothing still cost the server a decode each, so
// every frame counts against the connection's command budget (empty continuations, pings
// and pongs included), and one message may not be assembled from more than
// `max_fragments_per_message` fragments (close 4502 past it).

/// A masked data frame; `fin` false makes it a fragment of a message still to be finished.
fn fragment(opcode: u8, payload: &[u8], fin: bool) -> Vec<u8> {
    let mut f = masked(opcode, payload);
    if !fin {
        f[0] &= 0x7F;
    }
    f
}

/// `text` as one message of exactly `n` fragments (n >= 2): the first and last carry it,
/// the n - 2 between them are empty continuations.
fn in_fragments(text: &str, n: usize) -> Vec<u8> {
    let (head, tail) = text.split_at(text.len() - 1);
    let mut out = fragment(frame::OP_TEXT, head.as_bytes(), false);
    for _ in 0..n - 2 {
        out.extend_from_slice(&fragment(frame::OP_CONT, b"", false));
    }
    out.extend_from_slice(&fragment(frame::OP_CONT, tail.as_bytes(), true));
    out
}

/// Writes `first` once, then `chunk` again and again (at most 2 GB), while reading what
/// the server sends until its close frame or EOF, which must come within `WAIT`. Returns
/// the server's frames and the bytes written.
async fn flood_until_closed(
    stream: TcpStream,
    first: Vec<u8>,
    chunk: Vec<u8>,
) -> (Vec<Frame>, u64) {
    let (mut rd, mut wr) = stream.into_split();
    let written = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = written.clone();
    let writer = tokio::spawn(async move {
        if wr.write_all(&first).await.is_err() {
            return;
        }
        while counter.load(std::sync::atomic::Ordering::Relaxed) < 2_000_000_000 {
            if wr.write_all(&chunk).await.is_err() {
                return;
            }
            counter.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
    });
    let read = async {
        let mut d = Decoder::new(Role::Client, 1 << 20);
        let mut frames = Vec::new();
        loop {
            while let Ok(Some(f)) = d.next_message() {
                let closed = matches!(f, Frame::Close(..));
                frames.push(f);
                if closed {
                    return frames;
                }
            }
            match rd.read_buf(d.buffer_mut(64 * 1024)).await {
                Ok(0) | Err(_) => return frames,
                Ok(_) => {}
            }
        }
    };
    let frames = tokio::time::timeout(WAIT, read).await;
    writer.abort();
    let sent = written.load(std::sync::atomic::Ordering::Relaxed);
    let frames = frames.unwrap_or_else(|_| {
        panic!("the server did not close the flooding socket within {WAIT:?} ({sent} bytes sent)")
    });
    (frames, sent)
}

fn error_codes(frames: &[Frame]) -> Vec<String> {
    frames
        .iter()
        .filter_map(|f| match f {
            Frame::Text(t) => serde_json::from_slice::<serde_json::Value>(t).ok(),
            _ => None,
        })
        .filter(|v| v["op"] == "error")
        .map(|v| v["code"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// The server's next frame on a raw client socket.
async fn next_server_frame(s: &mut TcpStream, d: &mut Decoder) -> Frame {
    loop {
        if let Some(f) = d.next_message().expect("the server's frames decode") {
            return f;
        }
        let n = within("a frame from the server", s.read_buf(d.buffer_mut(4096)))
            .await
            .unwrap();
        assert!(n > 0, "the server closed the socket");
    }
}

/// The next text frame as JSON, skipping pings and pongs.
async fn next_server_json(s: &mut TcpStream, d: &mut Decoder) -> serde_json::Value {
    loop {
        match next_server_frame(s, d).await {
            Frame::Text(t) => return serde_json::from_slice(&t).unwrap(),
            Frame::Ping(_) | Frame::Pong(_) => {}
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// The `crier_disconnects_total` of WebSocket connections for `reason`, from /metrics.
async fn ws_disconnects(addr: SocketAddr, reason: &str) -> u64 {
    let (status, body) = HttpClient::new(None)
        .get(&format!("http://{addr}/metrics"))
        .await
        .expect("GET /metrics");
    assert_eq!(status, 200);
    let text = String::from_utf8_lossy(&body).to_string();
    text.lines()
        .filter(|l| l.starts_with("crier_disconnects_total{"))
        .filter(|l| l.contains("transport=\"ws\"") && l.contains(&format!("reason=\"{reason}\"")))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

/// The finding as reported: a text frame with FIN=0, then empty continuations without end.
/// Each is a frame, so the defaults' command budget (100/s, bursts of 200) ends it with
/// `too_many_commands` and close 4500; a healthy subscriber beside it misses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_empty_continuations_are_closed_with_4500() {
    let dir = tempfile::tempdir().unwrap();
    let (_proc, addr) = serve_binary(dir.path(), "127.0.0.1:0", &[]);
    let addr: SocketAddr = addr.parse().unwrap();
    let n = 100;
    let subscriber = healthy(addr, n).await;
    let publisher = tokio::spawn(publish_all(addr, n));

    let attacker = raw_ws(addr, "", None).await;
    let first = fragment(frame::OP_TEXT, br#"{"op":"#, false);
    let empty = fragment(frame::OP_CONT, b"", false).repeat(10_000);
    let (frames, sent) = flood_until_closed(attacker, first, empty).await;
    eprintln!(
        "empty continuations: closed after {sent} bytes sent ({} frames)",
        sent / 6
    );
    assert_eq!(error_codes(&frames), ["too_many_commands"], "{frames:?}");
    assert_eq!(close_code(&frames), Some(4500), "{frames:?}");

    within("publisher", publisher).await.unwrap();
    within("healthy client got everything", subscriber)
        .await
        .unwrap();
    assert_eq!(ws_disconnects(addr, "too_many_commands").await, 1);
}

/// Pings were counted already; unsolicited pongs are frames too, and a flood of either
/// ends with close 4500 at the defaults.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_and_pong_floods_count_against_the_command_budget() {
    let dir = tempfile::tempdir().unwrap();
    let (_proc, addr) = serve_binary(dir.path(), "127.0.0.1:0", &[]);
    let addr: SocketAddr = addr.parse().unwrap();
    let n = 100;
    let subscriber = healthy(addr, n).await;
    let publisher = tokio::spawn(publish_all(addr, n));
    for opcode in [frame::OP_PING, frame::OP_PONG] {
        let attacker = raw_ws(addr, "", None).await;
        let flood = masked(opcode, b"").repeat(10_000);
        let (frames, sent) = flood_until_closed(attacker, Vec::new(), flood).await;
        eprintln!("opcode {opcode:#x}: closed after {sent} bytes sent");
        assert_eq!(error_codes(&frames), ["too_many_commands"], "{frames:?}");
        assert_eq!(
            close_code(&frames),
            Some(4500),
            "opcode {opcode:#x}: {frames:?}"
        );
        // Pings within the budget were answered, pongs never are.
        let pongs = frames
            .iter()
            .filter(|f| matches!(f, Frame::Pong(_)))
            .count();
        if opcode == frame::OP_PONG {
            assert_eq!(pongs, 0);
        } else {
            assert!((1..=200).contains(&pongs), "{pongs} pongs");
        }
    }
    within("publisher", publisher).await.unwrap();
    within("healthy client got everything", subscriber)
        .await
        .unwrap();
    assert_eq!(ws_disconnects(addr, "too_many_commands").await, 2);
}

/// With the command rate out of the way (an operator raised it), a message still cannot be
/// assembled from more than `max_fragments_per_message` fragments: by default one per 64
/// bytes of `max_message_bytes`, 1,024 at the default 64 KiB. A message of exactly that
/// many is answered; one more fragment, or an endless run of empty continuations, gets
/// close 4502 `too_many_fragments`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_past_the_fragment_cap_is_closed_with_4502() {
    let dir = tempfile::tempdir().unwrap();
    let (_proc, addr) = serve_binary(
        dir.path(),
        "127.0.0.1:0",
        &["--max-commands-per-second", "100000000"],
    );
    let addr: SocketAddr = addr.parse().unwrap();
    let n = 100;
    let subscriber = healthy(addr, n).await;
    let publisher = tokio::spawn(publish_all(addr, n));

    // At the cap: answered.
    let mut s = raw_ws(addr, "", None).await;
    let mut d = Decoder::new(Role::Client, 1 << 20);
    s.write_all(&in_fragments(r#"{"op":"ping","id":1}"#, 1024))
        .await
        .unwrap();
    let reply = next_server_json(&mut s, &mut d).await;
    assert_eq!(
        (&reply["op"], &reply["id"]),
        (&"pong".into(), &1.into()),
        "{reply}"
    );
    // One past it: closed, at the fragment that goes over.
    s.write_all(&in_fragments(r#"{"op":"ping","id":2}"#, 1025))
        .await
        .unwrap();
    let frames = server_frames(&mut s).await;
    assert_eq!(close_code(&frames), Some(4502), "{frames:?}");
    assert!(
        frames
            .iter()
            .any(|f| matches!(f, Frame::Close(_, r) if &r[..] == b"too_many_fragments")),
        "{frames:?}"
    );
    assert_eq!(error_codes(&frames), Vec::<String>::new());

    // The finding's attack, with the rate raised: ended by the fragment cap.
    let attacker = raw_ws(addr, "", None).await;
    let first = fragment(frame::OP_TEXT, br#"{"op":"#, false);
    let empty = fragment(frame::OP_CONT, b"", false).repeat(10_000);
    let (frames, sent) = flood_until_closed(attacker, first, empty).await;
    eprintln!("empty continuations, rate raised: closed after {sent} bytes sent");
    assert_eq!(close_code(&frames), Some(4502), "{frames:?}");

    within("publisher", publisher).await.unwrap();
    within("healthy client got everything", subscriber)
        .await
        .unwrap();
    assert_eq!(ws_disconnects(addr, "too_many_fragments").await, 2);
}

/// Legitimate fragmentation keeps working at the default command rate: a subscribe in 16
/// fragments with a ping between them is answered (pong first, then `subscribed`), and
/// publications follow. `--max-fragments-per-message 16` makes the 17th fragment of the
/// next message one too many.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fragmented_message_under_the_cap_still_works() {
    let dir = tempfile::tempdir().unwrap();
    let (_proc, addr) = serve_binary(
        dir.path(),
        "127.0.0.1:0",
        &["--max-fragments-per-message", "16"],
    );
    let addr: SocketAddr = addr.parse().unwrap();
    let n = 40;
    let subscriber = healthy(addr, n).await;

    let mut s = raw_ws(addr, "", None).await;
    let mut d = Decoder::new(Role::Client, 1 << 20);
    let cmd = r#"{"op":"subscribe","topic":"frag","id":"f"}"#;
    // 16 fragments of 2-3 bytes each, a ping after the 8th.
    let b = cmd.as_bytes();
    let pieces: Vec<&[u8]> = (0..16)
        .map(|i| &b[i * b.len() / 16..(i + 1) * b.len() / 16])
        .collect();
    let mut msg = Vec::new();
    for (i, p) in pieces.iter().enumerate() {
        let op = if i == 0 {
            frame::OP_TEXT
        } else {
            frame::OP_CONT
        };
        msg.extend_from_slice(&fragment(op, p, i == 15));
        if i == 7 {
            msg.extend_from_slice(&masked(frame::OP_PING, b"mid"));
        }
    }
    s.write_all(&msg).await.unwrap();
    assert_eq!(
        next_server_frame(&mut s, &mut d).await,
        Frame::Pong(bytes::Bytes::from_static(b"mid"))
    );
    let reply = next_server_json(&mut s, &mut d).await;
    assert_eq!(
        (&reply["op"], &reply["id"]),
        (&"subscribed".into(), &"f".into()),
        "{reply}"
    );
    let (status, body) = HttpClient::new(None)
        .post(
            &format!("http://{addr}/api/publish/frag"),
            "{\"x\":1}".to_string(),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let publication = next_server_json(&mut s, &mut d).await;
    assert_eq!(publication["data"]["x"], 1, "{publication}");

    // 17 fragments: one too many.
    s.write_all(&in_fragments(r#"{"op":"ping"}"#, 17))
        .await
        .unwrap();
    let frames = server_frames(&mut s).await;
    assert_eq!(close_code(&frames), Some(4502), "{frames:?}");

    publish_all(addr, n).await;
    within("healthy client got everything", subscriber)
        .await
        .unwrap();
}
