//! Where statements are prepared: a pooled connection straight to PostgreSQL prepares each statement once and keeps
//! it; once a pool for PgBouncer exists in the process, every statement is sent unnamed. This file is a test process
//! of its own, so that the process-wide switch it flips reaches no other test.

mod common;

use agent_connection_manager::config::DatabaseSettings;
use agent_connection_manager::db::{self, Pooler, Sql};

const PROBE: &str = "SELECT $1::int8 + 1";
const KEPT: &str = "SELECT count(*) FROM pg_prepared_statements WHERE statement = 'SELECT $1::int8 + 1'";

/// Runs the probe statement twice on one connection of a new one-connection pool; how many prepared statements of
/// that connection hold its text afterwards.
async fn kept_after_two_runs(settings: &DatabaseSettings) -> i64 {
    let pool = db::build_pool(settings).expect("pool");
    let client = pool.get().await.expect("pooled connection");
    for n in [7_i64, 41] {
        let row = client.typed_one(PROBE, &[&n]).await.expect("probe");
        assert_eq!(row.get::<_, i64>(0), n + 1, "the probe's result");
    }
    client.typed_one(KEPT, &[]).await.expect("pg_prepared_statements").get(0)
}

#[tokio::test]
async fn direct_pools_keep_prepared_statements_until_a_pgbouncer_pool_exists() {
    let settings = common::test_settings();
    db::ensure_database(&settings.database).await.expect("test database");
    let mut direct = settings.database.clone();
    direct.pool_size = 1.try_into().unwrap();
    assert!(db::named_statements_allowed(), "no PgBouncer pool was built yet");
    assert_eq!(kept_after_two_runs(&direct).await, 1, "a direct pooled connection keeps the statement it prepared");

    let bouncer = db::build_pool(&DatabaseSettings { pooler: Pooler::Pgbouncer, ..direct.clone() });
    drop(bouncer.expect("a pool for PgBouncer"));
    assert!(!db::named_statements_allowed(), "building a pool for PgBouncer stops named statements");
    assert_eq!(kept_after_two_runs(&direct).await, 0, "after that, statements are sent unnamed and nothing is kept");
    common::cleanup(&settings).await;
}
