//! The metrics operators alert on and chart, against a real worker: `acm_ready` follows what `/readyz` answers,
//! `acm_heartbeat_backlog` is the heartbeat queue's depth as the sweeper reads it, `acm_command_seconds` is counted
//! per command type, the counters alerts take `increase` of start at 0, and the process's `process_*` figures are
//! served beside them.

mod common;

use std::time::Duration;

use agent_connection_manager::sweeper::BacklogProbe;
use common::{amqp_channel, eventually, http_get, queue_counts, TestApp};
use tokio_util::sync::CancellationToken;

/// The registry as `/metrics` encodes it.
fn encoded(app: &TestApp) -> String {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &app.manager.metrics().registry).expect("encodes");
    text
}

/// The value of the sample `name` (with its labels, if any) in `text`.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test]
async fn ready_gauge_is_0_before_start_and_1_once_the_worker_consumes() {
    let app = TestApp::unstarted_with(|_| {}).await;
    let stop = CancellationToken::new();
    let addr = "127.0.0.1:0".parse().unwrap();
    let (bound, _task) =
        agent_connection_manager::http::serve(app.manager.clone(), addr, stop.clone()).await.expect("serves");
    let (status, body) = http_get(bound.port(), "/metrics").await.expect("/metrics answers");
    assert_eq!(status, 200, "{body}");
    assert_eq!(sample(&body, "acm_ready"), Some(0.0), "not started, so not ready:\n{body}");
    let (status, _) = http_get(bound.port(), "/readyz").await.expect("/readyz answers");
    assert_eq!(status, 503, "/readyz agrees that the worker is not ready");

    app.manager.start().await.expect("worker starts");
    eventually("acm_ready 1 on /metrics once the worker consumes", Duration::from_secs(30), || async {
        let (_, body) = http_get(bound.port(), "/metrics").await?;
        (sample(&body, "acm_ready") == Some(1.0)).then_some(())
    })
    .await;
    let (status, _) = http_get(bound.port(), "/readyz").await.expect("/readyz answers");
    assert_eq!(status, 200, "/readyz agrees that the worker is ready");
    stop.cancel();
    app.cleanup().await;
}

#[tokio::test]
async fn heartbeat_backlog_is_the_queue_depth_the_sweeper_read() {
    let app = TestApp::unstarted_with(|_| {}).await;
    for i in 0..5 {
        app.client.heartbeat("agent-b", "no-such-session", &format!("c-{i}")).await.expect("heartbeat published");
    }
    let (_conn, ch) = amqp_channel(&app.settings).await;
    let queue = format!("{}.heartbeats", app.settings.amqp.prefix);
    eventually("5 heartbeats waiting in the queue", Duration::from_secs(10), || async {
        (queue_counts(&ch, &queue).await.0 == 5).then_some(())
    })
    .await;
    assert_eq!(sample(&encoded(&app), "acm_heartbeat_backlog"), Some(0.0), "nothing read before a sweep");

    let probe = BacklogProbe::broker();
    probe.set(Some((ch.clone(), app.topology()))).await;
    app.manager.sweep_once(probe).await.expect("sweep runs");
    assert_eq!(sample(&encoded(&app), "acm_heartbeat_backlog"), Some(5.0), "the sweep read the depth");
    app.cleanup().await;
}

#[tokio::test]
async fn command_latency_is_counted_by_type_and_process_figures_are_served() {
    let app = TestApp::start().await;
    app.session("agent-m").await;
    app.session("agent-m").await;
    let text = encoded(&app);
    assert_eq!(sample(&text, r#"acm_command_seconds_count{type="session.create"}"#), Some(2.0), "{text}");
    assert!(sample(&text, r#"acm_command_seconds_sum{type="session.create"}"#).is_some_and(|s| s > 0.0), "{text}");
    for reason in ["not_json", "unknown_type", "forbidden", "database_rejected"] {
        let name = format!(r#"acm_messages_dead_lettered_total{{name="{reason}"}}"#);
        assert_eq!(sample(&text, &name), Some(0.0), "every dead-letter reason starts at 0:\n{text}");
    }
    for task in ["stale_connections", "inactive_sessions", "instruction_expiry", "retention"] {
        let name = format!(r#"acm_sweeper_task_failures_total{{name="{task}"}}"#);
        assert_eq!(sample(&text, &name), Some(0.0), "every sweeper task's failures start at 0:\n{text}");
    }
    let rss = sample(&text, "process_resident_memory_bytes").expect("process_resident_memory_bytes is served");
    assert!(rss > 1_048_576.0, "a resident size of {rss} bytes is implausible");
    assert!(sample(&text, "process_cpu_seconds_total").is_some_and(|s| s > 0.0), "{text}");
    assert!(sample(&text, "process_start_time_seconds").is_some_and(|s| s > 1.6e9), "{text}");
    app.cleanup().await;
}
