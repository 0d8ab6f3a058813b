//! Values the classes hand to Python in one shape: message ids as `uuid.UUID`.

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use uuid::Uuid;

static UUID: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// `id` as a `uuid.UUID`.
pub fn py_uuid<'py>(py: Python<'py>, id: &Uuid) -> PyResult<Bound<'py, PyAny>> {
    let class = UUID.get_or_try_init(py, || {
        Ok::<_, PyErr>(py.import("uuid")?.getattr("UUID")?.unbind())
    })?;
    // UUID(hex, bytes, bytes_le, fields, int): positional, no keyword dict per row.
    let none = py.None();
    class
        .bind(py)
        .call1((&none, &none, &none, &none, id.as_u128()))
}
