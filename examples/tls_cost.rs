//! What TLS costs the server (docs/BENCHMARKS.md, "TLS"): idle memory per `wss://`
//! connection against `ws://`, and fan-out deliveries/s with and without TLS, measured in
//! one run against two running servers on one machine.
//!
//! ```sh
//! cargo build --release
//! # a test CA and certificate (any PEM pair for localhost works):
//! ./target/release/crier serve --listen 127.0.0.1:7701 --data-dir /tmp/p &
//! ./target/release/crier serve --listen 127.0.0.1:7702 --data-dir /tmp/t \
//!     --tls-cert cert.pem --tls-key key.pem &
//! cargo run --release --example tls_cost -- 7701 PID_PLAIN 7702 PID_TLS ca.pem 2000 50
//! ```
//!
//! Memory is the server's RSS (/proc/PID/status) before and after opening the connections,
//! divided by their number; deliveries/s is subscribers × messages over the time from the
//! first publish to the last delivery.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crier::http_client::HttpClient;
use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

async fn subscriber<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    io: S,
    url: String,
    ready: Arc<AtomicU64>,
    got: Arc<AtomicU64>,
) {
    let (mut ws, _) = tokio_tungstenite::client_async(url, io).await.unwrap();
    while let Some(Ok(m)) = ws.next().await {
        if let Ok(t) = m.to_text() {
            if t.contains("\"subscribed\"") {
                ready.fetch_add(1, Ordering::Relaxed);
            } else if t.contains("\"offset\"") {
                got.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

async fn wait_for(counter: &AtomicU64, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while counter.load(Ordering::Relaxed) < n {
        assert!(
            Instant::now() < deadline,
            "timed out: {} of {n}",
            counter.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn run(
    port: u16,
    pid: u32,
    tls: Option<Arc<rustls::ClientConfig>>,
    ca: &str,
    n: u64,
    m: u64,
) {
    let scheme = if tls.is_some() { "wss" } else { "ws" };
    let (ready, got) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib(pid);
    for _ in 0..n {
        let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let url = format!("{scheme}://localhost:{port}/ws?topic=bench");
        let (ready, got) = (ready.clone(), got.clone());
        match &tls {
            None => {
                tokio::spawn(subscriber(tcp, url, ready, got));
            }
            Some(cfg) => {
                let cfg = cfg.clone();
                tokio::spawn(async move {
                    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
                    let s = tokio_rustls::TlsConnector::from(cfg)
                        .connect(name, tcp)
                        .await
                        .unwrap();
                    subscriber(s, url, ready, got).await
                });
            }
        }
    }
    wait_for(&ready, n).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(pid);
    let per_conn = (after.saturating_sub(before) as f64) * 1024.0 / n as f64;

    let mut client = HttpClient::new(None);
    let http = if tls.is_some() {
        client = client.with_ca_file(std::path::Path::new(ca)).unwrap();
        "https"
    } else {
        "http"
    };
    let start = Instant::now();
    for i in 0..m {
        let (s, _) = client
            .post(
                &format!("{http}://localhost:{port}/api/publish/bench"),
                format!("{{\"i\":{i},\"pad\":\"{}\"}}", "x".repeat(100)),
            )
            .await
            .unwrap();
        assert!(s.is_success());
    }
    wait_for(&got, n * m).await;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{scheme}: {n} idle connections: RSS {before} -> {after} KiB = {per_conn:.0} B/connection; \
         fan-out {m} x {n} = {} deliveries in {secs:.2} s = {:.0} deliveries/s",
        n * m,
        (n * m) as f64 / secs
    );
}

#[tokio::main]
async fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let p = |i: usize| a[i].parse::<u32>().unwrap();
    let (n, m) = (p(5) as u64, p(6) as u64);
    let cfg = crier_protocol_tls(&a[4]);
    run(p(0) as u16, p(1), None, &a[4], n, m).await;
    run(p(2) as u16, p(3), Some(cfg), &a[4], n, m).await;
    std::process::exit(0);
}

fn crier_protocol_tls(ca: &str) -> Arc<rustls::ClientConfig> {
    crier::http_client::tls_config(Some(std::path::Path::new(ca))).unwrap()
}
