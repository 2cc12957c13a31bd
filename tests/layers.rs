//! The layers of `src/`, kept: every `crate::…` (and `super::…`) path of every file is read,
//! and the test fails, naming the file and line, on an import that runs upward, on a module
//! that belongs to no layer, and on any loop of imports between files.
//!
//! Layers, bottom to top (README "Layout", docs/architecture.md): a module may import from
//! its own layer and those below it, and files never import each other in a circle.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // A test stops where it fails.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Each top-level module of the library, by layer.
const LAYERS: [(&str, u8); 15] = [
    ("split", 1),
    ("stats", 1),
    ("clock", 1),
    ("config", 2),
    ("runtime", 3),
    ("metrics", 3),
    ("rollout", 3),
    ("proxy", 4),
    ("control", 4),
    ("admin", 5),
    ("server", 5),
    ("demo", 5),
    ("internals", 5),
    // The crate root and the binary only declare and wire.
    ("lib", 6),
    ("main", 6),
];

/// One import: the file it is in, its line, and the path as written.
#[derive(Debug, Clone)]
struct Import {
    line: usize,
    path: Vec<String>,
    /// The inline modules (`mod tests { … }`) the import is written in.
    within: Vec<String>,
}

/// The module path of a file under `src/`: `src/a/b.rs` is `a::b`, `src/a/mod.rs` is `a`.
fn module_of(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .with_extension("")
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|l| l == "mod") {
        parts.pop();
    }
    parts
}

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("read src/")
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// The text with comments and string literals blanked (line breaks kept), so a path in a
/// doc comment or a message is not taken for an import.
fn code_only(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < b.len() {
        let rest = &src[i..];
        if rest.starts_with("//") {
            let end = rest.find('\n').map_or(b.len(), |n| i + n);
            i = end;
        } else if rest.starts_with("/*") {
            let end = rest.find("*/").map_or(b.len(), |n| i + n + 2);
            out.extend(src[i..end].chars().filter(|&c| c == '\n'));
            i = end;
        } else if rest.starts_with("r#\"") || rest.starts_with("r\"") {
            let hashes = rest[1..].chars().take_while(|&c| c == '#').count();
            let close = format!("\"{}", "#".repeat(hashes));
            let start = i + 2 + hashes;
            let end = src[start..]
                .find(&close)
                .map_or(b.len(), |n| start + n + close.len());
            out.extend(src[i..end].chars().filter(|&c| c == '\n'));
            out.push_str("\"\"");
            i = end;
        } else if b[i] == b'"' {
            let mut j = i + 1;
            while j < b.len() && b[j] != b'"' {
                j += if b[j] == b'\\' { 2 } else { 1 };
            }
            let end = (j + 1).min(b.len());
            out.extend(src[i..end].chars().filter(|&c| c == '\n'));
            out.push_str("\"\"");
            i = end;
        } else if b[i] == b'\'' && b.get(i + 2) == Some(&b'\'') {
            // A char literal such as '"' (lifetimes have no closing quote there).
            out.push_str("' '");
            i += 3;
        } else if b[i] == b'\'' && b.get(i + 1) == Some(&b'\\') {
            let end = src[i + 2..].find('\'').map_or(b.len(), |n| i + 2 + n + 1);
            out.push_str("' '");
            i = end;
        } else {
            let c = rest.chars().next().unwrap_or(' ');
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The paths starting with `crate::`, `super::` or `self::` in `code`, with `use` groups
/// (`crate::{a::b, c}`) expanded, each with its line and the inline module it is in
/// (`mod tests { use super::*; }` names the file's own module, not its parent).
fn imports(code: &str) -> Vec<Import> {
    let mut found = Vec::new();
    let chars: Vec<char> = code.chars().collect();
    let mut line = 1;
    // Inline modules open at a brace depth: (name, depth inside).
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0;
    let mut pending_mod: Option<String> = None;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let boundary = i == 0 || !(is_ident(chars[i - 1]) || chars[i - 1] == ':');
        match c {
            '\n' => line += 1,
            '{' => {
                depth += 1;
                if let Some(name) = pending_mod.take() {
                    inline.push((name, depth));
                }
            }
            '}' => {
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
                depth = depth.saturating_sub(1);
            }
            ';' => pending_mod = None,
            _ => {}
        }
        if boundary && chars[i..].starts_with(&['m', 'o', 'd', ' ']) {
            let mut j = i + 4;
            let start = j;
            while j < chars.len() && is_ident(chars[j]) {
                j += 1;
            }
            pending_mod = Some(chars[start..j].iter().collect());
            i = j;
            continue;
        }
        let starts = ["crate::", "super::", "self::"]
            .into_iter()
            .find(|p| chars[i..].iter().take(p.len()).copied().eq(p.chars()));
        let Some(prefix) = starts.filter(|_| boundary) else {
            i += 1;
            continue;
        };
        let head = prefix.trim_end_matches("::").to_string();
        let mut j = i + prefix.len();
        let mut paths = Vec::new();
        expand(&chars, &mut j, vec![head], &mut paths);
        let within: Vec<String> = inline.iter().map(|(n, _)| n.clone()).collect();
        for path in paths {
            found.push(Import {
                line,
                path,
                within: within.clone(),
            });
        }
        line += chars[i..j].iter().filter(|&&c| c == '\n').count();
        i = j.max(i + 1);
    }
    found
}

/// Reads the rest of a path after `base::` at `*j`: `a::b`, `a::{b, c::d}`, `*`.
fn expand(chars: &[char], j: &mut usize, base: Vec<String>, out: &mut Vec<Vec<String>>) {
    let skip_ws = |j: &mut usize| {
        while *j < chars.len() && chars[*j].is_whitespace() {
            *j += 1;
        }
    };
    let mut path = base;
    loop {
        skip_ws(j);
        if *j < chars.len() && chars[*j] == '{' {
            *j += 1;
            loop {
                skip_ws(j);
                if *j >= chars.len() || chars[*j] == '}' {
                    *j += 1;
                    break;
                }
                expand(chars, j, path.clone(), out);
                skip_ws(j);
                if *j < chars.len() && chars[*j] == ',' {
                    *j += 1;
                }
            }
            return;
        }
        let start = *j;
        while *j < chars.len() && is_ident(chars[*j]) {
            *j += 1;
        }
        if *j == start {
            // `*` or the end of the path.
            out.push(path);
            return;
        }
        path.push(chars[start..*j].iter().collect());
        if chars[*j..].starts_with(&[':', ':']) {
            *j += 2;
        } else {
            out.push(path);
            return;
        }
    }
}

/// The path made absolute (from the crate root), given the importing file's module.
fn absolute(module: &[String], path: &[String]) -> Vec<String> {
    let mut here: Vec<String> = module.to_vec();
    let mut out = Vec::new();
    let mut rest = path;
    match path.first().map(String::as_str) {
        Some("crate") => rest = &path[1..],
        Some("self") => {
            out = here.clone();
            rest = &path[1..];
        }
        Some("super") => {
            while rest.first().is_some_and(|s| s == "super") {
                here.pop();
                rest = &rest[1..];
            }
            out = here;
        }
        _ => {}
    }
    out.extend(rest.iter().cloned());
    out
}

/// The file that defines the longest module prefix of `path`, if any.
fn file_of(path: &[String], files: &BTreeMap<Vec<String>, PathBuf>) -> Option<PathBuf> {
    (1..=path.len())
        .rev()
        .find_map(|n| files.get(&path[..n]).cloned())
}

fn layer_of(top: &str) -> Option<u8> {
    LAYERS.iter().find(|(m, _)| *m == top).map(|&(_, l)| l)
}

/// The files of `src_dir` and every import between them that breaks the layers (upward,
/// or from a module outside every layer), and every loop of imports between files.
fn check(src_dir: &Path) -> Vec<String> {
    let mut paths = Vec::new();
    rust_files(src_dir, &mut paths);
    let mut files: BTreeMap<Vec<String>, PathBuf> = BTreeMap::new();
    for p in &paths {
        let rel = p.strip_prefix(src_dir).expect("under src/");
        let mut m = module_of(rel);
        if m == ["lib"] {
            m = Vec::new();
        }
        files.insert(m, p.clone());
    }
    let mut problems = Vec::new();
    // file -> file it imports from -> first line.
    let mut edges: BTreeMap<PathBuf, BTreeMap<PathBuf, usize>> = BTreeMap::new();
    for (module, file) in &files {
        let src = std::fs::read_to_string(file).expect("read source");
        let rel = file.strip_prefix(src_dir).expect("under src/");
        let own_top = module.first().cloned().unwrap_or_else(|| "lib".to_string());
        let own_layer = layer_of(&own_top);
        if own_layer.is_none() {
            problems.push(format!(
                "src/{}: module `{own_top}` is in no layer (add it to LAYERS and to README \"Layout\")",
                rel.display()
            ));
            continue;
        }
        for imp in imports(&code_only(&src)) {
            let here: Vec<String> = module.iter().chain(&imp.within).cloned().collect();
            let abs = absolute(&here, &imp.path);
            let Some(top) = abs.first() else { continue };
            // External crates named through `self::`/`super::` paths never start at a
            // top-level module; only the crate's own modules are checked.
            let Some(target) = file_of(&abs, &files) else {
                continue;
            };
            if target == *file {
                continue;
            }
            edges
                .entry(file.clone())
                .or_default()
                .entry(target.clone())
                .or_insert(imp.line);
            match (own_layer, layer_of(top)) {
                (Some(own), Some(theirs)) if theirs > own => problems.push(format!(
                    "src/{}:{}: imports `{}` (layer {theirs}, `{top}`) from layer {own} (`{own_top}`): an import upward",
                    rel.display(),
                    imp.line,
                    imp.path.join("::"),
                )),
                (_, None) => problems.push(format!(
                    "src/{}:{}: imports `{}` from module `{top}`, which is in no layer",
                    rel.display(),
                    imp.line,
                    imp.path.join("::"),
                )),
                _ => {}
            }
        }
    }
    for cycle in cycles(&edges) {
        let shown: Vec<String> = cycle
            .iter()
            .map(|(from, line)| {
                format!(
                    "src/{}:{line}",
                    from.strip_prefix(src_dir).unwrap_or(from).display()
                )
            })
            .collect();
        problems.push(format!("an import loop: {}", shown.join(" -> ")));
    }
    problems
}

/// Each loop of the file graph, as (file, line of its import of the next file), found by
/// depth-first search from every file (each loop reported once, from its smallest file).
fn cycles(edges: &BTreeMap<PathBuf, BTreeMap<PathBuf, usize>>) -> Vec<Vec<(PathBuf, usize)>> {
    let mut found: BTreeSet<Vec<PathBuf>> = BTreeSet::new();
    let mut out = Vec::new();
    for start in edges.keys() {
        let mut stack: Vec<(PathBuf, usize)> = Vec::new();
        walk(start, start, edges, &mut stack, &mut found, &mut out);
    }
    out
}

fn walk(
    start: &PathBuf,
    at: &PathBuf,
    edges: &BTreeMap<PathBuf, BTreeMap<PathBuf, usize>>,
    stack: &mut Vec<(PathBuf, usize)>,
    found: &mut BTreeSet<Vec<PathBuf>>,
    out: &mut Vec<Vec<(PathBuf, usize)>>,
) {
    if stack.len() > 12 {
        return;
    }
    for (next, line) in edges.get(at).into_iter().flatten() {
        stack.push((at.clone(), *line));
        if next == start {
            let files: Vec<PathBuf> = stack.iter().map(|(f, _)| f.clone()).collect();
            if files.iter().min() == Some(start) {
                let mut key = files.clone();
                key.sort();
                if found.insert(key) {
                    out.push(stack.clone());
                }
            }
        } else if next > start && !stack.iter().any(|(f, _)| f == next) {
            walk(start, next, edges, stack, found, out);
        }
        stack.pop();
    }
}

#[test]
fn no_import_runs_upward_or_in_a_loop() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let problems = check(&src);
    assert!(
        problems.is_empty(),
        "the layers of src/ are broken:\n{}",
        problems.join("\n")
    );
}

/// The checker itself: a tree with an upward import and a loop is refused, naming both.
#[test]
fn the_checker_finds_an_upward_import_and_a_loop() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path();
    let write = |rel: &str, text: &str| {
        let p = src.join(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, text).expect("write");
    };
    write(
        "lib.rs",
        "pub mod config;\npub mod proxy;\npub mod split;\n",
    );
    // Upward: config (2) takes from proxy (4), as the old `config/compile.rs` did.
    write(
        "config/mod.rs",
        "//! crate::proxy in a comment is not an import\nuse crate::proxy::tls::{load, CertPaths};\nconst S: &str = \"crate::proxy::x\";\n",
    );
    write("proxy/mod.rs", "pub mod tls;\nuse self::tls::load;\n");
    write("proxy/tls.rs", "use super::Ctx;\npub fn load() {}\n");
    write("split/mod.rs", "pub mod a;\npub mod b;\n");
    write("split/a.rs", "use crate::split::b::B;\n");
    write("split/b.rs", "use super::a::{A, more::Thing};\n");
    let problems = check(src);
    let text = problems.join("\n");
    assert!(
        text.contains("src/config/mod.rs:2: imports `crate::proxy::tls::load` (layer 4"),
        "{text}"
    );
    assert!(
        !text.contains("proxy::x") && !text.contains("mod.rs:1:"),
        "comments and strings are not imports: {text}"
    );
    assert!(
        text.contains("an import loop: src/split/a.rs:1 -> src/split/b.rs:1"),
        "{text}"
    );
    // proxy/mod.rs -> proxy/tls.rs -> proxy/mod.rs is a loop too.
    assert!(
        text.contains("an import loop: src/proxy/mod.rs:2 -> src/proxy/tls.rs:1"),
        "{text}"
    );
}
