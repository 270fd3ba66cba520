//! Heartbeat shards (`amqp.heartbeat_shards`): heartbeats spread by agent over several queues behind RabbitMQ's
//! consistent-hash exchange, each agent's in one queue and in order, all applied by a worker consuming every shard;
//! one shard declares exactly the single queue; bad values and fewer shards than exist are refused.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use agent_connection_manager::amqp::{self, Topology, AGENT_HEADER};
use agent_connection_manager::config::Settings;
use common::{eventually, TestApp};
use figment::providers::{Format, Serialized, Toml};
use figment::Figment;
use lapin::options::{BasicGetOptions, ExchangeDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::{json, Value};

const SHARDS: u32 = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_are_spread_over_the_shards_by_agent_in_order_and_all_applied() {
    let app = TestApp::unstarted_with(|s| s.amqp.heartbeat_shards = SHARDS).await;
    let topology = app.topology();
    let shards = topology.heartbeat_queues();
    assert_eq!(shards.len(), SHARDS as usize);
    let agents = 24;
    let rounds = 3;
    let mut sessions = Vec::new();
    for a in 0..agents {
        sessions.push(app.manager.create_session(&format!("a{a}"), None, None, None, None).await.unwrap());
    }
    for r in 0..rounds {
        for (a, sid) in sessions.iter().enumerate() {
            let body = json!({"type": "agent.heartbeat", "agent_id": format!("a{a}"), "session_id": sid,
                              "connection_id": format!("c{a}"), "client_info": {"round": r}});
            // The client's own heartbeat properties (transient, the agent in the header), with a round to check order.
            let props = amqp::heartbeat_properties(&format!("a{a}"));
            app.client.publish_raw("agent.heartbeat", body.to_string().as_bytes(), props).await.unwrap();
        }
    }
    // One heartbeat without the header (a client that does not set it) still lands in one shard.
    let bare = json!({"type": "agent.heartbeat", "agent_id": "a0", "session_id": sessions[0], "connection_id": "bare"});
    app.client.send(&bare, None).await.unwrap();

    // Read every shard without acknowledging (closing the channel puts everything back, in order).
    let (conn, ch) = common::amqp_channel(&app.settings).await;
    let mut shard_of: HashMap<String, HashSet<usize>> = HashMap::new();
    let mut rounds_seen: HashMap<String, Vec<u64>> = HashMap::new();
    let mut used = 0;
    let mut total = 0;
    for (i, q) in shards.iter().enumerate() {
        let mut n = 0;
        while let Some(m) = ch.basic_get(q.as_str().into(), BasicGetOptions::default()).await.expect("basic.get") {
            let body: Value = serde_json::from_slice(&m.delivery.data).unwrap();
            let connection = body["connection_id"].as_str().unwrap().to_string();
            if connection != "bare" {
                assert_eq!(*m.delivery.properties.delivery_mode(), Some(1), "heartbeats are published transient");
                let header =
                    m.delivery.properties.headers().as_ref().and_then(|h| h.inner().get(AGENT_HEADER).cloned());
                assert_eq!(header, Some(AMQPValue::LongString(body["agent_id"].as_str().unwrap().into())));
                rounds_seen.entry(connection.clone()).or_default().push(body["client_info"]["round"].as_u64().unwrap());
            }
            shard_of.entry(connection).or_default().insert(i);
            n += 1;
        }
        used += usize::from(n > 0);
        total += n;
    }
    let _ = conn.close(200, "read".into()).await;
    assert_eq!(total, agents * rounds + 1, "every heartbeat is in exactly one shard");
    assert!(used > 1, "{agents} agents' heartbeats all hashed to one of {SHARDS} shards");
    for (connection, in_shards) in &shard_of {
        assert_eq!(in_shards.len(), 1, "{connection}'s heartbeats are in shards {in_shards:?}");
    }
    for (connection, seen) in &rounds_seen {
        assert_eq!(seen, &(0..rounds as u64).collect::<Vec<_>>(), "{connection}'s heartbeats in order");
    }
    // Nothing was declared for one shard.
    let listed = common::rabbitmqctl(&["list_queues", "-q", "--no-table-headers", "name"]);
    assert!(!listed.lines().any(|l| l.trim() == topology.heartbeat_queue), "{} declared", topology.heartbeat_queue);

    app.manager.start().await.unwrap();
    eventually("every heartbeat applied", Duration::from_secs(30), || async {
        let opened = app.scalar::<i64>("SELECT count(*) FROM agent_connection").await;
        let last = app
            .scalar::<i64>(&format!(
                "SELECT count(*) FROM agent_connection WHERE (client_info->>'round')::int = {}",
                rounds - 1
            ))
            .await;
        (opened == agents as i64 + 1 && last == agents as i64).then_some(())
    })
    .await;
    let (_c, ch) = common::amqp_channel(&app.settings).await;
    eventually("every shard drained, acknowledged and consumed", Duration::from_secs(20), || async {
        let mut all = true;
        for q in &shards {
            let (ready, consumers) = common::queue_counts(&ch, q).await;
            all &= ready == 0 && consumers == 1;
        }
        all.then_some(())
    })
    .await;
    let unacked = common::rabbitmqctl(&["list_queues", "-q", "--no-table-headers", "name", "messages_unacknowledged"]);
    for q in &shards {
        let line = unacked.lines().find(|l| l.split('\t').next() == Some(q.as_str())).expect("shard listed");
        assert_eq!(line.split('\t').nth(1).map(str::trim), Some("0"), "unacknowledged in {q}");
    }
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shard_declares_the_single_queue_and_no_hash_exchange() {
    let app = TestApp::unstarted_with(|_| {}).await;
    let topology = app.topology();
    assert_eq!(topology.heartbeat_queues(), vec![topology.heartbeat_queue.clone()]);
    let (_c, ch) = common::amqp_channel(&app.settings).await;
    common::queue_counts(&ch, &topology.heartbeat_queue).await;
    let passive = ExchangeDeclareOptions { passive: true, ..Default::default() };
    let missing = ch
        .exchange_declare(
            topology.heartbeat_exchange.as_str().into(),
            lapin::ExchangeKind::Custom("x-consistent-hash".into()),
            passive,
            FieldTable::default(),
        )
        .await;
    assert!(missing.is_err(), "{} exists with one shard", topology.heartbeat_exchange);
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fewer_shards_than_exist_are_refused_with_what_to_delete() {
    let app = TestApp::unstarted_with(|s| s.amqp.heartbeat_shards = SHARDS).await;
    let mut fewer = app.settings.clone();
    fewer.amqp.heartbeat_shards = 2;
    let (conn, _) = common::amqp_channel(&app.settings).await;
    let e = Topology::for_settings(&fewer).declare(&conn, &fewer).await.unwrap_err().to_string();
    let beyond = app.topology().heartbeat_shard(2);
    assert!(e.contains("amqp.heartbeat_shards") && e.contains(&format!("rabbitmqctl delete_queue {beyond}")), "{e}");
    // More shards than exist only adds.
    let mut more = app.settings.clone();
    more.amqp.heartbeat_shards = SHARDS + 1;
    Topology::for_settings(&more).declare(&conn, &more).await.expect("more shards declare");
    let _ = conn.close(200, "done".into()).await;
    let (_c, ch) = common::amqp_channel(&app.settings).await;
    common::queue_counts(&ch, &app.topology().heartbeat_shard(SHARDS)).await;
    let mut cleanup = app.settings.clone();
    cleanup.amqp.heartbeat_shards = SHARDS + 1;
    common::cleanup(&cleanup).await;
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exchange_type_the_broker_lacks_is_recognised_as_a_missing_plugin() {
    let (conn, ch) = common::amqp_channel(&common::test_settings()).await;
    let e = ch
        .exchange_declare(
            format!("acm-test-{}", common::random_suffix()).as_str().into(),
            lapin::ExchangeKind::Custom("x-acm-no-such-type".into()),
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect_err("an unknown exchange type is refused");
    assert!(amqp::is_unknown_exchange_type(&e), "{e:?}");
    let _ = conn.close(200, "done".into()).await;
}

#[test]
fn heartbeat_shards_must_be_from_1_to_64() {
    let load = |v: &str| {
        Settings::from_figment(
            Figment::from(Serialized::defaults(Settings::default())).merge(Toml::string(&format!("[amqp]\n{v}"))),
        )
    };
    for bad in ["heartbeat_shards = 0", "heartbeat_shards = 65"] {
        let e = load(bad).unwrap_err().to_string();
        assert!(e.contains("amqp.heartbeat_shards: must be from 1 to 64"), "{bad}: {e}");
    }
    assert!(load("heartbeat_shards = -1").unwrap_err().to_string().contains("amqp.heartbeat_shards"));
    assert_eq!(load("heartbeat_shards = 8").unwrap().amqp.heartbeat_shards, 8);
    assert_eq!(Settings::default().amqp.heartbeat_shards, 1);
}
