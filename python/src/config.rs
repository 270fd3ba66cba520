//! The layered configuration, and the database URL of a `db_engine` argument.

use acm::Settings;
use agent_connection_manager as acm;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};

use crate::errors::{invalid, ConfigurationError};

/// The layered configuration (`ACM_*`, `ACM_CONFIG`, `config/default.toml`).
pub(crate) fn load_settings() -> PyResult<Settings> {
    Settings::load(None).map_err(|e| ConfigurationError::new_err(e.to_string()))
}

/// A PostgreSQL URL the engine reads, from a URL string in libpq or SQLAlchemy form (`postgresql+driver://`).
fn normalize_url(url: &str) -> PyResult<String> {
    let bad = || {
        invalid(
            "db_engine: expected a PostgreSQL URL (postgres://, postgresql:// or postgresql+driver://), \
             a SQLAlchemy Engine, AsyncEngine or URL, or None",
        )
    };
    let Some((scheme, rest)) = url.split_once("://") else {
        // libpq's key=value form, as the configuration accepts it.
        return if url.contains('=') { Ok(url.to_string()) } else { Err(bad()) };
    };
    let dialect = scheme.split('+').next().unwrap_or_default();
    if dialect == "postgres" || dialect == "postgresql" {
        Ok(format!("postgres://{rest}"))
    } else {
        Err(bad())
    }
}

/// The database URL of a `db_engine` argument: a string, or (duck-typed, without importing SQLAlchemy) an object
/// with `render_as_string(hide_password=False)` (a `URL`) or with such a `url` (an `Engine` or `AsyncEngine`).
pub(crate) fn engine_url(db_engine: &Bound<'_, PyAny>) -> PyResult<String> {
    if let Ok(s) = db_engine.cast::<PyString>() {
        return normalize_url(&s.extract::<String>()?);
    }
    let url = if db_engine.hasattr("render_as_string")? {
        db_engine.clone()
    } else if db_engine.hasattr("url")? {
        db_engine.getattr("url")?
    } else {
        return normalize_url("");
    };
    if let Ok(s) = url.cast::<PyString>() {
        return normalize_url(&s.extract::<String>()?);
    }
    let kwargs = PyDict::new(db_engine.py());
    kwargs.set_item("hide_password", false)?;
    let text: String = url.call_method("render_as_string", (), Some(&kwargs))?.extract()?;
    normalize_url(&text)
}
