//! What users see when something is wrong: configuration mistakes stop the binary with exit status 2 naming the
//! variable and the closest key; connection failures name the server (host and port, never a password) and the
//! cause, against the real PostgreSQL and RabbitMQ.

mod common;
#[path = "faults/infra.rs"]
#[allow(dead_code, unused_imports)] // the fault suite's infrastructure; this file uses its private PostgreSQL cluster
mod infra;

use std::process::Command;
use std::time::{Duration, Instant};

use agent_connection_manager::config::Settings;
use agent_connection_manager::{db, AgentConnectionManager};
use common::{bounded, free_port, output_within, programs, test_settings};

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

/// Checks that `message` names `place`, says `why` and carries no password.
fn assert_says(message: &str, place: &str, why: &str) {
    assert!(message.contains(place), "does not name {place}: {message}");
    assert!(message.contains(why), "does not say {why:?}: {message}");
    for secret in ["hunter2", "guest:guest", "wrong-password"] {
        assert!(!message.contains(secret), "shows a password: {message}");
    }
    assert!(!message.contains('\n'), "more than one line: {message}");
}

/// Settings whose database is `url`, with a short connect bound.
fn with_database(url: String) -> Settings {
    let mut s = test_settings();
    s.database.url = url;
    s.database.checkout_timeout_secs = 1.try_into().unwrap();
    s
}

/// Runs `f` and fails unless it ends within `limit`.
async fn within<T>(limit: Duration, what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(limit, f).await.unwrap_or_else(|_| panic!("{what} did not end within {limit:?}"))
}

#[tokio::test]
async fn a_refused_database_port_is_named_with_the_cause() {
    let port = free_port();
    let s = with_database(format!("postgres://postgres:hunter2@127.0.0.1:{port}/acm"));
    let place = format!("127.0.0.1:{port} (database acm, user postgres)");
    let direct = within(Duration::from_secs(10), "migrate", db::migrate(&s.database)).await.unwrap_err().to_string();
    assert_says(&direct, &place, "Connection refused");
    let m = AgentConnectionManager::new(s).unwrap();
    let pooled = within(Duration::from_secs(10), "stats", m.get_connection_stats()).await.unwrap_err().to_string();
    assert_says(&pooled, &place, "cannot connect: error connecting to server: Connection refused");
}

#[tokio::test]
async fn a_database_server_that_never_answers_is_named_and_given_up_on_within_the_bound() {
    // A TCP listener that accepts every connection and never says a word.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let held = tokio::spawn(async move {
        let mut sockets = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            sockets.push(socket);
        }
    });
    let s = with_database(format!("postgres://postgres@127.0.0.1:{port}/acm"));
    let place = format!("127.0.0.1:{port} (database acm, user postgres)");
    let began = Instant::now();
    let direct = within(Duration::from_secs(10), "migrate", db::migrate(&s.database)).await.unwrap_err().to_string();
    assert_says(&direct, &place, "no connection made within 1 s (database.checkout_timeout_secs)");
    let m = AgentConnectionManager::new(s).unwrap();
    let pooled = within(Duration::from_secs(10), "stats", m.get_connection_stats()).await.unwrap_err().to_string();
    assert_says(&pooled, &place, "no connection made within database.checkout_timeout_secs");
    assert!(began.elapsed() < Duration::from_secs(6), "took {:?}", began.elapsed());
    held.abort();
}

#[tokio::test]
async fn an_unknown_role_is_named_with_the_servers_message_and_sqlstate() {
    let base = common::pg_base();
    let (_, host) = base.split_once('@').expect("ACM_TEST_PG_BASE is postgres://user@host:port");
    let s = with_database(format!("postgres://no_such_role_acm@{host}/postgres"));
    let direct = within(Duration::from_secs(10), "migrate", db::migrate(&s.database)).await.unwrap_err().to_string();
    assert_says(&direct, host, "role \"no_such_role_acm\" does not exist (SQLSTATE 28000)");
    let m = AgentConnectionManager::new(s).unwrap();
    let pooled = within(Duration::from_secs(10), "stats", m.get_connection_stats()).await.unwrap_err().to_string();
    assert_says(&pooled, host, "role \"no_such_role_acm\" does not exist (SQLSTATE 28000)");
}

#[tokio::test]
async fn an_unknown_database_is_named_with_the_servers_message_and_sqlstate() {
    // `stats` reads without creating anything: the database is not created for it.
    let s = test_settings();
    let (_, host) = s.database.url.split_once('@').unwrap();
    let (host, name) = host.split_once('/').unwrap();
    let m = AgentConnectionManager::new(s.clone()).unwrap();
    let e = within(Duration::from_secs(10), "stats", m.get_connection_stats()).await.unwrap_err().to_string();
    assert_says(&e, host, &format!("database \"{name}\" does not exist (SQLSTATE 3D000)"));
    // The binary adds what to do about it.
    let out =
        output_within(bin().arg("stats").env("ACM_DATABASE__URL", &s.database.url), Duration::from_secs(30), "stats");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_says(err.trim(), host, "(SQLSTATE 3D000)");
    assert!(err.contains("run `agent-connection-manager migrate`"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_refused_by_the_server_and_named_without_the_password() {
    // The machine's PostgreSQL trusts every connection: a private cluster asks for passwords (scram-sha-256).
    let dir = infra::TempDir::new("errors-password");
    let pg =
        tokio::task::block_in_place(|| infra::PgCluster::start_new_with_password(dir.path(), "pg", "right-password"));
    let place = format!("127.0.0.1:{} (database postgres, user postgres)", pg.port());
    let wrong = with_database(format!("postgres://postgres:wrong-password@127.0.0.1:{}/postgres", pg.port()));
    let e = within(Duration::from_secs(10), "migrate", db::migrate(&wrong.database)).await.unwrap_err().to_string();
    assert_says(&e, &place, "password authentication failed for user \"postgres\" (SQLSTATE 28P01)");
    let m = AgentConnectionManager::new(wrong).unwrap();
    let e = within(Duration::from_secs(10), "stats", m.get_connection_stats()).await.unwrap_err().to_string();
    assert_says(&e, &place, "password authentication failed for user \"postgres\" (SQLSTATE 28P01)");
    // The right password is let in: the refusal above was the password's.
    let right = with_database(format!("postgres://postgres:right-password@127.0.0.1:{}/postgres", pg.port()));
    within(Duration::from_secs(10), "connect", db::connect(&right.database, None)).await.expect("the right password");
}

#[tokio::test]
async fn the_library_start_fails_within_its_bound_naming_a_broker_never_reached() {
    let port = free_port();
    let mut s = test_settings();
    let _guard = common::CleanupGuard::new(&s);
    s.amqp.url = format!("amqp://guest:wrong-password@127.0.0.1:{port}/%2f");
    let m = AgentConnectionManager::new(s).unwrap();
    let e = within(Duration::from_secs(20), "start", m.start()).await.unwrap_err().to_string();
    assert_says(&e, &format!("broker at 127.0.0.1:{port} (vhost /, user guest) never reached"), "Connection refused");
    assert!(!m.is_running().await);
}

#[tokio::test]
async fn the_library_start_fails_naming_a_broker_that_refuses_the_credentials() {
    let mut s = test_settings();
    let _guard = common::CleanupGuard::new(&s);
    let url = url::Url::parse(&s.amqp.url).unwrap();
    let place = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(5672));
    s.amqp.url = format!("amqp://guest:wrong-password@{place}/%2f");
    let m = AgentConnectionManager::new(s).unwrap();
    let e = within(Duration::from_secs(20), "start", m.start()).await.unwrap_err().to_string();
    assert_says(&e, &format!("broker at {place} (vhost /, user guest) never reached"), "ACCESS_REFUSED");
    assert!(!m.is_running().await);
}

#[test]
fn run_stops_naming_an_http_address_already_in_use() {
    let s = test_settings();
    let _guard = common::CleanupGuard::new(&s);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let out = output_within(
        bin()
            .arg("run")
            .env("ACM_DATABASE__URL", &s.database.url)
            .env("ACM_AMQP__URL", &s.amqp.url)
            .env("ACM_AMQP__PREFIX", &s.amqp.prefix)
            .env("ACM_HTTP__LISTEN", addr.to_string()),
        Duration::from_secs(60),
        "run",
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.trim().lines().last().unwrap_or_default();
    assert!(last.contains(&format!("http.listen: cannot listen on {addr}: the address is already in use")), "{err}");
    drop(taken);
}
