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
