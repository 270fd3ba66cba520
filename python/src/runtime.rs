//! The process's one tokio runtime, the gate every return into Python from an engine thread passes, and
//! synchronous waiting with the GIL released.
//!
//! A Python program may end while the engine's threads still work for it: a client never closed, a request in
//! flight, a daemon thread waiting in a synchronous call. CPython kills a thread that attaches to an interpreter
//! which is finalizing, or finds its thread state gone when it detaches (`Fatal Python error: PyGILState_Release`),
//! and a Rust thread killed that way takes the process down. So an engine thread enters Python only through
//! [`attach`], which refuses once [`close_gate`] ran. `close_gate` is an `atexit` callback: CPython runs those after
//! joining the program's non-daemon threads and before it starts finalizing, with every thread's state intact. It
//! closes the gate, then waits — with the GIL released — for the threads already inside to leave. From then on an
//! engine thread's answer is dropped (nobody can await it any more) and a daemon thread that comes back from a
//! synchronous wait parks until the process ends, as CPython's own daemon threads do.

use std::future::Future;
use std::sync::mpsc::{sync_channel, RecvTimeoutError};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

/// How often a waiting synchronous call looks for a pending signal (Ctrl-C).
const SIGNAL_CHECK: Duration = Duration::from_millis(100);

/// Longest time `close_gate` waits for engine threads already inside Python to leave.
const LEAVE_WAIT: Duration = Duration::from_secs(5);

static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();

/// The process's one runtime: the worker, every awaitable's work and every synchronous call run on it.
pub(crate) fn runtime() -> &'static tokio::runtime::Runtime {
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("acm-engine")
            .build()
            .unwrap_or_else(|e| panic!("cannot start the engine's tokio runtime: {e}"))
    })
}

/// Whether engine threads may still enter Python, and how many are inside.
struct Gate {
    closed: bool,
    inside: usize,
}

static GATE: Mutex<Gate> = Mutex::new(Gate { closed: false, inside: 0 });
/// Signalled when the last thread inside leaves.
static EMPTY: Condvar = Condvar::new();

fn gate() -> MutexGuard<'static, Gate> {
    GATE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A thread's leave to be inside Python; held until it has detached again.
pub(crate) struct Pass(());

impl Pass {
    /// A pass, unless the interpreter is shutting down.
    pub(crate) fn take() -> Option<Pass> {
        let mut g = gate();
        if g.closed {
            return None;
        }
        g.inside += 1;
        Some(Pass(()))
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        let mut g = gate();
        g.inside -= 1;
        if g.inside == 0 {
            EMPTY.notify_all();
        }
    }
}

/// Runs `f` attached to the interpreter, or not at all (`None`) once the interpreter is shutting down.
pub(crate) fn attach<R>(f: impl for<'py> FnOnce(Python<'py>) -> R) -> Option<R> {
    // Declared first, dropped last: the pass is held until `Python::attach` has detached.
    let _pass = Pass::take()?;
    Some(Python::attach(f))
}

/// Whether the gate is closed (the interpreter is shutting down).
pub(crate) fn closed() -> bool {
    gate().closed
}

/// The `atexit` callback: no engine thread enters Python from now on; those inside are waited for.
#[pyfunction]
pub(crate) fn close_gate(py: Python<'_>) {
    gate().closed = true;
    py.detach(|| {
        let g = gate();
        let (g, waited) =
            EMPTY.wait_timeout_while(g, LEAVE_WAIT, |g| g.inside > 0).unwrap_or_else(PoisonError::into_inner);
        if waited.timed_out() {
            // Said on stderr (Python's logging may be gone by now): should the process then die in finalization,
            // this line says which bound was too short.
            eprintln!(
                "agent_connection_manager: {} engine thread(s) still inside Python {} s after exit began",
                g.inside,
                LEAVE_WAIT.as_secs()
            );
        }
        drop(g);
    });
}

/// Keeps a thread that may not return into Python out of it until the process ends.
fn park_forever() -> ! {
    loop {
        std::thread::park();
    }
}

/// Runs `fut` on the engine's runtime and waits for it with the GIL released, checking for signals (Ctrl-C) every
/// `SIGNAL_CHECK`.
pub(crate) fn wait<F, T>(py: Python<'_>, fut: F) -> PyResult<T>
where
    F: Future<Output = PyResult<T>> + Send + 'static,
    T: Send + 'static,
{
    if closed() {
        return Err(PyRuntimeError::new_err("the interpreter is shutting down: the engine takes no more calls"));
    }
    let (tx, rx) = sync_channel(1);
    runtime().spawn(async move {
        let _ = tx.send(fut.await);
    });
    let mut rx = rx;
    loop {
        // The receiver goes to the GIL-free closure and comes back (it is not `Sync`). Coming back into Python needs
        // a pass: a thread still waiting here when the interpreter shuts down stays out of it.
        let (answer, back, pass) = py.detach(move || {
            let answer = rx.recv_timeout(SIGNAL_CHECK);
            match Pass::take() {
                Some(pass) => (answer, rx, pass),
                None => park_forever(),
            }
        });
        rx = back;
        let done = match answer {
            Ok(result) => Some(result),
            Err(RecvTimeoutError::Timeout) => py.check_signals().err().map(Err),
            Err(RecvTimeoutError::Disconnected) => {
                Some(Err(PyRuntimeError::new_err("the engine dropped a call without an answer")))
            }
        };
        drop(pass);
        if let Some(result) = done {
            return result;
        }
    }
}
