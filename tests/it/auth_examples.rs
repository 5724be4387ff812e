//! The token minters a user copies from docs/auth.md, run for real: `crier token` (the
//! binary) and examples/auth/ in Node, Python and Go, each with nothing but the language's
//! standard library. Every token they print must pass the server's own `Verifier` with the
//! claims asked for, and (end to end) open a private topic on a real server.
//!
//! A missing interpreter follows the one policy of tests/it/common/tools.rs (fails under
//! CI=true, skipped with a note otherwise); scripts/test installs node and go when missing.

use std::path::Path;
use std::process::{Command, Output};

use crier::auth::{Grant, Verifier};
use serde_json::Value;

const SECRET: &str = "an-example-secret-of-32-bytes-or-more";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `name` on PATH, or None.
fn run(mut cmd: Command) -> Output {
    let out = cmd.output().expect("the command runs");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The single line a minter printed.
fn printed_token(out: &Output) -> String {
    let text = String::from_utf8(out.stdout.clone()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "one line, the token: {text:?}");
    lines[0].to_string()
}

fn verify(token: &str) -> Grant {
    Verifier::new(SECRET, &[], None)
        .unwrap()
        .unwrap()
        .verify(token)
        .unwrap_or_else(|e| panic!("{token}: {e}"))
}

/// The example in `lang` minting for sub "alice" and two patterns, or None (with a note)
/// when its interpreter is not installed.
fn example_token(lang: &str) -> Option<String> {
    let (bin, args): (&str, &[&str]) = match lang {
        "node" => ("node", &["examples/auth/node.mjs"]),
        "python" => ("python3", &["examples/auth/python.py"]),
        "go" => ("go", &["run", "examples/auth/main.go"]),
        _ => unreachable!(),
    };
    let install = match bin {
        "node" => "apt-get install -y nodejs",
        "python3" => "apt-get install -y python3",
        _ => "apt-get install -y golang-go",
    };
    let bin = crate::common::tools::require(bin, install)?;
    let mut cmd = Command::new(bin);
    cmd.current_dir(root())
        .args(args)
        .args(["alice", "private:*", "user:42"])
        .env("CRIER_JWT_SECRET", SECRET);
    Some(printed_token(&run(cmd)))
}

fn assert_alice(g: &Grant) {
    assert_eq!(&*g.sub, "alice");
    assert!(g.allows("private:room") && g.allows("user:42"));
    assert!(!g.allows("user:43") && !g.allows("news"));
    let now = crier::auth::token::unix_now();
    assert!(
        (now + 3500..=now + 3600).contains(&g.exp),
        "an hour: {}",
        g.exp
    );
}

#[test]
fn node_example_mints_a_token_crier_accepts() {
    if let Some(t) = example_token("node") {
        assert_alice(&verify(&t));
    }
}

#[test]
fn python_example_mints_a_token_crier_accepts() {
    if let Some(t) = example_token("python") {
        assert_alice(&verify(&t));
    }
}

#[test]
fn go_example_mints_a_token_crier_accepts() {
    if let Some(t) = example_token("go") {
        assert_alice(&verify(&t));
    }
}

#[test]
fn examples_refuse_a_short_secret() {
    for (bin, script) in [
        ("node", "examples/auth/node.mjs"),
        ("python3", "examples/auth/python.py"),
    ] {
        let Some(bin) = crate::common::tools::require(bin, "apt-get install -y nodejs python3")
        else {
            continue;
        };
        let out = Command::new(bin)
            .current_dir(root())
            .args([script, "alice"])
            .env("CRIER_JWT_SECRET", "short")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{script}");
        assert!(out.stdout.is_empty(), "{script}: no token printed");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("at least 32 bytes"),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn crier_token() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_crier"));
    cmd.arg("token").env_remove("CRIER_JWT_SECRET");
    cmd
}

#[test]
fn crier_token_prints_a_token_the_server_accepts() {
    let mut cmd = crier_token();
    cmd.args(["--secret", SECRET, "--sub", "alice"]).args([
        "--topic",
        "private:*",
        "--topic",
        "user:42",
        "--ttl",
        "1h",
    ]);
    assert_alice(&verify(&printed_token(&run(cmd))));

    // The secret from the environment, as the server reads it.
    let mut cmd = crier_token();
    cmd.env("CRIER_JWT_SECRET", SECRET)
        .args(["--sub", "bob", "--topic", "chat:*", "--ttl", "90s"]);
    let g = verify(&printed_token(&run(cmd)));
    assert_eq!(&*g.sub, "bob");
    assert!(g.allows("chat:1") && !g.allows("private:room"));

    // RS256 from a private key; the server checks it with the public key.
    let fixture = |f: &str| root().join("tests/fixtures/auth").join(f);
    let mut cmd = crier_token();
    cmd.arg("--private-key")
        .arg(fixture("rsa-private.pem"))
        .args(["--sub", "carol", "--topic", "user:7"]);
    let token = printed_token(&run(cmd));
    let public = std::fs::read_to_string(fixture("rsa-public.pem")).unwrap();
    let g = Verifier::new("", &[("rsa".into(), public)], None)
        .unwrap()
        .unwrap()
        .verify(&token)
        .unwrap();
    assert_eq!(&*g.sub, "carol");
}

#[test]
fn crier_token_explains_what_is_wrong() {
    for (args, says) in [
        (vec!["--secret", "short", "--sub", "a"], "at least 32 bytes"),
        (vec!["--sub", "a"], "CRIER_JWT_SECRET"),
        (
            vec!["--secret", SECRET, "--sub", "a", "--topic", "no spaces"],
            "--topic",
        ),
        (
            vec!["--secret", SECRET, "--sub", "a", "--ttl", "soon"],
            "--ttl",
        ),
    ] {
        let out = crier_token().args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}: nothing on stdout");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(!stderr.contains(SECRET), "the secret is never printed");
    }
}

/// End to end: each minter's token opens a private topic over a real WebSocket; no token
/// and a token for other topics do not.
#[tokio::test]
async fn every_minters_token_opens_a_private_topic() {
    let server = crate::common::TestServer::start(|cfg| {
        cfg.private_topics = vec!["private:*".into(), "user:*".into()];
        cfg.jwt_secret = SECRET.into();
    })
    .await;
    let mut tokens: Vec<(String, String)> = ["node", "python", "go"]
        .into_iter()
        .filter_map(|lang| example_token(lang).map(|t| (lang.to_string(), t)))
        .collect();
    let mut cmd = crier_token();
    cmd.args(["--secret", SECRET, "--sub", "alice"]).args([
        "--topic",
        "private:*",
        "--topic",
        "user:42",
    ]);
    tokens.push(("crier token".into(), printed_token(&run(cmd))));

    for (who, token) in &tokens {
        let mut ws = server
            .ws(&format!("?topic=private:room&topic=user:42&token={token}"))
            .await;
        for _ in 0..2 {
            let v = crate::common::next_json(&mut ws).await;
            assert_eq!(v["op"], "subscribed", "{who}: {v}");
        }
        let (status, body) = server.publish("private:room", r#"{"n":1}"#).await;
        assert_eq!(status, 200, "{body}");
        let v: Value = crate::common::next_json(&mut ws).await;
        assert_eq!(
            (&v["topic"], &v["data"]["n"]),
            (&"private:room".into(), &1.into()),
            "{who}: {v}"
        );
        // A topic the token does not name.
        crate::common::send_json(&mut ws, r#"{"op":"subscribe","topic":"user:43","id":1}"#).await;
        let v = crate::common::next_json(&mut ws).await;
        assert_eq!(
            (&v["op"], &v["code"]),
            (&"error".into(), &"topic_forbidden".into()),
            "{who}: {v}"
        );
    }

    // No token: refused before the upgrade.
    let refused =
        tokio_tungstenite::connect_async(format!("ws://{}/ws?topic=private:room", server.addr))
            .await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 401),
        other => panic!("a private topic without a token: {other:?}"),
    }
    server.shutdown().await;
}

/// docs/auth.md quotes the example files; every quoted line must still be in its file, so
/// the doc cannot drift from the code the tests above run.
#[test]
fn docs_quote_the_example_files() {
    let doc = std::fs::read_to_string(root().join("docs/auth.md")).unwrap();
    let mut checked = 0;
    for file in ["node.mjs", "python.py", "main.go"] {
        let link = format!("(../examples/auth/{file})):");
        let at = doc
            .find(&link)
            .unwrap_or_else(|| panic!("docs/auth.md quotes {file}"));
        let block = doc[at..]
            .split("```")
            .nth(1)
            .expect("a code block after the link");
        let source = std::fs::read_to_string(root().join("examples/auth").join(file)).unwrap();
        let lines: Vec<&str> = source.lines().collect();
        for quoted in block.lines().skip(1).filter(|l| !l.trim().is_empty()) {
            assert!(
                lines.contains(&quoted),
                "docs/auth.md quotes a line that examples/auth/{file} lacks: {quoted:?}"
            );
            checked += 1;
        }
    }
    assert!(checked > 40, "{checked} lines");
}
