//! `agent.heartbeat`, applied in batches.
//!
//! A batch of deliveries is coalesced per (connection, agent, session) and applied in one transaction. In the common
//! case (the session is active and the agent's, the connection active and the agent's) that is two set-based
//! updates whose `WHERE` clauses are the checks; the rest goes through a slow path that locks the rows in id order,
//! then rejects, reactivates, restores or opens. Time only moves forward (`greatest`), so out-of-order batches from
//! several workers cannot move it back. A heartbeat for an unknown, ended or foreign session, or for a connection
//! that is not the agent's or was closed for a reason other than staleness, changes nothing.
//!
//! Freshness is measured from when the agent spoke ([`Rules`]): a heartbeat carries the monotonic time the worker
//! received it, and the database function `acm_heartbeat_clock` reads its `sent_at` against the connection's clock
//! offset (migration V20). A heartbeat whose agent spoke longer than the stale window ago refreshes, opens and
//! restores nothing (`late`).

mod slow_path;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use deadpool_postgres::{Pool, Transaction};
use serde::Deserialize;
use serde_json::Value;

pub(crate) use self::slow_path::lock_agents;
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
    /// The agent's clock when it sent the heartbeat, read against the connection's clock offset (protocol.md §3).
    #[serde(default)]
    pub sent_at: Option<Timestamp>,
    /// Replaces the connection's client info when given.
    #[serde(default)]
    pub client_info: Option<Json>,
    /// When the worker received it (monotonic, taken as the delivery came from the broker); `None`: now.
    #[serde(skip)]
    #[schemars(skip)]
    pub received: Option<Instant>,
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
        let rules = Rules { began: Some(Instant::now()), ..Rules::from(ctx.settings) };
        let report = apply_in(tx, std::slice::from_ref(self), &rules).await?;
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
    /// Connections whose heartbeats were late: their agent spoke longer than the stale window ago, so they
    /// refreshed, opened and restored nothing.
    pub late: usize,
    /// (connection, agent) of heartbeats refused by `limits.max_connections_per_agent`: they opened or restored
    /// nothing.
    pub limited: Vec<(String, String)>,
}

/// What a batch is judged by: the settings that decide whether a heartbeat refreshes its connection.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rules {
    /// A session's activity is written when older than this (`worker.session_activity_granularity_secs`).
    pub activity_every: Duration,
    /// A heartbeat whose agent spoke longer ago than this refreshes nothing (`sweeper.connection_stale_after_secs`).
    pub stale_after: Duration,
    /// Active connections one agent may have; a heartbeat opening or restoring one beyond it is refused.
    pub max_connections_per_agent: i64,
    /// When the batch's transaction began (set by the apply functions, just before `BEGIN` is sent): the receive
    /// times are taken back from it.
    pub began: Option<Instant>,
}

impl Default for Rules {
    fn default() -> Self {
        Self::from(&crate::config::Settings::default())
    }
}

impl From<&crate::config::Settings> for Rules {
    fn from(s: &crate::config::Settings) -> Self {
        Self {
            activity_every: Duration::from_secs(s.worker.session_activity_granularity_secs),
            stale_after: Duration::from_secs(s.sweeper.connection_stale_after_secs.get()),
            max_connections_per_agent: s.limits.max_connections_per_agent,
            began: None,
        }
    }
}

impl Rules {
    /// Length of one bucket of a connection's clock-offset window: a quarter of the stale window, so that an agent
    /// whose clock stepped back is judged by its new offset within half the stale window.
    pub fn clock_bucket_secs(&self) -> f64 {
        self.stale_after.as_secs_f64() / 4.0
    }
}

/// Applies a batch in its own transaction, with the default rules.
pub async fn apply_batch(pool: &Pool, heartbeats: &[Heartbeat]) -> Result<BatchReport> {
    apply_batch_then(pool, heartbeats, &Rules::default(), || {}).await
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
    rules: &Rules,
    applied: impl FnOnce(),
) -> Result<BatchReport> {
    let mut client = crate::db::checkout(pool).await?;
    let rules = Rules { began: Some(Instant::now()), ..*rules };
    let tx = client.transaction().await?;
    let report = apply_in(&tx, heartbeats, &rules).await?;
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
    rules: &Rules,
    applied: impl FnOnce(),
) -> Result<(BatchReport, Vec<(usize, Poison)>)> {
    let mut client = crate::db::checkout(pool).await?;
    let rules = &Rules { began: Some(Instant::now()), ..*rules };
    let tx = client.transaction().await?;
    let mut order: Vec<usize> = (0..heartbeats.len()).collect();
    order.sort_by_key(|&i| (heartbeats[i].session_id.as_str(), heartbeats[i].connection_id.as_str()));
    let mut report = BatchReport { received: heartbeats.len(), ..Default::default() };
    let mut refused = Vec::new();
    for i in order {
        tx.batch_execute("SAVEPOINT heartbeat").await?;
        match apply_in(&tx, std::slice::from_ref(&heartbeats[i]), rules).await {
            Ok(one) => {
                tx.batch_execute("RELEASE SAVEPOINT heartbeat").await?;
                report.applied += one.applied;
                report.opened += one.opened;
                report.restored += one.restored;
                report.reactivated_sessions += one.reactivated_sessions;
                report.rejected += one.rejected;
                report.late += one.late;
                report.limited.extend(one.limited);
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

/// Refreshes active connections that belong to the agent and session named with them, each to when its agent
/// spoke (`acm_heartbeat_clock`: the receive time $6 seconds before the transaction's `now()`, less the travel
/// time its `sent_at` $5 shows against the connection's clock offset, with buckets of $7 seconds). Returns those it
/// touched, and whether their agent spoke within the stale window ($8 seconds): a late heartbeat moves the clock
/// offset and `client_info` but not `last_heartbeat_at`.
const TOUCH_ACTIVE_CONNECTIONS: &str = "WITH v AS ( \
        SELECT id, sid, aid, info, sent, now() - held * interval '1 microsecond' AS recv \
        FROM unnest($1::text[], $2::text[], $3::text[], $4::jsonb[], $5::timestamptz[], $6::float8[]) \
          AS v(id, sid, aid, info, sent, held)), \
     k AS ( \
        SELECT c.connection_id, v.info, f.spoke, f.new_prev, f.new_cur, f.new_at, \
          f.spoke >= now() - $8::float8 * interval '1 second' AS fresh \
        FROM agent_connection c JOIN v ON c.connection_id = v.id AND c.session_id = v.sid AND c.agent_id = v.aid \
        CROSS JOIN LATERAL acm_heartbeat_clock(c.clock_offset_prev, c.clock_offset_cur, c.clock_bucket_at, \
          v.sent::timestamptz, v.recv, $7::float8) AS f \
        WHERE c.status = 'active' ORDER BY c.connection_id FOR NO KEY UPDATE OF c) \
     UPDATE agent_connection c \
       SET last_heartbeat_at = CASE WHEN k.fresh THEN greatest(c.last_heartbeat_at, k.spoke) \
         ELSE c.last_heartbeat_at END, \
       client_info = coalesce(k.info, c.client_info), clock_offset_prev = k.new_prev, \
       clock_offset_cur = k.new_cur, clock_bucket_at = k.new_at \
     FROM k WHERE c.connection_id = k.connection_id \
     RETURNING c.connection_id, k.fresh";

/// One coalesced heartbeat: the last `client_info` given for its connection, and the `sent_at` and receive time of
/// the last heartbeat delivered for it.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Latest<'a> {
    /// The last `client_info` given.
    pub info: Option<&'a Value>,
    /// The last heartbeat's `sent_at`.
    pub sent: Option<DateTime<Utc>>,
    /// When the worker received the last heartbeat.
    pub received: Option<Instant>,
}

impl Latest<'_> {
    /// Microseconds from when the worker received it to `began`, taken just before its transaction's `BEGIN` was
    /// sent (the statements subtract it from that transaction's `now()`); 0 for a heartbeat applied as it is
    /// received (a library call's). `began` is taken before `BEGIN`, not after its answer, so the receive time it
    /// gives errs late, never early: the clock offset keeps the largest `sent_at - received` seen, which would keep
    /// the earliest error, and a receive time read early (by a slow answer to `BEGIN` on a loaded machine) would
    /// make every later heartbeat of the connection look older than it is.
    pub fn held_micros(&self, began: Option<Instant>) -> i64 {
        match (self.received, began) {
            (Some(r), Some(b)) => i64::try_from(b.saturating_duration_since(r).as_micros()).unwrap_or(i64::MAX),
            _ => 0,
        }
    }

    /// `sent_at` in RFC 3339, as the statements take it (cast to `timestamptz` there).
    pub fn sent_text(&self) -> Option<String> {
        self.sent.map(|t| t.to_rfc3339())
    }
}

/// Applies a batch inside the caller's transaction.
///
/// The common case (an active, owned session and an active, owned connection) costs two statements for the whole
/// batch: [`TOUCH_ACTIVE_SESSIONS`] and [`TOUCH_ACTIVE_CONNECTIONS`], whose `WHERE` clauses are the checks and
/// whose row locks are those of the update itself. Whatever they do not return (unknown, foreign, inactive or
/// ended sessions; unknown, foreign or closed connections) takes the slow path, which locks the rows in id order,
/// classifies them and rejects, reactivates, restores or opens.
pub async fn apply_in(tx: &Transaction<'_>, heartbeats: &[Heartbeat], rules: &Rules) -> Result<BatchReport> {
    let mut report = BatchReport { received: heartbeats.len(), ..Default::default() };
    // Coalesce: one entry per (connection, agent, session), keeping the last client_info given and the last
    // heartbeat's times. Keys sort by connection id, so connection rows are locked in id order.
    let mut latest: BTreeMap<(&str, &str, &str), Latest> = BTreeMap::new();
    for h in heartbeats {
        let entry = latest.entry((h.connection_id.as_str(), h.agent_id.as_str(), h.session_id.as_str())).or_default();
        if let Some(info) = &h.client_info {
            entry.info = Some(info.get());
        }
        entry.sent = h.sent_at.as_ref().map(|t| t.0);
        entry.received = h.received;
    }
    let pairs: BTreeSet<(&str, &str)> = latest.keys().map(|&(_, aid, sid)| (sid, aid)).collect();
    let (sids, aids): (Vec<&str>, Vec<&str>) = pairs.iter().copied().unzip();
    // Session id → owner, of the sessions touched.
    let every = rules.activity_every.as_secs_f64();
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
    let infos: Vec<Option<Value>> = valid.iter().map(|v| v.3.info.cloned()).collect();
    let sents: Vec<Option<String>> = valid.iter().map(|v| v.3.sent_text()).collect();
    let helds: Vec<i64> = valid.iter().map(|v| v.3.held_micros(rules.began)).collect();
    let (bucket, stale) = (rules.clock_bucket_secs(), rules.stale_after.as_secs_f64());
    let mut refreshed = HashSet::new();
    for r in tx
        .typed_query(
            TOUCH_ACTIVE_CONNECTIONS,
            &[&ids as &dyn Param, &vsids, &vaids, &infos, &sents, &helds, &bucket, &stale],
        )
        .await?
    {
        let id: String = r.get(0);
        if r.get::<_, bool>(1) {
            report.applied += 1;
        } else {
            report.late += 1;
            tracing::debug!(connection_id = %id, "late heartbeat: its agent spoke longer than the stale window ago");
        }
        refreshed.insert(id);
    }
    let rest: Vec<_> = valid.into_iter().filter(|v| !refreshed.contains(v.0)).collect();
    if !rest.is_empty() {
        connections_slow_path(tx, &rest, rules, &mut report).await?;
    }
    Ok(report)
}
