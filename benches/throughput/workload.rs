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
