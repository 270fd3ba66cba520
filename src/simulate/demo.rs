//! `demo`: the whole lifecycle in a minute, needing nothing but PostgreSQL and RabbitMQ (the quick start's).
//!
//! It starts a worker in this process ([`AgentConnectionManager::start`]) on a database and an AMQP prefix of its
//! own (random names; migrated and declared at start, dropped and deleted at the end unless `--keep`), with the
//! sweeper's thresholds scaled from minutes and hours down to seconds ([`scaled`]), and runs the scripted fleet of
//! [`super::script`] through every transition of the state machines while it shows its events live.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use super::script::{self, role_of, CYCLE_SECS};
use super::{open_sessions, Watch};
use crate::amqp::Topology;
use crate::client::Client;
use crate::config::{nonzero, ConfigError, Settings};
use crate::error::{Error, Result};
use crate::manager::AgentConnectionManager;

/// Longest wait for the in-process worker's consumers to run.
const READY_WITHIN: Duration = Duration::from_secs(30);
/// Seconds of `--duration` kept for ending the fleet, so that its last events come within the duration too.
const ENDING_SECS: f64 = 3.0;

/// Options of `demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Number of simulated agents (at least 5: one for each role of the story).
    #[arg(long, default_value_t = 20)]
    pub agents: usize,
    /// Seconds from the fleet's first session to its last event (at least 20: one cycle of the story).
    #[arg(long, default_value_t = 60.0)]
    pub duration: f64,
    /// Keep the demo's database and exchanges and queues afterwards (their names are printed), to look at them.
    #[arg(long)]
    pub keep: bool,
}

impl DemoArgs {
    fn check(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::Config(ConfigError(m.to_string())));
        if self.agents < script::ROLES.len() {
            return bad("--agents must be at least 5 (one agent for each role of the story)");
        }
        if self.duration.is_nan() || self.duration < CYCLE_SECS as f64 {
            return bad("--duration must be at least 20 (one cycle of the story)");
        }
        Ok(())
    }
}

/// The demo worker's settings: `base` (its servers and credentials) with a database and a prefix of its own, no
/// HTTP endpoint (the quick start's worker holds its port), and timings scaled to a minute. The stale brake needs
/// more connections than the fleet has, so it never holds the staleness the story plans.
pub fn scaled(base: &Settings, suffix: &str, agents: usize) -> Settings {
    let mut s = base.clone();
    s.database.url = with_dbname(&base.database.url, &format!("acm_demo_{suffix}"));
    s.amqp.prefix = format!("acm-demo-{suffix}");
    s.http.listen = String::new();
    s.sweeper.check_interval_secs = nonzero(1);
    s.sweeper.connection_stale_after_secs = nonzero(3);
    s.sweeper.session_inactive_after_secs = nonzero(9);
    s.sweeper.instruction_retry_window_secs = nonzero(2);
    s.sweeper.stale_brake_min_connections = s.sweeper.stale_brake_min_connections.max(agents as u64 + 1);
    s.worker.session_activity_granularity_secs = 1;
    s.worker.shutdown_grace_secs = nonzero(5);
    s.instructions.default_ttl_secs = nonzero(2);
    s
}

/// `url` naming the database `name` instead of its own: the path of a URL (several hosts included), or a `dbname`
/// pair added to a libpq key=value string (the last one counts).
pub fn with_dbname(url: &str, name: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
            let (authority, tail) = rest.split_at(authority_end);
            let query = tail.find('?').map(|q| &tail[q..]).unwrap_or("");
            format!("{scheme}://{authority}/{name}{query}")
        }
        None => format!("{url} dbname={name}"),
    }
}

/// Runs the demo; the exit status is an error when the fleet or the worker failed.
pub async fn run(base: Settings, args: DemoArgs) -> Result<()> {
    args.check()?;
    let suffix = uuid::Uuid::new_v4().simple().to_string()[..10].to_string();
    let settings = scaled(&base, &suffix, args.agents);
    settings.validate()?;
    let database = settings
        .database
        .url
        .parse::<tokio_postgres::Config>()
        .ok()
        .and_then(|c| c.get_dbname().map(str::to_string))
        .unwrap_or_default();
    println!(
        "demo: a worker in this process on database {database} and prefix {} ({}); stale after {}s, \
         inactive after {}s, instructions expire after {}s with one retry {}s later, a sweep every {}s",
        settings.amqp.prefix,
        if args.keep { "kept at the end: --keep" } else { "removed at the end" },
        settings.sweeper.connection_stale_after_secs,
        settings.sweeper.session_inactive_after_secs,
        settings.instructions.default_ttl_secs,
        settings.sweeper.instruction_retry_window_secs,
        settings.sweeper.check_interval_secs,
    );
    let manager = AgentConnectionManager::new(settings.clone())?;
    let outcome = tokio::select! {
        r = play(&manager, &settings, &args, &database) => r,
        _ = tokio::signal::ctrl_c() => Err(Error::Shutdown),
    };
    if let Err(e) = manager.stop().await {
        tracing::warn!(error = %e, "the demo worker did not stop cleanly");
    }
    drop(manager);
    if args.keep {
        eprintln!("demo: kept database {database} and prefix {}", settings.amqp.prefix);
    } else if let Err(e) = remove(&settings, &database).await {
        eprintln!("demo: could not remove database {database} or prefix {}: {e}", settings.amqp.prefix);
        return outcome.and(Err(e));
    }
    outcome
}

/// Starts the worker, plays the story and prints the summary.
async fn play(manager: &AgentConnectionManager, settings: &Settings, args: &DemoArgs, database: &str) -> Result<()> {
    manager.start().await?;
    let ready = Instant::now() + READY_WITHIN;
    while !manager.health().consumers_running.load(std::sync::atomic::Ordering::Relaxed) {
        if Instant::now() > ready {
            return Err(Error::Timeout(format!("the demo worker's consumers did not start within {READY_WITHIN:?}")));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let client = Arc::new(Client::connect(&settings.amqp.url, &settings.amqp.prefix).await?);
    let fleet = "demo-";
    let mut watch = Watch::new(&client, fleet).await?;
    let start = Instant::now();
    let members = open_sessions(&client, (0..args.agents).map(|i| format!("{fleet}{i}"))).await?;
    let end = start + Duration::from_secs_f64(args.duration - ENDING_SECS);
    println!("demo: {} agents for {}s; a line a second:", args.agents, args.duration);
    let mut tasks = script::start(&client, &members, start, end, &watch.tally.heartbeats_sent());
    let acks = |agent: &str, retry: i64| role_of(fleet, agent).is_some_and(|role| role.acks(retry));
    watch.until(&client, end, &mut tasks, &acks).await?;
    tasks.shutdown().await;
    script::leave_open_instructions(&client, fleet, &members).await?;
    watch.end_fleet(&client, &members).await?;
    if let Ok(client) = Arc::try_unwrap(client) {
        client.close().await;
    }
    let mut summary = watch.tally.to_json();
    summary["agents"] = json!(args.agents);
    summary["seconds"] = json!((start.elapsed().as_secs_f64() * 10.0).round() / 10.0);
    summary["database"] = json!(database);
    summary["prefix"] = json!(settings.amqp.prefix);
    summary["kept"] = json!(args.keep);
    println!("{summary}");
    let missing = watch.tally.missing();
    if !missing.is_empty() {
        return Err(Error::Timeout(format!("the demo never saw {}", missing.join(", "))));
    }
    Ok(())
}

/// Drops the demo's database and deletes its exchanges and queues.
async fn remove(settings: &Settings, database: &str) -> Result<()> {
    let conn = crate::amqp::connect(&settings.amqp.url, "agent-connection-manager demo cleanup").await?;
    let channel = conn.create_channel().await?;
    Topology::for_settings(settings).delete(&channel).await?;
    let _ = conn.close(200, "demo over".into()).await;
    let admin = crate::db::connect(&settings.database, Some("postgres")).await?;
    admin.batch_execute(&format!("DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)")).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::with_dbname;

    #[test]
    fn the_demo_database_replaces_the_configured_one_in_every_form_of_url() {
        assert_eq!(with_dbname("postgres://u@h:5432/acm", "d"), "postgres://u@h:5432/d");
        assert_eq!(with_dbname("postgres://u:pw@h", "d"), "postgres://u:pw@h/d");
        assert_eq!(
            with_dbname("postgres://u@h1:5432,h2:5433/acm?target_session_attrs=read-write", "d"),
            "postgres://u@h1:5432,h2:5433/d?target_session_attrs=read-write"
        );
        assert_eq!(with_dbname("postgresql://h?sslmode=require", "d"), "postgresql://h/d?sslmode=require");
        let kv = with_dbname("host=h dbname=acm user=u", "d");
        assert_eq!(kv.parse::<tokio_postgres::Config>().unwrap().get_dbname(), Some("d"));
    }
}
