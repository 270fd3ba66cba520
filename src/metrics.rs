//! Prometheus metrics: counters and histograms updated where the work happens, gauges refreshed at scrape time.
//! The service's own metrics are prefixed `acm_`; the process's CPU, memory, threads and file descriptors are
//! read from `/proc` at each scrape under the standard unprefixed `process_*` names ([`process`]).

pub mod process;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// `type` and `outcome` of a consumed message.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MessageLabels {
    /// Message type (`unknown` when unparsable).
    pub r#type: String,
    /// `ok`, `error` (an error reply), `rejected` (heartbeat that changed nothing), `dead_lettered`.
    pub outcome: String,
}

/// The `type` of a command.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabel {
    /// Message type.
    pub r#type: String,
}

/// A single `reason` or `task` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NameLabel {
    /// The reason or task.
    pub name: String,
}

/// Every metric of the service.
pub struct Metrics {
    /// The registry `/metrics` encodes.
    pub registry: Registry,
    /// Messages consumed by type and outcome.
    pub messages: Family<MessageLabels, Counter>,
    /// Messages dead-lettered by reason.
    pub dead_lettered: Family<NameLabel, Counter>,
    /// Heartbeat deliveries per batch.
    pub heartbeat_batch_size: Histogram,
    /// Duration of database transactions applying messages.
    pub db_transaction_seconds: Histogram,
    /// Time to apply a command, by type: its transaction with any retries, until it committed or was refused.
    pub command_seconds: Family<TypeLabel, Histogram>,
    /// Rows changed by each sweeper task.
    pub sweeper_changes: Family<NameLabel, Counter>,
    /// Duration of each sweeper task.
    pub sweeper_seconds: Family<NameLabel, Histogram>,
    /// Sweeper task runs that failed (the task is retried next cycle; the other tasks run).
    pub sweeper_failures: Family<NameLabel, Counter>,
    /// Cycles in which the stale brake held.
    pub brake_holds: Counter,
    /// Stale sweeps that judged before this worker had applied the heartbeats it received (after putting the sweep
    /// off for a stale window).
    pub stale_catch_up_timeouts: Counter,
    /// Messages refused by a per-agent limit, by limit (`connections`, `sessions`, `pending_instructions`).
    pub limit_refusals: Family<NameLabel, Counter>,
    /// Events published and confirmed.
    pub events_published: Counter,
    /// Publish-to-confirm latency of outbox batches.
    pub publish_confirm_seconds: Histogram,
    /// Unpublished outbox rows (every row of the outbox: published ones are deleted).
    pub outbox_backlog: Gauge,
    /// 1 while this worker's relay holds the relay lease (publishes the outbox), 0 while it stands by.
    pub outbox_relay_leader: Gauge,
    /// Age of the oldest unpublished outbox row.
    pub outbox_oldest_age_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Pool: maximum size.
    pub pool_size: Gauge,
    /// Pool: idle connections.
    pub pool_available: Gauge,
    /// Pool: tasks waiting for a connection.
    pub pool_waiting: Gauge,
    /// Active connections.
    pub active_connections: Gauge,
    /// Active sessions.
    pub active_sessions: Gauge,
    /// Pending instructions.
    pub pending_instructions: Gauge,
    /// Sent instructions.
    pub sent_instructions: Gauge,
    /// 1 while the broker blocks this worker's publishers (memory or disk alarm), else 0.
    pub broker_blocked: Gauge,
    /// Times the broker started blocking this worker's publishers.
    pub broker_blocks: Counter,
    /// 1 while `/readyz` would answer 200 (broker connected and not blocking, database reachable, consumers
    /// running), else 0; evaluated at each scrape.
    pub ready: Gauge,
    /// Messages waiting in the heartbeat queues, as the sweeper last read them (once per cycle).
    pub heartbeat_backlog: Gauge,
    /// Spans the OTLP collector accepted.
    pub trace_spans_exported: Counter,
    /// Spans not exported, by reason: `queue_full` (the exporter's queue was full: the collector is slower than the
    /// work) or `export_failed` (the collector was unreachable, too slow or refused the batch).
    pub trace_spans_dropped: Family<NameLabel, Counter>,
}

/// Reasons a span is dropped ([`Metrics::trace_spans_dropped`]).
pub const SPAN_DROP_REASONS: [&str; 2] = ["queue_full", "export_failed"];

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric under the `acm_` prefix.
    pub fn new() -> Self {
        let mut root = Registry::default();
        root.register_collector(Box::new(process::ProcessCollector));
        let registry = root.sub_registry_with_prefix("acm");
        let m = Metrics {
            messages: Family::default(),
            dead_lettered: Family::default(),
            heartbeat_batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            db_transaction_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            command_seconds: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.0005, 2.0, 16))),
            sweeper_changes: Family::default(),
            sweeper_seconds: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.001, 2.0, 16))),
            sweeper_failures: Family::default(),
            brake_holds: Counter::default(),
            stale_catch_up_timeouts: Counter::default(),
            limit_refusals: Family::default(),
            events_published: Counter::default(),
            publish_confirm_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            outbox_backlog: Gauge::default(),
            outbox_relay_leader: Gauge::default(),
            outbox_oldest_age_seconds: Gauge::default(),
            pool_size: Gauge::default(),
            pool_available: Gauge::default(),
            pool_waiting: Gauge::default(),
            active_connections: Gauge::default(),
            active_sessions: Gauge::default(),
            pending_instructions: Gauge::default(),
            sent_instructions: Gauge::default(),
            broker_blocked: Gauge::default(),
            broker_blocks: Counter::default(),
            ready: Gauge::default(),
            heartbeat_backlog: Gauge::default(),
            trace_spans_exported: Counter::default(),
            trace_spans_dropped: Family::default(),
            registry: Registry::default(),
        };
        registry.register("messages_consumed", "Messages consumed by type and outcome", m.messages.clone());
        registry.register("messages_dead_lettered", "Messages dead-lettered by reason", m.dead_lettered.clone());
        registry.register("heartbeat_batch_size", "Heartbeat deliveries per batch", m.heartbeat_batch_size.clone());
        registry.register(
            "db_transaction_seconds",
            "Duration of transactions applying messages",
            m.db_transaction_seconds.clone(),
        );
        registry.register("sweeper_changes", "Rows changed by sweeper task", m.sweeper_changes.clone());
        registry.register("sweeper_task_seconds", "Duration of sweeper tasks", m.sweeper_seconds.clone());
        registry.register("sweeper_task_failures", "Sweeper task runs that failed", m.sweeper_failures.clone());
        registry.register("sweeper_brake_holds", "Sweeper cycles held by the stale brake", m.brake_holds.clone());
        registry.register(
            "sweeper_stale_catch_up_timeouts",
            "Stale sweeps that judged before this worker had applied the heartbeats it received",
            m.stale_catch_up_timeouts.clone(),
        );
        registry.register(
            "limit_refusals",
            "Messages refused by a per-agent limit, by limit",
            m.limit_refusals.clone(),
        );
        registry.register("events_published", "Events published and confirmed", m.events_published.clone());
        registry.register(
            "publish_confirm_seconds",
            "Publish-to-confirm latency of outbox batches",
            m.publish_confirm_seconds.clone(),
        );
        registry.register("outbox_backlog", "Unpublished outbox events", m.outbox_backlog.clone());
        registry.register(
            "outbox_relay_leader",
            "1 while this worker's relay holds the relay lease and publishes the outbox",
            m.outbox_relay_leader.clone(),
        );
        registry.register(
            "outbox_oldest_age_seconds",
            "Age of the oldest unpublished event",
            m.outbox_oldest_age_seconds.clone(),
        );
        registry.register("db_pool_size", "Database pool maximum size", m.pool_size.clone());
        registry.register("db_pool_available", "Idle pooled database connections", m.pool_available.clone());
        registry.register("db_pool_waiting", "Tasks waiting for a database connection", m.pool_waiting.clone());
        registry.register("active_connections", "Active agent connections", m.active_connections.clone());
        registry.register("active_sessions", "Active agent sessions", m.active_sessions.clone());
        registry.register("pending_instructions", "Pending instructions", m.pending_instructions.clone());
        registry.register("sent_instructions", "Sent instructions", m.sent_instructions.clone());
        registry.register(
            "broker_blocked",
            "1 while the broker blocks publishers (memory or disk alarm)",
            m.broker_blocked.clone(),
        );
        registry.register("broker_blocks", "Times the broker started blocking publishers", m.broker_blocks.clone());
        registry.register(
            "command_seconds",
            "Time to apply a command by type, retries included, until committed or refused",
            m.command_seconds.clone(),
        );
        registry.register("ready", "1 while the worker is ready (what /readyz answers 200 for)", m.ready.clone());
        registry.register(
            "heartbeat_backlog",
            "Messages in the heartbeat queues, as the sweeper last read them",
            m.heartbeat_backlog.clone(),
        );
        registry.register("trace_spans_exported", "Spans the OTLP collector accepted", m.trace_spans_exported.clone());
        registry.register(
            "trace_spans_dropped",
            "Spans not exported, by reason (queue_full, export_failed)",
            m.trace_spans_dropped.clone(),
        );
        for reason in SPAN_DROP_REASONS {
            m.trace_spans_dropped.get_or_create(&NameLabel { name: reason.into() }).inc_by(0);
        }
        // Every reason starts at 0, so that the first dead letter of a reason is an increase Prometheus sees (a
        // series that appears at 1 has no earlier sample to increase from).
        for kind in crate::error::PoisonKind::ALL {
            m.dead_lettered.get_or_create(&NameLabel { name: kind.label().into() }).inc_by(0);
        }
        Metrics { registry: root, ..m }
    }

    /// Counts a consumed message.
    pub fn message(&self, ty: &str, outcome: &str) {
        self.messages.get_or_create(&MessageLabels { r#type: ty.into(), outcome: outcome.into() }).inc();
    }

    /// Counts a refusal by the per-agent limit `name`.
    pub fn limit_refusal(&self, name: &str) {
        self.limit_refusals.get_or_create(&NameLabel { name: name.into() }).inc();
    }

    /// Counts a dead-lettered message.
    pub fn dead_letter(&self, reason: &str) {
        self.dead_lettered.get_or_create(&NameLabel { name: reason.into() }).inc();
    }
}
