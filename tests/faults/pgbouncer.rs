//! Ten workers reaching PostgreSQL through PgBouncer in transaction pooling mode, with fewer server connections than
//! workers: migrations, commands, heartbeats and every sweeper cycle go through connections that PgBouncer hands
//! from client to client between transactions.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_connection_manager::amqp::Topology;
use agent_connection_manager::client::Client;
use agent_connection_manager::config::{Pooler, Settings};
use agent_connection_manager::{db, AgentConnectionManager};
use serde_json::json;
use tokio_postgres::NoTls;

use crate::common;
use crate::count;
use crate::infra::{eventually, PgBouncer, TempDir};

const WORKERS: usize = 10;
/// PgBouncer's server connections for the test database: fewer than the workers, so every server connection serves
/// several workers' transactions.
const SERVER_CONNECTIONS: usize = 4;
const CHECK_INTERVAL_SECS: u64 = 1;
const STALE_AFTER_SECS: u64 = 5;

/// The metric of a manager's registry (0 when absent).
fn metric(manager: &AgentConnectionManager, line_prefix: &str) -> f64 {
    let mut out = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut out, &manager.metrics().registry);
    out.lines().find_map(|l| l.strip_prefix(line_prefix).and_then(|v| v.trim().parse().ok())).unwrap_or(0.0)
}

/// `application_name` of the test's own direct connections, which the sampler leaves out.
const DIRECT_APP: &str = "acm-test-direct";

/// Samples the server connections PgBouncer holds open on the test database until aborted.
fn sample_backends(direct: String, dbname: String, peak: Arc<AtomicI64>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let Ok((client, conn)) = tokio_postgres::connect(&direct, NoTls).await else { return };
        tokio::spawn(conn);
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tick.tick().await;
            let sql = "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND application_name <> $2";
            let Ok(row) = client.query_one(sql, &[&dbname, &DIRECT_APP]).await else { return };
            peak.fetch_max(row.get(0), Ordering::Relaxed);
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_workers_behind_pgbouncer_in_transaction_mode_close_each_stale_connection_once_in_time() {
    let connections = count(40, 400);
    let rounds = count(6, 12);
    let sessions = count(4, 20);
    let instructions = count(8, 100);
    let started = Instant::now();
    let dir = TempDir::new("pgbouncer");

    // The test's own database on the machine's PostgreSQL, created directly; everything else goes through PgBouncer.
    let mut settings: Settings = common::test_settings();
    let guard = common::CleanupGuard::new(&settings);
    let direct_url = settings.database.url.clone();
    let dbname = direct_url.rsplit('/').next().expect("a database name").to_string();
    db::ensure_database(&settings.database).await.expect("the test database is created");
    let bouncer = PgBouncer::start(dir.path(), ("127.0.0.1", 5432), &dbname, "transaction", SERVER_CONNECTIONS).await;
    settings.database.url = bouncer.url(&dbname);
    settings.database.pooler = Pooler::Pgbouncer;
    settings.sweeper.check_interval_secs = CHECK_INTERVAL_SECS.try_into().unwrap();
    settings.sweeper.connection_stale_after_secs = STALE_AFTER_SECS.try_into().unwrap();
    // The brake would hold the mass verdicts this workload makes on purpose.
    settings.sweeper.stale_brake_min_connections = 1_000_000;
    settings.worker.shutdown_grace_secs = 5.try_into().unwrap();
    let direct_url = format!("{direct_url}?application_name={DIRECT_APP}");
    let peak_backends = Arc::new(AtomicI64::new(0));
    let sampler = sample_backends(direct_url.clone(), dbname.clone(), peak_backends.clone());

    // Migrations through PgBouncer, three at once: the transaction-level lock lets each apply once.
    let migrations = (0..3).map(|_| db::migrate(&settings.database));
    for r in futures_util::future::join_all(migrations).await {
        r.expect("migrations apply through PgBouncer");
    }
    let (amqp, _) = common::amqp_channel(&settings).await;
    Topology::new(&settings.amqp.prefix).declare(&amqp, &settings).await.expect("topology declares");
    let _ = amqp.close(200, "done".into()).await;
    let client = Client::connect(&settings.amqp.url, &settings.amqp.prefix).await.expect("client connects");
    let mut stale_events = client.subscribe("agent.connection.stale").await.expect("subscribe");

    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        let m = Arc::new(AgentConnectionManager::new(settings.clone()).expect("manager"));
        m.start().await.expect("worker starts through PgBouncer");
        workers.push(m);
    }
    for m in &workers {
        eventually("every worker's consumers to run", Duration::from_secs(30), || async {
            m.health().consumers_running.load(Ordering::Relaxed).then_some(())
        })
        .await;
    }
    let (direct, conn) = tokio_postgres::connect(&direct_url, NoTls).await.expect("direct connection");
    tokio::spawn(conn);

    // Commands through PgBouncer, each with its reply.
    crate::workload::create_through(&client, sessions, instructions, "pgbouncer", Duration::from_secs(30)).await;

    // Heartbeats in rounds about a second apart; connection c beats in rounds 0..=c % rounds, so connections go
    // quiet at staggered times. Each round waits until its heartbeats are applied, so no beating connection is ever
    // quiet for the stale window.
    let beat = |c: usize| (format!("a-{}", c % sessions), format!("s-{}", c % sessions), format!("c-{c}"));
    for round in 0..rounds {
        let round_started = Instant::now();
        let since: chrono::DateTime<chrono::Utc> = direct.query_one("SELECT now()", &[]).await.unwrap().get(0);
        let beating: Vec<String> = (0..connections).filter(|c| c % rounds >= round).map(|c| beat(c).2).collect();
        for c in (0..connections).filter(|c| c % rounds >= round) {
            let (a, s, id) = beat(c);
            client.heartbeat(&a, &s, &id).await.expect("heartbeat published");
        }
        let what = format!("heartbeat round {round} applied");
        eventually(&what, Duration::from_secs(STALE_AFTER_SECS - 1), || async {
            let sql = "SELECT count(*) FROM agent_connection WHERE connection_id = ANY($1) AND last_heartbeat_at >= $2";
            let n: i64 = direct.query_one(sql, &[&beating, &since]).await.ok()?.get(0);
            (n as usize == beating.len()).then_some(())
        })
        .await;
        let pace = Duration::from_secs(1).saturating_sub(round_started.elapsed());
        tokio::time::sleep(pace).await;
    }

    // Every connection is closed as stale, within the stale window plus two cycles of its last heartbeat.
    let bound = (STALE_AFTER_SECS + 2 * CHECK_INTERVAL_SECS) as f64;
    eventually("every connection to be closed", Duration::from_secs(STALE_AFTER_SECS * 4 + 30), || async {
        let sql = "SELECT count(*) FROM agent_connection WHERE status = 'closed'";
        let n: i64 = direct.query_one(sql, &[]).await.ok()?.get(0);
        (n as usize == connections).then_some(())
    })
    .await;
    let rows = direct
        .query(
            "SELECT connection_id, close_reason::text, extract(epoch FROM closed_at - last_heartbeat_at)::float8 \
             FROM agent_connection",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), connections, "every connection was opened by its heartbeats");
    let mut worst = 0.0f64;
    for r in &rows {
        let (id, reason, latency): (String, Option<String>, f64) = (r.get(0), r.get(1), r.get(2));
        assert_eq!(reason.as_deref(), Some("stale_connection"), "{id} closed as stale");
        assert!(latency <= bound, "{id} closed {latency:.2} s after its last heartbeat (bound {bound} s)");
        worst = worst.max(latency);
    }

    // Each decision once: every event published (the outbox empty: published events are deleted once confirmed,
    // so each is in this test's queue), then a marker published behind them; everything before the marker is every
    // stale event there is, and each connection must have exactly one distinct event.
    common::eventually("the outbox to be published", Duration::from_secs(60), || async {
        let left: i64 = direct.query_one("SELECT count(*) FROM event_outbox", &[]).await.ok()?.get(0);
        (left == 0).then_some(())
    })
    .await;
    let marker = uuid::Uuid::new_v4().to_string();
    let (conn, _) = common::amqp_channel(&settings).await;
    let ch = agent_connection_manager::amqp::confirm_channel(&conn).await.expect("a confirm channel");
    agent_connection_manager::amqp::publish_confirmed(
        &ch,
        &Topology::new(&settings.amqp.prefix).event_exchange,
        "agent.connection.stale",
        json!({"marker": marker}).to_string().as_bytes(),
        agent_connection_manager::amqp::json_properties(),
        settings.confirm_timeout(),
    )
    .await
    .expect("the marker is published");
    crate::lab::close(&conn).await;
    let mut published: HashMap<String, HashSet<String>> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(
            Instant::now() < deadline,
            "the marker did not arrive within 60 s ({} connections seen)",
            published.len()
        );
        if let Some((id, v)) = stale_events.next_raw(Duration::from_millis(500)).await {
            if v["marker"] == marker.as_str() {
                break;
            }
            let connection = v["connection_id"].as_str().unwrap_or_default().to_string();
            published.entry(connection).or_default().insert(id.unwrap_or_default());
        }
    }
    assert_eq!(published.len(), connections, "a stale event published for every connection");
    assert!(published.values().all(|ids| ids.len() == 1), "one distinct stale event per connection: {published:?}");

    let cycles: f64 =
        workers.iter().map(|m| metric(m, "acm_sweeper_task_seconds_count{name=\"stale_connections\"} ")).sum();
    let failures: f64 =
        workers.iter().map(|m| metric(m, "acm_sweeper_task_failures_total{name=\"stale_connections\"} ")).sum();
    for m in &workers {
        m.stop().await.expect("worker stops");
    }
    sampler.abort();
    let peak = peak_backends.load(Ordering::Relaxed);
    println!(
        "pgbouncer (transaction pooling, {SERVER_CONNECTIONS} server connections): {WORKERS} workers, {sessions} \
         sessions and {instructions} instructions created through it, {connections} connections going stale over \
         {rounds} rounds; {cycles} sweeper cycles in all ({failures} failed); worst close {worst:.2} s after the last \
         heartbeat (bound {bound} s); peak server connections {peak}; {:.0} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(failures, 0.0, "no sweeper run failed behind PgBouncer");
    assert!(
        peak <= SERVER_CONNECTIONS as i64,
        "PgBouncer opened {peak} server connections (pool {SERVER_CONNECTIONS})"
    );
    client.close().await;
    drop(bouncer);
    drop(guard);
}
