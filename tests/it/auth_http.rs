//! Subscriber tokens on the HTTP reads (docs/auth.md): topic history, board pages, player
//! views and the board list. A real server over loopback, HS256 tokens minted here.

use crate::common::TestServer;
use crier::http_client::HttpClient;
use serde_json::{json, Value};

const SECRET: &str = "http-test-secret-of-at-least-32-bytes";

fn token_with(secret: &str, topics: &[&str], exp_in: i64) -> String {
    crate::common::auth::mint(secret, "bob", topics, exp_in)
}

fn token(topics: &[&str]) -> String {
    token_with(SECRET, topics, 600)
}

async fn private_server() -> TestServer {
    TestServer::start(|c| {
        c.private_topics = vec!["private:*".into(), "board:vip*".into()];
        c.jwt_secret = SECRET.into();
    })
    .await
}

/// GET with the token as `Authorization: Bearer`.
async fn get_bearer(server: &TestServer, path: &str, token: &str) -> (u16, Value) {
    let (status, bytes) = HttpClient::new(Some(token.to_string()))
        .get(&server.url(path))
        .await
        .expect("http get");
    (
        status.as_u16(),
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn code(body: &Value) -> &str {
    assert!(body["error"]["message"].is_string(), "error shape: {body}");
    body["error"]["code"].as_str().unwrap()
}

#[tokio::test]
async fn history_of_a_private_topic_needs_a_token_allowing_it() {
    let server = private_server().await;
    for n in 1..=3 {
        let (s, _) = server
            .publish("private:a", &format!(r#"{{"n":{n}}}"#))
            .await;
        assert_eq!(s, 200);
    }
    let path = "/api/topics/private:a/history";
    let (s, body) = server.get(path).await;
    assert_eq!((s, code(&body)), (401, "token_required"));

    let good = token(&["private:a"]);
    let (s, page) = server.get(&format!("{path}?token={good}&limit=2")).await;
    assert_eq!(s, 200, "{page}");
    assert_eq!(page["publications"][0]["data"], json!({"n": 1}));
    assert_eq!(page["more"], true);
    let (s, page) = get_bearer(&server, &format!("{path}?since=2"), &good).await;
    assert_eq!(s, 200, "{page}");
    assert_eq!(page["publications"][0]["data"], json!({"n": 3}));

    let pattern = token(&["private:*"]);
    assert_eq!(get_bearer(&server, path, &pattern).await.0, 200);

    let other = token(&["private:b"]);
    let (s, body) = server.get(&format!("{path}?token={other}")).await;
    assert_eq!((s, code(&body)), (403, "topic_forbidden"));

    let forged = token_with("another-secret-of-at-least-32-bytes!!", &["private:a"], 600);
    let (s, body) = get_bearer(&server, path, &forged).await;
    assert_eq!((s, code(&body)), (401, "bad_token"));
    let expired = token_with(SECRET, &["private:a"], -5);
    let (s, body) = server.get(&format!("{path}?token={expired}")).await;
    assert_eq!((s, code(&body)), (401, "token_expired"));
}

#[tokio::test]
async fn history_of_public_topics_is_unchanged() {
    let server = private_server().await;
    assert_eq!(server.publish("news", r#"{"n":1}"#).await.0, 200);
    let (s, page) = server.get("/api/topics/news/history").await;
    assert_eq!(s, 200);
    assert_eq!(page["publications"][0]["data"], json!({"n": 1}));
    // A bad token is refused even here: its holder learns at once.
    let (s, body) = server.get("/api/topics/news/history?token=junk").await;
    assert_eq!((s, code(&body)), (401, "bad_token"));

    // A node that checks no tokens ignores one, in the query too.
    let open = TestServer::start(|_| {}).await;
    assert_eq!(open.publish("news", r#"{"n":1}"#).await.0, 200);
    let (s, page) = open.get("/api/topics/news/history?token=junk").await;
    assert_eq!(s, 200, "{page}");
    let (s, body) = open.get("/api/topics/news/history?tokens=x").await;
    assert_eq!((s, code(&body)), (400, "bad_query"));
}

#[tokio::test]
async fn private_board_reads_need_a_token_allowing_the_board() {
    let server = private_server().await;
    server.post_first_score("vip", "p1", 10).await;
    let (s, _) = server
        .post_with_key(
            "/api/boards/arena/scores",
            r#"{"player":"p2","score":5}"#,
            None,
        )
        .await;
    assert_eq!(s, 200);

    for path in ["/api/boards/vip", "/api/boards/vip/players/p1"] {
        let (s, body) = server.get(path).await;
        assert_eq!((s, code(&body)), (401, "token_required"), "{path}");
        let (s, body) = server
            .get(&format!("{path}?token={}", token(&["board:vip"])))
            .await;
        assert_eq!(s, 200, "{path}: {body}");
        assert_eq!(body["board"], "vip");
        let (s, _) = get_bearer(&server, path, &token(&["board:*"])).await;
        assert_eq!(s, 200, "{path}");
        let (s, body) = get_bearer(&server, path, &token(&["board:arena"])).await;
        assert_eq!((s, code(&body)), (403, "topic_forbidden"), "{path}");
        let (s, body) = get_bearer(&server, path, "junk").await;
        assert_eq!((s, code(&body)), (401, "bad_token"), "{path}");
    }
    // A private board that does not exist says no more than one that does.
    let (s, body) = server.get("/api/boards/vip-unknown").await;
    assert_eq!((s, code(&body)), (401, "token_required"));
    let (s, body) = get_bearer(&server, "/api/boards/vip-unknown", &token(&["board:vip*"])).await;
    assert_eq!((s, code(&body)), (404, "no_board"));

    // Public boards need nothing.
    let (s, page) = server.get("/api/boards/arena?limit=5").await;
    assert_eq!(s, 200, "{page}");
    assert_eq!(page["entries"][0]["player"], "p2");
    assert_eq!(server.get("/api/boards/arena/players/p2").await.0, 200);
}

#[tokio::test]
async fn the_board_list_shows_private_boards_only_to_tokens_allowing_them() {
    let server = private_server().await;
    server.post_first_score("vip", "p1", 10).await;
    for board in ["arena", "vip2"] {
        let (s, _) = server
            .post_with_key(
                &format!("/api/boards/{board}/scores"),
                r#"{"player":"p","score":1}"#,
                None,
            )
            .await;
        assert_eq!(s, 200);
    }
    let names = |body: &Value| -> Vec<String> {
        body["boards"]
            .as_array()
            .expect("a list")
            .iter()
            .map(|b| b["name"].as_str().unwrap().to_string())
            .collect()
    };
    crate::common::wait_until("the boards are listed", || {
        server.state().boards.page(None, 10, |_| true).0.len() == 3
    })
    .await;
    let (s, body) = server.get("/api/boards").await;
    assert_eq!(s, 200);
    assert_eq!(names(&body), ["arena"]);
    let (s, body) = get_bearer(&server, "/api/boards", &token(&["board:vip"])).await;
    assert_eq!(s, 200);
    assert_eq!(names(&body), ["arena", "vip"]);
    // Pages hold readable boards only, and say "more" only when a readable one follows.
    let vip = token(&["board:vip"]);
    let (s, body) = get_bearer(&server, "/api/boards?limit=1", &vip).await;
    assert_eq!((s, names(&body)), (200, vec!["arena".to_string()]));
    assert_eq!(body["next_cursor"], "arena");
    let (s, body) = get_bearer(&server, "/api/boards?limit=1&cursor=arena", &vip).await;
    assert_eq!((s, names(&body)), (200, vec!["vip".to_string()]));
    assert!(
        body.get("next_cursor").is_none(),
        "vip2 is not readable: {body}"
    );
    let (s, body) = server.get("/api/boards?limit=1&cursor=arena").await;
    assert_eq!(s, 200);
    assert!(
        names(&body).is_empty() && body.get("next_cursor").is_none(),
        "{body}"
    );
    let (s, body) = server
        .get(&format!("/api/boards?token={}", token(&["board:*"])))
        .await;
    assert_eq!(s, 200);
    assert_eq!(names(&body), ["arena", "vip", "vip2"]);
    let (s, body) = get_bearer(&server, "/api/boards", &token(&["private:x"])).await;
    assert_eq!(s, 200);
    assert_eq!(names(&body), ["arena"]);
    let expired = token_with(SECRET, &["board:*"], -5);
    let (s, body) = get_bearer(&server, "/api/boards", &expired).await;
    assert_eq!((s, code(&body)), (401, "token_expired"));

    // Without private topics, every board is listed as before.
    let open = TestServer::start(|_| {}).await;
    open.post_first_score("vip", "p1", 10).await;
    let (s, body) = open.get("/api/boards").await;
    assert_eq!(s, 200);
    assert_eq!(names(&body), ["vip"]);
}

#[test]
fn the_api_document_names_every_refusal() {
    let doc: Value = serde_json::from_str(crier::api::openapi::DOCUMENT).unwrap();
    for (path, statuses) in [
        ("/api/topics/{topic}/history", &["401", "403"][..]),
        ("/api/boards/{board}", &["401", "403"]),
        ("/api/boards/{board}/players/{player}", &["401", "403"]),
        ("/api/boards", &["401"]),
        ("/sse", &["401", "403"]),
    ] {
        let op = &doc["paths"][path]["get"];
        assert!(
            op["parameters"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["name"] == "token" && p["in"] == "query"),
            "{path}: the token parameter"
        );
        for status in statuses {
            let text = op["responses"][status]["description"]
                .as_str()
                .unwrap_or("");
            let codes: &[&str] = match *status {
                "401" => &["bad_token", "token_expired"],
                _ => &["topic_forbidden"],
            };
            for code in codes {
                assert!(text.contains(code), "{path} {status} names {code}: {text}");
            }
        }
    }
}
