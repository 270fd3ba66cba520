//! Session activity: what moves a session's `last_activity_at` (agent activity, at most once per
//! `worker.session_activity_granularity_secs`) and what wakes an inactive session.

mod common;

use common::TestApp;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inactive_sessions_accept_commands_and_wake_up() {
    let app = TestApp::start().await;
    let sid = app.session("a1").await;
    app.db
        .execute(
            "UPDATE agent_session SET last_activity_at = now() - interval '2 hours' WHERE session_id = $1",
            &[&sid],
        )
        .await
        .unwrap();
    assert_eq!(app.sweep().await.inactive_sessions, 1);
    let i = app
        .ok(json!({"type": "instruction.create", "agent_id": "a1", "session_id": sid, "instruction_type": "t", "payload": 1}))
        .await;
    let status: String =
        app.scalar(&format!("SELECT status::text FROM agent_session WHERE session_id = '{sid}'")).await;
    assert_eq!(status, "inactive", "a backend command is not agent activity");
    app.ok(json!({"type": "instruction.ack", "instruction_id": i["instruction_id"], "agent_id": "a1", "session_id": sid, "status": "received"}))
        .await;
    let status: String =
        app.scalar(&format!("SELECT status::text FROM agent_session WHERE session_id = '{sid}'")).await;
    assert_eq!(status, "active", "an ack is agent activity");
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_moves_session_activity_only_when_older_than_the_granularity() {
    let app = TestApp::start().await;
    let sid = app.session("a1").await;
    let version_sql = format!("SELECT xmin::text FROM agent_session WHERE session_id = '{sid}'");
    let ack = |i: &serde_json::Value| {
        json!({"type": "instruction.ack", "instruction_id": i["instruction_id"], "agent_id": "a1",
               "session_id": sid, "status": "received"})
    };
    let create = json!({"type": "instruction.create", "agent_id": "a1", "session_id": sid, "instruction_type": "t",
                        "payload": 1});
    // Heard from 30 s ago, within the default granularity (60 s): the ack leaves the session row alone.
    app.set_session_activity_ago(&sid, "30 seconds").await;
    let i = app.ok(create.clone()).await;
    let before: String = app.scalar(&version_sql).await;
    app.ok(ack(&i)).await;
    let kept = app.session_activity_age_secs(&sid).await;
    assert!((29.0..40.0).contains(&kept), "activity within the granularity was rewritten: now {kept} s old");
    assert_eq!(app.scalar::<String>(&version_sql).await, before, "the session row got a new version");
    // Heard from 2 minutes ago: the ack moves the activity to now.
    app.set_session_activity_ago(&sid, "2 minutes").await;
    let i = app.ok(create).await;
    app.ok(ack(&i)).await;
    let moved = app.session_activity_age_secs(&sid).await;
    assert!(moved < 10.0, "activity older than the granularity was not moved forward: {moved} s old");
    app.cleanup().await;
}
