//! A poison storm: malformed messages interleaved one to one with valid ones, on both queues.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use agent_connection_manager::amqp::Topology;

use crate::counting::{
    drain_dead_letters, drain_events, key_created, key_opened, key_session, left_in_queues, wait_quiet, Row,
};
use crate::infra::poll_until;
use crate::lab::{query_i64, wait_count, Lab};
use crate::publisher::{Msg, ReliablePublisher};
use crate::workload::{heartbeat_msg, instruction_msg, malformed_msg, session_msg};
use crate::{count, settle_timeout, PREFIX};

/// 5. Malformed messages (10,000 at full count, seven kinds, on both queues) interleaved one to one with valid ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_storm_dead_letters_each_malformed_message_once_and_applies_the_valid_ones() {
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

    let valid_applied = poll_until(settle_timeout(), Duration::from_millis(500), || {
        let url = url.clone();
        async move {
            let c = query_i64(&url, "SELECT count(*) FROM agent_instruction").await?;
            let h = query_i64(&url, "SELECT count(*) FROM agent_connection").await?;
            (c == creates as i64 && h == heartbeats as i64).then_some(())
        }
    })
    .await
    .is_some();
    let dl_queue = Topology::new(PREFIX).dead_letter;
    let dead_when_valid_applied = lab.depth(&dl_queue).await.unwrap_or_default();
    let all_dead_lettered = std::env::var("ACM_FAULTS_EXPERIMENT_STOP_EARLY").is_ok()
        || poll_until(settle_timeout(), Duration::from_millis(250), || async {
            (lab.depth(&dl_queue).await == Some(valid as u32)).then_some(())
        })
        .await
        .is_some();
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
    assert!(valid_applied, "{name}: the valid messages' effects were not applied within {:?}", settle_timeout());
    assert!(all_dead_lettered, "{name}: the {valid} malformed messages were not all dead-lettered in time");
    assert!(not_malformed.is_empty(), "valid messages were dead-lettered: {not_malformed:?}");
    assert_eq!(twice_dead, 0, "malformed messages dead-lettered more than once");
    assert_eq!(missing_dead, 0, "malformed messages never dead-lettered");
    assert_eq!(no_reason, 0, "dead letters without an x-acm-error header");
}
