//! Error types: [`Error`] for infrastructure failures (classified as transient or poison), [`CommandError`] for a
//! command the service understood but refuses (it becomes an error reply, never a dead-letter).
//!
//! A failure says what failed, where and why: a database error names the server (host and port, database, user;
//! never a password) when known, and carries the server's own message and SQLSTATE; a broker error names the broker
//! node the same way ([`DbFailure`], [`PoolFailure`], [`BrokerFailure`]).

use std::fmt;
use std::ops::Deref;

/// A configuration that cannot be used; the message names the key. Defined here, below `config`, which re-exports
/// it, so that every layer can refuse a setting.
#[derive(Debug, thiserror::Error)]
#[error("configuration error: {0}")]
pub struct ConfigError(pub String);

/// A failure while doing work: database, pool, broker, configuration or migration.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A statement or connection failed.
    #[error("{0}")]
    Db(DbFailure),
    /// No pooled connection could be had in time, or one could not be made.
    #[error("{0}")]
    Pool(PoolFailure),
    /// The broker refused, could not be reached, or lost the connection or channel.
    #[error("{0}")]
    Amqp(BrokerFailure),
    /// The broker negatively acknowledged a publish.
    #[error("broker refused to confirm a publish to {0}")]
    Nack(String),
    /// A consumer or channel ended, or the broker refused an acknowledgement (the channel was reset).
    #[error("broker connection lost: {0}")]
    Disconnected(String),
    /// No answer in time (client requests, broker queries, confirms).
    #[error("timed out: {0}")]
    Timeout(String),
    /// No database host accepted a connection in time (a direct connection; the pool's are [`Error::Pool`]).
    #[error("database unreachable: {0}")]
    DbUnreachable(String),
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Applying migrations failed.
    #[error("migration: {0}")]
    Migration(String),
    /// A row the migrations create, or a statement that always returns one, is missing: the database is not as the
    /// migrations leave it (a row deleted by hand, another schema).
    #[error("missing row: {0}")]
    MissingRow(String),
    /// A reply that does not follow the protocol, or refuses what the caller could not have got wrong (the
    /// simulator's own requests).
    #[error("unexpected reply: {0}")]
    Reply(String),
    /// A task panicked or was cancelled: a fault in this program, not in its input or its services.
    #[error("task failed: {0}")]
    TaskFailed(String),
    /// A command refused with input the caller gave (library calls).
    #[error(transparent)]
    Command(#[from] CommandError),
    /// The work was interrupted by shutdown.
    #[error("shutting down")]
    Shutdown,
}

/// An error and its causes on one line (tokio-postgres keeps the detail, such as a TLS reason, in the source).
pub(crate) fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

/// A PostgreSQL error on one line: the server's severity, message, SQLSTATE, detail and hint when the server
/// answered; otherwise the error and its causes (a refused connection, a TLS failure, a closed connection).
pub fn describe_pg(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut text = format!("{}: {} (SQLSTATE {})", db.severity(), db.message(), db.code().code());
            if let Some(detail) = db.detail() {
                text.push_str(&format!("; detail: {detail}"));
            }
            if let Some(hint) = db.hint() {
                text.push_str(&format!("; hint: {hint}"));
            }
            text.replace('\n', " ")
        }
        None => with_causes(e),
    }
}

/// ` at <where>` when known.
fn at(place: &Option<String>) -> String {
    place.as_deref().map(|p| format!(" at {p}")).unwrap_or_default()
}

/// A PostgreSQL error and, when known, the server it came from (a connect names it; a statement on a pooled
/// connection does not). Dereferences to the error, for its SQLSTATE.
#[derive(Debug)]
pub struct DbFailure {
    /// The error.
    pub error: tokio_postgres::Error,
    /// The server: host and port, database and user ([`crate::db::describe_target`]).
    pub at: Option<String>,
}

impl fmt::Display for DbFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "database{}: {}", at(&self.at), describe_pg(&self.error))
    }
}

impl std::error::Error for DbFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

impl Deref for DbFailure {
    type Target = tokio_postgres::Error;
    fn deref(&self) -> &Self::Target {
        &self.error
    }
}

impl From<tokio_postgres::Error> for Error {
    fn from(error: tokio_postgres::Error) -> Self {
        Error::Db(DbFailure { error, at: None })
    }
}

/// A pool checkout that failed, and the server the pool connects to ([`crate::db::checkout`] names it).
#[derive(Debug)]
pub struct PoolFailure {
    /// The error.
    pub error: deadpool_postgres::PoolError,
    /// The server: host and port, database and user.
    pub at: Option<String>,
}

impl fmt::Display for PoolFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use deadpool_postgres::{PoolError, TimeoutType};
        let place = at(&self.at);
        match &self.error {
            PoolError::Backend(e) => write!(f, "database{place}: cannot connect: {}", describe_pg(e)),
            PoolError::Timeout(TimeoutType::Create) => write!(
                f,
                "database{place}: no connection made within database.checkout_timeout_secs: the server accepted \
                 the connection but did not answer, or the network dropped it"
            ),
            PoolError::Timeout(TimeoutType::Wait) => write!(
                f,
                "database pool{place}: no free connection within database.checkout_timeout_secs (all \
                 database.pool_size connections are in use)"
            ),
            PoolError::Timeout(TimeoutType::Recycle) => write!(
                f,
                "database{place}: checking a pooled connection took longer than database.checkout_timeout_secs"
            ),
            other => write!(f, "database pool{place}: {}", with_causes(other)),
        }
    }
}

impl std::error::Error for PoolFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

impl Deref for PoolFailure {
    type Target = deadpool_postgres::PoolError;
    fn deref(&self) -> &Self::Target {
        &self.error
    }
}

impl From<deadpool_postgres::PoolError> for Error {
    fn from(error: deadpool_postgres::PoolError) -> Self {
        Error::Pool(PoolFailure { error, at: None })
    }
}

/// A broker error and, when known, the broker node (URL without its password) and what was being done.
#[derive(Debug)]
pub struct BrokerFailure {
    /// The error.
    pub error: lapin::Error,
    /// The node and the step, e.g. `amqp://guest@127.0.0.1:5672/%2f (never reached)`.
    pub at: Option<String>,
}

impl fmt::Display for BrokerFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "broker{}: {}", at(&self.at), with_causes(&self.error))
    }
}

impl std::error::Error for BrokerFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

impl From<lapin::Error> for Error {
    fn from(error: lapin::Error) -> Self {
        Error::Amqp(BrokerFailure { error, at: None })
    }
}

impl Error {
    /// Why the database rejected a value of the message itself (SQLSTATE classes 22 and 23), if it did.
    ///
    /// Such a message can never succeed, so it is poison; every other failure is retried.
    pub fn poison_reason(&self) -> Option<Poison> {
        if let Error::Db(e) = self {
            if let Some(db) = e.as_db_error() {
                let class = &db.code().code()[..2];
                if class == "22" || class == "23" {
                    return Some(Poison::new(
                        PoisonKind::DatabaseRejected,
                        format!("rejected by the database: {}", db.message()),
                    ));
                }
            }
        }
        None
    }

    /// Whether retrying the same work later may succeed (connection loss, timeouts, deadlocks, serialization).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Db(_) => self.poison_reason().is_none(),
            Error::DbUnreachable(_)
            | Error::Pool(_)
            | Error::Amqp(_)
            | Error::Nack(_)
            | Error::Disconnected(_)
            | Error::Timeout(_) => true,
            Error::Config(_)
            | Error::Migration(_)
            | Error::MissingRow(_)
            | Error::Reply(_)
            | Error::TaskFailed(_)
            | Error::Command(_)
            | Error::Shutdown => false,
        }
    }
}

/// Why a message is poison: what kind of fault (the `reason` label of the dead-letter metric) and the reason in
/// words (the `x-acm-error` header and the `invalid` reply's message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{detail}")]
pub struct Poison {
    /// The kind of fault.
    pub kind: PoisonKind,
    /// The reason, naming the offending field or value.
    pub detail: String,
}

impl Poison {
    /// A poison reason.
    pub fn new(kind: PoisonKind, detail: impl Into<String>) -> Self {
        Self { kind, detail: detail.into() }
    }
}

/// The kinds of poison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PoisonKind {
    /// Larger than `amqp.max_message_bytes`.
    TooLarge,
    /// Not JSON.
    NotJson,
    /// JSON, but not an object.
    NotObject,
    /// A `type` no module handles.
    UnknownType,
    /// A field missing, mistyped or out of range.
    InvalidField,
    /// The sender may not send it: its routing key is not its `type` (or it reached a queue its type is not consumed
    /// from), or, with `security.require_user_id`, its AMQP `user_id` is not the agent it names.
    Forbidden,
    /// A value the database cannot store.
    DatabaseRejected,
    /// Not poison: a heartbeat refused by a per-agent limit (`limits.*`), dead-lettered so the refusal is seen.
    Limit,
    /// No binding of the command exchange matched its routing key: the exchange's alternate exchange passed it on.
    Unroutable,
}

impl PoisonKind {
    /// Every kind, in declaration order (the dead-letter counter starts each reason at 0).
    pub const ALL: [PoisonKind; 9] = [
        PoisonKind::TooLarge,
        PoisonKind::NotJson,
        PoisonKind::NotObject,
        PoisonKind::UnknownType,
        PoisonKind::InvalidField,
        PoisonKind::Forbidden,
        PoisonKind::DatabaseRejected,
        PoisonKind::Limit,
        PoisonKind::Unroutable,
    ];

    /// The `reason` label of the dead-letter counter.
    pub fn label(self) -> &'static str {
        match self {
            PoisonKind::TooLarge => "too_large",
            PoisonKind::NotJson => "not_json",
            PoisonKind::NotObject => "not_object",
            PoisonKind::UnknownType => "unknown_type",
            PoisonKind::InvalidField => "invalid_field",
            PoisonKind::Forbidden => "forbidden",
            PoisonKind::DatabaseRejected => "database_rejected",
            PoisonKind::Limit => "limit",
            PoisonKind::Unroutable => "unroutable",
        }
    }
}

/// Library result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A command refused for a reason the sender can act on; it becomes the reply's `error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// Malformed or contradictory input.
    #[error("invalid: {0}")]
    Invalid(String),
    /// No such session, instruction or connection.
    #[error("not_found: {0}")]
    NotFound(String),
    /// The command contradicts the current state (an ended session, an id taken by another object).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The object belongs to another agent.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// The agent already holds as many of these as a per-agent limit (`limits.*`) allows.
    #[error("limit: {0}")]
    Limit(String),
}

impl CommandError {
    /// The reply's error code.
    pub fn code(&self) -> &'static str {
        match self {
            CommandError::Invalid(_) => "invalid",
            CommandError::NotFound(_) => "not_found",
            CommandError::Conflict(_) => "conflict",
            CommandError::Forbidden(_) => "forbidden",
            CommandError::Limit(_) => "limit",
        }
    }

    /// The human-readable message.
    pub fn message(&self) -> &str {
        match self {
            CommandError::Invalid(m)
            | CommandError::NotFound(m)
            | CommandError::Conflict(m)
            | CommandError::Forbidden(m)
            | CommandError::Limit(m) => m,
        }
    }
}
