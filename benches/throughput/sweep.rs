//! Scenario `sweep`: an idle sweeper cycle and the query plans on big tables with nothing due, then a busy sweep
//! of many due instructions and stale connections, timed until the last resulting event arrives.

use std::time::{Duration, Instant, SystemTime};

use agent_connection_manager::config::Settings;
use agent_connection_manager::sweeper::BacklogProbe;
use agent_connection_manager::{amqp, AgentConnectionManager};
use chrono::{DateTime, Utc};
use futures_util::StreamExt;

use crate::cpu::{cpu_line, cpu_sample, cpu_use};
use crate::env::{http_get, Env};
use crate::opts::Opts;
use crate::results::{ms, percentile, sorted, to_utc, Results, Target};
use crate::sweep_floor::{broker_floor, event_consumer};
use crate::sweep_tables::{explain_all, seed_big};
use crate::workload::histogram;
use crate::{fail, Res};

pub async fn scenario_sweep(o: &Opts, run: usize, res: &mut Results) -> Res<()> {
    let mut env = Env::new(o, "sweep");
    env.migrate().await?;
    let db = env.db().await?;
    seed_big(&db, o).await?;

    // 5. Idle: in-process cycles through the library, with the broker backlog probe the worker uses.
    let conn = amqp::connect(&o.amqp_url, "acm bench probe").await?;
    let ch = conn.create_channel().await?;
    env.topology().declare(&conn, &Settings::default()).await?;
    let mut settings = Settings::default();
    settings.database.url = env.db_url.clone();
    settings.database.pool_size = 2.try_into().unwrap();
    settings.amqp.url = o.amqp_url.clone();
    settings.amqp.prefix = env.prefix.clone();
    settings.http.listen = String::new();
    let manager = AgentConnectionManager::new(settings)?;
    let probe = BacklogProbe::broker();
    probe.set(Some((ch.clone(), env.topology()))).await;
    let warm = manager.sweep_once(probe.clone()).await?;
    let changed = warm.stale_connections
        + warm.inactive_sessions
        + warm.instructions_retried
        + warm.instructions_expired
        + warm.processed_messages_pruned;
    if changed > 0 || warm.held.is_some() || !warm.skipped_tasks.is_empty() {
        return Err(fail(format!("the idle tables were not idle: {warm:?}")));
    }
    let mut cycles = Vec::new();
    for _ in 0..o.idle_cycles {
        let t = Instant::now();
        manager.sweep_once(probe.clone()).await?;
        cycles.push(ms(t.elapsed()));
    }
    let mut stats = Vec::new();
    for _ in 0..o.idle_cycles {
        let t = Instant::now();
        manager.get_connection_stats().await?;
        stats.push(ms(t.elapsed()));
    }
    drop(manager);
    probe.set(None).await;
    let _ = conn.close(200, "done".into()).await;
    let cycles = sorted(cycles);
    let stats = sorted(stats);
    println!("    idle cycles (ms): {:?}", cycles.iter().map(|v| format!("{v:.2}")).collect::<Vec<_>>());
    let plans = explain_all(&db).await?;
    let mut seq_scans = 0usize;
    println!("    EXPLAIN (ANALYZE, BUFFERS), nothing due:");
    for p in &plans {
        seq_scans += p.seq_scans.len();
        println!(
            "      {:<26} {:>8.3} ms  seq scans of big tables: {:<22} buffers: {}",
            p.name,
            p.exec_ms,
            if p.seq_scans.is_empty() { "none".to_string() } else { p.seq_scans.join(",") },
            p.buffers
        );
    }
    if o.plans && run == 1 {
        for p in &plans {
            println!("\n    --- {} ---\n{}", p.name, p.text);
        }
        println!();
    }
    for p in plans.iter().filter(|p| !p.seq_scans.is_empty()) {
        res.note(format!("run {run}: {} scans {} sequentially", p.name, p.seq_scans.join(", ")));
    }
    res.record("5 idle sweep", "one cycle (median of cycles)", "ms", Target::AtMost(10.0), percentile(&cycles, 50.0));
    res.record("5 idle sweep", "one cycle (slowest of cycles)", "ms", Target::None, percentile(&cycles, 100.0));
    res.record("5 idle sweep", "stats query (median)", "ms", Target::None, percentile(&stats, 50.0));
    res.record("5 idle sweep", "sequential scans of big tables", "plans", Target::AtMost(0.0), seq_scans as f64);

    // 4. The broker's floor for the events the busy sweep produces, before the worker runs.
    {
        let conn = amqp::connect(&o.amqp_url, "acm bench setup").await?;
        env.topology().declare(&conn, &Settings::default()).await?;
        let _ = conn.close(200, "done".into()).await;
    }
    let events = (o.due + o.stale) as usize;
    // The worker's relay settings: its defaults, or what ACM_OUTBOX__* in the environment (inherited by it) set.
    let defaults = Settings::default();
    let env_or = |k: &str, d: usize| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let batch = env_or("ACM_OUTBOX__BATCH_SIZE", defaults.outbox.batch_size as usize);
    let pipeline = env_or("ACM_OUTBOX__PIPELINE", defaults.outbox.pipeline.get());
    let floor = broker_floor(o, &env.topology().event_exchange, events, batch, pipeline, 1).await?;
    println!("    broker floor, the relay's pattern ({pipeline} x {batch} unconfirmed, 1 connection): {floor:.2} s");
    let wide = broker_floor(o, &env.topology().event_exchange, events, 5000, 4, 4).await?;
    println!("    broker floor, wide (4 x 5000 unconfirmed on each of 4 connections): {wide:.2} s");

    // 4. Busy: the worker sweeping every second, brake off; rows become due at a moment just before its next cycle.
    let pid = env
        .start_worker(&[
            ("ACM_SWEEPER__CHECK_INTERVAL_SECS", "1".into()),
            ("ACM_SWEEPER__STALE_BRAKE_MIN_CONNECTIONS", "1000000000".into()),
        ])
        .await?;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let stale_after: f64 = Settings::default().sweeper.connection_stale_after_secs.get() as f64;

    // Count the resulting events on a queue bound to <prefix>.events.
    let econn = amqp::connect(&o.amqp_url, "acm bench events").await?;
    let mut consumer = event_consumer(&econn, &env.topology().event_exchange).await?;
    let (want_stale, want_instr) = (o.stale as u64, o.due as u64);
    let counter = tokio::spawn(async move {
        let (mut stale, mut instr, mut other) = (0u64, 0u64, 0u64);
        let (mut first, mut first_instr, mut last_stale, mut last) = (None, None, None, None);
        let deadline = Instant::now() + Duration::from_secs(300);
        while stale < want_stale || instr < want_instr {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, consumer.next()).await {
                Ok(Some(Ok(d))) => {
                    let now = SystemTime::now();
                    first.get_or_insert(now);
                    match d.routing_key.as_str() {
                        "agent.connection.stale" => {
                            stale += 1;
                            last_stale = Some(now);
                        }
                        "agent.instruction.retry" | "agent.instruction.expired" => {
                            instr += 1;
                            first_instr.get_or_insert(now);
                        }
                        _ => other += 1,
                    }
                    last = Some(now);
                }
                _ => break,
            }
        }
        (stale, instr, other, first, first_instr, last_stale, last)
    });

    // Pick T just before the worker's next cycle (cycles start every second, in phase with the last one), at least
    // 15 s away so that the update below commits before T (if it does not, the start found below is earlier than
    // the rows became visible, so the figure errs on the slow side).
    let row =
        db.query_one("SELECT last_run_at, now() FROM sweeper_state WHERE task = 'stale_connections'", &[]).await?;
    let now: DateTime<Utc> = row.get(1);
    // last_run_at is written only by cycles that changed something; without one, any phase will do.
    let last: DateTime<Utc> = row.get::<_, Option<DateTime<Utc>>>(0).unwrap_or(now);
    let mut due_at = last + chrono::Duration::milliseconds(700);
    while due_at < now + chrono::Duration::seconds(15) {
        due_at += chrono::Duration::seconds(1);
    }
    let stale_heartbeat = due_at - chrono::Duration::milliseconds((stale_after * 1000.0) as i64 + 1);
    let t = Instant::now();
    db.batch_execute("BEGIN").await?;
    db.execute(
        "UPDATE agent_instruction SET expires_at = $1 \
         WHERE instruction_id IN (SELECT md5('i' || g)::uuid FROM generate_series(1, $2::int8) g)",
        &[&due_at, &o.due],
    )
    .await?;
    db.execute(
        "UPDATE agent_connection SET last_heartbeat_at = $1 \
         WHERE connection_id IN (SELECT 'c-' || g FROM generate_series(1, $2::int8) g)",
        &[&stale_heartbeat, &o.stale],
    )
    .await?;
    db.batch_execute("COMMIT").await?;
    let committed: DateTime<Utc> = db.query_one("SELECT clock_timestamp()", &[]).await?.get(0);
    let cpu0 = cpu_sample(Some(pid));
    println!(
        "    made {} instructions and {} connections due at {} (update took {:.2} s, committed {} ms before)",
        o.due,
        o.stale,
        due_at.format("%H:%M:%S%.3f"),
        t.elapsed().as_secs_f64(),
        (due_at - committed).num_milliseconds()
    );
    if committed >= due_at {
        res.note(format!("run {run}: busy sweep: the update committed after T; this run's start may be late"));
    }

    // The sweep starts with the first task transaction whose now() is at or after T (earlier ones cannot see the rows
    // as due: now() is fixed at transaction start).
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut stale_start, mut expiry_start): (Option<DateTime<Utc>>, Option<DateTime<Utc>>) = (None, None);
    while (stale_start.is_none() || expiry_start.is_none()) && Instant::now() < deadline {
        for r in db
            .query(
                "SELECT task, last_run_at FROM sweeper_state \
                 WHERE task IN ('stale_connections', 'instruction_expiry') AND last_run_at >= $1",
                &[&due_at],
            )
            .await?
        {
            let task: &str = r.get(0);
            let at: DateTime<Utc> = r.get(1);
            match task {
                "stale_connections" => stale_start = stale_start.or(Some(at)),
                _ => expiry_start = expiry_start.or(Some(at)),
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (Some(stale_start), Some(expiry_start)) = (stale_start, expiry_start) else {
        return Err(fail("the worker's sweeper did not pick the due rows up within 60 s"));
    };
    let start = stale_start.min(expiry_start);
    if expiry_start < stale_start {
        res.note(format!(
            "run {run}: busy sweep: instructions were swept one cycle before connections ({} ms apart)",
            (stale_start - expiry_start).num_milliseconds()
        ));
    }
    let (stale_n, instr_n, other_n, first, first_instr, last_stale, last) = counter.await?;
    if stale_n < want_stale || instr_n < want_instr {
        return Err(fail(format!(
            "only {stale_n} of {want_stale} stale and {instr_n} of {want_instr} instruction events arrived"
        )));
    }
    let cpu = cpu_use(&cpu0, &cpu_sample(Some(pid)));
    println!("    cores used from T - 1 s to the last event: {}", cpu_line(&cpu));
    let last = last.map(to_utc).ok_or_else(|| fail("no event"))?;
    let busy = (last - start).num_microseconds().unwrap_or(0) as f64 / 1e6;
    let _ = econn.close(200, "done".into()).await;
    // Every event is confirmed: the relay deletes rows only after the broker's confirms.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n: i64 = db.query_one("SELECT count(*) FROM event_outbox", &[]).await?.get(0);
        if n == 0 {
            break;
        }
        if Instant::now() > deadline {
            res.note(format!("run {run}: busy sweep: {n} events still unpublished 30 s after the last arrival"));
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rss = env.worker_peak_rss_mib();
    let metrics = http_get(env.port, "/metrics").await.map(|(_, b)| b).unwrap_or_default();
    let task_secs = |task: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with("acm_sweeper_task_seconds_sum") && l.contains(&format!("\"{task}\"")))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN)
    };
    let secs_since = |t: Option<SystemTime>| {
        t.map(|t| (to_utc(t) - start).num_microseconds().unwrap_or(0) as f64 / 1e6).unwrap_or(f64::NAN)
    };
    println!(
        "    sweep start {} (stale task {}, expiry task {}); last stale event +{:.2} s, first instruction event \
         +{:.2} s, first event +{:.2} s, last event +{busy:.2} s; {other_n} other events",
        start.format("%H:%M:%S%.3f"),
        stale_start.format("%H:%M:%S%.3f"),
        expiry_start.format("%H:%M:%S%.3f"),
        secs_since(last_stale),
        secs_since(first_instr),
        secs_since(first),
    );
    let (confirm_secs, relay_batches) = histogram(&metrics, "acm_publish_confirm_seconds");
    println!(
        "    relay: {relay_batches} batches, {:.1} ms mean publish-to-confirm per batch, {:.1} s in total",
        confirm_secs / relay_batches * 1000.0,
        confirm_secs
    );
    res.record("4 busy sweep", "sweep start -> last event confirmed", "s", Target::None, busy);
    res.record("4 busy sweep", "broker floor: same events, relay's pattern, no database", "s", Target::None, floor);
    res.record("4 busy sweep", "broker floor: same events, 4 wide publishers", "s", Target::None, wide);
    res.record(
        "4 busy sweep",
        "busy sweep / broker floor (relay's pattern)",
        "ratio",
        Target::AtMost(1.25),
        busy / floor,
    );
    res.record("4 busy sweep", "sweep start -> last stale event", "s", Target::None, secs_since(last_stale));
    res.record("4 busy sweep", "sweep start -> first instruction event", "s", Target::None, secs_since(first_instr));
    res.record("4 busy sweep", "sweep start -> first event", "s", Target::None, secs_since(first));
    res.record("4 busy sweep", "relay: publish-to-confirm, all batches", "s", Target::None, confirm_secs);
    res.record(
        "4 busy sweep",
        "stale task (worker metric, all cycles)",
        "s",
        Target::None,
        task_secs("stale_connections"),
    );
    res.record(
        "4 busy sweep",
        "expiry task (worker metric, all cycles)",
        "s",
        Target::None,
        task_secs("instruction_expiry"),
    );
    if let Some(rss) = rss {
        res.record("6 memory", "worker peak RSS during busy sweep", "MiB", Target::AtMost(64.0), rss);
    }
    drop(db);
    env.cleanup().await;
    Ok(())
}
