//! Messages of the configuration: a figment error as one line naming the key (and, for an unknown key, the closest
//! known one), and URLs with their passwords redacted.

use super::env;

/// Formats a figment error as one line: key, problem, source.
pub(super) fn one_line(e: &figment::Error) -> String {
    let mut parts = Vec::new();
    for err in e.clone() {
        let key = if err.path.is_empty() { "configuration".to_string() } else { err.path.join(".") };
        let source = err
            .metadata
            .as_ref()
            .map(|m| match &err.metadata.as_ref().and_then(|m| m.source.as_ref()) {
                Some(src) => format!(" (from {} {src})", m.name),
                None => format!(" (from {})", m.name),
            })
            .unwrap_or_default();
        let problem = match &err.kind {
            // An unknown section or key (of a file: the environment's are checked before): name the closest.
            figment::error::Kind::UnknownField(field, expected) => {
                // The path ends with the unknown name itself.
                let parents = &err.path[..err.path.len().saturating_sub(1)];
                let (what, within) = if parents.is_empty() {
                    ("section", String::new())
                } else {
                    ("key", format!("{}.", parents.join(".")))
                };
                match env::closest(field, expected.iter().copied()) {
                    Some(near) => format!("unknown {what} `{within}{field}`, did you mean `{within}{near}`?"),
                    None => format!("unknown {what} `{within}{field}`"),
                }
            }
            kind => kind.to_string(),
        };
        if matches!(err.kind, figment::error::Kind::UnknownField(..)) {
            parts.push(format!("{problem}{source}"));
        } else {
            parts.push(format!("{key}: {problem}{source}"));
        }
    }
    parts.join("; ").replace('\n', " ")
}
