//! The load of the failover scenario: commands with replies, republished while unanswered, and heartbeats in
//! rounds, both paced so that they run through the failover.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use serde_json::{json, Value};

use crate::infra::within;
use crate::lab::{consume_no_ack, Lab, SETUP_LIMIT};
use crate::publisher::{Msg, ReliablePublisher};
use crate::settle_timeout;
use crate::workload::heartbeat_msg;

/// A command unanswered this long after it was first published is published again, with the same `message_id` and
/// body, as a client that times out and retries would; each further retry waits twice as long (at most
/// [`RESEND_MAX`]), so a backlog is not flooded with copies.
pub const RESEND_AFTER: Duration = Duration::from_secs(5);
/// The longest wait between two publications of one unanswered command.
pub const RESEND_MAX: Duration = Duration::from_secs(40);

/// `instruction.create` number `j`, without an `instruction_id`: only its `message_id` (`fo-<j>`) keeps a
/// republished copy from creating a second instruction; `payload.j` tells the rows apart.
pub fn create_msg(j: usize, sessions: usize) -> Msg {
    let k = j % sessions;
    Msg::json(
        &json!({"type": "instruction.create", "agent_id": format!("a-{k}"), "session_id": format!("s-{k}"),
                "instruction_type": "failover", "payload": {"j": j}, "expires_at": null}),
        Some(format!("fo-{j}")),
    )
}

/// When the client saw a command's first reply (refusals are listed in [`Replies::refused`]).
#[derive(Clone, Copy, Debug)]
pub struct Reply {
    pub at: Instant,
}

/// Replies by `correlation_id` (the command's `message_id`); `copies` counts every reply, repeats included.
#[derive(Default)]
pub struct Replies {
    pub first: HashMap<String, Reply>,
    pub copies: u64,
    pub refused: Vec<String>,
}

/// Declares a server-named reply queue and records every reply on it; returns the queue's name.
pub async fn collect_replies(lab: &Lab, replies: Arc<Mutex<Replies>>) -> (lapin::Connection, String) {
    let (conn, ch) = lab.amqp().await;
    let declare = ch.queue_declare(
        "".into(),
        QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() },
        FieldTable::default(),
    );
    let q = within("declaring the reply queue", SETUP_LIMIT, declare).await.expect("reply queue");
    let name = q.name().to_string();
    let mut consumer = consume_no_ack(&ch, &name, "failover-replies").await;
    tokio::spawn(async move {
        while let Some(Ok(d)) = consumer.next().await {
            let id = d.properties.correlation_id().as_ref().map(|c| c.to_string()).unwrap_or_default();
            let body: Value = serde_json::from_slice(&d.data).unwrap_or(Value::Null);
            let ok = body["ok"] == json!(true);
            let mut r = replies.lock().expect("replies");
            r.copies += 1;
            if !ok {
                r.refused.push(format!("{id}: {body}"));
            }
            r.first.entry(id).or_insert(Reply { at: Instant::now() });
        }
    });
    (conn, name)
}

/// Commands the client published again because they went unanswered.
#[derive(Default)]
pub struct Resent {
    /// Every republication.
    pub total: AtomicU64,
    /// A moment set by the test (the crash).
    pub mark: Mutex<Option<Instant>>,
    /// Republications of commands whose previous publication came after [`Resent::mark`]: each went unanswered
    /// for a whole wait after it.
    pub waited_after_mark: AtomicU64,
}

/// Publishes `n` creates, `per_tick` every 100 ms, republishing every command unanswered for [`RESEND_AFTER`] (then
/// twice as long each time), until every command has a reply (at most the settle timeout); counts those
/// republications in `resent`. Returns how many publications the reliable publisher repeated (not confirmed by the
/// broker).
#[allow(clippy::too_many_arguments)]
pub async fn run_commands(
    lab_amqp: String,
    exchange: String,
    reply_to: String,
    n: usize,
    sessions: usize,
    per_tick: usize,
    replies: Arc<Mutex<Replies>>,
    resent: Arc<Resent>,
) -> u64 {
    let mut p = ReliablePublisher::new(&lab_amqp, &exchange);
    p.reply_to = Some(reply_to);
    let progress = AtomicU64::new(0);
    // When each command was last published, and how long to wait for its reply before publishing it again.
    let mut sent_at: Vec<Option<(Instant, Duration)>> = vec![None; n];
    let mut next = 0;
    let deadline = Instant::now() + settle_timeout();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        let answered: Vec<bool> = {
            let r = replies.lock().expect("replies");
            (0..n).map(|j| r.first.contains_key(&format!("fo-{j}"))).collect()
        };
        if next == n && answered.iter().all(|a| *a) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "commands: {} of {n} unanswered after {:?}",
            answered.iter().filter(|a| !**a).count(),
            settle_timeout()
        );
        let due: Vec<usize> =
            (0..next).filter(|&j| !answered[j] && sent_at[j].is_some_and(|(t, wait)| t.elapsed() >= wait)).collect();
        let fresh: Vec<usize> = (next..(next + per_tick).min(n)).collect();
        next += fresh.len();
        resent.total.fetch_add(due.len() as u64, Ordering::Relaxed);
        let mark = *resent.mark.lock().expect("mark");
        let later = due.iter().filter(|&&j| mark.is_some_and(|m| sent_at[j].is_some_and(|(t, _)| t > m))).count();
        resent.waited_after_mark.fetch_add(later as u64, Ordering::Relaxed);
        let batch: Vec<usize> = due.into_iter().chain(fresh).collect();
        let msgs: Vec<Msg> = batch.iter().map(|&j| create_msg(j, sessions)).collect();
        p.publish_all(&msgs, &progress).await;
        let now = Instant::now();
        for j in batch {
            let wait = sent_at[j].map_or(RESEND_AFTER, |(_, w)| (w * 2).min(RESEND_MAX));
            sent_at[j] = Some((now, wait));
        }
    }
    let republished = p.republished;
    p.close().await;
    republished
}

/// Publishes heartbeat rounds over `connections` connections, one round every `every`, until `stop`; then one
/// final round. Returns (the final round's number, heartbeats published, publications repeated).
pub async fn run_heartbeats(
    amqp: String,
    exchange: String,
    connections: usize,
    sessions: usize,
    every: Duration,
    stop: Arc<AtomicBool>,
) -> (usize, u64, u64) {
    let mut p = ReliablePublisher::new(&amqp, &exchange);
    let progress = AtomicU64::new(0);
    let mut tick = tokio::time::interval(every);
    let mut round = 0;
    loop {
        tick.tick().await;
        let last = stop.load(Ordering::Relaxed);
        let msgs: Vec<Msg> = (0..connections).map(|c| heartbeat_msg(c, round, sessions)).collect();
        p.publish_all(&msgs, &progress).await;
        if last {
            break;
        }
        round += 1;
    }
    let republished = p.republished;
    p.close().await;
    (round, ((round + 1) * connections) as u64, republished)
}
