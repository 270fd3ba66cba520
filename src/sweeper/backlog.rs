//! The heartbeat backlog probe: how deep the heartbeat queues are, read through the worker's broker channel, for the
//! stale brake.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;

use super::catch_up;
use crate::amqp::Topology;

/// Reads the heartbeat queue depth for the stale brake.
///
/// A probe made with [`BacklogProbe::broker`] reads it through the worker's current broker channel; while there is
/// none (the broker is unreachable, so agents cannot be heard either) the stale task is skipped rather than trusting
/// a verdict the worker cannot check. The default probe ignores the backlog (library calls and tests that drive the
/// sweeper without a broker).
#[derive(Clone, Default)]
pub struct BacklogProbe {
    broker: Option<Arc<Mutex<Option<ProbeChannel>>>>,
    changed: Arc<tokio::sync::Notify>,
    progress: Arc<catch_up::Progress>,
}

/// A channel and the names to ask it about.
pub type ProbeChannel = (lapin::Channel, Topology);

/// What a probe says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backlog {
    /// Not measured, by choice.
    Ignored,
    /// Messages waiting in the heartbeat queue.
    Depth(u64),
    /// The broker cannot be asked now.
    Unavailable,
}

impl BacklogProbe {
    /// A probe that reads the queue through a channel set with [`BacklogProbe::set`].
    pub fn broker() -> Self {
        Self { broker: Some(Arc::default()), changed: Arc::default(), progress: Arc::default() }
    }

    /// The heartbeat consumer's progress, which the stale sweep waits for ([`catch_up`]).
    pub fn progress(&self) -> Arc<catch_up::Progress> {
        self.progress.clone()
    }

    /// Uses this channel from now on (`None`: the broker is unreachable).
    pub async fn set(&self, channel: Option<(lapin::Channel, Topology)>) {
        if let Some(b) = &self.broker {
            *b.lock().await = channel;
            self.changed.notify_waiters();
        }
    }

    /// Waits until the probe can be read (a broker probe has a channel), for at most `limit`.
    pub async fn wait_ready(&self, limit: Duration) {
        let Some(b) = &self.broker else { return };
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let changed = self.changed.notified();
            if b.lock().await.is_some() {
                return;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return;
            }
        }
    }

    /// The heartbeat backlog.
    pub async fn depth(&self) -> Backlog {
        let Some(b) = &self.broker else {
            return Backlog::Ignored;
        };
        let guard = b.lock().await;
        let Some((ch, topology)) = guard.as_ref() else {
            return Backlog::Unavailable;
        };
        match topology.heartbeat_backlog(ch).await {
            Ok(n) => Backlog::Depth(n),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the heartbeat queue depth");
                Backlog::Unavailable
            }
        }
    }
}
