//! Idempotency: a command sent again with its `message_id` gets the first reply and changes nothing; the same
//! `message_id` with another body is a conflict; each sender's keys are its own, and one sender's flood of records or
//! dead letters pushes out nothing of another's.

mod common;

use std::time::Duration;

use common::broker_user::BrokerUser;
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
    let ids: Vec<String> = app.column("SELECT session_id FROM agent_session").await;
    assert_eq!(ids, ["s1"], "the second command was not applied");
    assert_eq!(app.published(|_| true).await, 1);
    // The same message_id for another type is another key.
    let close =
        app.client.request(&json!({"type": "session.close", "session_id": "s1"}), Some("m-1"), t).await.unwrap();
    assert_eq!(close["result"]["closed"], true, "{close}");
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_senders_may_use_the_same_message_id() {
    let app = TestApp::start().await;
    let prefix = app.settings.amqp.prefix.clone();
    let one = BrokerUser::create("backend-one");
    let two = BrokerUser::create("backend-two");
    let as_one = one.client(&prefix).await;
    let as_two = two.client(&prefix).await;
    let t = Duration::from_secs(20);
    let b1 = json!({"type": "session.create", "agent_id": "x", "session_id": "s-one"});
    let b2 = json!({"type": "session.create", "agent_id": "x", "session_id": "s-two"});
    let (r1, r2) = tokio::join!(as_one.request(&b1, Some("same"), t), as_two.request(&b2, Some("same"), t));
    assert_eq!(r1.unwrap()["result"]["session_id"], "s-one");
    assert_eq!(r2.unwrap()["result"]["session_id"], "s-two");
    assert_eq!(app.scalar::<i64>("SELECT count(*) FROM agent_session").await, 2, "both applied");
    let senders: Vec<String> =
        app.column("SELECT sender FROM processed_message WHERE message_id = 'same' ORDER BY sender").await;
    let mut expected = vec![one.name.clone(), two.name.clone()];
    expected.sort();
    assert_eq!(senders, expected, "each sender's key is its own");
    // Without a user_id the sender is '', a key of its own too.
    let r = app
        .client
        .request(&json!({"type": "session.create", "agent_id": "x", "session_id": "s-anon"}), Some("same"), t)
        .await
        .unwrap();
    assert_eq!(r["result"]["session_id"], "s-anon", "{r}");
    for c in [as_one, as_two] {
        c.close().await;
    }
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_senders_flood_pushes_out_nothing_of_anothers() {
    const FLOOD: usize = 400;
    let app = TestApp::start().await;
    let prefix = app.settings.amqp.prefix.clone();
    let quiet = BrokerUser::create("quiet-backend");
    let greedy = BrokerUser::create("greedy-backend");
    let as_quiet = quiet.client(&prefix).await;
    let as_greedy = greedy.client(&prefix).await;
    let t = Duration::from_secs(20);

    // The quiet sender's one idempotency record and one dead letter, first.
    let body = json!({"type": "session.create", "agent_id": "quiet", "session_id": "s-quiet"});
    let first = as_quiet.request(&body, Some("keep-me"), t).await.unwrap();
    assert_eq!(first["result"]["session_id"], "s-quiet", "{first}");
    let quiet_poison = json!({"type": "session.create", "agent_id": "", "session_id": "quiet-poison"});
    as_quiet.send(&quiet_poison, Some("quiet-poison")).await.unwrap();

    // The greedy sender: a record and a dead letter for every one of FLOOD messages.
    for chunk in (0..FLOOD).collect::<Vec<_>>().chunks(50) {
        let requests = chunk.iter().map(|i| {
            let b = json!({"type": "session.create", "agent_id": "greedy", "session_id": format!("s-greedy-{i}")});
            let client = &as_greedy;
            async move { client.request(&b, Some(&format!("greedy-{i}")), t).await }
        });
        for r in futures_util::future::join_all(requests).await {
            assert_eq!(r.expect("a reply")["ok"], true);
        }
    }
    for i in 0..FLOOD {
        let poison = json!({"type": "session.create", "agent_id": "", "session_id": format!("greedy-poison-{i}")});
        as_greedy.send(&poison, Some(&format!("poison-{i}"))).await.unwrap();
    }

    // Every dead letter is kept (no overflow pushes the oldest out), the quiet sender's among them.
    let letters = common::dead_letters(&app.settings, FLOOD + 1).await;
    let quiet_letters = letters.iter().filter(|(_, b)| b.as_slice() == quiet_poison.to_string().as_bytes()).count();
    assert_eq!(letters.len(), FLOOD + 1);
    assert_eq!(quiet_letters, 1, "the quiet sender's dead letter is kept");
    assert!(letters.iter().all(|(reason, _)| !reason.is_empty()), "each dead letter says why");
    // The quiet sender's record still answers its repeat with the first reply, and nothing is applied twice.
    assert_eq!(as_quiet.request(&body, Some("keep-me"), t).await.unwrap(), first);
    assert_eq!(app.scalar::<i64>("SELECT count(*) FROM agent_session WHERE agent_id = 'quiet'").await, 1);
    let records: i64 = app.scalar("SELECT count(*) FROM processed_message").await;
    assert_eq!(records, FLOOD as i64 + 1, "every record is kept, each under its sender");
    for c in [as_quiet, as_greedy] {
        c.close().await;
    }
    app.cleanup().await;
}
