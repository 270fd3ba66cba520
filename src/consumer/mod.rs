//! The two consumers: heartbeats (applied in batches) and commands (applied in lanes, replied to).
//!
//! Both acknowledge a delivery only after its effect is committed (and its reply confirmed by the broker); a
//! transient failure holds the delivery and retries with backoff, so the consumer stops taking work instead of
//! spinning; poison is dead-lettered with an `x-acm-error` header, then acknowledged. An acknowledgement the channel
//! refuses (lapin's `Ok(false)`: the channel was reset) ends the consumer so the worker reconnects; the broker
//! redelivers, and idempotency makes the redelivery harmless.
//!
//! `heartbeats.rs` holds the heartbeat consumer, `commands.rs` the command consumer, `dead_letter.rs` replies and
//! dead-lettering; this file what they share.

mod commands;
mod dead_letter;
mod heartbeats;

pub use commands::commands;
pub use heartbeats::heartbeats;

use std::sync::Arc;

use deadpool_postgres::Pool;
use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use lapin::Channel;

use crate::amqp::Topology;
use crate::config::Settings;
use crate::error::{Error, Poison, PoisonKind, Result};
use crate::metrics::Metrics;

/// What both consumers share.
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
}

/// A short-string AMQP property as text.
pub(crate) fn prop(p: &Option<lapin::types::ShortString>) -> Option<String> {
    p.as_ref().map(|s| s.as_str().to_string())
}

/// Acknowledges a delivery (with `multiple`, every earlier one of its channel too), failing when the channel was
/// reset: lapin then answers `Ok(false)`, and the broker redelivers.
pub(crate) async fn ack(d: &Delivery, multiple: bool) -> Result<()> {
    if d.acker.ack(BasicAckOptions { multiple }).await? {
        Ok(())
    } else {
        Err(Error::Disconnected(format!(
            "acknowledgement of delivery {} refused: its channel was reset, the broker will redeliver",
            d.delivery_tag
        )))
    }
}

/// Why an agent's message may not be accepted from this sender: with `security.require_user_id`, its AMQP
/// `user_id` (which the broker vouches for) must be the agent it names.
pub(crate) fn user_mismatch(settings: &Settings, d: &Delivery, agent: &str) -> Option<Poison> {
    if !settings.security.require_user_id {
        return None;
    }
    match prop(d.properties.user_id()) {
        Some(u) if u == agent => None,
        Some(_) => {
            Some(Poison::new(PoisonKind::Forbidden, format!("forbidden: user_id does not match agent_id {agent}")))
        }
        None => Some(Poison::new(PoisonKind::Forbidden, format!("forbidden: no user_id for agent_id {agent}"))),
    }
}
