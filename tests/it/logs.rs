//! The log as an operator's pipeline reads it (issue 21): `--log-format json` makes every
//! line of the real binary one JSON object, and a flood of hostile requests is logged a few
//! times per reason plus a count, not once per request.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::*;

/// One request that sends `Content-Type` twice: refused 400 `duplicate_header`, a
/// refusal the server logs.
async fn duplicate_header(addr: &str) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"POST /api/publish/news HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    within("the answer", s.read_to_end(&mut out)).await.unwrap();
    assert!(
        out.starts_with(b"HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&out)
    );
}

#[tokio::test]
async fn json_logs_are_one_object_per_line_and_refusals_are_rate_limited() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_crier"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--data-dir",
        ])
        .arg(dir.path())
        .env_remove("CRIER_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let proc = Proc(child);
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut lines = Vec::new();
    let first = rx.recv_timeout(WAIT).expect("a first log line");
    lines.push(first.clone());
    let v: Value = serde_json::from_str(&first).expect("the first line is JSON");
    let message = v["fields"]["message"].as_str().unwrap();
    let addr = message
        .strip_prefix("listening on http://")
        .expect("it says where it listens")
        .to_string();

    for _ in 0..40 {
        duplicate_header(&addr).await;
    }
    // SIGTERM: the server drains and exits, closing stdout.
    let pid = proc.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    while let Ok(line) = rx.recv_timeout(WAIT) {
        lines.push(line);
    }
    let parsed: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    for v in &parsed {
        assert!(v["timestamp"].is_string() && v["level"].is_string(), "{v}");
    }
    let refused: Vec<&Value> = parsed
        .iter()
        .filter(|v| v["fields"]["reason"] == "duplicate_header")
        .collect();
    // 40 refusals: the budget of lines, no more (the count of the rest comes when the
    // window ends, 10 s later, after this test is over).
    assert_eq!(
        refused.len(),
        crier::refusal_log::LINES_PER_WINDOW as usize,
        "{refused:?}"
    );
    assert_eq!(refused[0]["level"], "WARN");
    assert_eq!(refused[0]["target"], "crier::refused");
    assert!(parsed
        .iter()
        .any(|v| v["fields"]["message"] == "shutting down"));
    drop(proc);
}
