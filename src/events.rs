//! Events out and the transactional outbox they are written to.
//!
//! An event is only ever written by [`write_outbox`] inside the transaction that makes the change it reports; the
//! relay publishes it later with publisher confirms. So there is no change without its event and no event without
//! its change.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::db::Sql;
use crate::domain::{AckStatus, ClosedReason, Priority};
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

/// Declares every event type once: the `EventBody` variant, its `event_type` (also the routing key, and the name of
/// its schema in `schema/events/`) and its fields. [`EVENT_TYPES`] and [`EventBody::event_type`] come from the
/// same list, as do the schemas and the events table of `docs/protocol.md` (through [`crate::schema`]).
macro_rules! events {
    ($(
        $(#[$doc:meta])*
        $variant:ident = $ty:literal { $($(#[$fdoc:meta])* $field:ident : $fty:ty),* $(,)? }
    )*) => {
        /// The body of each event type; `event_type` is the tag and the routing key.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
        #[serde(tag = "event_type")]
        pub enum EventBody {
            $(
                $(#[$doc])*
                #[serde(rename = $ty)]
                $variant { $($(#[$fdoc])* $field: $fty),* },
            )*
        }

        impl EventBody {
            /// The `event_type` (and routing key).
            pub fn event_type(&self) -> &'static str {
                match self {
                    $(EventBody::$variant { .. } => $ty,)*
                }
            }
        }

        /// Every event type, in the order of the list.
        pub const EVENT_TYPES: &[&str] = &[$($ty),*];
    };
}

events! {
    /// `session.create` made a session.
    SessionCreated = "agent.session.created" {
        /// The session.
        session_id: String,
        /// Its agent.
        agent_id: String,
        /// The acquisition it belongs to, if any.
        acquisition_uuid: Option<String>,
        /// Its name.
        name: String,
    }
    /// The sweeper marked the session inactive: no agent activity for `session_inactive_after_secs`.
    SessionInactive = "agent.session.inactive" {
        /// The session.
        session_id: String,
        /// Its agent.
        agent_id: String,
        /// Its last agent activity (database clock).
        last_activity_at: DateTime<Utc>,
    }
    /// `session.close` ended it; its connections were closed and its open instructions cancelled in the same change.
    SessionClosed = "agent.session.closed" {
        /// The session.
        session_id: String,
        /// Its agent.
        agent_id: String,
        /// Connections closed by this (each also has its `agent.connection.closed`).
        closed_connections: i64,
        /// Instructions cancelled by this (each also has its `agent.instruction.cancelled`).
        cancelled_instructions: i64,
    }
    /// `connection.open`, or a heartbeat for an unknown connection (`restored: false`; `connection_type` `amqp` until
    /// its `connection.open` completes it, without another event) or for a stale-closed one (`restored: true`).
    ConnectionOpened = "agent.connection.opened" {
        /// The connection.
        connection_id: String,
        /// Its session.
        session_id: String,
        /// Its agent.
        agent_id: String,
        /// Its type (`amqp` unless the opener said otherwise).
        connection_type: String,
        /// `true` when a heartbeat brought back a connection closed as stale.
        restored: bool,
    }
    /// `connection.close` (its `reason`), or `session.close` (`session_closed`).
    ConnectionClosed = "agent.connection.closed" {
        /// The connection.
        connection_id: String,
        /// Its session.
        session_id: String,
        /// Its agent.
        agent_id: String,
        /// `client_disconnect` or `session_closed`.
        reason: ClosedReason,
    }
    /// The sweeper closed it as `stale_connection`: no heartbeat for `connection_stale_after_secs`.
    ConnectionStale = "agent.connection.stale" {
        /// The connection.
        connection_id: String,
        /// Its session.
        session_id: String,
        /// Its agent.
        agent_id: String,
        /// Its last heartbeat (database clock).
        last_heartbeat_at: DateTime<Utc>,
    }
    /// `instruction.create` made it.
    InstructionCreated = "agent.instruction.created" {
        /// The instruction.
        instruction_id: Uuid,
        /// Its session.
        session_id: String,
        /// Its agent.
        agent_id: String,
        /// What the agent is asked to do.
        instruction_type: String,
        /// The creator's payload, as given.
        payload: Value,
        /// The creator's ordering, if given.
        sequence_number: Option<i64>,
        /// Its priority.
        priority: Priority,
        /// Its deadline, `null` when it never expires.
        expires_at: Option<DateTime<Utc>>,
        /// Tries after the first.
        max_retries: i32,
        /// The creator's metadata, as given.
        instruction_metadata: Option<Value>,
    }
    /// An `instruction.ack` of an open (`pending` or `sent`) instruction.
    InstructionAcknowledged = "agent.instruction.acknowledged" {
        /// The instruction.
        instruction_id: Uuid,
        /// Its session.
        session_id: String,
        /// Its agent.
        agent_id: String,
        /// What the agent said.
        ack_status: AckStatus,
        /// When (database clock).
        acknowledged_at: DateTime<Utc>,
    }
    /// The sweeper gave it another try: past its deadline with retries left, it is `pending` again with a new deadline.
    InstructionRetry = "agent.instruction.retry" {
        /// The instruction.
        instruction_id: Uuid,
        /// Its session.
        session_id: String,
        /// Its agent.
        agent_id: String,
        /// What the agent is asked to do.
        instruction_type: String,
        /// The creator's payload, as given.
        payload: Value,
        /// Its priority.
        priority: Priority,
        /// Tries so far after the first, this one included (the new count).
        retry_count: i32,
        /// Tries after the first.
        max_retries: i32,
        /// The new deadline.
        expires_at: DateTime<Utc>,
        /// The deadline it passed.
        previous_expires_at: DateTime<Utc>,
    }
    /// The sweeper expired it: past its deadline with no retries left (final).
    InstructionExpired = "agent.instruction.expired" {
        /// The instruction.
        instruction_id: Uuid,
        /// Its session.
        session_id: String,
        /// Its agent.
        agent_id: String,
        /// The deadline it passed.
        expires_at: DateTime<Utc>,
        /// Tries after the first that were made.
        retry_count: i32,
        /// Tries after the first.
        max_retries: i32,
    }
    /// `session.close` cancelled it while it was open.
    InstructionCancelled = "agent.instruction.cancelled" {
        /// The instruction.
        instruction_id: Uuid,
        /// Its session.
        session_id: String,
        /// Its agent.
        agent_id: String,
    }
    /// The stale brake held: the sweeper did not trust a mass-stale verdict this cycle.
    SweeperHeld = "agent.sweeper.held" {
        /// `mass_stale` or `heartbeat_backlog`.
        reason: String,
        /// Connections that would have gone stale.
        candidates: i64,
        /// Active connections.
        active: i64,
    }
}

/// Wakes this process's outbox relay once a transaction that wrote events has committed.
///
/// Everything in the process that commits events (command execution, heartbeat batches, sweeper tasks, the
/// library's session calls) holds a clone and calls [`OutboxSignal::committed`] after the commit — never before: a
/// relay woken before the commit would find nothing and wait for its next poll. A wake-up that comes while the relay
/// is busy is kept for its next wait. Events committed by other processes are found by the relay's poll.
#[derive(Debug, Clone, Default)]
pub struct OutboxSignal(Arc<tokio::sync::Notify>);

impl OutboxSignal {
    /// A transaction that wrote events has committed.
    pub fn committed(&self) {
        self.0.notify_one();
    }

    /// Waits for the next [`OutboxSignal::committed`] (or returns at once for one that came meanwhile).
    pub async fn notified(&self) {
        self.0.notified().await;
    }
}

const INSERT_OUTBOX: &str = "INSERT INTO event_outbox (event_id, event_type, payload, traceparent, tracestate) \
     SELECT *, $4::text, $5::text FROM unnest($1::uuid[], $2::text[], $3::jsonb[])";

/// Writes events to the outbox in the caller's transaction, all with `occurred_at` = `now` (the database clock).
pub async fn write_outbox(tx: &impl Sql, now: DateTime<Utc>, bodies: Vec<EventBody>) -> Result<()> {
    write_events(tx, events_at(now, bodies)).await
}

/// The events of `bodies`, each with a new `event_id` and `occurred_at` = `now`.
pub fn events_at(now: DateTime<Utc>, bodies: Vec<EventBody>) -> Vec<Event> {
    bodies.into_iter().map(|body| Event { event_id: Uuid::new_v4(), occurred_at: now, body }).collect()
}

/// Writes `events` to the outbox in the caller's transaction, in one statement, with the current trace context
/// ([`crate::trace_context::current`]), which the relay publishes with them.
pub async fn write_events(tx: &impl Sql, events: Vec<Event>) -> Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    let mut ids = Vec::with_capacity(events.len());
    let mut types = Vec::with_capacity(events.len());
    let mut payloads = Vec::with_capacity(events.len());
    for event in events {
        tracing::debug!(event_id = %event.event_id, event_type = event.body.event_type(), "event written to outbox");
        ids.push(event.event_id);
        types.push(event.body.event_type().to_string());
        payloads.push(serde_json::to_value(&event).expect("events serialize to JSON"));
    }
    let trace = crate::trace_context::current();
    let traceparent = trace.as_ref().map(|t| t.traceparent());
    let tracestate = trace.and_then(|t| t.state);
    tx.typed_execute(INSERT_OUTBOX, &[&ids, &types, &payloads, &traceparent, &tracestate]).await?;
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
