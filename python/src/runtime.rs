//! The process's one tokio runtime, the gate every thread passes to run the engine's code inside Python, and
//! synchronous waiting with the GIL released.
//!
//! A Python program may end while threads still work in the engine's code: an engine thread handing back an answer,
//! a daemon thread inside a call, a daemon thread waiting in a synchronous call. Once the interpreter is finalizing,
//! CPython (before 3.14) ends a thread that takes the GIL with `pthread_exit`. That unwinds the thread's stack, and a
//! Rust frame on it that catches unwinding (PyO3's wrapper around every method, tokio's around every task) turns it
//! into an abort: "FATAL: exception not rethrown". A call's Python work may give the GIL up at any moment (a method
//! of asyncio or `logging` written in Python, a garbage collection), so any thread running the engine's code inside
//! Python is exposed, not only those that release the GIL on purpose.
//!
//! So such code runs holding a [`Pass`]: the methods and functions Python calls take one with [`enter`], engine
//! threads with [`attach`]. Passes are refused once [`close_gate`] ran. `close_gate` is an `atexit` callback: CPython
//! runs those after joining the program's non-daemon threads and before it starts finalizing, with every thread's
//! state intact. It closes the gate, then waits, with the GIL released, for the threads holding passes to finish what
//! they do in Python. From then on an engine thread's answer is dropped (nobody can await it any more), a call is
//! refused, and a daemon thread that comes back from a synchronous wait parks until the process ends, as CPython's
//! own daemon threads do. A synchronous wait gives its thread's passes back while it waits without the GIL, so that
//! exit does not wait for it.

use std::cell::Cell;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::mpsc::{sync_channel, RecvTimeoutError};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

/// How often a waiting synchronous call looks for a pending signal (Ctrl-C).
const SIGNAL_CHECK: Duration = Duration::from_millis(100);

/// Longest time `close_gate` waits for the threads holding passes to give them back.
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

/// Whether threads may still run the engine's code inside Python, and how many passes are held.
struct Gate {
    closed: bool,
    inside: usize,
}

static GATE: Mutex<Gate> = Mutex::new(Gate { closed: false, inside: 0 });
/// Signalled when the last pass is given back.
static EMPTY: Condvar = Condvar::new();

thread_local! {
    /// The passes this thread holds (a method calling another holds two).
    static HELD: Cell<usize> = const { Cell::new(0) };
}

fn gate() -> MutexGuard<'static, Gate> {
    GATE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Gives back `n` passes' places in the count (the thread keeps them in `HELD`).
fn leave(g: &mut Gate, n: usize) {
    g.inside -= n;
    if g.inside == 0 {
        EMPTY.notify_all();
    }
}

/// A thread's leave to run the engine's code inside Python; held until that code is done there. It belongs to the
/// thread that took it (not `Send`).
pub(crate) struct Pass(PhantomData<*const ()>);

impl Pass {
    /// A pass, unless the interpreter is shutting down.
    fn take() -> Option<Pass> {
        let mut g = gate();
        if g.closed {
            return None;
        }
        g.inside += 1;
        HELD.with(|h| h.set(h.get() + 1));
        Some(Pass(PhantomData))
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        HELD.with(|h| h.set(h.get() - 1));
        leave(&mut gate(), 1);
    }
}

/// The pass of a method or function that Python calls, taken first thing: it may run Python code (asyncio's, a
/// conversion's) or give up the GIL. Refused once the interpreter is shutting down.
pub(crate) fn enter() -> PyResult<Pass> {
    Pass::take()
        .ok_or_else(|| PyRuntimeError::new_err("the interpreter is shutting down: the engine takes no more calls"))
}

/// Runs `f` on an engine thread attached to the interpreter, or not at all (`None`) once the interpreter is shutting
/// down.
pub(crate) fn attach<R>(f: impl for<'py> FnOnce(Python<'py>) -> R) -> Option<R> {
    // Declared first, dropped last: the pass is held until `Python::attach` has detached.
    let _pass = Pass::take()?;
    Some(Python::attach(f))
}

/// The `atexit` callback: no pass is given from now on; the threads holding one are waited for.
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
                "agent_connection_manager: {} pass(es) of threads running the engine's code in Python still held {} s \
                 after exit began",
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
    let _pass = enter()?;
    let (tx, rx) = sync_channel(1);
    runtime().spawn(async move {
        let _ = tx.send(fut.await);
    });
    let mut rx = rx;
    loop {
        // This thread's passes are given back while it waits without the GIL (exit need not wait for it), and taken
        // again before it comes back: a thread still waiting here when the interpreter shuts down stays out of it.
        // The receiver goes to the GIL-free closure and comes back (it is not `Sync`).
        let held = HELD.with(Cell::get);
        leave(&mut gate(), held);
        let (answer, back) = py.detach(move || {
            let answer = rx.recv_timeout(SIGNAL_CHECK);
            let mut g = gate();
            if g.closed {
                drop(g);
                park_forever();
            }
            g.inside += held;
            (answer, rx)
        });
        rx = back;
        let done = match answer {
            Ok(result) => Some(result),
            Err(RecvTimeoutError::Timeout) => py.check_signals().err().map(Err),
            Err(RecvTimeoutError::Disconnected) => {
                Some(Err(PyRuntimeError::new_err("the engine dropped a call without an answer")))
            }
        };
        if let Some(result) = done {
            return result;
        }
    }
}
