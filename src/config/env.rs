//! The `ACM_*` environment variables: which ones are configuration (`ACM_<SECTION>__<KEY>`), which are the
//! project's own variables of another kind ([`NOT_CONFIGURATION`]), and the check that stops the program on any
//! other, naming the variable and the closest configuration variable (a misspelled section or key, or a single
//! underscore where two belong, would otherwise be ignored without a word).

use super::{ConfigError, Settings, SECTIONS};

/// The project's `ACM_*` variables that are not configuration keys; a trailing `*` stands for any rest. These are the
/// only `ACM_*` variables besides `ACM_<SECTION>__<KEY>` that the configuration accepts.
pub const NOT_CONFIGURATION: &[&str] = &[
    // Names a configuration file.
    "ACM_CONFIG",
    // Tests: services to test against (ACM_TEST_PG_BASE, ACM_TEST_AMQP_URL), interpreters (ACM_TEST_PYTHON).
    "ACM_TEST_*",
    // The Python package's tests: the interpreter and the wheel's build profile.
    "ACM_PYTHON",
    "ACM_PYTHON_WHEEL_PROFILE",
    // The interoperability test's script: its broker, prefix and schema folder.
    "ACM_INTEROP_*",
    // `cargo test --test schemas` rewrites schema/ when set.
    "ACM_UPDATE_SCHEMAS",
    // The fault suite (ACM_FAULTS_FULL, ACM_FAULTS_KEEP, ACM_FAULTS_PG_BIN, ...).
    "ACM_FAULTS_*",
    // The benches.
    "ACM_BENCH_*",
    "ACM_CAPACITY_SCALE",
];

/// Prefix of every variable this module looks at.
const PREFIX: &str = "ACM_";

/// Whether `name` (any case) is one of [`NOT_CONFIGURATION`].
pub fn is_not_configuration(name: &str) -> bool {
    let name = name.to_ascii_uppercase();
    NOT_CONFIGURATION.iter().any(|known| match known.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => name == *known,
    })
}

/// Every configuration key, `(section, key)`, in the order of [`Settings`].
pub fn keys() -> Vec<(&'static str, String)> {
    let defaults = serde_json::to_value(Settings::default()).unwrap_or_default();
    let mut out = Vec::new();
    for section in SECTIONS {
        if let Some(fields) = defaults.get(section).and_then(|v| v.as_object()) {
            out.extend(fields.keys().map(|k| (section, k.clone())));
        }
    }
    out
}

/// The variable that sets `section.key`.
fn variable(section: &str, key: &str) -> String {
    format!("{PREFIX}{}__{}", section.to_ascii_uppercase(), key.to_ascii_uppercase())
}

/// The candidate most like `wanted` (Damerau-Levenshtein distance; the earlier candidate on a tie).
pub fn closest<'a>(wanted: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let wanted = wanted.to_ascii_lowercase();
    candidates
        .into_iter()
        .enumerate()
        .min_by_key(|(i, c)| (strsim::damerau_levenshtein(&wanted, &c.to_ascii_lowercase()), *i))
        .map(|(_, c)| c)
}

/// Checks one `ACM_*` variable name: `Ok` for a configuration variable of a known section and key and for the
/// project's other variables; otherwise what is wrong, with the closest configuration variable.
pub fn check_name(name: &str) -> Result<(), ConfigError> {
    if !name.to_ascii_uppercase().starts_with(PREFIX) || is_not_configuration(name) {
        return Ok(());
    }
    let rest = name[PREFIX.len()..].to_ascii_lowercase();
    let keys = keys();
    let all: Vec<String> = keys.iter().map(|(s, k)| variable(s, k)).collect();
    let nearest = |wanted: &str| closest(wanted, all.iter().map(String::as_str)).unwrap_or_default().to_string();
    let refuse = |why: String, suggestion: String| {
        Err(ConfigError(format!(
            "{name}: {why}; did you mean {suggestion}? (configuration variables are ACM_<SECTION>__<KEY>; the \
             project's other ACM_* variables are listed in README.md, Configuration)"
        )))
    };
    let Some((section, key)) = rest.split_once("__") else {
        // No `__`: a single underscore after the section, or not a configuration variable at all.
        let why = match SECTIONS.iter().find(|s| rest.strip_prefix(*s).is_some_and(|k| k.starts_with('_'))) {
            Some(s) => format!("section `{s}` must be followed by two underscores"),
            None => "not a configuration variable".to_string(),
        };
        return refuse(why, nearest(name));
    };
    if !SECTIONS.contains(&section) {
        let s = closest(section, SECTIONS).unwrap_or_default();
        let in_section = keys.iter().filter(|(ks, _)| *ks == s).map(|(_, k)| k.as_str());
        let k = closest(key, in_section).unwrap_or_default();
        return refuse(format!("unknown section `{section}`"), variable(s, k));
    }
    let renamed = super::RENAMED.iter().any(|(old, _)| old.split_once('.') == Some((section, key)));
    if !renamed && !keys.iter().any(|(s, k)| *s == section && k == key) {
        let in_section = keys.iter().filter(|(s, _)| *s == section).map(|(_, k)| k.as_str());
        let k = closest(key, in_section).unwrap_or_default();
        return refuse(format!("unknown key `{key}` in section `{section}`"), variable(section, k));
    }
    Ok(())
}

/// Checks every `ACM_*` name of `names` (the environment's variable names); the first refused one is the error.
pub fn check_names<I, S>(names: I) -> Result<(), ConfigError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let mut names: Vec<String> = names.into_iter().map(|n| n.as_ref().to_string()).collect();
    names.sort();
    names.iter().try_for_each(|n| check_name(n))
}

/// [`check_names`] over this process's environment (a name that is not Unicode cannot be a configuration variable).
pub fn check_environment() -> Result<(), ConfigError> {
    check_names(std::env::vars_os().filter_map(|(k, _)| k.into_string().ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(name: &str) -> String {
        check_name(name).unwrap_err().to_string()
    }

    #[test]
    fn configuration_variables_and_the_projects_other_variables_pass() {
        for ok in [
            "ACM_DATABASE__URL",
            "ACM_SWEEPER__CHECK_INTERVAL_SECS",
            "acm_http__listen",
            "ACM_CONFIG",
            "ACM_TEST_PG_BASE",
            "ACM_BENCH_WORKER_BIN",
            "ACM_FAULTS_FULL",
            "ACM_INTEROP_AMQP_URL",
            "ACM_PYTHON",
            "ACM_PYTHON_WHEEL_PROFILE",
            "ACM_UPDATE_SCHEMAS",
            "ACM_CAPACITY_SCALE",
            "PATH",
            "RUST_LOG",
        ] {
            assert!(check_name(ok).is_ok(), "{ok}: {:?}", check_name(ok));
        }
    }

    #[test]
    fn a_misspelled_section_names_the_variable_and_the_closest_one() {
        let e = refused("ACM_SWEPER__CHECK_INTERVAL_SECS");
        assert!(e.contains("ACM_SWEPER__CHECK_INTERVAL_SECS: unknown section `sweper`"), "{e}");
        assert!(e.contains("did you mean ACM_SWEEPER__CHECK_INTERVAL_SECS?"), "{e}");
        // Both misspelled: the closest section, then its closest key.
        let e = refused("ACM_DATABSE__POOL_SIZ");
        assert!(e.contains("did you mean ACM_DATABASE__POOL_SIZE?"), "{e}");
    }

    #[test]
    fn a_misspelled_key_names_the_closest_key_of_its_section() {
        let e = refused("ACM_DATABASE__POOL_SIZ");
        assert!(e.contains("unknown key `pool_siz` in section `database`"), "{e}");
        assert!(e.contains("did you mean ACM_DATABASE__POOL_SIZE?"), "{e}");
        let e = refused("ACM_OUTBOX__BATCHSIZE");
        assert!(e.contains("did you mean ACM_OUTBOX__BATCH_SIZE?"), "{e}");
    }

    #[test]
    fn a_single_underscore_after_the_section_is_refused_the_same_way() {
        let e = refused("ACM_SWEEPER_CHECK_INTERVAL_SECS");
        assert!(e.contains("section `sweeper` must be followed by two underscores"), "{e}");
        assert!(e.contains("did you mean ACM_SWEEPER__CHECK_INTERVAL_SECS?"), "{e}");
        let e = refused("ACM_AMQP_URL");
        assert!(e.contains("did you mean ACM_AMQP__URL?"), "{e}");
    }

    #[test]
    fn any_other_acm_variable_is_refused_with_the_closest_configuration_variable() {
        let e = refused("ACM_DATABASE_URLL");
        assert!(e.contains("did you mean ACM_DATABASE__URL?"), "{e}");
        let e = refused("ACM_LISTEN");
        assert!(e.contains("ACM_LISTEN: not a configuration variable"), "{e}");
    }

    #[test]
    fn every_key_of_every_section_is_known() {
        let keys = keys();
        assert!(keys.contains(&("sweeper", "check_interval_secs".to_string())));
        assert!(keys.contains(&("http", "listen".to_string())));
        for section in SECTIONS {
            assert!(keys.iter().any(|(s, _)| *s == section), "{section} has no keys");
        }
    }

    #[test]
    fn the_first_refused_name_of_an_environment_is_the_error() {
        assert!(check_names(["ACM_CONFIG", "HOME", "ACM_AMQP__PREFIX"]).is_ok());
        let e = check_names(["ACM_CONFIG", "ACM_SWEPER__CHECK_INTERVAL_SECS"]).unwrap_err().to_string();
        assert!(e.contains("ACM_SWEPER__CHECK_INTERVAL_SECS"), "{e}");
    }
}
