//! Per-agent limits (`limits.*`): before a command makes an agent hold one more open session, active connection or
//! open instruction, the agent's count is taken under its advisory lock (held to the commit, so two commands of one
//! agent cannot both see room for one more) and a command beyond the limit is refused with `limit`. A command that
//! makes nothing new (the same id again) is never refused. Heartbeats opening or restoring connections check the
//! same connection limit in their slow path.

use deadpool_postgres::Transaction;

use super::heartbeat::lock_agents;
use crate::config::Settings;
use crate::db::Sql;
use crate::error::{CommandError, Result};

/// One per-agent limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// Sessions not ended (`limits.max_sessions_per_agent`).
    Sessions,
    /// Active connections (`limits.max_connections_per_agent`).
    Connections,
    /// Instructions `pending` or `sent` (`limits.max_pending_instructions_per_agent`).
    PendingInstructions,
}

impl Limit {
    /// The `reason` label of `acm_limit_refusals_total`.
    pub fn name(self) -> &'static str {
        match self {
            Limit::Sessions => "sessions",
            Limit::Connections => "connections",
            Limit::PendingInstructions => "pending_instructions",
        }
    }

    /// The limit that refuses commands of this type, if any.
    pub fn of(message_type: &str) -> Option<Self> {
        match message_type {
            "session.create" => Some(Limit::Sessions),
            "connection.open" => Some(Limit::Connections),
            "instruction.create" => Some(Limit::PendingInstructions),
            _ => None,
        }
    }

    fn key(self) -> &'static str {
        match self {
            Limit::Sessions => "limits.max_sessions_per_agent",
            Limit::Connections => "limits.max_connections_per_agent",
            Limit::PendingInstructions => "limits.max_pending_instructions_per_agent",
        }
    }

    fn max(self, s: &Settings) -> i64 {
        match self {
            Limit::Sessions => s.limits.max_sessions_per_agent,
            Limit::Connections => s.limits.max_connections_per_agent,
            Limit::PendingInstructions => s.limits.max_pending_instructions_per_agent,
        }
    }

    fn count_sql(self) -> &'static str {
        match self {
            Limit::Sessions => "SELECT count(*) FROM agent_session WHERE agent_id = $1 AND status <> 'ended'",
            Limit::Connections => "SELECT count(*) FROM agent_connection WHERE agent_id = $1 AND status = 'active'",
            Limit::PendingInstructions => {
                "SELECT count(*) FROM agent_instruction WHERE agent_id = $1 AND status IN ('pending', 'sent')"
            }
        }
    }
}

/// Takes `agent`'s limit lock and counts what `limit` bounds: the refusal when it already holds the most allowed.
pub async fn check(
    tx: &Transaction<'_>,
    settings: &Settings,
    limit: Limit,
    agent: &str,
) -> Result<Option<CommandError>> {
    lock_agents(tx, &[agent]).await?;
    let held: i64 = tx.typed_one(limit.count_sql(), &[&agent]).await?.get(0);
    let max = limit.max(settings);
    if held < max {
        return Ok(None);
    }
    tracing::warn!(agent_id = agent, limit = limit.name(), held, max, "refused: the agent is at its limit");
    Ok(Some(CommandError::Limit(format!(
        "agent {agent} has {held} {}, the most {} allows",
        limit.name().replace('_', " "),
        limit.key()
    ))))
}
