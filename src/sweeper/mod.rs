//! The sweeper: small periodic tasks, each with named defaults and a `run_once` that reports what it changed.
//!
//! Every task first claims itself with a lease row in one statement ([`lease::CLAIM_TASK`]), so with several
//! workers one of them runs a given task at a time and the others skip it; no session state is involved, so this
//! holds behind PgBouncer in transaction pooling mode too. The inactive-session, expiry and retention tasks first ask
//! whether anything is due (one read-only `EXISTS` query, [`any_due`]) and claim nothing when nothing is; the stale
//! task, whose first statement counts candidates for the brake, claims every cycle. Rows are then changed in bounded
//! batches, each in its own transaction: claimed with `FOR UPDATE SKIP LOCKED`, re-checked in the `UPDATE` that
//! changes them, and their events written to the outbox in the same transaction.

mod backlog;
pub mod catch_up;
pub mod inactive_sessions;
pub mod instruction_expiry;
pub mod lease;
pub mod log_partitions;
pub mod retention;
pub mod stale_connections;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::{GenericClient, Object, Pool};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

pub use backlog::{Backlog, BacklogProbe, ProbeChannel};
pub use lease::{Lease, CLAIM_TASK, RELEASE_TASK};

use crate::config::Settings;
use crate::db::{Sql, Unnamed};
use crate::error::Result;
use crate::events::{write_outbox, EventBody, OutboxSignal};
use crate::metrics::{Metrics, NameLabel};
use crate::telemetry::otlp::{SpanKind, Tracer};
use crate::trace_context::{self, TraceContext};
use lease::Claim;

/// What one sweeper cycle changed.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SweepReport {
    /// Active connections closed as `stale_connection`.
    pub stale_connections: u64,
    /// Set when the brake held this cycle.
    pub held: Option<stale_connections::Held>,
    /// Active sessions marked inactive.
    pub inactive_sessions: u64,
    /// Instructions given another try.
    pub instructions_retried: u64,
    /// Instructions expired for good.
    pub instructions_expired: u64,
    /// Idempotency records deleted after the retention period.
    pub processed_messages_pruned: u64,
    /// Log partitions created ahead and dropped after `logs.retention_days`.
    pub log_partitions: log_partitions::Report,
    /// Tasks skipped because another worker was running them (the stale task also while this worker catches up with
    /// its heartbeats, [`catch_up::ready`]).
    pub skipped_tasks: Vec<String>,
    /// Tasks that failed this cycle, with the error (each is retried next cycle; the others ran).
    pub failed_tasks: Vec<(String, String)>,
}

/// A batch statement of a task: its last two parameters are `param` and the batch size.
pub(crate) struct Batches<'a> {
    /// The task (for `sweeper_state.last_run_at`).
    pub task: &'a str,
    /// Claims (`FOR UPDATE SKIP LOCKED`), re-checks and changes up to $2 rows, returning what the events need.
    pub sql: &'a str,
    /// $1.
    pub param: f64,
    /// $2: rows per batch.
    pub size: i64,
    /// Batch transactions at once when the first batch comes back full.
    pub parallel: usize,
    /// Told after each batch that committed events.
    pub outbox: &'a OutboxSignal,
}

/// Runs a batch statement until batches come back short (or the task's lease is lost), each batch in its own transaction that also writes one
/// event per returned row to the outbox, so events reach the relay while the sweep goes on and row locks are held
/// for one batch only. The first batch runs on the claim's connection; when it comes back full, `parallel` loops
/// (the claim's connection and pooled ones) go on at once, kept disjoint by `SKIP LOCKED`. The first batch that
/// changes something also records the run in `sweeper_state.last_run_at`. Returns the rows changed.
pub(crate) async fn in_batches(
    claim: &mut Claim,
    pool: &Pool,
    b: Batches<'_>,
    event: impl FnMut(&tokio_postgres::Row) -> EventBody,
) -> Result<u64> {
    // The loops run in this task, interleaved at their awaits; the lock is never held across one.
    let event = std::sync::Mutex::new(event);
    let marked = AtomicBool::new(false);
    let total = AtomicU64::new(0);
    let first = one_batch(claim.client(), &b, &event, &marked).await?;
    total.store(first as u64, Ordering::Relaxed);
    if (first as i64) < b.size {
        return Ok(first as u64);
    }
    let lost = claim.lost();
    let others = (1..b.parallel.max(1)).map(|_| async {
        let mut client = crate::db::checkout(pool).await?;
        batch_loop(&mut client, &b, &event, &marked, &total, &lost).await
    });
    let mine = batch_loop(claim.client(), &b, &event, &marked, &total, &lost);
    futures_util::future::try_join(mine, futures_util::future::try_join_all(others)).await?;
    Ok(total.load(Ordering::Relaxed))
}

/// Batches until one comes back short, or the task's lease was lost to another worker.
async fn batch_loop(
    client: &mut Object,
    b: &Batches<'_>,
    event: &std::sync::Mutex<impl FnMut(&tokio_postgres::Row) -> EventBody>,
    marked: &AtomicBool,
    total: &AtomicU64,
    lost: &AtomicBool,
) -> Result<()> {
    loop {
        if lost.load(Ordering::Relaxed) {
            return Ok(());
        }
        let n = one_batch(client, b, event, marked).await?;
        total.fetch_add(n as u64, Ordering::Relaxed);
        if (n as i64) < b.size {
            return Ok(());
        }
    }
}

/// One batch in one transaction; returns the rows changed.
async fn one_batch(
    client: &mut Object,
    b: &Batches<'_>,
    event: &std::sync::Mutex<impl FnMut(&tokio_postgres::Row) -> EventBody>,
    marked: &AtomicBool,
) -> Result<usize> {
    let tx = client.transaction().await?;
    let rows = Unnamed(&tx).typed_query(b.sql, &[&b.param, &b.size]).await?;
    if !rows.is_empty() {
        let now = crate::db::now(&tx).await?;
        let bodies: Vec<EventBody> = {
            let mut f = event.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            rows.iter().map(|r| (*f)(r)).collect()
        };
        write_outbox(&tx, now, bodies).await?;
        if !marked.swap(true, Ordering::Relaxed) {
            mark_run(&tx, b.task).await?;
        }
    }
    tx.commit().await?;
    if !rows.is_empty() {
        b.outbox.committed();
    }
    Ok(rows.len())
}

/// Whether a task has anything to do: `sql` is a read-only `SELECT EXISTS (...)` of its due rows. A task with
/// nothing due neither claims its lease nor writes anything.
pub(crate) async fn any_due(pool: &Pool, sql: &str, params: &[&dyn crate::db::Param]) -> Result<bool> {
    let client = crate::db::checkout(pool).await?;
    Ok(Unnamed(&client).typed_one(sql, params).await?.get(0))
}

/// Records in `sweeper_state.last_run_at` that a task changed something (the transaction's start time).
pub(crate) async fn mark_run(client: &impl Sql, task: &str) -> Result<()> {
    client.typed_execute("UPDATE sweeper_state SET last_run_at = now() WHERE task = $1", &[&task]).await?;
    Ok(())
}

/// The sweeper of one worker.
#[derive(Clone)]
pub struct Sweeper {
    pool: Pool,
    settings: Arc<Settings>,
    probe: BacklogProbe,
    metrics: Arc<Metrics>,
    lease: Arc<Lease>,
    outbox: OutboxSignal,
    tracer: Tracer,
}

impl Sweeper {
    /// A sweeper on this pool, reading the heartbeat backlog through `probe`, claiming its tasks as a holder of its
    /// own with leases of `sweeper.task_lease_secs` ([`lease::length`]), telling `outbox` after every commit that
    /// wrote events.
    pub fn new(
        pool: Pool,
        settings: Arc<Settings>,
        probe: BacklogProbe,
        metrics: Arc<Metrics>,
        outbox: OutboxSignal,
    ) -> Self {
        let lease = Arc::new(Lease::new(lease::length(&settings.sweeper)));
        // Each task's counters start at 0, so that a first failure is an increase Prometheus sees.
        for task in [
            stale_connections::TASK,
            inactive_sessions::TASK,
            instruction_expiry::TASK,
            retention::TASK,
            log_partitions::TASK,
        ] {
            let label = NameLabel { name: task.into() };
            metrics.sweeper_failures.get_or_create(&label).inc_by(0);
            metrics.sweeper_changes.get_or_create(&label).inc_by(0);
        }
        Self { pool, settings, probe, metrics, lease, outbox, tracer: Tracer::default() }
    }

    /// The same sweeper, recording a span for each cycle with `tracer`.
    pub fn with_tracer(self, tracer: Tracer) -> Self {
        Self { tracer, ..self }
    }

    /// The holder name and lease length this sweeper claims its tasks with.
    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    fn observe(&self, task: &str, started: Instant, changed: u64) {
        let label = NameLabel { name: task.into() };
        self.metrics.sweeper_seconds.get_or_create(&label).observe(started.elapsed().as_secs_f64());
        self.metrics.sweeper_changes.get_or_create(&label).inc_by(changed);
    }

    /// A task failed: logged and counted; the cycle goes on with the next task.
    fn failed(&self, report: &mut SweepReport, task: &str, e: crate::error::Error) {
        tracing::error!(task, error = %e, "sweeper task failed; it runs again next cycle");
        self.metrics.sweeper_failures.get_or_create(&NameLabel { name: task.into() }).inc();
        report.failed_tasks.push((task.into(), e.to_string()));
    }

    /// Runs every task once. A task that fails is logged, counted and reported in
    /// [`SweepReport::failed_tasks`]; the others run all the same. A cycle is a trace of its own: the events it
    /// writes carry it (`traceparent`).
    pub async fn run_once(&self) -> Result<SweepReport> {
        let trace = TraceContext::new_trace();
        let mut span = self.tracer.span("sweeper cycle", SpanKind::Internal, &trace);
        let log_span = tracing::info_span!("sweeper_cycle", trace_id = %trace.trace_id_hex());
        let report = tracing::Instrument::instrument(trace_context::scope(trace, self.cycle()), log_span).await;
        if span.is_recording() {
            match &report {
                Ok(r) => {
                    span.set_int("acm.sweeper.stale_connections", r.stale_connections as i64);
                    span.set_int("acm.sweeper.inactive_sessions", r.inactive_sessions as i64);
                    span.set_int("acm.sweeper.instructions_retried", r.instructions_retried as i64);
                    span.set_int("acm.sweeper.instructions_expired", r.instructions_expired as i64);
                    if r.held.is_some() {
                        span.set_text("acm.sweeper.brake", "held");
                    }
                    if !r.failed_tasks.is_empty() {
                        let failed: Vec<&str> = r.failed_tasks.iter().map(|(task, _)| task.as_str()).collect();
                        span.set_error(&format!("tasks failed: {}", failed.join(", ")));
                    }
                }
                Err(e) => span.set_error(&e.to_string()),
            }
        }
        report
    }

    async fn cycle(&self) -> Result<SweepReport> {
        let s = &self.settings;
        let mut report = SweepReport::default();

        let t = Instant::now();
        let cfg = stale_connections::Config::from(&s.sweeper);
        let patience = s.check_interval() + catch_up::SETTLE;
        let ready = catch_up::ready(&self.probe, &self.metrics, cfg.stale_after, patience).await;
        let stale = if !ready { Ok(None) } else { self.stale(&cfg).await };
        match stale {
            Ok(None) => report.skipped_tasks.push(stale_connections::TASK.into()),
            Ok(Some(r)) => {
                report.stale_connections = r.closed;
                if r.held.is_some() {
                    self.metrics.brake_holds.inc();
                }
                report.held = r.held;
            }
            Err(e) => self.failed(&mut report, stale_connections::TASK, e),
        }
        self.observe(stale_connections::TASK, t, report.stale_connections);

        let t = Instant::now();
        let cfg = inactive_sessions::Config::from(&s.sweeper);
        match inactive_sessions::run_once(&self.pool, &self.lease, &cfg, &self.outbox).await {
            Ok(None) => report.skipped_tasks.push(inactive_sessions::TASK.into()),
            Ok(Some(n)) => report.inactive_sessions = n,
            Err(e) => self.failed(&mut report, inactive_sessions::TASK, e),
        }
        self.observe(inactive_sessions::TASK, t, report.inactive_sessions);

        let t = Instant::now();
        let cfg = instruction_expiry::Config::from(&s.sweeper);
        match instruction_expiry::run_once(&self.pool, &self.lease, &cfg, &self.outbox).await {
            Ok(None) => report.skipped_tasks.push(instruction_expiry::TASK.into()),
            Ok(Some(r)) => {
                report.instructions_retried = r.retried;
                report.instructions_expired = r.expired;
            }
            Err(e) => self.failed(&mut report, instruction_expiry::TASK, e),
        }
        self.observe(instruction_expiry::TASK, t, report.instructions_retried + report.instructions_expired);

        let t = Instant::now();
        match retention::run_once(&self.pool, &self.lease, &retention::Config::from(&**s)).await {
            Ok(None) => report.skipped_tasks.push(retention::TASK.into()),
            Ok(Some(r)) => {
                report.processed_messages_pruned = r.processed_messages;
            }
            Err(e) => self.failed(&mut report, retention::TASK, e),
        }
        self.observe(retention::TASK, t, report.processed_messages_pruned);

        let t = Instant::now();
        match log_partitions::run_once(&self.pool, &self.lease, &log_partitions::Config::from(&**s)).await {
            Ok(None) => report.skipped_tasks.push(log_partitions::TASK.into()),
            Ok(Some(r)) => report.log_partitions = r,
            Err(e) => self.failed(&mut report, log_partitions::TASK, e),
        }
        self.observe(log_partitions::TASK, t, report.log_partitions.created + report.log_partitions.dropped);
        Ok(report)
    }

    /// The stale task, judged with the heartbeat backlog (not at all while the broker cannot be asked for it).
    async fn stale(&self, cfg: &stale_connections::Config) -> Result<Option<stale_connections::Report>> {
        match self.probe.depth().await {
            Backlog::Unavailable => {
                tracing::warn!("broker unreachable: stale connections are not judged this cycle");
                Ok(None)
            }
            Backlog::Ignored => stale_connections::run_once(&self.pool, &self.lease, cfg, None, &self.outbox).await,
            Backlog::Depth(n) => {
                self.metrics.heartbeat_backlog.set(i64::try_from(n).unwrap_or(i64::MAX));
                stale_connections::run_once(&self.pool, &self.lease, cfg, Some(n), &self.outbox).await
            }
        }
    }

    /// Runs a cycle at once, then every `check_interval_secs`, until shutdown. A failed cycle is logged and the
    /// next one runs on schedule.
    pub async fn run(self, shutdown: CancellationToken) {
        // This worker's own pauses, which the stale sweep waits out (catch_up).
        tokio::spawn(self.probe.progress().monitor(shutdown.clone()));
        // The first cycle runs at start, once the broker can be asked for the heartbeat backlog (or 10 s passed).
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = self.probe.wait_ready(Duration::from_secs(10)) => {}
        }
        let mut tick = tokio::time::interval(self.settings.check_interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.run_once().await {
                Ok(r) => {
                    let changed = r.stale_connections
                        + r.inactive_sessions
                        + r.instructions_retried
                        + r.instructions_expired
                        + r.processed_messages_pruned;
                    if changed > 0 || r.held.is_some() {
                        tracing::info!(
                            stale_connections = r.stale_connections,
                            inactive_sessions = r.inactive_sessions,
                            instructions_retried = r.instructions_retried,
                            instructions_expired = r.instructions_expired,
                            processed_messages_pruned = r.processed_messages_pruned,
                            held = r.held.is_some(),
                            "sweeper cycle"
                        );
                    }
                }
                Err(e) => tracing::error!(error = %e, "sweeper cycle failed; the next runs on schedule"),
            }
        }
    }
}

/// Seconds as a `Duration`, for configs built from settings.
pub(crate) fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}
