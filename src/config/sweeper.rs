//! `sweeper.*`: the cycle and the thresholds of the sweeper's tasks, with their defaults (and the retention task's
//! `sweeper.idempotency_retention_secs` default). The tasks (`crate::sweeper`) read them from here.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Default `sweeper.check_interval_secs`: time between cycles.
pub const CHECK_INTERVAL_DEFAULT: Duration = Duration::from_secs(30);
/// Default `sweeper.batch_size`: rows changed per statement (and transaction).
pub const BATCH_SIZE_DEFAULT: i64 = 1000;
/// Default `sweeper.parallel_batches`: batch transactions a task runs at once.
pub const PARALLEL_BATCHES_DEFAULT: std::num::NonZeroUsize = std::num::NonZeroUsize::new(3).expect("not zero");

// The stale-connection task (`sweeper::stale_connections`).
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

// The inactive-session task (`sweeper::inactive_sessions`).
/// Default `session_inactive_after_secs`.
pub const INACTIVE_AFTER_DEFAULT: Duration = Duration::from_secs(3600);

// The instruction-expiry task (`sweeper::instruction_expiry`).
/// Default `instruction_retry_window_secs`.
pub const RETRY_WINDOW_DEFAULT: Duration = Duration::from_secs(300);

// The retention task (`sweeper::retention`).
/// Default `sweeper.idempotency_retention_secs`: one day.
pub const RETENTION_DEFAULT: Duration = Duration::from_secs(86_400);

/// `sweeper.*`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SweeperSettings {
    /// Seconds between cycles; the first runs at start.
    pub check_interval_secs: std::num::NonZeroU64,
    /// A connection without a heartbeat for this long is stale.
    pub connection_stale_after_secs: std::num::NonZeroU64,
    /// A session without agent activity for this long is inactive.
    pub session_inactive_after_secs: std::num::NonZeroU64,
    /// A retried instruction's new deadline is now plus this.
    pub instruction_retry_window_secs: std::num::NonZeroU64,
    /// The brake needs at least this many stale candidates.
    pub stale_brake_min_connections: u64,
    /// ... and at least this share of the active connections.
    pub stale_brake_ratio: f64,
    /// A heartbeat queue deeper than this means the worker is behind: hold.
    pub max_heartbeat_backlog: u64,
    /// Longest hold in a row; after it the verdict stands.
    pub stale_brake_max_hold_secs: u64,
    /// The brake counts, beside the stale connections, those that go stale within this many seconds (the group that
    /// went silent together); 0: half of `connection_stale_after_secs`.
    pub stale_brake_window_secs: u64,
    /// Rows changed per statement (and transaction).
    pub batch_size: i64,
    /// Batch transactions a task runs at once when more than one batch is due.
    pub parallel_batches: std::num::NonZeroUsize,
    /// Length of a task's lease; 0: derived from `check_interval_secs` ([`crate::sweeper::lease::length`]).
    pub task_lease_secs: u64,
    /// Idempotency records (the `message_id`s of applied commands) are deleted after this long: a command sent
    /// again with the same `message_id` within it is answered with the first reply and not applied again.
    pub idempotency_retention_secs: u64,
}

impl Default for SweeperSettings {
    fn default() -> Self {
        Self {
            check_interval_secs: super::nonzero(CHECK_INTERVAL_DEFAULT.as_secs()),
            connection_stale_after_secs: super::nonzero(STALE_AFTER_DEFAULT.as_secs()),
            session_inactive_after_secs: super::nonzero(INACTIVE_AFTER_DEFAULT.as_secs()),
            instruction_retry_window_secs: super::nonzero(RETRY_WINDOW_DEFAULT.as_secs()),
            stale_brake_min_connections: BRAKE_MIN_CONNECTIONS_DEFAULT,
            stale_brake_ratio: BRAKE_RATIO_DEFAULT,
            max_heartbeat_backlog: MAX_HEARTBEAT_BACKLOG_DEFAULT,
            stale_brake_max_hold_secs: MAX_HOLD_DEFAULT.as_secs(),
            stale_brake_window_secs: 0,
            batch_size: BATCH_SIZE_DEFAULT,
            parallel_batches: PARALLEL_BATCHES_DEFAULT,
            task_lease_secs: 0,
            idempotency_retention_secs: RETENTION_DEFAULT.as_secs(),
        }
    }
}
