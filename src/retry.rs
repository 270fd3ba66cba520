//! Exponential backoff with jitter, for transient failures of the database or the broker.

use std::future::Future;
use std::time::Duration;

use rand::Rng;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};

/// Capped exponential backoff: 100 ms, 200 ms, ... up to 10 s, each with up to 50% random jitter added.
#[derive(Debug, Clone)]
pub struct Backoff {
    attempt: u32,
    base: Duration,
    cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { attempt: 0, base: Duration::from_millis(100), cap: Duration::from_secs(10) }
    }
}

/// Longest delay between two attempts of [`retry_transient`]: work held while the database is unreachable (a
/// delivery, a heartbeat batch) is tried again at least this often, so it resumes within about this long (plus
/// jitter) of the database's return — or of a standby's promotion — however long the outage lasted.
pub const HELD_WORK_RETRY_CAP: Duration = Duration::from_secs(2);

impl Backoff {
    /// The default backoff with its delays capped at `cap` (before jitter).
    pub fn capped(cap: Duration) -> Self {
        Self { cap, ..Self::default() }
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let exp = self.base.saturating_mul(1u32 << self.attempt.min(16)).min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        let jitter = rand::rng().random_range(0.0..0.5);
        exp.mul_f64(1.0 + jitter)
    }

    /// Attempts made so far.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// Sleeps the next delay; `false` when shutdown came first.
    pub async fn wait(&mut self, shutdown: &CancellationToken) -> bool {
        let d = self.next_delay();
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }
}

/// Runs `op` until it succeeds, retrying transient failures with backoff capped at [`HELD_WORK_RETRY_CAP`] (each
/// logged), returning any other failure at once, and [`Error::Shutdown`] when shutdown interrupts the wait.
pub async fn retry_transient<T, F, Fut>(what: &str, shutdown: &CancellationToken, mut op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut backoff = Backoff::capped(HELD_WORK_RETRY_CAP);
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, attempt = backoff.attempts() + 1, "{what} failed; retrying");
                if !backoff.wait(shutdown).await {
                    return Err(Error::Shutdown);
                }
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let mut b = Backoff::default();
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(100) && first <= Duration::from_millis(150));
        for _ in 0..30 {
            assert!(b.next_delay() <= Duration::from_secs(15));
        }
        assert!(b.next_delay() >= Duration::from_secs(10));
        let mut b = Backoff::capped(HELD_WORK_RETRY_CAP);
        for _ in 0..30 {
            assert!(b.next_delay() <= HELD_WORK_RETRY_CAP.mul_f64(1.5));
        }
    }
}
