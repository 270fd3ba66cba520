//! Benchmark harness of issue 4: `cargo bench --bench throughput [-- OPTIONS]` (see `--help` and BENCHMARKS.md).
//!
//! Every scenario starts the real worker binary (`agent-connection-manager run`, built by cargo in the bench
//! profile) as a separate process against the local PostgreSQL and RabbitMQ, on its own fresh database (random name)
//! and its own AMQP prefix, and removes both at the end (also when a scenario fails or times out). Each scenario is
//! repeated `--runs` times (default 3) and one table with the median and the spread (min..max) of every figure is
//! printed at the end.
//!
//! 1. `ingest`: heartbeats of `--agents` agents (sessions and connections seeded with SQL), `--rounds` heartbeats
//!    each, published as fast as the broker confirms them by `--publishers` publishers. First the ceiling: the same
//!    publishers against a bare consumer process (this binary again) that only acknowledges, on a queue declared by
//!    the library exactly like `<prefix>.heartbeats`, with the same prefetch and batch; then the worker, timed from
//!    the first publish until the last heartbeat's commit is visible in the database (the last round carries a
//!    `client_info` marker; the end is when every agent's connection shows it).
//! 2. `latency`: `--rate` heartbeats/s for `--latency-secs` s, open loop. Each carries its sequence number in
//!    `client_info`; a poller reads the connections whose `last_heartbeat_at` moved (an index range scan) every
//!    `--poll-ms` ms; a heartbeat's latency is from just before its publish until the poll whose answer first shows
//!    it (or a later heartbeat of the same connection) committed: an upper bound, by at most one poll period.
//! 3. `commands`: `--clients` clients, each its own AMQP connection, each looping `session.create`,
//!    `instruction.create`, `instruction.ack`, awaiting every reply, for `--command-secs` s.
//! 4. `sweep` (busy): `--instructions` instructions and `--connections` connections seeded with `generate_series`
//!    after `agent-connection-manager migrate`; the worker (sweeping every second, brake off) runs; then `--due`
//!    instructions and `--stale` connections are made due at a moment T chosen just before the worker's next cycle.
//!    The time is from the start of the first sweeper task transaction that sees them (its `sweeper_state.last_run_at`,
//!    database clock) until the last resulting event arrives at a queue bound to `<prefix>.events`.
//! 5. `sweep` (idle): before that, on the same tables with nothing due, one sweeper cycle run in-process through the
//!    library (with the broker backlog probe the worker uses), and `EXPLAIN (ANALYZE, BUFFERS)` of every sweeper
//!    query and of the stats query, flagging sequential scans of the big tables.
//! 6. The worker's peak RSS (`VmHWM`) during 1 and 4.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use agent_connection_manager::amqp::{self, json_properties, Topology, HEARTBEAT_ROUTING_KEY};
use agent_connection_manager::client::{reply_result, Client};
use agent_connection_manager::config::{AmqpSettings, QueueType, Settings};
use agent_connection_manager::sweeper::BacklogProbe;
use agent_connection_manager::AgentConnectionManager;
use chrono::{DateTime, Utc};
use futures_util::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;
use tokio_postgres::NoTls;

const BIN: &str = env!("CARGO_BIN_EXE_agent-connection-manager");
const ROLE_ENV: &str = "ACM_BENCH_ROLE";

type BoxErr = Box<dyn std::error::Error + Send + Sync>;
type Res<T> = Result<T, BoxErr>;

fn fail(msg: impl Into<String>) -> BoxErr {
    msg.into().into()
}

/// An error with its sources (tokio-postgres says only "db error" at the top).
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

// ---------------------------------------------------------------------------------------------------------------
// Options

#[derive(Debug, Clone)]
struct Opts {
    runs: usize,
    only: Vec<String>,
    agents: usize,
    rounds: usize,
    publishers: usize,
    window: usize,
    rate: u64,
    latency_secs: u64,
    poll_ms: u64,
    clients: usize,
    command_secs: u64,
    sessions: i64,
    instructions: i64,
    due: i64,
    connections: i64,
    stale: i64,
    history: i64,
    idle_cycles: usize,
    plans: bool,
    pg_base: String,
    amqp_url: String,
}

const SCENARIOS: [&str; 4] = ["ingest", "latency", "commands", "sweep"];

const HELP: &str = "cargo bench --bench throughput [-- OPTIONS]

  --runs N            repetitions of every scenario (default 3)
  --only LIST         comma-separated subset of: ingest,latency,commands,sweep (default all)
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
  --history N         sweep: published outbox events and idempotency records kept (default 100000)
  --idle-cycles N     sweep: idle cycles timed per run (default 10)
  --no-plans          do not print the full EXPLAIN output

Environment: ACM_BENCH_PG_BASE (default postgres://postgres@127.0.0.1:5432),
             ACM_BENCH_AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/%2f),
             ACM_BENCH_KEEP_LOGS (set: keep every worker log, not only those of failed scenarios).";

fn parse_opts() -> Opts {
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
            other => usage(format!("unknown option {other}")),
        }
    }
    if o.due * 2 > o.instructions || o.stale > o.connections {
        usage("--due must be at most half of --instructions and --stale at most --connections".into());
    }
    o
}

// ---------------------------------------------------------------------------------------------------------------
// Statistics and results

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v
}

#[derive(Clone, Copy)]
enum Target {
    None,
    AtLeast(f64),
    AtMost(f64),
}

struct Metric {
    scenario: &'static str,
    name: &'static str,
    unit: &'static str,
    target: Target,
    values: Vec<f64>,
}

#[derive(Default)]
struct Results {
    metrics: Vec<Metric>,
    notes: Vec<String>,
}

impl Results {
    fn record(&mut self, scenario: &'static str, name: &'static str, unit: &'static str, target: Target, v: f64) {
        println!("    {scenario} / {name}: {} {unit}", fmt_num(v));
        match self.metrics.iter_mut().find(|m| m.scenario == scenario && m.name == name) {
            Some(m) => m.values.push(v),
            None => self.metrics.push(Metric { scenario, name, unit, target, values: vec![v] }),
        }
    }

    fn note(&mut self, s: String) {
        println!("    note: {s}");
        self.notes.push(s);
    }

    fn print_table(&self, o: &Opts) {
        println!();
        println!("## Results: median and spread (min..max) over the runs of each figure");
        println!();
        println!("| scenario | figure | median | min..max | runs | target | met |");
        println!("|---|---|---|---|---|---|---|");
        for m in &self.metrics {
            let v = sorted(m.values.clone());
            let median = percentile(&v, 50.0);
            let (target, met) = match m.target {
                Target::None => (String::new(), String::new()),
                Target::AtLeast(t) => (format!(">= {}", fmt_num(t)), yes_no(median >= t)),
                Target::AtMost(t) => (format!("<= {}", fmt_num(t)), yes_no(median <= t)),
            };
            println!(
                "| {} | {} ({}) | {} | {}..{} | {} | {} | {} |",
                m.scenario,
                m.name,
                m.unit,
                fmt_num(median),
                fmt_num(v[0]),
                fmt_num(v[v.len() - 1]),
                v.len(),
                target,
                met
            );
        }
        if self.metrics.iter().any(|m| m.values.len() < o.runs) {
            println!();
            println!("(a figure with fewer runs than --runs {} had failed runs; see the notes)", o.runs);
        }
        if !self.notes.is_empty() {
            println!();
            println!("Notes:");
            for n in &self.notes {
                println!("- {n}");
            }
        }
    }
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "NO" }.to_string()
}

fn fmt_num(v: f64) -> String {
    if v.is_nan() {
        "n/a".into()
    } else if v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else if v.abs() >= 100.0 {
        format!("{v:.1}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn to_utc(t: SystemTime) -> DateTime<Utc> {
    DateTime::<Utc>::from(t)
}

// ---------------------------------------------------------------------------------------------------------------
// CPU accounting from /proc: who used the two cores during a measurement.

/// CPU seconds used so far, machine-wide (busy) and per component.
struct CpuSample {
    at: Instant,
    busy: f64,
    by: Vec<(&'static str, f64)>,
}

const CLOCK_TICKS: f64 = 100.0; // USER_HZ on Linux

fn proc_cpu_secs(pid: &str) -> Option<(String, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (head, rest) = stat.rsplit_once(") ")?;
    let comm = head.split_once(" (")?.1.to_string();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some((comm, ticks / CLOCK_TICKS))
}

fn cpu_sample(worker: Option<u32>) -> CpuSample {
    let busy = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let line = s.lines().next()?.to_string();
            let v: Vec<f64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
            // user nice system idle iowait irq softirq steal
            Some((v.iter().take(8).sum::<f64>() - v.get(3)? - v.get(4)?) / CLOCK_TICKS)
        })
        .unwrap_or(f64::NAN);
    let me = std::process::id();
    let mut by: Vec<(&'static str, f64)> =
        ["worker", "postgres", "rabbitmq", "bench", "bare consumer"].iter().map(|k| (*k, 0.0)).collect();
    let my_comm = proc_cpu_secs(&me.to_string()).map(|c| c.0).unwrap_or_default();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let Ok(pid) = name.parse::<u32>() else { continue };
            let Some((comm, secs)) = proc_cpu_secs(&name) else { continue };
            let key = if Some(pid) == worker {
                "worker"
            } else if pid == me {
                "bench"
            } else if comm == "postgres" {
                "postgres"
            } else if comm == "beam.smp" {
                "rabbitmq"
            } else if comm == my_comm {
                "bare consumer"
            } else {
                continue;
            };
            if let Some(slot) = by.iter_mut().find(|(k, _)| *k == key) {
                slot.1 += secs;
            }
        }
    }
    CpuSample { at: Instant::now(), busy, by }
}

/// Cores used per component between two samples, plus `other` (the rest of the machine) and `idle` (of 2 cores).
fn cpu_use(a: &CpuSample, b: &CpuSample) -> Vec<(&'static str, f64)> {
    let wall = (b.at - a.at).as_secs_f64().max(1e-9);
    let mut out: Vec<(&'static str, f64)> =
        a.by.iter().zip(&b.by).map(|((k, x), (_, y))| (*k, ((y - x) / wall).max(0.0))).collect();
    let busy = (b.busy - a.busy) / wall;
    let known: f64 = out.iter().map(|(_, v)| v).sum();
    let cores = std::thread::available_parallelism().map(|n| n.get() as f64).unwrap_or(2.0);
    out.push(("other", (busy - known).max(0.0)));
    out.push(("idle", (cores - busy).max(0.0)));
    out
}

fn cpu_line(use_: &[(&'static str, f64)]) -> String {
    use_.iter().filter(|(_, v)| *v >= 0.005).map(|(k, v)| format!("{k} {v:.2}")).collect::<Vec<_>>().join(", ")
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------------------------
// An isolated environment: fresh database, own prefix, the worker as a child process, cleanup even on failure.

struct Env {
    db_name: String,
    db_url: String,
    prefix: String,
    port: u16,
    log: PathBuf,
    pg_base: String,
    amqp_url: String,
    extra_prefixes: Vec<String>,
    worker: Option<Child>,
    cleaned: bool,
}

fn random_suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_string()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(19090)
}

async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).await.ok()?;
        let status = buf.split_whitespace().nth(1)?.parse().ok()?;
        let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        Some((status, body))
    };
    tokio::time::timeout(Duration::from_secs(5), fut).await.ok().flatten()
}

/// Drops a database and deletes the broker objects of some prefixes.
async fn remove_resources(pg_base: &str, amqp_url: &str, db_name: &str, prefixes: &[String]) {
    if let Ok(conn) = amqp::connect(amqp_url, "acm bench cleanup").await {
        if let Ok(ch) = conn.create_channel().await {
            for p in prefixes {
                let _ = Topology::new(p).delete(&ch).await;
            }
        }
        let _ = conn.close(200, "done".into()).await;
    }
    if let Ok((admin, conn)) = tokio_postgres::connect(&format!("{pg_base}/postgres"), NoTls).await {
        tokio::spawn(conn);
        let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS \"{db_name}\" WITH (FORCE)")).await;
    }
}

impl Env {
    fn new(o: &Opts, tag: &str) -> Self {
        let suffix = random_suffix();
        let db_name = format!("acm_bench_{suffix}");
        Self {
            db_url: format!("{}/{db_name}", o.pg_base),
            db_name,
            prefix: format!("acm-bench-{tag}-{suffix}"),
            port: free_port(),
            log: std::env::temp_dir().join(format!("acm-bench-{suffix}.log")),
            pg_base: o.pg_base.clone(),
            amqp_url: o.amqp_url.clone(),
            extra_prefixes: Vec::new(),
            worker: None,
            cleaned: false,
        }
    }

    fn topology(&self) -> Topology {
        Topology::new(&self.prefix)
    }

    fn command(&self, extra: &[(&str, String)]) -> Command {
        let mut c = Command::new(BIN);
        c.env("ACM_DATABASE__URL", &self.db_url)
            .env("ACM_AMQP__URL", &self.amqp_url)
            .env("ACM_AMQP__PREFIX", &self.prefix)
            .env("ACM_HTTP__LISTEN", format!("127.0.0.1:{}", self.port))
            .env_remove("ACM_CONFIG")
            .env_remove("RUST_LOG");
        for (k, v) in extra {
            c.env(k, v);
        }
        c
    }

    /// `agent-connection-manager migrate` (creates the database).
    async fn migrate(&self) -> Res<()> {
        let mut c = self.command(&[]);
        c.arg("migrate");
        let out = tokio::task::spawn_blocking(move || c.output()).await??;
        if !out.status.success() {
            return Err(fail(format!("migrate failed: {}", String::from_utf8_lossy(&out.stderr))));
        }
        Ok(())
    }

    async fn db(&self) -> Res<tokio_postgres::Client> {
        let (client, conn) = tokio_postgres::connect(&self.db_url, NoTls).await?;
        tokio::spawn(conn);
        Ok(client)
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Starts `agent-connection-manager run` and waits until `/readyz` answers 200.
    async fn start_worker(&mut self, extra: &[(&str, String)]) -> Res<u32> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let mut c = self.command(extra);
        c.arg("run").stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
        let child = c.spawn()?;
        let pid = child.id();
        self.worker = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if matches!(http_get(self.port, "/readyz").await, Some((200, _))) {
                return Ok(pid);
            }
            if let Some(status) = self.worker.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.worker = None;
                return Err(fail(format!("the worker exited ({status}) before ready:\n{}", self.log_tail())));
            }
            if Instant::now() > deadline {
                return Err(fail(format!("the worker was not ready within 60 s:\n{}", self.log_tail())));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The worker's peak resident set size (`VmHWM`), in MiB.
    fn worker_peak_rss_mib(&self) -> Option<f64> {
        let pid = self.worker.as_ref()?.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib / 1024.0)
    }

    /// SIGTERM, then waits up to 20 s (SIGKILL after that).
    async fn stop_worker(&mut self) {
        let Some(mut child) = self.worker.take() else { return };
        let pid = child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
                _ => {
                    eprintln!("    the worker did not stop within 20 s of SIGTERM; killing it");
                    let _ = child.kill();
                    let _ = child.wait();
                    return;
                }
            }
        }
    }

    async fn cleanup(mut self) {
        self.stop_worker().await;
        let mut prefixes = vec![self.prefix.clone()];
        prefixes.extend(self.extra_prefixes.iter().cloned());
        remove_resources(&self.pg_base, &self.amqp_url, &self.db_name, &prefixes).await;
        if std::env::var_os("ACM_BENCH_KEEP_LOGS").is_some() {
            eprintln!("    worker log kept at {}", self.log.display());
        } else {
            let _ = std::fs::remove_file(&self.log);
        }
        self.cleaned = true;
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(mut child) = self.worker.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if self.cleaned {
            return;
        }
        eprintln!("    cleaning up after a failed scenario (worker log kept at {})", self.log.display());
        let (pg, amqp_url, db) = (self.pg_base.clone(), self.amqp_url.clone(), self.db_name.clone());
        let mut prefixes = vec![self.prefix.clone()];
        prefixes.extend(self.extra_prefixes.iter().cloned());
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
                rt.block_on(async {
                    let _ =
                        tokio::time::timeout(Duration::from_secs(20), remove_resources(&pg, &amqp_url, &db, &prefixes))
                            .await;
                });
            }
        })
        .join();
    }
}

/// A histogram's sum and count in the worker's /metrics text.
fn histogram(metrics: &str, name: &str) -> (f64, f64) {
    let value = |suffix: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(&format!("{name}_{suffix}")))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN)
    };
    (value("sum"), value("count"))
}

/// The worker's mean heartbeat batch (deliveries) and mean transaction time (ms), from its /metrics.
async fn worker_batches(port: u16) -> (f64, f64) {
    let text = http_get(port, "/metrics").await.map(|(_, b)| b).unwrap_or_default();
    let (size, batches) = histogram(&text, "acm_heartbeat_batch_size");
    let (secs, txs) = histogram(&text, "acm_db_transaction_seconds");
    (size / batches, secs / txs * 1000.0)
}

/// Sessions `s-i`, agents `agent-i` and connections `c-i` (active, fresh), i in 1..=n.
async fn seed_agents(db: &tokio_postgres::Client, n: usize) -> Res<()> {
    db.batch_execute(&format!(
        "INSERT INTO agent_session (session_id, agent_id, name) \
           SELECT 's-' || i, 'agent-' || i, 'bench' FROM generate_series(1, {n}) i; \
         INSERT INTO agent_connection (connection_id, session_id, agent_id, connection_type) \
           SELECT 'c-' || i, 's-' || i, 'agent-' || i, 'amqp' FROM generate_series(1, {n}) i;"
    ))
    .await?;
    vacuum(db, &["agent_session", "agent_connection"]).await
}

/// `VACUUM ANALYZE`, one statement at a time (a multi-statement query is one transaction, where VACUUM cannot run).
async fn vacuum(db: &tokio_postgres::Client, tables: &[&str]) -> Res<()> {
    for t in tables {
        db.batch_execute(&format!("VACUUM ANALYZE {t}")).await?;
    }
    Ok(())
}

fn heartbeat_body(agent: usize, client_info: Option<Value>) -> Vec<u8> {
    let mut body = json!({
        "type": "agent.heartbeat",
        "agent_id": format!("agent-{agent}"),
        "session_id": format!("s-{agent}"),
        "connection_id": format!("c-{agent}"),
        "sent_at": Utc::now().to_rfc3339(),
    });
    if let Some(info) = client_info {
        body["client_info"] = info;
    }
    serde_json::to_vec(&body).unwrap_or_default()
}

/// `publishers` confirm-mode connections to the broker.
async fn publishers(o: &Opts) -> Res<Vec<(lapin::Connection, lapin::Channel)>> {
    let mut out = Vec::new();
    for _ in 0..o.publishers {
        let conn = amqp::connect(&o.amqp_url, "acm bench publisher").await?;
        let ch = amqp::confirm_channel(&conn).await?;
        out.push((conn, ch));
    }
    Ok(out)
}

/// The last agent (1-based) published by publisher `p` of `n` (agents are dealt round-robin).
fn last_agent_of(p: usize, n: usize, agents: usize) -> Option<usize> {
    (p < agents).then(|| p + 1 + ((agents - (p + 1)) / n) * n)
}

// ---------------------------------------------------------------------------------------------------------------
// 1. Heartbeat ingest and its ceiling

/// Publishes `rounds` heartbeats per agent as fast as the broker confirms them; the last round carries
/// `client_info: {"bench": tag}`. Returns the first-publish instant (monotonic and wall clock) and the nacks.
async fn publish_burst(o: &Opts, exchange: &str, tag: &str) -> Res<(Instant, SystemTime, u64)> {
    let chans = publishers(o).await?;
    let n = chans.len();
    let t0 = Instant::now();
    let w0 = SystemTime::now();
    let mut tasks = JoinSet::new();
    for (p, (conn, ch)) in chans.into_iter().enumerate() {
        let (exchange, tag, agents, rounds, window) =
            (exchange.to_string(), tag.to_string(), o.agents, o.rounds, o.window);
        tasks.spawn(async move {
            let mut inflight = VecDeque::with_capacity(window);
            let mut nacks = 0u64;
            for r in 0..rounds {
                let info = (r + 1 == rounds).then(|| json!({ "bench": tag }));
                let mut a = p + 1;
                while a <= agents {
                    let body = heartbeat_body(a, info.clone());
                    let confirm = ch
                        .basic_publish(
                            exchange.as_str().into(),
                            HEARTBEAT_ROUTING_KEY.into(),
                            BasicPublishOptions::default(),
                            &body,
                            json_properties(),
                        )
                        .await?;
                    inflight.push_back(confirm);
                    if inflight.len() >= window {
                        if let Some(c) = inflight.pop_front() {
                            nacks += u64::from(c.await?.is_nack());
                        }
                    }
                    a += n;
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
    Ok((t0, w0, nacks))
}

/// The bare consumer (a child process running this binary with ACM_BENCH_ROLE=bare-consumer): consumes a queue
/// with the worker's prefetch, drains deliveries into batches like the worker, acknowledges each batch with one
/// `multiple` ack, and prints `done <unix nanos of the last ack>` after `count` messages.
async fn bare_consumer() -> Res<()> {
    let var = |k: &str| std::env::var(k).map_err(|_| fail(format!("{k} not set")));
    let url = var("ACM_BENCH_AMQP_URL")?;
    let queue = var("ACM_BENCH_QUEUE")?;
    let count: u64 = var("ACM_BENCH_COUNT")?.parse()?;
    let prefetch: u16 = var("ACM_BENCH_PREFETCH")?.parse()?;
    let batch_max: usize = var("ACM_BENCH_BATCH")?.parse()?;
    let conn = amqp::connect(&url, "acm bench bare consumer").await?;
    let ch = conn.create_channel().await?;
    ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(queue.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await?;
    println!("ready");
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut got = 0u64;
    let mut last_ack = SystemTime::now();
    while got < count {
        let left = deadline.saturating_duration_since(Instant::now());
        let first = match tokio::time::timeout(left, consumer.next()).await {
            Ok(Some(Ok(d))) => d,
            Ok(other) => return Err(fail(format!("consumer ended: {:?}", other.map(|r| r.err())))),
            Err(_) => return Err(fail(format!("only {got} of {count} messages within 600 s"))),
        };
        let mut batch = vec![first];
        while batch.len() < batch_max {
            match consumer.next().now_or_never() {
                Some(Some(Ok(d))) => batch.push(d),
                _ => break,
            }
        }
        if let Some(last) = batch.last() {
            last.acker.ack(BasicAckOptions { multiple: true }).await?;
        }
        last_ack = SystemTime::now();
        got += batch.len() as u64;
    }
    let nanos = last_ack.duration_since(SystemTime::UNIX_EPOCH)?.as_nanos();
    println!("done {nanos}");
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}

async fn scenario_ingest(o: &Opts, run: usize, res: &mut Results) -> Res<()> {
    let mut env = Env::new(o, "ingest");
    env.migrate().await?;
    let db = env.db().await?;
    seed_agents(&db, o.agents).await?;
    let total = (o.agents * o.rounds) as f64;

    // The ceiling: a queue declared by the library exactly like <prefix>.heartbeats, and a bare consumer.
    let ceiling_prefix = format!("{}-ceiling", env.prefix);
    env.extra_prefixes.push(ceiling_prefix.clone());
    let ceiling = Topology::new(&ceiling_prefix);
    {
        let conn = amqp::connect(&o.amqp_url, "acm bench setup").await?;
        let ch = conn.create_channel().await?;
        let settings = AmqpSettings { command_queue_type: QueueType::Classic, ..AmqpSettings::default() };
        ceiling.declare(&ch, &settings).await?;
        let _ = conn.close(200, "done".into()).await;
    }
    let defaults = Settings::default();
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .env(ROLE_ENV, "bare-consumer")
        .env("ACM_BENCH_AMQP_URL", &o.amqp_url)
        .env("ACM_BENCH_QUEUE", &ceiling.heartbeat_queue)
        .env("ACM_BENCH_COUNT", (o.agents * o.rounds).to_string())
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
    let cpu0 = cpu_sample(None);
    let (_, w0, nacks) = publish_burst(o, &ceiling.command_exchange, "ceiling").await?;
    let done = tokio::time::timeout(Duration::from_secs(600), lines.next_line()).await??.unwrap_or_default();
    let ceiling_cpu = cpu_use(&cpu0, &cpu_sample(None));
    let nanos: u128 = done.strip_prefix("done ").and_then(|s| s.parse().ok()).ok_or_else(|| fail(done.clone()))?;
    let end = SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos as u64);
    let ceiling_secs = end.duration_since(w0)?.as_secs_f64();
    let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    let ceiling_rate = total / ceiling_secs;
    if nacks > 0 {
        res.note(format!("run {run}: ingest ceiling: {nacks} publishes nacked"));
    }

    // The worker.
    let pid = env.start_worker(&[]).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let tag = format!("final-{run}");
    let cpu0 = cpu_sample(Some(pid));
    let (t0, _, nacks) = publish_burst(o, &env.topology().command_exchange, &tag).await?;
    let published = t0.elapsed();
    let markers: Vec<String> =
        (0..o.publishers).filter_map(|p| last_agent_of(p, o.publishers, o.agents)).map(|a| format!("c-{a}")).collect();
    let deadline = Instant::now() + Duration::from_secs(600);
    let end = loop {
        let n: i64 = db
            .query_one(
                "SELECT count(*) FROM agent_connection WHERE connection_id = ANY($1) AND client_info->>'bench' = $2",
                &[&markers, &tag],
            )
            .await?
            .get(0);
        if n as usize == markers.len() {
            let all: i64 = db
                .query_one("SELECT count(*) FROM agent_connection WHERE client_info->>'bench' = $1", &[&tag])
                .await?
                .get(0);
            if all as usize == o.agents {
                break Instant::now();
            }
        }
        if Instant::now() > deadline {
            return Err(fail("the worker did not commit every heartbeat within 600 s"));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let worker_cpu = cpu_use(&cpu0, &cpu_sample(Some(pid)));
    let worker_rate = total / (end - t0).as_secs_f64();
    if nacks > 0 {
        res.note(format!("run {run}: ingest worker: {nacks} publishes nacked"));
    }
    let rss = env.worker_peak_rss_mib();
    let (batch_mean, tx_ms) = worker_batches(env.port).await;
    drop(db);
    println!(
        "    worker publish phase took {:.2} s, commits visible {:.2} s after the first publish",
        published.as_secs_f64(),
        (end - t0).as_secs_f64()
    );
    println!("    cores used, ceiling phase: {}", cpu_line(&ceiling_cpu));
    println!("    cores used, worker phase:  {}", cpu_line(&worker_cpu));
    let core = |u: &[(&'static str, f64)], k: &str| u.iter().find(|(n, _)| *n == k).map(|(_, v)| *v).unwrap_or(0.0);
    res.record("1 ingest", "worker heartbeats/s", "msg/s", Target::None, worker_rate);
    res.record("1 ingest", "ceiling (bare consumer) heartbeats/s", "msg/s", Target::None, ceiling_rate);
    res.record("1 ingest", "worker / ceiling", "ratio", Target::AtLeast(0.8), worker_rate / ceiling_rate);
    res.record("1 ingest", "worker mean heartbeat batch", "msgs", Target::None, batch_mean);
    res.record("1 ingest", "worker mean heartbeat transaction", "ms", Target::None, tx_ms);
    res.record("1 ingest", "ceiling phase: rabbitmq cores", "cores", Target::None, core(&ceiling_cpu, "rabbitmq"));
    res.record("1 ingest", "ceiling phase: idle cores", "cores", Target::None, core(&ceiling_cpu, "idle"));
    res.record("1 ingest", "ceiling phase: other processes", "cores", Target::None, core(&ceiling_cpu, "other"));
    res.record("1 ingest", "worker phase: worker cores", "cores", Target::None, core(&worker_cpu, "worker"));
    res.record("1 ingest", "worker phase: postgres cores", "cores", Target::None, core(&worker_cpu, "postgres"));
    res.record("1 ingest", "worker phase: rabbitmq cores", "cores", Target::None, core(&worker_cpu, "rabbitmq"));
    res.record("1 ingest", "worker phase: bench (publishers) cores", "cores", Target::None, core(&worker_cpu, "bench"));
    res.record("1 ingest", "worker phase: idle cores", "cores", Target::None, core(&worker_cpu, "idle"));
    res.record("1 ingest", "worker phase: other processes", "cores", Target::None, core(&worker_cpu, "other"));
    if let Some(rss) = rss {
        res.record("6 memory", "worker peak RSS during ingest", "MiB", Target::AtMost(64.0), rss);
    }
    env.cleanup().await;
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------
// 2. Latency at a fixed offered rate

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
    let settings = AmqpSettings { command_queue_type: QueueType::Classic, ..AmqpSettings::default() };
    topology.declare(&ch, &settings).await?;
    ch.basic_qos(defaults.amqp.prefetch, BasicQosOptions::default()).await?;
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
        let (stamps, max) = (stamps.clone(), defaults.worker.heartbeat_batch_size);
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

async fn scenario_latency(o: &Opts, run: usize, res: &mut Results) -> Res<()> {
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

    // The poller: connections whose last_heartbeat_at moved since the last poll (minus a margin), by index.
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
                 WHERE status = 'active' AND last_heartbeat_at > $1",
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

// ---------------------------------------------------------------------------------------------------------------
// 3. Commands with replies

async fn scenario_commands(o: &Opts, run: usize, res: &mut Results) -> Res<()> {
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

// ---------------------------------------------------------------------------------------------------------------
// 4 and 5. Sweeps

/// Seeds the big tables with nothing due: `due` pending instructions with a deadline a day away (made due later),
/// as many open ones not due, the rest final (acknowledged, expired, cancelled, with past deadlines); connections
/// heard from within the last minute; published events and idempotency records within the retention period.
async fn seed_big(db: &tokio_postgres::Client, o: &Opts) -> Res<()> {
    let (sessions, instructions, due, connections, history) =
        (o.sessions, o.instructions, o.due, o.connections, o.history);
    let t = Instant::now();
    // Fast bulk load: no per-row foreign-key or notify triggers (the data is consistent by construction), the
    // instruction table's secondary indexes rebuilt afterwards from their own definitions.
    db.batch_execute("SET session_replication_role = replica; SET maintenance_work_mem = '256MB'").await?;
    let index_defs: Vec<(String, String)> = db
        .query(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'agent_instruction' \
             AND indexname <> 'agent_instruction_pkey'",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for (name, _) in &index_defs {
        db.batch_execute(&format!("DROP INDEX \"{name}\"")).await?;
    }
    let statements = [
        format!(
            "INSERT INTO agent_session (session_id, agent_id, name, created_at, last_activity_at) \
               SELECT 's-' || i, 'agent-' || i, 'bench', now() - interval '1 day', now() \
               FROM generate_series(1, {sessions}) i"
        ),
        format!(
            "INSERT INTO agent_instruction (instruction_id, session_id, agent_id, instruction_type, payload, \
               sequence_number, status, created_at, sent_at, acknowledged_at, ack_status, expires_at, retry_count, \
               max_retries) \
               SELECT md5('i' || i)::uuid, 's-' || ((i - 1) % {sessions} + 1), \
                 'agent-' || ((i - 1) % {sessions} + 1), 'bench', jsonb_build_object('n', i), i, \
                 (CASE WHEN i <= {due} THEN 'pending' \
                       WHEN i <= 2 * {due} THEN (CASE WHEN i % 2 = 0 THEN 'pending' ELSE 'sent' END) \
                       WHEN i % 10 = 0 THEN 'expired' WHEN i % 10 = 1 THEN 'cancelled' \
                       ELSE 'acknowledged' END)::instruction_status, \
                 now() - interval '2 days', \
                 CASE WHEN i > {due} AND i % 2 = 1 THEN now() - interval '1 day' END, \
                 CASE WHEN i > 2 * {due} AND i % 10 > 1 THEN now() - interval '1 day' END, \
                 (CASE WHEN i > 2 * {due} AND i % 10 > 1 THEN 'processed' END)::ack_status, \
                 CASE WHEN i <= 2 * {due} THEN now() + interval '1 day' + (i % 3600) * interval '1 second' \
                      ELSE now() - interval '1 day' - (i % 3600) * interval '1 second' END, \
                 CASE WHEN i <= {due} AND i % 2 = 1 THEN 3 WHEN i > 2 * {due} AND i % 10 = 0 THEN 3 ELSE 0 END, \
                 3 \
               FROM generate_series(1, {instructions}) i"
        ),
        format!(
            "INSERT INTO event_outbox (event_id, event_type, payload, created_at, published_at) \
               SELECT gen_random_uuid(), 'agent.instruction.acknowledged', jsonb_build_object('n', i), \
                 now() - (i % 80000) * interval '1 second', now() - (i % 80000) * interval '1 second' \
               FROM generate_series(1, {history}) i"
        ),
        format!(
            "INSERT INTO processed_message (message_type, message_id, reply, processed_at) \
               SELECT 'instruction.ack', 'm-' || i, '{{\"ok\": true}}'::jsonb, \
                 now() - (i % 80000) * interval '1 second' \
               FROM generate_series(1, {history}) i"
        ),
        // Last, and from the statement's clock: heard from within the last 30 s.
        format!(
            "INSERT INTO agent_connection (connection_id, session_id, agent_id, connection_type, created_at, \
               last_heartbeat_at) \
               SELECT 'c-' || i, 's-' || ((i - 1) % {sessions} + 1), 'agent-' || ((i - 1) % {sessions} + 1), \
                 'amqp', now() - interval '1 day', clock_timestamp() - (i % 30) * interval '1 second' \
               FROM generate_series(1, {connections}) i"
        ),
    ];
    for (i, sql) in statements.iter().enumerate() {
        if i == 4 {
            for (_, def) in &index_defs {
                db.batch_execute(def).await?;
            }
        }
        db.batch_execute(sql).await?;
    }
    db.batch_execute("RESET session_replication_role; RESET maintenance_work_mem").await?;
    let inserted = t.elapsed();
    vacuum(
        db,
        &[
            "agent_session",
            "agent_connection",
            "agent_instruction",
            "event_outbox",
            "processed_message",
            "sweeper_state",
        ],
    )
    .await?;
    println!(
        "    seeded in {:.1} s, vacuumed in {:.1} s",
        inserted.as_secs_f64(),
        (t.elapsed() - inserted).as_secs_f64()
    );
    Ok(())
}

/// The sweeper's, the stats' and the relay's SQL (the library's own constants), with the default parameters inlined.
fn explained_queries() -> Vec<(&'static str, String)> {
    use agent_connection_manager::sweeper::{inactive_sessions, instruction_expiry, retention, stale_connections};
    let q = |sql: &str, p1: &str, p2: &str| sql.replace("$1", p1).replace("$2", p2);
    vec![
        ("claim_task", q(agent_connection_manager::sweeper::CLAIM_TASK, "'stale_connections'", "")),
        ("stale: COUNT_CANDIDATES", q(stale_connections::COUNT_CANDIDATES, "120", "")),
        ("stale: COUNT_ACTIVE", stale_connections::COUNT_ACTIVE.to_string()),
        ("stale: CLOSE_BATCH", q(stale_connections::CLOSE_BATCH, "120", "1000")),
        ("inactive: MARK_BATCH", q(inactive_sessions::MARK_BATCH, "3600", "1000")),
        ("expiry: EXPIRE_BATCH", q(instruction_expiry::EXPIRE_BATCH, "300", "1000")),
        ("retention: PRUNE_EVENTS", q(retention::PRUNE_EVENTS, "86400", "1000")),
        ("retention: PRUNE_PROCESSED", q(retention::PRUNE_PROCESSED, "86400", "1000")),
        ("stats: STATS", agent_connection_manager::commands::stats::STATS.to_string()),
        (
            "relay: CLAIM",
            q(
                agent_connection_manager::relay::CLAIM,
                &Settings::default().outbox.batch_size.to_string(),
                &Settings::default().outbox.lease_secs.to_string(),
            )
            .replace("$3", "'bench'"),
        ),
    ]
}

const BIG_TABLES: [&str; 5] =
    ["agent_instruction", "agent_connection", "agent_session", "event_outbox", "processed_message"];

struct Plan {
    name: &'static str,
    exec_ms: f64,
    buffers: String,
    seq_scans: Vec<String>,
    text: String,
}

async fn explain_all(db: &tokio_postgres::Client) -> Res<Vec<Plan>> {
    let mut out = Vec::new();
    for (name, sql) in explained_queries() {
        db.batch_execute("BEGIN").await?;
        let rows = db.simple_query(&format!("EXPLAIN (ANALYZE, BUFFERS) {sql}")).await;
        // The claim takes a session-level advisory lock, which a rollback does not release.
        db.batch_execute("ROLLBACK; SELECT pg_advisory_unlock_all()").await?;
        let mut lines = Vec::new();
        for m in rows? {
            if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
                lines.push(r.get(0).unwrap_or_default().to_string());
            }
        }
        let exec_ms = lines
            .iter()
            .find_map(|l| l.trim().strip_prefix("Execution Time: "))
            .and_then(|s| s.trim_end_matches(" ms").parse().ok())
            .unwrap_or(f64::NAN);
        let buffers = lines.iter().find_map(|l| l.trim().strip_prefix("Buffers: ")).unwrap_or("").to_string();
        let seq_scans = lines
            .iter()
            .filter_map(|l| l.split("Seq Scan on ").nth(1))
            .filter_map(|rest| rest.split_whitespace().next())
            .filter(|t| BIG_TABLES.contains(t))
            .map(str::to_string)
            .collect();
        out.push(Plan { name, exec_ms, buffers, seq_scans, text: lines.join("\n") });
    }
    Ok(out)
}

/// A consumer (no acks) of an exclusive queue bound to every routing key of `exchange`, as the busy sweep's events
/// are counted.
async fn event_consumer(conn: &lapin::Connection, exchange: &str) -> Res<lapin::Consumer> {
    let ch = conn.create_channel().await?;
    let q = ch
        .queue_declare("".into(), QueueDeclareOptions { exclusive: true, ..Default::default() }, FieldTable::default())
        .await?;
    ch.queue_bind(q.name().clone(), exchange.into(), "#".into(), QueueBindOptions::default(), FieldTable::default())
        .await?;
    Ok(ch
        .basic_consume(
            q.name().clone(),
            "".into(),
            BasicConsumeOptions { no_ack: true, ..Default::default() },
            FieldTable::default(),
        )
        .await?)
}

/// The broker's floor for the busy sweep: `n` messages shaped like the sweep's events (an `agent.instruction.retry`
/// body, persistent, with a `message_id`) published to the event exchange from `conns` connections, each with one
/// confirm-mode channel publishing in batches of `batch` with up to `pipeline` batches unconfirmed (the relay's
/// pattern with the worker's settings, or a wider one), to the same kind of consumer queue as the scenario's; seconds
/// from the first publish to the last arrival. No database.
async fn broker_floor(o: &Opts, exchange: &str, n: usize, batch: usize, pipeline: usize, conns: usize) -> Res<f64> {
    use agent_connection_manager::events::{Event, EventBody};
    let conn = amqp::connect(&o.amqp_url, "acm bench broker floor").await?;
    let mut consumer = event_consumer(&conn, exchange).await?;
    let counter = tokio::spawn(async move {
        let mut seen = 0usize;
        let deadline = Instant::now() + Duration::from_secs(300);
        while seen < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, consumer.next()).await {
                Ok(Some(Ok(_))) => seen += 1,
                _ => break,
            }
        }
        (seen, Instant::now())
    });
    let mut publishers = Vec::with_capacity(conns);
    for _ in 0..conns {
        let c = amqp::connect(&o.amqp_url, "acm bench broker floor publisher").await?;
        let ch = amqp::confirm_channel(&c).await?;
        publishers.push((c, ch));
    }
    let t0 = Instant::now();
    let mut tasks = JoinSet::new();
    for (p, (c, ch)) in publishers.into_iter().enumerate() {
        let exchange = exchange.to_string();
        let mine = n / conns + usize::from(p < n % conns);
        tasks.spawn(async move {
            let now = Utc::now();
            let mut windows: VecDeque<Vec<lapin::PublisherConfirm>> = VecDeque::new();
            let (mut nacks, mut sent) = (0usize, 0usize);
            while sent < mine {
                let mut window = Vec::with_capacity(batch);
                while window.len() < batch && sent < mine {
                    let event = Event {
                        event_id: uuid::Uuid::new_v4(),
                        occurred_at: now,
                        body: EventBody::InstructionRetry {
                            instruction_id: uuid::Uuid::new_v4(),
                            session_id: format!("s-{}", sent % 10_000),
                            agent_id: format!("agent-{}", sent % 10_000),
                            instruction_type: "bench".into(),
                            payload: json!({ "n": sent }),
                            priority: agent_connection_manager::domain::Priority::Normal,
                            retry_count: 1,
                            max_retries: 3,
                            expires_at: now,
                            previous_expires_at: now,
                        },
                    };
                    let body = serde_json::to_vec(&event)?;
                    let props = json_properties().with_message_id(event.event_id.to_string().into());
                    window.push(
                        ch.basic_publish(
                            exchange.as_str().into(),
                            "agent.instruction.retry".into(),
                            BasicPublishOptions::default(),
                            &body,
                            props,
                        )
                        .await?,
                    );
                    sent += 1;
                }
                windows.push_back(window);
                if windows.len() >= pipeline {
                    for c in windows.pop_front().unwrap_or_default() {
                        nacks += usize::from(c.await?.is_nack());
                    }
                }
            }
            for w in windows {
                for c in w {
                    nacks += usize::from(c.await?.is_nack());
                }
            }
            let _ = c.close(200, "done".into()).await;
            Ok::<usize, BoxErr>(nacks)
        });
    }
    let mut nacks = 0;
    while let Some(r) = tasks.join_next().await {
        nacks += r??;
    }
    let (seen, last) = counter.await?;
    let _ = conn.close(200, "done".into()).await;
    if seen < n || nacks > 0 {
        return Err(fail(format!("broker floor: {seen} of {n} arrived, {nacks} nacked")));
    }
    Ok(last.duration_since(t0).as_secs_f64())
}

async fn scenario_sweep(o: &Opts, run: usize, res: &mut Results) -> Res<()> {
    let mut env = Env::new(o, "sweep");
    env.migrate().await?;
    let db = env.db().await?;
    seed_big(&db, o).await?;

    // 5. Idle: in-process cycles through the library, with the broker backlog probe the worker uses.
    let conn = amqp::connect(&o.amqp_url, "acm bench probe").await?;
    let ch = conn.create_channel().await?;
    env.topology().declare(&ch, &AmqpSettings::default()).await?;
    let mut settings = Settings::default();
    settings.database.url = env.db_url.clone();
    settings.database.pool_size = 2;
    settings.amqp.url = o.amqp_url.clone();
    settings.amqp.prefix = env.prefix.clone();
    settings.http.listen = String::new();
    let manager = AgentConnectionManager::new(settings)?;
    let probe = BacklogProbe::broker();
    probe.set(Some((ch.clone(), env.topology()))).await;
    let warm = manager.sweep_once(probe.clone()).await?;
    let changed = warm.stale_connections
        + warm.inactive_sessions
        + warm.instructions_retried
        + warm.instructions_expired
        + warm.events_pruned
        + warm.processed_messages_pruned;
    if changed > 0 || warm.held.is_some() || !warm.skipped_tasks.is_empty() {
        return Err(fail(format!("the idle tables were not idle: {warm:?}")));
    }
    let mut cycles = Vec::new();
    for _ in 0..o.idle_cycles {
        let t = Instant::now();
        manager.sweep_once(probe.clone()).await?;
        cycles.push(ms(t.elapsed()));
    }
    let mut stats = Vec::new();
    for _ in 0..o.idle_cycles {
        let t = Instant::now();
        manager.get_connection_stats().await?;
        stats.push(ms(t.elapsed()));
    }
    drop(manager);
    probe.set(None).await;
    let _ = conn.close(200, "done".into()).await;
    let cycles = sorted(cycles);
    let stats = sorted(stats);
    println!("    idle cycles (ms): {:?}", cycles.iter().map(|v| format!("{v:.2}")).collect::<Vec<_>>());
    let plans = explain_all(&db).await?;
    let mut seq_scans = 0usize;
    println!("    EXPLAIN (ANALYZE, BUFFERS), nothing due:");
    for p in &plans {
        seq_scans += p.seq_scans.len();
        println!(
            "      {:<26} {:>8.3} ms  seq scans of big tables: {:<22} buffers: {}",
            p.name,
            p.exec_ms,
            if p.seq_scans.is_empty() { "none".to_string() } else { p.seq_scans.join(",") },
            p.buffers
        );
    }
    if o.plans && run == 1 {
        for p in &plans {
            println!("\n    --- {} ---\n{}", p.name, p.text);
        }
        println!();
    }
    for p in plans.iter().filter(|p| !p.seq_scans.is_empty()) {
        res.note(format!("run {run}: {} scans {} sequentially", p.name, p.seq_scans.join(", ")));
    }
    res.record("5 idle sweep", "one cycle (median of cycles)", "ms", Target::AtMost(10.0), percentile(&cycles, 50.0));
    res.record("5 idle sweep", "one cycle (slowest of cycles)", "ms", Target::None, percentile(&cycles, 100.0));
    res.record("5 idle sweep", "stats query (median)", "ms", Target::None, percentile(&stats, 50.0));
    res.record("5 idle sweep", "sequential scans of big tables", "plans", Target::AtMost(0.0), seq_scans as f64);

    // 4. The broker's floor for the events the busy sweep produces, before the worker runs.
    {
        let conn = amqp::connect(&o.amqp_url, "acm bench setup").await?;
        let ch = conn.create_channel().await?;
        env.topology().declare(&ch, &Settings::default().amqp).await?;
        let _ = conn.close(200, "done".into()).await;
    }
    let events = (o.due + o.stale) as usize;
    // The worker's relay settings: its defaults, or what ACM_OUTBOX__* in the environment (inherited by it) set.
    let defaults = Settings::default();
    let env_or = |k: &str, d: usize| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let batch = env_or("ACM_OUTBOX__BATCH_SIZE", defaults.outbox.batch_size as usize);
    let pipeline = env_or("ACM_OUTBOX__PIPELINE", defaults.outbox.pipeline);
    let floor = broker_floor(o, &env.topology().event_exchange, events, batch, pipeline, 1).await?;
    println!("    broker floor, the relay's pattern ({pipeline} x {batch} unconfirmed, 1 connection): {floor:.2} s");
    let wide = broker_floor(o, &env.topology().event_exchange, events, 5000, 4, 4).await?;
    println!("    broker floor, wide (4 x 5000 unconfirmed on each of 4 connections): {wide:.2} s");

    // 4. Busy: the worker sweeping every second, brake off; rows become due at a moment just before its next cycle.
    let pid = env
        .start_worker(&[
            ("ACM_SWEEPER__CHECK_INTERVAL_SECS", "1".into()),
            ("ACM_SWEEPER__STALE_BRAKE_MIN_CONNECTIONS", "1000000000".into()),
        ])
        .await?;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let stale_after: f64 = Settings::default().sweeper.connection_stale_after_secs as f64;

    // Count the resulting events on a queue bound to <prefix>.events.
    let econn = amqp::connect(&o.amqp_url, "acm bench events").await?;
    let mut consumer = event_consumer(&econn, &env.topology().event_exchange).await?;
    let (want_stale, want_instr) = (o.stale as u64, o.due as u64);
    let counter = tokio::spawn(async move {
        let (mut stale, mut instr, mut other) = (0u64, 0u64, 0u64);
        let (mut first_instr, mut last_stale, mut last) = (None, None, None);
        let deadline = Instant::now() + Duration::from_secs(300);
        while stale < want_stale || instr < want_instr {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, consumer.next()).await {
                Ok(Some(Ok(d))) => {
                    let now = SystemTime::now();
                    match d.routing_key.as_str() {
                        "agent.connection.stale" => {
                            stale += 1;
                            last_stale = Some(now);
                        }
                        "agent.instruction.retry" | "agent.instruction.expired" => {
                            instr += 1;
                            first_instr.get_or_insert(now);
                        }
                        _ => other += 1,
                    }
                    last = Some(now);
                }
                _ => break,
            }
        }
        (stale, instr, other, first_instr, last_stale, last)
    });

    // Pick T just before the worker's next cycle (cycles start every second, in phase with the last one), at least
    // 15 s away so that the update below commits before T (if it does not, the start found below is earlier than
    // the rows became visible, so the figure errs on the slow side).
    let row =
        db.query_one("SELECT last_run_at, now() FROM sweeper_state WHERE task = 'stale_connections'", &[]).await?;
    let now: DateTime<Utc> = row.get(1);
    // last_run_at is written only by cycles that changed something; without one, any phase will do.
    let last: DateTime<Utc> = row.get::<_, Option<DateTime<Utc>>>(0).unwrap_or(now);
    let mut due_at = last + chrono::Duration::milliseconds(700);
    while due_at < now + chrono::Duration::seconds(15) {
        due_at += chrono::Duration::seconds(1);
    }
    let stale_heartbeat = due_at - chrono::Duration::milliseconds((stale_after * 1000.0) as i64 + 1);
    let t = Instant::now();
    db.batch_execute("BEGIN").await?;
    db.execute(
        "UPDATE agent_instruction SET expires_at = $1 \
         WHERE instruction_id IN (SELECT md5('i' || g)::uuid FROM generate_series(1, $2::int8) g)",
        &[&due_at, &o.due],
    )
    .await?;
    db.execute(
        "UPDATE agent_connection SET last_heartbeat_at = $1 \
         WHERE connection_id IN (SELECT 'c-' || g FROM generate_series(1, $2::int8) g)",
        &[&stale_heartbeat, &o.stale],
    )
    .await?;
    db.batch_execute("COMMIT").await?;
    let committed: DateTime<Utc> = db.query_one("SELECT clock_timestamp()", &[]).await?.get(0);
    let cpu0 = cpu_sample(Some(pid));
    println!(
        "    made {} instructions and {} connections due at {} (update took {:.2} s, committed {} ms before)",
        o.due,
        o.stale,
        due_at.format("%H:%M:%S%.3f"),
        t.elapsed().as_secs_f64(),
        (due_at - committed).num_milliseconds()
    );
    if committed >= due_at {
        res.note(format!("run {run}: busy sweep: the update committed after T; this run's start may be late"));
    }

    // The sweep starts with the first task transaction whose now() is at or after T (earlier ones cannot see the rows
    // as due: now() is fixed at transaction start).
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut stale_start, mut expiry_start): (Option<DateTime<Utc>>, Option<DateTime<Utc>>) = (None, None);
    while (stale_start.is_none() || expiry_start.is_none()) && Instant::now() < deadline {
        for r in db
            .query(
                "SELECT task, last_run_at FROM sweeper_state \
                 WHERE task IN ('stale_connections', 'instruction_expiry') AND last_run_at >= $1",
                &[&due_at],
            )
            .await?
        {
            let task: &str = r.get(0);
            let at: DateTime<Utc> = r.get(1);
            match task {
                "stale_connections" => stale_start = stale_start.or(Some(at)),
                _ => expiry_start = expiry_start.or(Some(at)),
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (Some(stale_start), Some(expiry_start)) = (stale_start, expiry_start) else {
        return Err(fail("the worker's sweeper did not pick the due rows up within 60 s"));
    };
    let start = stale_start.min(expiry_start);
    if expiry_start < stale_start {
        res.note(format!(
            "run {run}: busy sweep: instructions were swept one cycle before connections ({} ms apart)",
            (stale_start - expiry_start).num_milliseconds()
        ));
    }
    let (stale_n, instr_n, other_n, first_instr, last_stale, last) = counter.await?;
    if stale_n < want_stale || instr_n < want_instr {
        return Err(fail(format!(
            "only {stale_n} of {want_stale} stale and {instr_n} of {want_instr} instruction events arrived"
        )));
    }
    let cpu = cpu_use(&cpu0, &cpu_sample(Some(pid)));
    println!("    cores used from T - 1 s to the last event: {}", cpu_line(&cpu));
    let last = last.map(to_utc).ok_or_else(|| fail("no event"))?;
    let busy = (last - start).num_microseconds().unwrap_or(0) as f64 / 1e6;
    let _ = econn.close(200, "done".into()).await;
    // Every event is confirmed: the relay marks rows published only after the broker's confirms.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n: i64 = db.query_one("SELECT count(*) FROM event_outbox WHERE published_at IS NULL", &[]).await?.get(0);
        if n == 0 {
            break;
        }
        if Instant::now() > deadline {
            res.note(format!("run {run}: busy sweep: {n} events still unpublished 30 s after the last arrival"));
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rss = env.worker_peak_rss_mib();
    let metrics = http_get(env.port, "/metrics").await.map(|(_, b)| b).unwrap_or_default();
    let task_secs = |task: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with("acm_sweeper_task_seconds_sum") && l.contains(&format!("\"{task}\"")))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN)
    };
    let secs_since = |t: Option<SystemTime>| {
        t.map(|t| (to_utc(t) - start).num_microseconds().unwrap_or(0) as f64 / 1e6).unwrap_or(f64::NAN)
    };
    println!(
        "    sweep start {} (stale task {}, expiry task {}); last stale event +{:.2} s, first instruction event \
         +{:.2} s, last event +{busy:.2} s; {other_n} other events",
        start.format("%H:%M:%S%.3f"),
        stale_start.format("%H:%M:%S%.3f"),
        expiry_start.format("%H:%M:%S%.3f"),
        secs_since(last_stale),
        secs_since(first_instr),
    );
    let (confirm_secs, relay_batches) = histogram(&metrics, "acm_publish_confirm_seconds");
    println!(
        "    relay: {relay_batches} batches, {:.1} ms mean publish-to-confirm per batch, {:.1} s in total",
        confirm_secs / relay_batches * 1000.0,
        confirm_secs
    );
    res.record("4 busy sweep", "sweep start -> last event confirmed", "s", Target::AtMost(5.0), busy);
    res.record("4 busy sweep", "broker floor: same events, relay's pattern, no database", "s", Target::None, floor);
    res.record("4 busy sweep", "broker floor: same events, 4 wide publishers", "s", Target::None, wide);
    res.record("4 busy sweep", "busy sweep / broker floor (relay's pattern)", "ratio", Target::None, busy / floor);
    res.record("4 busy sweep", "sweep start -> last stale event", "s", Target::None, secs_since(last_stale));
    res.record("4 busy sweep", "sweep start -> first instruction event", "s", Target::None, secs_since(first_instr));
    res.record("4 busy sweep", "relay: publish-to-confirm, all batches", "s", Target::None, confirm_secs);
    res.record(
        "4 busy sweep",
        "stale task (worker metric, all cycles)",
        "s",
        Target::None,
        task_secs("stale_connections"),
    );
    res.record(
        "4 busy sweep",
        "expiry task (worker metric, all cycles)",
        "s",
        Target::None,
        task_secs("instruction_expiry"),
    );
    if let Some(rss) = rss {
        res.record("6 memory", "worker peak RSS during busy sweep", "MiB", Target::AtMost(64.0), rss);
    }
    drop(db);
    env.cleanup().await;
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------

async fn run_all(o: Opts) {
    let mut res = Results::default();
    println!("agent-connection-manager benchmarks: {} run(s) of {:?}; worker binary {BIN}", o.runs, o.only);
    for run in 1..=o.runs {
        for s in &o.only {
            println!("== run {run}/{}: {s} (load average {})", o.runs, loadavg());
            let started = Instant::now();
            let (limit, fut): (u64, std::pin::Pin<Box<dyn std::future::Future<Output = Res<()>> + '_>>) =
                match s.as_str() {
                    "ingest" => (900, Box::pin(scenario_ingest(&o, run, &mut res))),
                    "latency" => (300 + o.latency_secs, Box::pin(scenario_latency(&o, run, &mut res))),
                    "commands" => (180 + o.command_secs, Box::pin(scenario_commands(&o, run, &mut res))),
                    _ => (900, Box::pin(scenario_sweep(&o, run, &mut res))),
                };
            let outcome = tokio::time::timeout(Duration::from_secs(limit), fut).await;
            let why = match outcome {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(describe(e.as_ref())),
                Err(_) => Some(format!("timed out after {limit} s")),
            };
            if let Some(why) = why {
                res.note(format!("run {run}: {s} failed: {why}"));
            }
            println!("   ({s} took {:.1} s; load average {})", started.elapsed().as_secs_f64(), loadavg());
        }
    }
    res.print_table(&o);
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a tokio runtime");
    if std::env::var(ROLE_ENV).as_deref() == Ok("bare-consumer") {
        if let Err(e) = runtime.block_on(bare_consumer()) {
            eprintln!("bare consumer: {e}");
            std::process::exit(1);
        }
        return;
    }
    let opts = parse_opts();
    runtime.block_on(run_all(opts));
}
