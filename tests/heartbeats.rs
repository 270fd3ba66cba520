//! Heartbeats: batching, monotonic time, opening unknown connections, restoring stale ones, rejections.

mod common;

use std::time::Duration;

use agent_connection_manager::commands::heartbeat::{apply_batch, Heartbeat};
use common::{eventually, TestApp};
use serde_json::json;

fn hb(agent: &str, session: &str, connection: &str) -> Heartbeat {
    serde_json::from_value(json!({"agent_id": agent, "session_id": session, "connection_id": connection})).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_coalesced_per_connection() {
    let app = TestApp::unstarted_with(|_| {}).await;
    let sid = app.manager.create_session("a1", None, None, None, None).await.unwrap();
    let batch: Vec<Heartbeat> = (0..30).map(|i| hb("a1", &sid, &format!("c{}", i % 3))).collect();
    let report = apply_batch(app.manager.pool(), &batch).await.unwrap();
    assert_eq!(report.received, 30);
    assert_eq!(report.applied, 3, "30 heartbeats for 3 connections are 3 writes");
    assert_eq!(report.opened, 3);
    assert_eq!(app.scalar::<i64>("SELECT count(*) FROM agent_connection WHERE status = 'active'").await, 3);
    let report = apply_batch(app.manager.pool(), &batch).await.unwrap();
    assert_eq!((report.applied, report.opened), (3, 0));
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_heartbeats_are_applied_in_few_batches_and_acknowledged() {
    let mut app = TestApp::unstarted_with(|_| {}).await;
    let sid = app.manager.create_session("a1", None, None, None, None).await.unwrap();
    for i in 0..500 {
        app.client.heartbeat("a1", &sid, &format!("c{}", i % 10)).await.unwrap();
    }
    app.manager.start().await.unwrap();
    eventually("10 connections opened", Duration::from_secs(20), || async {
        (app.scalar::<i64>("SELECT count(*) FROM agent_connection").await == 10).then_some(())
    })
    .await;
    let (_c, ch) = common::amqp_channel(&app.settings).await;
    eventually("the heartbeat queue drained and acknowledged", Duration::from_secs(20), || async {
        let q = common::queue_counts(&ch, &app.topology().heartbeat_queue).await;
        (q.0 == 0).then_some(())
    })
    .await;
    let batches = app.heartbeat_batches();
    assert!(batches < 500.0 / 2.0, "500 queued heartbeats took {batches} batches");
    let opened = app.published(|e| e["event_type"] == "agent.connection.opened").await;
    assert_eq!(opened, 10);
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_never_moves_backwards() {
    let app = TestApp::unstarted_with(|_| {}).await;
    let sid = app.manager.create_session("a1", None, None, None, None).await.unwrap();
    apply_batch(app.manager.pool(), &[hb("a1", &sid, "c1")]).await.unwrap();
    // A later batch (another worker's) committed first: its time is ahead of ours.
    app.db
        .execute(
            "UPDATE agent_connection SET last_heartbeat_at = now() + interval '1 hour' WHERE connection_id = 'c1'",
            &[],
        )
        .await
        .unwrap();
    app.db
        .execute("UPDATE agent_session SET last_activity_at = now() + interval '1 hour' WHERE session_id = $1", &[&sid])
        .await
        .unwrap();
    let late: Heartbeat = serde_json::from_value(json!({"agent_id": "a1", "session_id": sid, "connection_id": "c1",
        "sent_at": "2020-01-01T00:00:00Z"}))
    .unwrap();
    apply_batch(app.manager.pool(), &[late]).await.unwrap();
    let ahead: bool = app
        .scalar(
            "SELECT last_heartbeat_at > now() + interval '59 minutes' FROM agent_connection WHERE connection_id = 'c1'",
        )
        .await;
    assert!(ahead, "last_heartbeat_at kept the later time");
    let ahead: bool = app
        .scalar(&format!(
            "SELECT last_activity_at > now() + interval '59 minutes' FROM agent_session WHERE session_id = '{sid}'"
        ))
        .await;
    assert!(ahead, "last_activity_at kept the later time");
    // And a normal heartbeat moves time forward.
    app.db.execute("UPDATE agent_connection SET last_heartbeat_at = now() - interval '1 hour'", &[]).await.unwrap();
    apply_batch(app.manager.pool(), &[hb("a1", &sid, "c1")]).await.unwrap();
    let fresh: bool = app.scalar("SELECT last_heartbeat_at > now() - interval '1 minute' FROM agent_connection").await;
    assert!(fresh);
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_open_restore_and_reactivate_through_the_broker() {
    let mut app = TestApp::start().await;
    let sid = app.session("a1").await;
    app.client.heartbeat("a1", &sid, "c1").await.unwrap();
    let e = app.next_event("agent.connection.opened").await;
    assert_eq!(e["connection_id"], "c1");
    assert_eq!(e["restored"], false);
    assert_eq!(e["connection_type"], "amqp");

    // Stale: closed by the sweeper, restored by the next heartbeat.
    app.db
        .execute(
            "UPDATE agent_connection SET last_heartbeat_at = now() - interval '10 minutes' WHERE connection_id = 'c1'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(app.sweep().await.stale_connections, 1);
    let e = app.next_event("agent.connection.stale").await;
    assert_eq!(e["connection_id"], "c1");
    app.client.heartbeat("a1", &sid, "c1").await.unwrap();
    let e = app.next_event("agent.connection.opened").await;
    assert_eq!(e["restored"], true);
    let row = app
        .db
        .query_one("SELECT status::text, close_reason IS NULL, closed_at IS NULL FROM agent_connection WHERE connection_id = 'c1'", &[])
        .await
        .unwrap();
    assert_eq!((row.get::<_, String>(0), row.get::<_, bool>(1), row.get::<_, bool>(2)), ("active".into(), true, true));

    // Inactive: made active again.
    app.db
        .execute("UPDATE agent_session SET status = 'inactive', last_activity_at = now() - interval '2 hours' WHERE session_id = $1", &[&sid])
        .await
        .unwrap();
    app.client.heartbeat("a1", &sid, "c1").await.unwrap();
    eventually("the session to be active again", Duration::from_secs(20), || async {
        let s: String = app.scalar(&format!("SELECT status::text FROM agent_session WHERE session_id = '{sid}'")).await;
        (s == "active").then_some(())
    })
    .await;

    // A client-closed connection is not reopened by a heartbeat.
    app.ok(json!({"type": "connection.close", "agent_id": "a1", "connection_id": "c1"})).await;
    app.client.heartbeat("a1", &sid, "c1").await.unwrap();
    app.client.heartbeat("a1", &sid, "marker").await.unwrap();
    eventually("the marker heartbeat", Duration::from_secs(20), || async {
        (app.scalar::<i64>("SELECT count(*) FROM agent_connection WHERE connection_id = 'marker'").await == 1)
            .then_some(())
    })
    .await;
    let s: String = app.scalar("SELECT status::text FROM agent_connection WHERE connection_id = 'c1'").await;
    assert_eq!(s, "closed");
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_for_ended_or_foreign_sessions_change_nothing() {
    let app = TestApp::start().await;
    let mine = app.session("a1").await;
    let ended = app.session("a1").await;
    app.ok(json!({"type": "session.close", "session_id": ended})).await;
    app.client.heartbeat("a1", &ended, "c-ended").await.unwrap();
    app.client.heartbeat("intruder", &mine, "c-foreign").await.unwrap();
    app.client.heartbeat("a1", "no-such-session", "c-unknown").await.unwrap();
    // Another agent cannot move a1's connection through its own session either.
    app.client.heartbeat("a1", &mine, "c-mine").await.unwrap();
    let theirs = app.session("a2").await;
    app.client.heartbeat("a2", &theirs, "c-mine").await.unwrap();
    app.client.heartbeat("a1", &mine, "marker").await.unwrap();
    eventually("the marker heartbeat", Duration::from_secs(20), || async {
        (app.scalar::<i64>("SELECT count(*) FROM agent_connection WHERE connection_id = 'marker'").await == 1)
            .then_some(())
    })
    .await;
    let ids: Vec<String> = app.column("SELECT connection_id FROM agent_connection ORDER BY connection_id").await;
    assert_eq!(ids, ["c-mine", "marker"]);
    let owner: String = app.scalar("SELECT session_id FROM agent_connection WHERE connection_id = 'c-mine'").await;
    assert_eq!(owner, mine);
    let status: String =
        app.scalar(&format!("SELECT status::text FROM agent_session WHERE session_id = '{ended}'")).await;
    assert_eq!(status, "ended");
    let dead: i64 = app.scalar("SELECT count(*) FROM agent_session WHERE status = 'ended'").await;
    assert_eq!(dead, 1);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &app.manager.metrics().registry).unwrap();
    assert!(
        text.lines()
            .any(|l| l.starts_with("acm_messages_consumed_total{type=\"agent.heartbeat\",outcome=\"rejected\"} 4")),
        "4 rejected heartbeats counted:\n{text}"
    );
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_mixed_batch_takes_the_fast_and_the_slow_path_correctly() {
    let app = TestApp::unstarted_with(|_| {}).await;
    let m = &app.manager;
    let s1 = m.create_session("a1", None, None, None, None).await.unwrap();
    let s2 = m.create_session("a2", None, None, None, None).await.unwrap();
    let s3 = m.create_session("a3", None, None, None, None).await.unwrap();
    let s4 = m.create_session("a4", None, None, None, None).await.unwrap();
    apply_batch(m.pool(), &[hb("a1", &s1, "c1"), hb("a1", &s1, "c5"), hb("a3", &s3, "c3")]).await.unwrap();
    let db = &app.db;
    db.execute("UPDATE agent_session SET status = 'inactive' WHERE session_id = $1", &[&s2]).await.unwrap();
    db.execute(
        "UPDATE agent_connection SET status = 'closed', close_reason = 'stale_connection', closed_at = now() \
         WHERE connection_id = 'c3'",
        &[],
    )
    .await
    .unwrap();
    db.execute(
        "UPDATE agent_connection SET status = 'closed', close_reason = 'client_disconnect', closed_at = now() \
         WHERE connection_id = 'c5'",
        &[],
    )
    .await
    .unwrap();
    m.close_session(&s4).await.unwrap();
    let before: i64 = app.scalar("SELECT coalesce(max(id), 0) FROM event_outbox").await;
    let c1_before: chrono::DateTime<chrono::Utc> =
        app.scalar("SELECT last_heartbeat_at FROM agent_connection WHERE connection_id = 'c1'").await;

    let batch = [
        hb("a1", &s1, "c1"),       // fast path
        hb("intruder", &s1, "cx"), // a foreign agent in a session the fast path touched
        hb("a2", &s2, "c2"),       // inactive session: reactivated, unknown connection opened
        hb("a3", &s3, "c3"),       // stale-closed connection restored
        hb("a4", &s4, "c4"),       // ended session
        hb("a1", &s1, "c5"),       // closed by the client: stays closed
        hb("a1", &s1, "c3"),       // a3's connection claimed through a1's session
        hb("a1", "no-such-session", "c9"),
    ];
    let report = apply_batch(m.pool(), &batch).await.unwrap();
    assert_eq!(report.received, 8);
    assert_eq!(report.applied, 3, "c1 refreshed, c2 opened, c3 restored: {report:?}");
    assert_eq!(report.opened, 1, "{report:?}");
    assert_eq!(report.restored, 1, "{report:?}");
    assert_eq!(report.reactivated_sessions, 1, "{report:?}");
    assert_eq!(report.rejected, 5, "{report:?}");

    let rows = db
        .query("SELECT connection_id, session_id, status::text FROM agent_connection ORDER BY connection_id", &[])
        .await
        .unwrap();
    let got: Vec<(String, String, String)> = rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    let want = [
        ("c1".to_string(), s1.clone(), "active".to_string()),
        ("c2".into(), s2.clone(), "active".into()),
        ("c3".into(), s3.clone(), "active".into()),
        ("c5".into(), s1.clone(), "closed".into()),
    ];
    assert_eq!(got, want);
    let c1_after: chrono::DateTime<chrono::Utc> =
        app.scalar("SELECT last_heartbeat_at FROM agent_connection WHERE connection_id = 'c1'").await;
    assert!(c1_after > c1_before, "c1's heartbeat moved forward");
    let statuses: Vec<String> = db
        .query(
            "SELECT status::text FROM agent_session WHERE session_id = ANY($1) ORDER BY agent_id",
            &[&vec![s2.clone(), s4.clone()]],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(statuses, ["active", "ended"]);
    let events = db
        .query(
            "SELECT payload->>'connection_id', payload->>'restored' FROM event_outbox \
             WHERE id > $1 AND event_type = 'agent.connection.opened' ORDER BY id",
            &[&before],
        )
        .await
        .unwrap();
    let mut opened: Vec<(String, String)> = events.iter().map(|r| (r.get(0), r.get(1))).collect();
    opened.sort();
    assert_eq!(opened, [("c2".into(), "false".into()), ("c3".into(), "true".into())]);
    let new_events: i64 =
        db.query_one("SELECT count(*) FROM event_outbox WHERE id > $1", &[&before]).await.unwrap().get(0);
    assert_eq!(new_events, 2, "exactly the two opened events");
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_batches_keep_the_latest_client_info() {
    // Small batches, two in flight: many consecutive batches touch the same three connections.
    let app = TestApp::unstarted_with(|s| {
        s.worker.heartbeat_batch_size = 5.try_into().unwrap();
        s.worker.heartbeat_pipeline = 2.try_into().unwrap();
    })
    .await;
    let sid = app.manager.create_session("a1", None, None, None, None).await.unwrap();
    // Records every write that would replace a connection's client_info with an older one.
    app.db
        .batch_execute(
            "CREATE TABLE seq_regression (connection_id text, old_seq bigint, new_seq bigint);
             CREATE FUNCTION note_seq_regression() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 INSERT INTO seq_regression VALUES (OLD.connection_id, (OLD.client_info->>'seq')::bigint,
                                                    (NEW.client_info->>'seq')::bigint);
                 RETURN NEW;
             END $$;
             CREATE TRIGGER seq_regression BEFORE UPDATE ON agent_connection FOR EACH ROW
                 WHEN ((NEW.client_info->>'seq')::bigint < (OLD.client_info->>'seq')::bigint)
                 EXECUTE FUNCTION note_seq_regression();",
        )
        .await
        .unwrap();
    const N: usize = 1500;
    for i in 0..N {
        let body = json!({"type": "agent.heartbeat", "agent_id": "a1", "session_id": sid,
                          "connection_id": format!("c{}", i % 3), "client_info": {"seq": i}});
        app.client.send(&body, None).await.unwrap();
    }
    app.manager.start().await.unwrap();
    // Each connection's last heartbeat is one of the last three; its client_info must be the one written last.
    let want: Vec<(String, i64)> = (N - 3..N).map(|i| (format!("c{}", i % 3), i as i64)).collect();
    let mut want = want;
    want.sort();
    eventually("every connection to show its last heartbeat's client_info", Duration::from_secs(30), || async {
        let rows = app
            .db
            .query(
                "SELECT connection_id, (client_info->>'seq')::bigint FROM agent_connection ORDER BY connection_id",
                &[],
            )
            .await
            .unwrap();
        let got: Vec<(String, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        (got == want).then_some(())
    })
    .await;
    // At most 5 a batch, so at least N/5 batches; and with all N queued before the start, batches are (nearly)
    // full: fewer than N * 2/5, an average above 2.5 heartbeats a batch, which one-by-one application cannot reach.
    let batches = app.heartbeat_batches();
    assert!(
        batches >= (N / 5) as f64 && batches < (N * 2 / 5) as f64,
        "{N} queued heartbeats in batches of at most 5 took {batches} batches"
    );
    let regressions: i64 = app.scalar("SELECT count(*) FROM seq_regression").await;
    assert_eq!(regressions, 0, "a batch overwrote a later batch's client_info");
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_activity_is_written_only_when_older_than_the_granularity() {
    let app = TestApp::unstarted_with(|_| {}).await;
    let sid = app.manager.create_session("a1", None, None, None, None).await.unwrap();
    apply_batch(app.manager.pool(), &[hb("a1", &sid, "c1")]).await.unwrap();
    // Heard from 30 s ago, within the default granularity (60 s): the heartbeat leaves the session row alone.
    app.set_session_activity_ago(&sid, "30 seconds").await;
    let updates_before: i64 = app.scalar("SELECT xmin::text::bigint FROM agent_session").await;
    apply_batch(app.manager.pool(), &[hb("a1", &sid, "c1")]).await.unwrap();
    let kept = app.session_activity_age_secs(&sid).await;
    assert!((29.0..40.0).contains(&kept), "activity within the granularity was rewritten: now {kept} s old");
    let updates_after: i64 = app.scalar("SELECT xmin::text::bigint FROM agent_session").await;
    assert_eq!(updates_before, updates_after, "the session row got a new version");
    // Heard from 2 minutes ago: the heartbeat moves the activity to now.
    app.set_session_activity_ago(&sid, "2 minutes").await;
    apply_batch(app.manager.pool(), &[hb("a1", &sid, "c1")]).await.unwrap();
    let moved = app.session_activity_age_secs(&sid).await;
    assert!(moved < 10.0, "activity older than the granularity was not moved forward: {moved} s old");
    // The connection's heartbeat time moves with every heartbeat.
    let fresh: bool =
        app.scalar("SELECT last_heartbeat_at > now() - interval '10 seconds' FROM agent_connection").await;
    assert!(fresh);
    app.cleanup().await;
}
