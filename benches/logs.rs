//! Agent logs (issue 24, item 3): ingest against a bare consumer, a day's partition dropped and a session's newest
//! lines read at 10 million lines.
//!
//! ```sh
//! cargo bench --bench logs
//! ```
//!
//! Uses the PostgreSQL and RabbitMQ of the tests (`ACM_TEST_PG`, default `postgres://postgres@127.0.0.1:5432`;
//! `ACM_TEST_AMQP`, default `amqp://guest:guest@127.0.0.1:5672/%2f`) with a database and prefix of its own, both
//! removed at the end. Phases:
//!
//! 1. `ingest`: `ACM_LOGS_MESSAGES` (2,000) `agent.log` messages of 100 lines each for one session are queued, then
//!    the worker (in this process) drains `<prefix>.logs`; lines/s from its start to the last line stored. The same
//!    messages queued again on a plain queue are drained by a bare consumer (batches acknowledged with one `multiple`
//!    ack, nothing applied); the ratio of the two rates has the target >= 0.8. Then the database's own ceiling: as
//!    many lines stored with the worker's lock and `INSERT`, a batch's worth per transaction, from arrays built
//!    beforehand (no broker, no parsing), against which both rates are also given.
//! 2. `read`: `ACM_LOGS_LINES` (10,000,000) lines over 1,000 sessions inserted into the partition of 8 days ago with
//!    one `INSERT ... SELECT generate_series`; then the newest 1,000 lines of one session read with `logs.get`'s
//!    statement (median of 21 reads; target <= 10 ms).
//! 3. `drop`: the `log_partitions` task runs (retention 7 days) and drops that day's partition (target <= 100 ms).
//!    Meanwhile a probe stores one line at a time as ingest does (the ingest lock, then an `INSERT` into
//!    `agent_log`), so the longest a store waited is how long the drop held ingest up; the run's own time, files
//!    removed, is reported beside it. A `CHECKPOINT` after the insert writes the day out first, as a partition old
//!    enough to drop would have been long ago.
//!
//! 10 million lines take about 1-2 GB of disk while the bench runs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_connection_manager::amqp::{self, json_properties, Topology};
use agent_connection_manager::commands::log::{INSERT, LOG_LOCK};
use agent_connection_manager::commands::log_get::{self, Get};
use agent_connection_manager::config::Settings;
use agent_connection_manager::domain::Ident;
use agent_connection_manager::sweeper::lease::Lease;
use agent_connection_manager::sweeper::log_partitions;
use agent_connection_manager::{db, AgentConnectionManager};
use futures_util::{FutureExt, StreamExt};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use serde_json::json;

type Res<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn env_or(key: &str, default: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| default.to_string())
}

fn count_of(key: &str, default: u64) -> u64 {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A message of 100 lines.
fn body(session: &str, m: u64) -> Vec<u8> {
    let logs: Vec<_> = (0..100)
        .map(|i| {
            json!({"timestamp": "2026-12-03T12:00:00Z", "level": "INFO", "logger_name": "bench.agent",
                   "message": format!("message {m} line {i}: the quick brown fox jumps over the lazy dog")})
        })
        .collect();
    json!({"type": "agent.log", "agent_id": "bench-agent", "session_id": session, "logs": logs})
        .to_string()
        .into_bytes()
}

/// Publishes `n` messages to `exchange` with routing key `key`, with confirms.
async fn publish(ch: &lapin::Channel, exchange: &str, key: &str, session: &str, n: u64) -> Res<()> {
    let mut pending = std::collections::VecDeque::new();
    for m in 0..n {
        let c = ch
            .basic_publish(
                exchange.into(),
                key.into(),
                BasicPublishOptions::default(),
                &body(session, m),
                json_properties(),
            )
            .await?;
        pending.push_back(c);
        if pending.len() >= 256 {
            pending.pop_front().expect("one").await?;
        }
    }
    for c in pending {
        c.await?;
    }
    Ok(())
}

/// Drains `n` messages from `queue` like the worker (batches of `batch`, one `multiple` ack each), applying nothing.
async fn bare_drain(ch: &lapin::Channel, queue: &str, n: u64, batch: usize) -> Res<Duration> {
    ch.basic_qos((batch * 2) as u16, BasicQosOptions::default()).await?;
    let mut consumer =
        ch.basic_consume(queue.into(), "".into(), BasicConsumeOptions::default(), FieldTable::default()).await?;
    let t = Instant::now();
    let mut got = 0;
    while got < n {
        let first =
            tokio::time::timeout(Duration::from_secs(120), consumer.next()).await?.ok_or("consumer ended")??;
        let mut last = first;
        let mut k = 1;
        while k < batch {
            match consumer.next().now_or_never() {
                Some(Some(Ok(d))) => {
                    last = d;
                    k += 1;
                }
                _ => break,
            }
        }
        last.acker.ack(BasicAckOptions { multiple: true }).await?;
        got += k as u64;
    }
    Ok(t.elapsed())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Res<()> {
    let pg = env_or("ACM_TEST_PG", "postgres://postgres@127.0.0.1:5432");
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let mut s = Settings::default();
    s.database.url = format!("{pg}/acm_bench_logs_{suffix}");
    s.amqp.url = env_or("ACM_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/%2f");
    s.amqp.prefix = format!("bench-logs-{suffix}");
    s.http.listen = String::new();
    let outcome = run(&s).await;
    // Clean up whatever happened: the topology, then the database.
    if let Ok(conn) = amqp::connect(&s.amqp.url, "acm bench cleanup").await {
        if let Ok(ch) = conn.create_channel().await {
            let _ = Topology::for_settings(&s).delete(&ch).await;
            let _ = ch.queue_delete(format!("{}.bare", s.amqp.prefix).as_str().into(), Default::default()).await;
        }
        let _ = conn.close(200, "done".into()).await;
    }
    let admin = db::connect(&s.database, Some("postgres")).await?;
    let name = format!("acm_bench_logs_{suffix}");
    admin.batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).await?;
    outcome
}

async fn run(s: &Settings) -> Res<()> {
    let messages = count_of("ACM_LOGS_MESSAGES", 2000);
    let lines = count_of("ACM_LOGS_LINES", 10_000_000);
    db::migrate(&s.database).await?;
    let manager = AgentConnectionManager::new(s.clone())?;
    let session = manager.create_session("bench-agent", None, None, None, None).await?;
    let topology = Topology::for_settings(s);
    let conn = amqp::connect(&s.amqp.url, "acm bench").await?;
    topology.declare(&conn, s).await?;
    let ch = amqp::confirm_channel(&conn).await?;

    // 1. ingest: the worker against a bare consumer, the same messages.
    publish(&ch, &topology.command_exchange, "agent.log", &session, messages).await?;
    let want = (messages * 100) as i64;
    let client = manager.pool().get().await?;
    let t = Instant::now();
    manager.start().await?;
    // The worker's start (migrations checked, broker connected, topology declared) is in `worker`; `applying`
    // starts when `start()` returned, with the consumers running (some lines may already be stored by then).
    let started = t.elapsed();
    // The poll reads the newest id (one index probe; ids start at 1 here, so it reaches `want` no sooner than the
    // lines do) and counts the lines only then: a `count(*)` every 20 ms would take a core from the worker.
    loop {
        let newest: i64 = client.query_one("SELECT coalesce(max(id), 0) FROM agent_log", &[]).await?.get(0);
        let n: i64 =
            if newest >= want { client.query_one("SELECT count(*) FROM agent_log", &[]).await?.get(0) } else { 0 };
        if n >= want {
            break;
        }
        if t.elapsed() > Duration::from_secs(600) {
            return Err(format!("only {n} of {want} lines stored within 600 s").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let worker = t.elapsed();
    let applying = worker.saturating_sub(started);
    manager.stop().await?;
    let bare_queue = format!("{}.bare", s.amqp.prefix);
    ch.queue_declare(bare_queue.as_str().into(), QueueDeclareOptions::default(), FieldTable::default()).await?;
    publish(&ch, "", &bare_queue, &session, messages).await?;
    let bare = bare_drain(&ch, &bare_queue, messages, s.logs.batch_messages).await?;
    let rate = |d: Duration| want as f64 / d.as_secs_f64();
    println!(
        "ingest: {messages} messages x 100 lines: worker {:.0} lines/s ({:.2} s), bare consumer {:.0} lines/s \
         ({:.2} s), ratio {:.2} (target >= 0.8)",
        rate(worker),
        worker.as_secs_f64(),
        rate(bare),
        bare.as_secs_f64(),
        rate(worker) / rate(bare)
    );
    // The database's own ceiling here: the same number of lines, a batch's worth per transaction, stored with the
    // worker's lock and statement from arrays built beforehand: no broker, no parsing, no checks.
    let per_tx = s.logs.batch_messages * 100;
    let texts: Vec<String> =
        (0..per_tx).map(|i| format!("message 0 line {i}: the quick brown fox jumps over the lazy dog")).collect();
    let now = chrono::Utc::now();
    let (aids, sids) = (vec!["bench-agent"; per_tx], vec![session.as_str(); per_tx]);
    let (times, levels, loggers) = (vec![now; per_tx], vec![20i16; per_tx], vec!["bench.agent"; per_tx]);
    let mut c = manager.pool().get().await?;
    let t = Instant::now();
    let mut stored = 0;
    while stored < want as u64 {
        let tx = c.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOG_LOCK]).await?;
        stored += tx.execute(INSERT, &[&aids, &sids, &times, &levels, &loggers, &texts]).await?;
        tx.commit().await?;
    }
    let ceiling = t.elapsed();
    drop(c);
    println!(
        "ingest: the database alone stores {:.0} lines/s ({stored} lines, {per_tx} per transaction, {:.2} s): \
         {:.2} of the bare consumer; the worker is at {:.2} of it",
        stored as f64 / ceiling.as_secs_f64(),
        ceiling.as_secs_f64(),
        (stored as f64 / ceiling.as_secs_f64()) / rate(bare),
        rate(worker) / (stored as f64 / ceiling.as_secs_f64()),
    );
    println!(
        "ingest: of which the worker's start took {:.2} s; from start() returned to the last line stored {:.2} s \
         ({:.0} lines/s at least; ratio {:.2})",
        started.as_secs_f64(),
        applying.as_secs_f64(),
        rate(applying),
        rate(applying) / rate(bare)
    );

    // 2. read: 10 million lines in the partition of 8 days ago, over 1,000 sessions.
    client
        .batch_execute(&format!(
            "SET statement_timeout = 0; \
             DO $$ DECLARE d date := (now() AT TIME ZONE 'UTC')::date - 8; BEGIN \
             EXECUTE format('CREATE TABLE IF NOT EXISTS agent_log_%s PARTITION OF agent_log FOR VALUES FROM (%L) TO (%L)', \
               to_char(d, 'YYYYMMDD'), d::text || ' 00:00+00', (d + 1)::text || ' 00:00+00'); END $$; \
             INSERT INTO agent_log (received_at, agent_id, session_id, logged_at, level, logger_name, message) \
             SELECT now() - interval '8 days', 'bench-agent-' || (g % 1000), 'bench-session-' || (g % 1000), now(), \
                    10 * (1 + g % 5), 'bench.agent', 'line ' || g || ': the quick brown fox jumps over the lazy dog' \
             FROM generate_series(1, {lines}) AS g; \
             ANALYZE agent_log; \
             CHECKPOINT"
        ))
        .await?;
    // The CHECKPOINT: a partition old enough to be dropped was written out long ago, so the 1-2 GB just inserted
    // are flushed before the reads and the drop, which are then measured as they meet such a partition (not behind
    // the flush of what was just written).
    let q = Get { session_id: Some(Ident::parse("bench-session-7")?), limit: Some(1000), ..Default::default() };
    let mut times = Vec::new();
    for _ in 0..21 {
        let t = Instant::now();
        let got = log_get::get(&client, &q).await?;
        times.push(t.elapsed());
        assert_eq!(got.len(), 1000, "1,000 lines of the session");
    }
    times.sort();
    println!(
        "read: newest 1,000 lines of one session at {lines} lines: median {:.2} ms, max {:.2} ms (target <= 10 ms)",
        times[10].as_secs_f64() * 1e3,
        times[20].as_secs_f64() * 1e3
    );

    // 3. drop: the log_partitions task's run drops that day (past a 7-day retention), while a probe stores lines.
    let pool = manager.pool().clone();
    let done = Arc::new(AtomicBool::new(false));
    let probe = tokio::spawn({
        let (pool, done) = (pool.clone(), done.clone());
        async move {
            let mut c = pool.get().await?;
            let (mut longest, mut stored) = (Duration::ZERO, 0u64);
            while !done.load(Ordering::Acquire) {
                let t = Instant::now();
                let tx = c.transaction().await?;
                tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOG_LOCK]).await?;
                tx.execute(
                    "INSERT INTO agent_log (agent_id, session_id, logged_at, level, logger_name, message) \
                     VALUES ('bench-agent', 'bench-probe', now(), 20, 'bench.probe', 'a line while a day is dropped')",
                    &[],
                )
                .await?;
                tx.commit().await?;
                longest = longest.max(t.elapsed());
                stored += 1;
            }
            Res::Ok((longest, stored))
        }
    });
    let cfg = log_partitions::Config { retention_days: 7, ahead_days: s.logs.partitions_ahead_days };
    let t = Instant::now();
    let report = log_partitions::run_once(&pool, &Arc::new(Lease::new(Duration::from_secs(60))), &cfg).await?;
    let run = t.elapsed();
    done.store(true, Ordering::Release);
    let (longest, stored) = probe.await??;
    let report = report.ok_or("the log_partitions task's lease was held elsewhere")?;
    if report.dropped != 1 {
        return Err(format!("the task dropped {} partitions, not the one day", report.dropped).into());
    }
    println!(
        "drop: a day's partition of {lines} lines: ingest held up at most {:.1} ms (target <= 100 ms; {stored} lines \
         stored one by one meanwhile); the task's run, files removed, {:.0} ms",
        longest.as_secs_f64() * 1e3,
        run.as_secs_f64() * 1e3
    );
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}
