//! Configuration: typed settings, layered with figment, validated once at start.
//!
//! Layers, lowest first: the built-in defaults of [`Settings::default`], `config/default.toml` (when present in the
//! working directory), the file named by `--config` or `ACM_CONFIG`, then `ACM_<SECTION>__<KEY>` environment
//! variables. A bad value, an unknown key in a file or an `ACM_*` variable that is neither configuration nor one of
//! the project's other variables ([`env::NOT_CONFIGURATION`]) stops the program with one line naming it and the
//! closest key. A count or duration that cannot be zero has a `NonZero*` type, so a 0 is refused while reading, with
//! the key; what no type can say (formats, bounds, settings that must agree) is checked by `validate.rs`. Secrets
//! (passwords in URLs) are redacted by [`Settings::to_redacted_toml`] and never logged.
//!
//! The command line ([`Settings::load_command_line`]) adds one default of its own below the files: `run` serves HTTP
//! on [`WORKER_HTTP_LISTEN`]; the library ([`Settings::load`]) serves none unless `http.listen` is set.

pub mod amqp;
pub mod database;
pub mod env;
mod limits;
pub mod logs;
mod messages;
mod redact;
pub mod sweeper;
pub mod telemetry;
mod validate;
pub mod worker;

use messages::one_line;

use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

pub use crate::error::ConfigError;
pub use amqp::{broker_urls, AmqpSettings, QueueType};
pub use database::{DatabaseSettings, Pooler};
pub use limits::LimitSettings;
pub use logs::LogsSettings;
pub use redact::redact_url;
pub use sweeper::SweeperSettings;
pub use telemetry::TelemetrySettings;
pub use worker::WorkerSettings;

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
    /// Span export.
    pub telemetry: TelemetrySettings,
    /// Old key names this configuration used, each with its new name (read as the new one; the worker warns once).
    #[serde(skip)]
    pub renamed: Vec<(&'static str, &'static str)>,
}

/// `instructions.*`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct InstructionSettings {
    /// Deadline of an instruction created without `expires_at` or `ttl_seconds`.
    pub default_ttl_secs: std::num::NonZeroU64,
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
    pub pipeline: std::num::NonZeroUsize,
    /// How often the relay looks for events committed by other processes (its own process wakes it at once), and a
    /// standing-by relay whether the relay lease has expired.
    pub poll_interval_ms: std::num::NonZeroU64,
    /// The old name of `sweeper.idempotency_retention_secs`, still read ([`Settings::renamed`]); never written.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retention_secs: Option<u64>,
    /// The relay lease: one relay publishes at a time and renews it every third of this (as it claims, and while
    /// its batches await their confirms); when it has not for this long, another relay takes over and publishes
    /// again what the first had not deleted. At least 2.
    pub lease_secs: u64,
}

/// `http.*`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSettings {
    /// Listen address of `/healthz`, `/readyz` and `/metrics`; empty to disable. Empty by default in the library;
    /// the command line's default is [`WORKER_HTTP_LISTEN`].
    pub listen: String,
    /// `/metrics` serves the statistics gauges from a cache refreshed at most once per this many seconds.
    pub stats_cache_secs: std::num::NonZeroU64,
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

impl Default for InstructionSettings {
    fn default() -> Self {
        Self { default_ttl_secs: nonzero(300), default_max_retries: 3 }
    }
}

impl Default for OutboxSettings {
    fn default() -> Self {
        Self {
            batch_size: 2000,
            pipeline: std::num::NonZeroUsize::new(4).expect("not zero"),
            poll_interval_ms: nonzero(250),
            retention_secs: None,
            lease_secs: 3,
        }
    }
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self { listen: String::new(), stats_cache_secs: nonzero(5) }
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
        let mut settings: Settings = figment.extract().map_err(|e| ConfigError(one_line(&e)))?;
        settings.read_old_names()?;
        settings.validate()?;
        Ok(settings)
    }

    /// Moves the values of renamed keys to their new names (recorded in [`Settings::renamed`]); refuses a
    /// configuration that sets both names to different values.
    fn read_old_names(&mut self) -> Result<(), ConfigError> {
        if let Some(old) = self.outbox.retention_secs.take() {
            let (old_key, new_key) = RENAMED[0];
            let new = &mut self.sweeper.idempotency_retention_secs;
            if *new != sweeper::RETENTION_DEFAULT.as_secs() && *new != old {
                return Err(ConfigError(format!(
                    "{old_key} (the old name of {new_key}) is {old} and {new_key} is {new}: set only {new_key}"
                )));
            }
            *new = old;
            self.renamed.push((old_key, new_key));
        }
        Ok(())
    }

    /// The effective configuration as TOML, with passwords replaced by `***`.
    pub fn to_redacted_toml(&self) -> String {
        let mut copy = self.clone();
        copy.database.url = redact_url(&copy.database.url);
        copy.amqp.url = broker_urls(&copy.amqp.url).into_iter().map(redact_url).collect::<Vec<_>>().join(",");
        toml::to_string_pretty(&copy).unwrap_or_else(|e| format!("# cannot render configuration: {e}\n"))
    }

    /// `amqp.confirm_timeout_secs` as a duration.
    pub fn confirm_timeout(&self) -> Duration {
        Duration::from_secs(self.amqp.confirm_timeout_secs.get())
    }

    /// `worker.shutdown_grace_secs` as a duration.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.worker.shutdown_grace_secs.get())
    }

    /// `sweeper.check_interval_secs` as a duration.
    pub fn check_interval(&self) -> Duration {
        Duration::from_secs(self.sweeper.check_interval_secs.get())
    }
}

/// `n` as a [`std::num::NonZeroU64`], for the built-in defaults (none is 0).
pub(crate) fn nonzero(n: u64) -> std::num::NonZeroU64 {
    std::num::NonZeroU64::new(n).expect("a built-in default is not zero")
}

/// Keys that were renamed, `(old, new)`: the old name is still read, as the new one, with a warning
/// ([`Settings::renamed`]).
pub const RENAMED: [(&str, &str); 1] = [("outbox.retention_secs", "sweeper.idempotency_retention_secs")];

/// The configuration sections; `ACM_<SECTION>__<KEY>` variables configure them.
pub const SECTIONS: [&str; 12] = [
    "database",
    "amqp",
    "sweeper",
    "instructions",
    "outbox",
    "worker",
    "http",
    "log",
    "security",
    "limits",
    "logs",
    "telemetry",
];

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
