//! The log consumer: deliveries of `<prefix>.logs` drained into batches of up to `logs.batch_messages`, each
//! applied in one transaction and acknowledged (one `multiple` acknowledgement) after its commit.
//!
//! One batch at a time: log lines are not latency-bound like heartbeats, and one batch in flight keeps the ingest
//! lock's queue short. The prefetch is twice the batch, so the next batch is delivered while one commits.

use std::sync::Arc;
use std::time::Instant;

use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::BasicCancelOptions;
use lapin::Channel;
use tokio_util::sync::CancellationToken;

use super::dead_letter::reject;
use super::{ack, admit, consume_queue, Shared};
use crate::commands::log::{apply_batch, AgentLog, LogReport};
use crate::commands::Queue;
use crate::error::{CommandError, Error, Result};
use crate::retry::retry_transient;

/// Consumes `<prefix>.logs` on `channel` until shutdown, applying deliveries in batches.
pub async fn logs(shared: Arc<Shared>, channel: Channel, shutdown: CancellationToken) -> Result<()> {
    let max = shared.settings.logs.batch_messages.max(1);
    let prefetch = u16::try_from(max * 2).unwrap_or(u16::MAX);
    let mut consumer = consume_queue(&channel, &shared.topology.log_queue, prefetch).await?;
    let tag = consumer.tag();
    let mut outcome = Ok(());
    loop {
        let first = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            first = consumer.next() => first,
        };
        let mut batch = Vec::with_capacity(max);
        let mut next = first;
        loop {
            match next {
                Some(Ok(d)) => batch.push(d),
                Some(Err(e)) => outcome = Err(e.into()),
                None => outcome = Err(Error::Disconnected("log consumer ended".into())),
            }
            if outcome.is_err() || batch.len() >= max {
                break;
            }
            match consumer.next().now_or_never() {
                Some(item) => next = item,
                None => break,
            }
        }
        if outcome.is_err() {
            break;
        }
        match log_batch(&shared, &batch, &shutdown).await {
            Ok(()) => {
                if let Some(last) = batch.last() {
                    if let Err(e) = ack(last, true).await {
                        outcome = Err(e);
                        break;
                    }
                }
            }
            Err(Error::Shutdown) => break,
            Err(e) => {
                outcome = Err(e);
                break;
            }
        }
    }
    let _ = channel.basic_cancel(tag, BasicCancelOptions::default()).await;
    let _ = channel.close(200, "consumer stopped".into()).await;
    outcome
}

/// Parses, authorizes and applies one batch; poison is dead-lettered on the way.
async fn log_batch(shared: &Shared, batch: &[Delivery], shutdown: &CancellationToken) -> Result<()> {
    // The admitted messages, and the index of each one's delivery in `batch`.
    let (mut msgs, mut at): (Vec<AgentLog>, Vec<usize>) = (Vec::with_capacity(batch.len()), Vec::new());
    for (i, d) in batch.iter().enumerate() {
        if let Some(m) = admit::<AgentLog>(shared, d, Queue::Logs, "agent.log").await? {
            msgs.push(m);
            at.push(i);
        }
    }
    if msgs.is_empty() {
        return Ok(());
    }
    let started = Instant::now();
    match retry_transient("applying agent logs", shutdown, || apply_batch(&shared.pool, &msgs)).await {
        Ok(report) => count(shared, &report),
        Err(e) if e.poison_reason().is_some() => {
            // A value the database refuses (the entry checks should leave none): each message alone, so that only the
            // refused ones are dead-lettered.
            for (i, m) in at.iter().zip(msgs.chunks(1)) {
                match retry_transient("applying an agent log", shutdown, || apply_batch(&shared.pool, m)).await {
                    Ok(report) => count(shared, &report),
                    Err(e) => match e.poison_reason() {
                        Some(why) => {
                            reject(shared, &batch[*i], "agent.log", &why, CommandError::Invalid(why.to_string()))
                                .await?
                        }
                        None => return Err(e),
                    },
                }
            }
        }
        Err(e) => return Err(e),
    }
    shared.metrics.db_transaction_seconds.observe(started.elapsed().as_secs_f64());
    Ok(())
}

/// Counts a batch's messages and left-out entries.
fn count(shared: &Shared, r: &LogReport) {
    for _ in 0..r.received.saturating_sub(r.rejected) {
        shared.metrics.message("agent.log", "ok");
    }
    for _ in 0..r.rejected {
        shared.metrics.message("agent.log", "rejected");
    }
    for _ in 0..r.invalid_entries {
        shared.metrics.message("agent.log.entry", "invalid");
    }
}
