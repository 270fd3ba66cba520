//! The lab of one scenario (its own PostgreSQL, RabbitMQ and workers) and database probes.

use std::time::{Duration, Instant};

use agent_connection_manager::amqp::{Topology, BROKER_QUERY_TIMEOUT};
use agent_connection_manager::config::Settings;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use tokio_postgres::NoTls;

use crate::infra::{within, PgCluster, RabbitNode, TempDir, WorkerEnv, WorkerProc};
use crate::{events_queue, PREFIX};

/// A private PostgreSQL, a private RabbitMQ (one node, or a cluster's) and the workers of one scenario. Fields drop
/// in declaration order: workers, broker, database, files.
pub struct Lab {
    pub workers: Vec<WorkerProc>,
    pub rabbit: RabbitNode,
    /// The cluster's other nodes (none for one node); `amqp.url` lists `rabbit` first, then these.
    pub cluster: Vec<RabbitNode>,
    pub pg: PgCluster,
    /// The synchronous standby of [`Lab::replicated`].
    pub standby: Option<PgCluster>,
    pub env: WorkerEnv,
    pub peak_kb: u64,
    /// The topology the workers use (with their `amqp.heartbeat_shards`).
    pub topology: Topology,
    /// What the fault wants in the results row's notes (times to recover).
    pub fault_notes: String,
    spawned: usize,
    _dir: TempDir,
}

impl Lab {
    /// Starts PostgreSQL and RabbitMQ, migrates, declares the topology and the event capture queue.
    pub async fn new(name: &str, extra: &[(&str, &str)]) -> Self {
        Self::build(name, extra, false).await
    }

    /// [`Lab::new`] with a primary and a synchronous streaming standby (`pg` and `standby`); the workers'
    /// `database.url` names both hosts with `target_session_attrs=read-write`.
    pub async fn replicated(name: &str, extra: &[(&str, &str)]) -> Self {
        Self::build(name, extra, true).await
    }

    async fn build(name: &str, extra: &[(&str, &str)], replicated: bool) -> Self {
        let dir = TempDir::new(name);
        let rabbit = tokio::task::block_in_place(|| RabbitNode::start_new(dir.path()));
        Self::assemble(dir, vec![rabbit], extra, &Settings::default(), replicated).await
    }

    /// Starts PostgreSQL under `dir`, migrates, and declares the topology (with `settings`' queue types and heartbeat
    /// shards, which `extra` must give the workers too) and the event capture queue on the running broker `nodes`
    /// (a quorum queue on a cluster, so that losing a node loses no event).
    pub async fn with_broker(
        dir: TempDir,
        nodes: Vec<RabbitNode>,
        extra: &[(&str, &str)],
        settings: &Settings,
    ) -> Self {
        Self::assemble(dir, nodes, extra, settings, false).await
    }

    /// A primary with a synchronous streaming standby when `replicated` (the workers' `database.url` then names
    /// both hosts with `target_session_attrs=read-write`), one server otherwise.
    async fn start_postgres(dir: &TempDir, replicated: bool) -> (PgCluster, Option<PgCluster>, String) {
        if !replicated {
            let pg = tokio::task::block_in_place(|| PgCluster::start_new(dir.path()));
            let url = pg.url("acm_faults");
            return (pg, None, url);
        }
        let (pg, standby) = tokio::task::block_in_place(|| {
            let pg = PgCluster::start_new_as(
                dir.path(),
                "pg",
                "-c wal_level=replica -c max_wal_senders=5 -c \"synchronous_standby_names=*\"",
            );
            pg.allow("host replication postgres 127.0.0.1/32 trust");
            let standby = PgCluster::start_standby_of(&pg, dir.path(), "pg-standby");
            (pg, standby)
        });
        let primary = format!("postgres://postgres@127.0.0.1:{}/postgres", pg.port());
        crate::infra::eventually("the standby to stream synchronously", Duration::from_secs(60), || {
            let primary = primary.clone();
            async move {
                let client = db(&primary).await?;
                let row = client.query_opt("SELECT sync_state FROM pg_stat_replication", &[]).await.ok()??;
                (row.get::<_, String>(0) == "sync").then_some(())
            }
        })
        .await;
        let url = format!(
            "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/acm_faults?target_session_attrs=read-write",
            pg.port(),
            standby.port()
        );
        (pg, Some(standby), url)
    }

    async fn assemble(
        dir: TempDir,
        mut nodes: Vec<RabbitNode>,
        extra: &[(&str, &str)],
        settings: &Settings,
        replicated: bool,
    ) -> Self {
        let (pg, standby, database_url) = Self::start_postgres(&dir, replicated).await;
        let mut all_extra: Vec<(String, String)> = vec![
            ("ACM_SWEEPER__CHECK_INTERVAL_SECS".into(), "1".into()),
            // Heartbeats stop when the workload ends; the test must not race the stale verdict.
            ("ACM_SWEEPER__CONNECTION_STALE_AFTER_SECS".into(), "3600".into()),
            ("ACM_OUTBOX__POLL_INTERVAL_MS".into(), "200".into()),
        ];
        all_extra.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let env = WorkerEnv {
            database_url,
            amqp_url: nodes.iter().map(RabbitNode::url).collect::<Vec<_>>().join(","),
            prefix: PREFIX.into(),
            extra: all_extra,
            log_dir: dir.path().to_path_buf(),
        };
        tokio::task::block_in_place(|| env.migrate());
        let topology = Topology { heartbeat_shards: settings.amqp.heartbeat_shards, ..Topology::new(PREFIX) };
        let clustered = nodes.len() > 1;
        let rabbit = nodes.remove(0);
        let lab = Self {
            workers: Vec::new(),
            rabbit,
            cluster: nodes,
            pg,
            standby,
            env,
            peak_kb: 0,
            topology,
            fault_notes: String::new(),
            spawned: 0,
            _dir: dir,
        };
        let (conn, ch) = lab.amqp().await;
        // The heartbeat queues' TTL is the workers' stale window (set above), so that they find them as they are.
        let mut settings = settings.clone();
        settings.sweeper.connection_stale_after_secs = 3600.try_into().unwrap();
        within("declaring the topology", SETUP_LIMIT, lab.topology.declare(&conn, &settings))
            .await
            .expect("topology declares");
        let q = events_queue();
        let mut args = FieldTable::default();
        if clustered {
            args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
        }
        let declare =
            ch.queue_declare(q.as_str().into(), QueueDeclareOptions { durable: true, ..Default::default() }, args);
        within("declaring the event capture queue", SETUP_LIMIT, declare).await.expect("event capture queue");
        let bind = ch.queue_bind(
            q.as_str().into(),
            lab.topology.event_exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        );
        within("binding the event capture queue", SETUP_LIMIT, bind).await.expect("bind event capture queue");
        close(&conn).await;
        lab
    }

    pub async fn amqp(&self) -> (lapin::Connection, lapin::Channel) {
        let conn =
            agent_connection_manager::amqp::connect(&self.env.amqp_url, "acm faults test").await.expect("broker");
        let ch = within("a channel", BROKER_QUERY_TIMEOUT, conn.create_channel()).await.expect("channel");
        (conn, ch)
    }

    pub fn db_url(&self) -> String {
        self.env.database_url.clone()
    }

    /// Starts one more worker and waits until it is ready.
    pub async fn spawn_worker(&mut self) -> usize {
        self.spawned += 1;
        let mut w = self.env.spawn(&format!("worker-{}", self.spawned));
        w.wait_ready(Duration::from_secs(90)).await;
        self.workers.push(w);
        self.workers.len() - 1
    }

    /// SIGKILL worker `i` and start a new one in its place (ready before this returns).
    pub async fn kill_and_restart(&mut self, i: usize) {
        let peak = self.workers[i].sigkill();
        self.peak_kb = self.peak_kb.max(peak);
        self.spawned += 1;
        let mut w = self.env.spawn(&format!("worker-{}", self.spawned));
        w.wait_ready(Duration::from_secs(90)).await;
        self.workers[i] = w;
    }

    /// SIGTERM every worker (each must exit cleanly) and remember their peak memory.
    pub async fn stop_workers(&mut self) {
        for w in &mut self.workers {
            let peak = w.sigterm(Duration::from_secs(60)).await;
            self.peak_kb = self.peak_kb.max(peak);
        }
        self.workers.clear();
    }

    /// Messages ready in a queue (`None` while the broker cannot be asked, or does not answer within
    /// [`BROKER_QUERY_TIMEOUT`]).
    pub async fn depth(&self, queue: &str) -> Option<u32> {
        let conn = agent_connection_manager::amqp::connect(&self.env.amqp_url, "acm faults probe").await.ok()?;
        let ask = async {
            conn.create_channel()
                .await
                .ok()?
                .queue_declare(
                    queue.into(),
                    QueueDeclareOptions { passive: true, durable: true, ..Default::default() },
                    FieldTable::default(),
                )
                .await
                .ok()
        };
        let q = tokio::time::timeout(BROKER_QUERY_TIMEOUT, ask).await.ok().flatten();
        close(&conn).await;
        q.map(|q| q.message_count())
    }
}

/// Longest wait for one query of the test's own.
pub const QUERY_LIMIT: Duration = Duration::from_secs(60);

/// Longest wait for one setup step on the broker (a quorum queue's declaration waits for its members).
pub const SETUP_LIMIT: Duration = Duration::from_secs(60);

/// Closes a connection of the test's own, waiting at most [`BROKER_QUERY_TIMEOUT`] (a connection the broker already
/// dropped may never answer; nothing depends on the close).
pub async fn close(conn: &lapin::Connection) {
    let _ = tokio::time::timeout(BROKER_QUERY_TIMEOUT, conn.close(200, "done".into())).await;
}

/// Consumes `queue` without acknowledgements (the test only reads and counts), asking within
/// [`BROKER_QUERY_TIMEOUT`]; fails the test otherwise.
pub async fn consume_no_ack(ch: &lapin::Channel, queue: &str, tag: &str) -> lapin::Consumer {
    let options = BasicConsumeOptions { no_ack: true, ..Default::default() };
    let consume = ch.basic_consume(queue.into(), tag.into(), options, FieldTable::default());
    within("basic.consume", BROKER_QUERY_TIMEOUT, consume).await.unwrap_or_else(|e| panic!("consuming {queue}: {e}"))
}

// Database probes (a fresh connection each time, so they work across a PostgreSQL restart).

pub async fn db(url: &str) -> Option<tokio_postgres::Client> {
    let (client, conn) =
        tokio::time::timeout(Duration::from_secs(5), tokio_postgres::connect(url, NoTls)).await.ok()?.ok()?;
    tokio::spawn(conn);
    Some(client)
}

/// The one number `sql` returns (`None` when the database cannot be asked, or does not answer within a minute).
pub async fn query_i64(url: &str, sql: &str) -> Option<i64> {
    let client = db(url).await?;
    tokio::time::timeout(QUERY_LIMIT, client.query_one(sql, &[])).await.ok()?.ok().map(|r| r.get(0))
}

/// Waits (bounded) until `sql` counts `want`; fails the test otherwise.
pub async fn wait_count(url: &str, sql: &str, want: usize, what: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let n = query_i64(url, sql).await;
        if n == Some(want as i64) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}: want {want}, last count {n:?} ({sql})"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The one number `sql` returns, within [`QUERY_LIMIT`]; fails the test otherwise.
pub async fn count_of(client: &tokio_postgres::Client, sql: &str) -> u64 {
    let row = within(sql, QUERY_LIMIT, client.query_one(sql, &[])).await;
    row.unwrap_or_else(|e| panic!("{sql}: {e}")).get::<_, i64>(0) as u64
}
