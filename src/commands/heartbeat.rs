//! `agent.heartbeat`, applied in batches.
//!
//! A batch of deliveries is coalesced per (connection, agent, session) and applied in one transaction. In the common
//! case (the session is active and the agent's, the connection active and the agent's) that is two set-based
//! updates whose `WHERE` clauses are the checks; the rest goes through a slow path that locks the rows in id order,
//! then rejects, reactivates, restores or opens. Time only moves forward (`greatest`), so out-of-order batches from
//! several workers cannot move it back. A heartbeat for an unknown, ended or foreign session, or for a connection
//! that is not the agent's or was closed for a reason other than staleness, changes nothing.

mod slow_path;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;

use deadpool_postgres::{Pool, Transaction};
use serde::Deserialize;
use serde_json::Value;

use self::slow_path::{connections_slow_path, sessions_slow_path, Verdict};
use super::{Context, Message, Outcome, Queue, Sender};
use crate::db::{Param, Sql};
use crate::domain::{Ident, Json, Timestamp};
use crate::error::{CommandError, Poison, Result};

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
    pub client_info: Option<Json>,
}

impl Message for Heartbeat {
    const TYPE: &'static str = "agent.heartbeat";
    const SENDER: Sender = Sender::Agent;
    const QUEUE: Queue = Queue::Heartbeats;
    type Reply = ();

    fn order_key(&self) -> String {
        self.session_id.to_string()
    }

    fn agent_id(&self) -> Option<&Ident> {
        Some(&self.agent_id)
    }

    /// One heartbeat, applied as a batch of one; a heartbeat that changed nothing is a `conflict`.
    async fn apply(&self, tx: &Transaction<'_>, ctx: &Context<'_>) -> Result<Outcome> {
        let every = Duration::from_secs(ctx.settings.worker.session_activity_granularity_secs);
        let report = apply_in(tx, std::slice::from_ref(self), every).await?;
        Ok(if report.rejected > 0 {
            Err(CommandError::Conflict("heartbeat changed nothing".into()))
        } else {
            Ok(serde_json::Value::Null)
        })
    }
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

/// Default `worker.session_activity_granularity_secs`: agent activity (a heartbeat, `connection.open`/`close`,
/// `instruction.ack`) moves its session's `last_activity_at` only when that is older than this.
pub const ACTIVITY_GRANULARITY_DEFAULT: Duration = Duration::from_secs(60);

/// Applies a batch in its own transaction, with the default activity granularity.
pub async fn apply_batch(pool: &Pool, heartbeats: &[Heartbeat]) -> Result<BatchReport> {
    apply_batch_then(pool, heartbeats, ACTIVITY_GRANULARITY_DEFAULT, || {}).await
}

/// Applies a batch in its own transaction, calling `applied` once its statements are done (its rows are locked)
/// and before the commit. A session's activity is written when older than `activity_every`.
///
/// The heartbeat consumer starts the next batch only then: a later batch that touches the same rows waits for this
/// one's commit, so its values (the latest `client_info`) are written last, while its other work overlaps the
/// commit.
pub async fn apply_batch_then(
    pool: &Pool,
    heartbeats: &[Heartbeat],
    activity_every: Duration,
    applied: impl FnOnce(),
) -> Result<BatchReport> {
    let mut client = crate::db::checkout(pool).await?;
    let tx = client.transaction().await?;
    let report = apply_in(&tx, heartbeats, activity_every).await?;
    applied();
    tx.commit().await?;
    Ok(report)
}

/// Applies a batch in one transaction with a savepoint per heartbeat: a heartbeat the database refuses (SQLSTATE
/// class 22 or 23) is rolled back to its savepoint and returned with its reason (by its index in `heartbeats`), the
/// others are committed together. `applied` is called as in [`apply_batch_then`].
///
/// This is the fallback for a batch that failed as a whole on a refused value: one bad heartbeat costs itself, not a
/// transaction per heartbeat. Heartbeats are applied in (session, connection) order, so locks are taken in about the
/// order of a whole batch; the last `client_info` given for a connection is still written last.
pub async fn apply_batch_isolating(
    pool: &Pool,
    heartbeats: &[Heartbeat],
    activity_every: Duration,
    applied: impl FnOnce(),
) -> Result<(BatchReport, Vec<(usize, Poison)>)> {
    let mut client = crate::db::checkout(pool).await?;
    let tx = client.transaction().await?;
    let mut order: Vec<usize> = (0..heartbeats.len()).collect();
    order.sort_by_key(|&i| (heartbeats[i].session_id.as_str(), heartbeats[i].connection_id.as_str()));
    let mut report = BatchReport { received: heartbeats.len(), ..Default::default() };
    let mut refused = Vec::new();
    for i in order {
        tx.batch_execute("SAVEPOINT heartbeat").await?;
        match apply_in(&tx, std::slice::from_ref(&heartbeats[i]), activity_every).await {
            Ok(one) => {
                tx.batch_execute("RELEASE SAVEPOINT heartbeat").await?;
                report.applied += one.applied;
                report.opened += one.opened;
                report.restored += one.restored;
                report.reactivated_sessions += one.reactivated_sessions;
                report.rejected += one.rejected;
            }
            Err(e) => match e.poison_reason() {
                Some(why) => {
                    tx.batch_execute("ROLLBACK TO SAVEPOINT heartbeat").await?;
                    tracing::warn!(connection_id = %heartbeats[i].connection_id, "heartbeat refused by the database: {why}");
                    refused.push((i, why));
                }
                None => return Err(e),
            },
        }
    }
    applied();
    tx.commit().await?;
    Ok((report, refused))
}

/// Checks and locks active sessions, and moves the activity forward of those whose `last_activity_at` is older
/// than $3 seconds; the pairs are (session, agent), sorted, so locks are taken in session order. Returns the
/// sessions that passed: active, and owned by the agent named with them.
///
/// Every passing session is locked as the update of the old fast path locked it (`FOR NO KEY UPDATE`: ending the
/// session waits for this batch, and this batch for an end under way), but only the due ones are written: a
/// session heard from within the granularity costs a row lock, not a new row version with four index entries.
const TOUCH_ACTIVE_SESSIONS: &str = "WITH ok AS ( \
        SELECT s.session_id, s.agent_id, s.last_activity_at < now() - $3::float8 * interval '1 second' AS due \
        FROM agent_session s JOIN unnest($1::text[], $2::text[]) AS v(sid, aid) \
          ON s.session_id = v.sid AND s.agent_id = v.aid \
        WHERE s.status = 'active' ORDER BY s.session_id FOR NO KEY UPDATE OF s), \
     touched AS ( \
        UPDATE agent_session s SET last_activity_at = greatest(s.last_activity_at, now()) \
        FROM ok WHERE ok.due AND s.session_id = ok.session_id RETURNING s.session_id) \
     SELECT session_id, agent_id FROM ok";

/// Refreshes active connections that belong to the agent and session named with them. Returns those it touched.
const TOUCH_ACTIVE_CONNECTIONS: &str = "UPDATE agent_connection c \
     SET last_heartbeat_at = greatest(c.last_heartbeat_at, now()), client_info = coalesce(v.info, c.client_info) \
     FROM unnest($1::text[], $2::text[], $3::text[], $4::jsonb[]) AS v(id, sid, aid, info) \
     WHERE c.connection_id = v.id AND c.session_id = v.sid AND c.agent_id = v.aid AND c.status = 'active' \
     RETURNING c.connection_id";

/// Applies a batch inside the caller's transaction.
///
/// The common case (an active, owned session and an active, owned connection) costs two statements for the whole
/// batch: [`TOUCH_ACTIVE_SESSIONS`] and [`TOUCH_ACTIVE_CONNECTIONS`], whose `WHERE` clauses are the checks and
/// whose row locks are those of the update itself. Whatever they do not return (unknown, foreign, inactive or
/// ended sessions; unknown, foreign or closed connections) takes the slow path, which locks the rows in id order,
/// classifies them and rejects, reactivates, restores or opens.
pub async fn apply_in(tx: &Transaction<'_>, heartbeats: &[Heartbeat], activity_every: Duration) -> Result<BatchReport> {
    let mut report = BatchReport { received: heartbeats.len(), ..Default::default() };
    // Coalesce: one entry per (connection, agent, session), keeping the last client_info given. Keys sort by
    // connection id, so connection rows are locked in id order.
    let mut latest: BTreeMap<(&str, &str, &str), Option<&Value>> = BTreeMap::new();
    for h in heartbeats {
        let entry = latest.entry((h.connection_id.as_str(), h.agent_id.as_str(), h.session_id.as_str())).or_default();
        if let Some(info) = &h.client_info {
            *entry = Some(info.get());
        }
    }
    let pairs: BTreeSet<(&str, &str)> = latest.keys().map(|&(_, aid, sid)| (sid, aid)).collect();
    let (sids, aids): (Vec<&str>, Vec<&str>) = pairs.iter().copied().unzip();
    // Session id → owner, of the sessions touched.
    let every = activity_every.as_secs_f64();
    let touched: HashMap<String, String> = tx
        .typed_query(TOUCH_ACTIVE_SESSIONS, &[&sids as &dyn Param, &aids, &every])
        .await?
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    // Each pair's verdict: the fast path accepted the pairs of the sessions it touched; the slow path decides the rest.
    let mut verdicts: HashMap<(&str, &str), Verdict> = pairs
        .iter()
        .map(|&(sid, aid)| {
            let verdict = if touched.get(sid).is_some_and(|o| o == aid) { Verdict::Accept } else { Verdict::Undecided };
            ((sid, aid), verdict)
        })
        .collect();
    let slow: Vec<(&str, &str)> = pairs.iter().copied().filter(|p| verdicts[p] == Verdict::Undecided).collect();
    if !slow.is_empty() {
        verdicts.extend(sessions_slow_path(tx, &slow, &mut report).await?);
    }
    let mut valid = Vec::with_capacity(latest.len());
    for (&(cid, aid, sid), info) in &latest {
        match verdicts[&(sid, aid)] {
            Verdict::Accept => valid.push((cid, aid, sid, *info)),
            Verdict::Reject(why) => {
                report.rejected += 1;
                tracing::warn!(connection_id = cid, agent_id = aid, session_id = sid, "heartbeat rejected: {why}");
            }
            Verdict::Undecided => unreachable!("the slow path decides every pair it is given"),
        }
    }
    if valid.is_empty() {
        return Ok(report);
    }
    let ids: Vec<&str> = valid.iter().map(|v| v.0).collect();
    let vaids: Vec<&str> = valid.iter().map(|v| v.1).collect();
    let vsids: Vec<&str> = valid.iter().map(|v| v.2).collect();
    let infos: Vec<Option<Value>> = valid.iter().map(|v| v.3.cloned()).collect();
    let refreshed: HashSet<String> = tx
        .typed_query(TOUCH_ACTIVE_CONNECTIONS, &[&ids as &dyn Param, &vsids, &vaids, &infos])
        .await?
        .into_iter()
        .map(|r| r.get(0))
        .collect();
    report.applied += refreshed.len();
    let rest: Vec<_> = valid.into_iter().filter(|v| !refreshed.contains(v.0)).collect();
    if !rest.is_empty() {
        connections_slow_path(tx, &rest, &mut report).await?;
    }
    Ok(report)
}
