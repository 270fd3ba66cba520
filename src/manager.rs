//! [`AgentConnectionManager`]: the library API of the Python service it replaces (same names, same behaviour),
//! plus the process-wide instance of `get_connection_manager`, `start_connection_manager` and `stop_connection_manager`.

use std::sync::{Arc, OnceLock};

use deadpool_postgres::Pool;
use serde_json::{Map, Value};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::amqp;
use crate::commands::log::LogLevel;
use crate::commands::log_get::{self, LogLine};
use crate::commands::{self, session, stats::ConnectionStats, Command, Meta};
use crate::config::Settings;
use crate::db;
use crate::domain::{Ident, Text};
use crate::error::{CommandError, Error, Result};
use crate::events::OutboxSignal;
use crate::metrics::Metrics;
use crate::retry::retry_transient;
use crate::sweeper::{BacklogProbe, SweepReport, Sweeper};
use crate::worker::{Health, Worker};

struct Running {
    shutdown: CancellationToken,
    task: JoinHandle<Result<()>>,
}

/// Manages agent connections, health monitoring and the instruction lifecycle.
///
/// `start` runs the worker (consumers, sweeper every `sweeper.check_interval_secs`, outbox relay) in the
/// background; `stop` shuts it down gracefully. The other methods work whether or not it is started.
pub struct AgentConnectionManager {
    settings: Arc<Settings>,
    pool: Pool,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    outbox: OutboxSignal,
    running: Mutex<Option<Running>>,
}

impl AgentConnectionManager {
    /// A manager for these settings. Makes no connection until used.
    pub fn new(settings: Settings) -> Result<Self> {
        settings.validate()?;
        let pool = db::build_pool(&settings.database)?;
        Ok(Self::with_pool(settings, pool))
    }

    /// A manager on an existing pool (the `db_engine` of the Python API).
    pub fn with_pool(settings: Settings, pool: Pool) -> Self {
        Self {
            settings: Arc::new(settings),
            pool,
            metrics: Arc::new(Metrics::new()),
            health: Arc::new(Health::default()),
            outbox: OutboxSignal::default(),
            running: Mutex::new(None),
        }
    }

    /// The settings in force.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The database pool.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The health flags.
    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    /// Whether the worker is running.
    pub async fn is_running(&self) -> bool {
        self.running.lock().await.is_some()
    }

    /// Applies the migrations (creating the database if needed), connects to the broker, then starts the background
    /// worker; starting a started manager does nothing. Made to run inside another service: it fails instead of
    /// waiting when the database or the broker cannot be reached — within the database's connect bound
    /// (`database.checkout_timeout_secs`) and [`crate::amqp::CONNECT_TIMEOUT`] per broker node — with the server's
    /// address and the cause in the error. A broker lost later is reconnected by the worker, as always.
    pub async fn start(&self) -> Result<()> {
        self.start_with(false).await
    }

    /// [`AgentConnectionManager::start`] for a process that is nothing but the worker (`run`): it waits for the
    /// database and the broker instead, retrying with backoff and logging each failure with the server's address.
    pub async fn start_waiting(&self) -> Result<()> {
        self.start_with(true).await
    }

    async fn start_with(&self, wait: bool) -> Result<()> {
        let mut running = self.running.lock().await;
        if running.is_some() {
            return Ok(());
        }
        self.settings.validate_worker()?;
        let shutdown = CancellationToken::new();
        let prefix = &self.settings.amqp.prefix;
        let unpooled = self.settings.database.pooler == db::Pooler::None;
        let first = if wait {
            retry_transient("applying migrations", &shutdown, || db::migrate(&self.settings.database)).await?;
            retry_transient("checking the database's prefix", &shutdown, || db::claim_prefix(&self.pool, prefix))
                .await?;
            if unpooled {
                retry_transient("probing the database connections", &shutdown, || {
                    db::probe_statements_kept(&self.pool)
                })
                .await?;
            }
            None
        } else {
            db::migrate(&self.settings.database).await?;
            db::claim_prefix(&self.pool, prefix).await?;
            if unpooled {
                db::probe_statements_kept(&self.pool).await?;
            }
            let name = "agent-connection-manager";
            let connected = amqp::connect_from(&self.settings.amqp.url, 0, name).await.map_err(|e| match e {
                Error::Amqp(mut failure) => {
                    failure.at = failure.at.map(|node| format!("{node} never reached"));
                    Error::Amqp(failure)
                }
                other => other,
            })?;
            Some(connected)
        };
        for (old, new) in &self.settings.renamed {
            tracing::warn!(old, new, "configuration key {old} is now called {new}; read as {new}: rename it");
        }
        let worker = Worker {
            pool: self.pool.clone(),
            settings: self.settings.clone(),
            metrics: self.metrics.clone(),
            health: self.health.clone(),
            outbox: self.outbox.clone(),
        };
        let task = tokio::spawn(worker.run(shutdown.clone(), first));
        tracing::info!(prefix = %self.settings.amqp.prefix, "connection manager started");
        *running = Some(Running { shutdown, task });
        Ok(())
    }

    /// Stops the worker gracefully: consumers stop taking deliveries, finish and acknowledge what they hold, the
    /// relay flushes — for at most `worker.shutdown_grace_secs`. What is unfinished then is abandoned: its deliveries
    /// stay unacknowledged (the broker redelivers them when the connection goes) and its events stay in the outbox.
    pub async fn stop(&self) -> Result<()> {
        let Some(Running { shutdown, mut task }) = self.running.lock().await.take() else {
            return Ok(());
        };
        shutdown.cancel();
        let grace = self.settings.shutdown_grace();
        let result = match tokio::time::timeout(grace, &mut task).await {
            Ok(done) => done.unwrap_or_else(|e| Err(Error::TaskFailed(format!("the worker: {e}")))),
            Err(_) => {
                task.abort();
                tracing::warn!(
                    grace_secs = grace.as_secs(),
                    blocked = ?self.health.blocked(),
                    "shutdown grace period over: abandoning unfinished work (the broker redelivers what was not \
                     acknowledged)"
                );
                Ok(())
            }
        };
        tracing::info!("connection manager stopped");
        result
    }

    /// Current connection and session statistics, from one snapshot.
    pub async fn get_connection_stats(&self) -> Result<ConnectionStats> {
        let client = crate::db::checkout(&self.pool).await?;
        commands::stats::get(&client).await
    }

    /// Creates an active session for `agent_id` and returns its id (the `agent.session.created` event is written
    /// in the same transaction). `name` defaults to `Session-YYYYmmdd-HHMMSS` (UTC).
    pub async fn create_session(
        &self,
        agent_id: &str,
        acquisition_uuid: Option<&str>,
        name: Option<&str>,
        description: Option<&str>,
        experimental_parameters: Option<Map<String, Value>>,
    ) -> Result<String> {
        let text = |field: &str, v: Option<&str>| -> Result<Option<Text>> {
            v.map(|s| {
                serde_json::from_value::<Text>(Value::String(s.to_string()))
                    .map_err(|e| Error::Command(CommandError::Invalid(format!("{field}: {e}"))))
            })
            .transpose()
        };
        let cmd = Command::new(session::Create {
            agent_id: Ident::parse(agent_id).map_err(|e| CommandError::Invalid(format!("agent_id: {e}")))?,
            session_id: None,
            acquisition_uuid: text("acquisition_uuid", acquisition_uuid)?,
            name: text("name", name)?,
            description: text("description", description)?,
            experimental_parameters: experimental_parameters
                .map(|p| {
                    serde_json::from_value(Value::Object(p))
                        .map_err(|e| Error::Command(CommandError::Invalid(format!("experimental_parameters: {e}"))))
                })
                .transpose()?,
        });
        let outcome = commands::execute(&self.pool, &self.settings, &cmd, &Meta::default()).await;
        self.outbox.committed();
        let outcome = outcome??;
        Ok(outcome["session_id"].as_str().unwrap_or_default().to_string())
    }

    /// Ends a session: its active connections are closed (`session_closed`) and its open instructions cancelled.
    /// Returns `false` when there is no such session; closing an ended session again returns `true`.
    pub async fn close_session(&self, session_id: &str) -> Result<bool> {
        let Ok(session_id) = Ident::parse(session_id) else {
            return Ok(false);
        };
        let cmd = Command::new(session::Close { session_id });
        let outcome = commands::execute(&self.pool, &self.settings, &cmd, &Meta::default()).await;
        self.outbox.committed();
        let outcome = outcome??;
        Ok(outcome["closed"].as_bool().unwrap_or(false))
    }

    /// Agents' log lines by agent and/or session, oldest first, as `logs.get` reads them: with `since_id`, the first
    /// `limit` (1-1000, default 100) after it; without, the newest `limit`; `min_level` a level name
    /// (`DEBUG` … `CRITICAL`). Bad arguments are a [`CommandError::Invalid`].
    pub async fn get_logs(
        &self,
        agent_id: Option<&str>,
        session_id: Option<&str>,
        since_id: Option<i64>,
        limit: Option<i64>,
        min_level: Option<&str>,
    ) -> Result<Vec<LogLine>> {
        let invalid = |field: &str, e: String| Error::Command(CommandError::Invalid(format!("{field}: {e}")));
        let ident = |field: &str, v: Option<&str>| -> Result<Option<Ident>> {
            v.map(|s| Ident::parse(s).map_err(|e| invalid(field, e.to_string()))).transpose()
        };
        let q = log_get::Get {
            agent_id: ident("agent_id", agent_id)?,
            session_id: ident("session_id", session_id)?,
            since_id,
            limit,
            min_level: min_level.map(|l| LogLevel::parse(l).map_err(|e| invalid("min_level", e))).transpose()?,
        };
        commands::Message::check(&q).map_err(|e| Error::Command(CommandError::Invalid(e)))?;
        let client = self.pool.get().await?;
        log_get::get(&client, &q).await
    }

    /// Runs one sweeper cycle now (without the broker's backlog figure unless `probe` has a channel).
    pub async fn sweep_once(&self, probe: BacklogProbe) -> Result<SweepReport> {
        Sweeper::new(self.pool.clone(), self.settings.clone(), probe, self.metrics.clone(), self.outbox.clone())
            .run_once()
            .await
    }
}

static GLOBAL: OnceLock<AgentConnectionManager> = OnceLock::new();

/// The process-wide manager, configured from the layered configuration on first use.
pub fn get_connection_manager() -> Result<&'static AgentConnectionManager> {
    if let Some(m) = GLOBAL.get() {
        return Ok(m);
    }
    let manager = AgentConnectionManager::new(Settings::load(None)?)?;
    Ok(GLOBAL.get_or_init(|| manager))
}

/// Starts the process-wide manager.
pub async fn start_connection_manager() -> Result<&'static AgentConnectionManager> {
    let m = get_connection_manager()?;
    m.start().await?;
    Ok(m)
}

/// Stops the process-wide manager, if it was started.
pub async fn stop_connection_manager() -> Result<()> {
    match GLOBAL.get() {
        Some(m) => m.stop().await,
        None => Ok(()),
    }
}
