//! One bad heartbeat costs one heartbeat: a value the database refuses is dead-lettered alone and the rest of its
//! batch applies in one transaction; a new connection named by two agents in one batch is the first one's.

mod common;

use std::time::Duration;

use agent_connection_manager::amqp::json_properties;
use agent_connection_manager::commands::heartbeat::{apply_batch, Heartbeat};
use common::{eventually, TestApp};
use serde_json::json;

fn hb(agent: &str, session: &str, connection: &str) -> Heartbeat {
    serde_json::from_value(json!({"agent_id": agent, "session_id": session, "connection_id": connection})).unwrap()
}

/// Makes the test database refuse a heartbeat whose `client_info` has the key `refuse` (a CHECK violation, class
/// 23, as the database refuses a value it cannot store: no such value gets past parsing any more), and records the
/// id of every transaction that writes a connection row, in `written_by`.
async fn refuse_marked_client_info_and_record_transactions(app: &TestApp) {
    app.db
        .batch_execute(
            "ALTER TABLE agent_connection ADD CONSTRAINT test_refused \
               CHECK (client_info IS NULL OR NOT client_info ? 'refuse'); \
             CREATE TABLE written_by (xid xid8 PRIMARY KEY); \
             CREATE FUNCTION record_writer() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN INSERT INTO written_by VALUES (pg_current_xact_id()) ON CONFLICT DO NOTHING; RETURN NULL; END $$; \
             CREATE TRIGGER record_writer AFTER INSERT OR UPDATE ON agent_connection \
               FOR EACH ROW EXECUTE FUNCTION record_writer();",
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_heartbeat_is_left_out_of_one_transaction_for_the_rest() {
    use agent_connection_manager::commands::heartbeat::{apply_batch_isolating, Rules};
    let app = TestApp::unstarted_with(|_| {}).await;
    refuse_marked_client_info_and_record_transactions(&app).await;
    let sid = app.manager.create_session("a1", None, None, None, None).await.unwrap();
    let mut batch: Vec<Heartbeat> = (0..50).map(|i| hb("a1", &sid, &format!("c{i}"))).collect();
    batch[20] = serde_json::from_value(
        json!({"agent_id": "a1", "session_id": sid, "connection_id": "bad", "client_info": {"refuse": 1}}),
    )
    .unwrap();
    // As a whole, the batch fails on the refused value.
    let whole = apply_batch(app.manager.pool(), &batch).await.unwrap_err();
    assert!(whole.poison_reason().is_some(), "{whole}");
    let mut signalled = false;
    let (report, refused) =
        apply_batch_isolating(app.manager.pool(), &batch, &Rules::default(), || signalled = true).await.unwrap();
    assert!(signalled);
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0].0, 20, "the refused heartbeat, by its index");
    assert!(refused[0].1.to_string().starts_with("rejected by the database"), "{}", refused[0].1);
    assert_eq!((report.received, report.applied, report.opened, report.rejected), (50, 49, 49, 0));
    assert_eq!(app.scalar::<i64>("SELECT count(*) FROM agent_connection").await, 49);
    assert_eq!(app.scalar::<i64>("SELECT count(*) FROM agent_connection WHERE connection_id = 'bad'").await, 0);
    assert_eq!(app.scalar::<i64>("SELECT count(*) FROM written_by").await, 1, "one transaction wrote them all");
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_refused_heartbeat_among_a_queued_batch_costs_one_dead_letter() {
    let app = TestApp::unstarted_with(|_| {}).await;
    refuse_marked_client_info_and_record_transactions(&app).await;
    let sid = app.manager.create_session("a1", None, None, None, None).await.unwrap();
    let n = 300;
    let bad = json!({"type": "agent.heartbeat", "agent_id": "a1", "session_id": sid, "connection_id": "bad",
                     "client_info": {"refuse": true}})
    .to_string();
    for i in 0..n {
        if i == n / 2 {
            app.client.publish_raw("agent.heartbeat", bad.as_bytes(), json_properties()).await.unwrap();
        }
        app.client.heartbeat("a1", &sid, &format!("c{i}")).await.unwrap();
    }
    app.manager.start().await.unwrap();
    let letters = common::dead_letters(&app.settings, 1).await;
    assert_eq!(letters[0].1, bad.as_bytes(), "the refused heartbeat is the dead letter");
    assert!(letters[0].0.starts_with("rejected by the database"), "{}", letters[0].0);
    eventually("every good heartbeat applied", Duration::from_secs(20), || async {
        (app.scalar::<i64>("SELECT count(*) FROM agent_connection").await == n as i64).then_some(())
    })
    .await;
    let (_c, ch) = common::amqp_channel(&app.settings).await;
    let queue = app.topology().heartbeat_queue;
    eventually("the heartbeat queue drained and acknowledged", Duration::from_secs(20), || async {
        let q = common::queue_counts(&ch, &queue).await;
        (q == (0, 1)).then_some(())
    })
    .await;
    // Each batch committed once, the one with the refused heartbeat included: no transaction per heartbeat.
    let transactions: i64 = app.scalar("SELECT count(*) FROM written_by").await;
    let batches = app.heartbeat_batches();
    assert!(
        transactions as f64 <= batches,
        "{transactions} transactions wrote connections for {batches} batches of {} heartbeats",
        n + 1
    );
    assert_eq!(app.scalar::<i64>("SELECT count(*) FROM agent_connection WHERE connection_id = 'bad'").await, 0);
    let dead = common::queue_counts(&ch, &app.topology().dead_letter).await;
    assert_eq!(dead.0, 0, "only the refused heartbeat was dead-lettered");
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_connection_named_by_two_agents_in_one_batch_is_the_first_ones_and_the_other_is_rejected() {
    let app = TestApp::unstarted_with(|_| {}).await;
    let mine = app.manager.create_session("a1", None, None, None, None).await.unwrap();
    let theirs = app.manager.create_session("a2", None, None, None, None).await.unwrap();
    let report = apply_batch(app.manager.pool(), &[hb("a1", &mine, "dup"), hb("a2", &theirs, "dup")]).await.unwrap();
    assert_eq!((report.received, report.opened, report.applied, report.rejected), (2, 1, 1, 1), "{report:?}");
    assert_eq!(app.scalar::<i64>("SELECT count(*) FROM agent_connection").await, 1);
    app.cleanup().await;
}
