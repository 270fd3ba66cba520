//! The `Subscription` class: events of one or more routing key patterns, each delivered once.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pyo3::exceptions::PyStopAsyncIteration;
use pyo3::prelude::*;
use serde_json::Value;
use tokio::sync::{mpsc, Mutex, OnceCell};

use crate::awaitable::{awaitable, Json};
use crate::connection::ClientState;
use crate::errors::{invalid, to_py, SubscriptionClosedError};
use crate::runtime::enter;

/// How many recent event ids a subscription with several patterns remembers, to deliver each event once.
const DEDUP_WINDOW: usize = 4096;

/// An event as it came: its AMQP `message_id` (the `event_id`) and its body.
type RawEvent = (Option<String>, Value);

/// What a subscription holds.
pub(crate) struct SubscriptionInner {
    pub(crate) client: Arc<ClientState>,
    pub(crate) patterns: Vec<String>,
    /// Events of every pattern, as (`message_id`, body), once bound.
    pub(crate) events: OnceCell<Mutex<mpsc::Receiver<RawEvent>>>,
    /// Recently delivered ids, so an event matching several patterns comes once.
    pub(crate) seen: Mutex<(HashSet<String>, VecDeque<String>)>,
}

impl SubscriptionInner {
    /// Binds one queue per pattern and forwards their events into one channel.
    async fn bind(&self) -> PyResult<&Mutex<mpsc::Receiver<RawEvent>>> {
        self.events
            .get_or_try_init(|| async {
                let client = self.client.connected().await?;
                let (tx, rx) = mpsc::channel(1024);
                for pattern in &self.patterns {
                    let mut sub = client.subscribe(pattern).await.map_err(to_py)?;
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        // `next_raw` answers `None` both when its wait ends and when the subscription ends: a `None`
                        // before the wait is up means the consumer is gone (the client was closed).
                        let poll = Duration::from_secs(1);
                        loop {
                            let began = Instant::now();
                            let Some(event) = sub.next_raw(poll).await else {
                                if began.elapsed() < poll || tx.is_closed() {
                                    return;
                                }
                                continue;
                            };
                            if tx.send(event).await.is_err() {
                                return;
                            }
                        }
                    });
                }
                Ok(Mutex::new(rx))
            })
            .await
    }

    /// The next event not seen before, or `None` when the subscription ended.
    async fn next(&self) -> PyResult<Option<Value>> {
        let events = self.bind().await?;
        let mut rx = events.lock().await;
        loop {
            let Some((id, body)) = rx.recv().await else { return Ok(None) };
            if self.patterns.len() > 1 {
                if let Some(id) = id {
                    let mut seen = self.seen.lock().await;
                    let (set, order) = &mut *seen;
                    if !set.insert(id.clone()) {
                        continue;
                    }
                    order.push_back(id);
                    if order.len() > DEDUP_WINDOW {
                        if let Some(old) = order.pop_front() {
                            set.remove(&old);
                        }
                    }
                }
            }
            return Ok(Some(body));
        }
    }
}

/// Events of a subscription: `async for event in client.subscribe([...])`.
#[pyclass(module = "agent_connection_manager", frozen)]
pub(crate) struct Subscription {
    pub(crate) inner: Arc<SubscriptionInner>,
}

#[pymethods]
impl Subscription {
    fn __aiter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __anext__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let _pass = enter()?;
        let inner = self.inner.clone();
        awaitable(py, async move {
            match inner.next().await? {
                Some(v) => Ok(Json(v)),
                None => Err(PyStopAsyncIteration::new_err(())),
            }
        })
    }

    /// Binds the queues, then gives the subscription itself.
    fn __await__(slf: Bound<'_, Self>) -> PyResult<Bound<'_, PyAny>> {
        let _pass = enter()?;
        let inner = slf.get().inner.clone();
        let object = slf.clone().into_any().unbind();
        let fut = awaitable(slf.py(), async move {
            inner.bind().await?;
            Ok(object)
        })?;
        fut.call_method0("__await__")
    }

    /// Binds the subscription's queues now (awaitable); events published from then on are delivered. Awaiting the
    /// subscription itself does the same and gives the subscription.
    fn bind<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let _pass = enter()?;
        let inner = self.inner.clone();
        awaitable(py, async move {
            inner.bind().await?;
            Ok(())
        })
    }

    /// The next event; `None` when none comes within `timeout` seconds; `SubscriptionClosedError` when the
    /// subscription ended (none will come).
    #[pyo3(signature = (timeout))]
    fn next<'py>(&self, py: Python<'py>, timeout: f64) -> PyResult<Bound<'py, PyAny>> {
        let _pass = enter()?;
        if !(timeout.is_finite() && timeout >= 0.0) {
            return Err(invalid("timeout must be a non-negative number of seconds"));
        }
        let inner = self.inner.clone();
        awaitable(py, async move {
            inner.bind().await?;
            match tokio::time::timeout(Duration::from_secs_f64(timeout), inner.next()).await {
                Ok(Ok(Some(v))) => Ok(Some(Json(v))),
                Err(_) => Ok(None),
                Ok(Ok(None)) => Err(SubscriptionClosedError::new_err(
                    "the subscription ended: its client was closed or lost its broker connection",
                )),
                Ok(Err(e)) => Err(e),
            }
        })
    }
}
