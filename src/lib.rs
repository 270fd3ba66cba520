//! `agent-connection-manager`: keeps track of remote agents' sessions, connections, heartbeats and instructions.
//!
//! A RabbitMQ worker on PostgreSQL: consumers apply heartbeats (in batches) and commands (in transactions, with
//! replies), a sweeper closes stale connections, marks inactive sessions and expires or retries instructions, and
//! an outbox relay publishes every event written in the transaction that made the change.
//! [`AgentConnectionManager`] is the library's entry point.

pub mod amqp;
pub mod commands;
pub mod config;
pub mod consumer;
pub mod db;
pub mod domain;
pub mod error;
pub mod events;
pub mod manager;
pub mod metrics;
pub mod relay;
pub mod retry;
pub mod sweeper;
pub mod trace_context;
pub mod worker;

pub use commands::stats::ConnectionStats;
pub use config::Settings;
pub use error::{CommandError, Error, Result};
pub use manager::{get_connection_manager, start_connection_manager, stop_connection_manager, AgentConnectionManager};
pub mod cli;
pub mod client;
pub mod http;
pub mod schema;
pub mod simulate;
pub mod telemetry;
