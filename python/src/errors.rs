//! The package's exception hierarchy and the mapping of library errors onto it.

use acm::{CommandError, Error};
use agent_connection_manager as acm;
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;

pyo3::create_exception!(
    agent_connection_manager,
    AgentConnectionManagerError,
    PyException,
    "Base class of the package's errors."
);
pyo3::create_exception!(
    agent_connection_manager,
    DatabaseError,
    AgentConnectionManagerError,
    "PostgreSQL failed, refused or did not answer in time."
);
pyo3::create_exception!(
    agent_connection_manager,
    BrokerError,
    AgentConnectionManagerError,
    "RabbitMQ refused, lost or did not accept a connection, channel or publish."
);
pyo3::create_exception!(
    agent_connection_manager,
    RequestTimeoutError,
    AgentConnectionManagerError,
    "No reply came within the request's timeout."
);
pyo3::create_exception!(
    agent_connection_manager,
    ConfigurationError,
    AgentConnectionManagerError,
    "The layered configuration (ACM_* variables, ACM_CONFIG, config/default.toml) is unusable."
);
pyo3::create_exception!(
    agent_connection_manager,
    CommandRefusedError,
    AgentConnectionManagerError,
    "The engine understood the call but refused it (not_found, conflict, forbidden, limit)."
);

/// The Python exception for a library error.
pub(crate) fn to_py(e: Error) -> PyErr {
    let text = e.to_string();
    match e {
        Error::Db(_) | Error::DbUnreachable(_) | Error::Pool(_) | Error::Migration(_) => DatabaseError::new_err(text),
        Error::Amqp(_) | Error::Nack(_) | Error::Disconnected(_) => BrokerError::new_err(text),
        Error::Timeout(_) => RequestTimeoutError::new_err(text),
        Error::Config(_) => ConfigurationError::new_err(text),
        Error::Command(CommandError::Invalid(m)) => PyValueError::new_err(m),
        Error::Command(c) => CommandRefusedError::new_err(c.to_string()),
        Error::Shutdown => AgentConnectionManagerError::new_err(text),
    }
}
