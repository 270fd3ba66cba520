//! What users see when something is wrong: configuration mistakes stop the binary with exit status 2 naming the
//! variable and the closest key; connection failures name the server (host and port, never a password) and the
//! cause, against the real PostgreSQL and RabbitMQ.

mod common;

use std::process::Command;
use std::time::Duration;

use common::output_within;

const BIN: &str = env!("CARGO_BIN_EXE_agent-connection-manager");

/// The binary with no configuration from this environment (only the variables a test sets).
fn bin() -> Command {
    let mut c = Command::new(BIN);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().to_ascii_uppercase().starts_with("ACM_") {
            c.env_remove(name);
        }
    }
    c.env_remove("RUST_LOG");
    c
}

#[test]
fn a_misspelled_variable_stops_the_binary_with_status_2_naming_the_closest_variable() {
    for (variable, why) in [
        ("ACM_SWEPER__CHECK_INTERVAL_SECS", "unknown section `sweper`"),
        ("ACM_SWEEPER_CHECK_INTERVAL_SECS", "section `sweeper` must be followed by two underscores"),
        ("ACM_SWEEPER__CHECK_INTERVL_SECS", "unknown key `check_intervl_secs` in section `sweeper`"),
    ] {
        let out = output_within(bin().arg("config").env(variable, "5"), Duration::from_secs(30), "config");
        assert_eq!(out.status.code(), Some(2), "{variable}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(err.contains(&format!("{variable}: {why}")), "{variable}: {err}");
        assert!(err.contains("did you mean ACM_SWEEPER__CHECK_INTERVAL_SECS?"), "{variable}: {err}");
    }
    // The project's own variables that are not configuration pass.
    let out = output_within(
        bin().arg("config").env("ACM_TEST_PG_BASE", "postgres://x").env("ACM_BENCH_COUNT", "1"),
        Duration::from_secs(30),
        "config",
    );
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("listen = \"127.0.0.1:9090\""), "{out:?}");
}
