//! The single conversion of engine errors into the Python exception tree defined in
//! `depeche_rs._exceptions`.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyModule;
use tokio_postgres::error::SqlState;

use depeche_rs_core::Error;

static EXCEPTIONS: PyOnceLock<Py<PyModule>> = PyOnceLock::new();

fn exception(py: Python<'_>, name: &str, message: String) -> PyResult<PyErr> {
    exception_with(py, name, (message,))
}

/// Build `depeche_rs._exceptions.<name>(*args)`.
fn exception_with<'py>(
    py: Python<'py>,
    name: &str,
    args: impl pyo3::call::PyCallArgs<'py>,
) -> PyResult<PyErr> {
    let module = EXCEPTIONS.get_or_try_init(py, || {
        PyModule::import(py, "depeche_rs._exceptions").map(Bound::unbind)
    })?;
    let class = module.bind(py).getattr(name)?;
    let value = class.call1(args)?;
    Ok(PyErr::from_value(value))
}

fn with_db_fields(py: Python<'_>, err: PyErr, source: &Error) -> PyErr {
    let value = err.value(py);
    let _ = value.setattr("sqlstate", source.sqlstate().map(SqlState::code));
    let _ = value.setattr("detail", source.detail());
    let _ = value.setattr("hint", source.hint());
    err
}

/// The Python exception for an engine error (a function, not `From`: both types live in
/// other crates).
pub fn py_err(err: Error) -> PyErr {
    {
        Python::attach(|py| {
            let message = err.to_string();
            let built = match &err {
                Error::Connection { .. } | Error::Lost(_) => {
                    exception(py, "DatabaseConnectionError", message)
                }
                Error::Database { .. } if err.is_connection_error() => {
                    exception(py, "DatabaseConnectionError", message)
                }
                Error::Database { .. }
                    if err.sqlstate() == Some(&SqlState::UNDEFINED_TABLE)
                        || err.sqlstate() == Some(&SqlState::UNDEFINED_COLUMN) =>
                {
                    exception(
                        py,
                        "MissingTablesError",
                        format!(
                            "{message}; create the objects first (construct the MessageStore and \
                             AggregatedStream, or run `depeche-rs migrate --apply`)"
                        ),
                    )
                }
                Error::Database { .. } => exception(py, "DatabaseError", message),
                Error::Partition(_) => exception(py, "PartitionerError", message),
                Error::UnsafeSequence { sequence, fix, .. } => {
                    exception_with(py, "UnsafeSequenceError", (message, sequence, fix))
                }
                Error::Config(_) => Ok(PyValueError::new_err(message)),
            };
            match built {
                Ok(py_err) => with_db_fields(py, py_err, &err),
                Err(import_failure) => import_failure,
            }
        })
    }
}
