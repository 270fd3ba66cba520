//! Poison: every malformed case is dead-lettered with its reason while valid messages around it are applied.

mod common;

use std::time::Duration;

use agent_connection_manager::amqp::json_properties;
use agent_connection_manager::client::reply_result;
use common::{dead_letters, eventually, TestApp};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_are_dead_lettered_with_their_reason() {
    let app = TestApp::start_with(|s| s.amqp.max_message_bytes = 2048.try_into().unwrap()).await;
    let sid = app.session("a1").await;
    let big = format!(r#"{{"type":"session.close","session_id":"{}"}}"#, "x".repeat(4096));
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("session.create", b"not json".to_vec(), "not JSON"),
        ("session.create", vec![0xff, 0xfe, 0x00], "not JSON"),
        ("session.create", b"[1, 2]".to_vec(), "not a JSON object"),
        ("session.create", br#"{"agent_id": "a"}"#.to_vec(), "missing field `type`"),
        ("session.create", br#"{"type": "session.bogus"}"#.to_vec(), "unknown type `session.bogus`"),
        // No binding matches an unknown routing key: the alternate exchange's queue, dead-lettered there.
        ("session.bogus", br#"{"type": "session.bogus", "n": 2}"#.to_vec(), "unroutable: no binding"),
        ("session.close", br#"{"type": "session.close"}"#.to_vec(), "missing field `session_id`"),
        (
            "instruction.create",
            format!(r#"{{"type":"instruction.create","session_id":"{sid}","agent_id":"a1","instruction_type":"t","payload":1,"max_retries":"3"}}"#)
                .into_bytes(),
            "field `max_retries`",
        ),
        ("instruction.ack", br#"{"type":"instruction.ack","instruction_id":"not-a-uuid","agent_id":"a1","session_id":"s","status":"processed"}"#.to_vec(), "field `instruction_id`"),
        ("instruction.ack", format!(r#"{{"type":"instruction.ack","instruction_id":"{}","agent_id":"a1","session_id":"s","status":"great"}}"#, uuid::Uuid::nil()).into_bytes(), "field `status`"),
        ("session.close", big.into_bytes(), "too large"),
        (
            "instruction.create",
            format!(r#"{{"type":"instruction.create","session_id":"{sid}","agent_id":"a1","instruction_type":"t","payload":"\u0000"}}"#)
                .into_bytes(),
            "field `payload`: contains a NUL character",
        ),
        ("agent.heartbeat", br#"{"type":"agent.heartbeat","agent_id":"a1","session_id":"s"}"#.to_vec(), "missing field `connection_id`"),
        ("agent.heartbeat", br#"{"type":"session.create","agent_id":"a1"}"#.to_vec(), "forbidden: routing key `agent.heartbeat` is not the message type `session.create`"),
        (
            "agent.heartbeat",
            format!(r#"{{"type":"agent.heartbeat","agent_id":"a1","session_id":"{sid}","connection_id":"c","client_info":"\u0000"}}"#)
                .into_bytes(),
            "field `client_info`: contains a NUL character",
        ),
    ];
    for (i, (key, body, _)) in cases.iter().enumerate() {
        app.client.publish_raw(key, body, json_properties()).await.unwrap();
        // A valid message after each poison one.
        app.client
            .send(&json!({"type": "session.create", "agent_id": format!("valid-{i}"), "session_id": format!("valid-{i}")}), None)
            .await
            .unwrap();
        app.client.heartbeat("a1", &sid, &format!("valid-{i}")).await.unwrap();
    }
    let letters = dead_letters(&app.settings, cases.len()).await;
    for (_, _, reason) in &cases {
        assert!(
            letters.iter().any(|(r, _)| r.contains(reason)),
            "no dead letter says `{reason}`: {:?}",
            letters.iter().map(|l| &l.0).collect::<Vec<_>>()
        );
    }
    // Exactly the poison: the original bodies, nothing else.
    let mut got: Vec<Vec<u8>> = letters.into_iter().map(|(_, b)| b).collect();
    let mut sent: Vec<Vec<u8>> = cases.iter().map(|c| c.1.clone()).collect();
    got.sort();
    sent.sort();
    assert_eq!(got, sent);
    let n = cases.len() as i64;
    eventually("every valid message applied", Duration::from_secs(20), || async {
        let sessions: i64 = app.scalar("SELECT count(*) FROM agent_session WHERE session_id LIKE 'valid-%'").await;
        let conns: i64 = app.scalar("SELECT count(*) FROM agent_connection WHERE connection_id LIKE 'valid-%'").await;
        (sessions == n && conns == n).then_some(())
    })
    .await;
    assert!(app.manager.health().consumers_running.load(std::sync::atomic::Ordering::Relaxed), "still consuming");
    let extra: i64 = app.scalar("SELECT count(*) FROM agent_instruction").await;
    assert_eq!(extra, 0);
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_with_reply_to_gets_an_invalid_reply() {
    let app = TestApp::start().await;
    let reply = app.client.request_raw("session.create", b"{oops", None, Duration::from_secs(20)).await.unwrap();
    let err = reply_result(&reply).unwrap_err();
    assert_eq!(err.code, "invalid");
    assert!(err.message.starts_with("not JSON"), "{}", err.message);
    let reply = app.client.request(&json!({"type": "session.create"}), None, Duration::from_secs(20)).await.unwrap();
    let err = reply_result(&reply).unwrap_err();
    assert_eq!(err.code, "invalid");
    assert!(err.message.contains("agent_id"), "{}", err.message);
    let letters = dead_letters(&app.settings, 2).await;
    assert_eq!(letters.len(), 2);
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_replies_not_dead_letters() {
    let app = TestApp::start().await;
    assert_eq!(app.refused(json!({"type": "session.create", "agent_id": "a1", "session_id": ""})).await, "invalid");
    assert_eq!(
        app.refused(json!({"type": "instruction.sent", "instruction_id": uuid::Uuid::new_v4()})).await,
        "not_found"
    );
    // Only the empty-id message above is poison (it fails parsing); the not_found is a plain refusal.
    let letters = dead_letters(&app.settings, 1).await;
    assert!(letters[0].0.contains("session_id"), "{}", letters[0].0);
    let (_c, ch) = common::amqp_channel(&app.settings).await;
    let q = common::queue_counts(&ch, &app.topology().dead_letter).await;
    assert_eq!(q.0, 0, "the refusal was not dead-lettered");
    app.cleanup().await;
}
