//! Commands in (CONTRACT section 4): parsing at the edge, and applying each in one transaction.
//!
//! Each command type lives in its own module with the same three steps: a typed struct parsed from the message,
//! an `apply` that changes the database and writes its events to the outbox in the caller's transaction, and a
//! reply. Handlers refuse (with a [`CommandError`]) before they write anything, so a refusal commits nothing but
//! the idempotency record.

pub mod connection;
pub mod heartbeat;
pub mod instruction;
pub mod replies;
pub mod session;
pub mod stats;

use deadpool_postgres::{Pool, Transaction};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use crate::config::Settings;
use crate::domain::Ident;
use crate::error::{CommandError, Result};

/// What a handler decided: the reply's `result`, or why it refused.
pub type Outcome = std::result::Result<Value, CommandError>;

/// A parsed message.
#[derive(Debug, Clone)]
pub enum Command {
    /// `agent.heartbeat`
    Heartbeat(heartbeat::Heartbeat),
    /// `session.create`
    SessionCreate(session::Create),
    /// `session.close`
    SessionClose(session::Close),
    /// `connection.open`
    ConnectionOpen(connection::Open),
    /// `connection.close`
    ConnectionClose(connection::Close),
    /// `instruction.create`
    InstructionCreate(instruction::Create),
    /// `instruction.sent`
    InstructionSent(instruction::Sent),
    /// `instruction.ack`
    InstructionAck(instruction::Ack),
    /// `stats.get`
    StatsGet,
}

/// Every accepted message `type`.
pub const MESSAGE_TYPES: [&str; 9] = [
    "agent.heartbeat",
    "session.create",
    "session.close",
    "connection.open",
    "connection.close",
    "instruction.create",
    "instruction.sent",
    "instruction.ack",
    "stats.get",
];

fn typed<T: DeserializeOwned>(value: Value) -> std::result::Result<T, String> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            e.inner().to_string()
        } else {
            format!("field `{path}`: {}", e.inner())
        }
    })
}

impl Command {
    /// Parses a message body; the error says why it is poison.
    pub fn parse(body: &[u8], max_bytes: usize) -> std::result::Result<Self, String> {
        if body.len() > max_bytes {
            return Err(format!("too large: {} bytes, the limit is {max_bytes}", body.len()));
        }
        let value: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
        let Some(obj) = value.as_object() else {
            return Err("not a JSON object".into());
        };
        let ty = match obj.get("type") {
            None => return Err("missing field `type`".into()),
            Some(Value::String(t)) => t.clone(),
            Some(_) => return Err("field `type`: must be a string".into()),
        };
        Ok(match ty.as_str() {
            "agent.heartbeat" => Command::Heartbeat(typed(value)?),
            "session.create" => Command::SessionCreate(typed(value)?),
            "session.close" => Command::SessionClose(typed(value)?),
            "connection.open" => Command::ConnectionOpen(typed(value)?),
            "connection.close" => Command::ConnectionClose(typed(value)?),
            "instruction.create" => {
                let c: instruction::Create = typed(value)?;
                c.check()?;
                Command::InstructionCreate(c)
            }
            "instruction.sent" => Command::InstructionSent(typed(value)?),
            "instruction.ack" => Command::InstructionAck(typed(value)?),
            "stats.get" => Command::StatsGet,
            other => {
                let shown: String = other.chars().take(100).collect();
                return Err(format!("unknown type `{shown}`"));
            }
        })
    }

    /// The message `type`.
    pub fn type_name(&self) -> &'static str {
        match self {
            Command::Heartbeat(_) => "agent.heartbeat",
            Command::SessionCreate(_) => "session.create",
            Command::SessionClose(_) => "session.close",
            Command::ConnectionOpen(_) => "connection.open",
            Command::ConnectionClose(_) => "connection.close",
            Command::InstructionCreate(_) => "instruction.create",
            Command::InstructionSent(_) => "instruction.sent",
            Command::InstructionAck(_) => "instruction.ack",
            Command::StatsGet => "stats.get",
        }
    }

    /// The `agent_id` an agent-originated message claims (CONTRACT section 7); `None` for backend commands and
    /// for `connection.close`, whose owner is checked against the database.
    pub fn claimed_agent(&self) -> Option<&Ident> {
        match self {
            Command::Heartbeat(h) => Some(&h.agent_id),
            Command::InstructionAck(a) => Some(&a.agent_id),
            Command::ConnectionOpen(o) => Some(&o.agent_id),
            _ => None,
        }
    }

    /// Commands with the same key are applied in order; others run concurrently.
    pub fn order_key(&self) -> String {
        match self {
            Command::Heartbeat(h) => h.session_id.to_string(),
            Command::SessionCreate(c) => {
                c.session_id.as_ref().map(|s| s.to_string()).unwrap_or_else(|| c.agent_id.to_string())
            }
            Command::SessionClose(c) => c.session_id.to_string(),
            Command::ConnectionOpen(c) => c.session_id.to_string(),
            Command::ConnectionClose(c) => c.connection_id.to_string(),
            Command::InstructionCreate(c) => c.session_id.to_string(),
            Command::InstructionSent(c) => c.instruction_id.to_string(),
            Command::InstructionAck(c) => c.session_id.to_string(),
            Command::StatsGet => String::new(),
        }
    }
}

/// Where a command came from: AMQP properties that count.
#[derive(Debug, Clone, Default)]
pub struct Meta {
    /// AMQP `message_id`: a redelivery with the same id gets the first reply and changes nothing.
    pub message_id: Option<String>,
    /// Broker-validated AMQP `user_id`.
    pub user_id: Option<String>,
}

/// What handlers may read besides their command.
pub struct Context<'a> {
    /// The service settings.
    pub settings: &'a Settings,
    /// The message's `user_id`, when `security.require_user_id` is on.
    pub required_user: Option<&'a str>,
}

/// A reply body: `{"ok": true, "result": ...}` or `{"ok": false, "error": {"code", "message"}}`.
pub fn reply_json(outcome: &Outcome) -> Value {
    match outcome {
        Ok(result) => json!({ "ok": true, "result": result }),
        Err(e) => json!({ "ok": false, "error": { "code": e.code(), "message": e.message() } }),
    }
}

fn outcome_from_reply(reply: &Value) -> Outcome {
    if reply["ok"] == Value::Bool(true) {
        return Ok(reply["result"].clone());
    }
    let message = reply["error"]["message"].as_str().unwrap_or_default().to_string();
    Err(match reply["error"]["code"].as_str() {
        Some("not_found") => CommandError::NotFound(message),
        Some("conflict") => CommandError::Conflict(message),
        Some("forbidden") => CommandError::Forbidden(message),
        _ => CommandError::Invalid(message),
    })
}

const CLAIM_MESSAGE: &str = "INSERT INTO processed_message (message_type, message_id) VALUES ($1, $2) \
     ON CONFLICT DO NOTHING";
const STORED_REPLY: &str = "SELECT reply FROM processed_message WHERE message_type = $1 AND message_id = $2";
const STORE_REPLY: &str = "UPDATE processed_message SET reply = $3 WHERE message_type = $1 AND message_id = $2";

/// Applies one command (not a heartbeat: see [`heartbeat::apply_batch`]) in one transaction and returns its outcome.
///
/// With a `message_id`, the first delivery's outcome is stored with its effect; a redelivery (or a concurrent
/// duplicate on another worker, which waits on the key) returns the stored outcome and changes nothing.
pub async fn execute(pool: &Pool, settings: &Settings, cmd: &Command, meta: &Meta) -> Result<Outcome> {
    if let Command::StatsGet = cmd {
        let client = pool.get().await?;
        return Ok(Ok(serde_json::to_value(stats::get(&client).await?).unwrap_or(Value::Null)));
    }
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let ty = cmd.type_name();
    if let Some(mid) = &meta.message_id {
        if tx.execute(CLAIM_MESSAGE, &[&ty, mid]).await? == 0 {
            let row = tx.query_one(STORED_REPLY, &[&ty, mid]).await?;
            let reply: Option<Value> = row.get(0);
            tx.commit().await?;
            tracing::info!(message_id = %mid, message_type = ty, "duplicate message: replying as before");
            return Ok(reply.as_ref().map(outcome_from_reply).unwrap_or_else(|| Ok(Value::Null)));
        }
    }
    let required_user =
        if settings.security.require_user_id { Some(meta.user_id.as_deref().unwrap_or("")) } else { None };
    let ctx = Context { settings, required_user };
    let outcome = apply(&tx, cmd, &ctx).await?;
    if let Some(mid) = &meta.message_id {
        tx.execute(STORE_REPLY, &[&ty, mid, &reply_json(&outcome)]).await?;
    }
    tx.commit().await?;
    Ok(outcome)
}

async fn apply(tx: &Transaction<'_>, cmd: &Command, ctx: &Context<'_>) -> Result<Outcome> {
    match cmd {
        Command::SessionCreate(c) => session::create(tx, c).await,
        Command::SessionClose(c) => session::close(tx, c).await,
        Command::ConnectionOpen(c) => connection::open(tx, c).await,
        Command::ConnectionClose(c) => connection::close(tx, c, ctx).await,
        Command::InstructionCreate(c) => instruction::create(tx, c, ctx).await,
        Command::InstructionSent(c) => instruction::sent(tx, c).await,
        Command::InstructionAck(c) => instruction::ack(tx, c).await,
        Command::Heartbeat(h) => heartbeat::apply_in(tx, std::slice::from_ref(h)).await.map(|_| Ok(Value::Null)),
        Command::StatsGet => Ok(Ok(serde_json::to_value(stats::get(tx).await?).unwrap_or(Value::Null))),
    }
}

/// Marks a session as touched by its agent: activity moves forward, an inactive session becomes active.
pub(crate) async fn touch_session(tx: &Transaction<'_>, session_id: &str) -> Result<()> {
    let rows = tx
        .query(
            "UPDATE agent_session SET last_activity_at = greatest(last_activity_at, now()), status = 'active' \
             WHERE session_id = $1 AND status <> 'ended' \
             RETURNING (SELECT status::text FROM agent_session o WHERE o.session_id = $1)",
            &[&session_id],
        )
        .await?;
    if let Some(row) = rows.first() {
        if row.get::<_, Option<String>>(0).as_deref() == Some("inactive") {
            tracing::info!(session_id, "session active again");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> std::result::Result<Command, String> {
        Command::parse(s.as_bytes(), 1 << 20)
    }

    #[test]
    fn poison_reasons_are_precise() {
        assert!(parse("nope").unwrap_err().starts_with("not JSON"));
        assert_eq!(parse("[1]").unwrap_err(), "not a JSON object");
        assert_eq!(parse("{}").unwrap_err(), "missing field `type`");
        assert_eq!(parse(r#"{"type":1}"#).unwrap_err(), "field `type`: must be a string");
        assert_eq!(parse(r#"{"type":"x.y"}"#).unwrap_err(), "unknown type `x.y`");
        let e = parse(r#"{"type":"session.close"}"#).unwrap_err();
        assert!(e.contains("missing field `session_id`"), "{e}");
        let e = parse(r#"{"type":"instruction.create","session_id":"s","agent_id":"a","instruction_type":"t","payload":{},"max_retries":"3"}"#)
            .unwrap_err();
        assert!(e.contains("max_retries"), "{e}");
        let e = parse(r#"{"type":"agent.heartbeat","agent_id":"","session_id":"s","connection_id":"c"}"#).unwrap_err();
        assert!(e.contains("agent_id") && e.contains("empty"), "{e}");
        assert!(Command::parse(&[b' '; 10], 5).unwrap_err().starts_with("too large"));
    }

    #[test]
    fn payload_is_required_but_may_be_null() {
        let e = parse(r#"{"type":"instruction.create","session_id":"s","agent_id":"a","instruction_type":"t"}"#)
            .unwrap_err();
        assert!(e.contains("payload"), "{e}");
        assert!(parse(
            r#"{"type":"instruction.create","session_id":"s","agent_id":"a","instruction_type":"t","payload":null}"#
        )
        .is_ok());
    }

    #[test]
    fn expires_at_null_is_not_absent() {
        let Command::InstructionCreate(c) =
            parse(r#"{"type":"instruction.create","session_id":"s","agent_id":"a","instruction_type":"t","payload":1,"expires_at":null}"#).unwrap()
        else {
            panic!("wrong command")
        };
        assert_eq!(c.expires_at, Some(None));
        let e = parse(r#"{"type":"instruction.create","session_id":"s","agent_id":"a","instruction_type":"t","payload":1,"expires_at":null,"ttl_seconds":5}"#).unwrap_err();
        assert!(e.contains("ttl_seconds"), "{e}");
    }

    #[test]
    fn stored_replies_round_trip() {
        for o in [Ok(json!({"closed": true})), Err(CommandError::NotFound("no such session".into()))] {
            assert_eq!(outcome_from_reply(&reply_json(&o)), o);
        }
    }
}
