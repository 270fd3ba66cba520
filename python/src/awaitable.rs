//! Awaitables: the engine's futures as asyncio futures of the caller's loop.
//!
//! [`awaitable`] spawns the work on the engine's runtime at once and returns an `asyncio.Future` of the running
//! loop (outside a running loop, an awaitable that binds to the loop awaiting it). When the work ends, its engine thread passes the gate ([`crate::runtime::attach`]), turns the answer into
//! Python values and hands it to the loop with `call_soon_threadsafe`; once the interpreter is shutting down the
//! answer is dropped instead. Cancelling the asyncio future aborts the work. Answers are Rust values until then
//! ([`IntoPython`]), so no engine thread touches Python anywhere else.

use std::future::Future;
use std::sync::{Mutex, PoisonError};

use chrono::{DateTime, Utc};
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyCFunction;
use serde_json::Value;
use tokio::task::JoinHandle;

use crate::convert::json_to_py;
use crate::runtime::{attach, enter, runtime};

/// An answer that becomes a Python value on a thread attached to the interpreter.
pub(crate) trait IntoPython: Send + 'static {
    /// The Python value.
    fn into_python(self, py: Python<'_>) -> PyResult<Py<PyAny>>;
}

impl IntoPython for () {
    fn into_python(self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        Ok(py.None())
    }
}

impl IntoPython for bool {
    fn into_python(self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        Ok(pyo3::types::PyBool::new(py, self).to_owned().into_any().unbind())
    }
}

impl IntoPython for String {
    fn into_python(self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        Ok(pyo3::types::PyString::new(py, &self).into_any().unbind())
    }
}

impl IntoPython for Py<PyAny> {
    fn into_python(self, _py: Python<'_>) -> PyResult<Py<PyAny>> {
        Ok(self)
    }
}

impl<T: IntoPython> IntoPython for Option<T> {
    fn into_python(self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        match self {
            Some(v) => v.into_python(py),
            None => Ok(py.None()),
        }
    }
}

/// A JSON value, as dicts, lists, strings, numbers, booleans and `None`.
pub(crate) struct Json(pub(crate) Value);

impl IntoPython for Json {
    fn into_python(self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        json_to_py(py, &self.0)
    }
}

/// The statistics: a dict whose `timestamp` is a timezone-aware `datetime`.
pub(crate) struct Stats {
    pub(crate) fields: Value,
    pub(crate) timestamp: DateTime<Utc>,
}

impl IntoPython for Stats {
    fn into_python(self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let dict = json_to_py(py, &self.fields)?;
        dict.bind(py).set_item("timestamp", self.timestamp)?;
        Ok(dict)
    }
}

/// Sets an asyncio future's outcome, unless it is already done (cancelled by its awaiter). Called by the loop.
#[pyfunction]
fn resolve(future: &Bound<'_, PyAny>, ok: bool, value: Bound<'_, PyAny>) -> PyResult<()> {
    // Once the interpreter is shutting down nobody awaits the answer.
    let Ok(_pass) = enter() else { return Ok(()) };
    if future.call_method0("done")?.is_truthy()? {
        return Ok(());
    }
    let method = if ok { "set_result" } else { "set_exception" };
    future.call_method1(method, (value,))?;
    Ok(())
}

static RESOLVE: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// An answer on its way into Python.
type Answer = Box<dyn FnOnce(Python<'_>) -> PyResult<Py<PyAny>> + Send>;

/// The work of an awaitable, running on the engine's runtime.
type Work = JoinHandle<PyResult<Answer>>;

/// Runs `fut` on the engine's runtime now. Inside a running event loop, returns an asyncio future of that loop
/// which gets its outcome; outside one (`loop.run_until_complete(manager.start())`), an awaitable that binds to the
/// loop that awaits it.
pub(crate) fn awaitable<'py, F, T>(py: Python<'py>, fut: F) -> PyResult<Bound<'py, PyAny>>
where
    F: Future<Output = PyResult<T>> + Send + 'static,
    T: IntoPython,
{
    let _pass = enter()?;
    let work: Work =
        runtime().spawn(async move { fut.await.map(|v| Box::new(move |py: Python<'_>| v.into_python(py)) as Answer) });
    match py.import("asyncio")?.call_method0("get_running_loop") {
        Ok(event_loop) => bind(event_loop, work),
        Err(_) => Ok(Bound::new(py, Pending { work: Mutex::new(Some(work)) })?.into_any()),
    }
}

/// An asyncio future of `event_loop` that gets `work`'s outcome. Cancelling it aborts the work.
fn bind<'py>(event_loop: Bound<'py, PyAny>, work: Work) -> PyResult<Bound<'py, PyAny>> {
    let py = event_loop.py();
    let resolve = RESOLVE.get_or_try_init(py, || wrap_pyfunction!(resolve, py).map(|f| f.into_any().unbind()))?;
    let resolve = resolve.clone_ref(py);
    let future = event_loop.call_method0("create_future")?;
    let (loop_ref, future_ref) = (event_loop.unbind(), future.clone().unbind());
    let abort = work.abort_handle();
    runtime().spawn(async move {
        let outcome = match work.await {
            Ok(outcome) => outcome,
            Err(e) if e.is_cancelled() => return,
            Err(_) => Err(PyRuntimeError::new_err("the engine's work for this call panicked")),
        };
        // Dropped unrun once the interpreter is shutting down: its Python references are then released by pyo3's
        // deferred reference counting, which needs no interpreter.
        attach(move |py| {
            let (ok, value) = match outcome.and_then(|answer| answer(py)) {
                Ok(v) => (true, v),
                Err(e) => (false, e.into_value(py).into_any()),
            };
            // A closed loop refuses the call: nobody awaits the answer any more.
            let _ = loop_ref.bind(py).call_method1("call_soon_threadsafe", (resolve, future_ref, ok, value));
        });
    });
    // Runs on the loop's thread when the future is done: aborts the work if it was cancelled (a no-op otherwise).
    let on_done = PyCFunction::new_closure(py, None, None, move |_args, _kwargs| abort.abort())?;
    future.call_method1("add_done_callback", (on_done,))?;
    Ok(future)
}

/// The answer of a call made outside a running event loop; awaiting it (once) binds it to the awaiting loop.
#[pyclass(module = "agent_connection_manager", frozen)]
pub(crate) struct Pending {
    work: Mutex<Option<Work>>,
}

#[pymethods]
impl Pending {
    fn __await__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let _pass = enter()?;
        let work = self.work.lock().unwrap_or_else(PoisonError::into_inner).take();
        let work = work.ok_or_else(|| PyRuntimeError::new_err("this call's answer was already awaited"))?;
        let event_loop = py.import("asyncio")?.call_method0("get_running_loop")?;
        bind(event_loop, work)?.call_method0("__await__")
    }
}
