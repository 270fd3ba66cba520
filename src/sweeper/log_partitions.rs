//! Keeps `agent_log`'s daily partitions: creates today's and the next `logs.partitions_ahead_days` days' ahead of
//! time, and drops whole partitions whose lines are all older than `logs.retention_days` (a `DROP TABLE` instead of
//! deleting rows: no dead tuples, no vacuum).
//!
//! A partition `agent_log_YYYYMMDD` holds the lines received (database clock) on that UTC day. The task first reads
//! the partitions that exist (read-only) and claims its lease only when one is missing or due to be dropped. The
//! changes to `agent_log` are made in one short transaction holding the ingest lock ([`LOG_LOCK`]), so they never
//! race an ingest that creates a missing day itself: days are created and due partitions detached (`DETACH
//! PARTITION`, a change of the catalog only). The detached tables are dropped after that transaction, each on its
//! own: removing a day's files takes seconds at millions of lines (about 1 ms per MB on the disk measured in
//! BENCHMARKS.md), and nothing waits for it then, since no statement reads a detached table. A detached table whose
//! drop did not happen (the worker stopped in between) is dropped by the next run; it is marked as the task's own
//! with a comment, so a table an operator detached to keep is left alone.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use deadpool_postgres::{GenericClient, Pool};

use super::lease::{Claim, Lease};
use super::mark_run;
use crate::commands::log::{create_day, partition_day, partition_name, LOG_LOCK};
use crate::config::Settings;
use crate::db::Sql;
use crate::error::Result;

/// Task name (its `sweeper_state` row).
pub const TASK: &str = "log_partitions";
/// The longest a partition change waits for the table's lock before the task gives up until the next cycle.
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(5);

/// What this task needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// Days lines are kept.
    pub retention_days: u32,
    /// Days created ahead of today.
    pub ahead_days: u32,
}

impl From<&Settings> for Config {
    fn from(s: &Settings) -> Self {
        Self { retention_days: s.logs.retention_days, ahead_days: s.logs.partitions_ahead_days }
    }
}

/// What a run changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Report {
    /// Partitions created.
    pub created: u64,
    /// Partitions dropped.
    pub dropped: u64,
}

/// What a run writes on a partition it detaches, so that a later run knows the table is its own to drop (and leaves
/// alone one an operator detached to keep).
pub const DETACHED: &str = "detached by the log_partitions task, to be dropped";

/// The database's time, the partitions of `agent_log` by name, and the tables this task detached and has not dropped
/// (an earlier run stopped in between), in the schema of `agent_log`.
const PARTITIONS: &str = "SELECT now(), \
     (SELECT coalesce(array_agg(c.relname::text), '{}') FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
      WHERE i.inhparent = 'agent_log'::regclass), \
     (SELECT coalesce(array_agg(c.relname::text), '{}') FROM pg_class c \
      WHERE c.relkind = 'r' AND NOT c.relispartition AND c.relname ~ '^agent_log_[0-9]{8}$' \
        AND c.relnamespace = (SELECT relnamespace FROM pg_class WHERE oid = 'agent_log'::regclass) \
        AND obj_description(c.oid, 'pg_class') = $1)";

/// What is to be done at `now`: the days to create and the partitions to drop, given those that exist.
pub fn plan(now: DateTime<Utc>, existing: &[String], cfg: &Config) -> (Vec<NaiveDate>, Vec<String>) {
    let today = now.date_naive();
    let create = (0..=cfg.ahead_days)
        .filter_map(|i| today.checked_add_days(chrono::Days::new(u64::from(i))))
        .filter(|d| !existing.contains(&partition_name(*d)))
        .collect();
    // A day's lines are all older than the retention once its end (the next midnight) is.
    let keep_after = now - chrono::Duration::days(i64::from(cfg.retention_days));
    let drop = existing
        .iter()
        .filter(|n| {
            partition_day(n)
                .and_then(|d| d.succ_opt())
                .is_some_and(|end| end.and_hms_opt(0, 0, 0).map(|t| t.and_utc()) <= Some(keep_after))
        })
        .cloned()
        .collect();
    (create, drop)
}

/// Runs once; `None` when another worker is running this task.
pub async fn run_once(pool: &Pool, lease: &Arc<Lease>, cfg: &Config) -> Result<Option<Report>> {
    let (now, existing, detached) = {
        let client = pool.get().await?;
        let row = client.typed_one(PARTITIONS, &[&DETACHED]).await?;
        (row.get::<_, DateTime<Utc>>(0), row.get::<_, Vec<String>>(1), row.get::<_, Vec<String>>(2))
    };
    let (create, detach) = plan(now, &existing, cfg);
    if create.is_empty() && detach.is_empty() && detached.is_empty() {
        return Ok(Some(Report::default()));
    }
    let Some(mut claim) = Claim::take(pool, lease, TASK).await? else {
        return Ok(None);
    };
    let mut report = Report::default();
    let client = claim.client();
    let tx = client.transaction().await?;
    tx.batch_execute(&format!("SET LOCAL lock_timeout = '{}ms'", LOCK_TIMEOUT.as_millis())).await?;
    tx.typed_execute("SELECT pg_advisory_xact_lock($1)", &[&LOG_LOCK]).await?;
    for day in create {
        create_day(&tx, day).await?;
        report.created += 1;
    }
    for name in &detach {
        tx.batch_execute(&format!(
            "ALTER TABLE agent_log DETACH PARTITION {name}; COMMENT ON TABLE {name} IS '{DETACHED}'"
        ))
        .await?;
    }
    mark_run(&tx, TASK).await?;
    tx.commit().await?;
    // Outside the ingest lock: each drop takes only its own table's lock, which nothing else asks for.
    for name in detach.iter().chain(&detached) {
        client.batch_execute(&format!("DROP TABLE IF EXISTS {name}")).await?;
        tracing::info!(partition = %name, retention_days = cfg.retention_days, "log partition dropped");
        report.dropped += 1;
    }
    claim.release().await;
    Ok(Some(report))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).expect("a time").with_timezone(&Utc)
    }

    #[test]
    fn missing_days_ahead_are_created_and_days_past_the_retention_dropped() {
        let cfg = Config { retention_days: 7, ahead_days: 2 };
        let existing = vec!["agent_log_20261125".to_string(), "agent_log_20261126".into(), "agent_log_20261203".into()];
        let (create, drop) = plan(at("2026-12-03T10:00:00Z"), &existing, &cfg);
        let names: Vec<String> = create.into_iter().map(partition_name).collect();
        assert_eq!(names, ["agent_log_20261204", "agent_log_20261205"]);
        // 11-25 ended on 11-26 00:00, more than 7 days before 12-03 10:00; 11-26's lines end 11-27 00:00, within.
        assert_eq!(drop, ["agent_log_20261125"]);
    }

    #[test]
    fn names_and_days_round_trip() {
        let d = NaiveDate::from_ymd_opt(2026, 1, 9).expect("a day");
        assert_eq!(partition_day(&partition_name(d)), Some(d));
        assert_eq!(partition_day("agent_log_default"), None);
    }
}
