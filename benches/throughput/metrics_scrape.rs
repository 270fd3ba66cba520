//! Scenario `metrics`: the cost of a `/metrics` scrape of the running worker at 10 active connections and at
//! `--big-connections` (1,000,000). The statistics gauges come from a cache refreshed in the background, so a
//! scrape should cost the same at both sizes; the scenario also checks that the gauge reaches the new count.

use std::time::{Duration, Instant};

use crate::env::{http_get, Env};
use crate::opts::Opts;
use crate::results::{ms, percentile, sorted, Results, Target};
use crate::workload::{seed_big_connections, vacuum};
use crate::{fail, Res};

/// `--scrapes` scrapes one after another; their times in ms, sorted.
async fn scrapes(o: &Opts, port: u16) -> Res<Vec<f64>> {
    let mut v = Vec::with_capacity(o.scrapes);
    for _ in 0..o.scrapes {
        let t = Instant::now();
        match http_get(port, "/metrics").await {
            Some((200, _)) => v.push(ms(t.elapsed())),
            other => return Err(fail(format!("/metrics: {:?}", other.map(|(s, _)| s)))),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(sorted(v))
}

/// Waits (bounded) until `/metrics` reports `n` active connections.
async fn gauge_reaches(port: u16, n: i64) -> Res<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let want = format!("acm_active_connections {n}");
    loop {
        if let Some((200, body)) = http_get(port, "/metrics").await {
            if body.lines().any(|l| l.trim() == want) {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err(fail(format!("/metrics did not report {n} active connections within 60 s")));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn scenario_metrics(o: &Opts, _run: usize, res: &mut Results) -> Res<()> {
    const SC: &str = "8 /metrics";
    let mut env = Env::new(o, "metrics");
    env.migrate().await?;
    let db = env.db().await?;
    seed_big_connections(&db, 10, 10).await?;
    env.start_worker(&[]).await?;
    gauge_reaches(env.port, 10).await?;
    let small = scrapes(o, env.port).await?;
    seed_big_connections(&db, o.big_connections, o.sessions).await?;
    vacuum(&db, &["agent_connection"]).await?;
    let total = o.big_connections + 10;
    let t = Instant::now();
    db.query_one(agent_connection_manager::commands::stats::STATS, &[]).await?;
    let stats_query = ms(t.elapsed());
    gauge_reaches(env.port, total).await?;
    let big = scrapes(o, env.port).await?;
    println!("    scrapes at 10 rows (ms): {small:.2?}");
    println!("    scrapes at {total} rows (ms): {big:.2?}");
    let rss = env.worker_peak_rss_mib();
    res.record(SC, "scrape at 10 connections (median)", "ms", Target::None, percentile(&small, 50.0));
    res.record(SC, "scrape at 1M connections (median)", "ms", Target::None, percentile(&big, 50.0));
    res.record(SC, "scrape at 1M connections (slowest)", "ms", Target::None, percentile(&big, 100.0));
    res.record(
        SC,
        "1M / 10 (medians)",
        "ratio",
        Target::AtMost(2.0),
        percentile(&big, 50.0) / percentile(&small, 50.0),
    );
    res.record(SC, "the stats query itself at 1M connections", "ms", Target::None, stats_query);
    if let Some(rss) = rss {
        res.record("6 memory", "worker peak RSS during /metrics", "MiB", Target::AtMost(64.0), rss);
    }
    drop(db);
    env.cleanup().await;
    Ok(())
}
