//! Inputs the cargo-fuzz targets (fuzz/, docs/fuzzing.md) found, kept as plain tests so the
//! stable `cargo test` guards them without a nightly toolchain.

use crier::metrics::Transport;
use crier::publication::Publication;

/// Splits an SSE stream into lines as EventSource does: CRLF, LF and a lone CR all end a
/// line. Returns each event's joined `data`.
fn event_source_data(stream: &[u8]) -> Vec<String> {
    let text = std::str::from_utf8(stream).expect("SSE is UTF-8");
    let mut events = Vec::new();
    let mut data: Option<String> = None;
    for line in text.replace("\r\n", "\n").split(['\r', '\n']) {
        if line.is_empty() {
            if let Some(d) = data.take() {
                events.push(d);
            }
        } else if let Some(v) = line.strip_prefix("data:") {
            let v = v.strip_prefix(' ').unwrap_or(v);
            match &mut data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(v);
                }
                None => data = Some(v.to_string()),
            }
        }
    }
    events
}

/// fuzz/publish_body, crash-ada966a9: a body with carriage returns as JSON whitespace
/// (issue 6, finding 5). The SSE event carried the bare CRs, which EventSource reads as
/// line ends, so subscribers got `[0,2.5,"x\n",-4` and a stray line: broken JSON.
#[test]
fn sse_event_of_a_body_with_bare_crs_parses_back() {
    let body = b"[0,2.5,\"x\\n\",-4\r\r,null]";
    let data = crier::api::publish::parse_json(body).expect("valid JSON");
    let p = Publication::new("t".into(), 7, data.get().as_bytes());
    let sse = p.wire(Transport::Sse);
    assert!(!sse.contains(&b'\r'), "bare CR in {sse:?}");
    let events = event_source_data(&sse);
    assert_eq!(events.len(), 1, "{events:?}");
    let env: serde_json::Value = serde_json::from_str(&events[0]).expect("event data is JSON");
    assert_eq!(env["data"], serde_json::json!([0, 2.5, "x\n", -4, null]));
}

/// The same check on the bodies EventSource already handled, so the helper above is known
/// to parse what crier sends.
#[test]
fn sse_event_of_multiline_bodies_parses_back() {
    for body in [
        &b"{\"a\":1,\n\"b\":[\r\n2]}"[..],
        b"\"x\\r\\n\"",
        b"[\n\n1\n]",
    ] {
        let data = crier::api::publish::parse_json(body).expect("valid JSON");
        let expected: serde_json::Value = serde_json::from_slice(body).unwrap();
        let p = Publication::new("t".into(), 1, data.get().as_bytes());
        let events = event_source_data(&p.wire(Transport::Sse));
        assert_eq!(events.len(), 1, "{events:?}");
        let env: serde_json::Value = serde_json::from_str(&events[0]).expect("JSON");
        assert_eq!(env["data"], expected);
    }
}

/// `topics_from_query` deduplicated every `topic` before applying the per-connection
/// limit, with a linear scan per name: quadratic in the query. hyper accepts request lines
/// of several hundred KiB, so one `GET /ws?topic=a0&topic=a1&...` with ~30,000 names cost
/// seconds of CPU before its 400. Refusing at the first name past the limit bounds the
/// work by `max`.
#[test]
fn a_query_with_far_too_many_topics_is_refused_early() {
    let query: String = (0..30_000)
        .map(|i| format!("topic=t{i}"))
        .collect::<Vec<_>>()
        .join("&");
    assert!(query.len() < 400 * 1024, "fits hyper's default buffer");
    let started = std::time::Instant::now();
    let err = crier::topic::topics_from_query(Some(&query), 64).unwrap_err();
    eprintln!("refused in {:?}", started.elapsed());
    assert_eq!(err, crier::topic::TopicError::TooMany(64));
    let err = crier::api::error::ApiError::from(err);
    assert_eq!(err.status.as_u16(), 400);
    assert_eq!(err.code.as_str(), "too_many_topics");
}

/// Found while writing fuzz/score_batch: an oversized batch was converted item by item into
/// `ScoreInput`s before `submit` counted it. It is now refused on the item count, with the
/// same answer `submit` gives.
#[test]
fn a_score_batch_over_the_limit_is_refused_before_conversion() {
    use crier::api::boards::parse_scores;
    use crier::leaderboard::service::MAX_BATCH;
    let batch = |n: usize| format!("[{}]", vec![r#"{"player":"p","score":1}"#; n].join(","));
    assert_eq!(
        parse_scores(batch(MAX_BATCH).as_bytes()).unwrap().len(),
        MAX_BATCH
    );
    let err = parse_scores(batch(MAX_BATCH + 1).as_bytes()).unwrap_err();
    assert_eq!(err.status.as_u16(), 400);
    assert_eq!(err.code.as_str(), "invalid_score");
    assert_eq!(
        err.message,
        format!("at most {MAX_BATCH} scores per request")
    );
    // Not even well-formed entries are looked at past the limit.
    let junk = format!("[{}]", vec!["{}"; 350_000].join(","));
    assert_eq!(
        parse_scores(junk.as_bytes()).unwrap_err().code.as_str(),
        "invalid_score"
    );
}
