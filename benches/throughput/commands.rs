//! Scenario `commands`: clients looping `session.create`, `instruction.create` and `instruction.ack`, each awaiting
//! its reply; first against an echo responder (the ceiling), then against the worker.
//!
//! The echo responder is a child process (this binary with `ACM_BENCH_ROLE=echo-responder`) consuming a command
//! queue declared by the library exactly like `<prefix>.commands` (quorum), with the worker's prefetch: for every
//! delivery it publishes a canned successful reply to `reply_to` (on a confirm channel, awaiting the confirm) and
//! then acknowledges, each delivery in its own task, with no database.

use std::process::Stdio;
use std::time::{Duration, Instant};

use agent_connection_manager::amqp::{self, publish_confirmed, Topology};
use agent_connection_manager::client::{reply_result, Client};
use agent_connection_manager::config::Settings;
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use serde_json::json;
use tokio::io::AsyncBufReadExt;
use tokio::task::JoinSet;

use crate::env::Env;
use crate::opts::Opts;
use crate::results::{ms, percentile, sorted, Results, Target};
use crate::{describe, fail, Res, ROLE_ENV};

/// The echo responder's loop (see the module documentation); runs until its queue is deleted or 600 s pass.
pub async fn echo_responder() -> Res<()> {
    let var = |k: &str| std::env::var(k).map_err(|_| fail(format!("{k} not set")));
    let url = var("ACM_BENCH_AMQP_URL")?;
    let queue = var("ACM_BENCH_QUEUE")?;
    let prefetch: u16 = var("ACM_BENCH_PREFETCH")?.parse()?;
    let conn = amqp::connect(&url, "acm bench echo responder").await?;
    let ch = conn.create_channel().await?;
    let publisher = amqp::confirm_channel(&conn).await?;
    ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(queue.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await?;
    println!("ready");
    let body = serde_json::to_vec(&json!({"ok": true, "result": {
        "session_id": "echo", "instruction_id": "echo", "accepted": true}}))?;
    let deadline = Instant::now() + Duration::from_secs(600);
    while let Ok(Some(Ok(d))) = tokio::time::timeout_at(deadline.into(), consumer.next()).await {
        let (publisher, body) = (publisher.clone(), body.clone());
        tokio::spawn(async move {
            if let Some(reply_to) = d.properties.reply_to().as_ref().map(|r| r.as_str().to_string()) {
                let mut props = BasicProperties::default().with_content_type("application/json".into());
                if let Some(c) = d.properties.correlation_id() {
                    props = props.with_correlation_id(c.clone());
                }
                let sent = publish_confirmed(&publisher, "", &reply_to, &body, props, Duration::from_secs(10)).await;
                if let Err(e) = sent {
                    eprintln!("echo responder: reply not confirmed: {e}");
                    return;
                }
            }
            let _ = d.acker.ack(BasicAckOptions::default()).await;
        });
    }
    Ok(())
}

/// `traced`: the worker exports spans to a collector that is down ([`Env::traced_collector_down`]); the figures go
/// under "3b commands (traced, collector down)".
pub async fn scenario_commands(o: &Opts, run: usize, res: &mut Results, traced: bool) -> Res<()> {
    let sc: &'static str = if traced { "3b commands (traced, collector down)" } else { "3 commands" };
    let mut env = Env::new(o, "commands");
    env.migrate().await?;
    // The ceiling: the same clients against the echo responder on a queue declared like <prefix>.commands.
    let ceiling_prefix = format!("{}-ceiling", env.prefix);
    env.extra_prefixes.push(ceiling_prefix.clone());
    let ceiling = Topology::new(&ceiling_prefix);
    {
        let conn = amqp::connect(&o.amqp_url, "acm bench setup").await?;
        ceiling.declare(&conn, &Settings::default()).await?;
        let _ = conn.close(200, "done".into()).await;
    }
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .env(ROLE_ENV, "echo-responder")
        .env("ACM_BENCH_AMQP_URL", &o.amqp_url)
        .env("ACM_BENCH_QUEUE", &ceiling.command_queue)
        .env("ACM_BENCH_PREFETCH", Settings::default().amqp.prefetch.to_string())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().ok_or_else(|| fail("no stdout"))?).lines();
    let ready = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await??;
    if ready.as_deref() != Some("ready") {
        return Err(fail(format!("echo responder: {ready:?}")));
    }
    let echo = drive(o, run, &ceiling_prefix).await;
    let _ = child.kill().await;
    let (echo_all, echo_secs) = echo?;
    let echo_rts = echo_all.iter().map(Vec::len).sum::<usize>() as f64 / echo_secs;

    env.start_worker(&if traced { Env::traced_collector_down() } else { Vec::new() }).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let worker = drive(o, run, &env.prefix.clone()).await;
    env.cleanup().await;
    let (mut all, elapsed) = worker?;
    let every = sorted(all.iter().flatten().copied().collect());
    let rts = every.len() as f64 / elapsed;
    println!("    {} round trips in {elapsed:.2} s (echo responder: {echo_rts:.0}/s)", every.len());
    res.record(sc, "round trips/s (16 clients)", "1/s", Target::None, rts);
    res.record(sc, "ceiling: echo responder round trips/s", "1/s", Target::None, echo_rts);
    res.record(sc, "worker / echo responder", "ratio", Target::AtLeast(0.7), rts / echo_rts);
    let echo_every = sorted(echo_all.iter().flatten().copied().collect());
    res.record(sc, "echo responder round trip p50", "ms", Target::None, percentile(&echo_every, 50.0));
    res.record(sc, "round trip p50", "ms", Target::None, percentile(&every, 50.0));
    res.record(sc, "round trip p99", "ms", Target::None, percentile(&every, 99.0));
    let names = ["session.create p99", "instruction.create p99", "instruction.ack p99"];
    for (k, name) in names.into_iter().enumerate() {
        let v = sorted(std::mem::take(&mut all[k]));
        res.record(sc, name, "ms", Target::None, percentile(&v, 99.0));
    }
    Ok(())
}

/// `--clients` clients looping the three commands against `prefix` for `--command-secs`; the latencies of each
/// command (ms) and the elapsed seconds.
async fn drive(o: &Opts, run: usize, prefix: &str) -> Res<([Vec<f64>; 3], f64)> {
    let mut clients = Vec::new();
    for _ in 0..o.clients {
        clients.push(Client::connect(&o.amqp_url, prefix).await?);
    }
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs(o.command_secs);
    let mut tasks = JoinSet::new();
    for (c, client) in clients.into_iter().enumerate() {
        tasks.spawn(async move {
            let timeout = Duration::from_secs(10);
            let agent = format!("cmd-agent-{run}-{c}");
            let mut lat: [Vec<f64>; 3] = [Vec::new(), Vec::new(), Vec::new()];
            let mut i = 0u64;
            let outcome: Res<()> = async {
                while Instant::now() < end {
                    let t = Instant::now();
                    let r =
                        client.request(&json!({"type": "session.create", "agent_id": agent}), None, timeout).await?;
                    lat[0].push(ms(t.elapsed()));
                    let r = reply_result(&r).map_err(|e| fail(format!("session.create: {e:?}")))?;
                    let sid = r["session_id"].as_str().unwrap_or_default().to_string();
                    let t = Instant::now();
                    let r = client
                        .request(
                            &json!({"type": "instruction.create", "agent_id": agent, "session_id": sid,
                                    "instruction_type": "bench", "payload": {"n": i}}),
                            None,
                            timeout,
                        )
                        .await?;
                    lat[1].push(ms(t.elapsed()));
                    let r = reply_result(&r).map_err(|e| fail(format!("instruction.create: {e:?}")))?;
                    let iid = r["instruction_id"].as_str().unwrap_or_default().to_string();
                    let t = Instant::now();
                    let r = client
                        .request(
                            &json!({"type": "instruction.ack", "agent_id": agent, "session_id": sid,
                                    "instruction_id": iid, "status": "processed"}),
                            None,
                            timeout,
                        )
                        .await?;
                    lat[2].push(ms(t.elapsed()));
                    let r = reply_result(&r).map_err(|e| fail(format!("instruction.ack: {e:?}")))?;
                    if r["accepted"] != true {
                        return Err(fail(format!("instruction.ack not accepted: {r}")));
                    }
                    i += 1;
                }
                Ok(())
            }
            .await;
            client.close().await;
            outcome.map(|_| lat)
        });
    }
    let mut all: [Vec<f64>; 3] = [Vec::new(), Vec::new(), Vec::new()];
    let mut err = None;
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok(lat)) => {
                for (k, v) in lat.into_iter().enumerate() {
                    all[k].extend(v);
                }
            }
            Ok(Err(e)) => err = Some(describe(e.as_ref())),
            Err(e) => err = Some(e.to_string()),
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    if let Some(e) = err {
        return Err(fail(format!("a command client failed: {e}")));
    }
    Ok((all, elapsed))
}
