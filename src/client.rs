//! A typed client for agents and backends written in Rust: publish heartbeats and commands, await replies,
//! subscribe to events, without hand-writing AMQP plumbing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, Consumer};
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::amqp::{self, json_properties, publish_confirmed, Topology, HEARTBEAT_ROUTING_KEY};
use crate::commands::log_get::{LogLine, Logs};
use crate::error::{CommandError, Error, Result};
use crate::events::Event;

type Pending = Arc<Mutex<HashMap<String, oneshot::Sender<Value>>>>;

/// A connection to the worker's exchanges.
pub struct Client {
    conn: Connection,
    channel: Channel,
    topology: Topology,
    reply_queue: String,
    pending: Pending,
    dispatcher: JoinHandle<()>,
    user_id: Option<String>,
    confirm_timeout: std::time::Duration,
}

/// An error reply of the worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyError {
    /// `invalid`, `not_found`, `conflict` or `forbidden`.
    pub code: String,
    /// What was wrong.
    pub message: String,
}

/// Splits a reply into its result or its error.
pub fn reply_result(reply: &Value) -> std::result::Result<Value, ReplyError> {
    if reply["ok"] == Value::Bool(true) {
        Ok(reply["result"].clone())
    } else {
        Err(ReplyError {
            code: reply["error"]["code"].as_str().unwrap_or_default().to_string(),
            message: reply["error"]["message"].as_str().unwrap_or_default().to_string(),
        })
    }
}

impl Client {
    /// Connects to the broker and opens a private reply queue.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self> {
        let conn = amqp::connect(url, "agent-connection-manager client").await?;
        let channel = amqp::confirm_channel(&conn).await?;
        let reply_channel = conn.create_channel().await?;
        let q = reply_channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() },
                FieldTable::default(),
            )
            .await?;
        let reply_queue = q.name().as_str().to_string();
        let mut consumer = reply_channel
            .basic_consume(
                reply_queue.as_str().into(),
                "".into(),
                BasicConsumeOptions { no_ack: true, ..Default::default() },
                FieldTable::default(),
            )
            .await?;
        let pending: Pending = Arc::default();
        let p = pending.clone();
        let dispatcher = tokio::spawn(async move {
            let _keep = reply_channel;
            while let Some(Ok(d)) = consumer.next().await {
                let Some(corr) = d.properties.correlation_id().as_ref().map(|c| c.as_str().to_string()) else {
                    continue;
                };
                let body: Value = serde_json::from_slice(&d.data).unwrap_or(Value::Null);
                let tx = p.lock().ok().and_then(|mut m| m.remove(&corr));
                if let Some(tx) = tx {
                    let _ = tx.send(body);
                }
            }
        });
        Ok(Self {
            conn,
            channel,
            topology: Topology::new(prefix),
            reply_queue,
            pending,
            dispatcher,
            user_id: None,
            confirm_timeout: crate::config::Settings::default().confirm_timeout(),
        })
    }

    /// Sets the AMQP `user_id` on every message from now on (the broker checks it is the connection's user; the
    /// worker, with `security.require_user_id`, that it is the message's `agent_id`).
    pub fn with_user_id(mut self, user_id: &str) -> Self {
        self.user_id = Some(user_id.to_string());
        self
    }

    /// How long a publish may wait for the broker's confirm (default `amqp.confirm_timeout_secs`'s default);
    /// then it fails with a timeout and counts as not published.
    pub fn with_confirm_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.confirm_timeout = timeout;
        self
    }

    /// The names this client publishes to.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Publishes raw bytes to the command exchange (confirmed by the broker).
    /// Inside a [`crate::trace_context::scope`], the message carries that context (`traceparent`, `tracestate`)
    /// unless `props` already has a `traceparent`.
    pub async fn publish_raw(&self, routing_key: &str, body: &[u8], mut props: BasicProperties) -> Result<()> {
        if let Some(u) = &self.user_id {
            props = props.with_user_id(ShortString::from(u.clone()));
        }
        if let Some(trace) = crate::trace_context::current() {
            let mut headers = props.headers().clone().unwrap_or_default();
            if !headers.inner().contains_key(crate::trace_context::TRACEPARENT) {
                trace.insert_into(&mut headers);
                props = props.with_headers(headers);
            }
        }
        let exchange = &self.topology.command_exchange;
        publish_confirmed(&self.channel, exchange, routing_key, body, props, self.confirm_timeout).await
    }

    /// Publishes a message without waiting for a reply; the routing key is its `type`.
    pub async fn send(&self, body: &Value, message_id: Option<&str>) -> Result<()> {
        let routing_key = body["type"].as_str().unwrap_or_default().to_string();
        let mut props = json_properties();
        if let Some(id) = message_id {
            props = props.with_message_id(ShortString::from(id.to_string()));
        }
        self.publish_raw(&routing_key, body.to_string().as_bytes(), props).await
    }

    /// Publishes a heartbeat: transient, with the agent in the header the heartbeat shards hash on
    /// ([`amqp::heartbeat_properties`]).
    pub async fn heartbeat(&self, agent_id: &str, session_id: &str, connection_id: &str) -> Result<()> {
        self.heartbeat_with(agent_id, session_id, connection_id, None).await
    }

    /// Publishes a heartbeat carrying `client_info` (when given), like [`Client::heartbeat`].
    pub async fn heartbeat_with(
        &self,
        agent_id: &str,
        session_id: &str,
        connection_id: &str,
        client_info: Option<Value>,
    ) -> Result<()> {
        let mut body = json!({
            "type": "agent.heartbeat",
            "agent_id": agent_id,
            "session_id": session_id,
            "connection_id": connection_id,
            "sent_at": chrono::Utc::now().to_rfc3339(),
        });
        if let Some(info) = client_info {
            body["client_info"] = info;
        }
        let props = amqp::heartbeat_properties(agent_id);
        self.publish_raw(HEARTBEAT_ROUTING_KEY, body.to_string().as_bytes(), props).await
    }

    /// Sends a command and waits for its reply (`{"ok": ..., ...}`). The `message_id` (generated when `None`)
    /// makes the command idempotent.
    pub async fn request(&self, body: &Value, message_id: Option<&str>, timeout: Duration) -> Result<Value> {
        let routing_key = body["type"].as_str().unwrap_or_default().to_string();
        self.request_raw(&routing_key, body.to_string().as_bytes(), message_id, timeout).await
    }

    /// Sends raw bytes as a command and waits for the reply.
    pub async fn request_raw(
        &self,
        routing_key: &str,
        body: &[u8],
        message_id: Option<&str>,
        timeout: Duration,
    ) -> Result<Value> {
        let correlation = Uuid::new_v4().to_string();
        let message_id = message_id.map(str::to_string).unwrap_or_else(|| Uuid::new_v4().to_string());
        let (tx, rx) = oneshot::channel();
        if let Ok(mut m) = self.pending.lock() {
            m.insert(correlation.clone(), tx);
        }
        let props = json_properties()
            .with_reply_to(ShortString::from(self.reply_queue.clone()))
            .with_correlation_id(ShortString::from(correlation.clone()))
            .with_message_id(ShortString::from(message_id));
        self.publish_raw(routing_key, body, props).await?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(v)) => Ok(v),
            _ => {
                if let Ok(mut m) = self.pending.lock() {
                    m.remove(&correlation);
                }
                Err(Error::Timeout(format!("no reply to {routing_key} within {timeout:?}")))
            }
        }
    }

    /// Publishes an agent's log lines (`agent.log`, persistent): `entries` are objects with `timestamp`, `level`,
    /// `logger_name` and `message`, up to 500 (docs/protocol.md, section 14).
    pub async fn log(&self, agent_id: &str, session_id: &str, entries: &[Value]) -> Result<()> {
        let body = json!({"type": "agent.log", "agent_id": agent_id, "session_id": session_id, "logs": entries});
        self.send(&body, None).await
    }

    /// Reads log lines with `logs.get` (`query` holds its fields: `agent_id`, `session_id`, `since_id`, `limit`,
    /// `min_level`); an error reply is a [`CommandError`] of its code.
    pub async fn get_logs(&self, query: &Value, timeout: Duration) -> Result<Vec<LogLine>> {
        let mut body = query.clone();
        body["type"] = json!("logs.get");
        let reply = self.request(&body, None, timeout).await?;
        match reply_result(&reply) {
            Ok(result) => Ok(serde_json::from_value::<Logs>(result)
                .map_err(|e| Error::Reply(format!("a logs.get reply that is not its schema: {e}")))?
                .logs),
            Err(e) => Err(Error::Command(match e.code.as_str() {
                "not_found" => CommandError::NotFound(e.message),
                "conflict" => CommandError::Conflict(e.message),
                "forbidden" => CommandError::Forbidden(e.message),
                _ => CommandError::Invalid(e.message),
            })),
        }
    }

    /// Subscribes to events whose routing key matches `binding` (`#` for all).
    pub async fn subscribe(&self, binding: &str) -> Result<Subscription> {
        let ch = self.conn.create_channel().await?;
        let q = ch
            .queue_declare(
                "".into(),
                QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() },
                FieldTable::default(),
            )
            .await?;
        ch.queue_bind(
            q.name().clone(),
            self.topology.event_exchange.as_str().into(),
            binding.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        let consumer = ch
            .basic_consume(
                q.name().clone(),
                "".into(),
                BasicConsumeOptions { no_ack: true, ..Default::default() },
                FieldTable::default(),
            )
            .await?;
        Ok(Subscription { _channel: ch, consumer })
    }

    /// Closes the connection.
    pub async fn close(self) {
        self.dispatcher.abort();
        let _ = self.conn.close(200, "bye".into()).await;
    }
}

/// Events from a subscription.
pub struct Subscription {
    _channel: Channel,
    consumer: Consumer,
}

impl Subscription {
    /// The next event, or `None` when none comes within `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Option<Event> {
        self.next_raw(timeout).await.and_then(|(_, v)| serde_json::from_value(v).ok())
    }

    /// The next event as the AMQP `message_id` and the raw JSON body.
    pub async fn next_raw(&mut self, timeout: Duration) -> Option<(Option<String>, Value)> {
        match tokio::time::timeout(timeout, self.consumer.next()).await {
            Ok(Some(Ok(d))) => {
                let id = d.properties.message_id().as_ref().map(|s| s.as_str().to_string());
                Some((id, serde_json::from_slice(&d.data).unwrap_or(Value::Null)))
            }
            _ => None,
        }
    }
}
