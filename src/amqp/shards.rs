//! Heartbeat shards. With `amqp.heartbeat_shards` = N > 1, heartbeats keep their routing key `agent.heartbeat` on
//! the command exchange; an exchange-to-exchange binding takes them from there to `<prefix>.heartbeat-shards`, an
//! `x-consistent-hash` exchange (RabbitMQ's plugin `rabbitmq_consistent_hash_exchange`) that hashes on the
//! [`AGENT_HEADER`] header and spreads them over N queues `<prefix>.heartbeats.<i>`, each bound with weight 1. So one
//! agent's heartbeats stay in one queue, in order; a heartbeat without the header hashes like any other value and
//! lands in one shard too.
//!
//! Declaration only adds: the single `<prefix>.heartbeats` of one shard is left as it is (it still receives a copy
//! of every heartbeat while it exists, until an operator deletes it); fewer shards than exist is refused, since
//! heartbeats hashed to a shard no worker consumes would never be applied. Finding that out costs a passive
//! declaration of shard N, which the broker answers with a 404 (logged by the AMQP library) when all is well.

use lapin::options::{ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ExchangeKind};

use super::{Topology, HEARTBEAT_ROUTING_KEY};
use crate::config::{ConfigError, Settings};
use crate::error::Result;

/// Header carrying the agent id of a heartbeat; the shards hash on it.
pub const AGENT_HEADER: &str = "x-acm-agent-id";
/// The RabbitMQ plugin providing the `x-consistent-hash` exchange type.
pub const CONSISTENT_HASH_PLUGIN: &str = "rabbitmq_consistent_hash_exchange";

/// Whether the broker refused a declaration because it does not know the exchange type (503 `COMMAND_INVALID`, or
/// 404 from some versions): the plugin that provides it is not enabled.
pub fn is_unknown_exchange_type(e: &lapin::Error) -> bool {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => {
            matches!(amqp.get_id(), 503 | 404) || amqp.get_message().as_str().contains("exchange type")
        }
        _ => false,
    }
}

impl Topology {
    /// Declares the consistent-hash exchange, the shard queues and the bindings (see the module's description).
    pub(super) async fn declare_shards(&self, conn: &Connection, ch: &Channel, settings: &Settings) -> Result<()> {
        let n = self.heartbeat_shards;
        let beyond = self.heartbeat_shard(n);
        if Self::queue_exists(conn, &beyond).await? {
            return Err(ConfigError(format!(
                "amqp.heartbeat_shards: {n}, but the queue {beyond} exists (declared with more shards) and receives \
                 the heartbeats hashed to it, which no worker would apply. To reduce the shards, stop the workers, \
                 delete the shard queues from {beyond} up (`rabbitmqctl delete_queue {beyond}`, ...; the heartbeats \
                 in them are lost, which is harmless) and start them again"
            ))
            .into());
        }
        let mut args = FieldTable::default();
        args.insert("hash-header".into(), AMQPValue::LongString(AGENT_HEADER.into()));
        // An unknown exchange type is a connection error: nothing else is declared after it anyway.
        let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
        let kind = ExchangeKind::Custom("x-consistent-hash".into());
        if let Err(e) = ch.exchange_declare(self.heartbeat_exchange.as_str().into(), kind, durable, args).await {
            if is_unknown_exchange_type(&e) {
                return Err(ConfigError(format!(
                    "amqp.heartbeat_shards: {n} needs the x-consistent-hash exchange type, which the broker refused \
                     ({e}): enable the plugin {CONSISTENT_HASH_PLUGIN} on every node (`rabbitmq-plugins enable \
                     {CONSISTENT_HASH_PLUGIN}`), or set amqp.heartbeat_shards = 1"
                ))
                .into());
            }
            return Err(e.into());
        }
        for i in 0..n {
            let shard = self.heartbeat_shard(i);
            self.declare_heartbeat_queue(conn, &shard, settings).await?;
            // The binding key of a consistent-hash exchange is the queue's weight: all shards weigh the same.
            ch.queue_bind(
                shard.as_str().into(),
                self.heartbeat_exchange.as_str().into(),
                "1".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        }
        ch.exchange_bind(
            self.heartbeat_exchange.as_str().into(),
            self.command_exchange.as_str().into(),
            HEARTBEAT_ROUTING_KEY.into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        Ok(())
    }
}
