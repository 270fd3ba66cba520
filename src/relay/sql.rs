//! The relay's statements: the relay lease (take, give back), the claim of a batch and the delete of a published
//! one. Each is its own short transaction, sent through [`Sql`] (prepared once per connection, or unnamed behind a
//! transaction pooler); the claim is always sent unnamed ([`Unnamed`]), planned for its parameters.

use deadpool_postgres::Pool;
use uuid::Uuid;

use crate::db::{Param, Sql, Unnamed};
use crate::error::Result;

/// Takes the relay lease for relay $1 for $2 seconds when it has expired or is already $1's; returns a row when $1
/// holds it afterwards. Two relays that try at once are serialised by the row lock, and the second finds the lease
/// taken when it re-checks the row.
pub const ACQUIRE: &str = "UPDATE outbox_relay SET holder = $1, lease_until = now() + make_interval(secs => $2), \
       acquired_at = CASE WHEN holder = $1 AND lease_until > now() THEN acquired_at ELSE now() END \
     WHERE lease_until < now() OR holder = $1 \
     RETURNING holder";

/// Gives the lease of relay $1 back (at shutdown), so that a standby relay takes over at its next look.
pub const RELEASE: &str = "UPDATE outbox_relay SET lease_until = '-infinity' WHERE holder = $1";

/// Claims a batch for relay $1 while it holds the lease: up to $6 events in id order, with an id above $3 (or any
/// id when $4 is true: a rescan from the oldest row), except the ids in $5 (batches still in flight). Nothing is
/// written to the events. The lease is renewed to $2 seconds when less than $2 - 1 seconds are left, so a claim
/// writes (and waits for a WAL flush) at most about once a second.
///
/// Returns no row when $1 does not hold the lease; otherwise one row per event, or one row of NULLs when there is
/// none. With $4 false the scan starts at $3 in the primary key, past the rows deleted since the last rescan.
pub const CLAIM: &str = "WITH renew AS ( \
       UPDATE outbox_relay SET lease_until = now() + make_interval(secs => $2) \
       WHERE holder = $1 AND lease_until > now() AND lease_until < now() + make_interval(secs => $2 - 1)), \
     held AS (SELECT 1 FROM outbox_relay WHERE holder = $1 AND lease_until > now()) \
     SELECT e.id, e.event_id, e.event_type, e.payload::text FROM held LEFT JOIN LATERAL ( \
       SELECT id, event_id, event_type, payload FROM event_outbox \
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

/// Takes (or renews) the lease for `name`; whether `name` holds it now.
pub async fn acquire(pool: &Pool, name: &str, lease_secs: f64) -> Result<bool> {
    let client = crate::db::checkout(pool).await?;
    let rows = client.typed_query(ACQUIRE, &[&name as &dyn Param, &lease_secs]).await?;
    Ok(!rows.is_empty())
}

/// Gives the lease of `name` back, if it holds it.
pub async fn release(pool: &Pool, name: &str) -> Result<()> {
    let client = crate::db::checkout(pool).await?;
    client.typed_execute(RELEASE, &[&name]).await?;
    Ok(())
}

/// Claims up to `limit` events for `name`, in id order; `None` when `name` does not hold the lease.
pub async fn claim(pool: &Pool, name: &str, lease_secs: f64, w: &Window, limit: i64) -> Result<Option<Vec<Claimed>>> {
    let client = crate::db::checkout(pool).await?;
    // Unnamed: a kept generic plan for this claim (`id > $3 OR $4`) can scan the whole outbox.
    let rows = Unnamed(&client)
        .typed_query(CLAIM, &[&name as &dyn Param, &lease_secs, &w.after, &w.rescan, &w.skip, &limit])
        .await?;
    if rows.is_empty() {
        return Ok(None);
    }
    let mut batch = Vec::with_capacity(rows.len());
    for r in &rows {
        if let Some(id) = r.get::<_, Option<i64>>(0) {
            batch.push(Claimed { id, event_id: r.get(1), event_type: r.get(2), body: r.get(3) });
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
