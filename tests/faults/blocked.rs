//! The broker blocks publishers (a memory alarm: `rabbitmqctl set_vm_memory_high_watermark 0`) while the worker is
//! applying a queue of acknowledgements (with replies) and heartbeats and relaying their events. While it lasts,
//! `/readyz` must say so and no transaction of the worker's database may stay open longer than the configured
//! limits; SIGTERM must end the worker within `worker.shutdown_grace_secs` plus a small margin. Then a new worker
//! starts, the alarm is cleared, and nothing may be lost or applied twice: every expected event is published with
//! one `event_id` (counted until the expected number is reached, then until a marker event published after them
//! arrives), every acknowledgement applied once and replied to.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use agent_connection_manager::amqp::Topology;
use futures_util::StreamExt;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use serde_json::Value;

use crate::bounded::http_get;
use crate::counting::{event_key, field, key_acked, key_created, key_opened, key_session, left_in_queues, Row};
use crate::infra::{eventually, within};
use crate::lab::{close, consume_no_ack, db, query_i64, wait_count, Lab, QUERY_LIMIT, SETUP_LIMIT};
use crate::publisher::{Msg, ReliablePublisher};
use crate::workload::{ack_msg, heartbeat_msg, instruction_msg, session_msg};
use crate::{count, events_queue, settle_timeout, PREFIX};

/// The worker's database limits in this scenario (statement, lock and idle-in-transaction timeouts), in seconds.
const DB_LIMIT_SECS: u64 = 5;
/// The worker's confirm timeout, lease and shutdown grace, in seconds.
const CONFIRM_TIMEOUT_SECS: u64 = 3;
const LEASE_SECS: u64 = 6;
const GRACE_SECS: u64 = 5;
/// How much longer than the grace the process may take to exit (runtime teardown, process exit).
const EXIT_MARGIN: Duration = Duration::from_secs(5);
/// A transaction idle between two statements for longer than this is one the worker forgot.
const IDLE_IN_TRANSACTION_LIMIT_SECS: f64 = 2.0;

/// A transaction of the worker's database seen open too long.
struct LongTransaction {
    pid: i32,
    state: String,
    open_secs: f64,
    idle_secs: f64,
    query: String,
}

/// Transactions of the worker's database (other than this probe's) open longer than the limits, or idle inside
/// a transaction for longer than [`IDLE_IN_TRANSACTION_LIMIT_SECS`].
async fn long_transactions(client: &tokio_postgres::Client) -> Vec<LongTransaction> {
    let query = client.query(
        "SELECT pid, coalesce(state, ''), extract(epoch FROM now() - xact_start)::float8, \
                extract(epoch FROM now() - state_change)::float8, left(coalesce(query, ''), 120) \
         FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid() AND xact_start IS NOT NULL",
        &[],
    );
    let rows = within("pg_stat_activity", QUERY_LIMIT, query).await.expect("pg_stat_activity");
    rows.iter()
        .map(|r| LongTransaction {
            pid: r.get(0),
            state: r.get(1),
            open_secs: r.get::<_, Option<f64>>(2).unwrap_or_default(),
            idle_secs: r.get::<_, Option<f64>>(3).unwrap_or_default(),
            query: r.get(4),
        })
        .filter(|t| {
            t.open_secs > DB_LIMIT_SECS as f64 + 1.0
                || (t.state.starts_with("idle in transaction") && t.idle_secs > IDLE_IN_TRANSACTION_LIMIT_SECS)
        })
        .collect()
}

/// 7. The broker blocks publishers while the worker is busy; SIGTERM while blocked; restart; alarm cleared.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blocked_broker_holds_no_transaction_stops_within_the_grace_and_loses_nothing() {
    let name = "7. broker blocks publishers";
    let sessions = count(50, 500);
    let creates = count(1_000, 10_000);
    let acks = creates / 2;
    let connections = count(10_000, 100_000);
    let started = Instant::now();
    let extra: Vec<(&str, String)> = vec![
        ("ACM_DATABASE__STATEMENT_TIMEOUT_SECS", DB_LIMIT_SECS.to_string()),
        ("ACM_DATABASE__LOCK_TIMEOUT_SECS", DB_LIMIT_SECS.to_string()),
        ("ACM_DATABASE__IDLE_IN_TRANSACTION_TIMEOUT_SECS", DB_LIMIT_SECS.to_string()),
        ("ACM_AMQP__CONFIRM_TIMEOUT_SECS", CONFIRM_TIMEOUT_SECS.to_string()),
        ("ACM_OUTBOX__LEASE_SECS", LEASE_SECS.to_string()),
        ("ACM_WORKER__SHUTDOWN_GRACE_SECS", GRACE_SECS.to_string()),
    ];
    let extra: Vec<(&str, &str)> = extra.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut lab = Lab::new("blocked", &extra).await;
    let url = lab.db_url();
    let replies = format!("{PREFIX}.faults-replies");
    {
        let (conn, ch) = lab.amqp().await;
        let declare = ch.queue_declare(
            replies.as_str().into(),
            QueueDeclareOptions { durable: true, ..Default::default() },
            FieldTable::default(),
        );
        within("declaring the reply queue", SETUP_LIMIT, declare).await.expect("reply queue");
        close(&conn).await;
    }

    // Sessions and instructions first (a worker running), then the acknowledgements and heartbeats queue while no
    // worker runs, so that the next worker is busy applying, replying and relaying when the alarm comes.
    lab.spawn_worker().await;
    let exchange = Topology::new(PREFIX).command_exchange;
    let progress = AtomicU64::new(0);
    let mut p = ReliablePublisher::new(&lab.env.amqp_url, &exchange);
    p.publish_all(&(0..sessions).map(session_msg).collect::<Vec<_>>(), &progress).await;
    wait_count(&url, "SELECT count(*) FROM agent_session", sessions, "the sessions", settle_timeout()).await;
    let msgs: Vec<Msg> = (0..creates).map(|j| instruction_msg(j, sessions, false)).collect();
    p.publish_all(&msgs, &progress).await;
    wait_count(&url, "SELECT count(*) FROM agent_instruction", creates, "the instructions", settle_timeout()).await;
    lab.stop_workers().await;
    p.reply_to = Some(replies.clone());
    let msgs: Vec<Msg> = (0..connections.max(acks))
        .flat_map(|k| {
            let ack = (k < acks).then(|| ack_msg(k, sessions));
            let hb = (k < connections).then(|| heartbeat_msg(k, 0, sessions));
            ack.into_iter().chain(hb)
        })
        .collect();
    p.publish_all(&msgs, &progress).await;
    p.reply_to = None;
    let mut republished = p.republished;

    // A busy worker, then the alarm.
    let i = lab.spawn_worker().await;
    let port = lab.workers[i].http_port;
    lab.rabbit.ctl(&["set_vm_memory_high_watermark", "0"]);
    let blocked_at = Instant::now();
    let readyz = eventually("/readyz to report that the broker blocks publishers", Duration::from_secs(30), || async {
        let (status, body) = http_get(port, "/readyz").await?;
        (status == 503 && body.contains("blocks publishers")).then_some(body)
    })
    .await;
    let seen_after = blocked_at.elapsed();
    let unpublished_when_blocked = query_i64(&url, "SELECT count(*) FROM event_outbox").await.unwrap_or(-1);
    let applied_when_blocked = query_i64(&url, "SELECT count(*) FROM agent_connection").await.unwrap_or(-1);

    // While blocked, for longer than every limit: no transaction open too long, none idle inside a transaction.
    let probe = db(&url).await.expect("database");
    let watch_until = Instant::now() + Duration::from_secs(DB_LIMIT_SECS + 3);
    let mut samples = 0;
    while Instant::now() < watch_until {
        let long = long_transactions(&probe).await;
        if let Some(t) = long.first() {
            panic!(
                "{name}: transaction of pid {} {} for {:.1} s (idle {:.1} s) while the broker blocks publishers: {}",
                t.pid, t.state, t.open_secs, t.idle_secs, t.query
            );
        }
        samples += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let still_blocked = http_get(port, "/readyz").await.is_some_and(|(s, b)| s == 503 && b.contains("blocks"));
    assert!(still_blocked, "{name}: /readyz no longer reports the blocked broker while the alarm is on");

    // SIGTERM while blocked: the worker exits within its grace (plus a margin), leaving the rest unacknowledged.
    let t = Instant::now();
    let grace = Duration::from_secs(GRACE_SECS);
    let peak = lab.workers[i].sigterm(grace + EXIT_MARGIN).await;
    let stop_secs = t.elapsed().as_secs_f64();
    lab.peak_kb = lab.peak_kb.max(peak);
    lab.workers.clear();

    // A new worker starts while the alarm is still on, then the alarm is cleared.
    let mut w = lab.env.spawn("worker-after-block");
    let new_port = w.http_port;
    eventually("the new worker to connect to the blocked broker", Duration::from_secs(60), || async {
        let (_, body) = http_get(new_port, "/readyz").await?;
        (!body.contains("broker not connected")).then_some(())
    })
    .await;
    lab.rabbit.ctl(&["set_vm_memory_high_watermark", "0.4"]);
    w.wait_ready(Duration::from_secs(90)).await;
    lab.workers.push(w);

    // Every effect, once.
    wait_count(&url, "SELECT count(*) FROM agent_connection", connections, "the connections", settle_timeout()).await;
    wait_count(
        &url,
        "SELECT count(DISTINCT instruction_id) FROM agent_instruction_acknowledgement",
        acks,
        "the acknowledgements",
        settle_timeout(),
    )
    .await;

    // Every expected event: wait for all of them, then for a marker event published after them.
    let mut expected = HashSet::new();
    expected.extend((0..sessions).map(key_session));
    expected.extend((0..creates).map(key_created));
    expected.extend((0..acks).map(key_acked));
    expected.extend((0..connections).map(key_opened));
    let (conn, ch) = lab.amqp().await;
    let mut events = consume_no_ack(&ch, &events_queue(), "blocked-events").await;
    let mut ids: HashMap<String, HashSet<String>> = HashMap::new();
    let mut deliveries = 0u64;
    let mut bad_message_id = 0u64;
    let mut take = |d: lapin::message::Delivery, ids: &mut HashMap<String, HashSet<String>>| {
        deliveries += 1;
        let v: Value = serde_json::from_slice(&d.data).unwrap_or(Value::Null);
        let event_id = field(&v, "event_id");
        if d.properties.message_id().as_ref().map(|m| m.as_str()) != Some(event_id.as_str()) {
            bad_message_id += 1;
        }
        ids.entry(event_key(&v)).or_default().insert(event_id);
    };
    let deadline = Instant::now() + settle_timeout();
    while expected.iter().any(|k| !ids.contains_key(k)) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, events.next()).await {
            Ok(Some(Ok(d))) => take(d, &mut ids),
            Ok(other) => panic!("{name}: event consumer ended: {other:?}"),
            Err(_) => panic!(
                "{name}: {} expected events never published within {:?}",
                expected.iter().filter(|k| !ids.contains_key(*k)).count(),
                settle_timeout()
            ),
        }
    }
    let marker = key_session(sessions);
    p.publish_all(&[session_msg(sessions)], &progress).await;
    republished += p.republished;
    p.close().await;
    while !ids.contains_key(&marker) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, events.next()).await {
            Ok(Some(Ok(d))) => take(d, &mut ids),
            Ok(other) => panic!("{name}: event consumer ended: {other:?}"),
            Err(_) => panic!("{name}: the marker event never arrived"),
        }
    }
    close(&conn).await;
    ids.remove(&marker);

    // Every acknowledgement replied to (a redelivered one may be replied to twice, with the same reply).
    let (conn, ch) = lab.amqp().await;
    let mut consumer = consume_no_ack(&ch, &replies, "blocked-replies").await;
    let mut replied: HashSet<String> = HashSet::new();
    let mut not_ok = 0;
    let deadline = Instant::now() + settle_timeout();
    while replied.len() < acks && Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, consumer.next()).await {
            Ok(Some(Ok(d))) => {
                let v: Value = serde_json::from_slice(&d.data).unwrap_or(Value::Null);
                if v["ok"] != Value::Bool(true) {
                    not_ok += 1;
                }
                if let Some(c) = d.properties.correlation_id() {
                    replied.insert(c.as_str().to_string());
                }
            }
            Ok(other) => panic!("{name}: reply consumer ended: {other:?}"),
            Err(_) => break,
        }
    }
    close(&conn).await;
    assert_eq!(replied.len(), acks, "{name}: acknowledgements replied to");

    lab.stop_workers().await;
    let left = left_in_queues(&lab).await;
    let s = query_i64(&url, "SELECT count(*) FROM agent_session").await.expect("sessions") as u64;
    let c = query_i64(&url, "SELECT count(*) FROM agent_instruction").await.expect("instructions") as u64;
    let a = query_i64(&url, "SELECT count(*) FROM agent_instruction_acknowledgement").await.expect("acks") as u64;
    let h = query_i64(&url, "SELECT count(*) FROM agent_connection").await.expect("connections") as u64;
    let distinct: u64 = ids.values().map(|v| v.len() as u64).sum();
    let missing = expected.iter().filter(|k| !ids.contains_key(*k)).count() as u64;
    let unexpected: Vec<&String> = ids.keys().filter(|k| !expected.contains(*k)).collect();
    let twice: u64 = ids.values().map(|v| v.len() as u64 - 1).sum();
    let mut notes = format!(
        "blocked after {:.1} s with {unpublished_when_blocked} events unpublished and {applied_when_blocked} of \
         {connections} connections applied; /readyz said {readyz}; {samples} samples of pg_stat_activity over {} s \
         found no transaction open longer than {DB_LIMIT_SECS} s; SIGTERM while blocked: exit after {stop_secs:.1} s \
         (grace {GRACE_SECS} s); sessions {s}/{sessions} (+ marker), instructions {c}/{creates}, ack rows \
         {a}/{acks}, connections {h}/{connections}; replies not ok: {not_ok}",
        seen_after.as_secs_f64(),
        DB_LIMIT_SECS + 3,
    );
    if !unexpected.is_empty() {
        let _ = write!(notes, "; unexpected events e.g. {:?}", unexpected.iter().take(5).collect::<Vec<_>>());
    }
    let effects_expected = (sessions + creates + acks + connections) as u64;
    // `s` counts the marker's session too.
    let applied = s.saturating_sub(1).min(sessions as u64)
        + c.min(creates as u64)
        + a.min(acks as u64)
        + h.min(connections as u64);
    let row = Row {
        scenario: name.into(),
        sent: (sessions + creates + acks + connections + 1) as u64,
        republished,
        effects_expected,
        effects_applied: applied,
        lost: effects_expected - applied,
        applied_twice: twice
            + (s.saturating_sub(sessions as u64 + 1))
            + c.saturating_sub(creates as u64)
            + a.saturating_sub(acks as u64)
            + h.saturating_sub(connections as u64),
        events_expected: expected.len() as u64,
        events_published: deliveries,
        events_distinct: distinct,
        events_missing: missing,
        events_unexpected: unexpected.len() as u64,
        events_bad_message_id: bad_message_id,
        dead_expected: 0,
        dead_lettered: u64::from(lab.depth(&Topology::new(PREFIX).dead_letter).await.unwrap_or_default()),
        peak_kb: lab.peak_kb,
        seconds: started.elapsed().as_secs_f64(),
        left_in_queues: left,
        notes,
    };
    row.report_and_assert();
    assert_eq!(not_ok, 0, "{name}: acknowledgements refused");
    assert!(
        stop_secs < (grace + EXIT_MARGIN).as_secs_f64(),
        "{name}: SIGTERM while blocked took {stop_secs:.1} s, grace {GRACE_SECS} s"
    );
}
