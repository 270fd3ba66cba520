//! Validation: each value on its own, then the combinations a running worker needs.

use std::net::SocketAddr;

use super::{ConfigError, Settings};

/// Most heartbeat shards: each is a queue every worker consumes on a channel of its own.
pub const MAX_HEARTBEAT_SHARDS: u32 = 64;

impl Settings {
    /// Checks every value that its type alone does not constrain.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: &str| Err(ConfigError(format!("{key}: {why}")));
        if self.database.url.parse::<tokio_postgres::Config>().is_err() {
            return bad("database.url", "not a valid PostgreSQL URL or key=value string");
        }
        let urls = super::broker_urls(&self.amqp.url);
        if urls.is_empty() {
            return bad("amqp.url", "must be an amqp:// or amqps:// URL, or several separated by commas");
        }
        for u in urls {
            match url::Url::parse(u) {
                Ok(u) if u.scheme() == "amqp" || u.scheme() == "amqps" => {}
                _ => return bad("amqp.url", "must be an amqp:// or amqps:// URL, or several separated by commas"),
            }
        }
        let prefix_ok = !self.amqp.prefix.is_empty()
            && self.amqp.prefix.len() <= 200
            && self.amqp.prefix.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c));
        if !prefix_ok {
            return bad("amqp.prefix", "must be 1-200 characters of letters, digits, '-', '_', '.', ':'");
        }
        if !(1..=MAX_HEARTBEAT_SHARDS).contains(&self.amqp.heartbeat_shards) {
            return bad("amqp.heartbeat_shards", &format!("must be from 1 to {MAX_HEARTBEAT_SHARDS}"));
        }
        let s = &self.sweeper;
        let l = &self.limits;
        for (key, v) in [
            ("limits.max_connections_per_agent", l.max_connections_per_agent),
            ("limits.max_sessions_per_agent", l.max_sessions_per_agent),
            ("limits.max_pending_instructions_per_agent", l.max_pending_instructions_per_agent),
        ] {
            if v < 1 {
                return bad(key, "must be at least 1");
            }
        }
        if s.stale_brake_window_secs >= s.connection_stale_after_secs.get() {
            return bad("sweeper.stale_brake_window_secs", "must be below sweeper.connection_stale_after_secs");
        }
        if !(s.stale_brake_ratio > 0.0 && s.stale_brake_ratio <= 1.0) {
            return bad("sweeper.stale_brake_ratio", "must be greater than 0 and at most 1");
        }
        if s.batch_size < 1 {
            return bad("sweeper.batch_size", "must be at least 1");
        }
        if self.outbox.batch_size < 1 {
            return bad("outbox.batch_size", "must be at least 1");
        }
        if self.worker.session_activity_granularity_secs >= s.session_inactive_after_secs.get() {
            return bad(
                "worker.session_activity_granularity_secs",
                "must be below sweeper.session_inactive_after_secs (a session heard from must not look inactive)",
            );
        }
        if self.outbox.lease_secs < 2 {
            return bad("outbox.lease_secs", "must be at least 2 (the holder renews it every third of it)");
        }
        if self.worker.id.chars().any(char::is_control) {
            return bad("worker.id", "must not contain control characters");
        }
        if !self.http.listen.is_empty() && self.http.listen.parse::<SocketAddr>().is_err() {
            return bad("http.listen", "must be an address such as 127.0.0.1:9090, or empty");
        }
        self.logs.validate()?;
        self.telemetry.validate()?;
        Ok(())
    }

    /// Pooled connections a running worker holds at once at full load: one per heartbeat batch in flight, command
    /// applied at once, relay batch in flight and sweeper batch transaction, plus one for the statistics of `/metrics`
    /// and one for the log consumer's batch.
    pub fn worker_connections(&self) -> usize {
        self.worker.heartbeat_pipeline.get()
            + self.worker.command_lanes.get()
            + self.outbox.pipeline.get()
            + self.sweeper.parallel_batches.get()
            + 2
    }

    /// Checks what running the worker needs beyond [`Settings::validate`]: settings that are each valid but cannot
    /// work together. Library calls that do not start the worker (creating or closing a session, statistics) do not
    /// need them.
    pub fn validate_worker(&self) -> Result<(), ConfigError> {
        let w = &self.worker;
        let needed = w.heartbeat_batch_size.get().saturating_mul(w.heartbeat_pipeline.get());
        if usize::from(self.amqp.prefetch.get()) < needed {
            return Err(ConfigError(format!(
                "amqp.prefetch: {} is below worker.heartbeat_batch_size x worker.heartbeat_pipeline ({needed}); \
                 the later batches of the pipeline would never fill",
                self.amqp.prefetch
            )));
        }
        let held = self.worker_connections();
        if self.database.pool_size.get() < held {
            return Err(ConfigError(format!(
                "database.pool_size: {} is below the {held} connections a worker holds at once \
                 (worker.heartbeat_pipeline + worker.command_lanes + outbox.pipeline + sweeper.parallel_batches + 2)",
                self.database.pool_size
            )));
        }
        Ok(())
    }
}
