//! The broker's floor for the busy sweep, and the consumer that counts the sweep's events.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use agent_connection_manager::amqp::{self, json_properties};
use chrono::Utc;
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use serde_json::json;
use tokio::task::JoinSet;

use crate::opts::Opts;
use crate::{fail, BoxErr, Res};

/// A consumer (no acks) of an exclusive queue bound to every routing key of `exchange`, as the busy sweep's events
/// are counted.
pub async fn event_consumer(conn: &lapin::Connection, exchange: &str) -> Res<lapin::Consumer> {
    let ch = conn.create_channel().await?;
    let q = ch
        .queue_declare("".into(), QueueDeclareOptions { exclusive: true, ..Default::default() }, FieldTable::default())
        .await?;
    ch.queue_bind(q.name().clone(), exchange.into(), "#".into(), QueueBindOptions::default(), FieldTable::default())
        .await?;
    Ok(ch
        .basic_consume(
            q.name().clone(),
            "".into(),
            BasicConsumeOptions { no_ack: true, ..Default::default() },
            FieldTable::default(),
        )
        .await?)
}

/// The broker's floor for the busy sweep: `n` messages shaped like the sweep's events (an `agent.instruction.retry`
/// body, persistent, with a `message_id`) published to the event exchange from `conns` connections, each with one
/// confirm-mode channel publishing in batches of `batch` with up to `pipeline` batches unconfirmed (the relay's
/// pattern with the worker's settings, or a wider one), to the same kind of consumer queue as the scenario's; seconds
/// from the first publish to the last arrival. No database.
pub async fn broker_floor(o: &Opts, exchange: &str, n: usize, batch: usize, pipeline: usize, conns: usize) -> Res<f64> {
    use agent_connection_manager::events::{Event, EventBody};
    let conn = amqp::connect(&o.amqp_url, "acm bench broker floor").await?;
    let mut consumer = event_consumer(&conn, exchange).await?;
    let counter = tokio::spawn(async move {
        let mut seen = 0usize;
        let deadline = Instant::now() + Duration::from_secs(300);
        while seen < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, consumer.next()).await {
                Ok(Some(Ok(_))) => seen += 1,
                _ => break,
            }
        }
        (seen, Instant::now())
    });
    let mut publishers = Vec::with_capacity(conns);
    for _ in 0..conns {
        let c = amqp::connect(&o.amqp_url, "acm bench broker floor publisher").await?;
        let ch = amqp::confirm_channel(&c).await?;
        publishers.push((c, ch));
    }
    let t0 = Instant::now();
    let mut tasks = JoinSet::new();
    for (p, (c, ch)) in publishers.into_iter().enumerate() {
        let exchange = exchange.to_string();
        let mine = n / conns + usize::from(p < n % conns);
        tasks.spawn(async move {
            let now = Utc::now();
            let mut windows: VecDeque<Vec<lapin::PublisherConfirm>> = VecDeque::new();
            let (mut nacks, mut sent) = (0usize, 0usize);
            while sent < mine {
                let mut window = Vec::with_capacity(batch);
                while window.len() < batch && sent < mine {
                    let event = Event {
                        event_id: uuid::Uuid::new_v4(),
                        occurred_at: now,
                        body: EventBody::InstructionRetry {
                            instruction_id: uuid::Uuid::new_v4(),
                            session_id: format!("s-{}", sent % 10_000),
                            agent_id: format!("agent-{}", sent % 10_000),
                            instruction_type: "bench".into(),
                            payload: json!({ "n": sent }),
                            priority: agent_connection_manager::domain::Priority::Normal,
                            retry_count: 1,
                            max_retries: 3,
                            expires_at: now,
                            previous_expires_at: now,
                        },
                    };
                    let body = serde_json::to_vec(&event)?;
                    let props = json_properties().with_message_id(event.event_id.to_string().into());
                    window.push(
                        ch.basic_publish(
                            exchange.as_str().into(),
                            "agent.instruction.retry".into(),
                            BasicPublishOptions::default(),
                            &body,
                            props,
                        )
                        .await?,
                    );
                    sent += 1;
                }
                windows.push_back(window);
                if windows.len() >= pipeline {
                    for c in windows.pop_front().unwrap_or_default() {
                        nacks += usize::from(c.await?.is_nack());
                    }
                }
            }
            for w in windows {
                for c in w {
                    nacks += usize::from(c.await?.is_nack());
                }
            }
            let _ = c.close(200, "done".into()).await;
            Ok::<usize, BoxErr>(nacks)
        });
    }
    let mut nacks = 0;
    while let Some(r) = tasks.join_next().await {
        nacks += r??;
    }
    let (seen, last) = counter.await?;
    let _ = conn.close(200, "done".into()).await;
    if seen < n || nacks > 0 {
        return Err(fail(format!("broker floor: {seen} of {n} arrived, {nacks} nacked")));
    }
    Ok(last.duration_since(t0).as_secs_f64())
}
