//! `connection.open` and `connection.close`.

use deadpool_postgres::Transaction;
use serde::Deserialize;
use uuid::Uuid;

use super::limits::{self, Limit};
use super::replies::{result, Closed, ConnectionOpened};
use super::{touch_session, Context, Message, Outcome, Sender};
use crate::db;
use crate::db::Sql;
use crate::domain::{ClientCloseReason, CloseReason, ClosedReason, ConnectionStatus, Ident, Json, SessionStatus};
use crate::error::{CommandError, Result};
use crate::events::EventBody;

/// `connection.open`: a new active connection in an agent's session.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
pub struct Open {
    /// Owner; must own the session.
    pub agent_id: Ident,
    /// The session; must not be ended.
    pub session_id: Ident,
    /// Client-chosen id (idempotency key); a UUID is generated when absent.
    #[serde(default)]
    pub connection_id: Option<Ident>,
    /// Defaults to `amqp`.
    #[serde(default)]
    pub connection_type: Option<Ident>,
    /// Any JSON.
    #[serde(default)]
    pub client_info: Option<Json>,
}

/// `connection.close`: the agent closes one of its connections.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
pub struct Close {
    /// The agent; must own the connection.
    pub agent_id: Ident,
    /// The connection to close.
    pub connection_id: Ident,
    /// Defaults to `client_disconnect`, the only reason a client may give (`session_closed` and `stale_connection`
    /// are the worker's).
    #[serde(default)]
    pub reason: Option<ClientCloseReason>,
}

impl Message for Open {
    const TYPE: &'static str = "connection.open";
    const SENDER: Sender = Sender::Agent;
    type Reply = ConnectionOpened;

    /// Its connection, so that a close of the same connection stays behind it; the session without an id.
    fn order_key(&self) -> String {
        self.connection_id.as_ref().unwrap_or(&self.session_id).to_string()
    }

    fn agent_id(&self) -> Option<&Ident> {
        Some(&self.agent_id)
    }

    async fn apply(&self, tx: &Transaction<'_>, ctx: &Context<'_>) -> Result<Outcome> {
        open(tx, self, ctx).await
    }
}

impl Message for Close {
    const TYPE: &'static str = "connection.close";
    const SENDER: Sender = Sender::Agent;
    type Reply = Closed;

    fn order_key(&self) -> String {
        self.connection_id.to_string()
    }

    fn agent_id(&self) -> Option<&Ident> {
        Some(&self.agent_id)
    }

    async fn apply(&self, tx: &Transaction<'_>, ctx: &Context<'_>) -> Result<Outcome> {
        close(tx, self, ctx).await
    }
}

/// Locks the session for an agent's change, refusing unknown, foreign and (if `reject_ended`) ended sessions.
pub(crate) async fn lock_agent_session(
    tx: &Transaction<'_>,
    session_id: &str,
    agent_id: &str,
    reject_ended: bool,
) -> Result<std::result::Result<SessionStatus, CommandError>> {
    let Some(row) = tx
        .typed_opt(
            "SELECT agent_id, status::text FROM agent_session WHERE session_id = $1 FOR NO KEY UPDATE",
            &[&session_id],
        )
        .await?
    else {
        return Ok(Err(CommandError::NotFound(format!("no session {session_id}"))));
    };
    let owner: String = row.get(0);
    let status: SessionStatus = row.get(1);
    if owner != agent_id {
        return Ok(Err(CommandError::Forbidden(format!("session {session_id} belongs to another agent"))));
    }
    if reject_ended && status == SessionStatus::Ended {
        return Ok(Err(CommandError::Conflict(format!("session {session_id} has ended"))));
    }
    Ok(Ok(status))
}

/// Opens the connection; the same id again in the same session is the same connection. A connection a heartbeat
/// opened first (as `amqp`, already announced) is completed: its `connection_type` and `client_info` become the
/// open's, with no second `agent.connection.opened`.
pub async fn open(tx: &Transaction<'_>, cmd: &Open, ctx: &Context<'_>) -> Result<Outcome> {
    let sid = cmd.session_id.as_str();
    let aid = cmd.agent_id.as_str();
    if let Err(e) = lock_agent_session(tx, sid, aid, true).await? {
        return Ok(Err(e));
    }
    let cid = cmd.connection_id.as_ref().map(|c| c.to_string()).unwrap_or_else(|| Uuid::new_v4().to_string());
    let ctype = cmd.connection_type.as_ref().map(|t| t.as_str()).unwrap_or("amqp");
    let info = cmd.client_info.as_ref().map(Json::get);
    // A new connection of an agent at its limit is refused; an existing id is decided below as before.
    let exists: bool =
        tx.typed_one("SELECT EXISTS (SELECT 1 FROM agent_connection WHERE connection_id = $1)", &[&cid]).await?.get(0);
    if !exists {
        if let Some(refusal) = limits::check(tx, ctx.settings, Limit::Connections, aid).await? {
            return Ok(Err(refusal));
        }
    }
    let inserted = tx
        .typed_execute(
            "INSERT INTO agent_connection (connection_id, session_id, agent_id, connection_type, client_info, \
             created_at, last_heartbeat_at) VALUES ($1, $2, $3, $4, $5, now(), now()) \
             ON CONFLICT (connection_id) DO NOTHING",
            &[&cid, &sid, &aid, &ctype, &info],
        )
        .await?;
    if inserted == 0 {
        let row = tx
            .typed_one(
                "SELECT session_id, agent_id, status::text, opened_by_heartbeat FROM agent_connection \
                 WHERE connection_id = $1 FOR NO KEY UPDATE",
                &[&cid],
            )
            .await?;
        let same = row.get::<_, String>(0) == sid && row.get::<_, String>(1) == aid;
        if !same || row.get::<_, ConnectionStatus>(2) != ConnectionStatus::Active {
            return Ok(Err(CommandError::Conflict(format!("connection {cid} already exists"))));
        }
        if row.get::<_, bool>(3) {
            tx.typed_execute(
                "UPDATE agent_connection SET connection_type = $2, client_info = coalesce($3, client_info), \
                 opened_by_heartbeat = false WHERE connection_id = $1",
                &[&cid, &ctype, &info],
            )
            .await?;
            touch_session(tx, sid, ctx).await?;
            tracing::info!(connection_id = %cid, session_id = sid, agent_id = aid, connection_type = ctype, "connection opened by a heartbeat completed by its open");
        }
        return Ok(Ok(result(ConnectionOpened { connection_id: cid })));
    }
    touch_session(tx, sid, ctx).await?;
    let now = db::now(tx).await?;
    ctx.emit(
        now,
        vec![EventBody::ConnectionOpened {
            connection_id: cid.clone(),
            session_id: sid.to_string(),
            agent_id: aid.to_string(),
            connection_type: ctype.to_string(),
            restored: false,
        }],
    );
    tracing::info!(connection_id = %cid, session_id = sid, agent_id = aid, "connection opened");
    Ok(Ok(result(ConnectionOpened { connection_id: cid })))
}

/// Closes the agent's connection: `{closed: false}` when there is no such connection, `forbidden` when it is another
/// agent's; closing a closed one changes nothing.
pub async fn close(tx: &Transaction<'_>, cmd: &Close, ctx: &Context<'_>) -> Result<Outcome> {
    let cid = cmd.connection_id.as_str();
    let Some(row) =
        tx.typed_opt("SELECT session_id, agent_id FROM agent_connection WHERE connection_id = $1", &[&cid]).await?
    else {
        return Ok(Ok(result(Closed { closed: false })));
    };
    let sid: String = row.get(0);
    let aid: String = row.get(1);
    if aid != cmd.agent_id.as_str() {
        return Ok(Err(CommandError::Forbidden(format!("connection {cid} belongs to another agent"))));
    }
    // Lock order everywhere: session, then its connections.
    tx.typed_opt("SELECT 1 FROM agent_session WHERE session_id = $1 FOR NO KEY UPDATE", &[&sid]).await?;
    let reason = CloseReason::from(cmd.reason.unwrap_or_default());
    let closed = tx
        .typed_execute(
            "UPDATE agent_connection SET status = 'closed', close_reason = $2, closed_at = now() \
             WHERE connection_id = $1 AND status = 'active'",
            &[&cid, &reason],
        )
        .await?;
    touch_session(tx, &sid, ctx).await?;
    if closed == 1 {
        let now = db::now(tx).await?;
        ctx.emit(
            now,
            vec![EventBody::ConnectionClosed {
                connection_id: cid.to_string(),
                session_id: sid.clone(),
                agent_id: aid.clone(),
                reason: ClosedReason::from(cmd.reason.unwrap_or_default()),
            }],
        );
        tracing::info!(connection_id = cid, session_id = %sid, agent_id = %aid, reason = reason.as_str(), "connection closed");
    }
    Ok(Ok(result(Closed { closed: true })))
}
