//! Per-agent limits (`limits.*`): commands beyond them are refused with `limit` (nothing created), heartbeats that
//! would open or restore a connection beyond them open nothing and are dead-lettered with `limit: …`; refusals are
//! counted per limit; a command that creates nothing new (its id again), and other agents, are not affected.

mod common;

use std::time::Duration;

use common::{dead_letters, eventually, TestApp};
use serde_json::json;

/// `acm_limit_refusals_total{name=…}`, 0 when not yet counted.
fn refusals(app: &TestApp, name: &str) -> u64 {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &app.manager.metrics().registry).unwrap();
    let prefix = format!("acm_limit_refusals_total{{name=\"{name}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_connections_and_instructions_beyond_the_limits_are_refused_with_limit() {
    let app = TestApp::start_with(|s| {
        s.limits.max_sessions_per_agent = 2;
        s.limits.max_connections_per_agent = 2;
        s.limits.max_pending_instructions_per_agent = 2;
    })
    .await;
    // Sessions: two open, the third refused; the same id again is not a new session; another agent has its own.
    let s1 = app.ok(json!({"type": "session.create", "agent_id": "a1", "session_id": "s1"})).await;
    assert_eq!(s1["session_id"], "s1");
    app.ok(json!({"type": "session.create", "agent_id": "a1", "session_id": "s2"})).await;
    assert_eq!(app.refused(json!({"type": "session.create", "agent_id": "a1", "session_id": "s3"})).await, "limit");
    app.ok(json!({"type": "session.create", "agent_id": "a1", "session_id": "s1"})).await;
    app.ok(json!({"type": "session.create", "agent_id": "a2", "session_id": "t1"})).await;
    assert_eq!(app.scalar::<i64>("SELECT count(*) FROM agent_session WHERE session_id = 's3'").await, 0);
    // An ended session no longer counts.
    app.ok(json!({"type": "session.close", "session_id": "s2"})).await;
    app.ok(json!({"type": "session.create", "agent_id": "a1", "session_id": "s3"})).await;

    // Connections.
    for c in ["c1", "c2"] {
        app.ok(json!({"type": "connection.open", "agent_id": "a1", "session_id": "s1", "connection_id": c})).await;
    }
    let open3 = json!({"type": "connection.open", "agent_id": "a1", "session_id": "s1", "connection_id": "c3"});
    assert_eq!(app.refused(open3.clone()).await, "limit");
    app.ok(json!({"type": "connection.open", "agent_id": "a1", "session_id": "s1", "connection_id": "c1"})).await;
    app.ok(json!({"type": "connection.close", "agent_id": "a1", "connection_id": "c2"})).await;
    app.ok(open3).await;

    // Instructions: open ones count, an acknowledged one does not.
    let create = |id: u32| {
        json!({"type": "instruction.create", "agent_id": "a1", "session_id": "s1", "instruction_type": "t",
               "payload": null, "instruction_id": format!("00000000-0000-4000-8000-{id:012}")})
    };
    app.ok(create(1)).await;
    app.ok(create(2)).await;
    assert_eq!(app.refused(create(3)).await, "limit");
    app.ok(create(2)).await;
    app.ok(json!({"type": "instruction.ack", "agent_id": "a1", "session_id": "s1",
                  "instruction_id": "00000000-0000-4000-8000-000000000001", "status": "processed"}))
        .await;
    app.ok(create(3)).await;
    assert_eq!(
        (refusals(&app, "sessions"), refusals(&app, "connections"), refusals(&app, "pending_instructions")),
        (1, 1, 1)
    );
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_beyond_the_connection_limit_open_nothing_and_are_dead_lettered() {
    let app = TestApp::start_with(|s| s.limits.max_connections_per_agent = 3).await;
    let sid = app.session("a1").await;
    let other = app.session("a2").await;
    // Ten unknown connections in one go: three are opened, seven refused.
    for i in 0..10 {
        app.client.heartbeat("a1", &sid, &format!("c{i}")).await.unwrap();
    }
    app.client.heartbeat("a2", &other, "theirs").await.unwrap();
    let letters = dead_letters(&app.settings, 7).await;
    assert!(letters.iter().all(|(why, _)| why.starts_with("limit: ")), "{letters:?}");
    eventually("the other agent's heartbeat to open its connection", Duration::from_secs(20), || async {
        (app.scalar::<i64>("SELECT count(*) FROM agent_connection WHERE agent_id = 'a2'").await == 1).then_some(())
    })
    .await;
    assert_eq!(app.scalar::<i64>("SELECT count(*) FROM agent_connection WHERE agent_id = 'a1'").await, 3);
    assert_eq!(refusals(&app, "connections"), 7);
    // A stale-closed connection is not restored beyond the limit either.
    app.db
        .batch_execute(
            "UPDATE agent_connection SET status = 'closed', close_reason = 'stale_connection', \
             closed_at = now() - interval '1 second' WHERE connection_id = (SELECT min(connection_id) \
             FROM agent_connection WHERE agent_id = 'a1')",
        )
        .await
        .unwrap();
    app.client.heartbeat("a1", &sid, "c-new").await.unwrap();
    eventually("a fourth connection to open in place of the closed one", Duration::from_secs(20), || async {
        (app.scalar::<i64>("SELECT count(*) FROM agent_connection WHERE connection_id = 'c-new'").await == 1)
            .then_some(())
    })
    .await;
    let closed: String =
        app.scalar("SELECT connection_id FROM agent_connection WHERE agent_id = 'a1' AND status = 'closed'").await;
    app.client.heartbeat("a1", &sid, &closed).await.unwrap();
    let letters = dead_letters(&app.settings, 1).await;
    assert!(letters[0].0.starts_with("limit: "), "{letters:?}");
    assert_eq!(
        app.scalar::<i64>("SELECT count(*) FROM agent_connection WHERE agent_id = 'a1' AND status = 'active'").await,
        3
    );
    app.cleanup().await;
}
