//! The library's layers point one way (`docs/DESIGN.md`, "Module map").
//!
//! This test reads every file under `src/` (the library, not `src/bin`), collects the
//! modules each one names through `use crate::…`, `use super::…` and `use self::…`, and the
//! `crate::…` paths in its code (not in comments), and fails when
//! - a module uses a module of a higher layer, or of another module on its own layer, or
//! - the modules' use graph has a cycle (two modules that import each other, directly or
//!   through others). A parent's `pub use child::X` counts as the parent using the child, so
//!   a child takes what it shares with its siblings from the sibling that defines it, never
//!   back through the parent.
//!
//! `src/lib.rs` is the crate's facade (module declarations and re-exports) and is not a node.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// The layer of each top-level module, bottom first. A module may use only modules of a
/// strictly lower layer. Keep in step with `docs/DESIGN.md`.
const LAYERS: &[&[&str]] = &[
    &["format", "units", "rng"],
    &["error"],
    &["bitmap", "storage"],
    &["image"],
    &["flush"],
    &["tracker"],
    &["store"],
    &["migration"],
    &["fuzzing"],
];

fn layer_of(top: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&top))
}

/// A module path relative to the crate root, e.g. `["store", "commit"]`.
type ModPath = Vec<String>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n == "bin") {
                continue;
            }
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn module_of(src: &Path, file: &Path) -> ModPath {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: ModPath = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

/// The code of a file without comments and string literals, so that paths in docs and
/// messages are not taken for uses.
fn code_only(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let mut in_str = false;
        let mut prev = '\0';
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            if !in_str && c == '/' && chars.peek() == Some(&'/') {
                break;
            }
            if c == '"' && prev != '\\' && prev != '\'' {
                in_str = !in_str;
                prev = c;
                continue;
            }
            if !in_str {
                out.push(c);
            }
            prev = if prev == '\\' && c == '\\' { '\0' } else { c };
        }
        out.push('\n');
    }
    out
}

/// Expands a use tree (`a::{b, c::{d, e}}`) into its full paths.
fn expand(tree: &str) -> Vec<String> {
    // `x as y` keeps `x`: the rename is marked with '@' before the spaces go.
    let tree: String = tree
        .replace(" as ", "@")
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    if let Some((path, _)) = tree.split_once('@').filter(|_| !tree.contains('{')) {
        return vec![path.to_string()];
    }
    let Some(open) = tree.find('{') else {
        return vec![tree];
    };
    let prefix = &tree[..open];
    let inner = &tree[open + 1..tree.rfind('}').unwrap()];
    let mut parts = Vec::new();
    let mut depth = 0;
    let mut start = 0;
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    parts
        .into_iter()
        .filter(|p| !p.is_empty())
        .flat_map(|p| expand(p).into_iter().map(move |e| format!("{prefix}{e}")))
        .collect()
}

/// One path a file names.
struct Named {
    path: String,
    /// Written inside a block (`mod tests { … }`), where `super` is the file's own module.
    inline: bool,
    /// A `pub use` re-export: part of the module's face, not a use by its code.
    reexport: bool,
}

/// Every path a file names: its `use` trees (expanded), whether top-level or inside a block,
/// and the paths in its code that start with `crate::` or with one of `roots` (the module's
/// child modules, which code may name without a `use`).
fn named_paths(code: &str, roots: &[String]) -> Vec<Named> {
    let mut out = Vec::new();
    let mut rest = code;
    let mut body = String::new();
    while let Some(at) = rest.find("use ") {
        let before = &rest[..at];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let head = &before[line_start..];
        let lead = head.trim();
        let is_use =
            lead.is_empty() || lead == "pub" || (lead.starts_with("pub(") && lead.ends_with(')'));
        let after = &rest[at + 4..];
        let Some(end) = after.find(';') else { break };
        if is_use {
            body.push_str(&rest[..line_start]);
            for p in expand(&after[..end]) {
                out.push(Named {
                    path: p.split('@').next().unwrap().to_string(),
                    inline: head.starts_with(' '),
                    reexport: lead.starts_with("pub"),
                });
            }
            rest = &after[end + 1..];
        } else {
            body.push_str(&rest[..at + 4]);
            rest = after;
        }
    }
    body.push_str(rest);
    let bytes = body.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let boundary = i == 0 || {
            let b = bytes[i - 1];
            !(b.is_ascii_alphanumeric() || b == b'_' || b == b':' || b == b'$')
        };
        let starts = boundary
            && std::iter::once("crate")
                .chain(roots.iter().map(String::as_str))
                .any(|r| body[i..].starts_with(r) && body[i + r.len()..].starts_with("::"));
        if !starts {
            i += 1;
            continue;
        }
        let mut end = i;
        while end < bytes.len()
            && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_' || bytes[end] == b':')
        {
            end += 1;
        }
        out.push(Named {
            path: body[i..end].trim_end_matches(':').to_string(),
            inline: true,
            reexport: false,
        });
        i = end;
    }
    out
}

/// The module a path names: the longest prefix of it that is a module of the crate, after
/// following the crate root's re-exports.
fn resolve(
    path: &str,
    from: &ModPath,
    inline: bool,
    modules: &BTreeSet<ModPath>,
    root_exports: &BTreeMap<String, ModPath>,
) -> Option<ModPath> {
    let mut segs: Vec<&str> = path.split("::").collect();
    let mut base: ModPath = match segs.first().copied() {
        Some("crate") => Vec::new(),
        Some("super") => {
            let mut b = from.clone();
            if !inline {
                b.pop();
            }
            b
        }
        Some("self") => from.clone(),
        // `use child::X` in a module names its own child module.
        Some(first) if modules.contains(&[from.clone(), vec![first.to_string()]].concat()) => {
            let mut b = from.clone();
            b.push(first.to_string());
            b
        }
        _ => return None,
    };
    segs.remove(0);
    while segs.first() == Some(&"super") {
        base.pop();
        segs.remove(0);
    }
    if base.is_empty() {
        if let Some(first) = segs.first() {
            if let Some(target) = root_exports.get(*first) {
                base = target.clone();
                segs.remove(0);
            }
        }
    }
    let mut best = base.clone();
    let mut cur = base;
    for s in segs {
        cur.push(s.to_string());
        if modules.contains(&cur) {
            best = cur.clone();
        }
    }
    if best.is_empty() {
        None
    } else {
        Some(best)
    }
}

/// `pub use a::b::{C, D};` in `src/lib.rs`: C and D resolve to module `a::b`.
fn root_exports(lib: &str, modules: &BTreeSet<ModPath>) -> BTreeMap<String, ModPath> {
    let mut map = BTreeMap::new();
    for named in named_paths(&code_only(lib), &[]) {
        let segs: Vec<&str> = named.path.split("::").collect();
        let Some((name, module)) = segs.split_last() else {
            continue;
        };
        let module: ModPath = module.iter().map(|s| s.to_string()).collect();
        if modules.contains(&module) {
            map.insert(name.to_string(), module);
        }
    }
    map
}

fn name(m: &ModPath) -> String {
    m.join("::")
}

struct Graph {
    edges: BTreeMap<ModPath, BTreeSet<ModPath>>,
}

fn build() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.retain(|f| f != &src.join("lib.rs"));
    let modules: BTreeSet<ModPath> = files.iter().map(|f| module_of(&src, f)).collect();
    let lib = fs::read_to_string(src.join("lib.rs")).unwrap();
    let exports = root_exports(&lib, &modules);
    let mut edges: BTreeMap<ModPath, BTreeSet<ModPath>> = BTreeMap::new();
    for file in &files {
        let from = module_of(&src, file);
        let code = code_only(&fs::read_to_string(file).unwrap());
        let children: Vec<String> = modules
            .iter()
            .filter(|m| m.len() == from.len() + 1 && m.starts_with(&from))
            .map(|m| m.last().unwrap().clone())
            .collect();
        let targets = edges.entry(from.clone()).or_default();
        for named in named_paths(&code, &children) {
            let Some(to) = resolve(&named.path, &from, named.inline, &modules, &exports) else {
                continue;
            };
            // A parent's `pub use child::X` is its face, not a use by its code; a child's use
            // of its parent, and a parent's code using its child, are edges like any other.
            if to == from || (named.reexport && to.starts_with(&from)) {
                continue;
            }
            targets.insert(to);
        }
    }
    Graph { edges }
}

#[test]
fn every_module_uses_only_lower_layers() {
    let graph = build();
    let mut wrong = Vec::new();
    for (from, tos) in &graph.edges {
        let top = &from[0];
        let Some(layer) = layer_of(top) else {
            wrong.push(format!(
                "{} is in no layer: add it to LAYERS and docs/DESIGN.md",
                name(from)
            ));
            continue;
        };
        for to in tos {
            if to[0] == *top {
                continue;
            }
            match layer_of(&to[0]) {
                Some(l) if l < layer => {}
                _ => wrong.push(format!("{} uses {}", name(from), name(to))),
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layer order {LAYERS:?}:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn no_two_modules_import_each_other() {
    let graph = build();
    // Tarjan-free cycle search: a depth-first walk that reports the path of a back edge.
    fn visit(
        m: &ModPath,
        graph: &Graph,
        state: &mut BTreeMap<ModPath, u8>,
        stack: &mut Vec<ModPath>,
        cycles: &mut BTreeSet<String>,
    ) {
        state.insert(m.clone(), 1);
        stack.push(m.clone());
        for to in graph.edges.get(m).into_iter().flatten() {
            match state.get(to).copied().unwrap_or(0) {
                0 => visit(to, graph, state, stack, cycles),
                1 => {
                    let start = stack.iter().position(|s| s == to).unwrap();
                    let mut cycle: Vec<String> = stack[start..].iter().map(name).collect();
                    cycle.push(name(to));
                    cycles.insert(cycle.join(" -> "));
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(m.clone(), 2);
    }
    let mut state = BTreeMap::new();
    let mut cycles = BTreeSet::new();
    for m in graph.edges.keys() {
        if !state.contains_key(m) {
            visit(m, &graph, &mut state, &mut Vec::new(), &mut cycles);
        }
    }
    assert!(
        cycles.is_empty(),
        "modules that import each other:\n{}",
        cycles.into_iter().collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn the_reader_understands_use_trees_and_comments() {
    // The reader itself, on the shapes it must handle, so the two tests above can fail.
    assert_eq!(
        expand("crate::a::{b, c::{d, e as f}, self}"),
        [
            "crate::a::b",
            "crate::a::c::d",
            "crate::a::c::e",
            "crate::a::self"
        ]
    );
    let code = code_only(
        "use crate::x::Y; // crate::z::W\n    use super::q;\nlet s = \"crate::s::t\";\nlet v = crate::v::w();\nlet n = child::N + 1;\n",
    );
    let paths: Vec<String> = named_paths(&code, &["child".to_string()])
        .into_iter()
        .map(|n| n.path)
        .collect();
    assert!(paths.contains(&"crate::x::Y".to_string()), "{paths:?}");
    assert!(paths.contains(&"super::q".to_string()), "{paths:?}");
    assert!(paths.contains(&"crate::v::w".to_string()), "{paths:?}");
    assert!(paths.contains(&"child::N".to_string()), "{paths:?}");
    assert!(
        !paths
            .iter()
            .any(|p| p.contains("z::W") || p.contains("s::t")),
        "{paths:?}"
    );
    let modules: BTreeSet<ModPath> = [vec!["a".to_string()], vec!["a".into(), "b".into()]]
        .into_iter()
        .collect();
    let from = vec!["a".to_string(), "c".to_string()];
    assert_eq!(
        resolve("super::b::X", &from, false, &modules, &BTreeMap::new()),
        Some(vec!["a".to_string(), "b".to_string()])
    );
    assert_eq!(
        resolve("super::Y", &from, false, &modules, &BTreeMap::new()),
        Some(vec!["a".to_string()])
    );
}

/// `docs/DESIGN.md` says how many loom models `tests/loom.rs` holds (its "Testing" list):
/// the count stays true when a model is added or removed.
#[test]
fn the_design_counts_the_loom_models() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let loom = std::fs::read_to_string(root.join("tests/loom.rs")).unwrap();
    let models = code_only(&loom).matches("#[test]").count();
    let design = std::fs::read_to_string(root.join("docs/DESIGN.md")).unwrap();
    let said = design
        .split_once(" models with the consumers'")
        .and_then(|(before, _)| before.rsplit_once('('))
        .and_then(|(_, n)| n.parse::<usize>().ok())
        .expect("docs/DESIGN.md names the loom models' count as \"(N models with the consumers'\"");
    assert_eq!(
        said, models,
        "docs/DESIGN.md counts {said} loom models; tests/loom.rs has {models}"
    );
}
