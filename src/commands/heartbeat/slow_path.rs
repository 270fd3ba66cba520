//! The slow path of a heartbeat batch: what the two set-based updates of the fast path did not settle (unknown,
//! foreign, inactive or ended sessions; unknown, foreign or closed connections), decided row by row under locks
//! taken in id order.

use std::collections::{HashMap, HashSet};

use deadpool_postgres::Transaction;
use serde_json::Value;

use super::{BatchReport, Latest, Rules};
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

/// One heartbeat's connection, agent, session, `client_info` and times, as the slow path sees it.
pub(super) type Entry<'a> = (&'a str, &'a str, &'a str, Latest<'a>);

/// Connections the fast path did not refresh, of valid sessions: locks them in id order, then opens unknown
/// ones, restores stale-closed ones (with their events) and rejects foreign or otherwise closed ones. A late heartbeat
/// (its agent spoke longer than the stale window ago) opens and restores nothing; neither does a heartbeat that
/// would take its agent past `limits.max_connections_per_agent` active connections.
///
/// A connection that another transaction inserts meanwhile (a pipelined batch, another worker, another heartbeat of
/// this batch naming the same id for another agent) is not visible to the first pass, and its `INSERT` skips it after
/// waiting for that transaction; a second pass then sees the row and decides as for any existing connection.
pub(super) async fn connections_slow_path(
    tx: &Transaction<'_>,
    valid: &[Entry<'_>],
    rules: &Rules,
    report: &mut BatchReport,
) -> Result<()> {
    let mut events = Vec::new();
    let missed = connections_slow_pass(tx, valid, rules, report, &mut events).await?;
    if !missed.is_empty() {
        let vanished = connections_slow_pass(tx, &missed, rules, report, &mut events).await?;
        report.rejected += vanished.len();
    }
    if !events.is_empty() {
        let now = db::now(tx).await?;
        write_outbox(tx, now, events).await?;
    }
    Ok(())
}

/// Refreshes or restores connections the slow pass locked ($1), each to when its agent spoke (as the fast path's
/// statement does); a stale-closed one is restored only when its agent spoke within the stale window ($6 seconds)
/// and after the last heartbeat the close judged it by. Returns the connections written, whether each was closed before, and whether its
/// agent spoke within the stale window.
const REFRESH_OR_RESTORE: &str = "WITH v AS ( \
        SELECT id, info, sent, now() - held * interval '1 microsecond' AS recv \
        FROM unnest($1::text[], $2::jsonb[], $3::text[], $4::int8[]) AS v(id, info, sent, held)), \
     k AS ( \
        SELECT c.connection_id, c.status = 'closed' AS was_closed, v.info, f.spoke, f.new_prev, f.new_cur, \
          f.new_at, f.spoke >= now() - $6::float8 * interval '1 second' AS fresh \
        FROM agent_connection c JOIN v ON c.connection_id = v.id \
        CROSS JOIN LATERAL acm_heartbeat_clock(c.clock_offset_prev, c.clock_offset_cur, c.clock_bucket_at, \
          v.sent::timestamptz, v.recv, $5::float8) AS f \
        WHERE c.status = 'active' OR (c.close_reason = 'stale_connection' \
          AND f.spoke >= now() - $6::float8 * interval '1 second' AND f.spoke > c.last_heartbeat_at)) \
     UPDATE agent_connection c \
       SET last_heartbeat_at = CASE WHEN k.fresh THEN greatest(c.last_heartbeat_at, k.spoke) \
         ELSE c.last_heartbeat_at END, \
       status = 'active', close_reason = NULL, closed_at = NULL, client_info = coalesce(k.info, c.client_info), \
       clock_offset_prev = k.new_prev, clock_offset_cur = k.new_cur, clock_bucket_at = k.new_at \
     FROM k WHERE c.connection_id = k.connection_id \
     RETURNING c.connection_id, k.was_closed, k.fresh";

/// Opens unknown connections, each heard from when the worker received its heartbeat (a new connection has no
/// clock offset yet: its first heartbeat starts one, with buckets of $6 seconds).
const OPEN_UNKNOWN: &str = "INSERT INTO agent_connection (connection_id, session_id, agent_id, connection_type, \
       client_info, created_at, last_heartbeat_at, opened_by_heartbeat, clock_offset_prev, clock_offset_cur, \
       clock_bucket_at) \
     SELECT v.id, v.sid, v.aid, 'amqp', v.info, now(), f.spoke, true, f.new_prev, f.new_cur, f.new_at \
     FROM unnest($1::text[], $2::text[], $3::text[], $4::jsonb[], $5::timestamptz[], $7::float8[]) \
       AS v(id, sid, aid, info, sent, held) \
     CROSS JOIN LATERAL acm_heartbeat_clock(NULL, NULL, NULL, v.sent::timestamptz, now() - v.held * interval '1 microsecond', \
       $6::float8) AS f \
     ON CONFLICT (connection_id) DO NOTHING RETURNING connection_id, session_id, agent_id";

/// One pass of [`connections_slow_path`]; returns the heartbeats of connections it found unknown but could not
/// insert (another transaction had).
async fn connections_slow_pass<'a>(
    tx: &Transaction<'_>,
    valid: &[Entry<'a>],
    rules: &Rules,
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
    let stale = rules.stale_after.as_secs_f64();
    let bucket = rules.clock_bucket_secs();
    // Heartbeats that would make a connection active (open or restore), by agent: checked against the limit.
    let mut upd: Vec<Entry<'a>> = Vec::new();
    let mut new: Vec<Entry<'a>> = Vec::new();
    let mut missed = Vec::new();
    for &e in valid {
        let (cid, aid, sid, latest) = e;
        match existing.get(cid) {
            None if latest.held_micros(rules.began) as f64 / 1e6 > stale => {
                report.late += 1;
                tracing::debug!(connection_id = cid, "late heartbeat for an unknown connection: opened nothing");
            }
            None => new.push(e),
            Some((csid, caid, status, reason, _)) => {
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
                if *status == ConnectionStatus::Closed && *reason != Some(CloseReason::StaleConnection) {
                    report.rejected += 1;
                    tracing::warn!(connection_id = cid, agent_id = aid, reason = ?reason, "heartbeat rejected: connection was closed");
                    continue;
                }
                upd.push(e);
            }
        }
    }
    // The limit: every agent that would gain an active connection is locked (in key order, so two batches wait
    // for each other rather than deadlock) and its active connections counted; openings and restores beyond the limit
    // are refused.
    let gaining: Vec<&str> = {
        let mut a: Vec<&str> = new
            .iter()
            .map(|e| e.1)
            .chain(upd.iter().filter(|e| existing[e.0].2 == ConnectionStatus::Closed).map(|e| e.1))
            .collect();
        a.sort_unstable();
        a.dedup();
        a
    };
    let mut room = agent_room(tx, &gaining, rules.max_connections_per_agent).await?;
    let mut admit = |e: &Entry<'a>, report: &mut BatchReport| {
        let left = room.entry(e.1.to_string()).or_insert(0);
        if *left > 0 {
            *left -= 1;
            return true;
        }
        tracing::warn!(
            connection_id = e.0,
            agent_id = e.1,
            "heartbeat refused: the agent is at limits.max_connections_per_agent"
        );
        report.limited.push((e.0.to_string(), e.1.to_string()));
        false
    };
    let mut upd_admitted = Vec::with_capacity(upd.len());
    for e in upd {
        if existing[e.0].2 == ConnectionStatus::Active || admit(&e, report) {
            upd_admitted.push(e);
        }
    }
    let new: Vec<Entry<'a>> = new.into_iter().filter(|e| admit(e, report)).collect();
    if !upd_admitted.is_empty() {
        let ids: Vec<&str> = upd_admitted.iter().map(|e| e.0).collect();
        let infos: Vec<Option<Value>> = upd_admitted.iter().map(|e| e.3.info.cloned()).collect();
        let sents: Vec<Option<String>> = upd_admitted.iter().map(|e| e.3.sent_text()).collect();
        let helds: Vec<i64> = upd_admitted.iter().map(|e| e.3.held_micros(rules.began)).collect();
        let written: HashMap<String, (bool, bool)> = tx
            .typed_query(REFRESH_OR_RESTORE, &[&ids as &dyn db::Param, &infos, &sents, &helds, &bucket, &stale])
            .await?
            .into_iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2))))
            .collect();
        for (cid, aid, sid, _) in &upd_admitted {
            match written.get(*cid) {
                Some((true, _)) => {
                    report.restored += 1;
                    report.applied += 1;
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
                        connection_type: existing[*cid].4.clone(),
                        restored: true,
                    });
                }
                Some((false, true)) => report.applied += 1,
                Some((false, false)) | None => {
                    report.late += 1;
                    tracing::debug!(connection_id = cid, "late heartbeat: refreshed or restored nothing");
                }
            }
        }
    }
    if !new.is_empty() {
        let new_ids: Vec<&str> = new.iter().map(|e| e.0).collect();
        let new_sids: Vec<&str> = new.iter().map(|e| e.2).collect();
        let new_aids: Vec<&str> = new.iter().map(|e| e.1).collect();
        let new_infos: Vec<Option<Value>> = new.iter().map(|e| e.3.info.cloned()).collect();
        let sents: Vec<Option<String>> = new.iter().map(|e| e.3.sent_text()).collect();
        let helds: Vec<i64> = new.iter().map(|e| e.3.held_micros(rules.began)).collect();
        let inserted = tx
            .typed_query(
                OPEN_UNKNOWN,
                &[&new_ids as &dyn db::Param, &new_sids, &new_aids, &new_infos, &sents, &bucket, &helds],
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
        missed.extend(
            new.iter()
                .copied()
                .filter(|&(cid, aid, sid, _)| !opened.contains(&(cid.to_string(), sid.to_string(), aid.to_string()))),
        );
    }
    Ok(missed)
}

/// Locks each agent's connection count for this transaction (advisory locks taken in key order) and returns how
/// many more active connections each may have under `max`.
async fn agent_room(tx: &Transaction<'_>, agents: &[&str], max: i64) -> Result<HashMap<String, i64>> {
    if agents.is_empty() {
        return Ok(HashMap::new());
    }
    lock_agents(tx, agents).await?;
    let counts: HashMap<String, i64> = tx
        .typed_query(
            "SELECT agent_id, count(*) FROM agent_connection WHERE status = 'active' AND agent_id = ANY($1) \
             GROUP BY agent_id",
            &[&agents.to_vec()],
        )
        .await?
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    Ok(agents.iter().map(|a| (a.to_string(), (max - counts.get(*a).copied().unwrap_or(0)).max(0))).collect())
}

/// Takes the transaction-scoped advisory lock of each agent's limits, in key order: a transaction that counts an
/// agent's objects to bound them holds it until its commit, so two cannot both see room for one more.
pub(crate) async fn lock_agents(tx: &Transaction<'_>, agents: &[&str]) -> Result<()> {
    tx.typed_query(
        "SELECT pg_advisory_xact_lock(k) FROM (SELECT DISTINCT hashtextextended('acm.agent:' || a, 0) AS k \
         FROM unnest($1::text[]) AS a ORDER BY k) AS l",
        &[&agents.to_vec()],
    )
    .await?;
    Ok(())
}
