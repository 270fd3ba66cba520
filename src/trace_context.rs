//! W3C trace context (<https://www.w3.org/TR/trace-context/>) carried across the broker in AMQP headers
//! `traceparent` and `tracestate`, the convention of OpenTelemetry's pika and aio-pika instrumentations.
//!
//! Applying a command continues the trace of its `traceparent` (a new trace when there is none or it is not valid);
//! a heartbeat batch and a sweeper cycle each start a trace of their own. The context is task-local ([`scope`]):
//! every event written to the outbox inside it keeps it (`event_outbox.traceparent`, `tracestate`), and the relay
//! publishes the event with it; a reply carries it too. So a caller's trace id comes back on the reply and on every
//! event its command caused. The spans themselves (names, times, links) are recorded and exported by
//! `telemetry::otlp` when `telemetry.otlp_endpoint` is set; the trace id also appears in the log lines of the command
//! that continued it (`trace_id`).

use std::future::Future;

use lapin::types::{AMQPValue, FieldTable};

/// Header of the W3C `traceparent`.
pub const TRACEPARENT: &str = "traceparent";
/// Header of the W3C `tracestate` (vendor data, passed on unchanged).
pub const TRACESTATE: &str = "tracestate";

/// Longest `tracestate` passed on (the W3C limit is 32 members; 512 characters is what a vendor may rely on).
const TRACESTATE_MAX: usize = 512;

/// One span's place in a trace: the trace id, this span's id, the flags, and the vendor state passed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// 16 bytes, never all zero.
    pub trace_id: [u8; 16],
    /// 8 bytes, never all zero: the span this work is.
    pub span_id: [u8; 8],
    /// The span this one continued (the sender's), when it continued one.
    pub parent_span_id: Option<[u8; 8]>,
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
    /// The incoming `tracestate`, when there was one.
    pub state: Option<String>,
}

impl TraceContext {
    /// A new trace (sampled), with a new span.
    pub fn new_trace() -> Self {
        let mut trace_id = [0u8; 16];
        trace_id.copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        TraceContext { trace_id, span_id: new_span_id(), parent_span_id: None, flags: 1, state: None }
    }

    /// A new span in the trace of `traceparent` (its child), or a new trace when `traceparent` is absent or not a
    /// valid version-00 (or later, read as 00) value; `tracestate` is kept only with a valid parent.
    pub fn continue_from(traceparent: Option<&str>, tracestate: Option<&str>) -> Self {
        traceparent
            .and_then(|p| Self::from_traceparent(p, tracestate))
            .map(|parent| TraceContext { span_id: new_span_id(), parent_span_id: Some(parent.span_id), ..parent })
            .unwrap_or_else(Self::new_trace)
    }

    /// Exactly the context of `traceparent` (its span id kept: the caller's own span, as a client sends it), when
    /// it is valid.
    pub fn from_traceparent(traceparent: &str, tracestate: Option<&str>) -> Option<Self> {
        let (trace_id, span_id, flags) = parse(traceparent)?;
        let state = tracestate.filter(|s| s.len() <= TRACESTATE_MAX && s.is_ascii()).map(str::to_string);
        Some(TraceContext { trace_id, span_id, parent_span_id: None, flags, state })
    }

    /// The context of a delivery's headers (see [`TraceContext::continue_from`]).
    pub fn from_headers(headers: Option<&FieldTable>) -> Self {
        Self::continue_from(header(headers, TRACEPARENT).as_deref(), header(headers, TRACESTATE).as_deref())
    }

    /// Exactly the context a delivery's headers carry (the sender's span), when they carry a valid one: what a
    /// batch's span links to.
    pub fn sent_with(headers: Option<&FieldTable>) -> Option<Self> {
        Self::from_traceparent(&header(headers, TRACEPARENT)?, header(headers, TRACESTATE).as_deref())
    }

    /// `00-<trace id>-<span id>-<flags>`, lowercase hex.
    pub fn traceparent(&self) -> String {
        format!("00-{}-{}-{:02x}", hex(&self.trace_id), hex(&self.span_id), self.flags)
    }

    /// The trace id in lowercase hex (as logs and tracing back ends show it).
    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    /// Adds `traceparent` (and `tracestate`, when there is one) to `headers`.
    pub fn insert_into(&self, headers: &mut FieldTable) {
        insert_headers(headers, &self.traceparent(), self.state.as_deref());
    }
}

/// A text header of a delivery.
fn header(headers: Option<&FieldTable>, key: &str) -> Option<String> {
    headers.and_then(|h| h.inner().get(key)).and_then(|v| match v {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok().map(str::to_string),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    })
}

/// Adds a `traceparent` (and a `tracestate`, when given) to `headers`, as stored text (the relay's events).
pub fn insert_headers(headers: &mut FieldTable, traceparent: &str, tracestate: Option<&str>) {
    headers.insert(TRACEPARENT.into(), AMQPValue::LongString(traceparent.into()));
    if let Some(s) = tracestate {
        headers.insert(TRACESTATE.into(), AMQPValue::LongString(s.into()));
    }
}

tokio::task_local! {
    static CURRENT: TraceContext;
}

/// Runs `work` with `context` as the current trace context: events it writes to the outbox carry it.
pub async fn scope<F: Future>(context: TraceContext, work: F) -> F::Output {
    CURRENT.scope(context, work).await
}

/// The current trace context ([`scope`]), if any.
pub fn current() -> Option<TraceContext> {
    CURRENT.try_with(Clone::clone).ok()
}

fn new_span_id() -> [u8; 8] {
    let mut span_id = [0u8; 8];
    span_id.copy_from_slice(&uuid::Uuid::new_v4().as_bytes()[..8]);
    if span_id == [0; 8] {
        span_id[7] = 1;
    }
    span_id
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N || !s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// The trace id, parent id and flags of a `traceparent`, when it is valid: version `00` with exactly four fields, or
/// a later version (not `ff`) with at least four, read as `00`; lowercase hex; trace id and parent id not all zero.
fn parse(value: &str) -> Option<([u8; 16], [u8; 8], u8)> {
    let value = value.trim();
    let fields: Vec<&str> = value.split('-').collect();
    let version: [u8; 1] = unhex(fields.first()?)?;
    if version[0] == 0xff || fields.len() < 4 || (version[0] == 0 && fields.len() != 4) {
        return None;
    }
    let trace_id: [u8; 16] = unhex(fields[1])?;
    let parent: [u8; 8] = unhex(fields[2])?;
    let flags: [u8; 1] = unhex(fields[3])?;
    (trace_id != [0; 16] && parent != [0; 8]).then_some((trace_id, parent, flags[0]))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_parent_is_continued_with_a_new_span() {
        let c = TraceContext::continue_from(Some(PARENT), Some("congo=t61rcWkgMzE"));
        assert_eq!(c.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(hex(&c.span_id), "00f067aa0ba902b7");
        assert_eq!(c.flags, 1);
        assert_eq!(c.state.as_deref(), Some("congo=t61rcWkgMzE"));
        assert_eq!(c.parent_span_id.map(|p| hex(&p)).as_deref(), Some("00f067aa0ba902b7"), "the sender's span");
        let text = c.traceparent();
        assert!(text.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && text.ends_with("-01"), "{text}");
        assert_eq!(parse(&text).map(|p| p.0), Some(c.trace_id));
        let exact = TraceContext::from_traceparent(PARENT, None).expect("valid");
        assert_eq!(exact.traceparent(), PARENT, "a client sends its caller's context as it is");
        assert_eq!(exact.parent_span_id, None);
        let mut headers = FieldTable::default();
        insert_headers(&mut headers, PARENT, None);
        assert_eq!(TraceContext::sent_with(Some(&headers)), Some(exact));
        assert_eq!(TraceContext::sent_with(None), None);
        assert_eq!(TraceContext::from_traceparent("00-0-0-0", None), None);
    }

    #[test]
    fn an_invalid_parent_starts_a_new_trace() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e47-00f067aa0ba902b7-01",
        ] {
            let c = TraceContext::continue_from(Some(bad), Some("a=b"));
            assert_ne!(c.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736", "{bad:?} was continued");
            assert_eq!(c.state, None, "{bad:?} kept its tracestate");
        }
        // A later version may add fields; it is read as version 00.
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-ever";
        assert_eq!(TraceContext::continue_from(Some(later), None).trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
    }

    #[test]
    fn new_traces_differ_and_print_as_valid_parents() {
        let (a, b) = (TraceContext::new_trace(), TraceContext::new_trace());
        assert_ne!(a.trace_id, b.trace_id);
        assert!(parse(&a.traceparent()).is_some());
    }

    #[tokio::test]
    async fn the_scope_is_the_current_context() {
        assert_eq!(current(), None);
        let c = TraceContext::new_trace();
        let seen = scope(c.clone(), async { current() }).await;
        assert_eq!(seen, Some(c));
    }
}
