//! Dependencies run one way (issue 16): every top-level module under `src/` sits in one
//! layer of [`LAYERS`], lowest first, and its non-test code may use only modules of layers
//! below its own. A new upward `crate::` path fails here, naming the file, the line, both
//! modules and their layers, so a cycle never comes back unnoticed.
//!
//! The table (docs/architecture.md, "Layers", says what each layer is for), and why it
//! differs from the first proposal in issue 16:
//!
//! - `framing` (new, leaf): how each transport frames a payload. The publication frames
//!   itself once per transport with it, so it no longer reaches up into `writer`/`ws`/`sse`.
//! - `conn_limits` sits above `metrics` and `config`: it reads its limits from the one and
//!   counts its refusals in the other (`metrics` pre-created their labels through it before).
//! - `publication` below `client`: a client queues shared publications, never the reverse.
//! - `protocol` (the client protocol's commands and replies), `writer` (the write batch both
//!   transports share) and `state` (the node's shared handles) serve the edges only and use
//!   the domain (`Grant`, leaderboards), so they form their own layer under the edges.
//! - `api` below `ws`/`sse`: a refused handshake answers with the HTTP API's error body.
//! - `auth`/`origin` below `leaderboard` (whose policies name token scopes), and `app` (the
//!   router) below `server` (which serves it): one layer each, instead of same-layer pairs.
//!
//! What is scanned: every `.rs` file under `src/` but `main.rs` and `lib.rs`, after removing
//! comments and string literals, and without `#[cfg(test)]` items (a test module, inline or
//! in its own file such as `broker/testing.rs`). Both `use crate::x::..`, `use crate::{a, b}`
//! groups and inline `crate::x::` paths count.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Lowest first. A module may use any module of a layer below its own.
const LAYERS: &[(&str, &[&str])] = &[
    (
        "leaf",
        &[
            "error_code",
            "close",
            "net",
            "rate",
            "redb_file",
            "topic",
            "web",
            "fd_limit",
            "framing",
            "sharded_metrics",
        ],
    ),
    ("the refusal log", &["refusal_log"]),
    ("settings and counters", &["metrics", "config"]),
    (
        "what the settings set up: admission, logs, TLS, the example file; the encoded message",
        &[
            "conn_limits",
            "publication",
            "logging",
            "tls",
            "config_example",
        ],
    ),
    ("a client's queue", &["client"]),
    ("the node's delivery", &["hub"]),
    ("the broker; webhooks", &["broker", "webhook"]),
    ("the one subscribe path", &["subscribe"]),
    ("who may connect and do what", &["auth", "origin"]),
    ("domain", &["leaderboard", "pusher"]),
    ("what the edges share", &["protocol", "writer", "state"]),
    ("the HTTP API", &["api"]),
    ("the transports", &["ws", "sse"]),
    ("the router", &["app"]),
    ("the server", &["server"]),
    (
        "checking a settings file as the server would",
        &["config_check"],
    ),
    ("the command line", &["cli"]),
];

/// Pairs of one layer that may use each other's code, `(from, to)`. Keep it empty: a pair
/// here is a cycle waiting to happen.
const SAME_LAYER_ALLOWED: &[(&str, &str)] = &[];

/// Downward pairs that are still refused, `(from, to)`, each for a reason the layers alone
/// do not say.
const NEVER: &[(&str, &str, &str)] = &[(
    "broker",
    "client",
    "a broker works per node: it hands publications to its sink (the hub), never to a client",
)];

/// Upward imports that are known and being removed, `(file, module it uses)`. Every entry
/// must still occur (a removed one fails the test until it leaves this list), and the list
/// only ever shrinks.
const KNOWN_UPWARD: &[(&str, &str)] = &[];

/// One `crate::<module>` path in a file's non-test code.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Import {
    line: usize,
    module: String,
}

#[test]
fn modules_import_only_from_layers_below() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let src = root.join("src");
    let layer_of = layer_index();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    assert!(
        files.len() > 50,
        "found only {} files under src/",
        files.len()
    );

    let mut test_only: BTreeSet<PathBuf> = BTreeSet::new();
    let mut scanned: BTreeMap<PathBuf, Vec<Import>> = BTreeMap::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let (imports, test_files) = scan(&text);
        for m in test_files {
            test_only.extend(child_files(f, &src, &m));
        }
        scanned.insert(f.clone(), imports);
    }

    let mut tops = BTreeSet::new();
    let mut problems = Vec::new();
    let mut known_seen = BTreeSet::new();
    for (f, imports) in &scanned {
        let rel = f
            .strip_prefix(root)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        if rel == "src/main.rs" || rel == "src/lib.rs" || test_only.contains(f) {
            continue;
        }
        let top = top_module(f, &src);
        tops.insert(top.clone());
        let Some(&(from_layer, from_name)) = layer_of.get(top.as_str()) else {
            problems.push(format!(
                "{rel}: module `{top}` is in no layer: add it to LAYERS in tests/it/layers.rs \
                 and to the Layers table of docs/architecture.md"
            ));
            continue;
        };
        let mut reported = BTreeSet::new();
        for imp in imports {
            if imp.module == top || !reported.insert(imp.module.clone()) {
                continue;
            }
            // `crate::<name>` that is no module (a macro, a re-exported item) is not a layer.
            let Some(&(to_layer, to_name)) = layer_of.get(imp.module.as_str()) else {
                continue;
            };
            if let Some((_, _, why)) = NEVER.iter().find(|(f, t, _)| *f == top && *t == imp.module)
            {
                problems.push(format!(
                    "{rel}:{line}: `{top}` uses crate::{to}: {why}",
                    line = imp.line,
                    to = imp.module,
                ));
                continue;
            }
            let upward = to_layer > from_layer
                || (to_layer == from_layer
                    && !SAME_LAYER_ALLOWED.contains(&(top.as_str(), imp.module.as_str())));
            if !upward {
                continue;
            }
            if KNOWN_UPWARD.contains(&(rel.as_str(), imp.module.as_str())) {
                known_seen.insert((rel.clone(), imp.module.clone()));
                continue;
            }
            problems.push(format!(
                "{rel}:{line}: `{top}` (layer {from_layer}, {from_name}) uses crate::{to} \
                 (layer {to_layer}, {to_name}): a module may use only layers below its own; move \
                 what it needs down, or invert the dependency (docs/architecture.md, Layers)",
                line = imp.line,
                to = imp.module,
            ));
        }
    }
    for (file, module) in KNOWN_UPWARD {
        if !known_seen.contains(&(file.to_string(), module.to_string())) {
            problems.push(format!(
                "{file} no longer uses crate::{module} upward: remove the pair from KNOWN_UPWARD \
                 in tests/it/layers.rs"
            ));
        }
    }
    for (name, _) in layer_of.iter() {
        if !tops.contains(*name) {
            problems.push(format!(
                "LAYERS names `{name}`, which is no module under src/: remove it"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "{} layering problem(s):\n{}",
        problems.len(),
        problems.join("\n")
    );
}

/// module -> (layer index, layer name); each module in exactly one layer.
fn layer_index() -> BTreeMap<&'static str, (usize, &'static str)> {
    let mut out = BTreeMap::new();
    for (i, (name, mods)) in LAYERS.iter().enumerate() {
        for m in *mods {
            assert!(
                out.insert(*m, (i, *name)).is_none(),
                "`{m}` is in two layers"
            );
        }
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `src/broker/redis/mod.rs` -> `broker`; `src/hub.rs` -> `hub`.
fn top_module(file: &Path, src: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

/// The files a `mod name;` in `parent` may live in (and everything under them).
fn child_files(parent: &Path, src: &Path, name: &str) -> Vec<PathBuf> {
    let stem = parent.file_stem().unwrap().to_string_lossy();
    let dir = if stem == "mod" || (stem == "lib" || stem == "main") && parent.parent() == Some(src)
    {
        parent.parent().unwrap().to_path_buf()
    } else {
        parent.with_extension("")
    };
    let mut out = vec![dir.join(format!("{name}.rs"))];
    let sub = dir.join(name);
    if sub.is_dir() {
        rust_files(&sub, &mut out);
    }
    out
}

/// The `crate::<module>` paths of a file's non-test code, and the names of the modules it
/// declares as test-only in their own files (`#[cfg(test)] mod testing;`).
fn scan(text: &str) -> (Vec<Import>, Vec<String>) {
    let code = strip_comments_and_strings(text);
    let b = code.as_bytes();
    let mut test_files = Vec::new();
    let mut skip = vec![false; b.len()];
    let mut from = 0;
    while let Some(at) = code[from..].find("#[cfg(test)]") {
        let start = from + at;
        let mut i = start + "#[cfg(test)]".len();
        // Further attributes of the same item.
        loop {
            i = skip_ws(b, i);
            if b.get(i) == Some(&b'#') {
                i = matching(b, i + 1).map_or(b.len(), |e| e + 1);
            } else {
                break;
            }
        }
        let rest = &code[i..];
        let item_end = if let Some(name) = mod_declaration(rest) {
            test_files.push(name);
            i + rest.find(';').unwrap() + 1
        } else {
            item_end(b, i)
        };
        skip[start..item_end].iter_mut().for_each(|s| *s = true);
        from = item_end.max(start + 1);
    }

    let mut imports = Vec::new();
    let line_at = |i: usize| code[..i].bytes().filter(|&c| c == b'\n').count() + 1;
    let mut from = 0;
    while let Some(at) = code[from..].find("crate::") {
        let i = from + at;
        from = i + "crate::".len();
        let before = i.checked_sub(1).map(|j| b[j]);
        if skip[i] || before.is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'$') {
            continue;
        }
        let rest = &code[from..];
        if let Some(group) = rest.strip_prefix('{') {
            for module in group_heads(group) {
                imports.push(Import {
                    line: line_at(i),
                    module,
                });
            }
        } else {
            let name = ident(rest);
            if !name.is_empty() {
                imports.push(Import {
                    line: line_at(i),
                    module: name.to_string(),
                });
            }
        }
    }
    (imports, test_files)
}

/// `pub(crate) mod testing;` -> `testing`; an inline `mod tests { .. }` is no declaration.
fn mod_declaration(rest: &str) -> Option<String> {
    let mut r = rest.trim_start();
    for vis in ["pub(crate)", "pub(super)", "pub"] {
        if let Some(x) = r.strip_prefix(vis) {
            r = x.trim_start();
            break;
        }
    }
    let r = r.strip_prefix("mod")?;
    if !r.starts_with(char::is_whitespace) {
        return None;
    }
    let r = r.trim_start();
    let name = ident(r);
    (!name.is_empty() && r[name.len()..].trim_start().starts_with(';')).then(|| name.to_string())
}

/// The first path segment of each entry of a `use crate::{..}` group (after its `{`).
fn group_heads(rest: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut depth = 0;
    let mut expect_head = true;
    for (i, c) in rest.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => expect_head = true,
            c if expect_head && depth == 0 && (c.is_ascii_alphabetic() || c == '_') => {
                out.push(ident(&rest[i..]).to_string());
                expect_head = false;
            }
            _ => {}
        }
    }
    out
}

fn ident(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && b[i].is_ascii_whitespace() {
        i += 1;
    }
    i
}

/// The index of the bracket closing the one at `open` (`(`, `[` or `{`).
fn matching(b: &[u8], open: usize) -> Option<usize> {
    let mut depth = 0usize;
    for (i, &c) in b.iter().enumerate().skip(open) {
        match c {
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

/// Where the item (or field, or statement) starting at `i` ends: after its block, or at
/// the `;` or `,` that ends it.
fn item_end(b: &[u8], mut i: usize) -> usize {
    while i < b.len() {
        match b[i] {
            b'{' => return matching(b, i).map_or(b.len(), |e| e + 1),
            b'(' | b'[' => i = matching(b, i).map_or(b.len(), |e| e + 1),
            b';' | b',' => return i + 1,
            b'}' | b')' => return i,
            _ => i += 1,
        }
    }
    b.len()
}

/// The text with comments, string and char literals blanked out (newlines kept, so line
/// numbers stay right): a `crate::x` in a doc comment or a script is no dependency.
fn strip_comments_and_strings(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = b.to_vec();
    let blank = |out: &mut Vec<u8>, from: usize, to: usize| {
        for c in &mut out[from..to] {
            if *c != b'\n' {
                *c = b' ';
            }
        }
    };
    let mut i = 0;
    while i < b.len() {
        let rest = &b[i..];
        if rest.starts_with(b"//") {
            let end = rest
                .iter()
                .position(|&c| c == b'\n')
                .map_or(b.len(), |e| i + e);
            blank(&mut out, i, end);
            i = end;
        } else if rest.starts_with(b"/*") {
            let mut depth = 0;
            let mut j = i;
            while j < b.len() {
                if b[j..].starts_with(b"/*") {
                    depth += 1;
                    j += 2;
                } else if b[j..].starts_with(b"*/") {
                    depth -= 1;
                    j += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    j += 1;
                }
            }
            blank(&mut out, i, j);
            i = j;
        } else if let Some(hashes) = raw_string_start(b, i) {
            // r"..", r#".."#, br#".."#
            let open = i + b[i..].iter().position(|&c| c == b'"').unwrap();
            let close: Vec<u8> = std::iter::once(b'"')
                .chain(std::iter::repeat_n(b'#', hashes))
                .collect();
            let end = b[open + 1..]
                .windows(close.len())
                .position(|w| w == close.as_slice())
                .map_or(b.len(), |e| open + 1 + e + close.len());
            blank(&mut out, open, end);
            i = end;
        } else if b[i] == b'"' {
            let mut j = i + 1;
            while j < b.len() && b[j] != b'"' {
                j += if b[j] == b'\\' { 2 } else { 1 };
            }
            let end = (j + 1).min(b.len());
            blank(&mut out, i, end);
            i = end;
        } else if b[i] == b'\'' {
            // A char literal ('x', '\n', '\u{..}', '"'); otherwise a lifetime.
            let end = if b.get(i + 1) == Some(&b'\\') {
                b[i + 2..]
                    .iter()
                    .position(|&c| c == b'\'')
                    .map(|e| i + 2 + e + 1)
            } else {
                let ch = text[i + 1..].chars().next().map_or(1, char::len_utf8);
                (b.get(i + 1 + ch) == Some(&b'\'')).then_some(i + 1 + ch + 1)
            };
            match end {
                Some(end) => {
                    blank(&mut out, i, end);
                    i = end;
                }
                None => i += 1,
            }
        } else {
            i += 1;
        }
    }
    String::from_utf8(out).expect("blanking keeps UTF-8 only where ASCII was replaced")
}

/// At `i`: `r"`, `r#"`, `br"`, `br#"`, .. (not inside an identifier): the number of `#`.
fn raw_string_start(b: &[u8], i: usize) -> Option<usize> {
    if i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_') {
        return None;
    }
    let mut j = i;
    if b.get(j) == Some(&b'b') {
        j += 1;
    }
    if b.get(j) != Some(&b'r') {
        return None;
    }
    j += 1;
    let hashes = b[j..].iter().take_while(|&&c| c == b'#').count();
    (b.get(j + hashes) == Some(&b'"')).then_some(hashes)
}

#[test]
fn the_scanner_reads_paths_and_groups_and_skips_tests_comments_and_strings() {
    let text = r####"
//! Uses `crate::doc` only in a comment.
use crate::{alpha::{A, B}, beta, gamma::C};
use crate::delta::D;
/* crate::block */
const S: &str = "crate::string";
const R: &str = r#"crate::raw "quoted" "#;
const Q: char = '"';
fn f<'a>(x: &'a str) -> usize { crate::epsilon::len(x) }
#[cfg(test)]
pub(crate) mod testing;
struct T {
    #[cfg(test)]
    field: crate::zeta::Z,
    kept: crate::eta::E,
}
#[cfg(test)]
mod tests {
    use crate::theta;
    fn g() { let _ = "}"; }
}
fn h() { crate::iota::run() }
"####;
    let (imports, test_files) = scan(text);
    let modules: Vec<&str> = imports.iter().map(|i| i.module.as_str()).collect();
    assert_eq!(
        modules,
        ["alpha", "beta", "gamma", "delta", "epsilon", "eta", "iota"]
    );
    assert_eq!(test_files, ["testing"]);
    assert_eq!(imports[0].line, 3);
}
