//! PostgreSQL: the pool (with checkout timeouts), creating the database, applying the migrations in `sql/`, and
//! one-round-trip statements ([`Sql`]) that work directly and behind PgBouncer.

mod migrate;
mod pooler;
mod sql;

pub use crate::config::Pooler;
pub use pooler::probe_statements_kept;
pub use sql::{
    forbid_named_statements, named_statements_allowed, named_statements_not_kept, statement_not_kept, Param, PgType,
    Sql, Unnamed,
};

use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use postgres_native_tls::MakeTlsConnector;
use tokio_postgres::config::SslMode;
use tokio_postgres::{Client, NoTls};

use crate::config::DatabaseSettings;
use crate::error::{DbFailure, Error, Result};

mod hosts;
mod target;

pub use hosts::{connect_first, per_host_urls};
pub use target::{checkout, describe_target, target_of};

mod embedded {
    refinery::embed_migrations!("sql");
}

fn pg_config(url: &str) -> Result<tokio_postgres::Config> {
    url.parse().map_err(|_| crate::config::ConfigError("database.url: not a valid PostgreSQL URL".into()).into())
}

/// Idle time before TCP keepalive probes start on a database connection (then every [`KEEPALIVE_INTERVAL`], 3
/// probes), unless `database.url` sets `keepalives_idle` itself: a server that vanished without a word is noticed
/// within about a minute instead of the operating system's two hours.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
/// Interval between TCP keepalive probes.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Longest time data sent to the server may stay unacknowledged by its host before the connection is closed
/// (`TCP_USER_TIMEOUT`), unless `database.url` sets `tcp_user_timeout`: a statement sent to a server whose host
/// vanished (power loss, a network partition) fails after this instead of after the operating system's
/// retransmissions (about 15 minutes), and the pool replaces the connection.
pub const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);

/// Which server-side limits a session gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limits {
    /// `statement_timeout`, `lock_timeout` and `idle_in_transaction_session_timeout` (pooled sessions, the outbox
    /// listener).
    All,
    /// Only `idle_in_transaction_session_timeout`: migrations may run long statements and wait on the migration
    /// lock while another process migrates.
    IdleInTransactionOnly,
}

/// The session settings of `limits`, as `(name, value)`; none behind PgBouncer (`database.pooler = "pgbouncer"`),
/// which refuses unknown startup parameters and in transaction pooling mode would not pass them on to the server
/// connections anyway: there the limits are set on the role or database (`ALTER ROLE ... SET statement_timeout`) and
/// in pgbouncer.ini (README.md, Operations).
pub fn session_limits(settings: &DatabaseSettings, limits: Limits) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    if settings.pooler != Pooler::None {
        return out;
    }
    if limits == Limits::All {
        out.push(("statement_timeout", format!("{}s", settings.statement_timeout_secs)));
        out.push(("lock_timeout", format!("{}s", settings.lock_timeout_secs)));
    }
    out.push(("idle_in_transaction_session_timeout", format!("{}s", settings.idle_in_transaction_timeout_secs)));
    out
}

/// The connection configuration of `database.url` with the bounds every wait needs: the session `limits` as
/// startup options (`-c name=value`; a setting the URL's own `options` already names is left as the URL says), TCP
/// keepalives, a TCP user timeout ([`TCP_USER_TIMEOUT`], unless the URL sets `tcp_user_timeout`), and a connect
/// timeout of `database.checkout_timeout_secs` (unless the URL sets `connect_timeout`).
pub fn session_config(settings: &DatabaseSettings, limits: Limits) -> Result<tokio_postgres::Config> {
    Ok(bounded(pg_config(&settings.url)?, settings, limits))
}

/// [`session_config`] for each host of a multi-host `database.url`, in the URL's order ([`per_host_urls`]); the
/// whole URL as one configuration when it names one host (or names its hosts in a form that is not split).
pub fn host_configs(settings: &DatabaseSettings, limits: Limits) -> Result<Vec<tokio_postgres::Config>> {
    match per_host_urls(&settings.url) {
        Some(urls) => urls.iter().map(|u| Ok(bounded(pg_config(u)?, settings, limits))).collect(),
        None => Ok(vec![session_config(settings, limits)?]),
    }
}

/// The bound of one host's connection attempt: the URL's `connect_timeout`, else `database.checkout_timeout_secs`.
pub fn per_host_timeout(settings: &DatabaseSettings, config: &tokio_postgres::Config) -> Duration {
    config.get_connect_timeout().copied().unwrap_or(Duration::from_secs(settings.checkout_timeout_secs.get()))
}

fn bounded(mut config: tokio_postgres::Config, settings: &DatabaseSettings, limits: Limits) -> tokio_postgres::Config {
    let mut options = config.get_options().unwrap_or_default().to_string();
    // A setting the options name already (`-c name=v`, `-cname=v` or `--name=v`).
    let named = |options: &str, name: &str| {
        options.split_whitespace().any(|t| {
            let t = t.strip_prefix("--").or_else(|| t.strip_prefix("-c")).unwrap_or(t);
            t.strip_prefix(name).is_some_and(|rest| rest.starts_with('='))
        })
    };
    for (name, value) in session_limits(settings, limits) {
        if !named(&options, name) {
            if !options.is_empty() {
                options.push(' ');
            }
            options.push_str(&format!("-c {name}={value}"));
        }
    }
    if !options.is_empty() {
        config.options(options);
    }
    config.keepalives(true);
    // tokio-postgres's own default is two hours: anything else came from the URL.
    if config.get_keepalives_idle() == Duration::from_secs(2 * 60 * 60) {
        config.keepalives_idle(KEEPALIVE_IDLE);
    }
    if config.get_keepalives_interval().is_none() {
        config.keepalives_interval(KEEPALIVE_INTERVAL);
    }
    if config.get_keepalives_retries().is_none() {
        config.keepalives_retries(3);
    }
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(TCP_USER_TIMEOUT);
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(settings.checkout_timeout_secs.get()));
    }
    config
}

/// The TLS connector for `sslmode=require` (`None` otherwise: the connection is plain).
///
/// The server certificate is verified against the system roots plus `database.tls_ca_file`, unless
/// `database.tls_accept_invalid_certs` is set (libpq's own `require` does not verify either).
pub fn tls(settings: &DatabaseSettings, config: &tokio_postgres::Config) -> Result<Option<MakeTlsConnector>> {
    if config.get_ssl_mode() != SslMode::Require {
        return Ok(None);
    }
    let bad = |key: &str, e: String| crate::error::Error::Config(crate::config::ConfigError(format!("{key}: {e}")));
    let mut builder = native_tls::TlsConnector::builder();
    if !settings.tls_ca_file.is_empty() {
        let pem = std::fs::read(&settings.tls_ca_file).map_err(|e| bad("database.tls_ca_file", e.to_string()))?;
        let cert = native_tls::Certificate::from_pem(&pem).map_err(|e| bad("database.tls_ca_file", e.to_string()))?;
        builder.add_root_certificate(cert);
    }
    builder.danger_accept_invalid_certs(settings.tls_accept_invalid_certs);
    let connector = builder.build().map_err(|e| bad("database.url", format!("cannot set up TLS: {e}")))?;
    Ok(Some(MakeTlsConnector::new(connector)))
}

/// Builds the pool. No connection is made until the first checkout; every checkout and recycle is bounded by
/// `database.checkout_timeout_secs`, and a connection found closed is replaced instead of handed out. A new
/// connection tries the hosts of `database.url` in turn ([`hosts::connect_first`]), each but the last for at most
/// its [`per_host_timeout`], the whole attempt for at most [`connect_budget`]. Every session runs with
/// `statement_timeout`, `lock_timeout` and `idle_in_transaction_session_timeout`, TCP keepalives and a TCP user
/// timeout ([`session_config`]), so no statement, lock wait or forgotten transaction lasts without bound, and a
/// connection to a server that died or vanished is noticed as closed and replaced by one to whichever host now
/// accepts (with `target_session_attrs=read-write`, the one that accepts writes).
pub fn build_pool(settings: &DatabaseSettings) -> Result<Pool> {
    let hosts = host_configs(settings, Limits::All)?;
    let first = hosts[0].clone();
    let per_host = per_host_timeout(settings, &first);
    let budget = connect_budget(settings, &hosts);
    if settings.pooler == Pooler::Pgbouncer {
        forbid_named_statements();
    }
    let mc = ManagerConfig { recycling_method: RecyclingMethod::Fast };
    let manager = match tls(settings, &first)? {
        Some(tls) => Manager::from_connect(first, hosts::HostsConnect { hosts, tls, per_host }, mc),
        None => Manager::from_connect(first, hosts::HostsConnect { hosts, tls: NoTls, per_host }, mc),
    };
    let timeout = Some(Duration::from_secs(settings.checkout_timeout_secs.get()));
    let pool = Pool::builder(manager)
        .max_size(settings.pool_size.get())
        .wait_timeout(timeout)
        .create_timeout(Some(budget))
        .recycle_timeout(timeout)
        .runtime(Runtime::Tokio1)
        .build()
        .map_err(|e| crate::config::ConfigError(format!("database.pool_size: {e}")))?;
    target::remember(&pool, describe_target(&hosts_of(settings)?));
    Ok(pool)
}

/// The configuration of each host of `database.url`, for naming them ([`describe_target`]).
fn hosts_of(settings: &DatabaseSettings) -> Result<Vec<tokio_postgres::Config>> {
    host_configs(settings, Limits::All)
}

/// The longest a new connection may take: `database.checkout_timeout_secs` for the last (or only) host, plus the
/// [`per_host_timeout`] of every host tried before it.
pub fn connect_budget(settings: &DatabaseSettings, hosts: &[tokio_postgres::Config]) -> Duration {
    let before_last = hosts.len().saturating_sub(1) as u32;
    let per_host = hosts.first().map(|c| per_host_timeout(settings, c)).unwrap_or_default();
    Duration::from_secs(settings.checkout_timeout_secs.get()) + per_host * before_last
}

/// Opens one connection outside the pool (to `dbname` instead of the configured database when given), driving it
/// on a task of its own; with every limit of the pool ([`Limits::All`]).
pub async fn connect(settings: &DatabaseSettings, dbname: Option<&str>) -> Result<Client> {
    connect_with(settings, dbname, Limits::All).await
}

/// [`connect`] with the session limits of `limits`; the hosts are tried as for the pool, within [`connect_budget`].
pub async fn connect_with(settings: &DatabaseSettings, dbname: Option<&str>, limits: Limits) -> Result<Client> {
    let mut hosts = host_configs(settings, limits)?;
    if let Some(name) = dbname {
        for config in &mut hosts {
            config.dbname(name);
        }
    }
    let per_host = per_host_timeout(settings, &hosts[0]);
    let budget = connect_budget(settings, &hosts);
    let target = describe_target(&hosts);
    let timed_out = || {
        Error::DbUnreachable(format!(
            "{target}: no connection made within {} s (database.checkout_timeout_secs): the server accepted the \
             connection but did not answer, or the network dropped it",
            budget.as_secs()
        ))
    };
    let failed = |error| Error::Db(DbFailure { error, at: Some(target.clone()) });
    match tls(settings, &hosts[0])? {
        Some(tls) => {
            let connecting = hosts::connect_first(&hosts, tls, per_host);
            let (client, connection) =
                tokio::time::timeout(budget, connecting).await.map_err(|_| timed_out())?.map_err(failed)?;
            tokio::spawn(drive(connection));
            Ok(client)
        }
        None => {
            let connecting = hosts::connect_first(&hosts, NoTls, per_host);
            let (client, connection) =
                tokio::time::timeout(budget, connecting).await.map_err(|_| timed_out())?.map_err(failed)?;
            tokio::spawn(drive(connection));
            Ok(client)
        }
    }
}

async fn drive<F: std::future::Future<Output = std::result::Result<(), tokio_postgres::Error>>>(connection: F) {
    if let Err(e) = connection.await {
        tracing::debug!(error = %e, "direct database connection ended");
    }
}

/// Creates the configured database when it does not exist. Safe when several processes race to do it.
pub async fn ensure_database(settings: &DatabaseSettings) -> Result<()> {
    let config = pg_config(&settings.url)?;
    let Some(name) = config.get_dbname().map(str::to_owned) else {
        return Ok(());
    };
    match connect(settings, None).await {
        Ok(_) => return Ok(()),
        Err(Error::Db(e)) if e.code() == Some(&tokio_postgres::error::SqlState::INVALID_CATALOG_NAME) => {}
        Err(e) => return Err(e),
    }
    let client = connect(settings, Some("postgres")).await?;
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
/// The whole run is one transaction that first takes a transaction-level advisory lock, so two processes starting
/// at once apply each migration once and both succeed, on a direct connection as behind PgBouncer (any pooling
/// mode that keeps a transaction on one server connection: session or transaction).
pub async fn migrate(settings: &DatabaseSettings) -> Result<()> {
    ensure_database(settings).await?;
    let mut client = connect_with(settings, None, Limits::IdleInTransactionOnly).await?;
    let report = migrate::run(&mut client, embedded::migrations::runner()).await?;
    for m in report.applied_migrations() {
        tracing::info!(migration = %m, "applied migration");
    }
    Ok(())
}

/// Records `prefix` as the database's AMQP prefix when none is recorded yet; returns the recorded one and the
/// database's name.
pub const CLAIM_PREFIX: &str = "INSERT INTO database_prefix (prefix) VALUES ($1) \
     ON CONFLICT (singleton) DO UPDATE SET prefix = database_prefix.prefix RETURNING prefix, current_database()::text";

/// One prefix per database: records `prefix` (`amqp.prefix`) on a database that has none yet, and refuses with a
/// configuration error naming both when the database already serves another. The outbox and the leases are not
/// keyed by prefix, so two prefixes on one database would publish each other's events.
pub async fn claim_prefix(pool: &Pool, prefix: &str) -> Result<()> {
    let client = pool.get().await?;
    let row = client.typed_one(CLAIM_PREFIX, &[&prefix]).await?;
    let recorded: String = row.get(0);
    if recorded != prefix {
        let db: String = row.get(1);
        return Err(crate::config::ConfigError(format!(
            "amqp.prefix: the database `{db}` serves prefix `{recorded}`, not `{prefix}`; one prefix per database \
             (give this prefix its own database.url, or delete the database_prefix row of a database no worker uses)"
        ))
        .into());
    }
    Ok(())
}

/// The database clock: every deadline, threshold and event time is taken from it.
pub async fn now(client: &impl Sql) -> Result<DateTime<Utc>> {
    let row = client.typed_one("SELECT now()", &[]).await?;
    Ok(row.get(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_go_into_the_startup_options_unless_the_url_sets_them() {
        let mut s = DatabaseSettings::default();
        let c = session_config(&s, Limits::All).unwrap();
        assert_eq!(
            c.get_options(),
            Some("-c statement_timeout=30s -c lock_timeout=10s -c idle_in_transaction_session_timeout=60s")
        );
        assert_eq!(c.get_keepalives_idle(), KEEPALIVE_IDLE);
        assert_eq!(c.get_tcp_user_timeout(), Some(&TCP_USER_TIMEOUT));
        assert_eq!(c.get_connect_timeout(), Some(&Duration::from_secs(5)));
        s.url =
            "postgres://u@h/db?options=-c%20deadlock_timeout%3D2s%20-c%20lock_timeout%3D3s&connect_timeout=7".into();
        let c = session_config(&s, Limits::IdleInTransactionOnly).unwrap();
        assert_eq!(
            c.get_options(),
            Some("-c deadlock_timeout=2s -c lock_timeout=3s -c idle_in_transaction_session_timeout=60s")
        );
        assert_eq!(c.get_connect_timeout(), Some(&Duration::from_secs(7)));
        let c = session_config(&s, Limits::All).unwrap();
        assert_eq!(
            c.get_options(),
            Some("-c deadlock_timeout=2s -c lock_timeout=3s -c statement_timeout=30s -c idle_in_transaction_session_timeout=60s")
        );
    }

    #[test]
    fn behind_pgbouncer_no_startup_options_are_sent() {
        let mut s = DatabaseSettings { pooler: Pooler::Pgbouncer, ..DatabaseSettings::default() };
        assert_eq!(session_config(&s, Limits::All).unwrap().get_options(), None);
        // The URL's own options are left as they are (an operator who lists them in ignore_startup_parameters).
        s.url = "postgres://u@h/db?options=-c%20lock_timeout%3D3s".into();
        assert_eq!(session_config(&s, Limits::All).unwrap().get_options(), Some("-c lock_timeout=3s"));
    }

    #[test]
    fn every_host_of_a_multi_host_url_gets_the_limits_and_its_own_bounded_attempt() {
        let mut s = DatabaseSettings {
            url: "postgres://acm@h1:5432,h2:5433,h3/acm?target_session_attrs=read-write&connect_timeout=2".into(),
            ..DatabaseSettings::default()
        };
        let hosts = host_configs(&s, Limits::All).unwrap();
        assert_eq!(hosts.len(), 3);
        for c in &hosts {
            assert_eq!(c.get_hosts().len(), 1);
            assert!(c.get_options().unwrap().contains("statement_timeout=30s"));
            assert_eq!(c.get_target_session_attrs(), tokio_postgres::config::TargetSessionAttrs::ReadWrite);
        }
        assert_eq!(per_host_timeout(&s, &hosts[0]), Duration::from_secs(2));
        // Two hosts tried for 2 s each before the last one's checkout timeout of 5 s.
        assert_eq!(connect_budget(&s, &hosts), Duration::from_secs(9));
        s.url = "postgres://acm@h1/acm".into();
        let hosts = host_configs(&s, Limits::All).unwrap();
        assert_eq!(connect_budget(&s, &hosts), Duration::from_secs(5));
    }
}
