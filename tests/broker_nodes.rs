//! Broker clusters: `amqp.url` naming several nodes (the worker and the client connect to the first that answers),
//! and a heartbeat queue that can be a replicated quorum queue.

mod common;

use agent_connection_manager::config::QueueType;
use common::TestApp;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_does_not_answer_is_skipped_for_the_next() {
    // A port nothing listens on, then the real broker.
    let dead = common::free_port();
    let app =
        TestApp::start_with(|s| s.amqp.url = format!("amqp://guest:guest@127.0.0.1:{dead}/%2f,{}", s.amqp.url)).await;
    let sid = app.session("a1").await;
    let closed = app.ok(json!({"type": "session.close", "session_id": sid})).await;
    assert_eq!(closed["closed"], true);
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_heartbeat_queue_can_be_a_quorum_queue() {
    let app = TestApp::start_with(|s| s.amqp.heartbeat_queue_type = QueueType::Quorum).await;
    let queue = app.topology().heartbeat_queue;
    let listed = common::rabbitmqctl(&["list_queues", "-q", "--no-table-headers", "name", "type"]);
    let kind = listed.lines().find_map(|l| l.split_once('\t').filter(|(n, _)| *n == queue).map(|(_, t)| t.trim()));
    assert_eq!(kind, Some("quorum"), "{queue} in: {listed}");
    let sid = app.session("a1").await;
    app.client.heartbeat("a1", &sid, "c1").await.unwrap();
    common::eventually("the heartbeat to open its connection", std::time::Duration::from_secs(20), || async {
        (app.scalar::<i64>("SELECT count(*) FROM agent_connection WHERE connection_id = 'c1'").await == 1).then_some(())
    })
    .await;
    app.cleanup().await;
}
