//! RabbitMQ: connecting, the topology (exchanges, queues and bindings, derived from the message registry, in
//! `topology.rs`; the heartbeat shards in `shards.rs`), and confirmed publishing.

mod shards;
mod topology;

pub use shards::{is_unknown_exchange_type, AGENT_HEADER, CONSISTENT_HASH_PLUGIN};
pub use topology::{is_precondition_failed, Topology, HEARTBEAT_QUEUE_UPGRADE};

use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

use crate::commands::{Queue, REGISTRY};
pub use crate::config::broker_urls;
use crate::error::{BrokerFailure, Error, Result};

/// Routing key of heartbeats (their message type).
pub const HEARTBEAT_ROUTING_KEY: &str = <crate::commands::heartbeat::Heartbeat as crate::commands::Message>::TYPE;

/// The binding keys of a queue: the exact type of each message consumed there. Never a wildcard: a family key such
/// as `agent.#` would also match the types of another queue (`agent.heartbeat`, `agent.log`) and pull them onto this
/// one. A message whose routing key names no type reaches `<prefix>.unroutable` through the command exchange's
/// alternate exchange instead, and is dead-lettered there with its reason.
pub fn binding_keys(queue: Queue) -> Vec<String> {
    REGISTRY.iter().filter(|e| e.queue == queue).map(|e| e.type_name.to_string()).collect()
}

/// The binding keys earlier versions gave the command queue (`<first segment>.#` per family of types); the topology
/// removes them from the command queue when it declares it, so only the exact keys stay.
pub fn legacy_command_keys() -> Vec<String> {
    let mut keys: Vec<String> = Vec::new();
    for e in REGISTRY.iter().filter(|e| e.queue == Queue::Commands) {
        let key = format!("{}.#", e.type_name.split('.').next().unwrap_or(e.type_name));
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    keys
}

/// Longest wait for the broker's answer to a query (the heartbeat backlog) or to closing a connection.
pub const BROKER_QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// Header naming why a message was dead-lettered.
pub const ERROR_HEADER: &str = "x-acm-error";

/// Longest wait for one broker node to accept a connection.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Connects to the broker (`amqp://` or `amqps://`; several URLs separated by commas are tried in order until one
/// answers), naming the connection for the management UI.
pub async fn connect(urls: &str, name: &str) -> Result<Connection> {
    connect_from(urls, 0, name).await.map(|(conn, _)| conn)
}

/// Connects to the first of `urls` that answers, trying them in order from the one at `start` (wrapping around), each
/// for at most [`CONNECT_TIMEOUT`]; returns the connection and the index of the URL that answered. When none does,
/// the last failure is the error, naming its node ([`describe_node`]) and why (refused, no answer, credentials).
pub async fn connect_from(urls: &str, start: usize, name: &str) -> Result<(Connection, usize)> {
    let list = broker_urls(urls);
    let mut last = Error::Config(crate::error::ConfigError("amqp.url: no broker URL is configured".into()));
    for step in 0..list.len() {
        let i = (start + step) % list.len();
        let props = ConnectionProperties::default().with_connection_name(name.into());
        let error = match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(list[i], props)).await {
            Ok(Ok(conn)) => return Ok((conn, i)),
            Ok(Err(e)) => e,
            Err(_) => lapin::Error::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "no answer within {} s: the node accepted the connection but did not complete the AMQP \
                     handshake, or the network dropped it",
                    CONNECT_TIMEOUT.as_secs()
                ),
            )),
        };
        last = Error::Amqp(BrokerFailure { error, at: Some(describe_node(list[i])) });
        if list.len() > 1 {
            tracing::warn!(node = i + 1, nodes = list.len(), error = %last, "broker node did not answer; trying the next");
        }
    }
    Err(last)
}

/// A broker node as errors and logs name it: host and port, virtual host and user, never the password; e.g.
/// `127.0.0.1:5672 (vhost /, user guest)`.
pub fn describe_node(url: &str) -> String {
    let Ok(u) = url::Url::parse(url) else {
        return crate::config::redact_url(url);
    };
    let port = u.port().unwrap_or(if u.scheme() == "amqps" { 5671 } else { 5672 });
    let host = u.host_str().unwrap_or("localhost");
    // The path is the percent-encoded virtual host; none means `/`.
    let vhost = match u.path().strip_prefix('/') {
        Some(v) if !v.is_empty() => url::form_urlencoded::parse(format!("v={v}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default(),
        _ => "/".to_string(),
    };
    let user = if u.username().is_empty() { "guest" } else { u.username() };
    format!("{host}:{port} (vhost {vhost}, user {user})")
}

/// Opens a channel in publisher-confirm mode.
pub async fn confirm_channel(conn: &Connection) -> Result<Channel> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok(ch)
}

/// Publishes and waits for the broker's confirm, for at most `timeout` in all (handing the message to the channel
/// included: while the broker blocks publishers nothing can be written). A nack is an error, and so is no confirm
/// in time ([`Error::Timeout`]): either way the message counts as not published, and the caller retries (a later
/// confirm may still make it a duplicate, which receivers tolerate by `message_id`).
pub async fn publish_confirmed(
    ch: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    props: BasicProperties,
    timeout: Duration,
) -> Result<()> {
    let publish = async {
        ch.basic_publish(exchange.into(), routing_key.into(), BasicPublishOptions::default(), body, props).await?.await
    };
    let confirm = tokio::time::timeout(timeout, publish).await.map_err(|_| {
        Error::Timeout(format!("no confirm within {timeout:?} for a publish to {exchange}/{routing_key}"))
    })??;
    if confirm.is_nack() {
        return Err(Error::Nack(format!("{exchange}/{routing_key}")));
    }
    Ok(())
}

/// Properties of a persistent JSON message.
pub fn json_properties() -> BasicProperties {
    BasicProperties::default().with_content_type("application/json".into()).with_delivery_mode(2)
}

/// Properties of a heartbeat: transient (`delivery_mode` 1), since a lost heartbeat is harmless (the next follows
/// within seconds) while persisting each one would cost the broker a disk write; and the agent in
/// [`AGENT_HEADER`], on which the heartbeat shards hash.
pub fn heartbeat_properties(agent_id: &str) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(AGENT_HEADER.into(), AMQPValue::LongString(agent_id.into()));
    BasicProperties::default()
        .with_content_type(ShortString::from("application/json"))
        .with_delivery_mode(1)
        .with_headers(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_is_named_by_host_port_vhost_and_user_without_its_password() {
        assert_eq!(describe_node("amqp://guest:secret@127.0.0.1:5999/%2f"), "127.0.0.1:5999 (vhost /, user guest)");
        assert_eq!(describe_node("amqps://acm:secret@mq/prod"), "mq:5671 (vhost prod, user acm)");
        assert_eq!(describe_node("amqp://mq"), "mq:5672 (vhost /, user guest)");
    }

    #[test]
    fn a_url_list_is_split_on_commas() {
        assert_eq!(broker_urls("amqp://a"), vec!["amqp://a"]);
        assert_eq!(broker_urls("amqp://a, amqp://b,,amqp://c "), vec!["amqp://a", "amqp://b", "amqp://c"]);
    }

    #[test]
    fn bindings_come_from_the_registry() {
        assert_eq!(binding_keys(Queue::Heartbeats), vec!["agent.heartbeat"]);
        assert_eq!(binding_keys(Queue::Logs), vec!["agent.log"]);
        let commands: Vec<&str> = REGISTRY.iter().filter(|e| e.queue == Queue::Commands).map(|e| e.type_name).collect();
        assert_eq!(binding_keys(Queue::Commands), commands);
        assert!(commands.contains(&"session.create") && commands.contains(&"logs.get"));
    }

    /// AMQP topic matching (`*` one word, `#` zero or more), enough to check bindings.
    fn topic_matches(pattern: &str, key: &str) -> bool {
        fn go(p: &[&str], k: &[&str]) -> bool {
            match (p.first(), k.first()) {
                (None, None) => true,
                (Some(&"#"), _) => go(&p[1..], k) || (!k.is_empty() && go(p, &k[1..])),
                (Some(&"*"), Some(_)) => go(&p[1..], &k[1..]),
                (Some(a), Some(b)) if a == b => go(&p[1..], &k[1..]),
                _ => false,
            }
        }
        go(&pattern.split('.').collect::<Vec<_>>(), &key.split('.').collect::<Vec<_>>())
    }

    #[test]
    fn each_type_reaches_exactly_its_own_queue() {
        assert!(topic_matches("session.#", "session.create") && !topic_matches("session.*", "agent.log"));
        let queues = [Queue::Heartbeats, Queue::Commands, Queue::Logs];
        for e in REGISTRY {
            let reached: Vec<Queue> =
                queues.into_iter().filter(|q| binding_keys(*q).iter().any(|k| topic_matches(k, e.type_name))).collect();
            assert_eq!(reached, vec![e.queue], "`{}` reaches {reached:?}", e.type_name);
        }
        // The legacy family keys would not have kept that promise for a type such as `agent.ping`.
        assert!(legacy_command_keys().iter().all(|k| !binding_keys(Queue::Commands).contains(k)));
    }
}
