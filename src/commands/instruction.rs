//! `instruction.create`, `instruction.sent` and `instruction.ack`.

use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;
use serde::Deserialize;
use uuid::Uuid;

use super::connection::lock_agent_session;
use super::limits::{self, Limit};
use super::replies::{result, AckResult, InstructionCreated, InstructionStatus as InstructionStatusResult};
use super::{touch_session, Context, Message, Outcome, Sender};
use crate::db::Sql;
use crate::domain::rules::{optional_integer, UUID};
use crate::domain::{double_option, AckStatus, Ident, InstructionStatus, Json, Priority, Text, Timestamp};
use crate::error::{CommandError, Error, Result};
use crate::events::EventBody;

/// Longest accepted `ttl_seconds`: ten years.
pub const MAX_TTL_SECONDS: f64 = 315_360_000.0;
/// Largest accepted `max_retries`.
pub const MAX_RETRIES: u32 = 1000;

/// `instruction.create`: a new `pending` instruction.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[schemars(extend("not" = {
    "description": "Give either expires_at or ttl_seconds, not both.",
    "required": ["expires_at", "ttl_seconds"],
    "properties": { "ttl_seconds": { "type": "number" } }
}))]
pub struct Create {
    /// The session; must not be ended.
    pub session_id: Ident,
    /// Must own the session.
    pub agent_id: Ident,
    /// What the agent is asked to do.
    pub instruction_type: Ident,
    /// Any JSON (required, may be null).
    pub payload: Json,
    /// Client-chosen id (idempotency key); generated when absent.
    #[serde(default)]
    #[schemars(extend("pattern" = UUID))]
    pub instruction_id: Option<Uuid>,
    /// Caller's ordering.
    #[serde(default, deserialize_with = "optional_integer")]
    #[schemars(extend("minimum" = i64::MIN, "maximum" = i64::MAX))]
    pub sequence_number: Option<i64>,
    /// Defaults to `normal`.
    #[serde(default)]
    pub priority: Option<Priority>,
    /// Absent: use `ttl_seconds` or the default TTL; `null`: never expires.
    #[serde(default, deserialize_with = "double_option")]
    pub expires_at: Option<Option<Timestamp>>,
    /// Deadline relative to now (database clock): more than 0, at most ten years.
    #[serde(default)]
    #[schemars(extend("exclusiveMinimum" = 0, "maximum" = MAX_TTL_SECONDS))]
    pub ttl_seconds: Option<f64>,
    /// Defaults to `instructions.default_max_retries`; at most 1000.
    #[serde(default, deserialize_with = "optional_integer")]
    #[schemars(extend("maximum" = MAX_RETRIES))]
    pub max_retries: Option<u32>,
    /// Any JSON.
    #[serde(default)]
    pub instruction_metadata: Option<Json>,
}

impl Message for Create {
    const TYPE: &'static str = "instruction.create";
    const SENDER: Sender = Sender::Backend;
    type Reply = InstructionCreated;

    fn check(&self) -> std::result::Result<(), String> {
        if self.expires_at.is_some() && self.ttl_seconds.is_some() {
            return Err("field `ttl_seconds`: give either expires_at or ttl_seconds, not both".into());
        }
        if let Some(t) = self.ttl_seconds {
            if !(t > 0.0 && t <= MAX_TTL_SECONDS) {
                return Err(format!("field `ttl_seconds`: must be greater than 0 and at most {MAX_TTL_SECONDS}"));
            }
        }
        if self.max_retries.is_some_and(|m| m > MAX_RETRIES) {
            return Err(format!("field `max_retries`: must be at most {MAX_RETRIES}"));
        }
        Ok(())
    }

    /// Its instruction, so that its `instruction.sent` and `instruction.ack` stay behind it; the session without an
    /// id.
    fn order_key(&self) -> String {
        match &self.instruction_id {
            Some(id) => id.to_string(),
            None => self.session_id.to_string(),
        }
    }

    async fn apply(&self, tx: &Transaction<'_>, ctx: &Context<'_>) -> Result<Outcome> {
        create(tx, self, ctx).await
    }
}

/// `instruction.sent`: the backend delivered a pending instruction.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
pub struct Sent {
    /// The instruction.
    #[schemars(extend("pattern" = UUID))]
    pub instruction_id: Uuid,
    /// Over which connection.
    #[serde(default)]
    pub connection_id: Option<Ident>,
}

/// `instruction.ack`: the agent acknowledges an instruction.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
pub struct Ack {
    /// The instruction.
    #[schemars(extend("pattern" = UUID))]
    pub instruction_id: Uuid,
    /// Must own the instruction.
    pub agent_id: Ident,
    /// The instruction's session.
    pub session_id: Ident,
    /// What the agent did with it.
    pub status: AckStatus,
    /// Any JSON.
    #[serde(default)]
    pub result: Option<Json>,
    /// Free text.
    #[serde(default)]
    pub error_message: Option<Text>,
    /// Non-negative.
    #[serde(default, deserialize_with = "optional_integer")]
    #[schemars(extend("maximum" = u32::MAX))]
    pub processing_time_ms: Option<u32>,
    /// When the agent processed it.
    #[serde(default)]
    pub processed_at: Option<Timestamp>,
}

impl Message for Sent {
    const TYPE: &'static str = "instruction.sent";
    const SENDER: Sender = Sender::Backend;
    type Reply = InstructionStatusResult;

    fn order_key(&self) -> String {
        self.instruction_id.to_string()
    }

    async fn apply(&self, tx: &Transaction<'_>, _ctx: &Context<'_>) -> Result<Outcome> {
        sent(tx, self).await
    }
}

impl Message for Ack {
    const TYPE: &'static str = "instruction.ack";
    const SENDER: Sender = Sender::Agent;
    type Reply = AckResult;

    fn order_key(&self) -> String {
        self.instruction_id.to_string()
    }

    fn agent_id(&self) -> Option<&Ident> {
        Some(&self.agent_id)
    }

    async fn apply(&self, tx: &Transaction<'_>, ctx: &Context<'_>) -> Result<Outcome> {
        ack(tx, self, ctx).await
    }
}

/// Creates the instruction; the same id again for the same session and agent is the same instruction.
pub async fn create(tx: &Transaction<'_>, cmd: &Create, ctx: &Context<'_>) -> Result<Outcome> {
    let sid = cmd.session_id.as_str();
    let aid = cmd.agent_id.as_str();
    if let Err(e) = lock_agent_session(tx, sid, aid, true).await? {
        return Ok(Err(e));
    }
    let id = cmd.instruction_id.unwrap_or_else(Uuid::new_v4);
    let (absolute, ttl): (Option<DateTime<Utc>>, Option<f64>) = match (&cmd.expires_at, cmd.ttl_seconds) {
        (Some(Some(t)), _) => (Some(t.0), None),
        (Some(None), _) => (None, None),
        (None, Some(ttl)) => (None, Some(ttl)),
        (None, None) => (None, Some(ctx.settings.instructions.default_ttl_secs.get() as f64)),
    };
    let priority = cmd.priority.unwrap_or_default();
    let max_retries = cmd.max_retries.unwrap_or(ctx.settings.instructions.default_max_retries) as i32;
    // A new instruction for an agent at its limit is refused; the same id again is decided below as before.
    let exists: bool =
        tx.typed_one("SELECT EXISTS (SELECT 1 FROM agent_instruction WHERE instruction_id = $1)", &[&id]).await?.get(0);
    if !exists {
        if let Some(refusal) = limits::check(tx, ctx.settings, Limit::PendingInstructions, aid).await? {
            return Ok(Err(refusal));
        }
    }
    let row = tx
        .typed_opt(
            "INSERT INTO agent_instruction (instruction_id, session_id, agent_id, instruction_type, payload, \
             sequence_number, priority, expires_at, max_retries, instruction_metadata, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, \
             coalesce($8, now() + $9::float8 * interval '1 second'), $10, $11, now()) \
             ON CONFLICT (instruction_id) DO NOTHING RETURNING expires_at, now()",
            &[
                &id,
                &sid,
                &aid,
                &cmd.instruction_type.as_str(),
                cmd.payload.get(),
                &cmd.sequence_number,
                &priority,
                &absolute,
                &ttl,
                &max_retries,
                &cmd.instruction_metadata.as_ref().map(Json::get),
            ],
        )
        .await?;
    let Some(row) = row else {
        let row = tx
            .typed_one(
                "SELECT session_id, agent_id, expires_at FROM agent_instruction WHERE instruction_id = $1",
                &[&id],
            )
            .await?;
        if row.get::<_, String>(0) == sid && row.get::<_, String>(1) == aid {
            let expires_at: Option<DateTime<Utc>> = row.get(2);
            return Ok(Ok(result(InstructionCreated { instruction_id: id, expires_at })));
        }
        return Ok(Err(CommandError::Conflict(format!("instruction {id} already exists in another session"))));
    };
    let expires_at: Option<DateTime<Utc>> = row.get(0);
    let now: DateTime<Utc> = row.get(1);
    ctx.emit(
        now,
        vec![EventBody::InstructionCreated {
            instruction_id: id,
            session_id: sid.to_string(),
            agent_id: aid.to_string(),
            instruction_type: cmd.instruction_type.to_string(),
            payload: cmd.payload.get().clone(),
            sequence_number: cmd.sequence_number,
            priority,
            expires_at,
            max_retries,
            instruction_metadata: cmd.instruction_metadata.as_ref().map(|m| m.get().clone()),
        }],
    );
    tracing::info!(instruction_id = %id, session_id = sid, agent_id = aid, "instruction created");
    Ok(Ok(result(InstructionCreated { instruction_id: id, expires_at })))
}

/// Marks a pending instruction sent; any other state is reported unchanged.
pub async fn sent(tx: &Transaction<'_>, cmd: &Sent) -> Result<Outcome> {
    let cid = cmd.connection_id.as_ref().map(|c| c.as_str());
    let updated = tx
        .typed_execute(
            "UPDATE agent_instruction SET status = 'sent', sent_at = now(), connection_id = coalesce($2, connection_id) \
             WHERE instruction_id = $1 AND status = 'pending'",
            &[&cmd.instruction_id, &cid],
        )
        .await?;
    if updated == 1 {
        tracing::info!(instruction_id = %cmd.instruction_id, "instruction sent");
        return Ok(Ok(result(InstructionStatusResult { status: InstructionStatus::Sent })));
    }
    match tx
        .typed_opt("SELECT status::text FROM agent_instruction WHERE instruction_id = $1", &[&cmd.instruction_id])
        .await?
    {
        Some(row) => Ok(Ok(result(InstructionStatusResult { status: row.get(0) }))),
        None => Ok(Err(CommandError::NotFound(format!("no instruction {}", cmd.instruction_id)))),
    }
}

/// Records the acknowledgement; an open instruction becomes `acknowledged`, a late ack changes nothing else.
pub async fn ack(tx: &Transaction<'_>, cmd: &Ack, ctx: &Context<'_>) -> Result<Outcome> {
    let sid = cmd.session_id.as_str();
    let aid = cmd.agent_id.as_str();
    if let Err(e) = lock_agent_session(tx, sid, aid, false).await? {
        return Ok(Err(e));
    }
    let Some(row) = tx
        .typed_opt(
            "SELECT session_id, agent_id, status::text FROM agent_instruction WHERE instruction_id = $1 FOR UPDATE",
            &[&cmd.instruction_id],
        )
        .await?
    else {
        return Ok(Err(CommandError::NotFound(format!("no instruction {}", cmd.instruction_id))));
    };
    if row.get::<_, String>(0) != sid || row.get::<_, String>(1) != aid {
        return Ok(Err(CommandError::Forbidden(format!(
            "instruction {} belongs to another agent or session",
            cmd.instruction_id
        ))));
    }
    let mut status: InstructionStatus = row.get(2);
    let accepted = status.is_open();
    if accepted {
        let row = tx
            .typed_one(
                "UPDATE agent_instruction SET status = 'acknowledged', acknowledged_at = now(), \
                 ack_status = $2 WHERE instruction_id = $1 RETURNING acknowledged_at",
                &[&cmd.instruction_id, &cmd.status],
            )
            .await?;
        let acknowledged_at: DateTime<Utc> = row.get(0);
        status = InstructionStatus::Acknowledged;
        ctx.emit(
            acknowledged_at,
            vec![EventBody::InstructionAcknowledged {
                instruction_id: cmd.instruction_id,
                session_id: sid.to_string(),
                agent_id: aid.to_string(),
                ack_status: cmd.status,
                acknowledged_at,
            }],
        );
        tracing::info!(instruction_id = %cmd.instruction_id, session_id = sid, agent_id = aid, ack_status = cmd.status.as_str(), "instruction acknowledged");
    } else {
        tracing::info!(instruction_id = %cmd.instruction_id, agent_id = aid, status = %status, "late acknowledgement recorded, nothing changed");
    }
    // The acknowledgement's record and the session's activity, sent together (neither needs the other's answer).
    let record = async {
        tx.typed_execute(
            "INSERT INTO agent_instruction_acknowledgement (instruction_id, agent_id, session_id, status, result, \
             error_message, processing_time_ms, processed_at, accepted, acknowledged_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, now())",
            &[
                &cmd.instruction_id,
                &aid,
                &sid,
                &cmd.status,
                &cmd.result.as_ref().map(Json::get),
                &cmd.error_message.as_ref().map(|t| t.as_str()),
                &cmd.processing_time_ms.map(i64::from),
                &cmd.processed_at.map(|t| t.0),
                &accepted,
            ],
        )
        .await
        .map_err(Error::from)
    };
    tokio::try_join!(record, touch_session(tx, sid, ctx))?;
    Ok(Ok(result(AckResult { status, accepted })))
}
