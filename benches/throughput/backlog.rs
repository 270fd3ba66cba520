//! Scenario `backlog`: a heartbeat backlog queued before the consumer starts, drained by the worker and by a bare
//! consumer (the ceiling: the same broker, queue kind and prefetch, acknowledging only).
//!
//! `--backlog-connections` connections in `--backlog-sessions` sessions (seeded with SQL), `--backlog-rounds`
//! heartbeats each, published (persistent, confirmed) while nothing consumes; the last round carries
//! `client_info: {"bench": tag}`. The ceiling is timed from the start of the bare consumer process to its last
//! acknowledgement, the worker from the start of its process until every connection shows the last round's marker
//! (each connection's last heartbeat applied, checked by a full count).

use std::collections::VecDeque;
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use agent_connection_manager::amqp::{self, json_properties, Topology, HEARTBEAT_ROUTING_KEY};
use agent_connection_manager::config::{AmqpSettings, QueueType, Settings};
use chrono::Utc;
use lapin::options::BasicPublishOptions;
use serde_json::json;
use tokio::io::AsyncBufReadExt;
use tokio::task::JoinSet;

use crate::env::Env;
use crate::opts::Opts;
use crate::results::{Results, Target};
use crate::workload::{publishers, settled_update_counts, update_counts, vacuum, worker_batches};
use crate::{fail, BoxErr, Res, ROLE_ENV};

/// Connection `c-i` (1-based) belongs to session `s-k` of agent `agent-k`, k = 1 + (i - 1) mod sessions.
fn body(o: &Opts, i: usize, tag: Option<&str>) -> Vec<u8> {
    let k = 1 + (i - 1) % o.backlog_sessions;
    let mut b = json!({
        "type": "agent.heartbeat",
        "agent_id": format!("agent-{k}"),
        "session_id": format!("s-{k}"),
        "connection_id": format!("c-{i}"),
        "sent_at": Utc::now().to_rfc3339(),
    });
    if let Some(tag) = tag {
        b["client_info"] = json!({ "bench": tag });
    }
    serde_json::to_vec(&b).unwrap_or_default()
}

/// Publishes the whole backlog (rounds in order, connections dealt to the publishers) and waits for every confirm.
async fn publish_backlog(o: &Opts, exchange: &str, tag: &str) -> Res<u64> {
    let chans = publishers(o).await?;
    let n = chans.len();
    let mut tasks = JoinSet::new();
    for (p, (conn, ch)) in chans.into_iter().enumerate() {
        let (o, exchange, tag) = (o.clone(), exchange.to_string(), tag.to_string());
        tasks.spawn(async move {
            let mut inflight = VecDeque::with_capacity(o.window);
            let mut nacks = 0u64;
            for r in 0..o.backlog_rounds {
                let marker = (r + 1 == o.backlog_rounds).then_some(tag.as_str());
                let mut i = p + 1;
                while i <= o.backlog_connections {
                    let confirm = ch
                        .basic_publish(
                            exchange.as_str().into(),
                            HEARTBEAT_ROUTING_KEY.into(),
                            BasicPublishOptions::default(),
                            &body(&o, i, marker),
                            json_properties(),
                        )
                        .await?;
                    inflight.push_back(confirm);
                    if inflight.len() >= o.window {
                        if let Some(c) = inflight.pop_front() {
                            nacks += u64::from(c.await?.is_nack());
                        }
                    }
                    i += n;
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
    Ok(nacks)
}

pub async fn scenario_backlog(o: &Opts, run: usize, res: &mut Results) -> Res<()> {
    const SC: &str = "1c backlog drain";
    let mut env = Env::new(o, "backlog");
    env.migrate().await?;
    let db = env.db().await?;
    let (conns, sessions) = (o.backlog_connections, o.backlog_sessions);
    db.batch_execute(&format!(
        "INSERT INTO agent_session (session_id, agent_id, name) \
           SELECT 's-' || k, 'agent-' || k, 'bench' FROM generate_series(1, {sessions}) k; \
         INSERT INTO agent_connection (connection_id, session_id, agent_id, connection_type) \
           SELECT 'c-' || i, 's-' || (1 + (i - 1) % {sessions}), 'agent-' || (1 + (i - 1) % {sessions}), 'amqp' \
           FROM generate_series(1, {conns}) i;"
    ))
    .await?;
    vacuum(&db, &["agent_session", "agent_connection"]).await?;
    let total = (conns * o.backlog_rounds) as f64;
    let defaults = Settings::default();

    // Both queues declared by the library, like <prefix>.heartbeats, and filled before anything consumes.
    let ceiling_prefix = format!("{}-ceiling", env.prefix);
    env.extra_prefixes.push(ceiling_prefix.clone());
    let ceiling = Topology::new(&ceiling_prefix);
    {
        let conn = amqp::connect(&o.amqp_url, "acm bench setup").await?;
        let settings = Settings {
            amqp: AmqpSettings { command_queue_type: QueueType::Classic, ..AmqpSettings::default() },
            ..Settings::default()
        };
        ceiling.declare(&conn, &settings).await?;
        env.topology().declare(&conn, &defaults).await?;
        let _ = conn.close(200, "done".into()).await;
    }

    // The ceiling.
    let nacks = publish_backlog(o, &ceiling.command_exchange, "ceiling").await?;
    let w0 = SystemTime::now();
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .env(ROLE_ENV, "bare-consumer")
        .env("ACM_BENCH_AMQP_URL", &o.amqp_url)
        .env("ACM_BENCH_QUEUE", &ceiling.heartbeat_queue)
        .env("ACM_BENCH_COUNT", (conns * o.backlog_rounds).to_string())
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
    let done = tokio::time::timeout(Duration::from_secs(600), lines.next_line()).await??.unwrap_or_default();
    let nanos: u128 = done.strip_prefix("done ").and_then(|s| s.parse().ok()).ok_or_else(|| fail(done.clone()))?;
    let end = SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos as u64);
    let ceiling_secs = end.duration_since(w0)?.as_secs_f64();
    let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    if nacks > 0 {
        res.note(format!("run {run}: backlog ceiling: {nacks} publishes nacked"));
    }

    // The worker.
    let tag = format!("backlog-{run}");
    let nacks = publish_backlog(o, &env.topology().command_exchange, &tag).await?;
    if nacks > 0 {
        res.note(format!("run {run}: backlog worker: {nacks} publishes nacked"));
    }
    let upd0 = update_counts(&db).await?;
    let t0 = Instant::now();
    env.start_worker(&[]).await?;
    let last = format!("c-{conns}");
    let deadline = Instant::now() + Duration::from_secs(600);
    let end = loop {
        let n: i64 = db
            .query_one(
                "SELECT count(*) FROM agent_connection WHERE connection_id = $1 AND client_info->>'bench' = $2",
                &[&last, &tag],
            )
            .await?
            .get(0);
        if n == 1 {
            let all: i64 = db
                .query_one("SELECT count(*) FROM agent_connection WHERE client_info->>'bench' = $1", &[&tag])
                .await?
                .get(0);
            if all as usize == conns {
                break Instant::now();
            }
        }
        if Instant::now() > deadline {
            return Err(fail("the worker did not apply the backlog within 600 s"));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let worker_secs = (end - t0).as_secs_f64();
    let rss = env.worker_peak_rss_mib();
    let (batch_mean, tx_ms) = worker_batches(env.port).await;
    let upd = settled_update_counts(&db).await?.since(&upd0);
    let stale: i64 = db
        .query_one("SELECT count(*) FROM agent_connection WHERE status <> 'active' OR last_heartbeat_at < now() - interval '10 minutes'", &[])
        .await?
        .get(0);
    if stale != 0 {
        return Err(fail(format!("{stale} connections not active or not refreshed after the backlog")));
    }
    drop(db);
    println!("    backlog of {total} heartbeats: ceiling {ceiling_secs:.2} s, worker {worker_secs:.2} s");
    println!("    row updates during the drain: {}", upd.line());
    let (worker_rate, ceiling_rate) = (total / worker_secs, total / ceiling_secs);
    res.record(SC, "worker heartbeats/s", "msg/s", Target::None, worker_rate);
    res.record(SC, "ceiling (bare consumer) heartbeats/s", "msg/s", Target::None, ceiling_rate);
    res.record(SC, "worker / ceiling", "ratio", Target::AtLeast(0.8), worker_rate / ceiling_rate);
    res.record(SC, "worker mean heartbeat batch", "msgs", Target::None, batch_mean);
    res.record(SC, "worker mean heartbeat transaction", "ms", Target::None, tx_ms);
    res.record(SC, "agent_connection HOT share", "ratio", Target::None, upd.connection_hot_share());
    res.record(SC, "agent_session updates", "rows", Target::None, upd.session.0 as f64);
    if let Some(rss) = rss {
        res.record("6 memory", "worker peak RSS during the backlog drain", "MiB", Target::AtMost(64.0), rss);
    }
    env.cleanup().await;
    Ok(())
}
