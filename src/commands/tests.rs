//! Parsing, the registry, authorization properties and stored replies, without a database.

use super::execute::outcome_from_reply;
use super::*;
use serde_json::json;

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
    let e =
        parse(r#"{"type":"instruction.create","session_id":"s","agent_id":"a","instruction_type":"t"}"#).unwrap_err();
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
        json!({"type": "agent.log", "agent_id": "a", "session_id": "s", "logs": []}),
        json!({"type": "logs.get", "session_id": "s"}),
    ]
}

#[test]
fn every_agent_message_names_its_agent() {
    let samples = samples();
    for e in REGISTRY {
        let body =
            samples.iter().find(|b| b["type"] == e.type_name).unwrap_or_else(|| panic!("no sample of {}", e.type_name));
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
        ("client_info", json!({"type": "agent.heartbeat", "agent_id": "a", "session_id": "s", "connection_id": "c"})),
        ("client_info", json!({"type": "connection.open", "agent_id": "a", "session_id": "s"})),
        ("payload", json!({"type": "instruction.create", "agent_id": "a", "session_id": "s", "instruction_type": "t"})),
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
