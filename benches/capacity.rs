//! Capacity: what one heartbeat, one command and one event cost in worker CPU, PostgreSQL CPU, WAL and RabbitMQ CPU,
//! the figures SCALING.md extrapolates from.
//!
//! ```sh
//! cargo bench --bench capacity
//! ```
//!
//! Starts a private PostgreSQL cluster and a private RabbitMQ node on free ports (as the fault suite does, so no
//! other process's work is counted) and the worker binary (bench profile) as a process, then runs phases, each a
//! known number of messages published with confirms and waited for until applied (and its events relayed):
//! heartbeats that open connections, heartbeats that refresh them, `instruction.create` and `instruction.sent`
//! commands with replies. Each phase's cost is the difference of `/proc/<pid>/stat` CPU times (worker; postmaster
//! with every backend, live and reaped; `beam.smp`) and of `pg_current_wal_lsn()`, less the idle rates measured
//! first. The publishing client (this process) is not counted. `ACM_CAPACITY_SCALE` multiplies the counts.

#[path = "../tests/common/bounded.rs"]
mod bounded;
#[allow(dead_code, unused_imports)]
#[path = "../tests/faults/infra.rs"]
mod infra;
#[path = "capacity/measure.rs"]
mod measure;
#[allow(dead_code)]
#[path = "../tests/common/programs.rs"]
mod programs;
#[allow(dead_code)]
#[path = "../tests/faults/publisher.rs"]
mod publisher;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_connection_manager::amqp::Topology;
use agent_connection_manager::config::Settings;
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use serde_json::json;
use tokio_postgres::NoTls;

use infra::{PgCluster, RabbitNode, TempDir, WorkerEnv};
use measure::{clock_ticks, cost, postgres_cpu, process_cpu, Cost, Idle, Sample, HEADER};
use publisher::{Msg, ReliablePublisher};

const PREFIX: &str = "acmcap";
const LIMIT: Duration = Duration::from_secs(900);

struct Bench {
    pg: PgCluster,
    rabbit: RabbitNode,
    worker_pid: u32,
    ticks: f64,
    db: tokio_postgres::Client,
    events: Arc<AtomicU64>,
    replies: Arc<AtomicU64>,
    reply_to: String,
}

impl Bench {
    async fn sample(&self) -> Sample {
        let wal_lsn: String =
            self.db.query_one("SELECT pg_current_wal_lsn()::text", &[]).await.expect("wal lsn").get(0);
        Sample {
            at: Instant::now(),
            worker: process_cpu(self.worker_pid, self.ticks),
            postgres: postgres_cpu(self.pg.postmaster_pid().expect("postmaster pid"), self.ticks),
            rabbitmq: process_cpu(self.rabbit.beam_pid().expect("beam pid"), self.ticks),
            wal_lsn,
        }
    }

    async fn wal_between(&self, a: &Sample, b: &Sample) -> f64 {
        let row = self
            .db
            .query_one("SELECT pg_wal_lsn_diff($1::text::pg_lsn, $2::text::pg_lsn)::float8", &[&b.wal_lsn, &a.wal_lsn])
            .await
            .expect("wal diff");
        row.get(0)
    }

    async fn count(&self, sql: &str) -> i64 {
        self.db.query_one(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}")).get(0)
    }

    /// Polls (every 100 ms, at most [`LIMIT`]) until `done` holds.
    async fn until(&self, what: &str, mut done: impl AsyncFnMut(&Self) -> bool) {
        let deadline = Instant::now() + LIMIT;
        while !done(self).await {
            assert!(Instant::now() < deadline, "capacity: timed out after {LIMIT:?} waiting for {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Publishes `msgs` (with a reply queue when `replies`), waits until `done`, and returns the phase's cost.
    async fn phase(
        &self,
        name: &str,
        msgs: Vec<Msg>,
        replies: bool,
        idle: Idle,
        done: impl AsyncFnMut(&Self) -> bool,
    ) -> Cost {
        let mut p = ReliablePublisher::new(&self.rabbit.url(), &Topology::new(PREFIX).command_exchange);
        if replies {
            p.reply_to = Some(self.reply_to.clone());
        }
        let n = msgs.len() as u64;
        let a = self.sample().await;
        p.publish_all(&msgs, &AtomicU64::new(0)).await;
        self.until(name, done).await;
        let b = self.sample().await;
        p.close().await;
        let c = cost(name, n, &a, &b, self.wal_between(&a, &b).await, idle);
        eprintln!("capacity: {}", c.row());
        c
    }

    /// Every event written so far relayed and received by the counting consumer.
    async fn events_delivered(&self, want: u64) -> bool {
        self.events.load(Ordering::Relaxed) >= want && self.count("SELECT count(*) FROM event_outbox").await == 0
    }
}

fn heartbeat(c: usize, round: usize, sessions: usize) -> Msg {
    let k = c % sessions;
    Msg::json(
        &json!({"type": "agent.heartbeat", "agent_id": format!("a-{k}"), "session_id": format!("s-{k}"),
                "connection_id": format!("c-{c}"), "client_info": {"round": round}}),
        None,
    )
}

fn instruction_id(j: usize) -> String {
    format!("00000000-0000-4000-8000-{j:012x}")
}

/// Counts every delivery of a queue (consumed without acknowledgements).
async fn count_deliveries(ch: &lapin::Channel, queue: &str, counter: Arc<AtomicU64>) {
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions { no_ack: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .expect("consume");
    tokio::spawn(async move {
        while let Some(Ok(_)) = consumer.next().await {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    });
}

fn shell(cmd: &str) -> String {
    std::process::Command::new("sh")
        .args(["-c", cmd])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn main() {
    let scale: f64 = std::env::var("ACM_CAPACITY_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1.0);
    let n = |base: usize| ((base as f64 * scale) as usize).max(10);
    let (sessions, connections, rounds, commands) = (100, n(5_000), 4, n(5_000));
    let started = Instant::now();
    let dir = TempDir::new("capacity");
    // PostgreSQL's own defaults for durability (the fault suite's clusters turn fsync and full-page writes off),
    // so that CPU and WAL are what a production server spends.
    let pg = PgCluster::start_new_as(dir.path(), "pg", "-c fsync=on -c full_page_writes=on -c shared_buffers=128MB");
    let rabbit = RabbitNode::start_new(dir.path());
    let env = WorkerEnv {
        database_url: pg.url("acm_capacity"),
        amqp_url: rabbit.url(),
        prefix: PREFIX.into(),
        extra: vec![
            // The sweeper's cost is per cycle, not per message: it runs once at start, then not during the phases.
            ("ACM_SWEEPER__CHECK_INTERVAL_SECS".into(), "3600".into()),
            ("ACM_SWEEPER__CONNECTION_STALE_AFTER_SECS".into(), "3600".into()),
        ],
        log_dir: dir.path().to_path_buf(),
    };
    env.migrate();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async move {
        let conn = agent_connection_manager::amqp::connect(&rabbit.url(), "acm capacity").await.expect("broker");
        let ch = conn.create_channel().await.expect("channel");
        let topo = Topology::new(PREFIX);
        topo.declare(&conn, &Settings::default()).await.expect("topology");
        let events_q = format!("{PREFIX}.capacity-events");
        ch.queue_declare(events_q.as_str().into(), QueueDeclareOptions::default(), FieldTable::default())
            .await
            .expect("events queue");
        ch.queue_bind(
            events_q.as_str().into(),
            topo.event_exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind events");
        let reply_q = ch
            .queue_declare(
                "".into(),
                QueueDeclareOptions { exclusive: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .expect("reply queue");
        let (events, replies) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        count_deliveries(&ch, &events_q, events.clone()).await;
        count_deliveries(&ch, reply_q.name().as_str(), replies.clone()).await;
        let mut worker = env.spawn("worker");
        worker.wait_ready(Duration::from_secs(90)).await;
        let (db, connection) = tokio_postgres::connect(&pg.url("acm_capacity"), NoTls).await.expect("database");
        tokio::spawn(connection);
        let b = Bench {
            worker_pid: worker.pid,
            ticks: clock_ticks(),
            db,
            events,
            replies,
            reply_to: reply_q.name().to_string(),
            pg,
            rabbit,
        };

        // Sessions (not measured), then the idle rates over 5 s.
        let s: Vec<Msg> = (0..sessions)
            .map(|i| {
                Msg::json(
                    &json!({"type": "session.create", "agent_id": format!("a-{i}"), "session_id": format!("s-{i}")}),
                    Some(format!("s-{i}")),
                )
            })
            .collect();
        let mut p = ReliablePublisher::new(&b.rabbit.url(), &topo.command_exchange);
        p.publish_all(&s, &AtomicU64::new(0)).await;
        p.close().await;
        b.until("the sessions", async |b: &Bench| b.events_delivered(sessions as u64).await).await;
        let a = b.sample().await;
        tokio::time::sleep(Duration::from_secs(5)).await; // the measurement window itself
        let z = b.sample().await;
        let secs = (z.at - a.at).as_secs_f64();
        let idle = Idle {
            worker: (z.worker - a.worker) / secs,
            postgres: (z.postgres - a.postgres) / secs,
            rabbitmq: (z.rabbitmq - a.rabbitmq) / secs,
        };
        eprintln!("capacity: idle CPU (s/s): {idle:?}");

        let mut results = Vec::new();
        let base = sessions as u64;
        let opens: Vec<Msg> = (0..connections).map(|c| heartbeat(c, 0, sessions)).collect();
        results.push(
            b.phase("heartbeat opening a connection (+1 event)", opens, false, idle, async |b: &Bench| {
                b.events_delivered(base + connections as u64).await
            })
            .await,
        );
        let refresh: Vec<Msg> =
            (1..=rounds).flat_map(|r| (0..connections).map(move |c| heartbeat(c, r, sessions))).collect();
        let last = format!("SELECT count(*) FROM agent_connection WHERE (client_info->>'round')::int = {rounds}");
        results.push(
            b.phase("heartbeat refreshing a connection", refresh, false, idle, async |b: &Bench| {
                b.count(&last).await == connections as i64
            })
            .await,
        );
        let creates: Vec<Msg> = (0..commands)
            .map(|j| {
                let k = j % sessions;
                Msg::json(
                    &json!({"type": "instruction.create", "agent_id": format!("a-{k}"), "session_id": format!("s-{k}"),
                            "instruction_type": "capacity", "payload": {"j": j}, "instruction_id": instruction_id(j),
                            "expires_at": null}),
                    Some(format!("ic-{j}")),
                )
            })
            .collect();
        let ev = base + connections as u64 + commands as u64;
        results.push(
            b.phase("instruction.create with reply (+1 event)", creates, true, idle, async |b: &Bench| {
                b.replies.load(Ordering::Relaxed) >= commands as u64 && b.events_delivered(ev).await
            })
            .await,
        );
        let sent: Vec<Msg> = (0..commands)
            .map(|j| {
                let k = j % sessions;
                Msg::json(
                    &json!({"type": "instruction.sent", "agent_id": format!("a-{k}"), "session_id": format!("s-{k}"),
                            "instruction_id": instruction_id(j)}),
                    Some(format!("is-{j}")),
                )
            })
            .collect();
        results.push(
            b.phase("instruction.sent with reply (no event)", sent, true, idle, async |b: &Bench| {
                b.replies.load(Ordering::Relaxed) >= 2 * commands as u64
            })
            .await,
        );
        let sizes =
            b.db.query(
                "SELECT t, pg_total_relation_size(t::regclass), (xpath('/row/c/text()', \
                 query_to_xml(format('SELECT count(*) AS c FROM %s', t), false, true, '')))[1]::text::bigint \
                 FROM unnest(ARRAY['agent_connection', 'agent_instruction', 'event_outbox', 'processed_message']) t",
                &[],
            )
            .await
            .expect("table sizes");
        let hot =
            b.db.query_one(
                "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'agent_connection'",
                &[],
            )
            .await
            .expect("update statistics");
        let (updates, hot_updates): (i64, i64) = (hot.get(0), hot.get(1));
        worker.sigterm(Duration::from_secs(60)).await;

        println!("\n## Capacity: cost per message\n");
        println!(
            "Run {} UTC at commit {}, {} CPUs ({}), load average before/after: see below; counts x{scale}.\n",
            shell("date -u '+%Y-%m-%d %H:%M'"),
            shell("git rev-parse --short HEAD"),
            shell("nproc"),
            shell("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs"),
        );
        println!("{HEADER}");
        for c in &results {
            println!("{}", c.row());
        }
        let (cw, cp, cr, cwal) = results[2].per_message();
        let (sw, sp, sr, swal) = results[3].per_message();
        println!(
            "| one event (create − sent, derived) | | | | {:.0} | {:.0} | {:.0} | {:.0} |",
            cw - sw,
            cp - sp,
            cr - sr,
            cwal - swal
        );
        println!(
            "\nidle CPU (s/s, subtracted above): worker {:.4}, PostgreSQL {:.4}, RabbitMQ {:.4}",
            idle.worker, idle.postgres, idle.rabbitmq
        );
        println!("\n| table | rows | total size | bytes/row |\n|---|---:|---:|---:|");
        for r in sizes {
            let (t, size, rows): (String, i64, i64) = (r.get(0), r.get(1), r.get(2));
            println!("| {t} | {rows} | {size} | {:.0} |", size as f64 / rows.max(1) as f64);
        }
        println!("\nagent_connection: {updates} row updates, {hot_updates} of them HOT (no index entries written)");
        println!(
            "\nload average at the end: {}; bench time {:.0} s",
            shell("cat /proc/loadavg"),
            started.elapsed().as_secs_f64()
        );
    });
}
