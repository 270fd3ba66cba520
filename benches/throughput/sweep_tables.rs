//! The big tables of the sweep scenario (seeded with `generate_series`) and the query plans checked on them.

use std::time::Instant;

use agent_connection_manager::config::Settings;

use crate::opts::Opts;
use crate::workload::vacuum;
use crate::Res;

/// Seeds the big tables with nothing due: `due` pending instructions with a deadline a day away (made due later),
/// as many open ones not due, the rest final (acknowledged, expired, cancelled, with past deadlines); connections
/// heard from within the last minute; idempotency records within the retention period (published events are not
/// kept: the relay deletes them).
pub async fn seed_big(db: &tokio_postgres::Client, o: &Opts) -> Res<()> {
    let (sessions, instructions, due, connections, history) =
        (o.sessions, o.instructions, o.due, o.connections, o.history);
    let t = Instant::now();
    // Fast bulk load: no per-row foreign-key triggers (the data is consistent by construction), the
    // instruction table's secondary indexes rebuilt afterwards from their own definitions.
    db.batch_execute("SET session_replication_role = replica; SET maintenance_work_mem = '256MB'").await?;
    let index_defs: Vec<(String, String)> = db
        .query(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'agent_instruction' \
             AND indexname <> 'agent_instruction_pkey'",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for (name, _) in &index_defs {
        db.batch_execute(&format!("DROP INDEX \"{name}\"")).await?;
    }
    let statements = [
        format!(
            "INSERT INTO agent_session (session_id, agent_id, name, created_at, last_activity_at) \
               SELECT 's-' || i, 'agent-' || i, 'bench', now() - interval '1 day', now() \
               FROM generate_series(1, {sessions}) i"
        ),
        format!(
            "INSERT INTO agent_instruction (instruction_id, session_id, agent_id, instruction_type, payload, \
               sequence_number, status, created_at, sent_at, acknowledged_at, ack_status, expires_at, retry_count, \
               max_retries) \
               SELECT md5('i' || i)::uuid, 's-' || ((i - 1) % {sessions} + 1), \
                 'agent-' || ((i - 1) % {sessions} + 1), 'bench', jsonb_build_object('n', i), i, \
                 (CASE WHEN i <= {due} THEN 'pending' \
                       WHEN i <= 2 * {due} THEN (CASE WHEN i % 2 = 0 THEN 'pending' ELSE 'sent' END) \
                       WHEN i % 10 = 0 THEN 'expired' WHEN i % 10 = 1 THEN 'cancelled' \
                       ELSE 'acknowledged' END)::instruction_status, \
                 now() - interval '2 days', \
                 CASE WHEN i > {due} AND i % 2 = 1 THEN now() - interval '1 day' END, \
                 CASE WHEN i > 2 * {due} AND i % 10 > 1 THEN now() - interval '1 day' END, \
                 (CASE WHEN i > 2 * {due} AND i % 10 > 1 THEN 'processed' END)::ack_status, \
                 CASE WHEN i <= 2 * {due} THEN now() + interval '1 day' + (i % 3600) * interval '1 second' \
                      ELSE now() - interval '1 day' - (i % 3600) * interval '1 second' END, \
                 CASE WHEN i <= {due} AND i % 2 = 1 THEN 3 WHEN i > 2 * {due} AND i % 10 = 0 THEN 3 ELSE 0 END, \
                 3 \
               FROM generate_series(1, {instructions}) i"
        ),
        format!(
            "INSERT INTO processed_message (message_type, message_id, reply, processed_at) \
               SELECT 'instruction.ack', 'm-' || i, '{{\"ok\": true}}'::jsonb, \
                 now() - (i % 80000) * interval '1 second' \
               FROM generate_series(1, {history}) i"
        ),
        // Last, and from the statement's clock: heard from within the last 30 s.
        format!(
            "INSERT INTO agent_connection (connection_id, session_id, agent_id, connection_type, created_at, \
               last_heartbeat_at) \
               SELECT 'c-' || i, 's-' || ((i - 1) % {sessions} + 1), 'agent-' || ((i - 1) % {sessions} + 1), \
                 'amqp', now() - interval '1 day', clock_timestamp() - (i % 30) * interval '1 second' \
               FROM generate_series(1, {connections}) i"
        ),
    ];
    for (i, sql) in statements.iter().enumerate() {
        if i == statements.len() - 1 {
            for (_, def) in &index_defs {
                db.batch_execute(def).await?;
            }
        }
        db.batch_execute(sql).await?;
    }
    db.batch_execute("RESET session_replication_role; RESET maintenance_work_mem").await?;
    let inserted = t.elapsed();
    vacuum(
        db,
        &[
            "agent_session",
            "agent_connection",
            "agent_instruction",
            "event_outbox",
            "processed_message",
            "sweeper_state",
        ],
    )
    .await?;
    println!(
        "    seeded in {:.1} s, vacuumed in {:.1} s",
        inserted.as_secs_f64(),
        (t.elapsed() - inserted).as_secs_f64()
    );
    Ok(())
}

/// The sweeper's, the stats' and the relay's SQL (the library's own constants), with the default parameters inlined.
fn explained_queries() -> Vec<(&'static str, String)> {
    use agent_connection_manager::sweeper::{inactive_sessions, instruction_expiry, retention, stale_connections};
    let q = |sql: &str, p1: &str, p2: &str| sql.replace("$1", p1).replace("$2", p2);
    vec![
        (
            "claim_task",
            q(agent_connection_manager::sweeper::CLAIM_TASK, "'stale_connections'", "'bench'").replace("$3", "60"),
        ),
        ("inactive: ANY_DUE", q(inactive_sessions::ANY_DUE, "3600", "")),
        ("expiry: ANY_DUE", instruction_expiry::ANY_DUE.to_string()),
        ("retention: ANY_DUE", q(retention::ANY_DUE, "86400", "")),
        ("stale: COUNT_CANDIDATES", q(stale_connections::COUNT_CANDIDATES, "120", "")),
        ("stale: COUNT_GROUP", q(stale_connections::COUNT_GROUP, "60", "")),
        ("stale: COUNT_ACTIVE", stale_connections::COUNT_ACTIVE.to_string()),
        ("stale: CLOSE_BATCH", q(stale_connections::CLOSE_BATCH, "120", "1000")),
        ("inactive: MARK_BATCH", q(inactive_sessions::MARK_BATCH, "3600", "1000")),
        ("expiry: EXPIRE_BATCH", q(instruction_expiry::EXPIRE_BATCH, "300", "1000")),
        ("retention: PRUNE_PROCESSED", q(retention::PRUNE_PROCESSED, "86400", "1000")),
        ("stats: STATS", agent_connection_manager::commands::stats::STATS.to_string()),
        (
            // The lease holder's claim: from the oldest row (a rescan), nothing in flight; the lease row of the
            // seeded database is free, so this reads only the lease.
            "relay: CLAIM",
            agent_connection_manager::relay::CLAIM
                .replace("$1", "'bench'")
                .replace("$2", &format!("{}::float8", Settings::default().outbox.lease_secs))
                .replace("$3", "0::int8")
                .replace("$4", "true")
                .replace("$5", "'{}'::int8[]")
                .replace("$6", &format!("{}::int8", Settings::default().outbox.batch_size))
                .replace("$7", "''"),
        ),
    ]
}

const BIG_TABLES: [&str; 5] =
    ["agent_instruction", "agent_connection", "agent_session", "event_outbox", "processed_message"];

pub struct Plan {
    pub name: &'static str,
    pub exec_ms: f64,
    pub buffers: String,
    pub seq_scans: Vec<String>,
    pub text: String,
}

pub async fn explain_all(db: &tokio_postgres::Client) -> Res<Vec<Plan>> {
    let mut out = Vec::new();
    for (name, sql) in explained_queries() {
        db.batch_execute("BEGIN").await?;
        let rows = db.simple_query(&format!("EXPLAIN (ANALYZE, BUFFERS) {sql}")).await;
        // EXPLAIN ANALYZE runs the statement (the lease claim too): the rollback undoes it.
        db.batch_execute("ROLLBACK").await?;
        let mut lines = Vec::new();
        for m in rows? {
            if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
                lines.push(r.get(0).unwrap_or_default().to_string());
            }
        }
        let exec_ms = lines
            .iter()
            .find_map(|l| l.trim().strip_prefix("Execution Time: "))
            .and_then(|s| s.trim_end_matches(" ms").parse().ok())
            .unwrap_or(f64::NAN);
        let buffers = lines.iter().find_map(|l| l.trim().strip_prefix("Buffers: ")).unwrap_or("").to_string();
        let seq_scans = lines
            .iter()
            .filter_map(|l| l.split("Seq Scan on ").nth(1))
            .filter_map(|rest| rest.split_whitespace().next())
            .filter(|t| BIG_TABLES.contains(t))
            .map(str::to_string)
            .collect();
        out.push(Plan { name, exec_ms, buffers, seq_scans, text: lines.join("\n") });
    }
    Ok(out)
}
