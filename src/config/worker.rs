//! `worker.*`: the worker's identity, how much it applies at once, and its shutdown grace (used by the consumers,
//! the heartbeat batches and the worker).

use std::num::NonZeroUsize;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Default `worker.session_activity_granularity_secs`: agent activity (a heartbeat, `connection.open`/`close`,
/// `instruction.ack`) moves its session's `last_activity_at` only when that is older than this.
pub const ACTIVITY_GRANULARITY_DEFAULT: Duration = Duration::from_secs(60);

/// `worker.*`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerSettings {
    /// This worker's identity in the relay lease, stable across its restarts (a pod or host name), so that a
    /// restarted worker takes its lease back at once; unique among the running workers. Empty: host, process and a
    /// random id, unique to each process (a restarted worker then waits for its old lease to expire).
    pub id: String,
    /// Heartbeat deliveries applied in one transaction at most.
    pub heartbeat_batch_size: NonZeroUsize,
    /// Heartbeat batches in flight at once: the next batch is applied while the previous one commits.
    pub heartbeat_pipeline: NonZeroUsize,
    /// Agent activity (a heartbeat, `connection.open`/`close`, `instruction.ack`) moves its session's
    /// `last_activity_at` only when that is older than this, in seconds; must be below
    /// `sweeper.session_inactive_after_secs`.
    pub session_activity_granularity_secs: u64,
    /// Commands applied at once (commands on one connection, instruction or session keep their order; a command waits
    /// only for its own object's earlier commands and a free lane).
    pub command_lanes: NonZeroUsize,
    /// On shutdown, how long the worker may take to finish what it holds; the rest is left unacknowledged (the
    /// broker redelivers it) and the process exits.
    pub shutdown_grace_secs: std::num::NonZeroU64,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            id: String::new(),
            heartbeat_batch_size: NonZeroUsize::new(1000).expect("not zero"),
            heartbeat_pipeline: NonZeroUsize::new(2).expect("not zero"),
            session_activity_granularity_secs: ACTIVITY_GRANULARITY_DEFAULT.as_secs(),
            command_lanes: NonZeroUsize::new(8).expect("not zero"),
            shutdown_grace_secs: super::nonzero(20),
        }
    }
}
