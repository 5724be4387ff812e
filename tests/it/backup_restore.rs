//! The backup procedure of docs/operations.md (issue 21): stop the node, copy its data
//! directory, start a node on the copy. The copy serves the same boards and the same
//! durable history, at the same offsets and epoch.

use crate::common::*;
use crier::config::Namespace;
use serde_json::Value;
use std::time::Duration;

fn durable(cfg: &mut crier::config::Config) {
    cfg.namespaces.push(Namespace {
        pattern: "d:*".into(),
        history_size: 1000,
        history_ttl: Duration::from_secs(3600),
        durable: true,
        presence: false,
        join_leave: false,
    });
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        assert!(entry.file_type().unwrap().is_file(), "{:?}", entry.path());
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

#[tokio::test]
async fn a_restored_copy_serves_the_same_boards_and_history() {
    let first = TestServer::start(durable).await;
    for i in 1..=5 {
        let (s, body) = first.publish("d:news", &format!(r#"{{"n":{i}}}"#)).await;
        assert_eq!(s, 200, "{body}");
    }
    first.post_first_score("arena", "ann", 1200).await;
    for (p, score) in [("bob", 900), ("cy", 1500)] {
        let (s, body) = first
            .post_with_key(
                "/api/boards/arena/scores",
                &format!(r#"{{"player":"{p}","score":{score}}}"#),
                None,
            )
            .await;
        assert_eq!(s, 200, "{body}");
    }
    let (_, history) = first.get("/api/topics/d:news/history?since=0").await;
    let (_, board) = first.get("/api/boards/arena").await;
    assert_eq!(
        board["entries"].as_array().map(Vec::len),
        Some(3),
        "{board}"
    );

    // Stop (SIGTERM does the same: drain, flush), then copy the directory.
    let backup = tempfile::tempdir().unwrap();
    let data = first.dir.path().to_path_buf();
    let keep = first.dir;
    if let Some(s) = first.server {
        s.shutdown().await;
    }
    copy_dir(&data, backup.path());
    drop(keep);

    let restored_dir = backup.path().to_path_buf();
    let restored = TestServer::start(|cfg| {
        durable(cfg);
        cfg.data_dir = restored_dir;
    })
    .await;
    assert_eq!(
        restored.get("/api/topics/d:news/history?since=0").await.1,
        history
    );
    // The same board; `version` numbers a node's own snapshots and restarts with it.
    let (mut again, mut board) = (restored.get("/api/boards/arena").await.1, board);
    again.as_object_mut().unwrap().remove("version");
    board.as_object_mut().unwrap().remove("version");
    assert_eq!(again, board);
    // And it goes on from there: the next publication takes the next offset.
    let (_, receipt) = restored.publish("d:news", r#"{"n":6}"#).await;
    assert_eq!(receipt["offset"], 6, "{receipt}");
    restored.shutdown().await;
}

async fn get_keyed(server: &TestServer, path: &str, key: Option<&str>) -> (u16, Value) {
    let (status, bytes) = crier::http_client::HttpClient::new(key.map(String::from))
        .get(&server.url(path))
        .await
        .expect("http get");
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status.as_u16(), body)
}

/// `crier backup --url URL --key k --out DIR`, the real binary.
async fn crier_backup(url: &str, out: &std::path::Path) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_crier"))
        .args(["backup", "--url", url, "--key", "k", "--out"])
        .arg(out)
        .output()
        .await
        .expect("crier backup runs")
}

/// The online backup (`crier backup`, `GET /api/backup/{file}`): taken while a publisher
/// and a score poster keep writing, the copy holds a prefix of what was acknowledged,
/// everything acknowledged before the backup started at least, and a node started on it
/// serves it and goes on from there.
#[tokio::test]
async fn an_online_backup_taken_under_writes_restores_a_prefix_of_what_was_acknowledged() {
    let live = TestServer::start(|cfg| {
        durable(cfg);
        cfg.publisher_keys = vec!["k".into()];
    })
    .await;
    let stop = tokio_util::sync::CancellationToken::new();
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let url = live.url("");
    let publisher = {
        let (stop, acked, url) = (stop.clone(), acked.clone(), url.clone());
        tokio::spawn(async move {
            let client = crier::http_client::HttpClient::new(Some("k".into()));
            let mut n = 0u64;
            while !stop.is_cancelled() {
                n += 1;
                let (s, body) = client
                    .post(
                        &format!("{url}/api/publish/d:news"),
                        format!(r#"{{"n":{n}}}"#),
                    )
                    .await
                    .unwrap();
                assert!(s.is_success(), "{s} {body:?}");
                acked.store(n, std::sync::atomic::Ordering::SeqCst);
            }
            n
        })
    };
    let poster = {
        let (stop, url) = (stop.clone(), url.clone());
        tokio::spawn(async move {
            let client = crier::http_client::HttpClient::new(Some("k".into()));
            let mut n = 0u64;
            while !stop.is_cancelled() {
                n += 1;
                let (s, _) = client
                    .post(
                        &format!("{url}/api/boards/arena/scores"),
                        format!(r#"{{"player":"p{}","score":{n}}}"#, n % 50),
                    )
                    .await
                    .unwrap();
                assert!(s.is_success());
            }
        })
    };
    wait_until("writes are flowing", || {
        acked.load(std::sync::atomic::Ordering::SeqCst) >= 50
    })
    .await;

    let out = tempfile::tempdir().unwrap();
    let before = acked.load(std::sync::atomic::Ordering::SeqCst);
    let done = crier_backup(&url, out.path()).await;
    let during = acked.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    stop.cancel();
    let published = publisher.await.unwrap();
    poster.await.unwrap();
    let mut names: Vec<String> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["crier.redb", "history.redb"]);
    // Nothing is left behind beside the live files (the copies are unlinked once open).
    let leftovers: Vec<_> = std::fs::read_dir(live.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".backup-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // A second backup into the same directory overwrites nothing.
    let again = crier_backup(&url, out.path()).await;
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("exists"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    live.shutdown().await;

    let restored_dir = out.path().to_path_buf();
    let restored = TestServer::start(|cfg| {
        durable(cfg);
        cfg.data_dir = restored_dir;
    })
    .await;
    // Offsets 1..=m with m between what was acknowledged before and after the backup,
    // each holding what was published at it: a prefix, no hole.
    let (_, history) = restored
        .get("/api/topics/d:news/history?since=0&limit=1000")
        .await;
    let items = history["publications"].as_array().expect("publications");
    let m = items.len() as u64;
    eprintln!(
        "backup: acknowledged {before} before, {during} after, restored {m}, published {published}"
    );
    assert!(
        m >= before && m <= during.max(before) + 1 && m <= published,
        "restored {m}, acknowledged {before} before the backup and {during} after it"
    );
    for (i, p) in items.iter().enumerate() {
        assert_eq!(p["offset"], i as u64 + 1, "{p}");
        assert_eq!(p["data"]["n"], i as u64 + 1, "{p}");
    }
    let (s, board) = restored.get("/api/boards/arena").await;
    assert_eq!(s, 200, "{board}");
    assert!(!board["entries"].as_array().unwrap().is_empty(), "{board}");
    let (_, receipt) = restored.publish("d:news", r#"{"n":0}"#).await;
    assert_eq!(receipt["offset"], m + 1, "{receipt}");
    restored.shutdown().await;
}

#[tokio::test]
async fn a_backup_needs_a_key_names_a_kept_file_and_runs_one_at_a_time() {
    let open = TestServer::start(durable).await;
    let (s, body) = get_keyed(&open, "/api/backup", None).await;
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (403, Some("backup_needs_key"))
    );
    open.shutdown().await;

    let node = TestServer::start(|cfg| {
        durable(cfg);
        cfg.publisher_keys = vec!["k".into()];
    })
    .await;
    let (s, body) = get_keyed(&node, "/api/backup", None).await;
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );
    let (s, body) = get_keyed(&node, "/api/backup", Some("nope")).await;
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (403, Some("forbidden"))
    );
    let (s, body) = get_keyed(&node, "/api/backup", Some("k")).await;
    assert_eq!(s, 200);
    assert_eq!(
        body["files"],
        serde_json::json!(["crier.redb", "history.redb"])
    );
    let (s, body) = get_keyed(&node, "/api/backup/other.redb", Some("k")).await;
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (404, Some("no_durable_file"))
    );
    // While another backup holds the node's one slot.
    let held = node
        .state()
        .backup_slot
        .clone()
        .try_acquire_owned()
        .unwrap();
    let (s, body) = get_keyed(&node, "/api/backup/crier.redb", Some("k")).await;
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (409, Some("backup_in_progress"))
    );
    drop(held);
    let (status, bytes) = crier::http_client::HttpClient::new(Some("k".into()))
        .get(&node.url("/api/backup/crier.redb"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert!(bytes.len() > 1000, "{} bytes", bytes.len());
    node.shutdown().await;
}
