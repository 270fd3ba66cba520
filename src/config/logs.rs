//! `logs.*`: how agents' log lines (`agent.log`) are kept. Its own file so that the section stays self-contained; with
//! the defaults of the ingest (`commands::log`) and of the `log_partitions` sweeper task.

use serde::{Deserialize, Serialize};

/// Default `logs.retention_days`.
pub const RETENTION_DAYS_DEFAULT: u32 = 7;
/// Default `logs.partitions_ahead_days`.
pub const PARTITIONS_AHEAD_DEFAULT: u32 = 2;
/// Default `logs.batch_messages`.
pub const BATCH_MESSAGES_DEFAULT: usize = 100;

/// `logs.*`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogsSettings {
    /// Days log lines are kept: a day's partition is dropped once all its lines are older than this.
    pub retention_days: u32,
    /// Daily partitions created ahead of today by the sweeper.
    pub partitions_ahead_days: u32,
    /// `agent.log` messages applied per transaction at most.
    pub batch_messages: usize,
}

impl Default for LogsSettings {
    fn default() -> Self {
        Self {
            retention_days: RETENTION_DAYS_DEFAULT,
            partitions_ahead_days: PARTITIONS_AHEAD_DEFAULT,
            batch_messages: BATCH_MESSAGES_DEFAULT,
        }
    }
}

impl LogsSettings {
    /// Checks the values; the error names the key.
    pub fn validate(&self) -> Result<(), super::ConfigError> {
        let bad = |key: &str, why: &str| Err(super::ConfigError(format!("logs.{key}: {why}")));
        if self.retention_days == 0 {
            return bad("retention_days", "must be at least 1");
        }
        if self.partitions_ahead_days == 0 || self.partitions_ahead_days > 31 {
            return bad("partitions_ahead_days", "must be 1-31");
        }
        if !(1..=1000).contains(&self.batch_messages) {
            return bad("batch_messages", "must be 1-1000");
        }
        Ok(())
    }
}
