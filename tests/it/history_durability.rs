//! Durable history is exactly as durable as its acknowledgements say (issue #7), proven
//! against the real `crier` binary with a `[[namespace]] pattern = "d:*" durable = true`
//! settings file:
//!
//! * `sigkill_while_publishing_loses_nothing_acknowledged`: concurrent publishers post to a
//!   durable topic while the process is SIGKILLed at a random moment; after a restart on
//!   the same data directory a subscriber resuming from offset 0 of the epoch it saw gets
//!   every acknowledged publication exactly once, in order, in the same epoch, then live
//!   ones. A memory-only topic comes back in a new epoch (`recovered: false`).
//! * `full_disk_gets_503_and_leaves_no_gap`: the data directory is a small tmpfs that is
//!   then filled up; a durable publish gets 503 `store_unavailable`, and once space is
//!   freed publishing continues at the next offset: no gap, nothing twice.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::common::disk::{fill_disk, Tmpfs};
use crate::common::http::{post_acked, publish_keyed, ws};
use crate::common::{next_json, send_json, serve_binary, wait_until, Ws};
use crier::http_client::HttpClient;
use parking_lot::Mutex;
use rand::Rng;
use serde_json::{json, Value};

/// Total publications the publishers of the kill test send at most (the whole stream must
/// fit one resume: half of the default 1 MiB client queue).
const MAX_SENT: u64 = 3000;
const PUBLISHERS: u64 = 4;

fn settings(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("crier.toml");
    std::fs::write(
        &path,
        r#"
[[namespace]]
pattern = "d:*"
durable = true
history_size = 100000
history_ttl = "1h"
"#,
    )
    .unwrap();
    path
}

fn serve(data: &std::path::Path, settings: &std::path::Path) -> (crate::common::Proc, String) {
    serve_binary(
        data,
        "127.0.0.1:0",
        &["--config", settings.to_str().unwrap()],
    )
}

/// POSTs a publication; Some(answer) on 200, None if the server died mid-request. Any
/// other status fails the test.
async fn publish(http: &HttpClient, addr: &str, topic: &str, body: &Value) -> Option<Value> {
    let url = format!("http://{addr}/api/publish/{topic}");
    post_acked(http, &url, body.to_string()).await
}

/// Subscribes with a resume position and returns the `subscribed` reply.
async fn resume(ws: &mut Ws, topic: &str, offset: u64, epoch: &str) -> Value {
    send_json(
        ws,
        &json!({"op": "subscribe", "topic": topic, "since": {"offset": offset, "epoch": epoch}, "id": 1})
            .to_string(),
    )
    .await;
    let reply = next_json(ws).await;
    assert_eq!(reply["op"], "subscribed", "{reply}");
    assert_eq!(reply["topic"], topic, "{reply}");
    reply
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_publishing_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let settings = settings(dir.path());
    let http = HttpClient::new(None);
    let (mut proc, addr) = serve(&data, &settings);

    // A memory-only topic, to see its epoch change.
    let m = publish(&http, &addr, "m:plain", &json!({"n": 1}))
        .await
        .unwrap();
    let memory_epoch = m["epoch"].as_str().unwrap().to_owned();

    // sent: n -> acknowledged offset (None: in flight when the server died).
    let sent: Arc<Mutex<HashMap<u64, Option<u64>>>> = Default::default();
    let epoch: Arc<Mutex<Option<String>>> = Default::default();
    let mut tasks = Vec::new();
    for w in 0..PUBLISHERS {
        let (sent, epoch, addr) = (sent.clone(), epoch.clone(), addr.clone());
        tasks.push(tokio::spawn(async move {
            let http = HttpClient::new(None);
            for k in 0..MAX_SENT / PUBLISHERS {
                let n = k * PUBLISHERS + w;
                sent.lock().insert(n, None);
                let Some(r) = publish(&http, &addr, "d:stream", &json!({"n": n})).await else {
                    return; // the server died
                };
                assert_eq!(r["duplicate"], false, "{r}");
                let e = r["epoch"].as_str().unwrap().to_owned();
                assert_eq!(
                    epoch.lock().get_or_insert_with(|| e.clone()),
                    &e,
                    "one epoch"
                );
                sent.lock().insert(n, Some(r["offset"].as_u64().unwrap()));
            }
        }));
    }
    wait_until("publications acknowledged", || {
        sent.lock().values().filter(|o| o.is_some()).count() >= 50
    })
    .await;
    let pause = rand::thread_rng().gen_range(0..600);
    tokio::time::sleep(Duration::from_millis(pause)).await;
    proc.0.kill().unwrap(); // SIGKILL
    proc.0.wait().unwrap();
    drop(proc);
    for t in tasks {
        crate::common::within("publishers stop after the kill", t)
            .await
            .unwrap();
    }
    let sent = std::mem::take(&mut *sent.lock());
    let epoch = epoch.lock().clone().unwrap();
    let acked: HashMap<u64, u64> = sent
        .iter()
        .filter_map(|(n, o)| o.map(|o| (o, *n)))
        .collect();
    // Not necessarily 1..=N: the kill may cut a commit's answers in any order.
    let max_acked = *acked.keys().max().unwrap();
    eprintln!(
        "killed after {pause} ms: {} acknowledged, {} in flight",
        acked.len(),
        sent.len() - acked.len()
    );

    let (_proc, addr) = serve(&data, &settings);
    let mut sub = ws(&addr, "").await;
    let reply = resume(&mut sub, "d:stream", 0, &epoch).await;
    assert_eq!(reply["recovered"], true, "{reply}");
    assert_eq!(reply["epoch"], epoch.as_str(), "{reply}");
    let current = reply["offset"].as_u64().unwrap();
    assert!(
        current >= max_acked,
        "{reply}: lost acknowledged publications"
    );
    let mut seen = std::collections::HashSet::new();
    for offset in 1..=current {
        let p = next_json(&mut sub).await;
        assert_eq!(p["topic"], "d:stream", "{p}");
        assert_eq!(p["offset"], offset, "{p}");
        let n = p["data"]["n"].as_u64().unwrap();
        assert!(seen.insert(n), "publication {n} delivered twice");
        match acked.get(&offset) {
            Some(&expected) => assert_eq!(n, expected, "offset {offset}"),
            // Committed but its answer was lost with the process: one that was in flight.
            None => assert_eq!(sent.get(&n), Some(&None), "offset {offset}: {p}"),
        }
    }
    // Offsets continue, in the same epoch, and reach the resumed subscriber live.
    let r = publish(&http, &addr, "d:stream", &json!({"n": "after"}))
        .await
        .unwrap();
    assert_eq!(r["offset"], current + 1, "{r}");
    assert_eq!(r["epoch"], epoch.as_str(), "{r}");
    let p = next_json(&mut sub).await;
    assert_eq!(
        (&p["offset"], &p["data"]["n"]),
        (&json!(current + 1), &json!("after"))
    );

    // The memory-only topic lost its history: a new epoch, explicitly not recovered.
    let reply = resume(&mut sub, "m:plain", 1, &memory_epoch).await;
    assert_eq!(reply["recovered"], false, "{reply}");
    assert_eq!(reply["offset"], 0, "{reply}");
    assert_ne!(reply["epoch"], memory_epoch.as_str(), "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_gets_503_and_leaves_no_gap() {
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("disk");
    let Some(disk) = Tmpfs::mount(&mnt, "16m") else {
        // Mounting needs root (CAP_SYS_ADMIN); without it there is no real full disk.
        crate::common::tools::missing("cannot mount a tmpfs here", "run the tests as root");
        return;
    };
    let data = mnt.join("data");
    let settings = settings(tmp.path());
    let http = HttpClient::new(None);
    let (proc, addr) = serve(&data, &settings);
    let url = format!("http://{addr}/api/publish/d:big");
    // 16 KiB each: every few need fresh pages in the file.
    let body = |n: u64| json!({"n": n, "pad": "x".repeat(16 * 1024)}).to_string();

    let first = publish(&http, &addr, "d:big", &json!({"n": 0}))
        .await
        .unwrap();
    let epoch = first["epoch"].as_str().unwrap().to_owned();
    let mut last = first["offset"].as_u64().unwrap();
    assert_eq!(last, 1);

    let filler = fill_disk(&mnt);
    // The file may still have free pages: publish until the disk refuses (bounded).
    let mut refused = None;
    for n in 1..=1000 {
        let (status, b) = http.post(&url, body(n)).await.unwrap();
        let answer: Value = serde_json::from_slice(&b).unwrap();
        if status == 200 {
            last += 1;
            assert_eq!(answer["offset"], last, "{answer}");
            continue;
        }
        assert_eq!(status, 503, "{answer}");
        assert_eq!(answer["error"]["code"], "store_unavailable", "{answer}");
        refused = Some(n);
        break;
    }
    eprintln!("disk full after {refused:?} big publications");
    assert!(refused.is_some(), "a full disk never refused a publication");
    // Still refused while full; readers see nothing of it.
    let (status, _) = http.post(&url, body(999)).await.unwrap();
    assert_eq!(status, 503);
    let (status, b) = http
        .get(&format!(
            "http://{addr}/api/topics/d:big/history?limit=1000"
        ))
        .await
        .unwrap();
    assert_eq!(status, 200);
    let page: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(page["offset"], last, "{page}");

    // The fault clears: publishing continues at the next offset, in the same epoch.
    std::fs::remove_file(filler).unwrap();
    let r = publish(&http, &addr, "d:big", &json!({"n": "after"}))
        .await
        .expect("publishing works once the disk has room");
    assert_eq!(r["offset"], last + 1, "{r}");
    assert_eq!(r["epoch"], epoch.as_str(), "{r}");
    last += 1;

    // And after a SIGKILL and restart the stream is contiguous, each publication once,
    // in the same epoch.
    drop(proc);
    let (proc, addr) = serve(&data, &settings);
    let mut since = 0;
    loop {
        let (status, b) = http
            .get(&format!(
                "http://{addr}/api/topics/d:big/history?since={since}&epoch={epoch}&limit=20"
            ))
            .await
            .unwrap();
        assert_eq!(status, 200);
        let page: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(page["recovered"], true, "since {since}");
        assert_eq!(page["offset"], last);
        for p in page["publications"].as_array().unwrap() {
            since += 1;
            assert_eq!(p["offset"], since);
        }
        if page["more"] == false {
            break;
        }
    }
    assert_eq!(since, last);
    drop(proc);
    drop(disk);
}

/// Concurrent retries of a durable publication yield one publication, and its key is
/// still remembered after a restart: a late retry gets the first receipt back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_idempotency_keys_hold_across_concurrent_retries_and_a_restart() {
    let data = tempfile::tempdir().unwrap();
    let durable = |cfg: &mut crier::config::Config| {
        cfg.data_dir = data.path().to_path_buf();
        cfg.namespaces.push(crier::config::Namespace {
            pattern: "d:*".into(),
            history_size: 1000,
            history_ttl: Duration::from_secs(3600),
            durable: true,
            presence: false,
            join_leave: false,
        });
    };
    let srv = crate::common::TestServer::start(durable).await;
    let url = srv.url("/api/publish/d:orders");
    let retries: Vec<_> = (0..8)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { publish_keyed(&url, r#"{"order":1}"#, b"order-1").await })
        })
        .collect();
    let mut answers = Vec::new();
    for r in retries {
        let (status, _, answer) = r.await.unwrap();
        assert_eq!(status, 200, "{answer}");
        answers.push(answer);
    }
    assert_eq!(
        answers.iter().filter(|a| a["duplicate"] == false).count(),
        1
    );
    assert!(answers.iter().all(|a| a["offset"] == 1), "{answers:?}");
    let epoch = answers[0]["epoch"].clone();
    let (status, _, second) = publish_keyed(&url, r#"{"order":2}"#, b"order-2").await;
    assert_eq!((status, &second["offset"]), (200, &json!(2)));
    srv.shutdown().await;

    let srv = crate::common::TestServer::start(durable).await;
    let url = srv.url("/api/publish/d:orders");
    let (status, _, late) = publish_keyed(&url, r#"{"order":1}"#, b"order-1").await;
    assert_eq!(status, 200, "{late}");
    assert_eq!(
        (&late["offset"], &late["epoch"], &late["duplicate"]),
        (&json!(1), &epoch, &json!(true))
    );
    let (_, _, third) = publish_keyed(&url, r#"{"order":3}"#, b"order-3").await;
    assert_eq!((&third["offset"], &third["epoch"]), (&json!(3), &epoch));
    let (_, page) = srv.get("/api/topics/d:orders/history").await;
    let orders: Vec<&Value> = page["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| &p["data"]["order"])
        .collect();
    assert_eq!(orders, vec![&json!(1), &json!(2), &json!(3)]);
    let (_, metrics) = HttpClient::new(None)
        .get(&srv.url("/metrics"))
        .await
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics);
    for name in [
        "crier_durable_commits_total ",
        "crier_durable_commit_seconds_count ",
    ] {
        let line = metrics
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name}missing"));
        assert_ne!(line, format!("{name}0"), "{line}");
    }
    srv.shutdown().await;
}
