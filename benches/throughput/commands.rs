//! Scenario `commands`: clients looping `session.create`, `instruction.create` and `instruction.ack`, each awaiting
//! its reply.

use std::time::{Duration, Instant};

use agent_connection_manager::client::{reply_result, Client};
use serde_json::json;
use tokio::task::JoinSet;

use crate::env::Env;
use crate::opts::Opts;
use crate::results::{ms, percentile, sorted, Results, Target};
use crate::{describe, fail, Res};

pub async fn scenario_commands(o: &Opts, run: usize, res: &mut Results) -> Res<()> {
    let mut env = Env::new(o, "commands");
    env.migrate().await?;
    env.start_worker(&[]).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut clients = Vec::new();
    for _ in 0..o.clients {
        clients.push(Client::connect(&o.amqp_url, &env.prefix).await?);
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
    env.cleanup().await;
    if let Some(e) = err {
        return Err(fail(format!("a command client failed: {e}")));
    }
    let every = sorted(all.iter().flatten().copied().collect());
    let rts = every.len() as f64 / elapsed;
    println!("    {} round trips in {elapsed:.2} s", every.len());
    res.record("3 commands", "round trips/s (16 clients)", "1/s", Target::None, rts);
    res.record("3 commands", "round trip p50", "ms", Target::None, percentile(&every, 50.0));
    res.record("3 commands", "round trip p99", "ms", Target::None, percentile(&every, 99.0));
    let names = ["session.create p99", "instruction.create p99", "instruction.ack p99"];
    for (k, name) in names.into_iter().enumerate() {
        let v = sorted(std::mem::take(&mut all[k]));
        res.record("3 commands", name, "ms", Target::None, percentile(&v, 99.0));
    }
    Ok(())
}
