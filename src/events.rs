//! Events out (CONTRACT section 8) and the transactional outbox they are written to.
//!
//! An event is only ever written by [`write_outbox`] inside the transaction that makes the change it reports; the
//! relay publishes it later with publisher confirms. So there is no change without its event and no event without
//! its change.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::error::Result;

/// One event: common fields plus the type-specific body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Event {
    /// Unique id; also the AMQP `message_id` of the published message.
    pub event_id: Uuid,
    /// When the change happened (database clock, UTC).
    pub occurred_at: DateTime<Utc>,
    /// `event_type` and the fields of that type.
    #[serde(flatten)]
    pub body: EventBody,
}

/// The body of each event type; `event_type` is the tag and the routing key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "event_type")]
pub enum EventBody {
    /// A session was created.
    #[serde(rename = "agent.session.created")]
    SessionCreated { session_id: String, agent_id: String, acquisition_uuid: Option<String>, name: String },
    /// A session had no agent activity for `session_inactive_after_secs`.
    #[serde(rename = "agent.session.inactive")]
    SessionInactive { session_id: String, agent_id: String, last_activity_at: DateTime<Utc> },
    /// A session was ended.
    #[serde(rename = "agent.session.closed")]
    SessionClosed { session_id: String, agent_id: String, closed_connections: i64, cancelled_instructions: i64 },
    /// A connection was opened, or a stale-closed one restored by a heartbeat.
    #[serde(rename = "agent.connection.opened")]
    ConnectionOpened {
        connection_id: String,
        session_id: String,
        agent_id: String,
        connection_type: String,
        restored: bool,
    },
    /// A connection was closed by a client or by its session's close.
    #[serde(rename = "agent.connection.closed")]
    ConnectionClosed { connection_id: String, session_id: String, agent_id: String, reason: String },
    /// A connection had no heartbeat for `connection_stale_after_secs` and was closed.
    #[serde(rename = "agent.connection.stale")]
    ConnectionStale { connection_id: String, session_id: String, agent_id: String, last_heartbeat_at: DateTime<Utc> },
    /// An instruction was created.
    #[serde(rename = "agent.instruction.created")]
    InstructionCreated {
        instruction_id: Uuid,
        session_id: String,
        agent_id: String,
        instruction_type: String,
        payload: Value,
        sequence_number: Option<i64>,
        priority: String,
        expires_at: Option<DateTime<Utc>>,
        max_retries: i32,
        instruction_metadata: Option<Value>,
    },
    /// An open instruction was acknowledged.
    #[serde(rename = "agent.instruction.acknowledged")]
    InstructionAcknowledged {
        instruction_id: Uuid,
        session_id: String,
        agent_id: String,
        ack_status: String,
        acknowledged_at: DateTime<Utc>,
    },
    /// An instruction passed its deadline with retries left; it is pending again with a new deadline.
    #[serde(rename = "agent.instruction.retry")]
    InstructionRetry {
        instruction_id: Uuid,
        session_id: String,
        agent_id: String,
        instruction_type: String,
        payload: Value,
        priority: String,
        retry_count: i32,
        max_retries: i32,
        expires_at: DateTime<Utc>,
        previous_expires_at: DateTime<Utc>,
    },
    /// An instruction passed its deadline with no retries left (final).
    #[serde(rename = "agent.instruction.expired")]
    InstructionExpired {
        instruction_id: Uuid,
        session_id: String,
        agent_id: String,
        expires_at: DateTime<Utc>,
        retry_count: i32,
        max_retries: i32,
    },
    /// An open instruction was cancelled by its session's close.
    #[serde(rename = "agent.instruction.cancelled")]
    InstructionCancelled { instruction_id: Uuid, session_id: String, agent_id: String },
    /// The sweeper did not trust a mass-stale verdict this cycle.
    #[serde(rename = "agent.sweeper.held")]
    SweeperHeld { reason: String, candidates: i64, active: i64 },
}

impl EventBody {
    /// The `event_type` (and routing key).
    pub fn event_type(&self) -> &'static str {
        match self {
            EventBody::SessionCreated { .. } => "agent.session.created",
            EventBody::SessionInactive { .. } => "agent.session.inactive",
            EventBody::SessionClosed { .. } => "agent.session.closed",
            EventBody::ConnectionOpened { .. } => "agent.connection.opened",
            EventBody::ConnectionClosed { .. } => "agent.connection.closed",
            EventBody::ConnectionStale { .. } => "agent.connection.stale",
            EventBody::InstructionCreated { .. } => "agent.instruction.created",
            EventBody::InstructionAcknowledged { .. } => "agent.instruction.acknowledged",
            EventBody::InstructionRetry { .. } => "agent.instruction.retry",
            EventBody::InstructionExpired { .. } => "agent.instruction.expired",
            EventBody::InstructionCancelled { .. } => "agent.instruction.cancelled",
            EventBody::SweeperHeld { .. } => "agent.sweeper.held",
        }
    }
}

/// Every event type, for documentation and tests.
pub const EVENT_TYPES: [&str; 12] = [
    "agent.session.created",
    "agent.session.inactive",
    "agent.session.closed",
    "agent.connection.opened",
    "agent.connection.closed",
    "agent.connection.stale",
    "agent.instruction.created",
    "agent.instruction.acknowledged",
    "agent.instruction.retry",
    "agent.instruction.expired",
    "agent.instruction.cancelled",
    "agent.sweeper.held",
];

const INSERT_OUTBOX: &str = "INSERT INTO event_outbox (event_id, event_type, payload) \
     SELECT * FROM unnest($1::uuid[], $2::text[], $3::jsonb[])";

/// Writes events to the outbox in the caller's transaction, all with `occurred_at` = `now` (the database clock).
pub async fn write_outbox(
    tx: &impl deadpool_postgres::GenericClient,
    now: DateTime<Utc>,
    bodies: Vec<EventBody>,
) -> Result<()> {
    if bodies.is_empty() {
        return Ok(());
    }
    let mut ids = Vec::with_capacity(bodies.len());
    let mut types = Vec::with_capacity(bodies.len());
    let mut payloads = Vec::with_capacity(bodies.len());
    for body in bodies {
        let event = Event { event_id: Uuid::new_v4(), occurred_at: now, body };
        tracing::debug!(event_id = %event.event_id, event_type = event.body.event_type(), "event written to outbox");
        ids.push(event.event_id);
        types.push(event.body.event_type().to_string());
        payloads.push(serde_json::to_value(&event).expect("events serialize to JSON"));
    }
    tx.execute(INSERT_OUTBOX, &[&ids, &types, &payloads]).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_json_has_type_id_and_time() {
        let e = Event {
            event_id: Uuid::nil(),
            occurred_at: DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z").unwrap().with_timezone(&Utc),
            body: EventBody::SweeperHeld { reason: "mass_stale".into(), candidates: 30, active: 40 },
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["event_type"], "agent.sweeper.held");
        assert_eq!(v["event_id"], Uuid::nil().to_string());
        assert_eq!(v["occurred_at"], "2026-01-01T00:00:00Z");
        assert_eq!(v["candidates"], 30);
        let back: Event = serde_json::from_value(v).unwrap();
        assert_eq!(back, e);
    }
}
