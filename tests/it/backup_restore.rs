//! The backup procedure of docs/operations.md (issue 21): stop the node, copy its data
//! directory, start a node on the copy. The copy serves the same boards and the same
//! durable history, at the same offsets and epoch.

use crate::common::*;
use crier::config::Namespace;
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
