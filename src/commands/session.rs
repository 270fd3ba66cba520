//! `session.create` and `session.close`.

use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;
use serde::Deserialize;
use serde_json::{Map, Value};
use uuid::Uuid;

use super::limits::{self, Limit};
use super::replies::{result, Closed, SessionCreated};
use super::{Context, Message, Outcome, Sender};
use crate::db;
use crate::db::Sql;
use crate::domain::{ClosedReason, Ident, Json, SessionStatus, Text};
use crate::error::{CommandError, Result};
use crate::events::EventBody;

/// `session.create`: a new active session.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
pub struct Create {
    /// Owner.
    pub agent_id: Ident,
    /// Client-chosen id (idempotency key); a UUID is generated when absent.
    #[serde(default)]
    pub session_id: Option<Ident>,
    /// Associated acquisition.
    #[serde(default)]
    pub acquisition_uuid: Option<Text>,
    /// Defaults to `Session-YYYYmmdd-HHMMSS` (UTC).
    #[serde(default)]
    pub name: Option<Text>,
    /// Free text.
    #[serde(default)]
    pub description: Option<Text>,
    /// Any JSON object.
    #[serde(default)]
    pub experimental_parameters: Option<Json<Map<String, Value>>>,
}

/// `session.close`: end a session, close its connections, cancel its open instructions.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
pub struct Close {
    /// The session to end.
    pub session_id: Ident,
}

impl Message for Create {
    const TYPE: &'static str = "session.create";
    const SENDER: Sender = Sender::Backend;
    type Reply = SessionCreated;

    fn order_key(&self) -> String {
        self.session_id.as_ref().unwrap_or(&self.agent_id).to_string()
    }

    async fn apply(&self, tx: &Transaction<'_>, ctx: &Context<'_>) -> Result<Outcome> {
        create(tx, self, ctx).await
    }
}

impl Message for Close {
    const TYPE: &'static str = "session.close";
    const SENDER: Sender = Sender::Backend;
    type Reply = Closed;

    fn order_key(&self) -> String {
        self.session_id.to_string()
    }

    async fn apply(&self, tx: &Transaction<'_>, ctx: &Context<'_>) -> Result<Outcome> {
        close(tx, self, ctx).await
    }
}

/// Creates the session; an existing id of the same agent is the same session (no second event).
pub async fn create(tx: &Transaction<'_>, cmd: &Create, ctx: &Context<'_>) -> Result<Outcome> {
    let session_id = cmd.session_id.as_ref().map(|s| s.to_string()).unwrap_or_else(|| Uuid::new_v4().to_string());
    let name = cmd.name.as_ref().map(|n| n.as_str());
    let acquisition = cmd.acquisition_uuid.as_ref().map(|t| t.as_str());
    let description = cmd.description.as_ref().map(|t| t.as_str());
    let params = cmd.experimental_parameters.as_ref().map(Json::to_value);
    // A new session of an agent at its limit is refused; the same id again is not a new session.
    let exists: bool =
        tx.typed_one("SELECT EXISTS (SELECT 1 FROM agent_session WHERE session_id = $1)", &[&session_id]).await?.get(0);
    if !exists {
        if let Some(refusal) = limits::check(tx, ctx.settings, Limit::Sessions, cmd.agent_id.as_str()).await? {
            return Ok(Err(refusal));
        }
    }
    // Without a name, `Session-<UTC date>-<time>` of the transaction's start.
    let inserted = tx
        .typed_opt(
            "INSERT INTO agent_session (session_id, agent_id, acquisition_uuid, name, description, \
             experimental_parameters, created_at, last_activity_at) VALUES ($1, $2, $3, \
             coalesce($4, 'Session-' || to_char(now() AT TIME ZONE 'UTC', 'YYYYMMDD-HH24MISS')), $5, $6, now(), now()) \
             ON CONFLICT (session_id) DO NOTHING RETURNING name, now()",
            &[&session_id, &cmd.agent_id.as_str(), &acquisition, &name, &description, &params],
        )
        .await?;
    let Some(row) = inserted else {
        let row = tx.typed_one("SELECT agent_id FROM agent_session WHERE session_id = $1", &[&session_id]).await?;
        let owner: String = row.get(0);
        if owner != cmd.agent_id.as_str() {
            return Ok(Err(CommandError::Conflict(format!("session {session_id} exists for another agent"))));
        }
        return Ok(Ok(result(SessionCreated { session_id })));
    };
    let name: String = row.get(0);
    let now: DateTime<Utc> = row.get(1);
    ctx.emit(
        now,
        vec![EventBody::SessionCreated {
            session_id: session_id.clone(),
            agent_id: cmd.agent_id.to_string(),
            acquisition_uuid: acquisition.map(str::to_string),
            name,
        }],
    );
    tracing::info!(session_id = %session_id, agent_id = %cmd.agent_id, "session created");
    Ok(Ok(result(SessionCreated { session_id })))
}

/// Ends the session: `{closed: false}` when there is no such session, `{closed: true}` otherwise (again: no change).
pub async fn close(tx: &Transaction<'_>, cmd: &Close, ctx: &Context<'_>) -> Result<Outcome> {
    let sid = cmd.session_id.as_str();
    let Some(row) = tx
        .typed_opt("SELECT agent_id, status::text FROM agent_session WHERE session_id = $1 FOR UPDATE", &[&sid])
        .await?
    else {
        return Ok(Ok(result(Closed { closed: false })));
    };
    let agent_id: String = row.get(0);
    let status: SessionStatus = row.get(1);
    if status == SessionStatus::Ended {
        return Ok(Ok(result(Closed { closed: true })));
    }
    let now = db::now(tx).await?;
    tx.typed_execute("UPDATE agent_session SET status = 'ended', ended_at = now() WHERE session_id = $1", &[&sid])
        .await?;
    let connections = tx
        .typed_query(
            "UPDATE agent_connection SET status = 'closed', close_reason = 'session_closed', closed_at = now() \
             WHERE session_id = $1 AND status = 'active' RETURNING connection_id, agent_id",
            &[&sid],
        )
        .await?;
    let instructions = tx
        .typed_query(
            "UPDATE agent_instruction SET status = 'cancelled' \
             WHERE session_id = $1 AND status IN ('pending', 'sent') RETURNING instruction_id, agent_id",
            &[&sid],
        )
        .await?;
    let mut events = Vec::with_capacity(connections.len() + instructions.len() + 1);
    for c in &connections {
        let connection_id: String = c.get(0);
        tracing::info!(connection_id = %connection_id, session_id = sid, "connection closed: session_closed");
        events.push(EventBody::ConnectionClosed {
            connection_id,
            session_id: sid.to_string(),
            agent_id: c.get(1),
            reason: ClosedReason::SessionClosed,
        });
    }
    for i in &instructions {
        let instruction_id: Uuid = i.get(0);
        tracing::info!(instruction_id = %instruction_id, session_id = sid, "instruction cancelled");
        events.push(EventBody::InstructionCancelled {
            instruction_id,
            session_id: sid.to_string(),
            agent_id: i.get(1),
        });
    }
    events.push(EventBody::SessionClosed {
        session_id: sid.to_string(),
        agent_id: agent_id.clone(),
        closed_connections: connections.len() as i64,
        cancelled_instructions: instructions.len() as i64,
    });
    ctx.emit(now, events);
    tracing::info!(
        session_id = sid,
        agent_id = %agent_id,
        closed_connections = connections.len(),
        cancelled_instructions = instructions.len(),
        "session ended"
    );
    Ok(Ok(result(Closed { closed: true })))
}
