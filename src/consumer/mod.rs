//! The consumers: heartbeats and agents' log lines (applied in batches), commands (applied in lanes, replied to)
//! and what no binding of the command exchange matched (dead-lettered as `unroutable`).
//!
//! Both acknowledge a delivery only after its effect is committed (and its reply confirmed by the broker); a
//! transient failure holds the delivery and retries with backoff, so the consumer stops taking work instead of
//! spinning; poison is dead-lettered with an `x-acm-error` header, then acknowledged. An acknowledgement the channel
//! refuses (lapin's `Ok(false)`: the channel was reset) ends the consumer so the worker reconnects; the broker
//! redelivers, and idempotency makes the redelivery harmless.
//!
//! `heartbeats.rs` holds the heartbeat consumer, `commands.rs` the command consumer, `logs.rs` the log consumer,
//! `unroutable.rs` the unroutable one, `dead_letter.rs` replies and dead-lettering; this file what they share.

mod commands;
mod dead_letter;
mod heartbeats;
mod logs;
mod unroutable;

pub use commands::commands;
pub use heartbeats::heartbeats;
pub use logs::logs;
pub use unroutable::unroutable;

use std::sync::Arc;

use deadpool_postgres::Pool;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer};

use crate::amqp::Topology;
use crate::commands::{Command, Message, Queue, Sender};
use crate::config::Settings;
use crate::domain::Ident;
use crate::error::CommandError;
use crate::error::{Error, Poison, PoisonKind, Result};
use crate::metrics::Metrics;
use dead_letter::reject;

/// What the consumers share.
pub struct Shared {
    /// Database pool.
    pub pool: Pool,
    /// Settings.
    pub settings: Arc<Settings>,
    /// Exchange and queue names.
    pub topology: Topology,
    /// Confirm-mode channel for replies and dead letters.
    pub publisher: Channel,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Told after every commit that may have written events, to wake the relay.
    pub outbox: crate::events::OutboxSignal,
    /// The heartbeat consumer's progress, for the stale sweep.
    pub progress: Arc<crate::sweeper::catch_up::Progress>,
    /// Records the spans of commands and heartbeat batches (disabled without `telemetry.otlp_endpoint`).
    pub tracer: crate::telemetry::otlp::Tracer,
}

/// A short-string AMQP property as text.
pub(crate) fn prop(p: &Option<lapin::types::ShortString>) -> Option<String> {
    p.as_ref().map(|s| s.as_str().to_string())
}

/// Starts consuming `queue` on `channel` with `amqp.prefetch` unacknowledged deliveries at most.
pub(crate) async fn consume(shared: &Shared, channel: &Channel, queue: Queue) -> Result<Consumer> {
    consume_queue(channel, shared.topology.queue_name(queue), shared.settings.amqp.prefetch.get()).await
}

/// Starts consuming the queue named `queue` on `channel` with `prefetch` unacknowledged deliveries at most.
pub(crate) async fn consume_queue(channel: &Channel, queue: &str, prefetch: u16) -> Result<Consumer> {
    channel.basic_qos(prefetch, BasicQosOptions::default()).await?;
    let consumer =
        channel.basic_consume(queue.into(), "".into(), BasicConsumeOptions::default(), FieldTable::default()).await?;
    Ok(consumer)
}

/// Acknowledges a delivery (with `multiple`, every earlier one of its channel too), failing when the channel was
/// reset: lapin then answers `Ok(false)`, and the broker redelivers. The acknowledgement is sent within
/// [`crate::amqp::BROKER_QUERY_TIMEOUT`] or counted as not sent (on a connection that was reset it may never be).
pub(crate) async fn ack(d: &Delivery, multiple: bool) -> Result<()> {
    let sent = tokio::time::timeout(crate::amqp::BROKER_QUERY_TIMEOUT, d.acker.ack(BasicAckOptions { multiple }))
        .await
        .map_err(|_| {
            Error::Disconnected(format!(
                "acknowledgement of delivery {} not sent within {:?}, the broker will redeliver",
                d.delivery_tag,
                crate::amqp::BROKER_QUERY_TIMEOUT
            ))
        })??;
    if sent {
        Ok(())
    } else {
        Err(Error::Disconnected(format!(
            "acknowledgement of delivery {} refused: its channel was reset, the broker will redeliver",
            d.delivery_tag
        )))
    }
}

/// Why a parsed message may not be applied from this delivery, if it may not; the same check in every consumer.
///
/// One delivery of a batched queue (`queue`, whose one type is `T`, named `what` in a refusal): parsed and
/// authorized, or dead-lettered with its reason (answered when it has a `reply_to`), then `None`.
pub(crate) async fn admit<T: Message>(shared: &Shared, d: &Delivery, queue: Queue, what: &str) -> Result<Option<T>> {
    let cmd = match Command::parse(&d.data, shared.settings.amqp.max_message_bytes.get()) {
        Ok(cmd) => cmd,
        Err(why) => {
            reject(shared, d, "unknown", &why, CommandError::Invalid(why.to_string())).await?;
            return Ok(None);
        }
    };
    let ty = cmd.type_name();
    // `authorize` admits only the queue's types, and `T` is its only one; refuse anything else all the same rather
    // than trust that.
    let why = match authorize(&shared.settings, d, &cmd, queue) {
        Some(why) => why,
        None => match cmd.downcast::<T>() {
            Some(m) => return Ok(Some(m)),
            None => Poison::new(PoisonKind::Forbidden, format!("forbidden: `{ty}` is not {what}")),
        },
    };
    reject(shared, d, ty, &why, CommandError::Forbidden(why.to_string())).await?;
    Ok(None)
}

/// What the broker vouches for decides: the routing key (which the broker's topic permissions restrict per user)
/// must be the message's `type`, so a user allowed only some routing keys can have only those types applied; the
/// message must be consumed from its type's queue (only an extra binding someone added could bring it elsewhere);
/// and with `security.require_user_id` an agent message's AMQP `user_id` must be the agent it names.
pub(crate) fn authorize(settings: &Settings, d: &Delivery, cmd: &Command, queue: Queue) -> Option<Poison> {
    let forbidden = |why: String| Some(Poison::new(PoisonKind::Forbidden, format!("forbidden: {why}")));
    let ty = cmd.type_name();
    let key = d.routing_key.as_str();
    if key != ty {
        let shown: String = key.chars().take(100).collect();
        return forbidden(format!("routing key `{shown}` is not the message type `{ty}`"));
    }
    if cmd.entry().queue != queue {
        return forbidden(format!("type `{ty}` is not consumed from this queue"));
    }
    if cmd.entry().sender != Sender::Agent {
        return None;
    }
    let Some(agent) = cmd.claimed_agent().map(Ident::as_str) else {
        return forbidden(format!("agent message `{ty}` names no agent_id"));
    };
    if !settings.security.require_user_id {
        return None;
    }
    match prop(d.properties.user_id()) {
        Some(u) if u == agent => None,
        Some(_) => forbidden(format!("user_id does not match agent_id {agent}")),
        None => forbidden(format!("no user_id for agent_id {agent}")),
    }
}
