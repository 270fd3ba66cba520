//! Liveness under faults (issue 21): a paused worker, a database outage, a fleet cut off together, one greedy agent
//! and agents whose clocks are ten minutes off. Each scenario runs a fleet of agents heartbeating once a second from
//! this process (each at its own phase within the second, with `sent_at` from its own clock) against one worker with
//! a short stale window, and reads every close from a log a trigger keeps of each connection that became `closed`.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_connection_manager::amqp::heartbeat_properties;
use agent_connection_manager::client::Client;
use chrono::Utc;
use serde_json::json;

use crate::infra::eventually;
use crate::lab::{count_of, db, query_i64, Lab, QUERY_LIMIT};
use crate::{count, PREFIX};

/// The stale window of these scenarios, its sweeper interval and the longest brake hold.
const STALE: u64 = 4;
const INTERVAL: u64 = 1;
const MAX_HOLD: u64 = 8;

/// A fleet of agents `a-<i>`, each with session `s-<i>` and connection `c-<i>`, heartbeating once a second.
struct Fleet {
    alive: Arc<Vec<AtomicBool>>,
    /// Each agent's clock offset in seconds.
    skew: Arc<Vec<AtomicI64>>,
    task: tokio::task::JoinHandle<()>,
}

impl Fleet {
    async fn start(lab: &Lab, n: usize) -> Self {
        let client = db(&lab.db_url()).await.expect("database");
        let (ids, agents): (Vec<String>, Vec<String>) = (0..n).map(|i| (format!("s-{i}"), format!("a-{i}"))).unzip();
        client
            .execute(
                "INSERT INTO agent_session (session_id, agent_id, name) SELECT s, a, s FROM unnest($1::text[], $2::text[]) AS v(s, a)",
                &[&ids, &agents],
            )
            .await
            .expect("sessions");
        // Every change of a connection to `closed`, with the database time it happened.
        client
            .batch_execute(
                "CREATE TABLE closed_log (connection_id text, reason text, at timestamptz DEFAULT clock_timestamp());
                 CREATE FUNCTION log_close() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
                   IF NEW.status = 'closed' AND OLD.status = 'active' THEN
                     INSERT INTO closed_log (connection_id, reason) VALUES (NEW.connection_id, NEW.close_reason::text);
                   END IF; RETURN NEW; END $$;
                 CREATE TRIGGER log_close AFTER UPDATE ON agent_connection FOR EACH ROW EXECUTE FUNCTION log_close();",
            )
            .await
            .expect("close log");
        let alive: Arc<Vec<AtomicBool>> = Arc::new((0..n).map(|_| AtomicBool::new(true)).collect());
        let skew: Arc<Vec<AtomicI64>> = Arc::new((0..n).map(|_| AtomicI64::new(0)).collect());
        let publisher = Client::connect(&lab.env.amqp_url, PREFIX).await.expect("fleet client");
        let (a, k) = (alive.clone(), skew.clone());
        let task = tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            for tick in 0u64.. {
                for i in 0..n {
                    // Agent i beats at i/n of each second.
                    let at = start + Duration::from_millis(tick * 1000 + (i as u64 * 1000) / n as u64);
                    tokio::time::sleep_until(at).await;
                    if !a[i].load(Ordering::Relaxed) {
                        continue;
                    }
                    let sent = Utc::now() + chrono::Duration::seconds(k[i].load(Ordering::Relaxed));
                    let body = json!({"type": "agent.heartbeat", "agent_id": format!("a-{i}"), "session_id": format!("s-{i}"),
                                      "connection_id": format!("c-{i}"), "sent_at": sent.to_rfc3339()});
                    let props = heartbeat_properties(&format!("a-{i}"));
                    // A heartbeat the broker does not confirm is lost, as an agent's would be.
                    let _ = publisher.publish_raw("agent.heartbeat", body.to_string().as_bytes(), props).await;
                }
            }
        });
        let fleet = Self { alive, skew, task };
        let url = lab.db_url();
        eventually("the fleet's connections to open", Duration::from_secs(60), || {
            let url = url.clone();
            async move {
                (query_i64(&url, "SELECT count(*) FROM agent_connection WHERE status = 'active'").await? == n as i64)
                    .then_some(())
            }
        })
        .await;
        fleet
    }

    fn set_alive(&self, agents: std::ops::Range<usize>, alive: bool) {
        for i in agents {
            self.alive[i].store(alive, Ordering::Relaxed);
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn env(extra: &[(&'static str, String)]) -> Vec<(&'static str, String)> {
    let mut e = vec![
        ("ACM_SWEEPER__CONNECTION_STALE_AFTER_SECS", STALE.to_string()),
        ("ACM_SWEEPER__CHECK_INTERVAL_SECS", INTERVAL.to_string()),
        ("ACM_SWEEPER__STALE_BRAKE_MAX_HOLD_SECS", MAX_HOLD.to_string()),
    ];
    e.extend(extra.iter().cloned());
    e
}

async fn lab(name: &str, extra: &[(&'static str, String)]) -> Lab {
    let e = env(extra);
    let pairs: Vec<(&str, &str)> = e.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut lab = Lab::new(name, &pairs).await;
    lab.spawn_worker().await;
    lab
}

/// Connections of agents `agents` closed so far, and the latest close's database time in seconds since the epoch.
async fn closes(url: &str, agents: std::ops::Range<usize>) -> (u64, f64) {
    let client = db(url).await.expect("database");
    let ids: Vec<String> = agents.map(|i| format!("c-{i}")).collect();
    let row = tokio::time::timeout(
        QUERY_LIMIT,
        client.query_one(
            "SELECT count(*), coalesce(extract(epoch FROM max(at)), 0)::float8 FROM closed_log WHERE connection_id = ANY($1)",
            &[&ids],
        ),
    )
    .await
    .expect("query in time")
    .expect("closes");
    (row.get::<_, i64>(0) as u64, row.get(1))
}

fn now_epoch() -> f64 {
    Utc::now().timestamp_micros() as f64 / 1e6
}

fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill").args([sig, &pid.to_string()]).status().expect("kill").success();
    assert!(ok, "kill {sig} {pid}");
}

/// Waits `d` while the fleet keeps beating.
async fn run_for(d: Duration) {
    tokio::time::sleep(d).await;
}

/// A worker stopped (SIGSTOP) for three stale windows while 50 agents heartbeat and 5 of them die during the pause:
/// the 5 are closed within two sweeper intervals of the resume, none of the 45.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_worker_closes_the_agents_that_died_and_none_that_live() {
    let n = count(50, 50);
    let lab = lab("l1", &[]).await;
    let url = lab.db_url();
    let fleet = Fleet::start(&lab, n).await;
    run_for(Duration::from_secs(STALE + 2)).await;
    let pid = lab.workers[0].pid;
    signal(pid, "-STOP");
    run_for(Duration::from_secs(STALE)).await;
    fleet.set_alive(0..5, false);
    run_for(Duration::from_secs(2 * STALE)).await;
    signal(pid, "-CONT");
    let resumed = now_epoch();
    let t = Instant::now();
    eventually("the 5 dead agents to be closed", Duration::from_secs(60), || {
        let url = url.clone();
        async move { (closes(&url, 0..5).await.0 == 5).then_some(()) }
    })
    .await;
    let (_, last) = closes(&url, 0..5).await;
    let after = last - resumed;
    let seen = t.elapsed().as_secs_f64();
    // Three more stale windows with the 45 beating: none of them is ever closed.
    run_for(Duration::from_secs(3 * STALE)).await;
    let (live_closed, _) = closes(&url, 5..n).await;
    println!(
        "liveness 1: SIGSTOP {} s (stale {STALE} s, sweeper {INTERVAL} s), 5 of {n} died in the pause: closed {after:.1} s \
         after the resume (seen by the test {seen:.1} s after it), live agents closed {live_closed}",
        3 * STALE
    );
    assert!(after <= 2.0 * INTERVAL as f64, "the dead were closed {after:.1} s after the resume");
    assert_eq!(live_closed, 0, "live agents were closed after the pause");
    drop(fleet);
}

/// The database down for three stale windows while 50 agents heartbeat: none is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_outage_closes_no_live_agent() {
    let n = count(50, 50);
    let mut lab = lab("l2", &[]).await;
    let url = lab.db_url();
    let fleet = Fleet::start(&lab, n).await;
    run_for(Duration::from_secs(STALE + 2)).await;
    tokio::task::block_in_place(|| lab.pg.stop());
    run_for(Duration::from_secs(3 * STALE)).await;
    tokio::task::block_in_place(|| lab.pg.start());
    run_for(Duration::from_secs(3 * STALE)).await;
    let (closed, _) = closes(&url, 0..n).await;
    let active = query_i64(&url, "SELECT count(*) FROM agent_connection WHERE status = 'active'").await;
    println!(
        "liveness 2: database down {} s (stale {STALE} s): live agents closed {closed}, active {active:?}",
        3 * STALE
    );
    assert_eq!(closed, 0, "live agents were closed after the database outage");
    drop(fleet);
}

/// 50 agents cut off together (their beats spread over the second): none is closed before the brake holds, the hold
/// lasts its maximum, then all are closed, and all are restored when they return.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fleet_cut_off_together_is_held_as_one_then_restored() {
    let n = count(50, 50);
    let lab = lab("l3", &[]).await;
    let url = lab.db_url();
    let fleet = Fleet::start(&lab, n).await;
    run_for(Duration::from_secs(STALE + 2)).await;
    fleet.set_alive(0..n, false);
    let silenced = now_epoch();
    let held_since = eventually("the brake to hold", Duration::from_secs(60), || {
        let url = url.clone();
        async move {
            let client = db(&url).await?;
            let row = client
                .query_one(
                    "SELECT extract(epoch FROM held_since)::float8 FROM sweeper_state WHERE task = 'stale_connections'",
                    &[],
                )
                .await
                .ok()?;
            row.get::<_, Option<f64>>(0)
        }
    })
    .await;
    let (closed_at_hold, _) = closes(&url, 0..n).await;
    eventually("the verdict to stand after the longest hold", Duration::from_secs(MAX_HOLD + 30), || {
        let url = url.clone();
        async move { (closes(&url, 0..n).await.0 == n as u64).then_some(()) }
    })
    .await;
    let client = db(&url).await.expect("database");
    let first_close: f64 = client
        .query_one("SELECT extract(epoch FROM min(at))::float8 FROM closed_log", &[])
        .await
        .expect("first close")
        .get(0);
    let held_for = first_close - held_since;
    fleet.set_alive(0..n, true);
    let back = Instant::now();
    eventually("every connection to be restored", Duration::from_secs(60), || {
        let url = url.clone();
        async move {
            (query_i64(&url, "SELECT count(*) FROM agent_connection WHERE status = 'active'").await? == n as i64)
                .then_some(())
        }
    })
    .await;
    println!(
        "liveness 3: {n} silenced together (stale {STALE} s, max hold {MAX_HOLD} s): hold began {:.1} s after the \
         silence with {closed_at_hold} closed, first close {held_for:.1} s into the hold, all restored {:.1} s after they returned",
        held_since - silenced,
        back.elapsed().as_secs_f64()
    );
    // The hold is one WARN line when it begins, not an ERROR every cycle. (lapin's own ERROR line for the
    // heartbeat queue the lab declared with another TTL, which the worker then uses as it is, is not the brake's.)
    let log = std::fs::read_to_string(&lab.workers[0].log).unwrap_or_default();
    let holds = log.lines().filter(|l| l.contains("stale brake holds")).count();
    let errors: Vec<&str> =
        log.lines().filter(|l| l.contains("ERROR") && (l.contains("brake") || l.contains("sweeper"))).collect();
    println!("liveness 3: hold log lines {holds}, ERROR lines {}", errors.len());
    assert_eq!((holds, errors.len()), (1, 0), "the hold is logged once at WARN and nothing at ERROR: {errors:?}");
    assert_eq!(closed_at_hold, 0, "members of the group were closed before the brake held");
    assert!(held_for >= MAX_HOLD as f64 - 0.5, "closed {held_for:.1} s into the hold, before its maximum");
    drop(fleet);
}

/// One agent trying to open 2,000 connections (100,000 with `ACM_FAULTS_FULL=1`) against
/// `limits.max_connections_per_agent` = 100: 100 open, the rest dead-lettered. The stale window is the lab's hour
/// here: the agent's connections are never heartbeaten again, and were they closed as stale, the room they left would
/// let it open more (the limit bounds what is open at once, not what is ever opened).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_greedy_agent_is_held_to_its_connection_limit() {
    let tries = count(2_000, 100_000);
    let lab = lab(
        "l4",
        &[
            ("ACM_LIMITS__MAX_CONNECTIONS_PER_AGENT", "100".into()),
            ("ACM_SWEEPER__CONNECTION_STALE_AFTER_SECS", "3600".into()),
        ],
    )
    .await;
    let url = lab.db_url();
    let fleet = Fleet::start(&lab, 1).await;
    let greedy = Client::connect(&lab.env.amqp_url, PREFIX).await.expect("client");
    let t = Instant::now();
    for k in 0..tries {
        let body = json!({"type": "agent.heartbeat", "agent_id": "a-0", "session_id": "s-0", "connection_id": format!("g-{k}")});
        greedy
            .publish_raw("agent.heartbeat", body.to_string().as_bytes(), heartbeat_properties("a-0"))
            .await
            .expect("publish");
    }
    let dead_letter = format!("{PREFIX}.dead-letter");
    let want = (tries - 99) as u32; // the fleet's own connection is one of the 100
    eventually("every refused heartbeat to be dead-lettered", Duration::from_secs(600), || async {
        (lab.depth(&dead_letter).await? >= want).then_some(())
    })
    .await;
    let client = db(&url).await.expect("database");
    let active =
        count_of(&client, "SELECT count(*) FROM agent_connection WHERE agent_id = 'a-0' AND status = 'active'").await;
    let (closed, _) = closes(&url, 0..1).await;
    println!(
        "liveness 4: one agent tried {tries} connections (limit 100): {active} active, {} dead-lettered, {:.1} s",
        lab.depth(&dead_letter).await.unwrap_or(0),
        t.elapsed().as_secs_f64()
    );
    assert_eq!(active, 100);
    assert_eq!(closed, 0, "the agent's own connection was closed");
    drop(fleet);
}

/// An agent whose clock is 10 minutes fast and one 10 minutes slow: neither is closed while it beats, and both are
/// closed within a stale window and two sweeper intervals once they stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agent_clocks_ten_minutes_off_change_no_verdict() {
    let lab = lab("l5", &[]).await;
    let url = lab.db_url();
    let fleet = Fleet::start(&lab, 3).await;
    fleet.skew[0].store(600, Ordering::Relaxed);
    fleet.skew[1].store(-600, Ordering::Relaxed);
    run_for(Duration::from_secs(3 * STALE)).await;
    let (kept, _) = closes(&url, 0..3).await;
    fleet.set_alive(0..2, false);
    let stopped = now_epoch();
    eventually("both skewed agents to be closed", Duration::from_secs(60), || {
        let url = url.clone();
        async move { (closes(&url, 0..2).await.0 == 2).then_some(()) }
    })
    .await;
    let (_, last) = closes(&url, 0..2).await;
    let (third, _) = closes(&url, 2..3).await;
    println!(
        "liveness 5: clocks +600 s and -600 s: closed while beating {kept}, closed {:.1} s after they stopped (stale {STALE} s)",
        last - stopped
    );
    assert_eq!(kept, 0, "a skewed agent was closed while it beat");
    assert!(last - stopped <= (STALE + 2 * INTERVAL) as f64 + 1.0, "a skewed agent was kept alive");
    assert_eq!(third, 0);
    drop(fleet);
}
