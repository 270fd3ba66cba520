//! HTTP for operators: `/healthz` (alive), `/readyz` (broker connected and not blocking publishers, database
//! reachable, consumers running) and `/metrics` (Prometheus text format).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// What the handlers share: the manager and the statistics cache of `/metrics`.
#[derive(Clone)]
struct AppState {
    manager: Shared,
    stats: Arc<StatsCache>,
}

/// The statistics gauges of `/metrics` are counts over whole tables (a million active connections cost a million
/// index entries): a scrape serves the values of the last refresh and, when those are older than
/// `http.stats_cache_secs`, starts one refresh in the background. A scrape thus does not wait for the counts (but
/// the first one after start), and they run at most once per interval however often, and by however many
/// scrapers, `/metrics` is asked.
struct StatsCache {
    every: Duration,
    /// When the last refresh started (`None`: never); a refresh under way counts as fresh.
    last: std::sync::Mutex<Option<Instant>>,
}

impl StatsCache {
    /// Starts a refresh unless one started within the interval. The very first one is awaited (bounded), so that
    /// a worker's first scrape already reports the counts; later scrapes never wait for them.
    async fn refresh_if_due(&self, manager: &Shared) {
        let first = {
            let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|t| t.elapsed() < self.every) {
                return;
            }
            let first = last.is_none();
            *last = Some(Instant::now());
            first
        };
        let m = manager.clone();
        let refresh = tokio::spawn(async move {
            // Bounded like every other wait: a refresh that cannot finish within the interval is given up; the next
            // scrape after the interval starts another.
            let limit = m.settings().http.stats_cache_secs.get();
            match tokio::time::timeout(Duration::from_secs(limit), m.get_connection_stats()).await {
                Ok(Ok(s)) => {
                    let metrics = m.metrics();
                    metrics.active_connections.set(s.active_connections);
                    metrics.active_sessions.set(s.active_sessions);
                    metrics.pending_instructions.set(s.pending_instructions);
                    metrics.sent_instructions.set(s.sent_instructions);
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot refresh the statistics of /metrics"),
                Err(_) => tracing::warn!("refreshing the statistics of /metrics took longer than {limit} s"),
            }
        });
        if first {
            let _ = refresh.await;
        }
    }
}

/// The router.
pub fn router(manager: Shared) -> Router {
    let every = Duration::from_secs(manager.settings().http.stats_cache_secs.get());
    let stats = Arc::new(StatsCache { every, last: std::sync::Mutex::new(None) });
    Router::new()
        .route("/healthz", get(|| async { Json(json!({ "status": "ok" })) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(AppState { manager, stats })
}

async fn database_ok(m: &AgentConnectionManager) -> bool {
    let check = async {
        let client = m.pool().get().await.ok()?;
        client.typed_one("SELECT 1", &[]).await.ok()
    };
    matches!(tokio::time::timeout(Duration::from_secs(2), check).await, Ok(Some(_)))
}

/// What `/readyz` checks: `Ok` when ready, else the reasons; with the checks' values either way.
async fn readiness(m: &AgentConnectionManager) -> (std::result::Result<(), String>, serde_json::Value) {
    let broker = m.health().broker_connected.load(Ordering::Relaxed);
    let consumers = m.health().consumers_running.load(Ordering::Relaxed);
    let blocked = m.health().blocked();
    let database = database_ok(m).await;
    let body = json!({ "broker": broker, "database": database, "consumers": consumers,
                       "broker_blocked": blocked.is_some() });
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
    let verdict = if reasons.is_empty() { Ok(()) } else { Err(reasons.join(", ")) };
    (verdict, body)
}

async fn readyz(State(AppState { manager: m, .. }): State<AppState>) -> impl IntoResponse {
    match readiness(&m).await {
        (Ok(()), body) => (StatusCode::OK, Json(json!({ "status": "ready", "checks": body }))),
        (Err(reason), body) => {
            (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "status": "not_ready", "reason": reason, "checks": body })))
        }
    }
}

async fn metrics(State(AppState { manager: m, stats }): State<AppState>) -> impl IntoResponse {
    stats.refresh_if_due(&m).await;
    let metrics = m.metrics();
    // The same checks as /readyz, so an alert can tell that no worker is ready without probing /readyz itself.
    metrics.ready.set(i64::from(readiness(&m).await.0.is_ok()));
    let status = m.pool().status();
    metrics.pool_size.set(status.max_size as i64);
    metrics.pool_available.set(status.available as i64);
    metrics.pool_waiting.set(status.waiting as i64);
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

/// Why `http.listen` cannot be served, in one line naming the address and the key.
pub fn listen_error(addr: SocketAddr, e: &std::io::Error) -> crate::config::ConfigError {
    let why = match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            "the address is already in use (another process listens there): set http.listen (ACM_HTTP__LISTEN) to a \
             free address, or to \"\" to serve no HTTP"
                .to_string()
        }
        _ => e.to_string(),
    };
    crate::config::ConfigError(format!("http.listen: cannot listen on {addr}: {why}"))
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
