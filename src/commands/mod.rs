//! Messages in: the registry of message types, parsing at the edge, and applying each command in one transaction.
//!
//! Each message type lives in its own module and declares everything about itself by implementing [`Message`]: its
//! `type` (also its routing key), who may send it, the queue it is consumed from, how commands on the same object
//! are ordered, its reply's type (for the schemas) and its `apply`, which changes the database and writes its events
//! to the outbox in the caller's transaction. [`REGISTRY`] lists the types, one line each; the consumers, the schema
//! generator and the topology read it. Handlers refuse (with a [`CommandError`]) before they write anything, so a
//! refusal commits nothing but the idempotency record.

pub mod connection;
pub mod heartbeat;
pub mod instruction;
pub mod replies;
pub mod session;
pub mod stats;

use std::any::Any;
use std::fmt::Debug;
use std::future::Future;
use std::pin::Pin;

use deadpool_postgres::{Pool, Transaction};
use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

use crate::config::Settings;
use crate::domain::{Ident, SessionStatus};
use crate::error::{CommandError, Poison, PoisonKind, Result};

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

    /// The typed message, when it is a `T`.
    pub fn downcast_ref<T: Message>(&self) -> Option<&T> {
        self.msg.as_any().downcast_ref()
    }
}

/// Where a command came from: AMQP properties that count, and the body's digest.
#[derive(Debug, Clone, Default)]
pub struct Meta {
    /// AMQP `message_id`: with the same sender and body, a redelivery gets the first reply and changes nothing.
    pub message_id: Option<String>,
    /// Broker-validated AMQP `user_id`; part of the idempotency key (`''` when absent).
    pub user_id: Option<String>,
    /// SHA-256 of the raw body ([`body_digest`]): a `message_id` reused with another body is refused.
    pub body_digest: Option<Vec<u8>>,
}

/// The SHA-256 of a message body, kept with its idempotency record.
pub fn body_digest(body: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(body).to_vec()
}

/// What handlers may read besides their command.
pub struct Context<'a> {
    /// The service settings.
    pub settings: &'a Settings,
}

/// A reply body: `{"ok": true, "result": ...}` or `{"ok": false, "error": {"code", "message"}}`.
pub fn reply_json(outcome: &Outcome) -> Value {
    match outcome {
        Ok(result) => json!({ "ok": true, "result": result }),
        Err(e) => json!({ "ok": false, "error": { "code": e.code(), "message": e.message() } }),
    }
}

fn outcome_from_reply(reply: &Value) -> Outcome {
    if reply["ok"] == Value::Bool(true) {
        return Ok(reply["result"].clone());
    }
    let message = reply["error"]["message"].as_str().unwrap_or_default().to_string();
    Err(match reply["error"]["code"].as_str() {
        Some("not_found") => CommandError::NotFound(message),
        Some("conflict") => CommandError::Conflict(message),
        Some("forbidden") => CommandError::Forbidden(message),
        _ => CommandError::Invalid(message),
    })
}

const CLAIM_MESSAGE: &str = "INSERT INTO processed_message (sender, message_type, message_id, body_digest) \
     VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING";
const STORED_REPLY: &str =
    "SELECT reply, body_digest FROM processed_message WHERE sender = $1 AND message_type = $2 AND message_id = $3";
const STORE_REPLY: &str =
    "UPDATE processed_message SET reply = $4 WHERE sender = $1 AND message_type = $2 AND message_id = $3";

/// Applies one command in one transaction and returns its outcome (heartbeats from their queue go through
/// [`heartbeat::apply_batch`] instead).
///
/// With a `message_id`, the first delivery's outcome is stored with its effect, keyed by (sender, type,
/// `message_id`) where the sender is the AMQP `user_id` (`''` without one), together with the body's digest. A
/// redelivery (or a concurrent duplicate on another worker, which waits on the key) with the same body returns the
/// stored outcome and changes nothing; the same key with another body is refused with `conflict` and changes
/// nothing. Read-only commands keep no record.
pub async fn execute(pool: &Pool, settings: &Settings, cmd: &Command, meta: &Meta) -> Result<Outcome> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let ty = cmd.type_name();
    let sender = meta.user_id.as_deref().unwrap_or("");
    let record = meta.message_id.as_ref().filter(|_| !cmd.entry.read_only);
    if let Some(mid) = record {
        if tx.execute(CLAIM_MESSAGE, &[&sender, &ty, mid, &meta.body_digest]).await? == 0 {
            let row = tx.query_one(STORED_REPLY, &[&sender, &ty, mid]).await?;
            let reply: Option<Value> = row.get(0);
            let digest: Option<Vec<u8>> = row.get(1);
            tx.commit().await?;
            if let (Some(first), Some(this)) = (&digest, &meta.body_digest) {
                if first != this {
                    tracing::warn!(message_id = %mid, message_type = ty, sender, "message_id reused for another body");
                    return Ok(Err(CommandError::Conflict(format!(
                        "message_id {mid} was already used for a different message"
                    ))));
                }
            }
            tracing::info!(message_id = %mid, message_type = ty, "duplicate message: replying as before");
            return Ok(reply.as_ref().map(outcome_from_reply).unwrap_or_else(|| Ok(Value::Null)));
        }
    }
    let ctx = Context { settings };
    let outcome = cmd.msg.apply(&tx, &ctx).await?;
    if let Some(mid) = record {
        tx.execute(STORE_REPLY, &[&sender, &ty, mid, &reply_json(&outcome)]).await?;
    }
    tx.commit().await?;
    Ok(outcome)
}

/// Marks a session as touched by its agent: activity moves forward, an inactive session becomes active.
pub(crate) async fn touch_session(tx: &Transaction<'_>, session_id: &str) -> Result<()> {
    let rows = tx
        .query(
            "UPDATE agent_session SET last_activity_at = greatest(last_activity_at, now()), status = 'active' \
             WHERE session_id = $1 AND status <> 'ended' \
             RETURNING (SELECT status FROM agent_session o WHERE o.session_id = $1)",
            &[&session_id],
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
mod tests {
    use super::*;

    fn parse(s: &str) -> std::result::Result<Command, String> {
        Command::parse(s.as_bytes(), 1 << 20).map_err(|p| p.to_string())
    }

    #[test]
    fn poison_reasons_are_precise() {
        assert!(parse("nope").unwrap_err().starts_with("not JSON"));
        assert_eq!(parse("[1]").unwrap_err(), "not a JSON object");
        assert_eq!(parse("{}").unwrap_err(), "missing field `type`");
        assert_eq!(parse(r#"{"type":1}"#).unwrap_err(), "field `type`: must be a string");
        assert_eq!(parse(r#"{"type":"x.y"}"#).unwrap_err(), "unknown type `x.y`");
        let e = parse(r#"{"type":"session.close"}"#).unwrap_err();
        assert!(e.contains("missing field `session_id`"), "{e}");
        let e = parse(r#"{"type":"instruction.create","session_id":"s","agent_id":"a","instruction_type":"t","payload":{},"max_retries":"3"}"#)
            .unwrap_err();
        assert!(e.contains("max_retries"), "{e}");
        let e = parse(r#"{"type":"agent.heartbeat","agent_id":"","session_id":"s","connection_id":"c"}"#).unwrap_err();
        assert!(e.contains("agent_id") && e.contains("empty"), "{e}");
        let too_large = Command::parse(&[b' '; 10], 5).unwrap_err();
        assert_eq!(too_large.kind, PoisonKind::TooLarge);
        assert!(too_large.to_string().starts_with("too large"));
    }

    #[test]
    fn poison_kinds_follow_the_failure() {
        let kind = |s: &str| Command::parse(s.as_bytes(), 1 << 20).unwrap_err().kind;
        assert_eq!(kind("nope"), PoisonKind::NotJson);
        assert_eq!(kind("[1]"), PoisonKind::NotObject);
        assert_eq!(kind(r#"{"type":"x.y"}"#), PoisonKind::UnknownType);
        assert_eq!(kind(r#"{"type":"session.close"}"#), PoisonKind::InvalidField);
    }

    #[test]
    fn payload_is_required_but_may_be_null() {
        let e = parse(r#"{"type":"instruction.create","session_id":"s","agent_id":"a","instruction_type":"t"}"#)
            .unwrap_err();
        assert!(e.contains("payload"), "{e}");
        assert!(parse(
            r#"{"type":"instruction.create","session_id":"s","agent_id":"a","instruction_type":"t","payload":null}"#
        )
        .is_ok());
    }

    #[test]
    fn expires_at_null_is_not_absent() {
        let cmd =
            parse(r#"{"type":"instruction.create","session_id":"s","agent_id":"a","instruction_type":"t","payload":1,"expires_at":null}"#).unwrap();
        let c = cmd.downcast_ref::<instruction::Create>().expect("an instruction.create");
        assert_eq!(c.expires_at, Some(None));
        let e = parse(r#"{"type":"instruction.create","session_id":"s","agent_id":"a","instruction_type":"t","payload":1,"expires_at":null,"ttl_seconds":5}"#).unwrap_err();
        assert!(e.contains("ttl_seconds"), "{e}");
    }

    #[test]
    fn stored_replies_round_trip() {
        for o in [Ok(json!({"closed": true})), Err(CommandError::NotFound("no such session".into()))] {
            assert_eq!(outcome_from_reply(&reply_json(&o)), o);
        }
    }

    #[test]
    fn the_registry_has_each_type_once_and_parses_it_to_its_own_type() {
        let mut seen = std::collections::HashSet::new();
        for e in REGISTRY {
            assert!(seen.insert(e.type_name), "{} registered twice", e.type_name);
            assert_eq!(entry(e.type_name).map(|x| x.type_name), Some(e.type_name));
        }
        let hb = parse(r#"{"type":"agent.heartbeat","agent_id":"a","session_id":"s","connection_id":"c"}"#).unwrap();
        assert_eq!(hb.type_name(), "agent.heartbeat");
        assert!(hb.downcast_ref::<heartbeat::Heartbeat>().is_some());
        assert!(hb.downcast_ref::<session::Close>().is_none());
        assert_eq!(hb.claimed_agent().map(Ident::as_str), Some("a"));
        let close = parse(r#"{"type":"session.close","session_id":"s"}"#).unwrap();
        assert_eq!(close.entry().sender, Sender::Backend);
        assert!(close.claimed_agent().is_none());
    }

    /// One valid body of every registered type.
    fn samples() -> Vec<Value> {
        let iid = "6f1c2a8e-8d3b-4c5e-9f00-123456789abc";
        vec![
            json!({"type": "agent.heartbeat", "agent_id": "a", "session_id": "s", "connection_id": "c"}),
            json!({"type": "session.create", "agent_id": "a"}),
            json!({"type": "session.close", "session_id": "s"}),
            json!({"type": "connection.open", "agent_id": "a", "session_id": "s", "connection_id": "c"}),
            json!({"type": "connection.close", "agent_id": "a", "connection_id": "c"}),
            json!({"type": "instruction.create", "agent_id": "a", "session_id": "s", "instruction_type": "t",
                   "payload": 1, "instruction_id": iid}),
            json!({"type": "instruction.sent", "instruction_id": iid}),
            json!({"type": "instruction.ack", "agent_id": "a", "session_id": "s", "instruction_id": iid,
                   "status": "processed"}),
            json!({"type": "stats.get"}),
        ]
    }

    #[test]
    fn every_agent_message_names_its_agent() {
        let samples = samples();
        for e in REGISTRY {
            let body = samples
                .iter()
                .find(|b| b["type"] == e.type_name)
                .unwrap_or_else(|| panic!("no sample of {}", e.type_name));
            let cmd = parse(&body.to_string()).unwrap_or_else(|why| panic!("{body}: {why}"));
            match e.sender {
                Sender::Agent => assert_eq!(
                    cmd.claimed_agent().map(Ident::as_str),
                    Some("a"),
                    "{} is an agent message: it must name its agent_id",
                    e.type_name
                ),
                Sender::Backend => assert!(cmd.claimed_agent().is_none(), "{}", e.type_name),
            }
        }
        let e = parse(r#"{"type":"connection.close","connection_id":"c"}"#).unwrap_err();
        assert!(e.contains("missing field `agent_id`"), "{e}");
    }

    #[test]
    fn commands_on_the_same_object_share_an_order_key() {
        let key = |s: &str| parse(s).unwrap().order_key();
        let iid = "6f1c2a8e-8d3b-4c5e-9f00-123456789abc";
        let open = key(r#"{"type":"connection.open","agent_id":"a","session_id":"s","connection_id":"c"}"#);
        let close = key(r#"{"type":"connection.close","agent_id":"a","connection_id":"c"}"#);
        assert_eq!(open, close);
        assert_eq!(key(r#"{"type":"connection.open","agent_id":"a","session_id":"s"}"#), "s");
        let create = key(&format!(
            r#"{{"type":"instruction.create","agent_id":"a","session_id":"s","instruction_type":"t","payload":1,"instruction_id":"{iid}"}}"#
        ));
        let sent = key(&format!(r#"{{"type":"instruction.sent","instruction_id":"{iid}"}}"#));
        let ack = key(&format!(
            r#"{{"type":"instruction.ack","agent_id":"a","session_id":"s","instruction_id":"{iid}","status":"received"}}"#
        ));
        assert_eq!((&create, &sent), (&ack, &ack));
        assert_eq!(
            key(r#"{"type":"instruction.create","agent_id":"a","session_id":"s","instruction_type":"t","payload":1}"#),
            "s"
        );
    }

    #[test]
    fn a_nul_in_any_json_field_is_poison_naming_the_field() {
        let iid = "6f1c2a8e-8d3b-4c5e-9f00-123456789abc";
        let cases = [
            (
                "client_info",
                json!({"type": "agent.heartbeat", "agent_id": "a", "session_id": "s", "connection_id": "c"}),
            ),
            ("client_info", json!({"type": "connection.open", "agent_id": "a", "session_id": "s"})),
            (
                "payload",
                json!({"type": "instruction.create", "agent_id": "a", "session_id": "s", "instruction_type": "t"}),
            ),
            (
                "instruction_metadata",
                json!({"type": "instruction.create", "agent_id": "a", "session_id": "s", "instruction_type": "t", "payload": 1}),
            ),
            (
                "result",
                json!({"type": "instruction.ack", "agent_id": "a", "session_id": "s", "instruction_id": iid, "status": "failed"}),
            ),
            ("experimental_parameters", json!({"type": "session.create", "agent_id": "a"})),
        ];
        for (field, base) in cases {
            for bad in [json!({"deep": ["ok", "x\u{0}y"]}), json!({"k\u{0}": 1})] {
                let mut body = base.clone();
                body[field] = bad;
                let p = Command::parse(body.to_string().as_bytes(), 1 << 20).unwrap_err();
                assert_eq!(p.kind, PoisonKind::InvalidField, "{body}");
                assert!(p.detail.contains(&format!("field `{field}`")) && p.detail.contains("NUL"), "{}", p.detail);
            }
            let mut body = base.clone();
            body[field] = json!({"fine": "x"});
            assert!(parse(&body.to_string()).is_ok(), "{body}");
        }
        let e = parse(r#"{"type":"session.create","agent_id":"a","experimental_parameters":[1]}"#).unwrap_err();
        assert!(e.contains("experimental_parameters"), "{e}");
    }

    #[test]
    fn a_client_closes_only_with_client_disconnect() {
        let close = |reason: &str| {
            parse(&format!(r#"{{"type":"connection.close","agent_id":"a","connection_id":"c","reason":"{reason}"}}"#))
        };
        let c = close("client_disconnect").unwrap();
        assert!(c.downcast_ref::<connection::Close>().is_some());
        for reason in ["stale_connection", "session_closed", "whatever"] {
            let e = close(reason).unwrap_err();
            assert!(e.contains("field `reason`"), "{e}");
        }
    }
}
