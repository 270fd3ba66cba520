//! Property tests of the parser at the edge: whatever arrives — arbitrary bytes, or JSON objects shaped like every
//! registered message with arbitrary, mistyped or missing fields — `Command::parse` never panics, and every input is
//! either a command of the `type` it names or poison with a kind and a non-empty reason.

use agent_connection_manager::commands::{Command, REGISTRY};
use agent_connection_manager::error::Poison;
use proptest::prelude::*;
use serde_json::{json, Map, Value};

const MAX: usize = 1 << 20;

/// Strings a field might plausibly hold, valid or not for it: ids, a UUID, timestamps, enum labels, NUL, control
/// characters, the empty string and an over-long one.
fn plausible_string() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("a".to_string()),
        Just("s-1".to_string()),
        Just("6f1c2a8e-8d3b-4c5e-9f00-123456789abc".to_string()),
        Just("2026-01-02T03:04:05Z".to_string()),
        Just("2026-01-02 03:04:05".to_string()),
        Just("processed".to_string()),
        Just("high".to_string()),
        Just("client_disconnect".to_string()),
        Just("stale_connection".to_string()),
        Just(String::new()),
        Just("x\u{0}y".to_string()),
        Just("tab\there".to_string()),
        Just("x".repeat(300)),
        any::<String>(),
    ]
}

/// Any JSON value, a few levels deep, with plausible and arbitrary leaves.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>().prop_filter("JSON numbers are finite", |f| f.is_finite()).prop_map(|f| json!(f)),
        plausible_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(plausible_string(), inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// An object shaped like a registered message: its `type`, each of its fields present or not with any value, and
/// sometimes a field it does not have.
fn shaped_message() -> impl Strategy<Value = Value> {
    (0..REGISTRY.len()).prop_flat_map(|i| {
        let entry = &REGISTRY[i];
        let fields: Vec<String> =
            (entry.message_schema)()["properties"].as_object().map(|p| p.keys().cloned().collect()).unwrap_or_default();
        let n = fields.len();
        (
            Just(entry.type_name),
            Just(fields),
            prop::collection::vec(prop::option::weighted(0.8, json_value()), n),
            prop::option::of((plausible_string(), json_value())),
        )
            .prop_map(|(ty, fields, values, extra)| {
                let mut obj = Map::new();
                obj.insert("type".into(), json!(ty));
                for (f, v) in fields.into_iter().zip(values) {
                    if let Some(v) = v {
                        obj.insert(f, v);
                    }
                }
                if let Some((k, v)) = extra {
                    obj.entry(k).or_insert(v);
                }
                Value::Object(obj)
            })
    })
}

/// What every parse must give: a command of the named type, or poison with a kind and a reason.
fn check(body: &[u8], named_type: Option<&str>) -> Result<(), TestCaseError> {
    match Command::parse(body, MAX) {
        Ok(cmd) => {
            if let Some(ty) = named_type {
                prop_assert_eq!(cmd.type_name(), ty);
            }
        }
        Err(Poison { kind, detail }) => {
            prop_assert!(!detail.trim().is_empty(), "poison without a reason");
            prop_assert!(!kind.label().is_empty());
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_are_a_command_or_poison_with_a_reason(body in prop::collection::vec(any::<u8>(), 0..256)) {
        check(&body, None)?;
    }

    #[test]
    fn arbitrary_json_is_a_command_or_poison_with_a_reason(v in json_value()) {
        check(v.to_string().as_bytes(), None)?;
    }

    #[test]
    fn messages_shaped_like_every_type_are_a_command_or_poison_with_a_reason(v in shaped_message()) {
        let ty = v["type"].as_str().map(str::to_string);
        check(v.to_string().as_bytes(), ty.as_deref())?;
    }
}
