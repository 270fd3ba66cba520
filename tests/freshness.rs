//! Heartbeat freshness is measured from when the agent spoke: a heartbeat that waited in the queue longer than the
//! stale window is dropped by the broker; one that waited anywhere else (the worker, a socket) is read by when the
//! worker received it and by its `sent_at` against the connection's clock offset, and refreshes nothing when its
//! agent spoke longer than the stale window ago. Agents' clocks that are minutes off change no verdict. A heartbeat
//! queue declared by an older version keeps working.

mod common;

use std::time::{Duration, Instant};

use agent_connection_manager::commands::heartbeat::{apply_batch_then, BatchReport, Heartbeat, Rules};
use chrono::Utc;
use common::{eventually, TestApp};
use serde_json::json;

const STALE: Duration = Duration::from_secs(4);

fn rules() -> Rules {
    Rules { stale_after: STALE, ..Rules::default() }
}

/// A heartbeat of connection `c` sent `skew` seconds off the true time (the agent's clock) and `travelled` seconds
/// before the worker received it, `held` seconds ago.
fn hb(sid: &str, c: &str, skew: f64, travelled: f64, held: f64) -> Heartbeat {
    let sent = Utc::now() + chrono::Duration::milliseconds(((skew - travelled - held) * 1000.0) as i64);
    let mut h: Heartbeat = serde_json::from_value(
        json!({"agent_id": "a1", "session_id": sid, "connection_id": c, "sent_at": sent.to_rfc3339()}),
    )
    .unwrap();
    h.received = Some(Instant::now() - Duration::from_secs_f64(held));
    h
}

async fn apply(app: &TestApp, hbs: &[Heartbeat]) -> BatchReport {
    apply_batch_then(app.manager.pool(), hbs, &rules(), || {}).await.unwrap()
}

/// Seconds since connection `c`'s last heartbeat, by the database clock.
async fn age(app: &TestApp, c: &str) -> f64 {
    app.scalar(&format!(
        "SELECT extract(epoch FROM now() - last_heartbeat_at)::float8 FROM agent_connection WHERE connection_id = '{c}'"
    ))
    .await
}

async fn silence(app: &TestApp, c: &str) {
    app.db
        .execute(
            "UPDATE agent_connection SET last_heartbeat_at = now() - interval '1 hour' WHERE connection_id = $1",
            &[&c],
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_the_agent_sent_longer_ago_than_the_stale_window_refreshes_nothing() {
    let app = TestApp::unstarted_with(|_| {}).await;
    let sid = app.manager.create_session("a1", None, None, None, None).await.unwrap();
    assert_eq!(apply(&app, &[hb(&sid, "c1", 0.0, 0.05, 0.0)]).await.opened, 1);
    silence(&app, "c1").await;
    // Delivered now, but sent 10 s ago (held in a paused worker's socket, say): late.
    let r = apply(&app, &[hb(&sid, "c1", 0.0, 10.0, 0.0)]).await;
    assert_eq!((r.late, r.applied), (1, 0), "{r:?}");
    assert!(age(&app, "c1").await > 3000.0, "the late heartbeat refreshed the connection");
    // Sent 1 s ago: refreshed to when it was sent, not to now.
    let r = apply(&app, &[hb(&sid, "c1", 0.0, 1.0, 0.0)]).await;
    assert_eq!((r.late, r.applied), (0, 1), "{r:?}");
    let a = age(&app, "c1").await;
    assert!((0.8..2.0).contains(&a), "refreshed to {a} s ago, not to when the agent spoke (1 s)");
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_held_by_the_worker_counts_from_when_it_was_received() {
    let app = TestApp::unstarted_with(|_| {}).await;
    let sid = app.manager.create_session("a1", None, None, None, None).await.unwrap();
    // Received 10 s ago (the database was down since): opens nothing.
    let r = apply(&app, &[hb(&sid, "c1", 0.0, 0.0, 10.0)]).await;
    assert_eq!((r.late, r.opened), (1, 0), "{r:?}");
    assert_eq!(app.scalar::<i64>("SELECT count(*) FROM agent_connection").await, 0);
    assert_eq!(apply(&app, &[hb(&sid, "c1", 0.0, 0.0, 0.0)]).await.opened, 1);
    silence(&app, "c1").await;
    let r = apply(&app, &[hb(&sid, "c1", 0.0, 0.0, 10.0)]).await;
    assert_eq!((r.late, r.applied), (1, 0), "{r:?}");
    assert!(age(&app, "c1").await > 3000.0, "a heartbeat held 10 s refreshed the connection");
    let r = apply(&app, &[hb(&sid, "c1", 0.0, 0.0, 1.5)]).await;
    assert_eq!(r.applied, 1, "{r:?}");
    let a = age(&app, "c1").await;
    assert!((1.3..2.5).contains(&a), "refreshed to {a} s ago, not to when it was received (1.5 s)");
    // Closed as stale, it is restored only by a heartbeat its agent sent after the last one the close judged.
    app.db
        .execute(
            "UPDATE agent_connection SET status = 'closed', close_reason = 'stale_connection', closed_at = now() \
             WHERE connection_id = 'c1'",
            &[],
        )
        .await
        .unwrap();
    let r = apply(&app, &[hb(&sid, "c1", 0.0, 2.5, 0.0)]).await;
    assert_eq!((r.restored, r.late), (0, 1), "a heartbeat older than the last applied one restored it: {r:?}");
    let r = apply(&app, &[hb(&sid, "c1", 0.0, 0.0, 0.0)]).await;
    assert_eq!(r.restored, 1, "{r:?}");
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_clocks_ten_minutes_off_are_neither_kept_alive_nor_killed() {
    let app = TestApp::unstarted_with(|_| {}).await;
    let sid = app.manager.create_session("a1", None, None, None, None).await.unwrap();
    for (c, skew) in [("fast", 600.0), ("slow", -600.0)] {
        // On time: refreshed to now, whatever the agent's clock says.
        for _ in 0..3 {
            let r = apply(&app, &[hb(&sid, c, skew, 0.02, 0.0)]).await;
            assert_eq!((r.late, r.applied), (0, 1), "{c}: {r:?}");
            assert!(age(&app, c).await < 0.5, "{c}: an on-time heartbeat was judged old");
        }
        // Sent 10 s before it arrived: late, by the same clock.
        silence(&app, c).await;
        let r = apply(&app, &[hb(&sid, c, skew, 10.0, 0.0)]).await;
        assert_eq!((r.late, r.applied), (1, 0), "{c}: a heartbeat held 10 s was taken as fresh: {r:?}");
        assert!(age(&app, c).await > 3000.0, "{c}");
        let r = apply(&app, &[hb(&sid, c, skew, 0.02, 0.0)]).await;
        assert_eq!(r.applied, 1, "{c}: {r:?}");
    }
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_clock_that_steps_back_is_judged_by_its_new_offset_within_half_the_stale_window() {
    let app = TestApp::unstarted_with(|_| {}).await;
    let sid = app.manager.create_session("a1", None, None, None, None).await.unwrap();
    assert_eq!(apply(&app, &[hb(&sid, "c1", 0.0, 0.02, 0.0)]).await.opened, 1);
    // The agent's clock steps back ten minutes: its heartbeats look ten minutes old until the offset window has
    // forgotten the old offset (two buckets of a quarter of the stale window each).
    let stepped = Instant::now();
    let r = apply(&app, &[hb(&sid, "c1", -600.0, 0.02, 0.0)]).await;
    assert_eq!(r.late, 1, "{r:?}");
    let refreshed = eventually("a heartbeat after the step to refresh", STALE, || async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let r = apply(&app, &[hb(&sid, "c1", -600.0, 0.02, 0.0)]).await;
        (r.applied == 1).then(|| stepped.elapsed())
    })
    .await;
    assert!(refreshed < STALE / 2 + Duration::from_millis(700), "the new offset took {refreshed:?}");
    assert!(age(&app, "c1").await < 0.5);
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_counts_late_heartbeats() {
    let app = TestApp::start_with(|s| s.sweeper.connection_stale_after_secs = 4.try_into().unwrap()).await;
    let sid = app.manager.create_session("a1", None, None, None, None).await.unwrap();
    app.client.heartbeat("a1", &sid, "c1").await.unwrap();
    eventually("the heartbeat to open its connection", Duration::from_secs(20), || async {
        (app.scalar::<i64>("SELECT count(*) FROM agent_connection WHERE connection_id = 'c1'").await == 1).then_some(())
    })
    .await;
    silence(&app, "c1").await;
    let old = json!({"type": "agent.heartbeat", "agent_id": "a1", "session_id": sid, "connection_id": "c1",
                     "sent_at": (Utc::now() - chrono::Duration::seconds(30)).to_rfc3339()});
    app.client.send(&old, None).await.unwrap();
    let metric = "acm_messages_consumed_total{type=\"agent.heartbeat\",outcome=\"late\"} 1";
    eventually("the late heartbeat to be counted", Duration::from_secs(20), || async {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &app.manager.metrics().registry).unwrap();
        text.lines().any(|l| l == metric).then_some(())
    })
    .await;
    assert!(age(&app, "c1").await > 3000.0, "the late heartbeat refreshed the connection");
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_that_waited_longer_than_the_stale_window_refreshes_nothing() {
    let app = TestApp::unstarted_with(|s| s.sweeper.connection_stale_after_secs = 2.try_into().unwrap()).await;
    let sid = app.manager.create_session("a1", None, None, None, None).await.unwrap();
    // An agent last heard from an hour ago...
    app.db
        .execute(
            "INSERT INTO agent_connection (connection_id, session_id, agent_id, connection_type, last_heartbeat_at) \
             VALUES ('silent', $1, 'a1', 'amqp', now() - interval '1 hour')",
            &[&sid],
        )
        .await
        .unwrap();
    // ...whose heartbeat waits in the queue, with no worker running, longer than the stale window.
    app.client.heartbeat("a1", &sid, "silent").await.unwrap();
    let (_c, ch) = common::amqp_channel(&app.settings).await;
    let queue = app.topology().heartbeat_queue;
    eventually("the broker to drop the heartbeat older than the stale window", Duration::from_secs(30), || async {
        let q = common::queue_counts(&ch, &queue).await;
        (q.0 == 0).then_some(())
    })
    .await;
    app.manager.start().await.unwrap();
    // A fresh heartbeat is applied as usual (and shows the worker is consuming).
    app.client.heartbeat("a1", &sid, "fresh").await.unwrap();
    eventually("the fresh heartbeat to open its connection", Duration::from_secs(20), || async {
        (app.scalar::<i64>("SELECT count(*) FROM agent_connection WHERE connection_id = 'fresh'").await == 1)
            .then_some(())
    })
    .await;
    let silent_for: f64 = app
        .scalar("SELECT extract(epoch FROM now() - last_heartbeat_at)::float8 FROM agent_connection WHERE connection_id = 'silent'")
        .await;
    assert!(silent_for > 3000.0, "the expired heartbeat refreshed the connection ({silent_for} s ago)");
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_queue_declared_by_an_older_version_is_used_as_it_is() {
    let app = TestApp::unstarted_with(|_| {}).await;
    let topology = app.topology();
    let (_c, ch) = common::amqp_channel(&app.settings).await;
    // The heartbeat queue as versions without the stale-window TTL declared it.
    ch.queue_delete(topology.heartbeat_queue.as_str().into(), Default::default()).await.unwrap();
    let mut old = lapin::types::FieldTable::default();
    old.insert(
        "x-dead-letter-exchange".into(),
        lapin::types::AMQPValue::LongString(topology.dead_letter.as_str().into()),
    );
    ch.queue_declare(
        topology.heartbeat_queue.as_str().into(),
        lapin::options::QueueDeclareOptions { durable: true, ..Default::default() },
        old,
    )
    .await
    .unwrap();
    app.manager.start().await.unwrap();
    eventually("the worker's consumers to run on the old queue", Duration::from_secs(20), || async {
        app.manager.health().consumers_running.load(std::sync::atomic::Ordering::Relaxed).then_some(())
    })
    .await;
    let sid = app.manager.create_session("a1", None, None, None, None).await.unwrap();
    app.client.heartbeat("a1", &sid, "c1").await.unwrap();
    eventually("the heartbeat to open its connection", Duration::from_secs(20), || async {
        (app.scalar::<i64>("SELECT count(*) FROM agent_connection WHERE connection_id = 'c1'").await == 1).then_some(())
    })
    .await;
    app.cleanup().await;
}
