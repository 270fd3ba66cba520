//! A three-node RabbitMQ cluster on this machine (three private nodes with their own names, ports, distribution
//! ports and data, one epmd and one Erlang cookie, joined with `rabbitmqctl join_cluster`), quorum queues for the
//! commands and for four heartbeat shards, and a worker whose `amqp.url` lists the three nodes. During the standard
//! workload the node leading the queues is SIGKILLed; then nothing may be lost or applied twice, every event must be
//! there, and the worker must be back on a surviving node, answering new commands.
//!
//! The classic `<prefix>.dead-letter` queue lives on the node that declares it first, and a worker cannot
//! re-declare the topology while that node is down (README, Broker clusters): it is declared on the third node
//! first, so that the node killed here is not also the one holding it.

use std::path::Path;
use std::time::{Duration, Instant};

use agent_connection_manager::amqp::{self, BROKER_QUERY_TIMEOUT};
use agent_connection_manager::client::{reply_result, Client};
use agent_connection_manager::config::{QueueType, Settings};
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use serde_json::json;

use crate::count;
use crate::infra::{free_port, random_suffix, within, RabbitNode, TempDir};
use crate::lab::{close, Lab, SETUP_LIMIT};
use crate::standard::{run_standard, Fault, Standard};

const NODES: usize = 3;
const SHARDS: u32 = 4;
/// Longest wait for the worker to answer a new command after the kill (an election on a busy 2-core machine).
const RECOVERY_LIMIT: Duration = Duration::from_secs(180);

/// Starts three nodes sharing an epmd and a cookie, then joins the second and the third to the first.
fn start_cluster(base: &Path) -> Vec<RabbitNode> {
    let epmd = free_port();
    let cookie = format!("ACMFAULTS{}", random_suffix().to_uppercase());
    let mut nodes: Vec<RabbitNode> = (1..=NODES)
        .map(|i| RabbitNode::configure(&base.join(format!("rabbitmq-{i}")), &format!("acmc{i}"), epmd, Some(&cookie)))
        .collect();
    // The first starts epmd; the others start together after it.
    nodes[0].start();
    std::thread::scope(|s| {
        for n in nodes.iter_mut().skip(1) {
            s.spawn(move || n.start());
        }
    });
    let first = nodes[0].name.clone();
    for n in nodes.iter().skip(1) {
        n.ctl(&["stop_app"]);
        n.ctl(&["join_cluster", &first]);
        n.ctl(&["start_app"]);
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status = nodes[0].ctl(&["cluster_status", "--formatter", "json"]);
        let running = serde_json::from_str::<serde_json::Value>(&status)
            .ok()
            .and_then(|v| v["running_nodes"].as_array().map(Vec::len))
            .unwrap_or(0);
        if running == NODES {
            break;
        }
        assert!(Instant::now() < deadline, "the cluster did not have {NODES} running nodes within 120 s: {status}");
        std::thread::sleep(Duration::from_millis(500));
    }
    for n in &nodes {
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", n.port)).is_err() {
            assert!(Instant::now() < deadline, "node {} does not listen on {} after joining", n.name, n.port);
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    nodes
}

/// Quorum queues and their leaders (`name` → leader node), as `node` sees them.
fn leaders(node: &RabbitNode) -> Vec<(String, String)> {
    node.ctl(&["list_queues", "-q", "--no-table-headers", "name", "type", "leader"])
        .lines()
        .filter_map(|l| {
            let cols: Vec<&str> = l.split('\t').map(str::trim).collect();
            (cols.len() == 3 && cols[1] == "quorum").then(|| (cols[0].to_string(), cols[2].to_string()))
        })
        .collect()
}

/// The node to kill: the one leading the command queue (and, as the topology was declared through it, the heartbeat
/// shards).
pub struct Target {
    leader: String,
    /// Its place in `amqp.url` (0 = `lab.rabbit`).
    index: usize,
    led: usize,
    quorum_queues: usize,
}

/// Finds the [`Target`].
pub fn queue_leader(lab: &Lab) -> Target {
    let before = tokio::task::block_in_place(|| leaders(&lab.rabbit));
    let leader = before
        .iter()
        .find(|(q, _)| *q == lab.topology.command_queue)
        .map(|(_, l)| l.clone())
        .unwrap_or_else(|| panic!("no leader for {} in {before:?}", lab.topology.command_queue));
    let index = std::iter::once(&lab.rabbit)
        .chain(&lab.cluster)
        .position(|n| n.name == leader)
        .unwrap_or_else(|| panic!("the leader {leader} is none of the lab's nodes"));
    let led = before.iter().filter(|(_, l)| *l == leader).count();
    Target { leader, index, led, quorum_queues: before.len() }
}

/// The fault: SIGKILL the target node, then wait until the worker answers a new command through a surviving node.
/// Records what was killed and how long recovering took in the lab's notes.
pub async fn kill_and_recover(lab: &mut Lab, target: Target) {
    let Target { leader, index: killed_index, led, quorum_queues } = target;
    let killed_at = Instant::now();
    let killed_utc = chrono::Utc::now();
    eprintln!("faults: SIGKILL {leader} (node {}), leader of {led} of {quorum_queues} quorum queues", killed_index + 1);
    tokio::task::block_in_place(|| {
        if killed_index == 0 {
            lab.rabbit.kill9();
        } else {
            lab.cluster[killed_index - 1].kill9();
        }
    });

    // A new command answered: the worker consumes again, on a surviving node.
    let url = lab.env.amqp_url.clone();
    let mut last_error = String::new();
    let answered = loop {
        assert!(
            killed_at.elapsed() < RECOVERY_LIMIT,
            "no new command answered within {RECOVERY_LIMIT:?} of the kill; last error: {last_error}"
        );
        let attempt = async {
            let client = Client::connect(&url, crate::PREFIX).await.map_err(|e| e.to_string())?;
            let reply = client.request(&json!({"type": "stats.get"}), None, Duration::from_secs(10)).await;
            client.close().await;
            let reply = reply.map_err(|e| e.to_string())?;
            reply_result(&reply).map_err(|e| format!("{e:?}"))
        };
        match tokio::time::timeout(Duration::from_secs(30), attempt).await {
            Ok(Ok(_)) => break killed_at.elapsed(),
            Ok(Err(e)) => last_error = e,
            Err(_) => last_error = "no answer within 30 s".into(),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    lab.workers[0].wait_ready(RECOVERY_LIMIT).await;
    let ready = killed_at.elapsed();
    let log = std::fs::read_to_string(&lab.workers[0].log).unwrap_or_default();
    let last_connect = log.lines().rev().find(|l| l.contains("connected to the broker; topology declared"));
    let on_node = last_connect
        .and_then(|l| l.split("node=").nth(1))
        .and_then(|n| n.split_whitespace().next())
        .and_then(|n| n.parse::<usize>().ok());
    assert!(
        on_node.is_some_and(|n| n != killed_index + 1),
        "the worker is not connected to a surviving node; its last connection: {last_connect:?}"
    );
    // The worker's own log says when it was connected again (its timestamps are UTC, like `killed_utc`).
    let reconnected = last_connect
        .and_then(|l| l.split_whitespace().next())
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| (t.with_timezone(&chrono::Utc) - killed_utc).num_milliseconds() as f64 / 1000.0);
    let survivor = if killed_index == 0 { &lab.cluster[0] } else { &lab.rabbit };
    let after = tokio::task::block_in_place(|| leaders(survivor));
    let moved = after.iter().filter(|(_, l)| *l != leader).count();
    lab.fault_notes = format!(
        "; killed {leader} (node {} of {NODES}), leader of {led} of {} quorum queues; the worker connected to node {} \
         {:.1} s after the kill (its log), a new command answered after {:.1} s (behind the commands queued before \
         it), the worker ready after {:.1} s; quorum queues with a new leader: {moved}/{}",
        killed_index + 1,
        quorum_queues,
        on_node.unwrap_or_default(),
        reconnected.unwrap_or(f64::NAN),
        answered.as_secs_f64(),
        ready.as_secs_f64(),
        after.len()
    );
    eprintln!("faults: {}", lab.fault_notes.trim_start_matches("; "));
}

/// 8. Kill -9 the node leading the queues of a three-node cluster (quorum queues, four heartbeat shards) during the
///    standard workload (100,000 heartbeats and 10,000 commands at full count).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_node_leading_the_queues_sigkilled_loses_and_duplicates_nothing() {
    let name = "8. cluster: queue leader SIGKILLed";
    let started = Instant::now();
    let dir = TempDir::new("cluster");
    let nodes = tokio::task::block_in_place(|| start_cluster(dir.path()));
    // The classic dead-letter queue goes to the third node (see the module's description).
    let conn = amqp::connect(&nodes[2].url(), "acm faults setup").await.expect("third node");
    let ch = within("a channel", BROKER_QUERY_TIMEOUT, conn.create_channel()).await.expect("channel");
    let dead_letter = agent_connection_manager::amqp::Topology::new(crate::PREFIX).dead_letter;
    let declare = ch.queue_declare(
        dead_letter.as_str().into(),
        QueueDeclareOptions { durable: true, ..Default::default() },
        FieldTable::default(),
    );
    within("declaring the dead-letter queue", SETUP_LIMIT, declare).await.expect("dead-letter queue on the third node");
    close(&conn).await;

    let mut settings = Settings::default();
    settings.amqp.heartbeat_queue_type = QueueType::Quorum;
    settings.amqp.heartbeat_shards = SHARDS;
    let shards = SHARDS.to_string();
    let extra = [("ACM_AMQP__HEARTBEAT_QUEUE_TYPE", "quorum"), ("ACM_AMQP__HEARTBEAT_SHARDS", shards.as_str())];
    let mut lab = Lab::with_broker(dir, nodes, &extra, &settings).await;
    lab.spawn_worker().await;
    let w = Standard::new(count(2_000, 100_000), count(500, 10_000));
    run_standard(lab, name, w, Fault::KillQueueLeader, started).await;
}
