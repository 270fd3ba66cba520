//! `demo`, the README's "whole lifecycle in a minute": run with the built binary against the test PostgreSQL and
//! RabbitMQ (a shorter run than README's: one cycle of the story and a bit), it shows a line a second as it goes,
//! sees every event type of the state machines from its own fleet, ends the fleet, prints the counts last as one
//! JSON object, exits 0, and leaves neither its database nor its exchanges and queues behind.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agent_connection_manager::amqp::{self, Topology};
use agent_connection_manager::simulate::tally::state_machine_event_types;
use common::{amqp_url, pg_base, CleanupGuard};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_agent-connection-manager");
const AGENTS: usize = 10;
const DURATION_SECS: u64 = 25;
/// Longest the run may take: the duration plus the start (database, migrations, worker) and the cleanup.
const RUN_WITHIN: Duration = Duration::from_secs(DURATION_SECS + 35);

#[test]
fn readme_shows_the_demo_command() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README.md");
    let quick_start = readme.split("## Quick start").nth(1).and_then(|s| s.split("\n## ").next()).unwrap_or_default();
    assert!(
        quick_start.contains("cargo run --release -- demo"),
        "README's quick start no longer runs `cargo run --release -- demo`"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_shows_every_transition_of_its_own_fleet_and_leaves_nothing_behind() {
    let mut child = Command::new(BIN)
        .args(["demo", "--agents", &AGENTS.to_string(), "--duration", &DURATION_SECS.to_string()])
        .env("ACM_DATABASE__URL", format!("{}/agent_connections", pg_base()))
        .env("ACM_AMQP__URL", amqp_url())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the demo runs");
    // Each line of standard output with the moment it arrived: progress must come as the run goes.
    let stdout = child.stdout.take().expect("stdout");
    let lines = std::thread::spawn(move || {
        BufReader::new(stdout).lines().map_while(|l| l.ok()).map(|l| (Instant::now(), l)).collect::<Vec<_>>()
    });
    let mut stderr = child.stderr.take().expect("stderr");
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + RUN_WITHIN;
    let status = loop {
        if let Some(status) = child.try_wait().expect("the demo's status") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the demo did not end within {RUN_WITHIN:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let lines = lines.join().expect("stdout reader");
    let errors = errors.join().expect("stderr reader");
    let text = lines.iter().map(|(_, l)| l.as_str()).collect::<Vec<_>>().join("\n");
    assert!(status.success(), "exit status {status:?}\nstdout:\n{text}\nstderr:\n{errors}");

    // Last: one JSON object with the counts.
    let summary: Value = serde_json::from_str(&lines.last().expect("some output").1)
        .unwrap_or_else(|e| panic!("the last line is not JSON ({e}):\n{text}"));
    let (database, prefix) = (summary["database"].as_str().unwrap(), summary["prefix"].as_str().unwrap());
    // Should an assertion below fail, the database and the prefix go anyway.
    let mut settings = common::test_settings();
    settings.database.url = format!("{}/{database}", pg_base());
    settings.amqp.prefix = prefix.to_string();
    let _cleanup = CleanupGuard::new(&settings);

    for event_type in state_machine_event_types() {
        let n = summary["events"][event_type].as_u64().unwrap_or(0);
        assert!(n >= 1, "no {event_type} in {summary}");
    }
    assert!(summary["events"].get("agent.sweeper.held").is_none(), "the brake held the story's staleness: {summary}");
    for reason in ["client_disconnect", "session_closed"] {
        assert!(summary["connections_closed_by_reason"][reason].as_u64() >= Some(1), "no {reason} close: {summary}");
    }
    assert!(summary["heartbeats_sent"].as_u64() >= Some(AGENTS as u64), "heartbeats: {summary}");
    assert!(summary["restored"].as_u64() >= Some(1), "no restored connection: {summary}");
    assert!(summary["reactivated"].as_u64() >= Some(1), "no session active again after inactive: {summary}");
    // Its own fleet, all of it, and ended: one session created and one closed per agent.
    assert_eq!(summary["events"]["agent.session.created"].as_u64(), Some(AGENTS as u64), "{summary}");
    assert_eq!(summary["events"]["agent.session.closed"].as_u64(), Some(AGENTS as u64), "{summary}");
    assert_eq!(summary["kept"], false);

    // A line a second, as the run went (not all at the end).
    let progress: Vec<Instant> = lines.iter().filter(|(_, l)| l.starts_with("t=")).map(|(at, _)| *at).collect();
    assert!(progress.len() as u64 >= DURATION_SECS - 8, "{} progress lines:\n{text}", progress.len());
    let spread = *progress.last().unwrap() - progress[0];
    assert!(spread >= Duration::from_secs(DURATION_SECS - 8), "progress lines came within {spread:?}:\n{text}");

    // Nothing left behind: no database, no exchange or queue of its prefix.
    let (admin, conn) = tokio_postgres::connect(&format!("{}/postgres", pg_base()), tokio_postgres::NoTls)
        .await
        .expect("the test PostgreSQL");
    tokio::spawn(conn);
    let left: i64 = admin
        .query_one("SELECT count(*) FROM pg_database WHERE datname = $1", &[&database])
        .await
        .expect("pg_database")
        .get(0);
    assert_eq!(left, 0, "the demo's database {database} is still there");
    let topology = Topology::new(prefix);
    let broker = amqp::connect(&amqp_url(), "acm tests demo").await.expect("the test broker");
    let mut queues = topology.heartbeat_queues();
    queues.extend([topology.command_queue.clone(), topology.dead_letter.clone()]);
    for queue in &queues {
        let ch = broker.create_channel().await.expect("a channel");
        let passive = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
        let found = ch.queue_declare(queue.as_str().into(), passive, Default::default()).await;
        assert!(is_not_found(&found), "queue {queue} is still there: {found:?}");
    }
    for exchange in [&topology.command_exchange, &topology.event_exchange, &topology.dead_letter] {
        let ch = broker.create_channel().await.expect("a channel");
        let passive = lapin::options::ExchangeDeclareOptions { passive: true, ..Default::default() };
        let found = ch
            .exchange_declare(exchange.as_str().into(), lapin::ExchangeKind::Topic, passive, Default::default())
            .await;
        assert!(is_not_found(&found), "exchange {exchange} is still there: {found:?}");
    }
    let _ = broker.close(200, "done".into()).await;
}

/// Whether a passive declaration failed with 404 (no such exchange or queue).
fn is_not_found<T>(result: &Result<T, lapin::Error>) -> bool {
    matches!(result, Err(e) if matches!(e.kind(), lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == 404))
}
