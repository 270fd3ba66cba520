//! Order per object: commands on the same connection are applied in the order the worker received them, a command
//! held up holds up only its own object's, and a connection a heartbeat opened first is completed, not ignored, by
//! its `connection.open`.

mod common;

use std::time::Duration;

use agent_connection_manager::db;
use common::TestApp;
use futures_util::future::join_all;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_published_right_after_its_open_is_applied_after_it() {
    let mut app = TestApp::start().await;
    let sid = app.session("a1").await;
    let n = 60;
    // All opens of one session: ordered by session, they would share a lane while the closes spread over the others.
    for i in 0..n {
        let c = format!("c{i}");
        app.client
            .send(&json!({"type": "connection.open", "agent_id": "a1", "session_id": sid, "connection_id": c}), None)
            .await
            .unwrap();
        app.client
            .send(&json!({"type": "connection.close", "agent_id": "a1", "connection_id": c}), None)
            .await
            .unwrap();
    }
    common::eventually("all opened", Duration::from_secs(30), || async {
        (app.scalar::<i64>("SELECT count(*) FROM agent_connection").await == n).then_some(())
    })
    .await;
    let what = "every connection closed (a close that overtook its open found nothing and left it active)";
    common::eventually(what, Duration::from_secs(20), || async {
        let closed: i64 = app.scalar("SELECT count(*) FROM agent_connection WHERE status = 'closed'").await;
        (closed == n).then_some(())
    })
    .await;
    let active: i64 = app.scalar("SELECT count(*) FROM agent_connection WHERE status = 'active'").await;
    assert_eq!(active, 0, "a close overtook its open");
    let closed_events = app.published(|e| e["event_type"] == "agent.connection.closed").await;
    assert_eq!(closed_events, n);
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_before_the_open_is_completed_by_the_open() {
    let mut app = TestApp::start().await;
    let sid = app.session("a1").await;
    app.client.heartbeat("a1", &sid, "early").await.unwrap();
    common::eventually("the heartbeat to open the connection", Duration::from_secs(20), || async {
        (app.scalar::<i64>("SELECT count(*) FROM agent_connection WHERE connection_id = 'early'").await == 1)
            .then_some(())
    })
    .await;
    let r = app
        .ok(json!({"type": "connection.open", "agent_id": "a1", "session_id": sid, "connection_id": "early",
                   "connection_type": "websocket", "client_info": {"version": "2.1"}}))
        .await;
    assert_eq!(r["connection_id"], "early");
    let row = app
        .db
        .query_one(
            "SELECT connection_type, client_info->>'version', opened_by_heartbeat, status::text \
             FROM agent_connection WHERE connection_id = 'early'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "websocket");
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("2.1"));
    assert!(!row.get::<_, bool>(2), "completed");
    assert_eq!(row.get::<_, String>(3), "active");
    // The same open again, and a later one with other values: idempotent, nothing more recorded.
    app.ok(json!({"type": "connection.open", "agent_id": "a1", "session_id": sid, "connection_id": "early",
                  "connection_type": "websocket", "client_info": {"version": "2.1"}}))
        .await;
    app.ok(json!({"type": "connection.open", "agent_id": "a1", "session_id": sid, "connection_id": "early",
                  "connection_type": "grpc"}))
        .await;
    let ctype: String = app.scalar("SELECT connection_type FROM agent_connection WHERE connection_id = 'early'").await;
    assert_eq!(ctype, "websocket", "only the first open completes");
    let opened = app.published(|e| e["event_type"] == "agent.connection.opened" && e["connection_id"] == "early").await;
    assert_eq!(opened, 1, "one agent.connection.opened per connection");
    // Another agent cannot complete it.
    assert_eq!(
        app.refused(json!({"type": "connection.open", "agent_id": "a2", "session_id": sid, "connection_id": "early"}))
            .await,
        "forbidden"
    );
    app.cleanup().await;
}

/// With two places for commands, one command held up by a lock on its session (held here by the test) holds up
/// neither place's other commands: instructions for ten other sessions are all created meanwhile. (Lanes chosen by a
/// hash of the object would have queued about half of them behind it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_held_up_holds_up_only_its_own_objects_commands() {
    let app = TestApp::start_with(|s| s.worker.command_lanes = 2.try_into().unwrap()).await;
    let held = app.session("a0").await;
    let mut others = Vec::new();
    for i in 1..=10 {
        others.push((format!("a{i}"), app.session(&format!("a{i}")).await));
    }
    let mut locker = db::connect(&app.settings.database, None).await.unwrap();
    let lock = locker.transaction().await.unwrap();
    lock.execute("SELECT 1 FROM agent_session WHERE session_id = $1 FOR UPDATE", &[&held]).await.unwrap();
    let held_instruction = "00000000-0000-4000-8000-000000000001";
    let count_held = format!("SELECT count(*) FROM agent_instruction WHERE instruction_id = '{held_instruction}'");
    app.client
        .send(
            &json!({"type": "instruction.create", "agent_id": "a0", "session_id": held,
                    "instruction_id": held_instruction, "instruction_type": "t", "payload": {}}),
            None,
        )
        .await
        .unwrap();
    common::eventually("the instruction.create to wait for the session's lock", Duration::from_secs(20), || async {
        let waiting: i64 = app
            .scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%agent_session%'",
            )
            .await;
        (waiting == 1).then_some(())
    })
    .await;
    let creates = others.iter().map(|(agent, sid)| {
        app.ok(json!({"type": "instruction.create", "agent_id": agent, "session_id": sid,
                      "instruction_type": "t", "payload": {}}))
    });
    let created = join_all(creates).await;
    let ids: std::collections::HashSet<&str> = created.iter().filter_map(|r| r["instruction_id"].as_str()).collect();
    assert_eq!(ids.len(), 10, "ten instructions created while one session was locked: {created:?}");
    let held_applied: i64 = app.scalar(&count_held).await;
    assert_eq!(held_applied, 0, "the held command was applied while its session was locked");
    lock.commit().await.unwrap();
    common::eventually(
        "the held instruction.create to be applied once the lock is gone",
        Duration::from_secs(20),
        || async {
            let n: i64 = app.scalar(&count_held).await;
            (n == 1).then_some(())
        },
    )
    .await;
    app.cleanup().await;
}
