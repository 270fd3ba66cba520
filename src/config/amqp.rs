//! `amqp.*`: the broker, the names and types of the queues, and publishing limits (used by `amqp`, the consumers
//! and the relay).

use std::num::{NonZeroU16, NonZeroU32, NonZeroU64, NonZeroUsize};

use serde::{Deserialize, Serialize};

/// `amqp.*`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpSettings {
    /// Broker URL, `amqp://` or `amqps://`.
    pub url: String,
    /// Prefix of every exchange and queue name.
    pub prefix: String,
    /// Prefetch per consumer (at least 1: the type refuses 0).
    pub prefetch: NonZeroU16,
    /// Type of the command queue.
    pub command_queue_type: QueueType,
    /// Type of the heartbeat queue: `classic` (one node) or `quorum` (replicated over a cluster's nodes).
    pub heartbeat_queue_type: QueueType,
    /// Heartbeat queues, spread by agent with the consistent-hash exchange when more than 1.
    pub heartbeat_shards: u32,
    /// Largest accepted message body in bytes.
    pub max_message_bytes: NonZeroUsize,
    /// Deliveries of one command message before the broker dead-letters it (quorum queues only).
    pub command_delivery_limit: NonZeroU32,
    /// Longest wait for the broker's confirm of a publish (reply, dead letter, relay batch); then it counts as not
    /// published.
    pub confirm_timeout_secs: NonZeroU64,
}

/// The type of a queue.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// Replicated, with delivery limits.
    Quorum,
    /// A classic durable queue.
    Classic,
}

impl Default for AmqpSettings {
    fn default() -> Self {
        Self {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            prefix: "agent".into(),
            prefetch: NonZeroU16::new(2000).expect("not zero"),
            command_queue_type: QueueType::Quorum,
            heartbeat_queue_type: QueueType::Classic,
            heartbeat_shards: 1,
            max_message_bytes: NonZeroUsize::new(1_048_576).expect("not zero"),
            command_delivery_limit: NonZeroU32::new(20).expect("not zero"),
            confirm_timeout_secs: super::nonzero(10),
        }
    }
}

/// The broker URLs of `amqp.url`: one URL, or a cluster's nodes separated by commas.
pub fn broker_urls(urls: &str) -> Vec<&str> {
    urls.split(',').map(str::trim).filter(|u| !u.is_empty()).collect()
}
