//! Redaction of connection strings: the password of a URL (`postgres://`, `amqp://`, several hosts, a `password=`
//! query parameter) or of a libpq key=value string is replaced by `***` wherever it appears, read with libpq's own
//! rules (whitespace around `=`, single-quoted values, backslash escapes), so that `config` output, logs, errors and
//! the Python manager's `database_url`/`repr` never show it while the rest still reads the same.

/// What stands in for a password.
const MASK: &str = "***";

/// Replaces the password of a URL (its user information or a `password=` query parameter; several hosts, as in
/// `postgres://u:pw@h1:5432,h2:5433/db`, are fine) or of a libpq key=value string (`password=pw`,
/// `password = pw`, `password='p w'`, `password=p\ w`) with `***`.
///
/// ```
/// use agent_connection_manager::config::redact_url;
/// assert_eq!(redact_url("amqp://guest:guest@host/%2f"), "amqp://guest:***@host/%2f");
/// assert_eq!(redact_url("postgres://acm:pw@h1:5432,h2:5433/acm"), "postgres://acm:***@h1:5432,h2:5433/acm");
/// assert_eq!(redact_url("host=db password=secret"), "host=db password=***");
/// assert_eq!(redact_url("host=db password = 'S3 CRET' user=acm"), "host=db password = *** user=acm");
/// ```
pub fn redact_url(raw: &str) -> String {
    match raw.split_once("://") {
        Some((scheme, rest)) if !scheme.is_empty() && scheme.chars().all(is_scheme_char) => redact_uri(scheme, rest),
        _ => redact_key_values(raw),
    }
}

fn is_scheme_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')
}

/// A URL: the user information ends at the last `@` before the path or query; its password is everything after the
/// first `:`. A `password` query parameter (its name matched case-insensitively) is masked too.
fn redact_uri(scheme: &str, rest: &str) -> String {
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:{MASK}@{hosts}"),
            None => authority.to_string(),
        },
        None => authority.to_string(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let pairs: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((k, _)) if is_password_key(k) => format!("{k}={MASK}"),
                    _ => pair.to_string(),
                })
                .collect();
            format!("{path}?{}", pairs.join("&"))
        }
        None => tail.to_string(),
    };
    format!("{scheme}://{authority}{tail}")
}

/// Whether a parameter name (perhaps percent-encoded, as a URL query may write it) is `password`.
fn is_password_key(key: &str) -> bool {
    let decoded: String =
        url::form_urlencoded::parse(format!("{key}=").as_bytes()).map(|(k, _)| k.into_owned()).collect();
    decoded.trim().eq_ignore_ascii_case("password")
}

/// A libpq key=value string, read as libpq reads it: each value is replaced where it stands, so spacing and the
/// other values stay as written. A string that does not parse (an unterminated quote, a key without `=`) has
/// everything from the first `password` key on masked: better too much hidden than a password shown.
fn redact_key_values(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let (mut copied, mut at) = (0, 0);
    loop {
        at = skip(raw, at, char::is_whitespace);
        if at >= raw.len() {
            break;
        }
        let key_start = at;
        at = skip(raw, at, |c| !c.is_whitespace() && c != '=');
        let key = &raw[key_start..at];
        at = skip(raw, at, char::is_whitespace);
        if !raw[at..].starts_with('=') {
            return mask_from_first_password(raw);
        }
        let value_start = skip(raw, at + 1, char::is_whitespace);
        let Some(value_end) = value_end(raw, value_start) else {
            return mask_from_first_password(raw);
        };
        if key.eq_ignore_ascii_case("password") {
            out.push_str(&raw[copied..value_start]);
            out.push_str(MASK);
            copied = value_end;
        }
        at = value_end;
    }
    out.push_str(&raw[copied..]);
    out
}

/// The byte offset of the first character from `at` on that is not `what` (the end when every one is).
fn skip(raw: &str, at: usize, what: impl Fn(char) -> bool) -> usize {
    raw[at..].char_indices().find(|(_, c)| !what(*c)).map_or(raw.len(), |(i, _)| at + i)
}

/// Where the value starting at `at` ends: after its closing quote when quoted, else at the next unescaped
/// whitespace; a backslash escapes the next character either way. `None`: unterminated quote or no value.
fn value_end(raw: &str, at: usize) -> Option<usize> {
    let quoted = raw[at..].starts_with('\'');
    let mut chars = raw[at..].char_indices().skip(usize::from(quoted));
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => {
                chars.next()?;
            }
            '\'' if quoted => return Some(at + i + 1),
            c if !quoted && c.is_whitespace() => return (i > 0).then_some(at + i),
            _ => {}
        }
    }
    (!quoted && at < raw.len()).then_some(raw.len())
}

/// The fallback for a string that does not parse: everything from the first `password` (any case) on is masked.
fn mask_from_first_password(raw: &str) -> String {
    match raw.to_ascii_lowercase().find("password") {
        Some(i) => format!("{}{MASK}", &raw[..i + "password".len()]),
        None => raw.to_string(),
    }
}
