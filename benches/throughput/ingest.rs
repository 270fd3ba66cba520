//! Scenario `ingest`: heartbeat ingest of the worker, and its ceiling (the same publishers against a bare consumer
//! that only acknowledges).

use std::collections::VecDeque;
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use agent_connection_manager::amqp::{self, json_properties, Topology, HEARTBEAT_ROUTING_KEY};
use agent_connection_manager::config::{AmqpSettings, QueueType, Settings};
use futures_util::{FutureExt, StreamExt};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions};
use lapin::types::FieldTable;
use serde_json::json;
use tokio::io::AsyncBufReadExt;
use tokio::task::JoinSet;

use crate::cpu::{cpu_line, cpu_sample, cpu_use};
use crate::env::Env;
use crate::opts::Opts;
use crate::results::{Results, Target};
use crate::workload::{
    heartbeat_body, last_agent_of, publishers, seed_agents, settled_update_counts, update_counts, worker_batches,
};
use crate::{fail, BoxErr, Res, ROLE_ENV};

/// Publishes `rounds` heartbeats per agent as fast as the broker confirms them; the last round carries
/// `client_info: {"bench": tag}`. Returns the first-publish instant (monotonic and wall clock) and the nacks.
async fn publish_burst(o: &Opts, exchange: &str, tag: &str, transient: bool) -> Res<(Instant, SystemTime, u64)> {
    let chans = publishers(o).await?;
    let n = chans.len();
    let t0 = Instant::now();
    let w0 = SystemTime::now();
    let mut tasks = JoinSet::new();
    for (p, (conn, ch)) in chans.into_iter().enumerate() {
        let (exchange, tag, agents, rounds, window) =
            (exchange.to_string(), tag.to_string(), o.agents, o.rounds, o.window);
        tasks.spawn(async move {
            let mut inflight = VecDeque::with_capacity(window);
            let mut nacks = 0u64;
            for r in 0..rounds {
                let info = (r + 1 == rounds).then(|| json!({ "bench": tag }));
                let mut a = p + 1;
                while a <= agents {
                    let body = heartbeat_body(a, info.clone());
                    let confirm = ch
                        .basic_publish(
                            exchange.as_str().into(),
                            HEARTBEAT_ROUTING_KEY.into(),
                            BasicPublishOptions::default(),
                            &body,
                            if transient { json_properties().with_delivery_mode(1) } else { json_properties() },
                        )
                        .await?;
                    inflight.push_back(confirm);
                    if inflight.len() >= window {
                        if let Some(c) = inflight.pop_front() {
                            nacks += u64::from(c.await?.is_nack());
                        }
                    }
                    a += n;
                }
            }
            while let Some(c) = inflight.pop_front() {
                nacks += u64::from(c.await?.is_nack());
            }
            let _ = conn.close(200, "done".into()).await;
            Ok::<u64, BoxErr>(nacks)
        });
    }
    let mut nacks = 0;
    while let Some(r) = tasks.join_next().await {
        nacks += r??;
    }
    Ok((t0, w0, nacks))
}

/// The bare consumer (a child process running this binary with ACM_BENCH_ROLE=bare-consumer): consumes a queue
/// with the worker's prefetch, drains deliveries into batches like the worker, acknowledges each batch with one
/// `multiple` ack, and prints `done <unix nanos of the last ack>` after `count` messages.
pub async fn bare_consumer() -> Res<()> {
    let var = |k: &str| std::env::var(k).map_err(|_| fail(format!("{k} not set")));
    let url = var("ACM_BENCH_AMQP_URL")?;
    let queue = var("ACM_BENCH_QUEUE")?;
    let count: u64 = var("ACM_BENCH_COUNT")?.parse()?;
    let prefetch: u16 = var("ACM_BENCH_PREFETCH")?.parse()?;
    let batch_max: usize = var("ACM_BENCH_BATCH")?.parse()?;
    let conn = amqp::connect(&url, "acm bench bare consumer").await?;
    let ch = conn.create_channel().await?;
    ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(queue.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await?;
    println!("ready");
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut got = 0u64;
    let mut last_ack = SystemTime::now();
    while got < count {
        let left = deadline.saturating_duration_since(Instant::now());
        let first = match tokio::time::timeout(left, consumer.next()).await {
            Ok(Some(Ok(d))) => d,
            Ok(other) => return Err(fail(format!("consumer ended: {:?}", other.map(|r| r.err())))),
            Err(_) => return Err(fail(format!("only {got} of {count} messages within 600 s"))),
        };
        let mut batch = vec![first];
        while batch.len() < batch_max {
            match consumer.next().now_or_never() {
                Some(Some(Ok(d))) => batch.push(d),
                _ => break,
            }
        }
        if let Some(last) = batch.last() {
            last.acker.ack(BasicAckOptions { multiple: true }).await?;
        }
        last_ack = SystemTime::now();
        got += batch.len() as u64;
    }
    let nanos = last_ack.duration_since(SystemTime::UNIX_EPOCH)?.as_nanos();
    println!("done {nanos}");
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}

/// `transient`: the heartbeats are published with `delivery_mode` 1 (not persisted by the broker), to both the
/// ceiling and the worker; the figures go under "1b ingest (transient)". `traced`: the worker exports spans to a
/// collector that is down ([`Env::traced_collector_down`]); the figures go under "1d ingest (traced, collector
/// down)".
pub async fn scenario_ingest(o: &Opts, run: usize, res: &mut Results, transient: bool, traced: bool) -> Res<()> {
    let sc: &'static str = match (transient, traced) {
        (true, _) => "1b ingest (transient)",
        (false, true) => "1d ingest (traced, collector down)",
        (false, false) => "1 ingest",
    };
    let mut env = Env::new(o, "ingest");
    env.migrate().await?;
    let db = env.db().await?;
    seed_agents(&db, o.agents).await?;
    let total = (o.agents * o.rounds) as f64;

    // The ceiling: a queue declared by the library exactly like <prefix>.heartbeats, and a bare consumer.
    let ceiling_prefix = format!("{}-ceiling", env.prefix);
    env.extra_prefixes.push(ceiling_prefix.clone());
    let ceiling = Topology::new(&ceiling_prefix);
    {
        let conn = amqp::connect(&o.amqp_url, "acm bench setup").await?;
        let ch = conn.create_channel().await?;
        let settings = Settings {
            amqp: AmqpSettings { command_queue_type: QueueType::Classic, ..AmqpSettings::default() },
            ..Settings::default()
        };
        drop(ch);
        ceiling.declare(&conn, &settings).await?;
        let _ = conn.close(200, "done".into()).await;
    }
    let defaults = Settings::default();
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .env(ROLE_ENV, "bare-consumer")
        .env("ACM_BENCH_AMQP_URL", &o.amqp_url)
        .env("ACM_BENCH_QUEUE", &ceiling.heartbeat_queue)
        .env("ACM_BENCH_COUNT", (o.agents * o.rounds).to_string())
        .env("ACM_BENCH_PREFETCH", defaults.amqp.prefetch.to_string())
        .env("ACM_BENCH_BATCH", defaults.worker.heartbeat_batch_size.to_string())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().ok_or_else(|| fail("no stdout"))?).lines();
    let ready = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await??;
    if ready.as_deref() != Some("ready") {
        return Err(fail(format!("bare consumer: {ready:?}")));
    }
    let cpu0 = cpu_sample(None);
    let (_, w0, nacks) = publish_burst(o, &ceiling.command_exchange, "ceiling", transient).await?;
    let done = tokio::time::timeout(Duration::from_secs(600), lines.next_line()).await??.unwrap_or_default();
    let ceiling_cpu = cpu_use(&cpu0, &cpu_sample(None));
    let nanos: u128 = done.strip_prefix("done ").and_then(|s| s.parse().ok()).ok_or_else(|| fail(done.clone()))?;
    let end = SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos as u64);
    let ceiling_secs = end.duration_since(w0)?.as_secs_f64();
    let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    let ceiling_rate = total / ceiling_secs;
    if nacks > 0 {
        res.note(format!("run {run}: ingest ceiling: {nacks} publishes nacked"));
    }

    // The worker.
    let pid = env.start_worker(&if traced { Env::traced_collector_down() } else { Vec::new() }).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let tag = format!("final-{run}");
    let cpu0 = cpu_sample(Some(pid));
    let upd0 = update_counts(&db).await?;
    let (t0, _, nacks) = publish_burst(o, &env.topology().command_exchange, &tag, transient).await?;
    let published = t0.elapsed();
    let markers: Vec<String> =
        (0..o.publishers).filter_map(|p| last_agent_of(p, o.publishers, o.agents)).map(|a| format!("c-{a}")).collect();
    let deadline = Instant::now() + Duration::from_secs(600);
    let end = loop {
        let n: i64 = db
            .query_one(
                "SELECT count(*) FROM agent_connection WHERE connection_id = ANY($1) AND client_info->>'bench' = $2",
                &[&markers, &tag],
            )
            .await?
            .get(0);
        if n as usize == markers.len() {
            let all: i64 = db
                .query_one("SELECT count(*) FROM agent_connection WHERE client_info->>'bench' = $1", &[&tag])
                .await?
                .get(0);
            if all as usize == o.agents {
                break Instant::now();
            }
        }
        if Instant::now() > deadline {
            return Err(fail("the worker did not commit every heartbeat within 600 s"));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let worker_cpu = cpu_use(&cpu0, &cpu_sample(Some(pid)));
    let worker_rate = total / (end - t0).as_secs_f64();
    if nacks > 0 {
        res.note(format!("run {run}: ingest worker: {nacks} publishes nacked"));
    }
    let rss = env.worker_peak_rss_mib();
    let (batch_mean, tx_ms) = worker_batches(env.port).await;
    let upd = settled_update_counts(&db).await?.since(&upd0);
    drop(db);
    println!("    row updates during the worker phase: {}", upd.line());
    println!(
        "    worker publish phase took {:.2} s, commits visible {:.2} s after the first publish",
        published.as_secs_f64(),
        (end - t0).as_secs_f64()
    );
    println!("    cores used, ceiling phase: {}", cpu_line(&ceiling_cpu));
    println!("    cores used, worker phase:  {}", cpu_line(&worker_cpu));
    let core = |u: &[(&'static str, f64)], k: &str| u.iter().find(|(n, _)| *n == k).map(|(_, v)| *v).unwrap_or(0.0);
    res.record(sc, "worker heartbeats/s", "msg/s", Target::None, worker_rate);
    res.record(sc, "ceiling (bare consumer) heartbeats/s", "msg/s", Target::None, ceiling_rate);
    res.record(sc, "worker / ceiling", "ratio", Target::AtLeast(0.9), worker_rate / ceiling_rate);
    res.record(sc, "worker mean heartbeat batch", "msgs", Target::None, batch_mean);
    res.record(sc, "worker mean heartbeat transaction", "ms", Target::None, tx_ms);
    res.record(sc, "ceiling phase: rabbitmq cores", "cores", Target::None, core(&ceiling_cpu, "rabbitmq"));
    res.record(sc, "ceiling phase: idle cores", "cores", Target::None, core(&ceiling_cpu, "idle"));
    res.record(sc, "ceiling phase: other processes", "cores", Target::None, core(&ceiling_cpu, "other"));
    res.record(sc, "worker phase: worker cores", "cores", Target::None, core(&worker_cpu, "worker"));
    res.record(sc, "worker phase: postgres cores", "cores", Target::None, core(&worker_cpu, "postgres"));
    res.record(sc, "worker phase: rabbitmq cores", "cores", Target::None, core(&worker_cpu, "rabbitmq"));
    res.record(sc, "worker phase: bench (publishers) cores", "cores", Target::None, core(&worker_cpu, "bench"));
    res.record(sc, "worker phase: idle cores", "cores", Target::None, core(&worker_cpu, "idle"));
    res.record(sc, "worker phase: other processes", "cores", Target::None, core(&worker_cpu, "other"));
    res.record(sc, "agent_connection updates", "rows", Target::None, upd.connection.0 as f64);
    res.record(sc, "agent_connection HOT share", "ratio", Target::None, upd.connection_hot_share());
    res.record(sc, "agent_session updates", "rows", Target::None, upd.session.0 as f64);
    res.record(sc, "agent_session HOT share", "ratio", Target::None, upd.session_hot_share());
    if let Some(rss) = rss {
        let name =
            if transient { "worker peak RSS during ingest (transient)" } else { "worker peak RSS during ingest" };
        res.record("6 memory", name, "MiB", Target::AtMost(64.0), rss);
    }
    env.cleanup().await;
    Ok(())
}
