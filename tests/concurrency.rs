//! Several sweepers and relays (and whole workers) on one database: each transition once, each event once.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use agent_connection_manager::amqp::connect;
use agent_connection_manager::metrics::Metrics;
use agent_connection_manager::relay::{self, relay_once, Publishing};
use agent_connection_manager::AgentConnectionManager;
use common::{eventually, TestApp};
use serde_json::{json, Value};

const INSTRUCTIONS: i64 = 2000;
const STALE: i64 = 500;

async fn seed(app: &TestApp) {
    app.db
        .batch_execute(&format!(
            "INSERT INTO agent_session (session_id, agent_id, name) VALUES ('s1', 'a1', 'seed');
             INSERT INTO agent_instruction (instruction_id, session_id, agent_id, instruction_type, payload, expires_at, max_retries)
               SELECT gen_random_uuid(), 's1', 'a1', 't', to_jsonb(g), now() - interval '1 minute', 1
               FROM generate_series(1, {INSTRUCTIONS}) g;
             INSERT INTO agent_connection (connection_id, session_id, agent_id, connection_type, last_heartbeat_at)
               SELECT 'c' || g, 's1', 'a1', 'amqp', now() - interval '1 hour' FROM generate_series(1, {STALE}) g;"
        ))
        .await
        .unwrap();
}

/// Collects every event published so far (up to a marker published after them), counted by event_id.
async fn collect(app: &mut TestApp) -> HashMap<String, (usize, Value)> {
    let mut seen: HashMap<String, (usize, Value)> = HashMap::new();
    for v in app.drain_events().await {
        let id = v["event_id"].as_str().unwrap().to_string();
        seen.entry(id).or_insert((0, v.clone())).0 += 1;
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_sweepers_and_two_relays_emit_each_event_once() {
    let mut app = TestApp::unstarted_with(|s| {
        s.sweeper.stale_brake_min_connections = 1_000_000;
        s.sweeper.batch_size = 100;
    })
    .await;
    seed(&app).await;
    let other = AgentConnectionManager::with_pool(app.settings.clone(), app.manager.pool().clone());
    let (a, b) = tokio::join!(app.sweep_with(&app.manager), app.sweep_with(&other));
    let retried = a.instructions_retried + b.instructions_retried;
    let stale = a.stale_connections + b.stale_connections;
    assert_eq!(retried as i64, INSTRUCTIONS, "every due instruction retried once: {a:?} {b:?}");
    assert_eq!(stale as i64, STALE);
    // Both again at once: nothing is due any more.
    let (a, b) = tokio::join!(app.sweep_with(&app.manager), app.sweep_with(&other));
    assert_eq!(a.instructions_retried + b.instructions_retried + a.stale_connections + b.stale_connections, 0);
    let retry_count: i64 =
        app.scalar("SELECT count(*) FROM agent_instruction WHERE retry_count = 1 AND status = 'pending'").await;
    assert_eq!(retry_count, INSTRUCTIONS);

    // Two relays drain the outbox at once.
    let relay = |pool: deadpool_postgres::Pool, url: String, exchange: String| async move {
        let conn = connect(&url, "relay test").await.unwrap();
        let ch = agent_connection_manager::amqp::confirm_channel(&conn).await.unwrap();
        let metrics = Metrics::new();
        let publishing = Publishing::new(&exchange, 50);
        let mut total = 0;
        loop {
            let n = relay_once(&pool, &ch, &publishing, &metrics).await.unwrap();
            if n == 0 {
                break total;
            }
            total += n;
        }
    };
    let ex = app.topology().event_exchange;
    let (r1, r2) = tokio::join!(
        tokio::spawn(relay(app.manager.pool().clone(), app.settings.amqp.url.clone(), ex.clone())),
        tokio::spawn(relay(app.manager.pool().clone(), app.settings.amqp.url.clone(), ex.clone()))
    );
    let (r1, r2) = (r1.unwrap(), r2.unwrap());
    assert_eq!((r1 + r2) as i64, INSTRUCTIONS + STALE, "relays published {r1} + {r2}");
    assert_eq!(app.unpublished().await, 0);
    let seen = collect(&mut app).await;
    assert_eq!(seen.len() as i64, INSTRUCTIONS + STALE);
    assert!(seen.values().all(|(n, _)| *n == 1), "an event was published twice");
    let mut per_instruction: HashMap<String, usize> = HashMap::new();
    for (_, v) in seen.values() {
        if v["event_type"] == "agent.instruction.retry" {
            *per_instruction.entry(v["instruction_id"].as_str().unwrap().into()).or_default() += 1;
        }
    }
    assert_eq!(per_instruction.len() as i64, INSTRUCTIONS);
    assert!(per_instruction.values().all(|n| *n == 1));
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_workers_decide_each_transition_once() {
    let mut app = TestApp::start_with(|s| {
        s.sweeper.check_interval_secs = 1.try_into().unwrap();
        s.sweeper.instruction_retry_window_secs = 1.try_into().unwrap();
        s.worker.command_lanes = 2.try_into().unwrap();
    })
    .await;
    let second = Arc::new(AgentConnectionManager::new(app.settings.clone()).unwrap());
    second.start().await.unwrap();
    let n = 100;
    let sid = app.session("a1").await;
    for i in 0..n {
        app.client
            .send(
                &json!({"type": "instruction.create", "agent_id": "a1", "session_id": sid, "instruction_type": "t",
                        "payload": i, "ttl_seconds": 1, "max_retries": 2}),
                Some(&format!("create-{i}")),
            )
            .await
            .unwrap();
    }
    eventually("every instruction expired", Duration::from_secs(60), || async {
        let expired: i64 = app.scalar("SELECT count(*) FROM agent_instruction WHERE status = 'expired'").await;
        (expired == n).then_some(())
    })
    .await;
    let seen = collect(&mut app).await;
    assert!(seen.values().all(|(c, _)| *c == 1), "an event was published twice");
    let mut by_decision: HashMap<(String, String, i64), usize> = HashMap::new();
    for (_, v) in seen.values() {
        let ty = v["event_type"].as_str().unwrap().to_string();
        if ty.starts_with("agent.instruction.") {
            let key = (ty, v["instruction_id"].as_str().unwrap().to_string(), v["retry_count"].as_i64().unwrap_or(-1));
            *by_decision.entry(key).or_default() += 1;
        }
    }
    assert!(by_decision.values().all(|c| *c == 1), "a decision was made twice");
    let count = |ty: &str| by_decision.keys().filter(|k| k.0 == ty).count() as i64;
    assert_eq!(count("agent.instruction.created"), n);
    assert_eq!(count("agent.instruction.retry"), 2 * n);
    assert_eq!(count("agent.instruction.expired"), n);
    second.stop().await.unwrap();
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_with_batches_in_flight_publishes_each_event_once_in_outbox_order() {
    let mut app = TestApp::start_with(|s| {
        s.outbox.batch_size = 7;
        s.outbox.pipeline = 3.try_into().unwrap();
    })
    .await;
    const N: i64 = 500;
    // One commit of N events: the relay needs 72 batches of 7, at most 3 in flight.
    app.db
        .execute(
            "WITH v AS (SELECT g, gen_random_uuid() AS u FROM generate_series(1, $1::bigint) g) \
             INSERT INTO event_outbox (event_id, event_type, payload) \
             SELECT u, 'agent.session.created', jsonb_build_object('event_type', 'agent.session.created', \
               'event_id', u, 'seq', g) FROM v ORDER BY g",
            &[&N],
        )
        .await
        .unwrap();
    let events = app.drain_events().await;
    let seqs: Vec<i64> = events
        .iter()
        .filter(|e| e["event_type"] == "agent.session.created")
        .map(|e| e["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, (1..=N).collect::<Vec<_>>(), "every event once, in outbox order");
    assert_eq!(app.unpublished().await, 0);
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_that_dies_loses_its_lease_to_another_which_publishes_the_same_events() {
    let mut app = TestApp::unstarted_with(|_| {}).await;
    for i in 0..5 {
        app.manager.create_session(&format!("lease-{i}"), None, None, None, None).await.unwrap();
    }
    // A relay takes the lease for one second, claims the batch and dies before publishing it.
    let pool = &app.manager.pool().clone();
    let dead = relay::RelayIdentity { holder: "dead relay".into(), instance: "1".into() };
    assert_eq!(relay::sql::acquire(pool, &dead, 1.0).await.unwrap(), relay::Acquired::Yes);
    let window = relay::Window { rescan: true, ..Default::default() };
    let claimed = relay::sql::claim(pool, &dead, 1.0, &window, 100).await.unwrap().expect("the lease is held");
    let claimed: Vec<String> = claimed.iter().map(|e| e.event_id.to_string()).collect();
    assert_eq!(claimed.len(), 5);
    let conn = connect(&app.settings.amqp.url, "lease test").await.unwrap();
    let ch = agent_connection_manager::amqp::confirm_channel(&conn).await.unwrap();
    let publishing = Publishing::new(&app.topology().event_exchange, 100);
    let metrics = Metrics::new();
    // While the lease holds, another relay stands by; no transaction is open meanwhile.
    assert_eq!(relay_once(pool, &ch, &publishing, &metrics).await.unwrap(), 0);
    let open: i64 = app
        .scalar("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND xact_start IS NOT NULL AND pid <> pg_backend_pid()")
        .await;
    assert_eq!(open, 0, "a transaction stays open after the claim");
    assert_eq!(app.unpublished().await, 5, "a claim writes nothing to the events");
    // Once it expires, the other relay takes the lease over and publishes the rows with the same event_id.
    let published = eventually("the lease to expire and the other relay to publish", Duration::from_secs(10), || {
        let (ch, publishing, metrics) = (&ch, &publishing, &metrics);
        async move { Some(relay_once(pool, ch, publishing, metrics).await.unwrap()).filter(|n| *n > 0) }
    })
    .await;
    assert_eq!(published, 5);
    assert_eq!(app.unpublished().await, 0, "published events are deleted");
    let mut published: Vec<String> = app
        .events_of("agent.session.created", 5)
        .await
        .iter()
        .map(|v| v["event_id"].as_str().unwrap().into())
        .collect();
    let mut claimed = claimed;
    claimed.sort();
    published.sort();
    assert_eq!(published, claimed);
    let holder: String = app.scalar("SELECT holder FROM outbox_relay").await;
    assert_eq!(holder, publishing.identity.holder, "the lease records which relay holds it");
    // The dead relay's next claim finds the lease gone.
    assert!(relay::sql::claim(pool, &dead, 1.0, &window, 100).await.unwrap().is_none());
    let _ = conn.close(200, "done".into()).await;
    app.cleanup().await;
}
