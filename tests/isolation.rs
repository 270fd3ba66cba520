//! Isolation between prefixes, and nothing vanishing: one prefix per database. Two workers with different prefixes started at once on one
//! database: one starts and serves its own prefix (its events on its own exchange, none on the other's), the other
//! refuses to start with a configuration error naming both prefixes and the key. And what no binding of the command
//! exchange matches is dead-lettered as `unroutable` and answered `invalid`.

mod common;

use std::time::Duration;

use agent_connection_manager::amqp::{json_properties, Topology};
use agent_connection_manager::client::Subscription;
use agent_connection_manager::client::{reply_result, Client};
use agent_connection_manager::error::Error;
use agent_connection_manager::AgentConnectionManager;
use common::{amqp_channel, TestApp};
use serde_json::json;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_prefixes_on_one_database_one_starts_the_other_refuses_naming_both() {
    let a = TestApp::unstarted_with(|_| {}).await;
    let mut b_settings = a.settings.clone();
    b_settings.amqp.prefix = format!("{}-b", a.settings.amqp.prefix);
    let _b_guard = common::CleanupGuard::new(&b_settings);
    let (conn, _) = amqp_channel(&b_settings).await;
    Topology::for_settings(&b_settings).declare(&conn, &b_settings).await.expect("b's topology declares");
    let _ = conn.close(200, "done".into()).await;
    let b = AgentConnectionManager::new(b_settings.clone()).expect("manager b");
    let clients = [
        Client::connect(&a.settings.amqp.url, &a.settings.amqp.prefix).await.expect("client a"),
        Client::connect(&b_settings.amqp.url, &b_settings.amqp.prefix).await.expect("client b"),
    ];
    let mut subscriptions =
        [clients[0].subscribe("#").await.expect("a's events"), clients[1].subscribe("#").await.expect("b's events")];
    let prefixes = [a.settings.amqp.prefix.clone(), b_settings.amqp.prefix.clone()];

    // Both at once: exactly one of them records its prefix.
    let (ra, rb) = tokio::join!(a.manager.start(), b.start());
    let (winner, refused) = match (ra, rb) {
        (Ok(()), Err(e)) => (0, e),
        (Err(e), Ok(())) => (1, e),
        other => panic!("exactly one worker must start, got {other:?}"),
    };
    let loser = 1 - winner;
    let message = refused.to_string();
    assert!(matches!(refused, Error::Config(_)), "a configuration error, got {refused:?}");
    for prefix in &prefixes {
        assert!(message.contains(&format!("`{prefix}`")), "the refusal names {prefix}: {message}");
    }
    assert!(message.contains("amqp.prefix"), "the refusal names the key: {message}");
    // A second try is refused the same way: the database's prefix is recorded, not raced for.
    let again = if loser == 0 { a.manager.start().await } else { b.start().await };
    assert!(matches!(again, Err(Error::Config(_))), "the refused worker is refused again: {again:?}");

    // The worker that started serves its own prefix only: a session created through it is announced on its events
    // exchange, and nothing reaches the other prefix's (read up to a marker published after the event).
    let reply = clients[winner]
        .request(&json!({"type": "session.create", "agent_id": "agent-iso"}), None, Duration::from_secs(20))
        .await
        .expect("a reply");
    let id = reply_result(&reply).expect("session.create applied")["session_id"].as_str().expect("an id").to_string();
    let event = next_within(&mut subscriptions[winner], "agent.session.created on the started prefix").await;
    assert_eq!(event["event_type"], "agent.session.created", "{event}");
    assert_eq!(event["session_id"], id.as_str(), "{event}");
    let (conn, ch) = amqp_channel(&b_settings).await;
    let other_exchange = Topology::new(&prefixes[loser]).event_exchange;
    ch.basic_publish(
        other_exchange.as_str().into(),
        "marker".into(),
        Default::default(),
        b"{\"marker\":true}",
        json_properties(),
    )
    .await
    .expect("marker published");
    let mut before_marker = Vec::new();
    loop {
        let v = next_within(&mut subscriptions[loser], "the marker on the other prefix").await;
        if v["marker"] == true {
            break;
        }
        before_marker.push(v);
    }
    assert!(before_marker.is_empty(), "events reached the other prefix {}: {before_marker:?}", prefixes[loser]);
    let _ = conn.close(200, "done".into()).await;

    let _ = b.stop().await;
    for c in clients {
        c.close().await;
    }
    common::cleanup(&b_settings).await;
    a.cleanup().await;
}

/// The next event of a subscription, failing the test with `what` when none comes within 20 seconds.
async fn next_within(subscription: &mut Subscription, what: &str) -> Value {
    match subscription.next_raw(Duration::from_secs(20)).await {
        Some((_, v)) => v,
        None => panic!("timed out after 20s waiting for: {what}"),
    }
}

/// Nothing published to the command exchange vanishes: a type no binding matches (`nope.nope`) and a known type
/// under a routing key no binding matches (`session.create` sent as `foo.bar`) reach `<prefix>.unroutable` through the
/// command exchange's alternate exchange, are dead-lettered with `x-acm-error` `unroutable: …` and answered `invalid`
/// (with `reply_to` set), and one without `reply_to` is dead-lettered too; nothing is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unroutable_messages_are_dead_lettered_and_answered_invalid() {
    let app = TestApp::start().await;
    let timeout = Duration::from_secs(20);
    let create = json!({"type": "session.create", "agent_id": "agent-unroutable"}).to_string();
    for (key, body) in [("nope.nope", r#"{"type":"nope.nope"}"#.to_string()), ("foo.bar", create.clone())] {
        let reply = app.client.request_raw(key, body.as_bytes(), None, timeout).await.expect("a reply");
        let error = reply_result(&reply).expect_err("refused");
        assert_eq!(error.code, "invalid", "{reply}");
        assert!(error.message.contains("unroutable") && error.message.contains(key), "{reply}");
    }
    app.client.publish_raw("also.nothing", create.as_bytes(), json_properties()).await.expect("published");
    let dead = common::dead_letters(&app.settings, 3).await;
    let reasons: Vec<&str> = dead.iter().map(|(r, _)| r.as_str()).collect();
    for key in ["nope.nope", "foo.bar", "also.nothing"] {
        assert!(
            reasons.iter().any(|r| r.starts_with("unroutable:") && r.contains(&format!("`{key}`"))),
            "a dead letter for {key}: {reasons:?}"
        );
    }
    assert_eq!(app.scalar::<i64>("SELECT count(*) FROM agent_session").await, 0, "nothing applied");
    app.cleanup().await;
}

/// A command queue bound by an earlier version with family keys (`session.#`) loses them when the topology is
/// declared again: an unknown type of that family is then unroutable, not pulled onto the command queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn declaring_removes_the_family_bindings_of_earlier_versions() {
    let app = TestApp::start().await;
    let topology = app.topology();
    let (conn, ch) = amqp_channel(&app.settings).await;
    let (queue, exchange) = (topology.command_queue.as_str(), topology.command_exchange.as_str());
    let options = lapin::options::QueueBindOptions::default();
    ch.queue_bind(queue.into(), exchange.into(), "session.#".into(), options, Default::default()).await.unwrap();
    topology.declare(&conn, &app.settings).await.expect("the topology declares again");
    let _ = conn.close(200, "done".into()).await;
    let body = r#"{"type":"session.bogus"}"#;
    let reply = app.client.request_raw("session.bogus", body.as_bytes(), None, Duration::from_secs(20)).await;
    let error = reply_result(&reply.expect("a reply")).expect_err("refused");
    assert!(error.message.starts_with("unroutable"), "session.# is gone, so no binding matches: {}", error.message);
    app.cleanup().await;
}

/// A command exchange declared by an earlier version (without `alternate-exchange`, which cannot be added to an
/// existing exchange) does not stop the worker: it is used as it is (with a warning saying how to add one by a
/// policy), and commands are applied as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_command_exchange_without_an_alternate_exchange_is_used_as_it_is() {
    use lapin::options::{ExchangeDeclareOptions, ExchangeDeleteOptions};
    let mut app = TestApp::unstarted_with(|_| {}).await;
    let (conn, ch) = amqp_channel(&app.settings).await;
    let exchange = app.topology().command_exchange;
    ch.exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default()).await.expect("deleted");
    let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
    ch.exchange_declare(exchange.as_str().into(), lapin::ExchangeKind::Topic, durable, Default::default())
        .await
        .expect("declared as an earlier version did");
    let _ = conn.close(200, "done".into()).await;
    app.manager.start().await.expect("the worker starts");
    common::eventually("the worker's consumers to run (its bindings declared)", Duration::from_secs(20), || async {
        app.manager.health().consumers_running.load(std::sync::atomic::Ordering::Relaxed).then_some(())
    })
    .await;
    let session = app.session("agent-old-exchange").await;
    let event = app.next_event("agent.session.created").await;
    assert_eq!(event["session_id"], session.as_str());
    app.cleanup().await;
}
