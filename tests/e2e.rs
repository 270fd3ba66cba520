//! End to end: the real binary, started with `run`, driven only through RabbitMQ as a client would, stopped with
//! SIGTERM. Also the other CLI commands.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agent_connection_manager::client::{reply_result, Client};
use common::{eventually, free_port, http_get, test_settings};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_agent-connection-manager");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_runs_the_whole_lifecycle_and_stops_on_sigterm() {
    let settings = test_settings();
    let _guard = common::CleanupGuard::new(&settings);
    let port = free_port();
    let env = |c: &mut Command| {
        c.env("ACM_DATABASE__URL", &settings.database.url)
            .env("ACM_AMQP__URL", &settings.amqp.url)
            .env("ACM_AMQP__PREFIX", &settings.amqp.prefix)
            .env("ACM_HTTP__LISTEN", format!("127.0.0.1:{port}"))
            .env("ACM_SWEEPER__CHECK_INTERVAL_SECS", "1")
            .env("ACM_SWEEPER__INSTRUCTION_RETRY_WINDOW_SECS", "1")
            .env_remove("ACM_CONFIG")
            .env_remove("RUST_LOG");
    };
    let cli = |args: &[&str]| {
        let mut c = Command::new(BIN);
        env(&mut c);
        c.args(args).output().expect("the binary runs")
    };

    // migrate: twice at once, both succeed.
    let mut a = Command::new(BIN);
    env(&mut a);
    let mut b = Command::new(BIN);
    env(&mut b);
    let (a, b) = (a.arg("migrate").spawn().unwrap(), b.arg("migrate").spawn().unwrap());
    assert!(a.wait_with_output().unwrap().status.success());
    assert!(b.wait_with_output().unwrap().status.success());

    let mut run = Command::new(BIN);
    env(&mut run);
    let mut child = run.arg("run").stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    eventually("/readyz to answer 200", Duration::from_secs(30), || async {
        matches!(http_get(port, "/readyz").await, Some((200, _))).then_some(())
    })
    .await;
    assert_eq!(http_get(port, "/healthz").await.map(|r| r.0), Some(200));

    let client = Client::connect(&settings.amqp.url, &settings.amqp.prefix).await.unwrap();
    let mut events = client.subscribe("agent.#").await.unwrap();
    let t = Duration::from_secs(20);
    let r = client.request(&json!({"type": "session.create", "agent_id": "e2e"}), None, t).await.unwrap();
    let sid = reply_result(&r).unwrap()["session_id"].as_str().unwrap().to_string();
    client.heartbeat("e2e", &sid, "e2e-conn").await.unwrap();
    let r = client
        .request(
            &json!({"type": "instruction.create", "agent_id": "e2e", "session_id": sid, "instruction_type": "t",
                    "payload": {"a": 1}, "ttl_seconds": 1, "max_retries": 1}),
            None,
            t,
        )
        .await
        .unwrap();
    let expiring = reply_result(&r).unwrap()["instruction_id"].as_str().unwrap().to_string();
    let r = client
        .request(&json!({"type": "instruction.create", "agent_id": "e2e", "session_id": sid, "instruction_type": "t", "payload": 2}), None, t)
        .await
        .unwrap();
    let acked = reply_result(&r).unwrap()["instruction_id"].as_str().unwrap().to_string();
    let r = client
        .request(&json!({"type": "instruction.ack", "agent_id": "e2e", "session_id": sid, "instruction_id": acked, "status": "processed"}), None, t)
        .await
        .unwrap();
    assert_eq!(reply_result(&r).unwrap()["accepted"], true);

    let mut want = vec![
        ("agent.session.created", String::new()),
        ("agent.connection.opened", String::new()),
        ("agent.instruction.created", expiring.clone()),
        ("agent.instruction.acknowledged", acked.clone()),
        ("agent.instruction.retry", expiring.clone()),
        ("agent.instruction.expired", expiring.clone()),
    ];
    let deadline = Instant::now() + Duration::from_secs(30);
    while !want.is_empty() && Instant::now() < deadline {
        if let Some(e) = events.next(Duration::from_millis(500)).await {
            let v = serde_json::to_value(&e).unwrap();
            want.retain(|(ty, id)| !(v["event_type"] == *ty && (id.is_empty() || v["instruction_id"] == id.as_str())));
        }
    }
    assert!(want.is_empty(), "events never seen: {want:?}");

    let (status, metrics) = http_get(port, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    for name in [
        "acm_messages_consumed_total",
        "acm_heartbeat_batch_size",
        "acm_db_transaction_seconds",
        "acm_sweeper_changes_total",
        "acm_sweeper_task_seconds",
        "acm_sweeper_brake_holds_total",
        "acm_events_published_total",
        "acm_publish_confirm_seconds",
        "acm_outbox_backlog",
        "acm_outbox_oldest_age_seconds",
        "acm_db_pool_size",
        "acm_db_pool_available",
        "acm_db_pool_waiting",
        "acm_active_connections",
        "acm_pending_instructions",
        "acm_sent_instructions",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics:\n{metrics}");
    }
    assert!(metrics.contains(r#"acm_messages_consumed_total{type="session.create",outcome="ok"}"#), "{metrics}");
    assert!(metrics.contains("acm_active_sessions 1"), "{metrics}");

    let out = cli(&["stats"]);
    assert!(out.status.success());
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stats["active_sessions"], 1);
    assert_eq!(stats["active_connections"], 1);

    let out = cli(&["session", "create", "--agent-id", "cli-agent", "--parameters", r#"{"kv": 300}"#]);
    assert!(out.status.success());
    let cli_sid = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(cli(&["session", "close", &cli_sid]).status.success());
    assert_eq!(cli(&["session", "close", "no-such-session"]).status.code(), Some(1));
    let out = cli(&["sweep", "--once"]);
    assert!(out.status.success());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report.get("stale_connections").is_some(), "{report}");

    // stats --watch refreshes until stopped (not a terminal: one JSON line per refresh).
    let mut w = Command::new(BIN);
    env(&mut w);
    let mut watch = w.args(["stats", "--watch", "1"]).stdout(Stdio::piped()).spawn().unwrap();
    let mut stdout = watch.stdout.take().unwrap();
    let lines = tokio::task::spawn_blocking(move || {
        use std::io::{BufRead, BufReader};
        BufReader::new(&mut stdout).lines().take(2).collect::<std::io::Result<Vec<String>>>()
    });
    let lines = tokio::time::timeout(Duration::from_secs(15), lines).await.expect("two refreshes within 15 s");
    let _ = watch.kill();
    let _ = watch.wait();
    for l in lines.unwrap().unwrap() {
        let v: serde_json::Value = serde_json::from_str(&l).unwrap();
        assert!(v["timestamp"].is_string(), "{l}");
    }

    // simulate: a small fleet against this worker, a summary line a second, its sessions closed at the end, and last
    // one JSON object counting its own fleet's events only (this test's own session above is not among them).
    let out = cli(&[
        "simulate",
        "--agents",
        "3",
        "--duration",
        "3",
        "--heartbeat-interval",
        "0.5",
        "--instruction-interval",
        "0.5",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "simulate failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.lines().filter(|l| l.starts_with("t=")).count() >= 2, "live summary lines: {text}");
    let summary: serde_json::Value =
        serde_json::from_str(text.lines().last().unwrap_or_default()).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(summary["events"]["agent.session.created"], 3, "{summary}");
    assert_eq!(summary["events"]["agent.session.closed"], 3, "the fleet is ended: {summary}");
    assert_eq!(summary["connections_closed_by_reason"]["session_closed"], 3, "{summary}");

    // SIGTERM: graceful, exit 0, within a few seconds.
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the worker did not exit within 15 s of SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status {status:?}");
    let mut log = String::new();
    use std::io::Read;
    child.stderr.take().unwrap().read_to_string(&mut log).unwrap();
    assert!(log.contains("shutdown requested"), "{log}");
    assert!(!log.contains("guest:guest"), "a secret reached the log");
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_is_layered_validated_and_redacted() {
    let dir = std::env::temp_dir().join(format!("acm-config-{}", common::random_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("extra.toml");
    std::fs::write(&file, "[amqp]\nprefix = \"from-file\"\nurl = \"amqp://user:s3cret@broker:5672/%2f\"\n").unwrap();
    let out = Command::new(BIN)
        .args(["--config", file.to_str().unwrap(), "config"])
        .env_remove("ACM_AMQP__PREFIX")
        .env("ACM_SWEEPER__CHECK_INTERVAL_SECS", "7")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("prefix = \"from-file\""), "{text}");
    assert!(text.contains("check_interval_secs = 7"), "the environment wins: {text}");
    assert!(!text.contains("s3cret"), "a secret was printed: {text}");
    assert!(text.contains("user:***@broker"), "{text}");

    let out = Command::new(BIN).arg("config").env("ACM_DATABASE__POOL_SIZE", "lots").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.contains("database.pool_size"), "{err}");
    assert!(!err.contains("panicked"));

    let out = Command::new(BIN).args(["--config", "/nonexistent.toml", "config"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_reports_a_missing_broker_and_logs_are_json() {
    let settings = test_settings();
    let _guard = common::CleanupGuard::new(&settings);
    let (port, dead_broker) = (free_port(), free_port());
    let mut child = Command::new(BIN)
        .arg("run")
        .env("ACM_DATABASE__URL", &settings.database.url)
        .env("ACM_AMQP__URL", format!("amqp://guest:guest@127.0.0.1:{dead_broker}/%2f"))
        .env("ACM_AMQP__PREFIX", &settings.amqp.prefix)
        .env("ACM_HTTP__LISTEN", format!("127.0.0.1:{port}"))
        .env("ACM_LOG__FORMAT", "json")
        .env_remove("ACM_CONFIG")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (status, body) =
        eventually("/readyz to answer", Duration::from_secs(30), || async { http_get(port, "/readyz").await }).await;
    assert_eq!(status, 503, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(v["reason"].as_str().unwrap().contains("broker not connected"), "{v}");
    assert_eq!(v["checks"]["database"], true);
    assert_eq!(http_get(port, "/healthz").await.map(|r| r.0), Some(200), "alive while not ready");
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(15);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "no exit within 15 s of SIGTERM while the broker is down");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut log = String::new();
    use std::io::Read;
    child.stderr.take().unwrap().read_to_string(&mut log).unwrap();
    let lines: Vec<serde_json::Value> =
        log.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect();
    assert!(!lines.is_empty());
    assert!(lines.iter().all(|l| l["level"].is_string() && l["message"].is_string()), "{log}");
    // A broker never reached is said to be so (not a session that ended), with its address and the cause.
    let place = format!("broker at 127.0.0.1:{dead_broker} (vhost /, user guest)");
    assert!(
        lines.iter().any(|l| l["message"] == "broker never reached; retrying"
            && l["attempt"].is_number()
            && l["error"].as_str().is_some_and(|e| e.contains(&place) && e.contains("Connection refused"))),
        "connect attempts are logged with their number, the broker's address and the cause: {log}"
    );
    assert!(!log.contains("broker session ended"), "no session was ever made: {log}");
    assert!(!log.contains("guest:guest"), "a secret reached the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_sessions_bound_statements_lock_waits_and_idle_transactions() {
    use agent_connection_manager::db;
    use tokio_postgres::error::SqlState;
    let mut settings = test_settings();
    settings.database.statement_timeout_secs = 1.try_into().unwrap();
    settings.database.lock_timeout_secs = 2.try_into().unwrap();
    settings.database.idle_in_transaction_timeout_secs = 3.try_into().unwrap();
    let _guard = common::CleanupGuard::new(&settings);
    db::migrate(&settings.database).await.unwrap();
    let pool = db::build_pool(&settings.database).unwrap();
    async fn show(c: &deadpool_postgres::Object, name: &str) -> String {
        c.query_one(&format!("SHOW {name}"), &[]).await.unwrap().get(0)
    }
    let c = pool.get().await.unwrap();
    assert_eq!(show(&c, "statement_timeout").await, "1s");
    assert_eq!(show(&c, "lock_timeout").await, "2s");
    assert_eq!(show(&c, "idle_in_transaction_session_timeout").await, "3s");
    // A statement longer than the limit is cancelled.
    let e = c.query_one("SELECT pg_sleep(2)", &[]).await.unwrap_err();
    assert_eq!(e.code(), Some(&SqlState::QUERY_CANCELED), "{e}");
    // A transaction left idle longer than its limit is ended by the server.
    let mut c2 = pool.get().await.unwrap();
    let tx = c2.transaction().await.unwrap();
    let pid: i32 = tx.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    common::eventually(
        "the server to end the transaction left idle past its 3 s limit",
        Duration::from_secs(15),
        || async {
            let left: i64 =
                c.query_one("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", &[&pid]).await.unwrap().get(0);
            (left == 0).then_some(())
        },
    )
    .await;
    assert!(tx.query_one("SELECT 1", &[]).await.is_err(), "an idle transaction outlived its limit");
    drop(tx);
    drop(c2);
    drop(c);
    // A limit the URL's own options set is kept; the others are still added.
    settings.database.url.push_str("?options=-c%20statement_timeout%3D7s");
    let pool = db::build_pool(&settings.database).unwrap();
    let c = pool.get().await.unwrap();
    assert_eq!(show(&c, "statement_timeout").await, "7s");
    assert_eq!(show(&c, "lock_timeout").await, "2s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_and_config_change_nothing_in_a_database_without_the_schema() {
    let settings = test_settings();
    agent_connection_manager::db::ensure_database(&settings.database).await.unwrap();
    let cli = |command: &str| {
        Command::new(BIN)
            .arg(command)
            .env("ACM_DATABASE__URL", &settings.database.url)
            .env("ACM_AMQP__PREFIX", &settings.amqp.prefix)
            .output()
            .unwrap()
    };
    let config = cli("config");
    assert!(config.status.success(), "config: {}", String::from_utf8_lossy(&config.stderr));
    let stats = cli("stats");
    assert!(!stats.status.success(), "stats succeeded on a database without the schema");
    let err = String::from_utf8_lossy(&stats.stderr);
    assert!(!err.trim().is_empty() && !err.contains("panicked"), "stats should say why it failed: {err}");
    let (db, conn) = tokio_postgres::connect(&settings.database.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let tables: i64 = db
        .query_one("SELECT count(*) FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(tables, 0, "a read-only command created tables (migrated)");
    drop(db);
    common::cleanup(&settings).await;
}
