//! Deletes idempotency records older than `sweeper.idempotency_retention_secs`, in bounded batches. (Published events are not
//! kept: the relay deletes each batch once the broker confirmed it.)

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;

use super::lease::{Claim, Lease};
use super::{any_due, mark_run, secs};
use crate::config::Settings;
use crate::db::{Sql, Unnamed};
use crate::error::Result;

/// Task name (its `sweeper_state` row).
pub const TASK: &str = "retention";

/// What this task needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// Keep idempotency records this long.
    pub retention: Duration,
    /// Rows per statement.
    pub batch_size: i64,
}

impl From<&Settings> for Config {
    fn from(s: &Settings) -> Self {
        Self { retention: secs(s.sweeper.idempotency_retention_secs), batch_size: s.sweeper.batch_size }
    }
}

/// What a run deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Idempotency records.
    pub processed_messages: u64,
}

/// Deletes up to $2 idempotency records older than $1 seconds.
pub const PRUNE_PROCESSED: &str = "DELETE FROM processed_message WHERE (sender, message_type, message_id) IN ( \
     SELECT sender, message_type, message_id FROM processed_message \
     WHERE processed_at < now() - $1::float8 * interval '1 second' LIMIT $2)";

/// Whether any idempotency record is older than $1 seconds (read-only): the oldest, one entry of the index
/// `processed_message_processed_at` (an `EXISTS` could be planned as a scan that reads every row when nothing is
/// due).
pub const ANY_DUE: &str = "SELECT coalesce((SELECT min(processed_at) FROM processed_message) \
     < now() - $1::float8 * interval '1 second', false)";

/// Runs once; `None` when another worker is running this task.
pub async fn run_once(pool: &Pool, lease: &Arc<Lease>, cfg: &Config) -> Result<Option<Report>> {
    if !any_due(pool, ANY_DUE, &[&cfg.retention.as_secs_f64()]).await? {
        return Ok(Some(Report::default()));
    }
    let Some(mut claim) = Claim::take(pool, lease, TASK).await? else {
        return Ok(None);
    };
    // Each delete is its own statement (and transaction): no events, nothing to keep together.
    let client = claim.client();
    let keep = cfg.retention.as_secs_f64();
    let mut report = Report::default();
    loop {
        let n = Unnamed(&*client).typed_execute(PRUNE_PROCESSED, &[&keep, &cfg.batch_size]).await?;
        report.processed_messages += n;
        if (n as i64) < cfg.batch_size {
            break;
        }
    }
    if report.processed_messages > 0 {
        mark_run(&*client, TASK).await?;
    }
    claim.release().await;
    if report.processed_messages > 0 {
        tracing::info!(processed_messages = report.processed_messages, "retention pruned");
    }
    Ok(Some(report))
}
