//! PostgreSQL: the pool (with checkout timeouts), creating the database, and applying the migrations in `sql/`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::{Client, NoTls};

use crate::config::DatabaseSettings;
use crate::error::{Error, Result};

mod embedded {
    refinery::embed_migrations!("sql");
}

/// Key of the session-level advisory lock that serialises concurrent `migrate` runs.
const MIGRATION_LOCK_KEY: i64 = 0x0061_636d_5f6d_6967; // "acm_mig"

/// Builds the pool. No connection is made until the first checkout; every checkout, connect and recycle is bounded
/// by `database.checkout_timeout_secs`, and a connection found closed is replaced instead of handed out.
pub fn build_pool(settings: &DatabaseSettings) -> Result<Pool> {
    let pg: tokio_postgres::Config = settings
        .url
        .parse()
        .map_err(|_| crate::config::ConfigError("database.url: not a valid PostgreSQL URL".into()))?;
    let manager = Manager::from_config(pg, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
    let timeout = Some(Duration::from_secs(settings.checkout_timeout_secs));
    Pool::builder(manager)
        .max_size(settings.pool_size)
        .wait_timeout(timeout)
        .create_timeout(timeout)
        .recycle_timeout(timeout)
        .runtime(Runtime::Tokio1)
        .build()
        .map_err(|e| crate::config::ConfigError(format!("database.pool_size: {e}")).into())
}

/// Opens one connection outside the pool, driving it on a task of its own.
pub async fn connect(config: &tokio_postgres::Config) -> Result<Client> {
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "direct database connection ended");
        }
    });
    Ok(client)
}

/// Creates the database named in `url` when it does not exist. Safe when several processes race to do it.
pub async fn ensure_database(url: &str) -> Result<()> {
    let config: tokio_postgres::Config =
        url.parse().map_err(|_| crate::config::ConfigError("database.url: not a valid PostgreSQL URL".into()))?;
    let Some(name) = config.get_dbname().map(str::to_owned) else {
        return Ok(());
    };
    match connect(&config).await {
        Ok(_) => return Ok(()),
        Err(Error::Db(e)) if e.code() == Some(&tokio_postgres::error::SqlState::INVALID_CATALOG_NAME) => {}
        Err(e) => return Err(e),
    }
    let mut admin = config.clone();
    admin.dbname("postgres");
    let client = connect(&admin).await?;
    let quoted = format!("\"{}\"", name.replace('"', "\"\""));
    match client.batch_execute(&format!("CREATE DATABASE {quoted}")).await {
        Ok(()) => {
            tracing::info!(database = %name, "created database");
            Ok(())
        }
        Err(e)
            if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_DATABASE)
                || e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) =>
        {
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Creates the database if missing and applies every migration in `sql/` that is not yet applied.
///
/// A session-level advisory lock serialises concurrent runs, so two processes starting at once apply each migration
/// once and both succeed.
pub async fn migrate(url: &str) -> Result<()> {
    ensure_database(url).await?;
    let config: tokio_postgres::Config =
        url.parse().map_err(|_| crate::config::ConfigError("database.url: not a valid PostgreSQL URL".into()))?;
    let mut client = connect(&config).await?;
    client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY]).await?;
    let report = embedded::migrations::runner().run_async(&mut client).await;
    let unlock = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY]).await;
    let report = report.map_err(|e| Error::Migration(e.to_string()))?;
    unlock?;
    for m in report.applied_migrations() {
        tracing::info!(migration = %m, "applied migration");
    }
    Ok(())
}

/// The database clock: every deadline, threshold and event time is taken from it.
pub async fn now(client: &impl deadpool_postgres::GenericClient) -> Result<DateTime<Utc>> {
    let row = client.query_one("SELECT now()", &[]).await?;
    Ok(row.get(0))
}
