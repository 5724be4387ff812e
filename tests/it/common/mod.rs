//! Test harness: a real server on 127.0.0.1:0 in this process, real clients over loopback
//! (tokio-tungstenite for WebSocket, raw HTTP for SSE), and waits on conditions with a
//! deadline instead of sleeps.
#![allow(dead_code)]

pub mod auth;
pub mod disk;
pub mod eventsource;
pub mod http;
pub mod redis;
pub mod tools;

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crier::config::Config;
use crier::server::Server;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub const WAIT: Duration = Duration::from_secs(10);

pub struct TestServer {
    pub server: Option<Server>,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl TestServer {
    pub async fn start(tweak: impl FnOnce(&mut Config)) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.path().to_path_buf(),
            ..Config::default()
        };
        tweak(&mut cfg);
        let server = Server::start(cfg).await.expect("server starts");
        let addr = server.addr;
        TestServer {
            server: Some(server),
            addr,
            dir,
        }
    }

    pub fn state(&self) -> &std::sync::Arc<crier::state::AppState> {
        &self.server.as_ref().unwrap().state
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn publish(&self, topic: &str, body: &str) -> (u16, Value) {
        self.post_with_key(&format!("/api/publish/{topic}"), body, None)
            .await
    }

    /// Posts one score to `board` (200 expected) and waits until the board's first update
    /// is published, so a subscriber that comes next finds its snapshot.
    pub async fn post_first_score(&self, board: &str, player: &str, score: i64) -> Value {
        let (s, body) = self
            .post_with_key(
                &format!("/api/boards/{board}/scores"),
                &format!(r#"{{"player":"{player}","score":{score}}}"#),
                None,
            )
            .await;
        assert_eq!(s, 200, "{body}");
        let metrics = self.state().metrics.clone();
        wait_until("the board is published", || {
            metrics.board_updates.get() >= 1
        })
        .await;
        body
    }

    pub async fn post_with_key(&self, path: &str, body: &str, key: Option<&str>) -> (u16, Value) {
        http::post_url(&self.url(path), body.to_string(), key).await
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        http::get(self.addr, path).await
    }

    pub async fn ws(&self, query: &str) -> Ws {
        http::ws(self.addr, query).await
    }

    /// Waits until the server holds no connection and no subscription, and every
    /// connection task has ended: what a leak would break.
    pub async fn assert_clean(&self) {
        let state = self.state().clone();
        wait_until("no connections, subscriptions or tasks left", || {
            state.connection_count() == 0
                && state.hub.total_subscriptions() == 0
                && state.tracker.is_empty()
        })
        .await;
        assert_eq!(state.metrics.subscriptions.get(), 0);
    }

    pub async fn shutdown(mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
    }
}

/// Polls `cond` every few milliseconds until it holds, failing after `WAIT`.
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// The next publication's `data` on a WebSocket: command replies skipped, an error
/// reply fails the test. Each frame is awaited within `WAIT`.
pub async fn next_data(ws: &mut Ws) -> Value {
    loop {
        let m = next_json(ws).await;
        if m.get("op").is_none() {
            return m["data"].clone();
        }
        assert_ne!(m["op"], "error", "{m}");
    }
}

/// The next text frame as JSON (pings are answered by tungstenite and skipped).
pub async fn next_json(ws: &mut Ws) -> Value {
    loop {
        let msg = within("next ws message", ws.next())
            .await
            .expect("stream open")
            .expect("ws message");
        match msg {
            Message::Text(t) => return serde_json::from_str(&t).expect("server sends JSON"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

pub async fn send_json(ws: &mut Ws, v: &str) {
    ws.send(Message::Text(v.into())).await.expect("ws send");
}

/// Sends `{"op":op,"topic":topic}` (`subscribe`, `unsubscribe`) and returns its reply
/// (`subscribed`, `unsubscribed`), skipping publications and notices that come first; an
/// error reply fails the test.
pub async fn topic_command(ws: &mut Ws, op: &str, topic: &str) -> Value {
    send_json(
        ws,
        &format!(r#"{{"op":"{op}","topic":"{topic}","id":"{op}"}}"#),
    )
    .await;
    let reply = format!("{op}d");
    loop {
        let v = next_json(ws).await;
        if v["op"] == reply.as_str() {
            return v;
        }
        assert_ne!(v["op"], "error", "{v}");
    }
}

/// Reads until the server's close frame; returns its code. The close is answered, as a
/// client does (tungstenite sends the answer on the next read), and the socket read to its
/// end: the server then ends the connection at once instead of waiting out its close
/// grace (2 s), so what a test checks next (a disconnect counted) is not held up.
pub async fn expect_close(ws: &mut Ws) -> u16 {
    let code = loop {
        match within("close frame", ws.next()).await {
            Some(Ok(Message::Close(Some(f)))) => break f.code.into(),
            Some(Ok(Message::Close(None))) => break 1005,
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("connection failed before a close frame: {e}"),
            None => panic!("stream ended without a close frame"),
        }
    };
    within("the end of the connection", async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    code
}

/// A minimal SSE reader on a raw socket: returns events' data lines as JSON.
pub struct Sse {
    stream: TcpStream,
    buf: Vec<u8>,
    pub comments: Vec<String>,
}

impl Sse {
    pub async fn connect(addr: SocketAddr, query: &str) -> Sse {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let req = format!(
            "GET /sse{query} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n"
        );
        stream.write_all(req.as_bytes()).await.unwrap();
        let mut sse = Sse {
            stream,
            buf: Vec::new(),
            comments: Vec::new(),
        };
        let head = sse.read_until(b"\r\n\r\n").await.expect("response head");
        let head = String::from_utf8_lossy(&head).to_string();
        assert!(head.starts_with("HTTP/1.1 200"), "SSE refused: {head}");
        assert!(head
            .to_ascii_lowercase()
            .contains("content-type: text/event-stream"));
        sse
    }

    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 8192];
        match within("sse read", self.stream.read(&mut chunk)).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    async fn read_until(&mut self, delim: &[u8]) -> Option<Vec<u8>> {
        loop {
            if let Some(i) = self.buf.windows(delim.len()).position(|w| w == delim) {
                let out = self.buf[..i].to_vec();
                self.buf.drain(..i + delim.len());
                return Some(out);
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// The next unnamed event's joined data as JSON (what `EventSource.onmessage` sees),
    /// skipping comments, chunk sizes, `retry:` and named events such as `subscribed`.
    /// The id is the offset of a one-topic stream's id (`EPOCH:OFFSET`). None when the
    /// stream ends.
    pub async fn next_event(&mut self) -> Option<(Option<u64>, Value)> {
        loop {
            let block = self.read_until(b"\n\n").await?;
            let text = String::from_utf8_lossy(&block).to_string();
            let mut id = None;
            let mut data = Vec::new();
            let mut named = false;
            for line in text.lines() {
                // Chunked transfer-encoding size lines are hex digits alone on a line.
                if let Some(c) = line.strip_prefix(':') {
                    self.comments.push(c.trim().to_string());
                } else if let Some(v) = line.strip_prefix("id: ") {
                    id = v.trim().rsplit(':').next().and_then(|o| o.parse().ok());
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data.push(v.to_string());
                } else if line.starts_with("event:") {
                    named = true;
                }
            }
            if !data.is_empty() && !named {
                return Some((
                    id,
                    serde_json::from_str(&data.join("\n")).expect("SSE data is JSON"),
                ));
            }
        }
    }
}

/// Opens a WebSocket with a raw handshake and returns the socket without ever reading
/// from it again: the stalled or silent client the server must deal with.
pub async fn raw_ws(addr: SocketAddr, query: &str, recv_buffer: Option<u32>) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    if let Some(size) = recv_buffer {
        socket.set_recv_buffer_size(size).unwrap();
    }
    let mut stream = socket.connect(addr).await.unwrap();
    let req = format!(
        "GET /ws{query} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        within("handshake", stream.read_exact(&mut byte))
            .await
            .unwrap();
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    stream
}

/// Reads and discards until the peer closes; returns the bytes read.
pub async fn read_to_end(stream: &mut TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    let _ = within("socket closed by server", stream.read_to_end(&mut all)).await;
    all
}

/// Reads publications (frames with an object `data`) until offset `last`; returns their
/// offsets, in the order they came.
pub async fn offsets_until(ws: &mut Ws, last: u64) -> Vec<u64> {
    let mut got = Vec::new();
    within("publications up to the last", async {
        while got.last() != Some(&last) {
            let v = next_json(ws).await;
            if let Some(o) = v["offset"].as_u64().filter(|_| v["data"].is_object()) {
                got.push(o);
            }
        }
    })
    .await;
    got
}

/// The resident memory of process `pid`, in KiB (Linux: `/proc/PID/status`).
pub fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// The real `crier` binary, killed when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `crier serve --listen LISTEN --data-dir DIR EXTRA...` and returns it with the
/// address it logged ("listening on http://ADDR").
pub fn serve_binary(dir: &std::path::Path, listen: &str, extra: &[&str]) -> (Proc, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_crier"));
    cmd.args(["serve", "--listen", listen, "--data-dir"])
        .arg(dir)
        .args(extra);
    let (proc, addr, _logs) = spawn_logged(cmd);
    (proc, addr)
}

/// Spawns a crier command with its stdout piped; returns it, the address it logged, and
/// every line it logs (those before the address too) for tests that look for a message.
pub fn spawn_logged(mut cmd: Command) -> (Proc, String, std::sync::mpsc::Receiver<String>) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("crier starts");
    let stdout = child.stdout.take().unwrap();
    // CRIER_TEST_LOGS=1 prints every server line too, prefixed with its process id: the
    // way to see what the nodes did when a test that failed rarely fails again.
    let echo = std::env::var_os("CRIER_TEST_LOGS").is_some();
    let pid = child.id();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (log_tx, log_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(i) = line.find("listening on http") {
                // Text or JSON lines, http:// or https://: the address ends where its
                // characters do.
                let rest = line[i..].split("://").nth(1).unwrap_or_default();
                let addr: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || ".:[]".contains(*c))
                    .collect();
                let _ = addr_tx.send(addr);
            }
            if echo {
                eprintln!("[{pid}] {line}");
            }
            // Go on draining when nobody listens: a full pipe would block the server.
            let _ = log_tx.send(line);
        }
    });
    let addr = addr_rx.recv_timeout(WAIT).expect("crier logs its address");
    (Proc(child), addr, log_rx)
}
