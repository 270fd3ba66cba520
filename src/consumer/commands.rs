//! The command consumer: deliveries spread over `worker.command_lanes` lanes by their order key, each lane applying
//! its commands one by one, replying (with confirms), then acknowledging.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Instant;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::BasicCancelOptions;
use lapin::Channel;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::dead_letter::{reject, reply};
use super::{ack, authorize, consume, prop, Shared};
use crate::commands::{body_digest, execute, Command, Meta, Queue};
use crate::error::{CommandError, Error, Poison, Result};
use crate::retry::retry_transient;

/// Consumes the command queue until shutdown. Commands run in `worker.command_lanes` lanes; a lane is chosen by
/// the command's order key (the object it changes), so commands on the same object are applied in the order this
/// worker received them.
pub async fn commands(shared: Arc<Shared>, channel: Channel, shutdown: CancellationToken) -> Result<()> {
    let s = &shared.settings;
    let mut consumer = consume(&shared, &channel, Queue::Commands).await?;
    let lanes = s.worker.command_lanes;
    let mut senders = Vec::with_capacity(lanes);
    let mut set = JoinSet::new();
    for _ in 0..lanes {
        let (tx, mut rx) =
            mpsc::channel::<(Delivery, std::result::Result<Command, Poison>)>(usize::from(s.amqp.prefetch));
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
    parsed: std::result::Result<Command, Poison>,
    shutdown: &CancellationToken,
) -> Result<()> {
    let s = &shared.settings;
    let cmd = match parsed {
        Ok(cmd) => cmd,
        Err(why) => {
            reject(shared, d, "unknown", &why, CommandError::Invalid(why.to_string())).await?;
            return ack(d, false).await;
        }
    };
    let ty = cmd.type_name();
    if let Some(why) = authorize(s, d, &cmd, Queue::Commands) {
        reject(shared, d, ty, &why, CommandError::Forbidden(why.to_string())).await?;
        return ack(d, false).await;
    }
    let meta = Meta {
        message_id: prop(d.properties.message_id()),
        user_id: prop(d.properties.user_id()),
        body_digest: Some(body_digest(&d.data)),
    };
    let started = Instant::now();
    let result = retry_transient(ty, shutdown, || execute(&shared.pool, s, &cmd, &meta)).await;
    shared.metrics.db_transaction_seconds.observe(started.elapsed().as_secs_f64());
    if result.is_ok() && !cmd.entry().read_only {
        // Committed, perhaps with events (a refusal or a duplicate writes none; a wake-up costs one look).
        shared.outbox.committed();
    }
    match result {
        Ok(outcome) => {
            match &outcome {
                Ok(_) => shared.metrics.message(ty, "ok"),
                Err(e) => {
                    tracing::warn!(message_id = ?meta.message_id, message_type = ty, code = e.code(), "command refused: {}", e.message());
                    shared.metrics.message(ty, "error");
                }
            }
            reply(shared, d, &outcome).await?;
        }
        Err(e) => match e.poison_reason() {
            Some(why) => reject(shared, d, ty, &why, CommandError::Invalid(why.to_string())).await?,
            None => return Err(e),
        },
    }
    ack(d, false).await
}
