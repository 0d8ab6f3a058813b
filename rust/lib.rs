//! depeche-rs: a PostgreSQL message store engine for Python.
//!
//! `core` is the pure-Rust engine (no pyo3); `py` holds the bindings exposed as
//! `depeche_rs._native`.

pub mod core;
pub mod py;

use pyo3::prelude::*;

/// The native module behind `depeche_rs`; users import `depeche_rs`, never this.
#[pymodule]
mod _native {
    #[pymodule_export]
    use crate::py::partition::hash_mod_partition;
    #[pymodule_export]
    use crate::py::partition::stream_name_partition;
    #[pymodule_export]
    use crate::py::projector::Projector;
}
