//! The engine's log lines, into Python's `logging`.
//!
//! A `tracing` layer turns each event into a record for the logger named after its target under
//! `agent_connection_manager` (`agent_connection_manager::sweeper::stale_connections` becomes
//! `agent_connection_manager.sweeper.stale_connections`, `lapin::channels` becomes
//! `agent_connection_manager.lapin.channels`), so a service's logging configuration covers them. Events below the
//! lowest level an engine logger lets through are filtered on the Rust side, without touching Python: that level
//! is read at import, whenever a manager is made or started, and once a second by the bridge
//! thread. Records go through a bounded queue to that one thread, which hands them to `logging` through the gate
//! (`runtime::attach`): engine threads never wait for a log handler, and a full queue drops records (counted in
//! the `agent_connection_manager` logger's next WARNING). A child logger set to a lower level than its parent gets
//! its lines too. Set `RUST_LOG` before import for lines on stderr instead.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::OnceLock;
use std::time::Duration;

use pyo3::prelude::*;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

use crate::runtime::attach;

/// The logger every engine logger is under.
const BASE: &str = "agent_connection_manager";
/// Records waiting for the bridge thread at most.
const QUEUE: usize = 10_000;
/// Records handed to Python per pass of the bridge thread at most.
const BATCH: usize = 512;
/// How often the bridge thread reads the Python level again.
const REFRESH: Duration = Duration::from_secs(1);

/// The effective level of the `agent_connection_manager` logger (Python's numbers: 10 DEBUG … 50 CRITICAL).
static PY_LEVEL: AtomicU8 = AtomicU8::new(30);
static QUEUE_TX: OnceLock<SyncSender<Record>> = OnceLock::new();
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// One log line on its way to Python.
struct Record {
    logger: String,
    level: u8,
    message: String,
}

/// Python's number for a `tracing` level.
fn py_level(level: &Level) -> u8 {
    match *level {
        Level::TRACE => 5,
        Level::DEBUG => 10,
        Level::INFO => 20,
        Level::WARN => 30,
        Level::ERROR => 40,
    }
}

/// The Python logger name of a `tracing` target.
fn logger_name(target: &str) -> String {
    let dotted = target.replace("::", ".");
    if dotted == BASE || dotted.starts_with("agent_connection_manager.") {
        dotted
    } else {
        format!("{BASE}.{dotted}")
    }
}

/// Reads the lowest level any engine logger lets through again: the `agent_connection_manager` logger's effective
/// level, or a lower level set on one of its children.
pub(crate) fn refresh(py: Python<'_>) -> PyResult<()> {
    let logging = py.import("logging")?;
    let mut level: i64 = logging.call_method1("getLogger", (BASE,))?.call_method0("getEffectiveLevel")?.extract()?;
    let loggers = logging.getattr("Logger")?.getattr("manager")?.getattr("loggerDict")?;
    let loggers = loggers.cast::<pyo3::types::PyDict>()?;
    for (name, logger) in loggers.iter() {
        let is_child = name.extract::<String>().is_ok_and(|n| n.starts_with("agent_connection_manager."));
        // Placeholders (parents made implicitly) have no level.
        if let (true, Ok(own)) = (is_child, logger.getattr("level").and_then(|l| l.extract::<i64>())) {
            if own > 0 {
                level = level.min(own);
            }
        }
    }
    PY_LEVEL.store(level.clamp(0, i64::from(u8::MAX)) as u8, Ordering::Relaxed);
    Ok(())
}

/// Sends the engine's log lines to Python's `logging` from now on (once per process).
pub(crate) fn install(py: Python<'_>) -> PyResult<()> {
    refresh(py)?;
    let (tx, rx) = sync_channel(QUEUE);
    if QUEUE_TX.set(tx).is_err() {
        return Ok(());
    }
    std::thread::Builder::new()
        .name("acm-log-bridge".into())
        .spawn(move || forward(rx))
        .map_err(|e| pyo3::exceptions::PyRuntimeError::new_err(format!("cannot start the log bridge: {e}")))?;
    // Another subscriber already installed (by the embedding program) keeps the lines.
    let _ = tracing_subscriber::registry().with(PythonLog).try_init();
    Ok(())
}

/// The bridge thread: hands records to `logging` in batches and keeps the level fresh, until the gate closes.
fn forward(rx: Receiver<Record>) {
    let mut loggers: HashMap<String, Py<PyAny>> = HashMap::new();
    loop {
        let mut batch = Vec::new();
        match rx.recv_timeout(REFRESH) {
            Ok(first) => {
                batch.push(first);
                while batch.len() < BATCH {
                    match rx.try_recv() {
                        Ok(r) => batch.push(r),
                        Err(_) => break,
                    }
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        let passed = attach(|py| {
            let dropped = DROPPED.swap(0, Ordering::Relaxed);
            if dropped > 0 {
                batch.push(Record {
                    logger: BASE.into(),
                    level: 30,
                    message: format!("{dropped} engine log records were dropped: the log bridge's queue was full"),
                });
            }
            for r in batch {
                let logger = match loggers.get(&r.logger) {
                    Some(l) => l.bind(py).clone(),
                    None => match py.import("logging").and_then(|m| m.call_method1("getLogger", (&r.logger,))) {
                        Ok(l) => {
                            loggers.insert(r.logger.clone(), l.clone().unbind());
                            l
                        }
                        Err(_) => continue,
                    },
                };
                // A failing handler is logging's business (it reports through `logging.raiseExceptions`).
                let _ = logger.call_method1("log", (r.level, r.message));
            }
            let _ = refresh(py);
        });
        if passed.is_none() {
            // The interpreter is shutting down: no more records.
            return;
        }
    }
}

/// The `tracing` layer that queues events for the bridge thread.
struct PythonLog;

impl<S: Subscriber> Layer<S> for PythonLog {
    fn register_callsite(&self, _: &'static Metadata<'static>) -> tracing::subscriber::Interest {
        // The Python level may change at any time: ask `enabled` every time.
        tracing::subscriber::Interest::sometimes()
    }

    fn enabled(&self, metadata: &Metadata<'_>, _: Context<'_, S>) -> bool {
        py_level(metadata.level()) >= PY_LEVEL.load(Ordering::Relaxed)
    }

    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let Some(tx) = QUEUE_TX.get() else { return };
        let mut text = Text::default();
        event.record(&mut text);
        let metadata = event.metadata();
        let logger = logger_name(text.1.as_deref().unwrap_or(metadata.target()));
        let record = Record { logger, level: py_level(metadata.level()), message: text.0 };
        if tx.try_send(record).is_err() {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// An event's message, then its other fields as `key=value`; for a line of the `log` crate, its own target.
#[derive(Default)]
struct Text(String, Option<String>);

impl Visit for Text {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.insert_str(0, value);
        } else if field.name() == "log.target" {
            self.1 = Some(value.to_string());
        } else if field.name().starts_with("log.") {
            // `log.module_path`, `log.file`: where the line was written, not what it says.
        } else {
            let _ = write!(self.0, " {}={value}", field.name());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0.insert_str(0, &format!("{value:?}"));
        } else if !field.name().starts_with("log.") {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }
}
