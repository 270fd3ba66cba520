//! Scenarios 12 and 13, relay takeover: events flow again within 5 s of a SIGKILL of the worker holding the relay
//! lease — with a second worker running (it takes the lease once it expires, `outbox.lease_secs` = 3 by default),
//! and with one worker restarted under the same `worker.id` (it takes its own lease back at once: the lease is set
//! to 30 s there, so only the reclaim can make the bound).
//!
//! Sessions are created one every 100 ms from before the kill until events resume; the time measured is from the
//! SIGKILL to the first event of a session whose `session.create` was published after it (an event of an earlier
//! one may still be on its way from the broker). Every session sent is then announced.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use agent_connection_manager::client::Client;
use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::events_queue;
use crate::lab::{close, consume_no_ack, query_i64, Lab};
use crate::PREFIX;

/// The bound the issue sets: events flow again within this of the relay holder's death.
const RESUME_WITHIN: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relay_holder_killed_with_a_second_worker_running_events_resume_within_5_s() {
    let mut lab = Lab::new("s12", &[]).await;
    lab.spawn_worker().await;
    lab.spawn_worker().await;
    let resumed = kill_holder_and_measure(&mut lab, false).await;
    println!(
        "| 12. relay holder SIGKILLed, second worker running | events resumed after {:.2} s (bound 5 s) |",
        resumed.as_secs_f64()
    );
    lab.stop_workers().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relay_holder_killed_and_restarted_with_its_worker_id_events_resume_within_5_s() {
    let mut lab = Lab::new("s13", &[("ACM_WORKER__ID", "fault-worker-1"), ("ACM_OUTBOX__LEASE_SECS", "30")]).await;
    lab.spawn_worker().await;
    let resumed = kill_holder_and_measure(&mut lab, true).await;
    println!(
        "| 13. only worker SIGKILLed and restarted (worker.id set, lease 30 s) | events resumed after {:.2} s (bound 5 s) |",
        resumed.as_secs_f64()
    );
    lab.stop_workers().await;
}

/// Creates sessions every 100 ms, SIGKILLs the worker whose relay holds the lease (and starts a new one when
/// `restart`), and returns how long after the kill the first event of a session sent after it arrived. Fails the
/// test past [`RESUME_WITHIN`], or when a session's event never comes.
async fn kill_holder_and_measure(lab: &mut Lab, restart: bool) -> Duration {
    let client = Client::connect(&lab.env.amqp_url, PREFIX).await.expect("client connects");
    let (conn, ch) = lab.amqp().await;
    let mut events = consume_no_ack(&ch, &events_queue(), "takeover").await;
    let create =
        |i: usize| json!({"type": "session.create", "agent_id": format!("a-{i}"), "session_id": format!("rt-{i}")});
    // Before the kill: one session, announced, so a relay holds the lease and publishes.
    client.send(&create(0), Some("rt-0")).await.expect("published");
    next_session(&mut events, Duration::from_secs(60), "the first event, before the kill").await;
    let url = lab.db_url();
    let holder = crate::infra::poll_until(Duration::from_secs(10), Duration::from_millis(100), || {
        let url = url.clone();
        async move {
            let pid: i64 = query_i64(&url, "SELECT split_part(holder, '/', 2)::bigint FROM outbox_relay WHERE holder LIKE '%/%/%' AND lease_until > now() UNION ALL SELECT -1 FROM outbox_relay WHERE holder NOT LIKE '%/%/%' AND lease_until > now()").await?;
            Some(pid)
        }
    })
    .await
    .expect("a relay holds the lease");
    let i = if holder < 0 {
        0
    } else {
        lab.workers.iter().position(|w| i64::from(w.pid) == holder).expect("the holder is one of the lab's workers")
    };

    lab.workers[i].sigkill();
    let killed = Instant::now();
    if restart {
        let w = lab.env.spawn("worker-restarted");
        lab.workers[i] = w;
    }
    let mut sent = 1;
    let mut after_kill: HashSet<String> = HashSet::new();
    let mut seen: HashSet<String> = HashSet::new();
    let resumed = loop {
        let id = format!("rt-{sent}");
        client.send(&create(sent), Some(&id)).await.expect("published");
        after_kill.insert(id);
        sent += 1;
        let tick = Instant::now() + Duration::from_millis(100);
        let mut first = None;
        while let Ok(Some(Ok(d))) = tokio::time::timeout_at(tick.into(), events.next()).await {
            let v: Value = serde_json::from_slice(&d.data).unwrap_or(Value::Null);
            if let Some(s) = v["session_id"].as_str() {
                seen.insert(s.to_string());
                if after_kill.contains(s) && first.is_none() {
                    first = Some(killed.elapsed());
                }
            }
        }
        if let Some(t) = first {
            break t;
        }
        assert!(
            killed.elapsed() < RESUME_WITHIN * 3,
            "no event of a session sent after the kill within {:?}; the workers' logs:\n{}",
            RESUME_WITHIN * 3,
            lab.workers.iter().map(|w| crate::infra::tail(&w.log, 20)).collect::<Vec<_>>().join("\n---\n")
        );
    };
    // Every session sent is announced (whoever published it).
    let deadline = Instant::now() + Duration::from_secs(60);
    while (1..sent).any(|k| !seen.contains(&format!("rt-{k}"))) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "sessions sent but never announced: {:?}",
            (1..sent).filter(|k| !seen.contains(&format!("rt-{k}"))).collect::<Vec<_>>()
        );
        if let Some(s) = next_session(&mut events, left, "the remaining sessions' events").await {
            seen.insert(s);
        }
    }
    close(&conn).await;
    client.close().await;
    assert!(
        resumed < RESUME_WITHIN,
        "events resumed {resumed:?} after the relay holder's SIGKILL; the bound is {RESUME_WITHIN:?}"
    );
    resumed
}

/// The `session_id` of the next event on `events`, within `limit`; fails the test with `what` otherwise.
async fn next_session(events: &mut lapin::Consumer, limit: Duration, what: &str) -> Option<String> {
    match tokio::time::timeout(limit, events.next()).await {
        Ok(Some(Ok(d))) => {
            let v: Value = serde_json::from_slice(&d.data).unwrap_or(Value::Null);
            v["session_id"].as_str().map(str::to_string)
        }
        other => panic!("timed out after {limit:?} waiting for {what}: {other:?}"),
    }
}
