//! The `AgentConnectionManager` class and the process-wide manager's functions.

use std::sync::atomic::Ordering;
use std::sync::OnceLock;

use acm::Error;
use agent_connection_manager as acm;

use pyo3::prelude::*;

use crate::awaitable::{awaitable, IntoPython};
use crate::config::{engine_url, load_settings};
use crate::engine::{Engine, SessionArgs};
use crate::errors::{invalid, to_py};
use crate::runtime::{enter, wait};

/// Manages agent connections, health monitoring and the instruction lifecycle (the engine inside this process).
#[pyclass(module = "agent_connection_manager", frozen)]
pub(crate) struct AgentConnectionManager {
    engine: Engine,
}

#[pymethods]
impl AgentConnectionManager {
    #[new]
    #[pyo3(
        signature = (db_engine=None, check_interval=None, log_retention_days=None),
        text_signature = "(db_engine=None, check_interval=30, log_retention_days=None)"
    )]
    fn new(
        py: Python<'_>,
        db_engine: Option<&Bound<'_, PyAny>>,
        check_interval: Option<&Bound<'_, PyAny>>,
        log_retention_days: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let _pass = enter()?;
        // `None` keeps `logs.retention_days` of the layered configuration.
        let log_retention_days: Option<i64> = match log_retention_days {
            None => None,
            Some(d) if d.is_none() => None,
            Some(d) if d.is_instance_of::<pyo3::types::PyBool>() => Some(-1),
            Some(d) => Some(d.extract().map_err(|_| invalid("log_retention_days must be an int (days)"))?),
        };
        if log_retention_days.is_some_and(|d| d <= 0) {
            return Err(invalid("log_retention_days must be positive (days)"));
        }
        let check_interval: i64 = match check_interval {
            None => 30,
            Some(c) if c.is_instance_of::<pyo3::types::PyBool>() => -1,
            Some(c) => c.extract().map_err(|_| invalid("check_interval must be an int (seconds)"))?,
        };
        if check_interval <= 0 {
            return Err(invalid("check_interval must be positive (seconds)"));
        }
        crate::pylog::refresh(py)?;
        let mut settings = load_settings()?;
        let url = match db_engine {
            Some(e) if !e.is_none() => Some(engine_url(e)?),
            _ => None,
        };
        if let Some(url) = &url {
            settings.database.url = url.clone();
        }
        settings.sweeper.check_interval_secs = std::num::NonZeroU64::new(check_interval as u64)
            .ok_or_else(|| invalid("check_interval must be positive (seconds)"))?;
        if let Some(days) = log_retention_days {
            settings.logs.retention_days =
                u32::try_from(days).map_err(|_| invalid("log_retention_days is too large"))?;
        }
        let manager = acm::AgentConnectionManager::new(settings).map_err(|e| match (&url, e) {
            (Some(_), Error::Config(c)) if c.0.starts_with("database.url") => invalid(c.0),
            (_, e) => to_py(e),
        })?;
        Ok(Self { engine: Engine::new(manager) })
    }

    /// Migrates the database if needed, then runs the worker (consumers, sweeper, relay, HTTP when configured).
    fn start<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let _pass = enter()?;
        crate::pylog::refresh(py)?;
        awaitable(py, self.engine.clone().start())
    }

    /// Stops the worker gracefully.
    fn stop<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let _pass = enter()?;
        awaitable(py, self.engine.clone().stop())
    }

    /// Whether the worker runs.
    #[getter]
    fn running(&self, py: Python<'_>) -> PyResult<bool> {
        let _pass = enter()?;
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
        self.engine.manager.settings().sweeper.check_interval_secs.get()
    }

    fn get_connection_stats(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let _pass = enter()?;
        wait(py, self.engine.clone().stats())?.into_python(py)
    }

    fn aget_connection_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let _pass = enter()?;
        awaitable(py, self.engine.clone().stats())
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
        let _pass = enter()?;
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
        let _pass = enter()?;
        let args = SessionArgs::new(agent_id, acquisition_uuid, name, description, experimental_parameters)?;
        awaitable(py, self.engine.clone().create_session(args))
    }

    fn close_session(&self, py: Python<'_>, session_id: String) -> PyResult<bool> {
        let _pass = enter()?;
        wait(py, self.engine.clone().close_session(session_id))
    }

    fn aclose_session<'py>(&self, py: Python<'py>, session_id: String) -> PyResult<Bound<'py, PyAny>> {
        let _pass = enter()?;
        awaitable(py, self.engine.clone().close_session(session_id))
    }

    /// `logs.retention_days` in force: agents' log lines are kept this many days.
    #[getter]
    fn log_retention_days(&self) -> u64 {
        u64::from(self.engine.manager.settings().logs.retention_days)
    }

    /// Agents' log lines, oldest first: by `agent_id` and/or `session_id`, after `since_id` (else the newest
    /// `limit`), at `min_level` or above.
    #[pyo3(signature = (agent_id=None, session_id=None, since_id=None, limit=None, min_level=None))]
    fn get_logs(
        &self,
        py: Python<'_>,
        agent_id: Option<String>,
        session_id: Option<String>,
        since_id: Option<i64>,
        limit: Option<i64>,
        min_level: Option<String>,
    ) -> PyResult<Py<PyAny>> {
        let _pass = enter()?;
        let engine = self.engine.clone();
        wait(py, engine.get_logs(agent_id, session_id, since_id, limit, min_level))?.into_python(py)
    }

    /// The awaitable twin of `get_logs`.
    #[pyo3(signature = (agent_id=None, session_id=None, since_id=None, limit=None, min_level=None))]
    fn aget_logs<'py>(
        &self,
        py: Python<'py>,
        agent_id: Option<String>,
        session_id: Option<String>,
        since_id: Option<i64>,
        limit: Option<i64>,
        min_level: Option<String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let _pass = enter()?;
        awaitable(py, self.engine.clone().get_logs(agent_id, session_id, since_id, limit, min_level))
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
pub(crate) fn get_connection_manager(py: Python<'_>) -> PyResult<Py<AgentConnectionManager>> {
    let _pass = enter()?;
    if let Some(m) = GLOBAL.get() {
        return Ok(m.clone_ref(py));
    }
    let manager = acm::AgentConnectionManager::new(load_settings()?).map_err(to_py)?;
    let object = Py::new(py, AgentConnectionManager { engine: Engine::new(manager) })?;
    Ok(GLOBAL.get_or_init(|| object).clone_ref(py))
}

/// Starts the process-wide manager.
#[pyfunction]
pub(crate) fn start_connection_manager(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    let _pass = enter()?;
    let m = get_connection_manager(py)?;
    let engine = m.get().engine.clone();
    awaitable(py, engine.start())
}

/// Stops the process-wide manager, if it was made.
#[pyfunction]
pub(crate) fn stop_connection_manager(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    let _pass = enter()?;
    let engine = GLOBAL.get().map(|m| m.get().engine.clone());
    awaitable(py, async move {
        match engine {
            Some(e) => e.stop().await,
            None => Ok(()),
        }
    })
}
