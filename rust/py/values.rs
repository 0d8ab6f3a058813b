//! Values the classes hand to Python in one shape: message ids as `uuid.UUID`.

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyString;
use uuid::Uuid;

/// What building a `uuid.UUID` without its `__init__` takes.
struct UuidParts {
    /// `object.__new__`: `new(UUID)` allocates an empty UUID.
    new: Py<PyAny>,
    /// `object.__setattr__`: past `UUID.__setattr__`, which refuses (UUIDs are immutable).
    set: Py<PyAny>,
    class: Py<PyAny>,
    int: Py<PyString>,
    is_safe: Py<PyString>,
    /// `uuid.SafeUUID.unknown`, what `UUID(int=...)` sets.
    unknown: Py<PyAny>,
}

static UUID: PyOnceLock<UuidParts> = PyOnceLock::new();

/// `id` as a `uuid.UUID`, equal in every respect to `uuid.UUID(int=id)`.
///
/// Built the way `UUID.__setstate__` (unpickling) builds one: an empty instance whose two
/// slots, `int` and `is_safe`, are set with `object.__setattr__`. `UUID.__init__` checks
/// its five optional arguments in Python first, and costs twice as much per message.
pub fn py_uuid<'py>(py: Python<'py>, id: &Uuid) -> PyResult<Bound<'py, PyAny>> {
    let parts = UUID.get_or_try_init(py, || {
        let uuid = py.import("uuid")?;
        let builtins = py.import("builtins")?;
        Ok::<_, PyErr>(UuidParts {
            new: builtins.getattr("object")?.getattr("__new__")?.unbind(),
            set: builtins.getattr("object")?.getattr("__setattr__")?.unbind(),
            class: uuid.getattr("UUID")?.unbind(),
            int: PyString::intern(py, "int").unbind(),
            is_safe: PyString::intern(py, "is_safe").unbind(),
            unknown: uuid.getattr("SafeUUID")?.getattr("unknown")?.unbind(),
        })
    })?;
    let value = id.as_u128().into_pyobject(py)?;
    let object = parts.new.bind(py).call1((parts.class.bind(py),))?;
    let set = parts.set.bind(py);
    set.call1((&object, parts.int.bind(py), value))?;
    set.call1((&object, parts.is_safe.bind(py), parts.unknown.bind(py)))?;
    Ok(object)
}
