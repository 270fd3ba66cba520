//! Every command type against the real worker: effect in the database, reply, and events.

mod common;

use common::TestApp;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_create_replies_stores_and_announces() {
    let mut app = TestApp::start().await;
    let r = app
        .ok(json!({"type": "session.create", "agent_id": "a1", "acquisition_uuid": "acq-1", "description": "d",
                   "experimental_parameters": {"voltage": 300}}))
        .await;
    let sid = r["session_id"].as_str().unwrap().to_string();
    assert!(uuid::Uuid::parse_str(&sid).is_ok(), "generated session ids are UUIDs: {sid}");
    let row = app
        .db
        .query_one(
            "SELECT agent_id, status::text, name, acquisition_uuid, experimental_parameters->>'voltage', created_at \
             FROM agent_session WHERE session_id = $1",
            &[&sid],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "a1");
    assert_eq!(row.get::<_, String>(1), "active");
    let name: String = row.get(2);
    let created: chrono::DateTime<chrono::Utc> = row.get(5);
    assert_eq!(name, created.format("Session-%Y%m%d-%H%M%S").to_string(), "default name: its creation time in UTC");
    assert_eq!(row.get::<_, Option<String>>(3).as_deref(), Some("acq-1"));
    assert_eq!(row.get::<_, Option<String>>(4).as_deref(), Some("300"));
    let e = app.next_event("agent.session.created").await;
    assert_eq!(e["session_id"], sid.as_str());
    assert_eq!(e["agent_id"], "a1");
    assert_eq!(e["acquisition_uuid"], "acq-1");
    assert_eq!(e["name"], name.as_str());
    assert!(e["occurred_at"].as_str().unwrap().ends_with('Z'), "UTC: {}", e["occurred_at"]);

    // A client-chosen id is the idempotency key; another agent cannot take it.
    let r = app.ok(json!({"type": "session.create", "agent_id": "a1", "session_id": "s-fixed", "name": "n"})).await;
    assert_eq!(r["session_id"], "s-fixed");
    let r = app.ok(json!({"type": "session.create", "agent_id": "a1", "session_id": "s-fixed", "name": "n"})).await;
    assert_eq!(r["session_id"], "s-fixed");
    assert_eq!(
        app.refused(json!({"type": "session.create", "agent_id": "a2", "session_id": "s-fixed"})).await,
        "conflict"
    );
    let created = app.published(|e| e["event_type"] == "agent.session.created").await;
    assert_eq!(created, 2, "one event per session created, none for the repeat");
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_close_ends_closes_and_cancels() {
    let mut app = TestApp::start().await;
    let sid = app.session("a1").await;
    let c1 = app.ok(json!({"type": "connection.open", "agent_id": "a1", "session_id": sid})).await;
    let c1 = c1["connection_id"].as_str().unwrap().to_string();
    let i1 = app
        .ok(json!({"type": "instruction.create", "agent_id": "a1", "session_id": sid, "instruction_type": "t", "payload": {}}))
        .await;
    let i1 = i1["instruction_id"].as_str().unwrap().to_string();
    let i2 = app
        .ok(json!({"type": "instruction.create", "agent_id": "a1", "session_id": sid, "instruction_type": "t", "payload": 2}))
        .await;
    app.ok(json!({"type": "instruction.sent", "instruction_id": i2["instruction_id"]})).await;

    let r = app.ok(json!({"type": "session.close", "session_id": sid})).await;
    assert_eq!(r["closed"], true);
    let status: String =
        app.scalar(&format!("SELECT status::text FROM agent_session WHERE session_id = '{sid}'")).await;
    assert_eq!(status, "ended");
    let ended: bool =
        app.scalar(&format!("SELECT ended_at IS NOT NULL FROM agent_session WHERE session_id = '{sid}'")).await;
    assert!(ended);
    let reason: String =
        app.scalar(&format!("SELECT close_reason::text FROM agent_connection WHERE connection_id = '{c1}'")).await;
    assert_eq!(reason, "session_closed");
    let cancelled: i64 = app.scalar("SELECT count(*) FROM agent_instruction WHERE status = 'cancelled'").await;
    assert_eq!(cancelled, 2, "pending and sent instructions are cancelled");

    let closed = app.next_event("agent.session.closed").await;
    assert_eq!(closed["closed_connections"], 1);
    assert_eq!(closed["cancelled_instructions"], 2);
    assert_eq!(closed["agent_id"], "a1");
    let closes = app
        .published(|e| e["event_type"] == "agent.connection.closed" || e["event_type"] == "agent.instruction.cancelled")
        .await;
    assert_eq!(closes, 3);
    let cancelled_ids: Vec<&str> = app
        .seen
        .iter()
        .filter(|e| e["event_type"] == "agent.instruction.cancelled")
        .filter_map(|e| e["instruction_id"].as_str())
        .collect();
    assert!(cancelled_ids.contains(&i1.as_str()));

    // Again: closed, no change; unknown: not closed.
    assert_eq!(app.ok(json!({"type": "session.close", "session_id": sid})).await["closed"], true);
    assert_eq!(app.ok(json!({"type": "session.close", "session_id": "nope"})).await["closed"], false);
    let n = app.published(|e| e["event_type"] == "agent.session.closed").await;
    assert_eq!(n, 1);
    // An ended session takes no new connection or instruction.
    assert_eq!(app.refused(json!({"type": "connection.open", "agent_id": "a1", "session_id": sid})).await, "conflict");
    assert_eq!(
        app.refused(json!({"type": "instruction.create", "agent_id": "a1", "session_id": sid, "instruction_type": "t", "payload": 1}))
            .await,
        "conflict"
    );
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_open_and_close() {
    let mut app = TestApp::start().await;
    let sid = app.session("a1").await;
    let r = app
        .ok(json!({"type": "connection.open", "agent_id": "a1", "session_id": sid, "connection_id": "c1",
                   "connection_type": "websocket", "client_info": {"v": 1}}))
        .await;
    assert_eq!(r["connection_id"], "c1");
    let e = app.next_event("agent.connection.opened").await;
    assert_eq!(e["connection_id"], "c1");
    assert_eq!(e["connection_type"], "websocket");
    assert_eq!(e["restored"], false);
    assert_eq!(e["session_id"], sid.as_str());
    // Same id again: same connection.
    let r =
        app.ok(json!({"type": "connection.open", "agent_id": "a1", "session_id": sid, "connection_id": "c1"})).await;
    assert_eq!(r["connection_id"], "c1");
    // Errors.
    assert_eq!(
        app.refused(json!({"type": "connection.open", "agent_id": "a1", "session_id": "missing"})).await,
        "not_found"
    );
    assert_eq!(app.refused(json!({"type": "connection.open", "agent_id": "a2", "session_id": sid})).await, "forbidden");
    let r = app.ok(json!({"type": "connection.open", "agent_id": "a1", "session_id": sid})).await;
    assert_eq!(r["connection_type"], serde_json::Value::Null);
    let generated = r["connection_id"].as_str().unwrap().to_string();
    let ctype: String =
        app.scalar(&format!("SELECT connection_type FROM agent_connection WHERE connection_id = '{generated}'")).await;
    assert_eq!(ctype, "amqp");

    let r = app.ok(json!({"type": "connection.close", "agent_id": "a1", "connection_id": "c1"})).await;
    assert_eq!(r["closed"], true);
    let e = app.next_event("agent.connection.closed").await;
    assert_eq!(e["connection_id"], "c1");
    assert_eq!(e["reason"], "client_disconnect");
    let row = app
        .db
        .query_one("SELECT status::text, close_reason::text, closed_at IS NOT NULL FROM agent_connection WHERE connection_id = 'c1'", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "closed");
    assert_eq!(row.get::<_, String>(1), "client_disconnect");
    assert!(row.get::<_, bool>(2));
    assert_eq!(
        app.ok(json!({"type": "connection.close", "agent_id": "a1", "connection_id": "c1"})).await["closed"],
        true
    );
    assert_eq!(
        app.ok(json!({"type": "connection.close", "agent_id": "a1", "connection_id": "zzz"})).await["closed"],
        false
    );
    let n = app.published(|e| e["event_type"] == "agent.connection.closed").await;
    assert_eq!(n, 1, "closing twice announces once");
    // A closed id cannot be opened again.
    assert_eq!(
        app.refused(json!({"type": "connection.open", "agent_id": "a1", "session_id": sid, "connection_id": "c1"}))
            .await,
        "conflict"
    );
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instructions_are_created_sent_and_acknowledged() {
    let mut app = TestApp::start().await;
    let sid = app.session("a1").await;
    let r = app
        .ok(json!({"type": "instruction.create", "agent_id": "a1", "session_id": sid, "instruction_type": "move",
                   "payload": {"x": 1}, "sequence_number": 7, "priority": "high", "ttl_seconds": 60,
                   "max_retries": 2, "instruction_metadata": {"by": "test"}}))
        .await;
    let iid = r["instruction_id"].as_str().unwrap().to_string();
    assert!(r["expires_at"].is_string());
    let e = app.next_event("agent.instruction.created").await;
    assert_eq!(e["instruction_id"], iid.as_str());
    assert_eq!(e["instruction_type"], "move");
    assert_eq!(e["payload"], json!({"x": 1}));
    assert_eq!(e["sequence_number"], 7);
    assert_eq!(e["priority"], "high");
    assert_eq!(e["max_retries"], 2);
    assert_eq!(e["instruction_metadata"], json!({"by": "test"}));
    assert_eq!(e["expires_at"], r["expires_at"]);
    let ttl: f64 = app
        .scalar(&format!(
            "SELECT extract(epoch FROM expires_at - created_at)::float8 FROM agent_instruction WHERE instruction_id = '{iid}'"
        ))
        .await;
    assert!((ttl - 60.0).abs() < 0.01, "deadline from ttl_seconds: {ttl}");

    // Defaults, explicit deadline, never-expiring.
    let d = app
        .ok(json!({"type": "instruction.create", "agent_id": "a1", "session_id": sid, "instruction_type": "t", "payload": null, "priority": "low"}))
        .await;
    let ttl: f64 = app
        .scalar(&format!(
            "SELECT extract(epoch FROM expires_at - created_at)::float8 FROM agent_instruction WHERE instruction_id = '{}'",
            d["instruction_id"].as_str().unwrap()
        ))
        .await;
    assert!((ttl - 300.0).abs() < 0.01, "default ttl: {ttl}");
    let n = app
        .ok(json!({"type": "instruction.create", "agent_id": "a1", "session_id": sid, "instruction_type": "t", "payload": 1,
                   "expires_at": null, "priority": "critical"}))
        .await;
    assert!(n["expires_at"].is_null());
    let fixed = app
        .ok(json!({"type": "instruction.create", "agent_id": "a1", "session_id": sid, "instruction_type": "t", "payload": 1,
                   "expires_at": "2031-01-02T03:04:05"}))
        .await;
    assert_eq!(fixed["expires_at"], "2031-01-02T03:04:05Z", "a timestamp without offset is UTC");
    // Priority sorts as an order, not as text.
    let order: Vec<String> = app
        .column("SELECT x.p::text FROM (SELECT DISTINCT priority AS p FROM agent_instruction) x ORDER BY x.p DESC")
        .await;
    assert_eq!(order, ["critical", "high", "normal", "low"]);
    // Idempotent by instruction_id.
    let fixed_id = uuid::Uuid::new_v4().to_string();
    let body = json!({"type": "instruction.create", "agent_id": "a1", "session_id": sid, "instruction_type": "t",
                      "payload": 1, "instruction_id": fixed_id});
    assert_eq!(app.ok(body.clone()).await["instruction_id"], fixed_id.as_str());
    assert_eq!(app.ok(body).await["instruction_id"], fixed_id.as_str());
    assert_eq!(app.published(|e| e["instruction_id"] == fixed_id.as_str()).await, 1);
    // Refusals.
    assert_eq!(
        app.refused(json!({"type": "instruction.create", "agent_id": "a2", "session_id": sid, "instruction_type": "t", "payload": 1}))
            .await,
        "forbidden"
    );
    assert_eq!(
        app.refused(json!({"type": "instruction.create", "agent_id": "a1", "session_id": "none", "instruction_type": "t", "payload": 1}))
            .await,
        "not_found"
    );

    // sent
    let r = app.ok(json!({"type": "instruction.sent", "instruction_id": iid, "connection_id": "c9"})).await;
    assert_eq!(r["status"], "sent");
    let sent: bool =
        app.scalar(&format!("SELECT sent_at IS NOT NULL FROM agent_instruction WHERE instruction_id = '{iid}'")).await;
    assert!(sent);
    assert_eq!(app.ok(json!({"type": "instruction.sent", "instruction_id": iid})).await["status"], "sent");
    assert_eq!(
        app.refused(json!({"type": "instruction.sent", "instruction_id": uuid::Uuid::new_v4()})).await,
        "not_found"
    );

    // ack
    let ack = json!({"type": "instruction.ack", "instruction_id": iid, "agent_id": "a1", "session_id": sid,
                     "status": "processed", "result": {"ok": 1}, "processing_time_ms": 12,
                     "processed_at": "2026-01-01T00:00:00Z"});
    let r = app.ok(ack.clone()).await;
    assert_eq!(r, json!({"status": "acknowledged", "accepted": true}));
    let e = app.next_event("agent.instruction.acknowledged").await;
    assert_eq!(e["instruction_id"], iid.as_str());
    assert_eq!(e["ack_status"], "processed");
    assert!(e["acknowledged_at"].is_string());
    // A second ack is recorded and changes nothing.
    let r = app.ok(ack).await;
    assert_eq!(r, json!({"status": "acknowledged", "accepted": false}));
    let acks: Vec<bool> = app.column("SELECT accepted FROM agent_instruction_acknowledgement ORDER BY id").await;
    assert_eq!(acks, [true, false]);
    assert_eq!(
        app.refused(json!({"type": "instruction.ack", "instruction_id": iid, "agent_id": "a2", "session_id": sid, "status": "received"}))
            .await,
        "forbidden"
    );
    assert_eq!(
        app.refused(json!({"type": "instruction.ack", "instruction_id": uuid::Uuid::new_v4(), "agent_id": "a1",
                           "session_id": sid, "status": "received"}))
            .await,
        "not_found"
    );
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_are_one_snapshot_of_the_counts() {
    let app = TestApp::start().await;
    let s1 = app.session("a1").await;
    let _s2 = app.session("a2").await;
    app.ok(json!({"type": "connection.open", "agent_id": "a1", "session_id": s1})).await;
    for _ in 0..3 {
        app.ok(json!({"type": "instruction.create", "agent_id": "a1", "session_id": s1, "instruction_type": "t", "payload": 1}))
            .await;
    }
    let i = app
        .ok(json!({"type": "instruction.create", "agent_id": "a1", "session_id": s1, "instruction_type": "t", "payload": 1}))
        .await;
    app.ok(json!({"type": "instruction.sent", "instruction_id": i["instruction_id"]})).await;
    let r = app.ok(json!({"type": "stats.get"})).await;
    assert_eq!(r["active_connections"], 1);
    assert_eq!(r["active_sessions"], 2);
    assert_eq!(r["pending_instructions"], 3);
    assert_eq!(r["sent_instructions"], 1);
    assert_eq!(r["total_instructions_pending"], 4);
    assert!(r["timestamp"].as_str().unwrap().ends_with('Z'));
    let lib = app.manager.get_connection_stats().await.unwrap();
    assert_eq!(lib.total_instructions_pending, 4);
    assert_eq!(lib.active_sessions, 2);
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn library_api_creates_and_closes_sessions_and_reads_stats() {
    let app = TestApp::start().await;
    let sid = app.manager.create_session("lib-agent", Some("acq"), Some("named"), None, None).await.unwrap();
    let name: String = app.scalar(&format!("SELECT name FROM agent_session WHERE session_id = '{sid}'")).await;
    assert_eq!(name, "named");
    app.ok(json!({"type": "connection.open", "agent_id": "lib-agent", "session_id": sid})).await;
    assert!(app.manager.close_session(&sid).await.unwrap());
    assert!(app.manager.close_session(&sid).await.unwrap());
    assert!(!app.manager.close_session("no-such-session").await.unwrap());
    let reason: String = app.scalar("SELECT close_reason::text FROM agent_connection").await;
    assert_eq!(reason, "session_closed");
    assert!(app.manager.create_session("", None, None, None, None).await.is_err(), "an empty agent id is invalid");
    let stats = app.manager.get_connection_stats().await.unwrap();
    assert_eq!(stats.active_sessions, 0);
    app.cleanup().await;
}
