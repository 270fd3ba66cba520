//! Configuration: typed settings, layered with figment, validated once at start.
//!
//! Layers, lowest first: the built-in defaults of [`Settings::default`], `config/default.toml` (when present in the
//! working directory), the file named by `--config` or `ACM_CONFIG`, then `ACM_*` environment variables (nesting with
//! `__`). A bad value stops the program with one line naming the key. Secrets (passwords in URLs) are redacted by
//! [`Settings::to_redacted_toml`] and never logged.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

/// Path of the documented defaults file, relative to the working directory.
pub const DEFAULT_CONFIG_FILE: &str = "config/default.toml";
/// Environment variable that names an extra configuration file.
pub const CONFIG_FILE_ENV: &str = "ACM_CONFIG";

/// A configuration that cannot be used; the message names the key.
#[derive(Debug, thiserror::Error)]
#[error("configuration error: {0}")]
pub struct ConfigError(pub String);

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
    /// Rows changed per statement (and transaction).
    pub batch_size: i64,
    /// Batch transactions a task runs at once when more than one batch is due.
    pub parallel_batches: usize,
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
    /// Events claimed, published and marked per relay batch.
    pub batch_size: i64,
    /// Relay batches in flight at once: the next is claimed and published while the broker confirms the previous.
    pub pipeline: usize,
    /// How often the relay looks for events when no notification arrives.
    pub poll_interval_ms: u64,
    /// Published events (and processed-message records) are deleted after this long.
    pub retention_secs: u64,
    /// How long a relay's claim on a batch lasts; after it another relay may publish the batch. Must exceed
    /// `amqp.confirm_timeout_secs`.
    pub lease_secs: u64,
}

/// `worker.*`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerSettings {
    /// Heartbeat deliveries applied in one transaction at most.
    pub heartbeat_batch_size: usize,
    /// Heartbeat batches in flight at once: the next batch is applied while the previous one commits.
    pub heartbeat_pipeline: usize,
    /// Commands applied concurrently (commands on one connection, instruction or session keep their order).
    pub command_lanes: usize,
    /// On shutdown, how long the worker may take to finish what it holds; the rest is left unacknowledged (the
    /// broker redelivers it) and the process exits.
    pub shutdown_grace_secs: u64,
}

/// `http.*`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSettings {
    /// Listen address of `/healthz`, `/readyz` and `/metrics`; empty to disable.
    pub listen: String,
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
            batch_size: crate::sweeper::BATCH_SIZE_DEFAULT,
            parallel_batches: crate::sweeper::PARALLEL_BATCHES_DEFAULT,
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
            poll_interval_ms: 1000,
            retention_secs: crate::sweeper::retention::RETENTION_DEFAULT.as_secs(),
            lease_secs: 30,
        }
    }
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self { heartbeat_batch_size: 1000, heartbeat_pipeline: 2, command_lanes: 8, shutdown_grace_secs: 20 }
    }
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self { listen: "127.0.0.1:9090".into() }
    }
}

impl Default for LogSettings {
    fn default() -> Self {
        Self { format: LogFormat::Text }
    }
}

impl Settings {
    /// Loads the layered configuration: defaults, `config/default.toml`, `file` (or `ACM_CONFIG`), `ACM_*`.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let env_file = std::env::var_os(CONFIG_FILE_ENV).map(PathBuf::from);
        let file = file.map(Path::to_path_buf).or(env_file);
        let mut figment =
            Figment::from(Serialized::defaults(Settings::default())).merge(Toml::file(DEFAULT_CONFIG_FILE));
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

    /// Checks every value that its type alone does not constrain.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: &str| Err(ConfigError(format!("{key}: {why}")));
        if self.database.url.parse::<tokio_postgres::Config>().is_err() {
            return bad("database.url", "not a valid PostgreSQL URL or key=value string");
        }
        if self.database.pool_size == 0 {
            return bad("database.pool_size", "must be at least 1");
        }
        if self.database.checkout_timeout_secs == 0 {
            return bad("database.checkout_timeout_secs", "must be at least 1");
        }
        let urls = crate::amqp::broker_urls(&self.amqp.url);
        if urls.is_empty() {
            return bad("amqp.url", "must be an amqp:// or amqps:// URL, or several separated by commas");
        }
        for u in urls {
            match url::Url::parse(u) {
                Ok(u) if u.scheme() == "amqp" || u.scheme() == "amqps" => {}
                _ => return bad("amqp.url", "must be an amqp:// or amqps:// URL, or several separated by commas"),
            }
        }
        let prefix_ok = !self.amqp.prefix.is_empty()
            && self.amqp.prefix.len() <= 200
            && self.amqp.prefix.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c));
        if !prefix_ok {
            return bad("amqp.prefix", "must be 1-200 characters of letters, digits, '-', '_', '.', ':'");
        }
        if self.amqp.prefetch == 0 {
            return bad("amqp.prefetch", "must be at least 1");
        }
        if self.amqp.max_message_bytes == 0 {
            return bad("amqp.max_message_bytes", "must be at least 1");
        }
        if self.amqp.command_delivery_limit == 0 {
            return bad("amqp.command_delivery_limit", "must be at least 1");
        }
        let s = &self.sweeper;
        for (key, v) in [
            ("sweeper.check_interval_secs", s.check_interval_secs),
            ("sweeper.connection_stale_after_secs", s.connection_stale_after_secs),
            ("sweeper.session_inactive_after_secs", s.session_inactive_after_secs),
            ("sweeper.instruction_retry_window_secs", s.instruction_retry_window_secs),
            ("instructions.default_ttl_secs", self.instructions.default_ttl_secs),
            ("outbox.poll_interval_ms", self.outbox.poll_interval_ms),
            ("database.statement_timeout_secs", self.database.statement_timeout_secs),
            ("database.lock_timeout_secs", self.database.lock_timeout_secs),
            ("database.idle_in_transaction_timeout_secs", self.database.idle_in_transaction_timeout_secs),
            ("amqp.confirm_timeout_secs", self.amqp.confirm_timeout_secs),
            ("outbox.lease_secs", self.outbox.lease_secs),
            ("worker.shutdown_grace_secs", self.worker.shutdown_grace_secs),
        ] {
            if v == 0 {
                return bad(key, "must be at least 1");
            }
        }
        if !(s.stale_brake_ratio > 0.0 && s.stale_brake_ratio <= 1.0) {
            return bad("sweeper.stale_brake_ratio", "must be greater than 0 and at most 1");
        }
        if s.batch_size < 1 {
            return bad("sweeper.batch_size", "must be at least 1");
        }
        if s.parallel_batches == 0 {
            return bad("sweeper.parallel_batches", "must be at least 1");
        }
        if self.outbox.batch_size < 1 {
            return bad("outbox.batch_size", "must be at least 1");
        }
        if self.worker.heartbeat_batch_size == 0 {
            return bad("worker.heartbeat_batch_size", "must be at least 1");
        }
        if self.outbox.pipeline == 0 {
            return bad("outbox.pipeline", "must be at least 1");
        }
        if self.worker.heartbeat_pipeline == 0 {
            return bad("worker.heartbeat_pipeline", "must be at least 1");
        }
        if self.worker.command_lanes == 0 {
            return bad("worker.command_lanes", "must be at least 1");
        }
        if self.outbox.lease_secs <= self.amqp.confirm_timeout_secs {
            return bad("outbox.lease_secs", "must be greater than amqp.confirm_timeout_secs");
        }
        if !self.http.listen.is_empty() && self.http.listen.parse::<SocketAddr>().is_err() {
            return bad("http.listen", "must be an address such as 127.0.0.1:9090, or empty");
        }
        Ok(())
    }

    /// Pooled connections a running worker holds at once at full load: one per heartbeat batch in flight, command
    /// lane, relay batch in flight and sweeper batch transaction, plus one for the statistics of `/metrics`.
    pub fn worker_connections(&self) -> usize {
        self.worker.heartbeat_pipeline
            + self.worker.command_lanes
            + self.outbox.pipeline
            + self.sweeper.parallel_batches
            + 1
    }

    /// Checks what running the worker needs beyond [`Settings::validate`]: settings that are each valid but cannot
    /// work together. Library calls that do not start the worker (creating or closing a session, statistics) do not
    /// need them.
    pub fn validate_worker(&self) -> Result<(), ConfigError> {
        let w = &self.worker;
        let needed = w.heartbeat_batch_size.saturating_mul(w.heartbeat_pipeline);
        if usize::from(self.amqp.prefetch) < needed {
            return Err(ConfigError(format!(
                "amqp.prefetch: {} is below worker.heartbeat_batch_size x worker.heartbeat_pipeline ({needed}); \
                 the later batches of the pipeline would never fill",
                self.amqp.prefetch
            )));
        }
        let held = self.worker_connections();
        if self.database.pool_size < held {
            return Err(ConfigError(format!(
                "database.pool_size: {} is below the {held} connections a worker holds at once \
                 (worker.heartbeat_pipeline + worker.command_lanes + outbox.pipeline + sweeper.parallel_batches + 1)",
                self.database.pool_size
            )));
        }
        Ok(())
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
pub const SECTIONS: [&str; 9] =
    ["database", "amqp", "sweeper", "instructions", "outbox", "worker", "http", "log", "security"];

/// `ACM_<SECTION>__<KEY>` variables. Other `ACM_*` variables (`ACM_CONFIG`, which names a file, and variables of
/// other tools) are not configuration keys; an unknown key inside a known section is still an error.
fn env_provider() -> Env {
    Env::prefixed("ACM_")
        .filter(|k| {
            let k = k.as_str().to_ascii_lowercase();
            SECTIONS.iter().any(|s| k.strip_prefix(s).is_some_and(|rest| rest.starts_with("__")))
        })
        .split("__")
}

/// Formats a figment error as one line: key, problem, source.
fn one_line(e: &figment::Error) -> String {
    let mut parts = Vec::new();
    for err in e.clone() {
        let key = if err.path.is_empty() { "configuration".to_string() } else { err.path.join(".") };
        let source = err
            .metadata
            .as_ref()
            .map(|m| match &err.metadata.as_ref().and_then(|m| m.source.as_ref()) {
                Some(src) => format!(" (from {} {src})", m.name),
                None => format!(" (from {})", m.name),
            })
            .unwrap_or_default();
        parts.push(format!("{key}: {}{source}", err.kind));
    }
    parts.join("; ").replace('\n', " ")
}

/// Replaces the password of a URL (or a libpq `password=` pair) with `***`.
///
/// ```
/// use agent_connection_manager::config::redact_url;
/// assert_eq!(redact_url("amqp://guest:guest@host/%2f"), "amqp://guest:***@host/%2f");
/// assert_eq!(redact_url("host=db password=secret"), "host=db password=***");
/// ```
pub fn redact_url(raw: &str) -> String {
    if let Ok(mut u) = url::Url::parse(raw) {
        if u.password().is_some() && u.set_password(Some("***")).is_ok() {
            return u.to_string();
        }
        return raw.to_string();
    }
    // libpq key=value form.
    raw.split_whitespace()
        .map(|pair| match pair.split_once('=') {
            Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
            _ => pair.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_toml(s: &str) -> Result<Settings, ConfigError> {
        Settings::from_figment(Figment::from(Serialized::defaults(Settings::default())).merge(Toml::string(s)))
    }

    #[test]
    fn defaults_are_valid_and_as_documented() {
        let s = Settings::default();
        s.validate().unwrap();
        s.validate_worker().unwrap();
        assert_eq!(s.database.pool_size, 20);
        assert_eq!(s.amqp.prefix, "agent");
        assert_eq!(s.amqp.prefetch, 2000);
        assert_eq!(s.amqp.command_queue_type, QueueType::Quorum);
        assert_eq!(s.sweeper.check_interval_secs, 30);
        assert_eq!(s.sweeper.connection_stale_after_secs, 120);
        assert_eq!(s.sweeper.session_inactive_after_secs, 3600);
        assert_eq!(s.http.listen, "127.0.0.1:9090");
        assert_eq!(s.amqp.max_message_bytes, 1_048_576);
        assert_eq!(s.amqp.confirm_timeout_secs, 10);
        assert_eq!(s.outbox.lease_secs, 30);
        assert_eq!(s.database.statement_timeout_secs, 30);
        assert_eq!(s.database.lock_timeout_secs, 10);
        assert_eq!(s.database.idle_in_transaction_timeout_secs, 60);
        assert_eq!(s.worker.shutdown_grace_secs, 20);
    }

    #[test]
    fn every_wait_is_bounded() {
        for (section, key) in [
            ("amqp", "confirm_timeout_secs"),
            ("database", "statement_timeout_secs"),
            ("database", "lock_timeout_secs"),
            ("database", "idle_in_transaction_timeout_secs"),
            ("worker", "shutdown_grace_secs"),
        ] {
            let e = from_toml(&format!("[{section}]\n{key} = 0")).unwrap_err().to_string();
            assert!(e.contains(&format!("{section}.{key}")), "{e}");
        }
        let e = from_toml("[outbox]\nlease_secs = 10").unwrap_err().to_string();
        assert!(e.contains("outbox.lease_secs") && e.contains("amqp.confirm_timeout_secs"), "{e}");
        from_toml("[outbox]\nlease_secs = 11").unwrap();
    }

    #[test]
    fn the_repo_defaults_file_equals_the_built_in_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_CONFIG_FILE);
        let from_file: Settings = Figment::from(Toml::file(path)).extract().unwrap();
        assert_eq!(from_file, Settings::default());
    }

    #[test]
    fn settings_that_cannot_work_together_are_refused_naming_the_keys() {
        let mut s = Settings::default();
        s.amqp.prefetch = 1000;
        let e = s.validate_worker().unwrap_err().to_string();
        assert!(e.contains("amqp.prefetch:") && e.contains("worker.heartbeat_pipeline"), "{e}");
        let mut s = Settings::default();
        s.database.pool_size = 17;
        let e = s.validate_worker().unwrap_err().to_string();
        assert!(e.contains("database.pool_size:") && e.contains("18"), "{e}");
        assert!(!e.contains('\n'));
        s.worker.command_lanes = 7;
        s.validate_worker().unwrap();
    }

    #[test]
    fn a_bad_value_names_its_key_on_one_line() {
        let e = from_toml("[database]\npool_size = \"many\"").unwrap_err().to_string();
        assert!(e.contains("database.pool_size"), "{e}");
        assert!(!e.contains('\n'));
        let e = from_toml("[amqp]\ncommand_queue_type = \"stream\"").unwrap_err().to_string();
        assert!(e.contains("amqp.command_queue_type"), "{e}");
        let e = from_toml("[sweeper]\nstale_brake_ratio = 1.5").unwrap_err().to_string();
        assert!(e.contains("sweeper.stale_brake_ratio"), "{e}");
        let e = from_toml("[amqp]\nurl = \"http://x\"").unwrap_err().to_string();
        assert!(e.contains("amqp.url"), "{e}");
        let e = from_toml("[amqp]\nnope = 1").unwrap_err().to_string();
        assert!(e.contains("nope"), "{e}");
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's closure type is figment's own
    fn only_section_variables_are_keys() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("ACM_DATABASE__POOL_SIZE", "3");
            jail.set_env("ACM_TEST_PG_BASE", "postgres://elsewhere");
            jail.set_env("ACM_CONFIG", "/nonexistent-but-not-read-here.toml");
            let s =
                Settings::from_figment(Figment::from(Serialized::defaults(Settings::default())).merge(env_provider()))
                    .map_err(|e| e.to_string())?;
            assert_eq!(s.database.pool_size, 3);
            jail.set_env("ACM_DATABASE__POOL_SIZ", "3");
            let e =
                Settings::from_figment(Figment::from(Serialized::defaults(Settings::default())).merge(env_provider()))
                    .unwrap_err()
                    .to_string();
            assert!(e.contains("pool_siz"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn redaction_hides_the_password_of_every_broker_node() {
        let mut s = Settings::default();
        s.amqp.url = "amqp://u:one@a:5672/%2f, amqp://u:two@b:5672/%2f".into();
        s.validate().unwrap();
        let toml = s.to_redacted_toml();
        assert!(!toml.contains("one") && !toml.contains("two"), "{toml}");
        assert!(toml.contains("amqp://u:***@a:5672/%2f,amqp://u:***@b:5672/%2f"), "{toml}");
    }

    #[test]
    fn redaction_hides_passwords() {
        assert_eq!(redact_url("amqp://guest:secret@host:5672/%2f"), "amqp://guest:***@host:5672/%2f");
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact_url("host=h user=u password=secret"), "host=h user=u password=***");
        let mut s = Settings::default();
        s.database.url = "postgres://acm:hunter2@db/acm".into();
        assert!(!s.to_redacted_toml().contains("hunter2"));
        assert!(!s.to_redacted_toml().contains("guest:guest"));
    }
}
