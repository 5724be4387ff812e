//! The OpenAPI document served at `/api/openapi.json` stays true to the server.
//!
//! - Its operations (path + method) equal the routes the router declares, read from the
//!   `.route(...)` calls in src/ so a new route without a description fails here.
//! - Every documented operation answers on a real server (no fallback 404, no 405), and
//!   every method it does not document gets a 405 in the JSON error shape.
//! - Real responses, successes and errors, from a scripted walk through the API: each status
//!   is documented for its operation, each content type too, and each JSON body validates
//!   against the documented schema (JSON Schema draft 7, checked by `boon`).
//! - Every `example` in the components validates against its own schema.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;

use crate::common::{within, TestServer};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const METHODS: [&str; 5] = ["get", "put", "post", "delete", "patch"];

struct Resp {
    status: u16,
    content_type: String,
    allow: Option<String>,
    body: Vec<u8>,
}

/// One HTTP/1.1 request over a fresh loopback connection. A `text/event-stream` answer is
/// not read past its headers: the stream never ends by itself.
async fn request(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> Resp {
    within(&format!("{method} {path}"), async {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
        // Every write must declare JSON (api::intent), and that check runs before the
        // method is routed: without it a wrong-method probe would get 415, not 405.
        if method != "GET" && method != "HEAD" {
            req.push_str("Content-Type: application/json\r\n");
        }
        if let Some(b) = body {
            req.push_str(&format!("Content-Length: {}\r\n", b.len()));
        }
        req.push_str("\r\n");
        req.push_str(body.unwrap_or(""));
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk).await.unwrap();
            assert!(
                n > 0,
                "{method} {path}: connection closed before the headers"
            );
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8(buf[..head_end].to_vec()).unwrap();
        let mut lines = head.split("\r\n");
        let status: u16 = lines
            .next()
            .unwrap()
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let mut content_type = String::new();
        let mut allow = None;
        let mut chunked = false;
        for line in lines {
            let (name, value) = line.split_once(':').unwrap();
            let (name, value) = (name.trim().to_ascii_lowercase(), value.trim().to_string());
            match name.as_str() {
                "content-type" => content_type = value,
                "allow" => allow = Some(value),
                "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
                _ => {}
            }
        }
        let mut body = buf[head_end + 4..].to_vec();
        if !content_type.starts_with("text/event-stream") {
            s.read_to_end(&mut body).await.unwrap();
            if chunked {
                body = dechunk(&body);
            }
        }
        Resp {
            status,
            content_type,
            allow,
            body,
        }
    })
    .await
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let eol = raw.windows(2).position(|w| w == b"\r\n").unwrap();
        let size =
            usize::from_str_radix(std::str::from_utf8(&raw[..eol]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&raw[eol + 2..eol + 2 + size]);
        raw = &raw[eol + 2 + size + 2..];
    }
}

async fn fetch_document(server: &TestServer) -> Value {
    let r = request(server.addr, "GET", "/api/openapi.json", None).await;
    assert_eq!(r.status, 200);
    assert!(r.content_type.starts_with("application/json"));
    serde_json::from_slice(&r.body).expect("the document is JSON")
}

fn documented_operations(doc: &Value) -> BTreeSet<(String, String)> {
    let mut ops = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            if METHODS.contains(&method.as_str()) {
                ops.insert((path.clone(), method.clone()));
            }
        }
    }
    ops
}

/// The routes declared in src/ by `.route("PATH", get(..).post(..))`.
fn routed_operations() -> BTreeSet<(String, String)> {
    let mut files = Vec::new();
    collect_rs(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut files,
    );
    let mut ops = BTreeSet::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for other in [".nest(", ".nest_service(", ".route_service("] {
            assert!(
                !text.contains(other),
                "{}: {other} routes are not seen by this test; list them with .route",
                file.display()
            );
        }
        for (i, _) in text.match_indices(".route(") {
            let call = &text[i + ".route(".len()..];
            let call = &call[..balanced_end(call)];
            let path = call
                .trim_start()
                .strip_prefix('"')
                .and_then(|rest| rest.split_once('"'))
                .map(|(p, _)| p)
                .unwrap_or_else(|| panic!("{}: .route without a literal path", file.display()));
            if path == "/echo" {
                // Conformance testing only, off unless --echo-endpoint (docs/conformance.md):
                // not part of the public API.
                continue;
            }
            let mut found = false;
            for m in METHODS {
                let needle = format!("{m}(");
                for (j, _) in call.match_indices(&needle) {
                    let before = call[..j].chars().next_back();
                    if !before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                        ops.insert((path.to_string(), m.to_string()));
                        found = true;
                    }
                }
            }
            assert!(found, "{}: no method found for {path}", file.display());
        }
    }
    ops
}

fn collect_rs(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect_rs(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Where the `.route(` call whose arguments `s` starts with closes.
fn balanced_end(s: &str) -> usize {
    let mut depth = 1;
    let mut in_str = false;
    for (i, c) in s.char_indices() {
        match c {
            '"' => in_str = !in_str,
            '(' if !in_str => depth += 1,
            ')' if !in_str => {
                depth -= 1;
                if depth == 0 {
                    return i;
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced .route( call");
}

/// A documented path with its parameters filled with names that exist after `walk`.
fn concrete(path: &str) -> String {
    path.replace("{board}", "arena")
        .replace("{topic}", "scores")
        .replace("{player}", "p42")
        .replace("{file}", "style.css")
}

#[tokio::test]
async fn document_is_openapi_3_and_lists_exactly_the_routes() {
    let server = TestServer::start(|_| {}).await;
    let doc = fetch_document(&server).await;
    let version = doc["openapi"].as_str().expect("an openapi field");
    assert!(version.starts_with("3."), "OpenAPI 3.x, got {version}");
    assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));

    let documented = documented_operations(&doc);
    let routed = routed_operations();
    let undocumented: Vec<_> = routed.difference(&documented).collect();
    let unrouted: Vec<_> = documented.difference(&routed).collect();
    assert!(
        undocumented.is_empty() && unrouted.is_empty(),
        "routes without a description: {undocumented:?}; described but not routed: {unrouted:?}"
    );

    // The running router agrees: each documented operation reaches a handler, and each
    // other method on a documented path is refused with 405 in the JSON shape.
    let paths: BTreeSet<&String> = documented.iter().map(|(p, _)| p).collect();
    for path in paths {
        for m in METHODS {
            let method = m.to_ascii_uppercase();
            let url = if path == "/sse" || path == "/ws" {
                format!("{path}?topic=scores")
            } else {
                concrete(path)
            };
            let body = (m != "get").then_some("{}");
            let r = request(server.addr, &method, &url, body).await;
            let is_documented = documented.contains(&(path.clone(), m.to_string()));
            if is_documented {
                assert_ne!(r.status, 405, "{method} {url} is documented");
                if r.status == 404 {
                    let v: Value = serde_json::from_slice(&r.body).unwrap();
                    assert_ne!(
                        v["error"]["code"], "not_found",
                        "{method} {url} is documented"
                    );
                }
            } else {
                assert_eq!(r.status, 405, "{method} {url} is not documented");
                assert!(r.allow.is_some(), "{method} {url}: 405 lists Allow");
                let v: Value = serde_json::from_slice(&r.body).expect("405 is JSON");
                assert_eq!(v["error"]["code"], "method_not_allowed");
            }
        }
    }
    server.shutdown().await;
}

/// Checks one real response against the document: its status is documented for the
/// operation, so is its content type, and a JSON body validates against the schema.
fn check(doc: &Value, path: &str, method: &str, url: &str, r: &Resp) {
    let op = &doc["paths"][path][method];
    assert!(op.is_object(), "{method} {path} is not documented");
    let mut response = &op["responses"][r.status.to_string()];
    assert!(
        response.is_object(),
        "{method} {url}: status {} is not documented; body {}",
        r.status,
        String::from_utf8_lossy(&r.body)
    );
    if let Some(reference) = response["$ref"].as_str() {
        response = doc.pointer(reference.trim_start_matches('#')).unwrap();
    }
    let media = r.content_type.split(';').next().unwrap().trim();
    let content = &response["content"];
    let Some(schema) = content.get(media).map(|c| &c["schema"]) else {
        panic!(
            "{method} {url}: {} answered with {media}, not documented",
            r.status
        );
    };
    if media == "application/json" {
        let body: Value = serde_json::from_slice(&r.body)
            .unwrap_or_else(|e| panic!("{method} {url}: body is not JSON: {e}"));
        let validator = validator(doc, schema);
        if let Err(e) = validator.validate(&body) {
            panic!("{method} {url}: {body} does not match its schema: {e}");
        }
        if r.status >= 400 {
            assert!(body["error"]["code"].is_string(), "{method} {url}: {body}");
        }
    }
}

/// A compiled schema: `boon` keeps compiled schemas in an arena and names one by index.
struct Validator {
    schemas: boon::Schemas,
    index: boon::SchemaIndex,
}

impl Validator {
    /// Every reason `v` does not match, one per line.
    fn validate(&self, v: &Value) -> Result<(), String> {
        self.schemas
            .validate(v, self.index)
            .map_err(|e| format!("{e:#}"))
    }
}

/// A validator for `schema` (draft 7, as the document's schemas are written) with the
/// whole document as its root, so `#/components/...` references resolve.
fn validator(doc: &Value, schema: &Value) -> Validator {
    let mut root = doc.clone();
    let root_map = root.as_object_mut().unwrap();
    root_map.insert(
        "$schema".into(),
        json!("http://json-schema.org/draft-07/schema#"),
    );
    root_map.insert("allOf".into(), json!([schema]));
    compile("urn:crier:openapi", root)
}

fn compile(location: &str, root: Value) -> Validator {
    let mut schemas = boon::Schemas::new();
    let mut compiler = boon::Compiler::new();
    compiler.set_default_draft(boon::Draft::V7);
    compiler
        .add_resource(location, root)
        .expect("the document is a schema resource");
    let index = compiler
        .compile(location, &mut schemas)
        .unwrap_or_else(|e| panic!("the schema compiles: {e:#}"));
    Validator { schemas, index }
}

#[tokio::test]
async fn real_responses_match_the_document() {
    // Small board caps, so that their refusals are walked too.
    let server = TestServer::start(|c| {
        c.max_boards = 2;
        c.max_players_per_board = 2;
    })
    .await;
    let doc = fetch_document(&server).await;
    let a = server.addr;
    // (documented path, method, concrete URL, body, expected status)
    let walk: &[(&str, &str, &str, Option<&str>, u16)] = &[
        ("/api/boards", "get", "/api/boards", None, 200),
        ("/api/boards/{board}", "get", "/api/boards/arena", None, 404),
        (
            "/api/boards/{board}",
            "put",
            "/api/boards/arena",
            Some(r#"{"order":"high","top":5}"#),
            200,
        ),
        (
            "/api/boards/{board}",
            "post",
            "/api/boards/arena",
            Some(""),
            200,
        ),
        (
            "/api/boards/{board}",
            "put",
            "/api/boards/arena",
            Some(r#"{"colour":"red"}"#),
            400,
        ),
        (
            "/api/boards/{board}/scores",
            "post",
            "/api/boards/arena/scores",
            Some(
                r#"[{"player":"p42","score":1200,"meta":{"name":"Ann"}},{"player":"p1","score":900.5}]"#,
            ),
            200,
        ),
        (
            "/api/boards/{board}/scores",
            "post",
            "/api/boards/arena/scores",
            Some(r#"{"player":"p1"}"#),
            400,
        ),
        (
            "/api/boards/{board}/scores",
            "post",
            "/api/boards/arena/scores",
            Some("[1"),
            400,
        ),
        (
            "/api/boards/{board}/scores",
            "post",
            "/api/boards/bad%20name/scores",
            Some("{}"),
            400,
        ),
        (
            "/api/boards/{board}",
            "put",
            "/api/boards/arena",
            Some(r#"{"order":"low"}"#),
            409,
        ),
        ("/api/boards", "get", "/api/boards", None, 200),
        (
            "/api/boards/{board}/scores",
            "post",
            "/api/boards/arena/scores",
            Some(r#"{"player":"p3","score":1}"#),
            409,
        ),
        (
            "/api/boards/{board}/scores",
            "post",
            "/api/boards/zeta/scores",
            Some(r#"{"player":"z","score":1}"#),
            200,
        ),
        (
            "/api/boards/{board}/scores",
            "post",
            "/api/boards/gamma/scores",
            Some(r#"{"player":"g","score":1}"#),
            503,
        ),
        (
            "/api/boards/{board}",
            "put",
            "/api/boards/gamma",
            Some("{}"),
            503,
        ),
        ("/api/boards", "get", "/api/boards?limit=1", None, 200),
        (
            "/api/boards",
            "get",
            "/api/boards?limit=1&cursor=arena",
            None,
            200,
        ),
        ("/api/boards", "get", "/api/boards?cursor=a%2Fb", None, 400),
        ("/api/boards", "get", "/api/boards?limit=x", None, 400),
        (
            "/api/boards/{board}",
            "get",
            "/api/boards/arena?limit=1&offset=1",
            None,
            200,
        ),
        (
            "/api/boards/{board}",
            "get",
            "/api/boards/arena?limit=-1",
            None,
            400,
        ),
        ("/api/boards/{board}", "get", "/api/boards/nope", None, 404),
        (
            "/api/boards/{board}/players/{player}",
            "get",
            "/api/boards/arena/players/p42?around=3",
            None,
            200,
        ),
        (
            "/api/boards/{board}/players/{player}",
            "get",
            "/api/boards/arena/players/nobody",
            None,
            404,
        ),
        (
            "/api/boards/{board}/players/{player}",
            "get",
            "/api/boards/arena/players/%FF",
            None,
            400,
        ),
        (
            "/api/boards/{board}/players/{player}",
            "get",
            "/api/boards/arena/players/p42?around=x",
            None,
            400,
        ),
        (
            "/api/boards/{board}/reset",
            "post",
            "/api/boards/arena/reset",
            Some(""),
            200,
        ),
        (
            "/api/boards/{board}/reset",
            "post",
            "/api/boards/nope/reset",
            Some(""),
            404,
        ),
        (
            "/api/publish/{topic}",
            "post",
            "/api/publish/scores",
            Some(r#"{"a":1}"#),
            200,
        ),
        (
            "/api/publish/{topic}",
            "post",
            "/api/publish/scores",
            Some("{"),
            400,
        ),
        (
            "/api/publish/{topic}",
            "post",
            "/api/publish/no%20spaces",
            Some("1"),
            400,
        ),
        (
            "/api/publish/{topic}",
            "post",
            "/api/publish/board:arena",
            Some("1"),
            400,
        ),
        (
            "/api/publish/{topic}",
            "get",
            "/api/publish/scores",
            None,
            405,
        ),
        (
            "/api/topics/{topic}/history",
            "get",
            "/api/topics/scores/history?limit=1",
            None,
            200,
        ),
        (
            "/api/topics/{topic}/history",
            "get",
            "/api/topics/nothing-here/history?since=3",
            None,
            200,
        ),
        (
            "/api/topics/{topic}/history",
            "get",
            "/api/topics/scores/history?limit=0",
            None,
            400,
        ),
        (
            "/api/topics/{topic}/history",
            "get",
            "/api/topics/bad%20name/history",
            None,
            400,
        ),
        (
            "/api/topics/{topic}/presence",
            "get",
            "/api/topics/scores/presence",
            None,
            404,
        ),
        (
            "/api/topics/{topic}/presence",
            "get",
            "/api/topics/scores/presence?limit=0",
            None,
            400,
        ),
        (
            "/api/topics/{topic}/presence/stats",
            "get",
            "/api/topics/scores/presence/stats",
            None,
            404,
        ),
        ("/ws", "get", "/ws?topic=scores", None, 426),
        ("/sse", "get", "/sse?topic=scores", None, 200),
        ("/sse", "get", "/sse", None, 400),
        ("/healthz", "get", "/healthz", None, 200),
        ("/metrics", "get", "/metrics", None, 200),
        ("/api/openapi.json", "get", "/api/openapi.json", None, 200),
        ("/", "get", "/", None, 200),
        ("/boards/{board}", "get", "/boards/arena", None, 200),
        ("/assets/{file}", "get", "/assets/style.css", None, 200),
        ("/assets/{file}", "get", "/assets/board.js", None, 200),
        ("/assets/{file}", "get", "/assets/nope.js", None, 404),
        (
            "/api/boards/{board}",
            "delete",
            "/api/boards/arena",
            None,
            405,
        ),
    ];
    for &(path, method, url, body, expected) in walk {
        let r = request(a, &method.to_ascii_uppercase(), url, body).await;
        assert_eq!(
            r.status,
            expected,
            "{method} {url}: {}",
            String::from_utf8_lossy(&r.body)
        );
        if r.status == 405 {
            // 405 is answered for the path whatever the method; it is documented on the
            // path's own operations.
            let documented = doc["paths"][path].as_object().unwrap();
            let (m, _) = documented.iter().next().unwrap();
            check(&doc, path, m, url, &r);
        } else {
            check(&doc, path, method, url, &r);
        }
    }

    // Unknown paths get the fallback 404 in the same shape.
    let r = request(a, "GET", "/nowhere", None).await;
    assert_eq!(r.status, 404);
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    let error = validator(&doc, &json!({"$ref": "#/components/schemas/Error"}));
    if let Err(e) = error.validate(&v) {
        panic!("the fallback 404 {v} does not match Error: {e}");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn key_refusals_match_the_document() {
    let server = TestServer::start(|c| c.publisher_keys = vec!["k1".into()]).await;
    let doc = fetch_document(&server).await;
    let r = request(server.addr, "POST", "/api/publish/scores", Some("1")).await;
    assert_eq!(r.status, 401);
    check(
        &doc,
        "/api/publish/{topic}",
        "post",
        "/api/publish/scores",
        &r,
    );
    let (status, body) = server
        .post_with_key(
            "/api/boards/arena/scores",
            r#"{"player":"p","score":1}"#,
            Some("k2"),
        )
        .await;
    assert_eq!(status, 403);
    assert_eq!(body["error"]["code"], "forbidden");
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            // Writes, and the one read that always needs a key: the backup (it reads
            // private topics too). The Pusher API (`/apps/...`) is signed with the app's
            // secret instead.
            let writes =
                (method != "get" || path.starts_with("/api/backup")) && !path.starts_with("/apps/");
            // Reads of private topics may name the subscriber token instead.
            let names_key = op["security"]
                .as_array()
                .is_some_and(|s| s.iter().any(|r| r.get("publisherKey").is_some()));
            assert_eq!(
                names_key, writes,
                "{method} {path}: write operations and backups, and only they, name the publisher key"
            );
        }
    }
    server.shutdown().await;
}

#[test]
fn component_schemas_are_valid_and_their_examples_match() {
    let doc: Value = serde_json::from_str(crier::api::openapi::DOCUMENT).unwrap();
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    // Each schema is an instance of draft 7's meta-schema.
    let meta = compile(
        "urn:crier:meta",
        json!({"$ref": "http://json-schema.org/draft-07/schema#"}),
    );
    // The checks refuse what does not match: a schema that is none, a wrong body.
    assert!(meta.validate(&json!({"type": 7})).is_err());
    let error = validator(&doc, &json!({"$ref": "#/components/schemas/Error"}));
    assert!(error.validate(&json!({"error": {"code": 7}})).is_err());
    assert!(error.validate(&json!({})).is_err());
    for (name, schema) in schemas {
        if let Err(e) = meta.validate(schema) {
            panic!("components.schemas.{name} is not a valid JSON Schema: {e}");
        }
        if let Some(example) = schema.get("example") {
            let v = validator(
                &doc,
                &json!({"$ref": format!("#/components/schemas/{name}")}),
            );
            if let Err(e) = v.validate(example) {
                panic!("the example of {name} does not match: {e}");
            }
        }
    }
    // Every $ref points at something.
    let text = crier::api::openapi::DOCUMENT;
    for (i, _) in text.match_indices("\"$ref\": \"#") {
        let rest = &text[i + "\"$ref\": \"#".len()..];
        let pointer = &rest[..rest.find('"').unwrap()];
        assert!(doc.pointer(pointer).is_some(), "dangling $ref #{pointer}");
    }
}
