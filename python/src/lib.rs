//! `agent_connection_manager._native`: the Rust engine as a Python extension module.
//!
//! Thin on purpose: configuration, guarantees and protocol are the library's. This layer only turns Python
//! arguments into library calls and library results and errors into Python values and exceptions.
//!
//! One tokio runtime per process, the engine's own (`runtime.rs`), runs everything: the worker started by
//! `start()`, the futures behind every awaitable (`awaitable.rs`), and the calls of the synchronous methods. A
//! synchronous method spawns its work on that runtime and waits for the answer with the GIL released, so it never
//! touches the caller's asyncio loop, works from inside a running loop and from many threads at once, and never
//! blocks a runtime thread. Engine threads enter Python only through `runtime::attach`, whose gate an `atexit`
//! callback closes before the interpreter finalizes: however the program ends, no engine thread touches a
//! finalizing interpreter.

mod awaitable;
mod client;
mod config;
mod connection;
mod convert;
mod engine;
mod errors;
mod manager;
mod pylog;
mod runtime;
mod subscription;

use agent_connection_manager as acm;
use pyo3::prelude::*;

use crate::client::Client;
use crate::manager::AgentConnectionManager;
use crate::subscription::Subscription;

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    // `RUST_LOG` set at import: the engine's lines on stderr, filtered by it; otherwise into Python's `logging`.
    if std::env::var_os("RUST_LOG").is_some() {
        acm::telemetry::init(acm::config::LogFormat::Text, "warn");
    } else {
        pylog::install(py)?;
    }
    // Registered at import, so it runs before the interpreter finalizes whatever the program does later.
    py.import("atexit")?.call_method1("register", (wrap_pyfunction!(runtime::close_gate, m)?,))?;
    m.add_class::<AgentConnectionManager>()?;
    m.add_class::<Client>()?;
    m.add_class::<Subscription>()?;
    m.add_function(wrap_pyfunction!(manager::get_connection_manager, m)?)?;
    m.add_function(wrap_pyfunction!(manager::start_connection_manager, m)?)?;
    m.add_function(wrap_pyfunction!(manager::stop_connection_manager, m)?)?;
    Ok(())
}
