//! The topology: the names derived from `amqp.prefix` and their declaration.

use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ExchangeKind};

use super::{binding_keys, legacy_command_keys, BROKER_QUERY_TIMEOUT};
use crate::commands::Queue;
use crate::config::{QueueType, Settings};
use crate::error::{Error, Result};

/// How to give an existing heartbeat queue the current arguments (logged when they differ).
pub const HEARTBEAT_QUEUE_UPGRADE: &str = "to upgrade it, stop the workers, delete the queue \
     (`rabbitmqctl delete_queue <name>`; the heartbeats in it are lost, which is harmless) and start \
     them again: the first one declares it anew";

/// How to give a command exchange declared by an earlier version its alternate exchange (logged when it lacks one).
pub const COMMAND_EXCHANGE_UPGRADE: &str = "to give it one while running, set a policy \
     (`rabbitmqctl set_policy --apply-to exchanges acm-unroutable '^<name>$' '{\"alternate-exchange\":\"<ae>\"}'`); \
     or stop the workers, delete the exchange and start them: the first declares it anew";

/// Whether the broker refused a declaration because the object exists with other arguments (406).
pub fn is_precondition_failed(e: &lapin::Error) -> bool {
    matches!(
        e.kind(),
        lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == 406
    )
}

/// The names derived from `amqp.prefix` (and, for the heartbeat shards, `amqp.heartbeat_shards`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// Topic exchange for commands and heartbeats.
    pub command_exchange: String,
    /// Topic exchange for events.
    pub event_exchange: String,
    /// Durable queue of heartbeats (with one shard, the only heartbeat queue).
    pub heartbeat_queue: String,
    /// Consistent-hash exchange spreading heartbeats over the shard queues (declared only with several shards).
    pub heartbeat_exchange: String,
    /// Heartbeat queues: 1 is the single `heartbeat_queue`; more are `<prefix>.heartbeats.<i>` behind
    /// `heartbeat_exchange`.
    pub heartbeat_shards: u32,
    /// Durable (quorum by default) queue of commands.
    pub command_queue: String,
    /// Fanout exchange and durable queue of poison messages.
    pub dead_letter: String,
    /// Fanout exchange (the command exchange's `alternate-exchange`) and durable queue (of the command queue's type)
    /// of what no binding of the command exchange matched; the worker dead-letters each as `unroutable`.
    pub unroutable: String,
    /// Durable classic queue of agents' log lines (`agent.log`).
    pub log_queue: String,
}

impl Topology {
    /// Names for a prefix, with one heartbeat queue.
    pub fn new(prefix: &str) -> Self {
        Self {
            command_exchange: format!("{prefix}.commands"),
            event_exchange: format!("{prefix}.events"),
            heartbeat_queue: format!("{prefix}.heartbeats"),
            heartbeat_exchange: format!("{prefix}.heartbeat-shards"),
            heartbeat_shards: 1,
            command_queue: format!("{prefix}.commands"),
            dead_letter: format!("{prefix}.dead-letter"),
            unroutable: format!("{prefix}.unroutable"),
            log_queue: format!("{prefix}.logs"),
        }
    }

    /// Names for `amqp.prefix` with `amqp.heartbeat_shards` heartbeat queues.
    pub fn for_settings(settings: &Settings) -> Self {
        Self { heartbeat_shards: settings.amqp.heartbeat_shards.max(1), ..Self::new(&settings.amqp.prefix) }
    }

    /// The name of heartbeat shard `i` (`<prefix>.heartbeats.<i>`).
    pub fn heartbeat_shard(&self, i: u32) -> String {
        format!("{}.{i}", self.heartbeat_queue)
    }

    /// Every queue heartbeats are consumed from: the single heartbeat queue, or each shard.
    pub fn heartbeat_queues(&self) -> Vec<String> {
        if self.heartbeat_shards <= 1 {
            vec![self.heartbeat_queue.clone()]
        } else {
            (0..self.heartbeat_shards).map(|i| self.heartbeat_shard(i)).collect()
        }
    }

    /// Declares every exchange, queue and binding; idempotent, so a fresh broker needs no setup.
    ///
    /// A heartbeat queue keeps a heartbeat at most `sweeper.connection_stale_after_secs` (`x-message-ttl`): one
    /// that waited longer is dropped by the broker (not dead-lettered: a lost heartbeat is harmless), so it cannot
    /// make an agent that was silent for a whole stale window look alive. A heartbeat queue declared earlier with
    /// other arguments (an older version, or another stale window) is used as it is, with a warning saying how to
    /// upgrade it (see [`HEARTBEAT_QUEUE_UPGRADE`]). With several shards, see `shards.rs`.
    pub async fn declare(&self, conn: &Connection, settings: &Settings) -> Result<()> {
        let ch = conn.create_channel().await?;
        let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
        let durable_q = QueueDeclareOptions { durable: true, ..Default::default() };
        ch.exchange_declare(self.unroutable.as_str().into(), ExchangeKind::Fanout, durable, FieldTable::default())
            .await?;
        // Of the command queue's type: a quorum queue survives the loss of a cluster node, where a classic one would
        // stop every worker from re-declaring the topology until its node is back.
        let mut unroutable_args = FieldTable::default();
        if settings.amqp.command_queue_type == QueueType::Quorum {
            unroutable_args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
        }
        ch.queue_declare(self.unroutable.as_str().into(), durable_q, unroutable_args).await?;
        ch.queue_bind(
            self.unroutable.as_str().into(),
            self.unroutable.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        self.declare_command_exchange(conn).await?;
        ch.exchange_declare(self.event_exchange.as_str().into(), ExchangeKind::Topic, durable, FieldTable::default())
            .await?;
        ch.exchange_declare(self.dead_letter.as_str().into(), ExchangeKind::Fanout, durable, FieldTable::default())
            .await?;
        ch.queue_declare(self.dead_letter.as_str().into(), durable_q, FieldTable::default()).await?;
        ch.queue_bind(
            self.dead_letter.as_str().into(),
            self.dead_letter.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;

        if self.heartbeat_shards <= 1 {
            self.declare_heartbeat_queue(conn, &self.heartbeat_queue, settings).await?;
            self.bind(&ch, Queue::Heartbeats).await?;
        } else {
            self.declare_shards(conn, &ch, settings).await?;
        }

        let amqp = &settings.amqp;
        let mut cmd_args = FieldTable::default();
        cmd_args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(self.dead_letter.as_str().into()));
        if amqp.command_queue_type == QueueType::Quorum {
            cmd_args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
            cmd_args.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongLongInt(i64::from(amqp.command_delivery_limit.get())),
            );
        }
        ch.queue_declare(self.command_queue.as_str().into(), durable_q, cmd_args).await?;
        self.bind(&ch, Queue::Commands).await?;
        // Log lines wait in a queue of their own, dead-lettered like commands when poison, and of the command queue's
        // type: a classic queue whose node is lost would stop every worker from re-declaring the topology.
        let mut log_args = FieldTable::default();
        log_args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(self.dead_letter.as_str().into()));
        if amqp.command_queue_type == QueueType::Quorum {
            log_args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
        }
        ch.queue_declare(self.log_queue.as_str().into(), durable_q, log_args).await?;
        self.bind(&ch, Queue::Logs).await?;
        let _ = ch.close(200, "topology declared".into()).await;
        Ok(())
    }

    /// Declares the command exchange with `alternate-exchange` = [`Topology::unroutable`], so that nothing published
    /// to it vanishes. An exchange declared by an earlier version (without the argument, which cannot change) is used
    /// as it is, with a warning saying how to give it one without downtime: a policy.
    async fn declare_command_exchange(&self, conn: &Connection) -> Result<()> {
        let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
        let mut args = FieldTable::default();
        args.insert("alternate-exchange".into(), AMQPValue::LongString(self.unroutable.as_str().into()));
        // A failed declaration closes its channel, so it gets one of its own.
        let ch = conn.create_channel().await?;
        match ch.exchange_declare(self.command_exchange.as_str().into(), ExchangeKind::Topic, durable, args).await {
            Ok(()) => {
                let _ = ch.close(200, "declared".into()).await;
                Ok(())
            }
            Err(e) if is_precondition_failed(&e) => {
                tracing::warn!(
                    exchange = %self.command_exchange,
                    "the command exchange exists without an alternate exchange, so messages no binding matches are \
                     dropped by the broker instead of dead-lettered as unroutable; {}",
                    COMMAND_EXCHANGE_UPGRADE.replace("<name>", &self.command_exchange).replace("<ae>", &self.unroutable)
                );
                let check = conn.create_channel().await?;
                let passive = ExchangeDeclareOptions { passive: true, ..durable };
                check
                    .exchange_declare(
                        self.command_exchange.as_str().into(),
                        ExchangeKind::Topic,
                        passive,
                        FieldTable::default(),
                    )
                    .await?;
                let _ = check.close(200, "checked".into()).await;
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The name of a queue of the registry (for heartbeats, the single heartbeat queue; see
    /// [`Topology::heartbeat_queues`]).
    pub fn queue_name(&self, queue: Queue) -> &str {
        match queue {
            Queue::Heartbeats => &self.heartbeat_queue,
            Queue::Commands => &self.command_queue,
            Queue::Logs => &self.log_queue,
        }
    }

    /// Binds a queue to the command exchange with its [`binding_keys`]; for the command queue, then removes the
    /// family keys of earlier versions ([`legacy_command_keys`]; removing a binding that is not there is no error),
    /// after the exact keys are in place so that no known type is unroutable in between.
    async fn bind(&self, ch: &Channel, queue: Queue) -> Result<()> {
        let (queue_name, exchange) = (self.queue_name(queue), self.command_exchange.as_str());
        for key in binding_keys(queue) {
            let options = QueueBindOptions::default();
            ch.queue_bind(queue_name.into(), exchange.into(), key.as_str().into(), options, FieldTable::default())
                .await?;
        }
        if queue == Queue::Commands {
            for key in legacy_command_keys() {
                ch.queue_unbind(queue_name.into(), exchange.into(), key.as_str().into(), FieldTable::default()).await?;
            }
        }
        Ok(())
    }

    /// A heartbeat queue's arguments: a heartbeat lives at most the stale window; a quorum queue when configured.
    pub fn heartbeat_queue_arguments(settings: &Settings) -> FieldTable {
        let mut args = FieldTable::default();
        if settings.amqp.heartbeat_queue_type == QueueType::Quorum {
            args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
        }
        let ttl_ms = settings.sweeper.connection_stale_after_secs.get().saturating_mul(1000);
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl_ms.min(i64::MAX as u64) as i64));
        args
    }

    /// Declares one heartbeat queue (the single one or a shard) with [`Topology::heartbeat_queue_arguments`], using
    /// one declared earlier with other arguments as it is.
    pub(super) async fn declare_heartbeat_queue(
        &self,
        conn: &Connection,
        name: &str,
        settings: &Settings,
    ) -> Result<()> {
        let durable_q = QueueDeclareOptions { durable: true, ..Default::default() };
        // A failed declaration closes its channel, so it gets one of its own.
        let ch = conn.create_channel().await?;
        match ch.queue_declare(name.into(), durable_q, Self::heartbeat_queue_arguments(settings)).await {
            Ok(_) => {
                let _ = ch.close(200, "declared".into()).await;
                Ok(())
            }
            Err(e) if is_precondition_failed(&e) => {
                tracing::warn!(
                    queue = %name,
                    ttl_secs = settings.sweeper.connection_stale_after_secs,
                    "the heartbeat queue exists with other arguments, so heartbeats that waited longer than the \
                     stale window are still applied; {}",
                    HEARTBEAT_QUEUE_UPGRADE.replace("<name>", name)
                );
                let check = conn.create_channel().await?;
                check
                    .queue_declare(
                        name.into(),
                        QueueDeclareOptions { passive: true, ..durable_q },
                        FieldTable::default(),
                    )
                    .await?;
                let _ = check.close(200, "checked".into()).await;
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Whether a queue exists (a passive declaration on a channel of its own, which a 404 closes).
    pub(super) async fn queue_exists(conn: &Connection, name: &str) -> Result<bool> {
        let ch = conn.create_channel().await?;
        let passive = QueueDeclareOptions { passive: true, durable: true, ..Default::default() };
        match ch.queue_declare(name.into(), passive, FieldTable::default()).await {
            Ok(_) => {
                let _ = ch.close(200, "checked".into()).await;
                Ok(true)
            }
            Err(e) if matches!(e.kind(), lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == 404) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes every exchange and queue, the heartbeat shards and their exchange included (tests and teardown).
    pub async fn delete(&self, ch: &Channel) -> Result<()> {
        let mut queues = self.heartbeat_queues();
        queues.extend([
            self.command_queue.clone(),
            self.dead_letter.clone(),
            self.unroutable.clone(),
            self.log_queue.clone(),
        ]);
        for q in &queues {
            ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()).await?;
        }
        let mut exchanges = vec![&self.command_exchange, &self.event_exchange, &self.dead_letter, &self.unroutable];
        if self.heartbeat_shards > 1 {
            exchanges.push(&self.heartbeat_exchange);
        }
        for x in exchanges {
            ch.exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default()).await?;
        }
        Ok(())
    }

    /// Messages ready in the heartbeat queues, all shards together (how far behind the workers are). Answers within
    /// [`BROKER_QUERY_TIMEOUT`] or fails: while the broker blocks the connection nothing can be asked.
    pub async fn heartbeat_backlog(&self, ch: &Channel) -> Result<u64> {
        let mut total = 0u64;
        for queue in self.heartbeat_queues() {
            let declare = ch.queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions { passive: true, durable: true, ..Default::default() },
                FieldTable::default(),
            );
            let q = tokio::time::timeout(BROKER_QUERY_TIMEOUT, declare).await.map_err(|_| {
                Error::Timeout(format!("no answer within {BROKER_QUERY_TIMEOUT:?} for the heartbeat backlog"))
            })??;
            total += u64::from(q.message_count());
        }
        Ok(total)
    }
}
