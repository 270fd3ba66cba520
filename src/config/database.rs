//! `database.*`: the PostgreSQL connection, pool and session limits (used by `db`).

use serde::{Deserialize, Serialize};

/// `database.*`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseSettings {
    /// Connection URL (or libpq key=value string).
    pub url: String,
    /// Maximum pooled connections.
    pub pool_size: std::num::NonZeroUsize,
    /// How long a pool checkout, a connect or a recycle may wait.
    pub checkout_timeout_secs: std::num::NonZeroU64,
    /// Extra CA certificate (PEM) trusted for `sslmode=require`; empty for the system roots only.
    pub tls_ca_file: String,
    /// With `sslmode=require`, encrypt without verifying the server certificate (self-signed development servers).
    pub tls_accept_invalid_certs: bool,
    /// Longest a statement may run (PostgreSQL `statement_timeout` of every pooled session).
    pub statement_timeout_secs: std::num::NonZeroU64,
    /// Longest a statement may wait for a lock (`lock_timeout`).
    pub lock_timeout_secs: std::num::NonZeroU64,
    /// Longest a session may sit idle inside a transaction before the server ends it
    /// (`idle_in_transaction_session_timeout`).
    pub idle_in_transaction_timeout_secs: std::num::NonZeroU64,
    /// What `url` points at: the server itself or PgBouncer (then no session settings go in the startup packet).
    pub pooler: Pooler,
}

/// What `database.url` points at (`database.pooler`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooler {
    /// PostgreSQL itself: the session limits go in the startup packet.
    #[default]
    None,
    /// PgBouncer, in session or transaction pooling mode: no startup options (PgBouncer refuses them, and in
    /// transaction mode they would not reach the server connections); the limits come from the role or database.
    Pgbouncer,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: "postgres://postgres@127.0.0.1:5432/agent_connections".into(),
            pool_size: std::num::NonZeroUsize::new(20).expect("not zero"),
            checkout_timeout_secs: super::nonzero(5),
            tls_ca_file: String::new(),
            tls_accept_invalid_certs: false,
            statement_timeout_secs: super::nonzero(30),
            lock_timeout_secs: super::nonzero(10),
            idle_in_transaction_timeout_secs: super::nonzero(60),
            pooler: Pooler::None,
        }
    }
}
