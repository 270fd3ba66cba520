//! JSON Schemas of every message in, reply and event out, generated from the Rust types into `schema/`, and the
//! tables of `docs/protocol.md` that list them.
//!
//! Both come from the registries: [`crate::commands::REGISTRY`] for messages and replies, the event list of
//! [`crate::events`] for events. `tests/schemas.rs` fails when `schema/` or the tables in `docs/protocol.md` differ
//! from what this module generates; `cargo run --example regenerate-schemas` rewrites them.

use schemars::{schema_for, JsonSchema};
use serde_json::{json, Value};

use crate::commands::{Queue, Sender, REGISTRY};
use crate::events::{Event, EVENT_TYPES};

fn to_value<T: JsonSchema>() -> Value {
    serde_json::to_value(schema_for!(T)).unwrap_or(Value::Null)
}

/// Adds the `type` field (the message type, also its routing key) to a message's schema.
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
    let mut out = Vec::new();
    for e in REGISTRY {
        let mut v = (e.message_schema)();
        with_type(&mut v, e.type_name);
        out.push((format!("messages/{}.json", e.type_name), v));
    }
    for e in REGISTRY.iter().filter(|e| e.queue == Queue::Commands) {
        let v = serde_json::to_value((e.reply_schema)()).unwrap_or(Value::Null);
        out.push((format!("replies/{}.json", e.type_name), v));
    }
    let events = to_value::<Event>();
    for ty in EVENT_TYPES {
        out.push((format!("events/{ty}.json"), event_schema(&events, ty)));
    }
    out.push(("events/all.json".into(), events));
    out
}

/// Every schema file's text, as (path under `schema/`, pretty-printed JSON with a final newline).
pub fn files() -> Vec<(String, String)> {
    all()
        .into_iter()
        .map(|(rel, v)| {
            let text = serde_json::to_string_pretty(&v).unwrap_or_default() + "\n";
            (rel, text)
        })
        .collect()
}

/// `docs/protocol.md`'s text with its generated tables as this module makes them; the error names a missing marker.
pub fn with_protocol_tables(doc: &str) -> Result<String, String> {
    let mut doc = doc.to_string();
    for (name, table) in protocol_tables() {
        let (begin, end) = (table_begin(name), table_end(name));
        let start = doc.find(&begin).ok_or_else(|| format!("docs/protocol.md has no `{begin}`"))? + begin.len();
        let stop = start + doc[start..].find(&end).ok_or_else(|| format!("docs/protocol.md has no `{end}`"))?;
        doc.replace_range(start..stop, &format!("\n{table}"));
    }
    Ok(doc)
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
        // Only the definitions this event refers to.
        let text = serde_json::to_string(&obj.get("oneOf")).unwrap_or_default();
        if let Some(Value::Object(defs)) = obj.get_mut("$defs") {
            defs.retain(|name, _| text.contains(&format!("\"#/$defs/{name}\"")));
            if defs.is_empty() {
                obj.remove("$defs");
            }
        }
    }
    v
}

/// Marks where a generated table begins in `docs/protocol.md` (`name` is `messages` or `events`).
pub fn table_begin(name: &str) -> String {
    format!("<!-- generated: {name} table (cargo run --example regenerate-schemas) -->")
}

/// Marks where a generated table ends.
pub fn table_end(name: &str) -> String {
    format!("<!-- end of generated {name} table -->")
}

/// The generated tables of `docs/protocol.md`, as (name, markdown).
pub fn protocol_tables() -> Vec<(&'static str, String)> {
    vec![("messages", messages_table()), ("events", events_table())]
}

fn field_list(schema: &Value, skip: &[&str]) -> String {
    let required: Vec<&str> =
        schema["required"].as_array().map(|r| r.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
    let mut fields: Vec<String> = schema["properties"]
        .as_object()
        .map(|p| {
            p.keys()
                .filter(|k| !skip.contains(&k.as_str()))
                .map(|k| if required.contains(&k.as_str()) { format!("`{k}`") } else { format!("`{k}`?") })
                .collect()
        })
        .unwrap_or_default();
    // Required fields first, in the schema's order of `required`; then the optional ones.
    fields.sort_by_key(|f| (f.ends_with('?'), required.iter().position(|r| f == &format!("`{r}`"))));
    fields.join(", ")
}

fn messages_table() -> String {
    let mut t = String::from(
        "| `type` = routing key | sent by | queue | fields (`?` optional) | schema |\n|---|---|---|---|---|\n",
    );
    for e in REGISTRY {
        let sender = match e.sender {
            Sender::Agent => "agent",
            Sender::Backend => "backend",
        };
        let (queue, reply) = match e.queue {
            Queue::Heartbeats => ("`<prefix>.heartbeats`", "none".to_string()),
            Queue::Commands => ("`<prefix>.commands`", format!("[reply](../schema/replies/{}.json)", e.type_name)),
            Queue::Logs => ("`<prefix>.logs`", "none".to_string()),
        };
        let fields = field_list(&(e.message_schema)(), &["type"]);
        let fields = if fields.is_empty() { "none".into() } else { fields };
        t.push_str(&format!(
            "| `{ty}` | {sender} | {queue} | {fields} | [message](../schema/messages/{ty}.json), {reply} |\n",
            ty = e.type_name
        ));
    }
    t
}

/// A field's type in words: `string`, `uuid`, `date-time`, `integer`, `boolean`, `any`, one of the enum's values,
/// `... or null`.
fn type_words(prop: &Value, defs: &Value) -> String {
    if let Some(r) = prop["$ref"].as_str() {
        let def = &defs[r.trim_start_matches("#/$defs/")];
        let values: Vec<String> = def["oneOf"]
            .as_array()
            .map(|o| o.iter().filter_map(|v| v["const"].as_str()).map(|v| format!("`{v}`")).collect())
            .unwrap_or_default();
        return format!("one of {}", values.join(", "));
    }
    let one = |t: &str| match (t, prop["format"].as_str()) {
        ("string", Some("uuid")) => "uuid".to_string(),
        ("string", Some("date-time")) => "date-time".to_string(),
        ("integer", _) => "integer".to_string(),
        (t, _) => t.to_string(),
    };
    match &prop["type"] {
        Value::String(t) => one(t),
        Value::Array(ts) => {
            let words: Vec<String> = ts.iter().filter_map(Value::as_str).filter(|t| *t != "null").map(one).collect();
            let null = if ts.iter().any(|t| t == "null") { " or null" } else { "" };
            format!("{}{null}", words.join(" or "))
        }
        _ if prop["anyOf"].is_array() => "any or null".to_string(),
        _ => "any".to_string(),
    }
}

fn events_table() -> String {
    let all = to_value::<Event>();
    let mut t = String::from("| `event_type` = routing key | fields | when | schema |\n|---|---|---|---|\n");
    for ty in EVENT_TYPES {
        let branch = all["oneOf"]
            .as_array()
            .and_then(|b| b.iter().find(|b| b["properties"]["event_type"]["const"] == *ty))
            .cloned()
            .unwrap_or(Value::Null);
        let when = branch["description"].as_str().unwrap_or_default().replace('\n', " ");
        let fields: Vec<String> = branch["properties"]
            .as_object()
            .map(|p| {
                p.iter()
                    .filter(|(k, _)| k.as_str() != "event_type")
                    .map(|(k, v)| format!("`{k}` {}", type_words(v, &all["$defs"])))
                    .collect()
            })
            .unwrap_or_default();
        t.push_str(&format!("| `{ty}` | {} | {when} | [schema](../schema/events/{ty}.json) |\n", fields.join(", ")));
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_registered_type_and_event_is_in_the_tables() {
        let tables = protocol_tables();
        for e in REGISTRY {
            assert!(tables[0].1.contains(&format!("| `{}` |", e.type_name)), "{}", e.type_name);
        }
        for ty in EVENT_TYPES {
            assert!(tables[1].1.contains(&format!("| `{ty}` |")), "{ty}");
        }
    }
}
