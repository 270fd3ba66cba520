//! Domain values parsed once at the edge: a value of these types is valid by construction.
//!
//! Each type's JSON Schema (in [`rules`]) states every rule its parser applies, so that `schema/` accepts exactly
//! what the worker accepts; lengths are counted in characters, as JSON Schema counts them. The text-like values
//! are in `values`; the enums shared with PostgreSQL are here.

pub mod rules;
mod values;

pub use values::*;

use std::fmt;

use serde::{Deserialize, Serialize};

/// Declares a Rust enum that is also a PostgreSQL enum type: serde, JSON Schema and `ToSql`/`FromSql` read the same
/// labels, and `as_str` gives the label for logs.
macro_rules! pg_enum {
    ($(#[$meta:meta])* $name:ident = $pg:literal { $($(#[$vmeta:meta])* $variant:ident = $label:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema,
            postgres_types::ToSql,
        )]
        #[postgres(name = $pg)]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $label)] #[postgres(name = $label)] $variant),+
        }

        impl $name {
            /// The label, as in JSON and in the database.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $label),+
                }
            }
        }

        /// Read from the enum type or from `text`: the worker's statements return enum columns cast to `text`, so
        /// that tokio-postgres never looks an enum type up (it would with a named statement that it keeps, which
        /// behind PgBouncer in transaction pooling mode may not exist on the next server connection).
        impl<'a> postgres_types::FromSql<'a> for $name {
            fn from_sql(
                _: &postgres_types::Type,
                raw: &'a [u8],
            ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
                match std::str::from_utf8(raw)? {
                    $($label => Ok($name::$variant),)+
                    other => Err(format!("{}: unknown label {other:?}", $pg).into()),
                }
            }

            fn accepts(ty: &postgres_types::Type) -> bool {
                ty.name() == $pg || matches!(*ty, postgres_types::Type::TEXT | postgres_types::Type::VARCHAR)
            }
        }

        impl $name {
            /// The label as a `'static` reference, for `db::Param` (which sends it as a statement parameter).
            pub fn label(self) -> &'static &'static str {
                match self {
                    $($name::$variant => &$label),+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

pg_enum! {
    /// A session's state: `active` ⇄ `inactive` → `ended`.
    SessionStatus = "session_status" {
        /// Its agent was heard from within `session_inactive_after_secs`.
        Active = "active",
        /// No agent activity for `session_inactive_after_secs`; agent activity makes it active again.
        Inactive = "inactive",
        /// Closed (final).
        Ended = "ended",
    }
}

pg_enum! {
    /// A connection's state: `active` → `closed`.
    ConnectionStatus = "connection_status" {
        /// Open.
        Active = "active",
        /// Closed, with a [`CloseReason`].
        Closed = "closed",
    }
}

pg_enum! {
    /// Why a connection was closed.
    #[derive(Default)]
    CloseReason = "close_reason" {
        /// The agent closed it (`connection.close`).
        #[default]
        ClientDisconnect = "client_disconnect",
        /// Its session was closed.
        SessionClosed = "session_closed",
        /// No heartbeat within `connection_stale_after_secs`; undone by the next heartbeat.
        StaleConnection = "stale_connection",
    }
}

/// The reasons a client may give in `connection.close`. `session_closed` and `stale_connection` are the worker's
/// own (a session's close, the sweeper) and are not accepted from a message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum ClientCloseReason {
    /// The client closed the connection.
    #[default]
    #[serde(rename = "client_disconnect")]
    ClientDisconnect,
}

/// Why `agent.connection.closed` says a connection closed; a connection closed as stale has its own event,
/// `agent.connection.stale`, so `stale_connection` is not among these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum ClosedReason {
    /// The client closed it (`connection.close`).
    #[serde(rename = "client_disconnect")]
    ClientDisconnect,
    /// Its session was closed (`session.close`).
    #[serde(rename = "session_closed")]
    SessionClosed,
}

impl From<ClientCloseReason> for ClosedReason {
    fn from(r: ClientCloseReason) -> Self {
        match r {
            ClientCloseReason::ClientDisconnect => ClosedReason::ClientDisconnect,
        }
    }
}

impl From<ClosedReason> for CloseReason {
    fn from(r: ClosedReason) -> Self {
        match r {
            ClosedReason::ClientDisconnect => CloseReason::ClientDisconnect,
            ClosedReason::SessionClosed => CloseReason::SessionClosed,
        }
    }
}

impl From<ClientCloseReason> for CloseReason {
    fn from(r: ClientCloseReason) -> Self {
        match r {
            ClientCloseReason::ClientDisconnect => CloseReason::ClientDisconnect,
        }
    }
}

pg_enum! {
    /// An instruction's state: `pending` → `sent` → `acknowledged`; `expired` and `cancelled` are final too.
    InstructionStatus = "instruction_status" {
        /// Created (or given another try), not yet delivered.
        Pending = "pending",
        /// Delivered to the agent, not yet acknowledged.
        Sent = "sent",
        /// Acknowledged by its agent (final).
        Acknowledged = "acknowledged",
        /// Past its deadline with no retries left (final).
        Expired = "expired",
        /// Its session was closed while it was open (final).
        Cancelled = "cancelled",
    }
}

impl InstructionStatus {
    /// Whether the instruction can still be acknowledged, retried or expired.
    pub fn is_open(self) -> bool {
        matches!(self, InstructionStatus::Pending | InstructionStatus::Sent)
    }
}

pg_enum! {
    /// Instruction priority, ordered `low` < `normal` < `high` < `critical`.
    ///
    /// ```
    /// use agent_connection_manager::domain::Priority;
    /// let p: Priority = serde_json::from_str("\"critical\"").unwrap();
    /// assert!(p > Priority::High && Priority::Low < Priority::default());
    /// assert_eq!(p.as_str(), "critical");
    /// ```
    #[derive(Default)]
    Priority = "instruction_priority" {
        /// Lowest.
        Low = "low",
        /// The default.
        #[default]
        Normal = "normal",
        /// Above normal.
        High = "high",
        /// Highest.
        Critical = "critical",
    }
}

impl PartialOrd for Priority {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Priority {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (*self as u8).cmp(&(*other as u8))
    }
}

pg_enum! {
    /// What an agent says of an instruction it acknowledges.
    AckStatus = "ack_status" {
        /// Received, not yet processed.
        Received = "received",
        /// Processed successfully.
        Processed = "processed",
        /// Processing failed.
        Failed = "failed",
        /// The agent declined it.
        Declined = "declined",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priority_is_ordered() {
        assert!(Priority::Low < Priority::Normal);
        assert!(Priority::Normal < Priority::High);
        assert!(Priority::High < Priority::Critical);
    }
}
