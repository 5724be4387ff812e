//! Crash safety of the leaderboard store: a child process commits in a loop and prints
//! every acknowledged entry; the parent SIGKILLs it at a random moment, reopens the store
//! and checks that every acknowledged entry is there, and that no transaction is torn.
//! The child checkpoints its entry log often, so kills also hit checkpoints.
//!
//! The child is this test binary re-invoked with `CRIER_STORE_CRASH_DIR` set, running only
//! the `crash_child` test.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crier::leaderboard::store::{Store, StoreOp, StoreWriter, StoredEntry};
use rand::Rng;

const DIR_ENV: &str = "CRIER_STORE_CRASH_DIR";
const ROUND_ENV: &str = "CRIER_STORE_CRASH_ROUND";
const BOARD: &str = "crash";
/// Entries per batch of the batching task; a batch must be all there or not at all.
const BATCH: usize = 100;
const SINGLE_TASKS: usize = 8;

fn entry(player: String, score: f64, achieved: u64) -> StoredEntry {
    StoredEntry {
        player,
        score,
        subscore: 0.0,
        achieved,
        meta: Some(format!(r#"{{"a":{achieved}}}"#)),
    }
}

fn ack(player: &str, score: f64) {
    let mut out = std::io::stdout().lock();
    // One write per line; the parent ignores a torn final line.
    let line = format!("ACK {player} {score}\n");
    out.write_all(line.as_bytes()).unwrap();
    out.flush().unwrap();
}

/// The child: commits forever (bounded to 60 s in case the parent is gone).
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(DIR_ENV) else {
        return; // a normal test run: nothing to do
    };
    let round: u64 = std::env::var(ROUND_ENV).unwrap().parse().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let mut store = Store::open(Path::new(&dir)).unwrap();
        // Checkpoint often, so kills also land during checkpoints.
        store.set_checkpoint_threshold(2_000);
        let (writer, _task) = StoreWriter::spawn(store, 256).unwrap();
        writer
            .commit(vec![StoreOp::PutBoard {
                board: BOARD.into(),
                options: "{}".into(),
            }])
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut tasks = Vec::new();
        // Single-entry callers (grouped by the writer), with the clock bumped alongside.
        for t in 0..SINGLE_TASKS {
            let w = writer.clone();
            tasks.push(tokio::spawn(async move {
                let mut i = 0u64;
                while Instant::now() < deadline {
                    let player = format!("r{round}-t{t}-{i}");
                    let score = (i * 10 + t as u64) as f64;
                    w.commit(vec![
                        StoreOp::PutEntry {
                            board: BOARD.into(),
                            entry: entry(player.clone(), score, i),
                        },
                        StoreOp::SetSeq {
                            board: BOARD.into(),
                            next_seq: i,
                        },
                    ])
                    .await
                    .unwrap();
                    ack(&player, score);
                    i += 1;
                }
            }));
        }
        // A batching caller.
        let w = writer.clone();
        tasks.push(tokio::spawn(async move {
            let mut b = 0u64;
            while Instant::now() < deadline {
                let ops = (0..BATCH)
                    .map(|j| StoreOp::PutEntry {
                        board: BOARD.into(),
                        entry: entry(format!("r{round}-b{b}-{j}"), j as f64, b),
                    })
                    .collect();
                w.commit(ops).await.unwrap();
                for j in 0..BATCH {
                    ack(&format!("r{round}-b{b}-{j}"), j as f64);
                }
                b += 1;
            }
        }));
        for t in tasks {
            t.await.unwrap();
        }
    });
}

#[test]
fn acknowledged_commits_survive_sigkill() {
    if std::env::var_os(DIR_ENV).is_some() {
        return; // we are the child
    }
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut rng = rand::thread_rng();
    let mut acked: HashMap<String, f64> = HashMap::new();

    for round in 0..4u64 {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "store_crash::crash_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(DIR_ENV, dir.path())
            .env(ROUND_ENV, round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (first_tx, first_rx) = std::sync::mpsc::channel::<()>();
        let reader = std::thread::spawn(move || {
            let mut lines = Vec::new();
            let mut reader = BufReader::new(stdout);
            let mut first_tx = Some(first_tx);
            let mut line = String::new();
            loop {
                line.clear();
                if reader.read_line(&mut line).unwrap() == 0 {
                    break;
                }
                // Only complete lines count: a line cut by the kill was not fully printed.
                if line.starts_with("ACK ") && line.ends_with('\n') {
                    if let Some(tx) = first_tx.take() {
                        let _ = tx.send(());
                    }
                    lines.push(line.trim_end().to_owned());
                }
            }
            lines
        });
        // Kill at a random moment after commits started flowing.
        first_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("child never acknowledged a commit");
        std::thread::sleep(Duration::from_millis(rng.gen_range(20..600)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let lines = reader.join().unwrap();
        assert!(!lines.is_empty());
        for l in &lines {
            let mut parts = l.split(' ').skip(1);
            let player = parts.next().unwrap().to_owned();
            let score: f64 = parts.next().unwrap().parse().unwrap();
            acked.insert(player, score);
        }

        // Reopen (redb repairs after the unclean shutdown) and verify.
        let store = Store::open(dir.path()).unwrap();
        let boards = store.load().unwrap();
        assert_eq!(boards.len(), 1);
        let board = &boards[0];
        let present: HashMap<&str, &StoredEntry> = board
            .entries
            .iter()
            .map(|e| (e.player.as_str(), e))
            .collect();
        let mut missing = Vec::new();
        for (player, score) in &acked {
            match present.get(player.as_str()) {
                Some(e) => assert_eq!(e.score, *score, "{player}"),
                None => missing.push(player.clone()),
            }
        }
        assert!(
            missing.is_empty(),
            "round {round}: {} acknowledged entries lost, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(5)]
        );
        // Atomicity: every batch is complete or absent.
        let mut batches: HashMap<&str, usize> = HashMap::new();
        for e in &board.entries {
            if let Some((prefix, _)) = e.player.rsplit_once('-') {
                if prefix.contains("-b") {
                    *batches.entry(prefix).or_default() += 1;
                }
            }
        }
        let torn: HashSet<_> = batches.iter().filter(|(_, n)| **n != BATCH).collect();
        assert!(torn.is_empty(), "round {round}: torn batches {torn:?}");
        eprintln!(
            "round {round}: {} acks this round, {} acked total, {} entries on disk",
            lines.len(),
            acked.len(),
            board.entries.len()
        );
    }
}
