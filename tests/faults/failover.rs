//! Failover: a primary with a synchronous streaming standby, a worker whose `database.url` names both hosts with
//! `target_session_attrs=read-write`, and under load (heartbeats in rounds, `instruction.create` commands with
//! replies, republished while unanswered) the primary stopped as by a crash, then the standby promoted. The worker
//! must find the new primary by itself; nothing acknowledged may be lost and nothing applied twice.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_connection_manager::amqp::Topology;
use agent_connection_manager::config::DatabaseSettings;

use crate::counting::{drain_dead_letters, drain_events, key_opened, key_session, left_in_queues, wait_quiet, Row};
use crate::failover_load::{collect_replies, run_commands, run_heartbeats, Replies, Resent};
use crate::infra::{eventually, within, PgCluster, TempDir};
use crate::lab::{count_of, db, wait_count, Lab, QUERY_LIMIT};
use crate::publisher::{Msg, ReliablePublisher};
use crate::workload::session_msg;
use crate::{count, settle_timeout, PREFIX};

/// (connection_id, last round applied) of every connection, read on one server.
async fn rounds(url: &str) -> Option<HashMap<String, i64>> {
    let client = db(url).await?;
    let query = client.query("SELECT connection_id, (client_info->>'round')::bigint FROM agent_connection", &[]);
    let rows = tokio::time::timeout(QUERY_LIMIT, query).await.ok()?.ok()?;
    Some(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// The `payload.j` of every instruction, read on one server (with repeats, if any).
async fn instruction_js(url: &str) -> Option<Vec<i64>> {
    let client = db(url).await?;
    let query = client.query("SELECT (payload->>'j')::bigint FROM agent_instruction", &[]);
    let rows = tokio::time::timeout(QUERY_LIMIT, query).await.ok()?.ok()?;
    Some(rows.iter().map(|r| r.get(0)).collect())
}

/// Primary stopped with `pg_ctl stop -m immediate` once 40 % of the commands are answered; the standby promoted once
/// the worker reports itself not ready. Small counts by default, more with `ACM_FAULTS_FULL=1`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn primary_crash_and_standby_promotion_lose_and_duplicate_nothing() {
    let (sessions, commands, connections) = (count(10, 50), count(300, 2_000), count(200, 2_000));
    let per_tick = count(10, 20);
    let started = Instant::now();
    let mut lab = Lab::replicated("failover", &[]).await;
    lab.spawn_worker().await;
    let amqp = lab.env.amqp_url.clone();
    let exchange = Topology::new(PREFIX).command_exchange;
    let url = lab.db_url();
    let old_primary = lab.pg.url("acm_faults");
    let new_primary = lab.standby.as_ref().expect("standby").url("acm_faults");

    let mut p = ReliablePublisher::new(&amqp, &exchange);
    let progress = Default::default();
    p.publish_all(&(0..sessions).map(session_msg).collect::<Vec<Msg>>(), &progress).await;
    let mut republished = p.republished;
    p.close().await;
    wait_count(&url, "SELECT count(*) FROM agent_session", sessions, "the sessions", settle_timeout()).await;

    let replies = Arc::new(Mutex::new(Replies::default()));
    let resent = Arc::new(Resent::default());
    let (_reply_conn, reply_to) = collect_replies(&lab, replies.clone()).await;
    let cmd = tokio::spawn(run_commands(
        amqp.clone(),
        exchange.clone(),
        reply_to,
        commands,
        sessions,
        per_tick,
        replies.clone(),
        resent.clone(),
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let hb = tokio::spawn(run_heartbeats(
        amqp.clone(),
        exchange.clone(),
        connections,
        sessions,
        Duration::from_millis(500),
        stop.clone(),
    ));

    // Under load: stop the primary as a crash would, once 40 % of the commands are answered.
    let answered = || replies.lock().expect("replies").first.len();
    eventually("40 % of the commands to be answered", settle_timeout(), || async {
        (answered() * 10 >= commands * 4).then_some(())
    })
    .await;
    let before = rounds(&old_primary).await.expect("connections on the primary");
    let answered_before: HashSet<String> = replies.lock().expect("replies").first.keys().cloned().collect();
    let killed = Instant::now();
    *resent.mark.lock().expect("mark") = Some(killed);
    tokio::task::block_in_place(|| lab.pg.stop_immediate());
    eprintln!("failover: primary stopped (immediate) with {} commands answered", answered_before.len());
    let worker = &lab.workers[0];
    eventually("the worker to report itself not ready", Duration::from_secs(60), || async {
        (!worker.ready().await).then_some(())
    })
    .await;
    let noticed = killed.elapsed();
    // The outage lasts until the client has waited in vain, entirely after the crash, for the reply to a command
    // and published it again (the standby refuses the worker meanwhile: it does not allow writes), as while a
    // failover manager decides.
    eventually("the client to republish a command it published after the crash", settle_timeout(), || async {
        (resent.waited_after_mark.load(Ordering::Relaxed) > 0).then_some(())
    })
    .await;
    let down_before_promotion = killed.elapsed();
    let standby = lab.standby.as_ref().expect("standby");
    tokio::task::block_in_place(|| standby.promote());
    let promoted = Instant::now();
    eventually("the worker to be ready on the new primary", Duration::from_secs(120), || async {
        worker.ready().await.then_some(())
    })
    .await;
    let ready_after = promoted.elapsed();
    let first_reply_after = eventually("a reply after the promotion", Duration::from_secs(120), || async {
        replies.lock().expect("replies").first.values().filter(|r| r.at > promoted).map(|r| r.at - promoted).min()
    })
    .await;

    // What was acknowledged before the crash is on the new primary.
    let after = rounds(&new_primary).await.expect("connections on the new primary");
    let lost_heartbeats: Vec<&String> =
        before.iter().filter(|(c, r)| after.get(*c).is_none_or(|a| a < r)).map(|(c, _)| c).collect();
    let js: HashSet<i64> = instruction_js(&new_primary).await.expect("instructions").into_iter().collect();
    let lost_commands: Vec<&String> =
        answered_before.iter().filter(|id| !js.contains(&id[3..].parse::<i64>().expect("fo-<j>"))).collect();

    let cmd_republished = within("the command client", settle_timeout(), cmd).await.expect("command client");
    let resent = resent.total.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    let (final_round, heartbeats_sent, hb_republished) =
        within("the heartbeat client", settle_timeout(), hb).await.expect("heartbeat client");
    republished += cmd_republished + hb_republished;
    let final_sql = format!("SELECT count(*) FROM agent_connection WHERE (client_info->>'round')::int = {final_round}");
    wait_count(&url, &final_sql, connections, "the final heartbeat round", settle_timeout()).await;
    wait_quiet(&lab).await;
    let peak = lab.workers[0].peak_kb();
    lab.stop_workers().await;
    let left = left_in_queues(&lab).await;

    let client = db(&url).await.expect("database");
    let session_rows = count_of(&client, "SELECT count(*) FROM agent_session").await;
    let all_js = instruction_js(&url).await.expect("instructions");
    let distinct_js: HashSet<i64> = all_js.iter().copied().collect();
    let connection_rows = count_of(&client, "SELECT count(*) FROM agent_connection").await;
    let final_hb = count_of(&client, &final_sql).await;
    let idempotency = count_of(&client, "SELECT count(*) FROM processed_message WHERE message_id LIKE 'fo-%'").await;
    let ids = within(
        "the instruction ids",
        QUERY_LIMIT,
        client.query("SELECT instruction_id::text FROM agent_instruction", &[]),
    )
    .await
    .expect("ids");

    let mut expected: HashSet<String> = (0..sessions).map(key_session).collect();
    expected.extend(ids.iter().map(|r| format!("agent.instruction.created/{}", r.get::<_, String>(0))));
    expected.extend((0..connections).map(key_opened));
    let events = drain_events(&lab).await;
    let (distinct, missing, unexpected, twice) = events.compare(&expected);
    let dead = drain_dead_letters(&lab).await;
    let r = replies.lock().expect("replies");
    assert!(r.refused.is_empty(), "commands refused: {:?}", &r.refused[..r.refused.len().min(5)]);

    let mut notes = String::new();
    let _ = write!(
        notes,
        "worker not ready {:.1} s after the crash; standby promoted {:.1} s after the crash; ready {:.1} s and first reply {:.1} s after the \
         promotion; {} commands answered before the crash, {} connections seen on the primary; {} commands \
         republished unanswered (same message_id), {} replies in all; heartbeat rounds 0..={final_round}; \
         sessions {session_rows}/{sessions}, instruction rows {} for {} of {commands} commands, idempotency records \
         {idempotency}, connections {connection_rows} (final round on {final_hb}/{connections})",
        noticed.as_secs_f64(),
        down_before_promotion.as_secs_f64(),
        ready_after.as_secs_f64(),
        first_reply_after.as_secs_f64(),
        answered_before.len(),
        before.len(),
        resent,
        r.copies,
        all_js.len(),
        distinct_js.len(),
    );
    assert!(lost_heartbeats.is_empty(), "heartbeats applied on the old primary, missing after: {lost_heartbeats:?}");
    assert!(lost_commands.is_empty(), "commands answered before the crash, missing after: {lost_commands:?}");
    let applied = session_rows.min(sessions as u64)
        + (distinct_js.len() as u64).min(commands as u64)
        + final_hb.min(connections as u64);
    let effects_expected = (sessions + commands + connections) as u64;
    let row = Row {
        scenario: "8. primary crashed, standby promoted".into(),
        sent: (sessions + commands) as u64 + resent + heartbeats_sent,
        republished: republished + resent,
        effects_expected,
        effects_applied: applied,
        lost: effects_expected - applied + (lost_heartbeats.len() + lost_commands.len()) as u64,
        applied_twice: (all_js.len() - distinct_js.len()) as u64
            + twice
            + idempotency.saturating_sub(commands as u64)
            + session_rows.saturating_sub(sessions as u64)
            + connection_rows.saturating_sub(connections as u64),
        events_expected: expected.len() as u64,
        events_published: events.deliveries,
        events_distinct: distinct,
        events_missing: missing,
        events_unexpected: unexpected,
        events_bad_message_id: events.bad_message_id,
        dead_expected: 0,
        dead_lettered: dead.len() as u64,
        peak_kb: peak,
        seconds: started.elapsed().as_secs_f64(),
        left_in_queues: left,
        notes,
    };
    row.report_and_assert();
}

/// A host that accepts TCP connections and never answers (a hung server) costs a new connection at most its
/// `connect_timeout`; then the next host of `database.url` is tried. Without the per-host bound the whole attempt
/// hangs on the first host until the pool gives up, and the next host is never reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_never_answers_costs_its_connect_timeout_then_the_next_host_serves() {
    let dir = TempDir::new("hunghost");
    let pg = tokio::task::block_in_place(|| PgCluster::start_new(dir.path()));
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let hung_port = hung.local_addr().expect("addr").port();
    // Accept and hold every connection without a word.
    let held = tokio::spawn(async move {
        let mut sockets = Vec::new();
        while let Ok((s, _)) = hung.accept().await {
            sockets.push(s);
        }
    });
    let settings = DatabaseSettings {
        url: format!(
            "postgres://postgres@127.0.0.1:{hung_port},127.0.0.1:{}/postgres?target_session_attrs=read-write&connect_timeout=1",
            pg.port()
        ),
        checkout_timeout_secs: 5.try_into().unwrap(),
        ..DatabaseSettings::default()
    };
    let pool = agent_connection_manager::db::build_pool(&settings).expect("pool");
    let client = pool.get().await.expect("a connection through the second host");
    let port: String = client.query_one("SELECT current_setting('port')", &[]).await.expect("port").get(0);
    assert_eq!(port, pg.port().to_string());
    let direct = agent_connection_manager::db::connect(&settings, None).await.expect("a direct connection");
    let port: String = direct.query_one("SELECT current_setting('port')", &[]).await.expect("port").get(0);
    assert_eq!(port, pg.port().to_string());
    held.abort();
}
