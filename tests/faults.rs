//! The fault suite: kills, restarts, outages, replicas, poison storms and a backlog, injected on a
//! PostgreSQL cluster and a RabbitMQ node that each test starts itself (never the machine's shared services), with
//! the real binary as the worker and this process as the client. Each scenario drives a known, countable workload,
//! then compares the database and every event published with what was sent, and prints one row of the results table.
//!
//! Counts are small by default (the suite runs in a few minutes inside `cargo test`); the full counts run with
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
//!
//! Layout: `infra` starts the private PostgreSQL, RabbitMQ and worker processes; `publisher` is the reliable client;
//! `lab` puts them together for one scenario; `workload` builds the messages; `counting` compares what happened with
//! what was sent. The scenarios: `standard` (worker killed, broker restarted, database down), `expiry` (three
//! workers expiring instructions through their retries), `poison` (a poison storm), `backlog` (a backlog queued
//! before the worker starts), `blocked` (the broker blocks publishers: a memory alarm while the worker is busy),
//! `pgbouncer` (ten in-process workers through PgBouncer in transaction pooling mode, in front of the machine's
//! PostgreSQL and a database of the test's own, with the shared test helpers of `tests/common`),
//! `cluster` (the node leading the quorum queues of a three-node cluster is killed) and
//! `failover` (the primary of a synchronously replicated pair crashes and its standby is promoted; the worker's
//! `database.url` names both; its load in `failover_load`) and `liveness` (a fleet heartbeating through a paused
//! worker, a database outage and a partition; a greedy agent; agents' clocks ten minutes off),
//! `database.url` names both; its load in `failover_load`) `relay_takeover` (the relay lease holder is
//! SIGKILLed: events resume within 5 s, taken over by a second worker or reclaimed by the restarted one) and
//! `pgbouncer_undeclared` (the worker binary through PgBouncer in transaction mode with `database.pooler` left at
//! `none`: one warning, no error).

#[path = "faults/backlog.rs"]
mod backlog;
#[path = "faults/blocked.rs"]
mod blocked;
#[path = "faults/cluster.rs"]
mod cluster;
#[path = "common/mod.rs"]
mod common;
#[path = "faults/counting.rs"]
mod counting;
#[path = "faults/expiry.rs"]
mod expiry;
#[path = "faults/failover.rs"]
mod failover;
#[path = "faults/failover_load.rs"]
mod failover_load;
#[path = "faults/infra.rs"]
mod infra;
#[path = "faults/lab.rs"]
mod lab;
#[path = "faults/liveness.rs"]
mod liveness;
#[path = "faults/pgbouncer.rs"]
mod pgbouncer;
#[path = "faults/pgbouncer_undeclared.rs"]
mod pgbouncer_undeclared;
#[path = "faults/poison.rs"]
mod poison;
#[path = "faults/publisher.rs"]
mod publisher;
#[path = "faults/relay_takeover.rs"]
mod relay_takeover;
#[path = "faults/standard.rs"]
mod standard;
#[path = "faults/workload.rs"]
mod workload;

// `infra` runs commands and HTTP requests through `crate::bounded` and finds the programs it runs through
// `crate::programs` (the capacity bench, which has no `common`, includes both files itself).
use common::{bounded, programs};

use std::time::Duration;

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
