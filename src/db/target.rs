//! Where a database error happened: the servers of `database.url` as one short phrase (hosts and ports, database,
//! user; never the password), and pool checkouts ([`checkout`]) whose errors name them.
//!
//! deadpool-postgres keeps a pool's connection configuration private and its connect errors are plain
//! tokio-postgres errors, which name no host; so [`super::build_pool`] records each pool's target here, keyed by the
//! address of the pool's manager (shared by every clone of the pool and fixed for its life), and [`checkout`] adds
//! it to the error.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};

use deadpool_postgres::{Object, Pool};
use tokio_postgres::config::Host;
use tokio_postgres::Config;

use crate::error::{Error, PoolFailure, Result};

/// The PostgreSQL port when the URL names none.
const DEFAULT_PORT: u16 = 5432;

/// The servers of `configs` (one per host, or one naming several), e.g. `127.0.0.1:5432 (database acm, user
/// postgres)`; a Unix socket is named by its directory.
pub fn describe_target(configs: &[Config]) -> String {
    let mut places = Vec::new();
    for config in configs {
        let ports = config.get_ports();
        for (i, host) in config.get_hosts().iter().enumerate() {
            // libpq's rule: one port for every host, or one each.
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(DEFAULT_PORT);
            places.push(match host {
                Host::Tcp(name) if name.contains(':') => format!("[{name}]:{port}"),
                Host::Tcp(name) => format!("{name}:{port}"),
                #[cfg(unix)]
                Host::Unix(dir) => format!("{}/.s.PGSQL.{port}", dir.display()),
            });
        }
    }
    if places.is_empty() {
        places.push(format!("localhost:{DEFAULT_PORT}"));
    }
    let first = configs.first();
    let user = first.and_then(|c| c.get_user()).unwrap_or("(none)");
    let database = first.and_then(|c| c.get_dbname()).unwrap_or(user);
    format!("{} (database {database}, user {user})", places.join(", "))
}

/// Each pool's target, by the address of its manager.
static TARGETS: LazyLock<Mutex<HashMap<usize, String>>> = LazyLock::new(Mutex::default);

fn key(pool: &Pool) -> usize {
    std::ptr::from_ref(pool.manager()) as usize
}

/// Records what `pool` connects to (a new pool at the address of a dropped one replaces its entry).
pub(super) fn remember(pool: &Pool, target: String) {
    TARGETS.lock().unwrap_or_else(|p| p.into_inner()).insert(key(pool), target);
}

/// What `pool` connects to, when it was built by [`super::build_pool`].
pub fn target_of(pool: &Pool) -> Option<String> {
    TARGETS.lock().unwrap_or_else(|p| p.into_inner()).get(&key(pool)).cloned()
}

/// A pooled connection; a failure names the server ([`PoolFailure`]).
pub async fn checkout(pool: &Pool) -> Result<Object> {
    pool.get().await.map_err(|error| Error::Pool(PoolFailure { error, at: target_of(pool) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_names_hosts_ports_database_and_user_but_no_password() {
        let c: Config = "postgres://acm:hunter2@h1:5433,h2/acm_db".parse().unwrap();
        let text = describe_target(&[c]);
        assert_eq!(text, "h1:5433, h2:5432 (database acm_db, user acm)");
        let c: Config = "postgres://acm:hunter2@h1:5433,h2:5434/acm_db".parse().unwrap();
        assert_eq!(describe_target(&[c]), "h1:5433, h2:5434 (database acm_db, user acm)");
        let c: Config = "host=/run/postgresql user=u password=hunter2".parse().unwrap();
        let text = describe_target(&[c]);
        assert_eq!(text, "/run/postgresql/.s.PGSQL.5432 (database u, user u)");
        assert!(!text.contains("hunter2"));
        let c: Config = "postgres://u@[::1]/d".parse().unwrap();
        assert_eq!(describe_target(&[c]), "[::1]:5432 (database d, user u)");
    }
}
