//! Heartbeat freshness is the broker's word: a heartbeat that waited in the queue longer than the stale window is
//! dropped by the broker and refreshes nothing; a heartbeat queue declared by an older version keeps working.

mod common;

use std::time::Duration;

use common::{eventually, TestApp};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_that_waited_longer_than_the_stale_window_refreshes_nothing() {
    let app = TestApp::unstarted_with(|s| s.sweeper.connection_stale_after_secs = 2).await;
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
