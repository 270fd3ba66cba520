//! `Engine`: a library manager with its schema check and HTTP endpoint, and the async operations behind the
//! `AgentConnectionManager` methods.

use std::sync::Arc;
use std::time::Duration;

use acm::Error;
use agent_connection_manager as acm;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::PyString;
use serde_json::{Map, Value};
use tokio::sync::{Mutex, OnceCell};
use tokio::task::JoinHandle;
use tokio_postgres::error::SqlState;
use tokio_util::sync::CancellationToken;

use crate::awaitable::{Json, Stats};
use crate::convert::{non_empty, py_to_object};
use crate::errors::{invalid, to_py, ConfigurationError, DatabaseError};

/// Longest time for creating the database and applying the migrations, once a connection was made.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(60);

/// The running HTTP endpoint: its stop signal and its task.
type HttpEndpoint = (CancellationToken, JoinHandle<()>);

/// A manager, the one-time schema check every call makes first, and the HTTP endpoint while started.
#[derive(Clone)]
pub(crate) struct Engine {
    pub(crate) manager: Arc<acm::AgentConnectionManager>,
    schema: Arc<OnceCell<()>>,
    http: Arc<Mutex<Option<HttpEndpoint>>>,
}

impl Engine {
    pub(crate) fn new(manager: acm::AgentConnectionManager) -> Self {
        Self { manager: Arc::new(manager), schema: Arc::default(), http: Arc::default() }
    }

    /// Creates the database and applies the migrations once. First a connection is tried, bounded by
    /// `database.checkout_timeout_secs` (the library's own `start` retries an unreachable database for ever; here
    /// the caller hears of it), then the migrations run, bounded by `MIGRATION_TIMEOUT`.
    async fn ensure_schema(&self) -> PyResult<()> {
        let db = &self.manager.settings().database;
        let limit = Duration::from_secs(db.checkout_timeout_secs.get());
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
    pub(crate) async fn start(self) -> PyResult<()> {
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
                    .map_err(|e| acm::http::listen_error(addr, &e).0)
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
    pub(crate) async fn stop(self) -> PyResult<()> {
        let stopped = self.manager.stop().await.map_err(to_py);
        if let Some((stop, task)) = self.http.lock().await.take() {
            stop.cancel();
            let _ = task.await;
        }
        stopped
    }

    pub(crate) async fn stats(self) -> PyResult<Stats> {
        self.ensure_schema().await?;
        let stats = self.manager.get_connection_stats().await.map_err(to_py)?;
        let fields = serde_json::to_value(&stats).map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
        Ok(Stats { fields, timestamp: stats.timestamp })
    }

    pub(crate) async fn create_session(self, args: SessionArgs) -> PyResult<String> {
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

    /// Agents' log lines as a list of dicts (`timestamp` an RFC 3339 string, as in events).
    pub(crate) async fn get_logs(
        self,
        agent_id: Option<String>,
        session_id: Option<String>,
        since_id: Option<i64>,
        limit: Option<i64>,
        min_level: Option<String>,
    ) -> PyResult<Json> {
        self.ensure_schema().await?;
        let lines = self
            .manager
            .get_logs(agent_id.as_deref(), session_id.as_deref(), since_id, limit, min_level.as_deref())
            .await
            .map_err(to_py)?;
        serde_json::to_value(lines).map(Json).map_err(|e| PyRuntimeError::new_err(e.to_string()))
    }

    pub(crate) async fn close_session(self, session_id: String) -> PyResult<bool> {
        self.ensure_schema().await?;
        self.manager.close_session(&session_id).await.map_err(to_py)
    }
}

/// `create_session`'s arguments, checked.
pub(crate) struct SessionArgs {
    agent_id: String,
    acquisition_uuid: Option<String>,
    name: Option<String>,
    description: Option<String>,
    experimental_parameters: Option<Map<String, Value>>,
}

impl SessionArgs {
    pub(crate) fn new(
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
                Err(_) => return Err(invalid("acquisition_uuid must be a string or a uuid.UUID")),
            }),
        };
        let experimental_parameters = match experimental_parameters {
            Some(p) if !p.is_none() => Some(py_to_object(p, "experimental_parameters")?),
            _ => None,
        };
        Ok(Self { agent_id, acquisition_uuid, name, description, experimental_parameters })
    }
}
