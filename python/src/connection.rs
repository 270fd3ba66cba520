//! The broker connection shared by a `Client` and its subscriptions: made on first use, gone after `close`. Its
//! own module, below both, so that `client` uses `subscription` and neither uses the other the other way.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use acm::client::Client as EngineClient;
use agent_connection_manager as acm;

use pyo3::prelude::*;
use tokio::sync::{RwLock, RwLockReadGuard};

use crate::errors::{to_py, AgentConnectionManagerError, BrokerError};

/// Longest wait for a broker connection from `Client`.
const BROKER_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The connection behind a `Client`: made on first use, gone after `close`.
pub(crate) struct ClientState {
    pub(crate) amqp_url: String,
    pub(crate) prefix: String,
    pub(crate) client: RwLock<Option<EngineClient>>,
    pub(crate) closed: AtomicBool,
}

/// The connected engine client, borrowed from a [`ClientState`] for one call.
pub(crate) type Connected<'a> = RwLockReadGuard<'a, EngineClient>;

impl ClientState {
    /// Connects when not yet connected, waiting at most `BROKER_CONNECT_TIMEOUT`.
    pub(crate) async fn connected(&self) -> PyResult<Connected<'_>> {
        self.connected_within(BROKER_CONNECT_TIMEOUT).await
    }

    /// Connects within `timeout` (and at most `BROKER_CONNECT_TIMEOUT`), and returns the client with what is left of
    /// `timeout` (at least 1 ms), so that `timeout` bounds a whole call, connecting included.
    pub(crate) async fn connected_for(&self, timeout: Duration) -> PyResult<(Connected<'_>, Duration)> {
        let began = Instant::now();
        let client = self.connected_within(timeout.min(BROKER_CONNECT_TIMEOUT)).await?;
        Ok((client, timeout.saturating_sub(began.elapsed()).max(Duration::from_millis(1))))
    }

    /// Connects when not yet connected, waiting at most `limit` for the broker.
    pub(crate) async fn connected_within(&self, limit: Duration) -> PyResult<Connected<'_>> {
        if self.closed.load(Ordering::Acquire) {
            return Err(AgentConnectionManagerError::new_err("the client is closed"));
        }
        if self.client.read().await.is_none() {
            let mut slot = self.client.write().await;
            if slot.is_none() && !self.closed.load(Ordering::Acquire) {
                let connect = EngineClient::connect(&self.amqp_url, &self.prefix);
                let client = tokio::time::timeout(limit, connect).await.map_err(|_| {
                    BrokerError::new_err(format!(
                        "broker {}: no connection within {:.1}s (never reached)",
                        acm::config::redact_url(&self.amqp_url),
                        limit.as_secs_f64()
                    ))
                })?;
                *slot = Some(client.map_err(to_py)?);
            }
        }
        RwLockReadGuard::try_map(self.client.read().await, Option::as_ref)
            .map_err(|_| AgentConnectionManagerError::new_err("the client is closed"))
    }
}
