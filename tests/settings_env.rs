//! Every setting through its `CRIER_*` variable. The only test of this binary, because
//! it sets process variables that any other test parsing the command line would see.

use clap::Parser;
use crier::cli::{Cli, Command};
use crier::config::{settings, Config};
use crier::server::resolve_config;

fn resolve_serve() -> Result<Config, String> {
    let cli = Cli::try_parse_from(["crier", "serve"]).map_err(|e| e.to_string())?;
    let Command::Serve(args) = cli.command else {
        unreachable!()
    };
    resolve_config(&args).map_err(|e| format!("{e:#}"))
}

#[test]
fn every_setting_is_read_from_its_variable_and_a_bad_value_is_refused() {
    for s in settings() {
        std::env::set_var(&s.env, s.example);
        let cfg = resolve_serve().unwrap_or_else(|e| panic!("{}={}: {e}", s.env, s.example));
        assert_eq!(
            cfg.shown(s.name).unwrap(),
            s.example.trim_end_matches('/'),
            "{}",
            s.env
        );
        if let Some(bad) = s.invalid {
            std::env::set_var(&s.env, bad);
            let err = resolve_serve().expect_err(&format!("{}={bad} is refused", s.env));
            assert!(
                err.contains(&format!("--{}", s.flag)) || err.contains(s.name),
                "{}={bad}: the message does not name the setting: {err}",
                s.env
            );
        }
        std::env::remove_var(&s.env);
    }
    // A flag beats its variable.
    std::env::set_var("CRIER_MAX_TOPICS", "1000");
    let cli = Cli::try_parse_from(["crier", "serve", "--max-topics", "2000"]).unwrap();
    let Command::Serve(args) = cli.command else {
        unreachable!()
    };
    assert_eq!(resolve_config(&args).unwrap().max_topics, 2000);
    assert_eq!(resolve_serve().unwrap().max_subscriber_topics, 500);
    std::env::remove_var("CRIER_MAX_TOPICS");
}
