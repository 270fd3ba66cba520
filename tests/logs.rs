//! Agents' log lines: `agent.log` ingest through the worker, the owner check, a bad entry costing only itself,
//! `logs.get` paging, level filter and limit bounds, and the daily partitions (created ahead, dropped by retention).

mod common;

use std::time::Duration;

use agent_connection_manager::commands::log::{apply_batch, AgentLog};
use agent_connection_manager::error::{CommandError, Error};
use agent_connection_manager::sweeper::log_partitions;
use common::{eventually, TestApp};
use serde_json::{json, Value};

fn entry(i: usize, level: &str) -> Value {
    json!({"timestamp": "2026-01-02T03:04:05Z", "level": level, "logger_name": "agent.main", "message": format!("line {i}")})
}

fn msg(agent: &str, session: &str, logs: Vec<Value>) -> AgentLog {
    serde_json::from_value(json!({"agent_id": agent, "session_id": session, "logs": logs})).expect("a message")
}

async fn count(app: &TestApp, session: &str) -> i64 {
    let row = app.db.query_one("SELECT count(*) FROM agent_log WHERE session_id = $1", &[&session]).await.unwrap();
    row.get(0)
}

async fn wait_for_lines(app: &TestApp, session: &str, n: i64) {
    eventually(&format!("{n} lines stored for {session}"), Duration::from_secs(20), || async {
        (count(app, session).await == n).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_posted_by_an_agent_are_read_back_oldest_first() {
    let app = TestApp::start().await;
    let sid = app.session("a1").await;
    let lines = vec![entry(0, "INFO"), entry(1, "warning"), entry(2, "ERROR")];
    app.client.log("a1", &sid, &lines).await.unwrap();
    wait_for_lines(&app, &sid, 3).await;
    let r = app.ok(json!({"type": "logs.get", "session_id": sid})).await;
    let logs = r["logs"].as_array().expect("logs");
    assert_eq!(logs.len(), 3);
    let messages: Vec<&str> = logs.iter().map(|l| l["message"].as_str().unwrap()).collect();
    assert_eq!(messages, ["line 0", "line 1", "line 2"]);
    assert_eq!(logs[1]["level"], "WARNING", "levels are read in any case and returned in capitals");
    assert_eq!(logs[0]["agent_id"], "a1");
    assert_eq!(logs[0]["session_id"], sid.as_str());
    assert_eq!(logs[0]["logger_name"], "agent.main");
    assert_eq!(logs[0]["timestamp"], "2026-01-02T03:04:05Z");
    assert!(logs[0]["id"].as_i64() < logs[1]["id"].as_i64() && logs[1]["id"].as_i64() < logs[2]["id"].as_i64());
    // The Rust client reads the same lines.
    let read = app.client.get_logs(&json!({"agent_id": "a1"}), Duration::from_secs(20)).await.unwrap();
    assert_eq!(read.len(), 3);
    assert_eq!(read[2].message, "line 2");
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_in_a_row_are_stored_in_order_once_and_all_acknowledged() {
    // Small batches, so that many follow each other: the next is parsed while the one before commits.
    let app = TestApp::start_with(|s| s.logs.batch_messages = 3).await;
    let sid = app.session("a1").await;
    let (messages, per) = (60, 5);
    for m in 0..messages {
        let lines: Vec<Value> = (0..per).map(|i| entry(m * per + i, "INFO")).collect();
        app.client.log("a1", &sid, &lines).await.unwrap();
    }
    let want = (messages * per) as i64;
    wait_for_lines(&app, &sid, want).await;
    let stored: Vec<String> =
        app.column(&format!("SELECT message FROM agent_log WHERE session_id = '{sid}' ORDER BY id")).await;
    let sent: Vec<String> = (0..messages * per).map(|i| format!("line {i}")).collect();
    assert_eq!(stored, sent, "every line once, in the order sent (ids increasing with it)");
    // Every delivery was acknowledged: once the worker stops, nothing comes back to the queue.
    app.manager.stop().await.unwrap();
    let (_c, ch) = common::amqp_channel(&app.settings).await;
    let (ready, _) = common::queue_counts(&ch, &app.topology().log_queue).await;
    assert_eq!(ready, 0, "deliveries left unacknowledged after their lines were stored");
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_for_another_agents_or_an_unknown_session_are_not_stored() {
    let app = TestApp::start().await;
    let sid = app.session("a1").await;
    app.client.log("a2", &sid, &[entry(0, "INFO")]).await.unwrap();
    app.client.log("a1", "no-such-session", &[entry(1, "INFO")]).await.unwrap();
    app.client.log("a1", &sid, &[entry(2, "INFO")]).await.unwrap();
    // The queue is consumed in order: once the last message is stored, the two before it were applied.
    wait_for_lines(&app, &sid, 1).await;
    assert_eq!(app.scalar::<i64>("SELECT count(*) FROM agent_log").await, 1, "only a1's line for its own session");
    let line: String = app.scalar("SELECT message FROM agent_log").await;
    assert_eq!(line, "line 2");
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_require_user_id_a_line_without_the_agents_user_id_is_dead_lettered() {
    let app = TestApp::start_with(|s| s.security.require_user_id = true).await;
    // RabbitMQ validates user_id against the connection's user: guest.
    let sid = app.session("guest").await;
    app.client.log("guest", &sid, &[entry(0, "INFO")]).await.unwrap();
    let dead = common::dead_letters(&app.settings, 1).await;
    assert!(String::from_utf8_lossy(&dead[0].1).contains("agent.log"), "the line without user_id is dead-lettered");
    let client = agent_connection_manager::client::Client::connect(&app.settings.amqp.url, &app.settings.amqp.prefix)
        .await
        .unwrap()
        .with_user_id("guest");
    client.log("guest", &sid, &[entry(1, "INFO")]).await.unwrap();
    wait_for_lines(&app, &sid, 1).await;
    client.close().await;
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_entry_costs_only_itself_and_a_poison_message_only_itself() {
    let app = TestApp::unstarted_with(|_| {}).await;
    let sid = app.manager.create_session("a1", None, None, None, None).await.unwrap();
    let mut lines: Vec<Value> = (0..100).map(|i| entry(i, "INFO")).collect();
    lines[50]["level"] = json!("LOUD");
    // No partition exists yet (no sweep ran): ingest creates the day's.
    let report = apply_batch(app.manager.pool(), &[msg("a1", &sid, lines)]).await.unwrap();
    assert_eq!((report.stored, report.invalid_entries, report.rejected), (99, 1, 0));
    assert_eq!(count(&app, &sid).await, 99);
    let missing: i64 = app.scalar("SELECT count(*) FROM agent_log WHERE message = 'line 50'").await;
    assert_eq!(missing, 0, "the bad entry is left out");

    // Through the worker: a message of 501 entries is poison and dead-lettered; the next message is stored.
    let too_many: Vec<Value> = (0..501).map(|i| entry(i, "INFO")).collect();
    app.client.log("a1", &sid, &too_many).await.unwrap();
    app.client.log("a1", &sid, &[entry(1000, "INFO")]).await.unwrap();
    app.manager.start().await.unwrap();
    wait_for_lines(&app, &sid, 100).await;
    let dead = common::dead_letters(&app.settings, 1).await;
    assert!(String::from_utf8_lossy(&dead[0].1).contains("\"line 500\""), "the 501-entry message is dead-lettered");
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn since_id_pages_forward_the_level_filters_and_the_limit_is_bounded() {
    let app = TestApp::unstarted_with(|_| {}).await;
    let m = &app.manager;
    let sid = m.create_session("a1", None, None, None, None).await.unwrap();
    let levels = ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"];
    let lines: Vec<Value> = (0..250).map(|i| entry(i, levels[i % 5])).collect();
    apply_batch(m.pool(), &[msg("a1", &sid, lines)]).await.unwrap();

    let mut seen = Vec::new();
    let mut since = Some(0);
    loop {
        let page = m.get_logs(None, Some(&sid), since, Some(100), None).await.unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 100);
        since = Some(page.last().unwrap().id);
        seen.extend(page.into_iter().map(|l| l.message));
    }
    let expected: Vec<String> = (0..250).map(|i| format!("line {i}")).collect();
    assert_eq!(seen, expected, "paging with since_id reads every line once, in order");

    let newest = m.get_logs(Some("a1"), None, None, Some(10), None).await.unwrap();
    let newest: Vec<&str> = newest.iter().map(|l| l.message.as_str()).collect();
    assert_eq!(newest, (240..250).map(|i| format!("line {i}")).collect::<Vec<_>>(), "without since_id: the newest");

    let errors = m.get_logs(None, Some(&sid), Some(0), Some(1000), Some("error")).await.unwrap();
    assert_eq!(errors.len(), 100, "ERROR and CRITICAL lines: 2 of every 5");
    assert!(errors.iter().all(|l| l.level >= agent_connection_manager::commands::log::LogLevel::Error));

    for limit in [0, 1001] {
        let e = m.get_logs(None, Some(&sid), None, Some(limit), None).await.unwrap_err();
        assert!(matches!(e, Error::Command(CommandError::Invalid(_))), "limit {limit}: {e}");
    }
    let e = m.get_logs(None, None, None, None, None).await.unwrap_err();
    assert!(matches!(e, Error::Command(CommandError::Invalid(_))), "no agent nor session: {e}");
    app.manager.start().await.unwrap();
    assert_eq!(app.refused(json!({"type": "logs.get", "session_id": sid, "limit": 1001})).await, "invalid");
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_are_created_ahead_and_dropped_after_the_retention() {
    let app = TestApp::unstarted_with(|s| s.logs.retention_days = 3).await;
    let names = "SELECT coalesce(array_agg(c.relname::text ORDER BY c.relname), '{}') FROM pg_inherits i \
                 JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'agent_log'::regclass";
    let day =
        |ago: i32| format!("SELECT 'agent_log_' || to_char((now() AT TIME ZONE 'UTC')::date - {ago}, 'YYYYMMDD')");
    assert!(app.scalar::<Vec<String>>(names).await.is_empty(), "no partition before the first sweep");
    let r = app.sweep().await;
    assert_eq!(r.log_partitions.created, 3, "today and the 2 days ahead");
    let expected: Vec<String> = vec![app.scalar(&day(0)).await, app.scalar(&day(-1)).await, app.scalar(&day(-2)).await];
    assert_eq!(app.scalar::<Vec<String>>(names).await, expected);
    assert_eq!(app.sweep().await.log_partitions, Default::default(), "nothing more to do");

    // A day 5 days ago with a line in it (past the 3-day retention), and one 2 days ago (within it).
    let sid = app.manager.create_session("a1", None, None, None, None).await.unwrap();
    for ago in [5, 2] {
        app.db
            .batch_execute(&format!(
                "DO $$ DECLARE d date := (now() AT TIME ZONE 'UTC')::date - {ago}; BEGIN \
                 EXECUTE format('CREATE TABLE agent_log_%s PARTITION OF agent_log FOR VALUES FROM (%L) TO (%L)', \
                   to_char(d, 'YYYYMMDD'), d::text || ' 00:00+00', (d + 1)::text || ' 00:00+00'); END $$; \
                 INSERT INTO agent_log (received_at, agent_id, session_id, logged_at, level, logger_name, message) \
                 VALUES (now() - interval '{ago} days', 'a1', '{sid}', now(), 20, 'old', 'from {ago} days ago')"
            ))
            .await
            .unwrap();
    }
    let r = app.sweep().await;
    assert_eq!((r.log_partitions.created, r.log_partitions.dropped), (0, 1));
    let left: Vec<String> = app.scalar(names).await;
    assert!(!left.contains(&app.scalar::<String>(&day(5)).await), "the day past the retention is dropped");
    assert!(left.contains(&app.scalar::<String>(&day(2)).await), "the day within it is kept");
    let gone = format!("SELECT to_regclass(({}))::text", day(5));
    assert_eq!(app.scalar::<Option<String>>(&gone).await, None, "the dropped day's table is gone, not only detached");
    let lines = app.manager.get_logs(None, Some(&sid), Some(0), None, None).await.unwrap();
    let lines: Vec<&str> = lines.iter().map(|l| l.message.as_str()).collect();
    assert_eq!(lines, ["from 2 days ago"]);

    // A run that stopped between detaching and dropping left a table marked as the task's own (6 days ago): the next
    // run drops it. A day an operator detached to keep (7 days ago, no mark) is left alone.
    for (ago, mark) in [(6, log_partitions::DETACHED), (7, "kept by an operator")] {
        app.db
            .batch_execute(&format!(
                "DO $$ DECLARE d date := (now() AT TIME ZONE 'UTC')::date - {ago}; n text := 'agent_log_' || \
                 to_char(d, 'YYYYMMDD'); BEGIN \
                 EXECUTE format('CREATE TABLE %I PARTITION OF agent_log FOR VALUES FROM (%L) TO (%L)', \
                   n, d::text || ' 00:00+00', (d + 1)::text || ' 00:00+00'); \
                 EXECUTE format('ALTER TABLE agent_log DETACH PARTITION %I', n); \
                 EXECUTE format('COMMENT ON TABLE %I IS %L', n, '{mark}'); END $$"
            ))
            .await
            .unwrap();
    }
    let r = app.sweep().await;
    assert_eq!((r.log_partitions.created, r.log_partitions.dropped), (0, 1), "the left-over table dropped");
    let exists = |ago: i32| format!("SELECT to_regclass(({})) IS NOT NULL", day(ago));
    assert!(!app.scalar::<bool>(&exists(6)).await, "the task's left-over table is dropped");
    assert!(app.scalar::<bool>(&exists(7)).await, "the operator's table is kept");
    assert_eq!(app.sweep().await.log_partitions, Default::default(), "nothing more to do");
    app.cleanup().await;
}
