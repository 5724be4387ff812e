//! The reference tables in docs/ are generated from the declarations in the code (error
//! codes, settings), so the docs cannot drift. `CRIER_UPDATE_DOCS=1` rewrites them.

use std::path::Path;

/// Checks (or rewrites) the block of `doc` between the markers named `name`.
fn check_generated(doc: &str, name: &str, table: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(doc);
    let text = std::fs::read_to_string(&path).unwrap();
    let begin = format!("<!-- BEGIN GENERATED: {name} -->\n");
    let end = format!("<!-- END GENERATED: {name} -->");
    let start = text.find(&begin).expect("begin marker") + begin.len();
    let stop = text.find(&end).expect("end marker");
    if std::env::var_os("CRIER_UPDATE_DOCS").is_some() {
        let new = format!("{}{table}{}", &text[..start], &text[stop..]);
        std::fs::write(&path, new).unwrap();
        return;
    }
    assert!(
        text[start..stop] == *table,
        "{doc} is out of date with the code; run CRIER_UPDATE_DOCS=1 cargo test --test \
         docs_tables\n--- expected ---\n{table}"
    );
}

#[test]
fn errors_md_lists_every_error_code_with_its_status_and_meaning() {
    let table = crier::error_code::markdown_table();
    for c in crier::error_code::ErrorCode::ALL {
        assert!(table.contains(&format!("| `{}` |", c.as_str())));
    }
    check_generated("docs/errors.md", "error codes", &table);
}

#[test]
fn configuration_md_lists_every_setting_with_flag_variable_key_and_default() {
    let table = crier::config::markdown_table();
    for s in crier::config::settings() {
        assert!(table.contains(&format!("| `{}` | `--{}` | `{}` |", s.name, s.flag, s.env)));
    }
    check_generated("docs/configuration.md", "settings", &table);
}

#[test]
fn the_example_file_in_configuration_md_is_accepted() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/configuration.md");
    let text = std::fs::read_to_string(path).unwrap();
    let start = text.find("```toml\n").expect("an example file") + "```toml\n".len();
    let len = text[start..].find("```").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("crier.toml");
    std::fs::write(&file, &text[start..start + len]).unwrap();
    let cfg = crier::config::Config::resolve(&crier::config::ServeArgs {
        config: Some(file),
        ..Default::default()
    })
    .unwrap();
    let chat = cfg.namespace("chat:lobby");
    assert_eq!((chat.history_size, chat.durable), (1000, true));
    assert_eq!(cfg.namespace("ticker").history_size, 0);
    assert_eq!(cfg.namespace("other").history_size, 100);
}
