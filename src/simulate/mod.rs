//! `simulate` and `demo`: fleets of simulated agents with a simulated backend, to watch the lifecycle happen.
//!
//! `simulate` runs a random fleet against a worker that is already running (with that worker's timings, so with the
//! defaults nothing goes stale within two minutes). `demo` ([`demo`]) starts a worker in this process, with its
//! own database and prefix and timings scaled to a minute, and runs a scripted fleet ([`script`]) through every
//! transition of the state machines. Both count only their own fleet's events ([`tally`]), show them live, close
//! every session they opened, and print last one JSON object with the counts.

pub mod demo;
mod script;
pub mod tally;

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::{json, Value};
use tokio::task::JoinSet;

use crate::client::{reply_result, Client, Subscription};
use crate::config::Settings;
use crate::error::{Error, Result};
use tally::{Progress, Tally};

/// Longest wait for a reply of the worker to the simulator's backend.
const REPLY_WITHIN: Duration = Duration::from_secs(10);
/// Longest wait for the events of the fleet's last changes after its sessions were closed.
const LAST_EVENTS_WITHIN: Duration = Duration::from_secs(20);
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

/// An agent of a simulated fleet and its session.
#[derive(Debug, Clone)]
pub(crate) struct Member {
    agent_id: String,
    session_id: String,
}

/// Creates one session for each agent (waiting for each reply).
async fn open_sessions(client: &Client, agents: impl Iterator<Item = String>) -> Result<Vec<Member>> {
    let mut members = Vec::new();
    for agent_id in agents {
        let reply =
            client.request(&json!({"type": "session.create", "agent_id": agent_id}), None, REPLY_WITHIN).await?;
        let result = reply_result(&reply).map_err(|e| Error::Reply(format!("session.create: {}", e.message)))?;
        let session_id = result["session_id"].as_str().unwrap_or_default().to_string();
        members.push(Member { agent_id, session_id });
    }
    Ok(members)
}

/// Whether an agent acknowledges an instruction offered to it: its `agent_id` and the instruction's `retry_count`.
type AckPolicy<'a> = &'a (dyn Fn(&str, i64) -> bool + Sync);

/// The events side of a run: the fleet's subscription, its tally and the live display.
struct Watch {
    events: Subscription,
    tally: Tally,
    progress: Progress,
}

impl Watch {
    /// Subscribes to every event of the client's prefix, counting those of agents whose id starts with `fleet`.
    async fn new(client: &Client, fleet: &str) -> Result<Self> {
        Ok(Self { events: client.subscribe("#").await?, tally: Tally::new(fleet), progress: Progress::new() })
    }

    /// Reads the next event, if one comes within `wait`, and counts it; returns it when it is the fleet's.
    async fn next(&mut self, wait: Duration) -> Option<Value> {
        let (_, event) = self.events.next_raw(wait).await?;
        self.tally.record(&event).then_some(event)
    }

    /// Counts events until `until`, acknowledging each instruction offered (created or retried) that `acks` accepts,
    /// showing progress; fails as soon as one of `tasks` fails.
    async fn until(
        &mut self,
        client: &Client,
        until: Instant,
        tasks: &mut JoinSet<Result<()>>,
        acks: AckPolicy<'_>,
    ) -> Result<()> {
        while Instant::now() < until {
            if let Some(event) = self.next(Duration::from_millis(100)).await {
                let ty = event["event_type"].as_str().unwrap_or_default();
                if ty == "agent.instruction.created" || ty == "agent.instruction.retry" {
                    let agent = event["agent_id"].as_str().unwrap_or_default();
                    if acks(agent, event["retry_count"].as_i64().unwrap_or(0)) {
                        let ack = json!({
                            "type": "instruction.ack", "instruction_id": event["instruction_id"],
                            "agent_id": agent, "session_id": event["session_id"], "status": "processed",
                        });
                        client.send(&ack, Some(&uuid::Uuid::new_v4().to_string())).await?;
                    }
                }
            }
            self.progress.tick(&self.tally);
            if let Some(done) = tasks.try_join_next() {
                done.map_err(|e| Error::TaskFailed(format!("a simulated agent: {e}")))??;
            }
        }
        Ok(())
    }

    /// Ends the fleet: closes every session it opened (its connections are closed and its open instructions
    /// cancelled), waits for their `agent.session.closed` events, then for the events still on their way (until
    /// none came for half a second), and ends the display.
    async fn end_fleet(&mut self, client: &Client, members: &[Member]) -> Result<()> {
        let closed_before = self.tally.count("agent.session.closed");
        for m in members {
            let close = json!({"type": "session.close", "session_id": m.session_id});
            let reply = client.request(&close, None, REPLY_WITHIN).await?;
            reply_result(&reply).map_err(|e| Error::Reply(format!("session.close {}: {}", m.session_id, e.message)))?;
        }
        let deadline = Instant::now() + LAST_EVENTS_WITHIN;
        let expected = closed_before + members.len() as u64;
        while self.tally.count("agent.session.closed") < expected {
            if Instant::now() > deadline {
                return Err(Error::Timeout(format!(
                    "{} of the {} sessions' agent.session.closed events arrived within {LAST_EVENTS_WITHIN:?}",
                    self.tally.count("agent.session.closed") - closed_before,
                    members.len()
                )));
            }
            self.next(Duration::from_millis(100)).await;
            self.progress.tick(&self.tally);
        }
        let mut quiet_since = Instant::now();
        while quiet_since.elapsed() < Duration::from_millis(500) && Instant::now() < deadline {
            if self.next(Duration::from_millis(100)).await.is_some() {
                quiet_since = Instant::now();
            }
        }
        self.progress.finish(&self.tally);
        Ok(())
    }
}

/// Runs `simulate`: a random fleet against a running worker, a line of figures every second (redrawn in place on a
/// terminal), then the fleet's sessions closed and one JSON object with the counts of its events.
pub async fn run(settings: Settings, args: SimulateArgs) -> Result<()> {
    args.check()?;
    let client = Arc::new(Client::connect(&settings.amqp.url, &settings.amqp.prefix).await?);
    let fleet = format!("sim-{}-", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let mut watch = Watch::new(&client, &fleet).await?;
    let silent_n = (args.agents as f64 * args.silent_ratio).round() as usize;
    let members = open_sessions(&client, (0..args.agents).map(|i| format!("{fleet}{i}"))).await?;
    let silent: Vec<bool> = (0..args.agents).map(|i| i < silent_n).collect();
    println!(
        "simulating {} agents ({} go quiet) for {}s against prefix {}",
        args.agents, silent_n, args.duration, settings.amqp.prefix
    );
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(args.duration);
    let quiet_at = start + Duration::from_secs_f64(args.duration / 4.0);
    let mut tasks = JoinSet::new();
    for (m, silent) in members.iter().zip(&silent) {
        let (m, silent, client, sent) = (m.clone(), *silent, client.clone(), watch.tally.heartbeats_sent());
        let interval = Duration::from_secs_f64(args.heartbeat_interval);
        tasks.spawn(async move {
            let connection_id = format!("{}-conn", m.agent_id);
            while Instant::now() < end {
                if !(silent && Instant::now() > quiet_at) {
                    client.heartbeat(&m.agent_id, &m.session_id, &connection_id).await?;
                    sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                tokio::time::sleep(interval).await;
            }
            Ok::<(), Error>(())
        });
    }
    {
        let (members, client, args) = (members.clone(), client.clone(), args.clone());
        tasks.spawn(async move {
            let mut seq = 0i64;
            while Instant::now() < end {
                let m = &members[rand::rng().random_range(0..members.len())];
                seq += 1;
                let create = json!({
                    "type": "instruction.create", "session_id": m.session_id, "agent_id": m.agent_id,
                    "instruction_type": "simulate.acquire", "payload": {"step": seq},
                    "sequence_number": seq, "ttl_seconds": args.instruction_ttl, "max_retries": args.max_retries,
                });
                client.send(&create, Some(&uuid::Uuid::new_v4().to_string())).await?;
                tokio::time::sleep(Duration::from_secs_f64(args.instruction_interval)).await;
            }
            Ok(())
        });
    }
    let acks = |agent: &str, _retry: i64| {
        let index = agent.strip_prefix(fleet.as_str()).and_then(|i| i.parse::<usize>().ok());
        let quiet = index.is_some_and(|i| silent[i]) && Instant::now() > quiet_at;
        !quiet && rand::rng().random_bool(args.ack_ratio)
    };
    watch.until(&client, end, &mut tasks, &acks).await?;
    tasks.shutdown().await;
    watch.end_fleet(&client, &members).await?;
    let mut summary = watch.tally.to_json();
    summary["agents"] = json!(args.agents);
    summary["seconds"] = json!((start.elapsed().as_secs_f64() * 10.0).round() / 10.0);
    println!("{summary}");
    if let Ok(c) = Arc::try_unwrap(client) {
        c.close().await;
    }
    Ok(())
}
