//! `simulate`: a fleet of simulated agents and a simulated backend against a running worker, to watch the whole
//! lifecycle (sessions, heartbeats, instructions, acknowledgements, staleness, retries, expiries) in a minute.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::json;
use tokio::task::JoinSet;

use crate::client::{reply_result, Client};
use crate::config::Settings;
use crate::error::{Error, Result};
use crate::events::EventBody;

/// Options of `simulate`.
#[derive(Debug, Clone, clap::Args)]
pub struct SimulateArgs {
    /// Number of simulated agents.
    #[arg(long, default_value_t = 10)]
    pub agents: usize,
    /// Seconds between an agent's heartbeats.
    #[arg(long, default_value_t = 2.0)]
    pub heartbeat_interval: f64,
    /// Share of instructions an agent acknowledges (0 to 1).
    #[arg(long, default_value_t = 0.7)]
    pub ack_ratio: f64,
    /// Share of agents that go quiet (stop heartbeating and acknowledging) after a quarter of the run.
    #[arg(long, default_value_t = 0.2)]
    pub silent_ratio: f64,
    /// Seconds to run.
    #[arg(long, default_value_t = 60.0)]
    pub duration: f64,
    /// Seconds between the backend's instructions (to a random agent).
    #[arg(long, default_value_t = 1.0)]
    pub instruction_interval: f64,
    /// Seconds an instruction waits for its acknowledgement.
    #[arg(long, default_value_t = 5.0)]
    pub instruction_ttl: f64,
    /// Retries of each instruction.
    #[arg(long, default_value_t = 1)]
    pub max_retries: u32,
}

impl SimulateArgs {
    fn check(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::Config(crate::config::ConfigError(m.to_string())));
        if self.agents == 0 {
            return bad("--agents must be at least 1");
        }
        if !(0.0..=1.0).contains(&self.ack_ratio) || !(0.0..=1.0).contains(&self.silent_ratio) {
            return bad("--ack-ratio and --silent-ratio must be between 0 and 1");
        }
        if self.heartbeat_interval <= 0.0 || self.duration <= 0.0 || self.instruction_interval <= 0.0 {
            return bad("--heartbeat-interval, --duration and --instruction-interval must be positive");
        }
        if self.instruction_ttl <= 0.0 {
            return bad("--instruction-ttl must be positive");
        }
        Ok(())
    }
}

struct Agent {
    agent_id: String,
    session_id: String,
    connection_id: String,
    silent: bool,
}

/// Runs the simulation and prints a summary line every second and a final table.
pub async fn run(settings: Settings, args: SimulateArgs) -> Result<()> {
    args.check()?;
    let client = Arc::new(Client::connect(&settings.amqp.url, &settings.amqp.prefix).await?);
    let mut events = client.subscribe("#").await?;
    let counts: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let run_id = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let silent_n = (args.agents as f64 * args.silent_ratio).round() as usize;
    let mut agents = Vec::with_capacity(args.agents);
    for i in 0..args.agents {
        let agent_id = format!("sim-{run_id}-{i}");
        let reply = client
            .request(&json!({"type": "session.create", "agent_id": agent_id}), None, Duration::from_secs(10))
            .await?;
        let result = reply_result(&reply).map_err(|e| Error::Disconnected(format!("session.create: {}", e.message)))?;
        let session_id = result["session_id"].as_str().unwrap_or_default().to_string();
        agents.push(Arc::new(Agent {
            connection_id: format!("{agent_id}-conn"),
            agent_id,
            session_id,
            silent: i < silent_n,
        }));
    }
    println!("simulating {} agents ({} go quiet) for {}s", args.agents, silent_n, args.duration);
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(args.duration);
    let quiet_at = start + Duration::from_secs_f64(args.duration / 4.0);
    let mut tasks = JoinSet::new();
    for a in &agents {
        let (a, client) = (a.clone(), client.clone());
        let interval = Duration::from_secs_f64(args.heartbeat_interval);
        tasks.spawn(async move {
            while Instant::now() < end {
                if !(a.silent && Instant::now() > quiet_at) {
                    client.heartbeat(&a.agent_id, &a.session_id, &a.connection_id).await?;
                }
                tokio::time::sleep(interval).await;
            }
            Ok::<(), Error>(())
        });
    }
    {
        let (agents, client, args) = (agents.clone(), client.clone(), args.clone());
        tasks.spawn(async move {
            let mut seq = 0i64;
            while Instant::now() < end {
                let a = &agents[rand::rng().random_range(0..agents.len())];
                seq += 1;
                client
                    .send(
                        &json!({
                            "type": "instruction.create", "session_id": a.session_id, "agent_id": a.agent_id,
                            "instruction_type": "simulate.acquire", "payload": {"step": seq},
                            "sequence_number": seq, "ttl_seconds": args.instruction_ttl,
                            "max_retries": args.max_retries,
                        }),
                        Some(&uuid::Uuid::new_v4().to_string()),
                    )
                    .await?;
                tokio::time::sleep(Duration::from_secs_f64(args.instruction_interval)).await;
            }
            Ok(())
        });
    }
    let mut next_line = start + Duration::from_secs(1);
    while Instant::now() < end {
        if let Some((_, v)) = events.next_raw(Duration::from_millis(100)).await {
            let ty = v["event_type"].as_str().unwrap_or("unknown").to_string();
            *counts.lock().map_err(|_| Error::Shutdown)?.entry(ty).or_default() += 1;
            if let Ok(ev) = serde_json::from_value::<crate::events::Event>(v) {
                if let EventBody::InstructionCreated { instruction_id, agent_id, session_id, .. }
                | EventBody::InstructionRetry { instruction_id, agent_id, session_id, .. } = ev.body
                {
                    let agent = agents.iter().find(|a| a.agent_id == agent_id);
                    let acks = agent.is_some_and(|a| !(a.silent && Instant::now() > quiet_at))
                        && rand::rng().random_bool(args.ack_ratio);
                    if acks {
                        client
                            .send(
                                &json!({"type": "instruction.ack", "instruction_id": instruction_id,
                                        "agent_id": agent_id, "session_id": session_id, "status": "processed"}),
                                Some(&uuid::Uuid::new_v4().to_string()),
                            )
                            .await?;
                    }
                }
            }
        }
        if Instant::now() >= next_line {
            next_line += Duration::from_secs(1);
            let c = counts.lock().map_err(|_| Error::Shutdown)?.clone();
            let get = |k: &str| c.get(k).copied().unwrap_or(0);
            println!(
                "t={:>3}s events={:<6} created={} acked={} stale={} restored-or-opened={} retries={} expiries={} inactive={}",
                start.elapsed().as_secs(),
                c.values().sum::<u64>(),
                get("agent.instruction.created"),
                get("agent.instruction.acknowledged"),
                get("agent.connection.stale"),
                get("agent.connection.opened"),
                get("agent.instruction.retry"),
                get("agent.instruction.expired"),
                get("agent.session.inactive"),
            );
        }
        if let Some(Ok(Err(e))) = tasks.try_join_next() {
            return Err(e);
        }
    }
    tasks.abort_all();
    println!("\n{:<34} {:>8}", "event", "count");
    for (k, v) in counts.lock().map_err(|_| Error::Shutdown)?.iter() {
        println!("{k:<34} {v:>8}");
    }
    let stats = client.request(&json!({"type": "stats.get"}), None, Duration::from_secs(10)).await?;
    println!("\nstats: {}", stats["result"]);
    if let Ok(c) = Arc::try_unwrap(client) {
        c.close().await;
    }
    Ok(())
}
