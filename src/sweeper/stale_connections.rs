//! Closes active connections without a heartbeat for `connection_stale_after_secs`, with a brake: a mass verdict
//! that is more likely the worker's own fault, or a partition's (a deep heartbeat backlog, or a large share of
//! connections going silent together), is held, for at most `stale_brake_max_hold_secs` in a row.
//!
//! A group that goes silent together is judged as one: its members' last heartbeats are spread over the agents'
//! heartbeat interval, so the first cycle after the stale window sees only the earliest of them stale. The brake
//! therefore counts, once anything is stale, every active connection silent for at least the stale window less
//! `stale_brake_window_secs` (the group), and holds when the group is a large share; nothing of the group is closed
//! before that decision.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use serde::Serialize;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Row;

use super::lease::{Claim, Lease};
use super::{in_batches, secs, Batches};
use crate::config::SweeperSettings;
use crate::db::Sql;
use crate::error::{Error, Result};
use crate::events::{write_outbox, EventBody, OutboxSignal};

/// Task name (its `sweeper_state` row).
pub const TASK: &str = "stale_connections";

/// What this task needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// No heartbeat for this long: stale.
    pub stale_after: Duration,
    /// The brake's group: connections that go stale within this long (silent for `stale_after` less this).
    pub window: Duration,
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
            stale_after: secs(s.connection_stale_after_secs.get()),
            window: if s.stale_brake_window_secs == 0 {
                secs(s.connection_stale_after_secs.get()) / 2
            } else {
                secs(s.stale_brake_window_secs)
            },
            brake_min_connections: s.stale_brake_min_connections,
            brake_ratio: s.stale_brake_ratio,
            max_heartbeat_backlog: s.max_heartbeat_backlog,
            max_hold: secs(s.stale_brake_max_hold_secs),
            batch_size: s.batch_size,
            parallel: s.parallel_batches.get(),
        }
    }
}

/// Why and how much the brake held.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Held {
    /// `heartbeat_backlog` or `mass_stale`.
    pub reason: String,
    /// Connections that would have been closed: those stale, and those going stale within the brake's window.
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

/// Active connections past the stale threshold ($1 seconds). The index on `heartbeat_minute` (never later than
/// `last_heartbeat_at`) bounds the scan to the connections not heard from within the threshold plus a minute;
/// `last_heartbeat_at` decides.
pub const COUNT_CANDIDATES: &str = "SELECT count(*) FROM agent_connection \
     WHERE status = 'active' AND heartbeat_minute < now() - $1::float8 * interval '1 second' \
       AND last_heartbeat_at < now() - $1::float8 * interval '1 second'";
/// Active connections silent for at least $1 seconds (the stale window less the brake's window): the group the
/// brake judges once anything is stale.
pub const COUNT_GROUP: &str = "SELECT count(*) FROM agent_connection \
     WHERE status = 'active' AND heartbeat_minute < now() - $1::float8 * interval '1 second' \
       AND last_heartbeat_at < now() - $1::float8 * interval '1 second'";
const RELEASE_HOLD: &str = "UPDATE sweeper_state SET held_since = NULL WHERE task = $1 AND held_since IS NOT NULL";
/// Active connections (only counted when the brake holds for a heartbeat backlog, to report them).
pub const COUNT_ACTIVE: &str = "SELECT count(*) FROM agent_connection WHERE status = 'active'";
/// Active connections, counted up to $1 at most: enough to tell whether the candidates are a large share of them
/// without counting every active connection.
pub const COUNT_ACTIVE_UP_TO: &str =
    "SELECT count(*) FROM (SELECT 1 FROM agent_connection WHERE status = 'active' LIMIT $1) AS a";
/// Closes up to $2 connections past the stale threshold ($1 seconds), claimed with `SKIP LOCKED` (a connection
/// whose heartbeat is being applied is left to a later cycle) and re-checked in the update, so a heartbeat
/// committed meanwhile keeps its connection open.
pub const CLOSE_BATCH: &str = "WITH due AS ( \
        SELECT connection_id FROM agent_connection \
        WHERE status = 'active' AND heartbeat_minute < now() - $1::float8 * interval '1 second' \
          AND last_heartbeat_at < now() - $1::float8 * interval '1 second' \
        ORDER BY heartbeat_minute LIMIT $2 FOR UPDATE SKIP LOCKED) \
     UPDATE agent_connection c SET status = 'closed', close_reason = 'stale_connection', closed_at = now() \
     FROM due WHERE c.connection_id = due.connection_id AND c.status = 'active' \
       AND c.last_heartbeat_at < now() - $1::float8 * interval '1 second' \
     RETURNING c.connection_id, c.session_id, c.agent_id, c.last_heartbeat_at";

/// How many active connections to count so that the brake's ratio can be decided: one more than the most for which
/// `candidates` would still be at least `ratio` of them.
pub fn active_count_bound(candidates: i64, ratio: f64) -> i64 {
    let most = (candidates as f64 / ratio).floor();
    if most >= i64::MAX as f64 - 1.0 {
        i64::MAX
    } else {
        most as i64 + 1
    }
}

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
    let stale_now: i64 = one(client, COUNT_CANDIDATES, &[(&stale_secs, Type::FLOAT8)]).await?.get(0);
    let mut report = Report::default();
    if stale_now == 0 {
        client.query_typed(RELEASE_HOLD, &[(&TASK, Type::TEXT)]).await?;
        return Ok(report);
    }
    // Something is stale: the brake judges the whole group that went silent with it.
    let silent_secs = cfg.stale_after.saturating_sub(cfg.window).as_secs_f64();
    let group: i64 = one(client, COUNT_GROUP, &[(&silent_secs, Type::FLOAT8)]).await?.get(0);
    let candidates = group.max(stale_now);
    // The active count is only needed when the brake might apply. Behind on heartbeats, the brake holds and reports
    // the exact count; otherwise counting up to the bound that decides the ratio is enough (with a million active
    // connections and a few stale ones, that is a few index entries, not the whole index).
    let behind = backlog.is_some_and(|b| b > cfg.max_heartbeat_backlog);
    let active: i64 = if behind {
        one(client, COUNT_ACTIVE, &[]).await?.get(0)
    } else if candidates as u64 >= cfg.brake_min_connections {
        let bound = active_count_bound(candidates, cfg.brake_ratio);
        one(client, COUNT_ACTIVE_UP_TO, &[(&bound, Type::INT8)]).await?.get(0)
    } else {
        0
    };
    if let Some(reason) = brake_reason(cfg, candidates, active, backlog) {
        let tx = client.transaction().await?;
        let row = tx
            .query_typed(
                "UPDATE sweeper_state SET held_since = coalesce(held_since, now()) WHERE task = $1 \
                 RETURNING now() - held_since < $2::float8 * interval '1 second', now(), held_since = now()",
                &[(&TASK, Type::TEXT), (&cfg.max_hold.as_secs_f64(), Type::FLOAT8)],
            )
            .await?
            .pop()
            .ok_or_else(|| Error::MissingRow("sweeper_state has no row for the stale task".into()))?;
        let within_hold: bool = row.get(0);
        let now: DateTime<Utc> = row.get(1);
        let first: bool = row.get(2);
        if within_hold {
            // One line per hold, when it begins; the event and the metric count every cycle held.
            if first {
                tracing::warn!(reason, candidates, stale = stale_now, active, backlog = ?backlog, max_hold_secs = cfg.max_hold.as_secs(), "stale brake holds: closing no connection until it is released or held for its maximum");
            } else {
                tracing::debug!(reason, candidates, active, "stale brake still holding");
            }
            write_outbox(&tx, now, vec![EventBody::SweeperHeld { reason: reason.into(), candidates, active }]).await?;
            tx.commit().await?;
            outbox.committed();
            report.held = Some(Held { reason: reason.into(), candidates, active });
            return Ok(report);
        }
        tx.rollback().await?;
        tracing::warn!(reason, candidates, active, "stale brake held for its maximum; the verdict stands");
    }
    if client.typed_execute(RELEASE_HOLD, &[&TASK]).await? > 0 {
        tracing::info!(candidates, active, "stale brake released");
    }
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

/// The one row of a statement run with `query_typed` (unnamed, one round trip).
async fn one(client: &tokio_postgres::Client, sql: &str, params: &[(&(dyn ToSql + Sync), Type)]) -> Result<Row> {
    client.query_typed(sql, params).await?.pop().ok_or_else(|| Error::MissingRow(format!("no row from: {sql}")))
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
    fn the_active_count_bound_decides_the_ratio() {
        let c = cfg();
        for candidates in [20, 21, 999, 10_000] {
            let bound = active_count_bound(candidates, c.brake_ratio);
            assert_eq!(brake_reason(&c, candidates, bound - 1, Some(0)), Some("mass_stale"), "{candidates}");
            assert_eq!(brake_reason(&c, candidates, bound, Some(0)), None, "{candidates}");
        }
        assert_eq!(active_count_bound(10, 0.3), 34);
        assert_eq!(active_count_bound(i64::MAX, 0.5), i64::MAX);
    }

    #[test]
    fn brake_holds_when_behind() {
        let c = cfg();
        assert_eq!(brake_reason(&c, 1, 1000, Some(10_001)), Some("heartbeat_backlog"));
        assert_eq!(brake_reason(&c, 1, 1000, Some(10_000)), None);
        assert_eq!(brake_reason(&c, 1, 1000, None), None);
    }
}
