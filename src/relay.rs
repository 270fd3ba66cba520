//! The outbox relay: publishes committed events with publisher confirms and marks them published.
//!
//! A batch is claimed with `FOR UPDATE SKIP LOCKED` in a transaction that stays open while the batch is published
//! and confirmed, then marked and committed. Other batches and relays skip the locked rows, so several relays (and
//! the several batches one relay keeps in flight) never publish one row twice; only a crash between the broker's confirm and the commit republishes (same `event_id`). The relay
//! wakes on `NOTIFY acm_outbox` (sent by a trigger when events commit) and also polls.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::Channel;
use tokio::sync::{oneshot, Notify};
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::amqp::json_properties;
use crate::config::DatabaseSettings;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::retry::Backoff;

/// Claims up to $1 unpublished events, skipping those another relay holds.
pub const CLAIM: &str = "SELECT id, event_id, event_type, payload::text FROM event_outbox WHERE published_at IS NULL \
     ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED";
const MARK: &str = "UPDATE event_outbox SET published_at = now() WHERE id = ANY($1) AND published_at IS NULL";

/// Publishes one batch; returns how many events were published and confirmed.
pub async fn relay_once(
    pool: &Pool,
    channel: &Channel,
    exchange: &str,
    batch: i64,
    metrics: &Metrics,
) -> Result<usize> {
    relay_batch(pool, channel, exchange, batch, metrics, None).await
}

/// Claims, publishes and marks one batch. `published` learns how many events were claimed once they are all
/// handed to the channel (0 when there were none), while the confirms are still outstanding.
async fn relay_batch(
    pool: &Pool,
    channel: &Channel,
    exchange: &str,
    batch: i64,
    metrics: &Metrics,
    published: Option<oneshot::Sender<usize>>,
) -> Result<usize> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let rows = tx.query(CLAIM, &[&batch]).await?;
    if rows.is_empty() {
        if let Some(p) = published {
            let _ = p.send(0);
        }
        return Ok(0);
    }
    let started = Instant::now();
    let mut ids = Vec::with_capacity(rows.len());
    let mut messages = Vec::with_capacity(rows.len());
    for row in rows {
        ids.push(row.get::<_, i64>(0));
        let event_id: Uuid = row.get(1);
        let event_type: String = row.get(2);
        // The stored JSON as PostgreSQL prints it: the body as is, without parsing and printing it again.
        let body: String = row.get(3);
        messages.push((event_id, event_type, body.into_bytes()));
    }
    let mut confirms = Vec::with_capacity(messages.len());
    for (event_id, event_type, body) in messages {
        let props = json_properties().with_message_id(ShortString::from(event_id.to_string()));
        let confirm = channel
            .basic_publish(exchange.into(), event_type.as_str().into(), BasicPublishOptions::default(), &body, props)
            .await?;
        confirms.push((event_id, event_type, confirm));
    }
    if let Some(p) = published {
        let _ = p.send(ids.len());
    }
    for (event_id, event_type, confirm) in confirms {
        if confirm.await?.is_nack() {
            return Err(Error::Nack(format!("{exchange}/{event_type} (event {event_id})")));
        }
        tracing::debug!(event_id = %event_id, event_type = %event_type, "event published");
    }
    metrics.publish_confirm_seconds.observe(started.elapsed().as_secs_f64());
    tx.execute(MARK, &[&ids]).await?;
    tx.commit().await?;
    metrics.events_published.inc_by(ids.len() as u64);
    Ok(ids.len())
}

/// Unpublished events and the age of the oldest, in seconds.
pub async fn backlog(pool: &Pool) -> Result<(i64, f64)> {
    let client = pool.get().await?;
    let row = client
        .query_one("SELECT count(*), min(created_at), now() FROM event_outbox WHERE published_at IS NULL", &[])
        .await?;
    let oldest: Option<DateTime<Utc>> = row.get(1);
    let now: DateTime<Utc> = row.get(2);
    let age = oldest.map(|o| (now - o).num_milliseconds() as f64 / 1000.0).unwrap_or(0.0);
    Ok((row.get(0), age))
}

/// What the relay needs.
pub struct RelayConfig {
    /// Database pool.
    pub pool: Pool,
    /// A channel in confirm mode.
    pub channel: Channel,
    /// The event exchange.
    pub exchange: String,
    /// Events per transaction.
    pub batch: i64,
    /// Batches in flight at once (claimed and published one after another, confirmed and marked concurrently).
    pub pipeline: usize,
    /// Poll interval when no notification comes.
    pub poll: Duration,
    /// Woken by the outbox listener.
    pub wake: Arc<Notify>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Stops the relay (after a final flush of at most 5 seconds).
    pub shutdown: CancellationToken,
}

/// Runs the relay until shutdown, then flushes what is left for at most 5 seconds.
///
/// Up to `pipeline` batches are in flight: the next batch is claimed (skipping the rows the previous ones hold)
/// and published as soon as the previous one is handed to the channel, while the broker confirms it. Claims and
/// publishes stay in outbox order on the one channel; commits may finish in any order. After a failure no new
/// batch starts until those in flight have finished; their rows stay unpublished and are claimed again.
pub async fn run(cfg: RelayConfig) -> Result<()> {
    let RelayConfig { pool, channel, exchange, batch, pipeline, poll, wake, metrics, shutdown } = cfg;
    let depth = pipeline.max(1);
    let mut backoff = Backoff::default();
    let mut in_flight = FuturesUnordered::new();
    let mut failure: Option<Error> = None;
    // Whether the last claim came back full, so more may be waiting.
    let mut more = true;
    loop {
        if more && failure.is_none() && in_flight.len() < depth && !shutdown.is_cancelled() {
            let (tx, mut rx) = oneshot::channel();
            in_flight.push(relay_batch(&pool, &channel, &exchange, batch, &metrics, Some(tx)));
            // Drive every batch in flight until this one has claimed and published.
            let claimed = loop {
                tokio::select! {
                    r = &mut rx => break r.unwrap_or(0),
                    Some(done) = in_flight.next() => {
                        if let Err(e) = done {
                            failure.get_or_insert(e);
                        }
                    }
                }
            };
            more = claimed as i64 == batch;
            continue;
        }
        if let Some(done) = in_flight.next().await {
            match done {
                Ok(_) => backoff = Backoff::default(),
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
            continue;
        }
        // Nothing in flight.
        match failure.take() {
            Some(e @ (Error::Pool(_) | Error::Db(_))) => {
                tracing::warn!(error = %e, "outbox relay: database unavailable; retrying");
                if !backoff.wait(&shutdown).await {
                    break;
                }
                more = true;
                continue;
            }
            Some(e) => return Err(e),
            None => {}
        }
        if shutdown.is_cancelled() {
            break;
        }
        if !more {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = wake.notified() => {}
                _ = tokio::time::sleep(poll) => {}
            }
        }
        more = true;
    }
    // Flush: publish what the stopped consumers committed.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        match relay_once(&pool, &channel, &exchange, batch, &metrics).await {
            Ok(n) if n as i64 == batch => continue,
            Ok(_) => break,
            Err(e) => {
                tracing::warn!(error = %e, "outbox relay: flush at shutdown failed; events stay in the outbox");
                break;
            }
        }
    }
    Ok(())
}

/// Listens for `acm_outbox` notifications on a dedicated connection and wakes the relay; reconnects with backoff.
pub async fn listen(settings: DatabaseSettings, wake: Arc<Notify>, shutdown: CancellationToken) {
    let mut backoff = Backoff::default();
    while !shutdown.is_cancelled() {
        match listen_once(&settings, &wake, &shutdown).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, "outbox listener lost its database connection; reconnecting");
                wake.notify_one();
                if !backoff.wait(&shutdown).await {
                    return;
                }
            }
        }
    }
}

async fn listen_once(settings: &DatabaseSettings, wake: &Notify, shutdown: &CancellationToken) -> Result<()> {
    let config: tokio_postgres::Config = settings
        .url
        .parse()
        .map_err(|_| crate::config::ConfigError("database.url: not a valid PostgreSQL URL".into()))?;
    match crate::db::tls(settings, &config)? {
        Some(tls) => {
            let (client, mut connection) = config.connect(tls).await?;
            let messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            notifications(client, messages, wake, shutdown).await
        }
        None => {
            let (client, mut connection) = config.connect(tokio_postgres::NoTls).await?;
            let messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            notifications(client, messages, wake, shutdown).await
        }
    }
}

async fn notifications<S>(
    client: tokio_postgres::Client,
    messages: S,
    wake: &Notify,
    shutdown: &CancellationToken,
) -> Result<()>
where
    S: futures_util::Stream<Item = std::result::Result<AsyncMessage, tokio_postgres::Error>>,
{
    tokio::pin!(messages);
    let listen = client.batch_execute("LISTEN acm_outbox");
    tokio::pin!(listen);
    let mut listening = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = &mut listen, if !listening => { r?; listening = true; wake.notify_one(); }
            m = messages.next() => match m {
                Some(Ok(AsyncMessage::Notification(_))) => wake.notify_one(),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
                None => return Err(Error::Disconnected("listener connection closed".into())),
            }
        }
    }
}
