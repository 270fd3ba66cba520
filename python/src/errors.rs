//! The mapping of library errors onto the package's exceptions.
//!
//! The exception classes are defined in Python (`agent_connection_manager/_errors.py`: one of them has two bases,
//! one has attributes of its own) and imported here by name; an error made on an engine thread names its class
//! lazily and is looked up only once it reaches Python.

use acm::{CommandError, Error};
use agent_connection_manager as acm;
use pyo3::prelude::*;

pyo3::import_exception!(agent_connection_manager._errors, AgentConnectionManagerError);
pyo3::import_exception!(agent_connection_manager._errors, DatabaseError);
pyo3::import_exception!(agent_connection_manager._errors, BrokerError);
pyo3::import_exception!(agent_connection_manager._errors, RequestTimeoutError);
pyo3::import_exception!(agent_connection_manager._errors, ConfigurationError);
pyo3::import_exception!(agent_connection_manager._errors, InvalidArgumentError);
pyo3::import_exception!(agent_connection_manager._errors, SubscriptionClosedError);
pyo3::import_exception!(agent_connection_manager._errors, CommandRefusedError);

/// A bad argument: a `ValueError` that is also an `AgentConnectionManagerError`.
pub(crate) fn invalid(message: impl Into<String>) -> PyErr {
    InvalidArgumentError::new_err(message.into())
}

/// The Python exception for a library error.
pub(crate) fn to_py(e: Error) -> PyErr {
    let text = e.to_string();
    match e {
        Error::Db(_) | Error::DbUnreachable(_) | Error::Pool(_) | Error::Migration(_) | Error::MissingRow(_) => {
            DatabaseError::new_err(text)
        }
        Error::Amqp(_) | Error::Nack(_) | Error::Disconnected(_) => BrokerError::new_err(text),
        Error::Timeout(_) => RequestTimeoutError::new_err(text),
        Error::Config(_) => ConfigurationError::new_err(text),
        Error::Command(CommandError::Invalid(m)) => invalid(m),
        Error::Command(c) => CommandRefusedError::new_err((c.to_string(), c.code())),
        Error::Reply(_) | Error::TaskFailed(_) | Error::Shutdown => AgentConnectionManagerError::new_err(text),
    }
}
