//! Catching a transaction pooler nobody declared: with `database.pooler = "none"` the worker keeps named prepared
//! statements on its pooled connections, which a transaction pooler (PgBouncer in transaction mode) breaks by handing
//! each transaction of a client connection to whichever server connection is free. The probe at start tells such a
//! pooler from PostgreSQL itself (or a session pooler) before any work is done, so the process switches to unnamed
//! statements at once instead of suffering the first `prepared statement "s10" …` errors.

use deadpool_postgres::Pool;

use super::sql::{named_statements_allowed, named_statements_not_kept, Sql, Unnamed};
use crate::error::Result;

/// The server process behind a connection.
const BACKEND_PID: &str = "SELECT pg_backend_pid()";

/// Whether two pooled connections see a server session move between them: connection A reads its server process,
/// connection B opens a transaction (a transaction pooler hands it the server connection A just let go, the most
/// recently used one), and A reads its server process again. On PostgreSQL, or through a session pooler, A keeps
/// its session and reads the same process; through a transaction pooler its second statement runs on another one.
/// When the session moved, named statements cannot be kept: [`named_statements_not_kept`] switches the process to
/// unnamed ones with one warning naming `database.pooler`. A transaction pooler that happens to give A the same
/// server connection again goes unnoticed here, and is caught by the first statement it fails instead.
pub async fn probe_statements_kept(pool: &Pool) -> Result<()> {
    if !named_statements_allowed() {
        return Ok(());
    }
    let a = pool.get().await?;
    let mut b = pool.get().await?;
    let before: i32 = Unnamed(&a).typed_one(BACKEND_PID, &[]).await?.get(0);
    let tx = b.transaction().await?;
    let held: i32 = Unnamed(&tx).typed_one(BACKEND_PID, &[]).await?.get(0);
    let after: i32 = Unnamed(&a).typed_one(BACKEND_PID, &[]).await?.get(0);
    tx.rollback().await?;
    if before != after {
        named_statements_not_kept(&format!(
            "one pooled connection ran on server process {before}, then {after} while another's transaction held {held}"
        ));
    }
    Ok(())
}
