//! Where an idle connection's bytes go (docs/BENCHMARKS.md, "Issue 20"): a crier server in
//! this process, a counting global allocator on the server's threads only, and N idle
//! subscribers (WebSocket or SSE, one topic) opened from a separate runtime. Prints the
//! server's live heap growth per connection and the allocations that grew by about one
//! (or more) per connection, by exact requested size: the task, the client, the hub entry,
//! buffers. RSS (what `crier bench --idle` measures) adds the allocator's rounding and
//! page-level overhead on top of these bytes.
//!
//! `cargo run --release --example conn_memory -- ws 2000` (or `sse 2000`)

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Exact sizes counted one by one up to this; larger ones share the last slot.
const MAX_EXACT: usize = 1 << 16;

struct Counting;

#[allow(clippy::declare_interior_mutable_const)]
const ZERO: AtomicI64 = AtomicI64::new(0);
static LIVE: [AtomicI64; MAX_EXACT + 1] = [ZERO; MAX_EXACT + 1];
static LIVE_BYTES: AtomicI64 = AtomicI64::new(0);

thread_local! {
    /// Set on the server runtime's threads: only their allocations are counted.
    static SERVER: Cell<bool> = const { Cell::new(false) };
}

/// `CONN_MEMORY_TRACE=<size>`: where the allocations of that size made after the warm-up
/// and still live at the end come from (to name a row of the table).
static TRACE_SIZE: AtomicI64 = AtomicI64::new(-1);
static TRACES: std::sync::Mutex<Vec<(usize, String)>> = std::sync::Mutex::new(Vec::new());

thread_local! {
    static IN_TRACE: Cell<bool> = const { Cell::new(false) };
}

fn note(ptr: *mut u8, size: usize, sign: i64) {
    if SERVER.try_with(Cell::get).unwrap_or(false) {
        if size as i64 == TRACE_SIZE.load(Ordering::Relaxed) && !IN_TRACE.with(Cell::get) {
            IN_TRACE.with(|t| t.set(true));
            let mut traces = TRACES.lock().unwrap();
            if sign > 0 {
                if traces.len() < 64 {
                    let bt = std::backtrace::Backtrace::force_capture().to_string();
                    traces.push((ptr as usize, bt));
                }
            } else {
                traces.retain(|(p, _)| *p != ptr as usize);
            }
            drop(traces);
            IN_TRACE.with(|t| t.set(false));
        }
        LIVE[size.min(MAX_EXACT)].fetch_add(sign, Ordering::Relaxed);
        LIVE_BYTES.fetch_add(sign * size as i64, Ordering::Relaxed);
    }
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = System.alloc(layout);
        note(ptr, layout.size(), 1);
        ptr
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note(ptr, layout.size(), -1);
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(ptr, layout.size(), -1);
        let new = System.realloc(ptr, layout, new_size);
        note(new, new_size, 1);
        new
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn snapshot() -> (i64, Vec<i64>) {
    (
        LIVE_BYTES.load(Ordering::Relaxed),
        LIVE.iter().map(|c| c.load(Ordering::Relaxed)).collect(),
    )
}

async fn open(addr: std::net::SocketAddr, sse: bool, i: usize) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let req = if sse {
        "GET /sse?topic=idle HTTP/1.1\r\nHost: x\r\n\r\n".to_string()
    } else {
        format!(
            "GET /ws?topic=idle HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: {}\r\n\r\n",
            "dGhlIHNhbXBsZSBub25jZQ=="
        )
    };
    let _ = i;
    s.write_all(req.as_bytes()).await.expect("request");
    // Until the `subscribed` reply has arrived (its topic name ends it).
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(6).any(|w| w == b"\"idle\"") {
        let n = s.read(&mut buf).await.expect("read");
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    s
}

fn main() {
    let mut args = std::env::args().skip(1);
    let sse = args.next().as_deref() == Some("sse");
    let n: usize = args.next().map_or(2000, |a| a.parse().expect("N"));
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .on_thread_start(|| SERVER.with(|s| s.set(true)))
        .build()
        .unwrap();
    let dir = std::env::temp_dir().join(format!("conn_memory_{}", std::process::id()));
    let cfg = crier::config::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.clone(),
        ..Default::default()
    };
    println!(
        "size_of: Client {} (in an Arc: +16), Registration {}",
        std::mem::size_of::<crier::client::Client>(),
        std::mem::size_of::<crier::state::Registration>(),
    );
    let server = server_rt
        .block_on(server_rt.spawn(crier::server::Server::start(cfg)))
        .unwrap()
        .expect("server starts");
    let addr = server.addr;
    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    client_rt.block_on(async {
        // Warm up: the topic, the hub's tables, the runtime's slabs.
        let mut warm = Vec::new();
        for i in 0..200 {
            warm.push(open(addr, sse, i).await);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (b0, h0) = snapshot();
        if let Some(size) = std::env::var("CONN_MEMORY_TRACE")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            TRACE_SIZE.store(size, Ordering::Relaxed);
        }
        let mut conns = Vec::with_capacity(n);
        for i in 0..n {
            conns.push(open(addr, sse, i).await);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (b1, h1) = snapshot();
        let kind = if sse { "SSE stream" } else { "WebSocket" };
        println!(
            "{n} idle {kind}s: server heap +{} B, {:.0} B per connection",
            b1 - b0,
            (b1 - b0) as f64 / n as f64
        );
        println!("allocations per connection (requested size x count per connection):");
        let mut rows: Vec<(usize, f64)> = (0..=MAX_EXACT)
            .map(|size| (size, (h1[size] - h0[size]) as f64 / n as f64))
            .filter(|(_, per)| per.abs() >= 0.2)
            .collect();
        rows.sort_by(|a, b| (b.0 as f64 * b.1).total_cmp(&(a.0 as f64 * a.1)));
        for (size, per) in rows {
            let label = if size == MAX_EXACT {
                ">=64K".to_string()
            } else {
                size.to_string()
            };
            println!("  {label:>6} B x {per:.2} = {:.0} B", size as f64 * per);
        }
        if TRACE_SIZE.load(Ordering::Relaxed) >= 0 {
            TRACE_SIZE.store(-1, Ordering::Relaxed);
            let traces = TRACES.lock().unwrap();
            println!("{} traced allocations still live; the first:", traces.len());
            if let Some((_, bt)) = traces.first() {
                for line in bt
                    .lines()
                    .filter(|l| !l.trim_start().starts_with("at "))
                    .take(30)
                {
                    println!("{line}");
                }
            }
        }
        drop(conns);
        drop(warm);
    });
    drop(server);
    let _ = std::fs::remove_dir_all(dir);
}
