//! Two real `crier serve --redis` nodes on one real `redis-server`: what a client sees
//! when the load balancer sends it to either node (groundwork for issue 8).

use std::time::Duration;

use crate::common::http::{publish, ws};
use crate::common::redis::{node, RedisServer};
use crate::common::{next_json, offsets_until, send_json, within};
use crier::http_client::HttpClient;
use serde_json::{json, Value};

#[tokio::test]
async fn two_nodes_act_as_one_server() {
    crate::need_redis!();
    let redis = RedisServer::start();
    let (_a, a, _da) = node(&redis);
    let (_b, b, _db) = node(&redis);

    // Fan-out across nodes, in order, whichever node publishes.
    let mut on_a = ws(&a, "?topic=t").await;
    let mut on_b = ws(&b, "?topic=t").await;
    for w in [&mut on_a, &mut on_b] {
        let v = next_json(w).await;
        assert_eq!(
            (v["op"].as_str(), v["offset"].as_u64()),
            (Some("subscribed"), Some(0))
        );
    }
    for i in 1..=20u64 {
        let node = if i % 2 == 0 { &a } else { &b };
        let r = publish(node, "t", &json!({ "i": i })).await;
        assert_eq!(r["offset"], i);
    }
    let want: Vec<u64> = (1..=20).collect();
    assert_eq!(offsets_until(&mut on_a, 20).await, want);
    assert_eq!(offsets_until(&mut on_b, 20).await, want);
    let epoch = publish(&a, "t", &json!({ "i": 21 })).await["epoch"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(offsets_until(&mut on_b, 21).await, [21]);

    // Concurrent publishes through both nodes: one contiguous sequence.
    let mut tasks = Vec::new();
    for n in [a.clone(), b.clone(), a.clone(), b.clone()] {
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            for _ in 0..20 {
                got.push(
                    publish(&n, "c", &json!({})).await["offset"]
                        .as_u64()
                        .unwrap(),
                );
            }
            got
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_unstable();
    assert_eq!(all, (1..=80).collect::<Vec<u64>>());

    // A client of node b is cut at offset 21; it resumes on node a while node b publishes.
    drop(on_b);
    for i in 22..=30 {
        publish(&b, "t", &json!({ "i": i })).await;
    }
    let flow = {
        let b = b.clone();
        tokio::spawn(async move {
            for i in 31..=50 {
                publish(&b, "t", &json!({ "i": i })).await;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    let mut back = ws(&a, "").await;
    send_json(
        &mut back,
        &json!({"op":"subscribe","topic":"t","since":{"offset":21,"epoch":epoch},"id":1})
            .to_string(),
    )
    .await;
    let v = next_json(&mut back).await;
    assert_eq!(v["op"], "subscribed", "{v}");
    assert_eq!(v["recovered"], true, "{v}");
    assert_eq!(v["epoch"], epoch.as_str());
    flow.await.unwrap();
    assert_eq!(
        offsets_until(&mut back, 50).await,
        (22..=50).collect::<Vec<u64>>(),
        "every missed publication once, in order, then live ones"
    );

    // History reads agree on both nodes.
    for n in [&a, &b] {
        let (status, bytes) = HttpClient::new(None)
            .get(&format!(
                "http://{n}/api/topics/t/history?since=45&epoch={epoch}"
            ))
            .await
            .unwrap();
        assert_eq!(status.as_u16(), 200);
        let h: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(h["recovered"], true, "{h}");
        let got: Vec<u64> = h["publications"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["offset"].as_u64().unwrap())
            .collect();
        assert_eq!(got, [46, 47, 48, 49, 50]);
    }
}

/// SSE: a stream cut on one node resumes on the other with the id it last saw (here the
/// `lastEventId` query parameter, as a first connection that knows its position sends it).
#[tokio::test]
async fn an_sse_stream_resumes_on_the_other_node() {
    crate::need_redis!();
    let redis = RedisServer::start();
    let (_a, a, _da) = node(&redis);
    let (_b, b, _db) = node(&redis);
    let mut first = crate::common::Sse::connect(a.parse().unwrap(), "?topic=s").await;
    let mut epoch = String::new();
    for i in 1..=5u64 {
        let r = publish(&b, "s", &json!({ "i": i })).await;
        epoch = r["epoch"].as_str().unwrap().to_string();
    }
    for want in 1..=5u64 {
        let (id, v) = within("node a streams", first.next_event()).await.unwrap();
        assert_eq!((id, v["offset"].as_u64()), (Some(want), Some(want)));
    }
    drop(first);
    for i in 6..=12u64 {
        publish(&a, "s", &json!({ "i": i })).await;
    }
    let mut back = crate::common::Sse::connect(
        b.parse().unwrap(),
        &format!("?topic=s&lastEventId={epoch}:5"),
    )
    .await;
    publish(&a, "s", &json!({ "i": 13 })).await;
    for want in 6..=13u64 {
        let (id, v) = within("node b replays then streams", back.next_event())
            .await
            .unwrap();
        assert_eq!((id, v["offset"].as_u64()), (Some(want), Some(want)));
    }
}
