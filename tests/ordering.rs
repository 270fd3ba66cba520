//! Order per object: commands on the same connection are applied in the order the worker received them, and a
//! connection a heartbeat opened first is completed, not ignored, by its `connection.open`.

mod common;

use std::time::Duration;

use common::TestApp;
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
