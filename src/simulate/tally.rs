//! What a simulated fleet saw: its own events counted by type (events of other agents on the same prefix are not
//! counted), the transitions that have no event of their own, a progress display, and the final JSON object.

use std::collections::{BTreeMap, HashSet};
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::events::EVENT_TYPES;

/// The event types of the state machines: every event type but the stale brake's `agent.sweeper.held`.
pub fn state_machine_event_types() -> impl Iterator<Item = &'static str> {
    EVENT_TYPES.iter().copied().filter(|t| *t != "agent.sweeper.held")
}

/// Counts of one fleet's events.
#[derive(Debug)]
pub struct Tally {
    fleet: String,
    counts: BTreeMap<String, u64>,
    closed_by_reason: BTreeMap<String, u64>,
    /// Sessions marked inactive and not heard from since.
    inactive: HashSet<String>,
    restored: u64,
    reactivated: u64,
    /// Heartbeats the fleet's agents sent (they have no event: the worker applies them silently).
    heartbeats: Arc<AtomicU64>,
}

impl Tally {
    /// Counts the events of agents whose `agent_id` starts with `fleet` (every agent of the fleet shares it).
    pub fn new(fleet: &str) -> Self {
        Self {
            fleet: fleet.to_string(),
            counts: BTreeMap::new(),
            closed_by_reason: BTreeMap::new(),
            inactive: HashSet::new(),
            restored: 0,
            reactivated: 0,
            heartbeats: Arc::default(),
        }
    }

    /// The counter the fleet's agents add each heartbeat they send to.
    pub fn heartbeats_sent(&self) -> Arc<AtomicU64> {
        self.heartbeats.clone()
    }

    /// Records one event body; returns `false` (and counts nothing) when it is not the fleet's.
    pub fn record(&mut self, event: &Value) -> bool {
        let Some(agent) = event["agent_id"].as_str() else { return false };
        if !agent.starts_with(&self.fleet) {
            return false;
        }
        let ty = event["event_type"].as_str().unwrap_or("unknown");
        *self.counts.entry(ty.to_string()).or_default() += 1;
        let session = event["session_id"].as_str().unwrap_or_default();
        match ty {
            "agent.session.inactive" => {
                self.inactive.insert(session.to_string());
            }
            "agent.connection.opened" if event["restored"] == Value::Bool(true) => self.restored += 1,
            "agent.connection.closed" => {
                let reason = event["reason"].as_str().unwrap_or("unknown").to_string();
                *self.closed_by_reason.entry(reason).or_default() += 1;
            }
            _ => {}
        }
        // Reactivation has no event of its own (docs/protocol.md, section 10): an event of the agent's own activity
        // (a connection opened or restored, closed by the agent, an acknowledgement) in a session marked inactive
        // shows that it is active again.
        let activity = matches!(ty, "agent.connection.opened" | "agent.instruction.acknowledged")
            || (ty == "agent.connection.closed" && event["reason"] == "client_disconnect");
        if activity && self.inactive.remove(session) {
            self.reactivated += 1;
        }
        true
    }

    /// How many events of `event_type` the fleet saw.
    pub fn count(&self, event_type: &str) -> u64 {
        self.counts.get(event_type).copied().unwrap_or(0)
    }

    /// All the fleet's events.
    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }

    /// The state-machine event types not seen yet.
    pub fn missing(&self) -> Vec<&'static str> {
        state_machine_event_types().filter(|t| self.count(t) == 0).collect()
    }

    /// One line of figures, for a progress display that is not a terminal.
    pub fn line(&self, elapsed: Duration) -> String {
        let [sessions, connections, instructions] = self.figures();
        format!("t={:>3}s events={:<5} {sessions} | {connections} | {instructions}", elapsed.as_secs(), self.total())
    }

    /// The figures as lines short enough for a terminal, for a display redrawn in place.
    pub fn block(&self, elapsed: Duration) -> Vec<String> {
        let [sessions, connections, instructions] = self.figures();
        vec![
            format!("{:>4}s  {} events of the fleet", elapsed.as_secs(), self.total()),
            format!("  {sessions}"),
            format!("  {connections}"),
            format!("  {instructions}"),
        ]
    }

    fn figures(&self) -> [String; 3] {
        let c = |t: &str| self.count(t);
        [
            format!(
                "sessions: created={} inactive={} reactivated={} closed={}",
                c("agent.session.created"),
                c("agent.session.inactive"),
                self.reactivated,
                c("agent.session.closed"),
            ),
            format!(
                "connections: opened={} heartbeats={} stale={} restored={} closed={}",
                c("agent.connection.opened"),
                self.heartbeats.load(Ordering::Relaxed),
                c("agent.connection.stale"),
                self.restored,
                c("agent.connection.closed"),
            ),
            format!(
                "instructions: created={} acked={} retry={} expired={} cancelled={}",
                c("agent.instruction.created"),
                c("agent.instruction.acknowledged"),
                c("agent.instruction.retry"),
                c("agent.instruction.expired"),
                c("agent.instruction.cancelled"),
            ),
        ]
    }

    /// The final figures: `events` has every state-machine event type (0 when not seen) and any other the fleet
    /// saw; `restored` and `reactivated` count the transitions the events show only indirectly, `heartbeats_sent`
    /// what the agents sent.
    pub fn to_json(&self) -> Value {
        let mut events: BTreeMap<String, u64> = state_machine_event_types().map(|t| (t.to_string(), 0)).collect();
        events.extend(self.counts.iter().map(|(k, v)| (k.clone(), *v)));
        json!({
            "events": events,
            "connections_closed_by_reason": self.closed_by_reason,
            "restored": self.restored,
            "reactivated": self.reactivated,
            "heartbeats_sent": self.heartbeats.load(Ordering::Relaxed),
        })
    }
}

/// The live display: on a terminal a block of short lines redrawn in place, otherwise one line a second.
#[derive(Debug)]
pub struct Progress {
    terminal: bool,
    start: Instant,
    next: Instant,
    /// Lines of the block drawn last (to move back over them).
    drawn: usize,
}

impl Progress {
    /// A display whose clock starts now; it draws on standard output.
    pub fn new() -> Self {
        let start = Instant::now();
        Self { terminal: std::io::stdout().is_terminal(), start, next: start + Duration::from_secs(1), drawn: 0 }
    }

    /// Shows the figures when a second has passed since the last time.
    pub fn tick(&mut self, tally: &Tally) {
        if Instant::now() < self.next {
            return;
        }
        while self.next <= Instant::now() {
            self.next += Duration::from_secs(1);
        }
        self.show(tally);
    }

    fn show(&mut self, tally: &Tally) {
        let elapsed = self.start.elapsed();
        let text = if self.terminal {
            // Back to the block's first line, then each line cleared and written again.
            let up = if self.drawn > 0 { format!("\x1b[{}A", self.drawn) } else { String::new() };
            let block = tally.block(elapsed);
            self.drawn = block.len();
            format!("{up}{}", block.iter().map(|l| format!("\r\x1b[2K{l}\n")).collect::<String>())
        } else {
            format!("{}\n", tally.line(elapsed))
        };
        let mut out = std::io::stdout().lock();
        // A reader that went away (`| head`) only ends the display, not the run.
        let _ = out.write_all(text.as_bytes()).and_then(|_| out.flush());
    }

    /// Shows the last figures.
    pub fn finish(&mut self, tally: &Tally) {
        self.show(tally);
    }
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::Tally;
    use serde_json::json;

    #[test]
    fn only_the_fleets_events_count_and_an_inactive_session_heard_from_again_is_reactivated() {
        let mut t = Tally::new("demo-");
        assert!(!t.record(&json!({"event_type": "agent.session.created", "agent_id": "other-1", "session_id": "s0"})));
        assert!(!t.record(&json!({"event_type": "agent.sweeper.held", "active": 3, "candidates": 2, "reason": "x"})));
        assert!(t.record(&json!({"event_type": "agent.session.inactive", "agent_id": "demo-2", "session_id": "s2"})));
        let restored = json!({"event_type": "agent.connection.opened", "agent_id": "demo-2", "session_id": "s2",
                              "restored": true});
        assert!(t.record(&restored));
        assert!(t.record(&restored)); // a second opening is no second reactivation
        let v = t.to_json();
        assert_eq!(v["events"]["agent.session.created"], 0);
        assert_eq!(v["events"]["agent.connection.opened"], 2);
        assert!(v["events"].get("agent.sweeper.held").is_none());
        assert_eq!((v["restored"].clone(), v["reactivated"].clone()), (json!(2), json!(1)));
        assert_eq!(t.total(), 3);
        t.heartbeats_sent().fetch_add(2, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(t.to_json()["heartbeats_sent"], 2);
        assert!(
            t.block(std::time::Duration::from_secs(7)).iter().all(|l| l.len() <= 80),
            "{:?}",
            t.block(std::time::Duration::ZERO)
        );
        assert!(t.missing().contains(&"agent.session.closed"));
    }
}
