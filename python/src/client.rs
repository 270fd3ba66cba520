//! The `Client` class: heartbeats, commands and replies over the engine's own AMQP client.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use acm::trace_context::{self, TraceContext};
use agent_connection_manager as acm;

use pyo3::prelude::*;
use pyo3::types::PyDict;
use serde_json::{Map, Value};
use tokio::sync::{Mutex, OnceCell, RwLock};

use crate::awaitable::{awaitable, Json};
use crate::config::load_settings;
use crate::connection::ClientState;
use crate::convert::{non_empty, py_to_json, py_to_object};
use crate::errors::{invalid, to_py, AgentConnectionManagerError};
use crate::runtime::enter;
use crate::subscription::{Subscription, SubscriptionInner};

/// Publishes heartbeats and commands, awaits replies and subscribes to events, over the engine's own client.
#[pyclass(module = "agent_connection_manager", frozen)]
pub(crate) struct Client {
    state: Arc<ClientState>,
}

#[pymethods]
impl Client {
    #[new]
    #[pyo3(signature = (amqp_url=None, prefix=None))]
    fn new(amqp_url: Option<String>, prefix: Option<String>) -> PyResult<Self> {
        let (amqp_url, prefix) = match (amqp_url, prefix) {
            (Some(u), Some(p)) => (u, p),
            (u, p) => {
                let settings = load_settings()?;
                (u.unwrap_or(settings.amqp.url), p.unwrap_or(settings.amqp.prefix))
            }
        };
        if !(amqp_url.starts_with("amqp://") || amqp_url.starts_with("amqps://")) {
            return Err(invalid("amqp_url must be an amqp:// or amqps:// URL"));
        }
        non_empty(&prefix, "prefix")?;
        Ok(Self {
            state: Arc::new(ClientState {
                amqp_url,
                prefix,
                client: RwLock::new(None),
                closed: AtomicBool::new(false),
            }),
        })
    }

    /// The AMQP prefix this client publishes under.
    #[getter]
    fn prefix(&self) -> String {
        self.state.prefix.clone()
    }

    /// Connects now (otherwise the first call connects).
    fn connect<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let _pass = enter()?;
        let state = self.state.clone();
        awaitable(py, async move {
            drop(state.connected().await?);
            Ok(())
        })
    }

    /// Publishes a heartbeat (confirmed by the broker); an unknown `connection_id` opens that connection.
    #[pyo3(signature = (agent_id, session_id, connection_id, client_info=None))]
    fn heartbeat<'py>(
        &self,
        py: Python<'py>,
        agent_id: String,
        session_id: String,
        connection_id: String,
        client_info: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let _pass = enter()?;
        non_empty(&agent_id, "agent_id")?;
        non_empty(&session_id, "session_id")?;
        non_empty(&connection_id, "connection_id")?;
        let client_info = match client_info {
            Some(i) if !i.is_none() => Some(py_to_json(i, "client_info")?),
            _ => None,
        };
        let trace = caller_trace(py);
        let state = self.state.clone();
        awaitable(py, async move {
            let client = state.connected().await?;
            traced(trace, client.heartbeat_with(&agent_id, &session_id, &connection_id, client_info))
                .await
                .map_err(to_py)
        })
    }

    /// Sends a command and returns its reply (`{"ok": True, "result": ...}` or `{"ok": False, "error": ...}`).
    ///
    /// `message_id` (the AMQP `message_id`) makes a retried request idempotent: the worker applies it once and
    /// answers a repeat with the first reply.
    #[pyo3(signature = (body, timeout=30.0, message_id=None))]
    fn request<'py>(
        &self,
        py: Python<'py>,
        body: &Bound<'py, PyAny>,
        timeout: f64,
        message_id: Option<String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let _pass = enter()?;
        if let Some(id) = &message_id {
            non_empty(id, "message_id")?;
        }
        let body = command_body(body)?;
        let timeout = call_timeout(timeout)?;
        let trace = caller_trace(py);
        let state = self.state.clone();
        awaitable(py, async move {
            // `timeout` bounds the whole call: connecting (when this is the first) and waiting for the reply.
            let (client, left) = state.connected_for(timeout).await?;
            let body = Value::Object(body);
            let reply = traced(trace, client.request(&body, message_id.as_deref(), left)).await.map_err(to_py)?;
            Ok(Json(reply))
        })
    }

    /// Publishes a command without waiting for a reply (confirmed by the broker).
    /// `message_id` makes a re-sent command idempotent, as for `request`.
    #[pyo3(signature = (body, message_id=None))]
    fn send<'py>(
        &self,
        py: Python<'py>,
        body: &Bound<'py, PyAny>,
        message_id: Option<String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let _pass = enter()?;
        let body = command_body(body)?;
        if let Some(id) = &message_id {
            non_empty(id, "message_id")?;
        }
        let trace = caller_trace(py);
        let state = self.state.clone();
        awaitable(py, async move {
            let client = state.connected().await?;
            traced(trace, client.send(&Value::Object(body), message_id.as_deref())).await.map_err(to_py)
        })
    }

    /// Publishes an agent's log lines (`agent.log`, confirmed by the broker): `entries` is a list of dicts with
    /// `timestamp`, `level`, `logger_name` and `message`, at most 500 (the worker drops a bad entry alone).
    fn log<'py>(
        &self,
        py: Python<'py>,
        agent_id: String,
        session_id: String,
        entries: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let _pass = enter()?;
        non_empty(&agent_id, "agent_id")?;
        non_empty(&session_id, "session_id")?;
        let Value::Array(entries) = py_to_json(entries, "entries")? else {
            return Err(invalid("entries must be a list of dicts"));
        };
        if entries.iter().any(|e| !e.is_object()) {
            return Err(invalid("entries must be a list of dicts"));
        }
        let trace = caller_trace(py);
        let state = self.state.clone();
        awaitable(py, async move {
            let client = state.connected().await?;
            traced(trace, client.log(&agent_id, &session_id, &entries)).await.map_err(to_py)
        })
    }

    /// Reads agents' log lines with `logs.get`: a list of dicts, oldest first, each with its increasing `id` (poll
    /// with `since_id` for a live tail). A refusal raises `InvalidArgumentError` or `CommandRefusedError`;
    /// `timeout` bounds the whole call, connecting included.
    #[pyo3(signature = (agent_id=None, session_id=None, since_id=None, limit=None, min_level=None, timeout=30.0))]
    #[allow(clippy::too_many_arguments)]
    fn get_logs<'py>(
        &self,
        py: Python<'py>,
        agent_id: Option<String>,
        session_id: Option<String>,
        since_id: Option<i64>,
        limit: Option<i64>,
        min_level: Option<String>,
        timeout: f64,
    ) -> PyResult<Bound<'py, PyAny>> {
        let _pass = enter()?;
        if agent_id.is_none() && session_id.is_none() {
            return Err(invalid("get_logs needs agent_id or session_id"));
        }
        let timeout = call_timeout(timeout)?;
        let mut query = Map::new();
        let fields = [
            ("agent_id", agent_id.map(Value::from)),
            ("session_id", session_id.map(Value::from)),
            ("since_id", since_id.map(Value::from)),
            ("limit", limit.map(Value::from)),
            ("min_level", min_level.map(Value::from)),
        ];
        for (key, value) in fields {
            if let Some(v) = value {
                query.insert(key.to_string(), v);
            }
        }
        let trace = caller_trace(py);
        let state = self.state.clone();
        awaitable(py, async move {
            let (client, left) = state.connected_for(timeout).await?;
            let lines = traced(trace, client.get_logs(&Value::Object(query), left)).await.map_err(to_py)?;
            serde_json::to_value(lines).map(Json).map_err(|e| AgentConnectionManagerError::new_err(e.to_string()))
        })
    }

    /// Events whose routing key matches any of `patterns` (`#` for all), as an async iterator of dicts. Awaiting
    /// it binds the queue before returning; iterating without awaiting binds on the first step.
    fn subscribe(&self, patterns: Vec<String>) -> PyResult<Subscription> {
        if patterns.is_empty() {
            return Err(invalid("patterns must name at least one routing key pattern"));
        }
        for p in &patterns {
            non_empty(p, "a pattern")?;
        }
        Ok(Subscription {
            inner: Arc::new(SubscriptionInner {
                client: self.state.clone(),
                patterns,
                events: OnceCell::new(),
                seen: Mutex::new((HashSet::new(), VecDeque::new())),
            }),
        })
    }

    /// Closes the connection; its subscriptions end.
    fn close<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let _pass = enter()?;
        let state = self.state.clone();
        awaitable(py, async move {
            state.closed.store(true, Ordering::Release);
            let client = state.client.write().await.take();
            if let Some(c) = client {
                c.close().await;
            }
            Ok(())
        })
    }

    fn __aenter__<'py>(slf: Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        let _pass = enter()?;
        let state = slf.get().state.clone();
        let object = slf.clone().into_any().unbind();
        awaitable(slf.py(), async move {
            drop(state.connected().await?);
            Ok(object)
        })
    }

    #[pyo3(signature = (*_exc))]
    fn __aexit__<'py>(&self, py: Python<'py>, _exc: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        let _pass = enter()?;
        self.close(py)
    }

    fn __repr__(&self) -> String {
        format!("Client(amqp_url={:?}, prefix={:?})", acm::config::redact_url(&self.state.amqp_url), self.state.prefix)
    }
}

/// OpenTelemetry's current context as a trace context, when the application uses OpenTelemetry (`opentelemetry` is
/// imported) and a valid span is current: `opentelemetry.propagate.inject` writes it as W3C headers, which the message
/// then carries. Never an error: without OpenTelemetry, or when injecting fails, the message carries no context.
fn caller_trace(py: Python<'_>) -> Option<TraceContext> {
    let modules = py.import("sys").ok()?.getattr("modules").ok()?;
    if !modules.contains("opentelemetry").unwrap_or(false) {
        return None;
    }
    let carrier = PyDict::new(py);
    py.import("opentelemetry.propagate").ok()?.call_method1("inject", (&carrier,)).ok()?;
    let parent: String = carrier.get_item("traceparent").ok()??.extract().ok()?;
    let state: Option<String> = carrier.get_item("tracestate").ok().flatten().and_then(|v| v.extract().ok());
    TraceContext::from_traceparent(&parent, state.as_deref())
}

/// Runs `work` in `trace` (the caller's context), or as it is without one.
async fn traced<T>(trace: Option<TraceContext>, work: impl std::future::Future<Output = T>) -> T {
    match trace {
        Some(t) => trace_context::scope(t, work).await,
        None => work.await,
    }
}

/// A call's `timeout` in seconds: a positive finite number.
fn call_timeout(seconds: f64) -> PyResult<Duration> {
    if !(seconds.is_finite() && seconds > 0.0) {
        return Err(invalid("timeout must be a positive number of seconds"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// A command body: a dict with a non-empty string `type`.
fn command_body(body: &Bound<'_, PyAny>) -> PyResult<Map<String, Value>> {
    let body = py_to_object(body, "body")?;
    match body.get("type") {
        Some(Value::String(t)) if !t.is_empty() => Ok(body),
        _ => Err(invalid("body must have a non-empty string \"type\"")),
    }
}
