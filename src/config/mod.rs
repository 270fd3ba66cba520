//! Configuration: typed settings, layered with figment, validated once at start.
//!
//! Layers, lowest first: the built-in defaults of [`Settings::default`], `config/default.toml` (when present in the
//! working directory), the file named by `--config` or `ACM_CONFIG`, then `ACM_<SECTION>__<KEY>` environment
//! variables. A bad value, an unknown key in a file or an `ACM_*` variable that is neither configuration nor one of
//! the project's other variables ([`env::NOT_CONFIGURATION`]) stops the program with one line naming it and the
//! closest key. Secrets (passwords in URLs) are redacted by [`Settings::to_redacted_toml`] and never logged.
//!
//! The command line ([`Settings::load_command_line`]) adds one default of its own below the files: `run` serves HTTP
//! on [`WORKER_HTTP_LISTEN`]; the library ([`Settings::load`]) serves none unless `http.listen` is set.

pub mod env;
mod limits;
mod logs;
mod messages;
mod redact;
mod validate;

use messages::one_line;

use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

pub use crate::db::Pooler;
pub use crate::error::ConfigError;
pub use limits::LimitSettings;
pub use logs::LogsSettings;
pub use redact::redact_url;

/// Path of the documented defaults file, relative to the working directory.
pub const DEFAULT_CONFIG_FILE: &str = "config/default.toml";
/// Environment variable that names an extra configuration file.
pub const CONFIG_FILE_ENV: &str = "ACM_CONFIG";
/// `http.listen` of the command line's `run` when no file or variable sets it (the library's default is `""`: no
/// HTTP inside someone else's service unless asked for).
pub const WORKER_HTTP_LISTEN: &str = "127.0.0.1:9090";

/// All settings of the service.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// PostgreSQL settings.
    pub database: DatabaseSettings,
    /// RabbitMQ settings.
    pub amqp: AmqpSettings,
    /// Sweeper thresholds and intervals.
    pub sweeper: SweeperSettings,
    /// Instruction defaults.
    pub instructions: InstructionSettings,
    /// Outbox relay and retention.
    pub outbox: OutboxSettings,
    /// Message processing bounds.
    pub worker: WorkerSettings,
    /// Health and metrics endpoint.
    pub http: HttpSettings,
    /// Logging.
    pub log: LogSettings,
    /// Message authorisation.
    pub security: SecuritySettings,
    /// Per-agent bounds.
    pub limits: LimitSettings,
    /// Agents' log lines.
    pub logs: LogsSettings,
}

/// `database.*`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseSettings {
    /// Connection URL (or libpq key=value string).
    pub url: String,
    /// Maximum pooled connections.
    pub pool_size: usize,
    /// How long a pool checkout, a connect or a recycle may wait.
    pub checkout_timeout_secs: u64,
    /// Extra CA certificate (PEM) trusted for `sslmode=require`; empty for the system roots only.
    pub tls_ca_file: String,
    /// With `sslmode=require`, encrypt without verifying the server certificate (self-signed development servers).
    pub tls_accept_invalid_certs: bool,
    /// Longest a statement may run (PostgreSQL `statement_timeout` of every pooled session).
    pub statement_timeout_secs: u64,
    /// Longest a statement may wait for a lock (`lock_timeout`).
    pub lock_timeout_secs: u64,
    /// Longest a session may sit idle inside a transaction before the server ends it
    /// (`idle_in_transaction_session_timeout`).
    pub idle_in_transaction_timeout_secs: u64,
    /// What `url` points at: the server itself or PgBouncer (then no session settings go in the startup packet).
    pub pooler: Pooler,
}

/// `amqp.*`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpSettings {
    /// Broker URL, `amqp://` or `amqps://`.
    pub url: String,
    /// Prefix of every exchange and queue name.
    pub prefix: String,
    /// Prefetch per consumer.
    pub prefetch: u16,
    /// Type of the command queue.
    pub command_queue_type: QueueType,
    /// Type of the heartbeat queue: `classic` (one node) or `quorum` (replicated over a cluster's nodes).
    pub heartbeat_queue_type: QueueType,
    /// Heartbeat queues, spread by agent with the consistent-hash exchange when more than 1.
    pub heartbeat_shards: u32,
    /// Largest accepted message body in bytes.
    pub max_message_bytes: usize,
    /// Deliveries of one command message before the broker dead-letters it (quorum queues only).
    pub command_delivery_limit: u32,
    /// Longest wait for the broker's confirm of a publish (reply, dead letter, relay batch); then it counts as not
    /// published.
    pub confirm_timeout_secs: u64,
}

/// The type of a queue.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// Replicated, with delivery limits.
    Quorum,
    /// A classic durable queue.
    Classic,
}

/// `sweeper.*`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SweeperSettings {
    /// Seconds between cycles; the first runs at start.
    pub check_interval_secs: u64,
    /// A connection without a heartbeat for this long is stale.
    pub connection_stale_after_secs: u64,
    /// A session without agent activity for this long is inactive.
    pub session_inactive_after_secs: u64,
    /// A retried instruction's new deadline is now plus this.
    pub instruction_retry_window_secs: u64,
    /// The brake needs at least this many stale candidates.
    pub stale_brake_min_connections: u64,
    /// ... and at least this share of the active connections.
    pub stale_brake_ratio: f64,
    /// A heartbeat queue deeper than this means the worker is behind: hold.
    pub max_heartbeat_backlog: u64,
    /// Longest hold in a row; after it the verdict stands.
    pub stale_brake_max_hold_secs: u64,
    /// The brake counts, beside the stale connections, those that go stale within this many seconds (the group that
    /// went silent together); 0: half of `connection_stale_after_secs`.
    pub stale_brake_window_secs: u64,
    /// Rows changed per statement (and transaction).
    pub batch_size: i64,
    /// Batch transactions a task runs at once when more than one batch is due.
    pub parallel_batches: usize,
    /// Length of a task's lease; 0: derived from `check_interval_secs` ([`crate::sweeper::lease::length`]).
    pub task_lease_secs: u64,
}

/// `instructions.*`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct InstructionSettings {
    /// Deadline of an instruction created without `expires_at` or `ttl_seconds`.
    pub default_ttl_secs: u64,
    /// Retries of an instruction created without `max_retries`.
    pub default_max_retries: u32,
}

/// `outbox.*`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxSettings {
    /// Events claimed, published and deleted per relay batch.
    pub batch_size: i64,
    /// Relay batches in flight at once: the next is claimed and published while the broker confirms the previous.
    pub pipeline: usize,
    /// How often the relay looks for events committed by other processes (its own process wakes it at once), and a
    /// standing-by relay whether the relay lease has expired.
    pub poll_interval_ms: u64,
    /// Idempotency (processed-message) records are deleted after this long.
    pub retention_secs: u64,
    /// The relay lease: one relay publishes at a time and renews it every third of this (as it claims, and while
    /// its batches await their confirms); when it has not for this long, another relay takes over and publishes
    /// again what the first had not deleted. At least 2.
    pub lease_secs: u64,
}

/// `worker.*`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerSettings {
    /// This worker's identity in the relay lease, stable across its restarts (a pod or host name), so that a
    /// restarted worker takes its lease back at once; unique among the running workers. Empty: host, process and a
    /// random id, unique to each process (a restarted worker then waits for its old lease to expire).
    pub id: String,
    /// Heartbeat deliveries applied in one transaction at most.
    pub heartbeat_batch_size: usize,
    /// Heartbeat batches in flight at once: the next batch is applied while the previous one commits.
    pub heartbeat_pipeline: usize,
    /// Agent activity (a heartbeat, `connection.open`/`close`, `instruction.ack`) moves its session's
    /// `last_activity_at` only when that is older than this, in seconds; must be below
    /// `sweeper.session_inactive_after_secs`.
    pub session_activity_granularity_secs: u64,
    /// Commands applied at once (commands on one connection, instruction or session keep their order; a command waits
    /// only for its own object's earlier commands and a free place).
    pub command_lanes: usize,
    /// On shutdown, how long the worker may take to finish what it holds; the rest is left unacknowledged (the
    /// broker redelivers it) and the process exits.
    pub shutdown_grace_secs: u64,
}

/// `http.*`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSettings {
    /// Listen address of `/healthz`, `/readyz` and `/metrics`; empty to disable. Empty by default in the library;
    /// the command line's default is [`WORKER_HTTP_LISTEN`].
    pub listen: String,
    /// `/metrics` serves the statistics gauges from a cache refreshed at most once per this many seconds.
    pub stats_cache_secs: u64,
}

/// `log.*`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// `text` or `json`.
    pub format: LogFormat,
}

/// Log line format.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `security.*`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct SecuritySettings {
    /// Agent messages must carry a broker-validated `user_id` equal to their `agent_id`.
    pub require_user_id: bool,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: "postgres://postgres@127.0.0.1:5432/agent_connections".into(),
            pool_size: 20,
            checkout_timeout_secs: 5,
            tls_ca_file: String::new(),
            tls_accept_invalid_certs: false,
            statement_timeout_secs: 30,
            lock_timeout_secs: 10,
            idle_in_transaction_timeout_secs: 60,
            pooler: Pooler::None,
        }
    }
}

impl Default for AmqpSettings {
    fn default() -> Self {
        Self {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            prefix: "agent".into(),
            prefetch: 2000,
            command_queue_type: QueueType::Quorum,
            heartbeat_queue_type: QueueType::Classic,
            heartbeat_shards: 1,
            max_message_bytes: 1_048_576,
            command_delivery_limit: 20,
            confirm_timeout_secs: 10,
        }
    }
}

/// The sweeper's defaults are its tasks' own, defined beside each task.
impl Default for SweeperSettings {
    fn default() -> Self {
        use crate::sweeper::{inactive_sessions, instruction_expiry, stale_connections};
        Self {
            check_interval_secs: crate::sweeper::CHECK_INTERVAL_DEFAULT.as_secs(),
            connection_stale_after_secs: stale_connections::STALE_AFTER_DEFAULT.as_secs(),
            session_inactive_after_secs: inactive_sessions::INACTIVE_AFTER_DEFAULT.as_secs(),
            instruction_retry_window_secs: instruction_expiry::RETRY_WINDOW_DEFAULT.as_secs(),
            stale_brake_min_connections: stale_connections::BRAKE_MIN_CONNECTIONS_DEFAULT,
            stale_brake_ratio: stale_connections::BRAKE_RATIO_DEFAULT,
            max_heartbeat_backlog: stale_connections::MAX_HEARTBEAT_BACKLOG_DEFAULT,
            stale_brake_max_hold_secs: stale_connections::MAX_HOLD_DEFAULT.as_secs(),
            stale_brake_window_secs: 0,
            batch_size: crate::sweeper::BATCH_SIZE_DEFAULT,
            parallel_batches: crate::sweeper::PARALLEL_BATCHES_DEFAULT,
            task_lease_secs: 0,
        }
    }
}

impl Default for InstructionSettings {
    fn default() -> Self {
        Self { default_ttl_secs: 300, default_max_retries: 3 }
    }
}

impl Default for OutboxSettings {
    fn default() -> Self {
        Self {
            batch_size: 2000,
            pipeline: 4,
            poll_interval_ms: 250,
            retention_secs: crate::sweeper::retention::RETENTION_DEFAULT.as_secs(),
            lease_secs: 3,
        }
    }
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            id: String::new(),
            heartbeat_batch_size: 1000,
            heartbeat_pipeline: 2,
            session_activity_granularity_secs: crate::commands::heartbeat::ACTIVITY_GRANULARITY_DEFAULT.as_secs(),
            command_lanes: 8,
            shutdown_grace_secs: 20,
        }
    }
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self { listen: String::new(), stats_cache_secs: 5 }
    }
}

impl Default for LogSettings {
    fn default() -> Self {
        Self { format: LogFormat::Text }
    }
}

impl Settings {
    /// Loads the library's layered configuration: defaults, `config/default.toml`, `file` (or `ACM_CONFIG`),
    /// `ACM_*`. Refuses an `ACM_*` variable that is not configuration ([`env::check_environment`]).
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_over(Figment::from(Serialized::defaults(Settings::default())), file)
    }

    /// [`Settings::load`] for the command line: `http.listen` defaults to [`WORKER_HTTP_LISTEN`] (a file or
    /// `ACM_HTTP__LISTEN` still sets it, `""` included).
    pub fn load_command_line(file: Option<&Path>) -> Result<Self, ConfigError> {
        let defaults = Figment::from(Serialized::defaults(Settings::default()))
            .merge(Serialized::default("http.listen", WORKER_HTTP_LISTEN));
        Self::load_over(defaults, file)
    }

    fn load_over(defaults: Figment, file: Option<&Path>) -> Result<Self, ConfigError> {
        env::check_environment()?;
        let env_file = std::env::var_os(CONFIG_FILE_ENV).map(PathBuf::from);
        let file = file.map(Path::to_path_buf).or(env_file);
        let mut figment = defaults.merge(Toml::file(DEFAULT_CONFIG_FILE));
        if let Some(file) = &file {
            if !file.is_file() {
                return Err(ConfigError(format!("config file {}: no such file", file.display())));
            }
            figment = figment.merge(Toml::file(file));
        }
        figment = figment.merge(env_provider());
        Self::from_figment(figment)
    }

    /// Extracts and validates settings from any figment (tests build their own).
    pub fn from_figment(figment: Figment) -> Result<Self, ConfigError> {
        let settings: Settings = figment.extract().map_err(|e| ConfigError(one_line(&e)))?;
        settings.validate()?;
        Ok(settings)
    }

    /// The effective configuration as TOML, with passwords replaced by `***`.
    pub fn to_redacted_toml(&self) -> String {
        let mut copy = self.clone();
        copy.database.url = redact_url(&copy.database.url);
        copy.amqp.url =
            crate::amqp::broker_urls(&copy.amqp.url).into_iter().map(redact_url).collect::<Vec<_>>().join(",");
        toml::to_string_pretty(&copy).unwrap_or_else(|e| format!("# cannot render configuration: {e}\n"))
    }

    /// `amqp.confirm_timeout_secs` as a duration.
    pub fn confirm_timeout(&self) -> Duration {
        Duration::from_secs(self.amqp.confirm_timeout_secs)
    }

    /// `worker.shutdown_grace_secs` as a duration.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.worker.shutdown_grace_secs)
    }

    /// `sweeper.check_interval_secs` as a duration.
    pub fn check_interval(&self) -> Duration {
        Duration::from_secs(self.sweeper.check_interval_secs)
    }
}

/// The configuration sections; `ACM_<SECTION>__<KEY>` variables configure them.
pub const SECTIONS: [&str; 10] =
    ["database", "amqp", "sweeper", "instructions", "outbox", "worker", "http", "log", "security", "limits"];

/// `ACM_<SECTION>__<KEY>` variables; the project's other `ACM_*` variables ([`env::NOT_CONFIGURATION`]) are left
/// out here and every other one is refused before ([`env::check_environment`]).
fn env_provider() -> Env {
    Env::prefixed("ACM_")
        .filter(|k| {
            let k = k.as_str().to_ascii_lowercase();
            SECTIONS.iter().any(|s| k.strip_prefix(s).is_some_and(|rest| rest.starts_with("__")))
        })
        .split("__")
}

#[cfg(test)]
mod tests;
