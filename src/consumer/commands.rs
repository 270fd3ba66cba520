//! The command consumer: each command applied in a task of its order key, at most `worker.command_lanes` at once,
//! replying (with confirms), then acknowledging.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::BasicCancelOptions;
use lapin::Channel;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::dead_letter::{reject, reply};
use super::{ack, authorize, consume, prop, Shared};
use crate::commands::{body_digest, execute, Command, Meta, Queue};
use crate::error::{CommandError, Error, Poison, Result};
use crate::metrics::TypeLabel;
use crate::retry::retry_transient;
use crate::trace_context::{self, TraceContext};

/// A delivery and what parsing made of it.
type Job = (Delivery, std::result::Result<Command, Poison>);

/// The order keys that have a task, each with the commands received behind the one its task is applying.
#[derive(Default)]
struct Keys(Mutex<HashMap<String, VecDeque<Job>>>);

impl Keys {
    /// Queues `job` behind its key's task and returns `None`, or, when the key has no task, claims the key and
    /// returns `job` for a new task to start with.
    fn enqueue(&self, key: &str, job: Job) -> Option<Job> {
        let mut keys = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match keys.get_mut(key) {
            Some(behind) => {
                behind.push_back(job);
                None
            }
            None => {
                keys.insert(key.to_string(), VecDeque::new());
                Some(job)
            }
        }
    }

    /// The next job of `key`'s task, or `None` after giving up the key when nothing is left behind.
    fn next(&self, key: &str) -> Option<Job> {
        let mut keys = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let next = keys.get_mut(key).and_then(VecDeque::pop_front);
        if next.is_none() {
            keys.remove(key);
        }
        next
    }
}

/// Consumes the command queue until shutdown. Commands with the same order key (the object they change) are applied
/// one after another in the order this worker received them, by one task of that key; commands with different keys
/// are applied concurrently, at most `worker.command_lanes` at once, so that a command waits only for its own
/// object's earlier commands and a free lane, never behind another object's.
pub async fn commands(shared: Arc<Shared>, channel: Channel, shutdown: CancellationToken) -> Result<()> {
    let s = &shared.settings;
    let mut consumer = consume(&shared, &channel, Queue::Commands).await?;
    let lanes = Arc::new(Semaphore::new(s.worker.command_lanes.get()));
    let keys = Arc::new(Keys::default());
    let mut set = JoinSet::new();
    let result = loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break Ok(()),
            Some(done) = set.join_next() => match done {
                Ok(Ok(())) => {}
                Ok(Err(e)) => break Err(e),
                Err(e) => break Err(Error::TaskFailed(format!("a command task: {e}"))),
            },
            d = consumer.next() => match d {
                Some(Ok(d)) => {
                    let parsed = Command::parse(&d.data, s.amqp.max_message_bytes.get());
                    // Poison has no order to keep: each gets a key of its own (no order key starts with NUL).
                    let key = match &parsed {
                        Ok(cmd) => cmd.order_key(),
                        Err(_) => format!("\0{}", d.delivery_tag),
                    };
                    if let Some(job) = keys.enqueue(&key, (d, parsed)) {
                        let (shared, keys, lanes, shutdown) =
                            (shared.clone(), keys.clone(), lanes.clone(), shutdown.clone());
                        set.spawn(async move { key_task(&shared, key, job, &keys, &lanes, &shutdown).await });
                    }
                }
                Some(Err(e)) => break Err(e.into()),
                None => break Err(Error::Disconnected("command consumer ended".into())),
            }
        }
    };
    // Stop taking deliveries, then let every task finish (apply, reply, acknowledge) what its key holds; only then
    // close the channel.
    let _ = channel.basic_cancel(consumer.tag(), BasicCancelOptions::default()).await;
    let mut first_err = result.err();
    while let Some(done) = set.join_next().await {
        let r = done.unwrap_or_else(|e| Err(Error::TaskFailed(format!("a command task: {e}"))));
        if let (Err(e), None) = (r, &first_err) {
            first_err = Some(e);
        }
    }
    let _ = channel.close(200, "consumer stopped".into()).await;
    first_err.map_or(Ok(()), Err)
}

/// Applies `first`, then whatever was received for the same key meanwhile, in order, each in a lane; ends (and
/// gives up the key) when nothing is left behind it.
async fn key_task(
    shared: &Shared,
    key: String,
    first: Job,
    keys: &Keys,
    lanes: &Semaphore,
    shutdown: &CancellationToken,
) -> Result<()> {
    let mut job = first;
    loop {
        let lane = lanes.acquire().await.map_err(|_| Error::Shutdown)?;
        let (d, parsed) = job;
        // Boxed: a task waiting for a lane holds only a pointer, not room for a whole command's state (up to
        // `amqp.prefetch` tasks can wait).
        // Applying it continues the trace of its `traceparent` header (a new trace without one): its reply and the
        // events it writes carry that trace.
        let trace = TraceContext::from_headers(d.properties.headers().as_ref());
        let ty = parsed.as_ref().map_or("unknown", |c| c.type_name());
        let mut span = shared.tracer.process_span(ty, &trace);
        if span.is_recording() {
            span.set_text("messaging.destination.name", shared.topology.queue_name(Queue::Commands));
            span.set_text("messaging.rabbitmq.destination.routing_key", d.routing_key.as_str());
            if let Some(id) = d.properties.message_id() {
                span.set_text("messaging.message.id", id.as_str());
            }
        }
        let log_span = tracing::info_span!("command", trace_id = %trace.trace_id_hex());
        let applied = trace_context::scope(trace, Box::pin(command(shared, &d, parsed, shutdown)));
        match tracing::Instrument::instrument(applied, log_span).await {
            Err(Error::Shutdown) => return Ok(()),
            Err(e) => {
                span.set_error(&e.to_string());
                return Err(e);
            }
            Ok(()) => {}
        }
        drop(span);
        drop(lane);
        match keys.next(&key) {
            Some(next) => job = next,
            None => return Ok(()),
        }
    }
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
    let took = started.elapsed().as_secs_f64();
    shared.metrics.db_transaction_seconds.observe(took);
    shared.metrics.command_seconds.get_or_create(&TypeLabel { r#type: ty.into() }).observe(took);
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
                    if let (CommandError::Limit(_), Some(limit)) = (e, crate::commands::limits::Limit::of(ty)) {
                        shared.metrics.limit_refusal(limit.name());
                    }
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
