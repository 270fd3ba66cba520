//! Messages in: the registry of message types, parsing at the edge, and applying each command in one transaction.
//!
//! Each message type lives in its own module and declares everything about itself by implementing [`Message`]: its
//! `type` (also its routing key), who may send it, the queue it is consumed from, how commands on the same object
//! are ordered, its reply's type (for the schemas) and its `apply`, which changes the database and writes its events
//! to the outbox in the caller's transaction. [`REGISTRY`] lists the types, one line each; the consumers, the schema
//! generator and the topology read it. Handlers refuse (with a [`CommandError`]) before they write anything, so a
//! refusal commits nothing but the idempotency record.

pub mod connection;
mod execute;
pub mod heartbeat;
pub mod instruction;
pub mod limits;
pub mod log;
pub mod log_get;
pub mod replies;
pub mod session;
pub mod stats;

pub use execute::{body_digest, execute, reply_json, Meta};

use std::any::Any;
use std::fmt::Debug;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;
use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::config::Settings;
use crate::db::Sql;
use crate::domain::{Ident, SessionStatus};
use crate::error::{CommandError, Poison, PoisonKind, Result};
use crate::events::{events_at, Event, EventBody};

/// What a handler decided: the reply's `result`, or why it refused.
pub type Outcome = std::result::Result<Value, CommandError>;

/// Who may send a message type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Sender {
    /// An agent, about its own sessions, connections and instructions.
    Agent,
    /// The backend.
    Backend,
}

/// The queue a message type is consumed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queue {
    /// `<prefix>.heartbeats`, applied in batches without replies.
    Heartbeats,
    /// `<prefix>.commands`, applied one by one in lanes, with replies.
    Commands,
    /// `<prefix>.logs`, agents' log lines applied in batches without replies (a queue of their own, so that a flood
    /// of log lines never delays heartbeats or commands).
    Logs,
}

/// Everything about one message type. Implement it in the type's module and add one line to [`REGISTRY`].
pub trait Message: DeserializeOwned + JsonSchema + Debug + Clone + Send + Sync + 'static {
    /// The message `type`, which is also its routing key.
    const TYPE: &'static str;
    /// Who may send it.
    const SENDER: Sender;
    /// The queue it is consumed from.
    const QUEUE: Queue = Queue::Commands;
    /// A read-only command changes nothing, so it keeps no idempotency record.
    const READ_ONLY: bool = false;
    /// The reply's `result` (its schema is published in `schema/replies/`).
    type Reply: JsonSchema;

    /// Checks what the field types alone do not; the error is the poison reason.
    fn check(&self) -> std::result::Result<(), String> {
        Ok(())
    }

    /// Commands with the same key are applied in the order they were received; others run concurrently.
    fn order_key(&self) -> String;

    /// The agent an agent's message names: every [`Sender::Agent`] message names one (`Some`), and acts only on
    /// that agent's objects; `None` for backend messages.
    fn agent_id(&self) -> Option<&Ident> {
        None
    }

    /// Applies the command in the caller's transaction, writing its events to the outbox there.
    fn apply(&self, tx: &Transaction<'_>, ctx: &Context<'_>) -> impl Future<Output = Result<Outcome>> + Send;
}

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The object-safe face of a [`Message`], so a parsed command of any type can be held and applied.
trait Dispatch: Debug + Send + Sync {
    fn order_key(&self) -> String;
    fn agent_id(&self) -> Option<&Ident>;
    fn apply<'a>(&'a self, tx: &'a Transaction<'a>, ctx: &'a Context<'a>) -> BoxFuture<'a, Result<Outcome>>;
    fn as_any(&self) -> &dyn Any;
    fn into_any(self: Box<Self>) -> Box<dyn Any>;
}

impl<T: Message> Dispatch for T {
    fn order_key(&self) -> String {
        Message::order_key(self)
    }
    fn agent_id(&self) -> Option<&Ident> {
        Message::agent_id(self)
    }
    fn apply<'a>(&'a self, tx: &'a Transaction<'a>, ctx: &'a Context<'a>) -> BoxFuture<'a, Result<Outcome>> {
        Box::pin(Message::apply(self, tx, ctx))
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

/// One registered message type.
#[derive(Debug)]
pub struct Entry {
    /// Its `type` and routing key.
    pub type_name: &'static str,
    /// Who may send it.
    pub sender: Sender,
    /// Where it is consumed.
    pub queue: Queue,
    /// Whether it changes nothing.
    pub read_only: bool,
    parse: fn(Value) -> std::result::Result<Box<dyn Dispatch>, String>,
    /// Its JSON Schema (without the `type` field, which the schema generator adds).
    pub message_schema: fn() -> Value,
    /// The JSON Schema of its reply's `result`.
    pub reply_schema: fn() -> schemars::Schema,
}

impl Entry {
    /// The entry of a message type.
    pub const fn of<T: Message>() -> Entry {
        Entry {
            type_name: T::TYPE,
            sender: T::SENDER,
            queue: T::QUEUE,
            read_only: T::READ_ONLY,
            parse: parse_as::<T>,
            message_schema: schema_of::<T>,
            reply_schema: reply_schema_of::<T>,
        }
    }
}

/// Every message type this service accepts, one line each.
pub static REGISTRY: &[Entry] = &[
    Entry::of::<heartbeat::Heartbeat>(),
    Entry::of::<session::Create>(),
    Entry::of::<session::Close>(),
    Entry::of::<connection::Open>(),
    Entry::of::<connection::Close>(),
    Entry::of::<instruction::Create>(),
    Entry::of::<instruction::Sent>(),
    Entry::of::<instruction::Ack>(),
    Entry::of::<stats::Get>(),
    Entry::of::<log::AgentLog>(),
    Entry::of::<log_get::Get>(),
];

/// The registry entry of a message `type`.
pub fn entry(type_name: &str) -> Option<&'static Entry> {
    REGISTRY.iter().find(|e| e.type_name == type_name)
}

fn parse_as<T: Message>(value: Value) -> std::result::Result<Box<dyn Dispatch>, String> {
    let msg: T = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            e.inner().to_string()
        } else {
            format!("field `{path}`: {}", e.inner())
        }
    })?;
    msg.check()?;
    Ok(Box::new(msg))
}

fn schema_of<T: Message>() -> Value {
    serde_json::to_value(schemars::schema_for!(T)).unwrap_or(Value::Null)
}

fn reply_schema_of<T: Message>() -> schemars::Schema {
    schemars::schema_for!(replies::Reply<T::Reply>)
}

/// A parsed message of any registered type.
#[derive(Debug)]
pub struct Command {
    entry: &'static Entry,
    msg: Box<dyn Dispatch>,
}

impl Command {
    /// A command from a typed message (library calls).
    pub fn new<T: Message>(msg: T) -> Self {
        let entry = entry(T::TYPE).expect("every message type is in the registry");
        Command { entry, msg: Box::new(msg) }
    }

    /// Parses a message body; the error says why it is poison.
    pub fn parse(body: &[u8], max_bytes: usize) -> std::result::Result<Self, Poison> {
        if body.len() > max_bytes {
            return Err(Poison::new(
                PoisonKind::TooLarge,
                format!("too large: {} bytes, the limit is {max_bytes}", body.len()),
            ));
        }
        let value: Value =
            serde_json::from_slice(body).map_err(|e| Poison::new(PoisonKind::NotJson, format!("not JSON: {e}")))?;
        let Some(obj) = value.as_object() else {
            return Err(Poison::new(PoisonKind::NotObject, "not a JSON object"));
        };
        let ty = match obj.get("type") {
            None => return Err(Poison::new(PoisonKind::InvalidField, "missing field `type`")),
            Some(Value::String(t)) => t.as_str(),
            Some(_) => return Err(Poison::new(PoisonKind::InvalidField, "field `type`: must be a string")),
        };
        let Some(entry) = entry(ty) else {
            let shown: String = ty.chars().take(100).collect();
            return Err(Poison::new(PoisonKind::UnknownType, format!("unknown type `{shown}`")));
        };
        let msg = (entry.parse)(value).map_err(|why| Poison::new(PoisonKind::InvalidField, why))?;
        Ok(Command { entry, msg })
    }

    /// The message `type`.
    pub fn type_name(&self) -> &'static str {
        self.entry.type_name
    }

    /// The registry entry of its type.
    pub fn entry(&self) -> &'static Entry {
        self.entry
    }

    /// The `agent_id` an agent's message names; `None` for backend messages.
    pub fn claimed_agent(&self) -> Option<&Ident> {
        self.msg.agent_id()
    }

    /// Commands with the same key are applied in order; others run concurrently.
    pub fn order_key(&self) -> String {
        self.msg.order_key()
    }

    /// Applies the command in the caller's transaction.
    pub(crate) async fn apply(&self, tx: &Transaction<'_>, ctx: &Context<'_>) -> Result<Outcome> {
        self.msg.apply(tx, ctx).await
    }

    /// The typed message, when it is a `T`.
    pub fn downcast_ref<T: Message>(&self) -> Option<&T> {
        self.msg.as_any().downcast_ref()
    }

    /// The typed message itself, when it is a `T` (no copy: a batch of log lines is large).
    pub fn downcast<T: Message>(self) -> Option<T> {
        self.msg.into_any().downcast().ok().map(|m| *m)
    }
}

/// What handlers may read besides their command, and the events they decide.
pub struct Context<'a> {
    /// The service settings.
    pub settings: &'a Settings,
    /// Events decided so far, written to the outbox by [`execute`] in the same transaction, sent together with its
    /// last statements (one round trip for all of them instead of one each).
    events: Mutex<Vec<Event>>,
}

impl<'a> Context<'a> {
    fn new(settings: &'a Settings) -> Self {
        Context { settings, events: Mutex::default() }
    }

    /// Adds events, all with `occurred_at` = `now` (the database clock), to those the command writes to the outbox
    /// before it commits.
    pub fn emit(&self, now: DateTime<Utc>, bodies: Vec<EventBody>) {
        self.events.lock().unwrap_or_else(|e| e.into_inner()).extend(events_at(now, bodies));
    }

    /// The events decided so far (taking them).
    fn take_events(&self) -> Vec<Event> {
        std::mem::take(&mut *self.events.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Marks a session as touched by its agent: an inactive session becomes active, and the activity of an active one
/// moves forward when it is older than `worker.session_activity_granularity_secs` (as a heartbeat moves it), so that
/// a stream of acknowledgements does not write a new session row version, with four index entries, each time. The
/// callers hold the session's row lock already.
pub(crate) async fn touch_session(tx: &Transaction<'_>, session_id: &str, ctx: &Context<'_>) -> Result<()> {
    let every = ctx.settings.worker.session_activity_granularity_secs as f64;
    let rows = tx
        .typed_query(
            "UPDATE agent_session SET last_activity_at = greatest(last_activity_at, now()), status = 'active' \
             WHERE session_id = $1 AND (status = 'inactive' \
               OR (status = 'active' AND last_activity_at < now() - $2::float8 * interval '1 second')) \
             RETURNING (SELECT status::text FROM agent_session o WHERE o.session_id = $1)",
            &[&session_id, &every],
        )
        .await?;
    if let Some(row) = rows.first() {
        if row.get::<_, Option<SessionStatus>>(0) == Some(SessionStatus::Inactive) {
            tracing::info!(session_id, "session active again");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
