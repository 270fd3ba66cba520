//! Span export over OTLP/HTTP: a worker pointed at a small collector started here posts the spans of a command (a
//! child of the caller's span), of a heartbeat batch (linked to the heartbeat's context) and of a sweeper cycle to
//! `/v1/traces` as protobuf; with the collector unreachable or never answering, every command is still answered and
//! the lost spans are counted.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent_connection_manager::metrics::NameLabel;
use agent_connection_manager::telemetry::otlp::SpanKind;
use agent_connection_manager::trace_context::{self, TraceContext};
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use common::{eventually, TestApp};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::json;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";
const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What the collector received: each request decoded, with its content type.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<(String, ExportTraceServiceRequest)>>>);

impl Received {
    fn spans(&self) -> Vec<Span> {
        let requests = self.0.lock().unwrap();
        requests
            .iter()
            .flat_map(|(_, r)| r.resource_spans.iter())
            .flat_map(|r| r.scope_spans.iter())
            .flat_map(|s| s.spans.iter().cloned())
            .collect()
    }

    fn find(&self, pred: impl Fn(&Span) -> bool) -> Option<Span> {
        self.spans().into_iter().find(pred)
    }
}

/// A collector on a free port answering `POST /v1/traces` with 200, keeping what it decodes.
async fn collector() -> (String, Received) {
    let received = Received::default();
    let keep = received.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let keep = keep.clone();
            async move {
                let Ok(request) = ExportTraceServiceRequest::decode(body) else {
                    return StatusCode::BAD_REQUEST;
                };
                let ty = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
                keep.0.lock().unwrap().push((ty, request));
                StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (endpoint, received)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_the_collector_in_the_callers_trace() {
    let (endpoint, received) = collector().await;
    let app = TestApp::start_with(|s| s.telemetry.otlp_endpoint = endpoint.clone()).await;

    // A command sent in the caller's context (the client sends it as it is).
    let caller = TraceContext::from_traceparent(PARENT, None).unwrap();
    let body = json!({"type": "session.create", "agent_id": "traced", "session_id": "s-traced"});
    let reply = trace_context::scope(caller.clone(), app.client.request(&body, None, Duration::from_secs(20)))
        .await
        .expect("a reply");
    assert_eq!(reply["ok"], true, "{reply}");
    // A heartbeat sent in another context: the batch that applies it links to it.
    let beat = TraceContext::new_trace();
    trace_context::scope(beat.clone(), app.client.heartbeat("traced", "s-traced", "c-traced")).await.unwrap();

    let command = eventually("the command's span at the collector", Duration::from_secs(20), || async {
        received.find(|s| hex(&s.trace_id) == TRACE_ID && s.name == "process session.create")
    })
    .await;
    assert_eq!(hex(&command.parent_span_id), CALLER_SPAN, "the command's span is a child of the caller's");
    assert_ne!(hex(&command.span_id), CALLER_SPAN);
    assert_eq!(command.kind, SpanKind::Consumer as i32);
    assert!(command.end_time_unix_nano >= command.start_time_unix_nano && command.start_time_unix_nano > 0);
    let attribute = |span: &Span, key: &str| {
        span.attributes.iter().find(|a| a.key == key).and_then(|a| a.value.clone()).and_then(|v| v.value)
    };
    assert_eq!(
        attribute(&command, "messaging.rabbitmq.destination.routing_key"),
        Some(any_value::Value::StringValue("session.create".into()))
    );

    let batch = eventually("the heartbeat batch's span, linked to the heartbeat", Duration::from_secs(20), || async {
        received.find(|s| s.name == "process heartbeats" && s.links.iter().any(|l| l.trace_id == beat.trace_id))
    })
    .await;
    let link = batch.links.iter().find(|l| l.trace_id == beat.trace_id).unwrap();
    assert_eq!(link.span_id, beat.span_id.to_vec(), "the link is the heartbeat's own span");
    assert_ne!(batch.trace_id, beat.trace_id.to_vec(), "a batch is a trace of its own");
    assert!(batch.parent_span_id.is_empty(), "a batch's span is a root");

    // The sweeper runs a cycle at start.
    eventually("a sweeper cycle's span", Duration::from_secs(20), || async {
        received.find(|s| s.name == "sweeper cycle" && s.parent_span_id.is_empty())
    })
    .await;

    let requests = received.0.lock().unwrap().clone();
    assert!(requests.iter().all(|(ty, _)| ty == "application/x-protobuf"), "OTLP/HTTP protobuf");
    let resource = requests[0].1.resource_spans[0].resource.clone().expect("a resource");
    let service = resource.attributes.iter().find(|a| a.key == "service.name").and_then(|a| a.value.clone());
    assert_eq!(service.and_then(|v| v.value), Some(any_value::Value::StringValue("agent-connection-manager".into())));
    let exported = app.manager.metrics().trace_spans_exported.get();
    assert!(exported >= 3, "acm_trace_spans_exported_total counts what the collector took: {exported}");
    app.cleanup().await;
}

/// Dropped spans of `reason`.
fn dropped(app: &TestApp, reason: &str) -> u64 {
    app.manager.metrics().trace_spans_dropped.get_or_create(&NameLabel { name: reason.into() }).get()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_or_silent_collector_changes_nothing() {
    // Nothing listens on a port that was just free: every post is refused.
    let closed = format!("http://127.0.0.1:{}", common::free_port());
    // A collector that takes the connection and never answers: every post waits out its bound.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_endpoint = format!("http://{}", silent.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            open.push(socket);
        }
    });
    for endpoint in [closed, silent_endpoint] {
        let app = TestApp::start_with(|s| s.telemetry.otlp_endpoint = endpoint.clone()).await;
        for i in 0..20 {
            let id = format!("a{i}");
            let body = json!({"type": "session.create", "agent_id": id, "session_id": format!("s-{id}")});
            let reply = trace_context::scope(
                TraceContext::new_trace(),
                app.client.request(&body, None, Duration::from_secs(20)),
            )
            .await
            .unwrap_or_else(|e| panic!("{endpoint}: command {i} was not answered: {e}"));
            assert_eq!(reply["ok"], true, "{endpoint}: {reply}");
        }
        assert_eq!(app.manager.metrics().trace_spans_exported.get(), 0, "{endpoint}: nothing was exported");
        // The refused posts fail at once; the silent collector's first post fails after its bound.
        let bound = agent_connection_manager::telemetry::otlp::EXPORT_TIMEOUT + Duration::from_secs(10);
        eventually(&format!("{endpoint}: the lost spans counted as export_failed"), bound, || async {
            (dropped(&app, "export_failed") > 0).then_some(())
        })
        .await;
        assert_eq!(dropped(&app, "queue_full"), 0, "{endpoint}: 20 commands do not fill the queue");
        app.cleanup().await;
    }
    held.abort();
}
