//! The scanner of `tests/layers.rs`: the top-level modules a file's paths name (`crate::`, `$crate::`, `super::`),
//! with comments and literals left out.

/// One use of a top-level module by another.
#[derive(Debug, Clone, PartialEq)]
pub struct Use {
    pub file: String,
    pub line: usize,
    pub from: String,
    pub to: String,
    pub path: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Tok {
    Ident(String),
    Punct(String),
}

/// Identifiers and punctuation (`::` as one token) with their lines; comments, strings, chars and numbers dropped.
pub fn tokens(src: &str) -> Vec<(Tok, usize)> {
    let c: Vec<char> = src.chars().collect();
    let (mut out, mut i, mut line) = (Vec::new(), 0, 1);
    let count = |s: &[char]| s.iter().filter(|&&ch| ch == '\n').count();
    while i < c.len() {
        let ch = c[i];
        let next = c.get(i + 1).copied().unwrap_or(' ');
        if ch == '\n' {
            line += 1;
            i += 1;
        } else if ch.is_whitespace() {
            i += 1;
        } else if ch == '/' && next == '/' {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if ch == '/' && next == '*' {
            let (start, mut depth) = (i, 0);
            while i < c.len() {
                if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            line += count(&c[start..i.min(c.len())]);
        } else if let Some(end) = raw_string_end(&c, i) {
            line += count(&c[i..end]);
            i = end;
        } else if ch == '"' || (ch == 'b' && next == '"') {
            let start = i;
            i += if ch == 'b' { 2 } else { 1 };
            while i < c.len() && c[i] != '"' {
                i += if c[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            line += count(&c[start..i.min(c.len())]);
        } else if ch == '\'' && next == '\\' {
            i += 2;
            while i < c.len() && c[i] != '\'' {
                i += 1;
            }
            i += 1;
        } else if ch == '\'' && c.get(i + 2) == Some(&'\'') {
            i += 3;
        } else if ch.is_alphabetic() || ch == '_' {
            let start = i;
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                i += 1;
            }
            out.push((Tok::Ident(c[start..i].iter().collect()), line));
        } else if ch.is_ascii_digit() {
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_' || c[i] == '.') {
                i += 1;
            }
        } else if ch == ':' && next == ':' {
            out.push((Tok::Punct("::".into()), line));
            i += 2;
        } else {
            out.push((Tok::Punct(ch.to_string()), line));
            i += 1;
        }
    }
    out
}

/// Where a raw string (`r"..."`, `r#"..."#`, `br"..."`) starting at `i` ends, if one does.
fn raw_string_end(c: &[char], i: usize) -> Option<usize> {
    let mut j = i;
    if c.get(j) == Some(&'b') {
        j += 1;
    }
    if c.get(j) != Some(&'r') || (i > 0 && (c[i - 1].is_alphanumeric() || c[i - 1] == '_')) {
        return None;
    }
    j += 1;
    let hashes = c[j..].iter().take_while(|&&ch| ch == '#').count();
    j += hashes;
    if c.get(j) != Some(&'"') {
        return None;
    }
    j += 1;
    while j < c.len() {
        if c[j] == '"' && c[j + 1..].iter().take(hashes).filter(|&&ch| ch == '#').count() == hashes {
            return Some(j + 1 + hashes);
        }
        j += 1;
    }
    Some(c.len())
}

pub fn is(t: Option<&(Tok, usize)>, p: &str) -> bool {
    matches!(t, Some((Tok::Punct(s), _)) if s == p)
}

pub fn ident(t: Option<&(Tok, usize)>) -> Option<&str> {
    match t {
        Some((Tok::Ident(s), _)) => Some(s),
        _ => None,
    }
}

/// The first name of each item of the group whose `{` is at `open`.
fn group_heads(toks: &[(Tok, usize)], open: usize) -> Vec<String> {
    let (mut heads, mut depth, mut expect) = (Vec::new(), 0, true);
    for (t, _) in &toks[open..] {
        match t {
            Tok::Punct(p) if p == "{" => {
                depth += 1;
                expect = depth == 1;
            }
            Tok::Punct(p) if p == "}" => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            Tok::Punct(p) if p == "," && depth == 1 => expect = true,
            Tok::Ident(s) if expect && depth == 1 => {
                heads.push(s.clone());
                expect = false;
            }
            _ => expect = false,
        }
    }
    heads
}

/// The uses of other top-level modules in one file, whose module path is `module` (`["commands", "log"]` for
/// `src/commands/log.rs`). `resolve` maps a name right under the crate root to its top-level module.
pub fn uses_in(file: &str, module: &[String], src: &str, resolve: &dyn Fn(&str) -> Option<String>) -> Vec<Use> {
    let toks = tokens(src);
    let mut out = Vec::new();
    let (mut depth, mut inline): (usize, Vec<(String, usize)>) = (0, Vec::new());
    let from = module[0].clone();
    for (i, (t, line)) in toks.iter().enumerate() {
        let prev_sep = i > 0 && is(toks.get(i - 1), "::");
        let mut targets: Vec<(String, String)> = Vec::new();
        match t {
            Tok::Punct(p) if p == "{" => {
                depth += 1;
                if i >= 2 && ident(toks.get(i - 2)) == Some("mod") {
                    inline.push((ident(toks.get(i - 1)).unwrap_or_default().to_string(), depth));
                }
            }
            Tok::Punct(p) if p == "}" => {
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
                depth = depth.saturating_sub(1);
            }
            Tok::Ident(s) if s == "crate" && !prev_sep && is(toks.get(i + 1), "::") => {
                targets = root_names(&toks, i + 2).into_iter().map(|n| (n.clone(), format!("crate::{n}"))).collect();
            }
            Tok::Ident(s) if s == "super" && !prev_sep => {
                let mut k = 0;
                while ident(toks.get(i + 2 * k)) == Some("super") && is(toks.get(i + 2 * k + 1), "::") {
                    k += 1;
                }
                let path: Vec<&String> = module.iter().chain(inline.iter().map(|(n, _)| n)).collect();
                if k == 0 || k > path.len() {
                    continue;
                }
                let supers = "super::".repeat(k);
                targets = if k < path.len() {
                    vec![(path[0].clone(), supers)]
                } else {
                    root_names(&toks, i + 2 * k).into_iter().map(|n| (n.clone(), format!("{supers}{n}"))).collect()
                };
            }
            _ => {}
        }
        for (name, path) in targets {
            if let Some(to) = resolve(&name) {
                if to != from {
                    out.push(Use { file: file.into(), line: *line, from: from.clone(), to, path });
                }
            }
        }
    }
    out
}

/// The names right after `crate::` at `at`: one name, or each head of a `{...}` group.
fn root_names(toks: &[(Tok, usize)], at: usize) -> Vec<String> {
    match toks.get(at) {
        Some((Tok::Ident(n), _)) => vec![n.clone()],
        Some((Tok::Punct(p), _)) if p == "{" => group_heads(toks, at),
        _ => Vec::new(),
    }
}
