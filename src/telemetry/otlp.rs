//! Span export over OTLP/HTTP (protobuf) to `telemetry.otlp_endpoint`.
//!
//! The work records a [`Span`] for each command it applies, each heartbeat batch and each sweeper cycle, with the ids
//! of its [`TraceContext`] (so a collector joins them to the caller's trace and to the events' `traceparent`). A span
//! ends when it is dropped and is handed to a bounded queue with `try_send`: work never waits for the exporter, and a
//! span that finds the queue full is dropped and counted (`acm_trace_spans_dropped_total{name="queue_full"}`). One
//! task drains the queue in batches (up to [`BATCH_SPANS`] spans, or what came within [`BATCH_DELAY`]) and posts each
//! batch once, bounded by [`EXPORT_TIMEOUT`]; a batch the collector did not accept is dropped and counted
//! (`export_failed`), with one WARN when export starts failing and one INFO when it works again. Without an endpoint
//! the [`Tracer`] is disabled and a span costs a branch.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{span, status, ResourceSpans, ScopeSpans, SpanFlags, Status};
use prometheus_client::metrics::counter::Counter;
use prost::Message;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub use opentelemetry_proto::tonic::trace::v1::span::SpanKind;

use crate::error::with_causes;
use crate::metrics::{Metrics, NameLabel};
use crate::trace_context::TraceContext;

/// Spans waiting for export at most; more are dropped (the OpenTelemetry SDKs' default).
pub const QUEUE_SPANS: usize = 2048;
/// Spans per export request at most.
pub const BATCH_SPANS: usize = 512;
/// How long the exporter gathers spans for one request after the first.
pub const BATCH_DELAY: Duration = Duration::from_secs(1);
/// Bound of one export request, answer included.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// Links kept per span (the SDKs' default limit); the rest are counted in the span's `dropped_links_count`.
pub const LINKS_MAX: usize = 128;
/// The instrumentation scope and the resource's `service.name`.
pub const SERVICE_NAME: &str = "agent-connection-manager";

/// Records spans for the exporter; cloned into everything that does traced work. [`Tracer::default`] is disabled.
#[derive(Clone, Default)]
pub struct Tracer {
    queue: Option<(mpsc::Sender<span_proto::Span>, Counter)>,
}

/// The generated span type, under a name that does not collide with [`Span`].
mod span_proto {
    pub use opentelemetry_proto::tonic::trace::v1::Span;
}

/// The export task of a started [`Tracer`].
pub struct Exporter {
    task: JoinHandle<()>,
}

impl Tracer {
    /// A tracer exporting to `url` (an OTLP/HTTP traces URL, from
    /// [`crate::config::TelemetrySettings::traces_url`]) with the task that posts the spans; `instance` is the
    /// resource's `service.instance.id` (none when empty). Must be called inside the tokio runtime.
    pub fn start(url: &url::Url, instance: &str, metrics: &Metrics) -> (Tracer, Exporter) {
        let (tx, rx) = mpsc::channel(QUEUE_SPANS);
        let dropped = |reason: &str| metrics.trace_spans_dropped.get_or_create(&NameLabel { name: reason.into() });
        let (full, failed) = (dropped("queue_full").clone(), dropped("export_failed").clone());
        let mut attributes =
            vec![text("service.name", SERVICE_NAME), text("service.version", env!("CARGO_PKG_VERSION"))];
        if !instance.is_empty() {
            attributes.push(text("service.instance.id", instance));
        }
        let resource = Resource { attributes, ..Default::default() };
        let target = Target { url: url.clone(), resource, exported: metrics.trace_spans_exported.clone(), failed };
        tracing::info!(endpoint = %url, "exporting spans over OTLP/HTTP");
        (Tracer { queue: Some((tx, full)) }, Exporter { task: tokio::spawn(target.run(rx)) })
    }

    /// Starts a span `name` of `kind` for the work of `context` (its trace id, span id, parent and state). It is
    /// recorded when the tracer is enabled and the context is sampled, and ends when dropped.
    pub fn span(&self, name: &str, kind: SpanKind, context: &TraceContext) -> Span {
        self.begin(|| name.to_string(), kind, context)
    }

    /// Starts the consumer span of processing `what` from the broker: named `process <what>` (formatted only when
    /// recorded), with `messaging.system` = `rabbitmq` and `messaging.operation.type` = `process`.
    pub fn process_span(&self, what: &str, context: &TraceContext) -> Span {
        let mut span = self.begin(|| format!("process {what}"), SpanKind::Consumer, context);
        span.set_text("messaging.system", "rabbitmq");
        span.set_text("messaging.operation.type", "process");
        span
    }

    fn begin(&self, name: impl FnOnce() -> String, kind: SpanKind, context: &TraceContext) -> Span {
        let Some((queue, full)) = self.queue.as_ref().filter(|_| context.flags & 1 == 1) else {
            return Span { recording: None };
        };
        // The parent, when there is one, is the sender's span: remote.
        let remote = match context.parent_span_id {
            Some(_) => SpanFlags::ContextHasIsRemoteMask as u32 | SpanFlags::ContextIsRemoteMask as u32,
            None => SpanFlags::ContextHasIsRemoteMask as u32,
        };
        let span = span_proto::Span {
            trace_id: context.trace_id.to_vec(),
            span_id: context.span_id.to_vec(),
            trace_state: context.state.clone().unwrap_or_default(),
            parent_span_id: context.parent_span_id.map(|p| p.to_vec()).unwrap_or_default(),
            flags: u32::from(context.flags) | remote,
            name: name(),
            kind: kind as i32,
            start_time_unix_nano: unix_nanos(),
            ..Default::default()
        };
        Span { recording: Some(Box::new(Recording { span, queue: queue.clone(), full: full.clone() })) }
    }
}

impl Exporter {
    /// Waits up to `within` for the exporter to post what is queued (it ends once every [`Tracer`] clone is
    /// dropped), then stops it.
    pub async fn finish(self, within: Duration) {
        let abort = self.task.abort_handle();
        if tokio::time::timeout(within, self.task).await.is_err() {
            abort.abort();
            tracing::warn!("span export did not finish at shutdown; the spans still queued are dropped");
        }
    }
}

/// A span being recorded (see [`Tracer::span`]); exported when dropped.
pub struct Span {
    recording: Option<Box<Recording>>,
}

struct Recording {
    span: span_proto::Span,
    queue: mpsc::Sender<span_proto::Span>,
    full: Counter,
}

impl Span {
    /// Whether this span is recorded: when not, there is no point in computing its attributes or links.
    pub fn is_recording(&self) -> bool {
        self.recording.is_some()
    }

    /// Sets a text attribute.
    pub fn set_text(&mut self, key: &str, value: &str) {
        if let Some(r) = &mut self.recording {
            r.span.attributes.push(text(key, value));
        }
    }

    /// Sets an integer attribute.
    pub fn set_int(&mut self, key: &str, value: i64) {
        if let Some(r) = &mut self.recording {
            r.span.attributes.push(attribute(key, any_value::Value::IntValue(value)));
        }
    }

    /// Links this span to `context` (a message of a batch); beyond [`LINKS_MAX`] links only counted.
    pub fn add_link(&mut self, context: &TraceContext) {
        let Some(r) = &mut self.recording else { return };
        if r.span.links.len() >= LINKS_MAX {
            r.span.dropped_links_count += 1;
            return;
        }
        r.span.links.push(span::Link {
            trace_id: context.trace_id.to_vec(),
            span_id: context.span_id.to_vec(),
            trace_state: context.state.clone().unwrap_or_default(),
            flags: u32::from(context.flags)
                | SpanFlags::ContextHasIsRemoteMask as u32
                | SpanFlags::ContextIsRemoteMask as u32,
            ..Default::default()
        });
    }

    /// Marks the span failed with `message`.
    pub fn set_error(&mut self, message: &str) {
        if let Some(r) = &mut self.recording {
            r.span.status = Some(Status { message: message.into(), code: status::StatusCode::Error as i32 });
        }
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        if let Some(mut r) = self.recording.take() {
            r.span.end_time_unix_nano = unix_nanos();
            if r.queue.try_send(r.span).is_err() {
                r.full.inc();
            }
        }
    }
}

/// Where and as what the exporter posts.
struct Target {
    url: url::Url,
    resource: Resource,
    exported: Counter,
    failed: Counter,
}

impl Target {
    /// Posts batches until every sender is gone and the queue is empty.
    async fn run(self, mut queue: mpsc::Receiver<span_proto::Span>) {
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let mut failing = false;
        while let Some(first) = queue.recv().await {
            let mut spans = vec![first];
            let deadline = tokio::time::Instant::now() + BATCH_DELAY;
            while spans.len() < BATCH_SPANS {
                match tokio::time::timeout_at(deadline, queue.recv()).await {
                    Ok(Some(s)) => spans.push(s),
                    Ok(None) | Err(_) => break,
                }
            }
            let n = spans.len() as u64;
            match self.post(&client, spans).await {
                Ok(()) => {
                    self.exported.inc_by(n);
                    if std::mem::take(&mut failing) {
                        tracing::info!(endpoint = %self.url, "span export works again");
                    }
                }
                Err(why) => {
                    self.failed.inc_by(n);
                    if !std::mem::replace(&mut failing, true) {
                        tracing::warn!(
                            endpoint = %self.url,
                            error = %why,
                            "span export failed; spans are dropped (acm_trace_spans_dropped_total) until it works again"
                        );
                    }
                }
            }
        }
    }

    /// Posts one batch; `Err` says why the collector did not take it.
    async fn post(
        &self,
        client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
        spans: Vec<span_proto::Span>,
    ) -> Result<(), String> {
        let request = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(self.resource.clone()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: SERVICE_NAME.into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..Default::default()
                    }),
                    spans,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        };
        let body = Full::new(Bytes::from(request.encode_to_vec()));
        let request = hyper::Request::post(self.url.as_str())
            .header(hyper::header::CONTENT_TYPE, "application/x-protobuf")
            .body(body)
            .map_err(|e| e.to_string())?;
        let answered = async {
            let response = client.request(request).await.map_err(|e| with_causes(&e))?;
            let status = response.status();
            // Read the answer whole, so that the connection can be used again.
            response.into_body().collect().await.map_err(|e| e.to_string())?;
            if status.is_success() {
                Ok(())
            } else {
                Err(format!("the collector answered {status}"))
            }
        };
        tokio::time::timeout(EXPORT_TIMEOUT, answered)
            .await
            .map_err(|_| format!("no answer within {} s", EXPORT_TIMEOUT.as_secs()))?
    }
}

fn text(key: &str, value: &str) -> KeyValue {
    attribute(key, any_value::Value::StringValue(value.into()))
}

fn attribute(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue { key: key.into(), value: Some(AnyValue { value: Some(value) }), ..Default::default() }
}

fn unix_nanos() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disabled_tracer_or_an_unsampled_context_records_nothing() {
        let context = TraceContext::new_trace();
        let mut span = Tracer::default().span("x", SpanKind::Internal, &context);
        assert!(!span.is_recording());
        span.set_text("a", "b");
        span.add_link(&context);
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_without_waiting() {
        let metrics = Metrics::new();
        let (tx, _rx) = mpsc::channel(1);
        let full = metrics.trace_spans_dropped.get_or_create(&NameLabel { name: "queue_full".into() }).clone();
        let tracer = Tracer { queue: Some((tx, full.clone())) };
        let context = TraceContext::new_trace();
        for _ in 0..3 {
            let mut span = tracer.span("x", SpanKind::Internal, &context);
            assert!(span.is_recording());
            for _ in 0..LINKS_MAX + 2 {
                span.add_link(&context);
            }
        }
        assert_eq!(full.get(), 2, "one span fits the queue; the other two are counted");
        let unsampled = TraceContext { flags: 0, ..context };
        assert!(!tracer.span("x", SpanKind::Internal, &unsampled).is_recording());
    }

    #[tokio::test]
    async fn links_beyond_the_limit_are_counted_in_the_span() {
        let (tx, mut rx) = mpsc::channel(1);
        let tracer = Tracer { queue: Some((tx, Counter::default())) };
        let context = TraceContext::continue_from(Some(&TraceContext::new_trace().traceparent()), None);
        let mut span = tracer.span("batch", SpanKind::Consumer, &context);
        for _ in 0..LINKS_MAX + 5 {
            span.add_link(&context);
        }
        span.set_int("n", 7);
        span.set_error("failed");
        drop(span);
        let s = rx.try_recv().expect("the ended span is queued");
        assert_eq!((s.links.len(), s.dropped_links_count), (LINKS_MAX, 5));
        assert_eq!(s.parent_span_id, context.parent_span_id.unwrap().to_vec());
        assert_eq!(s.flags & 0x3ff, 0x301, "sampled, with a remote parent");
        assert!(s.end_time_unix_nano >= s.start_time_unix_nano);
        assert_eq!(s.status.map(|st| st.code), Some(status::StatusCode::Error as i32));
    }
}
