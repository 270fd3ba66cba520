//! Scenario 14: PgBouncer in transaction pooling mode with `database.pooler` left at `none`: the worker binary notices that
//! its connections do not keep named prepared statements, switches to unnamed ones, and says so in one warning naming
//! `database.pooler` — no stream of `prepared statement "s10" …` errors, no failed sweeper cycle, no command timing
//! out. Commands are answered, heartbeats open connections and the sweeper closes them as stale every cycle; then a
//! SIGTERM stops the worker cleanly and its log is read.

use std::time::{Duration, Instant};

use agent_connection_manager::client::Client;
use agent_connection_manager::db;
use tokio_postgres::NoTls;

use crate::common;
use crate::infra::{eventually, PgBouncer, TempDir, WorkerEnv};

const SERVER_CONNECTIONS: usize = 4;
const STALE_AFTER_SECS: u64 = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pgbouncer_in_transaction_mode_with_pooler_none_one_warning_no_error() {
    let started = Instant::now();
    let dir = TempDir::new("pgbouncer-undeclared");
    let settings = common::test_settings();
    let _guard = common::CleanupGuard::new(&settings);
    let direct_url = settings.database.url.clone();
    let dbname = direct_url.rsplit('/').next().expect("a database name").to_string();
    db::ensure_database(&settings.database).await.expect("the test database is created");
    let bouncer = PgBouncer::start(dir.path(), ("127.0.0.1", 5432), &dbname, "transaction", SERVER_CONNECTIONS).await;

    // The binary, through PgBouncer, `database.pooler` not set (so `none`); the sweeper every second. It declares the
    // topology itself (with the heartbeat queue's TTL of its stale window).
    let env = WorkerEnv {
        database_url: bouncer.url(&dbname),
        amqp_url: settings.amqp.url.clone(),
        prefix: settings.amqp.prefix.clone(),
        extra: vec![
            ("ACM_SWEEPER__CHECK_INTERVAL_SECS".into(), "1".into()),
            ("ACM_SWEEPER__CONNECTION_STALE_AFTER_SECS".into(), STALE_AFTER_SECS.to_string()),
            ("ACM_WORKER__SHUTDOWN_GRACE_SECS".into(), "5".into()),
            // The brake would hold the mass verdict this workload makes on purpose.
            ("ACM_SWEEPER__STALE_BRAKE_MIN_CONNECTIONS".into(), "1000000".into()),
        ],
        log_dir: dir.path().to_path_buf(),
    };
    let mut worker = env.spawn("worker-pooler-none");
    worker.wait_ready(Duration::from_secs(90)).await;
    let client = Client::connect(&settings.amqp.url, &settings.amqp.prefix).await.expect("client connects");
    let (direct, conn) = tokio_postgres::connect(&direct_url, NoTls).await.expect("direct connection");
    tokio::spawn(conn);

    // Commands, each answered within the client's timeout.
    let (sessions, instructions, connections) = (crate::count(10, 50), crate::count(40, 400), crate::count(20, 200));
    crate::workload::create_through(&client, sessions, instructions, "pooler", Duration::from_secs(20)).await;
    // Heartbeats open connections; once they stop, sweeps close every one as stale.
    for c in 0..connections {
        let k = c % sessions;
        client.heartbeat(&format!("a-{k}"), &format!("s-{k}"), &format!("c-{c}")).await.expect("heartbeat published");
    }
    let count = |sql: &'static str| {
        let direct = &direct;
        async move { direct.query_one(sql, &[]).await.ok().map(|r| r.get::<_, i64>(0)) }
    };
    eventually("the heartbeats' connections opened", Duration::from_secs(30), || async {
        (count("SELECT count(*) FROM agent_connection").await? == connections as i64).then_some(())
    })
    .await;
    eventually("every connection closed as stale by the sweeps", Duration::from_secs(60), || async {
        let closed = count("SELECT count(*) FROM agent_connection WHERE close_reason = 'stale_connection'").await?;
        (closed == connections as i64).then_some(())
    })
    .await;
    assert_eq!(count("SELECT count(*) FROM agent_instruction").await, Some(instructions as i64));

    worker.sigterm(Duration::from_secs(60)).await;
    let log = std::fs::read_to_string(&worker.log).expect("the worker's log");
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains(" WARN ") && l.contains("database.pooler")).collect();
    let errors: Vec<&str> = log.lines().filter(|l| l.contains(" ERROR ")).collect();
    let failed_tasks: Vec<&str> = log.lines().filter(|l| l.contains("sweeper task failed")).collect();
    let not_kept: Vec<&str> = log.lines().filter(|l| l.contains("prepared statement")).collect();
    println!(
        "| 14. PgBouncer (transaction mode) with database.pooler = none | {sessions} sessions, {instructions} instructions answered, \
         {connections} connections opened and closed stale; WARN naming database.pooler: {}; ERROR lines: {}; lines naming a \
         prepared statement: {} | {:.1} s |",
        warnings.len(),
        errors.len(),
        not_kept.len(),
        started.elapsed().as_secs_f64()
    );
    println!("{}", warnings.join("\n"));
    assert_eq!(warnings.len(), 1, "exactly one warning naming database.pooler: {warnings:#?}");
    assert!(errors.is_empty(), "ERROR lines in the worker's log: {errors:#?}");
    assert!(failed_tasks.is_empty(), "failed sweeper tasks: {failed_tasks:#?}");
    client.close().await;
    common::cleanup(&settings).await;
}
