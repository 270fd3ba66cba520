//! The published schemas are exactly as strict as the worker: boundary cases generated from every message schema
//! (each field at and past its bounds, in one-, two-, three- and four-byte characters, with control characters,
//! malformed and impossible timestamps, UUID forms, wrong types, `null`, missing; both deadlines) are judged by
//! the schema (the `jsonschema` crate with its default options, which do not enforce `format`, as client
//! validators do by default) and by the worker's parser (`Command::parse`, whose refusal dead-letters a message);
//! the two verdicts must agree on every case.

use agent_connection_manager::commands::Command;
use serde_json::{json, Map, Value};

/// Resolves `$ref` and picks the non-null branch of an optional field's `anyOf`.
fn resolve<'a>(schema: &'a Value, root: &'a Value) -> &'a Value {
    if let Some(r) = schema["$ref"].as_str() {
        return resolve(&root["$defs"][r.trim_start_matches("#/$defs/")], root);
    }
    if let Some(branches) = schema["anyOf"].as_array() {
        if let Some(b) = branches.iter().find(|b| b["type"] != "null") {
            if branches.len() == 2 {
                return resolve(b, root);
            }
        }
    }
    schema
}

/// A value the field's schema accepts, to build the valid message each case changes one thing of.
fn valid_value(schema: &Value, root: &Value) -> Value {
    let s = resolve(schema, root);
    if let Some(c) = s["oneOf"].as_array().and_then(|o| o.first()) {
        return c["const"].clone();
    }
    if let Some(c) = s.get("const") {
        return c.clone();
    }
    let ty = match &s["type"] {
        Value::Array(ts) => ts.iter().find(|t| *t != "null").cloned().unwrap_or(Value::Null),
        t => t.clone(),
    };
    match (ty.as_str(), s["pattern"].as_str()) {
        (Some("string"), _) if s["format"] == "uuid" => json!("0b6c2f4e-8f5a-4d0e-9a57-3f1f6b2d8c11"),
        (Some("string"), Some(p)) if p.contains("02-29") => json!("2026-01-02T03:04:05Z"),
        (Some("string"), _) => json!("a"),
        (Some("integer"), _) => json!(1),
        (Some("number"), _) => json!(1.5),
        (Some("object"), _) => json!({}),
        (Some("array"), _) => json!([]),
        _ => Value::Null,
    }
}

/// Strings of `n` copies of characters one to four bytes long.
fn lengths(n: usize) -> Vec<Value> {
    ["x", "é", "€", "😀"].iter().map(|c| json!(c.repeat(n))).collect()
}

/// An integer as JSON: exact when it fits 64 bits, else the nearest float.
fn int(n: i128) -> Value {
    i64::try_from(n).map(Value::from).or_else(|_| u64::try_from(n).map(Value::from)).unwrap_or(json!(n as f64))
}

/// The values every field is tried with, whatever its type, plus those at and past the field's own bounds.
fn candidates(schema: &Value, root: &Value) -> Vec<Value> {
    let mut v: Vec<Value> = vec![
        Value::Null,
        json!(true),
        json!(0),
        json!(1),
        json!(-1),
        json!(1.0),
        json!(1.5),
        json!(-0.5),
        json!(1e-9),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(""),
        json!("a"),
        json!("1"),
        json!([]),
        json!(["a"]),
        json!({}),
        json!({"k": "v", "n": [1, {"m": null}]}),
        // NUL anywhere in a JSON value, which jsonb cannot store.
        json!({"k": "a\u{0}"}),
        json!({"k\u{0}": 1}),
        json!(["a", ["b\u{0}"]]),
        // Control characters (Cc: C0, DEL, C1) and characters that are not.
        json!("a\u{0}b"),
        json!("a\u{1}"),
        json!("tab\there"),
        json!("line\n"),
        json!("del\u{7f}"),
        json!("c1\u{85}"),
        json!("c1\u{9f}"),
        json!("nbsp\u{a0}"),
        json!("ls\u{2028}"),
        json!("bom\u{feff}"),
        // Timestamps, accepted and not.
        json!("2026-01-02T03:04:05Z"),
        json!("2026-01-02T03:04:05.123456789+02:00"),
        json!("2026-01-02T03:04:05.1234567891234-05:30"),
        json!("2026-01-02t03:04:05z"),
        json!("2026-01-02 03:04:05Z"),
        json!("2026-01-02T03:04:05"),
        json!("2026-01-02T03:04:05.5"),
        json!("2026-01-02T03:04:60Z"),
        json!("2026-01-02T03:04:61Z"),
        json!("2026-01-02T24:00:00Z"),
        json!("2026-01-02T23:60:00Z"),
        json!("2026-13-01T00:00:00Z"),
        json!("2026-00-01T00:00:00Z"),
        json!("2026-01-00T00:00:00Z"),
        json!("2026-01-32T00:00:00Z"),
        json!("2026-04-31T00:00:00Z"),
        json!("2026-04-30T00:00:00Z"),
        json!("2026-02-29T00:00:00Z"),
        json!("2028-02-29T00:00:00Z"),
        json!("2100-02-29T00:00:00Z"),
        json!("2000-02-29T00:00:00Z"),
        json!("2026-02-30T00:00:00Z"),
        json!("0000-01-01T00:00:00Z"),
        json!("9999-12-31T23:59:59+23:59"),
        json!("2026-01-02T03:04:05+24:00"),
        json!("2026-01-02T03:04:05+02:60"),
        json!("2026-01-02T03:04:05+0200"),
        json!("2026-01-02T03:04:05+02"),
        json!("2026-01-02T03:04:05.Z"),
        json!("2026-01-02T03:04Z"),
        json!("2026-1-2T3:4:5Z"),
        json!("+2026-01-02T03:04:05Z"),
        json!("12026-01-02T03:04:05Z"),
        json!("2026-01-02"),
        json!("2026-01-02T03:04:05Z "),
        json!(" 2026-01-02T03:04:05Z"),
        json!("2026-01-02T03:04:05ZZ"),
        json!("2026-01-02T03:04:05 Z"),
        json!("yesterday"),
        // UUIDs in every form the parser reads, and not.
        json!("0b6c2f4e-8f5a-4d0e-9a57-3f1f6b2d8c11"),
        json!("0B6C2F4E-8F5A-4D0E-9A57-3F1F6B2D8C11"),
        json!("0b6c2f4e8f5a4d0e9a573f1f6b2d8c11"),
        json!("{0b6c2f4e-8f5a-4d0e-9a57-3f1f6b2d8c11}"),
        json!("urn:uuid:0b6c2f4e-8f5a-4d0e-9a57-3f1f6b2d8c11"),
        json!("URN:UUID:0b6c2f4e-8f5a-4d0e-9a57-3f1f6b2d8c11"),
        json!("{0b6c2f4e8f5a4d0e9a573f1f6b2d8c11}"),
        json!("0b6c2f4e-8f5a-4d0e-9a57-3f1f6b2d8c1"),
        json!("0b6c2f4e-8f5a-4d0e-9a57-3f1f6b2d8c11a"),
        json!("0b6c2f4e-8f5a-4d0e-9a57-3f1f6b2d8c1g"),
        json!("0b6c2f4e8f5a-4d0e-9a57-3f1f6b2d8c11"),
        // Enum labels, among them the worker's own close reasons.
        json!("client_disconnect"),
        json!("session_closed"),
        json!("stale_connection"),
        json!("Client_Disconnect"),
    ];
    let s = resolve(schema, root);
    if let Some(max) = s["maxLength"].as_u64() {
        v.extend(lengths(max as usize));
        v.extend(lengths(max as usize + 1));
        v.extend(lengths(max as usize - 1));
    }
    for key in ["minimum", "maximum", "exclusiveMinimum"] {
        if let Some(n) = s[key].as_i64().map(i128::from).or_else(|| s[key].as_u64().map(i128::from)) {
            v.extend([int(n), int(n + 1), int(n - 1)]);
        }
        if let Some(n) = s[key].as_f64() {
            v.extend([json!(n), json!(n + 0.5), json!(n - 0.5), json!(n * (1.0 + f64::EPSILON))]);
        }
    }
    v
}

/// The verdicts of the schema and of the parser on one message.
struct Judge<'a> {
    validator: jsonschema::Validator,
    ty: &'a str,
    cases: usize,
    disagreements: Vec<String>,
}

impl Judge<'_> {
    fn case(&mut self, what: &str, msg: &Value) {
        self.cases += 1;
        let by_schema = self.validator.is_valid(msg);
        let by_parser = Command::parse(&serde_json::to_vec(msg).unwrap(), usize::MAX);
        if by_schema != by_parser.is_ok() {
            let shown: String = msg.to_string().chars().take(300).collect();
            self.disagreements.push(format!(
                "{}: {what}: schema {}, parser {} — {shown}",
                self.ty,
                if by_schema { "accepts" } else { "refuses" },
                match by_parser {
                    Ok(_) => "accepts".to_string(),
                    Err(p) => format!("refuses ({p})"),
                }
            ));
        }
    }
}

#[test]
fn schema_and_parser_agree_on_every_boundary_case() {
    let mut total = 0;
    let mut disagreements = Vec::new();
    for (rel, schema) in agent_connection_manager::schema::all() {
        let Some(ty) = rel.strip_prefix("messages/").and_then(|r| r.strip_suffix(".json")) else { continue };
        let validator = jsonschema::validator_for(&schema).unwrap_or_else(|e| panic!("{rel}: {e}"));
        let mut judge = Judge { validator, ty, cases: 0, disagreements: Vec::new() };
        let props = schema["properties"].as_object().cloned().unwrap_or_default();
        let required: Vec<&str> = schema["required"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
        // The smallest valid message, and the one with every field.
        let mut base = Map::new();
        let mut full = Map::new();
        for (name, p) in &props {
            let v = valid_value(p, &schema);
            if required.contains(&name.as_str()) {
                base.insert(name.clone(), v.clone());
            }
            full.insert(name.clone(), v);
        }
        if ty == "instruction.create" {
            full.remove("ttl_seconds");
        }
        // A message that must name one of several fields (`anyOf` of `required`): the smallest names the first.
        if let Some(first) = schema["anyOf"].as_array().and_then(|a| a.first()) {
            for name in first["required"].as_array().into_iter().flatten().filter_map(Value::as_str) {
                base.insert(name.to_string(), valid_value(&props[name], &schema));
            }
        }
        let (base, full) = (Value::Object(base), Value::Object(full));
        assert!(judge.validator.is_valid(&base), "{ty}: the schema refuses {base}");
        assert!(
            Command::parse(&serde_json::to_vec(&base).unwrap(), usize::MAX).is_ok(),
            "{ty}: the parser refuses {base}"
        );
        judge.case("every field", &full);
        for (name, p) in &props {
            for start in [&base, &full] {
                let mut without = start.clone();
                without.as_object_mut().unwrap().remove(name);
                judge.case(&format!("without `{name}`"), &without);
                for c in candidates(p, &schema) {
                    let mut m = start.clone();
                    m[name] = c;
                    judge.case(&format!("`{name}`"), &m);
                }
            }
        }
        judge.case("not an object", &json!([ty]));
        judge.case("an unknown field", &{
            let mut m = base.clone();
            m["unknown_field"] = json!(1);
            m
        });
        if ty == "instruction.create" {
            for (e, t) in [
                (json!("2026-01-02T03:04:05Z"), json!(60)),
                (Value::Null, json!(60)),
                (json!("2026-01-02T03:04:05Z"), Value::Null),
                (Value::Null, Value::Null),
            ] {
                let mut m = base.clone();
                m["expires_at"] = e;
                m["ttl_seconds"] = t;
                judge.case("both deadlines", &m);
            }
        }
        println!("{ty}: {} cases", judge.cases);
        total += judge.cases;
        disagreements.extend(judge.disagreements);
    }
    println!("{total} cases, {} disagreements", disagreements.len());
    assert!(
        disagreements.is_empty(),
        "{} of {total} cases judged differently:\n{}",
        disagreements.len(),
        disagreements.join("\n")
    );
    assert!(total > 1000, "only {total} cases were generated");
}
