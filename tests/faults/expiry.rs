//! Three workers at once with sweepers and relays on, while instructions expire through all their retries.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use agent_connection_manager::amqp::Topology;

use crate::counting::{
    drain_dead_letters, drain_events, key_created, key_expired, key_opened, key_retry, key_session, left_in_queues,
    wait_quiet, Row,
};
use crate::infra::poll_until;
use crate::lab::{count_of, db, query_i64, wait_count, Lab};
use crate::publisher::{Msg, ReliablePublisher};
use crate::workload::{heartbeat_msg, instruction_msg, session_msg};
use crate::{count, settle_timeout, PREFIX};

/// 4. Three workers at once, sweepers and relays on, with instructions (10,000 at full count) expiring through all
///    their retries (ttl 1 s, 3 retries, retry window 1 s, sweeper every second).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_workers_expire_each_instruction_through_all_retries_exactly_once() {
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

    let settled = poll_until(settle_timeout(), Duration::from_millis(500), || {
        let url = url.clone();
        async move {
            let done =
                query_i64(&url, "SELECT count(*) FROM agent_instruction WHERE status = 'expired' AND retry_count = 3")
                    .await?;
            (done == n as i64).then_some(())
        }
    })
    .await
    .is_some();
    wait_quiet(&lab).await;
    lab.stop_workers().await;
    let left = left_in_queues(&lab).await;

    let client = db(&url).await.expect("database");
    let s = count_of(&client, "SELECT count(*) FROM agent_session").await;
    let created = count_of(&client, "SELECT count(*) FROM agent_instruction").await;
    let expired =
        count_of(&client, "SELECT count(*) FROM agent_instruction WHERE status = 'expired' AND retry_count = 3").await;
    let connections = count_of(&client, "SELECT count(*) FROM agent_connection").await;

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
    assert!(settled, "{name}: the instructions did not all expire after their retries within {:?}", settle_timeout());
}
