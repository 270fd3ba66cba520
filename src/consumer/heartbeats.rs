//! The heartbeat consumer: deliveries of every heartbeat queue (one, or each shard) drained into batches, applied in
//! up to `worker.heartbeat_pipeline` transactions at once, acknowledged in order after their commits.

use std::sync::Arc;
use std::time::Instant;

use futures_util::stream::{self, BoxStream, FuturesOrdered};
use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::BasicCancelOptions;
use lapin::Channel;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::dead_letter::reject;
use super::{ack, admit, consume_queue, Shared};
use crate::commands::heartbeat::{apply_batch_isolating, apply_batch_then, Heartbeat, Rules};
use crate::commands::Queue;
use crate::error::{CommandError, Error, Poison, PoisonKind, Result};
use crate::retry::retry_transient;
use crate::trace_context::{self, TraceContext};

/// A delivery of shard `.0`, or `None` once that shard's consumer ended.
type ShardItem = (usize, Option<lapin::Result<Delivery>>);

/// A [`ShardItem`] with when it arrived and its number ([`crate::sweeper::catch_up::Progress::receive`]).
type Stamped = (ShardItem, Instant, u64);

/// A finished batch: the deliveries to acknowledge, the number of its last delivery, and its outcome.
type Finished = (Vec<Delivery>, u64, Result<()>);

/// Unacknowledged deliveries each shard's consumer may hold: `amqp.prefetch` shared out, so that all shards together
/// hold about `amqp.prefetch` (at most one more per shard), whatever their number.
pub fn shard_prefetch(prefetch: u16, shards: usize) -> u16 {
    let shards = shards.max(1) as u32;
    u32::from(prefetch).div_ceil(shards).max(1) as u16
}

/// Consumes the heartbeat queues (one channel each, given in [`crate::amqp::Topology::heartbeat_queues`]'s order)
/// until shutdown, applying deliveries in batches.
///
/// Deliveries of all shards are merged into one stream; one shard's deliveries keep their order in it, so one
/// agent's heartbeats (which stay in one shard) are applied in order. Up to `worker.heartbeat_pipeline` batches are
/// in flight at once, each in its own task and transaction: the next batch starts once the previous one has done its
/// statements (and holds its row locks), so its work overlaps the previous commit while a row both touch is still
/// written in delivery order. Batches are acknowledged in the order they were taken, after their commit, with one
/// `multiple` acknowledgement per shard channel the batch drew from (delivery tags are per channel, so it
/// acknowledges exactly that shard's deliveries up to it); nothing after a failed batch is acknowledged.
pub async fn heartbeats(shared: Arc<Shared>, channels: Vec<Channel>, shutdown: CancellationToken) -> Result<()> {
    let s = &shared.settings;
    let queues = shared.topology.heartbeat_queues();
    let prefetch = shard_prefetch(s.amqp.prefetch.get(), queues.len());
    let mut streams: Vec<BoxStream<'static, ShardItem>> = Vec::with_capacity(queues.len());
    let mut tags = Vec::with_capacity(queues.len());
    for (i, (channel, queue)) in channels.iter().zip(&queues).enumerate() {
        let consumer = consume_queue(channel, queue, prefetch).await?;
        tags.push(consumer.tag());
        streams.push(consumer.map(Some).chain(stream::once(async { None })).map(move |d| (i, d)).boxed());
    }
    let mut merged = stream::select_all(streams);
    // Deliveries are stamped as they arrive, by a task that only forwards them, so the time a heartbeat then waits
    // (for its turn in the pipeline, for the database) counts against its freshness.
    let progress = shared.progress.clone();
    progress.restarted();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Stamped>();
    let forward = tokio::spawn(async move {
        loop {
            let item = merged.next().await;
            let end = !matches!(item, Some((_, Some(Ok(_)))));
            let stamped = (item.unwrap_or((0, None)), Instant::now(), progress.receive());
            if tx.send(stamped).is_err() || end {
                return;
            }
        }
    });
    let _forward = AbortOnDrop(forward);
    let mut consumer = stream::poll_fn(move |cx| rx.poll_recv(cx));
    let depth = s.worker.heartbeat_pipeline.get();
    let max = batch_limit(s.worker.heartbeat_batch_size.get(), depth, s.amqp.prefetch.get());
    let mut in_flight: FuturesOrdered<tokio::task::JoinHandle<Finished>> = FuturesOrdered::new();
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
                if let Err(e) = finish_batch(&shared, done).await {
                    acking = false;
                    if !matches!(e, Error::Shutdown) {
                        outcome = Err(e);
                    }
                    break;
                }
            }
            first = consumer.next(), if in_flight.len() < depth && applying.is_none() => {
                let first = match delivery(first) {
                    Ok(d) => d,
                    Err(e) => {
                        outcome = Err(e);
                        break;
                    }
                };
                let mut batch = vec![first];
                while batch.len() < max {
                    match consumer.next().now_or_never() {
                        Some(item) => match delivery(item) {
                            Ok(d) => batch.push(d),
                            Err(e) => {
                                outcome = Err(e);
                                break;
                            }
                        },
                        None => break,
                    }
                }
                if outcome.is_err() {
                    break;
                }
                let (shared, token) = (shared.clone(), shutdown.clone());
                let (applied, rx) = oneshot::channel();
                applying = Some(rx);
                in_flight.push_back(tokio::spawn(async move {
                    let last = batch.last().map_or(0, |d| d.3);
                    let (mut shards, mut deliveries, mut received) = (Vec::new(), Vec::new(), Vec::new());
                    for (i, d, at, _) in batch {
                        shards.push(i);
                        deliveries.push(d);
                        received.push(at);
                    }
                    // A batch is a trace of its own: the events it writes (connections opened or restored) carry it.
                    // Its span links to the context each heartbeat was sent with.
                    let trace = TraceContext::new_trace();
                    let mut span = shared.tracer.process_span("heartbeats", &trace);
                    if span.is_recording() {
                        span.set_int("messaging.batch.message_count", deliveries.len() as i64);
                        for d in &deliveries {
                            if let Some(sent) = TraceContext::sent_with(d.properties.headers().as_ref()) {
                                span.add_link(&sent);
                            }
                        }
                    }
                    let batch = heartbeat_batch(&shared, &deliveries, &received, &token, applied);
                    let r = trace_context::scope(trace, batch).await;
                    if let Err(e) = &r {
                        span.set_error(&e.to_string());
                    }
                    drop(span);
                    (last_per_shard(&shards, deliveries), last, r)
                }));
            }
        }
    }
    // Batches already taken finish (or give up at shutdown) and are acknowledged in order, up to the first failure.
    while let Some(done) = in_flight.next().await {
        if !acking {
            continue;
        }
        if let Err(e) = finish_batch(&shared, done).await {
            acking = false;
            if outcome.is_ok() && !matches!(e, Error::Shutdown) {
                outcome = Err(e);
            }
        }
    }
    for (channel, tag) in channels.iter().zip(tags) {
        let _ = channel.basic_cancel(tag, BasicCancelOptions::default()).await;
        let _ = channel.close(200, "consumer stopped".into()).await;
    }
    outcome
}

/// Aborts the forwarding task when the consumer ends, whichever way.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The most deliveries one batch takes: `worker.heartbeat_batch_size`, but no more than a share of the prefetch that
/// leaves one more batch's worth unacknowledged beside the `depth` batches in flight.
///
/// With a backlog, the broker sends only `amqp.prefetch` unacknowledged deliveries. Were the batches in flight to
/// hold all of them, the next batch would start with the few deliveries that arrived since the oldest batch was
/// acknowledged; with room for `depth + 1` batches, the next one is already delivered when it may start, so the
/// pipeline keeps full batches.
pub(crate) fn batch_limit(batch_size: usize, depth: usize, prefetch: u16) -> usize {
    batch_size.min(usize::from(prefetch) / (depth + 1)).max(1)
}

/// A delivery of the merged stream with its shard, arrival time and number, or why the stream cannot go on.
fn delivery(item: Option<Stamped>) -> Result<(usize, Delivery, Instant, u64)> {
    let Some((item, at, seq)) = item else {
        return Err(Error::Disconnected("heartbeat consumer ended".into()));
    };
    match item {
        (i, Some(Ok(d))) => Ok((i, d, at, seq)),
        (_, Some(Err(e))) => Err(e.into()),
        (i, None) => Err(Error::Disconnected(format!("heartbeat consumer of shard {i} ended"))),
    }
}

/// The last delivery of each shard in a batch: acknowledging it with `multiple` acknowledges that shard's part.
fn last_per_shard(shards: &[usize], deliveries: Vec<Delivery>) -> Vec<Delivery> {
    let mut seen = Vec::new();
    let mut lasts = Vec::new();
    for (i, d) in shards.iter().rev().zip(deliveries.into_iter().rev()) {
        if !seen.contains(i) {
            seen.push(*i);
            lasts.push(d);
        }
    }
    lasts
}

/// Acknowledges a finished batch (on each shard's channel, all deliveries up to its last) after its commit and
/// reports it settled, or passes its failure on.
async fn finish_batch(shared: &Shared, done: std::result::Result<Finished, tokio::task::JoinError>) -> Result<()> {
    match done {
        Ok((lasts, seq, Ok(()))) => {
            for last in &lasts {
                ack(last, true).await?;
            }
            shared.progress.settle(seq);
            Ok(())
        }
        Ok((_, _, Err(e))) => Err(e),
        Err(e) => Err(Error::TaskFailed(format!("a heartbeat batch: {e}"))),
    }
}

async fn heartbeat_batch(
    shared: &Shared,
    batch: &[Delivery],
    received: &[Instant],
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
        if let Some(mut h) = admit::<Heartbeat>(shared, d, Queue::Heartbeats, "a heartbeat").await? {
            h.received = Some(received[i]);
            valid.push((i, h));
        }
    }
    if valid.is_empty() {
        return Ok(());
    }
    let hbs: Vec<Heartbeat> = valid.iter().map(|(_, h)| h.clone()).collect();
    let started = Instant::now();
    let rules = Rules::from(&**s);
    let attempts = std::sync::atomic::AtomicU32::new(0);
    let result = retry_transient("applying heartbeats", shutdown, || {
        attempts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        apply_batch_then(&shared.pool, &hbs, &rules, signal)
    })
    .await;
    if attempts.into_inner() > 1 {
        // The database was unreachable: the stale sweep treats that as a pause of this worker.
        shared.progress.paused();
    }
    let (report, refused) = match result {
        Ok(report) => (report, Vec::new()),
        Err(e) if e.poison_reason().is_some() => {
            // A value in the batch is one the database refuses: apply the batch again in one transaction with a
            // savepoint per heartbeat, so that only the refused ones are left out; they are dead-lettered once the
            // rest is committed.
            retry_transient("applying heartbeats with a savepoint each", shutdown, || {
                apply_batch_isolating(&shared.pool, &hbs, &rules, signal)
            })
            .await?
        }
        Err(e) => return Err(e),
    };
    shared.metrics.db_transaction_seconds.observe(started.elapsed().as_secs_f64());
    if report.opened + report.restored > 0 {
        // The batch opened or restored connections: its commit wrote their events.
        shared.outbox.committed();
    }
    let limited: Vec<usize> = valid
        .iter()
        .filter(|(_, h)| {
            report.limited.iter().any(|(c, a)| *c == h.connection_id.as_str() && *a == h.agent_id.as_str())
        })
        .map(|(i, _)| *i)
        .collect();
    let ok = report.received.saturating_sub(report.rejected + report.late + limited.len() + refused.len());
    for _ in 0..ok {
        shared.metrics.message("agent.heartbeat", "ok");
    }
    for _ in 0..report.rejected {
        shared.metrics.message("agent.heartbeat", "rejected");
    }
    for _ in 0..report.late {
        shared.metrics.message("agent.heartbeat", "late");
    }
    for i in limited {
        let why = Poison::new(
            PoisonKind::Limit,
            format!(
                "limit: agent has {} active connections (limits.max_connections_per_agent)",
                s.limits.max_connections_per_agent
            ),
        );
        shared.metrics.limit_refusal("connections");
        reject(shared, &batch[i], "agent.heartbeat", &why, CommandError::Limit(why.to_string())).await?;
    }
    for (n, why) in refused {
        reject(shared, &batch[valid[n].0], "agent.heartbeat", &why, CommandError::Invalid(why.to_string())).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{batch_limit, shard_prefetch};

    #[test]
    fn the_prefetch_is_shared_out_over_the_shards() {
        assert_eq!(shard_prefetch(2000, 1), 2000);
        assert_eq!(shard_prefetch(2000, 4), 500);
        assert_eq!(shard_prefetch(2000, 3), 667);
        assert_eq!(shard_prefetch(2, 64), 1);
    }

    #[test]
    fn batches_leave_one_more_batch_of_the_prefetch_delivered() {
        assert_eq!(batch_limit(1000, 2, 2000), 666);
        assert_eq!(batch_limit(500, 2, 2000), 500);
        assert_eq!(batch_limit(1000, 1, 2000), 1000);
        assert_eq!(batch_limit(10, 4, 1), 1);
    }
}
