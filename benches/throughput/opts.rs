//! Command-line options (`cargo bench --bench throughput -- --help`) and the scenarios they select.

#[derive(Debug, Clone)]
pub struct Opts {
    pub runs: usize,
    pub only: Vec<String>,
    pub agents: usize,
    pub rounds: usize,
    pub publishers: usize,
    pub window: usize,
    pub rate: u64,
    pub latency_secs: u64,
    pub poll_ms: u64,
    pub clients: usize,
    pub command_secs: u64,
    pub sessions: i64,
    pub instructions: i64,
    pub due: i64,
    pub connections: i64,
    pub stale: i64,
    pub history: i64,
    pub idle_cycles: usize,
    pub backlog_connections: usize,
    pub backlog_sessions: usize,
    pub backlog_rounds: usize,
    pub big_connections: i64,
    pub big_stale: i64,
    pub scrapes: usize,
    pub plans: bool,
    pub pg_base: String,
    pub amqp_url: String,
}

const SCENARIOS: [&str; 8] =
    ["ingest", "ingest-transient", "backlog", "latency", "commands", "sweep", "stale1m", "metrics"];

const HELP: &str = "cargo bench --bench throughput [-- OPTIONS]

  --runs N            repetitions of every scenario (default 3)
  --only LIST         comma-separated subset of: ingest,ingest-transient,backlog,latency,commands,sweep,stale1m,
                      metrics (default all)
  --agents N          ingest/latency: agents, each with a session and a connection (default 10000)
  --rounds N          ingest: heartbeats per agent (default 10)
  --publishers N      ingest/latency: publisher connections (default 4)
  --window N          ingest: unconfirmed publishes per publisher (default 500)
  --rate N            latency: offered heartbeats per second (default 5000)
  --latency-secs N    latency: duration (default 30)
  --poll-ms N         latency: database poll period (default 5)
  --clients N         commands: concurrent clients (default 16)
  --command-secs N    commands: duration (default 20)
  --sessions N        sweep: sessions (default 10000)
  --instructions N    sweep: instructions (default 1000000)
  --due N             sweep: of which due (default 100000)
  --connections N     sweep: connections (default 100000)
  --stale N           sweep: of which stale (default 10000)
  --history N         sweep: idempotency records kept (default 100000)
  --idle-cycles N     sweep, stale1m: idle cycles timed per run (default 10)
  --backlog-connections N  backlog: connections (default 10000)
  --backlog-sessions N     backlog: sessions they belong to (default 100)
  --backlog-rounds N       backlog: heartbeats per connection queued before the consumer starts (default 20)
  --big-connections N stale1m, metrics: active connections (default 1000000)
  --big-stale N       stale1m: of which made stale (default 1000)
  --scrapes N         metrics: scrapes timed at each size (default 20)
  --no-plans          do not print the full EXPLAIN output

Environment: ACM_BENCH_PG_BASE (default postgres://postgres@127.0.0.1:5432),
             ACM_BENCH_AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/%2f),
             ACM_BENCH_KEEP_LOGS (set: keep every worker log, not only those of failed scenarios),
             ACM_BENCH_WORKER_BIN (another worker binary to start instead of the one built with the benchmark).";

pub fn parse_opts() -> Opts {
    let mut o = Opts {
        runs: 3,
        only: SCENARIOS.iter().map(|s| s.to_string()).collect(),
        agents: 10_000,
        rounds: 10,
        publishers: 4,
        window: 500,
        rate: 5_000,
        latency_secs: 30,
        poll_ms: 5,
        clients: 16,
        command_secs: 20,
        sessions: 10_000,
        instructions: 1_000_000,
        due: 100_000,
        connections: 100_000,
        stale: 10_000,
        history: 100_000,
        idle_cycles: 10,
        backlog_connections: 10_000,
        backlog_sessions: 100,
        backlog_rounds: 20,
        big_connections: 1_000_000,
        big_stale: 1_000,
        scrapes: 20,
        plans: true,
        pg_base: std::env::var("ACM_BENCH_PG_BASE").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into()),
        amqp_url: std::env::var("ACM_BENCH_AMQP_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    let usage = |why: String| -> ! {
        eprintln!("{why}\n\n{HELP}");
        std::process::exit(2)
    };
    while i < args.len() {
        let (key, inline) = match args[i].split_once('=') {
            Some((k, v)) => (k.to_string(), Some(v.to_string())),
            None => (args[i].clone(), None),
        };
        i += 1;
        match key.as_str() {
            // cargo passes --bench to benches without the libtest harness.
            "--bench" => continue,
            "--no-plans" => {
                o.plans = false;
                continue;
            }
            "-h" | "--help" => {
                println!("{HELP}");
                std::process::exit(0)
            }
            _ => {}
        }
        let value = match inline {
            Some(v) => v,
            None if i < args.len() => {
                i += 1;
                args[i - 1].clone()
            }
            None => usage(format!("{key} needs a value")),
        };
        let num = |v: &str| -> u64 {
            v.replace('_', "").parse().unwrap_or_else(|_| usage(format!("{key}: not a number: {v}")))
        };
        match key.as_str() {
            "--runs" => o.runs = num(&value).max(1) as usize,
            "--only" => {
                o.only = value.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
                if let Some(bad) = o.only.iter().find(|s| !SCENARIOS.contains(&s.as_str())) {
                    usage(format!("--only: unknown scenario {bad}"));
                }
            }
            "--agents" => o.agents = num(&value).max(1) as usize,
            "--rounds" => o.rounds = num(&value).max(1) as usize,
            "--publishers" => o.publishers = num(&value).max(1) as usize,
            "--window" => o.window = num(&value).max(1) as usize,
            "--rate" => o.rate = num(&value).max(1),
            "--latency-secs" => o.latency_secs = num(&value).max(1),
            "--poll-ms" => o.poll_ms = num(&value),
            "--clients" => o.clients = num(&value).max(1) as usize,
            "--command-secs" => o.command_secs = num(&value).max(1),
            "--sessions" => o.sessions = num(&value).max(1) as i64,
            "--instructions" => o.instructions = num(&value) as i64,
            "--due" => o.due = num(&value) as i64,
            "--connections" => o.connections = num(&value) as i64,
            "--stale" => o.stale = num(&value) as i64,
            "--history" => o.history = num(&value) as i64,
            "--idle-cycles" => o.idle_cycles = num(&value).max(1) as usize,
            "--backlog-connections" => o.backlog_connections = num(&value).max(1) as usize,
            "--backlog-sessions" => o.backlog_sessions = num(&value).max(1) as usize,
            "--backlog-rounds" => o.backlog_rounds = num(&value).max(1) as usize,
            "--big-connections" => o.big_connections = num(&value).max(1) as i64,
            "--big-stale" => o.big_stale = num(&value) as i64,
            "--scrapes" => o.scrapes = num(&value).max(1) as usize,
            other => usage(format!("unknown option {other}")),
        }
    }
    if o.due * 2 > o.instructions || o.stale > o.connections {
        usage("--due must be at most half of --instructions and --stale at most --connections".into());
    }
    o
}
