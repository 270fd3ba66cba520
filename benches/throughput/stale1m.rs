//! Scenario `stale1m`: the stale sweep at `--big-connections` (1,000,000) active connections, run in-process
//! through the library: the stale task with nothing stale, a whole idle sweeper cycle, then the stale task closing
//! `--big-stale` connections (made stale with one update, then `VACUUM ANALYZE`). Without an index on
//! `last_heartbeat_at` the task finds its candidates through the index on `heartbeat_minute`.

use std::time::Instant;

use agent_connection_manager::config::Settings;
use agent_connection_manager::events::OutboxSignal;
use agent_connection_manager::sweeper::{lease, stale_connections, BacklogProbe};
use agent_connection_manager::AgentConnectionManager;

use crate::env::Env;
use crate::opts::Opts;
use crate::results::{ms, percentile, sorted, Results, Target};
use crate::workload::{seed_big_connections, vacuum};
use crate::{fail, Res};

pub async fn scenario_stale1m(o: &Opts, _run: usize, res: &mut Results) -> Res<()> {
    const SC: &str = "7 stale sweep at 1M";
    let env = Env::new(o, "stale1m");
    env.migrate().await?;
    let db = env.db().await?;
    let t = Instant::now();
    seed_big_connections(&db, o.big_connections, o.sessions).await?;
    println!("    seeded {} active connections in {:.1} s", o.big_connections, t.elapsed().as_secs_f64());
    let mut settings = Settings::default();
    settings.database.url = env.db_url.clone();
    settings.database.pool_size = 4.try_into().unwrap();
    settings.amqp.url = o.amqp_url.clone();
    settings.amqp.prefix = env.prefix.clone();
    settings.http.listen = String::new();
    let cfg = stale_connections::Config::from(&settings.sweeper);
    let lease = std::sync::Arc::new(lease::Lease::new(lease::length(&settings.sweeper)));
    let outbox = OutboxSignal::default();
    let manager = AgentConnectionManager::new(settings)?;
    let pool = manager.pool();
    // Warm-up, then the idle stale task and idle whole cycles.
    stale_connections::run_once(pool, &lease, &cfg, Some(0), &outbox).await?;
    manager.sweep_once(BacklogProbe::default()).await?;
    let (mut task, mut cycle) = (Vec::new(), Vec::new());
    for _ in 0..o.idle_cycles {
        let t = Instant::now();
        let r = stale_connections::run_once(pool, &lease, &cfg, Some(0), &outbox).await?;
        task.push(ms(t.elapsed()));
        if r.is_some_and(|r| r.closed > 0) {
            return Err(fail("the idle stale task closed connections"));
        }
        let t = Instant::now();
        manager.sweep_once(BacklogProbe::default()).await?;
        cycle.push(ms(t.elapsed()));
    }
    let (task, cycle) = (sorted(task), sorted(cycle));
    println!("    idle stale task (ms): {task:.2?}");
    // Some connections go stale.
    let stale = o.big_stale.min(o.big_connections);
    db.execute(
        "UPDATE agent_connection SET last_heartbeat_at = now() - interval '1 hour' \
         WHERE connection_id = ANY(SELECT 'c-' || i FROM generate_series(1, $1::int8) i)",
        &[&stale],
    )
    .await?;
    vacuum(&db, &["agent_connection"]).await?;
    let t = Instant::now();
    let report = stale_connections::run_once(pool, &lease, &cfg, Some(0), &outbox)
        .await?
        .ok_or_else(|| fail("stale task skipped"))?;
    let busy = ms(t.elapsed());
    if report.closed as i64 != stale || report.held.is_some() {
        return Err(fail(format!("expected {stale} connections closed, got {report:?}")));
    }
    let active: i64 = db.query_one("SELECT count(*) FROM agent_connection WHERE status = 'active'", &[]).await?.get(0);
    if active != o.big_connections - stale {
        return Err(fail(format!("{active} active connections left, expected {}", o.big_connections - stale)));
    }
    println!("    closed {stale} of {} active connections in {busy:.1} ms", o.big_connections);
    res.record(SC, "stale task, nothing stale (median)", "ms", Target::AtMost(100.0), percentile(&task, 50.0));
    res.record(SC, "idle sweeper cycle, all tasks (median)", "ms", Target::AtMost(10.0), percentile(&cycle, 50.0));
    res.record(SC, "stale task closing the stale ones", "ms", Target::AtMost(100.0), busy);
    res.record(SC, "connections closed", "rows", Target::None, report.closed as f64);
    drop(db);
    drop(manager);
    env.cleanup().await;
    Ok(())
}
