//! Applying one command: its transaction, its idempotency record (sender, type, `message_id`, body digest) and its
//! reply body.

use deadpool_postgres::Pool;
use serde_json::{json, Value};

use super::{Command, Context, Outcome};
use crate::config::Settings;
use crate::db::Sql;
use crate::error::{CommandError, Result};
use crate::events::write_events;

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

/// A reply body: `{"ok": true, "result": ...}` or `{"ok": false, "error": {"code", "message"}}`.
pub fn reply_json(outcome: &Outcome) -> Value {
    match outcome {
        Ok(result) => json!({ "ok": true, "result": result }),
        Err(e) => json!({ "ok": false, "error": { "code": e.code(), "message": e.message() } }),
    }
}

pub(super) fn outcome_from_reply(reply: &Value) -> Outcome {
    if reply["ok"] == Value::Bool(true) {
        return Ok(reply["result"].clone());
    }
    let message = reply["error"]["message"].as_str().unwrap_or_default().to_string();
    Err(match reply["error"]["code"].as_str() {
        Some("not_found") => CommandError::NotFound(message),
        Some("conflict") => CommandError::Conflict(message),
        Some("forbidden") => CommandError::Forbidden(message),
        Some("limit") => CommandError::Limit(message),
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
    let mut client = crate::db::checkout(pool).await?;
    let tx = client.transaction().await?;
    let ty = cmd.type_name();
    let sender = meta.user_id.as_deref().unwrap_or("");
    let record = meta.message_id.as_ref().filter(|_| !cmd.entry().read_only);
    if let Some(mid) = record {
        if tx.typed_execute(CLAIM_MESSAGE, &[&sender, &ty, mid, &meta.body_digest]).await? == 0 {
            let row = tx.typed_one(STORED_REPLY, &[&sender, &ty, mid]).await?;
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
    let ctx = Context::new(settings);
    let outcome = cmd.apply(&tx, &ctx).await?;
    // The command's events and its stored reply, sent together (pipelined on the connection): neither needs the
    // other's answer, and an error in the first aborts the transaction, so the second fails too.
    let reply = reply_json(&outcome);
    let store = async {
        match record {
            Some(mid) => {
                tx.typed_execute(STORE_REPLY, &[&sender, &ty, mid, &reply]).await.map(drop).map_err(Into::into)
            }
            None => Ok(()),
        }
    };
    tokio::try_join!(write_events(&tx, ctx.take_events()), store)?;
    tx.commit().await?;
    Ok(outcome)
}
