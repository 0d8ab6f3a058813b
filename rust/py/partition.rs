//! The built-in partitioners, callable from Python.

use pyo3::prelude::*;

use depeche_rs_core::BuiltinPartitioner;

/// depeche-db's StreamNamePartitioner: first two bytes of sha256(stream), little endian.
#[pyfunction]
pub fn stream_name_partition(stream: &str) -> i64 {
    BuiltinPartitioner::StreamName.partition(stream)
}

/// First eight bytes of sha256(stream), little endian, modulo `n` (n >= 1).
#[pyfunction]
pub fn hash_mod_partition(stream: &str, n: u32) -> PyResult<i64> {
    if n == 0 {
        return Err(pyo3::exceptions::PyValueError::new_err(
            "the number of partitions must be at least 1",
        ));
    }
    Ok(BuiltinPartitioner::HashMod(n).partition(stream))
}
