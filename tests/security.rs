//! Security: `security.require_user_id` with real RabbitMQ users, TLS to PostgreSQL, parameterized SQL.

mod common;

use std::time::Duration;

use agent_connection_manager::amqp::json_properties;
use agent_connection_manager::client::Client;
use agent_connection_manager::{db, Settings};
use common::broker_user::BrokerUser;
use common::{dead_letters, eventually, TestApp};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_are_held_to_their_broker_identity() {
    let app = TestApp::start_with(|s| s.security.require_user_id = true).await;
    let alice = BrokerUser::create("agent-alice");
    let bob = BrokerUser::create("agent-bob");
    let prefix = &app.settings.amqp.prefix;
    let as_alice = alice.client(prefix).await;
    let as_bob = bob.client(prefix).await;

    // The backend (no user_id) creates sessions; backend commands are not agent messages.
    let sa = app.session(&alice.name).await;
    let sb = app.session(&bob.name).await;
    as_bob.heartbeat(&bob.name, &sb, "bob-conn").await.unwrap();
    as_alice.heartbeat(&alice.name, &sa, "alice-conn").await.unwrap();
    eventually("both agents' own heartbeats applied", Duration::from_secs(20), || async {
        (app.scalar::<i64>("SELECT count(*) FROM agent_connection WHERE status = 'active'").await == 2).then_some(())
    })
    .await;
    let i = app
        .ok(json!({"type": "instruction.create", "agent_id": bob.name, "session_id": sb, "instruction_type": "t", "payload": 1}))
        .await;

    // Alice, honestly identified, claims to be Bob: dead-lettered as forbidden, nothing of Bob's moves.
    as_alice.heartbeat(&bob.name, &sb, "bob-conn-2").await.unwrap();
    as_alice
        .send(
            &json!({"type": "instruction.ack", "instruction_id": i["instruction_id"], "agent_id": bob.name,
                      "session_id": sb, "status": "processed"}),
            None,
        )
        .await
        .unwrap();
    as_alice
        .send(&json!({"type": "connection.close", "agent_id": bob.name, "connection_id": "bob-conn"}), None)
        .await
        .unwrap();
    as_alice.send(&json!({"type": "connection.open", "agent_id": bob.name, "session_id": sb}), None).await.unwrap();
    // A message without user_id claiming an agent is forbidden too.
    app.client.heartbeat(&alice.name, &sa, "anonymous").await.unwrap();
    let letters = dead_letters(&app.settings, 5).await;
    assert!(
        letters.iter().all(|(r, _)| r.starts_with("forbidden")),
        "{:?}",
        letters.iter().map(|l| &l.0).collect::<Vec<_>>()
    );
    let s: String = app.scalar("SELECT status::text FROM agent_connection WHERE connection_id = 'bob-conn'").await;
    assert_eq!(s, "active");
    let s: String = app.scalar("SELECT status::text FROM agent_instruction").await;
    assert_eq!(s, "pending");
    assert_eq!(app.scalar::<i64>("SELECT count(*) FROM agent_connection").await, 2);

    // Bob acts on his own instruction and connection.
    as_bob
        .send(
            &json!({"type": "instruction.ack", "instruction_id": i["instruction_id"], "agent_id": bob.name,
                      "session_id": sb, "status": "processed"}),
            None,
        )
        .await
        .unwrap();
    as_bob
        .send(&json!({"type": "connection.close", "agent_id": bob.name, "connection_id": "bob-conn"}), None)
        .await
        .unwrap();
    eventually("Bob's own commands applied", Duration::from_secs(20), || async {
        let i: String = app.scalar("SELECT status::text FROM agent_instruction").await;
        let c: String = app.scalar("SELECT status::text FROM agent_connection WHERE connection_id = 'bob-conn'").await;
        (i == "acknowledged" && c == "closed").then_some(())
    })
    .await;

    // Alice cannot even claim Bob's user_id: the broker refuses the publish.
    let spoof = Client::connect(&alice.url(), prefix).await.unwrap().with_user_id(&bob.name);
    assert!(spoof.heartbeat(&bob.name, &sb, "spoofed").await.is_err(), "the broker accepted a forged user_id");
    for c in [as_alice, as_bob] {
        c.close().await;
    }
    app.cleanup().await;
}

/// The permissions README.md documents, for this test's prefix: each role can do its job and no more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_least_privilege_permissions_work() {
    let mut settings = common::test_settings();
    let p = settings.amqp.prefix.replace('.', "\\.");
    let worker = BrokerUser::with_permissions(
        "acm-worker",
        [&format!("^{p}\\..*"), &format!("^({p}\\..*|amq\\.default)$"), &format!("^{p}\\..*")],
    );
    let client_perms = [
        "^amq\\.gen-.*".to_string(),
        format!("^({p}\\.commands|amq\\.gen-.*)$"),
        format!("^({p}\\.events|amq\\.gen-.*)$"),
    ];
    let client_perms = [client_perms[0].as_str(), client_perms[1].as_str(), client_perms[2].as_str()];
    let agent = BrokerUser::with_permissions("agent", client_perms);
    agent.topic_permissions(
        &format!("{}.commands", settings.amqp.prefix),
        "^(agent\\.heartbeat|instruction\\.ack|connection\\..*)$",
    );
    let backend = BrokerUser::with_permissions("backend", client_perms);
    backend.topic_permissions(
        &format!("{}.commands", settings.amqp.prefix),
        "^(session\\..*|instruction\\.(create|sent)|stats\\.get)$",
    );
    settings.amqp.url = worker.url();
    settings.security.require_user_id = true;
    let _guard = common::CleanupGuard::new(&settings);
    db::migrate(&settings.database).await.unwrap();
    let manager = agent_connection_manager::AgentConnectionManager::new(settings.clone()).unwrap();
    manager.start().await.unwrap();
    eventually("the worker to run as its least-privileged user", Duration::from_secs(20), || async {
        manager.health().consumers_running.load(std::sync::atomic::Ordering::Relaxed).then_some(())
    })
    .await;
    let prefix = &settings.amqp.prefix;
    let as_backend = Client::connect(&backend.url(), prefix).await.unwrap();
    let mut events = as_backend.subscribe("agent.instruction.#").await.unwrap();
    let t = Duration::from_secs(20);
    let reply = as_backend.request(&json!({"type": "session.create", "agent_id": agent.name}), None, t).await.unwrap();
    let sid = reply["result"]["session_id"].as_str().expect("the backend creates sessions").to_string();
    let reply = as_backend
        .request(&json!({"type": "instruction.create", "agent_id": agent.name, "session_id": sid, "instruction_type": "t", "payload": 1}), None, t)
        .await
        .unwrap();
    let iid = reply["result"]["instruction_id"].as_str().expect("the backend creates instructions").to_string();
    let as_agent = agent.client(prefix).await;
    as_agent.heartbeat(&agent.name, &sid, "perm-conn").await.unwrap();
    let reply = as_agent
        .request(&json!({"type": "instruction.ack", "agent_id": agent.name, "session_id": sid, "instruction_id": iid, "status": "processed"}), None, t)
        .await
        .unwrap();
    assert_eq!(reply["result"]["accepted"], true, "{reply}");
    let created = events.next(t).await.expect("the backend reads events");
    assert_eq!(serde_json::to_value(&created).unwrap()["event_type"], "agent.instruction.created");
    // An agent may not send backend commands: the broker itself refuses the routing key.
    assert!(
        as_agent.send(&json!({"type": "session.create", "agent_id": agent.name}), None).await.is_err(),
        "an agent published session.create"
    );
    // The heartbeat travels on its own queue, so it may be applied after the ack's reply.
    eventually("the agent's heartbeat to open its connection", t, || async {
        (manager.get_connection_stats().await.unwrap().active_connections == 1).then_some(())
    })
    .await;
    for c in [as_agent, as_backend] {
        c.close().await;
    }
    manager.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_connections_are_encrypted_and_unverifiable_certificates_are_refused() {
    let tls = |s: &mut Settings| {
        s.database.url.push_str("?sslmode=require");
        s.database.tls_accept_invalid_certs = true; // the machine's server uses a self-signed certificate
    };
    let app = TestApp::start_with(tls).await;
    let sid = app.session("tls-agent").await;
    assert!(!sid.is_empty());
    let client = app.manager.pool().get().await.unwrap();
    let ssl: bool =
        client.query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[]).await.unwrap().get(0);
    assert!(ssl, "the pooled connection is encrypted");
    drop(client);
    // Verifying the self-signed certificate fails, with a clear error rather than a plain-text fallback.
    let mut strict = app.settings.clone();
    strict.database.tls_accept_invalid_certs = false;
    let Err(err) = db::connect(&strict.database, None).await else {
        panic!("an unverifiable certificate was accepted");
    };
    assert!(err.to_string().to_lowercase().contains("certificate"), "{err}");
    app.cleanup().await;
}

#[test]
fn sql_is_never_built_from_input() {
    // Every statement takes its values as parameters: no format! into SQL in the code paths that handle messages.
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut dirs = vec![src.join("commands"), src.join("sweeper"), src.join("relay")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for (n, line) in text.lines().enumerate() {
                let l = line.trim();
                let builds_sql =
                    l.contains("format!(") && ["SELECT", "UPDATE", "INSERT", "DELETE"].iter().any(|k| l.contains(k));
                assert!(!builds_sql, "{}:{}: SQL built with format!: {l}", path.display(), n + 1);
            }
        }
    }
}

/// A user with the agent's documented permissions (for this test's prefix) that may publish `allowed` routing keys.
fn agent_with_documented_permissions(prefix: &str) -> BrokerUser {
    let p = prefix.replace('.', "\\.");
    let agent = BrokerUser::with_permissions(
        "agent",
        ["^amq\\.gen-.*", &format!("^({p}\\.commands|amq\\.gen-.*)$"), &format!("^({p}\\.events|amq\\.gen-.*)$")],
    );
    agent.topic_permissions(&format!("{prefix}.commands"), "^(agent\\.heartbeat|instruction\\.ack|connection\\..*)$");
    agent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routing_key_that_is_not_the_type_is_forbidden_and_changes_nothing() {
    let app = TestApp::start().await;
    let prefix = app.settings.amqp.prefix.clone();
    let agent = agent_with_documented_permissions(&prefix);
    let sid = app.session(&agent.name).await;
    let as_agent = Client::connect(&agent.url(), &prefix).await.unwrap();
    let t = Duration::from_secs(20);
    // A backend command the agent may not publish, under a routing key it may.
    let close = json!({"type": "session.close", "session_id": sid}).to_string();
    let reply = as_agent.request_raw("connection.open", close.as_bytes(), None, t).await.unwrap();
    assert_eq!(reply["error"]["code"], "forbidden", "{reply}");
    let create = json!({"type": "instruction.create", "agent_id": agent.name, "session_id": sid,
                        "instruction_type": "t", "payload": 1})
    .to_string();
    let reply = as_agent.request_raw("instruction.ack", create.as_bytes(), None, t).await.unwrap();
    assert_eq!(reply["error"]["code"], "forbidden", "{reply}");
    // A heartbeat under a command's routing key, and a command under the heartbeat's.
    let hb = json!({"type": "agent.heartbeat", "agent_id": agent.name, "session_id": sid, "connection_id": "hb"});
    as_agent.publish_raw("connection.close", hb.to_string().as_bytes(), json_properties()).await.unwrap();
    let open = json!({"type": "connection.open", "agent_id": agent.name, "session_id": sid, "connection_id": "op"});
    as_agent.publish_raw("agent.heartbeat", open.to_string().as_bytes(), json_properties()).await.unwrap();
    let mut letters: Vec<String> = dead_letters(&app.settings, 4).await.into_iter().map(|l| l.0).collect();
    letters.sort();
    assert_eq!(
        letters,
        [
            "forbidden: routing key `agent.heartbeat` is not the message type `connection.open`",
            "forbidden: routing key `connection.close` is not the message type `agent.heartbeat`",
            "forbidden: routing key `connection.open` is not the message type `session.close`",
            "forbidden: routing key `instruction.ack` is not the message type `instruction.create`",
        ]
    );
    // The same agent's honest messages still work, and nothing of the above happened.
    let reply = as_agent
        .request(
            &json!({"type": "connection.open", "agent_id": agent.name, "session_id": sid, "connection_id": "ok"}),
            None,
            t,
        )
        .await
        .unwrap();
    assert_eq!(reply["result"]["connection_id"], "ok", "{reply}");
    let status: String =
        app.scalar(&format!("SELECT status::text FROM agent_session WHERE session_id = '{sid}'")).await;
    assert_eq!(status, "active", "the session was not closed");
    assert_eq!(app.scalar::<i64>("SELECT count(*) FROM agent_instruction").await, 0, "no instruction created");
    let ids: Vec<String> = app.column("SELECT connection_id FROM agent_connection").await;
    assert_eq!(ids, ["ok"]);
    as_agent.close().await;
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cannot_close_another_agents_connection() {
    let mut app = TestApp::start().await;
    assert!(!app.settings.security.require_user_id, "the default: only the named agent_id counts");
    let sa = app.session("agent-a").await;
    app.ok(json!({"type": "connection.open", "agent_id": "agent-a", "session_id": sa, "connection_id": "a-conn"}))
        .await;
    let code = app.refused(json!({"type": "connection.close", "agent_id": "agent-b", "connection_id": "a-conn"})).await;
    assert_eq!(code, "forbidden");
    let status: String = app.scalar("SELECT status::text FROM agent_connection WHERE connection_id = 'a-conn'").await;
    assert_eq!(status, "active");
    assert_eq!(app.published(|e| e["event_type"] == "agent.connection.closed").await, 0);
    // Naming no agent is poison; the owner closes it.
    let reply = app.request(json!({"type": "connection.close", "connection_id": "a-conn"})).await;
    assert_eq!(reply["error"]["code"], "invalid", "{reply}");
    let r = app.ok(json!({"type": "connection.close", "agent_id": "agent-a", "connection_id": "a-conn"})).await;
    assert_eq!(r["closed"], true);
    // The refusal was a reply; only the message without agent_id was dead-lettered.
    let letters = dead_letters(&app.settings, 1).await;
    assert!(letters[0].0.contains("missing field `agent_id`"), "{}", letters[0].0);
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_close_with_the_workers_reasons() {
    let app = TestApp::start().await;
    let sid = app.session("a1").await;
    app.ok(json!({"type": "connection.open", "agent_id": "a1", "session_id": sid, "connection_id": "c1"})).await;
    for reason in ["stale_connection", "session_closed"] {
        let reply = app
            .request(json!({"type": "connection.close", "agent_id": "a1", "connection_id": "c1", "reason": reason}))
            .await;
        assert_eq!(reply["error"]["code"], "invalid", "{reply}");
    }
    let letters = dead_letters(&app.settings, 2).await;
    assert!(letters.iter().all(|(r, _)| r.starts_with("field `reason`")), "{letters:?}");
    let status: String = app.scalar("SELECT status::text FROM agent_connection WHERE connection_id = 'c1'").await;
    assert_eq!(status, "active", "nothing changed");
    let r = app
        .ok(json!({"type": "connection.close", "agent_id": "a1", "connection_id": "c1", "reason": "client_disconnect"}))
        .await;
    assert_eq!(r["closed"], true);
    let reason: String = app.scalar("SELECT close_reason::text FROM agent_connection WHERE connection_id = 'c1'").await;
    assert_eq!(reason, "client_disconnect");
    app.cleanup().await;
}
