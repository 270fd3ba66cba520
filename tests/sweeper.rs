//! The sweeper: stale connections, inactive sessions, instruction retry and expiry, and the stale brake.

mod common;

use std::time::Duration;

use agent_connection_manager::amqp::Topology;
use agent_connection_manager::commands::heartbeat::{apply_batch, Heartbeat};
use agent_connection_manager::sweeper::{stale_connections, BacklogProbe};
use chrono::{DateTime, Utc};
use common::TestApp;
use serde_json::{json, Value};

fn ts(v: &Value) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(v.as_str().unwrap_or_else(|| panic!("not a timestamp: {v}")))
        .unwrap()
        .with_timezone(&Utc)
}

async fn heartbeats(app: &TestApp, sid: &str, n: usize) {
    let batch: Vec<Heartbeat> = (0..n)
        .map(|i| {
            serde_json::from_value(json!({"agent_id": "a1", "session_id": sid, "connection_id": format!("c{i}")}))
                .unwrap()
        })
        .collect();
    apply_batch(app.manager.pool(), &batch).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_connections_are_closed_with_their_last_heartbeat() {
    let mut app = TestApp::start().await;
    let sid = app.session("a1").await;
    heartbeats(&app, &sid, 3).await;
    app.db
        .execute(
            "UPDATE agent_connection SET last_heartbeat_at = now() - interval '121 seconds' WHERE connection_id = 'c0'",
            &[],
        )
        .await
        .unwrap();
    app.db
        .execute(
            "UPDATE agent_connection SET last_heartbeat_at = now() - interval '119 seconds' WHERE connection_id = 'c1'",
            &[],
        )
        .await
        .unwrap();
    let r = app.sweep().await;
    assert_eq!(r.stale_connections, 1, "only the one past 120 s");
    assert!(r.held.is_none());
    let last: DateTime<Utc> =
        app.scalar("SELECT last_heartbeat_at FROM agent_connection WHERE connection_id = 'c0'").await;
    let e = app.next_event("agent.connection.stale").await;
    assert_eq!(e["connection_id"], "c0");
    assert_eq!(e["session_id"], sid.as_str());
    assert_eq!(e["agent_id"], "a1");
    assert_eq!(ts(&e["last_heartbeat_at"]), last);
    let row = app
        .db
        .query_one("SELECT status::text, close_reason::text FROM agent_connection WHERE connection_id = 'c0'", &[])
        .await
        .unwrap();
    assert_eq!((row.get::<_, String>(0), row.get::<_, String>(1)), ("closed".into(), "stale_connection".into()));
    assert_eq!(app.sweep().await.stale_connections, 0, "nothing is closed twice");
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_sessions_become_inactive() {
    let mut app = TestApp::start().await;
    let quiet = app.session("a1").await;
    let busy = app.session("a2").await;
    app.db
        .execute(
            "UPDATE agent_session SET last_activity_at = now() - interval '3601 seconds' WHERE session_id = $1",
            &[&quiet],
        )
        .await
        .unwrap();
    let r = app.sweep().await;
    assert_eq!(r.inactive_sessions, 1);
    let e = app.next_event("agent.session.inactive").await;
    assert_eq!(e["session_id"], quiet.as_str());
    assert_eq!(e["agent_id"], "a1");
    assert!(e["last_activity_at"].is_string());
    let s: String = app.scalar(&format!("SELECT status::text FROM agent_session WHERE session_id = '{busy}'")).await;
    assert_eq!(s, "active");
    assert_eq!(app.sweep().await.inactive_sessions, 0);
    app.cleanup().await;
}

/// Drives one instruction through every expiry and checks counts and payloads against the state machine.
async fn expire_through_retries(app: &mut TestApp, sid: &str, max_retries: u32) {
    let r = app
        .ok(json!({"type": "instruction.create", "agent_id": "a1", "session_id": sid, "instruction_type": "scan",
                   "payload": {"n": max_retries}, "priority": "high", "max_retries": max_retries, "ttl_seconds": 30}))
        .await;
    let id = r["instruction_id"].as_str().unwrap().to_string();
    let make_due =
        format!("UPDATE agent_instruction SET expires_at = now() - interval '1 second' WHERE instruction_id = '{id}'");
    for attempt in 1..=max_retries {
        app.db.execute(&make_due, &[]).await.unwrap();
        let before: DateTime<Utc> =
            app.scalar(&format!("SELECT expires_at FROM agent_instruction WHERE instruction_id = '{id}'")).await;
        let r = app.sweep().await;
        assert_eq!((r.instructions_retried, r.instructions_expired), (1, 0), "attempt {attempt} of {max_retries}");
        let e = app.next_event("agent.instruction.retry").await;
        assert_eq!(e["instruction_id"], id.as_str());
        assert_eq!(e["retry_count"], attempt);
        assert_eq!(e["max_retries"], max_retries);
        assert_eq!(e["instruction_type"], "scan");
        assert_eq!(e["payload"], json!({"n": max_retries}));
        assert_eq!(e["priority"], "high");
        assert_eq!(ts(&e["previous_expires_at"]), before);
        let row = app
            .db
            .query_one(
                "SELECT status::text, retry_count, expires_at, extract(epoch FROM expires_at - now())::float8 \
                 FROM agent_instruction WHERE instruction_id = $1::text::uuid",
                &[&id],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "pending");
        assert_eq!(row.get::<_, i32>(1), attempt as i32);
        assert_eq!(ts(&e["expires_at"]), row.get::<_, DateTime<Utc>>(2), "the event carries the new deadline");
        let left: f64 = row.get(3);
        assert!((299.0..=300.5).contains(&left), "new deadline is now + retry window: {left}");
    }
    app.db.execute(&make_due, &[]).await.unwrap();
    let r = app.sweep().await;
    assert_eq!((r.instructions_retried, r.instructions_expired), (0, 1));
    let e = app.next_event("agent.instruction.expired").await;
    assert_eq!(e["instruction_id"], id.as_str());
    assert_eq!(e["retry_count"], max_retries, "retry_count unchanged by the final expiry");
    assert_eq!(e["max_retries"], max_retries);
    assert!(e["expires_at"].is_string());
    let (status, count): (String, i32) = {
        let row = app
            .db
            .query_one(
                "SELECT status::text, retry_count FROM agent_instruction WHERE instruction_id = $1::text::uuid",
                &[&id],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!((status.as_str(), count), ("expired", max_retries as i32));
    // Offered at most 1 + max_retries times: the loop above saw one retry event per attempt, and none came since.
    let later = app.drain_events().await;
    let retried_again = later
        .iter()
        .filter(|e| e["instruction_id"] == id.as_str() && e["event_type"] == "agent.instruction.retry")
        .count();
    assert_eq!(retried_again, 0, "offered at most 1 + max_retries times");
    // Final: a further sweep changes nothing; a late ack is recorded and changes nothing.
    let r = app.sweep().await;
    assert_eq!((r.instructions_retried, r.instructions_expired), (0, 0));
    let ack = app
        .ok(json!({"type": "instruction.ack", "instruction_id": id, "agent_id": "a1", "session_id": sid, "status": "processed"}))
        .await;
    assert_eq!(ack, json!({"status": "expired", "accepted": false}));
    let recorded: i64 = app
        .scalar(&format!(
            "SELECT count(*) FROM agent_instruction_acknowledgement WHERE instruction_id = '{id}' AND NOT accepted"
        ))
        .await;
    assert_eq!(recorded, 1);
    let s: String =
        app.scalar(&format!("SELECT status::text FROM agent_instruction WHERE instruction_id = '{id}'")).await;
    assert_eq!(s, "expired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instructions_retry_then_expire_for_0_1_and_3_retries() {
    let mut app = TestApp::start().await;
    let sid = app.session("a1").await;
    for m in [0, 1, 3] {
        expire_through_retries(&mut app, &sid, m).await;
    }
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_cancelled_and_never_expiring_instructions_are_left_alone() {
    let app = TestApp::start().await;
    let sid = app.session("a1").await;
    let other = app.session("a1").await;
    let create = |s: &str, extra: Value| {
        let mut b = json!({"type": "instruction.create", "agent_id": "a1", "session_id": s, "instruction_type": "t", "payload": 1});
        b.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        b
    };
    let acked = app.ok(create(&sid, json!({}))).await;
    app.ok(json!({"type": "instruction.ack", "instruction_id": acked["instruction_id"], "agent_id": "a1", "session_id": sid, "status": "processed"}))
        .await;
    app.ok(create(&other, json!({}))).await;
    app.ok(json!({"type": "session.close", "session_id": other})).await;
    app.ok(create(&sid, json!({"expires_at": null}))).await;
    app.db
        .execute(
            "UPDATE agent_instruction SET expires_at = now() - interval '1 hour' WHERE expires_at IS NOT NULL",
            &[],
        )
        .await
        .unwrap();
    let r = app.sweep().await;
    assert_eq!((r.instructions_retried, r.instructions_expired), (0, 0));
    let statuses: Vec<String> = app.column("SELECT status::text FROM agent_instruction ORDER BY status::text").await;
    assert_eq!(statuses, ["acknowledged", "cancelled", "pending"]);
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_sweeps_on_its_own_schedule() {
    let mut app = TestApp::start_with(|s| {
        s.sweeper.check_interval_secs = 1.try_into().unwrap();
        s.sweeper.instruction_retry_window_secs = 1.try_into().unwrap();
    })
    .await;
    let sid = app.session("a1").await;
    app.ok(json!({"type": "instruction.create", "agent_id": "a1", "session_id": sid, "instruction_type": "t",
                  "payload": 1, "ttl_seconds": 1, "max_retries": 1}))
        .await;
    let retry = app.next_event("agent.instruction.retry").await;
    assert_eq!(retry["retry_count"], 1);
    let expired = app.next_event("agent.instruction.expired").await;
    assert_eq!(expired["retry_count"], 1);
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_brake_holds_a_mass_verdict_then_lets_it_stand() {
    let mut app = TestApp::start_with(|s| s.sweeper.stale_brake_max_hold_secs = 600).await;
    let sid = app.session("a1").await;
    heartbeats(&app, &sid, 30).await;
    app.db
        .execute(
            "UPDATE agent_connection SET last_heartbeat_at = now() - interval '10 minutes' WHERE connection_id <> 'c0'",
            &[],
        )
        .await
        .unwrap();
    // 29 of 30 would go stale: at least 20 and at least half. Hold.
    for _ in 0..2 {
        let r = app.sweep().await;
        assert_eq!(r.stale_connections, 0);
        let held = r.held.expect("the brake holds");
        assert_eq!((held.reason.as_str(), held.candidates, held.active), ("mass_stale", 29, 30));
        let e = app.next_event("agent.sweeper.held").await;
        assert_eq!(e["reason"], "mass_stale");
        assert_eq!(e["candidates"], 29);
        assert_eq!(e["active"], 30);
    }
    assert_eq!(app.scalar::<i64>("SELECT count(*) FROM agent_connection WHERE status = 'active'").await, 30);
    // Held for longer than the maximum: the verdict stands.
    app.db
        .execute(
            "UPDATE sweeper_state SET held_since = now() - interval '601 seconds' WHERE task = 'stale_connections'",
            &[],
        )
        .await
        .unwrap();
    let r = app.sweep().await;
    assert!(r.held.is_none());
    assert_eq!(r.stale_connections, 29);
    let stale: std::collections::BTreeSet<String> = app
        .events_of("agent.connection.stale", 29)
        .await
        .iter()
        .map(|e| e["connection_id"].as_str().unwrap().to_string())
        .collect();
    let want: std::collections::BTreeSet<String> = (1..30).map(|i| format!("c{i}")).collect();
    assert_eq!(stale, want, "one agent.connection.stale for each connection but c0");
    let since: Option<DateTime<Utc>> =
        app.scalar("SELECT held_since FROM sweeper_state WHERE task = 'stale_connections'").await;
    assert!(since.is_none(), "the hold is over");
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_brake_holds_while_the_worker_is_behind() {
    // Not started: heartbeats pile up in the queue, as when the worker is behind.
    let mut app = TestApp::unstarted_with(|s| s.sweeper.max_heartbeat_backlog = 5).await;
    let sid = app.manager.create_session("a1", None, None, None, None).await.unwrap();
    heartbeats(&app, &sid, 1).await;
    app.db.execute("UPDATE agent_connection SET last_heartbeat_at = now() - interval '10 minutes'", &[]).await.unwrap();
    for _ in 0..6 {
        app.client.heartbeat("a1", &sid, "c0").await.unwrap();
    }
    let (_conn, ch) = common::amqp_channel(&app.settings).await;
    let probe = BacklogProbe::broker();
    probe.set(Some((ch, Topology::new(&app.settings.amqp.prefix)))).await;
    let r = common::eventually("the backlog to be seen", Duration::from_secs(10), || async {
        let r = app.manager.sweep_once(probe.clone()).await.unwrap();
        r.held.is_some().then_some(r)
    })
    .await;
    let held = r.held.unwrap();
    assert_eq!((held.reason.as_str(), held.candidates, held.active), ("heartbeat_backlog", 1, 1));
    assert_eq!(r.stale_connections, 0);
    // The task's own pure decision, at the edges.
    let cfg = stale_connections::Config::from(&app.settings.sweeper);
    assert_eq!(stale_connections::brake_reason(&cfg, 1, 1, Some(5)), None);
    // Without a broker to ask, the stale verdict is not trusted at all.
    probe.set(None).await;
    let r = app.manager.sweep_once(probe.clone()).await.unwrap();
    assert_eq!(r.stale_connections, 0);
    assert_eq!(r.skipped_tasks, ["stale_connections"]);
    // Ignoring the backlog, the verdict stands; then the queued heartbeats restore the connection.
    assert_eq!(app.sweep().await.stale_connections, 1);
    app.manager.start().await.unwrap();
    let opened = app.next_event("agent.connection.opened").await;
    assert_eq!(opened["restored"], false, "first the original open, relayed once the worker runs");
    let restored = app.next_event("agent.connection.opened").await;
    assert_eq!(restored["connection_id"], "c0");
    assert_eq!(restored["restored"], true);
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_runs_on_one_worker_at_a_time_commits_per_batch_and_releases_its_claim() {
    // Not started: no scheduled cycle of the worker's own can interfere.
    let app = TestApp::unstarted_with(|s| s.sweeper.batch_size = 2).await;
    let sid = app.manager.create_session("a1", None, None, None, None).await.unwrap();
    app.db
        .execute(
            "INSERT INTO agent_instruction (instruction_id, session_id, agent_id, instruction_type, payload, \
             max_retries, expires_at) SELECT gen_random_uuid(), $1, 'a1', 't', '1', 0, now() - interval '1 second' \
             FROM generate_series(1, 5)",
            &[&sid],
        )
        .await
        .unwrap();
    // Another worker holds the task's lease: this one skips it and changes nothing.
    app.db
        .batch_execute(
            "INSERT INTO sweeper_lease (task, holder, expires_at) \
             VALUES ('instruction_expiry', 'another-worker', now() + interval '1 hour')",
        )
        .await
        .unwrap();
    let r = app.sweep().await;
    assert_eq!(r.skipped_tasks, ["instruction_expiry"]);
    assert_eq!(r.instructions_expired, 0);
    assert_eq!(app.scalar::<i64>("SELECT count(*) FROM agent_instruction WHERE status = 'pending'").await, 5);
    // That worker's lease runs out (it died): the task is free again.
    app.db
        .batch_execute(
            "UPDATE sweeper_lease SET expires_at = now() - interval '1 second' WHERE task = 'instruction_expiry'",
        )
        .await
        .unwrap();

    // Released: 5 due instructions in batches of 2 are 3 transactions, each committing rows and events together.
    let xid_before: i64 = app.scalar("SELECT pg_current_xact_id()::text::bigint").await;
    let r = app.sweep().await;
    assert!(r.skipped_tasks.is_empty(), "{r:?}");
    assert_eq!(r.instructions_expired, 5);
    let writers: Vec<i64> = app
        .db
        .query(
            "SELECT DISTINCT xmin::text::bigint FROM agent_instruction WHERE status = 'expired' AND xmin::text::bigint > $1",
            &[&xid_before],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(writers.len(), 3, "one transaction per batch of 2: {writers:?}");
    let events: i64 =
        app.scalar("SELECT count(*) FROM event_outbox WHERE event_type = 'agent.instruction.expired'").await;
    assert_eq!(events, 5);
    let last_run: Option<DateTime<Utc>> =
        app.scalar("SELECT last_run_at FROM sweeper_state WHERE task = 'instruction_expiry'").await;
    assert!(last_run.is_some(), "the run that changed something is recorded");

    // The expired lease was taken over, and every claim was released: no lease is held after the cycle.
    let holder: String = app.scalar("SELECT holder FROM sweeper_lease WHERE task = 'instruction_expiry'").await;
    assert_ne!(holder, "another-worker", "the sweeping worker took the expired lease");
    let held: i64 = app.scalar("SELECT count(*) FROM sweeper_lease WHERE expires_at > now()").await;
    assert_eq!(held, 0, "a lease is still held after the cycle");
    app.cleanup().await;
}
