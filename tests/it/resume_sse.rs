//! SSE resume over real sockets: a stream (of one topic or several) cut abruptly comes
//! back with the `Last-Event-ID` of the last event it received, or a first connection
//! with `?lastEventId=`, and gets every missed publication of every topic once, in order,
//! then live ones. Positions that cannot be served say `recovered:false` in the
//! `subscribed` event; malformed ids get 400 `bad_last_event_id`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use crate::common::eventsource::{self, Event, EventStream};
use crate::common::*;
use serde_json::{json, Value};

/// A stream under test. The `subscribed` events come first per topic, in query order,
/// each followed by its topic's replay: publications read while waiting for the later
/// `subscribed` events are kept for `next`.
struct Stream {
    es: EventStream,
    stash: VecDeque<Event>,
}

impl Stream {
    /// Opens the stream and reads its `subscribed` events: (reply, id) per topic.
    async fn open(
        srv: &TestServer,
        query: &str,
        last_id: Option<&str>,
        topics: &[&str],
    ) -> (Stream, Vec<(Value, String)>) {
        let headers: Vec<(&str, &str)> = last_id
            .map(|id| ("last-event-id", id))
            .into_iter()
            .collect();
        let es = eventsource::open(srv.addr, None, query, &headers)
            .await
            .unwrap_or_else(|(s, body)| panic!("SSE refused: {s} {body}"));
        let mut s = Stream {
            es,
            stash: VecDeque::new(),
        };
        let mut out = Vec::new();
        while out.len() < topics.len() {
            let e = s.es.next().await.expect("the stream is open");
            if e.event.is_none() {
                let t = e.json()["topic"].as_str().unwrap().to_string();
                assert!(
                    topics[..out.len()].contains(&t.as_str()),
                    "{t}: a publication after its topic's subscribed event"
                );
                s.stash.push_back(e);
                continue;
            }
            assert_eq!(e.event.as_deref(), Some("subscribed"), "{e:?}");
            let v = e.json();
            let t = topics[out.len()];
            assert_eq!((&v["op"], &v["topic"]), (&json!("subscribed"), &json!(t)));
            assert!(v.get("id").is_none(), "no command id on SSE: {v}");
            out.push((v, e.id.expect("every subscribed event carries an id")));
        }
        (s, out)
    }

    async fn next(&mut self) -> Event {
        match self.stash.pop_front() {
            Some(e) => e,
            None => self.es.next().await.expect("the stream is open"),
        }
    }

    /// What the browser would send back: the id of the last event received.
    fn last_id(&self) -> String {
        self.es.last_id.clone().expect("an id")
    }
}

/// The `EPOCH:OFFSET` entries of an id, by position (empty entries are None).
fn entries(id: &str) -> Vec<Option<(String, u64)>> {
    id.split(',')
        .map(|e| {
            e.split_once(':')
                .map(|(ep, off)| (ep.to_string(), off.parse().unwrap()))
        })
        .collect()
}

/// A publication event: checks that its id is the vector after it, and returns its
/// topic and offset.
fn publication(e: &Event, index_of: &dyn Fn(&str) -> usize) -> (String, u64) {
    assert_eq!(e.event, None, "publications are unnamed events: {e:?}");
    let v = e.json();
    let topic = v["topic"].as_str().unwrap().to_string();
    let offset = v["offset"].as_u64().unwrap();
    let id = e.id.as_deref().expect("every publication carries an id");
    let at = entries(id)[index_of(&topic)].clone().expect("a position");
    assert_eq!(at.1, offset, "the id holds this publication's offset: {id}");
    (topic, offset)
}

async fn publish(srv: &TestServer, topic: &str, n: u64) -> (u64, String) {
    let (s, body) = srv.publish(topic, &format!(r#"{{"n":{n}}}"#)).await;
    assert_eq!(s, 200, "{body}");
    (
        body["offset"].as_u64().unwrap(),
        body["epoch"].as_str().unwrap().to_string(),
    )
}

async fn wait_unsubscribed(srv: &TestServer, topic: &str) {
    let state = srv.state().clone();
    let topic = topic.to_string();
    wait_until("the cut stream is gone", || {
        state.hub.subscriber_count(&topic) == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_topic_cut_then_resumed_gets_exactly_what_it_missed() {
    let srv = TestServer::start(|_| {}).await;
    let (mut es, sub) = Stream::open(&srv, "?topic=t", None, &["t"]).await;
    let (reply, id) = &sub[0];
    assert_eq!(reply["offset"], 0);
    assert!(
        reply.get("recovered").is_none(),
        "no position, no recovered"
    );
    let epoch = reply["epoch"].as_str().unwrap().to_string();
    assert_eq!(*id, format!("{epoch}:0"));
    assert_eq!(es.es.comments, Vec::<String>::new());

    for i in 1..=3 {
        assert_eq!(publish(&srv, "t", i).await, (i, epoch.clone()));
        let e = es.next().await;
        assert_eq!(publication(&e, &|_| 0), ("t".into(), i));
        assert_eq!(e.id.unwrap(), format!("{epoch}:{i}"));
    }
    let last_id = es.last_id();
    drop(es);
    wait_unsubscribed(&srv, "t").await;

    const N: u64 = 25;
    for i in 4..4 + N {
        publish(&srv, "t", i).await;
    }
    let (mut es, mut sub) = Stream::open(&srv, "?topic=t", Some(&last_id), &["t"]).await;
    let (reply, id) = sub.remove(0);
    assert_eq!(
        (&reply["recovered"], &reply["offset"], &reply["epoch"]),
        (&json!(true), &json!(3 + N), &json!(epoch))
    );
    assert_eq!(id, last_id, "recovered: the replay moves the position on");
    for i in 4..4 + N {
        let e = es.next().await;
        assert_eq!(publication(&e, &|_| 0), ("t".into(), i));
        assert_eq!(e.json()["data"]["n"], i);
    }
    // Then live, with nothing in between.
    publish(&srv, "t", 99).await;
    let e = es.next().await;
    assert_eq!(publication(&e, &|_| 0), ("t".into(), 4 + N));
    assert_eq!(e.json()["data"]["n"], 99);
    drop(es);
    srv.assert_clean().await;
    srv.shutdown().await;
}

/// Three topics on one stream, cut while publications keep coming on all three; the one
/// id of the last event received resumes all three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_topics_resume_from_one_id_while_publishing_goes_on() {
    let srv = Arc::new(TestServer::start(|c| c.history_size = 1000).await);
    let topics = ["a", "b", "c"];
    let index_of = |t: &str| topics.iter().position(|x| *x == t).unwrap();
    // Topics with a past: the stream joins in the middle of each.
    let mut start = BTreeMap::new();
    for t in topics {
        for i in 1..=2 {
            start.insert(t, publish(&srv, t, i).await.0);
        }
    }
    let query = "?topic=a&topic=b&topic=c";
    let (mut es, sub) = Stream::open(&srv, query, None, &topics).await;
    // Each subscribed event fills in its own entry, leaving the later ones empty.
    let epochs: Vec<String> = sub
        .iter()
        .map(|(v, _)| v["epoch"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(sub[0].1, format!("{}:2,,", epochs[0]));
    assert_eq!(sub[1].1, format!("{}:2,{}:2,", epochs[0], epochs[1]));
    assert_eq!(
        sub[2].1,
        format!("{}:2,{}:2,{}:2", epochs[0], epochs[1], epochs[2])
    );

    const N: u64 = 60;
    let publisher = {
        let srv = srv.clone();
        tokio::spawn(async move {
            for i in 3..3 + N {
                for t in ["a", "b", "c"] {
                    publish(&srv, t, i).await;
                }
            }
        })
    };
    // Read a while, then cut in the middle of the stream.
    let mut got: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for _ in 0..40 {
        let (t, o) = publication(&es.next().await, &index_of);
        got.entry(t).or_default().push(o);
    }
    let last_id = es.last_id();
    drop(es);
    // Reconnect while the publisher is still going.
    let (mut es, sub) = Stream::open(&srv, query, Some(&last_id), &topics).await;
    for ((reply, _), t) in sub.iter().zip(topics) {
        assert_eq!(reply["recovered"], true, "{t}: {reply}");
    }
    publisher.await.unwrap();
    let want: Vec<u64> = (1..3 + N).collect();
    while got.values().map(Vec::len).sum::<usize>() < 3 * (N as usize) {
        let (t, o) = publication(&es.next().await, &index_of);
        got.entry(t).or_default().push(o);
    }
    for t in topics {
        // The first connection started after offset 2 of each topic.
        let all: Vec<u64> = [1, 2].into_iter().chain(got[t].iter().copied()).collect();
        assert_eq!(all, want, "{t}: every offset once, in order");
    }
    // Live after the replay: one more on b only.
    publish(&srv, "b", 0).await;
    let e = es.next().await;
    assert_eq!(publication(&e, &index_of), ("b".into(), 3 + N));
    let at = entries(&e.id.unwrap());
    assert_eq!(
        at.iter().map(|p| p.as_ref().unwrap().1).collect::<Vec<_>>(),
        vec![2 + N, 3 + N, 2 + N]
    );
    drop(es);
    srv.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_connection_resumes_from_the_query_and_the_header_wins() {
    let srv = TestServer::start(|_| {}).await;
    let mut epoch = String::new();
    for i in 1..=5 {
        epoch = publish(&srv, "t", i).await.1;
    }
    let (mut es, mut sub) = Stream::open(
        &srv,
        &format!("?topic=t&lastEventId={epoch}%3A2"),
        None,
        &["t"],
    )
    .await;
    let (reply, id) = sub.remove(0);
    assert_eq!(
        (&reply["recovered"], &reply["offset"]),
        (&json!(true), &json!(5))
    );
    assert_eq!(id, format!("{epoch}:2"));
    for i in 3..=5 {
        assert_eq!(publication(&es.next().await, &|_| 0).1, i);
    }
    drop(es);

    // Both given: the header (what EventSource sends on reconnect) wins.
    let query = format!("?topic=t&lastEventId={epoch}:1");
    let (mut es, mut sub) = Stream::open(&srv, &query, Some(&format!("{epoch}:4")), &["t"]).await;
    let (reply, _) = sub.remove(0);
    assert_eq!(reply["recovered"], true);
    assert_eq!(publication(&es.next().await, &|_| 0).1, 5);
    publish(&srv, "t", 6).await;
    assert_eq!(publication(&es.next().await, &|_| 0).1, 6);

    // An empty entry is "no position": a plain subscription, no recovered field.
    let (plain, sub) =
        Stream::open(&srv, "?topic=t&topic=u&lastEventId=,", None, &["t", "u"]).await;
    assert!(sub[0].0.get("recovered").is_none());
    assert!(sub[1].0.get("recovered").is_none());
    drop((es, plain));
    srv.assert_clean().await;
    srv.shutdown().await;
}

/// The `subscribed` events carry ids, so a stream cut before its first publication still
/// comes back without losing what was published meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_before_any_publication_still_resumes() {
    let srv = TestServer::start(|_| {}).await;
    publish(&srv, "a", 1).await;
    publish(&srv, "b", 1).await;
    let query = "?topic=a&topic=b";
    let (es, _) = Stream::open(&srv, query, None, &["a", "b"]).await;
    let last_id = es.last_id();
    drop(es);
    wait_unsubscribed(&srv, "a").await;
    for i in 2..=4 {
        publish(&srv, "a", i).await;
    }
    publish(&srv, "b", 2).await;

    let (mut es, sub) = Stream::open(&srv, query, Some(&last_id), &["a", "b"]).await;
    assert_eq!(sub[0].0["recovered"], true);
    assert_eq!(sub[1].0["recovered"], true);
    let idx = |t: &str| usize::from(t == "b");
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(publication(&es.next().await, &idx));
    }
    assert_eq!(
        got,
        vec![
            ("a".into(), 2),
            ("a".into(), 3),
            ("a".into(), 4),
            ("b".into(), 2)
        ]
    );

    // Cut again right after the first subscribed event: b's entry is still the position
    // the client asked for, so b resumes (and would learn of a failure) next time.
    drop(es);
    let headers = [("last-event-id", "0badbeef:1,")];
    let mut es = eventsource::open(srv.addr, None, query, &headers)
        .await
        .unwrap();
    let first = es.next().await.unwrap();
    assert_eq!(first.json()["recovered"], false);
    let a_now = first.json()["epoch"].as_str().unwrap().to_string();
    assert_eq!(first.id.as_deref(), Some(&*format!("{a_now}:4,")));
    drop(es);
    srv.assert_clean().await;
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn positions_that_cannot_be_served_say_recovered_false() {
    let srv = TestServer::start(|c| {
        c.history_size = 5;
        c.board_update_interval = std::time::Duration::from_millis(10);
    })
    .await;
    let mut epoch = String::new();
    for i in 1..=10 {
        epoch = publish(&srv, "old", i).await.1;
    }
    // Too old (only 5 kept), another epoch, and a topic never published to (it has no
    // past, so its position from a previous stream is lost with it).
    let id = format!("{epoch}:2,0badbeef:1,0badbeef:0");
    let (mut es, sub) = Stream::open(
        &srv,
        "?topic=old&topic=fresh&topic=x",
        Some(&id),
        &["old", "fresh", "x"],
    )
    .await;
    for (reply, _) in &sub {
        assert_eq!(reply["recovered"], false, "{reply}");
    }
    assert_eq!(sub[0].0["offset"], 10);
    assert_eq!(sub[0].0["epoch"], json!(epoch));
    // The client now stands at the current positions, not at what it asked for.
    let ids = entries(&sub[2].1);
    assert_eq!(ids[0], Some((epoch.clone(), 10)));
    assert_eq!(ids[1].as_ref().unwrap().1, 0);
    assert_ne!(ids[1].as_ref().unwrap().0, "0badbeef");
    // Nothing replayed: the next event is live.
    publish(&srv, "old", 11).await;
    let idx = |t: &str| usize::from(t != "old");
    assert_eq!(publication(&es.next().await, &idx), ("old".into(), 11));
    drop(es);

    // A leaderboard: its snapshot follows either answer.
    srv.post_first_score("arena", "ann", 5).await;
    let (mut es, mut sub) = Stream::open(
        &srv,
        "?topic=board:arena",
        Some("00000000:1"),
        &["board:arena"],
    )
    .await;
    let (reply, id) = sub.remove(0);
    assert_eq!(reply["recovered"], false);
    let snap = es.next().await;
    assert_eq!(snap.json()["data"]["top"][0]["player"], "ann");
    let snap_id = snap.id.clone().unwrap();
    drop(es);
    assert_eq!(entries(&id)[0], entries(&snap_id)[0]);
    let (mut es, mut sub) =
        Stream::open(&srv, "?topic=board:arena", Some(&snap_id), &["board:arena"]).await;
    let (reply, _) = sub.remove(0);
    assert_eq!(
        reply["recovered"], true,
        "the newest state is a full recovery"
    );
    let snap = es.next().await;
    assert_eq!(snap.json()["data"]["top"][0]["player"], "ann");
    drop(es);
    srv.assert_clean().await;
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_ids_get_400_and_change_nothing() {
    let srv = TestServer::start(|c| c.max_topics_per_connection = 4).await;
    let too_long = "a:1,".repeat(100);
    let cases: Vec<(String, Vec<(&str, &str)>)> = vec![
        ("?topic=t".into(), vec![("last-event-id", "41")]),
        ("?topic=t".into(), vec![("last-event-id", "9f1c2a7b:")]),
        ("?topic=t".into(), vec![("last-event-id", "9f1c2a7b:-1")]),
        (
            "?topic=t&topic=u".into(),
            vec![("last-event-id", "9f1c2a7b:1,x")],
        ),
        ("?topic=t".into(), vec![("last-event-id", &too_long)]),
        (
            "?topic=t".into(),
            vec![("last-event-id", "a:1"), ("last-event-id", "a:2")],
        ),
        ("?topic=t&lastEventId=x%3Ay".into(), vec![]),
        ("?topic=t&lastEventId=a:1&lastEventId=a:2".into(), vec![]),
        // The header wins, also when it is the bad one.
        (
            "?topic=t&lastEventId=a:1".into(),
            vec![("last-event-id", "bad")],
        ),
    ];
    for (query, headers) in &cases {
        let refused = eventsource::open(srv.addr, None, query, headers).await;
        let Err((status, body)) = refused else {
            panic!("{query} {headers:?} was accepted")
        };
        assert_eq!(status, 400, "{query} {headers:?}: {body}");
        assert_eq!(body["error"]["code"], "bad_last_event_id", "{body}");
        assert!(body["error"]["message"].as_str().unwrap().len() > 10);
    }
    // Entries past the topic count are not read.
    let (es, mut sub) = Stream::open(&srv, "?topic=t", Some("a:1,not-read"), &["t"]).await;
    let (reply, _) = sub.remove(0);
    assert_eq!(reply["recovered"], false);
    drop(es);
    srv.assert_clean().await;
    let (s, h) = srv.get("/api/topics/t/history").await;
    assert_eq!(
        (s, &h["epoch"]),
        (200, &Value::Null),
        "nothing was kept: {h}"
    );
    srv.shutdown().await;
}

/// Every SSE event carries the whole id vector, a few KiB for a stream of 64 topics whose
/// `Last-Event-ID` names long epochs and offsets. A replay of tiny publications (well
/// within the queue budget) must not turn into one body frame of (events x id vector):
/// an attack of many such streams would hold many times `queue_max_bytes` each. The
/// frame size is what the server held for the client at once; the replay stays exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn id_lines_of_a_many_topic_stream_stay_within_the_batch_budget() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const N: u64 = 1000;
    let srv = TestServer::start(|c| c.history_size = N as usize).await;
    let mut epoch = String::new();
    for n in 1..=N {
        let r = srv
            .state()
            .broker
            .publish(crier::broker::PublishRequest {
                topic: "t0",
                data: n.to_string().as_bytes(),
                ..Default::default()
            })
            .await
            .unwrap();
        epoch = r.epoch.to_string();
    }
    let topics: Vec<String> = (0..64).map(|i| format!("t{i}")).collect();
    let mut id = format!("{epoch}:0");
    for _ in 1..64 {
        id.push_str(&format!(",{}:{}", "a".repeat(32), u64::MAX));
    }
    let query: String = topics.iter().map(|t| format!("topic={t}&")).collect();
    let mut s = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    let req = format!(
        "GET /sse?{query} HTTP/1.1\r\nHost: {}\r\nLast-Event-ID: {id}\r\n\r\n",
        srv.addr
    );
    s.write_all(req.as_bytes()).await.unwrap();
    // A healthy client beside it gets its publication.
    let mut healthy = Sse::connect(srv.addr, "?topic=other").await;
    srv.publish("other", "7").await;
    assert_eq!(healthy.next_event().await.unwrap().1["data"], 7);

    let mut buf = Vec::new();
    let mut body = Vec::new();
    let mut largest = 0;
    let mut head_done = false;
    let replayed = |body: &[u8]| {
        String::from_utf8_lossy(body)
            .matches("\"topic\":\"t0\"")
            .count() as u64
    };
    within("the replay", async {
        while replayed(&body) < N {
            let mut chunk = [0u8; 65536];
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "stream ended early");
            buf.extend_from_slice(&chunk[..n]);
            if !head_done {
                let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                    continue;
                };
                assert!(buf.starts_with(b"HTTP/1.1 200"));
                buf.drain(..i + 4);
                head_done = true;
            }
            // Chunked encoding: `SIZE\r\nDATA\r\n`.
            while let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                let size =
                    usize::from_str_radix(std::str::from_utf8(&buf[..i]).unwrap(), 16).unwrap();
                largest = largest.max(size);
                if buf.len() < i + 2 + size + 2 {
                    break;
                }
                body.extend_from_slice(&buf[i + 2..i + 2 + size]);
                buf.drain(..i + 2 + size + 2);
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&body);
    let offsets: Vec<u64> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: {\"topic\":\"t0\",\"offset\":"))
        .map(|l| l.split(',').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(offsets, (1..=N).collect::<Vec<_>>(), "the replay is exact");
    assert!(
        largest <= 2 * 256 * 1024,
        "one body frame of {largest} bytes (a batch is 256 KiB of events and their ids)"
    );
}
