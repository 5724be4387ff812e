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
    let cfg = crier::server::resolve_config(&crier::config::ServeArgs {
        config: Some(file),
        ..Default::default()
    })
    .unwrap();
    let chat = cfg.namespace("chat:lobby");
    assert_eq!((chat.history_size, chat.durable), (1000, true));
    assert_eq!(cfg.namespace("ticker").history_size, 0);
    assert_eq!(cfg.namespace("other").history_size, 100);
}

/// The other direction: every code a table in the protocol docs names is a real code, with
/// the status that table gives it.
#[test]
fn codes_named_in_protocol_docs_exist_with_their_status() {
    use crier::error_code::ErrorCode;
    let find = |name: &str| ErrorCode::ALL.iter().copied().find(|c| c.as_str() == name);
    let backticked = |cell: &str| -> Vec<String> {
        cell.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect()
    };
    let mut checked = 0;
    for doc in ["docs/protocol.md", "docs/leaderboards.md"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(doc);
        let text = std::fs::read_to_string(path).unwrap();
        let mut columns: Option<(usize, Option<usize>)> = None;
        let mut prev_was_table = false;
        for line in text.lines() {
            let is_table = line.starts_with('|');
            if !is_table {
                prev_was_table = false;
                columns = None;
                continue;
            }
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            if !prev_was_table {
                prev_was_table = true;
                columns = cells
                    .iter()
                    .position(|c| *c == "code")
                    .map(|i| (i, cells.iter().position(|c| *c == "status")));
                continue;
            }
            let Some((code_col, status_col)) = columns else {
                continue;
            };
            let codes = backticked(cells[code_col]);
            let statuses: Vec<u16> = status_col
                .map(|i| {
                    cells[i]
                        .split('/')
                        .filter_map(|s| s.trim().parse().ok())
                        .collect()
                })
                .unwrap_or_default();
            for (i, name) in codes.iter().enumerate() {
                let code = find(name).unwrap_or_else(|| panic!("{doc}: `{name}` is no ErrorCode"));
                checked += 1;
                // `too_many_topics` is answered 400 or 503 by cause.
                let status = statuses.get(i).or(statuses.first());
                if let (Some(s), false) = (status, code == ErrorCode::TooManyTopics) {
                    assert_eq!(
                        code.status().map(|c| c.as_u16()),
                        Some(*s),
                        "{doc}: `{name}`"
                    );
                }
            }
        }
    }
    assert!(
        checked > 20,
        "only {checked} codes found in the docs' tables"
    );
}

/// The OpenAPI error schema enumerates exactly the codes an HTTP answer can carry, so
/// tests/it/openapi.rs (and schemathesis) refuse any other.
#[test]
fn openapi_error_schema_lists_every_http_error_code() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/api/openapi.json");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let listed: Vec<&str> = doc["components"]["schemas"]["Error"]["properties"]["error"]
        ["properties"]["code"]["enum"]
        .as_array()
        .expect("an enum of codes")
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let http: Vec<&str> = crier::error_code::ErrorCode::ALL
        .iter()
        .filter(|c| c.status().is_some())
        .map(|c| c.as_str())
        .collect();
    assert_eq!(listed, http, "src/api/openapi.json Error.code enum");
}
