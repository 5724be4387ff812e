//! The real binary as a user runs it: `crier serve` logs where it listens, `crier publish`
//! reaches subscribers, and SIGTERM drains clients with a 1001 close and exits 0.

use std::process::Command;
use std::time::Duration;

use crate::common::*;

#[tokio::test]
async fn sigterm_closes_websockets_with_1001_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let (mut proc, addr) = serve_binary(dir.path(), "127.0.0.1:0", &["--publisher-key", "k1"]);
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws?topic=news"))
        .await
        .unwrap();
    assert_eq!(next_json(&mut ws).await["op"], "subscribed");

    let out = Command::new(env!("CARGO_BIN_EXE_crier"))
        .args([
            "publish",
            "news",
            r#"{"headline":"hi"}"#,
            "--url",
            &format!("http://{addr}"),
            "--key",
            "k1",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"offset\":1"));
    assert_eq!(next_json(&mut ws).await["data"]["headline"], "hi");

    // Wrong key and bad JSON are refused by the CLI with a clear message and exit 1.
    let out = Command::new(env!("CARGO_BIN_EXE_crier"))
        .args([
            "publish",
            "news",
            "{}",
            "--url",
            &format!("http://{addr}"),
            "--key",
            "nope",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("forbidden"));
    let out = Command::new(env!("CARGO_BIN_EXE_crier"))
        .args(["publish", "news", "{nope"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not JSON"));

    let pid = proc.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    assert_eq!(expect_close(&mut ws).await, 1001);
    let deadline = std::time::Instant::now() + WAIT;
    let status = loop {
        if let Some(s) = proc.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "crier did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "exit status {status:?}");
}

#[test]
fn help_documents_every_option_with_its_default_and_variable() {
    let out = Command::new(env!("CARGO_BIN_EXE_crier"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--listen",
        "--data-dir",
        "--publisher-key",
        "--allowed-origin",
        "--max-connections",
        "--max-topics-per-connection",
        "--max-message-bytes",
        "--queue-max-bytes",
        "--ping-interval",
        "--pong-timeout",
        "--write-timeout",
        "--drain-timeout",
        "--config",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
    assert!(help.contains("CRIER_LISTEN") && help.contains("127.0.0.1:7700"));
    let bad = Command::new(env!("CARGO_BIN_EXE_crier"))
        .args(["serve", "--ping-interval", "soon"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
}
