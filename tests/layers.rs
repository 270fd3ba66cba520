//! The layering of docs/architecture.md ("Layers") holds: every top-level module of `src/` (and of `python/src/`)
//! uses only modules of lower layers, so no use points up and there is no circle. The tables are read from the
//! document itself, so the document and this test cannot drift apart; a module declared in `lib.rs` that no table
//! places, or a table row naming a module that does not exist, fails too.
//!
//! A use is a path that starts with `crate::` (or `$crate::`), each item of a `crate::{a, b::c}` group, and a
//! `super::` path resolved against the file's module path (inline `mod name { ... }` blocks counted), in all code,
//! `#[cfg(test)]` modules included. Comments (doc links among them) and literals are left out. `crate::Name` where
//! `Name` is a re-export of the crate root (`pub use x::Name;` in `lib.rs`) counts as a use of `x`. Uses within one
//! top-level module (its files among themselves) are not checked.

#[path = "layers/scan.rs"]
mod scan;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs;
use std::path::Path;

use scan::{ident, is, tokens, uses_in, Use};

const DOC: &str = "docs/architecture.md";

/// A crate: its top-level modules (the `mod` items of its root file) and the uses in its files (a name its root
/// re-exports, `pub use x::Name;`, counting as its module `x`).
struct Crate {
    modules: BTreeSet<String>,
    uses: Vec<Use>,
}

fn read_crate(dir: &str) -> Crate {
    let root = fs::read_to_string(format!("{dir}/lib.rs")).expect("lib.rs");
    let toks = tokens(&root);
    let (mut modules, mut reexports) = (BTreeSet::new(), BTreeMap::new());
    let mut i = 0;
    while i < toks.len() {
        if ident(toks.get(i)) == Some("mod") && is(toks.get(i + 2), ";") {
            modules.insert(ident(toks.get(i + 1)).expect("module name").to_string());
        }
        if ident(toks.get(i)) == Some("use") {
            let first = ident(toks.get(i + 1)).unwrap_or_default().to_string();
            while i < toks.len() && !is(toks.get(i), ";") {
                let leaf = is(toks.get(i + 1), ",") || is(toks.get(i + 1), "}") || is(toks.get(i + 1), ";");
                if let (Some(name), true) = (ident(toks.get(i)), leaf) {
                    reexports.insert(name.to_string(), first.clone());
                }
                i += 1;
            }
        }
        i += 1;
    }
    let resolve = |n: &str| {
        if modules.contains(n) {
            Some(n.to_string())
        } else {
            reexports.get(n).filter(|m| modules.contains(*m)).cloned()
        }
    };
    let mut uses = Vec::new();
    let mut files = Vec::new();
    collect(Path::new(dir), &mut files);
    files.sort();
    for file in files {
        let rel = file.strip_prefix(dir).unwrap().to_string_lossy().trim_start_matches('/').to_string();
        let mut module: Vec<String> = rel.trim_end_matches(".rs").split('/').map(String::from).collect();
        if module.last().is_some_and(|m| m == "mod") {
            module.pop();
        }
        if !modules.contains(&module[0]) {
            continue; // lib.rs (the root, above every layer), main.rs (another crate)
        }
        let src = fs::read_to_string(&file).unwrap();
        uses.extend(uses_in(&file.to_string_lossy(), &module, &src, &resolve));
    }
    Crate { modules, uses }
}

fn collect(dir: &Path, files: &mut Vec<std::path::PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect(&path, files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
}

/// The table under `heading` (`### `src/``) in the document's "Layers" section: module → layer.
fn parse_layers(doc: &str, heading: &str) -> BTreeMap<String, u32> {
    let section = doc.split("\n## Layers\n").nth(1).expect("docs/architecture.md has a \"## Layers\" section");
    let section = section.split("\n## ").next().unwrap();
    let part = section.split(&format!("\n{heading}\n")).nth(1).unwrap_or_else(|| panic!("no {heading} under Layers"));
    let part = part.split("\n### ").next().unwrap();
    let mut layers = BTreeMap::new();
    for row in part.lines().filter(|l| l.starts_with('|')) {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let Ok(layer) = cells[1].parse::<u32>() else { continue };
        for name in cells[2].split('`').skip(1).step_by(2) {
            assert!(layers.insert(name.to_string(), layer).is_none(), "{heading}: `{name}` is placed twice");
        }
    }
    assert!(!layers.is_empty(), "{heading}: no rows");
    layers
}

/// Every problem: a module not placed (or placed but absent), a use that does not point down, a circle.
fn check(layers: &BTreeMap<String, u32>, modules: &BTreeSet<String>, uses: &[Use]) -> Vec<String> {
    let mut problems = Vec::new();
    for m in modules.iter().filter(|m| !layers.contains_key(*m)) {
        problems.push(format!("module `{m}` is not placed in a layer of {DOC} (\"Layers\"): add it to the table"));
    }
    for m in layers.keys().filter(|m| !modules.contains(*m)) {
        problems.push(format!("{DOC} places `{m}`, which is not a module of the crate"));
    }
    for u in uses {
        let (Some(a), Some(b)) = (layers.get(&u.from), layers.get(&u.to)) else { continue };
        if b >= a {
            let how = if a == b { "the same layer" } else { "a higher layer" };
            problems.push(format!(
                "{}:{}: `{}` (layer {a}) uses `{}` (layer {b}, {how}) through `{}`: a module may use only modules of \
                 lower layers ({DOC}, \"Layers\"); move what it needs down, or change the table if the layering changes",
                u.file, u.line, u.from, u.to, u.path
            ));
        }
    }
    problems.extend(circles(uses));
    problems
}

/// One circle per group of modules that reach each other, each step with a use that makes it.
fn circles(uses: &[Use]) -> Vec<String> {
    let mut edges: BTreeMap<&str, BTreeMap<&str, &Use>> = BTreeMap::new();
    for u in uses {
        edges.entry(&u.from).or_default().entry(&u.to).or_insert(u);
    }
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for &start in edges.keys() {
        if seen.contains(start) {
            continue;
        }
        // shortest way back to `start`
        let mut back: BTreeMap<&str, &Use> = BTreeMap::new();
        let mut queue = VecDeque::from([start]);
        let mut found = None;
        while let Some(n) = queue.pop_front() {
            for (&to, &u) in edges.get(n).into_iter().flatten() {
                if to == start {
                    found = Some(u);
                    break;
                }
                if !back.contains_key(to) {
                    back.insert(to, u);
                    queue.push_back(to);
                }
            }
            if found.is_some() {
                break;
            }
        }
        let Some(mut u) = found else { continue };
        let mut steps = vec![u];
        while u.from != start {
            u = back[u.from.as_str()];
            steps.push(u);
        }
        steps.reverse();
        seen.extend(steps.iter().map(|s| s.from.as_str()));
        let names: Vec<&str> = steps.iter().map(|s| s.from.as_str()).chain([start]).collect();
        let at: Vec<String> =
            steps.iter().map(|s| format!("{} -> {} at {}:{}", s.from, s.to, s.file, s.line)).collect();
        out.push(format!("circle {}: {}", names.join(" -> "), at.join("; ")));
    }
    out
}

fn assert_layered(dir: &str, heading: &str) {
    let doc = fs::read_to_string(DOC).unwrap();
    let krate = read_crate(dir);
    assert!(!krate.uses.is_empty(), "{dir}: no uses found; the extractor is broken");
    let problems = check(&parse_layers(&doc, heading), &krate.modules, &krate.uses);
    assert!(problems.is_empty(), "{dir} breaks its layering:\n{}", problems.join("\n"));
}

#[test]
fn src_uses_only_lower_layers() {
    assert_layered("src", "### `src/`");
}

#[test]
fn python_src_uses_only_lower_layers() {
    assert_layered("python/src", "### `python/src/`");
}

fn known(n: &str) -> Option<String> {
    ["low", "mid", "high"].contains(&n).then(|| n.to_string())
}

#[test]
fn extractor_finds_paths_but_not_comments_or_strings() {
    let src = "use crate::{low::A, mid};\n\
               // crate::high in a comment\n\
               /* crate::high /* nested */ crate::high */ const S: &str = \"crate::high\";\n\
               fn f<'a>(x: &'a str) -> char { let _ = r#\"crate::high\"#; '\"' }\n\
               mod tests { use super::*; use super::super::mid::B; }\n\
               pub(crate) fn g() { super::low::h(); $crate::mid::m!(); }\n";
    let found: Vec<(usize, String)> =
        uses_in("x.rs", &["high".into()], src, &known).into_iter().map(|u| (u.line, u.to)).collect();
    let expected = [(1, "low"), (1, "mid"), (5, "mid"), (6, "low"), (6, "mid")];
    assert_eq!(found, expected.map(|(l, m)| (l, m.to_string())));
}

#[test]
fn checker_fails_on_a_planted_upward_use() {
    let layers = BTreeMap::from([("low".to_string(), 0), ("mid".to_string(), 1), ("high".to_string(), 2)]);
    let modules: BTreeSet<String> = layers.keys().cloned().collect();
    let down = uses_in("src/high.rs", &["high".into()], "use crate::low::X;", &known);
    assert!(check(&layers, &modules, &down).is_empty());
    let up = uses_in("src/low/a.rs", &["low".into(), "a".into()], "fn f() {}\nuse crate::mid::Y;", &known);
    let problems = check(&layers, &modules, &up);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].starts_with("src/low/a.rs:2: `low` (layer 0) uses `mid` (layer 1, a higher layer)"));
}

#[test]
fn checker_fails_on_a_circle_and_on_an_unplaced_module() {
    let layers = BTreeMap::from([("low".to_string(), 0), ("mid".to_string(), 1)]);
    let modules: BTreeSet<String> = ["low", "mid", "high"].map(String::from).into();
    let mut uses = uses_in("src/low.rs", &["low".into()], "use crate::mid::A;", &known);
    uses.extend(uses_in("src/mid.rs", &["mid".into()], "use crate::low::B;", &known));
    let problems = check(&layers, &modules, &uses);
    assert!(problems.iter().any(|p| p.contains("module `high` is not placed")), "{problems:?}");
    assert!(problems.iter().any(|p| p.starts_with("circle low -> mid -> low")), "{problems:?}");
}

#[test]
fn layer_tables_are_read_from_the_document() {
    let doc = "# A\n\n## Layers\n\n### `src/`\n\n| layer | modules |\n|---|---|\n| 1 | `mid`, `high` |\n\
               | 0 | `low` |\n\n### `python/src/`\n\n| layer | modules |\n|---|---|\n| 0 | `p` |\n\n## Next\n| 9 | `x` |\n";
    let src = parse_layers(doc, "### `src/`");
    assert_eq!(src, BTreeMap::from([("high".into(), 1), ("low".into(), 0), ("mid".into(), 1)]));
    assert_eq!(parse_layers(doc, "### `python/src/`"), BTreeMap::from([("p".into(), 0)]));
}
