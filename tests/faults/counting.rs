//! Counting what happened: the results table row and its assertions, the events captured, the dead letters, and
//! what is left in the queues.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use agent_connection_manager::amqp::Topology;
use futures_util::StreamExt;
use lapin::types::AMQPValue;
use serde_json::Value;

use crate::infra::eventually;
use crate::lab::{close, consume_no_ack, wait_count, Lab};
use crate::{events_queue, instruction_uuid, settle_timeout, PREFIX};

/// One row of the results table.
#[derive(Debug, Default)]
pub struct Row {
    pub scenario: String,
    pub sent: u64,
    pub republished: u64,
    pub effects_expected: u64,
    pub effects_applied: u64,
    pub lost: u64,
    pub applied_twice: u64,
    pub events_expected: u64,
    pub events_published: u64,
    pub events_distinct: u64,
    pub events_missing: u64,
    pub events_unexpected: u64,
    pub events_bad_message_id: u64,
    pub dead_expected: u64,
    pub dead_lettered: u64,
    pub peak_kb: u64,
    pub seconds: f64,
    /// Heartbeat and command messages still queued after the workers stopped (nothing may be left unprocessed).
    pub left_in_queues: u64,
    pub notes: String,
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
    pub fn report_and_assert(&self) {
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

pub fn field(v: &Value, name: &str) -> String {
    match &v[name] {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// What identifies the state change an event reports.
pub fn event_key(v: &Value) -> String {
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

pub fn key_session(i: usize) -> String {
    format!("agent.session.created/s-{i}")
}
pub fn key_created(j: usize) -> String {
    format!("agent.instruction.created/{}", instruction_uuid(j))
}
pub fn key_acked(j: usize) -> String {
    format!("agent.instruction.acknowledged/{}", instruction_uuid(j))
}
pub fn key_retry(j: usize, n: usize) -> String {
    format!("agent.instruction.retry/{}/{n}", instruction_uuid(j))
}
pub fn key_expired(j: usize) -> String {
    format!("agent.instruction.expired/{}", instruction_uuid(j))
}
pub fn key_opened(c: usize) -> String {
    format!("agent.connection.opened/c-{c}/false")
}

/// Every event the capture queue received.
#[derive(Default)]
pub struct Captured {
    pub deliveries: u64,
    pub ids: HashMap<String, HashSet<String>>,
    pub bad_message_id: u64,
}

impl Captured {
    /// Compares with the expected keys: (distinct, missing, unexpected, decided twice).
    pub fn compare(&self, expected: &HashSet<String>) -> (u64, u64, u64, u64) {
        let distinct = self.ids.values().map(|s| s.len() as u64).sum();
        let missing = expected.iter().filter(|k| !self.ids.contains_key(*k)).count() as u64;
        let unexpected = self.ids.keys().filter(|k| !expected.contains(*k)).count() as u64;
        let twice = self.ids.values().filter(|s| s.len() > 1).map(|s| s.len() as u64 - 1).sum();
        (distinct, missing, unexpected, twice)
    }

    pub fn sample_unexpected(&self, expected: &HashSet<String>) -> Vec<String> {
        self.ids.keys().filter(|k| !expected.contains(*k)).take(5).cloned().collect()
    }
}

/// Reads every event in the capture queue: as many as the queue holds when called (the workers are stopped by then,
/// so nothing more arrives), within 600 s; the test fails when fewer arrive or the queue is not empty after.
pub async fn drain_events(lab: &Lab) -> Captured {
    let want = lab.depth(&events_queue()).await.expect("event queue depth");
    let (conn, ch) = lab.amqp().await;
    let mut consumer = consume_no_ack(&ch, &events_queue(), "faults").await;
    let mut got = Captured::default();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    while got.deliveries < u64::from(want) {
        match tokio::time::timeout_at(deadline, consumer.next()).await {
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
            Err(_) => panic!("only {} of the {want} captured events were read within 600 s", got.deliveries),
        }
    }
    assert_eq!(lab.depth(&events_queue()).await, Some(0), "events arrived after the workers stopped");
    close(&conn).await;
    got
}

/// Dead letters: (message_id, x-acm-error) of every message in `<prefix>.dead-letter`: as many as it holds when
/// called (the workers are stopped by then), within 300 s; the test fails when fewer arrive or more are left.
pub async fn drain_dead_letters(lab: &Lab) -> Vec<(String, String)> {
    let queue = Topology::new(PREFIX).dead_letter;
    let want = lab.depth(&queue).await.expect("dead-letter queue depth") as usize;
    let (conn, ch) = lab.amqp().await;
    let mut consumer = consume_no_ack(&ch, &queue, "faults-dl").await;
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    while out.len() < want {
        match tokio::time::timeout_at(deadline, consumer.next()).await {
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
            Err(_) => panic!("only {} of the {want} dead letters were read within 300 s", out.len()),
        }
    }
    assert_eq!(lab.depth(&queue).await, Some(0), "dead letters arrived after the workers stopped");
    close(&conn).await;
    out
}

/// After the workload: the relay has published everything, the command and heartbeat queues are empty.
pub async fn wait_quiet(lab: &Lab) {
    let url = lab.db_url();
    wait_count(&url, "SELECT count(*) FROM event_outbox", 0, "the outbox to be relayed", settle_timeout()).await;
    let mut queues = lab.topology.heartbeat_queues();
    queues.push(lab.topology.command_queue.clone());
    for q in &queues {
        eventually(&format!("queue {q} to be empty"), settle_timeout(), || async {
            (lab.depth(q).await == Some(0)).then_some(())
        })
        .await;
    }
}

/// Heartbeat and command messages still in their queues (call after the workers stopped).
pub async fn left_in_queues(lab: &Lab) -> u64 {
    let mut left = 0;
    for q in lab.topology.heartbeat_queues() {
        left += u64::from(lab.depth(&q).await.expect("heartbeat queue depth"));
    }
    left + u64::from(lab.depth(&lab.topology.command_queue).await.expect("command queue depth"))
}
