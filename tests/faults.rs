//! The fault suite (issue 3): kills, restarts, outages, replicas, poison storms and a backlog, injected on a
//! PostgreSQL cluster and a RabbitMQ node that each test starts itself (never the machine's shared services), with
//! the real binary as the worker and this process as the client. Each scenario drives a known, countable workload,
//! then compares the database and every event published with what was sent, and prints one row of the results table.
//!
//! Counts are small by default (the suite runs in a few minutes inside `cargo test`); the issue's full counts run with
//!
//! ```sh
//! ACM_FAULTS_FULL=1 cargo test --release --test faults -- --nocapture --test-threads=1
//! ```
//!
//! How effects are made countable:
//! - commands carry a unique AMQP `message_id` and a client-chosen id: `session.create` (session_id),
//!   `instruction.create` (instruction_id, `expires_at: null` unless the scenario wants expiry) and `instruction.ack`
//!   of earlier instructions (an acknowledgement row is written for every ack applied, so a second application shows
//!   as a second row);
//! - heartbeats go to many distinct connections in rounds; round `r` carries `client_info: {"round": r}`, so each
//!   connection's row shows that its first heartbeat opened it and its last heartbeat was applied (with one worker the
//!   heartbeat queue is consumed in order);
//! - events are captured by a durable queue bound to `<prefix>.events` before the worker starts, so nothing is missed
//!   across restarts; each expected state change is identified by (event_type, object[, retry_count]) and must appear
//!   with exactly one `event_id` (further copies may only be redeliveries of that `event_id`).
//!
//! The client side is reliable (publisher confirms; whatever is not confirmed is published again after reconnecting),
//! and ordering barriers (waiting until the sessions, then the instructions, exist) keep a republished message from
//! overtaking one it depends on, so any loss is the worker's.

#[path = "faults/blocked.rs"]
mod blocked;
#[path = "faults/infra.rs"]
mod infra;
#[path = "faults/publisher.rs"]
mod publisher;

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_connection_manager::amqp::Topology;
use agent_connection_manager::config::Settings;
use futures_util::StreamExt;
use infra::{eventually, poll_until, PgCluster, RabbitNode, TempDir, WorkerEnv, WorkerProc};
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use publisher::{Msg, ReliablePublisher};
use serde_json::{json, Value};
use tokio_postgres::NoTls;

const PREFIX: &str = "acmfault";

fn full() -> bool {
    std::env::var("ACM_FAULTS_FULL").as_deref() == Ok("1")
}

/// Default or full count.
fn count(default: usize, full_count: usize) -> usize {
    if full() {
        full_count
    } else {
        default
    }
}

/// How long the workload may take to be applied after it was published.
fn settle_timeout() -> Duration {
    Duration::from_secs(if full() { 900 } else { 240 })
}

fn events_queue() -> String {
    format!("{PREFIX}.faults-events")
}

fn instruction_uuid(j: usize) -> String {
    format!("00000000-0000-4000-8000-{j:012x}")
}

// ---------------------------------------------------------------------------------------------------------------
// The lab: private PostgreSQL, private RabbitMQ, workers. Fields drop in order: workers, broker, database, files.

struct Lab {
    workers: Vec<WorkerProc>,
    rabbit: RabbitNode,
    pg: PgCluster,
    env: WorkerEnv,
    peak_kb: u64,
    spawned: usize,
    _dir: TempDir,
}

impl Lab {
    /// Starts PostgreSQL and RabbitMQ, migrates, declares the topology and the event capture queue.
    async fn new(name: &str, extra: &[(&str, &str)]) -> Self {
        let dir = TempDir::new(name);
        let pg = tokio::task::block_in_place(|| PgCluster::start_new(dir.path()));
        let rabbit = tokio::task::block_in_place(|| RabbitNode::start_new(dir.path()));
        let mut all_extra: Vec<(String, String)> = vec![
            ("ACM_SWEEPER__CHECK_INTERVAL_SECS".into(), "1".into()),
            // Heartbeats stop when the workload ends; the test must not race the stale verdict.
            ("ACM_SWEEPER__CONNECTION_STALE_AFTER_SECS".into(), "3600".into()),
            ("ACM_OUTBOX__POLL_INTERVAL_MS".into(), "200".into()),
        ];
        all_extra.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let env = WorkerEnv {
            database_url: pg.url("acm_faults"),
            amqp_url: rabbit.url(),
            prefix: PREFIX.into(),
            extra: all_extra,
            log_dir: dir.path().to_path_buf(),
        };
        tokio::task::block_in_place(|| env.migrate());
        let lab = Self { workers: Vec::new(), rabbit, pg, env, peak_kb: 0, spawned: 0, _dir: dir };
        let (conn, ch) = lab.amqp().await;
        Topology::new(PREFIX).declare(&ch, &Settings::default().amqp).await.expect("topology declares");
        let q = events_queue();
        ch.queue_declare(
            q.as_str().into(),
            QueueDeclareOptions { durable: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .expect("event capture queue");
        ch.queue_bind(
            q.as_str().into(),
            Topology::new(PREFIX).event_exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind event capture queue");
        let _ = conn.close(200, "done".into()).await;
        lab
    }

    async fn amqp(&self) -> (lapin::Connection, lapin::Channel) {
        let conn =
            agent_connection_manager::amqp::connect(&self.env.amqp_url, "acm faults test").await.expect("broker");
        let ch = conn.create_channel().await.expect("channel");
        (conn, ch)
    }

    fn db_url(&self) -> String {
        self.env.database_url.clone()
    }

    /// Starts one more worker and waits until it is ready.
    async fn spawn_worker(&mut self) -> usize {
        self.spawned += 1;
        let mut w = self.env.spawn(&format!("worker-{}", self.spawned));
        w.wait_ready(Duration::from_secs(90)).await;
        self.workers.push(w);
        self.workers.len() - 1
    }

    /// SIGKILL worker `i` and start a new one in its place (ready before this returns).
    async fn kill_and_restart(&mut self, i: usize) {
        let peak = self.workers[i].sigkill();
        self.peak_kb = self.peak_kb.max(peak);
        self.spawned += 1;
        let mut w = self.env.spawn(&format!("worker-{}", self.spawned));
        w.wait_ready(Duration::from_secs(90)).await;
        self.workers[i] = w;
    }

    /// SIGTERM every worker (each must exit cleanly) and remember their peak memory.
    async fn stop_workers(&mut self) {
        for w in &mut self.workers {
            let peak = w.sigterm(Duration::from_secs(60)).await;
            self.peak_kb = self.peak_kb.max(peak);
        }
        self.workers.clear();
    }

    /// Messages ready in a queue (`None` while the broker cannot be asked).
    async fn depth(&self, queue: &str) -> Option<u32> {
        let conn = agent_connection_manager::amqp::connect(&self.env.amqp_url, "acm faults probe").await.ok()?;
        let q = conn
            .create_channel()
            .await
            .ok()?
            .queue_declare(
                queue.into(),
                QueueDeclareOptions { passive: true, durable: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .ok();
        let _ = conn.close(200, "done".into()).await;
        q.map(|q| q.message_count())
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Database probes (a fresh connection each time, so they work across a PostgreSQL restart).

async fn db(url: &str) -> Option<tokio_postgres::Client> {
    let (client, conn) =
        tokio::time::timeout(Duration::from_secs(5), tokio_postgres::connect(url, NoTls)).await.ok()?.ok()?;
    tokio::spawn(conn);
    Some(client)
}

async fn query_i64(url: &str, sql: &str) -> Option<i64> {
    let client = db(url).await?;
    client.query_one(sql, &[]).await.ok().map(|r| r.get(0))
}

/// Waits (bounded) until `sql` counts `want`; fails the test otherwise.
async fn wait_count(url: &str, sql: &str, want: usize, what: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let n = query_i64(url, sql).await;
        if n == Some(want as i64) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}: want {want}, last count {n:?} ({sql})"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Workload messages.

fn session_msg(i: usize) -> Msg {
    Msg::json(
        &json!({"type": "session.create", "agent_id": format!("a-{i}"), "session_id": format!("s-{i}"),
                "name": format!("fault-{i}")}),
        Some(format!("sc-{i}")),
    )
}

fn instruction_msg(j: usize, sessions: usize, expiring: bool) -> Msg {
    let k = j % sessions;
    let mut body = json!({"type": "instruction.create", "agent_id": format!("a-{k}"), "session_id": format!("s-{k}"),
        "instruction_type": "fault", "payload": {"j": j}, "instruction_id": instruction_uuid(j)});
    if expiring {
        body["ttl_seconds"] = json!(1);
        body["max_retries"] = json!(3);
    } else {
        body["expires_at"] = Value::Null;
    }
    Msg::json(&body, Some(format!("ic-{j}")))
}

fn ack_msg(j: usize, sessions: usize) -> Msg {
    let k = j % sessions;
    Msg::json(
        &json!({"type": "instruction.ack", "agent_id": format!("a-{k}"), "session_id": format!("s-{k}"),
                "instruction_id": instruction_uuid(j), "status": "processed"}),
        Some(format!("ia-{j}")),
    )
}

fn heartbeat_msg(c: usize, round: usize, sessions: usize) -> Msg {
    let k = c % sessions;
    Msg::json(
        &json!({"type": "agent.heartbeat", "agent_id": format!("a-{k}"), "session_id": format!("s-{k}"),
                "connection_id": format!("c-{c}"), "client_info": {"round": round}}),
        None,
    )
}

/// A malformed message of one of seven kinds (CONTRACT section 6's poison list), tagged `bad-<i>`.
fn malformed_msg(i: usize, max_bytes: usize) -> Msg {
    let id = Some(format!("bad-{i}"));
    match i % 7 {
        0 => Msg::raw("agent.heartbeat", br#"{"type": "agent.heartbeat", oops"#.to_vec(), id),
        1 => Msg::raw("session.create", b"[1, 2, 3]".to_vec(), id),
        2 => Msg::json(&json!({"type": "session.explode", "i": i}), id),
        3 => Msg::json(&json!({"type": "agent.heartbeat", "agent_id": "a-0", "session_id": "s-0"}), id),
        4 => Msg::json(
            &json!({"type": "instruction.create", "agent_id": "a-0", "session_id": "s-0", "instruction_type": "t",
                    "payload": {}, "max_retries": "three"}),
            id,
        ),
        5 => Msg::json(
            &json!({"type": "agent.heartbeat", "agent_id": "a-0", "session_id": "s-0", "connection_id": format!("big-{i}"),
                    "client_info": {"pad": "x".repeat(max_bytes + 100)}}),
            id,
        ),
        _ => Msg::raw("session.create", vec![0xff, 0xfe, b'{', 0x80], id),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Counting.

/// One row of the results table.
#[derive(Debug, Default)]
struct Row {
    scenario: String,
    sent: u64,
    republished: u64,
    effects_expected: u64,
    effects_applied: u64,
    lost: u64,
    applied_twice: u64,
    events_expected: u64,
    events_published: u64,
    events_distinct: u64,
    events_missing: u64,
    events_unexpected: u64,
    events_bad_message_id: u64,
    dead_expected: u64,
    dead_lettered: u64,
    peak_kb: u64,
    seconds: f64,
    /// Heartbeat and command messages still queued after the workers stopped (nothing may be left unprocessed).
    left_in_queues: u64,
    notes: String,
}

const HEADER: &str = "| scenario | sent | republished by client | effects expected | effects applied | lost | applied twice | \
events expected | events published (copies) | distinct events | missing | dead-lettered (expected) | worker peak RSS | time |";
const RULE: &str = "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|";

impl Row {
    fn markdown(&self) -> String {
        format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} ({}) | {:.0} MiB | {:.0} s |",
            self.scenario,
            self.sent,
            self.republished,
            self.effects_expected,
            self.effects_applied,
            self.lost,
            self.applied_twice,
            self.events_expected,
            self.events_published,
            self.events_distinct,
            self.events_missing,
            self.dead_lettered,
            self.dead_expected,
            self.peak_kb as f64 / 1024.0,
            self.seconds,
        )
    }

    /// Prints the row (and appends it to `$ACM_FAULTS_RESULTS` when set), then asserts the guarantees.
    fn report_and_assert(&self) {
        let line = self.markdown();
        let notes = format!("{}; left in the queues after the workers stopped: {}", self.notes, self.left_in_queues);
        println!("{HEADER}\n{RULE}\n{line}\nnotes: {notes}");
        if let Ok(path) = std::env::var("ACM_FAULTS_RESULTS") {
            use std::io::Write;
            if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
                let _ = writeln!(f, "{line}");
                let _ = writeln!(f, "<!-- {}: {notes} -->", self.scenario);
            }
        }
        assert_eq!(self.lost, 0, "{}: effects lost", self.scenario);
        assert_eq!(self.applied_twice, 0, "{}: effects applied twice", self.scenario);
        assert_eq!(self.effects_applied, self.effects_expected, "{}: effects applied", self.scenario);
        assert_eq!(self.events_missing, 0, "{}: expected events never published", self.scenario);
        assert_eq!(self.events_unexpected, 0, "{}: events nobody asked for", self.scenario);
        assert_eq!(self.events_bad_message_id, 0, "{}: events whose message_id is not their event_id", self.scenario);
        assert_eq!(self.events_distinct, self.events_expected, "{}: distinct events", self.scenario);
        assert_eq!(self.dead_lettered, self.dead_expected, "{}: dead-lettered", self.scenario);
        assert_eq!(self.left_in_queues, 0, "{}: messages left unprocessed in the queues", self.scenario);
    }
}

fn field(v: &Value, name: &str) -> String {
    match &v[name] {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// What identifies the state change an event reports.
fn event_key(v: &Value) -> String {
    let t = field(v, "event_type");
    match t.as_str() {
        "agent.session.created" => format!("{t}/{}", field(v, "session_id")),
        "agent.instruction.created" | "agent.instruction.acknowledged" | "agent.instruction.expired" => {
            format!("{t}/{}", field(v, "instruction_id"))
        }
        "agent.instruction.retry" => format!("{t}/{}/{}", field(v, "instruction_id"), field(v, "retry_count")),
        "agent.connection.opened" => format!("{t}/{}/{}", field(v, "connection_id"), field(v, "restored")),
        _ => format!("{t}/{}", field(v, "event_id")),
    }
}

fn key_session(i: usize) -> String {
    format!("agent.session.created/s-{i}")
}
fn key_created(j: usize) -> String {
    format!("agent.instruction.created/{}", instruction_uuid(j))
}
fn key_acked(j: usize) -> String {
    format!("agent.instruction.acknowledged/{}", instruction_uuid(j))
}
fn key_retry(j: usize, n: usize) -> String {
    format!("agent.instruction.retry/{}/{n}", instruction_uuid(j))
}
fn key_expired(j: usize) -> String {
    format!("agent.instruction.expired/{}", instruction_uuid(j))
}
fn key_opened(c: usize) -> String {
    format!("agent.connection.opened/c-{c}/false")
}

/// Every event the capture queue received.
#[derive(Default)]
struct Captured {
    deliveries: u64,
    ids: HashMap<String, HashSet<String>>,
    bad_message_id: u64,
}

impl Captured {
    /// Compares with the expected keys: (distinct, missing, unexpected, decided twice).
    fn compare(&self, expected: &HashSet<String>) -> (u64, u64, u64, u64) {
        let distinct = self.ids.values().map(|s| s.len() as u64).sum();
        let missing = expected.iter().filter(|k| !self.ids.contains_key(*k)).count() as u64;
        let unexpected = self.ids.keys().filter(|k| !expected.contains(*k)).count() as u64;
        let twice = self.ids.values().filter(|s| s.len() > 1).map(|s| s.len() as u64 - 1).sum();
        (distinct, missing, unexpected, twice)
    }

    fn sample_unexpected(&self, expected: &HashSet<String>) -> Vec<String> {
        self.ids.keys().filter(|k| !expected.contains(*k)).take(5).cloned().collect()
    }
}

/// Consumes the event capture queue until it is empty and quiet (the workers are stopped by then).
async fn drain_events(lab: &Lab) -> Captured {
    let (conn, ch) = lab.amqp().await;
    let mut consumer = ch
        .basic_consume(
            events_queue().as_str().into(),
            "faults".into(),
            BasicConsumeOptions { no_ack: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .expect("consume events");
    let mut got = Captured::default();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        match tokio::time::timeout(Duration::from_secs(1), consumer.next()).await {
            Ok(Some(Ok(d))) => {
                got.deliveries += 1;
                let v: Value = serde_json::from_slice(&d.data).unwrap_or(Value::Null);
                let event_id = field(&v, "event_id");
                if d.properties.message_id().as_ref().map(|m| m.as_str()) != Some(event_id.as_str()) {
                    got.bad_message_id += 1;
                }
                got.ids.entry(event_key(&v)).or_default().insert(event_id);
            }
            Ok(other) => panic!("event consumer ended: {other:?}"),
            Err(_) => {
                if lab.depth(&events_queue()).await == Some(0) {
                    break;
                }
                assert!(Instant::now() < deadline, "the event queue did not drain within 600 s");
            }
        }
    }
    let _ = conn.close(200, "done".into()).await;
    got
}

/// Dead letters: (message_id, x-acm-error) of every message in `<prefix>.dead-letter`.
async fn drain_dead_letters(lab: &Lab) -> Vec<(String, String)> {
    let queue = Topology::new(PREFIX).dead_letter;
    let (conn, ch) = lab.amqp().await;
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "faults-dl".into(),
            BasicConsumeOptions { no_ack: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .expect("consume dead letters");
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        match tokio::time::timeout(Duration::from_secs(1), consumer.next()).await {
            Ok(Some(Ok(d))) => {
                let id = d.properties.message_id().as_ref().map(|m| m.as_str().to_string()).unwrap_or_default();
                let reason = d
                    .properties
                    .headers()
                    .as_ref()
                    .and_then(|h| h.inner().get("x-acm-error").cloned())
                    .map(|v| match v {
                        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).to_string(),
                        other => format!("{other:?}"),
                    })
                    .unwrap_or_default();
                out.push((id, reason));
            }
            Ok(other) => panic!("dead-letter consumer ended: {other:?}"),
            Err(_) => {
                if lab.depth(&queue).await == Some(0) {
                    break;
                }
                assert!(Instant::now() < deadline, "the dead-letter queue did not drain within 300 s");
            }
        }
    }
    let _ = conn.close(200, "done".into()).await;
    out
}

/// After the workload: the relay has published everything, the command and heartbeat queues are empty.
async fn wait_quiet(lab: &Lab) {
    let url = lab.db_url();
    wait_count(
        &url,
        "SELECT count(*) FROM event_outbox WHERE published_at IS NULL",
        0,
        "the outbox to be relayed",
        settle_timeout(),
    )
    .await;
    let topo = Topology::new(PREFIX);
    for q in [&topo.heartbeat_queue, &topo.command_queue] {
        eventually(&format!("queue {q} to be empty"), settle_timeout(), || async {
            (lab.depth(q).await == Some(0)).then_some(())
        })
        .await;
    }
}

/// Heartbeat and command messages still in their queues (call after the workers stopped).
async fn left_in_queues(lab: &Lab) -> u64 {
    let topo = Topology::new(PREFIX);
    let hb = lab.depth(&topo.heartbeat_queue).await.expect("heartbeat queue depth");
    let cmd = lab.depth(&topo.command_queue).await.expect("command queue depth");
    u64::from(hb) + u64::from(cmd)
}

// ---------------------------------------------------------------------------------------------------------------
// The standard workload of scenarios 1-3: sessions, then instructions, then acks of the first instructions, and
// concurrently (once the sessions exist) heartbeats in rounds over many connections.

#[derive(Clone, Copy)]
struct Standard {
    sessions: usize,
    creates: usize,
    acks: usize,
    connections: usize,
    rounds: usize,
}

impl Standard {
    fn new(heartbeats: usize, commands: usize) -> Self {
        let sessions = commands / 10;
        let creates = commands * 6 / 10;
        let rounds = 4;
        Self { sessions, creates, acks: commands - sessions - creates, connections: heartbeats / rounds, rounds }
    }

    fn messages(&self) -> usize {
        self.sessions + self.creates + self.acks + self.connections * self.rounds
    }
}

/// The fault a standard run injects.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// SIGKILL the worker at 20 %, 45 % and 70 % of the workload, restarting it each time.
    KillWorker,
    /// Stop the RabbitMQ node at 40 % and start it again.
    RestartBroker,
    /// Stop PostgreSQL at 40 % for this long, then start it.
    StopPostgres(Duration),
}

/// Publishes a standard workload from two client tasks (commands and heartbeats) while `fault` is injected.
/// Returns how many publications the client had to repeat.
async fn drive_standard(lab: &mut Lab, w: Standard, fault: Fault) -> u64 {
    let progress = Arc::new(AtomicU64::new(0));
    let (ready_tx, ready_rx) = tokio::sync::watch::channel(false);
    let amqp = lab.env.amqp_url.clone();
    let exchange = Topology::new(PREFIX).command_exchange;
    let url = lab.db_url();

    let commands = {
        let (amqp, exchange, url, progress) = (amqp.clone(), exchange.clone(), url.clone(), progress.clone());
        tokio::spawn(async move {
            let mut p = ReliablePublisher::new(&amqp, &exchange);
            let sessions: Vec<Msg> = (0..w.sessions).map(session_msg).collect();
            p.publish_all(&sessions, &progress).await;
            let t = settle_timeout();
            wait_count(&url, "SELECT count(*) FROM agent_session", w.sessions, "the sessions", t).await;
            let _ = ready_tx.send(true);
            let creates: Vec<Msg> = (0..w.creates).map(|j| instruction_msg(j, w.sessions, false)).collect();
            p.publish_all(&creates, &progress).await;
            wait_count(&url, "SELECT count(*) FROM agent_instruction", w.creates, "the instructions", t).await;
            let acks: Vec<Msg> = (0..w.acks).map(|j| ack_msg(j, w.sessions)).collect();
            p.publish_all(&acks, &progress).await;
            let n = p.republished;
            p.close().await;
            n
        })
    };
    let heartbeats = {
        let (amqp, exchange, progress) = (amqp.clone(), exchange.clone(), progress.clone());
        let mut ready_rx = ready_rx;
        tokio::spawn(async move {
            if ready_rx.wait_for(|r| *r).await.is_err() {
                return 0;
            }
            let mut p = ReliablePublisher::new(&amqp, &exchange);
            for r in 0..w.rounds {
                let round: Vec<Msg> = (0..w.connections).map(|c| heartbeat_msg(c, r, w.sessions)).collect();
                p.publish_all(&round, &progress).await;
            }
            let n = p.republished;
            p.close().await;
            n
        })
    };

    let total = w.messages() as u64;
    let at = |share: f64| (total as f64 * share) as u64;
    let reached = |n: u64| {
        let progress = progress.clone();
        async move {
            eventually(&format!("the client to publish {n} messages"), settle_timeout(), || {
                let p = progress.load(Ordering::Relaxed);
                async move { (p >= n).then_some(()) }
            })
            .await
        }
    };
    match fault {
        Fault::KillWorker => {
            for share in [0.2, 0.45, 0.7] {
                reached(at(share)).await;
                eprintln!(
                    "faults: SIGKILL worker {} at {} messages published",
                    lab.workers[0].pid,
                    progress.load(Ordering::Relaxed)
                );
                lab.kill_and_restart(0).await;
            }
        }
        Fault::RestartBroker => {
            reached(at(0.4)).await;
            eprintln!("faults: stopping RabbitMQ at {} messages published", progress.load(Ordering::Relaxed));
            let t = Instant::now();
            tokio::task::block_in_place(|| lab.rabbit.stop());
            tokio::task::block_in_place(|| lab.rabbit.start());
            eprintln!("faults: RabbitMQ back after {:?}", t.elapsed());
        }
        Fault::StopPostgres(down) => {
            reached(at(0.4)).await;
            eprintln!("faults: stopping PostgreSQL at {} messages published", progress.load(Ordering::Relaxed));
            tokio::task::block_in_place(|| lab.pg.stop());
            // The fault itself: the database stays down this long while the workload goes on.
            tokio::time::sleep(down).await;
            tokio::task::block_in_place(|| lab.pg.start());
            eprintln!("faults: PostgreSQL back after {down:?}");
        }
    }
    let republished_cmd = commands.await.expect("command client");
    let republished_hb = heartbeats.await.expect("heartbeat client");
    republished_cmd + republished_hb
}

async fn standard_scenario(name: &str, fault: Fault) {
    let w = Standard::new(count(4_000, 100_000), count(1_000, 10_000));
    let started = Instant::now();
    let mut lab = Lab::new(name, &[]).await;
    lab.spawn_worker().await;
    let republished = drive_standard(&mut lab, w, fault).await;

    let url = lab.db_url();
    let last = w.rounds - 1;
    let final_round = format!("SELECT count(*) FROM agent_connection WHERE (client_info->>'round')::int = {last}");
    let t = settle_timeout();
    // Bounded waits; on a timeout the counts below say what is missing.
    let _ = poll_until(t, Duration::from_millis(500), || {
        let (url, final_round) = (url.clone(), final_round.clone());
        async move {
            let acked = query_i64(&url, "SELECT count(*) FROM agent_instruction WHERE status = 'acknowledged'").await?;
            let hb = query_i64(&url, &final_round).await?;
            (acked == w.acks as i64 && hb == w.connections as i64).then_some(())
        }
    })
    .await;
    wait_quiet(&lab).await;
    lab.stop_workers().await;
    let left = left_in_queues(&lab).await;

    let client = db(&url).await.expect("database");
    let one = |sql: &'static str| {
        let client = &client;
        async move { client.query_one(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}")).get::<_, i64>(0) as u64 }
    };
    let sessions = one("SELECT count(*) FROM agent_session WHERE session_id LIKE 's-%'").await;
    let instructions = one("SELECT count(*) FROM agent_instruction").await;
    let acked = one("SELECT count(*) FROM agent_instruction WHERE status = 'acknowledged'").await;
    let ack_rows = one("SELECT count(*) FROM agent_instruction_acknowledgement").await;
    let ack_distinct = one("SELECT count(DISTINCT instruction_id) FROM agent_instruction_acknowledgement").await;
    let connections = one("SELECT count(*) FROM agent_connection").await;
    let final_hb = client.query_one(final_round.as_str(), &[]).await.expect("final round").get::<_, i64>(0) as u64;
    let processed = one("SELECT count(*) FROM processed_message").await;

    let mut expected = HashSet::new();
    expected.extend((0..w.sessions).map(key_session));
    expected.extend((0..w.creates).map(key_created));
    expected.extend((0..w.acks).map(key_acked));
    expected.extend((0..w.connections).map(key_opened));
    let events = drain_events(&lab).await;
    let (distinct, missing, unexpected, twice) = events.compare(&expected);
    let dead = drain_dead_letters(&lab).await;

    let effects_expected = (w.sessions + w.creates + w.acks + w.connections) as u64;
    let applied = sessions.min(w.sessions as u64)
        + instructions.min(w.creates as u64)
        + acked.min(w.acks as u64)
        + final_hb.min(w.connections as u64);
    let mut notes = String::new();
    let _ = write!(
        notes,
        "sessions {sessions}/{}, instructions {instructions}/{}, acknowledged {acked}/{} ({ack_rows} ack rows), \
         connections {connections} (final round applied on {final_hb}/{}), idempotency records {processed}",
        w.sessions, w.creates, w.acks, w.connections
    );
    if unexpected > 0 {
        let _ = write!(notes, "; unexpected events e.g. {:?}", events.sample_unexpected(&expected));
    }
    let row = Row {
        scenario: name.to_string(),
        sent: w.messages() as u64,
        republished,
        effects_expected,
        effects_applied: applied,
        lost: effects_expected - applied,
        applied_twice: (ack_rows - ack_distinct)
            + twice
            + sessions.saturating_sub(w.sessions as u64)
            + instructions.saturating_sub(w.creates as u64)
            + connections.saturating_sub(w.connections as u64),
        events_expected: expected.len() as u64,
        events_published: events.deliveries,
        events_distinct: distinct,
        events_missing: missing,
        events_unexpected: unexpected,
        events_bad_message_id: events.bad_message_id,
        dead_expected: 0,
        dead_lettered: dead.len() as u64,
        peak_kb: lab.peak_kb,
        seconds: started.elapsed().as_secs_f64(),
        left_in_queues: left,
        notes,
    };
    row.report_and_assert();
}

// ---------------------------------------------------------------------------------------------------------------
// Scenarios.

/// 1. SIGKILL the worker three times during the workload (100,000 heartbeats and 10,000 commands at full count),
///    restarting it each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s1_worker_sigkilled_three_times() {
    standard_scenario("1. worker SIGKILLed 3x", Fault::KillWorker).await;
}

/// 2. Restart RabbitMQ (stop the node, start it again) during the same workload.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s2_rabbitmq_restarted() {
    standard_scenario("2. RabbitMQ restarted", Fault::RestartBroker).await;
}

/// 3. Stop PostgreSQL for 30 seconds during the workload, then start it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_postgres_down_30s() {
    standard_scenario("3. PostgreSQL down 30 s", Fault::StopPostgres(Duration::from_secs(30))).await;
}

/// 4. Three workers at once, sweepers and relays on, with instructions (10,000 at full count) expiring through all
///    their retries (ttl 1 s, 3 retries, retry window 1 s, sweeper every second).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s4_three_workers_expire_instructions_through_all_retries() {
    let name = "4. 3 workers, expiry through retries";
    let n = count(500, 10_000);
    let sessions = (n / 100).max(5);
    let heartbeats = n;
    let started = Instant::now();
    let mut lab = Lab::new("s4", &[("ACM_SWEEPER__INSTRUCTION_RETRY_WINDOW_SECS", "1")]).await;
    for _ in 0..3 {
        lab.spawn_worker().await;
    }
    let url = lab.db_url();
    let progress = AtomicU64::new(0);
    let exchange = Topology::new(PREFIX).command_exchange;
    let mut p = ReliablePublisher::new(&lab.env.amqp_url, &exchange);
    let msgs: Vec<Msg> = (0..sessions).map(session_msg).collect();
    p.publish_all(&msgs, &progress).await;
    wait_count(&url, "SELECT count(*) FROM agent_session", sessions, "the sessions", settle_timeout()).await;
    // Instructions and heartbeats interleaved, so all three workers' consumers compete for both queues.
    let msgs: Vec<Msg> = (0..n)
        .flat_map(|j| [instruction_msg(j, sessions, true), heartbeat_msg(j, 0, sessions)])
        .take(n + heartbeats)
        .collect();
    p.publish_all(&msgs, &progress).await;
    let republished = p.republished;
    p.close().await;

    let _ = poll_until(settle_timeout(), Duration::from_millis(500), || {
        let url = url.clone();
        async move {
            let done =
                query_i64(&url, "SELECT count(*) FROM agent_instruction WHERE status = 'expired' AND retry_count = 3")
                    .await?;
            (done == n as i64).then_some(())
        }
    })
    .await;
    wait_quiet(&lab).await;
    lab.stop_workers().await;
    let left = left_in_queues(&lab).await;

    let client = db(&url).await.expect("database");
    let get = |sql: &'static str| {
        let client = &client;
        async move { client.query_one(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}")).get::<_, i64>(0) as u64 }
    };
    let s = get("SELECT count(*) FROM agent_session").await;
    let created = get("SELECT count(*) FROM agent_instruction").await;
    let expired = get("SELECT count(*) FROM agent_instruction WHERE status = 'expired' AND retry_count = 3").await;
    let connections = get("SELECT count(*) FROM agent_connection").await;

    let mut expected = HashSet::new();
    expected.extend((0..sessions).map(key_session));
    for j in 0..n {
        expected.insert(key_created(j));
        for r in 1..=3 {
            expected.insert(key_retry(j, r));
        }
        expected.insert(key_expired(j));
    }
    expected.extend((0..heartbeats).map(key_opened));
    let events = drain_events(&lab).await;
    let (distinct, missing, unexpected, twice) = events.compare(&expected);
    let dead = drain_dead_letters(&lab).await;

    // Effects: sessions, instructions created, each instruction's three retries and its expiry (seen as events, each
    // decided once; the database shows the end state), connections opened.
    let transitions_seen = (0..n)
        .map(|j| {
            (1..=3).filter(|r| events.ids.contains_key(&key_retry(j, *r))).count()
                + usize::from(events.ids.contains_key(&key_expired(j)))
        })
        .sum::<usize>() as u64;
    let transitions = transitions_seen.min(expired * 4);
    let effects_expected = (sessions + n + 4 * n + heartbeats) as u64;
    let applied = s.min(sessions as u64) + created.min(n as u64) + transitions + connections.min(heartbeats as u64);
    let mut notes = format!(
        "sessions {s}/{sessions}, instructions {created}/{n}, expired after 3 retries {expired}/{n}, \
         connections {connections}/{heartbeats}"
    );
    if unexpected > 0 {
        let _ = write!(notes, "; unexpected events e.g. {:?}", events.sample_unexpected(&expected));
    }
    let row = Row {
        scenario: name.into(),
        sent: (sessions + n + heartbeats) as u64,
        republished,
        effects_expected,
        effects_applied: applied,
        lost: effects_expected - applied,
        applied_twice: twice,
        events_expected: expected.len() as u64,
        events_published: events.deliveries,
        events_distinct: distinct,
        events_missing: missing,
        events_unexpected: unexpected,
        events_bad_message_id: events.bad_message_id,
        dead_expected: 0,
        dead_lettered: dead.len() as u64,
        peak_kb: lab.peak_kb,
        seconds: started.elapsed().as_secs_f64(),
        left_in_queues: left,
        notes,
    };
    row.report_and_assert();
}

/// 5. Malformed messages (10,000 at full count, seven kinds, on both queues) interleaved one to one with valid ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s5_poison_storm() {
    let name = "5. poison storm";
    let valid = count(1_000, 10_000);
    let sessions = valid / 20;
    let creates = valid * 45 / 100;
    let heartbeats = valid - sessions - creates;
    let max_bytes = 4096;
    let started = Instant::now();
    let mut lab = Lab::new("s5", &[("ACM_AMQP__MAX_MESSAGE_BYTES", "4096")]).await;
    lab.spawn_worker().await;
    let url = lab.db_url();
    let progress = AtomicU64::new(0);
    let mut p = ReliablePublisher::new(&lab.env.amqp_url, &Topology::new(PREFIX).command_exchange);
    let mut bad = (0..valid).map(|i| malformed_msg(i, max_bytes));
    let phase1: Vec<Msg> =
        (0..sessions).flat_map(|i| [session_msg(i), bad.next().expect("a malformed message")]).collect();
    p.publish_all(&phase1, &progress).await;
    wait_count(&url, "SELECT count(*) FROM agent_session", sessions, "the sessions", settle_timeout()).await;
    let mut phase2 = Vec::with_capacity(2 * (creates + heartbeats));
    for k in 0..creates.max(heartbeats) {
        if k < creates {
            phase2.push(instruction_msg(k, sessions, false));
            phase2.push(bad.next().expect("a malformed message"));
        }
        if k < heartbeats {
            phase2.push(heartbeat_msg(k, 0, sessions));
            phase2.push(bad.next().expect("a malformed message"));
        }
    }
    assert!(bad.next().is_none(), "every malformed message is sent");
    p.publish_all(&phase2, &progress).await;
    let republished = p.republished;
    p.close().await;

    let _ = poll_until(settle_timeout(), Duration::from_millis(500), || {
        let url = url.clone();
        async move {
            let c = query_i64(&url, "SELECT count(*) FROM agent_instruction").await?;
            let h = query_i64(&url, "SELECT count(*) FROM agent_connection").await?;
            (c == creates as i64 && h == heartbeats as i64).then_some(())
        }
    })
    .await;
    let dl_queue = Topology::new(PREFIX).dead_letter;
    let dead_when_valid_applied = lab.depth(&dl_queue).await.unwrap_or_default();
    if std::env::var("ACM_FAULTS_EXPERIMENT_STOP_EARLY").is_err() {
        let _ = poll_until(settle_timeout(), Duration::from_millis(250), || async {
            (lab.depth(&dl_queue).await == Some(valid as u32)).then_some(())
        })
        .await;
    }
    wait_quiet(&lab).await;
    lab.stop_workers().await;
    let left = left_in_queues(&lab).await;

    let s = query_i64(&url, "SELECT count(*) FROM agent_session").await.expect("sessions") as u64;
    let c = query_i64(&url, "SELECT count(*) FROM agent_instruction").await.expect("instructions") as u64;
    let h = query_i64(&url, "SELECT count(*) FROM agent_connection").await.expect("connections") as u64;
    let mut expected = HashSet::new();
    expected.extend((0..sessions).map(key_session));
    expected.extend((0..creates).map(key_created));
    expected.extend((0..heartbeats).map(key_opened));
    let events = drain_events(&lab).await;
    let (distinct, missing, unexpected, twice) = events.compare(&expected);
    let dead = drain_dead_letters(&lab).await;

    // Exactly the malformed ones, each once, each with a reason.
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (id, _) in &dead {
        *seen.entry(id.as_str()).or_default() += 1;
    }
    let bad_ids: HashSet<String> = (0..valid).map(|i| format!("bad-{i}")).collect();
    let not_malformed: Vec<&str> = seen.keys().filter(|id| !bad_ids.contains(**id)).copied().take(5).collect();
    let twice_dead = seen.values().filter(|n| **n > 1).count();
    let missing_dead = bad_ids.iter().filter(|id| !seen.contains_key(id.as_str())).count();
    let no_reason = dead.iter().filter(|(_, r)| r.is_empty()).count();
    let mut reasons: HashMap<String, usize> = HashMap::new();
    for (_, r) in &dead {
        let label = r.split([':', '`']).next().unwrap_or_default().trim().to_string();
        *reasons.entry(label).or_default() += 1;
    }
    let mut notes = format!(
        "sessions {s}/{sessions}, instructions {c}/{creates}, connections {h}/{heartbeats}; dead-letter reasons \
         {reasons:?}; {dead_when_valid_applied} dead-lettered when the last valid effect was applied; \
         {twice_dead} dead-lettered twice, {missing_dead} never, {no_reason} without x-acm-error"
    );
    if unexpected > 0 {
        let _ = write!(notes, "; unexpected events e.g. {:?}", events.sample_unexpected(&expected));
    }
    let effects_expected = valid as u64;
    let applied = s.min(sessions as u64) + c.min(creates as u64) + h.min(heartbeats as u64);
    let row = Row {
        scenario: name.into(),
        sent: 2 * valid as u64,
        republished,
        effects_expected,
        effects_applied: applied,
        lost: effects_expected - applied,
        applied_twice: twice
            + s.saturating_sub(sessions as u64)
            + c.saturating_sub(creates as u64)
            + h.saturating_sub(heartbeats as u64),
        events_expected: expected.len() as u64,
        events_published: events.deliveries,
        events_distinct: distinct,
        events_missing: missing,
        events_unexpected: unexpected,
        events_bad_message_id: events.bad_message_id,
        dead_expected: valid as u64,
        dead_lettered: dead.len() as u64,
        peak_kb: lab.peak_kb,
        seconds: started.elapsed().as_secs_f64(),
        left_in_queues: left,
        notes,
    };
    row.report_and_assert();
    assert!(not_malformed.is_empty(), "valid messages were dead-lettered: {not_malformed:?}");
    assert_eq!(twice_dead, 0, "malformed messages dead-lettered more than once");
    assert_eq!(missing_dead, 0, "malformed messages never dead-lettered");
    assert_eq!(no_reason, 0, "dead letters without an x-acm-error header");
}

/// The largest resident set the worker may reach while draining the backlog, whatever its size: the worker holds at
/// most `amqp.prefetch` deliveries per consumer, so its memory must not grow with the queue.
const BACKLOG_PEAK_LIMIT_KB: u64 = 256 * 1024;

/// 6. A backlog of heartbeats (1,000,000 at full count) queued before the worker starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s6_backlog_before_start() {
    let name = "6. backlog before start";
    let backlog = count(20_000, 1_000_000);
    let rounds = 10;
    let connections = backlog / rounds;
    let sessions = count(100, 1_000);
    let started = Instant::now();
    let mut lab = Lab::new("s6", &[]).await;
    let url = lab.db_url();
    let exchange = Topology::new(PREFIX).command_exchange;
    let progress = AtomicU64::new(0);

    // Sessions first, with a worker that is then stopped.
    lab.spawn_worker().await;
    let mut p = ReliablePublisher::new(&lab.env.amqp_url, &exchange);
    let msgs: Vec<Msg> = (0..sessions).map(session_msg).collect();
    p.publish_all(&msgs, &progress).await;
    wait_count(&url, "SELECT count(*) FROM agent_session", sessions, "the sessions", settle_timeout()).await;
    wait_quiet(&lab).await;
    lab.stop_workers().await;
    lab.peak_kb = 0;

    // The backlog, with no worker running.
    let t = Instant::now();
    for r in 0..rounds {
        let round: Vec<Msg> = (0..connections).map(|c| heartbeat_msg(c, r, sessions)).collect();
        p.publish_all(&round, &progress).await;
    }
    let republished = p.republished;
    p.close().await;
    let publish_secs = t.elapsed().as_secs_f64();
    let hbq = Topology::new(PREFIX).heartbeat_queue;
    let queued = lab.depth(&hbq).await.expect("heartbeat queue depth") as u64;
    assert!(queued >= backlog as u64, "only {queued} of {backlog} heartbeats queued");

    // Start the worker and watch it drain, sampling its resident set.
    let t = Instant::now();
    let i = lab.spawn_worker().await;
    let pid = lab.workers[i].pid;
    let final_round =
        format!("SELECT count(*) FROM agent_connection WHERE (client_info->>'round')::int = {}", rounds - 1);
    let mut max_rss_kb = 0u64;
    let timeout = Duration::from_secs(if full() { 1800 } else { 300 });
    let drained = poll_until(timeout, Duration::from_millis(1000), || {
        let (url, final_round) = (url.clone(), final_round.clone());
        if let Some(rss) = std::fs::read_to_string(format!("/proc/{pid}/status")).ok().and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        }) {
            max_rss_kb = max_rss_kb.max(rss);
        }
        async move { (query_i64(&url, &final_round).await? == connections as i64).then_some(()) }
    })
    .await;
    let drain_secs = t.elapsed().as_secs_f64();
    if drained.is_none() {
        eprintln!("faults: the backlog did not drain within {timeout:?}");
    }
    wait_quiet(&lab).await;
    lab.stop_workers().await;
    let left = left_in_queues(&lab).await;

    let s = query_i64(&url, "SELECT count(*) FROM agent_session").await.expect("sessions") as u64;
    let h = query_i64(&url, "SELECT count(*) FROM agent_connection").await.expect("connections") as u64;
    let fin = query_i64(&url, &final_round).await.expect("final round") as u64;
    let mut expected = HashSet::new();
    expected.extend((0..sessions).map(key_session));
    expected.extend((0..connections).map(key_opened));
    let events = drain_events(&lab).await;
    let (distinct, missing, unexpected, twice) = events.compare(&expected);
    let dead = drain_dead_letters(&lab).await;
    let mut notes = format!(
        "{queued} heartbeats queued in {publish_secs:.0} s; drained in {drain_secs:.0} s ({:.0}/s); connections {h}, \
         final round applied on {fin}/{connections}; max sampled RSS {} MiB",
        backlog as f64 / drain_secs.max(0.001),
        max_rss_kb / 1024
    );
    if unexpected > 0 {
        let _ = write!(notes, "; unexpected events e.g. {:?}", events.sample_unexpected(&expected));
    }
    let effects_expected = (sessions + connections) as u64;
    let applied = s.min(sessions as u64) + fin.min(connections as u64);
    let row = Row {
        scenario: name.into(),
        sent: (sessions + backlog) as u64,
        republished,
        effects_expected,
        effects_applied: applied,
        lost: effects_expected - applied,
        applied_twice: twice + h.saturating_sub(connections as u64),
        events_expected: expected.len() as u64,
        events_published: events.deliveries,
        events_distinct: distinct,
        events_missing: missing,
        events_unexpected: unexpected,
        events_bad_message_id: events.bad_message_id,
        dead_expected: 0,
        dead_lettered: dead.len() as u64,
        peak_kb: lab.peak_kb,
        seconds: started.elapsed().as_secs_f64(),
        left_in_queues: left,
        notes,
    };
    row.report_and_assert();
    assert!(
        lab.peak_kb < BACKLOG_PEAK_LIMIT_KB,
        "the worker's peak memory {} MiB while draining the backlog exceeds {} MiB",
        lab.peak_kb / 1024,
        BACKLOG_PEAK_LIMIT_KB / 1024
    );
}
