//! `GET /api/topics/{topic}/history`: pages for readers that poll, with the resume rule of
//! WebSocket subscriptions, and clear errors for bad parameters.

use crate::common::*;
use serde_json::{json, Value};

fn offsets(page: &Value) -> Vec<u64> {
    page["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["offset"].as_u64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_follow_since_epoch_and_limit() {
    let srv = TestServer::start(|c| c.history_size = 10).await;
    let mut epoch = String::new();
    for i in 1..=12 {
        // Verbatim: number formatting and whitespace are kept.
        let (s, body) = srv
            .publish("feed", &format!(r#"{{"i": {i}, "x": 2.50}}"#))
            .await;
        assert_eq!(s, 200);
        epoch = body["epoch"].as_str().unwrap().to_string();
    }

    // From the oldest kept (3..=12), in pages of 4.
    let (s, page) = srv.get("/api/topics/feed/history?limit=4").await;
    assert_eq!(s, 200, "{page}");
    assert_eq!(
        (
            &page["topic"],
            &page["epoch"],
            &page["offset"],
            &page["recovered"],
            &page["more"]
        ),
        (
            &json!("feed"),
            &json!(epoch),
            &json!(12),
            &json!(true),
            &json!(true)
        )
    );
    assert_eq!(offsets(&page), [3, 4, 5, 6]);
    assert_eq!(page["publications"][0]["data"], json!({"i": 3, "x": 2.5}));
    let mut all = offsets(&page);
    let mut since = *all.last().unwrap();
    loop {
        let (s, page) = srv
            .get(&format!(
                "/api/topics/feed/history?since={since}&epoch={epoch}&limit=4"
            ))
            .await;
        assert_eq!((s, &page["recovered"]), (200, &json!(true)), "{page}");
        all.extend(offsets(&page));
        since = *all.last().unwrap();
        if page["more"] == false {
            break;
        }
    }
    assert_eq!(all, (3..=12).collect::<Vec<_>>());

    // The raw body keeps the published text byte for byte.
    let (s, raw) = crier::http_client::HttpClient::new(None)
        .get(&srv.url("/api/topics/feed/history?since=11"))
        .await
        .unwrap();
    assert_eq!(s, 200);
    let raw = String::from_utf8(raw.to_vec()).unwrap();
    assert!(
        raw.contains(r#"{"offset":12,"data":{"i": 12, "x": 2.50}}"#),
        "{raw}"
    );

    // Up to date: an empty page, recovered.
    let (_, page) = srv.get("/api/topics/feed/history?since=12").await;
    assert_eq!(
        (offsets(&page).len(), &page["recovered"], &page["more"]),
        (0, &json!(true), &json!(false))
    );

    // Too old, another epoch, or ahead of the topic: not recovered, from the oldest kept.
    for q in [
        format!("since=1&epoch={epoch}"),
        "since=5&epoch=0badbeef".to_string(),
        "since=99".to_string(),
    ] {
        let (s, page) = srv
            .get(&format!("/api/topics/feed/history?{q}&limit=2"))
            .await;
        assert_eq!(s, 200);
        assert_eq!(page["recovered"], false, "{q}: {page}");
        assert_eq!(offsets(&page), [3, 4], "{q}");
        assert_eq!(page["more"], true);
    }
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_topics_and_bad_parameters() {
    let srv = TestServer::start(|_| {}).await;
    let topics = srv.state().metrics.topics.get();
    let (s, page) = srv.get("/api/topics/nobody-here/history").await;
    assert_eq!(s, 200);
    assert_eq!(
        page,
        json!({"topic": "nobody-here", "epoch": null, "offset": 0, "recovered": true,
               "more": false, "publications": []})
    );
    let (_, page) = srv.get("/api/topics/nobody-here/history?since=4").await;
    assert_eq!(page["recovered"], false);
    assert_eq!(
        srv.state().metrics.topics.get(),
        topics,
        "reading creates nothing"
    );

    for q in [
        "limit=0",
        "limit=1001",
        "limit=x",
        "since=-1",
        "since=abc",
        "epoch=9f1c2a7b",
        "since=1&epoch=no%20spaces",
        "since=1&bogus=1",
    ] {
        let (s, body) = srv.get(&format!("/api/topics/t/history?{q}")).await;
        assert_eq!(
            (s, &body["error"]["code"]),
            (400, &json!("bad_query")),
            "{q}: {body}"
        );
    }
    let (s, body) = srv.get("/api/topics/bad%20name/history").await;
    assert_eq!((s, &body["error"]["code"]), (400, &json!("bad_topic")));
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_stops_at_its_byte_cap() {
    let srv = TestServer::start(|_| {}).await;
    let big = format!(r#""{}""#, "x".repeat(60 * 1024));
    for _ in 0..6 {
        assert_eq!(srv.publish("big", &big).await.0, 200);
    }
    // 256 KiB of data per page: four of these fit, then `more` says to ask again.
    let (s, page) = srv.get("/api/topics/big/history?limit=100").await;
    assert_eq!(s, 200);
    assert_eq!(
        (offsets(&page), &page["more"]),
        (vec![1, 2, 3, 4], &json!(true))
    );
    let (_, page) = srv.get("/api/topics/big/history?since=4").await;
    assert_eq!((offsets(&page), &page["more"]), (vec![5, 6], &json!(false)));
    assert_eq!(
        page["publications"][1]["data"].as_str().unwrap().len(),
        60 * 1024
    );
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_topics_keep_no_history() {
    let srv = TestServer::start(|c| {
        c.board_update_interval = std::time::Duration::from_millis(10);
    })
    .await;
    srv.post_first_score("arena", "ann", 5).await;
    let (s, page) = srv.get("/api/topics/board:arena/history").await;
    assert_eq!(s, 200);
    assert!(page["offset"].as_u64().unwrap() >= 1);
    assert!(page["epoch"].is_string());
    assert_eq!(offsets(&page).len(), 0, "{page}");
    srv.shutdown().await;
}
