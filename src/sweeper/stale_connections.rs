//! Closes active connections without a heartbeat for `connection_stale_after_secs`, with a brake: a mass verdict
//! that is more likely the worker's own fault (a deep heartbeat backlog, or a large share of connections going stale
//! at once) is held, for at most `stale_brake_max_hold_secs` in a row.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use serde::Serialize;

use super::lease::{Claim, Lease};
use super::{in_batches, secs, Batches};
use crate::config::SweeperSettings;
use crate::db::Sql;
use crate::error::Result;
use crate::events::{write_outbox, EventBody, OutboxSignal};

/// Task name (its `sweeper_state` row).
pub const TASK: &str = "stale_connections";
/// Default `connection_stale_after_secs`.
pub const STALE_AFTER_DEFAULT: Duration = Duration::from_secs(120);
/// Default `stale_brake_min_connections`: the brake never holds for fewer candidates.
pub const BRAKE_MIN_CONNECTIONS_DEFAULT: u64 = 20;
/// Default `stale_brake_ratio`: the brake holds when at least this share of active connections would go stale.
pub const BRAKE_RATIO_DEFAULT: f64 = 0.5;
/// Default `max_heartbeat_backlog`: the brake holds while the heartbeat queue is deeper.
pub const MAX_HEARTBEAT_BACKLOG_DEFAULT: u64 = 10_000;
/// Default `stale_brake_max_hold_secs`: the longest hold in a row.
pub const MAX_HOLD_DEFAULT: Duration = Duration::from_secs(600);

/// What this task needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// No heartbeat for this long: stale.
    pub stale_after: Duration,
    /// Brake: at least this many candidates...
    pub brake_min_connections: u64,
    /// ...and at least this share of active connections.
    pub brake_ratio: f64,
    /// Brake: a heartbeat queue deeper than this.
    pub max_heartbeat_backlog: u64,
    /// Longest hold in a row.
    pub max_hold: Duration,
    /// Rows per statement.
    pub batch_size: i64,
    /// Batch transactions at once.
    pub parallel: usize,
}

impl From<&SweeperSettings> for Config {
    fn from(s: &SweeperSettings) -> Self {
        Self {
            stale_after: secs(s.connection_stale_after_secs),
            brake_min_connections: s.stale_brake_min_connections,
            brake_ratio: s.stale_brake_ratio,
            max_heartbeat_backlog: s.max_heartbeat_backlog,
            max_hold: secs(s.stale_brake_max_hold_secs),
            batch_size: s.batch_size,
            parallel: s.parallel_batches,
        }
    }
}

/// Why and how much the brake held.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Held {
    /// `heartbeat_backlog` or `mass_stale`.
    pub reason: String,
    /// Connections that would have been closed.
    pub candidates: i64,
    /// Active connections.
    pub active: i64,
}

/// What a run changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Connections closed.
    pub closed: u64,
    /// Set when the brake held.
    pub held: Option<Held>,
}

/// Whether the brake holds, given the cycle's figures (pure, so it is unit-tested).
pub fn brake_reason(cfg: &Config, candidates: i64, active: i64, backlog: Option<u64>) -> Option<&'static str> {
    if candidates <= 0 {
        return None;
    }
    if backlog.is_some_and(|b| b > cfg.max_heartbeat_backlog) {
        return Some("heartbeat_backlog");
    }
    let c = candidates as f64;
    if candidates as u64 >= cfg.brake_min_connections && active > 0 && c >= cfg.brake_ratio * active as f64 {
        return Some("mass_stale");
    }
    None
}

/// Active connections past the stale threshold ($1 seconds).
pub const COUNT_CANDIDATES: &str = "SELECT count(*) FROM agent_connection \
     WHERE status = 'active' AND last_heartbeat_at < now() - $1::float8 * interval '1 second'";
const RELEASE_HOLD: &str = "UPDATE sweeper_state SET held_since = NULL WHERE task = $1 AND held_since IS NOT NULL";
/// Active connections (only counted when the brake may apply).
pub const COUNT_ACTIVE: &str = "SELECT count(*) FROM agent_connection WHERE status = 'active'";
/// Closes up to $2 connections past the stale threshold ($1 seconds), re-checked in the update.
pub const CLOSE_BATCH: &str = "WITH due AS ( \
        SELECT connection_id FROM agent_connection \
        WHERE status = 'active' AND last_heartbeat_at < now() - $1::float8 * interval '1 second' \
        ORDER BY last_heartbeat_at LIMIT $2 FOR UPDATE SKIP LOCKED) \
     UPDATE agent_connection c SET status = 'closed', close_reason = 'stale_connection', closed_at = now() \
     FROM due WHERE c.connection_id = due.connection_id AND c.status = 'active' \
       AND c.last_heartbeat_at < now() - $1::float8 * interval '1 second' \
     RETURNING c.connection_id, c.session_id, c.agent_id, c.last_heartbeat_at";

/// Runs once; `None` when another worker is running this task.
/// `outbox` is told after every commit that wrote events.
pub async fn run_once(
    pool: &Pool,
    lease: &Arc<Lease>,
    cfg: &Config,
    backlog: Option<u64>,
    outbox: &OutboxSignal,
) -> Result<Option<Report>> {
    let Some(mut claim) = Claim::take(pool, lease, TASK).await? else {
        return Ok(None);
    };
    let report = judge_and_close(&mut claim, pool, cfg, backlog, outbox).await?;
    claim.release().await;
    Ok(Some(report))
}

async fn judge_and_close(
    claim: &mut Claim,
    pool: &Pool,
    cfg: &Config,
    backlog: Option<u64>,
    outbox: &OutboxSignal,
) -> Result<Report> {
    let client = claim.client();
    let stale_secs = cfg.stale_after.as_secs_f64();
    let candidates: i64 = client.typed_one(COUNT_CANDIDATES, &[&stale_secs]).await?.get(0);
    let mut report = Report::default();
    if candidates == 0 {
        client.typed_execute(RELEASE_HOLD, &[&TASK]).await?;
        return Ok(report);
    }
    // The active count is only needed when the brake might apply.
    let may_brake =
        candidates as u64 >= cfg.brake_min_connections || backlog.is_some_and(|b| b > cfg.max_heartbeat_backlog);
    let active: i64 = if may_brake { client.typed_one(COUNT_ACTIVE, &[]).await?.get(0) } else { 0 };
    if let Some(reason) = brake_reason(cfg, candidates, active, backlog) {
        let tx = client.transaction().await?;
        let row = tx
            .typed_one(
                "UPDATE sweeper_state SET held_since = coalesce(held_since, now()) WHERE task = $1 \
                 RETURNING now() - held_since < $2::float8 * interval '1 second', now()",
                &[&TASK, &cfg.max_hold.as_secs_f64()],
            )
            .await?;
        let within_hold: bool = row.get(0);
        let now: DateTime<Utc> = row.get(1);
        if within_hold {
            tracing::error!(reason, candidates, active, backlog = ?backlog, "stale brake held: closing no connection this cycle");
            write_outbox(&tx, now, vec![EventBody::SweeperHeld { reason: reason.into(), candidates, active }]).await?;
            tx.commit().await?;
            outbox.committed();
            report.held = Some(Held { reason: reason.into(), candidates, active });
            return Ok(report);
        }
        tx.rollback().await?;
        tracing::error!(reason, candidates, active, "stale brake held for its maximum; the verdict stands");
    }
    client.typed_execute(RELEASE_HOLD, &[&TASK]).await?;
    let batches = Batches {
        task: TASK,
        sql: CLOSE_BATCH,
        param: stale_secs,
        size: cfg.batch_size,
        parallel: cfg.parallel,
        outbox,
    };
    report.closed = in_batches(claim, pool, batches, |r| {
        let connection_id: String = r.get(0);
        let session_id: String = r.get(1);
        tracing::info!(connection_id = %connection_id, session_id = %session_id, "connection closed: stale_connection");
        EventBody::ConnectionStale { connection_id, session_id, agent_id: r.get(2), last_heartbeat_at: r.get(3) }
    })
    .await?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config::from(&SweeperSettings::default())
    }

    #[test]
    fn brake_holds_on_mass_stale_only_above_both_thresholds() {
        let c = cfg();
        assert_eq!(brake_reason(&c, 20, 40, Some(0)), Some("mass_stale"));
        assert_eq!(brake_reason(&c, 19, 20, Some(0)), None, "below the minimum count");
        assert_eq!(brake_reason(&c, 20, 41, Some(0)), None, "below the ratio");
        assert_eq!(brake_reason(&c, 0, 100, Some(0)), None);
    }

    #[test]
    fn brake_holds_when_behind() {
        let c = cfg();
        assert_eq!(brake_reason(&c, 1, 1000, Some(10_001)), Some("heartbeat_backlog"));
        assert_eq!(brake_reason(&c, 1, 1000, Some(10_000)), None);
        assert_eq!(brake_reason(&c, 1, 1000, None), None);
    }
}
