//! The command line: `run`, `migrate`, `stats`, `session create|close`, `sweep --once`, `config`, `simulate`, `demo`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::error::Result;
use crate::manager::AgentConnectionManager;
use crate::simulate::demo::DemoArgs;
use crate::simulate::SimulateArgs;
use crate::sweeper::BacklogProbe;
use crate::{amqp, db, http, telemetry};

/// Tracks remote agents' sessions, connections, heartbeats and instructions: a RabbitMQ worker on PostgreSQL.
///
/// Configuration is layered: built-in defaults, config/default.toml (in the working directory), the file given by
/// --config or ACM_CONFIG, then ACM_* environment variables (nested with "__", e.g. ACM_DATABASE__URL).
#[derive(Debug, Parser)]
#[command(name = "agent-connection-manager", version, about, long_about)]
pub struct Cli {
    /// Extra configuration file (TOML), layered over config/default.toml.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Cmd,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Migrate, declare the topology, consume heartbeats and commands, sweep, relay events and serve HTTP until
    /// SIGINT or SIGTERM, then shut down gracefully.
    Run,
    /// Create the database if missing and apply the migrations in sql/ (safe to run concurrently).
    Migrate,
    /// Print the connection statistics as one JSON object.
    Stats {
        /// Print them again every SECONDS until interrupted.
        #[arg(long, value_name = "SECONDS")]
        watch: Option<u64>,
    },
    /// Create or close a session.
    #[command(subcommand)]
    Session(SessionCmd),
    /// Run the sweeper.
    Sweep {
        /// Run one cycle and print what it changed as JSON (the only mode; the worker sweeps on its own).
        #[arg(long, required = true)]
        once: bool,
    },
    /// Print the effective configuration as TOML, secrets redacted.
    Config,
    /// Run simulated agents and a simulated backend against a running worker (with that worker's timings); print
    /// a line a second and, last, the counts of the fleet's events as one JSON object.
    Simulate(SimulateArgs),
    /// The whole lifecycle in a minute: a worker in this process (own database and prefix, removed afterwards;
    /// timings scaled to seconds) and a scripted fleet through every transition; a line a second, then the counts of
    /// its events as one JSON object.
    Demo(DemoArgs),
}

/// `session` subcommands.
#[derive(Debug, Subcommand)]
pub enum SessionCmd {
    /// Create an active session and print its id.
    Create {
        /// The agent that owns the session.
        #[arg(long)]
        agent_id: String,
        /// Associated acquisition UUID.
        #[arg(long)]
        acquisition_uuid: Option<String>,
        /// Session name (default Session-YYYYmmdd-HHMMSS, UTC).
        #[arg(long)]
        name: Option<String>,
        /// Free-text description.
        #[arg(long)]
        description: Option<String>,
        /// Experimental parameters as a JSON object.
        #[arg(long, value_name = "JSON")]
        parameters: Option<String>,
    },
    /// Close a session: exit status 0 when closed, 1 when there is no such session.
    Close {
        /// The session id.
        session_id: String,
    },
}

/// Runs the command line; returns the process exit status.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let loaded = Settings::load_command_line(cli.config.as_deref()).and_then(|s| {
        if matches!(cli.command, Cmd::Run) {
            s.validate_worker().map(|_| s)
        } else {
            Ok(s)
        }
    });
    let settings = match loaded {
        Ok(s) => s,
        Err(e) => {
            eprintln!("agent-connection-manager: {e}");
            return ExitCode::from(2);
        }
    };
    // One-shot commands stay quiet: their output is on stdout.
    let level = if matches!(cli.command, Cmd::Run) { "info" } else { "warn" };
    telemetry::init(settings.log.format, level);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("agent-connection-manager: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(dispatch(cli.command, settings));
    // Tasks abandoned at the end of the shutdown grace (a connection the broker blocks) must not hold the exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("agent-connection-manager: {e}{}", hint(&e));
            ExitCode::FAILURE
        }
    }
}

/// What to do about an error, when the error alone does not say.
fn hint(e: &crate::error::Error) -> &'static str {
    use tokio_postgres::error::SqlState;
    let code = match e {
        crate::error::Error::Db(db) => db.code(),
        crate::error::Error::Pool(pool) => match &pool.error {
            deadpool_postgres::PoolError::Backend(db) => db.code(),
            _ => None,
        },
        _ => None,
    };
    if code == Some(&SqlState::UNDEFINED_TABLE) || code == Some(&SqlState::INVALID_CATALOG_NAME) {
        " (the database or its schema does not exist yet: run `agent-connection-manager migrate`)"
    } else {
        ""
    }
}

async fn dispatch(command: Cmd, settings: Settings) -> Result<ExitCode> {
    match command {
        Cmd::Run => run(settings).await,
        Cmd::Migrate => {
            db::migrate(&settings.database).await?;
            println!("migrations applied");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Config => {
            print!("{}", settings.to_redacted_toml());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Stats { watch } => {
            // Read-only: it changes nothing, migrations included; a database without the schema is an error.
            let m = AgentConnectionManager::new(settings)?;
            use std::io::{IsTerminal, Write};
            let terminal = watch.is_some() && std::io::stdout().is_terminal();
            loop {
                let s = m.get_connection_stats().await?;
                let text = if terminal {
                    // A refreshing view: clear the screen, then one line per figure.
                    format!(
                        "\x1b[2J\x1b[H{}  (every {}s, Ctrl-C to stop)\n\n  active connections   {:>10}\n  active sessions      {:>10}\n  inactive sessions    {:>10}\n  pending instructions {:>10}\n  sent instructions    {:>10}\n  total pending        {:>10}\n",
                        s.timestamp.to_rfc3339(),
                        watch.unwrap_or_default(),
                        s.active_connections,
                        s.active_sessions,
                        s.inactive_sessions,
                        s.pending_instructions,
                        s.sent_instructions,
                        s.total_instructions_pending
                    )
                } else {
                    format!("{}\n", serde_json::to_string(&s).unwrap_or_default())
                };
                let mut out = std::io::stdout().lock();
                if out.write_all(text.as_bytes()).and_then(|_| out.flush()).is_err() {
                    break; // the reader went away (e.g. `| head`)
                }
                drop(out);
                let Some(secs) = watch else { break };
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => break,
                    _ = tokio::time::sleep(Duration::from_secs(secs.max(1))) => {}
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Session(SessionCmd::Create { agent_id, acquisition_uuid, name, description, parameters }) => {
            let params: Option<Map<String, Value>> = match parameters {
                None => None,
                Some(p) => match serde_json::from_str::<Value>(&p) {
                    Ok(Value::Object(o)) => Some(o),
                    _ => {
                        eprintln!("agent-connection-manager: --parameters must be a JSON object");
                        return Ok(ExitCode::from(2));
                    }
                },
            };
            db::migrate(&settings.database).await?;
            let m = AgentConnectionManager::new(settings)?;
            let id = m
                .create_session(&agent_id, acquisition_uuid.as_deref(), name.as_deref(), description.as_deref(), params)
                .await?;
            println!("{id}");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Session(SessionCmd::Close { session_id }) => {
            db::migrate(&settings.database).await?;
            let m = AgentConnectionManager::new(settings)?;
            if m.close_session(&session_id).await? {
                println!("closed");
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!("no such session: {session_id}");
                Ok(ExitCode::FAILURE)
            }
        }
        Cmd::Sweep { .. } => {
            db::migrate(&settings.database).await?;
            let probe = BacklogProbe::broker();
            let topology = amqp::Topology::for_settings(&settings);
            let conn = match tokio::time::timeout(
                Duration::from_secs(5),
                amqp::connect(&settings.amqp.url, "acm sweep"),
            )
            .await
            {
                Ok(Ok(conn)) => match conn.create_channel().await {
                    Ok(ch) => {
                        probe.set(Some((ch, topology))).await;
                        Some(conn)
                    }
                    Err(_) => None,
                },
                _ => {
                    tracing::warn!("broker unreachable: stale connections are not judged this cycle");
                    None
                }
            };
            let m = AgentConnectionManager::new(settings)?;
            let report = m.sweep_once(probe).await?;
            println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
            if let Some(conn) = conn {
                let _ = conn.close(200, "bye".into()).await;
            }
            // A task that failed is in the report; the exit status says so too.
            Ok(if report.failed_tasks.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Cmd::Simulate(args) => crate::simulate::run(settings, args).await.map(|_| ExitCode::SUCCESS),
        Cmd::Demo(args) => crate::simulate::demo::run(settings, args).await.map(|_| ExitCode::SUCCESS),
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn run(settings: Settings) -> Result<ExitCode> {
    let listen = settings.http.listen.clone();
    let manager = Arc::new(AgentConnectionManager::new(settings)?);
    let signal = shutdown_signal();
    tokio::pin!(signal);
    tokio::select! {
        r = manager.start_waiting() => r?,
        _ = &mut signal => {
            tracing::info!("interrupted before start");
            return Ok(ExitCode::SUCCESS);
        }
    }
    let http_stop = CancellationToken::new();
    let mut http_task = None;
    if !listen.is_empty() {
        let addr = listen.parse().map_err(|_| crate::config::ConfigError("http.listen: not an address".into()))?;
        match http::serve(manager.clone(), addr, http_stop.clone()).await {
            Ok((_, task)) => http_task = Some(task),
            Err(e) => {
                manager.stop().await?;
                return Err(http::listen_error(addr, &e).into());
            }
        }
    }
    signal.await;
    tracing::info!("shutdown requested");
    manager.stop().await?;
    http_stop.cancel();
    if let Some(t) = http_task {
        let _ = t.await;
    }
    Ok(ExitCode::SUCCESS)
}
