//! A reliable publisher for the test's side of the workload: publisher confirms, every message not confirmed (nack,
//! channel or connection lost, no answer in time) is published again, and a lost connection is re-established with
//! backoff — so whatever the worker loses is the worker's fault, not the client's.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use agent_connection_manager::amqp;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::Confirmation;
use lapin::{BasicProperties, Channel, Connection};

/// One message to publish to the command exchange.
#[derive(Debug, Clone)]
pub struct Msg {
    pub routing_key: String,
    pub body: Vec<u8>,
    pub message_id: Option<String>,
    /// A heartbeat's agent, sent in the header the heartbeat shards hash on (as the clients do).
    pub agent: Option<String>,
}

impl Msg {
    /// A JSON message routed by its `type`.
    pub fn json(body: &serde_json::Value, message_id: Option<String>) -> Self {
        let routing_key = body["type"].as_str().unwrap_or_default().to_string();
        Self { routing_key, body: body.to_string().into_bytes(), message_id, agent: None }
    }

    /// Raw bytes with an explicit routing key.
    pub fn raw(routing_key: &str, body: Vec<u8>, message_id: Option<String>) -> Self {
        Self { routing_key: routing_key.to_string(), body, message_id, agent: None }
    }
}

/// Publishes to one exchange, reconnecting as often as needed.
pub struct ReliablePublisher {
    url: String,
    exchange: String,
    conn: Option<(Connection, Channel)>,
    window: usize,
    /// Publications repeated because the first was not confirmed.
    pub republished: u64,
    /// Connections made after the first.
    pub reconnects: u64,
    /// When set, every message asks for a reply there, with its `message_id` as `correlation_id`.
    pub reply_to: Option<String>,
    connects: u64,
}

/// How long the publisher keeps trying without any message confirmed before it fails the test.
const STALL_LIMIT: Duration = Duration::from_secs(240);

impl ReliablePublisher {
    pub fn new(url: &str, exchange: &str) -> Self {
        Self {
            url: url.to_string(),
            exchange: exchange.to_string(),
            conn: None,
            window: 2000,
            republished: 0,
            reconnects: 0,
            reply_to: None,
            connects: 0,
        }
    }

    async fn channel(&mut self) -> Result<Channel, String> {
        if let Some((conn, ch)) = &self.conn {
            if conn.status().connected() && ch.status().connected() {
                return Ok(ch.clone());
            }
        }
        self.drop_connection().await;
        let conn = tokio::time::timeout(Duration::from_secs(10), amqp::connect(&self.url, "acm faults publisher"))
            .await
            .map_err(|_| "connect timed out".to_string())?
            .map_err(|e| e.to_string())?;
        // Bounded like the connect: on a connection the broker reset while it was being set up, lapin may never
        // answer.
        let ch = tokio::time::timeout(Duration::from_secs(10), conn.create_channel())
            .await
            .map_err(|_| "channel creation timed out".to_string())?
            .map_err(|e| e.to_string())?;
        tokio::time::timeout(Duration::from_secs(10), ch.confirm_select(ConfirmSelectOptions::default()))
            .await
            .map_err(|_| "confirm.select timed out".to_string())?
            .map_err(|e| e.to_string())?;
        if self.connects > 0 {
            self.reconnects += 1;
        }
        self.connects += 1;
        self.conn = Some((conn, ch.clone()));
        Ok(ch)
    }

    async fn drop_connection(&mut self) {
        if let Some((conn, _)) = self.conn.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), conn.close(200, "reconnecting".into())).await;
        }
    }

    /// Publishes every message and returns once each is confirmed by the broker. Messages are published in order;
    /// one that must be published again may overtake later ones of the same call (callers put ordering barriers
    /// between calls). `progress` counts first-time confirmations.
    pub async fn publish_all(&mut self, msgs: &[Msg], progress: &AtomicU64) {
        let mut start = 0;
        while start < msgs.len() {
            let end = (start + self.window).min(msgs.len());
            let mut todo: Vec<usize> = (start..end).collect();
            let mut first = true;
            let mut last_progress = Instant::now();
            let mut backoff = Duration::from_millis(100);
            while !todo.is_empty() {
                let before = todo.len();
                let (left, err, attempted) = self.try_publish(msgs, &todo).await;
                if !first {
                    self.republished += attempted;
                }
                if attempted > 0 {
                    first = false;
                }
                let confirmed = before - left.len();
                progress.fetch_add(confirmed as u64, Ordering::Relaxed);
                todo = left;
                if confirmed > 0 {
                    last_progress = Instant::now();
                    backoff = Duration::from_millis(100);
                }
                if !todo.is_empty() {
                    assert!(
                        last_progress.elapsed() < STALL_LIMIT,
                        "publisher: nothing confirmed for {STALL_LIMIT:?}; last error: {err:?}"
                    );
                    if err.is_some() {
                        self.drop_connection().await;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
            start = end;
        }
    }

    /// Publishes `todo` once; returns the ones not confirmed, the error seen (if any) and how many were handed to
    /// the broker.
    async fn try_publish(&mut self, msgs: &[Msg], todo: &[usize]) -> (Vec<usize>, Option<String>, u64) {
        let ch = match self.channel().await {
            Ok(ch) => ch,
            Err(e) => return (todo.to_vec(), Some(e), 0),
        };
        let mut pending = Vec::with_capacity(todo.len());
        let mut failed = Vec::new();
        let mut error = None;
        for (k, &i) in todo.iter().enumerate() {
            let m = &msgs[i];
            let mut props =
                BasicProperties::default().with_content_type("application/json".into()).with_delivery_mode(2);
            // Persistent even for heartbeats (unlike the clients): the suite counts every heartbeat, also across a
            // restart of a single node.
            if let Some(agent) = &m.agent {
                let mut headers = FieldTable::default();
                headers.insert(amqp::AGENT_HEADER.into(), AMQPValue::LongString(agent.as_str().into()));
                props = props.with_headers(headers);
            }
            if let Some(id) = &m.message_id {
                props = props.with_message_id(ShortString::from(id.clone()));
                if let Some(r) = &self.reply_to {
                    props = props.with_reply_to(ShortString::from(r.clone())).with_correlation_id(id.as_str().into());
                }
            }
            let publish = ch.basic_publish(
                self.exchange.as_str().into(),
                m.routing_key.as_str().into(),
                BasicPublishOptions::default(),
                &m.body,
                props,
            );
            match tokio::time::timeout(Duration::from_secs(10), publish).await {
                Ok(Ok(confirm)) => pending.push((i, confirm)),
                Ok(Err(e)) => {
                    error = Some(e.to_string());
                    failed.extend_from_slice(&todo[k..]);
                    break;
                }
                Err(_) => {
                    error = Some("publish timed out".into());
                    failed.extend_from_slice(&todo[k..]);
                    break;
                }
            }
        }
        let attempted = pending.len() as u64;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        for (i, confirm) in pending {
            match tokio::time::timeout_at(deadline, confirm).await {
                Ok(Ok(Confirmation::Ack(_))) => {}
                Ok(Ok(other)) => {
                    error.get_or_insert_with(|| format!("not confirmed: {other:?}"));
                    failed.push(i);
                }
                Ok(Err(e)) => {
                    error.get_or_insert_with(|| e.to_string());
                    failed.push(i);
                }
                Err(_) => {
                    error.get_or_insert_with(|| "no confirm within 30 s".into());
                    failed.push(i);
                }
            }
        }
        failed.sort_unstable();
        (failed, error, attempted)
    }

    /// Closes the connection.
    pub async fn close(mut self) {
        self.drop_connection().await;
    }
}
