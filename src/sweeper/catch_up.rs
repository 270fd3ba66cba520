//! Whether this worker is caught up with its heartbeats, so that the stale sweep never judges a live agent by a
//! heartbeat the worker holds but has not applied, or has not even read yet.
//!
//! The heartbeat consumer numbers every delivery as it arrives from the broker ([`Progress::receive`]) and reports
//! each finished batch ([`Progress::settle`]); batches finish in order, so one number says that everything received
//! up to it is applied (or refused). A stale sweep first waits until everything received before it started is
//! settled ([`Progress::caught_up`]). Deliveries the broker sent while the worker was paused (SIGSTOP, a frozen VM)
//! are not received until it runs again, so the worker also watches its own clock: a monitor task beats every
//! [`BEAT`]; a gap of more than [`PAUSE_GAP`] between beats, or a consumer that (re)started, is a pause, and the
//! sweep waits [`SETTLE`] after one before taking its count, time for the socket's backlog to be read.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{Backlog, BacklogProbe};
use crate::metrics::Metrics;

/// How often the monitor beats.
pub const BEAT: Duration = Duration::from_millis(100);
/// A longer gap between beats means the worker was paused.
pub const PAUSE_GAP: Duration = Duration::from_millis(1000);
/// How long after a pause the sweep waits before counting what was received.
pub const SETTLE: Duration = Duration::from_millis(1000);

/// The heartbeat consumer's progress and the worker's pauses, shared by the consumer and the sweeper.
#[derive(Debug)]
pub struct Progress {
    origin: Instant,
    received: AtomicU64,
    settled: AtomicU64,
    /// Milliseconds since `origin` of the monitor's last beat (0: it has not beaten).
    beat_ms: AtomicU64,
    /// Milliseconds since `origin` at which the last pause ended (0: none).
    pause_end_ms: AtomicU64,
    /// Milliseconds since `origin` since which the stale sweep has been put off in a row (0: it is not).
    deferred_since_ms: AtomicU64,
    changed: Notify,
}

impl Default for Progress {
    fn default() -> Self {
        Self {
            origin: Instant::now(),
            received: AtomicU64::new(0),
            settled: AtomicU64::new(0),
            beat_ms: AtomicU64::new(0),
            pause_end_ms: AtomicU64::new(0),
            deferred_since_ms: AtomicU64::new(0),
            changed: Notify::new(),
        }
    }
}

impl Progress {
    fn ms(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.origin).as_millis()).unwrap_or(u64::MAX).max(1)
    }

    /// A delivery arrived: its number (deliveries are numbered in the order they arrive).
    pub fn receive(&self) -> u64 {
        self.received.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Every delivery up to `seq` is applied or refused.
    pub fn settle(&self, seq: u64) {
        self.settled.fetch_max(seq, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    /// The consumer (re)started: what it held went back to the broker, and the worker may have missed heartbeats
    /// meanwhile, so it counts as a pause.
    pub fn restarted(&self) {
        self.settle(self.received.load(Ordering::SeqCst));
        self.paused();
    }

    /// A pause ended now (the monitor saw a gap, a consumer restarted, the database was unreachable).
    pub fn paused(&self) {
        self.pause_end_ms.fetch_max(self.ms(Instant::now()), Ordering::SeqCst);
    }

    /// Whether a pause ended within `d`.
    pub fn paused_within(&self, d: Duration) -> bool {
        let end = self.pause_end_ms.load(Ordering::SeqCst);
        end != 0 && self.ms(Instant::now()).saturating_sub(end) < u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
    }

    /// Beats every [`BEAT`] until shutdown; a longer gap than [`PAUSE_GAP`] is logged and recorded as a pause.
    pub async fn monitor(self: Arc<Self>, shutdown: CancellationToken) {
        let mut last = Instant::now();
        self.beat_ms.store(self.ms(last), Ordering::SeqCst);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(BEAT) => {}
            }
            let now = Instant::now();
            let gap = now - last;
            if gap > PAUSE_GAP {
                tracing::warn!(
                    paused_ms = gap.as_millis() as u64,
                    "the worker was paused; the stale sweep waits for its heartbeats"
                );
                self.paused();
            }
            last = now;
            self.beat_ms.store(self.ms(now), Ordering::SeqCst);
        }
    }

    /// Waits until every heartbeat received before this call (after a pause: before [`SETTLE`] after it) is settled,
    /// for at most `limit`; whether it is.
    pub async fn caught_up(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        let now = self.ms(Instant::now());
        // A pause the monitor has not noticed yet (this task may run first after one): its beat is late.
        let beat = self.beat_ms.load(Ordering::SeqCst);
        if beat != 0 && now.saturating_sub(beat) > PAUSE_GAP.as_millis() as u64 {
            self.paused();
        }
        let end = self.pause_end_ms.load(Ordering::SeqCst);
        let settle_ms = SETTLE.as_millis() as u64;
        if end != 0 && self.ms(Instant::now()).saturating_sub(end) < settle_ms {
            let wait = Duration::from_millis(settle_ms - self.ms(Instant::now()).saturating_sub(end));
            if tokio::time::timeout_at(deadline, tokio::time::sleep(wait)).await.is_err() {
                return false;
            }
        }
        let target = self.received.load(Ordering::SeqCst);
        loop {
            let changed = self.changed.notified();
            if self.settled.load(Ordering::SeqCst) >= target {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return self.settled.load(Ordering::SeqCst) >= target;
            }
        }
    }
}

/// Whether the stale sweep may judge now: this worker has applied every heartbeat it received before the sweep
/// (after a pause, [`SETTLE`] after it), and, when it was paused within the stale window `stale`, the heartbeat queue
/// is empty (what it holds was sent while the worker was paused or catching up). It waits for that up to `patience`
/// (a sweeper interval and the settle time), so the cycle's other tasks are not held up; when the worker is not caught
/// up by then, the sweep is put off to the next cycle, for at most `stale` in a row: after that it judges all the same
/// (counted in `acm_sweeper_stale_catch_up_timeouts_total`), since any heartbeat still queued was sent after the
/// pause and its older ones expired. A live agent is so judged by its latest heartbeat, not one the worker holds.
pub(crate) async fn ready(probe: &BacklogProbe, metrics: &Metrics, stale: Duration, patience: Duration) -> bool {
    let progress = probe.progress();
    let started = tokio::time::Instant::now();
    let mut caught = progress.caught_up(patience).await;
    if caught && progress.paused_within(stale) {
        loop {
            match probe.depth().await {
                Backlog::Depth(0) | Backlog::Ignored => break,
                Backlog::Depth(_) | Backlog::Unavailable if started.elapsed() < patience => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    caught = progress.caught_up(patience.saturating_sub(started.elapsed())).await;
                }
                _ => {
                    caught = false;
                    break;
                }
            }
        }
    }
    let now = progress.ms(Instant::now());
    if caught {
        progress.deferred_since_ms.store(0, Ordering::SeqCst);
        return true;
    }
    let since = match progress.deferred_since_ms.compare_exchange(0, now, Ordering::SeqCst, Ordering::SeqCst) {
        Ok(_) => now,
        Err(earlier) => earlier,
    };
    if now.saturating_sub(since) < u64::try_from(stale.as_millis()).unwrap_or(u64::MAX) {
        tracing::info!(
            deferred_ms = now - since,
            "catching up with received heartbeats: stale connections are judged next cycle"
        );
        return false;
    }
    metrics.stale_catch_up_timeouts.inc();
    tracing::warn!(
        deferred_ms = now - since,
        "heartbeats received by this worker are still not all applied after the stale window; judging stale connections all the same"
    );
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn caught_up_waits_for_what_was_received_before() {
        let p = Progress::default();
        assert!(p.caught_up(Duration::from_millis(10)).await, "nothing received");
        let a = p.receive();
        let _b = p.receive();
        assert!(!p.caught_up(Duration::from_millis(20)).await, "two received, none settled");
        p.settle(a);
        assert!(!p.caught_up(Duration::from_millis(20)).await, "one of two settled");
        p.restarted();
        assert!(p.paused_within(Duration::from_secs(5)));
        let started = Instant::now();
        assert!(p.caught_up(Duration::from_secs(5)).await, "a restart gives back what was held");
        assert!(started.elapsed() >= SETTLE - Duration::from_millis(50), "waited the settle time after the pause");
    }
}
