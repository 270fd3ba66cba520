//! The standard workload (sessions, then instructions, then acks of the first instructions, and concurrently, once
//! the sessions exist, heartbeats in rounds over many connections) run under a worker kill, a broker restart or a
//! database outage.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_connection_manager::amqp::Topology;

use crate::counting::{
    drain_dead_letters, drain_events, key_acked, key_created, key_opened, key_session, left_in_queues, wait_quiet, Row,
};
use crate::infra::{eventually, poll_until, within};
use crate::lab::{count_of, db, query_i64, wait_count, Lab};
use crate::publisher::{Msg, ReliablePublisher};
use crate::workload::{ack_msg, heartbeat_msg, instruction_msg, session_msg};
use crate::{count, settle_timeout, PREFIX};

#[derive(Clone, Copy)]
pub struct Standard {
    sessions: usize,
    creates: usize,
    acks: usize,
    connections: usize,
    rounds: usize,
}

impl Standard {
    pub fn new(heartbeats: usize, commands: usize) -> Self {
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
pub enum Fault {
    /// SIGKILL the worker at 20 %, 45 % and 70 % of the workload, restarting it each time.
    KillWorker,
    /// Stop the RabbitMQ node at 40 % and start it again.
    RestartBroker,
    /// Stop PostgreSQL at 40 % for this long, then start it.
    StopPostgres(Duration),
    /// SIGKILL the RabbitMQ node leading the queues of a cluster at 40 % (see `cluster.rs`).
    KillQueueLeader,
}

/// Publishes a standard workload from two client tasks (commands and heartbeats) while `fault` is injected.
/// Returns how many publications the client had to repeat.
async fn drive_standard(lab: &mut Lab, w: Standard, fault: Fault) -> u64 {
    // Asked before publishing starts, so that `rabbitmqctl`'s seconds do not delay the kill past the workload.
    let leader = matches!(fault, Fault::KillQueueLeader).then(|| crate::cluster::queue_leader(lab));
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
        Fault::KillQueueLeader => {
            reached(at(0.4)).await;
            eprintln!("faults: killing the queue leader at {} messages published", progress.load(Ordering::Relaxed));
            crate::cluster::kill_and_recover(lab, leader.expect("asked above")).await;
        }
    }
    // Every wait inside the client tasks is bounded; so is waiting for them, in case one of those bounds is missed.
    let republished_cmd = within("the command client", settle_timeout(), commands).await.expect("command client");
    let republished_hb = within("the heartbeat client", settle_timeout(), heartbeats).await.expect("heartbeat client");
    republished_cmd + republished_hb
}

async fn standard_scenario(name: &str, fault: Fault) {
    let w = Standard::new(count(4_000, 100_000), count(1_000, 10_000));
    let started = Instant::now();
    let mut lab = Lab::new(name, &[]).await;
    lab.spawn_worker().await;
    run_standard(lab, name, w, fault, started).await;
}

/// Drives the standard workload `w` on a lab whose workers run, injecting `fault`, then counts, reports and asserts.
pub async fn run_standard(mut lab: Lab, name: &str, w: Standard, fault: Fault, started: Instant) {
    let republished = drive_standard(&mut lab, w, fault).await;

    let url = lab.db_url();
    let last = w.rounds - 1;
    let final_round = format!("SELECT count(*) FROM agent_connection WHERE (client_info->>'round')::int = {last}");
    let t = settle_timeout();
    // A bounded wait: on a timeout the row below says what is missing, then the test fails.
    let settled = poll_until(t, Duration::from_millis(500), || {
        let (url, final_round) = (url.clone(), final_round.clone());
        async move {
            let acked = query_i64(&url, "SELECT count(*) FROM agent_instruction WHERE status = 'acknowledged'").await?;
            let hb = query_i64(&url, &final_round).await?;
            (acked == w.acks as i64 && hb == w.connections as i64).then_some(())
        }
    })
    .await
    .is_some();
    wait_quiet(&lab).await;
    lab.stop_workers().await;
    let left = left_in_queues(&lab).await;

    let client = db(&url).await.expect("database");
    let sessions = count_of(&client, "SELECT count(*) FROM agent_session WHERE session_id LIKE 's-%'").await;
    let instructions = count_of(&client, "SELECT count(*) FROM agent_instruction").await;
    let acked = count_of(&client, "SELECT count(*) FROM agent_instruction WHERE status = 'acknowledged'").await;
    let ack_rows = count_of(&client, "SELECT count(*) FROM agent_instruction_acknowledgement").await;
    let ack_distinct =
        count_of(&client, "SELECT count(DISTINCT instruction_id) FROM agent_instruction_acknowledgement").await;
    let connections = count_of(&client, "SELECT count(*) FROM agent_connection").await;
    let final_hb = count_of(&client, &final_round).await;
    let processed = count_of(&client, "SELECT count(*) FROM processed_message").await;

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
         connections {connections} (final round applied on {final_hb}/{}), idempotency records {processed}{}",
        w.sessions, w.creates, w.acks, w.connections, lab.fault_notes
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
    assert!(settled, "{name}: the acknowledgements and the final heartbeat round were not applied within {t:?}");
}

/// 1. SIGKILL the worker three times during the workload (100,000 heartbeats and 10,000 commands at full count),
///    restarting it each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn worker_sigkilled_three_times_loses_and_duplicates_nothing() {
    standard_scenario("1. worker SIGKILLed 3x", Fault::KillWorker).await;
}

/// 2. Restart RabbitMQ (stop the node, start it again) during the same workload.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rabbitmq_restart_loses_and_duplicates_nothing() {
    standard_scenario("2. RabbitMQ restarted", Fault::RestartBroker).await;
}

/// 3. Stop PostgreSQL for 30 seconds during the workload, then start it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_down_30s_loses_and_duplicates_nothing() {
    standard_scenario("3. PostgreSQL down 30 s", Fault::StopPostgres(Duration::from_secs(30))).await;
}
