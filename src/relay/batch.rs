//! One batch: claimed under the lease, published in order with no transaction open, confirmed within
//! `amqp.confirm_timeout_secs`, then deleted.

use std::time::Instant;

use deadpool_postgres::Pool;
use lapin::options::BasicPublishOptions;
use lapin::types::{FieldTable, ShortString};
use lapin::Channel;
use tokio::sync::oneshot;

use super::sql::{self, Claimed, Window};
use super::{Flying, Publishing};
use crate::amqp::json_properties;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::trace_context::insert_headers;

/// What a claim came to, told to the relay loop once the batch is handed to the channel.
#[derive(Debug)]
pub(super) enum Claim {
    /// This relay does not hold the lease (any more).
    Lost,
    /// `n` events were claimed and published (0: none was waiting); `last` is the highest id.
    Batch { n: usize, last: Option<i64> },
}

/// Removes a batch's ids from the ids in flight when the batch ends, however it ends.
struct Registered<'a> {
    flying: &'a Flying,
    seq: u64,
}

impl<'a> Registered<'a> {
    fn new(flying: &'a Flying, seq: u64, ids: Vec<i64>) -> Self {
        flying.lock().unwrap_or_else(|p| p.into_inner()).insert(seq, ids);
        Self { flying, seq }
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.flying.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.seq);
    }
}

/// Claims, publishes, awaits the confirms of, and deletes one batch. `claimed` learns the outcome of the claim once
/// the batch is handed to the channel, while its confirms are still outstanding. Returns the events published.
pub(super) async fn relay_batch(
    pool: &Pool,
    channel: &Channel,
    p: &Publishing,
    metrics: &Metrics,
    window: Window,
    (seq, flying): (u64, &Flying),
    claimed: Option<oneshot::Sender<Claim>>,
) -> Result<usize> {
    let tell = |claimed: Option<oneshot::Sender<Claim>>, c: Claim| {
        if let Some(tx) = claimed {
            let _ = tx.send(c);
        }
    };
    let Some(batch) = sql::claim(pool, &p.identity, p.lease.as_secs_f64(), &window, p.batch).await? else {
        tell(claimed, Claim::Lost);
        return Ok(0);
    };
    if batch.is_empty() {
        tell(claimed, Claim::Batch { n: 0, last: None });
        return Ok(0);
    }
    let ids: Vec<i64> = batch.iter().map(|e| e.id).collect();
    let _registered = Registered::new(flying, seq, ids.clone());
    let told = Claim::Batch { n: ids.len(), last: ids.last().copied() };
    let started = Instant::now();
    let published = publish(channel, &p.exchange, batch, move || tell(claimed, told));
    let outcome = tokio::time::timeout(p.confirm_timeout, published).await.unwrap_or_else(|_| {
        Err(Error::Timeout(format!(
            "no confirm within {:?} for {} events to {}",
            p.confirm_timeout,
            ids.len(),
            p.exchange
        )))
    });
    // Not published: the events stay in the outbox and are claimed again.
    outcome?;
    metrics.publish_confirm_seconds.observe(started.elapsed().as_secs_f64());
    metrics.events_published.inc_by(ids.len() as u64);
    // Published: delete them. Should this fail, they are published again (with the same event_id) after a rescan.
    sql::delete(pool, &ids).await?;
    Ok(ids.len())
}

/// Hands a claimed batch to the channel in order, calls `handed`, then awaits every confirm.
async fn publish(channel: &Channel, exchange: &str, batch: Vec<Claimed>, handed: impl FnOnce()) -> Result<()> {
    let mut confirms = Vec::with_capacity(batch.len());
    for e in batch {
        // The stored JSON as PostgreSQL prints it: the body as is, without parsing and printing it again.
        let mut props = json_properties().with_message_id(ShortString::from(e.event_id.to_string()));
        if let (Some(parent), state) = &e.trace {
            let mut headers = FieldTable::default();
            insert_headers(&mut headers, parent, state.as_deref());
            props = props.with_headers(headers);
        }
        let confirm = channel
            .basic_publish(
                exchange.into(),
                e.event_type.as_str().into(),
                BasicPublishOptions::default(),
                e.body.as_bytes(),
                props,
            )
            .await?;
        confirms.push((e.event_id, e.event_type, confirm));
    }
    handed();
    for (event_id, event_type, confirm) in confirms {
        if confirm.await?.is_nack() {
            return Err(Error::Nack(format!("{exchange}/{event_type} (event {event_id})")));
        }
        tracing::debug!(event_id = %event_id, event_type = %event_type, "event published");
    }
    Ok(())
}
