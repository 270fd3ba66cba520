//! HTTP for operators: `/healthz` (alive), `/readyz` (broker connected and not blocking publishers, database
//! reachable, consumers running) and `/metrics` (Prometheus text format).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::db::Sql;
use crate::manager::AgentConnectionManager;
use crate::relay;

type Shared = Arc<AgentConnectionManager>;

/// The router.
pub fn router(manager: Shared) -> Router {
    Router::new()
        .route("/healthz", get(|| async { Json(json!({ "status": "ok" })) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(manager)
}

async fn database_ok(m: &AgentConnectionManager) -> bool {
    let check = async {
        let client = m.pool().get().await.ok()?;
        client.typed_one("SELECT 1", &[]).await.ok()
    };
    matches!(tokio::time::timeout(Duration::from_secs(2), check).await, Ok(Some(_)))
}

async fn readyz(State(m): State<Shared>) -> impl IntoResponse {
    let broker = m.health().broker_connected.load(Ordering::Relaxed);
    let consumers = m.health().consumers_running.load(Ordering::Relaxed);
    let blocked = m.health().blocked();
    let database = database_ok(&m).await;
    let body = json!({ "broker": broker, "database": database, "consumers": consumers,
                       "broker_blocked": blocked.is_some() });
    if broker && database && consumers && blocked.is_none() {
        (StatusCode::OK, Json(json!({ "status": "ready", "checks": body })))
    } else {
        let mut reasons = Vec::new();
        if !broker {
            reasons.push("broker not connected".to_string());
        }
        if let Some(why) = blocked {
            reasons.push(format!("broker blocks publishers ({why})"));
        }
        if !database {
            reasons.push("database unreachable".to_string());
        }
        if !consumers {
            reasons.push("consumers not running".to_string());
        }
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "not_ready", "reason": reasons.join(", "), "checks": body })),
        )
    }
}

async fn metrics(State(m): State<Shared>) -> impl IntoResponse {
    let metrics = m.metrics();
    let status = m.pool().status();
    metrics.pool_size.set(status.max_size as i64);
    metrics.pool_available.set(status.available as i64);
    metrics.pool_waiting.set(status.waiting as i64);
    if let Ok(s) = m.get_connection_stats().await {
        metrics.active_connections.set(s.active_connections);
        metrics.active_sessions.set(s.active_sessions);
        metrics.pending_instructions.set(s.pending_instructions);
        metrics.sent_instructions.set(s.sent_instructions);
    }
    if let Ok((n, age)) = relay::backlog(m.pool()).await {
        metrics.outbox_backlog.set(n);
        metrics.outbox_oldest_age_seconds.set(age);
    }
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &metrics.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
            body,
        ),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, [(header::CONTENT_TYPE, "text/plain")], e.to_string()),
    }
}

/// Serves until shutdown. Returns the bound address (useful with port 0) once listening.
pub async fn serve(
    manager: Shared,
    addr: SocketAddr,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tracing::info!(address = %bound, "serving /healthz, /readyz and /metrics");
    let app = router(manager);
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.cancelled().await }).await;
        if let Err(e) = served {
            tracing::error!(error = %e, "HTTP server failed");
        }
    });
    Ok((bound, task))
}
