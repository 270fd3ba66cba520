//! JSON Schemas of every message in, reply and event out, generated from the Rust types into `schema/`.
//!
//! `tests/schemas.rs` fails when the files in `schema/` differ from what this module generates; run it with
//! `ACM_UPDATE_SCHEMAS=1` to rewrite them.

use schemars::{schema_for, JsonSchema};
use serde_json::{json, Value};

use crate::commands::replies::{
    AckResult, Closed, ConnectionOpened, InstructionCreated, InstructionStatus, Reply, SessionCreated,
};
use crate::commands::stats::ConnectionStats;
use crate::commands::{connection, heartbeat, instruction, session};
use crate::events::{Event, EVENT_TYPES};

fn to_value<T: JsonSchema>() -> Value {
    serde_json::to_value(schema_for!(T)).unwrap_or(Value::Null)
}

/// A command's schema: its struct plus the `type` field.
fn message<T: JsonSchema>(ty: &str) -> Value {
    let mut v = to_value::<T>();
    with_type(&mut v, ty);
    v
}

fn with_type(v: &mut Value, ty: &str) {
    if let Some(obj) = v.as_object_mut() {
        obj.insert("title".into(), json!(ty));
        let props = obj.entry("properties").or_insert_with(|| json!({}));
        if let Some(p) = props.as_object_mut() {
            p.insert("type".into(), json!({ "const": ty, "description": "The message type (also its routing key)." }));
        }
        let req = obj.entry("required").or_insert_with(|| json!([]));
        if let Some(r) = req.as_array_mut() {
            r.insert(0, json!("type"));
        }
    }
}

/// Every schema, as (path under `schema/`, schema).
pub fn all() -> Vec<(String, Value)> {
    let mut out = vec![
        ("messages/agent.heartbeat.json".to_string(), message::<heartbeat::Heartbeat>("agent.heartbeat")),
        ("messages/session.create.json".into(), message::<session::Create>("session.create")),
        ("messages/session.close.json".into(), message::<session::Close>("session.close")),
        ("messages/connection.open.json".into(), message::<connection::Open>("connection.open")),
        ("messages/connection.close.json".into(), message::<connection::Close>("connection.close")),
        ("messages/instruction.create.json".into(), message::<instruction::Create>("instruction.create")),
        ("messages/instruction.sent.json".into(), message::<instruction::Sent>("instruction.sent")),
        ("messages/instruction.ack.json".into(), message::<instruction::Ack>("instruction.ack")),
    ];
    let mut stats = json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
    });
    with_type(&mut stats, "stats.get");
    out.push(("messages/stats.get.json".into(), stats));
    out.extend([
        ("replies/session.create.json".to_string(), to_value::<Reply<SessionCreated>>()),
        ("replies/session.close.json".into(), to_value::<Reply<Closed>>()),
        ("replies/connection.open.json".into(), to_value::<Reply<ConnectionOpened>>()),
        ("replies/connection.close.json".into(), to_value::<Reply<Closed>>()),
        ("replies/instruction.create.json".into(), to_value::<Reply<InstructionCreated>>()),
        ("replies/instruction.sent.json".into(), to_value::<Reply<InstructionStatus>>()),
        ("replies/instruction.ack.json".into(), to_value::<Reply<AckResult>>()),
        ("replies/stats.get.json".into(), to_value::<Reply<ConnectionStats>>()),
    ]);
    let events = to_value::<Event>();
    for ty in EVENT_TYPES {
        out.push((format!("events/{ty}.json"), event_schema(&events, ty)));
    }
    out.push(("events/all.json".into(), events));
    out
}

/// The schema of one event type: the branch of the `Event` schema whose `event_type` is `ty`, with the common
/// fields and the definitions it needs.
fn event_schema(all: &Value, ty: &str) -> Value {
    let mut v = all.clone();
    if let Some(obj) = v.as_object_mut() {
        obj.insert("title".into(), json!(ty));
        if let Some(Value::Array(branches)) = obj.get_mut("oneOf") {
            branches.retain(|b| b["properties"]["event_type"]["const"] == ty);
        }
    }
    v
}
