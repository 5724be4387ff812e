//! `crier config check FILE`: every error of a settings file at once, each with its line,
//! without starting a server. Starting one stops at the first error, so a file with three
//! mistakes would take three restarts to fix.
//!
//! The checks are the server's own (`server::resolve_config`), run once per top-level key and once
//! per `[[namespace]]`/`[[key]]`/`[[board]]` table, each alone over the defaults, so that
//! one bad key cannot hide another; then once on the whole file for the rules that tie
//! settings together (e.g. `queue_max_bytes` must exceed `max_message_bytes`). Lines come
//! from `toml_edit`'s spans. A syntax error stops there: TOML gives its line and column.

use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::config::{Config, ServeArgs};

/// One problem in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line, when the problem belongs to one key or table.
    pub line: Option<usize>,
    pub message: String,
}

/// Every problem of the settings file at `path`; empty when the server would start with
/// it (as far as the file goes: keys and certificates it names are read at start).
pub fn check(path: &Path) -> anyhow::Result<Vec<Problem>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    let doc = match toml_edit::ImDocument::parse(text.as_str()) {
        Ok(doc) => doc,
        Err(e) => {
            return Ok(vec![Problem {
                line: e.span().map(|s| line_of(&text, s)),
                message: format!("not valid TOML: {}", e.message().trim()),
            }])
        }
    };
    let table: toml::Table = match toml::from_str(&text) {
        Ok(t) => t,
        Err(e) => {
            return Ok(vec![Problem {
                line: e.span().map(|s| line_of(&text, s)),
                message: format!("not valid TOML: {}", e.message().trim()),
            }])
        }
    };
    let scratch = Scratch::new()?;
    let mut problems = Vec::new();
    for (key, value) in &table {
        let item = doc.get(key);
        match (key.as_str(), value) {
            ("namespace" | "key" | "board" | "app", toml::Value::Array(elements)) => {
                for (i, element) in elements.iter().enumerate() {
                    let span = item.and_then(|item| match item {
                        toml_edit::Item::ArrayOfTables(a) => a.get(i).and_then(|t| t.span()),
                        toml_edit::Item::Value(toml_edit::Value::Array(a)) => {
                            a.get(i).and_then(|v| v.span())
                        }
                        _ => None,
                    });
                    let one = toml::Value::Array(vec![element.clone()]);
                    if let Some(message) = scratch.resolve_one(key, one)? {
                        problems.push(Problem {
                            line: span
                                .or_else(|| key_span(&doc, key))
                                .map(|s| line_of(&text, s)),
                            message,
                        });
                    }
                }
            }
            _ => {
                if let Some(message) = scratch.resolve_one(key, value.clone())? {
                    problems.push(Problem {
                        line: key_span(&doc, key).map(|s| line_of(&text, s)),
                        message,
                    });
                }
            }
        }
    }
    // The rules between settings (and between tables: names used twice), on the whole.
    if let Err(e) = resolve_path(path) {
        let message = describe(&e);
        if !problems.iter().any(|p| p.message == message) {
            problems.push(Problem {
                line: None,
                message,
            });
        }
    }
    problems.sort_by_key(|p| p.line.unwrap_or(usize::MAX));
    Ok(problems)
}

/// The file's problems as `FILE:LINE: message` lines.
pub fn report(path: &Path, problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| match p.line {
            Some(line) => format!("{}:{line}: {}\n", path.display(), p.message),
            None => format!("{}: {}\n", path.display(), p.message),
        })
        .collect()
}

fn key_span(doc: &toml_edit::ImDocument<&str>, key: &str) -> Option<Range<usize>> {
    doc.as_table()
        .key(key)
        .and_then(|k| k.span())
        .or_else(|| doc.get(key).and_then(|i| i.span()))
}

fn line_of(text: &str, span: Range<usize>) -> usize {
    let end = span.start.min(text.len());
    text[..end].bytes().filter(|b| *b == b'\n').count() + 1
}

/// The server's own resolution: the merge, then each module's checks of what it reads.
fn resolve_path(path: &Path) -> anyhow::Result<Config> {
    crate::server::resolve_config(&ServeArgs {
        config: Some(path.to_path_buf()),
        ..Default::default()
    })
}

/// The error chain, without the "parsing config file PATH" context: the path is either
/// the user's (already at the start of each line) or a scratch file's.
fn describe(e: &anyhow::Error) -> String {
    e.chain()
        .map(|c| c.to_string())
        .filter(|m| {
            !m.starts_with("parsing config file ") && !m.starts_with("reading config file ")
        })
        .collect::<Vec<_>>()
        .join(": ")
        // serde's messages add the field on a line of their own: one line per problem.
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// A private scratch file holding one key at a time: `Config::resolve` reads settings
/// files by path.
struct Scratch {
    dir: PathBuf,
    file: PathBuf,
}

impl Scratch {
    fn new() -> anyhow::Result<Scratch> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "crier-config-check-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir)
            .map_err(|e| anyhow::anyhow!("creating {}: {e}", dir.display()))?;
        let file = dir.join("one-key.toml");
        Ok(Scratch { dir, file })
    }

    /// The error of a file holding only `key = value`, if any.
    fn resolve_one(&self, key: &str, value: toml::Value) -> anyhow::Result<Option<String>> {
        let mut one = toml::Table::new();
        one.insert(key.to_string(), value);
        std::fs::write(&self.file, toml::to_string(&one)?)?;
        Ok(resolve_path(&self.file).err().map(|e| describe(&e)))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_text(text: &str) -> Vec<Problem> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("crier.toml");
        std::fs::write(&path, text).unwrap();
        check(&path).unwrap()
    }

    #[test]
    fn a_good_file_has_no_problem() {
        let text = "listen = \"0.0.0.0:7700\"\nhistory_size = 10\n\n[[namespace]]\npattern = \"chat:*\"\ndurable = true\n";
        assert_eq!(check_text(text), vec![]);
    }

    #[test]
    fn every_error_is_reported_with_its_line() {
        let text = "listen = \"0.0.0.0:7700\"\n\
                    lisen = 1\n\
                    ping_interval = 25\n\
                    board_top = 500\n\
                    \n\
                    [[namespace]]\n\
                    pattern = \"ok:*\"\n\
                    \n\
                    [[namespace]]\n\
                    pattern = \"a*b\"\n";
        let problems = check_text(text);
        let lines: Vec<_> = problems.iter().map(|p| p.line).collect();
        assert_eq!(lines, [Some(2), Some(3), Some(4), Some(9)], "{problems:#?}");
        assert!(problems[0].message.contains("lisen"));
        assert!(problems[1].message.contains("ping_interval"));
        assert!(problems[2].message.contains("board_top"));
        assert!(
            problems[3].message.contains("pattern"),
            "{}",
            problems[3].message
        );
    }

    #[test]
    fn rules_between_settings_are_checked_on_the_whole_file() {
        let problems = check_text("max_message_bytes = 600000\nqueue_max_bytes = 500000\n");
        assert_eq!(problems.len(), 1, "{problems:#?}");
        assert_eq!(problems[0].line, None);
        assert!(problems[0].message.contains("queue_max_bytes"));
    }

    #[test]
    fn a_syntax_error_gives_its_line() {
        let problems = check_text("listen = \"0.0.0.0:7700\"\nhistory_size = = 3\n");
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].line, Some(2));
        assert!(problems[0].message.starts_with("not valid TOML"));
    }
}
