//! The unroutable consumer: what was published to the command exchange with a routing key no binding matches reaches
//! `<prefix>.unroutable` through the exchange's alternate exchange; each is dead-lettered with `x-acm-error`
//! `unroutable: …`, replied to with `invalid` when it has a `reply_to`, then acknowledged — so nothing published to
//! the command exchange vanishes and no caller waits for its timeout.

use std::sync::Arc;

use futures_util::StreamExt;
use lapin::options::BasicCancelOptions;
use lapin::Channel;
use tokio_util::sync::CancellationToken;

use super::dead_letter::reject;
use super::{ack, consume_queue, Shared};
use crate::error::{CommandError, Error, Poison, PoisonKind, Result};
use crate::retry::retry_transient;

/// Prefetch of the unroutable queue: it only ever holds mistakes.
const PREFETCH: u16 = 16;

/// Consumes `<prefix>.unroutable` until shutdown, one delivery at a time.
pub async fn unroutable(shared: Arc<Shared>, channel: Channel, shutdown: CancellationToken) -> Result<()> {
    let mut consumer = consume_queue(&channel, &shared.topology.unroutable, PREFETCH).await?;
    let result = loop {
        let d = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break Ok(()),
            d = consumer.next() => d,
        };
        let d = match d {
            Some(Ok(d)) => d,
            Some(Err(e)) => break Err(e.into()),
            None => break Err(Error::Disconnected("unroutable consumer ended".into())),
        };
        let detail = format!(
            "unroutable: no binding of `{}` matches routing key `{}`",
            shared.topology.command_exchange, d.routing_key
        );
        let poison = Poison::new(PoisonKind::Unroutable, detail.clone());
        let sent = retry_transient("dead-lettering an unroutable message", &shutdown, || {
            reject(&shared, &d, "unroutable", &poison, CommandError::Invalid(detail.clone()))
        })
        .await;
        if let Err(e) = sent {
            break Err(e);
        }
        if let Err(e) = ack(&d, false).await {
            break Err(e);
        }
    };
    let _ = channel.basic_cancel(consumer.tag(), BasicCancelOptions::default()).await;
    result
}
