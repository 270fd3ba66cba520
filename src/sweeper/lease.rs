//! Task leases: which worker runs a sweeper task, held in a `sweeper_lease` row with an expiry instead of a session
//! lock, so that the claim holds whatever server connection each statement of the run goes to (behind PgBouncer in
//! transaction pooling mode no session state survives a transaction).
//!
//! A claim is one short statement ([`CLAIM_TASK`]) that takes the row when it is free or expired, or renews it when
//! it is the claimer's own; while the run goes on, a background task renews it every third of its length; the run
//! frees it at the end ([`RELEASE_TASK`]). A holder that dies, hangs or loses the database loses the task when the
//! lease expires, and another worker takes it on its next cycle. Rows are still claimed with
//! `FOR UPDATE SKIP LOCKED` and re-checked in the statement that changes them, so even two runs at once (a lease lost
//! to a stall) change each row once; a run that finds its lease lost stops between batches.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Object, Pool};
use tokio::task::JoinHandle;

use crate::config::SweeperSettings;
use crate::db::Sql;
use crate::error::Result;

/// Takes (or renews) task $1's lease for holder $2 for $3 seconds; returns a row when the lease is $2's now, none when
/// another holder's lease has not expired.
pub const CLAIM_TASK: &str = "INSERT INTO sweeper_lease AS l (task, holder, expires_at) \
     VALUES ($1, $2, now() + $3::float8 * interval '1 second') \
     ON CONFLICT (task) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at \
     WHERE l.holder = excluded.holder OR l.expires_at <= now() \
     RETURNING l.expires_at";
/// Frees task $1's lease if holder $2 still has it.
pub const RELEASE_TASK: &str =
    "UPDATE sweeper_lease SET expires_at = '-infinity' WHERE task = $1 AND holder = $2 AND expires_at > '-infinity'";

/// The shortest lease derived from `sweeper.check_interval_secs`.
pub const MIN_DERIVED: Duration = Duration::from_secs(10);

/// The lease length of `sweeper.task_lease_secs`, or when it is 0, twice `sweeper.check_interval_secs` and at least
/// [`MIN_DERIVED`]: long enough that a renewal every third of it survives a slow statement, short enough that a dead
/// holder's tasks are taken over within a couple of cycles.
pub fn length(s: &SweeperSettings) -> Duration {
    if s.task_lease_secs > 0 {
        Duration::from_secs(s.task_lease_secs)
    } else {
        Duration::from_secs(2 * s.check_interval_secs.get()).max(MIN_DERIVED)
    }
}

/// Who claims, and for how long.
#[derive(Debug, Clone)]
pub struct Lease {
    /// The holder's name in `sweeper_lease.holder`: host, process and a random id (several sweepers may share a
    /// process).
    pub holder: String,
    /// How long a claim or renewal lasts.
    pub length: Duration,
}

impl Lease {
    /// A new holder with leases of `length`.
    pub fn new(length: Duration) -> Self {
        let host = std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()).unwrap_or_else(|| "localhost".into());
        let id = uuid::Uuid::new_v4().simple().to_string();
        Self { holder: format!("{host}/{}/{}", std::process::id(), &id[..8]), length }
    }

    /// Claims `task` in one statement: `true` when it is this holder's now.
    pub async fn claim(&self, client: &impl Sql, task: &str) -> Result<bool> {
        let secs = self.length.as_secs_f64();
        Ok(client.typed_opt(CLAIM_TASK, &[&task, &self.holder, &secs]).await?.is_some())
    }

    /// Frees `task` if this holder has it.
    pub async fn release(&self, client: &impl Sql, task: &str) -> Result<()> {
        client.typed_execute(RELEASE_TASK, &[&task, &self.holder]).await?;
        Ok(())
    }
}

/// A task claimed by this worker: its lease, kept alive by a renewal task, and a pooled connection for the run.
///
/// [`Claim::release`] frees the lease and returns the connection to the pool. A claim dropped without it (an error,
/// a cancelled cycle) stops renewing and frees the lease in the background.
pub(crate) struct Claim {
    client: Option<Object>,
    task: &'static str,
    lease: Arc<Lease>,
    lost: Arc<AtomicBool>,
    renewal: JoinHandle<()>,
}

impl Claim {
    /// Claims `task`; `None` when another worker holds it.
    pub(crate) async fn take(pool: &Pool, lease: &Arc<Lease>, task: &'static str) -> Result<Option<Claim>> {
        let client = crate::db::checkout(pool).await?;
        if !lease.claim(&client, task).await? {
            return Ok(None);
        }
        let lost = Arc::new(AtomicBool::new(false));
        let renewal = tokio::spawn(renew(pool.clone(), lease.clone(), task, lost.clone()));
        Ok(Some(Claim { client: Some(client), task, lease: lease.clone(), lost, renewal }))
    }

    /// The connection of the run.
    pub(crate) fn client(&mut self) -> &mut Object {
        self.client.as_mut().expect("a claim holds its connection until released")
    }

    /// Set once a renewal found the lease taken by another worker (after it expired): the run should stop.
    pub(crate) fn lost(&self) -> Arc<AtomicBool> {
        self.lost.clone()
    }

    /// Frees the lease and returns the connection to the pool.
    pub(crate) async fn release(mut self) {
        self.renewal.abort();
        let Some(client) = self.client.take() else { return };
        if let Err(e) = self.lease.release(&client, self.task).await {
            tracing::warn!(task = self.task, error = %e, "cannot free the sweeper task's lease; it expires on its own");
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.renewal.abort();
        if let Some(client) = self.client.take() {
            tracing::debug!(task = self.task, "sweeper task ended early; freeing its lease");
            let (lease, task) = (self.lease.clone(), self.task);
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = lease.release(&client, task).await;
                });
            }
        }
    }
}

/// Renews the lease every third of its length until aborted; marks it lost when another worker has taken it.
async fn renew(pool: Pool, lease: Arc<Lease>, task: &'static str, lost: Arc<AtomicBool>) {
    let every = lease.length / 3;
    loop {
        tokio::time::sleep(every).await;
        let renewed = match crate::db::checkout(&pool).await {
            Ok(client) => lease.claim(&client, task).await,
            Err(e) => Err(e),
        };
        match renewed {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(task, "sweeper task's lease expired and was taken by another worker; stopping the run");
                lost.store(true, Ordering::Relaxed);
                return;
            }
            Err(e) => tracing::warn!(task, error = %e, "cannot renew the sweeper task's lease; retrying"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lease_is_twice_the_check_interval_and_at_least_ten_seconds_unless_set() {
        let mut s = SweeperSettings::default();
        assert_eq!(length(&s), Duration::from_secs(60), "default: twice the 30 s interval");
        s.check_interval_secs = 1.try_into().unwrap();
        assert_eq!(length(&s), MIN_DERIVED);
        s.task_lease_secs = 3;
        assert_eq!(length(&s), Duration::from_secs(3));
    }
}
