//! `agent_connection_manager._native`: the Rust engine as a Python extension module.
//!
//! Thin on purpose: configuration, guarantees and protocol are the library's. This layer only turns Python
//! arguments into library calls and library results and errors into Python values and exceptions.
//!
//! One tokio runtime per process (pyo3-async-runtimes' own) runs everything: the worker started by `start()`, the
//! futures behind every awaitable, and the calls of the synchronous methods. A synchronous method spawns its work on
//! that runtime and waits for the answer with the GIL released, so it never touches the caller's asyncio loop, works
//! from inside a running loop and from many threads at once, and never blocks a runtime thread.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, RecvTimeoutError};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use acm::client::Client as EngineClient;
use acm::{CommandError, Error, Settings};
use agent_connection_manager as acm;
use pyo3::exceptions::{PyException, PyRuntimeError, PyStopAsyncIteration, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, Mutex, OnceCell, RwLock};
use tokio::task::JoinHandle;
use tokio_postgres::error::SqlState;
use tokio_util::sync::CancellationToken;

pyo3::create_exception!(
    agent_connection_manager,
    AgentConnectionManagerError,
    PyException,
    "Base class of the package's errors."
);
pyo3::create_exception!(
    agent_connection_manager,
    DatabaseError,
    AgentConnectionManagerError,
    "PostgreSQL failed, refused or did not answer in time."
);
pyo3::create_exception!(
    agent_connection_manager,
    BrokerError,
    AgentConnectionManagerError,
    "RabbitMQ refused, lost or did not accept a connection, channel or publish."
);
pyo3::create_exception!(
    agent_connection_manager,
    RequestTimeoutError,
    AgentConnectionManagerError,
    "No reply came within the request's timeout."
);
pyo3::create_exception!(
    agent_connection_manager,
    ConfigurationError,
    AgentConnectionManagerError,
    "The layered configuration (ACM_* variables, ACM_CONFIG, config/default.toml) is unusable."
);
pyo3::create_exception!(
    agent_connection_manager,
    CommandRefusedError,
    AgentConnectionManagerError,
    "The engine understood the call but refused it (not_found, conflict, forbidden)."
);

/// Longest wait for a broker connection from `Client`.
const BROKER_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest time for creating the database and applying the migrations, once a connection was made.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a waiting synchronous call looks for a pending signal (Ctrl-C).
const SIGNAL_CHECK: Duration = Duration::from_millis(100);
/// How many recent event ids a subscription with several patterns remembers, to deliver each event once.
const DEDUP_WINDOW: usize = 4096;

/// The process's one runtime.
fn runtime() -> &'static tokio::runtime::Runtime {
    pyo3_async_runtimes::tokio::get_runtime()
}

/// The Python exception for a library error.
fn to_py(e: Error) -> PyErr {
    let text = e.to_string();
    match e {
        Error::Db(_) | Error::Pool(_) | Error::Migration(_) => DatabaseError::new_err(text),
        Error::Amqp(_) | Error::Nack(_) | Error::Disconnected(_) => BrokerError::new_err(text),
        Error::Timeout(_) => RequestTimeoutError::new_err(text),
        Error::Config(_) => ConfigurationError::new_err(text),
        Error::Command(CommandError::Invalid(m)) => PyValueError::new_err(m),
        Error::Command(c) => CommandRefusedError::new_err(c.to_string()),
        Error::Shutdown => AgentConnectionManagerError::new_err(text),
    }
}

/// Runs `fut` on the engine's runtime and waits for it with the GIL released.
fn wait<F, T>(py: Python<'_>, fut: F) -> PyResult<T>
where
    F: Future<Output = PyResult<T>> + Send + 'static,
    T: Send + 'static,
{
    let (tx, rx) = sync_channel(1);
    runtime().spawn(async move {
        let _ = tx.send(fut.await);
    });
    let mut rx = rx;
    loop {
        // The receiver goes to the GIL-free closure and comes back (it is not `Sync`).
        let (answer, back) = py.detach(move || (rx.recv_timeout(SIGNAL_CHECK), rx));
        rx = back;
        match answer {
            Ok(result) => return result,
            Err(RecvTimeoutError::Timeout) => py.check_signals()?,
            Err(RecvTimeoutError::Disconnected) => {
                return Err(PyRuntimeError::new_err("the engine dropped a call without an answer"))
            }
        }
    }
}

/// A Python object from JSON.
fn json_to_py(py: Python<'_>, value: &Value) -> PyResult<Py<PyAny>> {
    Ok(py.import("json")?.call_method1("loads", (value.to_string(),))?.unbind())
}

/// JSON from a Python object (`what` names the argument in the `ValueError`).
fn py_to_json(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Value> {
    let py = obj.py();
    let kwargs = PyDict::new(py);
    kwargs.set_item("allow_nan", false)?;
    let text: String = match py.import("json")?.call_method("dumps", (obj,), Some(&kwargs)) {
        Ok(t) => t.extract()?,
        Err(e) => return Err(PyValueError::new_err(format!("{what} is not JSON: {e}"))),
    };
    serde_json::from_str(&text).map_err(|e| PyValueError::new_err(format!("{what} is not JSON: {e}")))
}

/// A JSON object from a Python dict.
fn py_to_object(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Map<String, Value>> {
    if !obj.is_instance_of::<PyDict>() {
        return Err(PyValueError::new_err(format!("{what} must be a dict")));
    }
    match py_to_json(obj, what)? {
        Value::Object(m) => Ok(m),
        _ => Err(PyValueError::new_err(format!("{what} must be a dict"))),
    }
}

/// A non-empty string argument.
fn non_empty(value: &str, what: &str) -> PyResult<()> {
    if value.is_empty() {
        return Err(PyValueError::new_err(format!("{what} must not be empty")));
    }
    Ok(())
}

/// The layered configuration (`ACM_*`, `ACM_CONFIG`, `config/default.toml`).
fn load_settings() -> PyResult<Settings> {
    Settings::load(None).map_err(|e| ConfigurationError::new_err(e.to_string()))
}

/// A PostgreSQL URL the engine reads, from a URL string in libpq or SQLAlchemy form (`postgresql+driver://`).
fn normalize_url(url: &str) -> PyResult<String> {
    let bad = || {
        PyValueError::new_err(
            "db_engine: expected a PostgreSQL URL (postgres://, postgresql:// or postgresql+driver://), \
             a SQLAlchemy Engine, AsyncEngine or URL, or None",
        )
    };
    let Some((scheme, rest)) = url.split_once("://") else {
        // libpq's key=value form, as the configuration accepts it.
        return if url.contains('=') { Ok(url.to_string()) } else { Err(bad()) };
    };
    let dialect = scheme.split('+').next().unwrap_or_default();
    if dialect == "postgres" || dialect == "postgresql" {
        Ok(format!("postgres://{rest}"))
    } else {
        Err(bad())
    }
}

/// The database URL of a `db_engine` argument: a string, or (duck-typed, without importing SQLAlchemy) an object
/// with `render_as_string(hide_password=False)` (a `URL`) or with such a `url` (an `Engine` or `AsyncEngine`).
fn engine_url(db_engine: &Bound<'_, PyAny>) -> PyResult<String> {
    if let Ok(s) = db_engine.cast::<PyString>() {
        return normalize_url(&s.extract::<String>()?);
    }
    let url = if db_engine.hasattr("render_as_string")? {
        db_engine.clone()
    } else if db_engine.hasattr("url")? {
        db_engine.getattr("url")?
    } else {
        return normalize_url("");
    };
    if let Ok(s) = url.cast::<PyString>() {
        return normalize_url(&s.extract::<String>()?);
    }
    let kwargs = PyDict::new(db_engine.py());
    kwargs.set_item("hide_password", false)?;
    let text: String = url.call_method("render_as_string", (), Some(&kwargs))?.extract()?;
    normalize_url(&text)
}

/// The running HTTP endpoint: its stop signal and its task.
type HttpEndpoint = (CancellationToken, JoinHandle<()>);

/// A manager, the one-time schema check every call makes first, and the HTTP endpoint while started.
#[derive(Clone)]
struct Engine {
    manager: Arc<acm::AgentConnectionManager>,
    schema: Arc<OnceCell<()>>,
    http: Arc<Mutex<Option<HttpEndpoint>>>,
}

impl Engine {
    fn new(manager: acm::AgentConnectionManager) -> Self {
        Self { manager: Arc::new(manager), schema: Arc::default(), http: Arc::default() }
    }

    /// Creates the database and applies the migrations once. First a connection is tried, bounded by
    /// `database.checkout_timeout_secs` (the library's own `start` retries an unreachable database for ever; here
    /// the caller hears of it), then the migrations run, bounded by `MIGRATION_TIMEOUT`.
    async fn ensure_schema(&self) -> PyResult<()> {
        let db = &self.manager.settings().database;
        let limit = Duration::from_secs(db.checkout_timeout_secs.max(1));
        let no_answer = |what: &str, after: Duration| {
            DatabaseError::new_err(format!("database: no answer within {}s ({what})", after.as_secs()))
        };
        self.schema
            .get_or_try_init(|| async {
                match tokio::time::timeout(limit, acm::db::connect(db, None)).await {
                    Err(_) => return Err(no_answer("database.checkout_timeout_secs", limit)),
                    Ok(Ok(_)) => {}
                    // The server answers; the database is created below.
                    Ok(Err(Error::Db(e))) if e.code() == Some(&SqlState::INVALID_CATALOG_NAME) => {}
                    Ok(Err(e)) => return Err(to_py(e)),
                }
                let migrate_limit = MIGRATION_TIMEOUT.max(limit);
                match tokio::time::timeout(migrate_limit, acm::db::migrate(db)).await {
                    Ok(r) => r.map_err(to_py),
                    Err(_) => Err(no_answer("applying the migrations", migrate_limit)),
                }
            })
            .await
            .map(|_| ())
    }

    /// Migrates, starts the worker, then serves `/healthz`, `/readyz` and `/metrics` when `http.listen` is set.
    async fn start(self) -> PyResult<()> {
        self.ensure_schema().await?;
        self.manager.start().await.map_err(to_py)?;
        let listen = &self.manager.settings().http.listen;
        let mut http = self.http.lock().await;
        if listen.is_empty() || http.is_some() {
            return Ok(());
        }
        let served = match listen.parse() {
            Ok(addr) => {
                let stop = CancellationToken::new();
                acm::http::serve(self.manager.clone(), addr, stop.clone())
                    .await
                    .map(|(_, task)| (stop, task))
                    .map_err(|e| format!("http.listen: cannot listen on {addr}: {e}"))
            }
            Err(_) => Err("http.listen: not an address".to_string()),
        };
        match served {
            Ok(running) => {
                *http = Some(running);
                Ok(())
            }
            Err(e) => {
                self.manager.stop().await.map_err(to_py)?;
                Err(ConfigurationError::new_err(e))
            }
        }
    }

    /// Stops the worker gracefully, then the HTTP endpoint.
    async fn stop(self) -> PyResult<()> {
        let stopped = self.manager.stop().await.map_err(to_py);
        if let Some((stop, task)) = self.http.lock().await.take() {
            stop.cancel();
            let _ = task.await;
        }
        stopped
    }

    async fn stats(self) -> PyResult<Py<PyAny>> {
        self.ensure_schema().await?;
        let stats = self.manager.get_connection_stats().await.map_err(to_py)?;
        let value = serde_json::to_value(&stats).map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
        Python::attach(|py| {
            let dict = json_to_py(py, &value)?;
            dict.bind(py).set_item("timestamp", stats.timestamp)?;
            Ok(dict)
        })
    }

    async fn create_session(self, args: SessionArgs) -> PyResult<String> {
        self.ensure_schema().await?;
        self.manager
            .create_session(
                &args.agent_id,
                args.acquisition_uuid.as_deref(),
                args.name.as_deref(),
                args.description.as_deref(),
                args.experimental_parameters,
            )
            .await
            .map_err(to_py)
    }

    async fn close_session(self, session_id: String) -> PyResult<bool> {
        self.ensure_schema().await?;
        self.manager.close_session(&session_id).await.map_err(to_py)
    }
}

/// `create_session`'s arguments, checked.
struct SessionArgs {
    agent_id: String,
    acquisition_uuid: Option<String>,
    name: Option<String>,
    description: Option<String>,
    experimental_parameters: Option<Map<String, Value>>,
}

impl SessionArgs {
    fn new(
        agent_id: String,
        acquisition_uuid: Option<&Bound<'_, PyAny>>,
        name: Option<String>,
        description: Option<String>,
        experimental_parameters: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        non_empty(&agent_id, "agent_id")?;
        // A `uuid.UUID` is accepted as well as its text.
        let acquisition_uuid = match acquisition_uuid {
            None => None,
            Some(u) if u.is_none() => None,
            Some(u) => Some(match u.cast::<PyString>() {
                Ok(s) => s.extract::<String>()?,
                Err(_) if u.hasattr("hex")? => u.str()?.extract::<String>()?,
                Err(_) => return Err(PyValueError::new_err("acquisition_uuid must be a string or a uuid.UUID")),
            }),
        };
        let experimental_parameters = match experimental_parameters {
            Some(p) if !p.is_none() => Some(py_to_object(p, "experimental_parameters")?),
            _ => None,
        };
        Ok(Self { agent_id, acquisition_uuid, name, description, experimental_parameters })
    }
}

/// Manages agent connections, health monitoring and the instruction lifecycle (the engine inside this process).
#[pyclass(module = "agent_connection_manager", frozen)]
struct AgentConnectionManager {
    engine: Engine,
}

#[pymethods]
impl AgentConnectionManager {
    #[new]
    #[pyo3(signature = (db_engine=None, check_interval=None), text_signature = "(db_engine=None, check_interval=30)")]
    fn new(db_engine: Option<&Bound<'_, PyAny>>, check_interval: Option<&Bound<'_, PyAny>>) -> PyResult<Self> {
        let check_interval: i64 = match check_interval {
            None => 30,
            Some(c) if c.is_instance_of::<pyo3::types::PyBool>() => -1,
            Some(c) => c.extract().map_err(|_| PyValueError::new_err("check_interval must be an int (seconds)"))?,
        };
        if check_interval <= 0 {
            return Err(PyValueError::new_err("check_interval must be positive (seconds)"));
        }
        let mut settings = load_settings()?;
        let url = match db_engine {
            Some(e) if !e.is_none() => Some(engine_url(e)?),
            _ => None,
        };
        if let Some(url) = &url {
            settings.database.url = url.clone();
        }
        settings.sweeper.check_interval_secs = check_interval as u64;
        let manager = acm::AgentConnectionManager::new(settings).map_err(|e| match (&url, e) {
            (Some(_), Error::Config(c)) if c.0.starts_with("database.url") => PyValueError::new_err(c.0),
            (_, e) => to_py(e),
        })?;
        Ok(Self { engine: Engine::new(manager) })
    }

    /// Migrates the database if needed, then runs the worker (consumers, sweeper, relay, HTTP when configured).
    fn start<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        pyo3_async_runtimes::tokio::future_into_py(py, self.engine.clone().start())
    }

    /// Stops the worker gracefully.
    fn stop<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        pyo3_async_runtimes::tokio::future_into_py(py, self.engine.clone().stop())
    }

    /// Whether the worker runs.
    #[getter]
    fn running(&self, py: Python<'_>) -> PyResult<bool> {
        let engine = self.engine.clone();
        wait(py, async move { Ok(engine.manager.is_running().await) })
    }

    /// Whether the started worker has its broker connection and runs its consumers (its topology is declared).
    #[getter]
    fn ready(&self) -> bool {
        let health = self.engine.manager.health();
        health.broker_connected.load(Ordering::Acquire) && health.consumers_running.load(Ordering::Acquire)
    }

    /// The database URL in force, password redacted.
    #[getter]
    fn database_url(&self) -> String {
        acm::config::redact_url(&self.engine.manager.settings().database.url)
    }

    /// The AMQP prefix in force.
    #[getter]
    fn amqp_prefix(&self) -> String {
        self.engine.manager.settings().amqp.prefix.clone()
    }

    /// The sweeper's interval in seconds.
    #[getter]
    fn check_interval(&self) -> u64 {
        self.engine.manager.settings().sweeper.check_interval_secs
    }

    fn get_connection_stats(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        wait(py, self.engine.clone().stats())
    }

    fn aget_connection_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        pyo3_async_runtimes::tokio::future_into_py(py, self.engine.clone().stats())
    }

    #[pyo3(signature = (agent_id, acquisition_uuid=None, name=None, description=None, experimental_parameters=None))]
    fn create_session(
        &self,
        py: Python<'_>,
        agent_id: String,
        acquisition_uuid: Option<&Bound<'_, PyAny>>,
        name: Option<String>,
        description: Option<String>,
        experimental_parameters: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<String> {
        let args = SessionArgs::new(agent_id, acquisition_uuid, name, description, experimental_parameters)?;
        wait(py, self.engine.clone().create_session(args))
    }

    #[pyo3(signature = (agent_id, acquisition_uuid=None, name=None, description=None, experimental_parameters=None))]
    fn acreate_session<'py>(
        &self,
        py: Python<'py>,
        agent_id: String,
        acquisition_uuid: Option<&Bound<'py, PyAny>>,
        name: Option<String>,
        description: Option<String>,
        experimental_parameters: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let args = SessionArgs::new(agent_id, acquisition_uuid, name, description, experimental_parameters)?;
        pyo3_async_runtimes::tokio::future_into_py(py, self.engine.clone().create_session(args))
    }

    fn close_session(&self, py: Python<'_>, session_id: String) -> PyResult<bool> {
        wait(py, self.engine.clone().close_session(session_id))
    }

    fn aclose_session<'py>(&self, py: Python<'py>, session_id: String) -> PyResult<Bound<'py, PyAny>> {
        pyo3_async_runtimes::tokio::future_into_py(py, self.engine.clone().close_session(session_id))
    }

    fn __repr__(&self) -> String {
        format!(
            "AgentConnectionManager(database={:?}, prefix={:?}, check_interval={})",
            self.database_url(),
            self.amqp_prefix(),
            self.check_interval()
        )
    }
}

/// The Python object of the process-wide manager.
static GLOBAL: OnceLock<Py<AgentConnectionManager>> = OnceLock::new();

/// The process-wide manager, configured from the layered configuration on first use.
#[pyfunction]
fn get_connection_manager(py: Python<'_>) -> PyResult<Py<AgentConnectionManager>> {
    if let Some(m) = GLOBAL.get() {
        return Ok(m.clone_ref(py));
    }
    let manager = acm::AgentConnectionManager::new(load_settings()?).map_err(to_py)?;
    let object = Py::new(py, AgentConnectionManager { engine: Engine::new(manager) })?;
    Ok(GLOBAL.get_or_init(|| object).clone_ref(py))
}

/// Starts the process-wide manager.
#[pyfunction]
fn start_connection_manager(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    let m = get_connection_manager(py)?;
    let engine = m.get().engine.clone();
    pyo3_async_runtimes::tokio::future_into_py(py, engine.start())
}

/// Stops the process-wide manager, if it was made.
#[pyfunction]
fn stop_connection_manager(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    let engine = GLOBAL.get().map(|m| m.get().engine.clone());
    pyo3_async_runtimes::tokio::future_into_py(py, async move {
        match engine {
            Some(e) => e.stop().await,
            None => Ok(()),
        }
    })
}

/// The connection behind a `Client`: made on first use, gone after `close`.
struct ClientState {
    amqp_url: String,
    prefix: String,
    client: RwLock<Option<EngineClient>>,
    closed: AtomicBool,
}

impl ClientState {
    /// Connects when not yet connected.
    async fn connected(&self) -> PyResult<tokio::sync::RwLockReadGuard<'_, Option<EngineClient>>> {
        if self.closed.load(Ordering::Acquire) {
            return Err(AgentConnectionManagerError::new_err("the client is closed"));
        }
        if self.client.read().await.is_none() {
            let mut slot = self.client.write().await;
            if slot.is_none() && !self.closed.load(Ordering::Acquire) {
                let connect = EngineClient::connect(&self.amqp_url, &self.prefix);
                let client = tokio::time::timeout(BROKER_CONNECT_TIMEOUT, connect).await.map_err(|_| {
                    BrokerError::new_err(format!("broker: no connection within {}s", BROKER_CONNECT_TIMEOUT.as_secs()))
                })?;
                *slot = Some(client.map_err(to_py)?);
            }
        }
        let guard = self.client.read().await;
        if guard.is_none() {
            return Err(AgentConnectionManagerError::new_err("the client is closed"));
        }
        Ok(guard)
    }
}

/// Publishes heartbeats and commands, awaits replies and subscribes to events, over the engine's own client.
#[pyclass(module = "agent_connection_manager", frozen)]
struct Client {
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
            return Err(PyValueError::new_err("amqp_url must be an amqp:// or amqps:// URL"));
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
        let state = self.state.clone();
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
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
        non_empty(&agent_id, "agent_id")?;
        non_empty(&session_id, "session_id")?;
        non_empty(&connection_id, "connection_id")?;
        let client_info = match client_info {
            Some(i) if !i.is_none() => Some(py_to_json(i, "client_info")?),
            _ => None,
        };
        let state = self.state.clone();
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            let guard = state.connected().await?;
            let Some(client) = guard.as_ref() else { return Err(AgentConnectionManagerError::new_err("closed")) };
            match client_info {
                None => client.heartbeat(&agent_id, &session_id, &connection_id).await.map_err(to_py),
                Some(info) => {
                    let body = json!({
                        "type": "agent.heartbeat",
                        "agent_id": agent_id,
                        "session_id": session_id,
                        "connection_id": connection_id,
                        "sent_at": chrono::Utc::now().to_rfc3339(),
                        "client_info": info,
                    });
                    client.send(&body, None).await.map_err(to_py)
                }
            }
        })
    }

    /// Sends a command and returns its reply (`{"ok": True, "result": ...}` or `{"ok": False, "error": ...}`).
    #[pyo3(signature = (body, timeout=30.0))]
    fn request<'py>(&self, py: Python<'py>, body: &Bound<'py, PyAny>, timeout: f64) -> PyResult<Bound<'py, PyAny>> {
        let body = command_body(body)?;
        if !(timeout.is_finite() && timeout > 0.0) {
            return Err(PyValueError::new_err("timeout must be a positive number of seconds"));
        }
        let timeout = Duration::from_secs_f64(timeout);
        let state = self.state.clone();
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            let guard = state.connected().await?;
            let Some(client) = guard.as_ref() else { return Err(AgentConnectionManagerError::new_err("closed")) };
            let reply = client.request(&Value::Object(body), None, timeout).await.map_err(to_py)?;
            Python::attach(|py| json_to_py(py, &reply))
        })
    }

    /// Publishes a command without waiting for a reply (confirmed by the broker).
    fn send<'py>(&self, py: Python<'py>, body: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        let body = command_body(body)?;
        let state = self.state.clone();
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            let guard = state.connected().await?;
            let Some(client) = guard.as_ref() else { return Err(AgentConnectionManagerError::new_err("closed")) };
            client.send(&Value::Object(body), None).await.map_err(to_py)
        })
    }

    /// Events whose routing key matches any of `patterns` (`#` for all), as an async iterator of dicts. Awaiting
    /// it binds the queue before returning; iterating without awaiting binds on the first step.
    fn subscribe(&self, patterns: Vec<String>) -> PyResult<Subscription> {
        if patterns.is_empty() {
            return Err(PyValueError::new_err("patterns must name at least one routing key pattern"));
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
        let state = self.state.clone();
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            state.closed.store(true, Ordering::Release);
            let client = state.client.write().await.take();
            if let Some(c) = client {
                c.close().await;
            }
            Ok(())
        })
    }

    fn __aenter__<'py>(slf: Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        let state = slf.get().state.clone();
        let object = slf.clone().unbind();
        pyo3_async_runtimes::tokio::future_into_py(slf.py(), async move {
            drop(state.connected().await?);
            Ok(object)
        })
    }

    #[pyo3(signature = (*_exc))]
    fn __aexit__<'py>(&self, py: Python<'py>, _exc: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        self.close(py)
    }

    fn __repr__(&self) -> String {
        format!("Client(amqp_url={:?}, prefix={:?})", acm::config::redact_url(&self.state.amqp_url), self.state.prefix)
    }
}

/// A command body: a dict with a non-empty string `type`.
fn command_body(body: &Bound<'_, PyAny>) -> PyResult<Map<String, Value>> {
    let body = py_to_object(body, "body")?;
    match body.get("type") {
        Some(Value::String(t)) if !t.is_empty() => Ok(body),
        _ => Err(PyValueError::new_err("body must have a non-empty string \"type\"")),
    }
}

/// An event as it came: its AMQP `message_id` (the `event_id`) and its body.
type RawEvent = (Option<String>, Value);

/// What a subscription holds.
struct SubscriptionInner {
    client: Arc<ClientState>,
    patterns: Vec<String>,
    /// Events of every pattern, as (`message_id`, body), once bound.
    events: OnceCell<Mutex<mpsc::Receiver<RawEvent>>>,
    /// Recently delivered ids, so an event matching several patterns comes once.
    seen: Mutex<(HashSet<String>, VecDeque<String>)>,
}

impl SubscriptionInner {
    /// Binds one queue per pattern and forwards their events into one channel.
    async fn bind(&self) -> PyResult<&Mutex<mpsc::Receiver<RawEvent>>> {
        self.events
            .get_or_try_init(|| async {
                let guard = self.client.connected().await?;
                let Some(client) = guard.as_ref() else { return Err(AgentConnectionManagerError::new_err("closed")) };
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
struct Subscription {
    inner: Arc<SubscriptionInner>,
}

#[pymethods]
impl Subscription {
    fn __aiter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __anext__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let inner = self.inner.clone();
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            match inner.next().await? {
                Some(v) => Python::attach(|py| json_to_py(py, &v)),
                None => Err(PyStopAsyncIteration::new_err(())),
            }
        })
    }

    /// Binds the queues, then gives the subscription itself.
    fn __await__(slf: Bound<'_, Self>) -> PyResult<Bound<'_, PyAny>> {
        let inner = slf.get().inner.clone();
        let object = slf.clone().unbind();
        let fut = pyo3_async_runtimes::tokio::future_into_py(slf.py(), async move {
            inner.bind().await?;
            Ok(object)
        })?;
        fut.call_method0("__await__")
    }

    /// The next event, or `None` when none comes within `timeout` seconds.
    #[pyo3(signature = (timeout))]
    fn next<'py>(&self, py: Python<'py>, timeout: f64) -> PyResult<Bound<'py, PyAny>> {
        if !(timeout.is_finite() && timeout >= 0.0) {
            return Err(PyValueError::new_err("timeout must be a non-negative number of seconds"));
        }
        let inner = self.inner.clone();
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            inner.bind().await?;
            match tokio::time::timeout(Duration::from_secs_f64(timeout), inner.next()).await {
                Ok(Ok(Some(v))) => Python::attach(|py| json_to_py(py, &v)),
                Ok(Ok(None)) | Err(_) => Ok(Python::attach(|py| py.None())),
                Ok(Err(e)) => Err(e),
            }
        })
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    if std::env::var_os("RUST_LOG").is_some() {
        acm::telemetry::init(acm::config::LogFormat::Text, "warn");
    }
    m.add_class::<AgentConnectionManager>()?;
    m.add_class::<Client>()?;
    m.add_class::<Subscription>()?;
    m.add_function(wrap_pyfunction!(get_connection_manager, m)?)?;
    m.add_function(wrap_pyfunction!(start_connection_manager, m)?)?;
    m.add_function(wrap_pyfunction!(stop_connection_manager, m)?)?;
    m.add("AgentConnectionManagerError", py.get_type::<AgentConnectionManagerError>())?;
    m.add("DatabaseError", py.get_type::<DatabaseError>())?;
    m.add("BrokerError", py.get_type::<BrokerError>())?;
    m.add("RequestTimeoutError", py.get_type::<RequestTimeoutError>())?;
    m.add("ConfigurationError", py.get_type::<ConfigurationError>())?;
    m.add("CommandRefusedError", py.get_type::<CommandRefusedError>())?;
    Ok(())
}
