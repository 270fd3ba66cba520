//! W3C trace context across the broker: a command continues its `traceparent`, and its reply and the events it
//! causes carry that trace; a command without one, a heartbeat batch and a sweeper cycle each start a trace of their
//! own; the Rust client sends the caller's context.

mod common;

use std::time::Duration;

use agent_connection_manager::trace_context::{self, TraceContext};
use common::TestApp;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Consumer};
use serde_json::{json, Value};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// A header of a delivery as text.
fn header(props: &BasicProperties, key: &str) -> Option<String> {
    props.headers().as_ref()?.inner().get(key).and_then(|v| match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).to_string()),
        _ => None,
    })
}

/// The trace id of a `traceparent` header (its second field), failing when there is none.
fn trace_id(props: &BasicProperties, what: &str) -> String {
    let parent = header(props, "traceparent").unwrap_or_else(|| panic!("{what} has no traceparent"));
    let fields: Vec<&str> = parent.split('-').collect();
    assert_eq!(fields.len(), 4, "{what}: traceparent {parent} is not version 00");
    assert_eq!((fields[0], fields[1].len(), fields[2].len()), ("00", 32, 16), "{what}: traceparent {parent}");
    fields[1].to_string()
}

/// An exclusive server-named queue and its consumer; bound to the event exchange with `binding` when given.
async fn queue(ch: &Channel, app: &TestApp, binding: Option<&str>) -> (String, Consumer) {
    let options = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
    let q = ch.queue_declare("".into(), options, FieldTable::default()).await.unwrap();
    let name = q.name().to_string();
    if let Some(key) = binding {
        let exchange = app.topology().event_exchange;
        ch.queue_bind(
            name.as_str().into(),
            exchange.as_str().into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    }
    let consumer = ch
        .basic_consume(name.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap();
    (name, consumer)
}

/// The next delivery within 20 s: its properties and body.
async fn next(consumer: &mut Consumer, what: &str) -> (BasicProperties, Value) {
    let d = tokio::time::timeout(Duration::from_secs(20), consumer.next())
        .await
        .unwrap_or_else(|_| panic!("no {what} within 20 s"))
        .unwrap_or_else(|| panic!("the consumer of {what} ended"))
        .expect("a delivery");
    d.ack(BasicAckOptions::default()).await.expect("ack");
    (d.properties.clone(), serde_json::from_slice(&d.data).expect("JSON"))
}

/// Publishes `session.create` for `agent` with a reply queue and, when given, a `traceparent` and `tracestate`.
async fn create_session(app: &TestApp, ch: &Channel, reply_to: &str, agent: &str, parent: Option<&str>) {
    let mut props = agent_connection_manager::amqp::json_properties()
        .with_reply_to(ShortString::from(reply_to.to_string()))
        .with_correlation_id(ShortString::from(agent.to_string()));
    if let Some(p) = parent {
        let mut headers = FieldTable::default();
        headers.insert("traceparent".into(), AMQPValue::LongString(p.into()));
        headers.insert("tracestate".into(), AMQPValue::LongString("congo=t61rcWkgMzE".into()));
        props = props.with_headers(headers);
    }
    let body = json!({"type": "session.create", "agent_id": agent, "session_id": format!("s-{agent}")}).to_string();
    let exchange = app.topology().command_exchange;
    ch.basic_publish(
        exchange.as_str().into(),
        "session.create".into(),
        BasicPublishOptions::default(),
        body.as_bytes(),
        props,
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commands_trace_comes_back_on_its_reply_and_its_events() {
    let app = TestApp::start().await;
    let (_conn, ch) = common::amqp_channel(&app.settings).await;
    let (replies, mut reply_consumer) = queue(&ch, &app, None).await;
    let (_, mut events) = queue(&ch, &app, Some("agent.session.created")).await;

    create_session(&app, &ch, &replies, "traced", Some(PARENT)).await;
    let (reply, body) = next(&mut reply_consumer, "the reply").await;
    assert_eq!(body["ok"], true, "{body}");
    assert_eq!(trace_id(&reply, "the reply"), TRACE_ID, "the reply continues the caller's trace");
    let span = header(&reply, "traceparent").unwrap();
    assert!(!span.contains("00f067aa0ba902b7"), "the command is a span of its own, not the caller's: {span}");
    assert_eq!(header(&reply, "tracestate").as_deref(), Some("congo=t61rcWkgMzE"), "tracestate is passed on");
    let (event, body) = next(&mut events, "agent.session.created").await;
    assert_eq!(body["agent_id"], "traced");
    assert_eq!(header(&event, "traceparent"), Some(span), "the event carries the command's context");

    // Without a traceparent (or with one that is not valid): a new trace, the same on the reply and the event.
    for (agent, parent) in [("untraced", None), ("badly-traced", Some("00-xyz-00f067aa0ba902b7-01"))] {
        create_session(&app, &ch, &replies, agent, parent).await;
        let (reply, _) = next(&mut reply_consumer, "the reply").await;
        let (event, body) = next(&mut events, "agent.session.created").await;
        assert_eq!(body["agent_id"], agent);
        let (r, e) = (trace_id(&reply, "the reply"), trace_id(&event, "the event"));
        assert_ne!(r, TRACE_ID, "{agent}: a new trace");
        assert_eq!(r, e, "{agent}: the reply and the event are of one trace");
        assert_eq!(header(&reply, "tracestate"), None, "{agent}: no tracestate without a valid parent");
    }
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_batches_and_sweeper_cycles_are_traces_of_their_own() {
    let app = TestApp::start().await;
    let (_conn, ch) = common::amqp_channel(&app.settings).await;
    let (_, mut events) = queue(&ch, &app, Some("agent.connection.*")).await;
    let sid = app.session("a1").await;
    app.client.heartbeat("a1", &sid, "c1").await.unwrap();
    let (opened, body) = next(&mut events, "agent.connection.opened").await;
    assert_eq!(body["event_type"], "agent.connection.opened", "{body}");
    let batch_trace = trace_id(&opened, "the event of a heartbeat batch");

    app.db
        .execute(
            "UPDATE agent_connection SET last_heartbeat_at = now() - interval '1 hour' WHERE connection_id = 'c1'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(app.sweep().await.stale_connections, 1, "the connection is closed as stale");
    let (stale, body) = next(&mut events, "agent.connection.stale").await;
    assert_eq!(body["event_type"], "agent.connection.stale", "{body}");
    let cycle_trace = trace_id(&stale, "the event of a sweeper cycle");
    assert_ne!(cycle_trace, batch_trace, "a sweeper cycle is a trace of its own");
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_client_sends_its_callers_context() {
    let app = TestApp::start().await;
    let (_conn, ch) = common::amqp_channel(&app.settings).await;
    let (_, mut events) = queue(&ch, &app, Some("agent.session.created")).await;
    let caller = TraceContext::continue_from(Some(PARENT), None);
    let body = json!({"type": "session.create", "agent_id": "from-client", "session_id": "s-from-client"});
    let reply =
        trace_context::scope(caller, app.client.request(&body, None, Duration::from_secs(20))).await.expect("a reply");
    assert_eq!(reply["ok"], true, "{reply}");
    let (event, body) = next(&mut events, "agent.session.created").await;
    assert_eq!(body["agent_id"], "from-client");
    assert_eq!(trace_id(&event, "the event"), TRACE_ID, "the command continued the client's context");
    app.cleanup().await;
}
