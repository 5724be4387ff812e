//! The shipped deployment, run for real: `deploy/nginx.conf` in front of three `crier serve
//! --redis` nodes on one `redis-server` running `deploy/redis.conf`, everything on loopback.
//! Only addresses, ports and folders are replaced; every other line is what an operator
//! installs. Clients talk to nginx only; the nodes' own `/metrics` tell which node
//! holds which client.
//!
//! Without nginx installed (`apt-get install nginx-light`; `scripts/test` installs it) the
//! test says so and passes, unless `CI` is set: there a missing nginx fails it.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::http::post;
use crate::common::{next_json, offsets_until, send_json, serve_binary, within, Proc, Ws};
use crier::http_client::HttpClient;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const SHIPPED: &str = include_str!("../../deploy/nginx.conf");
const SHIPPED_REDIS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/redis.conf");

/// The nginx binary, or None (and why) when it is not installed.
/// `deploy/nginx.conf` with its node addresses and listen port replaced. Each replaced line
/// must appear exactly once, so a reshaped file fails here rather than running half-rendered.
fn render(nodes: &[String; 3], port: u16, dir: &Path) -> String {
    let mut conf = SHIPPED.to_string();
    let mut swaps: Vec<(String, String)> = (0..3)
        .map(|i| {
            (
                format!("server 10.0.0.1{}:7700 ", i + 1),
                format!("server {} ", nodes[i]),
            )
        })
        .collect();
    swaps.push(("listen 80;".into(), format!("listen 127.0.0.1:{port};")));
    swaps.push((
        "/var/log/nginx/crier-access.log".into(),
        dir.join("crier-access.log").display().to_string(),
    ));
    for (from, to) in swaps {
        assert_eq!(
            conf.matches(&from).count(),
            1,
            "deploy/nginx.conf has `{from}` once"
        );
        conf = conf.replace(&from, &to);
    }
    conf
}

/// A real nginx running the rendered file inside a minimal main configuration (what
/// Debian's /etc/nginx/nginx.conf provides), in one process so that dropping it stops it.
struct Nginx {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Nginx {
    fn start(bin: &Path, nodes: &[String; 3]) -> Nginx {
        for _ in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let d = dir.path().display();
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            std::fs::write(
                dir.path().join("crier.conf"),
                render(nodes, port, dir.path()),
            )
            .unwrap();
            let main = format!(
                "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
                 events {{ worker_connections 1024; }}\n\
                 http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/body;\n  \
                 proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  \
                 uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  \
                 include {d}/crier.conf;\n}}\n"
            );
            std::fs::write(dir.path().join("main.conf"), main).unwrap();
            let mut child = Command::new(bin)
                .arg("-p")
                .arg(dir.path())
                .arg("-c")
                .arg(dir.path().join("main.conf"))
                .arg("-e")
                .arg(dir.path().join("error.log"))
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("nginx starts");
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let deadline = Instant::now() + crate::common::WAIT;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // the port was taken (or the file is wrong: its stderr says)
                }
                if TcpStream::connect(addr).is_ok() {
                    return Nginx {
                        child,
                        addr,
                        _dir: dir,
                    };
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("nginx did not start with deploy/nginx.conf");
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// The crier server's access log (`crier_no_query` format).
    fn access_log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("crier-access.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `redis-server deploy/redis.conf`, with only its address, port and folder overridden on
/// the command line: AOF with `appendfsync always`, `noeviction` and the password as
/// shipped, so the nodes connect with a password URL as in docs/deploy.md.
struct ShippedRedis {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl ShippedRedis {
    fn start() -> ShippedRedis {
        let text = std::fs::read_to_string(SHIPPED_REDIS).unwrap();
        let password = text
            .lines()
            .find_map(|l| l.strip_prefix("requirepass "))
            .expect("deploy/redis.conf sets requirepass")
            .trim()
            .to_string();
        for _ in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let mut child = Command::new("redis-server")
                .arg(SHIPPED_REDIS)
                .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
                .arg("--dir")
                .arg(dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("redis-server runs (apt-get install redis-server)");
            let deadline = Instant::now() + crate::common::WAIT;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // the port was taken (or the file is wrong: its log says)
                }
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return ShippedRedis {
                        child,
                        url: format!("redis://:{password}@127.0.0.1:{port}"),
                        _dir: dir,
                    };
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("redis-server did not start with deploy/redis.conf");
    }
}

impl Drop for ShippedRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn get(url: &str) -> (u16, Vec<u8>) {
    let (status, body) = HttpClient::new(None).get(url).await.expect("http get");
    (status.as_u16(), body.to_vec())
}

/// A node's `crier_subscriptions` gauge, read from the node itself.
async fn subscriptions(node: &str) -> i64 {
    let (status, body) = get(&format!("http://{node}/metrics")).await;
    assert_eq!(status, 200);
    String::from_utf8(body)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("crier_subscriptions "))
        .expect("crier_subscriptions in /metrics")
        .trim()
        .parse()
        .unwrap()
}

async fn counts(nodes: &[String]) -> Vec<i64> {
    let mut out = Vec::new();
    for n in nodes {
        out.push(subscriptions(n).await);
    }
    out
}

/// Opens a WebSocket to `topic` through nginx and returns it with the index of the node
/// that took it (the one whose subscription count went up).
async fn ws_through(nginx: &Nginx, nodes: &[String], topic: &str) -> (Ws, usize) {
    let before = counts(nodes).await;
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/ws?topic={topic}", nginx.addr))
            .await
            .expect("ws connects through nginx");
    let v = next_json(&mut ws).await;
    assert_eq!(v["op"], "subscribed", "{v}");
    let deadline = Instant::now() + crate::common::WAIT;
    loop {
        let now = counts(nodes).await;
        let grown: Vec<usize> = (0..nodes.len()).filter(|&i| now[i] > before[i]).collect();
        if grown.len() == 1 {
            return (ws, grown[0]);
        }
        assert!(Instant::now() < deadline, "no node took the WebSocket");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn publish(nginx: &Nginx, i: u64) -> Value {
    let (status, r) = post(nginx.addr, "/api/publish/news", &json!({ "i": i })).await;
    assert_eq!(status, 200, "publish {i} through nginx: {r}");
    assert_eq!(r["offset"], i, "{r}");
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_behind_the_shipped_nginx_config() {
    crate::need_redis!();
    let Some(bin) = crate::common::tools::require("nginx", "apt-get install -y nginx-light") else {
        return;
    };
    let redis = ShippedRedis::start();
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut procs: Vec<Option<Proc>> = Vec::new();
    let mut nodes = Vec::new();
    for d in &dirs {
        let (p, addr) = serve_binary(d.path(), "127.0.0.1:0", &["--redis", &redis.url]);
        procs.push(Some(p));
        nodes.push(addr);
    }
    // Each node is ready (what an active health check polls), under its own node id.
    let mut ids = Vec::new();
    for n in &nodes {
        let url = format!("http://{n}/readyz");
        let deadline = Instant::now() + crate::common::WAIT;
        loop {
            let (status, body) = get(&url).await;
            if status == 200 {
                let v: Value = serde_json::from_slice(&body).unwrap();
                assert_eq!(v["status"], "ready", "{v}");
                ids.push(v["node"].as_str().expect("a node id").to_string());
                break;
            }
            assert!(Instant::now() < deadline, "node {n} never became ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 3, "three distinct node ids");
    let nginx = Nginx::start(
        &bin,
        &[nodes[0].clone(), nodes[1].clone(), nodes[2].clone()],
    );

    // Three WebSockets through nginx land on three different nodes (least_conn).
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(ws_through(&nginx, &nodes, "news").await);
    }
    let mut on: Vec<usize> = clients.iter().map(|(_, n)| *n).collect();
    on.sort_unstable();
    assert_eq!(on, [0, 1, 2], "one subscriber per node");

    // Publications through nginx land on some node; the subscribers of all three get them,
    // so at least two of them across nodes.
    let mut epoch = String::new();
    for i in 1..=5 {
        epoch = publish(&nginx, i).await["epoch"]
            .as_str()
            .unwrap()
            .to_string();
    }
    for (ws, _) in clients.iter_mut() {
        assert_eq!(offsets_until(ws, 5).await, [1, 2, 3, 4, 5]);
    }

    // SSE through nginx: each event arrives while the stream stays open (not buffered).
    let mut sse = crate::common::Sse::connect(nginx.addr, "?topic=news").await;
    for i in 6..=7 {
        publish(&nginx, i).await;
        let (id, v) = within("an SSE event through nginx", sse.next_event())
            .await
            .expect("the stream stays open");
        assert_eq!((id, v["offset"].as_u64()), (Some(i), Some(i)), "{v}");
    }
    drop(sse);
    for (ws, _) in clients.iter_mut() {
        assert_eq!(offsets_until(ws, 7).await, [6, 7]);
    }

    // Leaderboards through nginx: a score, the list, the live page.
    let (status, r) = post(
        nginx.addr,
        "/api/boards/arena/scores",
        &json!({"player":"p1","score":10}),
    )
    .await;
    assert_eq!(status, 200, "{r}");
    let (status, body) = get(&nginx.url("/api/boards")).await;
    assert_eq!(status, 200);
    let list: Value = serde_json::from_slice(&body).unwrap();
    assert!(list["boards"].is_array(), "{list}");
    // One leaderboard: every node shows the score, whichever node took it.
    for n in &nodes {
        let url = format!("http://{n}/api/boards/arena");
        let deadline = Instant::now() + crate::common::WAIT;
        loop {
            let (status, body) = get(&url).await;
            let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            if status == 200 && v["entries"][0]["player"] == "p1" {
                assert_eq!(v["entries"][0]["score"], 10, "{v}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {n} never showed the score: {v}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let (status, body) = get(&nginx.url("/boards/arena")).await;
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body).contains("<html"));

    // Metrics are per node: nginx answers for them in crier's error shape.
    let (status, body) = get(&nginx.url("/metrics")).await;
    assert_eq!(status, 404);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["code"], "not_found", "{v}");

    // One node killed: its client's connection ends; every request through nginx still
    // succeeds (nginx tries the next node when the dead one refuses), and the client
    // reconnects through nginx and resumes without a gap.
    let victim = clients[0].1;
    procs[victim] = None; // SIGKILL
    let (mut cut, _) = clients.remove(0);
    within("the killed node's client is cut", async {
        loop {
            match cut.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break,
                Some(Ok(_)) => continue,
            }
        }
    })
    .await;
    for i in 8..=20 {
        publish(&nginx, i).await;
        let (status, _) = get(&nginx.url("/api/topics/news/history?since=0")).await;
        assert_eq!(status, 200, "a read through nginx with one node dead");
        let (status, _) = get(&nginx.url("/readyz")).await;
        assert_eq!(status, 200, "a live node answers readiness through nginx");
    }
    let (mut back, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", nginx.addr))
        .await
        .expect("reconnects through nginx");
    send_json(
        &mut back,
        &json!({"op":"subscribe","topic":"news","since":{"offset":7,"epoch":epoch},"id":1})
            .to_string(),
    )
    .await;
    let v = next_json(&mut back).await;
    assert_eq!(v["op"], "subscribed", "{v}");
    assert_eq!(v["recovered"], true, "{v}");
    publish(&nginx, 21).await;
    assert_eq!(
        offsets_until(&mut back, 21).await,
        (8..=21).collect::<Vec<u64>>(),
        "every missed publication once, in order, then live ones"
    );
    for (ws, _) in clients.iter_mut() {
        assert_eq!(
            offsets_until(ws, 21).await,
            (8..=21).collect::<Vec<u64>>(),
            "the other nodes' clients noticed nothing"
        );
    }

    // A subscriber token in a query string never reaches the access log: the shipped
    // format logs the path alone (docs/auth.md, "Behind nginx").
    let reads = |log: &str| {
        log.matches("\"GET /api/topics/news/history HTTP/1.1\"")
            .count()
    };
    let before = reads(&nginx.access_log());
    let _ = get(&nginx.url("/api/topics/news/history?since=0&token=tok.en-SECRET")).await;
    let deadline = Instant::now() + crate::common::WAIT;
    while reads(&nginx.access_log()) == before && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log = nginx.access_log();
    assert!(reads(&log) > before, "{log}");
    assert!(log.contains("\"GET /ws HTTP/1.1\""), "{log}");
    assert!(
        !log.contains("SECRET") && !log.contains('?'),
        "a query string in the access log:\n{log}"
    );

    // No node left: nginx answers in crier's error shape.
    for p in procs.iter_mut() {
        *p = None;
    }
    let (status, body) = get(&nginx.url("/api/boards")).await;
    assert_eq!(status, 503);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["code"], "unavailable", "{v}");
}

/// The errors nginx answers itself carry real crier codes with their own statuses, so a
/// client handles them like crier's.
#[test]
fn the_nginx_error_answers_use_crier_codes() {
    use crier::error_code::ErrorCode;
    let mut checked = 0;
    for line in SHIPPED.lines() {
        let Some(rest) = line.trim().strip_prefix("return ") else {
            continue;
        };
        let (status, body) = rest.split_once(' ').unwrap();
        let body = body.trim_end_matches(';').trim_matches('\'');
        let body = body.strip_suffix("\\n").unwrap_or(body);
        let v: Value = serde_json::from_str(body).expect("an nginx error body is JSON");
        let name = v["error"]["code"].as_str().expect("error.code");
        assert!(v["error"]["message"].is_string(), "{v}");
        let code = ErrorCode::ALL
            .iter()
            .find(|c| c.as_str() == name)
            .unwrap_or_else(|| panic!("`{name}` is no ErrorCode"));
        assert_eq!(
            code.status().map(|s| s.as_u16().to_string()),
            Some(status.to_string()),
            "`{name}`"
        );
        checked += 1;
    }
    assert_eq!(checked, 4, "every `return` of deploy/nginx.conf");
}
