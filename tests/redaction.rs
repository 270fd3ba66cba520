//! Property test of password redaction: connection strings in every form libpq and the worker accept — URLs with one
//! or several hosts and a password in the user information or the query, key=value strings with spaces around `=`,
//! quoted values and backslash escapes — are generated with a known password; the redacted string never contains it
//! (as written or decoded), and it still parses to the same hosts, ports, user and database.

use agent_connection_manager::config::redact_url;
use proptest::prelude::*;

/// A password: printable ASCII with spaces, quotes and backslashes, and some non-ASCII, always with a marker that
/// no host, user or database name holds, so finding it in the output means the password leaked.
fn password() -> impl Strategy<Value = String> {
    "[ -~é€]{0,16}".prop_map(|s| format!("Z{s}Q"))
}

fn name() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9_]{0,8}"
}

fn hosts() -> impl Strategy<Value = Vec<(String, u16)>> {
    prop::collection::vec((name(), 1024u16..65535), 1..4)
}

/// Spacing around `=` in a key=value pair.
fn space() -> impl Strategy<Value = String> {
    prop_oneof![Just(String::new()), Just(" ".to_string()), Just("  ".to_string()), Just("\t".to_string())]
}

/// A key=value value written quoted (`'…'`, `\'` and `\\` escaped) or not (whitespace, quotes and backslashes
/// escaped with a backslash).
fn written(value: &str, quoted: bool) -> String {
    if quoted {
        format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
    } else {
        value
            .chars()
            .flat_map(|c| if c.is_whitespace() || c == '\\' || c == '\'' { vec!['\\', c] } else { vec![c] })
            .collect()
    }
}

fn percent(value: &str) -> String {
    url::form_urlencoded::byte_serialize(value.as_bytes()).collect::<String>().replace('+', "%20")
}

/// What the redacted string must still say.
fn identity(s: &str) -> (Vec<String>, Vec<u16>, Option<String>, Option<String>) {
    let c: tokio_postgres::Config = s.parse().unwrap_or_else(|e| panic!("{s:?} does not parse: {e}"));
    let hosts = c
        .get_hosts()
        .iter()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            #[cfg(unix)]
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .collect();
    (hosts, c.get_ports().to_vec(), c.get_user().map(String::from), c.get_dbname().map(String::from))
}

fn check(raw: &str, pw: &str, as_written: &str) -> Result<(), TestCaseError> {
    let red = redact_url(raw);
    prop_assert!(!red.contains(pw), "password {pw:?} in {red:?} (from {raw:?})");
    prop_assert!(!red.contains(as_written), "password as written {as_written:?} in {red:?} (from {raw:?})");
    prop_assert!(red.contains("***"), "nothing masked in {red:?} (from {raw:?})");
    prop_assert_eq!(identity(&red), identity(raw), "{:?} -> {:?}", raw, red);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn url_passwords_never_show(
        pw in password(), user in name(), db in name(), hosts in hosts(), in_query in any::<bool>(),
        scheme in prop_oneof![Just("postgres"), Just("postgresql")],
    ) {
        let hostlist = hosts.iter().map(|(h, p)| format!("{h}:{p}")).collect::<Vec<_>>().join(",");
        let enc = percent(&pw);
        let raw = if in_query {
            format!("{scheme}://{user}@{hostlist}/{db}?sslmode=disable&password={enc}&application_name=x")
        } else {
            format!("{scheme}://{user}:{enc}@{hostlist}/{db}?target_session_attrs=read-write")
        };
        check(&raw, &pw, &enc)?;
    }

    #[test]
    fn key_value_passwords_never_show(
        pw in password(), user in name(), db in name(), hosts in hosts(), quoted in any::<bool>(),
        before in space(), after in space(), position in 0usize..4,
    ) {
        let hostlist = hosts.iter().map(|(h, _)| h.as_str()).collect::<Vec<_>>().join(",");
        let ports = hosts.iter().map(|(_, p)| p.to_string()).collect::<Vec<_>>().join(",");
        let w = written(&pw, quoted);
        let mut pairs = vec![format!("host={hostlist}"), format!("port = {ports}"), format!("user={user}"), format!("dbname= {db}")];
        pairs.insert(position, format!("password{before}={after}{w}"));
        let raw = pairs.join(" ");
        check(&raw, &pw, &w)?;
    }
}

#[test]
fn the_forms_of_the_issue_are_masked() {
    for (raw, want) in [
        ("host=db password = S3CRET user=acm", "host=db password = *** user=acm"),
        ("host=db password= S3CRET", "host=db password= ***"),
        ("host=db password='S3 CRET' dbname=acm", "host=db password=*** dbname=acm"),
        ("password='it\\'s' host=db", "password=*** host=db"),
        ("host=db password=S3\\ CRET", "host=db password=***"),
        ("host=db password='unterminated", "host=db password***"),
        ("amqp://u:S3CRET@a:5672/%2f", "amqp://u:***@a:5672/%2f"),
    ] {
        assert_eq!(redact_url(raw), want, "{raw}");
    }
}
