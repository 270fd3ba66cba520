//! Idempotency: a command sent again with its `message_id` gets the first reply and changes nothing; the same
//! `message_id` with another body is a conflict. (Two senders' keys are apart: `tests/security.rs`, which has the
//! broker users.)

mod common;

use std::time::Duration;

use common::TestApp;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_message_id_gets_the_first_reply_and_changes_nothing() {
    let mut app = TestApp::start().await;
    let body = json!({"type": "session.create", "agent_id": "a1"});
    let first = app.client.request(&body, Some("msg-1"), Duration::from_secs(20)).await.unwrap();
    let second = app.client.request(&body, Some("msg-1"), Duration::from_secs(20)).await.unwrap();
    assert_eq!(first, second, "the repeat gets the first reply");
    let sessions: i64 = app.scalar("SELECT count(*) FROM agent_session").await;
    assert_eq!(sessions, 1);
    let sid = first["result"]["session_id"].as_str().unwrap().to_string();
    let create = json!({"type": "instruction.create", "agent_id": "a1", "session_id": sid, "instruction_type": "t", "payload": 1});
    let a = app.client.request(&create, Some("msg-2"), Duration::from_secs(20)).await.unwrap();
    let b = app.client.request(&create, Some("msg-2"), Duration::from_secs(20)).await.unwrap();
    assert_eq!(a, b);
    let ack = json!({"type": "instruction.ack", "instruction_id": a["result"]["instruction_id"], "agent_id": "a1",
                     "session_id": sid, "status": "processed"});
    let a1 = app.client.request(&ack, Some("msg-3"), Duration::from_secs(20)).await.unwrap();
    let a2 = app.client.request(&ack, Some("msg-3"), Duration::from_secs(20)).await.unwrap();
    assert_eq!(a1, a2);
    assert_eq!(a1["result"]["accepted"], true);
    assert_eq!(app.scalar::<i64>("SELECT count(*) FROM agent_instruction").await, 1);
    assert_eq!(app.scalar::<i64>("SELECT count(*) FROM agent_instruction_acknowledgement").await, 1);
    assert_eq!(app.published(|_| true).await, 3, "created, created, acknowledged");
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_message_id_with_another_body_is_a_conflict_and_changes_nothing() {
    let mut app = TestApp::start().await;
    let t = Duration::from_secs(20);
    let first = json!({"type": "session.create", "agent_id": "a1", "session_id": "s1"});
    let other = json!({"type": "session.create", "agent_id": "a1", "session_id": "s2"});
    let a = app.client.request(&first, Some("m-1"), t).await.unwrap();
    assert_eq!(a["result"]["session_id"], "s1", "{a}");
    let b = app.client.request(&other, Some("m-1"), t).await.unwrap();
    assert_eq!(b["error"]["code"], "conflict", "{b}");
    assert_eq!(b["error"]["message"], "message_id m-1 was already used for a different message");
    // The same body again is a redelivery: the first reply.
    assert_eq!(app.client.request(&first, Some("m-1"), t).await.unwrap(), a);
    let ids: Vec<String> =
        app.db.query("SELECT session_id FROM agent_session", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(ids, ["s1"], "the second command was not applied");
    assert_eq!(app.published(|_| true).await, 1);
    // The same message_id for another type is another key.
    let close =
        app.client.request(&json!({"type": "session.close", "session_id": "s1"}), Some("m-1"), t).await.unwrap();
    assert_eq!(close["result"]["closed"], true, "{close}");
    app.cleanup().await;
}
