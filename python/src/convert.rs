//! Python values to and from JSON, and argument checks shared by the classes.

use pyo3::prelude::*;

use crate::errors::invalid;
use pyo3::types::PyDict;
use serde_json::{Map, Value};

/// A Python object from JSON.
pub(crate) fn json_to_py(py: Python<'_>, value: &Value) -> PyResult<Py<PyAny>> {
    Ok(py.import("json")?.call_method1("loads", (value.to_string(),))?.unbind())
}

/// JSON from a Python object (`what` names the argument in the `ValueError`).
pub(crate) fn py_to_json(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Value> {
    let py = obj.py();
    let kwargs = PyDict::new(py);
    kwargs.set_item("allow_nan", false)?;
    let text: String = match py.import("json")?.call_method("dumps", (obj,), Some(&kwargs)) {
        Ok(t) => t.extract()?,
        Err(e) => return Err(invalid(format!("{what} is not JSON: {e}"))),
    };
    serde_json::from_str(&text).map_err(|e| invalid(format!("{what} is not JSON: {e}")))
}

/// A JSON object from a Python dict.
pub(crate) fn py_to_object(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Map<String, Value>> {
    if !obj.is_instance_of::<PyDict>() {
        return Err(invalid(format!("{what} must be a dict")));
    }
    match py_to_json(obj, what)? {
        Value::Object(m) => Ok(m),
        _ => Err(invalid(format!("{what} must be a dict"))),
    }
}

/// A non-empty string argument.
pub(crate) fn non_empty(value: &str, what: &str) -> PyResult<()> {
    if value.is_empty() {
        return Err(invalid(format!("{what} must not be empty")));
    }
    Ok(())
}
