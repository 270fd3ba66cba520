//! `stats.get`: connection and session statistics from one snapshot.

use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;
use serde::{Deserialize, Serialize};

use super::replies::result;
use super::{Context, Message, Outcome, Sender};
use crate::db::Sql;
use crate::error::Result;

/// `stats.get`: the statistics, as the reply.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
pub struct Get {}

impl Message for Get {
    const TYPE: &'static str = "stats.get";
    const SENDER: Sender = Sender::Backend;
    const READ_ONLY: bool = true;
    type Reply = ConnectionStats;

    fn order_key(&self) -> String {
        String::new()
    }

    async fn apply(&self, tx: &Transaction<'_>, _ctx: &Context<'_>) -> Result<Outcome> {
        Ok(Ok(result(get(tx).await?)))
    }
}

/// `get_connection_stats()`: counts taken by one statement, so from one consistent snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ConnectionStats {
    /// Connections in state `active`.
    pub active_connections: i64,
    /// Sessions in state `active`.
    pub active_sessions: i64,
    /// Sessions in state `inactive`.
    pub inactive_sessions: i64,
    /// Instructions in state `pending`.
    pub pending_instructions: i64,
    /// Instructions in state `sent`.
    pub sent_instructions: i64,
    /// `pending_instructions` + `sent_instructions`.
    pub total_instructions_pending: i64,
    /// Database time of the snapshot (UTC).
    pub timestamp: DateTime<Utc>,
}

/// The statistics, in one statement (one snapshot).
pub const STATS: &str = "SELECT \
    (SELECT count(*) FROM agent_connection WHERE status = 'active'), \
    (SELECT count(*) FROM agent_session WHERE status = 'active'), \
    (SELECT count(*) FROM agent_session WHERE status = 'inactive'), \
    (SELECT count(*) FROM agent_instruction WHERE status = 'pending'), \
    (SELECT count(*) FROM agent_instruction WHERE status = 'sent'), \
    now()";

/// Reads the statistics.
pub async fn get(client: &impl Sql) -> Result<ConnectionStats> {
    let row = client.typed_one(STATS, &[]).await?;
    let pending: i64 = row.get(3);
    let sent: i64 = row.get(4);
    Ok(ConnectionStats {
        active_connections: row.get(0),
        active_sessions: row.get(1),
        inactive_sessions: row.get(2),
        pending_instructions: pending,
        sent_instructions: sent,
        total_instructions_pending: pending + sent,
        timestamp: row.get(5),
    })
}
