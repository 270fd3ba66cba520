//! RabbitMQ: connecting, the topology (exchanges, queues and bindings, derived from the message registry), and
//! confirmed publishing.

use std::time::Duration;

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

use crate::commands::{Queue, REGISTRY};
use crate::config::{QueueType, Settings};
use crate::error::{Error, Result};

/// Routing key of heartbeats (their message type).
pub const HEARTBEAT_ROUTING_KEY: &str = <crate::commands::heartbeat::Heartbeat as crate::commands::Message>::TYPE;

/// The binding keys of a queue: the exact type of each message consumed there, or for the command queue one
/// `<first segment>.#` per family of types (`session.#`, `connection.#`, ...), so that a message whose routing key
/// names no known type still reaches the worker and is dead-lettered with a reason instead of vanishing.
pub fn binding_keys(queue: Queue) -> Vec<String> {
    let mut keys: Vec<String> = Vec::new();
    for e in REGISTRY.iter().filter(|e| e.queue == queue) {
        let key = match queue {
            Queue::Heartbeats => e.type_name.to_string(),
            Queue::Commands => format!("{}.#", e.type_name.split('.').next().unwrap_or(e.type_name)),
        };
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    keys
}
/// Longest wait for the broker's answer to a query (the heartbeat backlog) or to closing a connection.
pub const BROKER_QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// How to give an existing heartbeat queue the current arguments (logged when they differ).
pub const HEARTBEAT_QUEUE_UPGRADE: &str = "to upgrade it, stop the workers, delete the queue \
     (`rabbitmqctl delete_queue <prefix>.heartbeats`; the heartbeats in it are lost, which is harmless) and start \
     them again: the first one declares it anew";

/// Whether the broker refused a declaration because the object exists with other arguments (406).
pub fn is_precondition_failed(e: &lapin::Error) -> bool {
    matches!(
        e.kind(),
        lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == 406
    )
}

/// Header naming why a message was dead-lettered.
pub const ERROR_HEADER: &str = "x-acm-error";

/// The names derived from `amqp.prefix`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// Topic exchange for commands and heartbeats.
    pub command_exchange: String,
    /// Topic exchange for events.
    pub event_exchange: String,
    /// Durable queue of heartbeats.
    pub heartbeat_queue: String,
    /// Durable (quorum by default) queue of commands.
    pub command_queue: String,
    /// Fanout exchange and durable queue of poison messages.
    pub dead_letter: String,
}

impl Topology {
    /// Names for a prefix.
    pub fn new(prefix: &str) -> Self {
        Self {
            command_exchange: format!("{prefix}.commands"),
            event_exchange: format!("{prefix}.events"),
            heartbeat_queue: format!("{prefix}.heartbeats"),
            command_queue: format!("{prefix}.commands"),
            dead_letter: format!("{prefix}.dead-letter"),
        }
    }

    /// Declares every exchange, queue and binding; idempotent, so a fresh broker needs no setup.
    ///
    /// The heartbeat queue keeps a heartbeat at most `sweeper.connection_stale_after_secs` (`x-message-ttl`): one
    /// that waited longer is dropped by the broker (not dead-lettered: a lost heartbeat is harmless), so it cannot
    /// make an agent that was silent for a whole stale window look alive. A heartbeat queue declared earlier with
    /// other arguments (an older version, or another stale window) is used as it is, with a warning saying how to
    /// upgrade it (see [`HEARTBEAT_QUEUE_UPGRADE`]).
    pub async fn declare(&self, conn: &Connection, settings: &Settings) -> Result<()> {
        let ch = conn.create_channel().await?;
        let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
        ch.exchange_declare(self.command_exchange.as_str().into(), ExchangeKind::Topic, durable, FieldTable::default())
            .await?;
        ch.exchange_declare(self.event_exchange.as_str().into(), ExchangeKind::Topic, durable, FieldTable::default())
            .await?;
        ch.exchange_declare(self.dead_letter.as_str().into(), ExchangeKind::Fanout, durable, FieldTable::default())
            .await?;
        let durable_q = QueueDeclareOptions { durable: true, ..Default::default() };
        ch.queue_declare(self.dead_letter.as_str().into(), durable_q, FieldTable::default()).await?;
        ch.queue_bind(
            self.dead_letter.as_str().into(),
            self.dead_letter.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;

        self.declare_heartbeat_queue(conn, settings).await?;
        self.bind(&ch, Queue::Heartbeats).await?;

        let amqp = &settings.amqp;
        let mut cmd_args = FieldTable::default();
        cmd_args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(self.dead_letter.as_str().into()));
        if amqp.command_queue_type == QueueType::Quorum {
            cmd_args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
            cmd_args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(amqp.command_delivery_limit as i64));
        }
        ch.queue_declare(self.command_queue.as_str().into(), durable_q, cmd_args).await?;
        self.bind(&ch, Queue::Commands).await?;
        let _ = ch.close(200, "topology declared".into()).await;
        Ok(())
    }

    /// The name of a queue of the registry.
    pub fn queue_name(&self, queue: Queue) -> &str {
        match queue {
            Queue::Heartbeats => &self.heartbeat_queue,
            Queue::Commands => &self.command_queue,
        }
    }

    /// Binds a queue to the command exchange with its [`binding_keys`].
    async fn bind(&self, ch: &Channel, queue: Queue) -> Result<()> {
        for key in binding_keys(queue) {
            ch.queue_bind(
                self.queue_name(queue).into(),
                self.command_exchange.as_str().into(),
                key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        }
        Ok(())
    }

    /// The heartbeat queue's arguments: a heartbeat lives at most the stale window; a quorum queue when configured.
    pub fn heartbeat_queue_arguments(settings: &Settings) -> FieldTable {
        let mut args = FieldTable::default();
        if settings.amqp.heartbeat_queue_type == QueueType::Quorum {
            args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
        }
        let ttl_ms = settings.sweeper.connection_stale_after_secs.saturating_mul(1000);
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl_ms.min(i64::MAX as u64) as i64));
        args
    }

    async fn declare_heartbeat_queue(&self, conn: &Connection, settings: &Settings) -> Result<()> {
        let durable_q = QueueDeclareOptions { durable: true, ..Default::default() };
        // A failed declaration closes its channel, so it gets one of its own.
        let ch = conn.create_channel().await?;
        match ch
            .queue_declare(self.heartbeat_queue.as_str().into(), durable_q, Self::heartbeat_queue_arguments(settings))
            .await
        {
            Ok(_) => {
                let _ = ch.close(200, "declared".into()).await;
                Ok(())
            }
            Err(e) if is_precondition_failed(&e) => {
                tracing::warn!(
                    queue = %self.heartbeat_queue,
                    ttl_secs = settings.sweeper.connection_stale_after_secs,
                    "the heartbeat queue exists with other arguments, so heartbeats that waited longer than the \
                     stale window are still applied; {HEARTBEAT_QUEUE_UPGRADE}"
                );
                let check = conn.create_channel().await?;
                check
                    .queue_declare(
                        self.heartbeat_queue.as_str().into(),
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

    /// Deletes every exchange and queue (tests and teardown).
    pub async fn delete(&self, ch: &Channel) -> Result<()> {
        for q in [&self.heartbeat_queue, &self.command_queue, &self.dead_letter] {
            ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()).await?;
        }
        for x in [&self.command_exchange, &self.event_exchange, &self.dead_letter] {
            ch.exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default()).await?;
        }
        Ok(())
    }

    /// Messages ready in the heartbeat queue (how far behind the worker is). Answers within
    /// [`BROKER_QUERY_TIMEOUT`] or fails: while the broker blocks the connection nothing can be asked.
    pub async fn heartbeat_backlog(&self, ch: &Channel) -> Result<u64> {
        let declare = ch.queue_declare(
            self.heartbeat_queue.as_str().into(),
            QueueDeclareOptions { passive: true, durable: true, ..Default::default() },
            FieldTable::default(),
        );
        let q = tokio::time::timeout(BROKER_QUERY_TIMEOUT, declare).await.map_err(|_| {
            Error::Timeout(format!("no answer within {BROKER_QUERY_TIMEOUT:?} for the heartbeat backlog"))
        })??;
        Ok(u64::from(q.message_count()))
    }
}

/// Longest wait for one broker node to accept a connection.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The broker URLs of `amqp.url`: one URL, or a cluster's nodes separated by commas.
pub fn broker_urls(urls: &str) -> Vec<&str> {
    urls.split(',').map(str::trim).filter(|u| !u.is_empty()).collect()
}

/// Connects to the broker (`amqp://` or `amqps://`; several URLs separated by commas are tried in order until one
/// answers), naming the connection for the management UI.
pub async fn connect(urls: &str, name: &str) -> Result<Connection> {
    connect_from(urls, 0, name).await.map(|(conn, _)| conn)
}

/// Connects to the first of `urls` that answers, trying them in order from the one at `start` (wrapping around), each
/// for at most [`CONNECT_TIMEOUT`]; returns the connection and the index of the URL that answered. When none does,
/// the last failure is the error.
pub async fn connect_from(urls: &str, start: usize, name: &str) -> Result<(Connection, usize)> {
    let list = broker_urls(urls);
    let mut last = Error::Disconnected("no broker URL is configured".into());
    for step in 0..list.len() {
        let i = (start + step) % list.len();
        let props = ConnectionProperties::default().with_connection_name(name.into());
        match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(list[i], props)).await {
            Ok(Ok(conn)) => return Ok((conn, i)),
            Ok(Err(e)) => last = e.into(),
            Err(_) => last = Error::Timeout(format!("connecting to broker node {} of {}", i + 1, list.len())),
        }
        if list.len() > 1 {
            tracing::warn!(node = i + 1, nodes = list.len(), error = %last, "broker node did not answer; trying the next");
        }
    }
    Err(last)
}

/// Opens a channel in publisher-confirm mode.
pub async fn confirm_channel(conn: &Connection) -> Result<Channel> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok(ch)
}

/// Publishes and waits for the broker's confirm, for at most `timeout` in all (handing the message to the channel
/// included: while the broker blocks publishers nothing can be written). A nack is an error, and so is no confirm
/// in time ([`Error::Timeout`]): either way the message counts as not published, and the caller retries (a later
/// confirm may still make it a duplicate, which receivers tolerate by `message_id`).
pub async fn publish_confirmed(
    ch: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    props: BasicProperties,
    timeout: Duration,
) -> Result<()> {
    let publish = async {
        ch.basic_publish(exchange.into(), routing_key.into(), BasicPublishOptions::default(), body, props).await?.await
    };
    let confirm = tokio::time::timeout(timeout, publish).await.map_err(|_| {
        Error::Timeout(format!("no confirm within {timeout:?} for a publish to {exchange}/{routing_key}"))
    })??;
    if confirm.is_nack() {
        return Err(Error::Nack(format!("{exchange}/{routing_key}")));
    }
    Ok(())
}

/// Properties of a persistent JSON message.
pub fn json_properties() -> BasicProperties {
    BasicProperties::default().with_content_type("application/json".into()).with_delivery_mode(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_list_is_split_on_commas() {
        assert_eq!(broker_urls("amqp://a"), vec!["amqp://a"]);
        assert_eq!(broker_urls("amqp://a, amqp://b,,amqp://c "), vec!["amqp://a", "amqp://b", "amqp://c"]);
    }

    #[test]
    fn bindings_come_from_the_registry() {
        assert_eq!(binding_keys(Queue::Heartbeats), vec!["agent.heartbeat"]);
        assert_eq!(binding_keys(Queue::Commands), vec!["session.#", "connection.#", "instruction.#", "stats.#"]);
    }
}
