//! The `result` of each command's reply, and the reply envelope; also the source of `schema/replies/`.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::domain::InstructionStatus as Status;

/// `session.create`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SessionCreated {
    /// The new (or existing, for a repeated client-chosen id) session.
    pub session_id: String,
}

/// `session.close` and `connection.close`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Closed {
    /// `false` when there is no such session or connection.
    pub closed: bool,
}

/// `connection.open`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ConnectionOpened {
    /// The connection.
    pub connection_id: String,
}

/// `instruction.create`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct InstructionCreated {
    /// The instruction.
    pub instruction_id: Uuid,
    /// Its deadline (UTC), `null` when it never expires.
    pub expires_at: Option<DateTime<Utc>>,
}

/// `instruction.sent`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct InstructionStatus {
    /// The instruction's state after the command.
    pub status: Status,
}

/// `instruction.ack`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AckResult {
    /// The instruction's state after the acknowledgement.
    pub status: Status,
    /// `false` for a late acknowledgement (the instruction was no longer pending or sent): recorded, nothing changed.
    pub accepted: bool,
}

/// Error codes of a refused command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Malformed input (also sent for poison messages that carry `reply_to`).
    Invalid,
    /// No such session or instruction.
    NotFound,
    /// Contradicts the current state.
    Conflict,
    /// Belongs to another agent.
    Forbidden,
    /// The agent is at a per-agent limit (`limits.*`).
    Limit,
}

/// The `error` of a refusal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ErrorBody {
    /// What kind of refusal.
    pub code: ErrorCode,
    /// What was wrong, for people.
    pub message: String,
}

/// A reply: `{"ok": true, "result": ...}` or `{"ok": false, "error": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Reply<T> {
    /// The command was applied (or had been, for a redelivery).
    Ok {
        /// Always `true`.
        ok: bool,
        /// The command's result.
        result: T,
    },
    /// The command was refused.
    Err {
        /// Always `false`.
        ok: bool,
        /// Why.
        error: ErrorBody,
    },
}

/// Serializes a result for the reply.
pub fn result<T: Serialize>(t: T) -> Value {
    serde_json::to_value(t).unwrap_or(Value::Null)
}
