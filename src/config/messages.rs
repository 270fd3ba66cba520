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

/// Replaces the password of a URL (its user information or a `password=` query parameter; several hosts, as in
/// `postgres://u:pw@h1:5432,h2:5433/db`, are fine) or of a libpq `password=` pair with `***`.
///
/// ```
/// use agent_connection_manager::config::redact_url;
/// assert_eq!(redact_url("amqp://guest:guest@host/%2f"), "amqp://guest:***@host/%2f");
/// assert_eq!(redact_url("postgres://acm:pw@h1:5432,h2:5433/acm"), "postgres://acm:***@h1:5432,h2:5433/acm");
/// assert_eq!(redact_url("host=db password=secret"), "host=db password=***");
/// ```
pub fn redact_url(raw: &str) -> String {
    let redact_pair = |pair: &str| match pair.split_once('=') {
        Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
        _ => pair.to_string(),
    };
    if let Some((scheme, rest)) = raw.split_once("://") {
        // The user information ends at the last `@` before the path or query.
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        let authority = match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => match userinfo.split_once(':') {
                Some((user, _)) => format!("{user}:***@{hosts}"),
                None => authority.to_string(),
            },
            None => authority.to_string(),
        };
        let tail = match tail.split_once('?') {
            Some((path, query)) => {
                format!("{path}?{}", query.split('&').map(redact_pair).collect::<Vec<_>>().join("&"))
            }
            None => tail.to_string(),
        };
        return format!("{scheme}://{authority}{tail}");
    }
    // libpq key=value form.
    raw.split_whitespace().map(redact_pair).collect::<Vec<_>>().join(" ")
}
