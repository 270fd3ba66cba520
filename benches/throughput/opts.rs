//! Command-line options (`cargo bench --bench throughput -- --help`) and the scenarios they select, read by clap.

use clap::{ArgAction, Parser};

const SCENARIOS: [&str; 10] = [
    "ingest",
    "ingest-transient",
    "ingest-traced",
    "backlog",
    "latency",
    "commands",
    "commands-traced",
    "sweep",
    "stale1m",
    "metrics",
];

const ENV_HELP: &str = "Environment: ACM_BENCH_KEEP_LOGS (set: keep every worker log, not only those of failed \
scenarios), ACM_BENCH_WORKER_BIN (another worker binary to start instead of the one built with the benchmark).";

/// The throughput benchmark's options: `cargo bench --bench throughput [-- OPTIONS]`. Counts may be written with
/// `_` between digits (`1_000_000`).
#[derive(Debug, Clone, Parser)]
#[command(name = "cargo bench --bench throughput --", after_help = ENV_HELP)]
pub struct Opts {
    /// Repetitions of every scenario.
    #[arg(long, default_value = "3", value_parser = positive::<usize>)]
    pub runs: usize,
    /// Scenarios to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_values = SCENARIOS, value_parser = SCENARIOS)]
    pub only: Vec<String>,
    /// Ingest/latency: agents, each with a session and a connection.
    #[arg(long, default_value = "10000", value_parser = positive::<usize>)]
    pub agents: usize,
    /// Ingest: heartbeats per agent.
    #[arg(long, default_value = "10", value_parser = positive::<usize>)]
    pub rounds: usize,
    /// Ingest/latency: publisher connections.
    #[arg(long, default_value = "4", value_parser = positive::<usize>)]
    pub publishers: usize,
    /// Ingest: unconfirmed publishes per publisher.
    #[arg(long, default_value = "500", value_parser = positive::<usize>)]
    pub window: usize,
    /// Latency: offered heartbeats per second.
    #[arg(long, default_value = "5000", value_parser = positive::<u64>)]
    pub rate: u64,
    /// Latency: duration.
    #[arg(long, default_value = "30", value_parser = positive::<u64>)]
    pub latency_secs: u64,
    /// Latency: database poll period.
    #[arg(long, default_value = "5", value_parser = count::<u64>)]
    pub poll_ms: u64,
    /// Commands: concurrent clients.
    #[arg(long, default_value = "16", value_parser = positive::<usize>)]
    pub clients: usize,
    /// Commands: duration.
    #[arg(long, default_value = "20", value_parser = positive::<u64>)]
    pub command_secs: u64,
    /// Sweep: sessions.
    #[arg(long, default_value = "10000", value_parser = positive::<i64>)]
    pub sessions: i64,
    /// Sweep: instructions.
    #[arg(long, default_value = "1000000", value_parser = count::<i64>)]
    pub instructions: i64,
    /// Sweep: of which due.
    #[arg(long, default_value = "100000", value_parser = count::<i64>)]
    pub due: i64,
    /// Sweep: connections.
    #[arg(long, default_value = "100000", value_parser = count::<i64>)]
    pub connections: i64,
    /// Sweep: of which stale.
    #[arg(long, default_value = "10000", value_parser = count::<i64>)]
    pub stale: i64,
    /// Sweep: idempotency records kept.
    #[arg(long, default_value = "100000", value_parser = count::<i64>)]
    pub history: i64,
    /// Sweep, stale1m: idle cycles timed per run.
    #[arg(long, default_value = "10", value_parser = positive::<usize>)]
    pub idle_cycles: usize,
    /// Backlog: connections.
    #[arg(long, default_value = "10000", value_parser = positive::<usize>)]
    pub backlog_connections: usize,
    /// Backlog: sessions they belong to.
    #[arg(long, default_value = "100", value_parser = positive::<usize>)]
    pub backlog_sessions: usize,
    /// Backlog: heartbeats per connection queued before the consumer starts.
    #[arg(long, default_value = "20", value_parser = positive::<usize>)]
    pub backlog_rounds: usize,
    /// Stale1m, metrics: active connections.
    #[arg(long, default_value = "1000000", value_parser = positive::<i64>)]
    pub big_connections: i64,
    /// Stale1m: of which made stale.
    #[arg(long, default_value = "1000", value_parser = count::<i64>)]
    pub big_stale: i64,
    /// Metrics: scrapes timed at each size.
    #[arg(long, default_value = "20", value_parser = positive::<usize>)]
    pub scrapes: usize,
    /// Do not print the full EXPLAIN output.
    #[arg(long = "no-plans", action = ArgAction::SetFalse)]
    pub plans: bool,
    /// PostgreSQL URL without a database name.
    #[arg(long, env = "ACM_BENCH_PG_BASE", default_value = "postgres://postgres@127.0.0.1:5432")]
    pub pg_base: String,
    /// RabbitMQ URL.
    #[arg(long, env = "ACM_BENCH_AMQP_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub amqp_url: String,
    /// Passed by cargo to benches without the libtest harness; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// A count, `_` allowed between digits.
fn count<T: TryFrom<u64>>(v: &str) -> Result<T, String> {
    let n: u64 = v.replace('_', "").parse().map_err(|_| format!("not a number: {v}"))?;
    T::try_from(n).map_err(|_| format!("out of range: {v}"))
}

/// A count of at least 1.
fn positive<T: TryFrom<u64>>(v: &str) -> Result<T, String> {
    match count::<u64>(v)? {
        0 => Err("must be at least 1".into()),
        n => T::try_from(n).map_err(|_| format!("out of range: {v}")),
    }
}

/// The options from the command line; exits with the usage on a mistake.
pub fn parse_opts() -> Opts {
    let o = Opts::parse();
    if o.due * 2 > o.instructions || o.stale > o.connections {
        use clap::CommandFactory;
        Opts::command()
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                "--due must be at most half of --instructions and --stale at most --connections",
            )
            .exit();
    }
    o
}
