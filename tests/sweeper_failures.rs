//! One failing sweeper task costs one task: it is logged, counted and reported, the other tasks run, and the next
//! cycle tries it again.

mod common;

use common::TestApp;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_task_is_reported_and_counted_while_the_others_run() {
    let app = TestApp::unstarted_with(|_| {}).await;
    let sid = app.manager.create_session("a1", None, None, None, None).await.unwrap();
    app.db
        .batch_execute(&format!(
            "INSERT INTO agent_connection (connection_id, session_id, agent_id, connection_type, last_heartbeat_at)
               VALUES ('quiet', '{sid}', 'a1', 'amqp', now() - interval '1 hour');
             INSERT INTO agent_instruction (instruction_id, session_id, agent_id, instruction_type, payload, expires_at, max_retries)
               VALUES (gen_random_uuid(), '{sid}', 'a1', 't', '1', now() - interval '1 minute', 0);
             CREATE FUNCTION refuse_stale_close() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN RAISE EXCEPTION 'the test refuses stale closes'; END $$;
             CREATE TRIGGER refuse_stale_close BEFORE UPDATE ON agent_connection FOR EACH ROW
               WHEN (NEW.close_reason = 'stale_connection') EXECUTE FUNCTION refuse_stale_close();"
        ))
        .await
        .unwrap();
    let report = app.sweep().await;
    assert_eq!(report.failed_tasks.len(), 1, "{report:?}");
    assert_eq!(report.failed_tasks[0].0, "stale_connections");
    assert!(report.failed_tasks[0].1.contains("the test refuses stale closes"), "{report:?}");
    assert_eq!(report.stale_connections, 0);
    assert_eq!(report.instructions_expired, 1, "instruction expiry ran after the stale task failed");
    let encoded = {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &app.manager.metrics().registry).unwrap();
        out
    };
    assert!(
        encoded.lines().any(|l| l.starts_with("acm_sweeper_task_failures_total{name=\"stale_connections\"} 1")),
        "the failure is counted: {encoded}"
    );
    // Once the cause is gone, the next cycle does the task.
    app.db.batch_execute("DROP TRIGGER refuse_stale_close ON agent_connection").await.unwrap();
    let report = app.sweep().await;
    assert!(report.failed_tasks.is_empty(), "{report:?}");
    assert_eq!(report.stale_connections, 1);
    app.cleanup().await;
}
