//! `amqp.url` naming several broker nodes: the worker and the client connect to the first that answers.

mod common;

use common::TestApp;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_does_not_answer_is_skipped_for_the_next() {
    // A port nothing listens on, then the real broker.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let app =
        TestApp::start_with(|s| s.amqp.url = format!("amqp://guest:guest@127.0.0.1:{dead}/%2f,{}", s.amqp.url)).await;
    let sid = app.session("a1").await;
    let closed = app.ok(json!({"type": "session.close", "session_id": sid})).await;
    assert_eq!(closed["closed"], true);
    app.cleanup().await;
}
