"""Interoperability: a Python backend and agent (pika) against the real worker, every message, reply and event
validated against the JSON Schemas in schema/.

Run by tests/interop.rs with ACM_INTEROP_AMQP_URL, ACM_INTEROP_PREFIX and ACM_INTEROP_SCHEMA_DIR set; exits non-zero on any failure.
"""
import json
import os
import sys
import time
import uuid

import jsonschema
import pika

URL = os.environ["ACM_INTEROP_AMQP_URL"]
PREFIX = os.environ["ACM_INTEROP_PREFIX"]
SCHEMAS = os.environ["ACM_INTEROP_SCHEMA_DIR"]
COMMANDS = f"{PREFIX}.commands"


def schema(kind, name):
    with open(os.path.join(SCHEMAS, kind, f"{name}.json")) as f:
        return jsonschema.Draft202012Validator(json.load(f))


connection = pika.BlockingConnection(pika.URLParameters(URL))
channel = connection.channel()
channel.confirm_delivery()
events_queue = channel.queue_declare("", exclusive=True).method.queue
channel.queue_bind(events_queue, f"{PREFIX}.events", "#")
reply_queue = channel.queue_declare("", exclusive=True).method.queue
events = []


def drain_events():
    while True:
        method, props, body = channel.basic_get(events_queue, auto_ack=True)
        if method is None:
            return
        event = json.loads(body)
        assert props.content_type == "application/json", props.content_type
        assert props.message_id == event["event_id"], (props.message_id, event["event_id"])
        assert method.routing_key == event["event_type"], (method.routing_key, event["event_type"])
        schema("events", event["event_type"]).validate(event)
        events.append(event)


def publish(body, **props):
    schema("messages", body["type"]).validate(body)
    channel.basic_publish(
        COMMANDS,
        body["type"],
        json.dumps(body).encode(),
        pika.BasicProperties(content_type="application/json", delivery_mode=2, message_id=str(uuid.uuid4()), **props),
        mandatory=True,
    )


def request(body):
    corr = str(uuid.uuid4())
    publish(body, reply_to=reply_queue, correlation_id=corr)
    deadline = time.time() + 20
    while time.time() < deadline:
        method, props, raw = channel.basic_get(reply_queue, auto_ack=True)
        if method is not None and props.correlation_id == corr:
            reply = json.loads(raw)
            schema("replies", body["type"]).validate(reply)
            if not reply["ok"]:
                raise AssertionError(f"{body['type']} refused: {reply}")
            return reply["result"]
        drain_events()
        connection.process_data_events(time_limit=0.05)
    raise AssertionError(f"no reply to {body['type']} within 20 s")


def wait_for(what, predicate, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        drain_events()
        if predicate():
            return
        connection.process_data_events(time_limit=0.1)
    raise AssertionError(f"timed out waiting for {what}; events seen: {[e['event_type'] for e in events]}")


def of(event_type, **fields):
    return [e for e in events if e["event_type"] == event_type and all(e.get(k) == v for k, v in fields.items())]


agent = f"py-agent-{uuid.uuid4().hex[:8]}"
# Backend: a session for the agent.
session_id = request({"type": "session.create", "agent_id": agent, "name": "interop",
                      "experimental_parameters": {"magnification": 105000}})["session_id"]
# Agent: a heartbeat opens its connection.
publish({"type": "agent.heartbeat", "agent_id": agent, "session_id": session_id, "connection_id": f"{agent}-c",
         "sent_at": "2026-11-25T10:00:00Z", "client_info": {"python": sys.version.split()[0]}})
# Backend: one instruction the agent never acknowledges, one it does.
ignored = request({"type": "instruction.create", "agent_id": agent, "session_id": session_id,
                   "instruction_type": "acquire", "payload": {"grid": 1}, "ttl_seconds": 1, "max_retries": 2,
                   "priority": "critical"})["instruction_id"]
acked = request({"type": "instruction.create", "agent_id": agent, "session_id": session_id,
                 "instruction_type": "move", "payload": {"x": 2}})["instruction_id"]
assert request({"type": "instruction.sent", "instruction_id": acked})["status"] == "sent"
result = request({"type": "instruction.ack", "agent_id": agent, "session_id": session_id, "instruction_id": acked,
                  "status": "processed", "result": {"ok": True}, "processing_time_ms": 5})
assert result == {"status": "acknowledged", "accepted": True}, result
stats = request({"type": "stats.get"})
assert stats["active_sessions"] >= 1, stats

wait_for("the ignored instruction to expire", lambda: of("agent.instruction.expired", instruction_id=ignored))
retries = of("agent.instruction.retry", instruction_id=ignored)
assert [r["retry_count"] for r in retries] == [1, 2], retries
assert of("agent.instruction.expired", instruction_id=ignored)[0]["retry_count"] == 2
assert of("agent.instruction.acknowledged", instruction_id=acked)[0]["ack_status"] == "processed"
assert of("agent.connection.opened", session_id=session_id)[0]["restored"] is False
assert of("agent.session.created", session_id=session_id)

assert request({"type": "session.close", "session_id": session_id}) == {"closed": True}
wait_for("the session to close", lambda: of("agent.session.closed", session_id=session_id))
closed = of("agent.session.closed", session_id=session_id)[0]
assert closed["closed_connections"] == 1, closed
wait_for("the connection to close", lambda: of("agent.connection.closed", session_id=session_id))
connection.close()
print(f"interop ok: {len(events)} events validated against the schemas: "
      f"{sorted(set(e['event_type'] for e in events))}")
