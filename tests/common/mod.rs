//! Test helpers: each test gets its own database (random name, migrations applied) and its own AMQP prefix, talks
//! to the real PostgreSQL and RabbitMQ, and removes both at the end.
#![allow(dead_code)]

#[path = "bounded.rs"]
pub mod bounded;
#[path = "broker_user.rs"]
pub mod broker_user;
#[path = "programs.rs"]
pub mod programs;
#[allow(unused_imports)] // each test binary uses some of them
pub use bounded::{http_get, output_within};
#[allow(unused_imports)]
pub use programs::require_program;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_connection_manager::amqp::Topology;
use agent_connection_manager::client::{reply_result, Client, Subscription};
use agent_connection_manager::config::Settings;
use agent_connection_manager::sweeper::{BacklogProbe, SweepReport};
use agent_connection_manager::{db, AgentConnectionManager};
use serde_json::{json, Value};
use tokio_postgres::NoTls;

/// Base URL of the test PostgreSQL server (a database name is appended).
pub fn pg_base() -> String {
    std::env::var("ACM_TEST_PG_BASE").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// The test broker.
pub fn amqp_url() -> String {
    std::env::var("ACM_TEST_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A random lowercase suffix.
pub fn random_suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_string()
}

/// Settings for an isolated test: own database, own prefix, no HTTP, a sweeper that runs only at start.
pub fn test_settings() -> Settings {
    let suffix = random_suffix();
    let mut s = Settings::default();
    s.database.url = format!("{}/acm_test_{suffix}", pg_base());
    s.database.pool_size = (s.worker_connections()).try_into().unwrap();
    s.amqp.url = amqp_url();
    s.amqp.prefix = format!("acm-test-{suffix}");
    s.http.listen = String::new();
    s.sweeper.check_interval_secs = 3600.try_into().unwrap();
    s.outbox.poll_interval_ms = 200.try_into().unwrap();
    s
}

/// Polls `f` until it returns `Some`, for at most `timeout`; panics with `what` otherwise.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        // Each attempt is bounded by the time left too, so a probe that never answers cannot outlive the deadline.
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(50));
        if let Ok(Some(v)) = tokio::time::timeout(left, f()).await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One isolated worker with a client.
pub struct TestApp {
    pub settings: Settings,
    pub manager: Arc<AgentConnectionManager>,
    pub client: Client,
    pub events: Subscription,
    pub db: tokio_postgres::Client,
    /// Every event this test read from `events` so far (published events are deleted from the outbox, so this is
    /// where a test counts them).
    pub seen: Vec<Value>,
    guard: CleanupGuard,
}

/// Removes a test's database and broker objects even when the test fails before `cleanup`.
pub struct CleanupGuard {
    settings: Option<Settings>,
}

impl CleanupGuard {
    pub fn new(settings: &Settings) -> Self {
        Self { settings: Some(settings.clone()) }
    }

    fn disarm(&mut self) {
        self.settings = None;
    }
}

impl Drop for CleanupGuard {
    fn drop(&mut self) {
        if let Some(settings) = self.settings.take() {
            let _ = std::thread::spawn(move || {
                if let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    rt.block_on(async {
                        let _ = tokio::time::timeout(Duration::from_secs(10), cleanup(&settings)).await;
                    });
                }
            })
            .join();
        }
    }
}

impl TestApp {
    /// A started worker with default test settings.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// A started worker with adjusted settings.
    pub async fn start_with(adjust: impl FnOnce(&mut Settings)) -> Self {
        let app = Self::unstarted_with(adjust).await;
        app.manager.start().await.expect("worker starts");
        eventually("the worker's consumers to run", Duration::from_secs(20), || async {
            app.manager.health().consumers_running.load(std::sync::atomic::Ordering::Relaxed).then_some(())
        })
        .await;
        app
    }

    /// Database migrated, topology declared, events subscribed, worker not started.
    pub async fn unstarted_with(adjust: impl FnOnce(&mut Settings)) -> Self {
        let mut settings = test_settings();
        adjust(&mut settings);
        db::migrate(&settings.database).await.expect("migrations apply");
        let manager = Arc::new(AgentConnectionManager::new(settings.clone()).expect("manager"));
        let client = Client::connect(&settings.amqp.url, &settings.amqp.prefix).await.expect("client connects");
        let (conn, _) = amqp_channel(&settings).await;
        Topology::for_settings(&settings).declare(&conn, &settings).await.expect("topology declares");
        let _ = conn.close(200, "done".into()).await;
        let events = client.subscribe("#").await.expect("subscribe to events");
        let db = db::connect(&settings.database, None).await.expect("database connects");
        let guard = CleanupGuard::new(&settings);
        Self { settings, manager, client, events, db, seen: Vec::new(), guard }
    }

    pub fn topology(&self) -> Topology {
        Topology::for_settings(&self.settings)
    }

    /// Sends a command and returns its reply.
    pub async fn request(&self, body: Value) -> Value {
        self.client.request(&body, None, Duration::from_secs(20)).await.expect("a reply")
    }

    /// Sends a command and returns its `result`, failing the test on an error reply.
    pub async fn ok(&self, body: Value) -> Value {
        let reply = self.request(body.clone()).await;
        reply_result(&reply).unwrap_or_else(|e| panic!("{body} was refused: {e:?}"))
    }

    /// Sends a command and returns its error code.
    pub async fn refused(&self, body: Value) -> String {
        let reply = self.request(body.clone()).await;
        match reply_result(&reply) {
            Ok(r) => panic!("{body} was accepted: {r}"),
            Err(e) => e.code,
        }
    }

    /// Creates a session for `agent` and returns its id.
    pub async fn session(&self, agent: &str) -> String {
        let r = self.ok(json!({"type": "session.create", "agent_id": agent})).await;
        r["session_id"].as_str().expect("session_id").to_string()
    }

    /// Runs one sweeper cycle.
    pub async fn sweep(&self) -> SweepReport {
        self.manager.sweep_once(BacklogProbe::default()).await.expect("sweep runs")
    }

    /// Runs one sweeper cycle of another manager on the same database.
    pub async fn sweep_with(&self, manager: &AgentConnectionManager) -> SweepReport {
        manager.sweep_once(BacklogProbe::default()).await.expect("sweep runs")
    }

    /// Waits for the next event of `event_type` (other events are skipped).
    pub async fn next_event(&mut self, event_type: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some((id, v)) = self.events.next_raw(Duration::from_millis(500)).await {
                self.seen.push(v.clone());
                if v["event_type"] == event_type {
                    assert_eq!(id.as_deref(), v["event_id"].as_str(), "message_id is the event_id");
                    return v;
                }
            }
        }
        panic!("no {event_type} event within 20s");
    }

    /// Collects events until `n` of `event_type` arrived (or fails), returning those.
    pub async fn events_of(&mut self, event_type: &str, n: usize) -> Vec<Value> {
        let mut out = Vec::new();
        while out.len() < n {
            out.push(self.next_event(event_type).await);
        }
        out
    }

    /// Every event published so far, and nothing published later: waits until the outbox has no unpublished row
    /// (each event confirmed by the broker, so already in this test's queue), then publishes a marker straight to
    /// the event exchange and reads until the marker arrives. The queue keeps order, so every event published before
    /// the marker (a late duplicate included) is read before it.
    pub async fn drain_events(&mut self) -> Vec<Value> {
        eventually("every outbox row published", Duration::from_secs(60), || async {
            (self.unpublished().await == 0).then_some(())
        })
        .await;
        let marker = uuid::Uuid::new_v4().to_string();
        let (conn, _) = amqp_channel(&self.settings).await;
        let ch = agent_connection_manager::amqp::confirm_channel(&conn).await.expect("a confirm channel");
        agent_connection_manager::amqp::publish_confirmed(
            &ch,
            &self.topology().event_exchange,
            "acm.test.marker",
            json!({"event_type": "acm.test.marker", "marker": marker}).to_string().as_bytes(),
            agent_connection_manager::amqp::json_properties(),
            self.settings.confirm_timeout(),
        )
        .await
        .expect("the marker is published");
        let _ = conn.close(200, "done".into()).await;
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            assert!(Instant::now() < deadline, "the marker did not arrive within 60s ({} events before it)", out.len());
            if let Some((_, v)) = self.events.next_raw(Duration::from_millis(500)).await {
                if v["marker"] == marker.as_str() {
                    return out;
                }
                self.seen.push(v.clone());
                out.push(v);
            }
        }
    }

    /// How many events published so far match `pred` (those this test already read included): drains the
    /// subscription as [`TestApp::drain_events`] does, then counts over everything seen. Copies of an event count
    /// twice, so a count also checks that nothing was published again.
    pub async fn published(&mut self, pred: impl Fn(&Value) -> bool) -> i64 {
        self.drain_events().await;
        self.seen.iter().filter(|v| pred(v)).count() as i64
    }

    /// Heartbeat batches the worker applied so far (its batch-size histogram's count).
    pub fn heartbeat_batches(&self) -> f64 {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.manager.metrics().registry).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("acm_heartbeat_batch_size_count "))
            .and_then(|v| v.trim().parse().ok())
            .expect("batch size histogram")
    }

    /// Outbox rows not yet published.
    pub async fn unpublished(&self) -> i64 {
        self.db.query_one("SELECT count(*) FROM event_outbox", &[]).await.unwrap().get(0)
    }

    /// Sets a session's `last_activity_at` to `ago` (a PostgreSQL interval, such as `30 seconds`) before now.
    pub async fn set_session_activity_ago(&self, session_id: &str, ago: &str) {
        self.db
            .execute(
                "UPDATE agent_session SET last_activity_at = now() - $2::text::interval WHERE session_id = $1",
                &[&session_id, &ago],
            )
            .await
            .unwrap();
    }

    /// How long ago a session's `last_activity_at` is, in seconds (database clock).
    pub async fn session_activity_age_secs(&self, session_id: &str) -> f64 {
        self.db
            .query_one(
                "SELECT extract(epoch FROM now() - last_activity_at)::float8 FROM agent_session WHERE session_id = $1",
                &[&session_id],
            )
            .await
            .unwrap()
            .get(0)
    }

    /// One value from a query.
    pub async fn scalar<T: for<'a> tokio_postgres::types::FromSql<'a>>(&self, sql: &str) -> T {
        self.db.query_one(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}")).get(0)
    }

    /// The first column of every row a query returns, in its order.
    pub async fn column<T: for<'a> tokio_postgres::types::FromSql<'a>>(&self, sql: &str) -> Vec<T> {
        let rows = self.db.query(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
        rows.iter().map(|r| r.get(0)).collect()
    }

    /// Stops the worker and removes the database and the broker objects.
    pub async fn cleanup(mut self) {
        self.guard.disarm();
        let _ = self.manager.stop().await;
        let settings = self.settings.clone();
        drop(self.db);
        self.client.close().await;
        cleanup(&settings).await;
    }
}

/// A connection and a channel on the test broker (keep both alive while using the channel).
pub async fn amqp_channel(settings: &Settings) -> (lapin::Connection, lapin::Channel) {
    let conn = agent_connection_manager::amqp::connect(&settings.amqp.url, "acm tests").await.expect("broker");
    let ch = conn.create_channel().await.expect("channel");
    (conn, ch)
}

/// A queue's ready messages and consumers, read with a passive declare on `ch`.
pub async fn queue_counts(ch: &lapin::Channel, queue: &str) -> (u32, u32) {
    let q = ch
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions { passive: true, ..Default::default() },
            Default::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("queue {queue}: {e}"));
    (q.message_count(), q.consumer_count())
}

/// Runs `rabbitmqctl` on the test broker (for at most two minutes), failing the test with its error output; returns
/// its standard output.
pub fn rabbitmqctl(args: &[&str]) -> String {
    let ctl = programs::require_program_in("rabbitmqctl", &programs::rabbitmqctl_dirs());
    let mut command = std::process::Command::new(ctl);
    command.args(args).stdin(std::process::Stdio::null());
    let out = output_within(&mut command, Duration::from_secs(120), &format!("rabbitmqctl {args:?}"));
    assert!(out.status.success(), "rabbitmqctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// A port nothing listens on yet.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("its address").port()
}

/// Drops the test database and deletes the test topology.
pub async fn cleanup(settings: &Settings) {
    let (conn, ch) = amqp_channel(settings).await;
    let _ = Topology::for_settings(settings).delete(&ch).await;
    let _ = conn.close(200, "done".into()).await;
    let name =
        settings.database.url.parse::<tokio_postgres::Config>().ok().and_then(|c| c.get_dbname().map(str::to_string));
    let Some(name) = name else { return };
    if let Ok((admin, conn)) = tokio_postgres::connect(&format!("{}/postgres", pg_base()), NoTls).await {
        tokio::spawn(conn);
        let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).await;
    }
}

/// Messages in the dead-letter queue, with their `x-acm-error` headers, waiting until `n` are there.
pub async fn dead_letters(settings: &Settings, n: usize) -> Vec<(String, Vec<u8>)> {
    use lapin::options::{BasicAckOptions, BasicGetOptions};
    let (_conn, ch) = amqp_channel(settings).await;
    let queue = Topology::new(&settings.amqp.prefix).dead_letter;
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while out.len() < n {
        match ch.basic_get(queue.as_str().into(), BasicGetOptions::default()).await.expect("basic.get") {
            Some(m) => {
                let reason = m
                    .delivery
                    .properties
                    .headers()
                    .as_ref()
                    .and_then(|h| h.inner().get("x-acm-error").cloned())
                    .map(|v| match v {
                        lapin::types::AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).to_string(),
                        other => format!("{other:?}"),
                    })
                    .unwrap_or_default();
                m.delivery.acker.ack(BasicAckOptions::default()).await.expect("ack");
                out.push((reason, m.delivery.data.clone()));
            }
            None => {
                assert!(
                    Instant::now() < deadline,
                    "only {} of {n} dead letters arrived: {:?}",
                    out.len(),
                    out.iter().map(|(r, _)| r).collect::<Vec<_>>()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    out
}
