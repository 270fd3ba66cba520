//! The two consumers: heartbeats (applied in batches) and commands (applied in lanes, replied to).
//!
//! Both acknowledge a delivery only after its effect is committed (and its reply confirmed by the broker); a
//! transient failure holds the delivery and retries with backoff, so the consumer stops taking work instead of
//! spinning; poison is dead-lettered with an `x-acm-error` header, then acknowledged. An acknowledgement the channel
//! refuses (lapin's `Ok(false)`: the channel was reset) ends the consumer so the worker reconnects; the broker
//! redelivers, and idempotency makes the redelivery harmless.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Instant;

use deadpool_postgres::Pool;
use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::amqp::{publish_confirmed, Topology, ERROR_HEADER};
use crate::commands::heartbeat::{apply_batch, apply_batch_then, Heartbeat};
use crate::commands::{execute, reply_json, Command, Meta, Outcome};
use crate::config::Settings;
use crate::error::{CommandError, Error, Result};
use crate::metrics::Metrics;
use crate::retry::retry_transient;

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

fn prop(p: &Option<lapin::types::ShortString>) -> Option<String> {
    p.as_ref().map(|s| s.as_str().to_string())
}

/// A short label for a poison reason (the metric's `reason`).
pub fn reason_label(reason: &str) -> &'static str {
    if reason.starts_with("too large") {
        "too_large"
    } else if reason.starts_with("not JSON") {
        "not_json"
    } else if reason.starts_with("not a JSON object") {
        "not_object"
    } else if reason.starts_with("unknown type") {
        "unknown_type"
    } else if reason.starts_with("forbidden") {
        "forbidden"
    } else if reason.starts_with("rejected by the database") {
        "database_rejected"
    } else if reason.contains("is not accepted on the heartbeat queue") {
        "wrong_queue"
    } else {
        "invalid_field"
    }
}

async fn ack(d: &Delivery, multiple: bool) -> Result<()> {
    if d.acker.ack(BasicAckOptions { multiple }).await? {
        Ok(())
    } else {
        Err(Error::Disconnected(format!(
            "acknowledgement of delivery {} refused: its channel was reset, the broker will redeliver",
            d.delivery_tag
        )))
    }
}

/// Publishes the reply to `reply_to` (if any) on the default exchange with the same `correlation_id`.
async fn reply(shared: &Shared, d: &Delivery, outcome: &Outcome) -> Result<()> {
    let Some(reply_to) = prop(d.properties.reply_to()) else {
        return Ok(());
    };
    let mut props = BasicProperties::default().with_content_type("application/json".into());
    if let Some(c) = d.properties.correlation_id() {
        props = props.with_correlation_id(c.clone());
    }
    let body = serde_json::to_vec(&reply_json(outcome)).unwrap_or_default();
    publish_confirmed(&shared.publisher, "", &reply_to, &body, props).await
}

/// Dead-letters a poison delivery with its reason, replies with `code` when asked to, and counts it.
async fn reject(shared: &Shared, d: &Delivery, ty: &str, reason: &str, error: CommandError) -> Result<()> {
    let label = reason_label(reason);
    let message_id = prop(d.properties.message_id());
    tracing::warn!(message_id = ?message_id, message_type = ty, reason = label, routing_key = %d.routing_key, "message dead-lettered: {reason}");
    let props = dead_letter_properties(d, reason);
    publish_confirmed(&shared.publisher, &shared.topology.dead_letter, d.routing_key.as_str(), &d.data, props).await?;
    reply(shared, d, &Err(error)).await?;
    shared.metrics.message(ty, "dead_lettered");
    shared.metrics.dead_letter(label);
    Ok(())
}

/// The dead letter's properties: the original's, with the reason and routing key as headers. The original
/// `user_id` moves to a header (the broker accepts a `user_id` only from that user's own connection) and
/// `expiration` is dropped (a dead letter is kept until someone reads it).
fn dead_letter_properties(d: &Delivery, reason: &str) -> BasicProperties {
    let p = &d.properties;
    let mut headers = p.headers().clone().unwrap_or_default();
    headers.insert(ERROR_HEADER.into(), AMQPValue::LongString(reason.into()));
    headers.insert("x-acm-routing-key".into(), AMQPValue::LongString(d.routing_key.as_str().into()));
    if let Some(u) = p.user_id() {
        headers.insert("x-acm-user-id".into(), AMQPValue::LongString(u.as_str().into()));
    }
    let mut out = BasicProperties::default().with_headers(headers).with_delivery_mode(2);
    if let Some(v) = p.content_type() {
        out = out.with_content_type(v.clone());
    }
    if let Some(v) = p.content_encoding() {
        out = out.with_content_encoding(v.clone());
    }
    if let Some(v) = p.correlation_id() {
        out = out.with_correlation_id(v.clone());
    }
    if let Some(v) = p.reply_to() {
        out = out.with_reply_to(v.clone());
    }
    if let Some(v) = p.message_id() {
        out = out.with_message_id(v.clone());
    }
    if let Some(v) = p.timestamp() {
        out = out.with_timestamp(*v);
    }
    if let Some(v) = p.app_id() {
        out = out.with_app_id(v.clone());
    }
    out
}

fn user_mismatch(settings: &Settings, d: &Delivery, agent: &str) -> Option<String> {
    if !settings.security.require_user_id {
        return None;
    }
    match prop(d.properties.user_id()) {
        Some(u) if u == agent => None,
        Some(_) => Some(format!("forbidden: user_id does not match agent_id {agent}")),
        None => Some(format!("forbidden: no user_id for agent_id {agent}")),
    }
}

/// Consumes the heartbeat queue until shutdown, applying deliveries in batches.
///
/// Up to `worker.heartbeat_pipeline` batches are in flight at once, each in its own task and transaction: the next
/// batch starts once the previous one has done its statements (and holds its row locks), so its work overlaps the
/// previous commit while a row both touch is still written in delivery order. Batches are acknowledged in the order
/// they were taken (one `multiple` acknowledgement each, after their commit), and nothing after a failed batch is
/// acknowledged.
pub async fn heartbeats(shared: Arc<Shared>, channel: Channel, shutdown: CancellationToken) -> Result<()> {
    let s = &shared.settings;
    channel.basic_qos(s.amqp.prefetch, BasicQosOptions::default()).await?;
    let mut consumer = channel
        .basic_consume(
            shared.topology.heartbeat_queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let max = s.worker.heartbeat_batch_size;
    let depth = s.worker.heartbeat_pipeline.max(1);
    let mut in_flight: FuturesOrdered<tokio::task::JoinHandle<(Delivery, Result<()>)>> = FuturesOrdered::new();
    let mut outcome = Ok(());
    // Cleared by the first batch that fails: acknowledging a later one (`multiple`) would acknowledge it too.
    let mut acking = true;
    // Resolves (or is dropped) once the newest batch has done its statements; the next batch starts only then.
    let mut applying: Option<oneshot::Receiver<()>> = None;
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = async { applying.as_mut().expect("checked").await }, if applying.is_some() => applying = None,
            done = in_flight.next(), if !in_flight.is_empty() => {
                let Some(done) = done else { continue };
                if let Err(e) = finish_batch(done).await {
                    acking = false;
                    if !matches!(e, Error::Shutdown) {
                        outcome = Err(e);
                    }
                    break;
                }
            }
            first = consumer.next(), if in_flight.len() < depth && applying.is_none() => {
                let first = match first {
                    Some(Ok(d)) => d,
                    Some(Err(e)) => {
                        outcome = Err(e.into());
                        break;
                    }
                    None => {
                        outcome = Err(Error::Disconnected("heartbeat consumer ended".into()));
                        break;
                    }
                };
                let mut batch = vec![first];
                while batch.len() < max {
                    match consumer.next().now_or_never() {
                        Some(Some(Ok(d))) => batch.push(d),
                        Some(Some(Err(e))) => {
                            outcome = Err(e.into());
                            break;
                        }
                        _ => break,
                    }
                }
                if outcome.is_err() {
                    break;
                }
                let (shared, token) = (shared.clone(), shutdown.clone());
                let (applied, rx) = oneshot::channel();
                applying = Some(rx);
                in_flight.push_back(tokio::spawn(async move {
                    let r = heartbeat_batch(&shared, &batch, &token, applied).await;
                    (batch.pop().expect("a batch is never empty"), r)
                }));
            }
        }
    }
    // Batches already taken finish (or give up at shutdown) and are acknowledged in order, up to the first failure.
    while let Some(done) = in_flight.next().await {
        if !acking {
            continue;
        }
        if let Err(e) = finish_batch(done).await {
            acking = false;
            if outcome.is_ok() && !matches!(e, Error::Shutdown) {
                outcome = Err(e);
            }
        }
    }
    let _ = channel.basic_cancel(consumer.tag(), BasicCancelOptions::default()).await;
    let _ = channel.close(200, "consumer stopped".into()).await;
    outcome
}

/// Acknowledges a finished batch (all deliveries up to its last) after its commit, or passes its failure on.
async fn finish_batch(done: std::result::Result<(Delivery, Result<()>), tokio::task::JoinError>) -> Result<()> {
    match done {
        Ok((last, Ok(()))) => ack(&last, true).await,
        Ok((_, Err(e))) => Err(e),
        Err(e) => Err(Error::Disconnected(format!("heartbeat batch task failed: {e}"))),
    }
}

async fn heartbeat_batch(
    shared: &Shared,
    batch: &[Delivery],
    shutdown: &CancellationToken,
    applied: oneshot::Sender<()>,
) -> Result<()> {
    // Dropped (so the consumer goes on) at the latest when this batch is finished, whatever the outcome.
    let applied = std::sync::Mutex::new(Some(applied));
    let signal = || {
        if let Some(s) = applied.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = s.send(());
        }
    };
    let s = &shared.settings;
    shared.metrics.heartbeat_batch_size.observe(batch.len() as f64);
    let mut valid: Vec<(usize, Heartbeat)> = Vec::with_capacity(batch.len());
    for (i, d) in batch.iter().enumerate() {
        match Command::parse(&d.data, s.amqp.max_message_bytes) {
            Ok(Command::Heartbeat(h)) => match user_mismatch(s, d, h.agent_id.as_str()) {
                Some(why) => reject(shared, d, "agent.heartbeat", &why, CommandError::Forbidden(why.clone())).await?,
                None => valid.push((i, h)),
            },
            Ok(other) => {
                let why = format!("type `{}` is not accepted on the heartbeat queue", other.type_name());
                reject(shared, d, other.type_name(), &why, CommandError::Invalid(why.clone())).await?
            }
            Err(why) => reject(shared, d, "unknown", &why, CommandError::Invalid(why.clone())).await?,
        }
    }
    if !valid.is_empty() {
        let hbs: Vec<Heartbeat> = valid.iter().map(|(_, h)| h.clone()).collect();
        let started = Instant::now();
        let result =
            retry_transient("applying heartbeats", shutdown, || apply_batch_then(&shared.pool, &hbs, signal)).await;
        match result {
            Ok(report) => {
                shared.metrics.db_transaction_seconds.observe(started.elapsed().as_secs_f64());
                let ok = report.received - report.rejected.min(report.received);
                for _ in 0..ok {
                    shared.metrics.message("agent.heartbeat", "ok");
                }
                for _ in 0..report.rejected {
                    shared.metrics.message("agent.heartbeat", "rejected");
                }
            }
            Err(e) if e.poison_reason().is_some() => {
                // One value in the batch is unstorable: apply one by one and dead-letter the culprits.
                for (i, h) in &valid {
                    let one = std::slice::from_ref(h);
                    match retry_transient("applying a heartbeat", shutdown, || apply_batch(&shared.pool, one)).await {
                        Ok(_) => shared.metrics.message("agent.heartbeat", "ok"),
                        Err(e) => match e.poison_reason() {
                            Some(why) => {
                                reject(shared, &batch[*i], "agent.heartbeat", &why, CommandError::Invalid(why.clone()))
                                    .await?
                            }
                            None => return Err(e),
                        },
                    }
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Consumes the command queue until shutdown. Commands run in `worker.command_lanes` lanes; a lane is chosen by
/// the command's session (or instruction/connection), so one session's commands keep their order.
pub async fn commands(shared: Arc<Shared>, channel: Channel, shutdown: CancellationToken) -> Result<()> {
    let s = &shared.settings;
    channel.basic_qos(s.amqp.prefetch, BasicQosOptions::default()).await?;
    let mut consumer = channel
        .basic_consume(
            shared.topology.command_queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let lanes = s.worker.command_lanes;
    let mut senders = Vec::with_capacity(lanes);
    let mut set = JoinSet::new();
    for _ in 0..lanes {
        let (tx, mut rx) =
            mpsc::channel::<(Delivery, std::result::Result<Command, String>)>(usize::from(s.amqp.prefetch));
        senders.push(tx);
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        set.spawn(async move {
            while let Some((d, parsed)) = rx.recv().await {
                match command(&shared, &d, parsed, &shutdown).await {
                    Err(Error::Shutdown) => return Ok(()),
                    other => other?,
                }
            }
            Ok::<(), Error>(())
        });
    }
    let result = loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break Ok(()),
            Some(done) = set.join_next() => {
                break Err(done.unwrap_or_else(|e| Err(Error::Disconnected(format!("command lane failed: {e}")))).err()
                    .unwrap_or_else(|| Error::Disconnected("command lane ended".into())));
            }
            d = consumer.next() => match d {
                Some(Ok(d)) => {
                    let parsed = Command::parse(&d.data, s.amqp.max_message_bytes);
                    // Poison has no order to keep: spread it over the lanes instead of queueing it behind one.
                    let key = parsed.as_ref().map(Command::order_key).unwrap_or_else(|_| d.delivery_tag.to_string());
                    let mut h = DefaultHasher::new();
                    key.hash(&mut h);
                    let lane = (h.finish() % lanes as u64) as usize;
                    if senders[lane].send((d, parsed)).await.is_err() {
                        break Err(Error::Disconnected("command lane closed".into()));
                    }
                }
                Some(Err(e)) => break Err(e.into()),
                None => break Err(Error::Disconnected("command consumer ended".into())),
            }
        }
    };
    // Stop taking deliveries, then let every lane finish (apply, reply, acknowledge) what it already holds; only
    // then close the channel.
    let _ = channel.basic_cancel(consumer.tag(), BasicCancelOptions::default()).await;
    drop(senders);
    let mut first_err = result.err();
    while let Some(done) = set.join_next().await {
        let r = done.unwrap_or_else(|e| Err(Error::Disconnected(format!("command lane failed: {e}"))));
        if let (Err(e), None) = (r, &first_err) {
            first_err = Some(e);
        }
    }
    let _ = channel.close(200, "consumer stopped".into()).await;
    first_err.map_or(Ok(()), Err)
}

async fn command(
    shared: &Shared,
    d: &Delivery,
    parsed: std::result::Result<Command, String>,
    shutdown: &CancellationToken,
) -> Result<()> {
    let s = &shared.settings;
    let cmd = match parsed {
        Ok(cmd) => cmd,
        Err(why) => {
            reject(shared, d, "unknown", &why, CommandError::Invalid(why.clone())).await?;
            return ack(d, false).await;
        }
    };
    let ty = cmd.type_name();
    if let Some(why) = cmd.claimed_agent().and_then(|a| user_mismatch(s, d, a.as_str())) {
        reject(shared, d, ty, &why, CommandError::Forbidden(why.clone())).await?;
        return ack(d, false).await;
    }
    let meta = Meta { message_id: prop(d.properties.message_id()), user_id: prop(d.properties.user_id()) };
    let started = Instant::now();
    let result = match &cmd {
        Command::Heartbeat(h) => {
            let one = std::slice::from_ref(h);
            retry_transient("applying a heartbeat", shutdown, || apply_batch(&shared.pool, one)).await.map(|r| {
                if r.rejected > 0 {
                    Err(CommandError::Conflict("heartbeat changed nothing".into()))
                } else {
                    Ok(Value::Null)
                }
            })
        }
        _ => retry_transient(ty, shutdown, || execute(&shared.pool, s, &cmd, &meta)).await,
    };
    shared.metrics.db_transaction_seconds.observe(started.elapsed().as_secs_f64());
    match result {
        Ok(Err(CommandError::Unauthorized(why))) => {
            let why = format!("forbidden: {why}");
            reject(shared, d, ty, &why, CommandError::Forbidden(why.clone())).await?;
        }
        Ok(outcome) => {
            match &outcome {
                Ok(_) => shared.metrics.message(ty, "ok"),
                Err(e) => {
                    tracing::warn!(message_id = ?meta.message_id, message_type = ty, code = e.code(), "command refused: {}", e.message());
                    shared.metrics.message(ty, "error");
                }
            }
            if !matches!(cmd, Command::Heartbeat(_)) {
                reply(shared, d, &outcome).await?;
            }
        }
        Err(e) => match e.poison_reason() {
            Some(why) => reject(shared, d, ty, &why, CommandError::Invalid(why.clone())).await?,
            None => return Err(e),
        },
    }
    ack(d, false).await
}
