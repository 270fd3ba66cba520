//! Applying `sql/`'s migrations inside one transaction that first takes a transaction-level advisory lock.
//!
//! The lock serialises concurrent `migrate` runs (two processes starting at once apply each migration once, and both
//! succeed), and being transaction-level it is released by the commit or rollback on the server connection that took
//! it: it works the same on a direct connection and behind PgBouncer in transaction pooling mode, where a
//! session-level lock could outlive the run on a shared server connection. refinery drives the migrations through
//! [`InTransaction`], which runs each of its steps inside that one transaction (so a failed migration rolls back the
//! whole run), with simple-protocol statements only.

use refinery::{AsyncMigrate, Migration};
use refinery_core::traits::r#async::{AsyncQuery, AsyncTransaction};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio_postgres::{SimpleQueryMessage, Transaction};

/// Key of the transaction-level advisory lock that serialises concurrent `migrate` runs.
pub(super) const MIGRATION_LOCK_KEY: i64 = 0x0061_636d_5f6d_6967; // "acm_mig"

/// refinery's connection: one open transaction that every step of the run goes into.
pub(super) struct InTransaction<'a>(pub Transaction<'a>);

impl AsyncTransaction for InTransaction<'_> {
    type Error = tokio_postgres::Error;

    async fn execute<'a, T: Iterator<Item = &'a str> + Send + 'a>(
        &'a mut self,
        queries: T,
    ) -> Result<usize, Self::Error> {
        let mut count = 0;
        for query in queries {
            self.0.batch_execute(query).await?;
            count += 1;
        }
        Ok(count)
    }
}

impl AsyncQuery<Vec<Migration>> for InTransaction<'_> {
    async fn query<'a>(&'a mut self, query: &'a str) -> Result<Vec<Migration>, Self::Error> {
        let mut applied = Vec::new();
        for message in self.0.simple_query(query).await? {
            let SimpleQueryMessage::Row(row) = message else { continue };
            let field = |i: usize| row.get(i).unwrap_or_default().to_string();
            // refinery writes these columns itself (version, name, RFC 3339 time, checksum); a row it cannot read
            // back is a damaged history table, which refinery itself treats the same way.
            let version = field(0).parse().expect("refinery_schema_history.version is an integer");
            let applied_on = OffsetDateTime::parse(&field(2), &Rfc3339).expect("applied_on is RFC 3339");
            let checksum = field(3).parse::<u64>().expect("checksum is a u64");
            applied.push(Migration::applied(version, field(1), applied_on, checksum));
        }
        Ok(applied)
    }
}

impl AsyncMigrate for InTransaction<'_> {}

/// Applies the embedded migrations on `client` in one transaction holding the migration lock.
pub(super) async fn run(
    client: &mut tokio_postgres::Client,
    runner: refinery::Runner,
) -> crate::error::Result<refinery::Report> {
    let tx = client.transaction().await?;
    // A literal key: no parameter, so no prepared statement.
    tx.batch_execute(&format!("SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY})")).await?;
    let mut conn = InTransaction(tx);
    let report = runner.run_async(&mut conn).await.map_err(|e| crate::error::Error::Migration(e.to_string()))?;
    conn.0.commit().await?;
    Ok(report)
}
