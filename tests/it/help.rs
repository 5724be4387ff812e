//! Every setting, walked from clap's own description of `crier serve` and `crier demo`: it
//! appears in `--help` with its flag, variable and default; each flag takes its declared
//! example and refuses a bad value with a message naming it; each TOML key does the same.
//! A new setting is covered by declaring it (src/config.rs). Variables: tests/settings_env.rs.

use std::collections::BTreeSet;
use std::process::Command;

use clap::{CommandFactory, Parser};
use crier::cli::{Cli, Command as Sub};
use crier::config::{settings, Config, ServeArgs, Setting};
use crier::server::resolve_config;

const SUBCOMMANDS: [&str; 2] = ["serve", "demo"];

fn serve_args(cli: Cli) -> ServeArgs {
    match cli.command {
        Sub::Serve(a) | Sub::Demo(a) => a,
        other => panic!("not a server command: {other:?}"),
    }
}

/// What a valid example reads back as, after `resolve` trims lists.
fn normalized(s: &Setting) -> String {
    s.example.trim_end_matches('/').to_string()
}

/// clap's own consistency checks (unique ids and flags, valid defaults) over the whole CLI.
#[test]
fn the_command_line_is_consistent() {
    Cli::command().debug_assert();
}

#[test]
fn help_lists_every_argument_with_its_flag_variable_and_default() {
    let all = settings();
    let declared: BTreeSet<&str> = all.iter().map(|s| s.name).collect();
    let mut cli = Cli::command();
    cli.build();
    for sub in SUBCOMMANDS {
        let out = Command::new(env!("CARGO_BIN_EXE_crier"))
            .args([sub, "--help"])
            .output()
            .unwrap();
        assert!(out.status.success());
        let help = String::from_utf8_lossy(&out.stdout);
        let cmd = cli
            .get_subcommands()
            .find(|c| c.get_name() == sub)
            .expect("subcommand");
        let mut seen = BTreeSet::new();
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" {
                continue;
            }
            let long = arg.get_long().unwrap_or_else(|| panic!("{id} has no flag"));
            assert!(
                help.contains(&format!("--{long} ")),
                "{sub}: --{long} missing"
            );
            let env = arg
                .get_env()
                .unwrap_or_else(|| panic!("{id} has no variable"));
            let env = env.to_str().unwrap();
            // Credentials show the variable's name only (`[env: NAME]`).
            assert!(
                help.contains(&format!("[env: {env}=")) || help.contains(&format!("[env: {env}]")),
                "{sub}: {env} missing"
            );
            if id == "config" {
                continue;
            }
            let s = all
                .iter()
                .find(|s| s.name == id)
                .unwrap_or_else(|| panic!("{sub}: --{long} is not a declared setting"));
            assert_eq!((long, env), (s.flag.as_str(), s.env.as_str()));
            assert_eq!(env, format!("CRIER_{}", id.to_uppercase()));
            let default = format!("[default: {}]", s.default);
            assert!(help.contains(&default), "{sub}: --{long} lacks {default}");
            seen.insert(id);
        }
        assert_eq!(seen, declared, "{sub}: every setting is an argument");
    }
}

#[test]
fn every_flag_takes_its_example_and_refuses_a_bad_value_naming_the_flag() {
    for sub in SUBCOMMANDS {
        for s in settings() {
            let flag = format!("--{}", s.flag);
            let d = Config::default();
            assert_ne!(
                d.shown(s.name).unwrap(),
                normalized(&s),
                "{}: the example must differ from the default",
                s.name
            );
            // `--flag=value`, so a value such as `-1` is not taken for another flag.
            let cli = Cli::try_parse_from(["crier", sub, &format!("{flag}={}", s.example)])
                .unwrap_or_else(|e| panic!("{flag} {}: {e}", s.example));
            let cfg = resolve_config(&serve_args(cli))
                .unwrap_or_else(|e| panic!("{flag} {}: {e:#}", s.example));
            assert_eq!(cfg.shown(s.name).unwrap(), normalized(&s), "{flag}");

            let Some(bad) = s.invalid else { continue };
            let err = match Cli::try_parse_from(["crier", sub, &format!("{flag}={bad}")]) {
                Err(e) => e.to_string(),
                Ok(cli) => format!(
                    "{:#}",
                    resolve_config(&serve_args(cli))
                        .expect_err(&format!("{flag} {bad} is refused"))
                ),
            };
            assert!(
                err.contains(&flag) || err.contains(s.name),
                "{flag} {bad}: the message does not name the flag: {err}"
            );
        }
    }
}

#[test]
fn every_setting_is_a_toml_key_and_a_bad_value_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crier.toml");
    let with_file = || ServeArgs {
        config: Some(path.clone()),
        ..Default::default()
    };
    for s in settings() {
        let mut table = toml::Table::new();
        table.insert(s.name.into(), s.toml_example.clone());
        std::fs::write(&path, toml::to_string(&table).unwrap()).unwrap();
        let cfg = resolve_config(&with_file()).unwrap_or_else(|e| panic!("{}: {e:#}", s.name));
        assert_eq!(cfg.shown(s.name).unwrap(), normalized(&s), "{}", s.name);

        let Some(bad) = &s.toml_invalid else { continue };
        let mut table = toml::Table::new();
        table.insert(s.name.into(), bad.clone());
        std::fs::write(&path, toml::to_string(&table).unwrap()).unwrap();
        let err = format!("{:#}", resolve_config(&with_file()).unwrap_err());
        assert!(err.contains(s.name), "{}: {err}", s.name);
    }
}

/// All the examples at once, through the real binary: it starts and serves.
#[tokio::test]
async fn the_binary_starts_with_every_example_flag() {
    crate::need_redis!();
    let dir = tempfile::tempdir().unwrap();
    // `--redis` needs a Redis that answers: a real one, on its own port.
    let redis = crate::common::redis::RedisServer::start();
    let mut extra: Vec<String> = Vec::new();
    for s in settings() {
        // TLS needs real certificate files and changes the scheme: tests/it/tls.rs.
        if matches!(s.name, "listen" | "data_dir" | "tls_cert" | "tls_key") {
            continue;
        }
        extra.push(format!("--{}", s.flag));
        let fixture = |f: &str| format!("{}/tests/fixtures/auth/{f}", env!("CARGO_MANIFEST_DIR"));
        extra.push(match s.name {
            "redis" => redis.url(),
            // Files that must exist: the test keys.
            "jwt_public_key" => fixture("rsa-public.pem"),
            "jwt_jwks" => fixture("jwks.json"),
            _ => s.example.to_string(),
        });
    }
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let (_proc, addr) = crate::common::serve_binary(dir.path(), "127.0.0.1:0", &extra);
    let (status, _) = crier::http_client::HttpClient::new(None)
        .get(&format!("http://{addr}/healthz"))
        .await
        .unwrap();
    assert!(status.is_success(), "{status}");
}

/// A secret taken from the environment is never printed by `--help` (clap shows other
/// variables' values there, which is useful for the rest).
#[test]
fn help_never_shows_a_secret_from_the_environment() {
    let out = Command::new(env!("CARGO_BIN_EXE_crier"))
        .args(["serve", "--help"])
        .env("CRIER_JWT_SECRET", "env-secret-that-must-not-be-printed-1")
        .env("CRIER_PUBLISHER_KEYS", "env-key-that-must-not-be-printed")
        .env("CRIER_MAX_TOPICS", "777")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(!help.contains("must-not-be-printed"), "{help}");
    assert!(help.contains("CRIER_JWT_SECRET"));
    assert!(help.contains("CRIER_MAX_TOPICS=777"));
}
