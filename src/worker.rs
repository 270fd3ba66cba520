//! The worker: wires the consumers, the sweeper and the outbox relay, and keeps them connected to the broker.
//!
//! The sweeper needs only the database and runs for the worker's whole life. The consumers
//! and the relay live in a broker session: when the connection or a channel is lost, the session ends (deliveries of
//! the dead channel are never acknowledged on another), and a new one is made after an exponential backoff with
//! jitter, re-declaring the topology. A connect that fails is logged as a broker never reached (no session of this
//! worker was ever made) or as one lost and not reached again, with the node's address and the cause. On shutdown
//! the consumers stop taking deliveries and finish the ones they hold, then the relay flushes the outbox, then the
//! channels and connection are closed (so a clean stop logs nothing at ERROR); whatever is not done within
//! `worker.shutdown_grace_secs` is abandoned by [`crate::manager::AgentConnectionManager::stop`] (unacknowledged
//! deliveries are redelivered by the broker).
//!
//! While the broker blocks the connection's publishers (a memory or disk alarm: `connection.blocked`), nothing can
//! be written to it — no publish, acknowledgement or close. [`Health::broker_blocked`] is set (so `/readyz` says
//! so), the relay claims nothing, and every publish gives up after `amqp.confirm_timeout_secs`; no database
//! transaction is open across any of these waits.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use futures_util::StreamExt;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::amqp::{self, Topology};
use crate::config::Settings;
use crate::consumer::{self, Shared};
use crate::error::{Error, Result};
use crate::events::OutboxSignal;
use crate::metrics::Metrics;
use crate::relay;
use crate::retry::Backoff;
use crate::sweeper::{BacklogProbe, Sweeper};
use crate::telemetry::otlp::Tracer;

/// How long the consumers of a failed broker session get to stop before they are abandoned (their deliveries are
/// redelivered by the broker).
const CONSUMERS_GONE: Duration = Duration::from_secs(10);

/// How long a stopping worker gives the span exporter to post what is queued.
const SPAN_FLUSH_AT_STOP: Duration = Duration::from_secs(3);

/// Liveness of the parts `/readyz` reports on.
#[derive(Debug, Default)]
pub struct Health {
    /// A broker session is up.
    pub broker_connected: AtomicBool,
    /// Both consumers are consuming.
    pub consumers_running: AtomicBool,
    /// The broker blocks this worker's publishers (`connection.blocked`: a memory or disk alarm).
    pub broker_blocked: Arc<AtomicBool>,
    /// The broker's reason for the block, while it lasts.
    pub blocked_reason: Mutex<String>,
}

impl Health {
    fn set(&self, broker: bool, consumers: bool) {
        self.broker_connected.store(broker, Ordering::Relaxed);
        self.consumers_running.store(consumers, Ordering::Relaxed);
    }

    /// Records a `connection.blocked` (with the broker's reason) or `connection.unblocked`.
    pub fn set_blocked(&self, reason: Option<&str>, metrics: &Metrics) {
        let was = self.broker_blocked.swap(reason.is_some(), Ordering::Relaxed);
        if let Ok(mut r) = self.blocked_reason.lock() {
            *r = reason.unwrap_or_default().to_string();
        }
        metrics.broker_blocked.set(i64::from(reason.is_some()));
        match (was, reason) {
            (false, Some(reason)) => {
                metrics.broker_blocks.inc();
                tracing::warn!(reason, "the broker blocks publishers: replies, dead letters and events wait");
            }
            (true, None) => tracing::info!("the broker unblocked publishers"),
            _ => {}
        }
    }

    /// Forgets a block when its connection is gone (a new connection starts unblocked); logs nothing, as the broker
    /// did not say it ended.
    fn clear_blocked(&self, metrics: &Metrics) {
        self.broker_blocked.store(false, Ordering::Relaxed);
        if let Ok(mut r) = self.blocked_reason.lock() {
            r.clear();
        }
        metrics.broker_blocked.set(0);
    }

    /// The broker's reason for blocking publishers, while it does.
    pub fn blocked(&self) -> Option<String> {
        if !self.broker_blocked.load(Ordering::Relaxed) {
            return None;
        }
        Some(self.blocked_reason.lock().map(|r| r.clone()).unwrap_or_default())
    }
}

/// Everything the worker needs.
#[derive(Clone)]
pub struct Worker {
    /// Database pool.
    pub pool: Pool,
    /// Settings.
    pub settings: Arc<Settings>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Health flags.
    pub health: Arc<Health>,
    /// Signalled by everything of this process that commits events; wakes the relay.
    pub outbox: OutboxSignal,
}

impl Worker {
    /// Runs until `shutdown` is cancelled, reconnecting to the broker as often as needed. `first` is a connection
    /// already made (by [`crate::manager::AgentConnectionManager::start`], which fails when the broker cannot be
    /// reached) and the index of its node in `amqp.url`; without it the worker connects itself, and retries until
    /// the broker answers.
    pub async fn run(self, shutdown: CancellationToken, mut first: Option<(lapin::Connection, usize)>) -> Result<()> {
        let probe = BacklogProbe::broker();
        // One identity for the worker's life: the relay of a new broker session renews the lease of the last one.
        let relay_identity = relay::relay_identity(&self.settings.worker.id);
        // Spans go to the OTLP collector when `telemetry.otlp_endpoint` is set (validated at start).
        let (tracer, exporter) = match self.settings.telemetry.traces_url().ok().flatten() {
            Some(url) => {
                let (tracer, exporter) = Tracer::start(&url, &self.settings.worker.id, &self.metrics);
                (tracer, Some(exporter))
            }
            None => (Tracer::default(), None),
        };
        let sweeper = Sweeper::new(
            self.pool.clone(),
            self.settings.clone(),
            probe.clone(),
            self.metrics.clone(),
            self.outbox.clone(),
        )
        .with_tracer(tracer.clone());
        let sweeper = tokio::spawn(sweeper.run(shutdown.clone()));
        let mut backoff = Backoff::default();
        // The broker node (of `amqp.url`'s list) to try first: after a session ends, the next one.
        let mut node = 0;
        // Whether a broker session was ever made: a failing connect is then a lost broker, else one never reached.
        let mut reached = false;
        while !shutdown.is_cancelled() {
            let started = Instant::now();
            let connected = match first.take() {
                Some(made) => Ok(made),
                None => tokio::select! {
                    _ = shutdown.cancelled() => break,
                    c = amqp::connect_from(&self.settings.amqp.url, node, "agent-connection-manager") => c,
                },
            };
            let (conn, index) = match connected {
                Ok(made) => made,
                Err(e) => {
                    let attempt = backoff.attempts() + 1;
                    if reached {
                        tracing::warn!(error = %e, attempt, "broker lost and not reached again; retrying");
                    } else {
                        tracing::warn!(error = %e, attempt, "broker never reached; retrying");
                    }
                    if !backoff.wait(&shutdown).await {
                        break;
                    }
                    continue;
                }
            };
            reached = true;
            node = index;
            match self.session(conn, index, &probe, &relay_identity, &tracer, &shutdown).await {
                Ok(()) => break,
                Err(e) => {
                    self.health.set(false, false);
                    probe.set(None).await;
                    if started.elapsed() > Duration::from_secs(60) {
                        backoff = Backoff::default();
                    }
                    node += 1;
                    if matches!(e, Error::Config(_)) {
                        // The broker refused the configured topology (a missing plugin, fewer heartbeat shards than
                        // exist): it will again until someone changes it, but the retries pick the change up.
                        tracing::error!(error = %e, attempt = backoff.attempts() + 1, "the broker refused the topology");
                    } else {
                        tracing::warn!(error = %e, attempt = backoff.attempts() + 1, "broker session ended; reconnecting");
                    }
                    if !backoff.wait(&shutdown).await {
                        break;
                    }
                }
            }
        }
        let _ = sweeper.await;
        // The last spans (this shutdown's) are posted, within a bound.
        drop(tracer);
        if let Some(exporter) = exporter {
            exporter.finish(SPAN_FLUSH_AT_STOP).await;
        }
        tracing::info!("worker stopped");
        Ok(())
    }

    async fn session(
        &self,
        conn: lapin::Connection,
        connected: usize,
        probe: &BacklogProbe,
        relay_identity: &relay::RelayIdentity,
        tracer: &Tracer,
        shutdown: &CancellationToken,
    ) -> Result<()> {
        let s = &self.settings;
        let topology = Topology::for_settings(s);
        // Watch for connection.blocked / unblocked for the whole session (a new connection starts unblocked), and
        // for the connection's loss: the session ends on it, whether or not its consumers' streams end too (after a
        // cluster node was killed, lapin reported the reset connection while the consumers went on waiting).
        let mut events = conn.events_listener();
        let (health, metrics) = (self.health.clone(), self.metrics.clone());
        let (lost_tx, mut lost) = tokio::sync::oneshot::channel::<String>();
        let status = conn.status().clone();
        let watcher = AbortOnDrop(tokio::spawn(async move {
            let mut lost_tx = Some(lost_tx);
            while let Some(event) = events.next().await {
                match event {
                    lapin::Event::ConnectionBlocked(reason) => health.set_blocked(Some(&reason), &metrics),
                    lapin::Event::ConnectionUnblocked => health.set_blocked(None, &metrics),
                    // A channel's error (the expected NOT_FOUND of a passive check, say) is reported here too;
                    // only the connection's own state says it is gone.
                    lapin::Event::Error(e) if !status.connected() => {
                        if let Some(tx) = lost_tx.take() {
                            let _ = tx.send(e.to_string());
                        }
                    }
                    _ => {}
                }
            }
        }));
        topology.declare(&conn, s).await?;
        let setup = conn.create_channel().await?;
        let publisher = amqp::confirm_channel(&conn).await?;
        let relay_channel = amqp::confirm_channel(&conn).await?;
        let mut heartbeat_channels = Vec::new();
        for _ in 0..topology.heartbeat_queues().len() {
            heartbeat_channels.push(conn.create_channel().await?);
        }
        let command_channel = conn.create_channel().await?;
        let unroutable_channel = conn.create_channel().await?;
        // Handles kept to close every channel before the connection (see the end of the session).
        let mut channels = vec![
            setup.clone(),
            publisher.clone(),
            relay_channel.clone(),
            command_channel.clone(),
            unroutable_channel.clone(),
        ];
        channels.extend(heartbeat_channels.iter().cloned());
        let log_channel = conn.create_channel().await?;
        channels.push(log_channel.clone());
        probe.set(Some((setup, topology.clone()))).await;
        tracing::info!(prefix = %s.amqp.prefix, node = connected + 1, "connected to the broker; topology declared");

        let shared = Arc::new(Shared {
            pool: self.pool.clone(),
            settings: self.settings.clone(),
            topology: topology.clone(),
            publisher,
            metrics: self.metrics.clone(),
            outbox: self.outbox.clone(),
            progress: probe.progress(),
            tracer: tracer.clone(),
        });
        let stop_consumers = shutdown.child_token();
        let stop_relay = CancellationToken::new();
        // Should this session be abandoned (shutdown grace passed), the relay stops too.
        let _stop_relay_on_drop = stop_relay.clone().drop_guard();
        let mut consumers = JoinSet::new();
        consumers.spawn(consumer::heartbeats(shared.clone(), heartbeat_channels, stop_consumers.clone()));
        consumers.spawn(consumer::commands(shared.clone(), command_channel, stop_consumers.clone()));
        consumers.spawn(consumer::unroutable(shared.clone(), unroutable_channel, stop_consumers.clone()));
        consumers.spawn(consumer::logs(shared.clone(), log_channel, stop_consumers.clone()));
        let mut relay = tokio::spawn(relay::run(relay::RelayConfig {
            pool: self.pool.clone(),
            channel: relay_channel,
            publishing: relay::Publishing {
                exchange: topology.event_exchange.clone(),
                batch: s.outbox.batch_size,
                lease: Duration::from_secs(s.outbox.lease_secs),
                confirm_timeout: s.confirm_timeout(),
                identity: relay_identity.clone(),
            },
            pipeline: s.outbox.pipeline.get(),
            poll: Duration::from_millis(s.outbox.poll_interval_ms.get()),
            wake: self.outbox.clone(),
            blocked: self.health.broker_blocked.clone(),
            metrics: self.metrics.clone(),
            shutdown: stop_relay.clone(),
        }));
        self.health.set(true, true);

        let flatten = |r: std::result::Result<Result<()>, tokio::task::JoinError>| {
            r.unwrap_or_else(|e| Err(Error::TaskFailed(format!("a worker task: {e}"))))
        };
        let mut failure: Option<Error> = None;
        let mut relay_done = false;
        tokio::select! {
            _ = shutdown.cancelled() => {}
            Some(done) = consumers.join_next() => {
                failure = Some(flatten(done).err().unwrap_or_else(|| Error::Disconnected("a consumer stopped".into())));
            }
            done = &mut relay => {
                relay_done = true;
                failure = Some(flatten(done).err().unwrap_or_else(|| Error::Disconnected("the relay stopped".into())));
            }
            Ok(why) = &mut lost => {
                tracing::warn!(error = %why, "broker connection failed; ending the broker session");
                failure = Some(Error::Disconnected(format!("the connection failed: {why}")));
            }
        }
        stop_consumers.cancel();
        let failed = failure.is_some();
        // At shutdown the consumers finish what they hold (bounded by the worker's shutdown grace); after a failure
        // they get CONSUMERS_GONE: what they still hold cannot be acknowledged on a failed connection anyway, and the
        // broker redelivers it.
        let joined = async {
            while let Some(done) = consumers.join_next().await {
                if let Err(e) = flatten(done) {
                    failure.get_or_insert(e);
                }
            }
        };
        if !failed {
            joined.await;
        } else if tokio::time::timeout(CONSUMERS_GONE, joined).await.is_err() {
            tracing::warn!("consumers did not stop within {CONSUMERS_GONE:?} of the failure; their deliveries are left for redelivery");
            consumers.abort_all();
        }
        self.health.set(failure.is_none(), false);
        stop_relay.cancel();
        if !relay_done {
            if let Err(e) = flatten(relay.await) {
                failure.get_or_insert(e);
            }
        }
        probe.set(None).await;
        // Each channel is closed (awaiting its close-ok) before the connection: a channel whose last handle is
        // dropped while the connection closes is closed by lapin in the background, finds itself already closing and
        // reports that as a connection error (an ERROR line at every clean shutdown).
        let closes = channels
            .iter()
            .filter(|ch| ch.status().connected())
            .map(|ch| tokio::time::timeout(amqp::BROKER_QUERY_TIMEOUT, ch.close(200, "shutting down".into())));
        futures_util::future::join_all(closes).await;
        drop(channels);
        // Closing needs a write, which a blocked connection cannot make: give up after a moment (dropping it).
        let _ = tokio::time::timeout(amqp::BROKER_QUERY_TIMEOUT, conn.close(200, "shutting down".into())).await;
        drop(watcher);
        self.health.clear_blocked(&self.metrics);
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Aborts a task when dropped (the session's `connection.blocked` watcher ends with its session).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
