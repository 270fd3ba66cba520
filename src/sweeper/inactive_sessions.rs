//! Marks active sessions without agent activity for `session_inactive_after_secs` as inactive.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;

use super::lease::{Claim, Lease};
use super::{any_due, in_batches, secs, Batches};
use crate::config::SweeperSettings;
use crate::error::Result;
use crate::events::{EventBody, OutboxSignal};

/// Task name (its `sweeper_state` row).
pub const TASK: &str = "inactive_sessions";

/// What this task needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// No activity for this long: inactive.
    pub inactive_after: Duration,
    /// Rows per statement.
    pub batch_size: i64,
    /// Batch transactions at once.
    pub parallel: usize,
}

impl From<&SweeperSettings> for Config {
    fn from(s: &SweeperSettings) -> Self {
        Self {
            inactive_after: secs(s.session_inactive_after_secs.get()),
            batch_size: s.batch_size,
            parallel: s.parallel_batches.get(),
        }
    }
}

/// Marks up to $2 sessions without activity for $1 seconds inactive, re-checked in the update.
pub const MARK_BATCH: &str = "WITH due AS ( \
        SELECT session_id FROM agent_session \
        WHERE status = 'active' AND last_activity_at < now() - $1::float8 * interval '1 second' \
        ORDER BY last_activity_at LIMIT $2 FOR UPDATE SKIP LOCKED) \
     UPDATE agent_session s SET status = 'inactive' \
     FROM due WHERE s.session_id = due.session_id AND s.status = 'active' \
       AND s.last_activity_at < now() - $1::float8 * interval '1 second' \
     RETURNING s.session_id, s.agent_id, s.last_activity_at";

/// Whether any active session has been without activity for $1 seconds (read-only): the oldest activity, one entry
/// of the partial index `agent_session_active_activity` (an `EXISTS` could be planned as a scan that reads every row
/// when nothing is due).
pub const ANY_DUE: &str = "SELECT coalesce((SELECT min(last_activity_at) FROM agent_session WHERE status = 'active') \
     < now() - $1::float8 * interval '1 second', false)";

/// Runs once; `None` when another worker is running this task. Returns the sessions marked.
/// `outbox` is told after every commit that wrote events.
pub async fn run_once(pool: &Pool, lease: &Arc<Lease>, cfg: &Config, outbox: &OutboxSignal) -> Result<Option<u64>> {
    if !any_due(pool, ANY_DUE, &[&cfg.inactive_after.as_secs_f64()]).await? {
        return Ok(Some(0));
    }
    let Some(mut claim) = Claim::take(pool, lease, TASK).await? else {
        return Ok(None);
    };
    let batches = Batches {
        task: TASK,
        sql: MARK_BATCH,
        param: cfg.inactive_after.as_secs_f64(),
        size: cfg.batch_size,
        parallel: cfg.parallel,
        outbox,
    };
    let total = in_batches(&mut claim, pool, batches, |r| {
        let session_id: String = r.get(0);
        tracing::info!(session_id = %session_id, "session inactive");
        EventBody::SessionInactive { session_id, agent_id: r.get(1), last_activity_at: r.get(2) }
    })
    .await?;
    claim.release().await;
    Ok(Some(total))
}
