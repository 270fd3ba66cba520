//! A fleet that goes silent together is one event: once anything is stale, the stale brake judges every connection
//! silent for the stale window less `sweeper.stale_brake_window_secs`, so the earliest of a partitioned group are not
//! closed before the brake decides; an agent that merely stopped alone is still closed at once.

mod common;

use agent_connection_manager::commands::heartbeat::{apply_batch, Heartbeat};
use common::TestApp;
use serde_json::json;

async fn connections(app: &TestApp, sid: &str, n: usize) {
    let batch: Vec<Heartbeat> = (0..n)
        .map(|i| {
            serde_json::from_value(json!({"agent_id": "a1", "session_id": sid, "connection_id": format!("c{i:02}")}))
                .unwrap()
        })
        .collect();
    apply_batch(app.manager.pool(), &batch).await.unwrap();
}

/// Sets the last heartbeat of connections `from..to` to `age(i)` seconds ago.
async fn silent(app: &TestApp, from: usize, to: usize, age: impl Fn(usize) -> f64) {
    for i in from..to {
        app.db
            .execute(
                "UPDATE agent_connection SET last_heartbeat_at = now() - $2::float8 * interval '1 second' \
                 WHERE connection_id = $1",
                &[&format!("c{i:02}"), &age(i)],
            )
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_gone_silent_together_is_held_as_one_before_any_member_is_closed() {
    // Stale after 60 s; the group is what goes stale within 30 s (the default: half the stale window).
    let mut app = TestApp::start_with(|s| {
        s.sweeper.connection_stale_after_secs = 60.try_into().unwrap();
        s.sweeper.check_interval_secs = 3600.try_into().unwrap();
    })
    .await;
    let sid = app.session("a1").await;
    connections(&app, &sid, 40).await;
    // 30 agents heartbeating every 10 s went silent together: their last beats are spread over 10 s, so only the
    // earliest 4 are past the stale window yet. 10 others are live.
    silent(&app, 0, 30, |i| 60.5 - i as f64 / 3.0).await;
    let stale_now: i64 = app
        .scalar("SELECT count(*) FROM agent_connection WHERE last_heartbeat_at < now() - interval '60 seconds'")
        .await;
    assert!((1..20).contains(&stale_now), "the scenario needs a few stale, below the brake's minimum: {stale_now}");
    let r = app.sweep().await;
    assert_eq!(r.stale_connections, 0, "members of the group were closed before the brake decided");
    let held = r.held.expect("the brake holds for the whole group");
    assert_eq!((held.reason.as_str(), held.candidates, held.active), ("mass_stale", 30, 40));
    let e = app.next_event("agent.sweeper.held").await;
    assert_eq!(e["candidates"], 30);
    assert_eq!(app.scalar::<i64>("SELECT count(*) FROM agent_connection WHERE status = 'active'").await, 40);
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_few_silent_agents_beside_a_live_fleet_are_closed_at_once() {
    let mut app = TestApp::start_with(|s| {
        s.sweeper.connection_stale_after_secs = 60.try_into().unwrap();
        s.sweeper.check_interval_secs = 3600.try_into().unwrap();
    })
    .await;
    let sid = app.session("a1").await;
    connections(&app, &sid, 40).await;
    // Three agents died at different times, two more are quiet but within the window: the group (5 of 40) is small.
    silent(&app, 0, 3, |i| 61.0 + i as f64).await;
    silent(&app, 3, 5, |_| 45.0).await;
    let r = app.sweep().await;
    assert!(r.held.is_none(), "{r:?}");
    assert_eq!(r.stale_connections, 3);
    assert_eq!(app.events_of("agent.connection.stale", 3).await.len(), 3);
    app.cleanup().await;
}
