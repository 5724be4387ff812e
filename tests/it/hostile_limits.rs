//! One address trying to take every slot, opening connections as fast as it can, holding
//! headers or bodies open, or running the process out of file descriptors: each gets its
//! documented answer, and a healthy client on another loopback address (127.0.0.2) keeps
//! receiving every publication meanwhile.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use crate::common::*;
use crier::conn_limits::Refusal;
use crier::http_client::HttpClient;
use crier::metrics::RefusalLabel;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::MaybeTlsStream;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A TCP connection from the loopback address `src`, so tests can be several clients.
async fn tcp_from(src: &str, addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(ip(src), 0)).unwrap();
    socket.connect(addr).await.unwrap()
}

async fn ws_from(src: &str, addr: SocketAddr, query: &str) -> Ws {
    let tcp = tcp_from(src, addr).await;
    let (ws, _) = tokio_tungstenite::client_async(
        format!("ws://{addr}/ws{query}"),
        MaybeTlsStream::Plain(tcp),
    )
    .await
    .expect("ws handshake");
    ws
}

/// Reads one HTTP/1.1 response (head and Content-Length body) from `stream`.
async fn read_response(stream: &mut TcpStream) -> Option<(u16, Value)> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match within("response head", stream.read(&mut byte)).await {
            Ok(1) => buf.push(byte[0]),
            _ => return None,
        }
    }
    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    let status = head.get(9..12)?.parse().ok()?;
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    let mut body = vec![0u8; len];
    within("response body", stream.read_exact(&mut body))
        .await
        .ok()?;
    Some((status, serde_json::from_slice(&body).unwrap_or(Value::Null)))
}

/// Sends `GET path` on a kept-alive connection and returns the status.
async fn get_on(stream: &mut TcpStream, path: &str) -> Option<(u16, Value)> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: crier\r\n\r\n");
    stream.write_all(req.as_bytes()).await.ok()?;
    read_response(stream).await
}

/// Opens an SSE stream from `src` and checks it was accepted; the reader is never used.
async fn sse_from(src: &str, addr: SocketAddr, query: &str) -> TcpStream {
    let mut tcp = tcp_from(src, addr).await;
    let req = format!("GET /sse{query} HTTP/1.1\r\nHost: crier\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        within("sse head", tcp.read_exact(&mut byte)).await.unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 200"));
    tcp
}

/// A connection the server refused at accept: the fixed answer, then the end of stream.
async fn expect_refused(src: &str, addr: SocketAddr, why: Refusal) {
    let mut tcp = tcp_from(src, addr).await;
    let (status, body) = read_response(&mut tcp).await.expect("a refusal answer");
    let (want_status, want_code) = match why {
        Refusal::MaxSockets => (503, "server_full"),
        Refusal::PerIp => (429, "too_many_connections_per_ip"),
        Refusal::ConnectRate => (429, "connect_rate_exceeded"),
    };
    assert_eq!(status, want_status, "{body}");
    assert_eq!(body["error"]["code"], want_code, "{body}");
    assert!(body["error"]["message"].is_string());
    let rest = read_to_end(&mut tcp).await;
    assert!(rest.is_empty(), "nothing after the refusal");
}

fn refused(srv: &TestServer, why: Refusal) -> u64 {
    srv.state()
        .metrics
        .refused_connections
        .get_or_create(&RefusalLabel {
            reason: why.label(),
        })
        .get()
}

/// The healthy client: a WebSocket subscriber on `t` from 127.0.0.2, checked to receive
/// every publication, in order, after each step of an attack.
struct Healthy {
    ws: Ws,
    /// Publishes over one kept-alive raw connection from 127.0.0.1 when set (when new
    /// sockets may be refused), else over a new connection each time (when idle ones are
    /// cut short).
    publisher: Option<TcpStream>,
    addr: SocketAddr,
    sent: u64,
}

impl Healthy {
    async fn join(srv: &TestServer, keep_alive: bool) -> Healthy {
        let mut ws = ws_from("127.0.0.2", srv.addr, "?topic=t").await;
        let sub = next_json(&mut ws).await;
        assert_eq!(sub["op"], "subscribed");
        let publisher = match keep_alive {
            true => Some(tcp_from("127.0.0.1", srv.addr).await),
            false => None,
        };
        Healthy {
            ws,
            publisher,
            addr: srv.addr,
            sent: 0,
        }
    }

    async fn publish_and_receive(&mut self) {
        self.sent += 1;
        let n = self.sent;
        let body = format!("{{\"i\":{n}}}");
        let (status, answer) = match &mut self.publisher {
            Some(tcp) => {
                let req = format!(
                    "POST /api/publish/t HTTP/1.1\r\nHost: crier\r\n\
                     Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                tcp.write_all(req.as_bytes()).await.expect("publish");
                read_response(tcp).await.expect("publish answer")
            }
            None => {
                let (status, bytes) = HttpClient::new(None)
                    .post(&format!("http://{}/api/publish/t", self.addr), body)
                    .await
                    .expect("publish");
                let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                (status.as_u16(), v)
            }
        };
        assert_eq!(status, 200, "{answer}");
        let m = next_json(&mut self.ws).await;
        assert_eq!(m["offset"], n, "healthy client missed or reordered: {m}");
        assert_eq!(m["data"]["i"], n);
    }
}

/// Everyone gone: no socket, no subscriber, no address left in the per-IP table.
async fn assert_no_leftovers(srv: &TestServer) {
    srv.assert_clean().await;
    let limits = srv.state().limits.clone();
    wait_until("no sockets and no tracked addresses", || {
        limits.open_sockets() == 0 && limits.tracked_ips() == 0
    })
    .await;
    assert_eq!(srv.state().metrics.sockets.get(), 0);
    assert_eq!(srv.state().metrics.tracked_ips.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_take_more_than_its_share_of_ws_sse_and_http() {
    let srv = TestServer::start(|c| {
        c.max_connections_per_ip = 6;
        c.header_read_timeout = Duration::from_secs(60);
    })
    .await;
    let mut healthy = Healthy::join(&srv, false).await;
    healthy.publish_and_receive().await;

    // The attacker mixes every kind of connection from 127.0.0.3.
    let attacker = "127.0.0.3";
    let mut held_ws = Vec::new();
    let mut held_tcp = Vec::new();
    for _ in 0..2 {
        held_ws.push(ws_from(attacker, srv.addr, "?topic=a").await);
        held_tcp.push(sse_from(attacker, srv.addr, "?topic=a").await);
        let mut http = tcp_from(attacker, srv.addr).await;
        assert_eq!(get_on(&mut http, "/healthz").await.unwrap().0, 200);
        held_tcp.push(http);
    }
    healthy.publish_and_receive().await;
    // Upgraded WebSockets still count once their HTTP exchange is over.
    assert_eq!(srv.state().limits.connections_from(ip(attacker)), 6);

    // A seventh connection of any kind is refused at accept, with a JSON answer.
    expect_refused(attacker, srv.addr, Refusal::PerIp).await;
    let mut tcp = tcp_from(attacker, srv.addr).await;
    let answer = get_on(&mut tcp, "/healthz").await.expect("an answer");
    assert_eq!(answer.0, 429);
    assert!(
        tokio_tungstenite::client_async(
            format!("ws://{}/ws?topic=a", srv.addr),
            MaybeTlsStream::Plain(tcp_from(attacker, srv.addr).await),
        )
        .await
        .is_err(),
        "a WebSocket over the cap is refused too"
    );
    assert!(refused(&srv, Refusal::PerIp) >= 3);
    healthy.publish_and_receive().await;

    // Other addresses are unaffected.
    let mut other = ws_from("127.0.0.4", srv.addr, "?topic=t").await;
    assert_eq!(next_json(&mut other).await["op"], "subscribed");
    healthy.publish_and_receive().await;
    assert_eq!(next_json(&mut other).await["offset"], healthy.sent);

    // Once it leaves, its share comes back.
    drop(held_ws);
    drop(held_tcp);
    let limits = srv.state().limits.clone();
    wait_until("attacker's connections released", || {
        limits.connections_from(ip(attacker)) == 0
    })
    .await;
    let mut again = tcp_from(attacker, srv.addr).await;
    assert_eq!(get_on(&mut again, "/healthz").await.unwrap().0, 200);
    healthy.publish_and_receive().await;

    drop((again, other, healthy));
    assert_no_leftovers(&srv).await;
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_flood_gets_its_burst_then_the_rate_and_nobody_else_notices() {
    let srv = TestServer::start(|c| {
        c.connect_burst_per_ip = 10;
        c.connect_rate_per_ip = 1;
        c.header_read_timeout = Duration::from_secs(60);
    })
    .await;
    let mut healthy = Healthy::join(&srv, true).await;
    healthy.publish_and_receive().await;

    let attacker = "127.0.0.3";
    let started = Instant::now();
    let (mut accepted, mut refused_here) = (Vec::new(), 0u64);
    for _ in 0..40 {
        let mut tcp = tcp_from(attacker, srv.addr).await;
        let (status, body) = get_on(&mut tcp, "/healthz").await.expect("an answer");
        match status {
            200 => accepted.push(tcp),
            429 => {
                assert_eq!(body["error"]["code"], "connect_rate_exceeded");
                refused_here += 1;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    // The burst, plus what the rate refilled meanwhile (however slow this machine is).
    assert!(
        accepted.len() as f64 <= 10.0 + elapsed.ceil() + 1.0,
        "{} accepted in {elapsed}s",
        accepted.len()
    );
    assert!(accepted.len() >= 10, "the whole burst is allowed");
    assert!(refused_here >= 1);
    assert_eq!(refused(&srv, Refusal::ConnectRate), refused_here);
    healthy.publish_and_receive().await;

    // Another address connects at once, mid-flood.
    let mut other = tcp_from("127.0.0.4", srv.addr).await;
    assert_eq!(get_on(&mut other, "/healthz").await.unwrap().0, 200);
    healthy.publish_and_receive().await;

    // The attacker's held connections stay served, and the bucket refills.
    for tcp in &mut accepted {
        assert_eq!(get_on(tcp, "/healthz").await.unwrap().0, 200);
    }
    drop(accepted);
    within("the attacker's bucket refills", async {
        loop {
            let mut tcp = tcp_from(attacker, srv.addr).await;
            if get_on(&mut tcp, "/healthz").await.map(|r| r.0) == Some(200) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    healthy.publish_and_receive().await;
    drop((other, healthy));
    srv.assert_clean().await;
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_socket_cap_new_connections_are_refused_from_any_address() {
    let srv = TestServer::start(|c| {
        c.max_sockets = 8;
        c.header_read_timeout = Duration::from_secs(60);
    })
    .await;
    let mut healthy = Healthy::join(&srv, true).await;
    healthy.publish_and_receive().await;
    let limits = srv.state().limits.clone();
    assert_eq!(limits.open_sockets(), 2, "the subscriber and the publisher");

    // Plain HTTP connections count: two addresses fill the rest.
    let mut held = Vec::new();
    for src in ["127.0.0.3", "127.0.0.4"] {
        for _ in 0..3 {
            let mut tcp = tcp_from(src, srv.addr).await;
            assert_eq!(get_on(&mut tcp, "/healthz").await.unwrap().0, 200);
            held.push(tcp);
        }
    }
    assert_eq!(limits.open_sockets(), 8);
    assert_eq!(srv.state().metrics.sockets.get(), 8);
    expect_refused("127.0.0.5", srv.addr, Refusal::MaxSockets).await;
    expect_refused("127.0.0.3", srv.addr, Refusal::MaxSockets).await;
    assert_eq!(refused(&srv, Refusal::MaxSockets), 2);
    // Established connections are unaffected.
    healthy.publish_and_receive().await;
    for tcp in &mut held {
        assert_eq!(get_on(tcp, "/healthz").await.unwrap().0, 200);
    }

    drop(held);
    wait_until("attackers' sockets released", || limits.open_sockets() == 2).await;
    let mut tcp = tcp_from("127.0.0.5", srv.addr).await;
    assert_eq!(get_on(&mut tcp, "/healthz").await.unwrap().0, 200);
    healthy.publish_and_receive().await;

    drop((tcp, healthy));
    assert_no_leftovers(&srv).await;
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_headers_and_idle_keep_alive_are_closed_after_the_header_timeout() {
    let srv = TestServer::start(|c| c.header_read_timeout = Duration::from_millis(300)).await;
    let mut healthy = Healthy::join(&srv, false).await;
    // A long-lived SSE response is not an idle connection: it must outlive the timeout.
    let mut sse = Sse::connect(srv.addr, "?topic=t").await;
    healthy.publish_and_receive().await;
    assert_eq!(sse.next_event().await.unwrap().0, Some(1));

    // Headers trickled forever: cut off although bytes keep coming.
    let mut slow = tcp_from("127.0.0.3", srv.addr).await;
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: crier\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    within("slowloris connection closed", async {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        let mut buf = [0u8; 1024];
        loop {
            tokio::select! {
                r = slow.read(&mut buf) => match r {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                },
                _ = tick.tick() => {
                    if slow.write_all(b"X-Slow: 1\r\n").await.is_err() {
                        break;
                    }
                }
            }
        }
    })
    .await;
    assert!(
        !String::from_utf8_lossy(&got).contains(" 200 "),
        "no request was served"
    );
    healthy.publish_and_receive().await;

    // A served keep-alive connection left idle is closed too.
    let mut idle = tcp_from("127.0.0.4", srv.addr).await;
    assert_eq!(get_on(&mut idle, "/healthz").await.unwrap().0, 200);
    assert!(read_to_end(&mut idle).await.is_empty());

    healthy.publish_and_receive().await;
    for n in 2..=healthy.sent {
        assert_eq!(sse.next_event().await.unwrap().0, Some(n));
    }
    drop((slow, idle, sse, healthy));
    assert_no_leftovers(&srv).await;
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_body_gets_408_and_publishes_nothing() {
    let srv = TestServer::start(|c| c.body_read_timeout = Duration::from_millis(300)).await;
    let mut healthy = Healthy::join(&srv, false).await;
    healthy.publish_and_receive().await;

    let head = "POST /api/publish/t HTTP/1.1\r\nHost: crier\r\n\
                Content-Type: application/json\r\nContent-Length: 100\r\n\r\n";
    // One trickles a byte at a time; one sends half and goes silent.
    let mut trickle = tcp_from("127.0.0.3", srv.addr).await;
    trickle.write_all(head.as_bytes()).await.unwrap();
    trickle.write_all(b"{\"i\":").await.unwrap();
    let mut silent = tcp_from("127.0.0.4", srv.addr).await;
    silent.write_all(head.as_bytes()).await.unwrap();
    silent.write_all(b"{\"i\":\"half").await.unwrap();

    let answer = within("408 for the trickling body", async {
        let (mut rx, tx) = tokio::io::split(trickle);
        let writer = tokio::spawn(async move {
            let mut tx = tx;
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            loop {
                tick.tick().await;
                if tx.write_all(b" ").await.is_err() {
                    break;
                }
            }
        });
        let mut buf = Vec::new();
        let _ = rx.read_to_end(&mut buf).await;
        writer.abort();
        buf
    })
    .await;
    let text = String::from_utf8_lossy(&answer).to_string();
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    let body: Value = serde_json::from_str(&text[text.find("\r\n\r\n").unwrap() + 4..]).unwrap();
    assert_eq!(body["error"]["code"], "body_timeout");

    let (status, body) = read_response(&mut silent).await.expect("an answer");
    assert_eq!(status, 408);
    assert_eq!(body["error"]["code"], "body_timeout");

    // Score posts share the deadline: a half-sent batch records nothing.
    let mut scores = tcp_from("127.0.0.5", srv.addr).await;
    scores
        .write_all(
            b"POST /api/boards/b/scores HTTP/1.1\r\nHost: crier\r\n\
              Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"player\":",
        )
        .await
        .unwrap();
    let (status, body) = read_response(&mut scores).await.expect("an answer");
    assert_eq!(status, 408);
    assert_eq!(body["error"]["code"], "body_timeout");
    assert_eq!(
        srv.get("/api/boards/b").await.0,
        404,
        "no board was created"
    );

    // Nothing was published: the healthy client's next offset follows its last.
    healthy.publish_and_receive().await;
    assert_eq!(srv.state().hub.subscriber_count("t"), 1);
    drop((silent, scores, healthy));
    assert_no_leftovers(&srv).await;
    srv.shutdown().await;
}

/// Starts the real binary under a shell `ulimit` and collects its log lines.
fn serve_under_ulimit(
    dir: &std::path::Path,
    ulimit: &str,
    extra: &[&str],
) -> (Proc, String, std::sync::mpsc::Receiver<String>) {
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c")
        .arg(format!("ulimit {ulimit} && exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_crier"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .args(extra)
        .env("CRIER_LOG", "info");
    spawn_logged(cmd)
}

/// Waits for a log line containing `needle`.
fn expect_log(rx: &std::sync::mpsc::Receiver<String>, needle: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return line,
            Ok(_) => continue,
            Err(_) => panic!("no log line containing {needle:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_soft_file_limit_is_raised_to_the_hard_one() {
    let dir = tempfile::tempdir().unwrap();
    let hard: u64 = rlimit::Resource::NOFILE.get().unwrap().1;
    if hard <= 200 {
        return; // Nothing to raise on this machine.
    }
    let (_proc, _addr, logs) = serve_under_ulimit(dir.path(), "-Sn 200", &[]);
    let line = expect_log(&logs, "raised the open-file limit");
    assert!(line.contains("from 200 to"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_warns_backs_off_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    // Hard and soft at 64: far below what the default max_sockets needs.
    let (_proc, addr, logs) = serve_under_ulimit(dir.path(), "-n 64", &["--max-sockets", "1000"]);
    let line = expect_log(&logs, "open-file limit 64 is below");
    assert!(line.contains("1256"), "{line}");
    let addr: SocketAddr = addr.parse().unwrap();
    let mut healthy = ws_from("127.0.0.2", addr, "?topic=t").await;
    assert_eq!(next_json(&mut healthy).await["op"], "subscribed");
    let publisher = HttpClient::new(None);
    let url = format!("http://{addr}/api/publish/t");
    assert_eq!(publisher.post(&url, "{\"i\":1}").await.unwrap().0, 200);
    assert_eq!(next_json(&mut healthy).await["offset"], 1);

    // More connections than the process has descriptors: accept fails with EMFILE.
    let mut flood = Vec::new();
    for _ in 0..100 {
        flood.push(tcp_from("127.0.0.3", addr).await);
    }
    expect_log(&logs, "accept failed");
    // Once they leave, the node serves again, and the subscriber never noticed.
    drop(flood);
    within("publishing works again", async {
        loop {
            if let Ok((status, _)) = HttpClient::new(None).post(&url, "{\"i\":2}").await {
                assert_eq!(status, 200);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert_eq!(next_json(&mut healthy).await["offset"], 2);
    let (status, metrics) = HttpClient::new(None)
        .get(&format!("http://{addr}/metrics"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    let metrics = String::from_utf8_lossy(&metrics).to_string();
    let errors: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("crier_accept_errors_total "))
        .expect("accept error metric")
        .trim()
        .parse()
        .unwrap();
    assert!(errors >= 1.0, "{errors}");
}
