//! The broker connection shared by a `Client` and its subscriptions: made on first use, gone after `close`. Its
//! own module, below both, so that `client` uses `subscription` and neither uses the other the other way.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use acm::client::Client as EngineClient;
use agent_connection_manager as acm;

use pyo3::prelude::*;
use tokio::sync::RwLock;

use crate::errors::{to_py, AgentConnectionManagerError, BrokerError};

/// Longest wait for a broker connection from `Client`.
pub(crate) const BROKER_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The connection behind a `Client`: made on first use, gone after `close`.
pub(crate) struct ClientState {
    pub(crate) amqp_url: String,
    pub(crate) prefix: String,
    pub(crate) client: RwLock<Option<EngineClient>>,
    pub(crate) closed: AtomicBool,
}

impl ClientState {
    /// Connects when not yet connected, waiting at most `BROKER_CONNECT_TIMEOUT`.
    pub(crate) async fn connected(&self) -> PyResult<tokio::sync::RwLockReadGuard<'_, Option<EngineClient>>> {
        self.connected_within(BROKER_CONNECT_TIMEOUT).await
    }

    /// Connects when not yet connected, waiting at most `limit` for the broker.
    pub(crate) async fn connected_within(
        &self,
        limit: Duration,
    ) -> PyResult<tokio::sync::RwLockReadGuard<'_, Option<EngineClient>>> {
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
        let guard = self.client.read().await;
        if guard.is_none() {
            return Err(AgentConnectionManagerError::new_err("the client is closed"));
        }
        Ok(guard)
    }
}
