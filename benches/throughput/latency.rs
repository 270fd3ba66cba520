//! Scenario `latency`: heartbeat latency at a fixed offered rate, and the broker's part of it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use agent_connection_manager::amqp::{self, json_properties, Topology, HEARTBEAT_ROUTING_KEY};
use agent_connection_manager::config::{AmqpSettings, QueueType, Settings};
use chrono::{DateTime, Utc};
use futures_util::{FutureExt, StreamExt};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions};
use lapin::types::FieldTable;
use serde_json::{json, Value};
use tokio::task::JoinSet;

use crate::cpu::{cpu_line, cpu_sample, cpu_use};
use crate::env::Env;
use crate::opts::Opts;
use crate::results::{ms, percentile, sorted, to_utc, Results, Target};
use crate::workload::{heartbeat_body, publishers, seed_agents, worker_batches};
use crate::{describe, fail, BoxErr, Res};

/// Heartbeats of one connection published and not yet seen committed: (sequence, publish instant, wall clock).
type Pending = VecDeque<(i64, Instant, SystemTime)>;

/// The broker's part of the latency: the same paced heartbeats (same publishers, rate and duration) to a queue
/// declared by the library like `<prefix>.heartbeats`, consumed in this process with the worker's prefetch and
/// batching and acknowledged per batch, without a database. Returns the sorted publish-to-delivery latencies (ms).
async fn broker_latency_floor(o: &Opts, prefix: &str) -> Res<Vec<f64>> {
    let topology = Topology::new(prefix);
    let defaults = Settings::default();
    let conn = amqp::connect(&o.amqp_url, "acm bench latency floor").await?;
    let ch = conn.create_channel().await?;
    let settings = Settings {
        amqp: AmqpSettings { command_queue_type: QueueType::Classic, ..AmqpSettings::default() },
        ..Settings::default()
    };
    topology.declare(&conn, &settings).await?;
    ch.basic_qos(defaults.amqp.prefetch.get(), BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(
            topology.heartbeat_queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let total = (o.rate * o.latency_secs) as usize;
    let stamps: Arc<Vec<Mutex<Option<Instant>>>> = Arc::new((0..total).map(|_| Mutex::new(None)).collect());
    let received = {
        let (stamps, max) = (stamps.clone(), defaults.worker.heartbeat_batch_size.get());
        tokio::spawn(async move {
            let mut out = Vec::with_capacity(total);
            let deadline = Instant::now() + Duration::from_secs(o_latency_deadline(total));
            while out.len() < total {
                let left = deadline.saturating_duration_since(Instant::now());
                let first = match tokio::time::timeout(left, consumer.next()).await {
                    Ok(Some(Ok(d))) => d,
                    _ => break,
                };
                let mut batch = vec![first];
                while batch.len() < max {
                    match consumer.next().now_or_never() {
                        Some(Some(Ok(d))) => batch.push(d),
                        _ => break,
                    }
                }
                let now = Instant::now();
                for d in &batch {
                    let seq =
                        serde_json::from_slice::<Value>(&d.data).ok().and_then(|v| v["client_info"]["s"].as_u64());
                    let published = seq.and_then(|s| stamps.get(s as usize)).and_then(|m| *m.lock().ok()?);
                    if let Some(p) = published {
                        out.push(ms(now - p));
                    }
                }
                if let Some(last) = batch.last() {
                    let _ = last.acker.ack(BasicAckOptions { multiple: true }).await;
                }
            }
            out
        })
    };
    let chans = publishers(o).await?;
    let n = chans.len();
    let seq = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let mut tasks = JoinSet::new();
    for (p, (pconn, pch)) in chans.into_iter().enumerate() {
        let my_agents: Vec<usize> = (p + 1..=o.agents).step_by(n).collect();
        let share = total as u64 / n as u64 + u64::from((p as u64) < total as u64 % n as u64);
        let rate = o.rate as f64 / n as f64;
        let (seq, stamps, exchange) = (seq.clone(), stamps.clone(), topology.command_exchange.clone());
        tasks.spawn(async move {
            let mut sent = 0u64;
            let mut confirms = Vec::new();
            while sent < share && !my_agents.is_empty() {
                let due = ((t0.elapsed().as_secs_f64() * rate) as u64).min(share);
                while sent < due {
                    let a = my_agents[sent as usize % my_agents.len()];
                    let s = seq.fetch_add(1, Ordering::Relaxed);
                    let body = heartbeat_body(a, Some(json!({ "s": s })));
                    if let Some(m) = stamps.get(s as usize) {
                        if let Ok(mut slot) = m.lock() {
                            *slot = Some(Instant::now());
                        }
                    }
                    confirms.push(
                        pch.basic_publish(
                            exchange.as_str().into(),
                            HEARTBEAT_ROUTING_KEY.into(),
                            BasicPublishOptions::default(),
                            &body,
                            json_properties(),
                        )
                        .await?,
                    );
                    sent += 1;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            for c in confirms {
                c.await?;
            }
            let _ = pconn.close(200, "done".into()).await;
            Ok::<(), BoxErr>(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let out = received.await?;
    let _ = conn.close(200, "done".into()).await;
    if out.len() < total {
        return Err(fail(format!("latency floor: {} of {total} delivered", out.len())));
    }
    Ok(sorted(out))
}

/// How long the latency floor waits for its deliveries at most.
fn o_latency_deadline(total: usize) -> u64 {
    60 + (total / 1000) as u64
}

pub async fn scenario_latency(o: &Opts, run: usize, res: &mut Results) -> Res<()> {
    let mut env = Env::new(o, "latency");
    env.migrate().await?;
    let db = env.db().await?;
    seed_agents(&db, o.agents).await?;

    // The broker alone first, same load, no worker and no database.
    let floor_prefix = format!("{}-floor", env.prefix);
    env.extra_prefixes.push(floor_prefix.clone());
    let floor = broker_latency_floor(o, &floor_prefix).await?;
    println!(
        "    broker alone (bare consumer in the bench): publish-to-delivery p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        percentile(&floor, 50.0),
        percentile(&floor, 99.0),
        percentile(&floor, 100.0)
    );
    res.record("2 latency", "broker alone: publish-to-delivery p50", "ms", Target::None, percentile(&floor, 50.0));
    res.record("2 latency", "broker alone: publish-to-delivery p99", "ms", Target::None, percentile(&floor, 99.0));

    let pid = env.start_worker(&[]).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let total = o.rate * o.latency_secs;
    let cpu0 = cpu_sample(Some(pid));
    let pending: Arc<Vec<Mutex<Pending>>> = Arc::new((0..=o.agents).map(|_| Mutex::new(VecDeque::new())).collect());
    let seq = Arc::new(AtomicU64::new(0));
    let publishing = Arc::new(AtomicBool::new(true));
    let chans = publishers(o).await?;
    let n = chans.len();
    let exchange = env.topology().command_exchange;
    let mut start_wm: DateTime<Utc> = db.query_one("SELECT now()", &[]).await?.get(0);
    start_wm -= chrono::Duration::milliseconds(1);
    let t0 = Instant::now();
    let mut tasks = JoinSet::new();
    for (p, (conn, ch)) in chans.into_iter().enumerate() {
        let my_agents: Vec<usize> = (p + 1..=o.agents).step_by(n).collect();
        let share = total / n as u64 + u64::from((p as u64) < total % n as u64);
        let rate = o.rate as f64 / n as f64;
        let (pending, seq, exchange) = (pending.clone(), seq.clone(), exchange.clone());
        tasks.spawn(async move {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<lapin::PublisherConfirm>();
            let drain = tokio::spawn(async move {
                let mut nacks = 0u64;
                while let Some(c) = rx.recv().await {
                    nacks += u64::from(c.await.map(|c| c.is_nack()).unwrap_or(true));
                }
                nacks
            });
            let mut sent = 0u64;
            while sent < share && !my_agents.is_empty() {
                let due = ((t0.elapsed().as_secs_f64() * rate) as u64).min(share);
                while sent < due {
                    let a = my_agents[sent as usize % my_agents.len()];
                    let s = seq.fetch_add(1, Ordering::Relaxed) as i64;
                    let body = heartbeat_body(a, Some(json!({ "s": s })));
                    if let Ok(mut q) = pending[a].lock() {
                        q.push_back((s, Instant::now(), SystemTime::now()));
                    }
                    let confirm = ch
                        .basic_publish(
                            exchange.as_str().into(),
                            HEARTBEAT_ROUTING_KEY.into(),
                            BasicPublishOptions::default(),
                            &body,
                            json_properties(),
                        )
                        .await?;
                    let _ = tx.send(confirm);
                    sent += 1;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            drop(tx);
            let nacks = drain.await.unwrap_or(0);
            let _ = conn.close(200, "done".into()).await;
            Ok::<(u64, u64), BoxErr>((sent, nacks))
        });
    }
    let publishers_done = {
        let publishing = publishing.clone();
        tokio::spawn(async move {
            let mut sent = 0;
            let mut nacks = 0;
            let mut err = None;
            while let Some(r) = tasks.join_next().await {
                match r {
                    Ok(Ok((s, k))) => {
                        sent += s;
                        nacks += k;
                    }
                    Ok(Err(e)) => err = Some(describe(e.as_ref())),
                    Err(e) => err = Some(e.to_string()),
                }
            }
            publishing.store(false, Ordering::SeqCst);
            (sent, nacks, t0.elapsed(), err)
        })
    };

    // The poller: connections whose last_heartbeat_at moved since the last poll (minus a margin), by the index on
    // heartbeat_minute (the minutes since then), the exact time deciding.
    let mut samples: Vec<f64> = Vec::with_capacity(total as usize);
    // Publish (wall clock) to the start of the transaction that applied it (its now(), database clock).
    let mut to_tx: Vec<f64> = Vec::with_capacity(total as usize);
    let mut wm = start_wm;
    let margin = chrono::Duration::milliseconds(10);
    let mut polls = 0u64;
    let poll_started = Instant::now();
    let deadline = t0 + Duration::from_secs(o.latency_secs + 60);
    let mut since = wm - margin;
    loop {
        // A transaction commits after its now(): one still running when this poll looks may commit rows dated
        // before the newest row seen. So the next poll starts from the oldest running transaction's start (or
        // this moment, if none runs), unless the newest row seen is older still.
        let check = db
            .query_one(
                "SELECT clock_timestamp(), (SELECT min(xact_start) FROM pg_stat_activity \
                 WHERE datname = current_database() AND xact_start IS NOT NULL AND pid <> pg_backend_pid())",
                &[],
            )
            .await?;
        let checked: DateTime<Utc> = check.get(0);
        let running: Option<DateTime<Utc>> = check.get(1);
        let floor = running.map_or(checked, |r| r.min(checked));
        let rows = db
            .query(
                "SELECT connection_id, (client_info->>'s')::int8, last_heartbeat_at FROM agent_connection \
                 WHERE status = 'active' AND heartbeat_minute >= date_bin('1 minute', $1, timestamptz '2000-01-01 00:00:00+00') \
                   AND last_heartbeat_at > $1",
                &[&since],
            )
            .await?;
        let seen = Instant::now();
        polls += 1;
        for r in rows {
            let cid: &str = r.get(0);
            let s: Option<i64> = r.get(1);
            let at: DateTime<Utc> = r.get(2);
            if at > wm {
                wm = at;
            }
            let (Some(s), Some(a)) = (s, cid.strip_prefix("c-").and_then(|x| x.parse::<usize>().ok())) else {
                continue;
            };
            if let Some(Ok(mut q)) = pending.get(a).map(|m| m.lock()) {
                while let Some(&(qs, published, wall)) = q.front() {
                    if qs > s {
                        break;
                    }
                    samples.push(ms(seen - published));
                    if qs == s {
                        to_tx.push((at - to_utc(wall)).num_microseconds().unwrap_or(0) as f64 / 1000.0);
                    }
                    q.pop_front();
                }
            }
        }
        since = wm.min(floor) - margin;
        if !publishing.load(Ordering::SeqCst) && samples.len() as u64 >= seq.load(Ordering::Relaxed) {
            break;
        }
        if Instant::now() > deadline {
            break;
        }
        if o.poll_ms > 0 {
            tokio::time::sleep(Duration::from_millis(o.poll_ms)).await;
        }
    }
    let poll_period = ms(poll_started.elapsed()) / polls as f64;
    let cpu = cpu_use(&cpu0, &cpu_sample(Some(pid)));
    println!("    cores used: {}", cpu_line(&cpu));
    let (sent, nacks, publish_time, err) = publishers_done.await?;
    if let Some(e) = err {
        return Err(fail(format!("a publisher failed: {e}")));
    }
    let lost = sent.saturating_sub(samples.len() as u64);
    let v = sorted(samples);
    let to_tx = sorted(to_tx);
    drop(db);
    let (batch_mean, tx_ms) = worker_batches(env.port).await;
    env.cleanup().await;
    let achieved = sent as f64 / publish_time.as_secs_f64();
    println!(
        "    {sent} heartbeats in {:.2} s ({achieved:.0}/s), {} observed, {lost} never observed, mean poll period \
         {poll_period:.2} ms, {nacks} nacks",
        publish_time.as_secs_f64(),
        v.len()
    );
    if lost > 0 {
        res.note(format!("run {run}: latency: {lost} heartbeats were never seen committed within the deadline"));
    }
    res.record("2 latency", "offered rate achieved", "msg/s", Target::None, achieved);
    res.record("2 latency", "publish-to-commit p50", "ms", Target::None, percentile(&v, 50.0));
    res.record("2 latency", "publish-to-commit p99", "ms", Target::AtMost(50.0), percentile(&v, 99.0));
    res.record("2 latency", "publish-to-commit max", "ms", Target::None, percentile(&v, 100.0));
    res.record("2 latency", "poll period (resolution)", "ms", Target::None, poll_period);
    res.record("2 latency", "publish-to-transaction-start p50", "ms", Target::None, percentile(&to_tx, 50.0));
    res.record("2 latency", "publish-to-transaction-start p99", "ms", Target::None, percentile(&to_tx, 99.0));
    res.record("2 latency", "worker mean heartbeat batch", "msgs", Target::None, batch_mean);
    res.record("2 latency", "worker mean heartbeat transaction", "ms", Target::None, tx_ms);
    Ok(())
}
