//! `crier config check` and `crier config example` through the real binary (issue 21):
//! the example passes the check, a good file passes, and a bad one gets every problem with
//! its line and a non-zero exit.

use std::process::{Command, Output};

fn crier(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_crier"))
        .args(args)
        .env_remove("CRIER_CONFIG")
        .output()
        .unwrap()
}

#[test]
fn example_passes_check_and_bad_files_get_every_problem_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let example = crier(&["config", "example"]);
    assert!(example.status.success());
    let path = dir.path().join("example.toml");
    std::fs::write(&path, &example.stdout).unwrap();
    let path = path.to_str().unwrap();
    let out = crier(&["config", "check", path]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok"));

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "listen = \"0.0.0.0:7700\"\nmax_topix = 5\nping_interval = 25\n\
         allowed_origins = [\"game.example/path\"]\n\n\
         [[key]]\nname = \"x\"\nsecret = \"short\"\n\n[[board]]\npattern = \"a*b*\"\n",
    )
    .unwrap();
    let bad = bad.to_str().unwrap();
    let out = crier(&["config", "check", bad]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{bad}:2: unknown config key \"max_topix\"")),
        "{err}"
    );
    assert!(
        err.contains(&format!("{bad}:3: config key ping_interval")),
        "{err}"
    );
    assert!(err.contains(&format!("{bad}:6: ")), "{err}");
    // What the modules that read a setting check (origins, board policies) is reported too.
    assert!(err.contains(&format!("{bad}:4: allowed_origins")), "{err}");
    assert!(err.contains(&format!("{bad}:10: [[board]]")), "{err}");
    assert!(err.contains("5 problems"), "{err}");

    std::fs::write(dir.path().join("syntax.toml"), "listen = \n").unwrap();
    let out = crier(&[
        "config",
        "check",
        dir.path().join("syntax.toml").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(":1: not valid TOML"));
}
