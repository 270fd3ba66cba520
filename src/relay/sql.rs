//! The relay's statements: the relay lease (take, renew, give back), the claim of a batch and the delete of a published
//! one. Each is its own short transaction, sent through [`Sql`] (prepared once per connection, or unnamed behind a
//! transaction pooler); the claim is always sent unnamed ([`Unnamed`]), planned for its parameters.

use deadpool_postgres::Pool;
use uuid::Uuid;

use crate::db::{Param, Sql, Unnamed};
use crate::error::Result;

/// Takes the relay lease for holder $1, run $3, for $2 seconds when it has expired or is already $1's (the same run
/// renewing it, or a restarted run of the same worker taking it back at once); returns one row when $1/$3 holds it
/// afterwards, saying whether another run of $1 held it unexpired (two live processes with one `worker.id`, or the
/// run this one replaces). Two relays that try at once are serialised by the row lock, and the second finds the
/// lease taken when it re-checks the row.
pub const ACQUIRE: &str = "WITH old AS (SELECT holder, instance, lease_until FROM outbox_relay FOR UPDATE) \
     UPDATE outbox_relay r SET holder = $1, instance = $3, lease_until = now() + make_interval(secs => $2), \
       acquired_at = CASE WHEN old.holder = $1 AND old.instance = $3 AND old.lease_until > now() \
         THEN r.acquired_at ELSE now() END \
     FROM old WHERE old.lease_until < now() OR old.holder = $1 \
     RETURNING old.instance <> $3 AND old.lease_until > now()";

/// Renews the lease of holder $1, run $3, to $2 seconds from now while it still holds it (between claims, while
/// batches await their confirms); returns a row when it does.
pub const RENEW: &str = "UPDATE outbox_relay SET lease_until = now() + make_interval(secs => $2) \
     WHERE holder = $1 AND instance = $3 AND lease_until > now() RETURNING 1";

/// Gives the lease of holder $1, run $2, back (at shutdown), so that a standby relay takes over at its next look.
pub const RELEASE: &str = "UPDATE outbox_relay SET lease_until = '-infinity' WHERE holder = $1 AND instance = $2";

/// Claims a batch for holder $1, run $7, while it holds the lease: up to $6 events in id order, with an id above $3 (or any
/// id when $4 is true: a rescan from the oldest row), except the ids in $5 (batches still in flight). Nothing is
/// written to the events. The lease is renewed to $2 seconds when less than $2 - 1 seconds are left, so a claim
/// writes (and waits for a WAL flush) at most about once a second.
///
/// Returns no row when $1/$7 does not hold the lease; otherwise one row per event, or one row of NULLs when there is
/// none. With $4 false the scan starts at $3 in the primary key, past the rows deleted since the last rescan.
pub const CLAIM: &str = "WITH renew AS ( \
       UPDATE outbox_relay SET lease_until = now() + make_interval(secs => $2) \
       WHERE holder = $1 AND instance = $7 AND lease_until > now() \
         AND lease_until < now() + make_interval(secs => $2 - 1)), \
     held AS (SELECT 1 FROM outbox_relay WHERE holder = $1 AND instance = $7 AND lease_until > now()) \
     SELECT e.id, e.event_id, e.event_type, e.payload::text, e.traceparent, e.tracestate FROM held LEFT JOIN LATERAL ( \
       SELECT id, event_id, event_type, payload, traceparent, tracestate FROM event_outbox \
       WHERE (id > $3 OR $4) AND id <> ALL($5) ORDER BY id LIMIT $6) e ON true";

/// Deletes a batch the broker confirmed. Whoever holds the lease by now, these events are published.
pub const DELETE: &str = "DELETE FROM event_outbox WHERE id = ANY($1)";

/// Events not yet published (all rows), and the creation time of the oldest.
pub const BACKLOG: &str = "SELECT count(*), min(created_at), now() FROM event_outbox";

/// One event of a claimed batch.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// Its outbox id.
    pub id: i64,
    /// Its `event_id` (the AMQP `message_id`).
    pub event_id: Uuid,
    /// Its `event_type` (the routing key).
    pub event_type: String,
    /// The stored JSON as PostgreSQL prints it.
    pub body: String,
    /// The W3C trace context it was written in (`traceparent`, `tracestate`), published as headers.
    pub trace: (Option<String>, Option<String>),
}

/// What a claim is after.
#[derive(Debug, Clone, Default)]
pub struct Window {
    /// Only ids above this (unless `rescan`).
    pub after: i64,
    /// From the oldest row, whatever `after` says.
    pub rescan: bool,
    /// Ids of batches in flight, left out.
    pub skip: Vec<i64>,
}

/// Who holds the relay lease: the worker and its run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayIdentity {
    /// The worker: `worker.id` when configured (stable across restarts), else host, process and a random id.
    pub holder: String,
    /// This run of it: a random id per process start.
    pub instance: String,
}

/// What [`acquire`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquired {
    /// Another relay holds the lease.
    No,
    /// This relay holds it (it was free, expired or already its own).
    Yes,
    /// This relay took it from another unexpired run of the same holder: a restart, or two live processes with one
    /// `worker.id`.
    FromSameHolder,
}

/// Takes (or renews) the lease for `who`.
pub async fn acquire(pool: &Pool, who: &RelayIdentity, lease_secs: f64) -> Result<Acquired> {
    let client = crate::db::checkout(pool).await?;
    let rows = client.typed_query(ACQUIRE, &[&who.holder as &dyn Param, &lease_secs, &who.instance]).await?;
    Ok(match rows.first() {
        None => Acquired::No,
        Some(r) if r.get::<_, bool>(0) => Acquired::FromSameHolder,
        Some(_) => Acquired::Yes,
    })
}

/// Renews the lease of `who` while it holds it; whether it still does.
pub async fn renew(pool: &Pool, who: &RelayIdentity, lease_secs: f64) -> Result<bool> {
    let client = crate::db::checkout(pool).await?;
    let rows = client.typed_query(RENEW, &[&who.holder as &dyn Param, &lease_secs, &who.instance]).await?;
    Ok(!rows.is_empty())
}

/// Gives the lease of `who` back, if it holds it.
pub async fn release(pool: &Pool, who: &RelayIdentity) -> Result<()> {
    let client = crate::db::checkout(pool).await?;
    client.typed_execute(RELEASE, &[&who.holder, &who.instance]).await?;
    Ok(())
}

/// Claims up to `limit` events for `who`, in id order; `None` when `who` does not hold the lease.
pub async fn claim(
    pool: &Pool,
    who: &RelayIdentity,
    lease_secs: f64,
    w: &Window,
    limit: i64,
) -> Result<Option<Vec<Claimed>>> {
    let client = crate::db::checkout(pool).await?;
    // Unnamed: a kept generic plan for this claim (`id > $3 OR $4`) can scan the whole outbox.
    let rows = Unnamed(&client)
        .typed_query(
            CLAIM,
            &[&who.holder as &dyn Param, &lease_secs, &w.after, &w.rescan, &w.skip, &limit, &who.instance],
        )
        .await?;
    if rows.is_empty() {
        return Ok(None);
    }
    let mut batch = Vec::with_capacity(rows.len());
    for r in &rows {
        if let Some(id) = r.get::<_, Option<i64>>(0) {
            let trace = (r.get(4), r.get(5));
            batch.push(Claimed { id, event_id: r.get(1), event_type: r.get(2), body: r.get(3), trace });
        }
    }
    // The lateral subquery's order is not promised through the join: publish in id order.
    batch.sort_unstable_by_key(|e| e.id);
    Ok(Some(batch))
}

/// Deletes published events by id.
pub async fn delete(pool: &Pool, ids: &[i64]) -> Result<u64> {
    let client = crate::db::checkout(pool).await?;
    Ok(client.typed_execute(DELETE, &[&ids]).await?)
}

/// Unpublished events and the age of the oldest, in seconds.
pub async fn backlog(pool: &Pool) -> Result<(i64, f64)> {
    let client = crate::db::checkout(pool).await?;
    let row = client.typed_one(BACKLOG, &[]).await?;
    let oldest: Option<chrono::DateTime<chrono::Utc>> = row.get(1);
    let now: chrono::DateTime<chrono::Utc> = row.get(2);
    let age = oldest.map(|o| (now - o).num_milliseconds() as f64 / 1000.0).unwrap_or(0.0);
    Ok((row.get(0), age))
}
