//! A backlog of heartbeats queued before the worker starts, drained in bounded memory.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use agent_connection_manager::amqp::Topology;

use crate::counting::{drain_dead_letters, drain_events, key_opened, key_session, left_in_queues, wait_quiet, Row};
use crate::infra::poll_until;
use crate::lab::{query_i64, wait_count, Lab};
use crate::publisher::{Msg, ReliablePublisher};
use crate::workload::{heartbeat_msg, session_msg};
use crate::{count, full, settle_timeout, PREFIX};

/// The largest resident set the worker may reach while draining the backlog, whatever its size: the worker holds at
/// most `amqp.prefetch` deliveries per consumer, so its memory must not grow with the queue.
const BACKLOG_PEAK_LIMIT_KB: u64 = 256 * 1024;

/// 6. A backlog of heartbeats (1,000,000 at full count) queued before the worker starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backlog_queued_before_start_is_drained_in_bounded_memory() {
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
