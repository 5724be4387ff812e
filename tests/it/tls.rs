//! TLS on the listener (issue 21): a test CA made at test time (rcgen), WebSocket, SSE and
//! publish over TLS on one port with real TLS clients (rustls, curl, Python's ssl; headless
//! Chromium in tests/browser/tls.test.mjs), a certificate swap
//! while a `wss://` connection stays open (it keeps its session and its deliveries, new
//! handshakes see the new certificate), and bad or expired certificates refused at start.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use rcgen::{CertificateParams, IsCa, Issuer, KeyPair};
use rustls_pki_types::ServerName;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::common::*;

/// A CA and the PEM files of a server certificate it signed for 127.0.0.1 and localhost.
struct Pki {
    ca_pem: String,
    cert: PathBuf,
    key: PathBuf,
}

fn make_pki(dir: &Path, name: &str, expired: bool) -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("crier test CA {name}"));
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "localhost");
    if expired {
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    let cert = params.signed_by(&key, &issuer).unwrap();
    let (cert_path, key_path) = (
        dir.join(format!("{name}-cert.pem")),
        dir.join(format!("{name}-key.pem")),
    );
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    Pki {
        ca_pem: ca.pem(),
        cert: cert_path,
        key: key_path,
    }
}

/// A server on a certificate from a fresh test CA, and the CA's PEM file for clients.
async fn tls_server(dir: &Path, name: &str) -> (TestServer, PathBuf) {
    let pki = make_pki(dir, name, false);
    let ca = dir.join(format!("{name}-ca.pem"));
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let (c, k) = (
        pki.cert.display().to_string(),
        pki.key.display().to_string(),
    );
    let server = TestServer::start(|cfg| {
        cfg.tls_cert = c;
        cfg.tls_key = k;
    })
    .await;
    (server, ca)
}

fn connector(ca_pem: &str) -> tokio_rustls::TlsConnector {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

async fn tls_connect(
    addr: std::net::SocketAddr,
    ca_pem: &str,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    connector(ca_pem)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

async fn wss(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    query: &str,
) -> WebSocketStream<TlsStream<TcpStream>> {
    let tls = tls_connect(addr, ca_pem).await.unwrap();
    let (ws, _) =
        tokio_tungstenite::client_async(format!("wss://localhost:{}/ws?{query}", addr.port()), tls)
            .await
            .unwrap();
    ws
}

async fn next_text(ws: &mut WebSocketStream<TlsStream<TcpStream>>) -> Value {
    loop {
        match within("a wss message", ws.next()).await {
            Some(Ok(Message::Text(t))) => return serde_json::from_str(&t).unwrap(),
            Some(Ok(_)) => continue,
            other => panic!("wss ended: {other:?}"),
        }
    }
}

/// POST over TLS with curl (a real client, its own TLS stack), trusting the test CA.
async fn curl_publish(addr: std::net::SocketAddr, ca: &Path, topic: &str, body: &str) -> String {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--fail-with-body", "--cacert"])
        .arg(ca)
        .args(["-H", "Content-Type: application/json", "-d", body])
        .arg(format!(
            "https://localhost:{}/api/publish/{topic}",
            addr.port()
        ))
        .args(["--resolve", &format!("localhost:{}:127.0.0.1", addr.port())])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn websocket_sse_and_publish_over_tls_and_a_cert_swap_drops_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let one = make_pki(dir.path(), "one", false);
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::copy(&one.cert, &cert).unwrap();
    std::fs::copy(&one.key, &key).unwrap();
    let ca_one = dir.path().join("ca-one.pem");
    std::fs::write(&ca_one, &one.ca_pem).unwrap();
    let (c, k) = (cert.display().to_string(), key.display().to_string());
    let server = TestServer::start(|cfg| {
        cfg.tls_cert = c;
        cfg.tls_key = k;
    })
    .await;
    let addr = server.addr;

    // WebSocket over TLS.
    let mut ws = wss(addr, &one.ca_pem, "topic=news").await;
    assert_eq!(next_text(&mut ws).await["op"], "subscribed");
    // SSE over TLS, same port.
    let tls = tls_connect(addr, &one.ca_pem).await.unwrap();
    let (read, mut write) = tokio::io::split(tls);
    write
        .write_all(
            b"GET /sse?topic=news HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream\r\n\r\n",
        )
        .await
        .unwrap();
    let mut sse = BufReader::new(read).lines();
    // Publish with curl over HTTPS.
    let receipt = curl_publish(addr, &ca_one, "news", r#"{"n":1}"#).await;
    assert!(receipt.contains("\"offset\":1"), "{receipt}");
    assert_eq!(next_text(&mut ws).await["data"]["n"], 1);
    let got = within("an SSE event over TLS", async {
        while let Some(line) = sse.next_line().await.unwrap() {
            if let Some(data) = line.strip_prefix("data:") {
                let v: Value = serde_json::from_str(data.trim()).unwrap();
                if v["data"]["n"].is_number() {
                    return v;
                }
            }
        }
        panic!("SSE stream ended");
    })
    .await;
    assert_eq!(got["data"]["n"], 1);
    // `crier publish` speaks https:// with a private CA.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_crier"))
        .args(["publish", "news", r#"{"n":"cli"}"#, "--url"])
        .arg(format!("https://localhost:{}", addr.port()))
        .arg("--ca-file")
        .arg(&ca_one)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(next_text(&mut ws).await["data"]["n"], "cli");
    // Without the CA it is refused, saying why.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_crier"))
        .args(["publish", "news", "{}", "--url"])
        .arg(format!("https://localhost:{}", addr.port()))
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("TLS"));
    // Plain HTTP on the TLS port gets no answer it could mistake for one.
    let plain = crier::http_client::HttpClient::new(None)
        .get(&format!("http://{addr}/healthz"))
        .await;
    assert!(plain.is_err() || !plain.unwrap().0.is_success());

    // Swap in a certificate from another CA; the open wss keeps going.
    let two = make_pki(dir.path(), "two", false);
    std::fs::copy(&two.key, &key).unwrap();
    std::fs::copy(&two.cert, &cert).unwrap();
    let mut swapped = false;
    for _ in 0..100 {
        if tls_connect(addr, &two.ca_pem).await.is_ok() {
            swapped = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(swapped, "new handshakes never saw the new certificate");
    assert!(
        tls_connect(addr, &one.ca_pem).await.is_err(),
        "old CA still accepted"
    );
    let ca_two = dir.path().join("ca-two.pem");
    std::fs::write(&ca_two, &two.ca_pem).unwrap();
    curl_publish(addr, &ca_two, "news", r#"{"n":2}"#).await;
    assert_eq!(next_text(&mut ws).await["data"]["n"], 2);
    ws.send(Message::Text(r#"{"op":"ping"}"#.into()))
        .await
        .unwrap();
    assert_eq!(next_text(&mut ws).await["op"], "pong");
    server.shutdown().await;
}

#[tokio::test]
async fn bad_or_expired_certificates_stop_the_start_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let expired = make_pki(dir.path(), "old", true);
    let other = make_pki(dir.path(), "other", false);
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    for (cert, key, want) in [
        (&expired.cert, &expired.key, "expired"),
        (&other.cert, &expired.key, "does not belong"),
        (&garbage, &other.key, "no CERTIFICATE"),
        (&other.cert, &garbage, "private key"),
    ] {
        let d = tempfile::tempdir().unwrap();
        let cfg = crier::config::Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: d.path().to_path_buf(),
            tls_cert: cert.display().to_string(),
            tls_key: key.display().to_string(),
            ..Default::default()
        };
        let err = match crier::server::Server::start(cfg).await {
            Ok(_) => panic!("started with {want}"),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains(want), "{want}: {err}");
    }
    let cfg = crier::config::Config {
        tls_cert: other.cert.display().to_string(),
        ..Default::default()
    };
    let err = crier::server::Server::start(cfg).await.err().unwrap();
    assert!(format!("{err:#}").contains("go together"));
}

/// `crier bench` over TLS (issue 21): `wss://` and SSE over `https://` subscribers, publishes
/// over HTTPS, the private CA given with `--ca-file`; every subscriber gets every
/// publication once and in order. Without the CA the handshake is refused, saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_over_wss_and_https_delivers_everything() {
    let dir = tempfile::tempdir().unwrap();
    let (server, ca) = tls_server(dir.path(), "bench").await;
    let url = format!("https://localhost:{}", server.addr.port());
    let ca_arg = ca.display().to_string();
    let flags = |transport: &'static str, topic: &'static str| {
        vec![
            "--url".to_string(),
            url.clone(),
            "--ca-file".into(),
            ca_arg.clone(),
            "--transport".into(),
            transport.into(),
            "--topic".into(),
            topic.into(),
            "--subscribers".into(),
            "40".into(),
            "--messages".into(),
            "100".into(),
            "--timeout".into(),
            "30s".into(),
            "--quiet".into(),
        ]
    };
    for (transport, topic) in [("ws", "tls-ws"), ("sse", "tls-sse")] {
        let args = crier_bench::BenchArgs::from_flags(flags(transport, topic)).unwrap();
        let r = crier_bench::run_with(args).await.unwrap();
        assert_eq!((r.connected, r.published), (40, 100), "{transport}: {r:?}");
        assert_eq!(r.delivered, 40 * 100, "{transport}: {r:?}");
        assert_eq!(
            (r.lost, r.duplicates, r.out_of_order, r.unexpected),
            (0, 0, 0, 0),
            "{transport}: {r:?}"
        );
        assert!(r.failures().is_empty(), "{:?}", r.failures());
    }
    // Without --ca-file the test CA is unknown: every connection fails the handshake.
    let mut no_ca = flags("ws", "tls-none");
    no_ca.drain(2..4);
    let args = crier_bench::BenchArgs::from_flags(no_ca).unwrap();
    let r = crier_bench::run_with(args).await.unwrap();
    assert_eq!(r.connected, 0, "{r:?}");
    assert!(
        r.first_connect_error
            .as_deref()
            .is_some_and(|e| e.contains("TLS")),
        "{r:?}"
    );
    server.shutdown().await;
}

/// A certificate swap under load (issue 21): 1,000 open `wss://` connections across a
/// reload, and every one of them still delivers the publications made after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cert_swap_under_1000_open_wss_connections_drops_none() {
    const N: usize = 1000;
    let dir = tempfile::tempdir().unwrap();
    let one = make_pki(dir.path(), "one", false);
    let two = make_pki(dir.path(), "two", false);
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::copy(&one.cert, &cert).unwrap();
    std::fs::copy(&one.key, &key).unwrap();
    let (c, k) = (cert.display().to_string(), key.display().to_string());
    let server = TestServer::start(|cfg| {
        cfg.tls_cert = c;
        cfg.tls_key = k;
    })
    .await;
    let addr = server.addr;
    let (ca_one, ca_two) = (dir.path().join("ca-one.pem"), dir.path().join("ca-two.pem"));
    std::fs::write(&ca_one, &one.ca_pem).unwrap();
    std::fs::write(&ca_two, &two.ca_pem).unwrap();
    let url = format!("https://localhost:{}/api/publish/swap", addr.port());
    let publish = |n: u64, ca: &Path| {
        let client = crier::http_client::HttpClient::new(None)
            .with_ca_file(ca)
            .unwrap();
        let url = url.clone();
        async move {
            let (status, body) = client.post(&url, format!("{{\"n\":{n}}}")).await.unwrap();
            assert!(status.is_success(), "{status} {body:?}");
        }
    };

    let mut conns = Vec::with_capacity(N);
    for _ in 0..N {
        let mut ws = wss(addr, &one.ca_pem, "topic=swap").await;
        assert_eq!(next_text(&mut ws).await["op"], "subscribed");
        conns.push(ws);
    }
    publish(1, &ca_one).await;
    // Swap while all of them are open.
    std::fs::copy(&two.key, &key).unwrap();
    std::fs::copy(&two.cert, &cert).unwrap();
    let mut swapped = false;
    for _ in 0..100 {
        if tls_connect(addr, &two.ca_pem).await.is_ok() {
            swapped = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(swapped, "new handshakes never saw the new certificate");
    publish(2, &ca_two).await;
    // Every connection opened under the old certificate gets both publications, in order.
    let mut readers = tokio::task::JoinSet::new();
    for mut ws in conns {
        readers.spawn(async move {
            let a = next_text(&mut ws).await;
            let b = next_text(&mut ws).await;
            (a["data"]["n"].as_u64(), b["data"]["n"].as_u64())
        });
    }
    let mut ok = 0;
    while let Some(r) = readers.join_next().await {
        assert_eq!(r.unwrap(), (Some(1), Some(2)));
        ok += 1;
    }
    assert_eq!(ok, N);
    server.shutdown().await;
}

/// Another TLS stack than rustls on the client side: Python's `ssl` (OpenSSL), verifying
/// against the test CA, opens a WebSocket and an SSE stream and publishes, all over
/// `https://` on the one port (`tests/it/tls_client.py`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_ssl_speaks_websocket_sse_and_publish() {
    let Some(python) = tools::require("python3", "apt-get install -y python3") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (server, ca) = tls_server(dir.path(), "py").await;
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        tokio::process::Command::new(python)
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/it/tls_client.py"
            ))
            .arg(server.addr.port().to_string())
            .arg(&ca)
            .output(),
    )
    .await
    .expect("the Python client finishes")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.ends_with("ok\n"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("tls: TLSv1.3"), "{stdout}");
    server.shutdown().await;
}
