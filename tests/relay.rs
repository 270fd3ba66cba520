//! The relay without NOTIFY: one relay publishes at a time under a lease, others stand by; events committed by
//! another process are found by the poll; a vanished lease holder's events are published once its lease expires.

mod common;

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use agent_connection_manager::amqp::{confirm_channel, connect};
use agent_connection_manager::metrics::Metrics;
use agent_connection_manager::relay::{self, OutboxSignal, Publishing, RelayConfig};
use agent_connection_manager::AgentConnectionManager;
use common::{eventually, TestApp};
use tokio_util::sync::CancellationToken;

/// Inserts `n` events in one commit, as another process would (nothing in this process is told).
async fn insert_events(app: &TestApp, n: i64, tag: &str) {
    app.db
        .execute(
            "WITH v AS (SELECT g, gen_random_uuid() AS u FROM generate_series(1, $1::bigint) g) \
             INSERT INTO event_outbox (event_id, event_type, payload) \
             SELECT u, 'agent.session.created', jsonb_build_object('event_type', 'agent.session.created', \
               'event_id', u, 'tag', $2::text, 'seq', g) FROM v ORDER BY g",
            &[&n, &tag],
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_committed_by_another_process_are_published_by_the_poll() {
    let mut app = TestApp::start().await;
    let triggers: i64 = app
        .scalar("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'event_outbox'::regclass AND NOT tgisinternal")
        .await;
    assert_eq!(triggers, 0, "no trigger notifies on outbox inserts");
    // A manager with its own pool and no running relay: its commits wake nobody in the worker.
    let other = AgentConnectionManager::new(app.settings.clone()).unwrap();
    let sid = other.create_session("elsewhere", None, Some("from another pool"), None, None).await.unwrap();
    let created = app.next_event("agent.session.created").await;
    assert_eq!(created["session_id"], sid.as_str());
    // A plain insert through SQL.
    insert_events(&app, 3, "sql").await;
    let sql = app.events_of("agent.session.created", 3).await;
    assert!(sql.iter().all(|v| v["tag"] == "sql"), "{sql:?}");
    eventually("published events deleted", Duration::from_secs(10), || async {
        (app.unpublished().await == 0).then_some(())
    })
    .await;
    app.cleanup().await;
}

/// A relay like the worker's, on its own connection, with its own metrics.
async fn start_relay(
    app: &TestApp,
    shutdown: &CancellationToken,
) -> (Arc<Metrics>, tokio::task::JoinHandle<agent_connection_manager::Result<()>>, lapin::Connection) {
    let conn = connect(&app.settings.amqp.url, "relay test").await.unwrap();
    let channel = confirm_channel(&conn).await.unwrap();
    let metrics = Arc::new(Metrics::new());
    let cfg = RelayConfig {
        pool: app.manager.pool().clone(),
        channel,
        publishing: Publishing::new(&app.topology().event_exchange, 7),
        pipeline: 3,
        poll: Duration::from_millis(50),
        wake: OutboxSignal::default(),
        blocked: Arc::new(AtomicBool::new(false)),
        metrics: metrics.clone(),
        shutdown: shutdown.clone(),
    };
    (metrics, tokio::spawn(relay::run(cfg)), conn)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_relays_at_once_publish_each_event_once_one_leading_the_other_standing_by() {
    let mut app = TestApp::unstarted_with(|_| {}).await;
    let shutdown = CancellationToken::new();
    let (m1, r1, c1) = start_relay(&app, &shutdown).await;
    let (m2, r2, c2) = start_relay(&app, &shutdown).await;
    // Commits spread out while both run: 20 commits of 1..20 events.
    let mut expected = 0;
    for i in 1..=20 {
        insert_events(&app, i, &format!("commit-{i}")).await;
        expected += i;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let events = app.drain_events().await;
    let mut per_id: HashMap<String, usize> = HashMap::new();
    for v in &events {
        *per_id.entry(v["event_id"].as_str().unwrap().to_string()).or_default() += 1;
    }
    assert_eq!(per_id.len() as i64, expected, "every event published");
    assert!(per_id.values().all(|n| *n == 1), "an event was published twice");
    let (p1, p2) = (m1.events_published.get(), m2.events_published.get());
    assert_eq!(p1 + p2, expected as u64);
    let (l1, l2) = (m1.outbox_relay_leader.get(), m2.outbox_relay_leader.get());
    assert_eq!((l1 + l2, p1.min(p2)), (1, 0), "one relay leads and publishes everything: {p1} and {p2} published");
    // Both still run, and stop cleanly (the leader gives its lease back).
    assert!(!r1.is_finished() && !r2.is_finished(), "a relay stopped");
    shutdown.cancel();
    r1.await.unwrap().unwrap();
    r2.await.unwrap().unwrap();
    let expired: bool = app.scalar("SELECT lease_until < now() FROM outbox_relay").await;
    assert!(expired, "the lease is given back at shutdown");
    let _ = c1.close(200, "done".into()).await;
    let _ = c2.close(200, "done".into()).await;
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_a_vanished_lease_holder_are_published_once_its_lease_expires() {
    let mut app = TestApp::unstarted_with(|_| {}).await;
    for i in 0..5 {
        app.manager.create_session(&format!("vanished-{i}"), None, None, None, None).await.unwrap();
    }
    // A relay took the lease and vanished: it holds it for 3 more seconds.
    app.db
        .execute("UPDATE outbox_relay SET holder = 'vanished', lease_until = now() + interval '3 seconds'", &[])
        .await
        .unwrap();
    app.manager.start().await.unwrap();
    // Until the lease expires the worker's relay stands by: while the vanished relay holds it, nothing is published.
    eventually("the worker's relay to take the expired lease", Duration::from_secs(20), || async {
        let row = app
            .db
            .query_one("SELECT (SELECT count(*) FROM event_outbox), holder, lease_until > now() FROM outbox_relay", &[])
            .await
            .unwrap();
        let (left, holder, valid): (i64, String, bool) = (row.get(0), row.get(1), row.get(2));
        if holder == "vanished" && valid {
            assert_eq!(left, 5, "events were published while another relay held the lease");
            return None;
        }
        (holder != "vanished").then_some(())
    })
    .await;
    let agents: std::collections::BTreeSet<String> = app
        .events_of("agent.session.created", 5)
        .await
        .iter()
        .map(|v| v["agent_id"].as_str().unwrap().to_string())
        .collect();
    let want: std::collections::BTreeSet<String> = (0..5).map(|i| format!("vanished-{i}")).collect();
    assert_eq!(agents, want, "the first five events are one agent.session.created for each session made");
    eventually("published events deleted", Duration::from_secs(10), || async {
        (app.unpublished().await == 0).then_some(())
    })
    .await;
    assert_eq!(app.manager.metrics().outbox_relay_leader.get(), 1);
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_worker_takes_its_lease_back_at_once_and_its_old_run_stands_by() {
    let app = TestApp::unstarted_with(|_| {}).await;
    let pool = app.manager.pool().clone();
    let run = |holder: &str, instance: &str| relay::RelayIdentity { holder: holder.into(), instance: instance.into() };
    let (old, new, other) = (run("worker-7", "run-1"), run("worker-7", "run-2"), run("worker-8", "run-1"));
    let window = relay::Window { rescan: true, ..Default::default() };
    // The old run holds a long lease; another worker cannot take it before it expires.
    assert_eq!(relay::sql::acquire(&pool, &old, 600.0).await.unwrap(), relay::Acquired::Yes);
    assert_eq!(relay::sql::acquire(&pool, &other, 600.0).await.unwrap(), relay::Acquired::No);
    // The same worker.id restarted: it takes the lease at once, and says it took it from another run of itself.
    assert_eq!(relay::sql::acquire(&pool, &new, 600.0).await.unwrap(), relay::Acquired::FromSameHolder);
    assert_eq!(relay::sql::acquire(&pool, &new, 600.0).await.unwrap(), relay::Acquired::Yes, "a renewal");
    // The old run, should it still be alive (stalled), can neither claim, renew nor give the lease back.
    assert!(relay::sql::claim(&pool, &old, 600.0, &window, 10).await.unwrap().is_none(), "the old run claims");
    assert!(!relay::sql::renew(&pool, &old, 600.0).await.unwrap(), "the old run renews");
    relay::sql::release(&pool, &old).await.unwrap();
    assert!(relay::sql::claim(&pool, &new, 600.0, &window, 10).await.unwrap().is_some(), "the new run claims");
    assert!(relay::sql::renew(&pool, &new, 600.0).await.unwrap(), "the new run renews");
    let (holder, instance): (String, String) = {
        let row = app.db.query_one("SELECT holder, instance FROM outbox_relay", &[]).await.unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!((holder.as_str(), instance.as_str()), ("worker-7", "run-2"));
    app.cleanup().await;
}
