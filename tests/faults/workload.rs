//! The workload's messages: sessions, instructions, acknowledgements, heartbeats and malformed messages, each
//! identifiable afterwards.

use std::time::Duration;

use agent_connection_manager::client::{reply_result, Client};
use serde_json::{json, Value};

use crate::instruction_uuid;
use crate::publisher::Msg;

pub fn session_msg(i: usize) -> Msg {
    Msg::json(
        &json!({"type": "session.create", "agent_id": format!("a-{i}"), "session_id": format!("s-{i}"),
                "name": format!("fault-{i}")}),
        Some(format!("sc-{i}")),
    )
}

pub fn instruction_msg(j: usize, sessions: usize, expiring: bool) -> Msg {
    let k = j % sessions;
    let mut body = json!({"type": "instruction.create", "agent_id": format!("a-{k}"), "session_id": format!("s-{k}"),
        "instruction_type": "fault", "payload": {"j": j}, "instruction_id": instruction_uuid(j)});
    if expiring {
        body["ttl_seconds"] = json!(1);
        body["max_retries"] = json!(3);
    } else {
        body["expires_at"] = Value::Null;
    }
    Msg::json(&body, Some(format!("ic-{j}")))
}

pub fn ack_msg(j: usize, sessions: usize) -> Msg {
    let k = j % sessions;
    Msg::json(
        &json!({"type": "instruction.ack", "agent_id": format!("a-{k}"), "session_id": format!("s-{k}"),
                "instruction_id": instruction_uuid(j), "status": "processed"}),
        Some(format!("ia-{j}")),
    )
}

pub fn heartbeat_msg(c: usize, round: usize, sessions: usize) -> Msg {
    let k = c % sessions;
    let mut m = Msg::json(
        &json!({"type": "agent.heartbeat", "agent_id": format!("a-{k}"), "session_id": format!("s-{k}"),
                "connection_id": format!("c-{c}"), "client_info": {"round": round}}),
        None,
    );
    m.agent = Some(format!("a-{k}"));
    m
}

/// A malformed message of one of seven kinds, tagged `bad-<i>`: invalid JSON, not an object, an unknown type, a
/// missing field, a field of the wrong type, an oversized body, and invalid UTF-8.
pub fn malformed_msg(i: usize, max_bytes: usize) -> Msg {
    let id = Some(format!("bad-{i}"));
    match i % 7 {
        0 => Msg::raw("agent.heartbeat", br#"{"type": "agent.heartbeat", oops"#.to_vec(), id),
        1 => Msg::raw("session.create", b"[1, 2, 3]".to_vec(), id),
        2 => Msg::json(&json!({"type": "session.explode", "i": i}), id),
        3 => Msg::json(&json!({"type": "agent.heartbeat", "agent_id": "a-0", "session_id": "s-0"}), id),
        4 => Msg::json(
            &json!({"type": "instruction.create", "agent_id": "a-0", "session_id": "s-0", "instruction_type": "t",
                    "payload": {}, "max_retries": "three"}),
            id,
        ),
        5 => Msg::json(
            &json!({"type": "agent.heartbeat", "agent_id": "a-0", "session_id": "s-0", "connection_id": format!("big-{i}"),
                    "client_info": {"pad": "x".repeat(max_bytes + 100)}}),
            id,
        ),
        _ => Msg::raw("session.create", vec![0xff, 0xfe, b'{', 0x80], id),
    }
}

/// Creates sessions `s-<k>` of agents `a-<k>` (k < `sessions`), then `instructions` instructions of `instruction_type`
/// spread over them in turn, through `client`: each answered within `timeout`, and each a success.
pub async fn create_through(
    client: &Client,
    sessions: usize,
    instructions: usize,
    instruction_type: &str,
    timeout: Duration,
) {
    for s in 0..sessions {
        let body = json!({"type": "session.create", "agent_id": format!("a-{s}"), "session_id": format!("s-{s}")});
        let reply = client.request(&body, None, timeout).await.expect("session.create is answered");
        reply_result(&reply).expect("session.create succeeds");
    }
    for j in 0..instructions {
        let k = j % sessions;
        let body = json!({"type": "instruction.create", "agent_id": format!("a-{k}"), "session_id": format!("s-{k}"),
            "instruction_type": instruction_type, "payload": {"j": j}, "expires_at": null});
        let reply = client.request(&body, None, timeout).await.expect("instruction.create is answered");
        reply_result(&reply).expect("instruction.create succeeds");
    }
}
