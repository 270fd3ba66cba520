//! `limits.*`: how much one agent may hold open at once, so that one agent (a bug, a loop, a hostile client) cannot
//! grow the database without bound. The defaults are far above what an honest deployment reaches (a SmartEM agent
//! runs one microscope: a few sessions and connections, at most thousands of queued instructions).

use serde::{Deserialize, Serialize};

/// `limits.*`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitSettings {
    /// Active connections per agent; a `connection.open`, or a heartbeat opening or restoring one, beyond it is refused.
    pub max_connections_per_agent: i64,
    /// Sessions not ended per agent; a `session.create` beyond it is refused.
    pub max_sessions_per_agent: i64,
    /// Open (`pending` or `sent`) instructions per agent; an `instruction.create` beyond it is refused.
    pub max_pending_instructions_per_agent: i64,
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            max_connections_per_agent: 1000,
            max_sessions_per_agent: 1000,
            max_pending_instructions_per_agent: 100_000,
        }
    }
}
