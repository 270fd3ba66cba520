//! Replies and dead letters: what the consumers publish besides acknowledgements.

use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;

use super::{prop, Shared};
use crate::amqp::{publish_confirmed, ERROR_HEADER};
use crate::commands::{reply_json, Outcome};
use crate::error::{CommandError, Poison, Result};

/// Publishes the reply to `reply_to` (if any) on the default exchange with the same `correlation_id`.
pub(crate) async fn reply(shared: &Shared, d: &Delivery, outcome: &Outcome) -> Result<()> {
    let Some(reply_to) = prop(d.properties.reply_to()) else {
        return Ok(());
    };
    let mut props = BasicProperties::default().with_content_type("application/json".into());
    if let Some(c) = d.properties.correlation_id() {
        props = props.with_correlation_id(c.clone());
    }
    // The trace context of the command's work, so that the caller's trace id comes back with the reply.
    if let Some(trace) = crate::trace_context::current() {
        let mut headers = FieldTable::default();
        trace.insert_into(&mut headers);
        props = props.with_headers(headers);
    }
    let body = serde_json::to_vec(&reply_json(outcome)).unwrap_or_default();
    publish_confirmed(&shared.publisher, "", &reply_to, &body, props, shared.settings.confirm_timeout()).await
}

/// Dead-letters a poison delivery with its reason, replies with `error` when asked to, and counts it.
pub(crate) async fn reject(
    shared: &Shared,
    d: &Delivery,
    ty: &str,
    poison: &Poison,
    error: CommandError,
) -> Result<()> {
    let label = poison.kind.label();
    let reason = poison.detail.as_str();
    let message_id = prop(d.properties.message_id());
    tracing::warn!(message_id = ?message_id, message_type = ty, reason = label, routing_key = %d.routing_key, "message dead-lettered: {reason}");
    let props = dead_letter_properties(d, reason);
    let (exchange, timeout) = (&shared.topology.dead_letter, shared.settings.confirm_timeout());
    publish_confirmed(&shared.publisher, exchange, d.routing_key.as_str(), &d.data, props, timeout).await?;
    reply(shared, d, &Err(error)).await?;
    shared.metrics.message(ty, "dead_lettered");
    shared.metrics.dead_letter(label);
    Ok(())
}

/// The dead letter's properties: the original's, with the reason and routing key as headers. The original
/// `user_id` moves to a header (the broker accepts a `user_id` only from that user's own connection) and
/// `expiration` is dropped (a dead letter is kept until someone reads it).
fn dead_letter_properties(d: &Delivery, reason: &str) -> BasicProperties {
    let p = &d.properties;
    let mut headers = p.headers().clone().unwrap_or_default();
    headers.insert(ERROR_HEADER.into(), AMQPValue::LongString(reason.into()));
    headers.insert("x-acm-routing-key".into(), AMQPValue::LongString(d.routing_key.as_str().into()));
    if let Some(u) = p.user_id() {
        headers.insert("x-acm-user-id".into(), AMQPValue::LongString(u.as_str().into()));
    }
    let mut out = BasicProperties::default().with_headers(headers).with_delivery_mode(2);
    if let Some(v) = p.content_type() {
        out = out.with_content_type(v.clone());
    }
    if let Some(v) = p.content_encoding() {
        out = out.with_content_encoding(v.clone());
    }
    if let Some(v) = p.correlation_id() {
        out = out.with_correlation_id(v.clone());
    }
    if let Some(v) = p.reply_to() {
        out = out.with_reply_to(v.clone());
    }
    if let Some(v) = p.message_id() {
        out = out.with_message_id(v.clone());
    }
    if let Some(v) = p.timestamp() {
        out = out.with_timestamp(*v);
    }
    if let Some(v) = p.app_id() {
        out = out.with_app_id(v.clone());
    }
    out
}
