//! `logs.get`: agents' log lines by agent and/or session, oldest first, for a frontend's live tail.
//!
//! With `since_id`, the first `limit` lines after it (page forward, or poll for new lines); without, the newest
//! `limit` lines. Ids increase in commit order (see `log.rs`), so polling with the last id seen misses no line.

use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;
use serde::{Deserialize, Serialize};

use super::log::LogLevel;
use super::replies::result;
use super::{Context, Message, Outcome, Sender};
use crate::db::{Param, Sql};
use crate::domain::rules::optional_integer;
use crate::domain::Ident;
use crate::error::Result;

/// Most lines one `logs.get` returns.
pub const MAX_LIMIT: i64 = 1000;
/// Lines returned when `limit` is not given.
pub const DEFAULT_LIMIT: i64 = 100;

/// `logs.get`.
#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[schemars(extend("anyOf" = [
    { "description": "Name the agent, the session, or both.", "required": ["agent_id"],
      "properties": { "agent_id": { "type": "string" } } },
    { "required": ["session_id"], "properties": { "session_id": { "type": "string" } } }
]))]
pub struct Get {
    /// Lines of this agent.
    #[serde(default)]
    pub agent_id: Option<Ident>,
    /// Lines of this session.
    #[serde(default)]
    pub session_id: Option<Ident>,
    /// Only lines with a greater `id`; without it, the newest `limit` lines.
    #[serde(default, deserialize_with = "optional_integer")]
    #[schemars(range(min = 0, max = 9_223_372_036_854_775_807_i64))]
    pub since_id: Option<i64>,
    /// Most lines, 1-1000 (default 100).
    #[serde(default, deserialize_with = "optional_integer")]
    #[schemars(range(min = 1, max = 1000))]
    pub limit: Option<i64>,
    /// Only lines at this level or above.
    #[serde(default)]
    pub min_level: Option<LogLevel>,
}

/// The reply's `result`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Logs {
    /// The lines, oldest (lowest `id`) first.
    pub logs: Vec<LogLine>,
}

/// One stored line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct LogLine {
    /// Increasing id, the `since_id` cursor.
    pub id: i64,
    /// The agent.
    pub agent_id: String,
    /// Its session.
    pub session_id: String,
    /// The agent's time of the line (UTC).
    pub timestamp: DateTime<Utc>,
    /// The level.
    pub level: LogLevel,
    /// The logger.
    pub logger_name: String,
    /// The line.
    pub message: String,
}

impl Message for Get {
    const TYPE: &'static str = "logs.get";
    const SENDER: Sender = Sender::Backend;
    const READ_ONLY: bool = true;
    type Reply = Logs;

    fn check(&self) -> std::result::Result<(), String> {
        if self.agent_id.is_none() && self.session_id.is_none() {
            return Err("give `agent_id`, `session_id` or both".into());
        }
        if self.limit.is_some_and(|l| !(1..=MAX_LIMIT).contains(&l)) {
            return Err(format!("field `limit`: must be 1-{MAX_LIMIT}"));
        }
        if self.since_id.is_some_and(|s| s < 0) {
            return Err("field `since_id`: must be 0 or more".into());
        }
        Ok(())
    }

    fn order_key(&self) -> String {
        String::new()
    }

    async fn apply(&self, tx: &Transaction<'_>, _ctx: &Context<'_>) -> Result<Outcome> {
        Ok(Ok(result(Logs { logs: get(tx, self).await? })))
    }
}

/// The statements of a read keyed by `$key` (`session_id` when given, else `agent_id`, parameter `$p`): $1 agent and
/// $2 session when not null, level at least $3, at most $4 lines; with a cursor, those after $5 in `id` order, else
/// the newest (walking the `(key, id)` index backwards), returned oldest first. Static text, no value built in.
macro_rules! lines_sql {
    ($key:literal, $p:literal, after) => {
        concat!(
            "SELECT id, agent_id, session_id, logged_at, level, logger_name, message FROM agent_log WHERE ",
            $key,
            " = $",
            $p,
            " AND ($1::text IS NULL OR agent_id = $1) AND ($2::text IS NULL OR session_id = $2) AND level >= $3 \
             AND id > $5 ORDER BY id LIMIT $4"
        )
    };
    ($key:literal, $p:literal, newest) => {
        concat!(
            "SELECT id, agent_id, session_id, logged_at, level, logger_name, message FROM (SELECT * FROM agent_log \
             WHERE ",
            $key,
            " = $",
            $p,
            " AND ($1::text IS NULL OR agent_id = $1) AND ($2::text IS NULL OR session_id = $2) AND level >= $3 \
             ORDER BY id DESC LIMIT $4) AS l ORDER BY id"
        )
    };
}

/// A session's lines after a cursor.
const AFTER_BY_SESSION: &str = lines_sql!("session_id", "2", after);
/// An agent's lines after a cursor.
const AFTER_BY_AGENT: &str = lines_sql!("agent_id", "1", after);
/// A session's newest lines.
const NEWEST_BY_SESSION: &str = lines_sql!("session_id", "2", newest);
/// An agent's newest lines.
const NEWEST_BY_AGENT: &str = lines_sql!("agent_id", "1", newest);

/// Reads the lines a `logs.get` asks for.
pub async fn get(client: &impl Sql, q: &Get) -> Result<Vec<LogLine>> {
    let agent = q.agent_id.as_ref().map(|a| a.as_str());
    let session = q.session_id.as_ref().map(|s| s.as_str());
    let level = q.min_level.map_or(i16::MIN, LogLevel::number);
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT);
    let by_session = session.is_some();
    let rows = match q.since_id {
        Some(since) => {
            let sql = if by_session { AFTER_BY_SESSION } else { AFTER_BY_AGENT };
            client.typed_query(sql, &[&agent as &dyn Param, &session, &level, &limit, &since]).await?
        }
        None => {
            let sql = if by_session { NEWEST_BY_SESSION } else { NEWEST_BY_AGENT };
            client.typed_query(sql, &[&agent as &dyn Param, &session, &level, &limit]).await?
        }
    };
    Ok(rows
        .into_iter()
        .map(|r| LogLine {
            id: r.get(0),
            agent_id: r.get(1),
            session_id: r.get(2),
            timestamp: r.get(3),
            level: LogLevel::from_number(r.get(4)),
            logger_name: r.get(5),
            message: r.get(6),
        })
        .collect())
}
