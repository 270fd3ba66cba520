//! Helpers the scenarios share: seeding agents, building and publishing heartbeats, reading the worker's metrics.

use agent_connection_manager::amqp;
use chrono::Utc;
use serde_json::{json, Value};

use crate::env::http_get;
use crate::opts::Opts;
use crate::Res;

/// A histogram's sum and count in the worker's /metrics text.
pub fn histogram(metrics: &str, name: &str) -> (f64, f64) {
    let value = |suffix: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(&format!("{name}_{suffix}")))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN)
    };
    (value("sum"), value("count"))
}

/// The worker's mean heartbeat batch (deliveries) and mean transaction time (ms), from its /metrics.
pub async fn worker_batches(port: u16) -> (f64, f64) {
    let text = http_get(port, "/metrics").await.map(|(_, b)| b).unwrap_or_default();
    let (size, batches) = histogram(&text, "acm_heartbeat_batch_size");
    let (secs, txs) = histogram(&text, "acm_db_transaction_seconds");
    (size / batches, secs / txs * 1000.0)
}

/// Sessions `s-i`, agents `agent-i` and connections `c-i` (active, fresh), i in 1..=n.
pub async fn seed_agents(db: &tokio_postgres::Client, n: usize) -> Res<()> {
    db.batch_execute(&format!(
        "INSERT INTO agent_session (session_id, agent_id, name) \
           SELECT 's-' || i, 'agent-' || i, 'bench' FROM generate_series(1, {n}) i; \
         INSERT INTO agent_connection (connection_id, session_id, agent_id, connection_type) \
           SELECT 'c-' || i, 's-' || i, 'agent-' || i, 'amqp' FROM generate_series(1, {n}) i;"
    ))
    .await?;
    vacuum(db, &["agent_session", "agent_connection"]).await
}

/// `VACUUM ANALYZE`, one statement at a time (a multi-statement query is one transaction, where VACUUM cannot run).
pub async fn vacuum(db: &tokio_postgres::Client, tables: &[&str]) -> Res<()> {
    for t in tables {
        db.batch_execute(&format!("VACUUM ANALYZE {t}")).await?;
    }
    Ok(())
}

pub fn heartbeat_body(agent: usize, client_info: Option<Value>) -> Vec<u8> {
    let mut body = json!({
        "type": "agent.heartbeat",
        "agent_id": format!("agent-{agent}"),
        "session_id": format!("s-{agent}"),
        "connection_id": format!("c-{agent}"),
        "sent_at": Utc::now().to_rfc3339(),
    });
    if let Some(info) = client_info {
        body["client_info"] = info;
    }
    serde_json::to_vec(&body).unwrap_or_default()
}

/// `publishers` confirm-mode connections to the broker.
pub async fn publishers(o: &Opts) -> Res<Vec<(lapin::Connection, lapin::Channel)>> {
    let mut out = Vec::new();
    for _ in 0..o.publishers {
        let conn = amqp::connect(&o.amqp_url, "acm bench publisher").await?;
        let ch = amqp::confirm_channel(&conn).await?;
        out.push((conn, ch));
    }
    Ok(out)
}

/// The last agent (1-based) published by publisher `p` of `n` (agents are dealt round-robin).
pub fn last_agent_of(p: usize, n: usize, agents: usize) -> Option<usize> {
    (p < agents).then(|| p + 1 + ((agents - (p + 1)) / n) * n)
}

/// Row updates of the two tables heartbeats write, as `pg_stat_user_tables` counts them: (updates, of which HOT).
#[derive(Debug, Clone, Copy, Default)]
pub struct UpdateCounts {
    pub connection: (i64, i64),
    pub session: (i64, i64),
}

impl UpdateCounts {
    pub fn since(&self, before: &UpdateCounts) -> UpdateCounts {
        UpdateCounts {
            connection: (self.connection.0 - before.connection.0, self.connection.1 - before.connection.1),
            session: (self.session.0 - before.session.0, self.session.1 - before.session.1),
        }
    }

    pub fn connection_hot_share(&self) -> f64 {
        self.connection.1 as f64 / self.connection.0.max(1) as f64
    }

    pub fn session_hot_share(&self) -> f64 {
        self.session.1 as f64 / self.session.0.max(1) as f64
    }

    pub fn line(&self) -> String {
        format!(
            "agent_connection n_tup_upd {} (n_tup_hot_upd {}, {:.1} % HOT); agent_session n_tup_upd {} (n_tup_hot_upd {})",
            self.connection.0,
            self.connection.1,
            100.0 * self.connection_hot_share(),
            self.session.0,
            self.session.1
        )
    }
}

/// `n_tup_upd` and `n_tup_hot_upd` of `agent_connection` and `agent_session` now.
pub async fn update_counts(db: &tokio_postgres::Client) -> Res<UpdateCounts> {
    let rows = db
        .query(
            "SELECT relname::text, n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables \
             WHERE relname IN ('agent_connection', 'agent_session')",
            &[],
        )
        .await?;
    let mut c = UpdateCounts::default();
    for r in rows {
        let v = (r.get::<_, i64>(1), r.get::<_, i64>(2));
        if r.get::<_, String>(0) == "agent_connection" {
            c.connection = v;
        } else {
            c.session = v;
        }
    }
    Ok(c)
}

/// [`update_counts`] once they stop moving: other backends report their counts up to about a second late (and
/// idle ones later), so this reads until two reads 1.5 s apart agree, for at most 15 s.
pub async fn settled_update_counts(db: &tokio_postgres::Client) -> Res<UpdateCounts> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let mut last = update_counts(db).await?;
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        let now = update_counts(db).await?;
        if (now.connection == last.connection && now.session == last.session) || std::time::Instant::now() > deadline {
            return Ok(now);
        }
        last = now;
    }
}

/// `n` more active connections `c-<i>` (numbered after those there), heard from within the last 30 s, spread over
/// `sessions` sessions `big-s-<k>` (created when missing); then `VACUUM ANALYZE`.
pub async fn seed_big_connections(db: &tokio_postgres::Client, n: i64, sessions: i64) -> Res<()> {
    db.batch_execute(&format!(
        "INSERT INTO agent_session (session_id, agent_id, name) \
           SELECT 'big-s-' || k, 'big-agent-' || k, 'bench' FROM generate_series(1, {sessions}) k \
           ON CONFLICT DO NOTHING; \
         INSERT INTO agent_connection (connection_id, session_id, agent_id, connection_type, last_heartbeat_at) \
           SELECT 'c-' || (i + base.n), 'big-s-' || (1 + i % {sessions}), 'big-agent-' || (1 + i % {sessions}), \
                  'amqp', now() - random() * interval '30 seconds' \
           FROM (SELECT count(*) AS n FROM agent_connection) AS base, generate_series(1, {n}) i;"
    ))
    .await?;
    vacuum(db, &["agent_session", "agent_connection"]).await
}
