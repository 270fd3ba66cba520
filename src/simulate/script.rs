//! The demo's fleet: five roles, each playing its part of the state machines on a 20-second cycle, timed against
//! the demo worker's scaled settings ([`super::demo`]): stale after 3 s without a heartbeat, inactive after 9 s
//! without activity, instructions with a 2 s deadline and one retry 2 s later, a sweep every second.
//!
//! | role | does | shows |
//! |---|---|---|
//! | steady | `connection.open`, a heartbeat a second, acknowledges every instruction | opened, heartbeat, acknowledged |
//! | flaky | opens its connection by heartbeating, quiet from second 5 to 10 of each cycle, acknowledges retries only | opened by a heartbeat, stale, restored, retry, acknowledged |
//! | sleepy | `connection.open`, quiet from second 2 to 16, never acknowledges | stale, inactive, reactivated (by its restored connection), retry, expired |
//! | leaving | `connection.open`, closes it at second 8 and opens a new one at second 11 | closed (`client_disconnect`) |
//! | ignoring | opens its connection by heartbeating, never acknowledges; an instruction without a deadline is open when its session closes | retry, expired, cancelled |
//!
//! Closing the sessions at the end closes the connections still open (`session_closed`), cancels the open
//! instructions and closes the sessions.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::task::JoinSet;

use super::{Member, REPLY_WITHIN};
use crate::client::{reply_result, Client};
use crate::error::{Error, Result};

/// Length of one cycle of the story; the quiet spells below are seconds of it.
pub const CYCLE_SECS: u64 = 20;
/// Seconds between the backend's instructions (to the agents in turn).
const INSTRUCTION_EVERY: Duration = Duration::from_millis(500);
/// Deadline of the backend's instructions, in seconds (one retry with the worker's 2 s retry window, then expired).
const INSTRUCTION_TTL_SECS: u64 = 2;

/// What an agent of the demo does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Always there; acknowledges everything.
    Steady,
    /// Misses a few heartbeats each cycle (goes stale, comes back restored); acknowledges retries only.
    Flaky,
    /// Silent long enough to go stale and inactive each cycle, then back; never acknowledges.
    Sleepy,
    /// Disconnects and reconnects each cycle; acknowledges everything.
    Leaving,
    /// Always there; never acknowledges.
    Ignoring,
}

/// Every role, in the order agents take them (agent `i` has role `i % 5`).
pub const ROLES: [Role; 5] = [Role::Steady, Role::Flaky, Role::Sleepy, Role::Leaving, Role::Ignoring];

impl Role {
    /// The role of agent `i`.
    pub fn of(i: usize) -> Self {
        ROLES[i % ROLES.len()]
    }

    /// The seconds of a cycle during which the agent sends no heartbeat: its last one comes in the second before.
    fn quiet(self) -> std::ops::Range<u64> {
        match self {
            Role::Flaky => 5..10,
            Role::Sleepy => 2..16,
            Role::Leaving => 8..11,
            Role::Steady | Role::Ignoring => 0..0,
        }
    }

    /// Whether it opens its connection with `connection.open` (otherwise its first heartbeat opens it).
    fn opens(self) -> bool {
        matches!(self, Role::Steady | Role::Sleepy | Role::Leaving)
    }

    /// Whether it acknowledges an instruction offered for the `retry_count`-th time.
    pub fn acks(self, retry_count: i64) -> bool {
        match self {
            Role::Steady | Role::Leaving => true,
            Role::Flaky => retry_count > 0,
            Role::Sleepy | Role::Ignoring => false,
        }
    }
}

/// The role of an agent of the fleet named `fleet` (its id is the fleet's name and its index).
pub fn role_of(fleet: &str, agent_id: &str) -> Option<Role> {
    agent_id.strip_prefix(fleet).and_then(|i| i.parse().ok()).map(Role::of)
}

/// Starts the fleet's agents and the backend; they play until `end`.
pub fn start(
    client: &Arc<Client>,
    members: &[Member],
    start: Instant,
    end: Instant,
    heartbeats: &Arc<AtomicU64>,
) -> JoinSet<Result<()>> {
    let mut tasks = JoinSet::new();
    for (i, m) in members.iter().enumerate() {
        let sent = heartbeats.clone();
        tasks.spawn(agent(client.clone(), m.clone(), Role::of(i), (start, end), sent));
    }
    tasks.spawn(backend(client.clone(), members.to_vec(), end));
    tasks
}

/// One agent: a heartbeat at each second of the cycle outside its quiet spell; `connection.open` at the start (and,
/// for a leaving agent, after each disconnection with a new connection id), `connection.close` as its spell starts.
async fn agent(
    client: Arc<Client>,
    m: Member,
    role: Role,
    (start, end): (Instant, Instant),
    sent: Arc<AtomicU64>,
) -> Result<()> {
    let mut generation = 0;
    let connection = |generation: u32| format!("{}-c{generation}", m.agent_id);
    if role.opens() {
        open(&client, &m, &connection(generation)).await?;
    }
    let mut second = 0u64;
    let mut ticks = tokio::time::interval_at(start.into(), Duration::from_secs(1));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if Instant::now() >= end {
            return Ok(());
        }
        let phase = second % CYCLE_SECS;
        let quiet = role.quiet();
        if role == Role::Leaving && phase == quiet.start {
            let close =
                json!({"type": "connection.close", "agent_id": m.agent_id, "connection_id": connection(generation)});
            expect_ok(&client, close).await?;
        }
        if role == Role::Leaving && phase == quiet.end {
            generation += 1;
            open(&client, &m, &connection(generation)).await?;
        }
        if !quiet.contains(&phase) {
            client.heartbeat(&m.agent_id, &m.session_id, &connection(generation)).await?;
            sent.fetch_add(1, Ordering::Relaxed);
        }
        second += 1;
    }
}

async fn open(client: &Client, m: &Member, connection_id: &str) -> Result<()> {
    let open = json!({"type": "connection.open", "agent_id": m.agent_id, "session_id": m.session_id,
                      "connection_id": connection_id});
    expect_ok(client, open).await
}

/// Sends a command and fails unless the worker accepted it.
async fn expect_ok(client: &Client, body: serde_json::Value) -> Result<()> {
    let reply = client.request(&body, None, REPLY_WITHIN).await?;
    reply_result(&reply).map(|_| ()).map_err(|e| Error::Reply(format!("{}: {}: {}", body["type"], e.code, e.message)))
}

/// The backend: an instruction every half second to the agents in turn, each with a 2 s deadline and one retry.
async fn backend(client: Arc<Client>, members: Vec<Member>, end: Instant) -> Result<()> {
    let mut seq = 0i64;
    let mut ticks = tokio::time::interval(INSTRUCTION_EVERY);
    loop {
        ticks.tick().await;
        if Instant::now() >= end {
            return Ok(());
        }
        let m = &members[seq as usize % members.len()];
        seq += 1;
        let create = json!({
            "type": "instruction.create", "session_id": m.session_id, "agent_id": m.agent_id,
            "instruction_type": "demo.acquire", "payload": {"step": seq}, "sequence_number": seq,
            "ttl_seconds": INSTRUCTION_TTL_SECS, "max_retries": 1,
        });
        client.send(&create, Some(&uuid::Uuid::new_v4().to_string())).await?;
    }
}

/// Before the sessions close: an instruction without a deadline to each agent that never acknowledges, so that
/// closing its session has an open instruction to cancel.
pub async fn leave_open_instructions(client: &Client, fleet: &str, members: &[Member]) -> Result<()> {
    for m in members.iter().filter(|m| role_of(fleet, &m.agent_id) == Some(Role::Ignoring)) {
        let create = json!({
            "type": "instruction.create", "session_id": m.session_id, "agent_id": m.agent_id,
            "instruction_type": "demo.acquire", "payload": {"last": true}, "expires_at": null,
        });
        expect_ok(client, create).await?;
    }
    Ok(())
}
