//! A command the broker redelivers after its effect was committed (the worker lost its connection before the
//! acknowledgement) is applied once: the redelivery gets the stored reply.

mod common;

use std::time::Duration;

use common::{eventually, rabbitmqctl, TestApp};
use serde_json::json;

/// The broker connection (its pid) of whoever consumes `queue`.
fn consumer_connection(queue: &str) -> String {
    let consumers = rabbitmqctl(&["list_consumers", "-q", "--no-table-headers", "queue_name", "channel_pid"]);
    let channel = consumers
        .lines()
        .find_map(|l| l.split_once('\t').filter(|(q, _)| *q == queue).map(|(_, ch)| ch.trim().to_string()))
        .unwrap_or_else(|| panic!("no consumer on {queue}: {consumers}"));
    let channels = rabbitmqctl(&["list_channels", "-q", "--no-table-headers", "pid", "connection"]);
    channels
        .lines()
        .find_map(|l| l.split_once('\t').filter(|(pid, _)| pid.trim() == channel).map(|(_, c)| c.trim().to_string()))
        .unwrap_or_else(|| panic!("no channel {channel}: {channels}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_redelivered_after_its_commit_has_one_effect() {
    let mut app = TestApp::start().await;
    // Counts every delivery the worker applies (the idempotency claim's insert fires the trigger even when the key
    // exists), and holds the first one's transaction for 8 s: long enough to cut the worker's broker connection
    // after the change but before the acknowledgement, so the broker redelivers a command already committed.
    app.db
        .batch_execute(
            "CREATE TABLE delivery_attempt (at timestamptz DEFAULT clock_timestamp());
             CREATE FUNCTION note_delivery_attempt() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 INSERT INTO delivery_attempt DEFAULT VALUES;
                 IF (SELECT count(*) FROM delivery_attempt) = 1 THEN PERFORM pg_sleep(8); END IF;
                 RETURN NEW;
             END $$;
             CREATE TRIGGER note_delivery_attempt BEFORE INSERT ON processed_message FOR EACH ROW
                 EXECUTE FUNCTION note_delivery_attempt();",
        )
        .await
        .unwrap();
    let body = json!({"type": "session.create", "agent_id": "a1", "session_id": "redelivered"});
    let queue = app.topology().command_queue;
    let connection = tokio::task::spawn_blocking(move || consumer_connection(&queue)).await.unwrap();
    let cut = async {
        eventually("the first delivery to be applying", Duration::from_secs(20), || async {
            let sleeping: i64 = app
                .scalar("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event = 'PgSleep'")
                .await;
            (sleeping == 1).then_some(())
        })
        .await;
        tokio::task::spawn_blocking(move || {
            rabbitmqctl(&["close_connection", &connection, "test: cut the worker off before its acknowledgement"])
        })
        .await
        .unwrap();
    };
    // The first reply is lost with the connection; the redelivery's reply arrives.
    let (reply, ()) = tokio::join!(app.client.request(&body, Some("msg-1"), Duration::from_secs(60)), cut);
    let reply = reply.expect("the redelivery is replied to");
    assert_eq!(reply["result"]["session_id"], "redelivered");
    assert_eq!(app.scalar::<i64>("SELECT count(*) FROM delivery_attempt").await, 2, "the broker redelivered once");
    assert_eq!(app.scalar::<i64>("SELECT count(*) FROM agent_session").await, 1);
    assert_eq!(app.published(|e| e["event_type"] == "agent.session.created").await, 1, "one effect, one event");
    app.cleanup().await;
}
