//! Error types: [`Error`] for infrastructure failures (classified as transient or poison), [`CommandError`] for a
//! command the service understood but refuses (it becomes an error reply, never a dead-letter).

use crate::config::ConfigError;

/// A failure while doing work: database, pool, broker, configuration or migration.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A statement or connection failed.
    #[error("database: {}", with_causes(.0))]
    Db(#[from] tokio_postgres::Error),
    /// No pooled connection could be had in time, or one could not be made.
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    /// The broker refused or lost the connection or channel.
    #[error("broker: {0}")]
    Amqp(#[from] lapin::Error),
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
    /// A command refused with input the caller gave (library calls).
    #[error(transparent)]
    Command(#[from] CommandError),
    /// The work was interrupted by shutdown.
    #[error("shutting down")]
    Shutdown,
}

/// An error and its causes on one line (tokio-postgres keeps the detail, such as a TLS reason, in the source).
fn with_causes(e: &dyn std::error::Error) -> String {
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
            Error::Config(_) | Error::Migration(_) | Error::Command(_) | Error::Shutdown => false,
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
    /// No binding of the command exchange matched its routing key: the exchange's alternate exchange passed it on.
    Unroutable,
}

impl PoisonKind {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            PoisonKind::TooLarge => "too_large",
            PoisonKind::NotJson => "not_json",
            PoisonKind::NotObject => "not_object",
            PoisonKind::UnknownType => "unknown_type",
            PoisonKind::InvalidField => "invalid_field",
            PoisonKind::Forbidden => "forbidden",
            PoisonKind::DatabaseRejected => "database_rejected",
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
}

impl CommandError {
    /// The reply's error code.
    pub fn code(&self) -> &'static str {
        match self {
            CommandError::Invalid(_) => "invalid",
            CommandError::NotFound(_) => "not_found",
            CommandError::Conflict(_) => "conflict",
            CommandError::Forbidden(_) => "forbidden",
        }
    }

    /// The human-readable message.
    pub fn message(&self) -> &str {
        match self {
            CommandError::Invalid(m)
            | CommandError::NotFound(m)
            | CommandError::Conflict(m)
            | CommandError::Forbidden(m) => m,
        }
    }
}
