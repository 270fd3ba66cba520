//! `agent.log`: an agent's log lines for one of its sessions, applied in batches from `<prefix>.logs`.
//!
//! A batch of messages is owner-checked with one query (the session must exist and be the agent's, whatever its
//! status: an agent may flush its last lines after its session ended) and its lines stored with one `INSERT` in one
//! transaction. A bad entry costs only itself: the message's other entries are stored, the bad one is left out,
//! logged and counted (`acm_messages_total{type="agent.log.entry", outcome="invalid"}`); the message is not
//! dead-lettered, since redelivering it would store its good lines twice. A message of a foreign or unknown session
//! stores nothing and is counted `rejected`. Ingest transactions take one transaction-level advisory lock
//! ([`LOG_LOCK`]) before they insert, so ids are committed in increasing order and a reader following `since_id`
//! misses no line; the same lock keeps partition changes from racing ingest.

use std::collections::HashMap;

use chrono::{DateTime, Datelike, NaiveDate, Utc};
use deadpool_postgres::{GenericClient, Pool, Transaction};
use serde::Deserialize;
use serde_json::Value;

use super::{Context, Message, Outcome, Queue, Sender};
use crate::db::{Param, Sql};
use crate::domain::{Ident, Timestamp};
use crate::error::Result;

/// Most entries in one `agent.log` message.
pub const MAX_ENTRIES: usize = 500;
/// Longest `message` of an entry, in bytes (UTF-8).
pub const MAX_MESSAGE_BYTES: usize = 16_384;
/// Longest `logger_name` of an entry, in bytes (UTF-8).
pub const MAX_LOGGER_NAME_BYTES: usize = 255;
/// The transaction-level advisory lock key that ingest and partition changes take (`agent_log` in ASCII).
pub const LOG_LOCK: i64 = 0x6167_656e_745f_6c6f;

/// `agent.log`.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
pub struct AgentLog {
    /// The agent.
    pub agent_id: Ident,
    /// Its session.
    pub session_id: Ident,
    /// Up to 500 entries, each `{"timestamp", "level", "logger_name", "message"}` (a `LogEntry`: RFC 3339 time,
    /// DEBUG to CRITICAL, a logger name up to 255 bytes, a message up to 16,384 bytes); an entry that does not match
    /// is left out alone and counted, the others are stored, so the message itself stays valid (see the protocol).
    #[schemars(with = "Vec<Value>", length(max = 500))]
    pub logs: Vec<Value>,
}

/// One log line as an agent sends it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
pub struct LogEntry {
    /// The agent's time of the line (RFC 3339; without an offset, UTC), years 1-9999.
    pub timestamp: Timestamp,
    /// The level.
    pub level: LogLevel,
    /// The logger, up to 255 bytes.
    #[schemars(length(max = 255))]
    pub logger_name: String,
    /// The line, up to 16,384 bytes.
    #[schemars(length(max = 16384))]
    pub message: String,
}

/// A log level, Python's five; read in any case, with `WARN` for `WARNING` and `FATAL` for `CRITICAL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, schemars::JsonSchema, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum LogLevel {
    /// 10.
    Debug,
    /// 20.
    Info,
    /// 30.
    Warning,
    /// 40.
    Error,
    /// 50.
    Critical,
}

impl LogLevel {
    /// Python's number of the level, as stored.
    pub fn number(self) -> i16 {
        match self {
            LogLevel::Debug => 10,
            LogLevel::Info => 20,
            LogLevel::Warning => 30,
            LogLevel::Error => 40,
            LogLevel::Critical => 50,
        }
    }

    /// The level of a stored number (the nearest at or below it).
    pub fn from_number(n: i16) -> Self {
        match n {
            i16::MIN..=19 => LogLevel::Debug,
            20..=29 => LogLevel::Info,
            30..=39 => LogLevel::Warning,
            40..=49 => LogLevel::Error,
            _ => LogLevel::Critical,
        }
    }

    /// Reads a level name in any case.
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_uppercase().as_str() {
            "DEBUG" => Ok(LogLevel::Debug),
            "INFO" => Ok(LogLevel::Info),
            "WARNING" | "WARN" => Ok(LogLevel::Warning),
            "ERROR" => Ok(LogLevel::Error),
            "CRITICAL" | "FATAL" => Ok(LogLevel::Critical),
            _ => Err(format!(
                "`{}` is not a level (DEBUG, INFO, WARNING, ERROR, CRITICAL)",
                s.chars().take(50).collect::<String>()
            )),
        }
    }
}

impl<'de> Deserialize<'de> for LogLevel {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        LogLevel::parse(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

impl LogEntry {
    /// Reads one entry of a message, checking what its types do not: the lengths, NUL characters (which `text`
    /// cannot store) and the year range PostgreSQL stores.
    pub fn read(value: &Value) -> std::result::Result<Self, String> {
        let e = LogEntry::deserialize(value).map_err(|e| e.to_string())?;
        if e.message.len() > MAX_MESSAGE_BYTES {
            return Err(format!("message: {} bytes, the limit is {MAX_MESSAGE_BYTES}", e.message.len()));
        }
        if e.logger_name.len() > MAX_LOGGER_NAME_BYTES {
            return Err(format!("logger_name: {} bytes, the limit is {MAX_LOGGER_NAME_BYTES}", e.logger_name.len()));
        }
        if e.message.contains('\0') || e.logger_name.contains('\0') {
            return Err("contains a NUL character (\\u0000), which text cannot store".into());
        }
        if !(1..=9999).contains(&e.timestamp.0.year()) {
            return Err("timestamp: the year must be 1-9999".into());
        }
        Ok(e)
    }
}

impl AgentLog {
    /// The entries that are good, and each bad one's index and reason.
    pub fn entries(&self) -> (Vec<LogEntry>, Vec<(usize, String)>) {
        let mut good = Vec::with_capacity(self.logs.len());
        let mut bad = Vec::new();
        for (i, v) in self.logs.iter().enumerate() {
            match LogEntry::read(v) {
                Ok(e) => good.push(e),
                Err(why) => bad.push((i, why)),
            }
        }
        (good, bad)
    }
}

impl Message for AgentLog {
    const TYPE: &'static str = "agent.log";
    const SENDER: Sender = Sender::Agent;
    const QUEUE: Queue = Queue::Logs;
    type Reply = ();

    fn check(&self) -> std::result::Result<(), String> {
        if self.logs.len() > MAX_ENTRIES {
            return Err(format!("field `logs`: {} entries, the limit is {MAX_ENTRIES}", self.logs.len()));
        }
        Ok(())
    }

    fn order_key(&self) -> String {
        self.session_id.to_string()
    }

    fn agent_id(&self) -> Option<&Ident> {
        Some(&self.agent_id)
    }

    /// One message, applied as a batch of one.
    async fn apply(&self, tx: &Transaction<'_>, _ctx: &Context<'_>) -> Result<Outcome> {
        apply_in(tx, std::slice::from_ref(self)).await?;
        Ok(Ok(Value::Null))
    }
}

/// What a batch stored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogReport {
    /// Messages in the batch.
    pub received: usize,
    /// Messages refused whole: unknown session, or another agent's.
    pub rejected: usize,
    /// Lines stored.
    pub stored: usize,
    /// Entries left out as bad.
    pub invalid_entries: usize,
}

/// Owner of each session named: (session id, agent id).
const OWNERS: &str = "SELECT session_id, agent_id FROM agent_session WHERE session_id = ANY($1::text[])";

/// Takes [`LOG_LOCK`] and says whether the partition of the transaction's day exists.
const LOCK_AND_CHECK: &str =
    "SELECT now(), to_regclass('agent_log_' || to_char(now() AT TIME ZONE 'UTC', 'YYYYMMDD')) \
     IS NOT NULL FROM (SELECT pg_advisory_xact_lock($1)) AS l";

/// Stores lines, received now (public for the logs bench, which measures it alone).
pub const INSERT: &str = "INSERT INTO agent_log (agent_id, session_id, logged_at, level, logger_name, message) \
     SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::int2[], $5::text[], $6::text[])";

/// The name of a day's partition.
pub fn partition_name(day: NaiveDate) -> String {
    format!("agent_log_{}", day.format("%Y%m%d"))
}

/// The day of a partition's name, if it is one of ours.
pub fn partition_day(name: &str) -> Option<NaiveDate> {
    NaiveDate::parse_from_str(name.strip_prefix("agent_log_")?, "%Y%m%d").ok()
}

/// Creates a day's partition if it does not exist; the caller holds [`LOG_LOCK`]. Ingest creates the day it finds
/// missing, the `log_partitions` sweeper task the days ahead.
pub async fn create_day(client: &impl GenericClient, day: NaiveDate) -> Result<()> {
    let next = day.succ_opt().unwrap_or(day);
    let sql = format!(
        "CREATE TABLE IF NOT EXISTS {} PARTITION OF agent_log FOR VALUES FROM ('{day} 00:00:00+00') TO \
         ('{next} 00:00:00+00')",
        partition_name(day)
    );
    client.batch_execute(&sql).await?;
    tracing::info!(partition = %partition_name(day), "log partition created");
    Ok(())
}

/// Applies a batch in its own transaction.
pub async fn apply_batch(pool: &Pool, messages: &[AgentLog]) -> Result<LogReport> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let report = apply_in(&tx, messages).await?;
    tx.commit().await?;
    Ok(report)
}

/// Applies a batch inside the caller's transaction: owner check, then every good line in one `INSERT`.
pub async fn apply_in(tx: &Transaction<'_>, messages: &[AgentLog]) -> Result<LogReport> {
    let mut report = LogReport { received: messages.len(), ..Default::default() };
    let mut sids: Vec<&str> = messages.iter().map(|m| m.session_id.as_str()).collect();
    sids.sort_unstable();
    sids.dedup();
    let owners: HashMap<String, String> =
        tx.typed_query(OWNERS, &[&sids as &dyn Param]).await?.into_iter().map(|r| (r.get(0), r.get(1))).collect();
    let (mut aids, mut lsids, mut times, mut levels, mut loggers, mut texts) =
        (Vec::new(), Vec::new(), Vec::<DateTime<Utc>>::new(), Vec::new(), Vec::new(), Vec::new());
    for m in messages {
        let (agent_id, session_id) = (m.agent_id.as_str(), m.session_id.as_str());
        match owners.get(session_id) {
            Some(owner) if owner == agent_id => {}
            found => {
                report.rejected += 1;
                let why = if found.is_some() { "the session is another agent's" } else { "no such session" };
                tracing::warn!(agent_id, session_id, entries = m.logs.len(), "agent.log rejected: {why}");
                continue;
            }
        }
        let (good, bad) = m.entries();
        if let Some((first, why)) = bad.first() {
            report.invalid_entries += bad.len();
            tracing::warn!(
                agent_id,
                session_id,
                invalid = bad.len(),
                stored = good.len(),
                "agent.log entries left out; the first, at index {first}: {why}"
            );
        }
        for e in good {
            aids.push(agent_id);
            lsids.push(session_id);
            times.push(e.timestamp.0);
            levels.push(e.level.number());
            loggers.push(e.logger_name);
            texts.push(e.message);
        }
    }
    if aids.is_empty() {
        return Ok(report);
    }
    let row = tx.typed_one(LOCK_AND_CHECK, &[&LOG_LOCK]).await?;
    if !row.get::<_, bool>(1) {
        let now: DateTime<Utc> = row.get(0);
        create_day(tx, now.date_naive()).await?;
    }
    report.stored =
        tx.typed_execute(INSERT, &[&aids as &dyn Param, &lsids, &times, &levels, &loggers, &texts]).await? as usize;
    Ok(report)
}
