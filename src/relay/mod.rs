//! The outbox relay: publishes committed events with publisher confirms, then deletes them.
//!
//! One relay at a time publishes: the one that holds the relay lease (the one row of `outbox_relay`), taken when it
//! has expired and renewed by the holder's claims; the relays of the other workers stand by, look every
//! `outbox.poll_interval_ms` and take the lease over once it has expired (`outbox.lease_secs` after the holder's last
//! renewal). The holder claims a batch in one short statement that checks (and renews) its lease and reads up to
//! `outbox.batch_size` events in id order, writing nothing to them; it publishes the batch with no transaction open,
//! awaits its confirms for at most `amqp.confirm_timeout_secs`, then deletes the batch by id in one statement. So an
//! event costs its insert and one delete, and every row in `event_outbox` is unpublished.
//!
//! Up to `outbox.pipeline` batches are in flight: the next claim starts after the highest id claimed, so it skips the
//! rows of the batches in flight without any mark on them. Rows committed late (their transaction took its ids before
//! a later transaction committed) are below that point: the holder rescans from the oldest row, leaving out the ids
//! in flight, whenever nothing is in flight and at least every poll interval. A batch that fails (nack, no confirm in
//! time, lost channel) is not deleted; no batch starts until those in flight have finished, and after a backoff the
//! holder rescans from the oldest row, so the failed events are published again, first. A relay that dies keeps the
//! lease until it expires; the relay that takes over rescans from the oldest row and publishes the dead relay's
//! unconfirmed or undeleted events again, with the same `event_id`. While the broker blocks publishers the relay
//! claims nothing (and so does not renew the lease). After [`NACKED_ROUNDS_BEFORE_NEW_SESSION`] rounds of nacked
//! batches in a row the relay ends with the nack, and the worker starts a new broker session.
//!
//! The relay wakes at once when its own process commits events ([`OutboxSignal`]) and polls every
//! `outbox.poll_interval_ms` for events other processes commit: no `LISTEN`/`NOTIFY`, so it works through a
//! transaction pooler.

mod batch;
pub mod sql;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use lapin::Channel;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::error::{Error, Result};
pub use crate::events::OutboxSignal;
use crate::metrics::Metrics;
use crate::retry::Backoff;
use batch::{relay_batch, Claim};
pub use sql::{backlog, Acquired, RelayIdentity, Window, ACQUIRE, CLAIM, DELETE, RELEASE, RENEW};

/// Who a relay is in the lease: `worker_id` (`worker.id`) as the holder when it is set, so that a restarted worker
/// takes its lease back at once, else host, process and a random id (unique to this process); and a random id for
/// this run.
pub fn relay_identity(worker_id: &str) -> RelayIdentity {
    let random = || Uuid::new_v4().simple().to_string()[..8].to_string();
    let holder = if worker_id.is_empty() {
        let host = std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()).unwrap_or_else(|| "localhost".into());
        format!("{host}/{}/{}", std::process::id(), random())
    } else {
        worker_id.to_string()
    };
    RelayIdentity { holder, instance: random() }
}

/// How a relay publishes: the exchange, the bounds of a batch and its name in the lease.
#[derive(Debug, Clone)]
pub struct Publishing {
    /// The event exchange.
    pub exchange: String,
    /// Events per batch.
    pub batch: i64,
    /// The relay lease, from the holder's last renewal.
    pub lease: Duration,
    /// Longest wait for a batch's confirms (publishing included).
    pub confirm_timeout: Duration,
    /// This relay's holder and run in `outbox_relay`.
    pub identity: RelayIdentity,
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
            identity: relay_identity(""),
        }
    }
}

/// Rounds of nacked batches in a row after which the relay gives up its channel: it ends with the nack, so the worker
/// starts a new broker session (on the next node of `amqp.url`). A quorum queue that lost its leader nacks for a few
/// seconds until a new one is elected; a channel that keeps being refused long after that is not trusted again.
pub const NACKED_ROUNDS_BEFORE_NEW_SESSION: u32 = 3;

/// Ids of the batches in flight, by batch number (registered by each batch once claimed, removed when it ends).
type Flying = Mutex<HashMap<u64, Vec<i64>>>;

/// Takes the lease when it is free (or already this relay's), then publishes and deletes one batch from the oldest
/// event; returns how many events were published and confirmed (0 when another relay holds the lease).
pub async fn relay_once(pool: &Pool, channel: &Channel, p: &Publishing, metrics: &Metrics) -> Result<usize> {
    if sql::acquire(pool, &p.identity, p.lease.as_secs_f64()).await? == Acquired::No {
        return Ok(0);
    }
    let flying = Flying::default();
    let window = Window { rescan: true, ..Window::default() };
    relay_batch(pool, channel, p, metrics, window, (0, &flying), None).await
}

/// What the relay needs.
pub struct RelayConfig {
    /// Database pool.
    pub pool: Pool,
    /// A channel in confirm mode.
    pub channel: Channel,
    /// Exchange, batch size, lease, confirm timeout and name.
    pub publishing: Publishing,
    /// Batches in flight at once (claimed and published one after another, confirmed and deleted concurrently).
    pub pipeline: usize,
    /// How often to look for events committed by other processes (and, standing by, whether the lease expired).
    pub poll: Duration,
    /// Signalled when this process commits events.
    pub wake: OutboxSignal,
    /// Set while the broker blocks publishers: no batch is claimed meanwhile.
    pub blocked: Arc<AtomicBool>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Stops the relay (after a final flush of at most 5 seconds, when it holds the lease, which it then gives back).
    pub shutdown: CancellationToken,
}

/// Runs the relay until shutdown: stands by until it holds the lease, then publishes (see the module's
/// documentation). At shutdown the lease holder flushes what is left for at most 5 seconds and gives the lease back.
pub async fn run(cfg: RelayConfig) -> Result<()> {
    let RelayConfig { pool, channel, publishing, pipeline, poll, wake, blocked, metrics, shutdown } = cfg;
    let (who, lease) = (&publishing.identity, publishing.lease.as_secs_f64());
    let name = who.holder.as_str();
    // Between claims (while batches await their confirms) the holder renews its lease every third of it.
    let renew_every = publishing.lease / 3;
    let mut renewed = Instant::now();
    let batch = publishing.batch;
    let depth = pipeline.max(1);
    let flying = Flying::default();
    let mut backoff = Backoff::default();
    let mut nacked_rounds = 0u32;
    let mut in_flight = FuturesUnordered::new();
    let mut failure: Option<Error> = None;
    let mut leader = false;
    // Claims go on after the highest id claimed since the last rescan.
    let mut after = 0i64;
    let mut rescanned = Instant::now();
    // A full rescan batch may have left late rows out: the next claim rescans too.
    let mut rescan_more = false;
    let mut seq = 0u64;
    // Whether the last claim came back full, so more may be waiting.
    let mut more = true;
    // Whether this process committed events since the last claim while batches were in flight: they are claimed
    // when the next batch in flight ends.
    let mut woken = false;
    loop {
        let open = !blocked.load(Ordering::Relaxed);
        if leader && more && open && failure.is_none() && in_flight.len() < depth && !shutdown.is_cancelled() {
            let rescan = in_flight.is_empty() || rescan_more || rescanned.elapsed() >= poll;
            let skip: Vec<i64> = if rescan {
                rescanned = Instant::now();
                flying.lock().unwrap_or_else(|p| p.into_inner()).values().flatten().copied().collect()
            } else {
                Vec::new()
            };
            seq += 1;
            let (tx, mut rx) = oneshot::channel();
            let window = Window { after, rescan, skip };
            in_flight.push(relay_batch(&pool, &channel, &publishing, &metrics, window, (seq, &flying), Some(tx)));
            // Drive every batch in flight until this one has claimed and published (its claim first: it registers
            // its ids before it can finish).
            let claimed = loop {
                tokio::select! {
                    biased;
                    r = &mut rx => break r.ok(),
                    Some(done) = in_flight.next() => match done {
                        Ok(_) => nacked_rounds = 0,
                        Err(e) => {
                            failure.get_or_insert(e);
                        }
                    },
                }
            };
            renewed = Instant::now();
            match claimed {
                Some(Claim::Lost) => {
                    leader = false;
                    metrics.outbox_relay_leader.set(0);
                    tracing::warn!(relay = name, "outbox relay: lease lost (expired or taken over); standing by");
                }
                Some(Claim::Batch { n, last }) => {
                    after = after.max(last.unwrap_or(0));
                    more = n as i64 == batch;
                    rescan_more = rescan && more;
                }
                // The batch failed before publishing; its error comes out of `in_flight`.
                None => more = false,
            }
            continue;
        }
        if !in_flight.is_empty() {
            // A batch ends. Events this process commits meanwhile (after a short claim) are claimed when it does,
            // together, rather than one small claim per commit: under a stream of commands that is a few events per
            // claim instead of about one, at the cost of waiting for one confirm; with nothing in flight a commit is
            // claimed at once (below).
            let may_claim = !more && leader && open && failure.is_none() && !shutdown.is_cancelled();
            tokio::select! {
                Some(done) = in_flight.next() => {
                    match done {
                        Ok(_) => {
                            backoff = Backoff::default();
                            nacked_rounds = 0;
                        }
                        Err(e) => {
                            failure.get_or_insert(e);
                        }
                    }
                    if std::mem::take(&mut woken) {
                        more = true;
                    }
                }
                _ = wake.notified(), if may_claim && !woken => woken = true,
                _ = tokio::time::sleep_until((renewed + renew_every).into()), if leader => {
                    renewed = Instant::now();
                    match sql::renew(&pool, who, lease).await {
                        Ok(true) => {}
                        Ok(false) => {
                            leader = false;
                            metrics.outbox_relay_leader.set(0);
                            tracing::warn!(relay = name, "outbox relay: lease lost while batches await their confirms (expired or taken over); standing by");
                        }
                        Err(e) => tracing::warn!(error = %e, "outbox relay: cannot renew the lease; trying again"),
                    }
                }
            }
            continue;
        }
        // Nothing in flight: the next claim rescans from the oldest row.
        after = 0;
        match failure.take() {
            Some(e @ Error::Nack(_)) if nacked_rounds + 1 >= NACKED_ROUNDS_BEFORE_NEW_SESSION => {
                tracing::warn!(error = %e, rounds = nacked_rounds + 1, "outbox relay: the broker keeps refusing its publishes; its events stay in the outbox, starting a new broker session");
                return Err(e);
            }
            Some(
                e @ (Error::Pool(_) | Error::Db(_) | Error::DbUnreachable(_) | Error::Timeout(_) | Error::Nack(_)),
            ) => {
                if matches!(e, Error::Nack(_)) {
                    nacked_rounds += 1;
                }
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
        if !leader && open {
            match sql::acquire(&pool, who, lease).await {
                Ok(got @ (Acquired::Yes | Acquired::FromSameHolder)) => {
                    leader = true;
                    more = true;
                    renewed = Instant::now();
                    metrics.outbox_relay_leader.set(1);
                    if got == Acquired::FromSameHolder {
                        tracing::warn!(relay = name, instance = %who.instance, "outbox relay: took the lease back from another run of this worker.id (a restart; if that process still runs, worker.id is not unique)");
                    }
                    tracing::info!(relay = name, instance = %who.instance, "outbox relay: took the lease; publishing");
                    continue;
                }
                Ok(Acquired::No) => {}
                Err(e) => tracing::warn!(error = %e, "outbox relay: cannot look at the lease; trying again"),
            }
        }
        if !more || !open || !leader {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = wake.notified() => {}
                // A leader looks at least every third of its lease, so that its claims keep renewing it.
                _ = tokio::time::sleep(if open { poll.min(renew_every) } else { poll.min(Duration::from_millis(250)) }) => {}
            }
        }
        more = true;
    }
    flush(&pool, &channel, &publishing, &metrics, &blocked, leader).await;
    Ok(())
}

/// At shutdown: publishes what the stopped consumers committed (for at most 5 seconds) when this relay holds the
/// lease or can take it, then gives the lease back so that a standby relay takes over at its next look.
async fn flush(pool: &Pool, channel: &Channel, p: &Publishing, metrics: &Metrics, blocked: &AtomicBool, leader: bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && !blocked.load(Ordering::Relaxed) {
        match relay_once(pool, channel, p, metrics).await {
            Ok(n) if n as i64 == p.batch => continue,
            Ok(_) => break,
            Err(e) => {
                tracing::warn!(error = %e, "outbox relay: flush at shutdown failed; events stay in the outbox");
                break;
            }
        }
    }
    if let Err(e) = sql::release(pool, &p.identity).await {
        tracing::warn!(error = %e, "outbox relay: cannot give the lease back; it expires on its own");
    }
    if leader {
        metrics.outbox_relay_leader.set(0);
    }
}
