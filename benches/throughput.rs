//! Throughput and latency benchmarks of the worker: `cargo bench --bench throughput [-- OPTIONS]` (see `--help` and
//! BENCHMARKS.md).
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
//! 6. The worker's peak RSS (`VmHWM`) during 1, 1b, 1c, 4 and 8.
//! 7. `stale1m`: the stale sweep at a million active connections (in-process).
//! 8. `metrics`: a `/metrics` scrape at 10 and at a million active connections.
//!
//! Also: `ingest-transient` (1b) is scenario 1 with the heartbeats published transient (`delivery_mode` 1);
//! `backlog` (1c) is a heartbeat backlog queued before the consumer starts, drained by a bare consumer and by the
//! worker; and `commands` first measures its ceiling, an echo responder process on the same quorum queue that
//! replies (confirmed) and acknowledges without a database, against the same clients.
//!
//! Layout: one module per scenario (`ingest`, `latency`, `commands`, `sweep`, the latter with `sweep_tables` for
//! its big tables and query plans and `sweep_floor` for the broker's floor); `env` is the isolated environment of a
//! run, `workload` the helpers the scenarios share, `opts` the command line, `results` the final table and `cpu`
//! the CPU accounting.

#[path = "throughput/backlog.rs"]
mod backlog;
// The bounded HTTP probe the tests use (its child-command helper is not used here).
#[allow(dead_code)]
#[path = "../tests/common/bounded.rs"]
mod bounded;
#[path = "throughput/commands.rs"]
mod commands;
#[path = "throughput/cpu.rs"]
mod cpu;
#[path = "throughput/env.rs"]
mod env;
#[path = "throughput/ingest.rs"]
mod ingest;
#[path = "throughput/latency.rs"]
mod latency;
#[path = "throughput/metrics_scrape.rs"]
mod metrics_scrape;
#[path = "throughput/opts.rs"]
mod opts;
#[path = "throughput/results.rs"]
mod results;
#[path = "throughput/stale1m.rs"]
mod stale1m;
#[path = "throughput/sweep.rs"]
mod sweep;
#[path = "throughput/sweep_floor.rs"]
mod sweep_floor;
#[path = "throughput/sweep_tables.rs"]
mod sweep_tables;
#[path = "throughput/workload.rs"]
mod workload;

use std::time::{Duration, Instant};

use crate::backlog::scenario_backlog;
use crate::commands::{echo_responder, scenario_commands};
use crate::cpu::loadavg;
use crate::ingest::{bare_consumer, scenario_ingest};
use crate::latency::scenario_latency;
use crate::metrics_scrape::scenario_metrics;
use crate::opts::{parse_opts, Opts};
use crate::results::Results;
use crate::stale1m::scenario_stale1m;
use crate::sweep::scenario_sweep;

const BIN: &str = env!("CARGO_BIN_EXE_agent-connection-manager");

/// The worker binary the scenarios start: `ACM_BENCH_WORKER_BIN` when set (to compare another build of the worker
/// against the same clients and ceilings), otherwise the one Cargo built with this benchmark.
pub fn worker_bin() -> String {
    std::env::var("ACM_BENCH_WORKER_BIN").unwrap_or_else(|_| BIN.to_string())
}
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

async fn run_all(o: Opts) {
    let mut res = Results::default();
    println!("agent-connection-manager benchmarks: {} run(s) of {:?}; worker binary {}", o.runs, o.only, worker_bin());
    for run in 1..=o.runs {
        for s in &o.only {
            println!("== run {run}/{}: {s} (load average {})", o.runs, loadavg());
            let started = Instant::now();
            let (limit, fut): (u64, std::pin::Pin<Box<dyn std::future::Future<Output = Res<()>> + '_>>) =
                match s.as_str() {
                    "ingest" => (900, Box::pin(scenario_ingest(&o, run, &mut res, false, false))),
                    "ingest-transient" => (900, Box::pin(scenario_ingest(&o, run, &mut res, true, false))),
                    "ingest-traced" => (900, Box::pin(scenario_ingest(&o, run, &mut res, false, true))),
                    "backlog" => (900, Box::pin(scenario_backlog(&o, run, &mut res))),
                    "stale1m" => (900, Box::pin(scenario_stale1m(&o, run, &mut res))),
                    "metrics" => (900, Box::pin(scenario_metrics(&o, run, &mut res))),
                    "latency" => (300 + o.latency_secs, Box::pin(scenario_latency(&o, run, &mut res))),
                    "commands" => (180 + o.command_secs, Box::pin(scenario_commands(&o, run, &mut res, false))),
                    "commands-traced" => (180 + o.command_secs, Box::pin(scenario_commands(&o, run, &mut res, true))),
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
    if std::env::var(ROLE_ENV).as_deref() == Ok("echo-responder") {
        if let Err(e) = runtime.block_on(echo_responder()) {
            eprintln!("echo responder: {e}");
            std::process::exit(1);
        }
        return;
    }
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
