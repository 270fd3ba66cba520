//! The slow path of a heartbeat batch: what the two set-based updates of the fast path did not settle (unknown,
//! foreign, inactive or ended sessions; unknown, foreign or closed connections), decided row by row under locks
//! taken in id order.

use std::collections::{HashMap, HashSet};

use deadpool_postgres::Transaction;
use serde_json::Value;

use super::BatchReport;
use crate::db;
use crate::db::Sql;
use crate::domain::{CloseReason, ConnectionStatus, SessionStatus};
use crate::error::Result;
use crate::events::{write_outbox, EventBody};

/// Whether the heartbeats of a (session, agent) pair may go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// The session is the agent's and not ended.
    Accept,
    /// They change nothing, for this reason.
    Reject(&'static str),
    /// Not yet known: the fast path did not touch the session.
    Undecided,
}

/// Sessions the fast path did not touch: locks them in id order and classifies each (session, agent) pair.
/// Inactive sessions of the right agent become active again (and the activity of sessions another worker
/// reactivated meanwhile moves forward); returns each pair's verdict.
pub(super) async fn sessions_slow_path<'a>(
    tx: &Transaction<'_>,
    pairs: &[(&'a str, &'a str)],
    report: &mut BatchReport,
) -> Result<Vec<((&'a str, &'a str), Verdict)>> {
    let mut session_ids: Vec<&str> = pairs.iter().map(|p| p.0).collect();
    session_ids.dedup();
    let sessions: HashMap<String, (String, SessionStatus)> = tx
        .typed_query(
            "SELECT session_id, agent_id, status::text FROM agent_session WHERE session_id = ANY($1) \
             ORDER BY session_id FOR NO KEY UPDATE",
            &[&session_ids],
        )
        .await?
        .into_iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    let mut verdicts = Vec::with_capacity(pairs.len());
    let mut reactivate = Vec::new();
    for &(sid, aid) in pairs {
        let verdict = match sessions.get(sid) {
            Some((owner, status)) if owner == aid && *status != SessionStatus::Ended => {
                if *status == SessionStatus::Inactive {
                    report.reactivated_sessions += 1;
                    tracing::info!(session_id = sid, agent_id = aid, "session active again");
                }
                reactivate.push(sid);
                Verdict::Accept
            }
            Some((owner, _)) if owner != aid => Verdict::Reject("session belongs to another agent"),
            Some(_) => Verdict::Reject("session has ended"),
            None => Verdict::Reject("no such session"),
        };
        verdicts.push(((sid, aid), verdict));
    }
    if !reactivate.is_empty() {
        tx.typed_execute(
            "UPDATE agent_session SET last_activity_at = greatest(last_activity_at, now()), status = 'active' \
             WHERE session_id = ANY($1) AND status <> 'ended'",
            &[&reactivate],
        )
        .await?;
    }
    Ok(verdicts)
}

/// One heartbeat's connection, agent, session and `client_info`, as the slow path sees it.
pub(super) type Entry<'a> = (&'a str, &'a str, &'a str, Option<&'a Value>);

/// Connections the fast path did not refresh, of valid sessions: locks them in id order, then opens unknown
/// ones, restores stale-closed ones (with their events) and rejects foreign or otherwise closed ones.
///
/// A connection that another transaction inserts meanwhile (a pipelined batch, another worker, another heartbeat of
/// this batch naming the same id for another agent) is not visible to the first pass, and its `INSERT` skips it after
/// waiting for that transaction; a second pass then sees the row and decides as for any existing connection.
pub(super) async fn connections_slow_path(
    tx: &Transaction<'_>,
    valid: &[Entry<'_>],
    report: &mut BatchReport,
) -> Result<()> {
    let mut events = Vec::new();
    let missed = connections_slow_pass(tx, valid, report, &mut events).await?;
    if !missed.is_empty() {
        let vanished = connections_slow_pass(tx, &missed, report, &mut events).await?;
        report.rejected += vanished.len();
    }
    if !events.is_empty() {
        let now = db::now(tx).await?;
        write_outbox(tx, now, events).await?;
    }
    Ok(())
}

/// One pass of [`connections_slow_path`]; returns the heartbeats of connections it found unknown but could not
/// insert (another transaction had).
async fn connections_slow_pass<'a>(
    tx: &Transaction<'_>,
    valid: &[Entry<'a>],
    report: &mut BatchReport,
    events: &mut Vec<EventBody>,
) -> Result<Vec<Entry<'a>>> {
    let connection_ids: Vec<&str> = valid.iter().map(|v| v.0).collect();
    let existing: HashMap<String, (String, String, ConnectionStatus, Option<CloseReason>, String)> = tx
        .typed_query(
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
    let mut missed = Vec::new();
    for &(cid, aid, sid, info) in valid {
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
                if *status == ConnectionStatus::Closed {
                    if *reason != Some(CloseReason::StaleConnection) {
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
            .typed_execute(
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
            .typed_query(
                "INSERT INTO agent_connection (connection_id, session_id, agent_id, connection_type, client_info, \
                 created_at, last_heartbeat_at, opened_by_heartbeat) \
                 SELECT v.id, v.sid, v.aid, 'amqp', v.info, now(), now(), true \
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::jsonb[]) AS v(id, sid, aid, info) \
                 ON CONFLICT (connection_id) DO NOTHING RETURNING connection_id, session_id, agent_id",
                &[&new_ids, &new_sids, &new_aids, &new_infos],
            )
            .await?;
        report.opened += inserted.len();
        report.applied += inserted.len();
        let mut opened = HashSet::new();
        for r in inserted {
            let (connection_id, session_id, agent_id): (String, String, String) = (r.get(0), r.get(1), r.get(2));
            tracing::info!(connection_id = %connection_id, "connection opened by heartbeat");
            opened.insert((connection_id.clone(), session_id.clone(), agent_id.clone()));
            events.push(EventBody::ConnectionOpened {
                connection_id,
                session_id,
                agent_id,
                connection_type: "amqp".into(),
                restored: false,
            });
        }
        let tried: HashSet<&str> = new_ids.iter().copied().collect();
        missed.extend(valid.iter().copied().filter(|&(cid, aid, sid, _)| {
            tried.contains(cid) && !opened.contains(&(cid.to_string(), sid.to_string(), aid.to_string()))
        }));
    }
    Ok(missed)
}
