//! `agent.heartbeat`, applied in batches.
//!
//! A batch of deliveries is coalesced per (connection, agent, session) and applied in one transaction with a few
//! set-based statements: lock the sessions (in id order), move their activity forward, lock the connections (in id
//! order), touch or restore known ones, open unknown ones. Time only moves forward (`greatest`), so out-of-order
//! batches from several workers cannot move it back. A heartbeat for an unknown, ended or foreign session, or for a
//! connection that is not the agent's or was closed for a reason other than staleness, changes nothing.

use std::collections::{BTreeMap, HashMap};

use deadpool_postgres::{Pool, Transaction};
use serde::Deserialize;
use serde_json::Value;

use crate::db;
use crate::domain::{Ident, Timestamp};
use crate::error::Result;
use crate::events::{write_outbox, EventBody};

/// `agent.heartbeat`.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
pub struct Heartbeat {
    /// The agent.
    pub agent_id: Ident,
    /// Its session.
    pub session_id: Ident,
    /// Its connection; opened when unknown.
    pub connection_id: Ident,
    /// The agent's clock (informational: the worker's receive time is what counts).
    #[serde(default)]
    pub sent_at: Option<Timestamp>,
    /// Replaces the connection's client info when given.
    #[serde(default)]
    pub client_info: Option<Value>,
}

/// What a batch changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchReport {
    /// Heartbeats in the batch.
    pub received: usize,
    /// Distinct connections written.
    pub applied: usize,
    /// Unknown connections opened.
    pub opened: usize,
    /// Stale-closed connections restored.
    pub restored: usize,
    /// Inactive sessions made active.
    pub reactivated_sessions: usize,
    /// Heartbeats that changed nothing (unknown, ended or foreign session; foreign or closed connection).
    pub rejected: usize,
}

/// Applies a batch in its own transaction.
pub async fn apply_batch(pool: &Pool, heartbeats: &[Heartbeat]) -> Result<BatchReport> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let report = apply_in(&tx, heartbeats).await?;
    tx.commit().await?;
    Ok(report)
}

/// Applies a batch inside the caller's transaction.
pub async fn apply_in(tx: &Transaction<'_>, heartbeats: &[Heartbeat]) -> Result<BatchReport> {
    let mut report = BatchReport { received: heartbeats.len(), ..Default::default() };
    // Coalesce: one entry per (connection, agent, session), keeping the last client_info given.
    let mut latest: BTreeMap<(&str, &str, &str), Option<&Value>> = BTreeMap::new();
    for h in heartbeats {
        let entry = latest.entry((h.connection_id.as_str(), h.agent_id.as_str(), h.session_id.as_str())).or_default();
        if h.client_info.is_some() {
            *entry = h.client_info.as_ref();
        }
    }
    let mut session_ids: Vec<&str> = latest.keys().map(|k| k.2).collect();
    session_ids.sort_unstable();
    session_ids.dedup();
    let sessions: HashMap<String, (String, String)> = tx
        .query(
            "SELECT session_id, agent_id, status::text FROM agent_session WHERE session_id = ANY($1) \
             ORDER BY session_id FOR NO KEY UPDATE",
            &[&session_ids],
        )
        .await?
        .into_iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    let mut valid = Vec::with_capacity(latest.len());
    for (&(cid, aid, sid), info) in &latest {
        match sessions.get(sid) {
            Some((owner, status)) if owner == aid && status != "ended" => valid.push((cid, aid, sid, *info)),
            Some((owner, status)) => {
                report.rejected += 1;
                let why = if owner != aid { "session belongs to another agent" } else { "session has ended" };
                tracing::warn!(connection_id = cid, agent_id = aid, session_id = sid, status = %status, "heartbeat rejected: {why}");
            }
            None => {
                report.rejected += 1;
                tracing::warn!(
                    connection_id = cid,
                    agent_id = aid,
                    session_id = sid,
                    "heartbeat rejected: no such session"
                );
            }
        }
    }
    if valid.is_empty() {
        return Ok(report);
    }
    let mut touched: Vec<&str> = valid.iter().map(|v| v.2).collect();
    touched.sort_unstable();
    touched.dedup();
    for sid in &touched {
        if sessions.get(*sid).is_some_and(|(_, s)| s == "inactive") {
            report.reactivated_sessions += 1;
            tracing::info!(session_id = sid, "session active again");
        }
    }
    tx.execute(
        "UPDATE agent_session SET last_activity_at = greatest(last_activity_at, now()), status = 'active' \
         WHERE session_id = ANY($1) AND status <> 'ended'",
        &[&touched],
    )
    .await?;
    let connection_ids: Vec<&str> = valid.iter().map(|v| v.0).collect();
    let existing: HashMap<String, (String, String, String, Option<String>, String)> = tx
        .query(
            "SELECT connection_id, session_id, agent_id, status::text, close_reason::text, connection_type \
             FROM agent_connection WHERE connection_id = ANY($1) ORDER BY connection_id FOR NO KEY UPDATE",
            &[&connection_ids],
        )
        .await?
        .into_iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3), r.get(4), r.get(5))))
        .collect();
    let (mut upd_ids, mut upd_infos) = (Vec::new(), Vec::new());
    let (mut new_ids, mut new_sids, mut new_aids, mut new_infos) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut events = Vec::new();
    for &(cid, aid, sid, info) in &valid {
        match existing.get(cid) {
            None => {
                new_ids.push(cid);
                new_sids.push(sid);
                new_aids.push(aid);
                new_infos.push(info.cloned());
            }
            Some((csid, caid, status, reason, ctype)) => {
                if csid != sid || caid != aid {
                    report.rejected += 1;
                    tracing::warn!(
                        connection_id = cid,
                        agent_id = aid,
                        session_id = sid,
                        "heartbeat rejected: connection belongs to another agent or session"
                    );
                    continue;
                }
                if status == "closed" {
                    if reason.as_deref() != Some("stale_connection") {
                        report.rejected += 1;
                        tracing::warn!(connection_id = cid, agent_id = aid, reason = ?reason, "heartbeat rejected: connection was closed");
                        continue;
                    }
                    report.restored += 1;
                    tracing::info!(
                        connection_id = cid,
                        session_id = sid,
                        agent_id = aid,
                        "stale connection restored by heartbeat"
                    );
                    events.push(EventBody::ConnectionOpened {
                        connection_id: cid.to_string(),
                        session_id: sid.to_string(),
                        agent_id: aid.to_string(),
                        connection_type: ctype.clone(),
                        restored: true,
                    });
                }
                upd_ids.push(cid);
                upd_infos.push(info.cloned());
            }
        }
    }
    if !upd_ids.is_empty() {
        report.applied += tx
            .execute(
                "UPDATE agent_connection c SET last_heartbeat_at = greatest(c.last_heartbeat_at, now()), \
                 status = 'active', close_reason = NULL, closed_at = NULL, \
                 client_info = coalesce(v.info, c.client_info) \
                 FROM unnest($1::text[], $2::jsonb[]) AS v(id, info) \
                 WHERE c.connection_id = v.id AND (c.status = 'active' OR c.close_reason = 'stale_connection')",
                &[&upd_ids, &upd_infos],
            )
            .await? as usize;
    }
    if !new_ids.is_empty() {
        let inserted = tx
            .query(
                "INSERT INTO agent_connection (connection_id, session_id, agent_id, connection_type, client_info, \
                 created_at, last_heartbeat_at) \
                 SELECT v.id, v.sid, v.aid, 'amqp', v.info, now(), now() \
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::jsonb[]) AS v(id, sid, aid, info) \
                 ON CONFLICT (connection_id) DO NOTHING RETURNING connection_id, session_id, agent_id",
                &[&new_ids, &new_sids, &new_aids, &new_infos],
            )
            .await?;
        report.opened = inserted.len();
        report.applied += inserted.len();
        for r in inserted {
            let connection_id: String = r.get(0);
            tracing::info!(connection_id = %connection_id, "connection opened by heartbeat");
            events.push(EventBody::ConnectionOpened {
                connection_id,
                session_id: r.get(1),
                agent_id: r.get(2),
                connection_type: "amqp".into(),
                restored: false,
            });
        }
    }
    if !events.is_empty() {
        let now = db::now(tx).await?;
        write_outbox(tx, now, events).await?;
    }
    Ok(report)
}
