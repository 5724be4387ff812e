//! Hostile request bodies (issue 15, findings 1 and 2), against the real binary: a body
//! trickled one byte per TCP segment, plain and chunked, on both routes that take a large
//! body (publish and board scores), and bodies declared or sent larger than the route's
//! limit. Each attack runs beside a healthy subscriber that must see every legitimate
//! publication and nothing else.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use crier::http_client::HttpClient;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The server's limits on the two routes (defaults: `max_message_bytes`, and the scores
/// route's own 1 MiB).
const MAX_PUBLISH: usize = 64 * 1024;
const MAX_SCORES: usize = 1024 * 1024;

/// A subscriber to `t` that must see `{"i":0}`, `{"i":1}`, ... and nothing else.
struct Healthy {
    ws: Ws,
    addr: SocketAddr,
    next: u64,
}

impl Healthy {
    async fn join(addr: SocketAddr) -> Healthy {
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws?topic=t"))
            .await
            .expect("healthy client connects");
        assert_eq!(next_json(&mut ws).await["op"], "subscribed");
        Healthy { ws, addr, next: 0 }
    }

    /// Publishes the next `{"i":N}` and checks it is the next thing the subscriber sees.
    async fn publish_and_receive(&mut self) {
        let (status, body) = HttpClient::new(None)
            .post(
                &format!("http://{}/api/publish/t", self.addr),
                format!("{{\"i\":{}}}", self.next),
            )
            .await
            .expect("publish");
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let m = next_json(&mut self.ws).await;
        assert_eq!(m["data"]["i"], self.next, "healthy client: {m}");
        self.next += 1;
    }
}

/// One attacking request: the route, its body, and whether it is sent chunked.
#[derive(Clone, Copy, Debug)]
enum Route {
    Publish,
    Scores,
}

fn head(addr: SocketAddr, route: Route, chunked: bool, len: usize) -> String {
    let path = match route {
        Route::Publish => "/api/publish/trickled",
        Route::Scores => "/api/boards/trickled/scores",
    };
    let framing = if chunked {
        "Transfer-Encoding: chunked".to_string()
    } else {
        format!("Content-Length: {len}")
    };
    format!("POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n{framing}\r\n\r\n")
}

/// A valid body of about `len` bytes for the route: the server must read all of it.
fn body(route: Route, len: usize) -> Vec<u8> {
    let pad = "x".repeat(len - 64);
    match route {
        Route::Publish => format!("{{\"pad\":\"{pad}\"}}"),
        // JSON whitespace: a score entry carries at most 512 bytes of meta.
        Route::Scores => format!("{{\"player\":\"p\",\"score\":1}}{}", " ".repeat(pad.len())),
    }
    .into_bytes()
}

/// Sends `route`'s request with its body one byte per TCP segment (TCP_NODELAY, one write
/// per byte, ~50 us apart so the server reads them one by one), on a blocking thread.
/// Returns the status line of the answer, or why there was none.
fn trickle(addr: SocketAddr, route: Route, chunked: bool, len: usize) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let body = body(route, len);
    s.write_all(head(addr, route, chunked, body.len()).as_bytes())
        .unwrap();
    for b in &body {
        let w = if chunked {
            s.write_all(&[b'1', b'\r', b'\n', *b, b'\r', b'\n'])
        } else {
            s.write_all(std::slice::from_ref(b))
        };
        if w.is_err() {
            break;
        }
        std::thread::sleep(Duration::from_micros(50));
    }
    if chunked {
        let _ = s.write_all(b"0\r\n\r\n");
    }
    let mut answer = [0u8; 12];
    match s.read_exact(&mut answer) {
        Ok(()) => String::from_utf8_lossy(&answer).to_string(),
        Err(e) => format!("no answer: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_body_costs_the_server_about_its_size_not_a_buffer_per_segment() {
    let dir = tempfile::tempdir().unwrap();
    // Time enough for every trickle to finish: the memory is what is measured, not the
    // deadline.
    let (proc, addr) = serve_binary(dir.path(), "127.0.0.1:0", &["--body-read-timeout", "60s"]);
    let pid = proc.0.id();
    let addr: SocketAddr = addr.parse().unwrap();
    let mut healthy = Healthy::join(addr).await;
    healthy.publish_and_receive().await;
    // The scores route reads its body only once the board is known to be writable.
    let rss_before = vm_rss_kib(pid);

    // One socket per variant, all at once: 40 KB each, ~40,000 segments each.
    const LEN: usize = 40_000;
    let done = Arc::new(AtomicBool::new(false));
    let watch = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while !done.load(Ordering::Relaxed) {
                peak = peak.max(vm_rss_kib(pid));
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        })
    };
    let variants = [
        (Route::Publish, false),
        (Route::Publish, true),
        (Route::Scores, false),
        (Route::Scores, true),
    ];
    let attackers: Vec<_> = variants
        .iter()
        .map(|&(route, chunked)| {
            std::thread::spawn(move || (route, chunked, trickle(addr, route, chunked, LEN)))
        })
        .collect();
    // The healthy subscriber is served all along.
    let started = Instant::now();
    while attackers.iter().any(|a| !a.is_finished()) {
        healthy.publish_and_receive().await;
        assert!(started.elapsed() < Duration::from_secs(60), "trickles end");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for a in attackers {
        let (route, chunked, answer) = a.join().unwrap();
        // The whole body arrived, so it was read to its end and answered.
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "{route:?} chunked={chunked}: {answer}"
        );
    }
    done.store(true, Ordering::Relaxed);
    let peak = watch.join().unwrap();
    let growth = peak.saturating_sub(rss_before);
    eprintln!("trickled bodies: RSS {rss_before} KiB before, peak {peak} KiB (+{growth} KiB)");
    // Before the fix each segment pinned a read buffer: ~4 KB per byte, ~160 MB per socket.
    // Now a socket holds its body (40 KB) plus a read buffer; 2 MiB per socket leaves room
    // for the allocator's and the healthy client's own noise.
    assert!(
        growth < 4 * 2048,
        "4 trickling sockets grew the server by {growth} KiB"
    );
    healthy.publish_and_receive().await;
}

/// Reads one response head (status line and headers) with a deadline.
async fn response_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = within("response head", s.read(&mut byte)).await.unwrap();
        assert_eq!(n, 1, "connection closed before a response head");
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).to_ascii_lowercase()
}

/// The JSON body of a response whose head is `head`.
async fn response_body(s: &mut TcpStream, head: &str) -> Value {
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    let mut body = vec![0u8; len];
    within("response body", s.read_exact(&mut body))
        .await
        .unwrap();
    serde_json::from_slice(&body).unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_length_over_the_limit_gets_413_before_any_body_byte() {
    let dir = tempfile::tempdir().unwrap();
    // A long body deadline: the old server waited for the body until it, then said 408.
    let (_proc, addr) = serve_binary(dir.path(), "127.0.0.1:0", &["--body-read-timeout", "60s"]);
    let addr: SocketAddr = addr.parse().unwrap();
    let mut healthy = Healthy::join(addr).await;
    healthy.publish_and_receive().await;

    for (route, max) in [(Route::Publish, MAX_PUBLISH), (Route::Scores, MAX_SCORES)] {
        for expect_continue in [false, true] {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let mut req = head(addr, route, false, max + 1);
            if expect_continue {
                req.insert_str(req.len() - 2, "Expect: 100-continue\r\n");
            }
            // The head only: not one body byte.
            s.write_all(req.as_bytes()).await.unwrap();
            let head = response_head(&mut s).await;
            assert!(
                head.starts_with("http/1.1 413"),
                "{route:?} expect={expect_continue}: {head}"
            );
            let body = response_body(&mut s, &head).await;
            assert_eq!(body["error"]["code"], "message_too_large", "{body}");
            assert!(
                body["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains(&max.to_string()),
                "{body}"
            );
        }
    }
    // Nothing was published.
    healthy.publish_and_receive().await;
    assert_eq!(
        HttpClient::new(None)
            .get(&format!("http://{addr}/api/boards/trickled"))
            .await
            .unwrap()
            .0,
        404,
        "no board was created"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_gets_413_as_soon_as_it_passes_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let (_proc, addr) = serve_binary(dir.path(), "127.0.0.1:0", &["--body-read-timeout", "60s"]);
    let addr: SocketAddr = addr.parse().unwrap();
    let mut healthy = Healthy::join(addr).await;
    healthy.publish_and_receive().await;

    for (route, max) in [(Route::Publish, MAX_PUBLISH), (Route::Scores, MAX_SCORES)] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(head(addr, route, true, 0).as_bytes())
            .await
            .unwrap();
        // 1 KiB chunks up to one byte past the limit, then silence (no last chunk).
        let chunk = format!("400\r\n{}\r\n", " ".repeat(1024));
        for _ in 0..max / 1024 {
            s.write_all(chunk.as_bytes()).await.unwrap();
        }
        s.write_all(b"1\r\n \r\n").await.unwrap();
        let head = response_head(&mut s).await;
        assert!(head.starts_with("http/1.1 413"), "{route:?}: {head}");
        let body = response_body(&mut s, &head).await;
        assert_eq!(body["error"]["code"], "message_too_large", "{body}");
    }
    healthy.publish_and_receive().await;
}
