//! The outbox relay: publishes committed events with publisher confirms and marks them published.
//!
//! No transaction stays open while the broker is waited for. A batch is claimed in one short statement that leases
//! up to `outbox.batch_size` unpublished rows whose lease is free or expired (`FOR UPDATE SKIP LOCKED`, outbox
//! order), setting `lease_until = now() + outbox.lease_secs`; the batch is then published with no transaction open,
//! its confirms awaited for at most `amqp.confirm_timeout_secs`, and marked published in a second short statement.
//! Other batches and relays skip leased rows, so several relays (and the several batches one relay keeps in
//! flight) do not publish one row twice while its lease holds. A batch that fails (nack, no confirm in time, lost
//! channel) gives its lease back and stays unpublished; a relay that dies keeps it until `lease_until` passes, then
//! another relay publishes the rows again with the same `event_id` — as it does after a crash between the broker's
//! confirm and the mark. The relay wakes on `NOTIFY acm_outbox` (sent by a trigger when events commit) and also
//! polls; while the broker blocks publishers it claims nothing.

use std::sync::atomic::{AtomicBool, Ordering};
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
use crate::db::Sql;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::retry::Backoff;

/// Leases up to $1 unpublished events whose lease is free or expired, in outbox order, for $2 seconds to relay $3;
/// skips rows another claim is leasing at this moment. One statement, so one short transaction. The inner `WHERE`
/// is served by the partial index of unpublished rows (`event_outbox_unpublished`); the ids are passed on as an
/// array so that the `UPDATE` looks each one up by primary key instead of walking the published rows before them.
pub const CLAIM: &str = "UPDATE event_outbox SET lease_until = now() + make_interval(secs => $2), leased_by = $3 \
     WHERE id = ANY(ARRAY(\
       SELECT id FROM event_outbox WHERE published_at IS NULL AND (lease_until IS NULL OR lease_until < now()) \
       ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)) \
     RETURNING id, event_id, event_type, payload::text";
/// Marks a published batch; a row another relay marked meanwhile is left as it is.
pub const MARK: &str =
    "UPDATE event_outbox SET published_at = now(), lease_until = NULL WHERE id = ANY($1) AND published_at IS NULL";
/// Gives back the lease of a batch that was not published, so that it is claimed again at once (in order).
pub const RELEASE: &str =
    "UPDATE event_outbox SET lease_until = NULL WHERE id = ANY($1) AND published_at IS NULL AND leased_by = $2";

/// Who a relay is, in `leased_by`: host, process and a random id (several relays may share a process).
pub fn relay_name() -> String {
    let host = std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()).unwrap_or_else(|| "localhost".into());
    format!("{host}/{}/{}", std::process::id(), &Uuid::new_v4().simple().to_string()[..8])
}

/// How a relay publishes: the exchange, the bounds of a batch and its name in `leased_by`.
#[derive(Debug, Clone)]
pub struct Publishing {
    /// The event exchange.
    pub exchange: String,
    /// Events per batch.
    pub batch: i64,
    /// Lease of a claimed batch.
    pub lease: Duration,
    /// Longest wait for a batch's confirms (publishing included).
    pub confirm_timeout: Duration,
    /// This relay's name in `leased_by`.
    pub name: String,
}

impl Publishing {
    /// The defaults of `outbox.lease_secs` and `amqp.confirm_timeout_secs` for `exchange`, batches of `batch`.
    pub fn new(exchange: &str, batch: i64) -> Self {
        let s = crate::config::Settings::default();
        Self {
            exchange: exchange.to_string(),
            batch,
            lease: Duration::from_secs(s.outbox.lease_secs),
            confirm_timeout: s.confirm_timeout(),
            name: relay_name(),
        }
    }
}

/// Publishes one batch; returns how many events were published and confirmed.
pub async fn relay_once(pool: &Pool, channel: &Channel, p: &Publishing, metrics: &Metrics) -> Result<usize> {
    relay_batch(pool, channel, p, metrics, None).await
}

/// Claims, publishes and marks one batch. `published` learns how many events were claimed once they are all
/// handed to the channel (0 when there were none), while the confirms are still outstanding.
async fn relay_batch(
    pool: &Pool,
    channel: &Channel,
    p: &Publishing,
    metrics: &Metrics,
    published: Option<oneshot::Sender<usize>>,
) -> Result<usize> {
    let rows = {
        let client = pool.get().await?;
        client.typed_query(CLAIM, &[&p.batch, &p.lease.as_secs_f64(), &p.name]).await?
    };
    if rows.is_empty() {
        if let Some(tx) = published {
            let _ = tx.send(0);
        }
        return Ok(0);
    }
    let mut batch: Vec<(i64, Uuid, String, String)> =
        rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))).collect();
    // RETURNING does not keep the claim's order: publish in outbox order.
    batch.sort_unstable_by_key(|b| b.0);
    let ids: Vec<i64> = batch.iter().map(|b| b.0).collect();
    let started = Instant::now();
    let outcome = tokio::time::timeout(p.confirm_timeout, publish(channel, &p.exchange, batch, published)).await;
    let outcome = outcome.unwrap_or_else(|_| {
        Err(Error::Timeout(format!(
            "no confirm within {:?} for {} events to {}",
            p.confirm_timeout,
            ids.len(),
            p.exchange
        )))
    });
    if let Err(e) = outcome {
        // Not published: give the lease back (when the database answers; otherwise it expires).
        if let Ok(client) = pool.get().await {
            let _ = client.typed_execute(RELEASE, &[&ids, &p.name]).await;
        }
        return Err(e);
    }
    metrics.publish_confirm_seconds.observe(started.elapsed().as_secs_f64());
    let client = pool.get().await?;
    client.typed_execute(MARK, &[&ids]).await?;
    metrics.events_published.inc_by(ids.len() as u64);
    Ok(ids.len())
}

/// Hands a claimed batch to the channel in order, tells `published`, then awaits every confirm.
async fn publish(
    channel: &Channel,
    exchange: &str,
    batch: Vec<(i64, Uuid, String, String)>,
    published: Option<oneshot::Sender<usize>>,
) -> Result<()> {
    let n = batch.len();
    let mut confirms = Vec::with_capacity(n);
    for (_, event_id, event_type, body) in batch {
        // The stored JSON as PostgreSQL prints it: the body as is, without parsing and printing it again.
        let props = json_properties().with_message_id(ShortString::from(event_id.to_string()));
        let confirm = channel
            .basic_publish(
                exchange.into(),
                event_type.as_str().into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                props,
            )
            .await?;
        confirms.push((event_id, event_type, confirm));
    }
    if let Some(tx) = published {
        let _ = tx.send(n);
    }
    for (event_id, event_type, confirm) in confirms {
        if confirm.await?.is_nack() {
            return Err(Error::Nack(format!("{exchange}/{event_type} (event {event_id})")));
        }
        tracing::debug!(event_id = %event_id, event_type = %event_type, "event published");
    }
    Ok(())
}

/// Unpublished events and the age of the oldest, in seconds.
pub async fn backlog(pool: &Pool) -> Result<(i64, f64)> {
    let client = pool.get().await?;
    let row = client
        .typed_one("SELECT count(*), min(created_at), now() FROM event_outbox WHERE published_at IS NULL", &[])
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
    /// Exchange, batch size, lease, confirm timeout and name.
    pub publishing: Publishing,
    /// Batches in flight at once (claimed and published one after another, confirmed and marked concurrently).
    pub pipeline: usize,
    /// Poll interval when no notification comes.
    pub poll: Duration,
    /// Woken by the outbox listener.
    pub wake: Arc<Notify>,
    /// Set while the broker blocks publishers: no batch is claimed meanwhile.
    pub blocked: Arc<AtomicBool>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Stops the relay (after a final flush of at most 5 seconds).
    pub shutdown: CancellationToken,
}

/// Runs the relay until shutdown, then flushes what is left for at most 5 seconds.
///
/// Up to `pipeline` batches are in flight: the next batch is claimed (skipping the rows the previous ones lease)
/// and published as soon as the previous one is handed to the channel, while the broker confirms it. Claims and
/// publishes stay in outbox order on the one channel; marks may finish in any order. After a failure no new batch
/// starts until those in flight have finished; their rows stay unpublished, their leases are given back, and they
/// are claimed again after a backoff. While the broker blocks publishers no batch is claimed.
pub async fn run(cfg: RelayConfig) -> Result<()> {
    let RelayConfig { pool, channel, publishing, pipeline, poll, wake, blocked, metrics, shutdown } = cfg;
    let batch = publishing.batch;
    let depth = pipeline.max(1);
    let mut backoff = Backoff::default();
    let mut in_flight = FuturesUnordered::new();
    let mut failure: Option<Error> = None;
    // Whether the last claim came back full, so more may be waiting.
    let mut more = true;
    loop {
        let open = !blocked.load(Ordering::Relaxed);
        if more && open && failure.is_none() && in_flight.len() < depth && !shutdown.is_cancelled() {
            let (tx, mut rx) = oneshot::channel();
            in_flight.push(relay_batch(&pool, &channel, &publishing, &metrics, Some(tx)));
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
            Some(e @ (Error::Pool(_) | Error::Db(_) | Error::Timeout(_) | Error::Nack(_))) => {
                tracing::warn!(error = %e, "outbox relay: batch not published; its events stay in the outbox, retrying");
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
        if !more || !open {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = wake.notified() => {}
                _ = tokio::time::sleep(if open { poll } else { poll.min(Duration::from_millis(250)) }) => {}
            }
        }
        more = true;
    }
    // Flush: publish what the stopped consumers committed.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && !blocked.load(Ordering::Relaxed) {
        match relay_once(&pool, &channel, &publishing, &metrics).await {
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
    // Like the pool's connections: the hosts of `database.url` in turn, each bounded, the whole attempt too.
    let hosts = crate::db::host_configs(settings, crate::db::Limits::All)?;
    let per_host = crate::db::per_host_timeout(settings, &hosts[0]);
    let budget = crate::db::connect_budget(settings, &hosts);
    let timed_out = || Error::Timeout(format!("outbox listener: no database host accepted within {budget:?}"));
    match crate::db::tls(settings, &hosts[0])? {
        Some(tls) => {
            let connecting = crate::db::connect_first(&hosts, tls, per_host);
            let (client, mut connection) =
                tokio::time::timeout(budget, connecting).await.map_err(|_| timed_out())??;
            let messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            notifications(client, messages, wake, shutdown).await
        }
        None => {
            let connecting = crate::db::connect_first(&hosts, tokio_postgres::NoTls, per_host);
            let (client, mut connection) =
                tokio::time::timeout(budget, connecting).await.map_err(|_| timed_out())??;
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
