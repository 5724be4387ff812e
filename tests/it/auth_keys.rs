//! Scoped publisher keys (`[[key]]`) over real sockets: each scope inside and outside,
//! `/metrics` with and without key tables, flat keys keeping every power, open mode
//! unchanged, and a bad key table refused at startup by the real binary.

use crate::common::http::code;
use crate::common::*;
use crier::auth::keys::ScopedKey;
use crier::config::{Config, KeyConfig, ServeArgs};
use crier::http_client::HttpClient;

const GAME: &str = "game-eu-secret-0123456789";
const OPS: &str = "ops-secret-0123456789abcdef";
const FLAT: &str = "flat-publisher-key";

fn key(name: &str, secret: &str, f: impl FnOnce(&mut KeyConfig)) -> KeyConfig {
    let mut c = KeyConfig {
        name: name.into(),
        secret: secret.into(),
        ..KeyConfig::default()
    };
    f(&mut c);
    ScopedKey::try_from(c.clone()).expect("a valid key table");
    c
}

fn scoped(c: &mut Config) {
    c.publisher_keys = vec![FLAT.into()];
    c.keys = vec![
        key("game-eu", GAME, |k| {
            k.publish = vec!["game:*".into()];
            k.boards = vec!["arena".into(), "season-*".into()];
            k.reset = vec!["arena".into()];
        }),
        key("ops", OPS, |k| k.admin = true),
    ];
}

async fn get(srv: &TestServer, path: &str, key: Option<&str>) -> (u16, String) {
    let (status, bytes) = HttpClient::new(key.map(String::from))
        .get(&srv.url(path))
        .await
        .expect("http get");
    (
        status.as_u16(),
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

#[tokio::test]
async fn a_scoped_key_may_do_its_job_and_nothing_else() {
    let srv = TestServer::start(scoped).await;
    let publications = || srv.state().metrics.publications.get();

    // publish scope
    let (s, b) = srv
        .post_with_key("/api/publish/game:1", r#"{"a":1}"#, Some(GAME))
        .await;
    assert_eq!(s, 200, "{b}");
    let before = publications();
    let (s, b) = srv
        .post_with_key("/api/publish/chat:1", r#"{"a":1}"#, Some(GAME))
        .await;
    assert_eq!((s, code(&b)), (403, "no_publish_scope"), "{b}");
    assert_eq!(
        b["error"]["message"],
        "key \"game-eu\" may not publish to \"chat:1\" (publish scope: game:*)"
    );
    assert!(!b.to_string().contains(GAME), "the secret never shows");
    assert_eq!(publications(), before, "nothing published");
    let (_, page) = srv.get("/api/topics/chat:1/history").await;
    assert_eq!(
        page["publications"].as_array().map(Vec::len),
        Some(0),
        "{page}"
    );

    // boards scope: scores and board options
    let (s, b) = srv
        .post_with_key(
            "/api/boards/arena/scores",
            r#"{"player":"ann","score":5}"#,
            Some(GAME),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = srv
        .post_with_key(
            "/api/boards/other/scores",
            r#"{"player":"ann","score":5}"#,
            Some(GAME),
        )
        .await;
    assert_eq!((s, code(&b)), (403, "no_boards_scope"), "{b}");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("(boards scope: arena, season-*)"),
        "{b}"
    );
    let (s, _) = srv.get("/api/boards/other").await;
    assert_eq!(s, 404, "the refused post created no board");
    let (s, b) = srv
        .post_with_key("/api/boards/season-3", r#"{"top":5}"#, Some(GAME))
        .await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = srv
        .post_with_key("/api/boards/other", r#"{"top":5}"#, Some(GAME))
        .await;
    assert_eq!((s, code(&b)), (403, "no_boards_scope"), "{b}");

    // reset scope
    let (s, b) = srv
        .post_with_key("/api/boards/season-3/reset", "{}", Some(GAME))
        .await;
    assert_eq!((s, code(&b)), (403, "no_reset_scope"), "{b}");
    assert!(b["error"]["message"]
        .as_str()
        .unwrap()
        .contains("may not reset board \"season-3\" (reset scope: arena)"));
    let (s, b) = srv
        .post_with_key("/api/boards/arena/reset", "{}", Some(GAME))
        .await;
    assert_eq!(s, 200, "{b}");

    // An admin key with no other scope publishes nothing.
    let (s, b) = srv
        .post_with_key("/api/publish/game:1", "1", Some(OPS))
        .await;
    assert_eq!((s, code(&b)), (403, "no_publish_scope"), "{b}");
    assert!(b["error"]["message"]
        .as_str()
        .unwrap()
        .contains("(publish scope: none)"));

    // No key, an unknown key: as before scoped keys.
    let (s, b) = srv.post_with_key("/api/publish/game:1", "1", None).await;
    assert_eq!((s, code(&b)), (401, "unauthorized"), "{b}");
    let (s, b) = srv
        .post_with_key("/api/publish/game:1", "1", Some("nope-nope-nope-nope"))
        .await;
    assert_eq!((s, code(&b)), (403, "forbidden"), "{b}");
    srv.shutdown().await;
}

#[tokio::test]
async fn metrics_need_an_admin_key_only_once_key_tables_exist() {
    let srv = TestServer::start(scoped).await;
    let (s, b) = get(&srv, "/metrics", None).await;
    assert_eq!(s, 401, "{b}");
    let (s, b) = get(&srv, "/metrics", Some(GAME)).await;
    assert_eq!(s, 403, "{b}");
    assert!(b.contains("no_admin_scope") && b.contains("game-eu"), "{b}");
    let (s, b) = get(&srv, "/metrics", Some("not-a-key-at-all-123")).await;
    assert!(s == 403 && b.contains("\"forbidden\""), "{b}");
    for k in [OPS, FLAT] {
        let (s, b) = get(&srv, "/metrics", Some(k)).await;
        assert_eq!(s, 200);
        assert!(b.contains("crier_"), "{b}");
    }
    srv.shutdown().await;

    // Flat keys only, and no keys at all: /metrics stays open.
    for tweak in [
        (|c: &mut Config| c.publisher_keys = vec![FLAT.into()]) as fn(&mut Config),
        |_: &mut Config| {},
    ] {
        let srv = TestServer::start(tweak).await;
        let (s, _) = get(&srv, "/metrics", None).await;
        assert_eq!(s, 200);
        srv.shutdown().await;
    }
}

#[tokio::test]
async fn flat_keys_keep_every_power_and_open_mode_is_unchanged() {
    let srv = TestServer::start(scoped).await;
    for (path, body) in [
        ("/api/publish/chat:1", "1"),
        ("/api/boards/anything/scores", r#"{"player":"p","score":1}"#),
        ("/api/boards/anything", r#"{"top":3}"#),
        ("/api/boards/anything/reset", "{}"),
    ] {
        let (s, b) = srv.post_with_key(path, body, Some(FLAT)).await;
        assert_eq!(s, 200, "{path}: {b}");
    }
    srv.shutdown().await;

    let srv = TestServer::start(|_| {}).await;
    for (path, body) in [
        ("/api/publish/chat:1", "1"),
        ("/api/boards/anything/scores", r#"{"player":"p","score":1}"#),
        ("/api/boards/anything/reset", "{}"),
    ] {
        let (s, b) = srv.post_with_key(path, body, None).await;
        assert_eq!(s, 200, "{path}: {b}");
    }
    srv.shutdown().await;
}

fn resolve(toml: &str) -> Result<Config, String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crier.toml");
    std::fs::write(&path, toml).unwrap();
    crier::server::resolve_config(&ServeArgs {
        config: Some(path),
        ..ServeArgs::default()
    })
    .map_err(|e| format!("{e:#}"))
}

#[test]
fn bad_key_tables_are_refused_naming_the_problem() {
    let ok = "[[key]]\nname = \"k1\"\nsecret = \"0123456789abcdef\"\npublish = [\"game:*\"]\n";
    let cfg = resolve(ok).unwrap();
    assert_eq!(cfg.keys.len(), 1);
    assert!(!format!("{cfg:?}").contains("0123456789abcdef"));
    for (toml, expect) in [
        (
            "[[key]]\nname = \"k1\"\nsecret = \"0123456789abcdef\"\nbords = [\"a\"]\n",
            "unknown field `bords`",
        ),
        (
            "[[key]]\nname = \"k1\"\nsecret = \"short\"\n",
            "at least 16 bytes",
        ),
        (
            "[[key]]\nsecret = \"0123456789abcdef\"\n",
            "missing field `name`",
        ),
        (
            "[[key]]\nname = \"a b\"\nsecret = \"0123456789abcdef\"\n",
            "name \"a b\"",
        ),
        (
            "[[key]]\nname = \"k1\"\nsecret = \"0123456789abcdef\"\nreset = [\"a*b\"]\n",
            "[[key]] \"k1\": reset",
        ),
        (
            &format!("{ok}{}", ok.replace("0123", "9999")),
            "\"k1\" is used twice",
        ),
        (
            &format!("{ok}{}", ok.replace("k1", "k2")),
            "have the same secret",
        ),
        (
            &format!("publisher_keys = [\"0123456789abcdef\"]\n{ok}"),
            "the secret of a publisher_keys entry",
        ),
    ] {
        let e = resolve(toml).unwrap_err();
        assert!(e.contains(expect), "{toml}: {e}");
        assert!(
            !e.contains("0123456789abcdef") || expect.contains("publisher_keys"),
            "secret in {e}"
        );
    }
}

#[test]
fn the_binary_refuses_to_start_with_a_bad_key_table() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crier.toml");
    std::fs::write(&path, "[[key]]\nname = \"game\"\nsecret = \"too-short\"\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_crier"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .arg("--config")
        .arg(&path)
        .output()
        .expect("crier runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("[[key]] \"game\": secret must be at least 16 bytes"),
        "{err}"
    );
    assert!(!err.contains("too-short"), "{err}");
}
